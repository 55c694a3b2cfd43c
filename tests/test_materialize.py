"""In-place materialization on the shipped zoo: determinism, in-place writes, exact export,
and the compatibility checks a user hits before any merge runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import EXAMPLES
from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.merge.materialize import Materializer
from evomerge.recipe import Recipe

PROMPTS = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 2], [4, 8, 15, 16, 23, 42 % 40, 1, 2]])


@pytest.fixture(scope="module")
def materializer(zoo):
    refs = [str(zoo / m) for m in ("base", "expert_rev", "expert_srt", "expert_cae")]
    return Materializer(refs, dtype="bfloat16", device="cpu")


def recipe_for(zoo, method="ties", **params):
    experts = [str(zoo / m) for m in ("expert_rev", "expert_srt", "expert_cae")]
    per_source = {"weight": 0.7, "density": 0.5, **params}
    return Recipe.from_dict({"method": method, "base_model": str(zoo / "base"),
                             "models": [{"model": e, "parameters": per_source} for e in experts], "seed": 3})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model):
    with torch.no_grad():
        return model(PROMPTS).logits


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_same_recipe_gives_bit_identical_weights(materializer, zoo, method):
    recipe = recipe_for(zoo, method)
    first = weights(materializer.apply(recipe))
    materializer.apply(recipe_for(zoo, "ties", density=0.9))  # something else in between: nothing may leak
    second = weights(materializer.apply(recipe))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_random_methods_depend_on_the_seed(materializer, zoo):
    recipe = recipe_for(zoo, "dare_ties")
    first = weights(materializer.apply(recipe))
    recipe.seed += 1
    second = weights(materializer.apply(recipe))
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], second["model.layers.0.mlp.up_proj.weight"])


def test_apply_writes_into_the_same_storage(materializer, zoo):
    model = materializer.candidate
    pointers = {k: p.data_ptr() for k, p in model.named_parameters()}
    assert materializer.apply(recipe_for(zoo, "ties")) is model
    materializer.apply(recipe_for(zoo, "dare_linear"))
    assert pointers == {k: p.data_ptr() for k, p in model.named_parameters()}


def test_single_source_identity_reproduces_that_model(materializer, zoo):
    recipe = Recipe.from_dict({"method": "linear", "models": [{"model": str(zoo / "expert_srt"), "parameters": {"weight": 1.0}}]})
    merged = weights(materializer.apply(recipe))
    stored = load_file(zoo / "expert_srt" / "model.safetensors")
    assert all(torch.equal(merged[k], stored[k]) for k in stored)


def test_layer_groups_select_different_parameters(materializer, zoo):
    # weight 0 on layer groups, 1 on embeddings/norm/head: layers stay the base's, the rest is the expert's.
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base_model": str(zoo / "base"), "layer_granularity": 2,
                               "models": [{"model": str(zoo / "expert_cae"), "parameters": {"weight": [0.0, 0.0, 1.0]}}]})
    merged = weights(materializer.apply(recipe))
    base, expert = load_file(zoo / "base" / "model.safetensors"), load_file(zoo / "expert_cae" / "model.safetensors")
    assert torch.equal(merged["model.layers.3.self_attn.q_proj.weight"], base["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(merged["lm_head.weight"], expert["lm_head.weight"])
    assert torch.equal(merged["model.norm.weight"], expert["model.norm.weight"])


def test_export_reloads_to_the_same_logits(materializer, zoo, tmp_path):
    recipe = recipe_for(zoo, "dare_ties")
    recipe_path = tmp_path / "recipe.yaml"
    recipe.save(recipe_path)
    expected = logits(materializer.apply(recipe))
    assert main(["merge", str(recipe_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    assert torch.equal(logits(reloaded), expected)
    assert Recipe.load(tmp_path / "out" / "recipe.yaml") == recipe
    assert "merge_method: dare_ties" in (tmp_path / "out" / "mergekit.yaml").read_text()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_recipe_merges(path, tmp_path):
    assert main(["merge", str(path), "--out", str(tmp_path / "m"), "--device", "cpu"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.isfinite(logits(model)).all()


def _copy_model(zoo, tmp_path, name="variant"):
    target = tmp_path / name
    shutil.copytree(zoo / "base", target)
    return target


def test_vocab_mismatch_is_refused_with_a_clear_message(zoo, tmp_path):
    variant = _copy_model(zoo, tmp_path)
    tensors = load_file(variant / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], tensors[name][:2]])
    save_file(tensors, variant / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((variant / "config.json").read_text())
    config["vocab_size"] += 2
    (variant / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvomergeError, match="different vocabulary sizes"):
        Materializer([str(zoo / "base"), str(variant)], device="cpu")


def test_different_architecture_is_refused(zoo, tmp_path):
    variant = _copy_model(zoo, tmp_path)
    config = json.loads((variant / "config.json").read_text())
    config["model_type"], config["architectures"] = "mistral", ["MistralForCausalLM"]
    (variant / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvomergeError, match="different architectures"):
        Materializer([str(zoo / "base"), str(variant)], device="cpu")


def test_pickle_weights_need_an_explicit_opt_in(zoo, tmp_path):
    variant = _copy_model(zoo, tmp_path)
    torch.save(load_file(variant / "model.safetensors"), variant / "pytorch_model.bin")
    (variant / "model.safetensors").unlink()
    with pytest.raises(EvomergeError, match="--allow-pickle"):
        Materializer([str(variant)], device="cpu")
    assert Materializer([str(variant)], device="cpu", allow_pickle=True).n_layers > 0


def test_remote_code_needs_an_explicit_opt_in(zoo, tmp_path):
    variant = _copy_model(zoo, tmp_path)
    config = json.loads((variant / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (variant / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvomergeError, match="--trust-remote-code"):
        Materializer([str(variant)], device="cpu")


def test_missing_model_is_a_clear_error():
    with pytest.raises(EvomergeError, match="no such directory"):
        Materializer(["./no/such/model"], device="cpu")
