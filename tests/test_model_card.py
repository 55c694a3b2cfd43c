"""The model card beside every merged checkpoint: it loads with huggingface_hub's ModelCard
(offline), its metadata is the Hub's merge metadata, and for an exported trial its table holds
the study's own scores (search fitness and held-out spec, sources and merge). A merge of adapters
written as one PEFT adapter (`--adapter`) gets a card with PEFT's adapter metadata and the same
evidence. Also: sources that ship no tokenizer still give weights, config and card, with one line
saying so."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file
from transformers import Gemma3Config, LlamaConfig, LlamaForCausalLM

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.model_card import MERGED_ROW, pipeline_tag
from evomerge.search.attrs import HELD_OUT, SOURCES
from reliability.harness import write_config


def table(card: ModelCard) -> dict[str, dict[str, float | None]]:
    """The search section's table: row label -> {column: value}."""
    lines = [line for line in card.text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`*")] = {h: None if c == "-" else float(c) for h, c in zip(header[1:], cells[1:])}
    return rows


def assert_the_studys_record(card: ModelCard, study: optuna.Study, number: int, held_out: tuple[str, ...] = ()) -> None:
    """The card's search table holds the study's own scores, of trial `number` and of every source, on the search
    fitness and on each `held_out` spec; its recipe is the trial's."""
    trial, sources = study.trials[number], study.user_attrs[SOURCES]
    expected = {"fitness": (trial.user_attrs["objectives"], {ref: s["objectives"] for ref, s in sources.items()})}
    for spec in held_out:
        held = study.user_attrs[f"{HELD_OUT}sources/{spec}"]
        expected[spec] = (study.user_attrs[f"{HELD_OUT}{number}/{spec}"]["objectives"],
                          {ref: s["objectives"] for ref, s in held.items()})
    rows = table(card)
    merged = rows.pop(f"{MERGED_ROW} (trial {number})")
    assert set(rows) == set(sources)
    assert set(merged) == {f"{spec}: {o}" for spec, (scores, _) in expected.items() for o in scores}
    for column, value in merged.items():
        spec, objective = column.split(": ")
        assert value == pytest.approx(expected[spec][0][objective], rel=1e-5)
        for ref, row in rows.items():
            assert row[column] == pytest.approx(expected[spec][1][ref][objective], rel=1e-5)
    recipe = json.loads(trial.user_attrs["recipe"])
    assert yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0]) == recipe


def test_exported_card_loads_with_hub_metadata_and_the_studys_scores(tmp_path, zoo, capsys):
    path = write_config(tmp_path, zoo, n_trials=2)
    held_out = tmp_path / "zoo_test.yaml"
    held_out.write_text(yaml.safe_dump({"kind": "zoo_skills", "n_examples": 16, "split": "test",
                                        "objectives": [{"name": s, "metric": s} for s in ("rev", "srt", "cae")],
                                        "scalarization": {"rev": 1.0, "srt": 1.0, "cae": 1.0}}))
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["evaluate", str(path), "--fitness", str(held_out), "--trials", "1"]) == 0
    assert main(["export", str(path), "--trial", "1", "--out", str(tmp_path / "best")]) == 0

    card = ModelCard.load(tmp_path / "best" / "README.md")
    data = card.data.to_dict()
    ModelCardData(**data)  # the metadata validates as huggingface_hub's own model-card data
    config = load_config(path)
    assert data["base_model"] == [config.base_model, *config.models]
    assert data["base_model_relation"] == "merge" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["merge", "evomerge"]  # dare_ties: mergekit's masks differ, so it does not reproduce it
    assert "license" not in data  # the zoo's models declare none

    study = optuna.load_study(study_name=config.study_name, storage=config.storage)
    assert_the_studys_record(card, study, 1, held_out=("zoo_test",))
    assert f"Trial 1 of study `{config.study_name}` (sampler cmaes, seed 0, 2 completed trials)" in card.text
    assert "No mergekit equivalent" not in card.text and "merge_method: dare_ties" in card.text


def tiny_llama(folder, seed: int, license: str | None = None) -> str:
    """A random tiny LLaMA saved as a training checkpoint often is: weights and config, no tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=50)
    LlamaForCausalLM(config).save_pretrained(folder)
    if license:
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n# a model\n")
    return str(folder)


def test_sources_without_a_tokenizer_give_weights_config_and_card_and_one_line(tmp_path, capfd):
    a, b = tiny_llama(tmp_path / "a", 0, "apache-2.0"), tiny_llama(tmp_path / "b", 1, "apache-2.0")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "linear", "dtype": "float32",
                                      "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                 {"model": b, "parameters": {"weight": 3.0}}]}))
    capfd.readouterr()
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    out = capfd.readouterr().out.splitlines()
    assert [line for line in out if "tokenizer" in line] == [
        f"note: model {a!r} ships no tokenizer files: weights and config written, no tokenizer"]
    merged, wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "a", "b"))
    assert set(merged) == set(wa)
    for name, tensor in merged.items():  # the weighted mean (to float32 rounding: the kernel fuses multiply-adds)
        torch.testing.assert_close(tensor, (wa[name] * 1.0 + wb[name] * 3.0) / 4.0, rtol=1e-6, atol=1e-9)
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "tokenizer_config.json").exists()
    data = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()
    assert data["license"] == "apache-2.0" and data["base_model"] == [a, b] and "mergekit" in data["tags"]


def test_license_only_when_every_source_declares_the_same(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0, "apache-2.0"), tiny_llama(tmp_path / "b", 1, "mit")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                                     {"model": b, "parameters": {"weight": 1.0}}]}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert "license" not in ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()


def test_pipeline_tag_follows_the_architecture():
    assert pipeline_tag(LlamaConfig(architectures=["LlamaForCausalLM"])) == "text-generation"
    assert pipeline_tag(Gemma3Config(architectures=["Gemma3ForConditionalGeneration"])) == "image-text-to-text"
    assert pipeline_tag(LlamaConfig()) is None


# ---- the card of the merge written as one PEFT adapter (`--adapter DIR`) ------------------------------------

def adapter_metadata(folder, base: str) -> dict:
    """The adapter card's metadata, checked to be PEFT's card metadata for a LoRA adapter of `base`."""
    data = ModelCard.load(folder / "README.md").data.to_dict()
    ModelCardData(**data)  # validates as huggingface_hub's own model-card data
    assert data["base_model"] == base and data["base_model_relation"] == "adapter" and data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["merge", "evomerge", "lora", "transformers", f"base_model:adapter:{base}"]
    return data


def test_exported_adapter_card_has_peft_metadata_and_the_studys_scores(tmp_path, zoo):
    adapters = [str(zoo / f"lora_{s}") for s in ("rev", "srt", "cae")]
    path = write_config(tmp_path, zoo, n_trials=2, models=adapters, search_space="search_spaces/lorahub.yaml")
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["export", str(path), "--trial", "1", "--out", str(tmp_path / "best"), "--adapter",
                 str(tmp_path / "best-adapter")]) == 0

    base = json.loads((zoo / "lora_rev" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert "license" not in adapter_metadata(tmp_path / "best-adapter", base)  # the zoo's adapters declare none
    card = ModelCard.load(tmp_path / "best-adapter" / "README.md")
    config = load_config(path)
    assert_the_studys_record(card, optuna.load_study(study_name=config.study_name, storage=config.storage), 1)
    assert f"Trial 1 of study `{config.study_name}` (sampler cmaes, seed 0, 2 completed trials)" in card.text
    assert f"This is a LoRA adapter of `{base}`" in card.text
    assert all(f"- `{ref}`" in card.text for ref in adapters)
    assert f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), 'best-adapter')" in card.text
    assert "mergekit" not in card.text  # mergekit's config builds the full checkpoint, not the adapter


@pytest.mark.parametrize("licenses, expected", [(("mit", "mit"), "mit"), (("mit", "apache-2.0"), None),
                                                (("mit", None), None)])
def test_adapter_card_license_only_when_every_adapter_declares_the_same(tmp_path, zoo, licenses, expected):
    models = []
    for skill, license in zip(("rev", "srt"), licenses):
        shutil.copytree(zoo / f"lora_{skill}", tmp_path / skill)  # names its base relative to the repo root
        if license:
            (tmp_path / skill / "README.md").write_text(f"---\nlicense: {license}\n---\n# an adapter\n")
        models.append({"model": str(tmp_path / skill), "parameters": {"weight": 0.5}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"method": "lora_linear", "dtype": "float32", "models": models}))
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "full"), "--adapter",
                 str(tmp_path / "adapter")]) == 0
    base = json.loads((zoo / "lora_rev" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert adapter_metadata(tmp_path / "adapter", base).get("license") == expected
    assert "## Search" not in (tmp_path / "adapter" / "README.md").read_text()  # a plain merge: no study
