"""The shipped zoo: ordinary HF checkpoints, each expert best at its own skill, scored the
same by the fast teacher-forced metric as by real generation, and reproducible from source.

The full rebuild takes minutes, so it only runs with EVOMERGE_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge import zoo

SLOW = os.environ.get("EVOMERGE_SLOW_TESTS") == "1"
EVAL_N = 200  # held-out prompts per skill: plenty, since the margins are ~0.4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Evaluate on one thread: these tiny matmuls gain nothing from more, and on a busy host
    (parallel test runs) OpenMP spin-waits make two threads up to 100x slower. The build
    pins its own thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(zoo.ZOO_DIR / "base")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {
        name: AutoModelForCausalLM.from_pretrained(zoo.ZOO_DIR / name, dtype=torch.float32).eval()
        for name in zoo.ZOO_MODELS
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_shipped_zoo_is_small_bf16_llama_safetensors():
    total = 0
    for name in zoo.ZOO_MODELS:
        config = json.loads((zoo.ZOO_DIR / name / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["dtype"] == "bfloat16"
        assert {t.dtype for t in _tensors(zoo.ZOO_DIR / name).values()} == {torch.bfloat16}
        total += sum(f.stat().st_size for f in (zoo.ZOO_DIR / name).iterdir())
    assert total < 10 * 2**20


def test_tokenizer_round_trips_one_token_per_character(tokenizer):
    text = "rev:the quick brown fox=xof nworb kciuq eht"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # no BOS/EOS added: prompt + answer tokenizes as trained
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert tokenizer.get_vocab() == zoo.build_tokenizer().get_vocab()


def test_make_examples_is_pinned_and_correct():
    examples = zoo.make_examples("cae", 100, seed=7, min_len=3, max_len=8)
    assert examples == zoo.make_examples("cae", 100, seed=7, min_len=3, max_len=8)
    assert examples != zoo.make_examples("cae", 100, seed=8, min_len=3, max_len=8)
    # Pinned, so a change in data generation (which would silently move every score) fails here.
    pinned = [("rev:pyplrzxu=", "uxzrlpyp"), ("rev:raq=", "qar")]
    assert zoo.make_examples("rev", 2, seed=0) == pinned
    for prompt, answer in examples:
        word = prompt.removeprefix("cae:").removesuffix("=")
        assert 3 <= len(word) <= 8
        assert answer == "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)
    for prompt, answer in zoo.make_examples("srt", 20, seed=0):
        assert answer == "".join(sorted(prompt[4:-1]))


def test_evaluation_prompts_are_never_trained_on():
    evaluated = {p for s in zoo.SKILLS for p, _ in zoo.make_examples(s, 500, zoo.EVAL_SEED)}
    mixture = zoo._expert_mixture("rev")
    trained = {p for p, _ in zoo._sample_batch(mixture, random.Random(0), 5000)}
    assert {p[:4] for p in trained} == {"rev:", "srt:", "cae:", "cpy:"}
    assert not evaluated & trained


def test_each_expert_is_clearly_best_at_its_own_skill(models, tokenizer):
    splits = {s: zoo.make_examples(s, EVAL_N, zoo.EVAL_SEED) for s in zoo.SKILLS}
    scores = {
        name: {s: zoo.exact_match(model, tokenizer, splits[s]) for s in zoo.SKILLS}
        for name, model in models.items()
    }
    for skill in zoo.SKILLS:
        own = scores[f"expert_{skill}"][skill]
        runner_up = max(scores[m][skill] for m in zoo.ZOO_MODELS if m != f"expert_{skill}")
        assert own >= 0.85 and own - runner_up >= 0.25, (skill, scores)
    # The base half-knows every skill, leaving room for a merge to beat each expert.
    assert all(0.3 <= scores["base"][s] <= 0.7 for s in zoo.SKILLS), scores


def test_exact_match_agrees_with_greedy_generate(models, tokenizer):
    model = models["base"]  # about half right, so both outcomes get compared
    examples = [ex for s in zoo.SKILLS for ex in zoo.make_examples(s, 6, seed=3)]
    generated = []
    for prompt, answer in examples:
        target = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(prompt_ids, max_new_tokens=len(target), do_sample=False)
        generated.append(out[0, prompt_ids.shape[1] :].tolist() == target)
    single = [zoo.exact_match(model, tokenizer, [ex]) == 1.0 for ex in examples]
    assert single == generated
    assert 0 < sum(generated) < len(generated)
    batched = zoo.exact_match(model, tokenizer, examples, batch_size=7)
    assert batched == pytest.approx(sum(generated) / len(generated))


def test_reduced_build_is_bit_identical_and_restores_threads(tmp_path):
    threads = torch.get_num_threads()
    first = zoo.build_zoo(tmp_path / "a", steps_scale=0.005, log=None)
    second = zoo.build_zoo(tmp_path / "b", steps_scale=0.005, log=None)
    assert torch.get_num_threads() == threads
    assert list(first) == [*zoo.ZOO_MODELS, *zoo.LORA_MODELS]
    for name in zoo.ZOO_MODELS:
        assert (first[name] / "model.safetensors").read_bytes() == (
            second[name] / "model.safetensors"
        ).read_bytes()
    for name in zoo.LORA_MODELS:
        a, b = (json.loads((built[name] / "adapter_config.json").read_text()) for built in (first, second))
        assert a.pop("base_model_name_or_path") == str(first["base"].resolve())  # outside the repo: absolute
        assert b.pop("base_model_name_or_path") == str(second["base"].resolve())
        assert a == b
        assert (first[name] / "adapter_model.safetensors").read_bytes() == (
            second[name] / "adapter_model.safetensors"
        ).read_bytes()
    assert (first["base"] / "model.safetensors").read_bytes() != (
        first["expert_rev"] / "model.safetensors"
    ).read_bytes()


@pytest.mark.skipif(not SLOW, reason="full zoo build takes minutes; set EVOMERGE_SLOW_TESTS=1")
def test_full_build_reproduces_shipped_zoo(tmp_path):
    built = zoo.build_zoo(tmp_path, log=None)
    for name in zoo.ZOO_MODELS:
        shipped, rebuilt = _tensors(zoo.ZOO_DIR / name), _tensors(built[name])
        assert shipped.keys() == rebuilt.keys()
        assert all(torch.equal(shipped[k], rebuilt[k]) for k in shipped), name
    for name in zoo.LORA_MODELS:  # the factors; adapter_config.json names the --out base, not the shipped one
        shipped = load_file(zoo.ZOO_DIR / name / "adapter_model.safetensors")
        rebuilt = load_file(built[name] / "adapter_model.safetensors")
        assert shipped.keys() == rebuilt.keys()
        assert all(torch.equal(shipped[k], rebuilt[k]) for k in shipped), name


def test_shipped_lora_adapters_are_small_peft_adapters_that_peft_loads():
    peft = pytest.importorskip("peft")
    base = zoo.ZOO_DIR / "base"
    for name in zoo.LORA_MODELS:
        path = zoo.ZOO_DIR / name
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "evomerge/zoo_models/base" and config["r"] == zoo.LORA_RANK
        factors = load_file(path / "adapter_model.safetensors")
        assert {t.dtype for t in factors.values()} == {torch.float32}
        assert (path / "adapter_model.safetensors").stat().st_size < 400 * 2**10
        model = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path)
        merged = model.merge_and_unload().state_dict()
        ours = zoo.load_zoo_model(path).state_dict()
        assert all(torch.equal(merged[k], ours[k]) for k in merged), name


def test_each_lora_adapter_is_clearly_best_at_its_own_skill(tokenizer):
    splits = {s: zoo.make_examples(s, EVAL_N, zoo.EVAL_SEED) for s in zoo.SKILLS}
    names = ["base", *zoo.LORA_MODELS]
    scores = {n: {s: zoo.exact_match(zoo.load_zoo_model(zoo.ZOO_DIR / n), tokenizer, splits[s]) for s in zoo.SKILLS}
              for n in names}
    for skill in zoo.SKILLS:
        own = scores[f"lora_{skill}"][skill]
        runner_up = max(scores[n][skill] for n in names if n != f"lora_{skill}")
        assert own >= 0.8 and own - runner_up >= 0.2, (skill, scores)


@pytest.mark.skipif(not SLOW, reason="retraining the adapters takes minutes; set EVOMERGE_SLOW_TESTS=1")
def test_lora_stage_reproduces_shipped_adapters_from_shipped_base(tmp_path):
    """build_zoo's last stage on the shipped base (the float32 model it trains from is the shipped bf16
    values), checked on its own, since the adapters can only match if the rebuilt base does."""
    shutil.copytree(zoo.ZOO_DIR / "base", tmp_path / "base")
    base = zoo._init_model(zoo.build_tokenizer())
    base.load_state_dict({k: v.float() for k, v in _tensors(tmp_path / "base").items()}, strict=False)
    with zoo._pinned_threads(zoo.LORA_THREADS):
        built = zoo.build_lora_adapters(base.eval(), tmp_path / "base")
    for name in zoo.LORA_MODELS:
        shipped = load_file(zoo.ZOO_DIR / name / "adapter_model.safetensors")
        rebuilt = load_file(built[name] / "adapter_model.safetensors")
        assert shipped.keys() == rebuilt.keys()
        assert all(torch.equal(shipped[k], rebuilt[k]) for k in shipped), name
