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

Groups are the decoder-layer groups in order, then one group for every tensor outside the
decoder layers (embeddings, final norm, lm_head). A per-group list has one value per group.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.merge import get_method
from evomerge.yamlio import check_keys, load_yaml_mapping

DTYPES = ("bfloat16", "float16", "float32")
_LAYER = re.compile(r"^(.*?\blayers\.(\d+)\.)")

Value = float | bool | list[float]


def layer_prefix(tensor_name: str) -> tuple[str, int] | None:
    """('model.layers.3.', 3) for a decoder-layer tensor, None for embeddings, norm, head."""
    match = _LAYER.match(tensor_name)
    return (match.group(1), int(match.group(2))) if match else None


def n_groups(n_layers: int, granularity: int) -> int:
    return (math.ceil(n_layers / granularity) if granularity > 0 else 1) + 1


def group_of(tensor_name: str, n_layers: int, granularity: int) -> int:
    """Index of the tensor's group: its layer group, or the last group for non-layer tensors."""
    found = layer_prefix(tensor_name)
    if found is None:
        return n_groups(n_layers, granularity) - 1
    return found[1] // granularity if granularity > 0 else 0


@dataclass
class Source:
    model: str
    parameters: dict[str, Value] = field(default_factory=dict)


@dataclass
class Recipe:
    method: str
    models: list[Source]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_granularity: int = 0
    seed: int = 0
    dtype: str = "bfloat16"

    # ---- construction and validation -------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise EvomergeError(f"{where}: expected a mapping with keys method, models, ...; got {type(data).__name__}")
        known = {"method", "models", "base_model", "parameters", "layer_granularity", "seed", "dtype"}
        check_keys(data, known, where)
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
            dtype=data.get("dtype", "bfloat16"),
        )
        recipe.validate(where)
        return recipe

    def validate(self, where: str = "recipe") -> None:
        """Everything that can be checked without the models: names, types, counts, finiteness."""
        method = get_method(self.method)
        if not isinstance(self.layer_granularity, int) or isinstance(self.layer_granularity, bool) or self.layer_granularity < 0:
            raise EvomergeError(f"{where}: layer_granularity must be an integer >= 0, got {self.layer_granularity!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise EvomergeError(f"{where}: seed must be an integer, got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise EvomergeError(f"{where}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if method.needs_base and not self.base_model:
            raise EvomergeError(f"{where}: method {self.method} needs base_model")
        n = len(self.models)
        if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
            raise EvomergeError(f"{where}: {self.method} takes {method.min_sources}"
                                f"{'' if method.max_sources == method.min_sources else '+'} model(s) besides the base, got {n}")
        for i, source in enumerate(self.models):
            _check_values(source.parameters, method.source_params, f"{where}: models[{i}].parameters", numbers_only=True)
        _check_values(self.parameters, method.options, f"{where}: parameters", numbers_only=False)

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
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise EvomergeError(f"{where}.{key}: expected a finite number or a list of them, got {v!r}")
