"""Checkpoint files as users find them: damaged, incomplete, quantized, sharded, or beside
files of another format. Each problem is one line `evomerge: error: ...`, exit code 2, and
no study is written; what transformers loads, evomerge loads too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config

from evomerge.cli import main
from evomerge.merge.materialize import Materializer
from evomerge.recipe import Recipe
from reliability.harness import write_config


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _bad_header(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])


def _sharded(path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    model.save_pretrained(path, max_shard_size="300KB")


def _missing_shard(path: Path) -> None:
    _sharded(path)
    shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    (path / shards[1]).unlink()


def _only_consolidated(path: Path) -> None:
    (path / "model.safetensors").rename(path / "consolidated.safetensors")


def _int8(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _quantized(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "cannot read model.safetensors (Error while deserializing header"),
    "bad header": (_bad_header, "cannot read model.safetensors (Error while deserializing header"),
    "missing shard": (_missing_shard, "model.safetensors.index.json names model-00002-of-"),
    "only consolidated": (_only_consolidated, "(it has consolidated.safetensors, which transformers does not load"),
    "int8 tensor": (_int8, "stores model.layers.0.mlp.up_proj.weight as int8: merging needs floating-point weights"),
    "quantized": (_quantized, "is quantized (gptq)"),
}


def variant(zoo: Path, folder: Path, change: Callable[[Path], None] | None = None, source: str = "expert_rev") -> Path:
    path = folder / "variant"
    shutil.copytree(zoo / source, path)
    if change:
        change(path)
    return path


def merge_recipe(folder: Path, zoo: Path, other: Path) -> Path:
    recipe = {"method": "linear", "dtype": "float32",
              "models": [{"model": str(zoo / "base"), "parameters": {"weight": 0.5}}, {"model": str(other), "parameters": {"weight": 0.5}}]}
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "r.yaml"


def one_line_error(capfd, argv: list[str]) -> str:
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("evomerge: error: "), err
    return err[0]


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_checkpoint_is_one_line_and_exit_2(case, zoo, tmp_path, capfd):
    change, message = BROKEN[case]
    recipe = merge_recipe(tmp_path, zoo, variant(zoo, tmp_path, change))
    line = one_line_error(capfd, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert message in line
    assert not (tmp_path / "out").exists()


def merged(refs: list[str]) -> dict[str, torch.Tensor]:
    recipe = Recipe.from_dict({"method": "linear", "dtype": "float32",
                               "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs]})
    return {k: v.clone() for k, v in Materializer.for_recipe(recipe, device="cpu").apply(recipe).state_dict().items()}


@pytest.mark.parametrize("change", [_sharded, lambda p: save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)},
                                                                   p / "consolidated.safetensors")],
                         ids=["sharded with an index", "consolidated.safetensors beside the HF weights"])
def test_weight_files_are_the_ones_transformers_loads(change, zoo, tmp_path):
    expected = merged([str(zoo / "base"), str(zoo / "expert_rev")])
    actual = merged([str(zoo / "base"), str(variant(zoo, tmp_path, change))])
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


def test_sources_of_different_float_dtypes_merge_in_float32(zoo, tmp_path):
    def to_float16(path: Path) -> None:
        tensors = load_file(path / "model.safetensors")
        save_file({k: v.half() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})

    half = variant(zoo, tmp_path, to_float16)
    actual = merged([str(zoo / "base"), str(half)])
    base, other = load_file(zoo / "base" / "model.safetensors"), load_file(half / "model.safetensors")
    assert all(torch.equal(actual[k], (base[k].float() * 0.5 + other[k].float() * 0.5)) for k in base)


def test_a_search_over_a_broken_model_writes_no_study(zoo, tmp_path, capfd):
    config = write_config(tmp_path, zoo, n_trials=1)
    data = yaml.safe_load(config.read_text())
    data["models"][1] = str(variant(zoo, tmp_path, _bad_header, source="expert_srt"))
    config.write_text(yaml.safe_dump(data))
    assert "cannot read model.safetensors" in one_line_error(capfd, ["run", str(config), "--quiet"])
    assert not (tmp_path / "t.db").exists()


def test_a_routing_search_over_an_unroutable_layout_is_refused_when_the_config_is_read(zoo, tmp_path, capfd):
    gpt2 = GPT2Config(vocab_size=43, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    for name in ("a", "b"):
        AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / name)
    config = write_config(tmp_path, zoo, n_trials=1, search_space="search_spaces/dfs_routing.yaml",
                          models=[str(tmp_path / "a"), str(tmp_path / "b")], base_model=None)
    line = one_line_error(capfd, ["run", str(config), "--quiet"])
    assert "routes layers" in line and "(gpt2): unsupported architecture for layer routing" in line
    assert not (tmp_path / "t.db").exists()


TRUNCATED_UNDER_A_LOADED_SOURCE = """import sys, torch
from pathlib import Path
from evomerge.models import load_source
path = Path(sys.argv[1])
source = load_source(str(path), torch.device("cpu"))
before = sum(float(t.double().sum()) for t in source.tensors.values())
(path / "model.safetensors").write_bytes(b"")  # a fine-tune saved over it, a re-download begun
after = sum(float(t.double().sum()) for t in source.tensors.values())
print(before == after)"""


def test_a_checkpoint_rewritten_under_a_loaded_source_leaves_its_tensors_whole(zoo, tmp_path):
    """Resident CPU sources live in the process's own memory, not in a map of the file: a search that
    runs for days survives its checkpoint being overwritten (a mapped tensor would die of SIGBUS
    at its next read, hence the subprocess)."""
    model = tmp_path / "expert"
    shutil.copytree(zoo / "expert_rev", model)
    done = subprocess.run([sys.executable, "-c", TRUNCATED_UNDER_A_LOADED_SOURCE, str(model)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
