"""Writing a recipe's weights in place into one resident candidate model.

Sources are loaded once and stay on the merge device; the candidate is allocated once.
`apply(recipe)` then overwrites each candidate parameter's existing storage, tensor by
tensor: no disk, no new model, no re-wrapping, so an evaluator wrapped around the
candidate sees each new recipe at once. A recipe with a route (data-flow space) returns a
routed model built around resident source layers instead (see evomerge.routing).

Tensors are merged under the checkpoint's own names (`merged_tensors`), one checkpoint tensor
at a time as mergekit does (each MoE expert on its own: TIES's top-k and DARE's mask are per
tensor). A tensor that is a model parameter is merged straight into it; tensors transformers
fuses into one parameter (MoE experts) are merged, then fused by transformers' own converter.
Another backend (vLLM's `load_weights`, which takes checkpoint names) can consume
`merged_tensors` directly.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable, Collection, Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge import lora
from evomerge.errors import EvomergeError
from evomerge.layouts import build_model
from evomerge.merge.methods import get_method
from evomerge.merge.registry import merge_tensor
from evomerge.merge.rng import TensorRNG
from evomerge.models import SourceSet, default_device
from evomerge.recipe import Recipe, group_of, n_groups
from evomerge.routing import Router

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@torch.no_grad()
def merged_tensors(recipe: Recipe, inputs: SourceSet,
                   out: Callable[[str], torch.Tensor | None] = lambda name: None,
                   only: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, merged tensor) for every weight of the recipe's parameter-space merge (or those
    in `only`), in transformers' load order. `out(name)` may give a tensor to write into (else a new float32 one)."""
    recipe.check_groups(inputs.n_layers)
    inputs.check_loaded(recipe.refs)
    groups = tensor_groups(inputs, recipe.layer_granularity)
    base = inputs.tensors[recipe.base_model] if recipe.base_model else None
    sources = [inputs.tensors[s.model] for s in recipe.models]
    if get_method(recipe.method).low_rank:  # the factor composition reads the adapters' factors, not dense tensors
        sources = [{name: lora.low_rank_term(tensors, name, s.model) for name in groups}
                   for tensors, s in zip(sources, recipe.models)]
    per_group = {}
    for name, group in groups.items():
        if only is not None and name not in only:
            continue
        if group not in per_group:
            per_group[group] = (recipe.source_params(group), recipe.options(group))
        params, options = per_group[group]
        yield name, merge_tensor(recipe.method, base[name] if base is not None else None, [s[name] for s in sources],
                                 params, options, TensorRNG(recipe.seed, name), out=out(name))


def tensor_groups(inputs: SourceSet, granularity: int) -> dict[str, int]:
    """Each checkpoint tensor's group; every group must hold a tensor, so no per-group value goes unused."""
    groups = {name: group_of(inputs.layer_of(name), inputs.n_layers, granularity) for name in inputs.weights.names}
    empty = sorted(set(range(n_groups(inputs.n_layers, granularity))) - set(groups.values()))
    if empty:
        raise EvomergeError(f"layer group {empty[0]} (layer_granularity {granularity}) holds no tensor of this model, "
                            "so its per-group values would be ignored")
    return groups


class Materializer:
    """Resident sources plus one candidate model that recipes are written into."""

    def __init__(self, refs: Sequence[str], *, dtype: str = "bfloat16", device: str | torch.device | None = None,
                 allow_pickle: bool = False, trust_remote_code: bool = False, tokenizer_source: str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.inputs = SourceSet(list(refs), self.device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                tokenizer_source=tokenizer_source)
        self.sources = self.inputs.sources
        self.tokenizer_source = tokenizer_source
        self.config = self.inputs.config
        self.dtype, self.trust_remote_code = _DTYPES[dtype], trust_remote_code
        self.candidate = build_model(self.config, self.dtype, self.device, trust_remote_code)
        self.model: PreTrainedModel = self.candidate  # what the last `apply` returned
        self.n_layers = self.inputs.n_layers
        self._params = dict(self.candidate.named_parameters())
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._borrowed: set[str] = set()  # parameters whose storage is a source's tensor, never written into

    @classmethod
    def for_recipe(cls, recipe: Recipe, **kwargs) -> "Materializer":
        return cls(recipe.refs, dtype=kwargs.pop("dtype", recipe.dtype), tokenizer_source=recipe.tokenizer_source, **kwargs)

    @cached_property
    def router(self) -> Router:
        return Router(self.inputs, self.candidate, self.dtype)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The merged model's tokenizer when a tokenizer_source changed the vocabulary, else None (the base's)."""
        return self.inputs.vocabulary.tokenizer if self.inputs.vocabulary else None

    def apply(self, recipe: Recipe) -> PreTrainedModel:
        """The recipe's candidate. A parameter-space recipe overwrites the candidate's weights and returns
        the same model object every time; a route returns a new model object (its parameter-space part,
        if any, is merged into the candidate first and routed as `merged`). Valid until the next call."""
        self.inputs.check_recipe(recipe, self.tokenizer_source, "its models were loaded with")
        if recipe.method is not None:
            self._merge(recipe)
        self.model = self.candidate if recipe.route is None else self.router.build(recipe.route, self.candidate)
        return self.model

    def _merge(self, recipe: Recipe) -> None:
        borrowed = self._unchanged(recipe)
        for name, tensor in borrowed.items():
            param = self.inputs.weights.targets[name].param
            self._params[param].data = tensor
            self._borrowed.add(param)
        rest = set(self.inputs.weights.names) - set(borrowed)
        for name, tensor in merged_tensors(recipe, self.inputs, out=self._target, only=rest):
            self._write(name, tensor)

    def _unchanged(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """The tensors the merge gives back as they are: every source holds that very tensor object, the method
        keeps its base there, and the candidate's parameter has its dtype and device."""
        if not get_method(recipe.method).keeps_base:
            return {}
        unchanged = {}
        for name, target in self.inputs.weights.targets.items():
            held = [lora.held(self.inputs.tensors[ref], name) for ref in recipe.refs]
            param = self._params[target.param]
            if target.pattern is None and held[0] is not None and all(t is held[0] for t in held) \
                    and (held[0].dtype, held[0].device) == (param.dtype, param.device):
                unchanged[name] = held[0]
        return unchanged

    def _target(self, name: str) -> torch.Tensor:
        """The candidate parameter a checkpoint tensor is, to merge straight into; for a member of a fused
        parameter, a tensor of the parameter's dtype that holds it until the group is complete."""
        target = self.inputs.weights.targets[name]
        if target.param in self._borrowed:  # a source's tensor: never written into
            self._params[target.param].data = torch.empty_like(self._params[target.param].data)
            self._borrowed.discard(target.param)
        param = self._params[target.param].data
        if target.pattern is None:
            return param
        return torch.empty(self.inputs.reference[name].shape, dtype=param.dtype, device=param.device)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        """Fused parameters are written once all their checkpoint tensors are merged."""
        target = self.inputs.weights.targets[name]
        if target.pattern is None:
            return  # merged in place
        pending = self._pending.setdefault(target.param, {})
        pending[name] = tensor
        if len(pending) == self.inputs.weights.members(target.param):
            fused = self.inputs.weights.to_params(self._pending.pop(target.param), self.candidate)
            self._params[target.param].data.copy_(fused[target.param])

    def layer_prefixes(self) -> list[str]:
        """'model.layers.0.', ... in layer order, as the checkpoint names them."""
        return self.inputs.layer_prefixes()
