"""The genome <-> recipe codec: exact round trips, valid recipes everywhere in bounds, clear errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from evomerge.errors import EvomergeError
from evomerge.recipe import MERGED, Recipe, Route, Step
from evomerge.search.genome import Genome
from evomerge.search_space import SearchSpace

ROUTE_SPACES = [Path("search_spaces/dfs_routing.yaml"), Path("search_spaces/ps_dfs.yaml")]
SPACES = [p for p in sorted(Path("search_spaces").glob("ps_*.yaml")) if p not in ROUTE_SPACES]  # genes <-> recipe exactly
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


# ---- layer routing (data-flow space) ---------------------------------------------------------

def route_genome(route, n_layers=4):
    return Genome(SearchSpace.from_dict({"route": route}), MODELS, "m/base", n_layers)


def slot_params(genome, on=(), value=1.0):
    """Every indicator off (-1) except the slots named in `on`; scales at their init."""
    params = {**genome.x0, **{name: -1.0 for name in genome.route.slots}}
    params.update({genome.route.slots[t]: value for t in on})
    return params


@pytest.mark.parametrize("path", ROUTE_SPACES, ids=lambda p: p.stem)
def test_routing_genomes_decode_to_bounded_valid_routes_that_round_trip(path):
    genome = genome_for(path)
    rng = random.Random(0)
    ps_genes = [n for n in genome.genes if not n.startswith(("route/", "scale/"))]
    for _ in range(100):
        params = random_params(genome, rng)
        recipe = genome.decode(params)
        assert 1 <= len(recipe.route.layers) <= genome.route.max_length == 8
        assert genome.decode(genome.encode(recipe)) == recipe
        assert all(genome.encode(recipe)[n] == params[n] for n in ps_genes)


def test_dfs_space_has_the_papers_genes_and_starts_on_the_first_model():
    genome = genome_for("search_spaces/dfs_routing.yaml")
    slots = [n for n in genome.genes if n.startswith("route/")]
    assert len(slots) == 3 * 3 * 4 and len(genome.genes) - len(slots) == (3 * 4) ** 2  # T = M x r, W = M x M
    route = genome.decode(genome.x0).route
    assert route == Route([Step("m/a", i) for i in range(4)], "m/a")


def test_hybrid_space_routes_the_merge_and_the_first_model():
    genome = genome_for("search_spaces/ps_dfs.yaml")
    recipe = genome.decode(genome.x0)
    assert recipe.method == "dare_ties" and recipe.route == Route([Step(MERGED, i) for i in range(4)], MERGED)
    assert genome.route.refs == [MERGED, "m/a"] and "scale/s1.l3" in genome.genes


def test_matrix_scale_is_read_at_each_transition():
    genome = route_genome({"sources": [0, 1], "repeats": 2, "scaling": "matrix"}, n_layers=2)
    params = slot_params(genome, on=[0, 3, 5])  # slots: r0 s0.l0, r0 s1.l1, r1 s0.l1
    params.update({"scale/s0.l0>s1.l1": 0.6, "scale/s1.l1>s0.l1": 1.7})
    assert genome.decode(params).route.layers == [Step("m/a", 0), Step("m/b", 1, 0.6), Step("m/a", 1, 1.7)]


def test_too_long_paths_keep_the_strongest_slots_in_order():
    genome = route_genome({"max_path_length": 3, "scaling": "none"})
    params = slot_params(genome, on=range(10), value=0.5)
    params.update({genome.route.slots[7]: 0.9, genome.route.slots[2]: 0.8})
    layers = genome.decode(params).route.layers
    assert [(s.model, s.layer) for s in layers] == [("m/a", 0), ("m/a", 2), ("m/b", 3)]  # 2 and 7, then slot 0 on ties


def test_empty_paths_fall_back_to_the_strongest_slot():
    genome = route_genome({"scaling": "none"})
    params = slot_params(genome)
    params[genome.route.slots[17]] = -0.2
    assert genome.decode(params).route.layers == [Step("m/b", 1)]  # slot 17 = r1, M index 5


def test_encode_refuses_routes_the_space_cannot_express():
    genome = route_genome({"sources": [1], "repeats": 1, "scaling": "per_layer"})
    route = Recipe(method=None, models=[], route=Route([Step("m/b", 0), Step("m/b", 2, 0.7)], "m/b"))
    assert genome.decode(genome.encode(route)) == route
    for steps, message in [([Step("m/a", 0)], "not among this search space's route sources"),
                           ([Step("m/b", 2), Step("m/b", 1)], "does not fit 1 repetitions"),
                           ([Step("m/b", 0, 2.0)], "cannot express")]:
        with pytest.raises(EvomergeError, match=message):
            genome.encode(Recipe(method=None, models=[], route=Route(steps, "m/b")))
    twice = route_genome({"sources": [1], "repeats": 2, "scaling": "per_layer"})
    steps = [Step("m/b", 0), Step("m/b", 2, 0.7), Step("m/b", 0, 1.0), Step("m/b", 2, 0.9)]  # one gene, two scales
    with pytest.raises(EvomergeError, match="cannot express"):
        twice.encode(Recipe(method=None, models=[], route=Route(steps, "m/b")))


@pytest.mark.parametrize("route, message", [
    ({"sources": [MERGED]}, "'merged' is the parameter-space merge, but this space has no method"),
    ({"sources": ["a"]}, "expected a list of 'merged' and model indices"),
    ({"repeats": 0}, "repeats: expected an integer >= 1"),
    ({"scaling": "diagonal"}, "scaling: expected one of"),
    ({"indicator": {"low": 0, "high": 1}}, "need low < 0 < high"),
    ({"scale": {"low": -1, "high": 1}}, "low must be > 0"),
    ({"colour": 1}, "unknown key(s) ['colour']"),
])
def test_bad_route_spaces_name_the_problem(route, message):
    with pytest.raises(EvomergeError) as err:
        SearchSpace.from_dict({"route": route})
    assert message in str(err.value)


def test_route_source_index_is_checked_against_the_models():
    with pytest.raises(EvomergeError, match="names model index 5, but the run config has 3 models"):
        route_genome({"sources": [5]})
