"""`evomerge demo`: the whole product on the shipped zoo, offline, in a few minutes.

Scores every source model with the lm-eval zoo tasks, runs (or resumes) the parameter-space
search of `runs/demo.yaml` on the tasks' `search` split, prints the Pareto archive, then
scores the best merge on the `test` split, whose prompts the search never saw, against every
source (`evomerge evaluate` with evaluators/zoo_target_test.yaml: the results are stored in
the study): the point of merging is a model better than each of its parts on the combined
target. A second, shorter phase (`runs/demo_route.yaml`) routes layers through that merge and
an expert (PS+DFS) and shows accuracy against depth. Studies, plot and the best model's
checkpoint are written under `runs/demo/`; running the demo again resumes both studies.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial

from evomerge.config import RunConfig, load_config
from evomerge.errors import EvomergeError
from evomerge.export import save_checkpoint
from evomerge.fitness.evaluators import Evaluator, build_evaluator
from evomerge.fitness.spec import FitnessSpec
from evomerge.recipe import Recipe
from evomerge.search.archive import ArchiveEntry
from evomerge.search.attrs import SOURCES
from evomerge.search.held_out import evaluate_held_out
from evomerge.search.loop import Search
from evomerge.search.report import archive_entries, archive_table, plot_archive, run_with_progress
from evomerge.yamlio import load_yaml_mapping

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = Path("runs") / "demo.yaml"
ROUTE_CONFIG = Path("runs") / "demo_route.yaml"
TEST_SPEC = Path("evaluators") / "zoo_target_test.yaml"
TARGET = "zoo_target/acc"


def _score_table(rows: dict[str, dict[str, float]], columns: dict[str, str]) -> str:
    """One row per model, one column per metric (percent)."""
    width = max(len(name) for name in rows)
    lines = [f"{'model':<{width}}" + "".join(f"{c:>9}" for c in columns)]
    for name, scores in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * scores[key]:>9.1f}" for key in columns.values()))
    return "\n".join(lines)


def _columns(config: RunConfig) -> dict[str, str]:
    return {**{o.name: o.metric for o in config.fitness.objectives}, "target": TARGET}


def _by_name(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{model ref: {"scores": ...}} -> {short name: scores}."""
    return {Path(ref).name: result["scores"] for ref, result in results.items()}


@dataclass
class Phase:
    """One finished study of the demo and its best trial (by the scalarization)."""
    search: Search
    entries: list[ArchiveEntry]
    best: ArchiveEntry
    recipe: Recipe

    def best_trial(self) -> FrozenTrial:
        return next(t for t in self.search.study.get_trials(deepcopy=False) if t.number == self.best.number)


def run_phase(config: RunConfig, title: str, quiet: bool, search: Search | None = None) -> Phase:
    """Run (or resume) one study and print its Pareto archive."""
    search = search or Search(config)
    run_with_progress(search, quiet=quiet)
    entries = archive_entries(config, search.study)
    best = max(entries, key=lambda e: config.fitness.scalarize(e.values))
    print(f"\n{title} ({len(entries)} of {config.n_trials} trials, search split):")
    print(archive_table(config, entries))
    return Phase(search, entries, best, Recipe.from_dict(best.recipe, where=f"trial {best.number}"))


def main(n_trials: int | None = None, out: str | None = None, quiet: bool = False) -> None:
    """Run the demo; `out` (default runs/demo) holds its study, plot and exported model."""
    started = time.perf_counter()
    if not (REPO / DEMO_CONFIG).is_file():
        raise EvomergeError(f"the demo runs from the project's checkout ({DEMO_CONFIG}, evaluators/ and search_spaces/ "
                            f"are not inside the package, and {REPO} has none): clone the repository and run "
                            "`pip install -e .` there")
    out_dir = Path(out).resolve() if out else REPO / "runs" / "demo"
    os.chdir(REPO)  # the demo's config and zoo paths are relative to the checkout
    config = load_config(DEMO_CONFIG, n_trials=n_trials, storage=f"sqlite:///{out_dir / 'study.db'}")
    tokenizer = Path(config.base_model or config.models[0])
    test_spec = FitnessSpec.load(TEST_SPEC)
    test = build_evaluator(test_spec, tokenizer)
    print(f"evomerge demo: {len(config.models)} experts merged onto {tokenizer.name}, scored with lm-eval "
          f"tasks {config.fitness.options['tasks']} (exact match, %)\n")
    search = Search(config)  # scores the sources on the search split, once per study
    columns = _columns(config)
    print("Source models on the search split:\n" + _score_table(_by_name(search.study.user_attrs[SOURCES]), columns) + "\n")

    phase = run_phase(config, "Pareto archive", quiet, search)
    held_out = evaluate_held_out(config, search.study, test_spec, [phase.best_trial()], search.backend, test)
    merged = held_out.trials[phase.best.number]["scores"]
    sources = _by_name(held_out.sources)
    print("\nOn the test split (prompts the search never saw):")
    print(_score_table({**sources, f"best merge (trial {phase.best.number})": merged}, columns))
    best_test = merged[TARGET]
    runner_up = max(sources.items(), key=lambda kv: kv[1][TARGET])
    verdict = "beats" if best_test > runner_up[1][TARGET] else "does NOT beat"
    print(f"\nThe best merge {verdict} every source on the combined target: {100 * best_test:.1f}% vs "
          f"{100 * runner_up[1][TARGET]:.1f}% for the best source ({runner_up[0]}), "
          f"{100 * (best_test - runner_up[1][TARGET]):+.1f} points.")

    plot = out_dir / "pareto.png"
    plot_archive(config, phase.search.study, phase.entries, plot)
    phase.search.backend.materialize(phase.recipe)
    saved = save_checkpoint(phase.search.backend.materializer, phase.recipe, out_dir / "best", force=True)
    print(f"Pareto plot: {plot}; best model exported to {saved} (recipe.yaml beside it).")
    storage = "" if out is None else f" --storage {config.storage}"
    print(f"Inspect the study: evomerge status {DEMO_CONFIG}{storage}; evomerge archive {DEMO_CONFIG}{storage}")
    route_phase(ROUTE_CONFIG if out is None else _route_config(saved, out_dir), n_trials, test_spec, test,
                best_test, quiet)
    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s.")


def _route_config(merge: Path, out_dir: Path) -> Path:
    """runs/demo_route.yaml with its first model and storage moved into `out_dir`."""
    data = load_yaml_mapping(ROUTE_CONFIG, "run config")
    data["models"] = [str(merge), *data["models"][1:]]
    data["storage"] = f"sqlite:///{out_dir / 'route.db'}"
    path = out_dir / "demo_route.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def route_phase(config_path: Path, n_trials: int | None, test_spec: FitnessSpec, test: Evaluator, merge_test: float,
                quiet: bool) -> None:
    """Layer routing through the best merge (the config's first model) and an expert."""
    config = load_config(config_path, n_trials=n_trials)
    print(f"\nPhase 2, layer routing (PS+DFS, {config_path}): paths through the best merge and "
          f"{Path(config.models[1]).name}, r = 3, one scale per layer entered; accuracy vs. depth")
    phase = run_phase(config, "Pareto archive of the routes", quiet)
    held_out = evaluate_held_out(config, phase.search.study, test_spec, [phase.best_trial()], phase.search.backend,
                                 test, sources=False)
    routed = held_out.trials[phase.best.number]["scores"]
    print(f"Best route (trial {phase.best.number}, {phase.best.values['layers']:.0f} layers) on the test split: "
          f"{100 * routed[TARGET]:.1f}% vs {100 * merge_test:.1f}% for the merge it routes through "
          f"({100 * (routed[TARGET] - merge_test):+.1f} points).")
