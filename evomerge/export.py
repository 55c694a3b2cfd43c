"""Saving a materialized candidate as an ordinary Hugging Face checkpoint: safetensors
weights, config, tokenizer, the recipe, and the mergekit config when one exists.

Writes into a temporary sibling directory and renames it at the end, so an interrupted
export never leaves a half-written checkpoint under the requested name."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from evomerge.errors import EvomergeError
from evomerge.merge.materialize import Materializer
from evomerge.mergekit_yaml import mergekit_yaml
from evomerge.recipe import Recipe


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EvomergeError(f"output {out} exists and is not empty; choose another --out or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvomergeError(f"cannot create {out.parent}: {exc.strerror}") from None


def save_checkpoint(materializer: Materializer, recipe: Recipe, out: str | Path, *, force: bool = False,
                    trust_remote_code: bool = False) -> Path:
    """Save the candidate as it currently is (call `materializer.apply(recipe)` first)."""
    out = Path(out)
    prepare_out_dir(out, force)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise EvomergeError(f"cannot write in {out.parent}: {exc.strerror}") from None
    try:
        materializer.candidate.save_pretrained(tmp, safe_serialization=True)
        tokenizer_ref = recipe.base_model or recipe.models[0].model
        tokenizer_path = materializer.sources[tokenizer_ref].path
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
