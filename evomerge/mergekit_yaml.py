"""The mergekit configuration equivalent to a recipe, so a user can reproduce or continue a
merge in mergekit.

Per-group values become mergekit conditional parameters: one `{filter: "model.layers.N.",
value: ...}` per decoder layer, with the prefix the checkpoint itself uses (`h.N.` for hub
GPT-2; mergekit matches filters as substrings of tensor names, first match wins) and a final
unfiltered value for embeddings, final norm and head. `tokenizer_source` and the chat
template carry over as mergekit's keys of the same names.
Arithmetic is pinned to float32 (`dtype`), as evomerge computes it.

A LoRA adapter source is mergekit's `BASE+ADAPTER` (the base as the adapter names it): mergekit
merges the adapter into its base with PEFT first, as evomerge reads it, but in the base's stored
dtype unless `--lora-merge-dtype float32` says otherwise (a comment in the YAML says so). The factor
composition (`lora_linear`) has no mergekit equivalent: mergekit never sees the factors.

A route becomes mergekit's `passthrough` slices (runs of consecutive layers of one model),
when it is expressible there: no scaling, no parameter-space merge among its sources, and
embeddings/head from the model that starts and ends the path (passthrough takes them from
the first and last slice)."""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.methods import get_method
from evomerge.recipe import Recipe, Route, n_groups


def _setting(value: Any, layer_prefixes: list[str], granularity: int) -> Any:
    if not isinstance(value, list):
        return value
    n_layers = len(layer_prefixes)
    if len(value) != n_groups(n_layers, granularity):
        raise EvomergeError(f"per-group list {value} does not fit {n_layers} layers with layer_granularity {granularity}")
    per_layer = [{"filter": prefix, "value": value[i // granularity if granularity > 0 else 0]}
                 for i, prefix in enumerate(layer_prefixes)]
    return per_layer + [{"value": value[-1]}]


LORA_NOTE = ("# LoRA adapters are named BASE+ADAPTER. mergekit merges each into its base in the base's stored dtype\n"
             "# unless told otherwise; evomerge does it in float32. The same merge:\n"
             "#   mergekit-yaml mergekit.yaml OUT --lora-merge-cache CACHE_DIR --lora-merge-dtype float32\n")


def to_mergekit(recipe: Recipe, layer_prefixes: list[str], chat_template: str | None = None,
                names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """mergekit 0.1.x config dict for `recipe` on a model whose decoder layers have these checkpoint-name
    prefixes; `chat_template` is the template text (mergekit takes a template, not a model); `names` are
    mergekit's names of some models (LoRA adapters: BASE+ADAPTER)."""
    if recipe.parameters.get("rescale_mode", "l1") != "l1":
        raise EvomergeError("rescale_mode inverse_density (the DARE paper's rescale) has no mergekit equivalent")
    names = names or {}
    config: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base_model and get_method(recipe.method).needs_base:
        config["base_model"] = names.get(recipe.base_model, recipe.base_model)
    config["models"] = [
        {"model": names.get(s.model, s.model), **({"parameters": {k: _setting(v, layer_prefixes, recipe.layer_granularity)
                                              for k, v in s.parameters.items()}} if s.parameters else {})}
        for s in recipe.models
    ]
    options = {k: _setting(v, layer_prefixes, recipe.layer_granularity)
               for k, v in recipe.parameters.items() if k != "rescale_mode"}
    if options:
        config["parameters"] = options
    config["dtype"] = "float32"
    config["out_dtype"] = recipe.dtype
    if recipe.tokenizer_source is not None:
        config["tokenizer_source"] = names.get(recipe.tokenizer_source, recipe.tokenizer_source)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def passthrough(route: Route, dtype: str, chat_template: str | None = None,
                names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """mergekit 0.1.x passthrough config walking the same path as an unscaled route over original models
    (`names`: as in to_mergekit)."""
    if any(step.scale != 1.0 for step in route.layers):
        raise EvomergeError("the route scales hidden states (scale != 1), which mergekit's passthrough slices do not "
                            "express; evomerge's checkpoint has the scaling folded into o_proj/down_proj")
    ends = {route.layers[0].model, route.layers[-1].model}
    if ends != {route.embed_from}:
        raise EvomergeError(f"mergekit's passthrough takes embeddings from the first slice's model and the head from the "
                            f"last slice's ({sorted(ends)}); this route takes both from {route.embed_from!r}")
    runs: list[list[Any]] = []
    for step in route.layers:
        if runs and runs[-1][0] == step.model and runs[-1][2] == step.layer:
            runs[-1][2] += 1
        else:
            runs.append([step.model, step.layer, step.layer + 1])
    names = names or {}
    slices = [{"sources": [{"model": names.get(model, model), "layer_range": [start, end]}]} for model, start, end in runs]
    return {"slices": slices, "merge_method": "passthrough", "dtype": dtype,
            **({"chat_template": chat_template} if chat_template is not None else {})}


def mergekit_yaml(recipe: Recipe, layer_prefixes: list[str], chat_template: str | None = None,
                  adapters: Mapping[str, str] | None = None) -> str:
    """The mergekit config as YAML; `adapters`: mergekit's `BASE+ADAPTER` name of each LoRA adapter source."""
    adapters = adapters or {}
    note = LORA_NOTE if adapters else ""
    if adapters and recipe.method is not None and get_method(recipe.method).low_rank:
        raise EvomergeError(f"{recipe.method} composes the adapters' factors; mergekit merges each adapter into its "
                            "base first (BASE+ADAPTER), so it has no equivalent")
    plus = next((name for name in adapters.values() if name.count("+") != 1), None)
    if plus is not None:
        raise EvomergeError(f"mergekit splits a model name at '+' (BASE+ADAPTER), so it cannot name {plus!r}")
    if recipe.route is not None:
        if recipe.method is not None:
            raise EvomergeError("the route reads this recipe's parameter-space merge: mergekit would need two configs "
                                "(the merge, then passthrough slices over the merged checkpoint)")
        return note + yaml.safe_dump(passthrough(recipe.route, recipe.dtype, chat_template, adapters), sort_keys=False)
    if get_method(recipe.method).random:
        note += ("# DARE/DELLA masks in mergekit come from its own random stream, not this recipe's seed:\n"
                 "# the result matches evomerge's in distribution, not bit for bit.\n")
    return note + yaml.safe_dump(to_mergekit(recipe, layer_prefixes, chat_template, adapters), sort_keys=False)
