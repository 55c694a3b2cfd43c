"""The genome <-> recipe codec: exact round trips, valid recipes everywhere in bounds, clear errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from evomerge.errors import EvomergeError
from evomerge.search.genome import Genome, SearchSpace

SPACES = sorted(Path("search_spaces").glob("ps_*.yaml"))
MODELS = ["m/a", "m/b", "m/c"]


def genome_for(path, n_layers=4):
    return Genome(SearchSpace.load(path), MODELS, "m/base", n_layers)


def random_params(genome, rng):
    return {name: rng.uniform(g.low, g.high) for name, g in genome.genes.items()}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_decode_then_encode_is_identity_and_recipes_are_valid(path):
    genome = genome_for(path)
    rng = random.Random(0)
    for _ in range(50):
        params = random_params(genome, rng)
        recipe = genome.decode(params)
        recipe.check_groups(genome.n_layers)
        assert genome.encode(recipe) == params
    corners = [{n: g.low for n, g in genome.genes.items()}, {n: g.high for n, g in genome.genes.items()}, genome.x0]
    for params in corners:
        assert genome.encode(genome.decode(params)) == params


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_encode_then_decode_is_identity(path):
    genome = genome_for(path)
    recipe = genome.decode(random_params(genome, random.Random(1)))
    assert genome.decode(genome.encode(recipe)) == recipe


def test_paper_space_has_one_weight_and_density_per_source():
    genome = genome_for("search_spaces/ps_ties_dare.yaml")
    assert sorted(genome.genes) == sorted(f"{p}/s{i}" for p in ("weight", "density") for i in range(3))
    recipe = genome.decode(genome.x0)
    assert recipe.method == "dare_ties" and recipe.models[0].parameters == {"weight": 0.5, "density": 0.5}


def test_layer_groups_multiply_genes():
    genome = genome_for("search_spaces/ps_task_arithmetic.yaml", n_layers=6)
    assert len(genome.genes) == 3 * 4  # 3 sources x (3 layer groups + 1 non-layer group)
    assert "weight/s2/g3" in genome.genes


def test_shared_genes_search_method_options():
    space = SearchSpace.from_dict({"method": "slerp", "layer_granularity": 1, "shared": {"t": {"low": 0, "high": 1}}})
    genome = Genome(space, ["m/b"], "m/a", 2)
    recipe = genome.decode({"t/g0": 0.1, "t/g1": 0.2, "t/g2": 0.9})
    assert recipe.parameters == {"t": [0.1, 0.2, 0.9]}


@pytest.mark.parametrize("data, message", [
    ({"per_source": {"weight": {"low": 0, "high": 1}}}, "missing key 'method'"),
    ({"method": "nope", "per_source": {}}, "unknown merge method 'nope'"),
    ({"method": "ties", "per_source": {"weight": {"low": 1, "high": 0}}}, "low (1) must be below high (0)"),
    ({"method": "ties", "per_source": {"weight": {"low": 0, "high": 1, "init": 2}}}, "init 2 lies outside [0, 1]"),
    ({"method": "ties", "per_source": {"wieght": {"low": 0, "high": 1}}}, "per_source.wieght: not a parameter of this method"),
    ({"method": "ties", "per_source": {"weight": [0, 1]}}, "expected {low: NUMBER, high: NUMBER"),
    ({"method": "ties"}, "nothing to search"),
    ({"method": "ties", "per_source": {"weight": {"low": 0, "high": 1}}, "layer_granularity": -2}, "layer_granularity must be null"),
    ({"method": "ties", "per_source": {"weight": {"low": 0, "high": 1}}, "colour": 1}, "unknown key(s) ['colour']"),
])
def test_bad_search_spaces_name_the_problem(data, message):
    with pytest.raises(EvomergeError) as err:
        SearchSpace.from_dict(data)
    assert message in str(err.value)


def test_method_source_count_is_checked():
    space = SearchSpace.from_dict({"method": "slerp", "shared": {"t": {"low": 0, "high": 1}}})
    with pytest.raises(EvomergeError, match="slerp takes 1 model"):
        Genome(space, MODELS, "m/base", 4)
