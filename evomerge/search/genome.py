"""The genome <-> recipe codec, in one place (the search space it encodes: evomerge.search_space).

The genome is a flat dict of floats named `weight/s0` (source 0, whole model) or
`weight/s0/g2` (source 0, group 2), and `lambda` or `lambda/g2` for shared genes, so the
names read well in optuna-dashboard and stay stable while models keep their order.
Genes: `route/r1/s0.l3` (repetition 1, route source 0, layer 3), `scale/s0.l3>s1.l0` (matrix)
or `scale/s1.l0` (per_layer). The first step has no incoming transition, so it is unscaled.
Decoding never fails on a routing genome: a path with more than max_path_length slots on
keeps the max_path_length slots with the largest genes (in slot order), and a path with none
on keeps the single largest slot, so every decoded route has 1..max_path_length layers.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import Any

from optuna.distributions import FloatDistribution

from evomerge.errors import EvomergeError
from evomerge.merge.methods import get_method
from evomerge.recipe import MERGED, Recipe, Route, Source, Step, group_of, is_template, n_groups
from evomerge.search_space import Gene, RouteSpace, SearchSpace

def _check_models(method_name: str, models: list[str], base_model: str | None) -> None:
    method = get_method(method_name)
    if method.needs_base and not base_model:
        raise EvomergeError(f"search space method {method_name} needs a base_model in the run config")
    if len(models) < method.min_sources or (method.max_sources is not None and len(models) > method.max_sources):
        raise EvomergeError(f"{method_name} takes {method.min_sources}"
                            f"{'' if method.max_sources == method.min_sources else '+'} model(s) besides the base, got {len(models)}")


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
                 tokenizer_source: str | None = None, chat_template: str | None = None, dtype: str = "bfloat16"):
        if space.method is not None:
            _check_models(space.method, models, base_model)
        self.space, self.models, self.base_model, self.n_layers = space, list(models), base_model, n_layers
        self.tokenizer_source, self.chat_template = tokenizer_source, chat_template
        self.dtype = dtype  # the search's: a trial's recipe exports the weights it scored, not a bfloat16 rounding of them
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
            recipe = Recipe(method=None, models=[], route=route, dtype=self.dtype)
            if self.chat_template in recipe.refs or is_template(self.chat_template):  # else the route's own model's
                recipe = replace(recipe, chat_template=self.chat_template)
        else:
            sources = [Source(model, {p: self._value(params, f"{p}/s{i}") for p in self.space.per_source})
                       for i, model in enumerate(self.models)]
            options = {**self.space.options, **{o: self._value(params, o) for o in self.space.shared}}
            recipe = Recipe(method=self.space.method, models=sources, base_model=self.base_model, parameters=options,
                            layer_granularity=self.space.layer_granularity or 0, seed=self.space.seed, route=route,
                            tokenizer_source=self.tokenizer_source, chat_template=self.chat_template, dtype=self.dtype)
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
