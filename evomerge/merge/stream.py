"""One-shot merges that stream: `evomerge merge` (and `export` of a trial) without holding any model.

The search keeps its sources resident because it merges them again every trial; one merge needs
each tensor once. Here the sources are streamed (evomerge.models: meta tensors from their
safetensors headers, each real tensor read from disk when the merge asks for it), the same
`merged_tensors` as the resident candidate's merges them one checkpoint tensor at a time, and each
merged tensor goes straight to its place in the output file. Peak memory is one tensor per source
and the merged tensor (an MoE layer's experts of one kind, which transformers converts together),
whatever the model's size.

The output is what `save_pretrained` of the resident candidate writes, bit for bit in its tensors:
the names, dtypes and shards come from transformers' own steps (tied copies dropped, weight
conversions reverted, `split_torch_state_dict_into_shards`) run on a weightless copy of the
candidate, and config.json and generation_config.json from its `save_pretrained` with no weights.
Since that plan gives every tensor's shape before any is merged, each shard's safetensors header
is written first and each tensor's bytes at their offset as it comes; no shard is ever assembled.

A route (layer routing) is not streamed: it is merged by the resident Materializer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from evomerge.errors import EvomergeError
from evomerge.export import write_checkpoint
from evomerge.layouts import build_model
from evomerge.merge.materialize import merged_tensors
from evomerge.model_card import Evidence
from evomerge.models import SAFETENSORS, SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SourceSet, default_device
from evomerge.recipe import Recipe

SHARD_SIZE = "5GB"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def streamable(recipe: Recipe, *, allow_pickle: bool = False) -> bool:
    """Whether `stream_merge` takes the recipe: a parameter-space merge of checkpoints (a route reuses
    layers across positions, and a LoRA adapter's delta is built from its resident factors)."""
    from evomerge import lora
    from evomerge.refs import resolve_path

    return recipe.route is None and not any(lora.is_adapter(resolve_path(r, allow_pickle=allow_pickle))
                                            for r in recipe.refs)


def stream_merge(recipe: Recipe, out: str | Path, *, device: str | torch.device | None = None,
                 allow_pickle: bool = False, trust_remote_code: bool = False, force: bool = False,
                 max_shard_size: int | str = SHARD_SIZE, evidence: Evidence | None = None) -> Path:
    """Merge a parameter-space recipe from streamed sources into the checkpoint folder `out` (`evidence`:
    a search trial's, for its model card)."""
    if recipe.route is not None:
        raise EvomergeError("a recipe with a route is merged by the resident Materializer, not streamed")
    device = torch.device(device) if device is not None else default_device()
    inputs = SourceSet(recipe.refs, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       tokenizer_source=recipe.tokenizer_source, resident=False)
    inputs.check_recipe(recipe, recipe.tokenizer_source, "its models were loaded with")
    shell = build_model(inputs.config, getattr(torch, recipe.dtype), "meta", trust_remote_code)
    return write_checkpoint(inputs, recipe, out, lambda folder: save_streamed(recipe, inputs, shell, folder, max_shard_size),
                            force=force, trust_remote_code=trust_remote_code, evidence=evidence)


@torch.no_grad()
def save_streamed(recipe: Recipe, inputs: SourceSet, shell: PreTrainedModel, folder: Path,
                  max_shard_size: int | str = SHARD_SIZE) -> None:
    """config.json, generation_config.json and the weights of `recipe` merged from `inputs`, into `folder`;
    `shell` is the candidate on "meta" (the merged config, the recipe's dtype)."""
    shell.save_pretrained(folder, state_dict={})  # writes the configs; an empty state dict writes no weight file
    kept = remove_tied_weights_from_state_dict(shell.state_dict(), shell)
    params = dict(shell.named_parameters())
    key_of = {id(shell.get_parameter_or_buffer(key)): key for key in kept}
    buffers = sorted(set(kept) - {key_of[id(p)] for p in params.values()})
    if buffers:
        raise EvomergeError(f"{type(shell).__name__} saves buffers ({buffers[0]}), which a streamed merge cannot "
                            "write (no architecture evomerge was tried on has any): please report it")
    writer = ShardWriter(folder, revert_weight_conversion(shell, kept), max_shard_size, shell.num_parameters())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    targets = inputs.weights.targets

    def out(name: str) -> torch.Tensor:
        """The merged tensor in its parameter's dtype, as the resident candidate holds it."""
        return torch.empty(inputs.shapes[name], dtype=params[targets[name].param].dtype, device=inputs.device)

    for name, tensor in merged_tensors(recipe, inputs, out=out):
        target = targets[name]
        if target.pattern is None:
            merged = {target.param: tensor}
        else:  # members of a fused parameter (MoE experts) are converted together, as the candidate's are
            group = pending.setdefault(target.param, {})
            group[name] = tensor
            if len(group) < inputs.weights.members(target.param):
                continue
            merged = inputs.weights.to_params(pending.pop(target.param), shell)
        for param, value in merged.items():
            for saved, data in revert_weight_conversion(shell, {key_of[id(params[param])]: value}).items():
                writer.write(saved, data)
    writer.finish()


class ShardWriter:
    """safetensors shards laid out from a planned state dict (meta tensors) before any tensor exists:
    each file gets its header and full size at once, and each tensor its bytes when `write` is called."""

    def __init__(self, folder: Path, layout: dict[str, torch.Tensor], max_shard_size: int | str, n_params: int):
        split = split_torch_state_dict_into_shards(layout, filename_pattern=SAFETENSORS.replace(".safetensors",
                                                   "{suffix}.safetensors"), max_shard_size=max_shard_size)
        self.layout = layout
        self.places: dict[str, tuple[Path, int]] = {}  # name -> (file, byte offset of its data)
        for filename, names in split.filename_to_tensors.items():
            self._lay_out(folder / filename, names)
        if split.is_sharded:
            index = {"metadata": {"total_parameters": n_params, **split.metadata}, "weight_map": split.tensor_to_filename}
            (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def _lay_out(self, path: Path, names: list[str]) -> None:
        header, offset = {}, 0
        for name in names:
            tensor = self.layout[name]
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}  # as save_pretrained writes it
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors pads it
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        start = 8 + len(raw)
        for name in names:
            self.places[name] = (path, start + header[name]["data_offsets"][0])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.layout.get(name)
        if planned is None or name not in self.places or planned.shape != tensor.shape or planned.dtype != tensor.dtype:
            raise EvomergeError(f"streamed merge: {name} {tuple(tensor.shape)} {tensor.dtype} is not in the planned "
                                f"checkpoint (or written twice); this is a bug, please report it")
        path, start = self.places.pop(name)
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            with open(path, "r+b") as f:
                f.seek(start)
                f.write(data.data)

    def finish(self) -> None:
        if self.places:
            raise EvomergeError(f"streamed merge: {next(iter(self.places))} was never written; this is a bug, "
                                "please report it")
