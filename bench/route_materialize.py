"""Routed (data-flow-space) candidates: building one around resident source layers vs.
building it from scratch, and the memory a candidate adds.

Run from the repo root:

    python bench/route_materialize.py            # zoo + a random 134M LLaMA family (~1 min)
    python bench/route_materialize.py --quick    # zoo only
    python bench/route_materialize.py --smoke    # zoo only, 2 routes: that it runs

Routes are decoded from random genomes of search_spaces/dfs_routing.yaml (r = 3, the M x M
scaling matrix, scales in [0.5, 2]) over two sources, so they hit the worst case: the
maximum path length (2 x depth) with nearly every position scaled.

  * in-place: `materializer.apply(recipe)` with the sources resident (bf16, as stored, so
    unscaled positions reuse the resident weights); median over the routes after a warm-up;
  * scratch: what a person would write without it: the routed state dict (each position's
    tensors copied from its source, o_proj/down_proj scaled), `from_config` with
    num_hidden_layers = path length, `load_state_dict`; both give bit-identical logits
    (checked on every route);
  * new bytes: parameter bytes of the routed model that are not resident source tensors
    (the scaled o_proj/down_proj), vs. the routed model's full size and vs. all sources;
  * buffers: every scaled-weight buffer the materializer holds after all routes (reused
    from one candidate to the next, so bounded by the longest route), and the process
    RSS growth over the in-place loop (candidates and their forward passes), after two
    warm-up candidates (safetensors maps the sources lazily: first reads page them in).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _families import FamilySpec, ensure_family  # noqa: E402

from evomerge.merge.materialize import Materializer  # noqa: E402
from evomerge.recipe import MERGED, Recipe  # noqa: E402
from evomerge.routing import routed_config, running_scales  # noqa: E402
from evomerge.search.genome import Genome  # noqa: E402
from evomerge.search_space import SearchSpace  # noqa: E402

FOLDED = ("self_attn.o_proj.", "mlp.down_proj.")
PROMPT = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 2]])


def random_routes(refs: list[str], n_layers: int, n: int, seed: int = 0) -> list[Recipe]:
    genome = Genome(SearchSpace.load("search_spaces/dfs_routing.yaml"), refs, None, n_layers)
    rng = random.Random(seed)
    return [genome.decode({k: rng.uniform(g.low, g.high) for k, g in genome.genes.items()}) for _ in range(n)]


def from_scratch(materializer: Materializer, recipe: Recipe) -> torch.nn.Module:
    """The routed checkpoint built the plain way: copy every position's tensors, then load them."""
    route = recipe.route
    assert MERGED not in {s.model for s in route.layers}
    outside = materializer.inputs.layer_of  # None for embeddings, final norm, head
    state = {k: v.clone() for k, v in materializer.sources[route.embed_from].tensors.items() if outside(k) is None}
    for position, (step, product) in enumerate(zip(route.layers, running_scales(route))):
        prefix = f"model.layers.{step.layer}."
        for name, tensor in materializer.sources[step.model].tensors.items():
            if name.startswith(prefix):
                suffix = name[len(prefix):]
                scaled = product != 1.0 and suffix.startswith(FOLDED)
                state[f"model.layers.{position}.{suffix}"] = tensor * (1.0 / product) if scaled else tensor.clone()
    configs = {ref: materializer.sources[ref].config for ref in materializer.sources}
    model = AutoModelForCausalLM.from_config(routed_config(configs[route.embed_from], route, configs), dtype=torch.bfloat16)
    model.load_state_dict(state)
    return model.eval()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def bench(name: str, refs: list[str], n_layers: int, n_routes: int) -> dict[str, float]:
    materializer = Materializer(refs, dtype="bfloat16", device="cpu")
    routes = random_routes(refs, n_layers, n_routes + 2)
    for recipe in routes[:2]:  # warm-up: resident module trees built, mapped source pages read, buffers allocated
        logits(materializer.apply(recipe))
    resident = {t.data_ptr() for s in materializer.sources.values() for t in s.tensors.values()}
    source_bytes = sum(t.nbytes for s in materializer.sources.values() for t in s.tensors.values())
    rss = psutil.Process().memory_info().rss
    inplace, new_bytes, full_bytes, lengths, expected = [], [], [], [], []
    for recipe in routes[2:]:
        seconds, model = timed(lambda: materializer.apply(recipe))
        inplace.append(seconds)
        new_bytes.append(sum(p.nbytes for p in model.parameters() if p.data_ptr() not in resident))
        full_bytes.append(sum(t.nbytes for t in model.state_dict().values()))
        lengths.append(model.config.num_hidden_layers)
        expected.append(logits(model))
    rss_growth = psutil.Process().memory_info().rss - rss
    scratch = []
    for recipe, want in zip(routes[2:], expected):
        seconds, plain = timed(lambda: from_scratch(materializer, recipe))
        scratch.append(seconds)
        assert torch.equal(logits(plain), want), "from-scratch model differs from the routed candidate"
        del plain
    buffers = sum(b.nbytes for b in materializer.router._buffers.values())
    return {"name": name, "sources": source_bytes, "length": statistics.mean(lengths),
            "inplace": statistics.median(inplace), "scratch": statistics.median(scratch),
            "new": statistics.mean(new_bytes), "full": statistics.mean(full_bytes), "buffers": buffers, "rss": rss_growth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="zoo only")
    parser.add_argument("--routes", type=int, default=10, help="random routes per model family")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--smoke", action="store_true", help="zoo only, 2 routes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.routes = True, 2
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = "evomerge/zoo_models"
    rows = [bench("zoo (0.86M)", [f"{zoo}/expert_rev", f"{zoo}/expert_srt"], 4, args.routes)]
    if not args.quick:
        family = ensure_family("bench/out/family_llama134m", FamilySpec())
        rows.append(bench("LLaMA 134M (random, bf16)", family.experts[:2], family.n_layers, args.routes))
    mb = 1 / 2**20
    print(f"{torch.get_num_threads()} torch threads, load average {psutil.getloadavg()[0]:.1f} (1 min)")
    print(f"{'model':<26} {'path':>5} {'in-place':>9} {'scratch':>9} {'ratio':>6} {'new MB':>7} {'routed MB':>9} "
          f"{'sources MB':>10} {'buffers MB':>10} {'RSS +MB':>8}")
    for r in rows:
        print(f"{r['name']:<26} {r['length']:>5.1f} {r['inplace'] * 1e3:>7.1f}ms {r['scratch'] * 1e3:>7.1f}ms "
              f"{r['scratch'] / r['inplace']:>5.0f}x {r['new'] * mb:>7.1f} {r['full'] * mb:>9.1f} {r['sources'] * mb:>10.1f} "
              f"{r['buffers'] * mb:>10.1f} {r['rss'] * mb:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
