"""`evomerge demo`: the whole product on the shipped zoo, offline, in a few minutes.

Scores every source model with the lm-eval zoo tasks, runs (or resumes) the search of
`runs/demo.yaml` on the tasks' `search` split, prints the Pareto archive, then scores the
best merge on the `test` split, whose prompts the search never saw, against every source:
the point of merging is a model better than each of its parts on the combined target.
The study, the Pareto plot and the best model's checkpoint are written under `runs/demo/`.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.config import RunConfig, load_config
from evomerge.evaluate import build_evaluator
from evomerge.export import save_checkpoint
from evomerge.fitness import Evaluator
from evomerge.recipe import Recipe
from evomerge.search.loop import Search
from evomerge.search.report import archive_entries, archive_table, plot_archive, run_with_progress

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = Path("runs") / "demo.yaml"
TARGET = "zoo_target/acc"


def _score_table(rows: dict[str, dict[str, float]], columns: dict[str, str]) -> str:
    """One row per model, one column per metric (percent)."""
    width = max(len(name) for name in rows)
    lines = [f"{'model':<{width}}" + "".join(f"{c:>9}" for c in columns)]
    for name, scores in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * scores[key]:>9.1f}" for key in columns.values()))
    return "\n".join(lines)


def _load(path: Path, dtype: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def _columns(config: RunConfig) -> dict[str, str]:
    return {**{o.name: o.metric for o in config.fitness.objectives}, "target": TARGET}


def score_sources(config: RunConfig, evaluators: dict[str, Evaluator]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {source name: scores}} for the base model and every expert."""
    refs = ([config.base_model] if config.base_model else []) + config.models
    tables: dict[str, dict[str, dict[str, float]]] = {split: {} for split in evaluators}
    for ref in refs:
        model = _load(Path(ref), config.dtype)
        for split, evaluator in evaluators.items():
            tables[split][Path(ref).name] = evaluator.evaluate(model)
    return tables


def best_entry(config: RunConfig, search: Search):
    entries = archive_entries(config, search.study)
    return max(entries, key=lambda e: config.fitness.scalarize(e.values)), entries


def main(n_trials: int | None = None, out: str | None = None, quiet: bool = False) -> None:
    """Run the demo; `out` (default runs/demo) holds its study, plot and exported model."""
    started = time.perf_counter()
    out_dir = Path(out).resolve() if out else REPO / "runs" / "demo"
    os.chdir(REPO)  # the demo's config and zoo paths are relative to the checkout
    config = load_config(DEMO_CONFIG, n_trials=n_trials, storage=f"sqlite:///{out_dir / 'study.db'}")
    tokenizer = Path(config.base_model or config.models[0])
    evaluators = {split: build_evaluator(replace(config.fitness, options={**config.fitness.options, "split": split}),
                                         tokenizer) for split in ("search", "test")}
    print(f"evomerge demo: {len(config.models)} experts merged onto {tokenizer.name}, scored with lm-eval "
          f"tasks {config.fitness.options['tasks']} (exact match, %)\n")
    sources = score_sources(config, evaluators)
    columns = _columns(config)
    print("Source models on the search split:\n" + _score_table(sources["search"], columns) + "\n")

    search = Search(config)
    run_with_progress(search, quiet=quiet)
    best, entries = best_entry(config, search)
    print(f"\nPareto archive ({len(entries)} of {config.n_trials} trials, search split):")
    print(archive_table(config, entries))

    recipe = Recipe.from_dict(best.recipe, where=f"trial {best.number}")
    model = search.materializer.apply(recipe)
    merged = {f"best merge (trial {best.number})": evaluators["test"].evaluate(model)}
    print("\nOn the test split (prompts the search never saw):")
    print(_score_table({**sources["test"], **merged}, columns))
    best_test = next(iter(merged.values()))[TARGET]
    runner_up = max(sources["test"].items(), key=lambda kv: kv[1][TARGET])
    verdict = "beats" if best_test > runner_up[1][TARGET] else "does NOT beat"
    print(f"\nThe best merge {verdict} every source on the combined target: {100 * best_test:.1f}% vs "
          f"{100 * runner_up[1][TARGET]:.1f}% for the best source ({runner_up[0]}), "
          f"{100 * (best_test - runner_up[1][TARGET]):+.1f} points.")

    plot = out_dir / "pareto.png"
    plot_archive(config, search.study, entries, plot)
    saved = save_checkpoint(search.materializer, recipe, out_dir / "best", force=True)
    print(f"Pareto plot: {plot}; best model exported to {saved} (recipe.yaml beside it); "
          f"{time.perf_counter() - started:.0f} s in all.")
    storage = "" if out is None else f" --storage {config.storage}"
    print(f"Inspect the study: evomerge status {DEMO_CONFIG}{storage}; evomerge archive {DEMO_CONFIG}{storage}")
