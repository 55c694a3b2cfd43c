"""The compiled merge passes (evomerge/merge/native.py) give torch's bits: linear, task arithmetic,
TIES and breadcrumbs (their magnitude trims too), on every float dtype, special values included."""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from evomerge.merge import native
from evomerge.merge.methods import get_method
from evomerge.merge.registry import merge_tensor
from evomerge.merge.rng import TensorRNG

SPECIALS = [float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e-40, -1e-42, 3.0e38, -3.0e38, 1.0 + 2**-8, 2**-133]


@pytest.fixture(scope="module")
def kernel():
    lib = native.library()
    if lib is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is here but the fused kernel did not build (see the log)")
        pytest.skip("no C compiler: the merges run on torch's kernels")
    return lib


def tensors(n: int, numel: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """n tensors of `numel` values spread over many magnitudes, with the special values mixed in."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randn(numel, generator=g) * torch.exp(torch.randn(numel, generator=g) * 3)
        where = torch.randint(0, numel, (len(SPECIALS) * 3,), generator=g)
        t[where] = torch.tensor(SPECIALS * 3)
        out.append(t.to(dtype))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), "NaN in different places"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    differ = (a[~nan].view(ints) != b[~nan].view(ints)).sum().item()
    assert differ == 0, f"{differ} of {a.numel()} elements differ"


def spy(fn, calls):
    def recorded(*args, **kwargs):
        calls.append(fn(*args, **kwargs))
        return calls[-1]
    return recorded


def both_ways(monkeypatch, method, base, sources, params, options, out_dtype):
    """The merge with the fused kernel and with torch's kernels, into `out` tensors of out_dtype.
    A trimmed source's band must come from the compiled key reader, DARE's and DELLA's masks from the
    compiled pass (DELLA's ranks by its sort): a part that silently declined would leave the
    comparison with torch's own."""
    results, fused_calls, readers, drawn = [], [], [], []
    reader_of = native.DeltaKeys.of
    for use_native in (True, False):
        with monkeypatch.context() as m:
            if use_native:
                for entry in ("weighted_sum", "banded_merge"):
                    m.setattr(native, entry, spy(getattr(native, entry), fused_calls))
                m.setattr(native.DeltaKeys, "of", spy(reader_of, readers))
                m.setattr(native, "keep_drawn", spy(native.keep_drawn, drawn))
            else:
                m.setattr(native, "library", lambda: None)
            out = torch.empty(sources[0].shape, dtype=out_dtype) if out_dtype is not None else None
            rng = TensorRNG(5, "model.layers.0.mlp.up_proj.weight") if get_method(method).random else None
            results.append(merge_tensor(method, base, sources, params, options, rng, out=out))
    assert fused_calls == [True], "the fused kernel did not run"
    assert all(r is not None for r in readers) and all(drawn), "a compiled pass declined"
    if sources[0].numel() > 0:
        trims = any(p.get("density", 1.0) < 1 for p in params) and "rescale" not in options
        assert bool(readers) == (trims and method in ("ties", "breadcrumbs", "breadcrumbs_ties"))
        assert bool(drawn) == (get_method(method).random and any(0 < p["density"] < 1 for p in params))
    return results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_gives_torchs_bits(kernel, monkeypatch, dtype, n, normalize):
    sources = tensors(n, 5003, dtype, seed=n)
    params = [{"weight": w} for w in [0.7, -0.35, 1.3, 0.0, 0.1][:n]]
    for out_dtype in (None, dtype):
        fused, reference = both_ways(monkeypatch, "linear", None, sources, params, {"normalize": normalize}, out_dtype)
        same_bits(fused, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("options", [{}, {"normalize": True}, {"lambda": 0.83}, {"normalize": True, "lambda": 1.7}])
def test_task_arithmetic_gives_torchs_bits(kernel, monkeypatch, dtype, n, options):
    base, *sources = tensors(n + 1, 4099, dtype, seed=10 + n)
    params = [{"weight": w} for w in [0.6, 1.1, -0.4, 0.25][:n]]
    for out_dtype in (None, dtype, torch.bfloat16):
        fused, reference = both_ways(monkeypatch, "task_arithmetic", base, sources, params, options, out_dtype)
        same_bits(fused, reference)


def tie_heavy(n: int, numel: int, seed: int) -> list[torch.Tensor]:
    """bf16 base and sources whose deltas have few distinct magnitudes: many equal keys at a trim's bounds."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.02).to(torch.bfloat16)
    sources = [(base.float() + torch.randint(-3, 4, (numel,), generator=g) * 2.0**-9).to(torch.bfloat16) for _ in range(n)]
    return [base, *sources]


TRIM_PARAMS = {
    "ties": [{"weight": 1.0, "density": 0.3}, {"weight": 0.8, "density": 0.55}, {"weight": -0.6, "density": 0.5},
             {"weight": 0.4, "density": 1.0}],
    "breadcrumbs": [{"weight": 0.5, "density": 0.8, "gamma": 0.02}, {"weight": 0.7, "density": 0.4, "gamma": 0.1},
                    {"weight": 0.3, "density": 0.9, "gamma": 0.0}, {"weight": 1.2, "density": 0.2, "gamma": 0.3}],
}
TRIM_PARAMS["breadcrumbs_ties"] = TRIM_PARAMS["breadcrumbs"]


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("data", ["specials-bf16", "specials-f16", "specials-f32", "tie-heavy-bf16"])
@pytest.mark.parametrize("options", [{"normalize": True}, {"normalize": False, "lambda": 0.9}])
def test_trimming_merges_give_torchs_bits(kernel, monkeypatch, method, n, data, options):
    """The bands (found by the compiled passes, or chunk by chunk in torch) and the merge after them."""
    if data == "tie-heavy-bf16":
        base, *sources = tie_heavy(n, 70001, seed=n)
    else:
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[data.split("-")[1]]
        base, *sources = tensors(n + 1, 70001, dtype, seed=20 + n)
    for out_dtype in (None, torch.bfloat16):
        fused, reference = both_ways(monkeypatch, method, base, sources, TRIM_PARAMS[method][:n], options, out_dtype)
        same_bits(fused, reference)


RANDOM_PARAMS = {
    "dare_ties": [{"weight": 0.5, "density": 0.4}, {"weight": 0.7, "density": 0.7}, {"weight": -0.3, "density": 0.5},
                  {"weight": 0.9, "density": 1.0}],
    "della": [{"weight": 0.5, "density": 0.6, "epsilon": 0.15}, {"weight": 0.8, "density": 0.4, "epsilon": 0.1},
              {"weight": 0.3, "density": 0.5, "epsilon": 0.3}, {"weight": 1.1, "density": 0.7, "epsilon": 0.05}],
}
RANDOM_PARAMS["dare_linear"], RANDOM_PARAMS["della_linear"] = RANDOM_PARAMS["dare_ties"], RANDOM_PARAMS["della"]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("options", [{}, {"normalize": True, "lambda": 0.7}, {"rescale": False},
                                     {"rescale": True, "rescale_mode": "inverse_density"}])
def test_random_merges_give_torchs_bits(kernel, monkeypatch, method, n, options):
    """DARE's and DELLA's masked deltas combined by the compiled pass (DELLA's keep decisions from its
    bucket bounds, a few exact ranks and, for rows with many undecided entries, its radix sort)."""
    base, *sources = tensors(n + 1, 64 * 1031, torch.bfloat16, seed=30 + n)
    base, sources = base.view(64, 1031), [s.view(64, 1031) for s in sources]
    for out_dtype in (None, torch.bfloat16):
        fused, reference = both_ways(monkeypatch, method, base, sources, RANDOM_PARAMS[method][:n], options, out_dtype)
        same_bits(fused, reference)


@pytest.mark.parametrize("density", [0, 0.0, -0.0, 1e-300])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_at_density_zero_divides_as_torch_does(kernel, monkeypatch, method, density):
    """inverse_density at density 0 divides the all-dropped delta by 0 (NaN, as torch and mergekit's
    formula give); a divisor of 0 must not be taken for 'no divisor'."""
    base, *sources = [t.view(64, 300) for t in tensors(3, 64 * 300, torch.bfloat16, seed=12)]
    params = [{"weight": 0.5, "density": density}, {"weight": 0.5, "density": 0.5}]
    fused, reference = both_ways(monkeypatch, method, base, sources, params,
                                 {"rescale": True, "rescale_mode": "inverse_density"}, torch.bfloat16)
    same_bits(fused, reference)


@pytest.mark.parametrize("case", ["tie-heavy", "all-equal", "one-row", "falling-ramp", "flat-ramp", "float32-wide"])
def test_della_decisions_give_torchs_bits_where_ranks_are_hard(kernel, monkeypatch, case):
    """DELLA decides most entries from their bucket's rank bounds; rows with many equal magnitudes
    (more undecided entries than the compiled pass ranks one by one: it sorts the row), a whole
    1-D tensor as one row, a ramp that falls (negative epsilon: the bounds do not hold, the row is
    sorted) or is flat, and float32 sources whose keys differ in all their bits give torch's bits."""
    params = [{"weight": 0.7, "density": 0.5, "epsilon": 0.3}, {"weight": 0.4, "density": 0.6, "epsilon": 0.2}]
    if case == "tie-heavy":
        base, *sources = [t.view(40, 1500) for t in tie_heavy(2, 60000, seed=3)]
    elif case == "all-equal":
        base = torch.zeros(30, 700, dtype=torch.bfloat16)
        sources = [torch.full((30, 700), 0.5, dtype=torch.bfloat16), torch.full((30, 700), -0.25, dtype=torch.bfloat16)]
    elif case == "one-row":
        base, *sources = tensors(3, 90001, torch.bfloat16, seed=4)
    elif case == "float32-wide":
        base, *sources = [t.view(50, 997) for t in tensors(3, 50 * 997, torch.float32, seed=5)]
    else:
        base, *sources = [t.view(64, 1031) for t in tensors(3, 64 * 1031, torch.bfloat16, seed=6)]
        epsilon = {"falling-ramp": -0.2, "flat-ramp": 0.0}[case]
        params = [{**p, "epsilon": epsilon} for p in params]
    for options in ({}, {"rescale": False}):
        fused, reference = both_ways(monkeypatch, "della", base, sources, params, options, torch.bfloat16)
        same_bits(fused, reference)


@pytest.mark.parametrize("seed", [0, 5489, 2**32 - 1, 2**32 + 7, 0x7E57_1234_5678_9ABC])
def test_the_compiled_draws_are_torchs(kernel, seed):
    """torch.rand's float32 values on the CPU for a generator seeded with manual_seed(seed), across
    the generator's 624-word refills, seeds above 32 bits included."""
    for n in (0, 1, 623, 624, 625, 1249, 100_003):
        expected = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        ours = torch.empty(n)
        assert native.uniform_draws(seed, ours)
        assert torch.equal(ours, expected), n
    assert not native.uniform_draws(seed, torch.empty(10, dtype=torch.float64))
    assert not native.uniform_draws(seed, torch.empty(10, 2)[:, 0])  # not contiguous


def test_merges_after_larger_ones_reuse_scratch_and_give_the_same_bits(kernel):
    """DARE's and DELLA's scratch buffers outlive a tensor (merge/scratch.py): a small merge after a
    large one, and the same merge again, give what they give in a fresh process's first merge."""
    small = [t.view(16, 500) for t in tensors(3, 8000, torch.bfloat16, seed=7)]
    large = [t.view(64, 2000) for t in tensors(3, 128000, torch.bfloat16, seed=8)]
    for method in ("della", "dare_ties"):
        params = RANDOM_PARAMS[method][:2]
        rng = lambda: TensorRNG(1, "w")  # noqa: E731
        first = merge_tensor(method, small[0], small[1:], params, {}, rng())
        merge_tensor(method, large[0], large[1:], params, {}, rng())
        again = merge_tensor(method, small[0], small[1:], params, {}, rng())
        same_bits(first, again)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs", "della", "dare_ties"])
def test_empty_tensors_merge_to_empty_tensors(kernel, monkeypatch, method):
    base, *sources = [torch.zeros(3, 0, dtype=torch.bfloat16) for _ in range(3)]
    params = {"linear": [{"weight": 0.5}] * 2, "task_arithmetic": [{"weight": 0.5}] * 2,
              "ties": TRIM_PARAMS["ties"][:2], "breadcrumbs": TRIM_PARAMS["breadcrumbs"][:2],
              "della": RANDOM_PARAMS["della"][:2], "dare_ties": RANDOM_PARAMS["dare_ties"][:2]}[method]
    fused, reference = both_ways(monkeypatch, method, None if method == "linear" else base, sources, params, {},
                                 torch.bfloat16)
    assert fused.shape == reference.shape == (3, 0)


def test_the_kernels_decline_what_they_cannot_take(kernel):
    """More sources than the banded pass holds, and an output of another size than the sources
    (torch would raise), are left to torch: nothing is read or written out of bounds."""
    x, w = torch.randn(1000), torch.tensor([0.2] * 5)
    out = torch.zeros(1000)
    assert not native.banded_merge([x] * 5, x, [None] * 5, w, out, consensus=True, normalize=True,
                                   divisor=torch.tensor(1.0), scale=1.0)
    assert not native.weighted_sum([x, x], w[:2], torch.zeros(2000))
    assert not native.banded_merge([x, x], x, [None] * 2, w[:2], torch.zeros(999), consensus=False, normalize=False,
                                   divisor=torch.tensor(1.0), scale=1.0)
    assert not native.banded_merge([x, x], x, [None] * 2, w[:2], out, consensus=False, normalize=False,
                                   divisor=torch.tensor(1.0), scale=1.0, deltas=torch.zeros(2, 999))
    assert torch.count_nonzero(out) == 0
    draws = torch.rand(1000)
    assert not native.keep_drawn(x.double(), draws.double(), 0.5, divisor=None, magnitudes=None)
    assert not native.keep_drawn(x, draws[:999], 0.5, divisor=None, magnitudes=None)
    assert not native.keep_drawn(x.view(10, 100), draws, torch.zeros(99), divisor=None, magnitudes=None)  # ramp != row
    assert not native.source_delta(x, x[:999], torch.empty(1000), None)
    assert not native.source_delta(x, x, torch.empty(1000, dtype=torch.float64), None)
    merged = merge_tensor("ties", x, [x + 1] * 5, [{"weight": 0.2, "density": 0.5}] * 5, {})
    assert merged.shape == x.shape


def test_the_load_check_holds_under_other_torch_defaults(kernel):
    """vLLM loads weights under torch.set_default_dtype(bfloat16): the check's float32 buffers must stay float32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert native._agrees_with_torch(kernel)
    finally:
        torch.set_default_dtype(default)


def test_a_large_tensor_split_across_threads_gives_the_same_bits(kernel, monkeypatch):
    base, *sources = (t.view(3, -1) for t in tensors(4, 3 * (2**20 + 17), torch.bfloat16, seed=7))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for method, params in [("task_arithmetic", [{"weight": w} for w in (0.5, 0.3, 0.9)]),
                               ("ties", TRIM_PARAMS["ties"][:3]), ("breadcrumbs", TRIM_PARAMS["breadcrumbs"][:3]),
                               ("della", RANDOM_PARAMS["della"][:3])]:
            fused, reference = both_ways(monkeypatch, method, base, sources, params, {}, torch.bfloat16)
            same_bits(fused, reference)
    finally:
        torch.set_num_threads(threads)


def test_where_the_kernel_does_not_apply_torch_runs(kernel):
    """float64, and non-contiguous views, take torch's path (weighted_sum declines, touching nothing)."""
    a, b = torch.randn(64, 32, dtype=torch.float64), torch.randn(64, 32, dtype=torch.float64)
    out = torch.zeros(64, 32)
    assert not native.weighted_sum([a, b], torch.tensor([0.5, 0.5], dtype=torch.float64), out)
    assert not native.weighted_sum([a.float().t(), b.float().t()], torch.tensor([0.5, 0.5]), out.t())
    assert torch.count_nonzero(out) == 0
    merged = merge_tensor("linear", None, [a.t(), b.t()], [{"weight": 0.5}] * 2, {"normalize": False})
    torch.testing.assert_close(merged, (a.t() * 0.5 + b.t() * 0.5), rtol=0, atol=1e-12)


def test_an_unwritable_cache_falls_back_to_a_private_temp_folder(kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/not-a-place-for-a-cache")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        (folder,) = tmp_path.iterdir()
        assert folder.name.startswith("evomerge-") and folder.stat().st_mode & 0o077 == 0
        assert [p.suffix for p in folder.iterdir()] == [".so"]
    finally:
        native.library.cache_clear()


def test_a_build_without_avx512_gives_the_same_bits(kernel, monkeypatch, tmp_path):
    """This CPU runs the AVX-512 key gather; the build a CPU without it gets runs the scalar one:
    the same bands (a tie-heavy delta, the gather's room too small so it overflows and retries,
    two threads) and the same merges."""
    target = tmp_path / "portable.so"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    done = subprocess.run([*shlex.split(compiler), str(native.SOURCE), *native.FLAGS, "-mno-avx512f", "-o", str(target)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    portable = native.declare(ctypes.CDLL(str(target)))
    assert native._agrees_with_torch(portable)
    monkeypatch.setattr(native, "library", lambda: portable)
    monkeypatch.setattr(native, "POOL_SLACK", 1)
    monkeypatch.setattr(native.DeltaKeys, "_expected_inside", lambda self, brackets, wide: 0)  # room for 1 key a thread
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for base, *sources in (tie_heavy(3, 200_001, seed=9), tensors(4, 200_001, torch.bfloat16, seed=9)):
            for method in ("ties", "breadcrumbs", "della"):
                params = (TRIM_PARAMS.get(method) or RANDOM_PARAMS[method])[:3]
                rows = (lambda t: t.view(3, -1)) if method == "della" else (lambda t: t)
                fused, reference = both_ways(monkeypatch, method, rows(base), [rows(s) for s in sources], params, {},
                                             torch.bfloat16)
                same_bits(fused, reference)
    finally:
        torch.set_num_threads(threads)


def test_a_kernel_that_would_not_give_torchs_bits_is_not_used(kernel, monkeypatch, caplog):
    """library() checks on load that the compiled arithmetic is torch's on this machine (its FMA
    premise) and that its draws are torch's generator's; a kernel that disagrees, here one whose
    passes or whose generator do nothing, is refused."""
    assert native._agrees_with_torch(kernel)
    idle = type("Idle", (), {"weighted_sum": lambda *a: None, "banded_merge": lambda *a: None,
                             "uniform_draws": lambda *a: None})()
    assert not native._agrees_with_torch(idle)
    other_generator = type("OtherGenerator", (), {"weighted_sum": kernel.weighted_sum, "banded_merge": kernel.banded_merge,
                                                  "uniform_draws": lambda *a: None})()
    assert not native._agrees_with_torch(other_generator)
    monkeypatch.setattr(native, "_agrees_with_torch", lambda lib: False)
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "does not give torch's bits" in caplog.text
    finally:
        native.library.cache_clear()


def test_a_library_others_could_have_written_is_not_loaded(kernel, monkeypatch, tmp_path):
    """A cached library that is group- or world-writable (someone else could have put code there)
    is refused; the build goes to the private temp folder instead."""
    cache, temp = tmp_path / "cache", tmp_path / "temp"
    temp.mkdir()
    (cache / "evomerge").mkdir(parents=True)
    planted = cache / "evomerge" / Path(kernel._name).name
    shutil.copy(kernel._name, planted)
    planted.chmod(0o666)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    native.library.cache_clear()
    try:
        lib = native.library()
        assert lib is not None and Path(lib._name).parent.parent == temp
    finally:
        native.library.cache_clear()


def test_without_a_compiler_the_merges_still_run(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "torch's kernels are used instead" in caplog.text
        merged = merge_tensor("linear", None, [torch.ones(8), torch.full((8,), 3.0)], [{"weight": 0.5}] * 2, {"normalize": False})
        assert torch.equal(merged, torch.full((8,), 2.0))
    finally:
        native.library.cache_clear()
