"""Data-flow-space merging: a candidate whose decoder layers walk a route through resident
source layers (the paper's DFS), with the route's scaling folded into weights.

Why folding is exact: in a pre-norm transformer each layer reads the residual stream only
through RMSNorm, which ignores a positive factor (up to its epsilon). Scaling the stream by
w before a layer therefore equals dividing the branch outputs of that layer and of every
later one by the running product of the w's, and the final norm ignores the factor left at
the end. Where the branch output sits is per architecture (evomerge.routing_layouts):
`o_proj`/`down_proj` (LLaMA, Mistral, Qwen, Phi-3; the experts' `down_proj` of Mixtral and
Qwen3-MoE), or the norms Gemma 2/3 apply after each branch, whose `(1 + weight)` scale takes
the factor instead. A routed, scaled candidate is thus a plain checkpoint of the same
architecture with `num_hidden_layers` = path length, loadable with no custom code.

Memory: a position whose running product is 1 reuses the resident layer's weights through a
shallow module copy with its own `layer_idx` (the KV cache is indexed by it). Only the
branch-output parameters of scaled positions are written, into buffers kept from one
candidate to the next, so memory is bounded by the longest route, never a copy of every source.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from evomerge.errors import EvomergeError
from evomerge.layouts import build_model, decoder_layers, text_config
from evomerge.models import SourceSet
from evomerge.recipe import MERGED, Route
from evomerge.routing_layouts import ONE_PLUS, RoutingLayout, layout_for


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters and children but its own child, parameter
    and hook containers: `copy.copy` alone shares `_modules`, so replacing a child of the copy
    would silently rewire the original too."""
    clone = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, (dict, set, list)):
            clone.__dict__[key] = copy.copy(value)
    return clone


def check_layout(model: PreTrainedModel) -> RoutingLayout:
    """The model's routing layout, after checking every decoder layer has exactly it."""
    layout = layout_for(model.config.to_dict(), type(model).__name__)
    _, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        extra = set(layer._modules) - layout.children
        problem = None
        if set(layer._modules) < layout.children or not extra <= layout.optional:
            problem = f"layer {i} has children {sorted(layer._modules)}, routing expects {sorted(layout.children)}"
        elif not all(isinstance(layer._modules[c], nn.Dropout) for c in extra):
            problem = f"layer {i}: {sorted(extra)} must be dropout"
        elif not hasattr(layer._modules[layout.attention], "layer_idx"):
            problem = f"layer {i}: {layout.attention} has no layer_idx"
        elif any(_branch_path(layer, branch) is None for branch in layout.branches):
            problem = f"layer {i} lacks one of {layout.branches}"
        if problem:
            raise EvomergeError(f"{type(model).__name__}: unsupported architecture for layer routing: {problem}")
    return layout


def _branch_path(layer: nn.Module, paths: tuple[str, ...]) -> str | None:
    """The first of `paths` (a module or a parameter inside the layer) that this layer has."""
    for path in paths:
        owner, _, leaf = path.rpartition(".")
        try:
            parent = layer.get_submodule(owner)
        except AttributeError:
            continue
        if leaf in parent._modules or leaf in parent._parameters:
            return path
    return None


def running_scales(route: Route) -> list[float]:
    """Running product of the step scales: the factor by which each position's branch outputs are divided."""
    products, product = [], 1.0
    for step in route.layers:
        product *= float(step.scale)
        products.append(product)
    return products


def routed_config(config: PretrainedConfig, route: Route, configs: dict[str, PretrainedConfig]) -> PretrainedConfig:
    """The embedding source's config with one decoder layer per route step (and per-layer types, such as
    sliding-window or full attention, taken from each step's source layer, where the model has them)."""
    out = copy.deepcopy(config)
    text = text_config(out)
    text.num_hidden_layers = len(route.layers)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text_config(configs[s.model]).layer_types[s.layer] for s in route.layers]
    return out


class Router:
    """Builds routed candidates from resident sources; keeps the scaled-weight buffers between calls."""

    def __init__(self, inputs: SourceSet, shell: PreTrainedModel, dtype: torch.dtype):
        self.layout = check_layout(shell)  # the sources share its architecture (checked when they were loaded)
        self.inputs, self.shell, self.dtype = inputs, shell, dtype
        self._resident: dict[str, PreTrainedModel] = {}
        self._buffers: dict[tuple[int, str, str], torch.Tensor] = {}

    def resident(self, ref: str) -> PreTrainedModel:
        if ref not in self._resident:
            self._resident[ref] = self._as_module(ref)
        return self._resident[ref]

    def _as_module(self, ref: str) -> PreTrainedModel:
        """The source as a module tree whose weights are its resident tensors (no copy when the dtype
        matches; fused MoE experts are one converted copy). Buffers computed from the config (rotary
        frequencies, Gemma's embedding scale) are the candidate's."""
        config = copy.deepcopy(self.inputs.sources[ref].config)
        text_config(config).vocab_size = text_config(self.inputs.config).vocab_size  # rows re-indexed by a tokenizer_source
        model = build_model(config, self.dtype, "meta", self.inputs.trust_remote_code)
        tensors = {name: t.to(self.dtype) for name, t in self.inputs.tensors[ref].items()}
        model.load_state_dict(self.inputs.weights.to_params(tensors, model), strict=False, assign=True)
        model.tie_weights()
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = self.shell.get_buffer(name)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise EvomergeError(f"model {ref!r}: checkpoint lacks {missing[0]!r} that the architecture needs")
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def build(self, route: Route, merged: PreTrainedModel) -> PreTrainedModel:
        """A new model object walking `route`; valid until the next `build` (scaled buffers are reused)."""
        refs = dict.fromkeys([route.embed_from, *(s.model for s in route.layers)])
        models = {ref: merged if ref == MERGED else self.resident(ref) for ref in refs}
        layers, n_scaled = [], 0
        for position, (step, product) in enumerate(zip(route.layers, running_scales(route))):
            source_layers = models[step.model].get_submodule(self.inputs.layers_path)
            if step.layer >= len(source_layers):
                raise EvomergeError(f"route step {position}: layer {step.layer} of {step.model!r}, which has "
                                    f"{len(source_layers)} decoder layers (0..{len(source_layers) - 1})")
            layer = self._at_position(source_layers[step.layer], position)
            if product != 1.0:
                self._fold(layer, 1.0 / product, n_scaled)
                n_scaled += 1
            layers.append(layer)
        config = routed_config(models[route.embed_from].config, route, {r: m.config for r, m in models.items()})
        return self._assemble(models[route.embed_from], layers, config)

    def _at_position(self, layer: nn.Module, position: int) -> nn.Module:
        """The layer placed at `position`: same weights, its own attention `layer_idx` for the KV cache."""
        placed = shallow_copy(layer)
        attention = placed._modules[self.layout.attention] = shallow_copy(layer._modules[self.layout.attention])
        attention.layer_idx = position
        return placed

    def _fold(self, layer: nn.Module, factor: float, slot: int) -> None:
        """Divide this position's branch outputs by the running scale, in buffers reused across candidates."""
        for branch in self.layout.branches:
            path = _branch_path(layer, branch)
            owner = layer
            for name in path.split("."):  # copy the path down to the parameter's owner: the source stays as it is
                if name not in owner._modules:
                    break
                child = shallow_copy(owner._modules[name])
                owner._modules[name] = child
                owner = child
            leaf = path.rpartition(".")[2]
            for name in [leaf] if leaf in owner._parameters else list(owner._parameters):
                param = owner._parameters[name]
                if param is None:  # a Linear without bias
                    continue
                key = (slot, path, name)
                buffer = self._buffers.get(key)
                if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype:
                    buffer = self._buffers[key] = torch.empty_like(param)
                if self.layout.fold == ONE_PLUS:  # Gemma's norm scales by (1 + weight)
                    buffer.copy_(param.float().add(1).mul_(factor).sub_(1))
                else:
                    torch.mul(param, factor, out=buffer)
                owner._parameters[name] = nn.Parameter(buffer, requires_grad=False)

    def _assemble(self, embed: PreTrainedModel, layers: list[nn.Module], config: PretrainedConfig) -> PreTrainedModel:
        """The candidate's modules down to the layer list, each a shallow copy: the routed layers in the
        list, every other child that holds weights (embeddings, norms, head, a vision tower) from the
        embedding source, the rest (rotary embeddings) the candidate's."""
        configs = {id(self.shell.config): config, id(text_config(self.shell.config)): text_config(config)}
        *path, leaf = self.inputs.layers_path.split(".")
        model = node = shallow_copy(self.shell)
        source = embed
        for name in path:
            _adopt(node, source, name, configs)
            node._modules[name] = shallow_copy(node._modules[name])
            node, source = node._modules[name], source._modules[name]
        _adopt(node, source, leaf, configs)
        node._modules[leaf] = nn.ModuleList(layers)
        return model


def _adopt(node: nn.Module, source: nn.Module, skip: str, configs: dict[int, PretrainedConfig]) -> None:
    """Give a copied module the embedding source's weights (every child but `skip` that has any)
    and the routed config in place of the candidate's."""
    for child, module in node._modules.items():
        if child != skip and any(True for _ in module.parameters()):
            node._modules[child] = source._modules[child]
    node._parameters.update(source._parameters)
    if id(getattr(node, "config", None)) in configs:
        node.config = configs[id(node.config)]
