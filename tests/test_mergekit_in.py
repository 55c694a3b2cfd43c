"""mergekit configs in: recipe -> mergekit -> recipe round trips for every shipped example,
gradients and filters evaluated as mergekit 0.1.5 evaluates them (its own function, run in the
peer venv), `evomerge merge` of a mergekit config bit-identical to `mergekit-yaml` on the same
file, and one-line refusals for what a recipe cannot express. The mergekit parts skip where its
venv is absent (MERGEKIT_YAML names another mergekit-yaml)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import EXAMPLES
from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.merge.methods import METHODS
from evomerge.mergekit_in import evaluate_setting, from_mergekit, load_recipe, read_layout
from evomerge.mergekit_yaml import mergekit_yaml
from evomerge.recipe import Recipe, Route, Source, Step

MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml") or "/work/venvs/mergekit/bin/mergekit-yaml"
MERGEKIT_PYTHON = Path(MERGEKIT_YAML).parent / "python"
needs_mergekit = pytest.mark.skipif(not Path(MERGEKIT_YAML).is_file(), reason=f"no mergekit-yaml at {MERGEKIT_YAML}")


@pytest.fixture(scope="module")
def layout(zoo):
    return read_layout(str(zoo / "base"))


def read(data: dict, layout) -> Recipe:
    return from_mergekit(data, "mk.yml", lambda ref: layout)


def prefixes(layout) -> list[str]:
    return [f"model.layers.{i}." for i in range(layout.n_layers)]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_round_trips_through_mergekit(example, layout):
    recipe = Recipe.load(example)
    if recipe.route is not None and any(s.scale != 1 for s in recipe.route.layers) or recipe.method and recipe.route:
        with pytest.raises(EvomergeError):  # no mergekit equivalent (scaled route; PS+DFS needs two configs)
            mergekit_yaml(recipe, prefixes(layout))
        return
    back = read(yaml.safe_load(mergekit_yaml(recipe, prefixes(layout))), layout)
    assert back.to_dict() == recipe.to_dict()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_round_trips_with_per_group_values(method, zoo, layout):
    spec = METHODS[method]
    experts = ("rev", "srt", "cae")[:spec.max_sources or 3]
    sources = [Source(f"{zoo}/expert_{s}", {p: [0.3, 0.5, 0.4] if i == 0 else 0.1 + 0.2 * i for p in spec.source_params})
               for i, s in enumerate(experts)]
    options = {"t": [0.2, 0.7, 0.5]} if "t" in spec.options else {"normalize": True} if "normalize" in spec.options else {}
    per_group = bool(spec.source_params) or "t" in options
    recipe = Recipe(method=method, models=sources, base_model=f"{zoo}/base" if spec.needs_base else None,
                    parameters=options, layer_granularity=2 if per_group else 0)
    back = read(yaml.safe_load(mergekit_yaml(recipe, prefixes(layout))), layout)
    assert back.to_dict() == recipe.to_dict()


def test_an_unscaled_route_round_trips_as_passthrough_slices(zoo, layout):
    rev, srt = str(zoo / "expert_rev"), str(zoo / "expert_srt")
    route = Route([Step(rev, 0), Step(rev, 1), Step(srt, 1), Step(srt, 2), Step(rev, 3), Step(rev, 3)], rev)
    recipe = Recipe(method=None, models=[], route=route, dtype="float32")
    text = mergekit_yaml(recipe, prefixes(layout))
    assert "passthrough" in text
    assert read(yaml.safe_load(text), layout).to_dict() == recipe.to_dict()


# Settings as mergekit users write them: scalars, gradients (numbers and flags), filters, "*", nesting, YAML's
# 1e-3-as-a-string; t at the ends, at 1/3 of a 4-layer slice, and mid-way.
SETTINGS = [
    (0.5, "model.layers.0.mlp.up_proj.weight"),
    ([0.2, 0.9], "model.layers.1.mlp.up_proj.weight"),
    ([0.1, 0.5, 0.3], "x"),
    ([0, 1, 0.25, 0.75, 2], "x"),
    (["1e-3", 0.5], "x"),
    ([True, False, True], "x"),
    ([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.3, 0.6]}, {"value": 0.9}],
     "model.layers.2.mlp.down_proj.weight"),
    ([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.3, 0.6]}, {"value": 0.9}], "lm_head.weight"),
    ([{"filter": "self_attn", "value": 0.1}], "model.layers.0.mlp.up_proj.weight"),
    ({"filter": "*", "value": [0.4, 0.8]}, "model.norm.weight"),
]
TS = [0.0, 1 / 3, 0.5, 2 / 3, 1.0]


@needs_mergekit
def test_gradients_and_filters_evaluate_bit_for_bit_as_mergekits_own_function():
    cases = [(s, name, t, isinstance(s, list) and s and s[0] is True) for s, name in SETTINGS for t in TS]
    program = (
        "import json, sys\n"
        "from pydantic import TypeAdapter\n"
        "from mergekit.config import evaluate_setting, ConditionalParameter\n"
        "def parse(s):\n"
        "    if isinstance(s, dict): return ConditionalParameter(**s)\n"
        "    if isinstance(s, list) and s and isinstance(s[0], dict): return [ConditionalParameter(**c) for c in s]\n"
        "    return s\n"
        "out = []\n"
        "for s, name, t, flag in json.load(sys.stdin):\n"
        "    out.append(evaluate_setting(name, parse(s), t, validate=TypeAdapter(bool if flag else float).validate_python))\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([str(MERGEKIT_PYTHON), "-c", program], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=120, check=True)
    theirs = json.loads(proc.stdout)
    ours = [evaluate_setting(s, name, t, not flag, "p") for s, name, t, flag in cases]
    assert ours == theirs  # floats through JSON's repr: exact
    assert ours[TS.index(1 / 3) + 5] == 0.2 + (0.9 - 0.2) / 3  # an independent line: linear between the ends


CONFIGS = {
    # models: per-model gradients, a filter for one layer before a gradient for the rest, top-level per-model
    # weight for a model with none of its own, a lambda gradient, the base listed among the models
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {zoo}/base
models:
  - model: {zoo}/base
  - model: {zoo}/expert_rev
    parameters: {{weight: [0.2, 0.9]}}
  - model: {zoo}/expert_srt
    parameters:
      weight:
        - {{filter: model.layers.3., value: 0.7}}
        - {{filter: model.layers., value: [0.1, 0.5, 0.3]}}
  - model: {zoo}/expert_cae
parameters: {{weight: 0.4, lambda: [0.8, 1.1]}}
dtype: float32
out_dtype: bfloat16
""",
    # slices: t restarts in each slice; slice-level parameters under model-level ones. Task arithmetic,
    # not TIES: TIES keeps equal magnitudes at its threshold in position order and mergekit in its
    # unstable sort's (README, Methods), so their bits differ there whatever the config says
    "slices": """
merge_method: task_arithmetic
base_model: {zoo}/base
slices:
  - sources:
      - {{model: {zoo}/base, layer_range: [0, 2]}}
      - {{model: {zoo}/expert_rev, layer_range: [0, 2], parameters: {{weight: [0.3, 0.7]}}}}
      - {{model: {zoo}/expert_srt, layer_range: [0, 2]}}
    parameters: {{weight: 0.5}}
  - sources:
      - {{model: {zoo}/base, layer_range: [2, 4]}}
      - {{model: {zoo}/expert_rev, layer_range: [2, 4], parameters: {{weight: [0.3, 0.8]}}}}
      - {{model: {zoo}/expert_srt, layer_range: [2, 4]}}
    parameters: {{weight: [0.5, 0.2]}}
dtype: float32
out_dtype: bfloat16
""",
}


@needs_mergekit
@pytest.mark.parametrize("method", list(CONFIGS))
def test_evomerge_merge_of_a_mergekit_config_is_bit_identical_to_mergekit(method, zoo, tmp_path):
    config = tmp_path / "mk.yml"
    config.write_text(CONFIGS[method].format(zoo=zoo))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([MERGEKIT_YAML, str(config), str(tmp_path / "mk"), "--no-write-model-card", "--no-copy-tokenizer",
                    "--quiet"], env=env, check=True, capture_output=True, timeout=300)
    assert main(["merge", str(config), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    ours, theirs = load_file(tmp_path / "ev" / "model.safetensors"), load_file(tmp_path / "mk" / "model.safetensors")
    assert set(ours) == set(theirs)
    differing = {name: int((ours[name] != theirs[name]).sum()) for name in ours}
    assert sum(differing.values()) == 0, {k: v for k, v in differing.items() if v}
    recipe = Recipe.load(tmp_path / "ev" / "recipe.yaml")
    assert recipe.method == "task_arithmetic" and recipe.layer_granularity == 1
    assert isinstance(recipe.models[0].parameters["weight"], list)  # expert_rev's gradient, one value per layer


@needs_mergekit
def test_mergekit_yaml_of_adapters_is_bit_identical_in_mergekit(zoo, tmp_path):
    """The mergekit.yaml written beside a merge of LoRA adapters (BASE+ADAPTER), run as its comment says
    (adapters merged into the base in float32), gives evomerge's weights."""
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base_model": f"{zoo}/base", "dtype": "float32",
                               "layer_granularity": 2, "parameters": {"lambda": 0.8},
                               "models": [{"model": f"{zoo}/lora_rev", "parameters": {"weight": 0.7}},
                                          {"model": f"{zoo}/lora_srt", "parameters": {"weight": -0.4}},
                                          {"model": f"{zoo}/lora_cae", "parameters": {"weight": [0.5, 1.2, 0.9]}}]})
    recipe.save(tmp_path / "recipe.yaml")
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    subprocess.run([MERGEKIT_YAML, str(tmp_path / "ev" / "mergekit.yaml"), str(tmp_path / "mk"), "--lora-merge-cache",
                    str(tmp_path / "cache"), "--lora-merge-dtype", "float32", "--no-write-model-card",
                    "--no-copy-tokenizer", "--quiet"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
                   capture_output=True, timeout=300)
    ours, theirs = load_file(tmp_path / "ev" / "model.safetensors"), load_file(tmp_path / "mk" / "model.safetensors")
    assert set(ours) == set(theirs)
    assert sum(int((ours[name] != theirs[name]).sum()) for name in ours) == 0


def test_a_mergekit_config_reads_as_the_recipe_it_means(zoo, layout):
    """Independent arithmetic: t = layer / 3 over 4 layers, the value linear between the gradient's ends."""
    recipe = read(yaml.safe_load(CONFIGS["task_arithmetic"].format(zoo=zoo)), layout)
    rev, srt, cae = (s.parameters["weight"] for s in recipe.models)
    assert [s.model for s in recipe.models] == [f"{zoo}/expert_{n}" for n in ("rev", "srt", "cae")]
    assert rev == pytest.approx([0.2 + 0.7 * layer / 3 for layer in range(4)] + [0.2], abs=1e-15)
    assert srt == pytest.approx([0.1, 0.1 + 0.4 * 2 / 3, 0.5 - 0.2 / 3, 0.7, 0.4], abs=1e-15)  # embeddings/head: top-level 0.4
    assert cae == 0.4 and recipe.layer_granularity == 1 and recipe.dtype == "bfloat16"


REFUSED = [
    ({"parameters": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.5}]}}, "differs inside layer 0"),
    ({"merge_method": "nuslerp"}, "merge_method"),
    ({"modules": {"text_decoder": {}}}, "modules"),
    ({"parameters": {"weight": 0.5, "int8_mask": True}}, "int8_mask"),
    ({"parameters": {"weight": 0.5, "t": 0.3}}, "parameters.t"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"parameters": {"weight": 0.5}, "tokenizer": {"source": "base"}}, "tokenizer"),
    ({"models": [{"model": "{zoo}/expert_rev", "parameters": {"weight": 1, "normalize": True}}]}, "normalize"),
    ({"models": [{"model": "{zoo}/expert_rev"}]}, "weight of model"),
    ({"models": None, "slices": [{"sources": [{"model": "{zoo}/expert_rev", "layer_range": [0, 2]},
                                              {"model": "{zoo}/expert_srt", "layer_range": [2, 4]}]}]}, "slices[0]"),
    ({"merge_method": "passthrough", "models": None,
      "slices": [{"sources": [{"model": "{zoo}/expert_rev", "layer_range": [0, 2]}]},
                 {"sources": [{"model": "{zoo}/expert_srt", "layer_range": [2, 4]}]}]}, "slices"),
]


@pytest.mark.parametrize("change, named", REFUSED, ids=[r[1] for r in REFUSED])
def test_what_a_recipe_cannot_express_is_refused_naming_the_key(change, named, zoo, layout):
    data = {"merge_method": "task_arithmetic", "base_model": f"{zoo}/base",
            "models": [{"model": f"{zoo}/expert_rev"}, {"model": f"{zoo}/expert_srt"}]}
    data.update(json.loads(json.dumps(change).replace("{zoo}", str(zoo))))
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(EvomergeError, match=named.replace("[", r"\[").replace("]", r"\]")) as error:
        read(data, layout)
    assert "\n" not in str(error.value)


def test_the_command_refuses_in_one_line(zoo, tmp_path, capsys):
    config = tmp_path / "mk.yml"
    config.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": f"{zoo}/expert_rev",
                                      "models": [{"model": f"{zoo}/expert_rev"}, {"model": f"{zoo}/expert_srt"}],
                                      "parameters": {"t": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}]}}))
    assert main(["merge", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"evomerge: error: {config}: t differs inside layer 0"), err
    assert not (tmp_path / "o").exists()


def test_a_recipe_yaml_still_loads_as_a_recipe():
    assert load_recipe("runs/examples/zoo_ties.yaml").to_dict() == Recipe.load("runs/examples/zoo_ties.yaml").to_dict()


def test_a_search_space_starts_where_a_mergekit_config_is(zoo, tmp_path):
    """x0: the config's gradient spread over the genome's layer groups (a group's mean), its scalars as they are,
    a model it does not name at the genes' init; CMA-ES's first proposals sit there (tiny sigma0)."""
    import optuna

    from evomerge.search.cma_sampler import PyCmaSampler
    from evomerge.search.genome import Genome
    from evomerge.search_space import SearchSpace

    config = tmp_path / "mk.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": f"{zoo}/base",
        "models": [{"model": f"{zoo}/expert_rev", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                   {"model": f"{zoo}/expert_srt", "parameters": {"weight": 0.9, "density": 0.3}}],
        "parameters": {"lambda": 1.2}}))
    data = {"method": "dare_ties", "layer_granularity": 2, "x0": str(config),
            "per_source": {"weight": {"low": 0, "high": 1.5, "init": 0.5}, "density": {"low": 0.01, "high": 1, "init": 0.6}},
            "shared": {"lambda": {"low": 0.5, "high": 1.5, "init": 1.0}}}
    space = SearchSpace.from_dict(data)
    models = [f"{zoo}/expert_{s}" for s in ("rev", "srt", "cae")]
    genome = Genome(space, models, f"{zoo}/base", n_layers=4)
    rev = [0.2 + 0.6 * layer / 3 for layer in range(4)]  # t = layer / 3; embeddings and head at t = 0
    expected = {"weight/s0/g0": (rev[0] + rev[1]) / 2, "weight/s0/g1": (rev[2] + rev[3]) / 2, "weight/s0/g2": 0.2,
                **{f"density/s0/g{g}": 0.5 for g in range(3)}, **{f"weight/s1/g{g}": 0.9 for g in range(3)},
                **{f"density/s1/g{g}": 0.3 for g in range(3)}, **{f"weight/s2/g{g}": 0.5 for g in range(3)},
                **{f"density/s2/g{g}": 0.6 for g in range(3)}, **{f"lambda/g{g}": 1.2 for g in range(3)}}
    assert genome.x0 == pytest.approx(expected, abs=1e-12)
    study = optuna.create_study(sampler=PyCmaSampler(genome.distributions, seed=0, x0=genome.x0, sigma0=1e-6))
    trial = study.ask(genome.distributions)
    assert trial.params == pytest.approx(expected, abs=1e-4)

    coarse = SearchSpace.from_dict({**data, "layer_granularity": None})
    assert Genome(coarse, models, f"{zoo}/base", n_layers=4).x0["weight/s0"] == pytest.approx(sum(rev + [0.2]) / 5)
    space_out = SearchSpace.from_dict({**data, "per_source": {"weight": {"low": 0, "high": 0.5}}})
    with pytest.raises(EvomergeError, match=r"gene weight/s0/g1 would start at 0.7, outside its bounds \[0.0, 0.5\]"):
        Genome(space_out, models, f"{zoo}/base", n_layers=4).x0



def _adapter_recipe(zoo) -> Recipe:
    return Recipe.from_dict({"method": "task_arithmetic", "base_model": f"{zoo}/base", "dtype": "float32",
                             "layer_granularity": 2, "parameters": {"lambda": 0.8},
                             "models": [{"model": f"{zoo}/lora_rev", "parameters": {"weight": 0.7}},
                                        {"model": f"{zoo}/lora_srt", "parameters": {"weight": [0.5, 1.2, 0.9]}}]})


def _mergekit_names(recipe: Recipe, base: str) -> dict[str, str]:
    return {s.model: f"{base}+{s.model}" for s in recipe.models}


def test_adapters_round_trip_as_base_plus_adapter(zoo, monkeypatch):
    """recipe -> mergekit.yaml (BASE+ADAPTER, the base as the adapter names it) -> the same recipe;
    the layout of an adapter is its base's."""
    monkeypatch.chdir(zoo.parent.parent.parent)  # the zoo adapters name their base relative to the repo root
    recipe = _adapter_recipe(zoo)
    named = json.loads((zoo / "lora_rev" / "adapter_config.json").read_text())["base_model_name_or_path"]
    text = mergekit_yaml(recipe, [f"model.layers.{i}." for i in range(4)], adapters=_mergekit_names(recipe, named))
    assert f"{named}+{zoo}/lora_rev" in text
    back = from_mergekit(yaml.safe_load(text), "mk.yml", read_layout)
    assert back.to_dict() == recipe.to_dict()
    assert read_layout(f"{zoo}/lora_rev") == read_layout(f"{zoo}/base")


@pytest.mark.parametrize("name,message", [
    ("{zoo}/expert_rev+{zoo}/lora_rev", "the adapter adapts"),  # not the base the adapter names
    ("{named}+{zoo}/expert_rev", "is not a PEFT adapter folder"),
    ("{named}+{zoo}/lora_rev+x", "one '+'"),
])
def test_a_base_plus_adapter_evomerge_cannot_apply_is_refused_in_one_line(zoo, monkeypatch, name, message):
    monkeypatch.chdir(zoo.parent.parent.parent)
    named = json.loads((zoo / "lora_rev" / "adapter_config.json").read_text())["base_model_name_or_path"]
    data = {"merge_method": "task_arithmetic", "base_model": f"{zoo}/base",
            "models": [{"model": name.format(zoo=zoo, named=named), "parameters": {"weight": 0.5}}]}
    with pytest.raises(EvomergeError, match=re.escape(message)):
        from_mergekit(data, "mk.yml", read_layout)
