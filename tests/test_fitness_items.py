"""The fitness spec's item keys (subset, racing, estimator) and the run config's item budget:
defaults, fingerprints, and every combination that cannot work refused in one line, before
any model loads."""

from __future__ import annotations

import pytest
import yaml

from evomerge.config import load_config
from evomerge.errors import EvomergeError
from evomerge.fitness.spec import FitnessSpec
from reliability.harness import write_config

BASE = {"kind": "lm_eval", "tasks": ["zoo_target"], "objectives": [{"name": "t", "metric": "zoo_target/acc"}]}


def spec(**keys) -> FitnessSpec:
    return FitnessSpec.from_dict({**BASE, **keys}, "spec.yaml")


@pytest.mark.parametrize("keys, message", [
    ({"subset": {"size": 60}, "limit": 10}, "subset and limit exclude each other"),
    ({"estimator": {"kind": "irt"}}, "every candidate sees every item: give it anchors"),
    ({"estimator": {"anchors": 50}, "subset": {"size": 60}}, "estimator.anchors chooses the items .*: drop subset"),
    ({"estimator": {"anchors": 50}, "racing": {}}, "estimator.anchors chooses the items .*: drop racing"),
    ({"estimator": {"kind": "irt"}, "racing": {}, "limit": 10}, "estimates the whole split: drop limit"),
    ({"estimator": {"kind": "rasch", "anchors": 5}}, "estimator.kind must be irt"),
    ({"estimator": {"anchors": 0}}, "estimator.anchors must be a positive integer"),
    ({"estimator": {"anchors": 5, "refit_every": 0}}, "estimator.refit_every must be a positive integer"),
    ({"estimator": {"anchors": 5, "every": 3}}, r"estimator: unknown key\(s\) \['every'\]"),
    ({"racing": {"pruner": "median"}}, r"racing.pruner must be one of \['wilcoxon'\]"),
    ({"racing": {"p_threshold": 1.5}}, "racing.p_threshold must be a number between 0 and 1"),
    ({"racing": {"chunk": 0}}, "racing.chunk must be a positive integer"),
    ({"racing": {"min_items": "20"}}, "racing.min_items must be a positive integer"),
    ({"racing": [20]}, "racing must be"),
    ({"subset": {"size": -3}}, "subset.size must be a positive integer"),
])
def test_impossible_item_keys_are_refused_in_one_line(keys, message):
    with pytest.raises(EvomergeError, match=message) as info:
        spec(**keys)
    assert str(info.value).startswith("spec.yaml: ") and "\n" not in str(info.value)


def test_the_zoo_scorer_has_no_item_keys():
    with pytest.raises(EvomergeError, match=r"unknown key\(s\) \['subset'\]"):
        FitnessSpec.from_dict({"kind": "zoo_skills", "subset": {"size": 5},
                               "objectives": [{"name": "rev", "metric": "rev"}]}, "spec.yaml")


def test_defaults_are_part_of_the_fingerprint_and_absent_keys_leave_it_as_it_was():
    assert spec(racing={}).fingerprint() == spec(racing={"pruner": "wilcoxon", "p_threshold": 0.1, "min_items": 20,
                                                         "chunk": 20}).fingerprint()
    assert spec(racing={}).options["racing"] == {"pruner": "wilcoxon", "p_threshold": 0.1, "min_items": 20, "chunk": 20}
    assert spec(racing=None).options["racing"] == spec(racing={}).options["racing"]  # `racing:` alone: the defaults
    assert spec(subset={"size": 60}).options["subset"] == {"size": 60, "seed": 0, "stratify_by": None}
    assert spec(estimator={"anchors": 50}).options["estimator"] == {"kind": "irt", "anchors": 50, "refit_every": 10}
    plain = spec().fingerprint()["options"]
    assert not {"subset", "racing", "estimator"} & set(plain)  # studies made before these keys existed still resume
    assert spec(subset={"size": 60, "seed": 1}).fingerprint() != spec(subset={"size": 60}).fingerprint()


def _config(tmp_path, zoo, fitness: dict, **extra):
    path = tmp_path / "items.yaml"
    path.write_text(yaml.safe_dump(fitness))
    return write_config(tmp_path, zoo, fitness=str(path), **extra)


def test_racing_with_nsga2_is_a_config_error(tmp_path, zoo):
    path = _config(tmp_path, zoo, {**BASE, "racing": {}}, sampler="nsga2")
    with pytest.raises(EvomergeError, match="racing compares candidates on one scalar per item, but nsga2"):
        load_config(path)


def test_an_items_budget_needs_an_lm_eval_fitness(tmp_path, zoo):
    assert load_config(_config(tmp_path, zoo, BASE, budget={"items": 5000})).n_items == 5000
    with pytest.raises(EvomergeError, match="budget.items counts lm-eval items, which a zoo_skills fitness"):
        load_config(write_config(tmp_path, zoo, budget={"items": 5000}))
    with pytest.raises(EvomergeError, match="budget: items: expected an integer >= 1"):
        load_config(_config(tmp_path, zoo, BASE, budget={"items": 0}))
