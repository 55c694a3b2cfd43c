"""Does CMA-ES find good merges in fewer evaluations than random search? On the shipped zoo.

Runs the real search loop (`evomerge.search.loop.Search`, SQLite studies under bench/out/)
with the paper's parameter space (DARE-TIES, one weight and density per expert) for each
sampler and seed, and reports evaluations until the scalarized fitness (sum of the three
skills' exact match on the search split) first reaches the target: by default the best
source model's own score plus a margin, i.e. "a merge that beats every source".

    python bench/search_efficiency.py [--seeds 5] [--budget 60] [--margin 0.1]
    python bench/search_efficiency.py --smoke    # one seed, 3 evaluations, 8 prompts per skill: that it runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from evomerge.backends.hf import as_candidate
from evomerge.config import load_config
from evomerge.fitness.evaluators import build_evaluator
from evomerge.fitness.spec import FitnessSpec
from evomerge.search.loop import Search
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "evomerge" / "zoo_models"
EXPERTS = [str(ZOO / f"expert_{s}") for s in ("rev", "srt", "cae")]


def smoke_fitness(out: Path) -> Path:
    """evaluators/zoo_skills.yaml with 8 prompts per skill instead of 200."""
    spec = yaml.safe_load((REPO / "evaluators" / "zoo_skills.yaml").read_text())
    path = out / "zoo_skills_smoke.yaml"
    path.write_text(yaml.safe_dump({**spec, "n_examples": 8}))
    return path


def source_scores(fitness: FitnessSpec) -> dict[str, float]:
    evaluator = build_evaluator(fitness, ZOO / "base")
    out = {}
    for path in [str(ZOO / "base"), *EXPERTS]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        scores = evaluator.evaluate(as_candidate(model, ZOO / "base"))
        out[Path(path).name] = fitness.scalarize(fitness.objective_values(scores))
    return out


def run(sampler: str, seed: int, budget: int, out: Path, fitness: Path) -> list[float]:
    config = {"name": f"{sampler}_{seed}", "models": EXPERTS, "base_model": str(ZOO / "base"),
              "search_space": "search_spaces/ps_ties_dare.yaml", "fitness": str(fitness),
              "sampler": sampler, "budget": {"n_trials": budget}, "seed": seed,
              "storage": f"sqlite:///{out}/{sampler}_{seed}.db", "device": "cpu", "dtype": "float32"}
    path = out / f"{sampler}_{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    search = Search(load_config(path))
    search.run()
    trials = sorted(search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return [t.value for t in trials]


def evaluations_to(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v >= target), None)


def summary(counts: list[int | None], budget: int) -> str:
    reached = [c for c in counts if c is not None]
    shown = ", ".join(str(c) if c is not None else f">{budget}" for c in counts)
    if len(reached) * 2 <= len(counts):
        median = f">{budget}"
    else:
        median = f"{statistics.median([c if c is not None else budget + 1 for c in counts]):.0f}"
    return f"median {median}, reached {len(reached)}/{len(counts)} [{shown}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--margin", type=float, default=0.1, help="target = best source + margin (sum of 3 accuracies)")
    parser.add_argument("--smoke", action="store_true", help="one seed, 3 evaluations, 8 prompts, under bench/out/smoke/")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.budget = 1, 3
    out = REPO / "bench" / "out" / ("smoke/search_efficiency" if args.smoke else "search_efficiency")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.chdir(REPO)  # the configs name repo-relative files
    fitness_path = smoke_fitness(out) if args.smoke else REPO / "evaluators" / "zoo_skills.yaml"
    fitness = FitnessSpec.load(fitness_path)
    sources = source_scores(fitness)
    target = max(sources.values()) + args.margin
    print("sources (sum of rev+srt+cae exact match, search split): " + ", ".join(f"{k} {v:.3f}" for k, v in sources.items()))
    print(f"target: {target:.3f} (best source + {args.margin}); budget {args.budget} evaluations per run")
    start = time.perf_counter()
    for sampler in ("cmaes", "random"):
        runs = [run(sampler, seed, args.budget, out, fitness_path) for seed in range(args.seeds)]
        counts = [evaluations_to(v, target) for v in runs]
        best = [max(v) for v in runs]
        print(f"{sampler:>7}: evaluations to target {summary(counts, args.budget)}; "
              f"best found median {statistics.median(best):.3f} (min {min(best):.3f}, max {max(best):.3f})")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
