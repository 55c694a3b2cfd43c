"""Layer routing (data-flow space) on the shipped zoo: folded scaling == hook scaling, exact
identity routes, export -> reload, cached generation, untouched sources, clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config

from evomerge.backends.candidate import candidate_costs
from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.fitness.spec import COST_METRICS
from evomerge.merge.materialize import Materializer
from evomerge.mergekit_yaml import mergekit_yaml
from evomerge.recipe import MERGED, Recipe, Route, Step
from evomerge.routing import check_layout, routed_config

PROMPTS = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 2], [4, 8, 15, 16, 23, 2, 1, 2]])
EXPERTS = ("expert_rev", "expert_srt", "expert_cae")


@pytest.fixture(scope="module")
def refs(zoo):
    return [str(zoo / m) for m in EXPERTS]


@pytest.fixture(scope="module")
def materializer(zoo, refs):
    return Materializer([str(zoo / "base"), *refs], dtype="float32", device="cpu")


def routed(materializer, steps, embed_from=None, **ps):
    route = Route([Step(*s) for s in steps], embed_from or steps[0][0])
    return materializer.apply(Recipe(method=ps.pop("method", None), models=ps.pop("models", []), route=route, **ps))


def logits(model):
    with torch.no_grad():
        return model(PROMPTS).logits.clone()


def random_route(refs, r, rng, n_layers=4, max_len=8):
    """A path the paper's genome can produce: an ordered subset of r repetitions of every source layer."""
    slots = [(ref, layer) for _ in range(r) for ref in refs for layer in range(n_layers)]
    chosen = sorted(rng.sample(range(len(slots)), rng.randint(1, max_len)))
    return [(*slots[t], rng.uniform(0.5, 2.0)) for t in chosen]


def scale_by(w):
    """A forward pre-hook multiplying a decoder layer's input hidden states by w (positional or keyword)."""
    def hook(module, args, kwargs):
        if args:
            return (args[0] * w, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * w}
    return hook


def hook_scaled_logits(materializer, steps):
    """Reference: the unscaled route with each step's input multiplied by its scale in a pre-hook."""
    model = routed(materializer, [(ref, layer) for ref, layer, _ in steps])
    handles = [layer.register_forward_pre_hook(scale_by(s[2]), with_kwargs=True)
               for layer, s in zip(model.model.layers, steps)]
    try:
        return logits(model)
    finally:
        for h in handles:
            h.remove()


@pytest.fixture()
def zero_eps(materializer, refs):
    """RMSNorm's epsilon is the only inexact part of folding: set it to 0 to see float32 round-off alone."""
    norms = [m for r in refs for m in materializer.router.resident(r).modules() if hasattr(m, "variance_epsilon")]
    saved = [m.variance_epsilon for m in norms]
    for m in norms:
        m.variance_epsilon = 0.0
    yield
    for m, eps in zip(norms, saved):
        m.variance_epsilon = eps


# Tolerances (max |logit difference|, logits of magnitude ~10, float32): with eps = 0 only round-off
# remains (measured <= 4e-6); with the zoo's rms_norm_eps = 1e-6 and its small activations
# (embedding RMS ~0.05) the epsilon shifts logits by up to ~1.1e-2 for scales in [0.5, 2].
@pytest.mark.parametrize("r", [1, 3])
def test_folded_scaling_matches_hook_scaling_exactly_without_eps(materializer, refs, zero_eps, r):
    rng = random.Random(r)
    for _ in range(4):
        steps = random_route(refs, r, rng)
        assert (logits(routed(materializer, steps)) - hook_scaled_logits(materializer, steps)).abs().max() < 1e-4


@pytest.mark.parametrize("r", [1, 3])
def test_folded_scaling_matches_hook_scaling_within_eps_tolerance(materializer, refs, r):
    rng = random.Random(10 + r)
    for _ in range(4):
        steps = random_route(refs, r, rng)
        assert (logits(routed(materializer, steps)) - hook_scaled_logits(materializer, steps)).abs().max() < 3e-2


def test_identity_route_reproduces_the_source_exactly(materializer, refs):
    source = AutoModelForCausalLM.from_pretrained(refs[1], dtype=torch.float32).eval()
    model = routed(materializer, [(refs[1], i, 1.0) for i in range(4)])
    assert torch.equal(logits(model), logits(source))
    assert model.config.num_hidden_layers == 4


def test_unscaled_positions_reuse_resident_weights_and_scaled_ones_reuse_buffers(materializer, refs):
    steps = [(refs[0], 0, 1.0), (refs[0], 1, 0.5), (refs[1], 1, 2.0), (refs[0], 3, 1.0)]  # running product 1, .5, 1, 1
    model = routed(materializer, steps)
    resident = materializer.router.resident(refs[0]).model.layers
    layers = model.model.layers
    assert layers[0].mlp.down_proj.weight is resident[0].mlp.down_proj.weight
    assert layers[1].self_attn.q_proj.weight is resident[1].self_attn.q_proj.weight
    assert layers[1].mlp.down_proj.weight.data_ptr() != resident[1].mlp.down_proj.weight.data_ptr()
    assert layers[3].mlp.down_proj.weight is resident[3].mlp.down_proj.weight
    pointer = layers[1].mlp.down_proj.weight.data_ptr()
    again = routed(materializer, [(refs[2], 2, 0.7)])
    assert again.model.layers[0].mlp.down_proj.weight.data_ptr() == pointer
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]


def test_sources_and_candidate_are_not_modified(zoo, refs):
    materializer = Materializer(refs, dtype="bfloat16", device="cpu")
    tensors = {r: {k: v.clone() for k, v in materializer.sources[r].tensors.items()} for r in refs}
    trees = {r: [(n, id(m), getattr(m, "layer_idx", None)) for n, m in materializer.router.resident(r).named_modules()]
             for r in refs}
    candidate = [(n, id(m)) for n, m in materializer.candidate.named_modules()]
    for seed in range(3):
        steps = random_route(refs, 3, random.Random(seed))
        logits(routed(materializer, steps))
        hook_scaled_logits(materializer, steps)
    routed(materializer, [(refs[0], 1, 0.5)] * 3).generate(PROMPTS[:1], max_new_tokens=3, do_sample=False)
    for r in refs:
        assert all(torch.equal(v, materializer.sources[r].tensors[k]) for k, v in tensors[r].items())
        resident = materializer.router.resident(r)
        assert [(n, id(m), getattr(m, "layer_idx", None)) for n, m in resident.named_modules()] == trees[r]
        assert not any(m._forward_pre_hooks for m in resident.modules())
        assert all(torch.equal(p, tensors[r][n]) for n, p in resident.named_parameters())
    assert [(n, id(m)) for n, m in materializer.candidate.named_modules()] == candidate


def greedy(model, cache):
    return model.generate(PROMPTS[:1], max_new_tokens=12, do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.parametrize("example", ["repeat", "zoo_route", "zoo_ps_dfs"])
def test_export_reloads_to_the_same_logits_and_cached_generation_agrees(zoo, refs, tmp_path, example):
    if example == "repeat":  # one layer used twice (shared storage) and scaled
        recipe = Recipe(method=None, models=[], route=Route([Step(refs[0], 0), Step(refs[0], 1), Step(refs[0], 1, 0.7),
                                                            Step(refs[1], 2), Step(refs[0], 3)], refs[0]))
    else:
        recipe = Recipe.load(f"runs/examples/{example}.yaml")
    recipe_path = tmp_path / "recipe.yaml"
    recipe.save(recipe_path)
    expected = logits(Materializer.for_recipe(recipe, device="cpu").apply(recipe))
    assert main(["merge", str(recipe_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    assert torch.equal(logits(reloaded), expected)
    assert reloaded.config.num_hidden_layers == len(recipe.route.layers)
    assert Recipe.load(tmp_path / "out" / "recipe.yaml") == recipe
    assert torch.equal(greedy(reloaded, True), greedy(reloaded, False))


def test_cached_generation_agrees_in_memory_with_a_layer_used_twice(materializer, refs):
    model = routed(materializer, [(refs[0], 0, 1.0), (refs[0], 1, 1.0), (refs[0], 1, 1.0), (refs[2], 3, 1.3)])
    assert torch.equal(greedy(model, True), greedy(model, False))


def test_unscaled_route_exports_mergekit_passthrough_slices(zoo, refs, tmp_path):
    steps = [(refs[0], 0, 1.0), (refs[0], 1, 1.0), (refs[1], 1, 1.0), (refs[1], 2, 1.0), (refs[0], 2, 1.0), (refs[0], 3, 1.0)]
    path = tmp_path / "route.yaml"
    Recipe(method=None, models=[], route=Route([Step(*s) for s in steps], refs[0])).save(path)
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    config = yaml.safe_load((tmp_path / "out" / "mergekit.yaml").read_text())
    assert config["merge_method"] == "passthrough"
    assert [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in config["slices"]] == [
        (refs[0], [0, 2]), (refs[1], [1, 3]), (refs[0], [2, 4])]


@pytest.mark.parametrize("route, reason", [
    (Route([Step("a", 0), Step("a", 1, 2.0)], "a"), "scale != 1"),
    (Route([Step("a", 0), Step("b", 1)], "a"), "embeddings from the first slice's model"),
])
def test_routes_mergekit_cannot_express_are_refused(route, reason):
    with pytest.raises(EvomergeError, match=reason):
        mergekit_yaml(Recipe(method=None, models=[], route=route), [])


def test_hybrid_routes_the_parameter_space_merge(materializer, zoo, refs):
    ps = {"method": "linear", "models": [{"model": refs[0], "parameters": {"weight": 1.0}}]}
    merged_only = Recipe.from_dict({**ps, "route": {"embed_from": MERGED,
                                                     "layers": [{"model": MERGED, "layer": i} for i in range(4)]}})
    assert torch.equal(logits(materializer.apply(merged_only)), logits(routed(materializer, [(refs[0], i, 1.0) for i in range(4)])))
    with pytest.raises(EvomergeError, match="reads this recipe's parameter-space merge"):
        mergekit_yaml(merged_only, [])


def test_route_recipes_round_trip_yaml_and_json():
    for path in ("runs/examples/zoo_route.yaml", "runs/examples/zoo_ps_dfs.yaml"):
        recipe = Recipe.load(path)
        assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
        assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe


@pytest.mark.parametrize("route, message", [
    ({"embed_from": "a", "layers": []}, "route.layers is empty"),
    ({"embed_from": "a", "layers": [{"model": "a", "layer": -1}]}, "layer must be an integer >= 0"),
    ({"embed_from": "a", "layers": [{"model": "a", "layer": 0, "scale": -1.0}]}, "scale must be a finite number > 0"),
    ({"embed_from": "a", "layers": [{"model": "a", "layer": 0, "scale": float("nan")}]}, "scale must be a finite number > 0"),
    ({"embed_from": MERGED, "layers": [{"model": "a", "layer": 0}]}, "has no method"),
    ({"embed_from": "a", "layers": [{"model": "a"}]}, "expected {model: MODEL, layer: N"),
    ({"layers": []}, "expected {embed_from"),
])
def test_bad_routes_name_the_problem(route, message):
    with pytest.raises(EvomergeError) as err:
        Recipe.from_dict({"route": route})
    assert message in str(err.value)


def test_pure_route_refuses_parameter_space_keys():
    with pytest.raises(EvomergeError, match="add its `method` or remove them"):
        Recipe.from_dict({"route": {"embed_from": "a", "layers": [{"model": "a", "layer": 0}]}, "seed": 3})


def test_layer_out_of_range_is_a_clear_error(materializer, refs):
    with pytest.raises(EvomergeError, match="layer 4 of .* which has 4 decoder layers"):
        routed(materializer, [(refs[0], 0, 1.0), (refs[0], 4, 1.0)])


def test_a_layer_repeated_many_times_works_without_copying_weights(materializer, refs):
    model = routed(materializer, [(refs[0], 2, 1.0)] * 40)
    assert model.config.num_hidden_layers == 40 and torch.isfinite(logits(model)).all()
    costs = candidate_costs(model)
    assert costs["path_length"] == 40 and "path_length" in COST_METRICS
    assert costs["param_count"] == candidate_costs(routed(materializer, [(refs[0], 2, 1.0)]))["param_count"]


def test_different_hidden_sizes_are_refused(zoo, tmp_path):
    config = LlamaConfig.from_pretrained(zoo / "base")
    config.hidden_size, config.head_dim = 64, 16
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    with pytest.raises(EvomergeError, match="different hidden sizes"):
        Materializer([str(zoo / "expert_rev"), str(tmp_path / "small")], device="cpu")


def test_unsupported_architecture_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(EvomergeError, match="unsupported architecture for layer routing"):
        check_layout(gpt2)


def test_routed_config_keeps_per_layer_types():
    config = Qwen2Config(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention"] * 2, use_sliding_window=True)
    route = Route([Step("a", 1), Step("a", 1), Step("a", 0)], "a")
    out = routed_config(config, route, {"a": config})
    assert out.num_hidden_layers == 3 and out.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert config.num_hidden_layers == 4


def test_a_short_dfs_search_runs_and_records_path_length(zoo, tmp_path):
    import optuna

    fitness = {"kind": "zoo_skills", "n_examples": 8, "objectives": [
        {"name": "mean", "metric": "mean"}, {"name": "path_length", "metric": "path_length", "direction": "minimize"}]}
    (tmp_path / "fitness.yaml").write_text(yaml.safe_dump(fitness))
    config = {"name": "dfs", "models": [str(zoo / "expert_rev"), str(zoo / "expert_srt")],
              "search_space": "search_spaces/dfs_routing.yaml", "fitness": str(tmp_path / "fitness.yaml"),
              "sampler": "random", "budget": {"n_trials": 4}, "seed": 0, "storage": f"sqlite:///{tmp_path}/dfs.db",
              "device": "cpu", "dtype": "float32"}
    (tmp_path / "dfs.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "dfs.yaml"), "--quiet"]) == 0
    trials = optuna.load_study(study_name="dfs", storage=config["storage"]).get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        recipe = Recipe.from_dict(json.loads(t.user_attrs["recipe"]))
        assert t.user_attrs["objectives"]["path_length"] == len(recipe.route.layers) <= 8
