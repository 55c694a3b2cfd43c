"""Streamed one-shot merges (evomerge.merge.stream) against today's resident path: the checkpoint a
streamed merge writes holds, tensor for tensor and bit for bit, what `save_pretrained` of the
resident Materializer's candidate holds (every example recipe, per-group values, seeded DARE/DELLA
masks, MoE experts, hub GPT-2 names, a multimodal layout, a union vocabulary with a chat template),
and its config, tokenizer and recipe files are the same bytes. A merge of three sources peaks far
below their size (measured in a child process), and a search refuses, in one line and before any
model loads, sources that do not fit in memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from evomerge import models
from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.export import save_checkpoint
from evomerge.merge.materialize import Materializer
from evomerge.merge.stream import stream_merge
from evomerge.models import MEMORY_ENV, memory_line
from evomerge.recipe import Recipe
from conftest import EXAMPLES, REPO
from reliability.harness import write_config
from test_families import FAMILIES, build
from test_vocab import with_tokens

SAME_BYTES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "recipe.yaml",
              "mergekit.yaml", "chat_template.jinja")
SMALL_SHARDS = 300_000  # bytes: the zoo's 1.7 MB become several shards and an index


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: its one file, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def assert_same_checkpoint(resident: Path, streamed: Path) -> None:
    expected, actual = checkpoint(resident), checkpoint(streamed)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    for name in SAME_BYTES:
        assert (resident / name).is_file() == (streamed / name).is_file(), name
        if (resident / name).is_file():
            assert (resident / name).read_bytes() == (streamed / name).read_bytes(), name


def both(recipe: Recipe, folder: Path, allow_pickle: bool = False, **streaming) -> tuple[Path, Path]:
    """The recipe saved from the resident candidate (today's path) and streamed."""
    materializer = Materializer.for_recipe(recipe, device="cpu", allow_pickle=allow_pickle)
    materializer.apply(recipe)
    resident = save_checkpoint(materializer, recipe, folder / "resident")
    return resident, stream_merge(recipe, folder / "streamed", device="cpu", allow_pickle=allow_pickle, **streaming)


ROUTE_FREE = [p for p in EXAMPLES if "route" not in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", ROUTE_FREE, ids=lambda p: p.stem)
def test_every_example_recipe_streams_to_the_resident_merges_bits(path, tmp_path):
    resident, streamed = both(Recipe.load(path), tmp_path, max_shard_size=SMALL_SHARDS)
    assert_same_checkpoint(resident, streamed)


@pytest.mark.parametrize("method, params, options", [
    ("dare_ties", {"weight": [1.0, 0.5, 0.8], "density": [0.3, 0.9, 0.6]}, {"normalize": [True, False, True]}),
    ("della", {"weight": [0.7, 1.2, 1.0], "density": [0.4, 0.6, 0.5], "epsilon": 0.1}, {"lambda": [1.0, 0.8, 1.1]}),
    ("breadcrumbs_ties", {"weight": 1.0, "density": [0.8, 0.6, 0.9], "gamma": 0.05}, {}),
])
def test_per_group_values_and_seeded_masks_stream_to_the_same_bits(method, params, options, zoo, tmp_path):
    recipe = Recipe.from_dict({"method": method, "base_model": str(zoo / "base"), "layer_granularity": 2, "seed": 11,
                               "dtype": "bfloat16", "parameters": options,
                               "models": [{"model": str(zoo / f"expert_{s}"), "parameters": params} for s in ("rev", "srt")]})
    assert_same_checkpoint(*both(recipe, tmp_path))


STREAMED_FAMILIES = [f for f in FAMILIES if f.name in ("llama3_tied", "gemma3_multimodal", "mixtral", "qwen3_moe", "gpt2")]


@pytest.mark.parametrize("family", STREAMED_FAMILIES, ids=lambda f: f.name)
def test_checkpoint_layouts_stream_to_the_same_names_and_bits(family, zoo, tmp_path):
    """MoE experts (merged one by one, converted and reverted by transformers), tied embeddings, a
    hub GPT-2 base without the `transformer.` prefix, a multimodal checkpoint's vision tower."""
    base, a, b = (str(p) for p in build(family, tmp_path / "models", zoo))
    recipe = Recipe.from_dict({"method": "dare_ties", "base_model": base, "layer_granularity": 1, "seed": 3,
                               "dtype": "bfloat16", "models": [{"model": m, "parameters": {"weight": 0.9, "density": 0.5}}
                                                               for m in (a, b)]})
    resident, streamed = both(recipe, tmp_path, max_shard_size=20_000)
    assert_same_checkpoint(resident, streamed)
    reloaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.bfloat16)  # shards and index as transformers reads them
    expected = AutoModelForCausalLM.from_pretrained(resident, dtype=torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(reloaded.state_dict().values(), expected.state_dict().values()))


def test_a_union_vocabulary_and_a_chat_template_stream_to_the_same_bits(zoo, tmp_path):
    """New tokens' embedding and head rows are filled across sources when the tensor is read."""
    a = with_tokens(zoo, "expert_rev", tmp_path / "a", ["<a>", "<both>"], seed=1)
    b = with_tokens(zoo, "expert_srt", tmp_path / "b", ["<both>", "<b>"], seed=2)
    recipe = Recipe.from_dict({"method": "ties", "base_model": str(zoo / "base"), "dtype": "float32",
                               "tokenizer_source": "union", "chat_template": "{{ messages[0]['content'] }}",
                               "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": 0.5}} for m in (a, b)]})
    resident, streamed = both(recipe, tmp_path)
    assert_same_checkpoint(resident, streamed)
    assert checkpoint(streamed)["model.embed_tokens.weight"].shape[0] == 46


def test_a_pickle_source_is_loaded_among_streamed_ones_and_merges_to_the_same_bits(zoo, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(zoo / "expert_srt", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    recipe = Recipe.from_dict({"method": "ties", "base_model": str(zoo / "base"), "tokenizer_source": "base",
                               "models": [{"model": str(m), "parameters": {"weight": 0.8, "density": 0.4}}
                                          for m in (zoo / "expert_rev", pickled)]})
    assert_same_checkpoint(*both(recipe, tmp_path, allow_pickle=True))


def test_a_route_is_refused_by_the_streamer_and_merged_resident_by_the_cli(zoo, tmp_path):
    route = next(p for p in EXAMPLES if "route" in yaml.safe_load(p.read_text()))
    with pytest.raises(EvomergeError, match="resident Materializer"):
        stream_merge(Recipe.load(route), tmp_path / "x")
    assert main(["merge", str(route), "--out", str(tmp_path / "routed"), "--device", "cpu"]) == 0
    assert (tmp_path / "routed" / "model.safetensors").is_file()


# ------------------------------------------------------------------ peak memory of `evomerge merge`

PEAK_RSS = """import resource, subprocess, sys
done = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", *sys.argv[1:]], capture_output=True, text=True)
assert done.returncode == 0, done.stderr
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"""


def peak_rss(recipe: Path, out: Path) -> int:
    """Peak resident bytes of `evomerge merge` in a process of its own (the only child of a fresh parent)."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(recipe), "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def random_llama(folder: Path, zoo: Path) -> list[Path]:
    """Three 90 MB float32 sources of a random LLaMA (a base and two perturbed copies), with the zoo's tokenizer.
    Many layers, no tensor over 2% of the model: a merge's working memory scales with its largest tensor."""
    config = LlamaConfig(vocab_size=2000, hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
                         num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = []
    for i in range(3):
        path = folder / f"m{i}"
        path.mkdir(parents=True)
        config.save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(zoo / "base" / name, path / name)
        save_file({k: v + 0.01 * i * torch.randn_like(v) for k, v in tensors.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
        paths.append(path)
    return paths


def test_a_streamed_merge_peaks_far_below_its_sources(zoo, tmp_path):
    """Peak RSS above that of the same command on the tiny zoo (interpreter, torch, transformers, the
    merge code) stays under a third of the three sources' bytes; resident, it would be all of them."""
    paths = random_llama(tmp_path, zoo)
    total = sum((p / "model.safetensors").stat().st_size for p in paths)
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(yaml.safe_dump({"method": "linear", "dtype": "float32",
                                      "models": [{"model": str(p), "parameters": {"weight": 1 / 3}} for p in paths]}))
    baseline = peak_rss(REPO / "runs" / "examples" / "zoo_linear.yaml", tmp_path / "zoo_out")
    peak = peak_rss(recipe, tmp_path / "out")
    print(f"sources {total / 1e6:.0f} MB, peak RSS {peak / 1e6:.0f} MB, zoo baseline {baseline / 1e6:.0f} MB")
    assert peak - baseline < total / 3
    assert checkpoint(tmp_path / "out").keys() == load_file(paths[0] / "model.safetensors").keys()


# ------------------------------------------------------------------ a search's sources must fit

def zoo_bytes(zoo: Path, dtype_size: int) -> int:
    """What the four zoo models take loaded, plus one candidate of `dtype_size`-byte elements (from the files)."""
    tensors = [load_file(zoo / m / "model.safetensors") for m in ("base", "expert_rev", "expert_srt", "expert_cae")]
    stored = sum(t.numel() * t.element_size() for ts in tensors for t in ts.values())
    return stored + sum(t.numel() for t in tensors[0].values()) * dtype_size


def test_memory_line_says_what_the_sources_take_and_refuses_past_what_is_available(zoo, monkeypatch):
    refs = [str(zoo / m) for m in ("base", "expert_rev", "expert_srt", "expert_cae")]
    needed = zoo_bytes(zoo, 4)
    line = memory_line(refs, torch.device("cpu"), torch.float32)
    assert "4 source models take" in line and f"{needed} bytes needed" in line
    assert int(line.split(", ")[-1].split()[0]) > needed  # this machine's MemAvailable, far more than the zoo
    monkeypatch.setenv(MEMORY_ENV, str(needed - 1))
    with pytest.raises(EvomergeError, match=f"{needed} bytes needed, {needed - 1} bytes available; a search cannot"):
        memory_line(refs, torch.device("cpu"), torch.float32)
    monkeypatch.setenv(MEMORY_ENV, str(needed))
    assert memory_line(refs, torch.device("cpu"), torch.float32).endswith(f"{needed} bytes available")


def test_a_search_whose_sources_do_not_fit_is_refused_in_one_line_before_they_load(zoo, tmp_path, monkeypatch, capfd):
    config = write_config(tmp_path, zoo, n_trials=1)  # float32 on the CPU
    monkeypatch.setenv(MEMORY_ENV, "1000000")

    def loaded(*args, **kwargs):
        raise AssertionError("a source was loaded before the memory check")

    monkeypatch.setattr(models, "load_tensors", loaded)
    capfd.readouterr()
    assert main(["run", str(config), "--quiet"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evomerge: error: 4 source models take"), err
    assert f"{zoo_bytes(zoo, 4)} bytes needed, 1000000 bytes available" in err[0]
    assert not (tmp_path / "t.db").exists()
