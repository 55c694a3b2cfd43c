"""Where an architecture keeps its tensors: checkpoint names <-> module parameters, and which
of them belong to which decoder layer.

Checkpoint names are not always the model's parameter names. transformers 5 renames keys
on load (GPT-NeoX's `embed_out` is `lm_head`, Gemma 3's `language_model.model.` is
`model.language_model.`), fuses MoE experts (Mixtral's `block_sparse_moe.experts.N.w1/w3`
become one `mlp.experts.gate_up_proj`) and adds or strips the base-model prefix (hub GPT-2
keys lack `transformer.`); `save_pretrained` reverts all of it. `WeightMap` reuses that very
conversion mapping, so evomerge merges each checkpoint tensor under its own name (as mergekit
does, one expert at a time) and writes it where `from_pretrained` would have put it.

Decoder layers are found from the model (`get_decoder()` and its layer list: `model.layers`,
`transformer.h`, `gpt_neox.layers`, `model.language_model.layers`, ...), never from a name
pattern, so a per-layer value reaches every layer tensor of any layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

from evomerge.errors import EvomergeError


def build_model(config: PretrainedConfig, dtype: torch.dtype, device: torch.device | str,
                trust_remote_code: bool = False) -> PreTrainedModel:
    """The architecture's causal-LM class with freshly allocated (or, on "meta", no) weights."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval().requires_grad_(False)


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: the config itself, or `text_config` of a multimodal checkpoint."""
    return config.get_text_config(decoder=True)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and list of the text decoder's layers, as the model itself holds them."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    n_layers = getattr(text_config(model.config), "num_hidden_layers", None)
    paths = {id(m): name for name, m in model.named_modules()}
    if decoder is not None and id(decoder) in paths and n_layers:
        for name, child in decoder.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n_layers:
                prefix = paths[id(decoder)]
                return f"{prefix}.{name}" if prefix else name, child
    raise EvomergeError(f"{type(model).__name__}: cannot find its list of {n_layers} decoder layers; "
                        "evomerge merges causal LMs whose decoder holds its layers in one list")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: the model parameter, and the transformers converter
    pattern that fuses it with others into that parameter (None: the tensor is the parameter)."""

    param: str
    pattern: str | None = None


class WeightMap:
    """One checkpoint's tensor names mapped onto one architecture's parameters.

    Built from transformers' conversion mapping for `model` (any device, "meta" included):
    the same renamings, converters and base-model-prefix rule `from_pretrained` applies, in
    the same (natural) key order, which is the order fused experts are stacked in."""

    def __init__(self, model: PreTrainedModel, names: Iterable[str]):
        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._prefix = model.base_model_prefix
        self._state = model.state_dict()
        params = dict(model.named_parameters())
        self.targets: dict[str, Target] = {}  # checkpoint name -> target, in load order
        self.internal: dict[str, str] = {}  # checkpoint name -> its name on the model side, before any fusing
        for name in sorted(names, key=dot_natural_key):
            key, pattern = self._rename(name)
            if key in params:  # others are buffers, tied copies or keys transformers would not load either
                self.targets[name] = Target(key, pattern)
                self.internal[name] = key if pattern is None else self._rename(name, converters=False)[0]
        self.missing = sorted(set(params) - {t.param for t in self.targets.values()})
        self._members: dict[str, int] = {}
        for target in self.targets.values():
            if target.pattern is not None:
                self._members[target.param] = self._members.get(target.param, 0) + 1

    def _rename(self, name: str, converters: bool = True) -> tuple[str, str | None]:
        """transformers' own renaming of one checkpoint key (convert_and_load_state_dict_in_model, step 1)."""
        key, pattern = rename_source_key(name, self._renamings, self._converters if converters else [],
                                         self._prefix, self._state)
        if key not in self._state and name in self._state:
            key, pattern = rename_source_key(name, [], [], self._prefix, self._state)
        return key, pattern

    @property
    def names(self) -> list[str]:
        """The checkpoint names that hold the model's parameters, in load order."""
        return list(self.targets)

    def members(self, param: str) -> int:
        """How many checkpoint tensors make up `param` (1 unless it is fused from several)."""
        return self._members.get(param, 1)

    def to_params(self, tensors: Mapping[str, torch.Tensor], model: PreTrainedModel) -> dict[str, torch.Tensor]:
        """Checkpoint-named tensors as parameter-named ones: plain tensors as they are (no copy),
        fused groups (which must be complete) through transformers' converter."""
        out, groups = {}, {}
        for name in sorted(tensors, key=dot_natural_key):
            target = self.targets[name]
            if target.pattern is None:
                out[target.param] = tensors[name]
                continue
            if target.param not in groups:
                groups[target.param] = copy.deepcopy(self._by_pattern[target.pattern])
            groups[target.param].add_tensor(target.param, name, target.pattern, tensors[name])
        for param, converter in groups.items():
            out.update(converter.convert(param, model=model, config=model.config))
        return out

    def check(self, model: PreTrainedModel, shapes: Mapping[str, torch.Size], ref: str) -> None:
        """Every parameter covered, with its shape, by this checkpoint (a dry run on meta tensors)."""
        if self.missing:
            raise EvomergeError(f"model {ref!r}: checkpoint lacks {self.missing[0]!r} that the architecture needs")
        meta = {n: torch.empty(shapes[n], device="meta") for n in self.targets}
        params = dict(model.named_parameters())
        for param, tensor in self.to_params(meta, model).items():
            if param in params and tuple(tensor.shape) != tuple(params[param].shape):
                raise EvomergeError(f"model {ref!r}: its checkpoint gives {param!r} the shape {tuple(tensor.shape)}, "
                                    f"but its config says {tuple(params[param].shape)}")

    def layer_of(self, name: str, layers_path: str) -> int | None:
        """The decoder layer a checkpoint tensor belongs to, or None (embeddings, norms, head, vision tower)."""
        internal = self.internal[name]
        if not internal.startswith(layers_path + "."):
            return None
        return int(internal[len(layers_path) + 1:].split(".", 1)[0])
