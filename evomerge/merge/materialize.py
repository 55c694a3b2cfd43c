"""Writing a recipe's weights in place into one resident candidate model.

Sources are loaded once and stay on the merge device; the candidate is allocated once.
`apply(recipe)` then overwrites each candidate parameter's existing storage, tensor by
tensor: no disk, no new model, no re-wrapping, so an evaluator wrapped around the
candidate sees each new recipe at once. A recipe with a route (data-flow space) returns a
routed model built around resident source layers instead (see evomerge.routing).
"""

from __future__ import annotations

from functools import cached_property
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.errors import EvomergeError
from evomerge.merge.registry import merge_tensor
from evomerge.merge.rng import TensorRNG
from evomerge.models import Source, check_compatible, default_device, load_source
from evomerge.recipe import Recipe, group_of, layer_prefix
from evomerge.routing import Router

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Materializer:
    """Resident sources plus one candidate model that recipes are written into."""

    def __init__(self, refs: Sequence[str], *, dtype: str = "bfloat16", device: str | torch.device | None = None,
                 allow_pickle: bool = False, trust_remote_code: bool = False):
        self.device = torch.device(device) if device is not None else default_device()
        self.sources: dict[str, Source] = {}
        for ref in dict.fromkeys(refs):
            self.sources[ref] = load_source(ref, self.device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        check_hidden_sizes(list(self.sources.values()))
        check_compatible(list(self.sources.values()))
        first = next(iter(self.sources.values()))
        self.config = first.config
        self.dtype, self.trust_remote_code = _DTYPES[dtype], trust_remote_code
        self.candidate = build_candidate(first, self.dtype, self.device, trust_remote_code)
        self.model: PreTrainedModel = self.candidate  # what the last `apply` returned
        self.n_layers = int(self.config.num_hidden_layers)
        self._params = dict(self.candidate.named_parameters())
        missing = sorted(set(self._params) - set(first.tensors))
        if missing:
            raise EvomergeError(f"model {first.ref!r}: checkpoint lacks {missing[0]!r} that the architecture needs")

    @classmethod
    def for_recipe(cls, recipe: Recipe, **kwargs) -> "Materializer":
        return cls(recipe.refs, dtype=kwargs.pop("dtype", recipe.dtype), **kwargs)

    @cached_property
    def router(self) -> Router:
        return Router(self.sources, self.candidate, self.dtype, self.trust_remote_code)

    def apply(self, recipe: Recipe) -> PreTrainedModel:
        """The recipe's candidate. A parameter-space recipe overwrites the candidate's weights and returns
        the same model object every time; a route returns a new model object (its parameter-space part,
        if any, is merged into the candidate first and routed as `merged`). Valid until the next call."""
        unknown = [r for r in recipe.refs if r not in self.sources]
        if unknown:
            raise EvomergeError(f"recipe names model {unknown[0]!r}, which was not loaded; loaded: {list(self.sources)}")
        recipe.validate()
        if recipe.method is not None:
            self._merge(recipe)
        self.model = self.candidate if recipe.route is None else self.router.build(recipe.route, self.candidate)
        return self.model

    @torch.no_grad()
    def _merge(self, recipe: Recipe) -> None:
        recipe.check_groups(self.n_layers)
        base = self.sources[recipe.base_model].tensors if recipe.base_model else None
        sources = [self.sources[s.model].tensors for s in recipe.models]
        per_group = {}
        for name, param in self._params.items():
            group = group_of(name, self.n_layers, recipe.layer_granularity)
            if group not in per_group:
                per_group[group] = (recipe.source_params(group), recipe.options(group))
            params, options = per_group[group]
            merge_tensor(recipe.method, base[name] if base is not None else None, [s[name] for s in sources],
                         params, options, TensorRNG(recipe.seed, name), out=param.data)

    def layer_prefixes(self) -> list[str]:
        """'model.layers.0.', ... in layer order, as the candidate names them."""
        found = {p: i for p, i in filter(None, map(layer_prefix, self._params))}
        return sorted(found, key=found.get)


def check_hidden_sizes(sources: list[Source]) -> None:
    """Checked before tensor shapes, so the message names the real difference."""
    sizes = {s.ref: getattr(s.config, "hidden_size", None) for s in sources}
    if len(set(sizes.values())) > 1:
        raise EvomergeError(f"models have different hidden sizes {sizes}; neither merging nor layer routing can "
                            "combine them: use models of one architecture and size")


def build_candidate(source: Source, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> PreTrainedModel:
    """Allocate the one candidate model (weights are overwritten by every `apply`)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval().requires_grad_(False)
