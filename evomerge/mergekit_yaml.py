"""The mergekit configuration equivalent to a parameter-space recipe, so a user can
reproduce or continue a merge in mergekit.

Per-group values become mergekit conditional parameters: one `{filter: "model.layers.N.",
value: ...}` per decoder layer (mergekit matches filters as substrings of tensor names,
first match wins) and a final unfiltered value for embeddings, final norm and head.
Arithmetic is pinned to float32 (`dtype`), as evomerge computes it."""

from __future__ import annotations

from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.merge import get_method
from evomerge.recipe import Recipe, n_groups


def _setting(value: Any, layer_prefixes: list[str], granularity: int) -> Any:
    if not isinstance(value, list):
        return value
    n_layers = len(layer_prefixes)
    if len(value) != n_groups(n_layers, granularity):
        raise EvomergeError(f"per-group list {value} does not fit {n_layers} layers with layer_granularity {granularity}")
    per_layer = [{"filter": prefix, "value": value[i // granularity if granularity > 0 else 0]}
                 for i, prefix in enumerate(layer_prefixes)]
    return per_layer + [{"value": value[-1]}]


def to_mergekit(recipe: Recipe, layer_prefixes: list[str]) -> dict[str, Any]:
    """mergekit 0.1.x config dict for `recipe` on a model whose decoder layers have these name prefixes."""
    if recipe.parameters.get("rescale_mode", "l1") != "l1":
        raise EvomergeError("rescale_mode inverse_density (the DARE paper's rescale) has no mergekit equivalent")
    config: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base_model and get_method(recipe.method).needs_base:
        config["base_model"] = recipe.base_model
    config["models"] = [
        {"model": s.model, **({"parameters": {k: _setting(v, layer_prefixes, recipe.layer_granularity)
                                              for k, v in s.parameters.items()}} if s.parameters else {})}
        for s in recipe.models
    ]
    options = {k: _setting(v, layer_prefixes, recipe.layer_granularity)
               for k, v in recipe.parameters.items() if k != "rescale_mode"}
    if options:
        config["parameters"] = options
    config["dtype"] = "float32"
    config["out_dtype"] = recipe.dtype
    return config


def mergekit_yaml(recipe: Recipe, layer_prefixes: list[str]) -> str:
    note = ""
    if get_method(recipe.method).random:
        note = ("# DARE/DELLA masks in mergekit come from its own random stream, not this recipe's seed:\n"
                "# the result matches evomerge's in distribution, not bit for bit.\n")
    return note + yaml.safe_dump(to_mergekit(recipe, layer_prefixes), sort_keys=False)
