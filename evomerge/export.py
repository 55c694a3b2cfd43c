"""Saving a materialized candidate as an ordinary Hugging Face checkpoint: safetensors
weights, config, tokenizer, the recipe, and the mergekit config when one exists.

Writes into a temporary sibling directory and renames it at the end, so an interrupted
export never leaves a half-written checkpoint under the requested name."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from evomerge.errors import EvomergeError
from evomerge.merge.materialize import Materializer
from evomerge.mergekit_yaml import mergekit_yaml
from evomerge.recipe import Recipe, layer_prefix


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EvomergeError(f"output {out} exists and is not empty; choose another --out or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvomergeError(f"cannot create {out.parent}: {exc.strerror}") from None


def save_checkpoint(materializer: Materializer, recipe: Recipe, out: str | Path, *, force: bool = False,
                    trust_remote_code: bool = False) -> Path:
    """Save the model `materializer.apply(recipe)` last returned (call it first)."""
    out = Path(out)
    prepare_out_dir(out, force)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise EvomergeError(f"cannot write in {out.parent}: {exc.strerror}") from None
    try:
        model = materializer.model
        model.save_pretrained(tmp, safe_serialization=True, state_dict=unshared_state_dict(model))
        tokenizer_path = materializer.sources[recipe.primary_model].path
        AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        recipe.save(tmp / "recipe.yaml")
        try:
            (tmp / "mergekit.yaml").write_text(mergekit_yaml(recipe, materializer.layer_prefixes()))
        except EvomergeError as exc:
            (tmp / "mergekit.yaml.txt").write_text(f"No mergekit equivalent: {exc}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def unshared_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A route may use one layer twice, so two positions share storage; a plain checkpoint
    stores every layer on its own (safetensors refuses shared tensors), so repeats are copied."""
    state, seen = model.state_dict(), set()
    for name, tensor in state.items():
        if layer_prefix(name) is not None and tensor.data_ptr() in seen:
            state[name] = tensor.clone()
        seen.add(tensor.data_ptr())
    return state
