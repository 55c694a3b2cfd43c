"""How a trial is evaluated item by item (lm_eval fitness): which items, racing, IRT estimates.

Every trial of an lm_eval study stores what each item it evaluated gave (user attrs `items`
and `item_results`, evomerge.fitness.items' plain JSON), so estimators and later analyses can
use them.

Which items: fixed once per study, before its first trial, and stored in it (STUDY_ITEMS: the
fitness spec's seeded `subset`, else every item, or the first `limit`; IRT: the `anchors`),
so resumed runs and other workers read them back instead of choosing again. With them a
digest of every task's documents: a task whose data changed under a study is refused, since
stored item ids would then name other items.

How, per trial (`ItemScoring.evaluate`):
- the items are evaluated in one chunk, or with `racing` in chunks of a per-trial shuffled
  order against the best fully scored trial so far (evomerge.fitness.racing), stopping a candidate
  that is clearly worse: it is told PRUNED, with its partial results and an `estimate`;
- the results so far are stored after every chunk: a retry of a trial killed mid-evaluation
  carries its killed attempt's results, evaluates only the rest, and (with racing) decides
  first on what it carried, as the attempt did after its last chunk. The race's order is
  seeded by the study's seed and the trial's *fresh place* (evomerge.search.samplers: a retry
  takes the place of the trial it retries), which a kill does not shift: a killed and resumed
  search races every candidate in the order an uninterrupted one does, against the same
  reference, and makes the same decisions;
- with an `estimator`, the scores become IRT estimates of the whole split (gp-IRT) from the
  answers seen (anchors, a subset, a pruned race); lm-eval's scores on those items are kept
  as `measured`.

The IRT fit (evomerge.fitness.irt): on the sources (scored on the whole split when the study starts)
and every fully scored trial (a race on the whole split that ran to its end; copies excluded),
first before the first trial, then again whenever `refit_every` more such rows exist, stored
as plain numbers (IRT) before the trial that triggered it evaluates: a trial's fit is a
function of the trials completed before it, so a resumed run refits where an uninterrupted one
did. Anchors are chosen from the first fit and kept: refits change the item parameters, never
which items candidates see (earlier candidates' answers stay comparable). With anchors or a
subset no trial sees every item, so the fit stays on the sources: measured on the zoo
(bench/fitness_cost.py), refitting those anchors' parameters on 10-50 more fully scored rows
changed Spearman by < 0.01 and the mean error by 0.1-0.5 points, not worth 600 items a row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge import faults
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.fitness.evaluators import Evaluator
from evomerge.fitness.harness import aggregate_scores, scores_from_items, task_sizes
from evomerge.fitness.irt import IrtEstimator, answer_matrix, fit_estimator
from evomerge.fitness.items import Item, ItemResults, item_positions, parse_ranges, ranges
from evomerge.fitness.racing import item_values, item_weights, paired_estimate, race, race_order, should_prune
from evomerge.fitness.spec import COST_METRICS, EstimatorSpec, FitnessSpec, RacingSpec
from evomerge.search.attrs import (ESTIMATE, IRT, IRT_ROWS, ITEMS, ITEM_RESULTS, MEASURED, RETRY_HISTORY, SOURCES,
                                   STUDY_ITEMS)
from evomerge.search.storage import Database

if TYPE_CHECKING:
    from evomerge.backends.candidate import Candidate
    from evomerge.fitness.harness import LmEvalEvaluator


@dataclass
class Evaluation:
    """One candidate's scores (estimates where an estimator is set) and what they rest on."""

    scores: dict[str, float]
    results: ItemResults | None = None  # every item the scores rest on (lm_eval fitness)
    evaluated: int = 0  # items evaluated for this candidate here (not carried from a killed attempt)
    measured: dict[str, float] | None = None  # lm-eval's scores on `results`, where `scores` are estimates
    pruned: bool = False
    estimate: float | None = None  # pruned: its estimated scalarized fitness, what CMA-ES is told
    irt_rows: int | None = None  # the fit the estimates came from

    def attrs(self) -> dict[str, Any]:
        """User attrs besides `scores` (items and item results are stored while evaluating)."""
        optional = {MEASURED: self.measured, ESTIMATE: self.estimate, IRT_ROWS: self.irt_rows}
        return {key: value for key, value in optional.items() if value is not None}


class Scoring(Protocol):
    def source(self, candidate: Candidate) -> Evaluation: ...

    def evaluate(self, candidate: Candidate, trial: optuna.Trial) -> Evaluation: ...


class WholeScores:
    """A fitness without per-item results (zoo_skills): the evaluator's scores as they are."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def source(self, candidate: Candidate) -> Evaluation:
        return Evaluation(self.evaluator.evaluate(candidate))

    def evaluate(self, candidate: Candidate, trial: optuna.Trial) -> Evaluation:
        return self.source(candidate)


def make_scoring(config: RunConfig, evaluator: Evaluator, study: optuna.Study, db: Database) -> Scoring:
    """The run's scoring; for lm_eval, the study's items are read (or chosen and stored) here."""
    if config.fitness.kind == "lm_eval":
        return ItemScoring(config, evaluator, study, db)  # type: ignore[arg-type]
    return WholeScores(evaluator)


class ItemScoring:
    """lm_eval fitness: the study's items, racing and estimates (see the module docstring)."""

    def __init__(self, config: RunConfig, evaluator: LmEvalEvaluator, study: optuna.Study, db: Database):
        self.fitness, self.seed, self.evaluator, self.study, self.db = config.fitness, config.seed, evaluator, study, db
        self.task_dict = evaluator.task_dict
        self.sizes = task_sizes(self.task_dict)
        self.steps = item_positions(self.sizes)
        options = self.fitness.options
        self.racing = RacingSpec(**options["racing"]) if "racing" in options else None
        self.estimator = EstimatorSpec(**options["estimator"]) if "estimator" in options else None
        self.metric = irt_metric(self.fitness, evaluator.metrics) if self.estimator else None
        self.weights = item_weights(signed_weights(self.fitness, evaluator.metrics), self.task_dict)
        self.subset = self._study_items()
        self._fitted: tuple[int, IrtEstimator] | None = None
        self._full_rows: dict[int, ItemResults | None] = {}
        self._reference: tuple[int, dict[int, float]] | None = None

    # ---------------------------------------------------------------- the study's items

    def _study_items(self) -> dict[str, list[int]] | None:
        """The subset stored in the study (chosen and stored by the first run), checked against the data."""
        digest = documents_digest(self.task_dict)
        stored = self.study.user_attrs.get(STUDY_ITEMS)
        if stored is None:
            with self.db.exclusive(f"items:{self.study.study_name}"):
                stored = self.study.user_attrs.get(STUDY_ITEMS)  # another worker may have stored them meanwhile
                if stored is None:
                    stored = {"digest": digest}
                    if self.evaluator.subset is not None:
                        stored["subset"] = {task: ranges(ids) for task, ids in self.evaluator.subset.items()}
                    self.study.set_user_attr(STUDY_ITEMS, stored)
        changed = [task for task in digest if stored["digest"].get(task) != digest[task]]
        if changed:
            raise EvomergeError(f"the documents of lm-eval task {changed[0]!r} changed since study "
                                f"{self.study.study_name!r} was made, so its stored item ids would name other items; "
                                "restore the task's data or use a new --study-name")
        return {task: parse_ranges(ids) for task, ids in stored["subset"].items()} if "subset" in stored else None

    def _plan(self, estimator: IrtEstimator | None) -> list[Item]:
        """The items every candidate is evaluated on, tasks in task-dict order."""
        if estimator is not None and estimator.anchor_weights:
            chosen = estimator.anchor_items()
        elif self.subset is not None:
            chosen = self.subset
        else:
            limit = self.fitness.options["limit"]
            chosen = {task: list(range(min(n, limit or n))) for task, n in self.sizes.items()}
        return [(task, i) for task, ids in chosen.items() for i in ids]

    # ---------------------------------------------------------------- evaluating

    def source(self, candidate: Candidate) -> Evaluation:
        """A source model: on the whole split when an estimator is fitted on the sources, else on the plan."""
        items = None if self.estimator else self.subset
        scores, results = self.evaluator.evaluate_items(candidate, items)
        return Evaluation(scores, results, results.n_items)

    def evaluate(self, candidate: Candidate, trial: optuna.Trial) -> Evaluation:
        estimator = self._current_estimator()
        plan = self._plan(estimator)
        frozen = self._frozen(trial)
        evaluated = 0

        def run(part: dict[str, list[int]]) -> ItemResults:
            nonlocal evaluated
            results = self.evaluator.evaluate_items(candidate, part)[1]
            evaluated += results.n_items
            return results

        def store(results: ItemResults) -> None:  # a retry of this trial carries what is stored here
            _store(trial, results, evaluated)
            faults.at("items")

        constant = self._constant({o.name: candidate.costs[o.metric] for o in self.fitness.objectives
                                   if o.metric in COST_METRICS})
        best = self._reference_values() if self.racing else None
        if self.racing is None:
            order, size, stop = plan, len(plan), lambda results: False
        else:
            order, size = race_order(self.seed, self._place(frozen), plan), self.racing.chunk
            stop = self._pruner(best, constant)
        results, pruned = race(run, order, size, self._carried(frozen), stop, store)
        assert results is not None  # a plan has items
        if not evaluated:  # a retry whose killed attempt had evaluated every item
            _store(trial, results, evaluated)
        evaluation = self._evaluation(results, evaluated, estimator)
        if pruned:
            evaluation.pruned = True
            evaluation.estimate = (self.fitness.scalarize(self.fitness.objective_values({**evaluation.scores,
                                                                                         **candidate.costs}))
                                   if estimator else paired_estimate(best, self._values(results, constant)))
        return evaluation

    def _evaluation(self, results: ItemResults, evaluated: int, estimator: IrtEstimator | None) -> Evaluation:
        measured = self.evaluator.named(scores_from_items(self.task_dict, results))
        if estimator is None or results.n_items == sum(self.sizes.values()):
            scores, measured_attr = measured, None
        else:
            per_task = estimator.estimate(results, self.metric, "gp_irt")
            scores = self.evaluator.named(aggregate_scores(self.task_dict, per_task, self.sizes))
            measured_attr = measured
        rows = self._fitted[0] if estimator is not None and self._fitted else None
        return Evaluation(scores, results, evaluated, measured_attr, irt_rows=rows)

    def _frozen(self, trial: optuna.Trial) -> FrozenTrial:
        storage = self.db.storage
        return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(self.db.study_id(self.study.study_name),
                                                                                 trial.number))

    def _place(self, trial: FrozenTrial) -> int:
        """The trial's fresh place (a retry: its first attempt's), which no kill shifts."""
        first = trial.system_attrs.get(RETRY_HISTORY, [trial.number])[0]
        return self.db.count_fresh_before(self.db.study_id(self.study.study_name), first)

    def _carried(self, trial: FrozenTrial) -> ItemResults | None:
        """The item results of the earlier attempt of a retried trial that got furthest, if any."""
        earlier = set(trial.system_attrs.get(RETRY_HISTORY, []))
        if not earlier:
            return None
        attempts = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    if t.number in earlier and ITEM_RESULTS in t.user_attrs]
        parsed = [ItemResults.from_json(t.user_attrs[ITEM_RESULTS]) for t in attempts]
        return max(parsed, key=lambda r: r.n_items, default=None)

    # ---------------------------------------------------------------- racing

    def _pruner(self, best: dict[int, float] | None, constant: float) -> Callable[[ItemResults], bool]:
        """The stop rule of one race against `best`, the best fully scored trial when the race started."""
        racing = self.racing

        def stop(results: ItemResults) -> bool:
            return best is not None and should_prune(best, self._values(results, constant), racing.p_threshold,
                                                     racing.min_items)
        return stop

    def _values(self, results: ItemResults, constant: float) -> dict[int, float]:
        return item_values(results, self.weights, self.steps, constant)

    def _reference_values(self) -> dict[int, float] | None:
        reference = race_reference(self.study)
        if reference is None:
            return None
        if self._reference is None or self._reference[0] != reference.number:
            results = ItemResults.from_json(reference.user_attrs[ITEM_RESULTS])
            constant = self._constant(reference.user_attrs["objectives"])
            self._reference = (reference.number, self._values(results, constant))
        return self._reference[1]

    def _constant(self, objectives: dict[str, float]) -> float:
        """The part of the scalarized fitness that no item changes (weighted costs such as param_count)."""
        signs = {o.name: 1.0 if o.direction == "maximize" else -1.0 for o in self.fitness.objectives
                 if o.metric in COST_METRICS}
        return sum(w * signs[name] * objectives[name] for name, w in self.fitness.scalarization.items() if name in signs)

    # ---------------------------------------------------------------- IRT

    def _current_estimator(self) -> IrtEstimator | None:
        """The study's IRT fit, refitted first when `refit_every` more fully scored rows exist."""
        if self.estimator is None:
            return None
        rows = self._fit_rows()
        stored = self.study.user_attrs.get(IRT)
        if stored is None or len(rows) >= stored["rows"] + self.estimator.refit_every:
            stored = self._refit(rows)
        if self._fitted is None or self._fitted[0] != stored["rows"]:
            self._fitted = (stored["rows"], IrtEstimator.from_json(stored["estimator"]))
        return self._fitted[1]

    def _refit(self, rows: list[ItemResults]) -> dict[str, Any]:
        with self.db.exclusive(f"irt:{self.study.study_name}"):
            stored = self.study.user_attrs.get(IRT)
            if stored is not None and len(rows) < stored["rows"] + self.estimator.refit_every:
                return stored  # another worker refitted meanwhile
            y = answer_matrix(rows, self.sizes, self.metric)
            if len(rows) < 2 or not np.isin(y[~np.isnan(y)], (0.0, 1.0)).all():
                raise EvomergeError(f"estimator irt fits right/wrong answers of at least two source models: metric "
                                    f"{self.metric!r} of {len(rows)} model(s) does not give that; drop the estimator")
            fitted = fit_estimator(y, self.sizes, seed=self.seed)
            if stored is not None:
                fitted = replace(fitted, anchor_weights=IrtEstimator.from_json(stored["estimator"]).anchor_weights)
            elif self.estimator.anchors:
                fitted = self._with_anchors(fitted)
            stored = {"rows": len(rows), "estimator": fitted.to_json()}
            self.study.set_user_attr(IRT, stored)
            return stored

    def _with_anchors(self, fitted: IrtEstimator) -> IrtEstimator:
        anchored = fitted.with_anchors(self.estimator.anchors, self.seed)
        empty = [task for task, ids in anchored.anchor_items().items() if not ids]
        if empty:
            raise EvomergeError(f"{self.fitness.source}: estimator.anchors {self.estimator.anchors} leaves task "
                                f"{empty[0]!r} without items; use at least {len(self.sizes)}")
        return anchored

    def _fit_rows(self) -> list[ItemResults]:
        """The sources' results, then every fully scored trial's (only a race on the whole split makes them)."""
        rows = [ItemResults.from_json(s[ITEM_RESULTS]) for s in self.study.user_attrs[SOURCES].values()]
        if self.racing is None or self.subset is not None or self.fitness.options["limit"] is not None:
            return rows
        total = sum(self.sizes.values())
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number not in self._full_rows:
                results = ItemResults.from_json(t.user_attrs[ITEM_RESULTS]) if ITEM_RESULTS in t.user_attrs else None
                full = results is not None and results.n_items == total and "copy_of" not in t.user_attrs
                self._full_rows[t.number] = results if full else None
        return rows + [r for _, r in sorted(self._full_rows.items()) if r is not None]


def race_reference(study: optuna.Study) -> FrozenTrial | None:
    """The trial a race compares with, or None: the best fully scored one, i.e.
    the COMPLETE trial with item results and the highest told value (the scalarization), the
    earliest among equals. Pruned trials are PRUNED, never this."""
    scored = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if ITEM_RESULTS in t.user_attrs]
    return max(scored, key=lambda t: (t.value, -t.number), default=None)


def _store(trial: optuna.Trial, results: ItemResults, evaluated: int) -> None:
    trial.set_user_attr(ITEM_RESULTS, results.to_json())
    trial.set_user_attr(ITEMS, evaluated)


def documents_digest(task_dict: dict[str, Any]) -> dict[str, str]:
    """Per leaf task, a sha256 of its evaluated split's documents, in order."""
    digests = {}
    for name, task in task_dict["tasks"].items():
        h = hashlib.sha256()
        for doc in task.eval_docs:
            h.update(json.dumps(doc, sort_keys=True, default=str).encode())
        digests[name] = h.hexdigest()
    return digests


def signed_weights(fitness: FitnessSpec, metrics: dict[str, str]) -> dict[str, float]:
    """Each scored objective's resolved metric -> its scalarization weight, negated when minimized
    (what racing.item_weights spreads over the items)."""
    signed: dict[str, float] = {}
    for o in fitness.objectives:
        if o.metric in COST_METRICS or o.name not in fitness.scalarization:
            continue
        key = metrics[o.metric]
        signed[key] = signed.get(key, 0.0) + fitness.scalarization[o.name] * (1.0 if o.direction == "maximize" else -1.0)
    return signed


def irt_metric(fitness: FitnessSpec, metrics: dict[str, str]) -> str:
    """The one per-item lm-eval metric key (`acc,none`) every scored objective uses: what IRT is fitted on."""
    keys = set()
    for o in fitness.objectives:
        if o.metric not in COST_METRICS:
            metric, _, filter_name = metrics[o.metric].partition("/")[2].partition(",")
            keys.add(f"{metric},{filter_name or 'none'}")
    if len(keys) != 1:
        raise EvomergeError(f"{fitness.source}: estimator irt fits one right/wrong metric, but the objectives use "
                            f"{sorted(keys) or 'none'}; score every objective on one metric or drop the estimator")
    return keys.pop()
