"""evomerge vs. mergekit 0.1.5: do they compute the same merge, and how much faster is an
in-place candidate than a fresh merge?

Run from the repo root:

    python bench/vs_mergekit.py            # full run (~6.5 min on 2 idle CPU cores)
    python bench/vs_mergekit.py --quick    # zoo only, two methods (~30 s)
    python bench/vs_mergekit.py --smoke    # seconds: ties and dare_ties on the zoo, linear on a tiny
                                           # random family; that it runs (tests/test_benches.py), not a figure

mergekit is never imported: it runs as a subprocess (`mergekit-yaml`, from --mergekit-yaml,
$MERGEKIT_YAML or PATH), on the mergekit YAML that evomerge itself writes for each recipe.
With --quick or --smoke and no mergekit-yaml to be found, the mergekit side is skipped and
evomerge's side still runs.

What is measured
----------------
Agreement (on the tiny zoo: base + three experts, ~864k parameters). For each method a recipe
is materialized with evomerge and merged by mergekit from evomerge's YAML (per-group lists
with layer_granularity 2 for task_arithmetic, ties and dare_ties, so the translation to
mergekit's per-layer `filter`s is exercised). Deterministic methods: max |ours - theirs| over
all tensors, the fraction of elements that differ, the largest difference in units in the
last place of the output dtype, and how many elements differ by more than 1 ulp (an entry
near zero that comes out of a cancellation can be several ulps apart while |d| is tiny).
Random methods (dare_*, della*): the masks come from different random streams, so they are
compared by statistics, with float32 outputs (a bf16 output would round many small deltas
back onto the base and blur the statistics): the
fraction of entries of (merged - base) that are exactly zero, per tool and as expected from
the keep probabilities and the actual deltas, and the relative difference of the two tools'
mean |merged - base| (whole model, and the worst tensor of >= 4096 entries).

Speed (on the zoo, and on a random-weight LLaMA family of ~134M parameters, bf16, built
under bench/out/ on first use and reused after). Per method:
  * in-place: `materializer.apply(recipe)` with all sources already resident (and touched
    once by an untimed linear merge); median of repeats after one warm-up (fewer repeats for
    slow methods; a call slower than the repeat budget is timed once, without a warm-up:
    "1*" in the tables);
  * naive: the loop a person would write without an in-place materializer:
    `copy.deepcopy(template)` + a fresh merged state dict from evomerge's own operators
    (`merge_tensor` without `out=`, cast to the model dtype) + `load_state_dict`; same
    repeat rule (the sources are resident here too, so this isolates the in-place part);
  * mergekit: wall time of one `mergekit-yaml` subprocess writing the checkpoint, as a user
    runs it (Python start-up and imports included; the bare start-up, `mergekit-yaml --help`,
    is reported separately);
  * floor: bytes read (every source tensor the recipe uses, the base included, at its stored
    dtype) + bytes written (the candidate's parameters), divided by the copy bandwidth
    measured with `dst.copy_(src)` on 256 MB float32 buffers ((read + write) / time).
    floor fraction = floor time / in-place time (1.0 = as fast as memory allows).

The sort- and RNG-heavy methods take minutes per merge at 134M parameters on 2 CPU cores
(in both tools), so the large family runs linear, task_arithmetic, ties, slerp and
model_stock by default; `--large-methods all` runs every method (much longer).

Results go to stdout (tables) and bench/out/vs_mergekit.json. Thread count is torch's
default and is reported, not changed; so is the load average, because other processes on
the machine slow every timing here (torch's worker threads wait on busy cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from evomerge.merge.materialize import Materializer, tensor_groups
from evomerge.merge.methods import get_method
from evomerge.merge.registry import merge_tensor
from evomerge.merge.rng import TensorRNG
from evomerge.mergekit_yaml import mergekit_yaml
from evomerge.recipe import Recipe, Source, n_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _families import Family, FamilySpec, ensure_family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
ZOO = REPO / "evomerge" / "zoo_models"
INSTALL_HINT = ("python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5\n"
                "then pass --mergekit-yaml /tmp/mkvenv/bin/mergekit-yaml (or set MERGEKIT_YAML)")

ALL_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
               "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock"]
QUICK_METHODS = ["task_arithmetic", "dare_ties"]
SMOKE_METHODS = ["ties", "dare_ties"]
ELEMENTWISE = ["linear", "task_arithmetic", "dare_linear"]  # judged by the copy-bandwidth floor  # one exact comparison, one by statistics
# The sort- and RNG-heavy methods take minutes per merge on 2 CPU cores at 134M parameters
# (in both tools), so by default the large family runs the rest; --large-methods all for everything.
LARGE_METHODS = ["linear", "task_arithmetic", "ties", "slerp", "model_stock"]
SMALL_ZOO_STANDIN = FamilySpec(hidden=128, layers=4, intermediate=384, vocab=64, heads=4, variants=3)
LARGE_SPEC = FamilySpec()  # ~134M parameters, see _families.py


# ----------------------------------------------------------------------------- recipes


def ramp(lo: float, hi: float, n: int) -> list[float]:
    """n values from lo to hi: a per-group list."""
    return [round(lo + (hi - lo) * i / max(n - 1, 1), 3) for i in range(n)]


def make_recipe(method: str, family: Family, dtype: str) -> Recipe:
    """The benchmark recipe for `method` on `family` (base + three experts)."""
    base, experts = family.base, family.experts[:3]
    groups = n_groups(family.n_layers, 2)

    def gta(params: list[dict], options: dict | None = None, granularity: int = 0) -> Recipe:
        return Recipe(method=method, base_model=base, models=[Source(e, p) for e, p in zip(experts, params)],
                      parameters=options or {}, layer_granularity=granularity, seed=0, dtype=dtype)

    if method == "linear":
        weights = [0.4, 0.2, 0.2, 0.2]
        return Recipe(method=method, models=[Source(m, {"weight": w}) for m, w in zip([base, *experts], weights)],
                      parameters={"normalize": True}, dtype=dtype)
    if method == "task_arithmetic":
        return gta([{"weight": ramp(0.3, 0.7, groups)}, {"weight": ramp(0.6, 0.4, groups)}, {"weight": 0.5}],
                   {"lambda": 0.9}, granularity=2)
    if method == "ties":
        return gta([{"weight": 1.0, "density": ramp(0.3, 0.7, groups)}, {"weight": 0.8, "density": ramp(0.6, 0.4, groups)},
                    {"weight": 0.6, "density": 0.5}], {"normalize": True}, granularity=2)
    if method == "dare_ties":
        return gta([{"weight": 0.5, "density": ramp(0.4, 0.7, groups)}, {"weight": 0.5, "density": ramp(0.7, 0.4, groups)},
                    {"weight": 0.5, "density": 0.5}], granularity=2)
    if method == "dare_linear":
        return gta([{"weight": 0.5, "density": 0.5}] * 3)
    if method == "breadcrumbs":
        return gta([{"weight": 0.5, "density": 0.8, "gamma": 0.02}] * 3)
    if method == "breadcrumbs_ties":
        return gta([{"weight": 0.6, "density": 0.7, "gamma": 0.01}] * 3)
    if method == "della":
        return gta([{"weight": 0.5, "density": 0.6, "epsilon": 0.15}] * 3)
    if method == "della_linear":
        return gta([{"weight": 0.5, "density": 0.5, "epsilon": 0.1}] * 3)
    if method == "slerp":
        return Recipe(method=method, base_model=base, models=[Source(experts[0])], parameters={"t": 0.4}, dtype=dtype)
    if method == "model_stock":
        return gta([{}] * 3)
    raise ValueError(f"no benchmark recipe for {method!r}")


def is_random(method: str) -> bool:
    return get_method(method).random


# ----------------------------------------------------------------------------- mergekit


def find_mergekit(given: str | None, required: bool) -> str | None:
    candidate = given or os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    if candidate and (Path(candidate).is_file() or shutil.which(candidate)):
        return candidate
    where = f" at {candidate}" if candidate else " (not on PATH, MERGEKIT_YAML unset)"
    if not required:
        print(f"note: mergekit-yaml not found{where}: its side is skipped")
        return None
    sys.exit(f"mergekit-yaml not found{where}. Install it in its own venv (evomerge never imports it):\n{INSTALL_HINT}")


def mergekit_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def time_mergekit_startup(exe: str) -> float:
    start = time.perf_counter()
    subprocess.run([exe, "--help"], env=mergekit_env(), capture_output=True, check=False)
    return time.perf_counter() - start


def run_mergekit(exe: str, yaml_text: str, workdir: Path, seed: int) -> tuple[float, Path | None, str]:
    """Merge with mergekit-yaml; returns (wall seconds, output dir or None, error text)."""
    config, out = workdir / "mergekit.yaml", workdir / "merged"
    config.write_text(yaml_text)
    cmd = [exe, str(config), str(out), "--no-write-model-card", "--no-copy-tokenizer", "--quiet",
           "--random-seed", str(seed)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=mergekit_env(), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not list(out.glob("*.safetensors")):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return seconds, None, f"mergekit-yaml exited {proc.returncode}: " + " | ".join(tail)
    return seconds, out, ""


def load_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


# ----------------------------------------------------------------------------- agreement


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Float bits as integers ordered like the floats, so |a - b| counts ulps between values."""
    int_type = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]
    bits = t.contiguous().view(int_type).to(torch.int64)
    sign_bit = 1 << (torch.iinfo(int_type).bits - 1)
    magnitude = bits & (sign_bit - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def compare_exact(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Max |difference|, fraction of differing elements and max ulp distance over all tensors."""
    missing = sorted(set(ours) ^ set(theirs))
    max_abs, max_ulp, differing, over_1ulp, total, dtypes = 0.0, 0, 0, 0, 0, set()
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        dtypes.add(f"{str(a.dtype).removeprefix('torch.')}/{str(b.dtype).removeprefix('torch.')}")
        if a.dtype != b.dtype:
            b = b.to(a.dtype)
        max_abs = max(max_abs, float((a.float() - b.float()).abs().max()))
        ulps = (_ordered_bits(a) - _ordered_bits(b)).abs()
        max_ulp = max(max_ulp, int(ulps.max()))
        over_1ulp += int((ulps > 1).sum())
        differing += int((a != b).sum())
        total += a.numel()
    return {"kind": "exact", "max_abs_diff": max_abs, "frac_differing": differing / max(total, 1), "max_ulp": max_ulp,
            "n_over_1ulp": over_1ulp, "elements": total, "dtypes": sorted(dtypes), "names_only_in_one": missing[:5]}


def keep_probability(recipe: Recipe, delta: torch.Tensor, params: dict[str, float]) -> torch.Tensor | float:
    """Each entry's keep probability, written from the papers (DARE: density; DELLA: a linear
    ramp over the magnitude rank within the row, density -+ epsilon)."""
    density = params.get("density", 1.0)
    if density >= 1:
        return 1.0
    if not recipe.method.startswith("della"):
        return density
    eps = params.get("epsilon", 0.15)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    rank = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float64)
    return ((density - eps) + rank / max(rows.shape[1] - 1, 1) * 2 * eps).view_as(delta)


def compare_random(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], recipe: Recipe,
                   sources: dict[str, dict[str, torch.Tensor]], groups: dict[str, int]) -> dict[str, Any]:
    """Statistics of (merged - base) per tool: exact-zero fraction (vs. expected) and mean |.|."""
    base = sources[recipe.base_model]
    experts = [sources[s.model] for s in recipe.models]
    zeros_ours = zeros_theirs = 0
    expected_zeros, l1_ours, l1_theirs, total, worst = 0.0, 0.0, 0.0, 0, 0.0
    for name in sorted(set(ours) & set(theirs)):
        b = base[name].double()
        d_ours, d_theirs = ours[name].double() - b, theirs[name].double() - b
        params = recipe.source_params(groups[name])
        p_zero = torch.ones_like(b)
        for expert, p in zip(experts, params):
            delta = expert[name].double() - b
            p_zero *= torch.where(delta == 0, 1.0, 1 - torch.as_tensor(keep_probability(recipe, delta, p)))
        zeros_ours += int((d_ours == 0).sum())
        zeros_theirs += int((d_theirs == 0).sum())
        expected_zeros += float(p_zero.sum())
        a1, t1 = float(d_ours.abs().sum()), float(d_theirs.abs().sum())
        l1_ours, l1_theirs, total = l1_ours + a1, l1_theirs + t1, total + b.numel()
        if b.numel() >= 4096 and t1 > 0:
            worst = max(worst, abs(a1 - t1) / t1)
    return {"kind": "stats", "zero_frac_ours": zeros_ours / total, "zero_frac_mergekit": zeros_theirs / total,
            "zero_frac_expected": expected_zeros / total, "l1_ours": l1_ours / total, "l1_mergekit": l1_theirs / total,
            "l1_rel_diff": abs(l1_ours - l1_theirs) / l1_theirs if l1_theirs else float("nan"),
            "l1_rel_diff_worst_tensor": worst, "elements": total}


def compare_l1_only(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                    base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """For random methods at bf16 output (large family): relative difference of mean |merged - base|."""
    l1_ours = l1_theirs = 0.0
    for name in sorted(set(ours) & set(theirs)):
        b = base[name].float()
        l1_ours += float((ours[name].float() - b).abs().sum())
        l1_theirs += float((theirs[name].float() - b).abs().sum())
    return {"kind": "l1", "l1_rel_diff": abs(l1_ours - l1_theirs) / l1_theirs if l1_theirs else float("nan")}


# ----------------------------------------------------------------------------- speed


def timed(fn: Callable[[], Any], budget_s: float, max_repeats: int) -> dict[str, Any]:
    """Median seconds of fn() over repeats after one warm-up; as many repeats as fit in
    budget_s judging by the warm-up (at most max_repeats). A warm-up longer than budget_s
    is itself the one sample (runs = 0): warm-up effects are noise at that size."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > budget_s:
        return {"s": first, "runs": 0, "first_s": first, "samples": [first]}
    samples = []
    for _ in range(max(1, min(max_repeats, int(budget_s / max(first, 1e-9))))):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"s": statistics.median(samples), "runs": len(samples), "first_s": first, "samples": samples}


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Bytes per second of dst.copy_(src), counting the read and the write."""
    src = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(samples)


def bytes_moved(materializer: Materializer, recipe: Recipe) -> int:
    refs = ([recipe.base_model] if recipe.base_model else []) + [s.model for s in recipe.models]
    moved = 0
    for name, param in materializer.candidate.named_parameters():
        moved += param.numel() * param.element_size()
        moved += sum(materializer.inputs.tensors[r][name].numel() * materializer.inputs.tensors[r][name].element_size()
                     for r in refs)
    return moved


def naive_rebuild(materializer: Materializer, recipe: Recipe) -> torch.nn.Module:
    """A fresh model per candidate: deepcopy a template, merge into new tensors, load them."""
    model = copy.deepcopy(materializer.candidate)
    tensors = materializer.inputs.tensors
    base = tensors[recipe.base_model] if recipe.base_model else None
    sources = [tensors[s.model] for s in recipe.models]
    groups = tensor_groups(materializer.inputs, recipe.layer_granularity)
    state = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            group = groups[name]
            merged = merge_tensor(recipe.method, base[name] if base is not None else None, [s[name] for s in sources],
                                  recipe.source_params(group), recipe.options(group), TensorRNG(recipe.seed, name))
            state[name] = merged.to(param.dtype)
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------- one family


def bench_method(method: str, family: Family, materializer: Materializer, dtype: str, *, exe: str | None,
                 bandwidth: float, budget_s: float, max_repeats: int, naive_budget_s: float,
                 stats: bool) -> dict[str, Any]:
    recipe = make_recipe(method, family, dtype)
    result: dict[str, Any] = {"dtype": dtype, "recipe": recipe.to_dict()}
    yaml_text = mergekit_yaml(recipe, materializer.layer_prefixes())
    result["mergekit_yaml"] = yaml_text

    timing = timed(lambda: materializer.apply(recipe), budget_s, max_repeats)
    inplace = timing["s"]
    result.update(inplace_s=inplace, inplace_runs=timing["runs"], inplace_first_s=timing["first_s"],
                  inplace_samples=timing["samples"])
    ours = {k: v.detach().clone() for k, v in materializer.apply(recipe).named_parameters()}

    timing = timed(lambda: naive_rebuild(materializer, recipe), naive_budget_s, max_repeats)
    naive = timing["s"]
    result.update(naive_s=naive, naive_runs=timing["runs"], naive_samples=timing["samples"])

    moved = bytes_moved(materializer, recipe)
    result.update(bytes_moved=moved, floor_s=moved / bandwidth, floor_fraction=moved / bandwidth / inplace,
                  naive_over_inplace=naive / inplace, mergekit_s=None, mergekit_over_inplace=None)
    if exe is None:
        result["mergekit_error"] = "skipped: no mergekit-yaml"
        return result
    with tempfile.TemporaryDirectory(dir=OUT, prefix="mk_") as tmp:
        mk_s, out, error = run_mergekit(exe, yaml_text, Path(tmp), recipe.seed)
        result["mergekit_s"] = mk_s
        if error:
            result["mergekit_error"] = error
        else:
            theirs = load_checkpoint(out)
            tensors = materializer.inputs.tensors
            if not is_random(method):
                result["agreement"] = compare_exact(ours, theirs)
            elif stats:
                groups = tensor_groups(materializer.inputs, recipe.layer_granularity)
                result["agreement"] = compare_random(ours, theirs, recipe, tensors, groups)
            else:
                result["agreement"] = compare_l1_only(ours, theirs, tensors[recipe.base_model])
    result["mergekit_over_inplace"] = mk_s / inplace if not error else None
    return result


def bench_family(label: str, family: Family, methods: list[str], *, exe: str | None, bandwidth: float, budget_s: float,
                 max_repeats: int, naive_budget_s: float, float32_random: bool) -> dict[str, Any]:
    """All methods on one family. With float32_random the random methods run at float32 output
    (for the zoo's statistics), everything else at bfloat16."""
    dtypes = {m: ("float32" if float32_random and is_random(m) else "bfloat16") for m in methods}
    materializers: dict[str, Materializer] = {}
    results: dict[str, Any] = {}
    for method in methods:
        dtype = dtypes[method]
        if dtype not in materializers:
            refs = [family.base, *family.experts[:3]]
            materializers[dtype] = Materializer(refs, dtype=dtype, device="cpu")
            # one untimed linear merge first: it touches every source tensor and candidate parameter, so
            # the first timed merge (the only one for slow methods) does not pay for first-touch page faults
            materializers[dtype].apply(make_recipe("linear", family, dtype))
        print(f"  [{label}] {method} ({dtype}) ...", end="", flush=True)
        start = time.perf_counter()
        results[method] = bench_method(method, family, materializers[dtype], dtype, exe=exe, bandwidth=bandwidth,
                                       budget_s=budget_s, max_repeats=max_repeats, naive_budget_s=naive_budget_s,
                                       stats=float32_random)
        r = results[method]
        print(f" {time.perf_counter() - start:.1f} s (in-place {fmt_time(r['inplace_s'])}, naive {fmt_time(r['naive_s'])}, "
              f"mergekit {fmt_time(r['mergekit_s'])})", flush=True)
    return results


# ----------------------------------------------------------------------------- report


def evomerge_fingerprint() -> str:
    """Short hash of the evomerge sources this run imported (the package changes under development)."""
    import hashlib

    import evomerge

    digest = hashlib.sha256()
    for f in sorted(Path(evomerge.__file__).parent.rglob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:12]


def device_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else (f"{x:.0f}x" if x >= 100 else f"{x:.1f}x")


def runs_cell(runs: int) -> str:
    return "1*" if runs == 0 else str(runs)


def agreement_cell(result: dict[str, Any]) -> str:
    a = result.get("agreement")
    if a is None:
        error = result.get("mergekit_error", "?")
        return error if error.startswith("skipped") else "mergekit failed: " + error[:80]
    if a["kind"] == "exact":
        return (f"max|d|={a['max_abs_diff']:.3g}  differ={a['frac_differing']:.2e}  max_ulp={a['max_ulp']}  "
                f"n(>1 ulp)={a['n_over_1ulp']}")
    if a["kind"] == "stats":
        return (f"zero% ours={100 * a['zero_frac_ours']:.2f} mk={100 * a['zero_frac_mergekit']:.2f} "
                f"exp={100 * a['zero_frac_expected']:.2f}  L1 rel diff={100 * a['l1_rel_diff']:.2f}% "
                f"(worst tensor {100 * a['l1_rel_diff_worst_tensor']:.1f}%)")
    return f"L1 rel diff={100 * a['l1_rel_diff']:.2f}% (bf16; stats on the zoo)"


def print_tables(label: str, n_params: int, results: dict[str, Any]) -> None:
    print(f"\n== {label} ({n_params / 1e6:.2f}M parameters)")
    print(f"{'method':<17} {'dtype':<8} agreement with mergekit")
    for method, r in results.items():
        print(f"{method:<17} {r['dtype']:<8} {agreement_cell(r)}")
    print()
    header = (f"{'method':<17} {'in-place':>10} {'(n)':>4} {'1st run':>10} {'naive':>10} {'mergekit':>10} "
              f"{'mk/in':>7} {'naive/in':>8} {'floor':>9} {'floor frac':>10}")
    print(header)
    for method, r in results.items():
        print(f"{method:<17} {fmt_time(r['inplace_s']):>10} {runs_cell(r['inplace_runs']):>4} "
              f"{fmt_time(r['inplace_first_s']):>10} {fmt_time(r['naive_s']):>10} {fmt_time(r['mergekit_s']):>10} "
              f"{fmt_ratio(r['mergekit_over_inplace']):>7} "
              f"{fmt_ratio(r['naive_over_inplace']):>8} {fmt_time(r['floor_s']):>9} {r['floor_fraction']:>10.3f}")
    print("(in-place: median of n runs after a warm-up (1st run), 1* = one run only; naive: same rule; "
          "mergekit: one run, start-up included; floor: bytes moved / copy bandwidth)")


def print_targets(report: dict[str, Any]) -> None:
    print("\nTargets: in-place >= 10x faster than mergekit for every method; "
          "linear, task_arithmetic and dare_linear >= 0.5 of the bandwidth floor")
    for label, results in report["families"].items():
        ran = {m: r for m, r in results["methods"].items() if not r.get("mergekit_error", "").startswith("skipped")}
        slow = [f"{m} ({fmt_ratio(r['mergekit_over_inplace'])})" for m, r in ran.items()
                if r["mergekit_over_inplace"] is None or r["mergekit_over_inplace"] < 10]
        floors = [f"{m} {r['floor_fraction']:.3f}" for m, r in results["methods"].items()
                  if m in ELEMENTWISE]
        versus = f"below 10x vs mergekit: {', '.join(slow) or 'none'}" if ran else "mergekit not run"
        print(f"  {label}: {versus}; floor fraction: {', '.join(floors) or '-'}")


# ----------------------------------------------------------------------------- main


def zoo_family(path: Path) -> tuple[Family, str]:
    """The shipped zoo, or (when it is not built) a random stand-in of the same shape."""
    names = ["base", "expert_rev", "expert_srt", "expert_cae"]
    if all((path / n / "config.json").is_file() for n in names):
        state = load_checkpoint(path / "base")
        n_layers = json.loads((path / "base" / "config.json").read_text())["num_hidden_layers"]
        return Family(str(path / "base"), [str(path / n) for n in names[1:]], n_layers,
                      sum(t.numel() for t in state.values())), "zoo"
    print(f"note: no zoo at {path} (build it with `evomerge zoo build`); using a random stand-in of its shape")
    return ensure_family(OUT / "family_zoo_standin", SMALL_ZOO_STANDIN), "zoo-standin"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"zoo only, methods {', '.join(QUICK_METHODS)}")
    p.add_argument("--smoke", action="store_true", help=f"seconds: zoo methods {', '.join(SMOKE_METHODS)}, one "
                   "repeat, linear on a tiny random family; results under bench/out/smoke/")
    p.add_argument("--threads", type=int, help="torch CPU threads, here and in mergekit (default: torch's; "
                   "1 is steadier on a busy machine)")
    p.add_argument("--mergekit-yaml", help="mergekit-yaml executable (default: $MERGEKIT_YAML, else PATH)")
    p.add_argument("--zoo", default=str(ZOO), help="zoo directory (default: %(default)s)")
    p.add_argument("--methods", help="comma-separated methods for the zoo, 'all' or 'none' (default: all)")
    p.add_argument("--large-methods", default=",".join(LARGE_METHODS),
                   help="comma-separated methods for the ~134M family, 'all', or 'none' (default: %(default)s)")
    p.add_argument("--json", help="where to write results (default: bench/out/vs_mergekit.json, "
                   "bench/out/smoke/vs_mergekit.json with --smoke)")
    args = p.parse_args(argv)
    args.json = args.json or str(OUT / ("smoke" if args.smoke else "") / "vs_mergekit.json")
    return args


def method_list(text: str | None, default: list[str]) -> list[str]:
    if text is None:
        return default
    if text in ("all", "none"):
        return ALL_METHODS if text == "all" else []
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        get_method(m)  # unknown names fail here, with the list of known ones
    return methods


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for mergekit's processes
    exe = find_mergekit(args.mergekit_yaml, required=not (args.quick or args.smoke))
    started = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    info = device_info()
    fingerprint = evomerge_fingerprint()
    print(f"device: {info['device']} ({info['cpu']}, {info['cpu_count']} cores), torch {info['torch']}, "
          f"{info['torch_threads']} threads; mergekit-yaml: {exe}; evomerge sources {fingerprint}")
    bandwidth = copy_bandwidth(16 if args.smoke else 256)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.2f} GB/s; load average {load_average()}")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print("warning: the machine is busy; other processes slow every timing here, "
              "torch's worker threads most of all")
    report: dict[str, Any] = {"device": info, "evomerge_sources_sha256": fingerprint, "mergekit_yaml": exe,
                              "load_average_start": load_average(), "copy_bandwidth_Bps": bandwidth, "families": {}}
    if exe is not None and not (args.quick or args.smoke):
        report["mergekit_startup_s"] = time_mergekit_startup(exe)
        print(f"mergekit-yaml start-up (--help): {report['mergekit_startup_s']:.2f} s")

    zoo, zoo_label = zoo_family(Path(args.zoo))
    if args.smoke:
        tiny = ensure_family(OUT / "smoke" / "family_tiny", SMALL_ZOO_STANDIN)
        knobs = dict(budget_s=0.0, max_repeats=1, naive_budget_s=0.0)
        plan = [(zoo_label, zoo, SMOKE_METHODS, dict(knobs, float32_random=True)),
                ("tiny", tiny, ["linear"], dict(knobs, float32_random=False))]
    else:
        plan = [(zoo_label, zoo, method_list(args.methods, QUICK_METHODS if args.quick else ALL_METHODS),
                 dict(budget_s=2.0, max_repeats=10, naive_budget_s=2.0, float32_random=True))]
    if not (args.quick or args.smoke):
        large_methods = method_list(args.large_methods, LARGE_METHODS)
        if large_methods:
            print(f"large family: {OUT / 'family_llama134m'} (built on first use, ~1 min)")
            large = ensure_family(OUT / "family_llama134m", LARGE_SPEC)
            plan.append(("llama-134m", large, large_methods,
                         dict(budget_s=10.0, max_repeats=5, naive_budget_s=5.0, float32_random=False)))

    for label, family, methods, knobs in plan:
        if not methods:
            continue
        results = bench_family(label, family, methods, exe=exe, bandwidth=bandwidth, **knobs)
        report["families"][label] = {"base": family.base, "experts": family.experts, "n_params": family.n_params,
                                     "methods": results}
        print_tables(label, family.n_params, results)

    print_targets(report)
    report["total_wall_s"] = time.perf_counter() - started
    report["load_average_end"] = load_average()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\ntotal wall time {report['total_wall_s']:.0f} s; load average at the end {report['load_average_end']}; "
          f"results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
