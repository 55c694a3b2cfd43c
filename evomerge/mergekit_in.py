"""Reading a mergekit 0.1.x config as a recipe, so a hand-tuned mergekit merge can be merged by
evomerge (`evomerge merge mergekit.yml`) or start a search (`x0:` in a search space).

mergekit resolves every parameter per tensor: a scalar; a gradient (a list, interpolated over
the layers of a slice at t = layer / (layers - 1), t = 1 for a one-layer slice and t = 0 for
embeddings, final norm and head); or conditions `{filter: SUBSTRING, value: ...}`, the first
whose filter occurs in the tensor's name winning. Precedence: the slice source's (model's)
own parameters, then the slice's, then the top-level ones; per-model parameters (weight,
density, ...) may sit at any level. This module evaluates exactly that, for every tensor of
the first model's checkpoint (names read from its weight files' headers, no weights), then
keeps what a recipe can hold: one value per decoder layer and one for the tensors outside
them. A config whose values differ inside one layer (`filter: self_attn` vs. `filter: mlp`)
is refused, naming the key, as is anything else a recipe cannot express (mergekit's own
methods, `modules`, slices that take different layers from different models, a tokenizer
section, named chat templates, int8_mask). Per-layer values come out at the coarsest
layer_granularity that holds them, so recipe -> mergekit -> recipe gives the recipe back.

`passthrough` with one-model slices becomes a route (embeddings and head from the model that
starts and ends the path, as in mergekit). Inputs are merged as stored: mergekit's `dtype`
(the dtype it casts inputs to before merging) is not applied; `out_dtype` (else `dtype`) is
the recipe's dtype. The recipe's seed is 0 (mergekit takes its seed on the command line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

from evomerge.errors import EvomergeError
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.recipe import DTYPES, TOKENIZER_SOURCES, Recipe, Route, Source, Step
from evomerge.yamlio import load_yaml_mapping

MERGEKIT_KEYS = ("merge_method", "slices", "modules")  # a recipe has none of them (it says `method`)
_TOP_KEYS = {"merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template"}
_UNSUPPORTED = {"modules": "per-module configs (multimodal towers merged apart)",
                "tokenizer": "a tokenizer section (added tokens, padding); use tokenizer_source"}
_MERGEKIT_ONLY_PARAMS = {"int8_mask": False}  # mergekit options evomerge does not have, with the value it matches


def is_mergekit(data: dict[str, Any]) -> bool:
    return any(key in data for key in MERGEKIT_KEYS)


def load_recipe(path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Recipe:
    """A recipe YAML, or a mergekit config read as one (told apart by their keys)."""
    data = load_yaml_mapping(path, "recipe")
    if not is_mergekit(data):
        return Recipe.from_dict(data, where=str(path))
    return from_mergekit(data, str(path), lambda ref: read_layout(ref, allow_pickle, trust_remote_code))


# ----------------------------------------------------------------------------- the model's tensors


@dataclass(frozen=True)
class Layout:
    """A checkpoint's tensor names, each with its decoder layer (None: embeddings, norms, head)."""

    n_layers: int
    layers: dict[str, int | None]


def read_layout(ref: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Layout:
    """The layout of model `ref` from its config and weight-file headers (no weights read), with
    decoder layers found as evomerge finds them when it merges (evomerge.layouts)."""
    import torch
    from safetensors import safe_open

    from evomerge.layouts import WeightMap, build_model, decoder_layers
    from evomerge.models import load_config, load_tensors, weight_files
    from evomerge.refs import resolve_path

    from evomerge import lora

    path = resolve_path(ref, allow_pickle=allow_pickle)
    if lora.is_adapter(path):  # an adapter has its base's tensors
        return read_layout(lora.read_config(path, ref)["base_model_name_or_path"], allow_pickle, trust_remote_code)
    config = load_config(path, ref, trust_remote_code)
    files, pickled = weight_files(path, ref, allow_pickle)
    if pickled:
        names = list(load_tensors(path, ref, torch.device("cpu"), allow_pickle=True))
    else:
        names = [name for f in files for name in safe_open(f, "pt").keys()]
    shell = build_model(config, torch.float32, "meta", trust_remote_code)
    weights = WeightMap(shell, names)
    layers_path, layers = decoder_layers(shell)
    return Layout(len(layers), {name: weights.layer_of(name, layers_path) for name in weights.names})


# ----------------------------------------------------------------------------- mergekit's settings


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _validate(value: Any, numeric: bool, key: str) -> Any:
    """mergekit's per-parameter type check: numbers (YAML reads 1e-3 as a string) or flags."""
    if numeric:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvomergeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, bool):
        raise EvomergeError(f"{key}: expected true or false, got {value!r}")
    return value


def evaluate_setting(setting: Any, tensor: str, t: float, numeric: bool, key: str) -> Any:
    """A setting's value for one tensor at gradient position t, or None where no condition matches
    (mergekit then looks at the next scope). Interpolation as mergekit 0.1.5's evaluate_setting:
    the same arithmetic in the same order, so the values are bit for bit its own."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return _validate(setting, numeric, key)
    if not isinstance(setting, list):
        raise EvomergeError(f"{key}: expected a value, a list of values (a gradient) or a list of "
                            f"{{filter: ..., value: ...}}, got {setting!r}")
    if not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        values = [_validate(v, numeric, key) for v in setting]
        if not numeric:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _validate((1 - frac) * values[i0] + frac * values[i1], numeric, key)
    for i, condition in enumerate(setting):
        if not isinstance(condition, dict) or "value" not in condition or set(condition) - {"value", "filter"}:
            raise EvomergeError(f"{key}[{i}]: expected {{filter: SUBSTRING (optional), value: ...}}, got {condition!r}")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor:
            return evaluate_setting(condition["value"], tensor, t, numeric, f"{key}[{i}].value")
    return None


@dataclass(frozen=True)
class Scope:
    """One level of parameters (a model's, a slice's, the config's), with the key it is written under."""

    where: str
    params: dict[str, Any]


def resolve(name: str, scopes: list[Scope], tensor: str, t: float, numeric: bool) -> Any:
    """The first scope, in precedence order, that gives the tensor a value; None if none does."""
    for scope in scopes:
        if name in scope.params:
            value = evaluate_setting(scope.params[name], tensor, t, numeric, f"{scope.where}.{name}")
            if value is not None:
                return value
    return None


# ----------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class Slice:
    """One output slice of a merge: layers [start, end) of every model, and the parameters given there."""

    start: int
    end: int  # -1: every layer (a `models:` config)
    models: dict[str, Scope]
    params: Scope


class MergekitConfig:
    """A mergekit config read against the model it merges; `recipe()` is the equivalent recipe."""

    def __init__(self, data: dict[str, Any], where: str, layout: Callable[[str], Layout]):
        self.data, self.where, self._layout = data, where, layout
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise EvomergeError(f"{where}: unknown key {unknown[0]!r} in a mergekit config; expected some of "
                                f"{sorted(_TOP_KEYS)}")
        for key, what in _UNSUPPORTED.items():
            if data.get(key) is not None:
                raise EvomergeError(f"{where}: {key}: evomerge does not read {what}")
        self.method_name = data.get("merge_method")
        self.top = Scope(f"{where}: parameters", self._mapping(data.get("parameters"), "parameters"))

    def _mapping(self, value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise EvomergeError(f"{self.where}: {key}: expected a mapping of parameter -> value, got {value!r}")
        return value

    def _ref(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise EvomergeError(f"{self.where}: {key}: expected a model path or hub id, got {value!r}")
        if "+" in value and not Path(value).is_dir():
            return self._adapter_ref(value, key)
        return value

    def _adapter_ref(self, value: str, key: str) -> str:
        """mergekit's BASE+ADAPTER (a LoRA applied to BASE) is evomerge's reference to the adapter,
        which stands for the base its adapter_config.json names: refused unless that base is BASE."""
        from evomerge import lora
        from evomerge.refs import resolve_path

        if value.count("+") != 1:
            raise EvomergeError(f"{self.where}: {key}: {value!r}: expected BASE+ADAPTER, one '+'")
        base, adapter = value.split("+")
        path = resolve_path(adapter)
        if not lora.is_adapter(path):
            raise EvomergeError(f"{self.where}: {key}: {value!r}: {adapter!r} is not a PEFT adapter folder "
                                f"({lora.CONFIG} + {lora.WEIGHTS})")
        named = lora.read_config(path, adapter)["base_model_name_or_path"]
        if named != base and not (Path(named).is_dir() and Path(base).is_dir()
                                  and Path(named).resolve() == Path(base).resolve()):
            raise EvomergeError(f"{self.where}: {key}: {value!r}: the adapter adapts {named!r} ({lora.CONFIG}), not "
                                f"{base!r}; evomerge applies an adapter to the base it names")
        return adapter

    @cached_property
    def layout(self) -> Layout:
        first = self.base or next(iter(self.slices[0].models))
        return self._layout(first)

    # ---- models and slices ------------------------------------------------------------
    @cached_property
    def base(self) -> str | None:
        return self._ref(self.data["base_model"], "base_model") if self.data.get("base_model") is not None else None

    @cached_property
    def slices(self) -> list[Slice]:
        models, slices = self.data.get("models"), self.data.get("slices")
        if (models is None) == (slices is None):
            raise EvomergeError(f"{self.where}: a mergekit config needs exactly one of models and slices")
        if models is not None:
            if not isinstance(models, list) or not models:
                raise EvomergeError(f"{self.where}: models: expected a non-empty list of {{model: PATH, parameters: {{...}}}}")
            scopes = {}
            for i, entry in enumerate(models):
                entry = {"model": entry} if isinstance(entry, str) else entry
                if not isinstance(entry, dict) or set(entry) - {"model", "parameters"}:
                    raise EvomergeError(f"{self.where}: models[{i}]: expected {{model: PATH, parameters: {{...}}}}")
                ref = self._ref(entry.get("model"), f"models[{i}].model")
                scopes[ref] = Scope(f"{self.where}: models[{i}].parameters", self._mapping(entry.get("parameters"),
                                                                                          f"models[{i}].parameters"))
            return [Slice(0, -1, scopes, Scope(f"{self.where}: parameters", {}))]
        if not isinstance(slices, list) or not slices:
            raise EvomergeError(f"{self.where}: slices: expected a non-empty list of {{sources: [...]}}")
        return [self._slice(i, s) for i, s in enumerate(slices)]

    def _slice(self, i: int, data: Any) -> Slice:
        key = f"slices[{i}]"
        if not isinstance(data, dict) or not isinstance(data.get("sources"), list) or not data["sources"]:
            raise EvomergeError(f"{self.where}: {key}: expected {{sources: [{{model: PATH, layer_range: [START, END]}}, ...]}}")
        unknown = sorted(set(data) - {"sources", "parameters", "base_model", "residual_weight"})
        if unknown:
            raise EvomergeError(f"{self.where}: {key}: unknown key {unknown[0]!r}")
        if data.get("residual_weight") is not None:
            raise EvomergeError(f"{self.where}: {key}.residual_weight: evomerge has no residual weighting of slices")
        if data.get("base_model") is not None and data["base_model"] != self.base:
            raise EvomergeError(f"{self.where}: {key}.base_model: evomerge merges every layer against one base_model")
        scopes, ranges = {}, set()
        for j, source in enumerate(data["sources"]):
            where = f"{key}.sources[{j}]"
            if not isinstance(source, dict) or set(source) - {"model", "layer_range", "parameters"}:
                raise EvomergeError(f"{self.where}: {where}: expected {{model: PATH, layer_range: [START, END], parameters: {{...}}}}")
            span = source.get("layer_range")
            if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                    or not 0 <= span[0] < span[1]):
                raise EvomergeError(f"{self.where}: {where}.layer_range: expected [START, END] with 0 <= START < END, got {span!r}")
            ranges.add(tuple(span))
            scopes[self._ref(source.get("model"), f"{where}.model")] = Scope(
                f"{self.where}: {where}.parameters", self._mapping(source.get("parameters"), f"{where}.parameters"))
        if len(ranges) > 1:
            raise EvomergeError(f"{self.where}: {key}: its sources take different layer ranges {sorted(ranges)}; evomerge "
                                "merges each layer with the same layer of every model")
        (start, end), = ranges
        return Slice(start, end, scopes, Scope(f"{self.where}: {key}.parameters",
                                               self._mapping(data.get("parameters"), f"{key}.parameters")))

    # ---- the recipe ---------------------------------------------------------------------
    def recipe(self) -> Recipe:
        dtype, template = self._dtype(), self._chat_template()
        if self.method_name == "passthrough":
            return self._route(dtype, template)
        method = _method(self.method_name, self.where)
        tokenizer_source = self._tokenizer_source()
        self._check_slices()
        refs = list(self.slices[0].models)
        if method.needs_base:
            if self.base is None:
                raise EvomergeError(f"{self.where}: base_model: {method.name} needs one")
            refs = [r for r in refs if r != self.base]  # mergekit lists the base among the models or adds it
        elif self.base is not None and self.base not in refs:
            raise EvomergeError(f"{self.where}: base_model: mergekit's {method.name} adds it as an input without "
                                "parameters; list it under models with its weight instead")
        self._check_params(method)
        sources = [Source(ref, self._set(method.source_params, ref)) for ref in refs]
        options = self._set(method.options, None)
        granularity, sources, options = _coarsest(self.layout.n_layers, sources, options)
        recipe = Recipe(method=method.name, models=sources, base_model=self.base if method.needs_base else None,
                        parameters=options, layer_granularity=granularity, dtype=dtype,
                        tokenizer_source=tokenizer_source, chat_template=template)
        recipe.validate(self.where)
        return recipe

    def _check_slices(self) -> None:
        """Slices of a merge must walk every layer once, in order, with the same models."""
        models = list(self.slices[0].models)
        expected = 0
        for i, s in enumerate(self.slices):
            if list(s.models) != models:
                raise EvomergeError(f"{self.where}: slices[{i}]: merges models {list(s.models)}, slices[0] {models}; "
                                    "evomerge merges one set of models over all layers")
            if s.end != -1 and s.start != expected:
                raise EvomergeError(f"{self.where}: slices[{i}].layer_range starts at {s.start}, not {expected}: evomerge "
                                    "merges each layer in place (no layer dropped, repeated or moved)")
            expected = s.end
        n = self.layout.n_layers
        if self.slices[-1].end not in (-1, n):
            raise EvomergeError(f"{self.where}: slices end at layer {expected}, but the models have {n} layers")

    def _check_params(self, method: MergeMethod) -> None:
        """Every parameter is one evomerge has, at a level where mergekit reads it."""
        per_model, shared = set(method.source_params), set(method.options) - {"rescale_mode"}
        model_scopes = [m for s in self.slices for m in s.models.values()]
        for scope in [self.top, *(s.params for s in self.slices), *model_scopes]:
            for name in scope.params:
                if name not in per_model | shared | set(_MERGEKIT_ONLY_PARAMS):
                    raise EvomergeError(f"{scope.where}.{name}: not a parameter of {method.name} in evomerge "
                                        f"(it takes {sorted(per_model | shared)})")
                if scope in model_scopes and name not in per_model:
                    raise EvomergeError(f"{scope.where}.{name}: a method-wide option, which mergekit ignores on a model; "
                                        "move it to the top-level parameters")
        for name, matching in _MERGEKIT_ONLY_PARAMS.items():
            values = {resolve(name, [s.params, self.top], tensor, t, False) for tensor, _, s, t in self._positions}
            if values - {None, matching}:
                raise EvomergeError(f"{self.where}: {name}: {sorted(values - {None})} has no evomerge equivalent "
                                    f"(evomerge computes in float32; only {name}: {str(matching).lower()} matches)")

    @cached_property
    def _positions(self) -> list[tuple[str, int | None, Slice, float]]:
        """Every tensor with its layer, the slice that holds it and its gradient position t, as mergekit plans them:
        t = index in the slice / (slice length - 1) (1 for a one-layer slice); 0 outside the layers."""
        n = self.layout.n_layers
        out = []
        for tensor, layer in self.layout.layers.items():
            if layer is None:
                # mergekit reads embeddings with the first slice's parameters, final norm and head with the last's
                out += [(tensor, None, self.slices[0], 0.0), (tensor, None, self.slices[-1], 0.0)]
                continue
            s = next(s for s in self.slices if s.end == -1 or s.start <= layer < s.end)
            start, end = (0, n) if s.end == -1 else (s.start, s.end)
            out.append((tensor, layer, s, (layer - start) / (end - start - 1) if end - start > 1 else 1))
        return out

    def _set(self, params: Mapping[str, Any], ref: str | None) -> dict[str, list[Any]]:
        """The parameters the config sets (per layer, then the rest), for model `ref` or method-wide (None)."""
        values = {name: self._values(name, default, ref) for name, default in params.items() if name != "rescale_mode"}
        return {name: v for name, v in values.items() if v is not None}

    def _values(self, name: str, default: Any, ref: str | None) -> list[Any] | None:
        """One value per layer and one for the rest (None: never set, the method's default applies)."""
        numeric = not isinstance(default, bool)
        found: dict[int | None, tuple[Any, str]] = {}
        ever_set = False
        for tensor, layer, s, t in self._positions:
            scopes = ([s.models[ref]] if ref is not None else []) + [s.params, self.top]
            value = resolve(name, scopes, tensor, t, numeric)
            ever_set |= value is not None
            value = default if value is None else value
            if layer in found and found[layer][0] != value:
                where = f"layer {layer}" if layer is not None else "embeddings, final norm and head"
                owner = f" of model {ref!r}" if ref is not None else ""
                raise EvomergeError(
                    f"{self.where}: {name}{owner} differs inside {where} ({found[layer][0]!r} for {found[layer][1]}, "
                    f"{value!r} for {self._label(tensor, s)}); evomerge holds one value per layer and one for the "
                    "tensors outside them")
            found[layer] = (value, self._label(tensor, s))
        if not ever_set and default is not None:
            return None
        if any(v is None for v, _ in found.values()):
            owner = f" of model {ref!r}" if ref is not None else ""
            raise EvomergeError(f"{self.where}: {name}{owner} is not set for every tensor, and has no default")
        return [found[layer][0] for layer in range(self.layout.n_layers)] + [found[None][0]]

    def _label(self, tensor: str, s: Slice) -> str:
        if len(self.slices) == 1 or self.layout.layers[tensor] is not None:
            return tensor
        return f"{tensor} read with slices[{self.slices.index(s)}]'s parameters"

    def _dtype(self) -> str:
        dtype = self.data.get("out_dtype") or self.data.get("dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise EvomergeError(f"{self.where}: {'out_dtype' if self.data.get('out_dtype') else 'dtype'}: expected one of "
                                f"{DTYPES}, got {dtype!r}")
        return dtype

    def _tokenizer_source(self) -> str | None:
        source = self.data.get("tokenizer_source")
        if source is not None and source not in TOKENIZER_SOURCES:
            self._ref(source, "tokenizer_source")
        return source

    def _chat_template(self) -> str | None:
        template = self.data.get("chat_template")
        if template is not None and not ("{{" in str(template) or "{%" in str(template)):
            raise EvomergeError(f"{self.where}: chat_template: {template!r} names one of mergekit's built-in templates; "
                                "give the Jinja template text (or a model of the recipe, in a recipe YAML)")
        return template

    def _route(self, dtype: str, template: str | None) -> Recipe:
        if self.data.get("slices") is None:
            raise EvomergeError(f"{self.where}: models: passthrough of whole models copies one model; evomerge reads "
                                "passthrough slices (one model each) as a layer route")
        steps = []
        for i, s in enumerate(self.slices):
            if len(s.models) != 1:
                raise EvomergeError(f"{self.where}: slices[{i}].sources: passthrough takes one model per slice")
            (ref, scope), = s.models.items()
            for where in (scope, s.params, self.top):
                if where.params:
                    raise EvomergeError(f"{where.where}: passthrough parameters (scale) have no evomerge equivalent")
            steps += [Step(ref, layer) for layer in range(s.start, s.end)]
        ends = {steps[0].model, steps[-1].model}
        if len(ends) > 1:
            raise EvomergeError(f"{self.where}: slices: passthrough takes embeddings from {steps[0].model!r} and the head "
                                f"from {steps[-1].model!r}; an evomerge route takes both from one model")
        recipe = Recipe(method=None, models=[], route=Route(steps, steps[0].model), dtype=dtype, chat_template=template)
        recipe.validate(self.where)
        return recipe


def _method(name: Any, where: str) -> MergeMethod:
    try:
        return get_method(name)
    except EvomergeError as exc:
        raise EvomergeError(f"{where}: merge_method: {exc}") from None


def _coarsest(n_layers: int, sources: list[Source], options: dict[str, list[Any]]) -> tuple[int, list[Source], dict[str, Any]]:
    """Per-layer values at the coarsest layer_granularity they are constant over (0: all layers one group),
    each parameter a scalar where all its groups agree."""
    columns = [v for s in sources for v in s.parameters.values()] + list(options.values())
    for granularity in [0, *range(n_layers - 1, 0, -1)]:
        size = granularity or n_layers
        if all(len(set(col[g:min(g + size, n_layers)])) == 1 for col in columns for g in range(0, n_layers, size)):
            break

    def grouped(col: list[Any]) -> Any:
        size = granularity or n_layers
        values = [col[g] for g in range(0, n_layers, size)] + [col[-1]]
        return values[0] if len(set(values)) == 1 else values

    return (granularity, [Source(s.model, {k: grouped(v) for k, v in s.parameters.items()}) for s in sources],
            {k: grouped(v) for k, v in options.items()})


def from_mergekit(data: dict[str, Any], where: str, layout: Callable[[str], Layout]) -> Recipe:
    """The recipe equivalent to mergekit config `data`; `layout(ref)` reads a model's tensor names."""
    return MergekitConfig(data, where, layout).recipe()
