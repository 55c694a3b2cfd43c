"""Saving a materialized candidate as an ordinary Hugging Face checkpoint: safetensors
weights (under the names transformers saves, fused MoE experts split back), config,
tokenizer with the chosen chat template, the tokenizer model's generation_config.json as it
ships (eos lists and sampling defaults kept), the recipe, and the mergekit config when one exists.

Writes into a temporary sibling directory and renames it at the end, so an interrupted
export never leaves a half-written checkpoint under the requested name."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evomerge.errors import EvomergeError
from evomerge.merge.materialize import Materializer
from evomerge.mergekit_yaml import mergekit_yaml
from evomerge.models import SourceSet
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
    """Save the model `materializer.apply(recipe)` last returned (call it first)."""
    model = materializer.model
    return write_checkpoint(materializer.inputs, recipe, out, lambda tmp: model.save_pretrained(
        tmp, safe_serialization=True, state_dict=unshared_state_dict(model, materializer.inputs.layers_path)),
        force=force, trust_remote_code=trust_remote_code)


def write_checkpoint(inputs: SourceSet, recipe: Recipe, out: str | Path, save_weights: Callable[[Path], None], *,
                     force: bool = False, trust_remote_code: bool = False) -> Path:
    """A checkpoint whose config and weights `save_weights(folder)` writes (from a resident candidate, or
    streamed: evomerge.merge.stream), with the tokenizer, recipe and mergekit config of a merge of `inputs`."""
    out = Path(out)
    prepare_out_dir(out, force)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise EvomergeError(f"cannot write in {out.parent}: {exc.strerror}") from None
    try:
        save_weights(tmp)
        template = save_tokenizer(inputs, recipe, tmp, trust_remote_code)
        recipe.save(tmp / "recipe.yaml")
        try:
            (tmp / "mergekit.yaml").write_text(mergekit_yaml(recipe, inputs.layer_prefixes(), template))
        except EvomergeError as exc:
            (tmp / "mergekit.yaml.txt").write_text(f"No mergekit equivalent: {exc}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_tokenizer(inputs: SourceSet, recipe: Recipe, out: Path, trust_remote_code: bool) -> str | None:
    """The merged model's tokenizer (a tokenizer_source's, else the primary model's), with the recipe's
    chat template, and that model's generation_config.json. Returns the chat template set, if any."""
    vocabulary = inputs.vocabulary
    source = vocabulary.source if vocabulary else recipe.primary_model
    path = inputs.sources[source].path
    tokenizer = vocabulary.tokenizer if vocabulary else _tokenizer(path, trust_remote_code)
    tokenizer.save_pretrained(out)
    template = recipe.chat_template
    if template in inputs.sources:
        template = _tokenizer(inputs.sources[template].path, trust_remote_code).chat_template
        if template is None:
            raise EvomergeError(f"chat_template: model {recipe.chat_template!r} has no chat template")
    if template is not None:
        saved = _tokenizer(out, trust_remote_code)  # a fresh copy: the source's tokenizer object stays as it is
        saved.chat_template = template
        saved.save_pretrained(out)
    if (path / "generation_config.json").is_file():
        shutil.copyfile(path / "generation_config.json", out / "generation_config.json")
    return template


def _tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def unshared_state_dict(model: PreTrainedModel, layers_path: str) -> dict[str, torch.Tensor]:
    """A route may use one layer twice, so two positions share storage; a plain checkpoint
    stores every layer on its own (safetensors refuses shared tensors), so repeats are copied.
    Tied embeddings stay shared: save_pretrained drops the tied copy itself."""
    state, seen = model.state_dict(), set()
    for name, tensor in state.items():
        if name.startswith(layers_path + ".") and tensor.data_ptr() in seen:
            state[name] = tensor.clone()
        seen.add(tensor.data_ptr())
    return state
