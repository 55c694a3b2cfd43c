"""Saving a materialized candidate as an ordinary Hugging Face checkpoint: safetensors
weights (under the names transformers saves, fused MoE experts split back), config,
tokenizer with the chosen chat template (none where the sources ship none), the tokenizer model's
generation_config.json as it ships (eos lists and sampling defaults kept), the recipe, the
mergekit config when one exists, and a model card (evomerge.model_card).

Writes into a temporary sibling directory and renames it at the end, so an interrupted
export never leaves a half-written checkpoint under the requested name."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evomerge import lora
from evomerge.errors import EvomergeError
from evomerge.merge.materialize import Materializer
from evomerge.mergekit_yaml import mergekit_yaml
from evomerge.model_card import Evidence, model_card
from evomerge.models import SourceSet
from evomerge.recipe import Recipe

# Any one of them lets AutoTokenizer load a tokenizer (fast, sentencepiece, BPE or WordPiece vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tekken.json")


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EvomergeError(f"output {out} exists and is not empty; choose another --out or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvomergeError(f"cannot create {out.parent}: {exc.strerror}") from None


def save_checkpoint(materializer: Materializer, recipe: Recipe, out: str | Path, *, force: bool = False,
                    trust_remote_code: bool = False, evidence: Evidence | None = None) -> Path:
    """Save the model `materializer.apply(recipe)` last returned (call it first), with its model card
    (and `evidence` from the study in it, for a search's trial)."""
    model = materializer.model
    return write_checkpoint(materializer.inputs, recipe, out, lambda tmp: model.save_pretrained(
        tmp, safe_serialization=True, state_dict=unshared_state_dict(model, materializer.inputs.layers_path)),
        force=force, trust_remote_code=trust_remote_code, evidence=evidence)


def write_checkpoint(inputs: SourceSet, recipe: Recipe, out: str | Path, save_weights: Callable[[Path], None], *,
                     force: bool = False, trust_remote_code: bool = False, evidence: Evidence | None = None) -> Path:
    """A checkpoint whose config and weights `save_weights(folder)` writes (from a resident candidate, or
    streamed: evomerge.merge.stream), with the tokenizer, recipe, mergekit config and model card of a merge
    of `inputs`."""
    def fill(folder: Path) -> None:
        save_weights(folder)
        template = save_tokenizer(inputs, recipe, folder, trust_remote_code)
        recipe.save(folder / "recipe.yaml")
        mergekit, no_mergekit = None, None
        try:
            mergekit = mergekit_yaml(recipe, inputs.layer_prefixes(), template, adapter_names(inputs))
            (folder / "mergekit.yaml").write_text(mergekit)
        except EvomergeError as exc:
            no_mergekit = str(exc)
            (folder / "mergekit.yaml.txt").write_text(f"No mergekit equivalent: {exc}\n")
        (folder / "README.md").write_text(model_card(
            recipe, name=Path(out).name, config=inputs.config, source_dirs=inputs.paths,
            mergekit=mergekit, no_mergekit=no_mergekit, evidence=evidence))

    return write_folder(out, force, fill)


def adapter_names(inputs: SourceSet) -> dict[str, str]:
    """mergekit's name of each LoRA adapter source: `BASE+ADAPTER`, the base as the adapter names it."""
    return {ref: f"{source.tensors.base_ref}+{ref}" for ref, source in inputs.sources.items()
            if isinstance(source.tensors, lora.AdapterTensors)}


def write_folder(out: str | Path, force: bool, fill: Callable[[Path], None]) -> Path:
    """`fill(folder)` writes into a temporary sibling of `out`, renamed to `out` at the end, so an
    interrupted export never leaves a half-written folder under the requested name."""
    out = Path(out)
    prepare_out_dir(out, force)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise EvomergeError(f"cannot write in {out.parent}: {exc.strerror}") from None
    try:
        fill(tmp)
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
    if (path / "generation_config.json").is_file():
        shutil.copyfile(path / "generation_config.json", out / "generation_config.json")
    if vocabulary is None and not has_tokenizer(path):
        if recipe.chat_template is not None:
            raise EvomergeError(f"chat_template: model {source!r} ships no tokenizer to attach a chat template to")
        print(f"note: model {source!r} ships no tokenizer files: weights and config written, no tokenizer")
        return None
    tokenizer = vocabulary.tokenizer if vocabulary else _tokenizer(path, trust_remote_code)
    tokenizer.save_pretrained(out)
    template = recipe.chat_template and chat_template(recipe, inputs.paths, trust_remote_code)
    if template is not None:
        saved = _tokenizer(out, trust_remote_code)  # a fresh copy: the source's tokenizer object stays as it is
        saved.chat_template = template
        saved.save_pretrained(out)
    return template


def chat_template(recipe: Recipe, paths: Mapping[str, Path], trust_remote_code: bool = False) -> str | dict | None:
    """The chat template the merge is exported with, so a candidate can be scored with it: the recipe's
    (a model's template, or a Jinja template), else its tokenizer model's own (None: it has none; a dict
    holds named templates)."""
    template = recipe.chat_template
    if template is None:
        return model_chat_template(paths[recipe.tokenizer_model], trust_remote_code)
    if template in paths:
        if not has_tokenizer(paths[template]):
            raise EvomergeError(f"chat_template: model {template!r} ships no tokenizer, so no chat template")
        found = model_chat_template(paths[template], trust_remote_code)
        if found is None:
            raise EvomergeError(f"chat_template: model {template!r} has no chat template")
        return found
    return template


@functools.lru_cache(maxsize=64)
def model_chat_template(path: Path, trust_remote_code: bool = False) -> str | dict | None:
    """A checkpoint's own chat template (its tokenizer's; None without one), read once per folder."""
    return _tokenizer(path, trust_remote_code).chat_template if has_tokenizer(path) else None


def has_tokenizer(path: Path) -> bool:
    """Whether a checkpoint folder ships tokenizer files (intermediate training checkpoints often do not:
    transformers then fails deep inside AutoTokenizer, after the whole merge)."""
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


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
