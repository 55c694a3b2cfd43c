"""Data-flow-space merging: a candidate whose decoder layers walk a route through resident
source layers (the paper's DFS), with the route's scaling folded into weights.

Why folding is exact: in a pre-norm transformer each layer reads the residual stream only
through RMSNorm, which ignores a positive factor (up to its epsilon). Scaling the stream by
w before a layer therefore equals dividing the branch outputs (`o_proj`, `down_proj`) of that
layer and of every later one by the running product of the w's, and the final norm ignores
the factor left at the end. A routed, scaled candidate is thus a plain checkpoint of the same
architecture with `num_hidden_layers` = path length, loadable with no custom code.

Memory: a position whose running product is 1 reuses the resident layer's weights through a
shallow module copy with its own `layer_idx` (the KV cache is indexed by it). Only `o_proj`
and `down_proj` of scaled positions are written, into buffers kept from one candidate to the
next, so memory is bounded by the longest route, never a copy of every source.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from evomerge.errors import EvomergeError
from evomerge.models import Source
from evomerge.recipe import MERGED, Route

LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
FOLDED = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters and children but its own child, parameter
    and hook containers: `copy.copy` alone shares `_modules`, so replacing a child of the copy
    would silently rewire the original too."""
    clone = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, (dict, set, list)):
            clone.__dict__[key] = copy.copy(value)
    return clone


def check_layout(model: nn.Module) -> None:
    """LLaMA-family layout only (model.layers.N, pre-norm, o_proj/down_proj branch outputs):
    folding is exact only there; post-norm or sandwich-norm layers would normalize it away."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = (isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(inner, "embed_tokens")
          and hasattr(inner, "norm") and hasattr(model, "lm_head")
          and all(set(layer._modules) == LAYER_CHILDREN and hasattr(layer.self_attn, "layer_idx")
                  and all(hasattr(getattr(layer, p), c) for p, c in FOLDED) for layer in layers))
    if not ok:
        raise EvomergeError(f"{type(model).__name__}: unsupported architecture for layer routing; it needs the LLaMA "
                            "layout (model.layers.N with input_layernorm, self_attn.o_proj, post_attention_layernorm, "
                            "mlp.down_proj), as in LLaMA, Mistral and Qwen2")


def running_scales(route: Route) -> list[float]:
    """Running product of the step scales: the factor by which each position's branch outputs are divided."""
    products, product = [], 1.0
    for step in route.layers:
        product *= float(step.scale)
        products.append(product)
    return products


def routed_config(config: PretrainedConfig, route: Route, configs: dict[str, PretrainedConfig]) -> PretrainedConfig:
    """The embedding source's config with one decoder layer per route step (and per-layer types, where the model has them)."""
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(route.layers)
    if getattr(config, "layer_types", None) is not None:
        out.layer_types = [configs[s.model].layer_types[s.layer] for s in route.layers]
    return out


def as_module(source: Source, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """The source as a module tree whose weights are its resident tensors (no copy when the
    dtype matches; one converted copy per source otherwise). Its rotary buffers stay unset:
    routed models take them from the candidate."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.load_state_dict({k: v.to(dtype) for k, v in source.tensors.items()}, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise EvomergeError(f"model {source.ref!r}: checkpoint lacks {missing[0]!r} that the architecture needs")
    return model.eval().requires_grad_(False)


class Router:
    """Builds routed candidates from resident sources; keeps the scaled-weight buffers between calls."""

    def __init__(self, sources: dict[str, Source], shell: PreTrainedModel, dtype: torch.dtype,
                 trust_remote_code: bool = False):
        check_layout(shell)  # the sources share its architecture (checked when they were loaded)
        self.sources, self.shell, self.dtype, self.trust_remote_code = sources, shell, dtype, trust_remote_code
        self._resident: dict[str, PreTrainedModel] = {}
        self._buffers: dict[tuple[int, str, str], torch.Tensor] = {}

    def resident(self, ref: str) -> PreTrainedModel:
        if ref not in self._resident:
            self._resident[ref] = as_module(self.sources[ref], self.dtype, self.trust_remote_code)
        return self._resident[ref]

    @torch.no_grad()
    def build(self, route: Route, merged: PreTrainedModel) -> PreTrainedModel:
        """A new model object walking `route`; valid until the next `build` (scaled buffers are reused)."""
        refs = dict.fromkeys([route.embed_from, *(s.model for s in route.layers)])
        models = {ref: merged if ref == MERGED else self.resident(ref) for ref in refs}
        layers, n_scaled = [], 0
        for position, (step, product) in enumerate(zip(route.layers, running_scales(route))):
            depth = len(models[step.model].model.layers)
            if step.layer >= depth:
                raise EvomergeError(f"route step {position}: layer {step.layer} of {step.model!r}, which has "
                                    f"{depth} decoder layers (0..{depth - 1})")
            layer = _at_position(models[step.model].model.layers[step.layer], position)
            if product != 1.0:
                self._fold(layer, 1.0 / product, n_scaled)
                n_scaled += 1
            layers.append(layer)
        config = routed_config(models[route.embed_from].config, route, {r: m.config for r, m in models.items()})
        return self._assemble(models[route.embed_from], layers, config)

    def _fold(self, layer: nn.Module, factor: float, slot: int) -> None:
        """Divide this position's branch outputs by the running scale, in buffers reused across candidates."""
        for parent_name, child_name in FOLDED:
            parent = layer._modules[parent_name] = shallow_copy(layer._modules[parent_name])
            linear = parent._modules[child_name] = shallow_copy(parent._modules[child_name])
            for name, param in linear.named_parameters(recurse=False):
                key = (slot, child_name, name)
                buffer = self._buffers.get(key)
                if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype:
                    buffer = self._buffers[key] = torch.empty_like(param)
                torch.mul(param, factor, out=buffer)
                linear._parameters[name] = nn.Parameter(buffer, requires_grad=False)

    def _assemble(self, embed: PreTrainedModel, layers: list[nn.Module], config: PretrainedConfig) -> PreTrainedModel:
        """The candidate's top-level modules (rotary embedding included) around the routed layers."""
        model, inner = shallow_copy(self.shell), shallow_copy(self.shell.model)
        inner._modules.update(embed_tokens=embed.model.embed_tokens, norm=embed.model.norm, layers=nn.ModuleList(layers))
        model._modules.update(model=inner, lm_head=embed.lm_head)
        model.config = inner.config = config
        return model


def _at_position(layer: nn.Module, position: int) -> nn.Module:
    """The layer placed at `position`: same weights, its own attention `layer_idx` for the KV cache."""
    placed = shallow_copy(layer)
    attention = placed._modules["self_attn"] = shallow_copy(layer.self_attn)
    attention.layer_idx = position
    return placed
