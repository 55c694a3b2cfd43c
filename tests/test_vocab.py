"""tokenizer_source (base | union | a model) and chat_template, as mergekit means them: experts
with tokens the base lacks merge; each added token's rows come from the model that has it;
the merged tokenizer encodes every expert's special tokens; the export carries the chosen
tokenizer's generation settings and the chosen chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import EvomergeError
from evomerge.export import save_checkpoint
from evomerge.merge.materialize import Materializer, merged_tensors
from evomerge.recipe import Recipe

ROWS = ("model.embed_tokens.weight", "lm_head.weight")
TEMPLATE_A = "{% for m in messages %}A:{{ m['content'] }}{% endfor %}"
GENERATION_A = {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "do_sample": True, "temperature": 0.7,
                "top_p": 0.9}


def with_tokens(zoo: Path, source: str, target: Path, tokens: list[str], seed: int) -> Path:
    """A zoo expert whose tokenizer has `tokens` added as special tokens, with one new random row each."""
    shutil.copytree(zoo / source, target)
    tokenizer = AutoTokenizer.from_pretrained(zoo / source)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in tokens])
    tokenizer.save_pretrained(target)
    tensors = load_file(target / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in ROWS:
        new = torch.randn((len(tokens), tensors[name].shape[1]), generator=generator).to(tensors[name].dtype)
        tensors[name] = torch.cat([tensors[name], new])
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["vocab_size"] = len(tokenizer)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory, zoo) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("vocab")
    a = with_tokens(zoo, "expert_rev", folder / "a", ["<a>", "<both>"], seed=1)
    b = with_tokens(zoo, "expert_srt", folder / "b", ["<both>", "<b>"], seed=2)
    tokenizer = AutoTokenizer.from_pretrained(a)
    tokenizer.chat_template = TEMPLATE_A
    tokenizer.save_pretrained(a)
    (a / "generation_config.json").write_text(json.dumps(GENERATION_A))
    return {"base": str(zoo / "base"), "a": str(a), "b": str(b)}


def recipe(models: dict[str, str], **extra) -> Recipe:
    return Recipe.from_dict({"method": "task_arithmetic", "base_model": models["base"], "dtype": "float32",
                             "models": [{"model": models["a"], "parameters": {"weight": 0.6}},
                                        {"model": models["b"], "parameters": {"weight": 0.3}}], **extra})


@pytest.fixture(scope="module")
def union(models) -> Materializer:
    return Materializer([models["base"], models["a"], models["b"]], dtype="float32", device="cpu", tokenizer_source="union")


def rows(path: str) -> dict[str, torch.Tensor]:
    tensors = load_file(Path(path) / "model.safetensors")
    return {n: tensors[n].float() for n in ROWS}


def test_without_a_tokenizer_source_other_vocabularies_are_refused_with_the_way_out(models):
    with pytest.raises(EvomergeError, match=r"different vocabulary sizes \(43 vs 45 rows.*set tokenizer_source"):
        Materializer([models["base"], models["a"]], device="cpu")


def test_union_takes_each_added_tokens_rows_from_the_model_that_has_it(models, union):
    merged = dict(merged_tensors(recipe(models, tokenizer_source="union"), union.inputs))
    base, a, b = rows(models["base"]), rows(models["a"]), rows(models["b"])
    assert union.tokenizer.convert_ids_to_tokens([43, 44, 45]) == ["<a>", "<both>", "<b>"]
    assert union.config.vocab_size == 46
    for name in ROWS:
        assert merged[name].shape[0] == 46
        assert torch.equal(merged[name][43], a[name][43])  # only a has <a>
        assert torch.equal(merged[name][45], b[name][44])  # only b has <b>
        shared = ((a[name][44] + b[name][43]) / 2).bfloat16().float()  # both have <both>, the base not: its row is their mean
        expected = shared + 0.6 * (a[name][44] - shared) + 0.3 * (b[name][43] - shared)
        torch.testing.assert_close(merged[name][44], expected)
        expected = base[name][:43] + 0.6 * (a[name][:43] - base[name][:43]) + 0.3 * (b[name][:43] - base[name][:43])
        torch.testing.assert_close(merged[name][:43], expected)


def test_union_tokenizer_encodes_every_experts_special_tokens_and_the_export_reloads(models, union, tmp_path):
    r = recipe(models, tokenizer_source="union")
    expected = union.apply(r)(torch.tensor([[1, 43, 5, 45, 44]])).logits
    out = save_checkpoint(union, r, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("<a><b><both>", add_special_tokens=False)["input_ids"] == [43, 45, 44]
    assert tokenizer("ab<a>c", add_special_tokens=False)["input_ids"] == tokenizer("ab", add_special_tokens=False)["input_ids"] + \
        [43] + tokenizer("c", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([43, 45, 44], skip_special_tokens=True) == ""
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(reloaded(torch.tensor([[1, 43, 5, 45, 44]])).logits, expected, rtol=0, atol=1e-5)
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["tokenizer_source"] == "union"


def test_a_model_as_tokenizer_source_gives_its_vocabulary_ids_and_generation_settings(models, tmp_path):
    m = Materializer([models["base"], models["a"], models["b"]], dtype="float32", device="cpu", tokenizer_source=models["a"])
    r = recipe(models, tokenizer_source=models["a"])
    merged = dict(merged_tensors(r, m.inputs))
    a = rows(models["a"])
    for name in ROWS:
        assert merged[name].shape[0] == 45 and torch.equal(merged[name][43], a[name][43])
    m.apply(r)
    out = save_checkpoint(m, r, tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text()) == GENERATION_A
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE_A  # the tokenizer's own template


def test_base_as_tokenizer_source_over_one_shared_vocabulary_changes_nothing(zoo):
    refs = [str(zoo / m) for m in ("base", "expert_rev", "expert_srt")]
    data = {"method": "ties", "base_model": refs[0], "dtype": "float32",
            "models": [{"model": r, "parameters": {"weight": 0.7, "density": 0.5}} for r in refs[1:]]}
    plain = dict(merged_tensors(Recipe.from_dict(data), Materializer(refs, dtype="float32", device="cpu").inputs))
    based = Materializer(refs, dtype="float32", device="cpu", tokenizer_source="base").inputs
    assert all(torch.equal(t, plain[n]) for n, t in merged_tensors(Recipe.from_dict({**data, "tokenizer_source": "base"}), based))


def test_export_keeps_the_bases_generation_config_byte_for_byte_and_a_chosen_chat_template(models, zoo, tmp_path):
    refs = [str(zoo / m) for m in ("base", "expert_rev")]
    data = {"method": "linear", "dtype": "float32",
            "models": [{"model": refs[0], "parameters": {"weight": 0.5}}, {"model": refs[1], "parameters": {"weight": 0.5}}]}
    with pytest.raises(EvomergeError, match="chat_template must name a model of this recipe"):
        Recipe.from_dict({**data, "chat_template": models["a"]})  # a is not one of this recipe's models
    r = Recipe.from_dict({**data, "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    m = Materializer.for_recipe(r, device="cpu")
    m.apply(r)
    out = save_checkpoint(m, r, tmp_path / "out")
    assert (out / "generation_config.json").read_bytes() == (zoo / "base" / "generation_config.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out).chat_template == r.chat_template
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["chat_template"] == r.chat_template


def test_chat_template_from_a_model_of_the_recipe(models, union, tmp_path):
    r = recipe(models, tokenizer_source="union", chat_template=models["a"])
    union.apply(r)
    out = save_checkpoint(union, r, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE_A
    assert (out / "generation_config.json").read_bytes() == (Path(models["base"]) / "generation_config.json").read_bytes()
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["chat_template"] == TEMPLATE_A


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer_source": "nope"}, "tokenizer_source must be base, union or a model of this recipe"),
    ({"chat_template": "chatml"}, "chat_template must name a model of this recipe or be a Jinja template"),
])
def test_bad_tokenizer_keys_name_the_problem(models, extra, message):
    with pytest.raises(EvomergeError, match=message):
        recipe(models, **extra)


def test_a_recipe_with_another_tokenizer_source_than_loaded_is_refused(models, union):
    with pytest.raises(EvomergeError, match="loaded with 'union'"):
        union.apply(recipe(models, tokenizer_source="base"))
