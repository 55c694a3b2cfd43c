"""Real checkpoint layouts, one tiny random model family at a time (built with transformers,
saved with save_pretrained): merges under the checkpoint's own names equal merges computed
by hand from the safetensors files, per-layer-group values reach every layer, exports reload
in transformers (and evomerge) with equal logits, routes, where the family supports them,
fold exactly and generate the same tokens with and without the KV cache, and an expert with
an added token merges with `tokenizer_source: union`.

The references here know each family's checkpoint naming (`model.layers.N.`, hub GPT-2's
`h.N.`, Gemma 3's `language_model.model.layers.N.`, Mixtral's per-expert `w1/w2/w3`)
independently of evomerge, which reads it from transformers' conversion mapping."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AddedToken, AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig,
                          LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, PretrainedConfig, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

from evomerge.errors import EvomergeError
from evomerge.export import save_checkpoint
from evomerge.merge.materialize import Materializer, merged_tensors
from evomerge.recipe import Recipe, Route, Step
from evomerge.routing_layouts import check_routable
from test_operators import ref_gta, ref_magnitude
from test_routing import scale_by

N_LAYERS = 3
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TEXT = {"vocab_size": 43, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-12, **IDS}
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
PROMPTS = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 11, 4, 30], [1, 8, 15, 16, 23, 2, 33, 6, 10, 9]])


@dataclass(frozen=True)
class Family:
    name: str
    config: Callable[[], PretrainedConfig]
    layer_prefix: str  # how the checkpoint names decoder layer {i}'s tensors
    routable: bool = True
    hub_prefix: str = ""  # saved without this prefix, as hub checkpoints of the family are


FAMILIES = [
    Family("llama3_tied", lambda: LlamaConfig(**TEXT, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE), "model.layers.{}."),
    Family("llama3_untied", lambda: LlamaConfig(**TEXT, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
           "model.layers.{}."),
    Family("mistral", lambda: MistralConfig(**TEXT, sliding_window=4), "model.layers.{}."),
    Family("qwen2", lambda: Qwen2Config(**TEXT, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                        layer_types=LAYER_TYPES), "model.layers.{}."),
    Family("qwen3", lambda: Qwen3Config(**TEXT, head_dim=8), "model.layers.{}."),
    Family("gemma2", lambda: Gemma2Config(**TEXT, head_dim=8, sliding_window=4, layer_types=LAYER_TYPES), "model.layers.{}."),
    Family("gemma3_text", lambda: Gemma3TextConfig(**TEXT, head_dim=8, sliding_window=4, layer_types=LAYER_TYPES),
           "model.layers.{}."),
    Family("gemma3_multimodal", lambda: Gemma3Config(
        text_config={**TEXT, "head_dim": 8, "sliding_window": 4, "layer_types": LAYER_TYPES},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4, boi_token_index=40, eoi_token_index=41, image_token_index=42, **IDS),
        "language_model.model.layers.{}."),
    Family("phi3", lambda: Phi3Config(**TEXT), "model.layers.{}."),
    Family("mixtral", lambda: MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2), "model.layers.{}."),
    Family("qwen3_moe", lambda: Qwen3MoeConfig(**TEXT, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=16), "model.layers.{}."),
    Family("gpt2", lambda: GPT2Config(vocab_size=43, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64, **IDS),
           "h.{}.", routable=False, hub_prefix="transformer."),
    Family("gpt_neox", lambda: GPTNeoXConfig(vocab_size=43, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64, **IDS),
           "gpt_neox.layers.{}.", routable=False),
]
ROUTABLE = [f for f in FAMILIES if f.routable]
_BUILT: dict[str, list[Path]] = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def build(family: Family, folder: Path, zoo: Path) -> list[Path]:
    """base, expert_a, expert_b: a random model and two perturbed copies, float32, with the zoo's tokenizer."""
    if family.name not in _BUILT:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family.config(), dtype=torch.float32)
        paths = []
        for i, name in enumerate(("base", "expert_a", "expert_b")):
            if i:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.05)
            path = folder / family.name / name
            model.save_pretrained(path)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(zoo / "base" / f, path / f)
            paths.append(path)
        if family.hub_prefix:  # the base as the hub ships it: keys without the base-model prefix
            tensors = load_file(paths[0] / "model.safetensors")
            save_file({k.removeprefix(family.hub_prefix): v for k, v in tensors.items()}, paths[0] / "model.safetensors",
                      metadata={"format": "pt"})
        _BUILT[family.name] = paths
    return _BUILT[family.name]


_MATERIALIZERS: dict[str, Materializer] = {}


def materializer(family: Family, folder: Path, zoo: Path) -> Materializer:
    if family.name not in _MATERIALIZERS:
        _MATERIALIZERS[family.name] = Materializer([str(p) for p in build(family, folder, zoo)], dtype="float32", device="cpu")
    return _MATERIALIZERS[family.name]


def files(family: Family, paths: list[Path]) -> list[dict[str, torch.Tensor]]:
    """Each model's tensors straight from its safetensors file, under the base checkpoint's names."""
    out = []
    for path in paths:
        tensors = load_file(path / "model.safetensors")
        out.append({(k.removeprefix(family.hub_prefix) if family.hub_prefix else k): v for k, v in tensors.items()})
    return out


def layer_of(family: Family, name: str) -> int | None:
    return next((i for i in range(N_LAYERS) if name.startswith(family.layer_prefix.format(i))), None)


def logits(model, ids=PROMPTS):
    with torch.no_grad():
        return model(ids).logits.clone()


def greedy(model, cache: bool):
    return model.generate(PROMPTS[:1], max_new_tokens=8, do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_linear_with_per_layer_weights_equals_the_hand_merge_of_the_files(family, folder, zoo):
    paths = build(family, folder, zoo)
    weights = [[0.2, 0.9, 0.5, 0.3], [0.7, 0.1, 0.6, 0.4], [0.1, 0.5, 0.0, 0.8]]  # per group: 3 layers, then the rest
    recipe = Recipe.from_dict({"method": "linear", "layer_granularity": 1, "dtype": "float32",
                               "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]})
    merged = dict(merged_tensors(recipe, materializer(family, folder, zoo).inputs))
    sources = files(family, paths)
    assert set(merged) <= set(sources[0])
    assert {layer_of(family, n) for n in merged} == {0, 1, 2, None}
    for name, tensor in merged.items():
        group = layer_of(family, name)
        w = [ws[N_LAYERS if group is None else group] for ws in weights]
        expected = sum(wi * s[name].double() for wi, s in zip(w, sources)) / sum(w)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_ties_equals_the_reference_on_every_checkpoint_tensor(family, folder, zoo):
    paths = build(family, folder, zoo)
    recipe = ties(paths)
    merged = dict(merged_tensors(recipe, materializer(family, folder, zoo).inputs))
    base, *experts = files(family, paths)
    assert set(merged) == set(base)  # every tensor of the file, under its own name (each MoE expert on its own)
    for name, tensor in merged.items():
        sparse = [ref_magnitude(e[name].double() - base[name].double(), d) for e, d in zip(experts, (0.6, 0.3))]
        expected = ref_gta(base[name], sparse, [0.8, 0.5], consensus=True, normalize=True)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def ties(paths: list[Path]) -> Recipe:
    return Recipe.from_dict({"method": "ties", "base_model": str(paths[0]), "dtype": "float32",
                             "models": [{"model": str(paths[1]), "parameters": {"weight": 0.8, "density": 0.6}},
                                        {"model": str(paths[2]), "parameters": {"weight": 0.5, "density": 0.3}}]})


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_export_reloads_in_transformers_and_evomerge_with_equal_logits(family, folder, zoo, tmp_path):
    paths = build(family, folder, zoo)
    m = materializer(family, folder, zoo)
    recipe = ties(paths)
    expected = logits(m.apply(recipe))
    out = save_checkpoint(m, recipe, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(m.candidate)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(load_file(paths[1] / "model.safetensors"))  # the names transformers saves, experts unfused
    again = Materializer([str(out)], dtype="float32", device="cpu")
    identity = Recipe.from_dict({"method": "linear", "dtype": "float32", "models": [{"model": str(out), "parameters": {"weight": 1.0}}]})
    torch.testing.assert_close(logits(again.apply(identity)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_mergekit_filters_are_the_checkpoints_own_layer_prefixes(family, folder, zoo):
    assert materializer(family, folder, zoo).layer_prefixes() == [family.layer_prefix.format(i) for i in range(N_LAYERS)]


def scaled_route(paths: list[Path]) -> list[tuple[str, int, float]]:
    a, b = str(paths[1]), str(paths[2])
    return [(a, 0, 1.0), (b, 1, 0.7), (a, 1, 1.0), (a, 1, 1.6), (b, 2, 1.0), (a, 2, 1.2)]


def route_recipe(steps, embed_from) -> Recipe:
    return Recipe(method=None, models=[], dtype="float32", route=Route([Step(*s) for s in steps], embed_from))


def hook_scaled_logits(m: Materializer, steps) -> torch.Tensor:
    """Reference: the unscaled route with each step's input multiplied by its scale in a forward pre-hook."""
    model = m.apply(route_recipe([(r, layer, 1.0) for r, layer, _ in steps], steps[0][0]))
    layers = model.get_submodule(m.inputs.layers_path)
    handles = [layer.register_forward_pre_hook(scale_by(s[2]), with_kwargs=True) for layer, s in zip(layers, steps)]
    try:
        return logits(model)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ROUTABLE, ids=lambda f: f.name)
def test_route_folds_exactly_exports_and_generates_alike_with_and_without_cache(family, folder, zoo, tmp_path):
    paths = build(family, folder, zoo)
    m = materializer(family, folder, zoo)
    steps = scaled_route(paths)
    recipe = route_recipe(steps, steps[0][0])
    model = m.apply(recipe)
    expected = logits(model)
    torch.testing.assert_close(expected, hook_scaled_logits(m, steps), rtol=0, atol=1e-4)
    model = m.apply(recipe)
    assert torch.equal(greedy(model, True), greedy(model, False))
    out = save_checkpoint(m, recipe, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = reloaded.config.get_text_config(decoder=True)
    assert text.num_hidden_layers == len(steps)
    source_types = getattr(m.sources[str(paths[1])].config.get_text_config(decoder=True), "layer_types", None)
    if source_types is not None:  # sliding-window or full attention, as each step's source layer has it
        assert text.layer_types == [source_types[layer] for _, layer, _ in steps]
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)
    assert torch.equal(greedy(reloaded, True), greedy(reloaded, False))
    assert torch.equal(greedy(reloaded, True), greedy(m.apply(recipe), True))


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.routable], ids=lambda f: f.name)
def test_families_without_a_routing_layout_are_refused_from_their_config(family, folder, zoo):
    paths = build(family, folder, zoo)
    with pytest.raises(EvomergeError, match="unsupported architecture for layer routing"):
        check_routable(str(paths[0]))
    with pytest.raises(EvomergeError, match="unsupported architecture for layer routing"):
        materializer(family, folder, zoo).apply(route_recipe([(str(paths[1]), 0, 1.0)], str(paths[1])))


@pytest.mark.parametrize("family", ROUTABLE, ids=lambda f: f.name)
def test_routable_families_pass_the_config_check(family, folder, zoo):
    check_routable(str(build(family, folder, zoo)[0]))


def with_added_token(path: Path, target: Path) -> Path:
    """A copy of the model whose tokenizer adds the special token <x>, with a new random row in every
    tensor that has one row per token (embeddings, an untied head)."""
    shutil.copytree(path, target)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([AddedToken("<x>", special=True)])
    tokenizer.save_pretrained(target)
    tensors = load_file(target / "model.safetensors")
    for name, tensor in tensors.items():
        if tensor.shape[0] == 43:
            tensors[name] = torch.cat([tensor, torch.randn((1, *tensor.shape[1:]))])
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config.get("text_config", config)["vocab_size"] = 44
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_union_tokenizer_merges_an_expert_with_an_added_token(family, folder, zoo, tmp_path):
    paths = build(family, folder, zoo)
    extra = with_added_token(paths[1], tmp_path / "extra")
    m = Materializer([str(paths[0]), str(extra)], dtype="float32", device="cpu", tokenizer_source="union")
    recipe = Recipe.from_dict({"method": "linear", "dtype": "float32", "tokenizer_source": "union",
                               "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (paths[0], extra)]})
    merged = dict(merged_tensors(recipe, m.inputs))
    own = {k.removeprefix(family.hub_prefix) if family.hub_prefix else k: v
           for k, v in load_file(extra / "model.safetensors").items()}
    per_token = [name for name, tensor in own.items() if tensor.shape[0] == 44]
    assert per_token and all(torch.equal(merged[name][43], own[name][43]) for name in per_token)
    expected = logits(m.apply(recipe), torch.tensor([[1, 43, 5, 9]]))
    out = save_checkpoint(m, recipe, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(out)("<x>", add_special_tokens=False)["input_ids"] == [43]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, torch.tensor([[1, 43, 5, 9]])), expected, rtol=0, atol=1e-5)
