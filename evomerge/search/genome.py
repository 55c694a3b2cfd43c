"""Search spaces and the genome <-> recipe codec, in one place.

A search space YAML names a merge method and which of its parameters are evolved:

    method: dare_ties
    layer_granularity: null          # null: one value per source for the whole model;
                                     # k: one per k decoder layers, plus one for embeddings/norm/head
    per_source:                      # evolved for every source model (and group)
      weight: {low: 0.0, high: 1.5, init: 0.5}
      density: {low: 0.01, high: 1.0, init: 0.5}
    shared: {}                       # evolved method-wide options (per group), e.g. lambda
    options: {normalize: false}      # fixed method-wide options
    seed: 0                          # DARE/DELLA mask seed of every candidate

The genome is a flat dict of floats named `weight/s0` (source 0, whole model) or
`weight/s0/g2` (source 0, group 2), and `lambda` or `lambda/g2` for shared genes, so the
names read well in optuna-dashboard and stay stable while models keep their order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import FloatDistribution

from evomerge.errors import EvomergeError
from evomerge.merge import get_method
from evomerge.recipe import Recipe, Source, n_groups
from evomerge.yamlio import check_keys, load_yaml_mapping

_KEYS = {"method", "layer_granularity", "per_source", "shared", "options", "seed", "description"}


@dataclass(frozen=True)
class Gene:
    low: float
    high: float
    init: float


@dataclass(frozen=True)
class SearchSpace:
    method: str
    per_source: dict[str, Gene]
    shared: dict[str, Gene]
    options: dict[str, Any]
    layer_granularity: int | None = None
    seed: int = 0

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        return cls.from_dict(load_yaml_mapping(path, "search space"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "search space") -> "SearchSpace":
        check_keys(data, _KEYS, where)
        if "method" not in data:
            raise EvomergeError(f"{where}: missing key 'method'")
        method = get_method(data["method"])
        granularity = data.get("layer_granularity")
        if granularity is not None and (not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 0):
            raise EvomergeError(f"{where}: layer_granularity must be null or an integer >= 0, got {granularity!r}")
        per_source = _genes(data.get("per_source"), method.source_params, f"{where}: per_source")
        shared = _genes(data.get("shared"), method.options, f"{where}: shared")
        options = dict(data.get("options") or {})
        bad = set(options) - set(method.options)
        if bad:
            raise EvomergeError(f"{where}: options {sorted(bad)} are not options of {method.name}; it takes {sorted(method.options)}")
        if not per_source and not shared:
            raise EvomergeError(f"{where}: nothing to search: add genes under per_source or shared")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise EvomergeError(f"{where}: seed must be an integer, got {seed!r}")
        return cls(method.name, per_source, shared, options, granularity, seed)


def _genes(data: Any, allowed: Any, where: str) -> dict[str, Gene]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EvomergeError(f"{where}: expected a mapping of parameter -> {{low, high, init}}")
    genes = {}
    for name, spec in data.items():
        if name not in allowed:
            raise EvomergeError(f"{where}.{name}: not a parameter of this method; it takes {sorted(allowed)}")
        if not isinstance(spec, dict) or set(spec) - {"low", "high", "init"} or not {"low", "high"} <= set(spec):
            raise EvomergeError(f"{where}.{name}: expected {{low: NUMBER, high: NUMBER, init: NUMBER (optional)}}, got {spec!r}")
        low, high = spec["low"], spec["high"]
        init = spec.get("init", (low + high) / 2 if _is_number(low) and _is_number(high) else None)
        if not all(_is_number(v) for v in (low, high, init)):
            raise EvomergeError(f"{where}.{name}: low, high and init must be finite numbers, got {spec!r}")
        if not low < high:
            raise EvomergeError(f"{where}.{name}: low ({low}) must be below high ({high})")
        if not low <= init <= high:
            raise EvomergeError(f"{where}.{name}: init {init} lies outside [{low}, {high}]")
        genes[name] = Gene(float(low), float(high), float(init))
    return genes


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Genome:
    """The codec for one search space applied to concrete models (their count and depth fix the genes)."""

    def __init__(self, space: SearchSpace, models: list[str], base_model: str | None, n_layers: int):
        method = get_method(space.method)
        if method.needs_base and not base_model:
            raise EvomergeError(f"search space method {space.method} needs a base_model in the run config")
        if len(models) < method.min_sources or (method.max_sources is not None and len(models) > method.max_sources):
            raise EvomergeError(f"{space.method} takes {method.min_sources}"
                                f"{'' if method.max_sources == method.min_sources else '+'} model(s) besides the base, got {len(models)}")
        self.space, self.models, self.base_model, self.n_layers = space, list(models), base_model, n_layers
        self.groups = None if space.layer_granularity is None else n_groups(n_layers, space.layer_granularity)
        self.genes: dict[str, Gene] = {}
        for i in range(len(models)):
            for param, gene in space.per_source.items():
                for suffix in self._group_suffixes():
                    self.genes[f"{param}/s{i}{suffix}"] = gene
        for option, gene in space.shared.items():
            for suffix in self._group_suffixes():
                self.genes[f"{option}{suffix}"] = gene

    def _group_suffixes(self) -> list[str]:
        return [""] if self.groups is None else [f"/g{g}" for g in range(self.groups)]

    @property
    def distributions(self) -> dict[str, FloatDistribution]:
        return {name: FloatDistribution(g.low, g.high) for name, g in self.genes.items()}

    @property
    def x0(self) -> dict[str, float]:
        return {name: g.init for name, g in self.genes.items()}

    def _value(self, params: dict[str, float], name: str) -> float | list[float]:
        if self.groups is None:
            return float(params[name])
        return [float(params[f"{name}/g{g}"]) for g in range(self.groups)]

    def decode(self, params: dict[str, float]) -> Recipe:
        missing = sorted(set(self.genes) - set(params))
        if missing:
            raise EvomergeError(f"genome lacks gene(s) {missing[:3]}; the study was made with another search space")
        sources = [Source(model, {p: self._value(params, f"{p}/s{i}") for p in self.space.per_source})
                   for i, model in enumerate(self.models)]
        options = {**self.space.options, **{o: self._value(params, o) for o in self.space.shared}}
        recipe = Recipe(method=self.space.method, models=sources, base_model=self.base_model, parameters=options,
                        layer_granularity=self.space.layer_granularity or 0, seed=self.space.seed)
        recipe.validate()
        return recipe

    def encode(self, recipe: Recipe) -> dict[str, float]:
        """The genes of a recipe this genome could have produced (inverse of decode)."""
        params: dict[str, float] = {}
        for i, source in enumerate(recipe.models):
            for p in self.space.per_source:
                self._store(params, f"{p}/s{i}", source.parameters[p])
        for o in self.space.shared:
            self._store(params, o, recipe.parameters[o])
        return params

    def _store(self, params: dict[str, float], name: str, value: float | list[float]) -> None:
        if self.groups is None:
            params[name] = float(value)
        else:
            for g, v in enumerate(value):
                params[f"{name}/g{g}"] = float(v)
