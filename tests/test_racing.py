"""Racing pieces: the per-trial order, per-item values whose mean is the scalarized fitness, and
the pruning decision, checked decision by decision against Optuna's own path (trial.report per
item + trial.should_prune in a real single-objective study with a WilcoxonPruner)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from evomerge.fitness.harness import load_tasks
from evomerge.fitness.items import ItemResults, by_task, item_positions
from evomerge.fitness.racing import chunks, item_values, item_weights, partial_mean, race_order, should_prune
from evomerge.search.attrs import ITEM_RESULTS
from evomerge.search.scoring import race_reference

SIZES = {"zoo_rev": 200, "zoo_srt": 200, "zoo_cae": 200}
ITEMS = [(t, i) for t, n in SIZES.items() for i in range(n)]


@pytest.fixture(scope="module")
def task_dict():
    _, tasks = load_tasks(["zoo_target"], Path("evaluators/tasks"))
    for task in tasks["tasks"].values():
        task.config.test_split = "search"
    return tasks


def answers(p: float, difficulty: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0/1 answers of a candidate of skill p on items of the given difficulty (logit model)."""
    logit = np.log(p / (1 - p)) - difficulty
    return (rng.random(len(difficulty)) < 1 / (1 + np.exp(-logit))).astype(float)


def as_results(y: np.ndarray, items: list[tuple[str, int]]) -> ItemResults:
    ids = by_task(items)
    value = {item: float(v) for item, v in zip(ITEMS, y)}
    return ItemResults(ids, {t: {"acc,none": [value[(t, i)] for i in ids[t]]} for t in ids})


def test_race_order_is_a_seeded_permutation_per_trial():
    first = race_order(3, 17, ITEMS)
    assert sorted(first) == sorted(ITEMS) and first != ITEMS
    assert race_order(3, 17, ITEMS) == first
    assert race_order(3, 18, ITEMS) != first and race_order(4, 17, ITEMS) != first
    parts = list(chunks(first, 20))
    assert len(parts) == 30 and all(sum(map(len, p.values())) == 20 for p in parts)
    assert sorted((t, i) for p in parts for t, ids in p.items() for i in ids) == sorted(ITEMS)
    # a retry carrying its killed attempt's first 3 chunks races on with chunk 4
    done = as_results(np.zeros(600), [(t, i) for p in parts[:3] for t, ids in p.items() for i in ids])
    assert list(chunks(first, 20, done=done)) == parts[3:]


def test_item_values_average_to_the_scalarized_fitness(task_dict):
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.6).astype(float)
    results = as_results(y, ITEMS)
    accs = {t: results.values[t]["acc,none"] for t in SIZES}
    means = {t: sum(v) / len(v) for t, v in accs.items()}
    steps = item_positions(SIZES)
    # the demo's scalarization: rev + srt + cae (each weight 1)
    per_task = item_weights({f"{t}/acc": 1.0 for t in SIZES}, task_dict)
    assert per_task == {t: {"acc,none": 3.0} for t in SIZES}
    assert partial_mean(item_values(results, per_task, steps)) == pytest.approx(sum(means.values()))
    # the group's own metric (weight_by_size), with a minimized cost of weight 0.1 as a constant
    group = item_weights({"zoo_target/acc": 2.0, "zoo_rev/acc": -0.5}, task_dict)
    values = item_values(results, group, steps, constant=-0.1 * 7.0)
    expected = 2.0 * y.mean() - 0.5 * means["zoo_rev"] - 0.7
    assert partial_mean(values) == pytest.approx(expected)
    assert sorted(values) == list(range(600))


def test_decisions_equal_optunas_own_per_item_reports():
    """A tiny real study (in memory, no model): 24 candidates of skills 0.3-0.8 race on 600 items in
    chunks of 20. At every chunk, `should_prune` against the best fully scored trial decides
    what `trial.should_prune()` decides after `trial.report(value, step=item)` for each item."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 1.5, 600)
    steps = item_positions(SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner = optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=20)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    weights = {t: {"acc,none": 1.0} for t in SIZES}
    decisions, used = [], []
    for number, skill in enumerate(rng.uniform(0.3, 0.8, 24)):
        trial = study.ask()
        y = answers(skill, difficulty, rng)
        reference = race_reference(study)
        best = reference and item_values(ItemResults.from_json(reference.user_attrs[ITEM_RESULTS]), weights, steps)
        results = None
        for chunk in chunks(race_order(0, trial.number, ITEMS), 20):
            items = [(t, i) for t, ids in chunk.items() for i in ids]
            part = as_results(y, items)
            results = part if results is None else results.merged(part)
            for item in items:
                trial.report(float(y[steps[item]]), step=steps[item])
            ours = bool(best) and should_prune(best, item_values(results, weights, steps))
            assert ours == trial.should_prune()
            decisions.append(ours)
            if ours:
                break
        current = item_values(results, weights, steps)
        used.append(len(current))
        trial.set_user_attr(ITEM_RESULTS, results.to_json())
        if decisions[-1]:
            study.tell(trial, state=TrialState.PRUNED)
            frozen = study.trials[-1]
            assert frozen.value == frozen.intermediate_values[max(frozen.intermediate_values)]  # not a partial mean
        else:
            study.tell(trial, partial_mean(current))
            assert race_reference(study).number == study.best_trial.number
    assert sum(decisions) >= 5 and np.mean(used) < 400  # racing saved items: it was a real test


def test_per_item_reports_need_a_single_objective_study():
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    with pytest.raises(NotImplementedError):
        trial.report(1.0, step=0)
