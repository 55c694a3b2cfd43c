"""Held-out evaluation: a study's chosen trials, and its source models, scored on another fitness
spec (held-out tasks or splits: MGSM-JA after a GSM8k-ja search, the zoo's test split), with
the results stored in the study.

    evomerge evaluate CONFIG --fitness SPEC [--top K | --trials N,M,...]

A search's winner is chosen on its own fitness, so its score there is biased upward (the
best of many noisy scores); a split the search never saw is the honest measure, and the one
that tells whether a cheaper fitness (a subset, racing, IRT estimates) chose as well as the
full one. By default the K best trials of the Pareto archive by the scalarization are scored.

Results are stored per trial and spec name (the spec file's stem) as study attrs
HELD_OUT + "N/NAME" (and HELD_OUT + "sources/NAME" for the sources): Optuna refuses writes to a
finished trial, and one key per (trial, spec) leaves nothing to read, merge and write back
when two evaluations run at once. Each result carries the spec's fingerprint: a stored result
of the same spec is reused, one of a changed spec is scored again. `evomerge status` and
`evomerge archive` show them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.fitness.evaluators import Evaluator
from evomerge.fitness.spec import FitnessSpec
from evomerge.recipe import Recipe
from evomerge.search.archive import completed, pareto_archive
from evomerge.search.attrs import HELD_OUT, ITEMS, ITEM_RESULTS
from evomerge.search.loop import check_chat_template, run_refs, source_recipe

if TYPE_CHECKING:
    from evomerge.backends.candidate import Backend, Candidate

SOURCES_KEY = "sources"


@dataclass
class HeldOut:
    """One spec's results: per source ref and per trial number, {"scores", "objectives", ...}."""

    name: str
    spec: FitnessSpec
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    trials: dict[int, dict[str, Any]] = field(default_factory=dict)
    reused: int = 0  # results read back from the study instead of scored


def spec_name(spec: FitnessSpec) -> str:
    return Path(spec.source).stem


def check_spec(spec: FitnessSpec) -> None:
    """A held-out score is every item's (or a seeded subset's): no racing, no estimates."""
    cheap = [key for key in ("racing", "estimator") if key in spec.options]
    if cheap:
        raise EvomergeError(f"{spec.source}: a held-out spec scores its items as they are: drop {cheap[0]}")


def choose_trials(config: RunConfig, study: optuna.Study, top: int | None, numbers: list[int] | None) -> list[FrozenTrial]:
    """Trials `numbers` (any with a recipe), else the `top` best: the Pareto front first, then the other
    completed trials, each part by the scalarization (a one-objective front holds a single trial, so
    `--top 3` would otherwise score one). A trial whose recipe repeats a chosen one's is skipped."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if numbers:
        missing = [n for n in numbers if n not in trials or "recipe" not in trials[n].user_attrs]
        if missing:
            raise EvomergeError(f"study {config.study_name!r} has no trial {missing[0]} with a recipe; trials are "
                                f"numbered 0..{max(trials, default=-1)} (see evomerge archive {config.path})")
        return [trials[n] for n in numbers]
    fitness = config.fitness
    names = [o.name for o in fitness.objectives]
    scored = completed(study, names)
    if not scored:
        raise EvomergeError(f"study {config.study_name!r} has no completed trial to evaluate yet")
    front = {e.number for e in pareto_archive(study, names, fitness.directions)}
    ranked = sorted(scored, key=lambda t: (t.number not in front, -fitness.scalarize(t.user_attrs["objectives"]),
                                           t.number))
    chosen: dict[str, FrozenTrial] = {}
    for trial in ranked:
        chosen.setdefault(trial.user_attrs.get("recipe", str(trial.number)), trial)
        if len(chosen) == (top or 1):
            break
    return list(chosen.values())


def stored(study: optuna.Study) -> dict[str, dict[str | int, Any]]:
    """{spec name: {trial number or "sources": result}} of every held-out evaluation in the study."""
    out: dict[str, dict[str | int, Any]] = {}
    for key, value in study.user_attrs.items():
        if key.startswith(HELD_OUT):
            who, _, name = key[len(HELD_OUT):].partition("/")
            out.setdefault(name, {})[who if who == SOURCES_KEY else int(who)] = value
    return out


def evaluate_held_out(config: RunConfig, study: optuna.Study, spec: FitnessSpec, trials: list[FrozenTrial],
                      backend: Backend, evaluator: Evaluator, *, sources: bool = True) -> HeldOut:
    """Score `trials` (and the sources) on `spec`, reusing results stored for the same spec; store the new ones."""
    check_spec(spec)
    result = HeldOut(spec_name(spec), spec)
    known = stored(study).get(result.name, {})
    fingerprint = json.loads(json.dumps(spec.fingerprint()))

    def score(recipe: Recipe, previous: dict[str, Any] | None) -> dict[str, Any]:
        if previous is not None and previous.get("fingerprint") == fingerprint:
            result.reused += 1
            return previous
        return {"fingerprint": fingerprint, **_scored(spec, evaluator, backend.materialize(recipe))}

    if sources:
        previous = known.get(SOURCES_KEY, {})
        result.sources = {ref: score(source_recipe(config, ref), previous.get(ref)) for ref in run_refs(config)}
        study.set_user_attr(f"{HELD_OUT}{SOURCES_KEY}/{result.name}", result.sources)
    for trial in trials:
        recipe = Recipe.from_dict(json.loads(trial.user_attrs["recipe"]), where=f"trial {trial.number}")
        result.trials[trial.number] = score(recipe, known.get(trial.number))
        study.set_user_attr(f"{HELD_OUT}{trial.number}/{result.name}", result.trials[trial.number])
    return result


def _scored(spec: FitnessSpec, evaluator: Evaluator, candidate: Candidate) -> dict[str, Any]:
    items = getattr(evaluator, "evaluate_items", None)  # lm_eval: each item's result too
    if items is None:
        scores, extra = evaluator.evaluate(candidate), {}
    else:
        scores, results = items(candidate, evaluator.subset)  # type: ignore[attr-defined]
        extra = {ITEMS: results.n_items, ITEM_RESULTS: results.to_json()}
    return {"scores": scores, "objectives": spec.objective_values({**scores, **candidate.costs}), **extra}


def table(held_out: HeldOut) -> str:
    """Sources, then the trials, one row each: the held-out objectives and their scalarization."""
    spec = held_out.spec
    names = [o.name for o in spec.objectives]
    rows = {Path(ref).name: r for ref, r in held_out.sources.items()}
    rows.update({f"trial {n}": r for n, r in held_out.trials.items()})
    header = ["model", *names, "scalarized"]
    lines = [[name, *(f"{r['objectives'][n]:.4g}" for n in names), f"{spec.scalarize(r['objectives']):.4g}"]
             for name, r in rows.items()]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join([f"{{:<{widths[0]}}}", *(f"{{:>{w}}}" for w in widths[1:])])
    return "\n".join(fmt.format(*line) for line in [header, *lines])


def evaluate_command(config: RunConfig, study: optuna.Study, spec: FitnessSpec, top: int | None,
                     numbers: list[int] | None, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> str:
    """`evomerge evaluate`: load the sources once, score, store, and return the table to print."""
    from evomerge.backends.build import make_backend  # torch, transformers, lm-eval
    from evomerge.fitness.evaluators import build_evaluator
    from evomerge.refs import resolve_path

    check_spec(spec)
    trials = choose_trials(config, study, top, numbers)
    check_chat_template(config, spec)
    refs = run_refs(config)
    evaluator = build_evaluator(spec, resolve_path(refs[0], allow_pickle=allow_pickle))
    backend = make_backend(config, refs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    result = evaluate_held_out(config, study, spec, trials, backend, evaluator)
    reused = f"; {result.reused} result(s) stored earlier reused" if result.reused else ""
    return (f"held-out {result.name} ({spec.source}) on {len(trials)} trial(s) of study {config.study_name!r}{reused}:\n"
            f"{table(result)}")
