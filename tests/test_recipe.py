"""Recipes: YAML/JSON round trips, validation errors, layer groups, the mergekit translation."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import EXAMPLES
from evomerge.errors import EvomergeError
from evomerge.mergekit_yaml import to_mergekit
from evomerge.recipe import Recipe, group_of, n_groups

PREFIXES = [f"model.layers.{i}." for i in range(4)]


def ties_dict(**extra):
    data = {
        "method": "ties",
        "base_model": "b",
        "models": [{"model": "x", "parameters": {"weight": [0.5, 0.7, 0.2], "density": 0.5}},
                   {"model": "y", "parameters": {"weight": 1.0, "density": [0.3, 0.4, 0.9]}}],
        "parameters": {"normalize": False, "lambda": [1.0, 1.2, 0.8]},
        "layer_granularity": 2,
        "seed": 7,
    }
    data.update(extra)
    return data


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_round_trip_yaml_and_json(path):
    recipe = Recipe.load(path)
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe


def test_save_load_round_trip(tmp_path):
    recipe = Recipe.from_dict(ties_dict())
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == recipe


def test_one_example_per_family():
    methods = {Recipe.load(p).method for p in EXAMPLES}
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "model_stock"} <= methods


def test_groups_are_layer_groups_then_non_layer_tensors():
    assert n_groups(4, 2) == 3 and n_groups(4, 0) == 2 and n_groups(5, 2) == 4 and n_groups(4, 1) == 5
    assert [group_of(layer, 4, 2) for layer in range(4)] == [0, 0, 1, 1]
    assert [group_of(layer, 4, 0) for layer in range(4)] == [0, 0, 0, 0]
    assert group_of(None, 4, 2) == 2 and group_of(None, 4, 0) == 1  # embeddings, final norm, head


def test_per_group_values_resolve():
    recipe = Recipe.from_dict(ties_dict())
    assert recipe.source_params(1) == [{"weight": 0.7, "density": 0.5}, {"weight": 1.0, "density": 0.4}]
    assert recipe.options(2) == {"normalize": False, "lambda": 0.8}


@pytest.mark.parametrize("change, message", [
    ({"method": "tiez"}, "unknown merge method 'tiez'"),
    ({"colour": 1}, "unknown key(s) ['colour']"),
    ({"models": []}, "'models' must be a non-empty list"),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "densty": 0.5}}]}, "unknown parameter 'densty'"),
    ({"models": [{"model": "x", "parameters": {"weight": float("nan")}}]}, "expected a finite number"),
    ({"base_model": None}, "needs base_model"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"layer_granularity": -1}, "layer_granularity must be an integer >= 0"),
    ({"method": "slerp", "parameters": {"t": 0.5}}, "slerp takes 1 model(s) besides the base, got 2"),
])
def test_bad_recipes_name_the_problem(change, message):
    with pytest.raises(EvomergeError) as err:
        Recipe.from_dict(ties_dict(**change))
    assert message in str(err.value)


def test_group_count_is_checked_against_the_model():
    recipe = Recipe.from_dict(ties_dict())
    recipe.check_groups(4)
    with pytest.raises(EvomergeError, match="has 3 values but a 6-layer model with layer_granularity 2 has 4 groups"):
        recipe.check_groups(6)


def test_mergekit_translation_uses_one_filter_per_layer_then_a_catch_all():
    config = to_mergekit(Recipe.from_dict(ties_dict()), PREFIXES)
    assert config["merge_method"] == "ties" and config["base_model"] == "b"
    assert config["dtype"] == "float32" and config["out_dtype"] == "bfloat16"
    weight = config["models"][0]["parameters"]["weight"]
    assert weight == [{"filter": "model.layers.0.", "value": 0.5}, {"filter": "model.layers.1.", "value": 0.5},
                      {"filter": "model.layers.2.", "value": 0.7}, {"filter": "model.layers.3.", "value": 0.7},
                      {"value": 0.2}]
    assert config["models"][1]["parameters"]["weight"] == 1.0
    assert config["parameters"]["lambda"][-1] == {"value": 0.8}


def test_mergekit_translation_refuses_what_mergekit_cannot_do():
    data = ties_dict(method="dare_ties", parameters={"rescale_mode": "inverse_density"})
    with pytest.raises(EvomergeError, match="no mergekit equivalent"):
        to_mergekit(Recipe.from_dict(data), PREFIXES)
