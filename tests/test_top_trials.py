"""`evomerge evaluate --top K` scores the K best trials: the Pareto front first, then the rest by
the scalarization, whatever the number of objectives (a one-objective front holds one trial)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import pytest

from evomerge.errors import EvomergeError
from evomerge.fitness.spec import FitnessSpec
from evomerge.search.held_out import choose_trials


def study_with(objectives: list[dict[str, float]], recipes: list[str] | None = None) -> optuna.Study:
    study = optuna.create_study(directions=["maximize"] * len(objectives[0]))
    for k, values in enumerate(objectives):
        trial = study.ask()
        trial.set_user_attr("objectives", values)
        trial.set_user_attr("recipe", json.dumps({"method": "linear", "n": recipes[k] if recipes else k}))
        study.tell(trial, list(values.values()))
    return study


def spec(names: list[str]) -> FitnessSpec:
    return FitnessSpec.from_dict({"kind": "lm_eval", "tasks": ["zoo_rev"],
                                  "objectives": [{"name": n, "metric": f"zoo_rev/{n}"} for n in names],
                                  "scalarization": {n: 1.0 for n in names}})


def chosen(study: optuna.Study, names: list[str], top: int) -> list[int]:
    config = SimpleNamespace(fitness=spec(names), study_name="s", path="run.yaml")
    return [t.number for t in choose_trials(config, study, top, None)]


def test_top_k_on_one_objective_takes_the_k_best_trials():
    study = study_with([{"a": 0.5}, {"a": 0.9}, {"a": 0.7}, {"a": 0.8}])
    assert chosen(study, ["a"], 2) == [1, 3]
    assert chosen(study, ["a"], 3) == [1, 3, 2]
    assert chosen(study, ["a"], 10) == [1, 3, 2, 0]  # fewer trials than asked: all of them


def test_top_k_takes_the_front_first_then_the_rest_by_the_scalarization():
    # front: 0 (1.0, 0.0) and 1 (0.0, 1.0), scalarized 1.0 each; 2 (0.6, 0.6) is on it too (1.2);
    # 3 (0.5, 0.55) is dominated by 2 but scalarizes above the front's 0 and 1: it still comes after them
    study = study_with([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, {"a": 0.6, "b": 0.6}, {"a": 0.5, "b": 0.55}])
    assert chosen(study, ["a", "b"], 4) == [2, 0, 1, 3]
    assert chosen(study, ["a", "b"], 1) == [2]


def test_a_copy_of_a_chosen_recipe_is_not_scored_again():
    study = study_with([{"a": 0.9}, {"a": 0.9}, {"a": 0.5}], recipes=["x", "x", "y"])
    assert chosen(study, ["a"], 2) == [0, 2]


def test_an_empty_study_is_refused():
    with pytest.raises(EvomergeError, match="no completed trial"):
        chosen(optuna.create_study(), ["a"], 2)
