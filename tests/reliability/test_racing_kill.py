"""Kill -9 mid-race and resume: a raced CMA-ES study on a seeded subset keeps its subset, makes the
pruning decisions an uninterrupted run makes, and evaluates no item twice (the killed attempt's
stored chunks are carried by its retry)."""

from __future__ import annotations

from pathlib import Path

import yaml
from optuna.trial import TrialState

from evomerge.fitness.items import ItemResults
from evomerge.search.attrs import ITEMS, ITEM_RESULTS, RETRY_HISTORY, STUDY_ITEMS
from reliability.harness import evaluated_twice, kill_in_phase, run_cli, trials_of, write_config

REPO = Path(__file__).resolve().parents[2]
FITNESS = {"kind": "lm_eval", "tasks": ["zoo_target"], "split": "search", "batch_size": 64,
           "include_path": str(REPO / "evaluators" / "tasks"), "subset": {"size": 60, "seed": 0},
           "racing": {"chunk": 10, "min_items": 10, "p_threshold": 0.3},
           "objectives": [{"name": "target", "metric": "zoo_target/acc"}], "scalarization": {"target": 1.0}}


def raced_config(folder: Path, zoo: Path) -> Path:
    folder.mkdir()
    (folder / "raced.fitness.yaml").write_text(yaml.safe_dump(FITNESS))
    return write_config(folder, zoo, sampler={"name": "cmaes", "popsize": 4}, n_trials=3,
                        fitness=str(folder / "raced.fitness.yaml"))


def decisions(path: Path) -> list[tuple[dict, str, list]]:
    """Each finished trial in order: its params, COMPLETE or PRUNED, and the items it rests on."""
    return [(t.params, t.state.name, ItemResults.from_json(t.user_attrs[ITEM_RESULTS]).items())
            for t in trials_of(path) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def study_items(path: Path) -> dict:
    import optuna

    from evomerge.config import load_config

    config = load_config(path)
    return optuna.load_study(study_name=config.study_name, storage=config.storage).user_attrs[STUDY_ITEMS]


def test_kill_mid_race_then_resume_makes_the_same_decisions_evaluating_nothing_twice(tmp_path, zoo):
    reference = raced_config(tmp_path / "reference", zoo)
    assert run_cli(reference).wait() == 0
    expected = decisions(reference)
    assert "PRUNED" in [state for _, state, _ in expected]  # the race stopped someone, or this proves little

    killed = raced_config(tmp_path / "killed", zoo)
    assert kill_in_phase(killed, "items", nth=2)  # the second trial, after its first chunk was stored
    attempt = next(t for t in trials_of(killed) if t.state == TrialState.RUNNING)
    assert attempt.user_attrs[ITEMS] == 10
    assert run_cli(killed).wait() == 0

    assert study_items(killed) == study_items(reference)
    assert decisions(killed) == expected
    assert evaluated_twice(killed) == 0
    trials = {t.number: t for t in trials_of(killed)}
    retry = next(t for t in trials.values() if attempt.number in t.system_attrs.get(RETRY_HISTORY, []))
    carried = set(ItemResults.from_json(attempt.user_attrs[ITEM_RESULTS]).items())
    assert carried <= set(ItemResults.from_json(retry.user_attrs[ITEM_RESULTS]).items())
    for t in trials.values():  # every item of a finished trial evaluated once, over all its attempts
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            attempts = [trials[n] for n in t.system_attrs.get(RETRY_HISTORY, [])] + [t]
            evaluated = sum(a.user_attrs.get(ITEMS, 0) for a in attempts)
            assert evaluated == ItemResults.from_json(t.user_attrs[ITEM_RESULTS]).n_items
