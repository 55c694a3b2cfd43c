"""How much of a trial is not the model's forward passes? evomerge's loop vs. the naive loop.

evomerge: the real search loop (`Search`: sampler, in-place merge, lm-eval tasks built once
and the live candidate wrapped once, records written to a SQLite study). Forward time is
measured by hooks on the candidate; overhead = trial wall time - forward time.
Naive (what mergekit-evolve-style tools do): for the same recipes, merge, save the model to
disk, and evaluate it from the path with `lm_eval.simple_evaluate` (task manager reused, to
be generous); its forward time is taken to be evomerge's, since model, tasks and batches
are the same.

Two sizes: the shipped zoo (0.9M parameters) and a random 134M LLaMA family (weights mean
nothing; the zoo's tokenizer and tasks give it realistic prompts). Task arithmetic over
three experts, lm-eval task zoo_target (600 prompts, loglikelihood), float32, CPU.

    python bench/trial_overhead.py [--trials 8] [--large-trials 3] [--large-limit 200]
    python bench/trial_overhead.py --smoke    # zoo only, 3 trials of 10 prompts per skill: that it runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from transformers.utils import logging as hf_logging

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _families import FamilySpec, ensure_family  # noqa: E402

from evomerge.config import load_config  # noqa: E402
from evomerge.backends.candidate import quiet  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.search.loop import Search  # noqa: E402
from evomerge.zoo import ZOO_DIR, build_tokenizer  # noqa: E402

SEARCH_SPACE = {"method": "task_arithmetic", "layer_granularity": None,
                "per_source": {"weight": {"low": 0.0, "high": 1.0, "init": 0.4}}}


class ForwardClock:
    """Total seconds spent inside the model's forward calls (hooks on the top module)."""

    def __init__(self, model):
        self.total, self._start = 0.0, None
        model.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        model.register_forward_hook(lambda *_: setattr(self, "total", self.total + time.perf_counter() - self._start))


def write_config(name: str, base: str, experts: list[str], limit: int | None, trials: int, work: Path) -> Path:
    (work / "space.yaml").write_text(yaml.safe_dump(SEARCH_SPACE))
    fitness = {"kind": "lm_eval", "tasks": ["zoo_target"], "limit": limit, "batch_size": 64, "split": "search",
               "include_path": str(REPO / "evaluators" / "tasks"),
               "objectives": [{"name": s, "metric": f"zoo_{s}/acc"} for s in ("rev", "srt", "cae")]}
    (work / "fitness.yaml").write_text(yaml.safe_dump(fitness))
    config = {"name": name, "models": experts, "base_model": base, "search_space": str(work / "space.yaml"),
              "fitness": str(work / "fitness.yaml"), "sampler": "random", "budget": {"n_trials": trials}, "seed": 0,
              "device": "cpu", "dtype": "float32", "storage": f"sqlite:///{work / 'study.db'}"}
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ours(config_path: Path) -> tuple[dict[str, float], list[Recipe], Search]:
    """Median per-trial seconds: whole trial, forward passes, merge, lm-eval around the forwards."""
    search = Search(load_config(config_path))
    clock = ForwardClock(search.backend.materializer.candidate)
    marks = [(time.perf_counter(), 0.0)]
    search.run(lambda n, record: marks.append((time.perf_counter(), clock.total)))
    trials = [t for t in search.study.get_trials() if "timings" in t.user_attrs]
    steps = list(zip(marks, marks[1:], trials))[1:]  # the first trial also wraps the model: warm-up
    median = lambda values: statistics.median(list(values))  # noqa: E731
    parts = {"trial": median(b[0] - a[0] for a, b, _ in steps),
             "forward": median(b[1] - a[1] for a, b, _ in steps),
             "merge": median(t.user_attrs["timings"]["materialize_s"] for _, _, t in steps),
             "evaluate": median(t.user_attrs["timings"]["evaluate_s"] for _, _, t in steps)}
    recipes = [Recipe.from_dict(json.loads(t.user_attrs["recipe"])) for t in trials]
    return parts, recipes, search


def naive(search: Search, recipes: list[Recipe], limit: int | None, work: Path) -> list[float]:
    from lm_eval import simple_evaluate

    options = search.config.fitness.options
    times = []
    for recipe in recipes:
        start = time.perf_counter()
        out = work / "candidate"
        search.backend.materializer.apply(recipe).save_pretrained(out, safe_serialization=True)
        search.backend.tokenizer.save_pretrained(out)
        with quiet():
            simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=options["tasks"],
                            task_manager=search.evaluator.manager, limit=limit, batch_size=options["batch_size"],
                            device="cpu", bootstrap_iters=0, log_samples=False)
        shutil.rmtree(out)
        times.append(time.perf_counter() - start)
    return times


def measure(label: str, base: str, experts: list[str], limit: int | None, trials: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts, recipes, search = ours(write_config(label, base, experts, limit, trials, work))
        t_naive = statistics.median(naive(search, recipes[1:], limit, work))
    t_ours, forward = parts["trial"], parts["forward"]
    print(f"{label:<11} {search.backend.materializer.candidate.num_parameters() / 1e6:>6.1f}M  forward {forward:7.3f} s | "
          f"evomerge trial {t_ours:7.3f} s: merge {parts['merge']:.3f}, lm-eval {parts['evaluate'] - forward:.3f}, "
          f"loop {t_ours - parts['merge'] - parts['evaluate']:.3f}; overhead {100 * (1 - forward / t_ours):4.1f}% | "
          f"naive trial {t_naive:7.3f} s, overhead {100 * (1 - forward / t_naive):4.1f}% | "
          f"naive/evomerge {t_naive / t_ours:4.2f}x", flush=True)


def large_family() -> tuple[str, list[str]]:
    family = ensure_family(REPO / "bench" / "out" / "family_llama134m", FamilySpec())
    for path in [family.base, *family.experts]:
        build_tokenizer().save_pretrained(path)  # the zoo's prompts; ids fit any vocabulary
    return family.base, family.experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per loop on the zoo")
    parser.add_argument("--large-trials", type=int, default=3, help="trials per loop on the 134M model")
    parser.add_argument("--large-limit", type=int, default=None, help="prompts per skill on the 134M model (default: all 200)")
    parser.add_argument("--smoke", action="store_true", help="zoo only, 3 trials, 10 prompts per skill")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    print("median seconds per trial; overhead = share of the trial outside the model's forward passes")
    zoo = [str(ZOO_DIR / f"expert_{s}") for s in ("rev", "srt", "cae")]
    measure("zoo", str(ZOO_DIR / "base"), zoo, 10 if args.smoke else None, 3 if args.smoke else args.trials)
    if args.smoke:
        return
    base, experts = large_family()
    measure("llama-134M", base, experts, args.large_limit, args.large_trials)


if __name__ == "__main__":
    main()
