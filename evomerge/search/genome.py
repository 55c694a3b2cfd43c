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
    x0: my_merge.yml                 # optional: a recipe or mergekit config where CMA-ES's mean starts

`x0` maps a hand-made merge into the genes (evomerge.mergekit_in reads mergekit's filters and
gradients): each evolved parameter the config sets for a model of the run (matched by its
reference) or method-wide starts at its value, a coarser gene at the mean of the layers it
covers (the tensors outside the layers count as one layer); the other genes start at their
`init`. A value outside its gene's bounds is refused. Only CMA-ES starts from x0.

The genome is a flat dict of floats named `weight/s0` (source 0, whole model) or
`weight/s0/g2` (source 0, group 2), and `lambda` or `lambda/g2` for shared genes, so the
names read well in optuna-dashboard and stay stable while models keep their order.

A `route:` section evolves layer routing (the paper's data-flow space), alone (no `method`)
or on top of the parameter-space merge (PS+DFS):

    route:
      sources: [merged, 0]     # route sources: `merged` (this space's PS merge) and run-config model
                               # indices; default: every model. The first one gives embeddings and head.
      repeats: 3               # r: T = M x r indicator slots, M = all layers of the sources in order
      max_path_length: null    # null: 2 x source depth
      indicator: {low: -1, high: 1, init: 0.5}   # a slot is on when its gene > 0; x0 is +init on the
                               # first source's first repetition (its own layers in order), -init elsewhere
      scaling: matrix          # matrix: W[i][j] scales the input of layer j coming from layer i (M x M
                               # genes, the paper's); per_layer: one factor per layer entered (M genes); none
      scale: {low: 0.5, high: 2.0, init: 1.0}

Genes: `route/r1/s0.l3` (repetition 1, route source 0, layer 3), `scale/s0.l3>s1.l0` (matrix)
or `scale/s1.l0` (per_layer). The first step has no incoming transition, so it is unscaled.
Decoding never fails on a routing genome: a path with more than max_path_length slots on
keeps the max_path_length slots with the largest genes (in slot order), and a path with none
on keeps the single largest slot, so every decoded route has 1..max_path_length layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from optuna.distributions import FloatDistribution

from evomerge.errors import EvomergeError
from evomerge.merge import get_method
from evomerge.recipe import MERGED, Recipe, Route, Source, Step, group_of, n_groups
from evomerge.yamlio import check_keys, load_yaml_mapping

_KEYS = {"method", "layer_granularity", "per_source", "shared", "options", "seed", "route", "description", "x0"}
_ROUTE_KEYS = {"sources", "repeats", "max_path_length", "indicator", "scaling", "scale"}
SCALINGS = ("matrix", "per_layer", "none")


@dataclass(frozen=True)
class Gene:
    low: float
    high: float
    init: float


@dataclass(frozen=True)
class RouteSpace:
    sources: tuple[str | int, ...] | None = None
    repeats: int = 3
    max_path_length: int | None = None
    indicator: Gene = Gene(-1.0, 1.0, 0.5)
    scaling: str = "matrix"
    scale: Gene = Gene(0.5, 2.0, 1.0)

    @classmethod
    def from_dict(cls, data: Any, has_method: bool, where: str) -> "RouteSpace":
        if not isinstance(data, dict):
            raise EvomergeError(f"{where}: expected a mapping with keys {sorted(_ROUTE_KEYS)}")
        check_keys(data, _ROUTE_KEYS, where)
        sources = data.get("sources")
        if sources is not None and (not isinstance(sources, list) or not sources or not all(
                s == MERGED or (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in sources)):
            raise EvomergeError(f"{where}.sources: expected a list of '{MERGED}' and model indices (0, 1, ...), got {sources!r}")
        if sources and MERGED in sources and not has_method:
            raise EvomergeError(f"{where}.sources: '{MERGED}' is the parameter-space merge, but this space has no method")
        for key, minimum in (("repeats", 1), ("max_path_length", 1)):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
                raise EvomergeError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
        if data.get("scaling", "matrix") not in SCALINGS:
            raise EvomergeError(f"{where}.scaling: expected one of {SCALINGS}, got {data['scaling']!r}")
        genes = _genes({k: data[k] for k in ("indicator", "scale") if k in data}, {"indicator", "scale"}, where)
        indicator = genes.get("indicator", cls.indicator)
        if not indicator.low < 0 < indicator.high or not 0 < indicator.init <= -indicator.low:
            raise EvomergeError(f"{where}.indicator: need low < 0 < high and 0 < init <= -low (favoured slots start at "
                                f"+init, the others at -init), got {indicator}")
        scale = genes.get("scale", cls.scale)
        if scale.low <= 0:
            raise EvomergeError(f"{where}.scale: low must be > 0 (only positive factors fold into weights), got {scale.low}")
        return cls(tuple(sources) if sources else None, data.get("repeats", 3), data.get("max_path_length"),
                   indicator, data.get("scaling", "matrix"), scale)


@dataclass(frozen=True)
class SearchSpace:
    method: str | None
    per_source: dict[str, Gene]
    shared: dict[str, Gene]
    options: dict[str, Any]
    layer_granularity: int | None = None
    seed: int = 0
    route: RouteSpace | None = None
    x0: str | None = None  # a recipe or mergekit config file (paths are relative to the working directory)

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        return cls.from_dict(load_yaml_mapping(path, "search space"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "search space") -> "SearchSpace":
        check_keys(data, _KEYS, where)
        route = RouteSpace.from_dict(data["route"], "method" in data, f"{where}: route") if "route" in data else None
        x0 = data.get("x0")
        if x0 is not None and (not isinstance(x0, str) or not Path(x0).is_file()):
            raise EvomergeError(f"{where}: x0: expected a recipe or mergekit config file, got {x0!r} (paths are "
                                f"relative to {Path.cwd()})")
        if "method" not in data:
            if route is None:
                raise EvomergeError(f"{where}: missing key 'method'")
            stray = sorted({"per_source", "shared", "options", "layer_granularity", "seed"} & set(data))
            if stray:
                raise EvomergeError(f"{where}: {stray} describe a parameter-space merge; add its `method` or remove them")
            return cls(None, {}, {}, {}, route=route, x0=x0)
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
        if not per_source and not shared and route is None:
            raise EvomergeError(f"{where}: nothing to search: add genes under per_source, shared or route")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise EvomergeError(f"{where}: seed must be an integer, got {seed!r}")
        return cls(method.name, per_source, shared, options, granularity, seed, route, x0)


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


def _check_models(method_name: str, models: list[str], base_model: str | None) -> None:
    method = get_method(method_name)
    if method.needs_base and not base_model:
        raise EvomergeError(f"search space method {method_name} needs a base_model in the run config")
    if len(models) < method.min_sources or (method.max_sources is not None and len(models) > method.max_sources):
        raise EvomergeError(f"{method_name} takes {method.min_sources}"
                            f"{'' if method.max_sources == method.min_sources else '+'} model(s) besides the base, got {len(models)}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RouteCodec:
    """Indicator and scale genes <-> a route, for route sources of `n_layers` layers each."""

    def __init__(self, space: RouteSpace, refs: list[str], n_layers: int):
        self.space, self.refs, self.n_layers = space, refs, n_layers
        self.m = len(refs) * n_layers
        self.max_length = space.max_path_length or 2 * n_layers
        self.slots = [f"route/r{t // self.m}/{self._label(t % self.m)}" for t in range(self.m * space.repeats)]
        low, high, init = space.indicator.low, space.indicator.high, space.indicator.init
        self.genes = {name: Gene(low, high, init if t < n_layers else -init) for t, name in enumerate(self.slots)}
        self.genes.update({name: space.scale for name in self._scale_names()})

    def _label(self, m: int) -> str:
        return f"s{m // self.n_layers}.l{m % self.n_layers}"

    def _scale_name(self, previous: int, m: int) -> str | None:
        if self.space.scaling == "matrix":
            return f"scale/{self._label(previous)}>{self._label(m)}"
        return f"scale/{self._label(m)}" if self.space.scaling == "per_layer" else None

    def _scale_names(self) -> list[str]:
        return list(dict.fromkeys(filter(None, (self._scale_name(i, j) for i in range(self.m) for j in range(self.m)))))

    def decode(self, params: dict[str, float]) -> Route:
        on = [t for t, name in enumerate(self.slots) if params[name] > 0]
        if len(on) > self.max_length or not on:  # documented: keep the strongest slots, at least one
            ranked = sorted(on or range(len(self.slots)), key=lambda t: (-params[self.slots[t]], t))
            on = sorted(ranked[:self.max_length if on else 1])
        path = [t % self.m for t in on]
        steps = []
        for position, m in enumerate(path):
            name = self._scale_name(path[position - 1], m) if position else None
            steps.append(Step(self.refs[m // self.n_layers], m % self.n_layers, float(params[name]) if name else 1.0))
        return Route(steps, self.refs[0])

    def encode(self, route: Route) -> dict[str, float]:
        """Genes decoding to `route`: each step in the earliest free slot of its layer; unused genes at their init."""
        on, scales, t, previous = [], {}, 0, None
        for i, step in enumerate(route.layers):
            m = self._index(step, i)
            t += (m - t) % self.m
            if t >= len(self.slots) or i >= self.max_length:
                raise EvomergeError(f"route step {i} does not fit {self.space.repeats} repetitions of the sources' layers "
                                    f"or max_path_length {self.max_length}")
            name = self._scale_name(previous, m) if previous is not None else None
            if step.scale != (1.0 if name is None else scales.setdefault(name, step.scale)):
                raise EvomergeError(f"route step {i} has scale {step.scale}, which this search space cannot express "
                                    "(the first step is unscaled; a gene gives one scale per transition or layer)")
            on.append(t)
            t, previous = t + 1, m
        params = {name: self.space.indicator.high if t in on else self.space.indicator.low for t, name in enumerate(self.slots)}
        params.update({name: self.space.scale.init for name in self._scale_names()})
        params.update({name: float(v) for name, v in scales.items()})
        return params

    def _index(self, step: Step, i: int) -> int:
        if step.model not in self.refs or step.layer >= self.n_layers:
            raise EvomergeError(f"route step {i} ({step.model!r} layer {step.layer}) is not among this search space's "
                                f"route sources {self.refs} (layers 0..{self.n_layers - 1})")
        return self.refs.index(step.model) * self.n_layers + step.layer


class Genome:
    """The codec for one search space applied to concrete models (their count and depth fix the genes)."""

    def __init__(self, space: SearchSpace, models: list[str], base_model: str | None, n_layers: int,
                 tokenizer_source: str | None = None):
        if space.method is not None:
            _check_models(space.method, models, base_model)
        self.space, self.models, self.base_model, self.n_layers = space, list(models), base_model, n_layers
        self.tokenizer_source = tokenizer_source
        self.groups = None if space.layer_granularity is None else n_groups(n_layers, space.layer_granularity)
        self.genes: dict[str, Gene] = {}
        for i in range(len(models) if space.method else 0):
            for param, gene in space.per_source.items():
                for suffix in self._group_suffixes():
                    self.genes[f"{param}/s{i}{suffix}"] = gene
        for option, gene in space.shared.items():
            for suffix in self._group_suffixes():
                self.genes[f"{option}{suffix}"] = gene
        self.route = RouteCodec(space.route, self._route_refs(), n_layers) if space.route else None
        self.genes.update(self.route.genes if self.route else {})

    def _route_refs(self) -> list[str]:
        sources = self.space.route.sources or range(len(self.models))
        bad = [s for s in sources if s != MERGED and s >= len(self.models)]
        if bad:
            raise EvomergeError(f"search space route.sources names model index {bad[0]}, but the run config has "
                                f"{len(self.models)} models (indices 0..{len(self.models) - 1})")
        return [MERGED if s == MERGED else self.models[s] for s in sources]

    def _group_suffixes(self) -> list[str]:
        return [""] if self.groups is None else [f"/g{g}" for g in range(self.groups)]

    @property
    def distributions(self) -> dict[str, FloatDistribution]:
        return {name: FloatDistribution(g.low, g.high) for name, g in self.genes.items()}

    @cached_property
    def x0(self) -> dict[str, float]:
        """Where the search starts: every gene's init, or the search space's x0 config mapped into the genes."""
        x0 = {name: g.init for name, g in self.genes.items()}
        if self.space.x0 is not None:
            from evomerge.mergekit_in import load_recipe

            x0.update(self.starting_genes(load_recipe(self.space.x0), f"x0 {self.space.x0}"))
        return x0

    def starting_genes(self, recipe: Recipe, where: str) -> dict[str, float]:
        """The genes `recipe` sets (see the module docstring: by model reference and parameter name)."""
        genes: dict[str, float] = {}
        recipe.check_groups(self.n_layers)
        if self.space.method is not None and recipe.method is not None:
            unknown = [s.model for s in recipe.models if s.model not in self.models]
            if unknown:
                raise EvomergeError(f"{where}: model {unknown[0]!r} is not among the run's models {self.models}")
            by_model = {s.model: s.parameters for s in recipe.models}
            for i, model in enumerate(self.models):
                for p in [p for p in self.space.per_source if p in by_model.get(model, {})]:
                    genes.update(self._spread(f"{p}/s{i}", by_model[model][p], recipe.layer_granularity))
            for o in [o for o in self.space.shared if o in recipe.parameters]:
                genes.update(self._spread(o, recipe.parameters[o], recipe.layer_granularity))
        if self.route is not None and recipe.route is not None:
            genes.update(self.route.encode(recipe.route))
        for name, value in genes.items():
            gene = self.genes[name]
            if not gene.low <= value <= gene.high:
                raise EvomergeError(f"{where}: gene {name} would start at {value:.6g}, outside its bounds "
                                    f"[{gene.low}, {gene.high}] in the search space")
        return genes

    def _spread(self, name: str, value: Any, granularity: int) -> dict[str, float]:
        """A recipe value (scalar or per group of `granularity`) as this genome's gene(s) `name`[/gN]."""
        per_layer = [float(value[group_of(layer, self.n_layers, granularity)]) if isinstance(value, list) else float(value)
                     for layer in [*range(self.n_layers), None]]
        if self.groups is None:
            return {name: sum(per_layer) / len(per_layer)}
        layers: dict[int, list[float]] = {}
        for layer, v in zip([*range(self.n_layers), None], per_layer):
            layers.setdefault(group_of(layer, self.n_layers, self.space.layer_granularity or 0), []).append(v)
        return {f"{name}/g{g}": sum(vs) / len(vs) for g, vs in layers.items()}

    def _value(self, params: dict[str, float], name: str) -> float | list[float]:
        if self.groups is None:
            return float(params[name])
        return [float(params[f"{name}/g{g}"]) for g in range(self.groups)]

    def decode(self, params: dict[str, float]) -> Recipe:
        missing = sorted(set(self.genes) - set(params))
        if missing:
            raise EvomergeError(f"genome lacks gene(s) {missing[:3]}; the study was made with another search space")
        route = self.route.decode(params) if self.route else None
        if self.space.method is None:
            recipe = Recipe(method=None, models=[], route=route)
        else:
            sources = [Source(model, {p: self._value(params, f"{p}/s{i}") for p in self.space.per_source})
                       for i, model in enumerate(self.models)]
            options = {**self.space.options, **{o: self._value(params, o) for o in self.space.shared}}
            recipe = Recipe(method=self.space.method, models=sources, base_model=self.base_model, parameters=options,
                            layer_granularity=self.space.layer_granularity or 0, seed=self.space.seed, route=route,
                            tokenizer_source=self.tokenizer_source)
        recipe.validate()
        return recipe

    def encode(self, recipe: Recipe) -> dict[str, float]:
        """Genes decoding to `recipe`. Exact inverse of decode for parameter-space genes; a route has many
        genomes (any positive indicator is "on"), so decode(encode(recipe)) == recipe is what holds there."""
        if (recipe.route is None) != (self.route is None):
            raise EvomergeError(f"recipe {'has' if recipe.route else 'lacks'} a route, unlike this search space")
        params: dict[str, float] = self.route.encode(recipe.route) if self.route else {}
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
