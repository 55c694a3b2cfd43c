"""A recipe: the plain, serializable description of one merged candidate.

    method: ties                      # a name from evomerge.merge.METHODS
    base_model: evomerge/zoo_models/base
    models:
      - model: evomerge/zoo_models/expert_rev
        parameters: {weight: 0.6, density: [0.5, 0.7, 0.4]}   # scalar, or one value per group
    parameters: {normalize: true}     # method-wide options (also scalar or per group)
    layer_granularity: 2              # decoder layers per group; 0 = all layers in one group
    seed: 0                           # keys DARE/DELLA masks (with each tensor's name)
    dtype: bfloat16                   # dtype of the merged weights (arithmetic is float32)
    tokenizer_source: union           # optional, as in mergekit: base | union | a model of this recipe
    chat_template: evomerge/zoo_models/expert_rev   # optional: a model of this recipe, or a Jinja template

Groups are the decoder-layer groups in order, then one group for every tensor outside the
decoder layers (embeddings, final norm, lm_head, a multimodal model's vision tower and
projector). A per-group list has one value per group. Which tensors are in which layer is
read from the model itself (evomerge.layouts), whatever the architecture names them.

Without `tokenizer_source` the models must share one vocabulary and the merged model takes
the tokenizer of the base model (of the first model without one; of `embed_from` for a route);
with it, embeddings and head are re-indexed to the chosen vocabulary first (evomerge.vocab).
The export takes generation_config.json from the tokenizer's model and the chat template
from `chat_template` (default: the tokenizer's own).

A recipe may also (or only) route layers, the paper's data-flow-space merge:

    route:
      embed_from: evomerge/zoo_models/expert_rev     # embeddings, final norm and head
      layers:                                        # the path, in order; a layer may repeat
        - {model: evomerge/zoo_models/expert_rev, layer: 0}
        - {model: evomerge/zoo_models/expert_srt, layer: 2, scale: 0.8}
        - {model: merged, layer: 3}                  # `merged`: this recipe's parameter-space merge

`scale` (default 1, > 0) multiplies the hidden state entering that step, as the paper's
matrix W does at each transition. Without `method`, the recipe is a pure route (no `models`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.methods import get_method
from evomerge.yamlio import check_keys, load_yaml_mapping

DTYPES = ("bfloat16", "float16", "float32")
MERGED = "merged"  # route source name for the recipe's own parameter-space merge
_PS_KEYS = {"models", "base_model", "parameters", "layer_granularity", "seed", "tokenizer_source"}
TOKENIZER_SOURCES = ("base", "union")

Value = float | bool | list[float]


def n_groups(n_layers: int, granularity: int) -> int:
    return (math.ceil(n_layers / granularity) if granularity > 0 else 1) + 1


def group_of(layer: int | None, n_layers: int, granularity: int) -> int:
    """Index of a tensor's group from its decoder layer: the layer's group, or the last group for
    tensors outside the decoder layers (layer None)."""
    if layer is None:
        return n_groups(n_layers, granularity) - 1
    return layer // granularity if granularity > 0 else 0


@dataclass
class Source:
    model: str
    parameters: dict[str, Value] = field(default_factory=dict)


@dataclass
class Step:
    """One position of a route: a source's decoder layer, and the factor on the hidden state entering it."""

    model: str
    layer: int
    scale: float = 1.0


@dataclass
class Route:
    layers: list[Step]
    embed_from: str

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Route":
        if not isinstance(data, dict) or set(data) != {"layers", "embed_from"} or not isinstance(data["layers"], list):
            raise EvomergeError(f"{where}: expected {{embed_from: MODEL, layers: [{{model: MODEL, layer: N, scale: S}}, ...]}}")
        steps = []
        for i, step in enumerate(data["layers"]):
            if not isinstance(step, dict) or not {"model", "layer"} <= set(step) or set(step) - {"model", "layer", "scale"}:
                raise EvomergeError(f"{where}.layers[{i}]: expected {{model: MODEL, layer: N, scale: S (optional)}}, got {step!r}")
            steps.append(Step(step["model"], step["layer"], step.get("scale", 1.0)))
        return cls(steps, data["embed_from"])

    def validate(self, where: str, has_merge: bool) -> None:
        if not self.layers:
            raise EvomergeError(f"{where}.layers is empty; a route needs at least one decoder layer")
        for ref in [self.embed_from, *(s.model for s in self.layers)]:
            if not isinstance(ref, str) or not ref:
                raise EvomergeError(f"{where}: model names must be non-empty strings, got {ref!r}")
            if ref == MERGED and not has_merge:
                raise EvomergeError(f"{where}: '{MERGED}' names this recipe's parameter-space merge, but it has no method")
        for i, step in enumerate(self.layers):
            if not isinstance(step.layer, int) or isinstance(step.layer, bool) or step.layer < 0:
                raise EvomergeError(f"{where}.layers[{i}].layer must be an integer >= 0, got {step.layer!r}")
            if not _is_number(step.scale) or step.scale <= 0:
                raise EvomergeError(f"{where}.layers[{i}].scale must be a finite number > 0 (RMSNorm makes only "
                                    f"positive factors foldable into weights), got {step.scale!r}")

    def to_dict(self) -> dict[str, Any]:
        steps = [{"model": s.model, "layer": s.layer, **({"scale": s.scale} if s.scale != 1.0 else {})} for s in self.layers]
        return {"embed_from": self.embed_from, "layers": steps}


@dataclass
class Recipe:
    method: str | None
    models: list[Source]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_granularity: int = 0
    seed: int = 0
    dtype: str = "bfloat16"
    route: Route | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None

    # ---- construction and validation -------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise EvomergeError(f"{where}: expected a mapping with keys method, models, ...; got {type(data).__name__}")
        check_keys(data, {"method", "dtype", "route", "chat_template", *_PS_KEYS}, where)
        route = Route.from_dict(data["route"], f"{where}: route") if "route" in data else None
        if route is not None and "method" not in data:
            return cls._pure_route(data, route, where)
        for key in ("method", "models"):
            if key not in data:
                raise EvomergeError(f"{where}: missing key {key!r}")
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise EvomergeError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
        sources = []
        for i, entry in enumerate(models):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or set(entry) - {"model", "parameters"}:
                raise EvomergeError(f"{where}: models[{i}] must be {{model: PATH, parameters: {{...}}}}")
            sources.append(Source(entry["model"], dict(entry.get("parameters") or {})))
        recipe = cls(
            method=data["method"], models=sources, base_model=data.get("base_model"),
            parameters=dict(data.get("parameters") or {}),
            layer_granularity=data.get("layer_granularity", 0), seed=data.get("seed", 0),
            dtype=data.get("dtype", "bfloat16"), route=route, tokenizer_source=data.get("tokenizer_source"),
            chat_template=data.get("chat_template"),
        )
        recipe.validate(where)
        return recipe

    @classmethod
    def _pure_route(cls, data: dict[str, Any], route: Route, where: str) -> "Recipe":
        stray = sorted(_PS_KEYS & set(data))
        if stray:
            raise EvomergeError(f"{where}: {stray} describe a parameter-space merge; add its `method` or remove them")
        recipe = cls(method=None, models=[], dtype=data.get("dtype", "bfloat16"), route=route,
                     chat_template=data.get("chat_template"))
        recipe.validate(where)
        return recipe

    @property
    def name(self) -> str:
        """'ties', 'route' or 'ties+route': what kind of merge this is, for messages."""
        return "+".join(filter(None, [self.method, self.route and "route"]))

    @property
    def refs(self) -> list[str]:
        """Every model this recipe reads, each once, in order of first mention."""
        route = [self.route.embed_from, *(s.model for s in self.route.layers)] if self.route else []
        refs = [self.base_model, *(s.model for s in self.models), *route]
        return list(dict.fromkeys(r for r in refs if r and r != MERGED))

    @property
    def primary_model(self) -> str:
        """The model whose tokenizer the merged candidate uses, unless a tokenizer_source says otherwise."""
        if self.route and self.route.embed_from != MERGED:
            return self.route.embed_from
        return self.base_model or self.models[0].model

    @property
    def tokenizer_model(self) -> str:
        """The model whose tokenizer the merge takes (and its chat template, unless `chat_template` says
        otherwise): a tokenizer_source's (`base` and `union` start from the first model), else the primary's."""
        if self.tokenizer_source is None:
            return self.primary_model
        return self.refs[0] if self.tokenizer_source in ("base", "union") else self.tokenizer_source

    def validate(self, where: str = "recipe") -> None:
        """Everything that can be checked without the models: names, types, counts, finiteness."""
        if self.dtype not in DTYPES:
            raise EvomergeError(f"{where}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.route is not None:
            self.route.validate(f"{where}: route", has_merge=self.method is not None)
        if self.method is not None:
            self._validate_merge(where)
        if self.chat_template is not None and not (self.chat_template in self.refs or is_template(self.chat_template)):
            raise EvomergeError(f"{where}: chat_template must name a model of this recipe or be a Jinja template "
                                f"(with {{{{ }}}} or {{% %}}), got {self.chat_template!r}")

    def _validate_merge(self, where: str) -> None:
        method = get_method(self.method)
        if not isinstance(self.layer_granularity, int) or isinstance(self.layer_granularity, bool) or self.layer_granularity < 0:
            raise EvomergeError(f"{where}: layer_granularity must be an integer >= 0, got {self.layer_granularity!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise EvomergeError(f"{where}: seed must be an integer, got {self.seed!r}")
        if method.needs_base and not self.base_model:
            raise EvomergeError(f"{where}: method {self.method} needs base_model")
        n = len(self.models)
        if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
            raise EvomergeError(f"{where}: {self.method} takes {method.min_sources}"
                                f"{'' if method.max_sources == method.min_sources else '+'} model(s) besides the base, got {n}")
        for i, source in enumerate(self.models):
            _check_values(source.parameters, method.source_params, f"{where}: models[{i}].parameters", numbers_only=True)
        _check_values(self.parameters, method.options, f"{where}: parameters", numbers_only=False)
        source = self.tokenizer_source
        if source is not None and source not in TOKENIZER_SOURCES and source not in self.refs:
            raise EvomergeError(f"{where}: tokenizer_source must be base, union or a model of this recipe, got {source!r}")

    # ---- per-group resolution --------------------------------------------------------
    def check_groups(self, n_layers: int) -> None:
        """Per-group lists must have one value per group of a model with n_layers decoder layers."""
        expected = n_groups(n_layers, self.layer_granularity)
        for where, params in [("parameters", self.parameters)] + [(f"models[{i}].parameters", s.parameters) for i, s in enumerate(self.models)]:
            for key, value in params.items():
                if isinstance(value, list) and len(value) != expected:
                    raise EvomergeError(
                        f"recipe: {where}.{key} has {len(value)} values but a {n_layers}-layer model with "
                        f"layer_granularity {self.layer_granularity} has {expected} groups ({expected - 1} layer group(s) + 1 for embeddings/norm/head)"
                    )

    def source_params(self, group: int) -> list[dict[str, float]]:
        return [{k: _at(v, group) for k, v in s.parameters.items()} for s in self.models]

    def options(self, group: int) -> dict[str, Any]:
        return {k: _at(v, group) for k, v in self.parameters.items()}

    # ---- serialization ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = [{"model": s.model, **({"parameters": s.parameters} if s.parameters else {})} for s in self.models]
        if self.base_model is None:
            del data["base_model"]
        if self.route is None:
            del data["route"]
        else:
            data["route"] = self.route.to_dict()
        for key in ("tokenizer_source", "chat_template"):
            if data[key] is None:
                del data[key]
        if self.method is None:
            data = {"route": data["route"], "dtype": self.dtype,
                    **({"chat_template": self.chat_template} if self.chat_template else {})}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(load_yaml_mapping(path, "recipe"), where=str(path))


def _at(value: Value, group: int) -> Any:
    return value[group] if isinstance(value, list) else value


def _check_values(values: dict[str, Any], allowed: Any, where: str, numbers_only: bool) -> None:
    """Per-source parameters are numbers; method-wide options may also be flags or names (normalize, rescale_mode)."""
    for key, value in values.items():
        if key not in allowed:
            raise EvomergeError(f"{where}: unknown parameter {key!r}; this method takes {sorted(allowed) or 'none'}")
        for v in value if isinstance(value, list) else [value]:
            if not numbers_only and isinstance(v, (bool, str)):
                continue
            if not _is_number(v):
                raise EvomergeError(f"{where}.{key}: expected a finite number or a list of them, got {v!r}")


def is_template(text: Any) -> bool:
    return isinstance(text, str) and ("{{" in text or "{%" in text)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
