"""Search spaces: which merge method and which of its parameters a search evolves, with bounds.

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

The genes these become, and how a genome decodes to a recipe: evomerge.search.genome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.methods import get_method
from evomerge.recipe import MERGED
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
