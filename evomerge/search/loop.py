"""The search loop. One trial reads: claim -> suggest -> decode -> materialize -> evaluate -> tell.

Each trial records its parameters, every objective, the per-task scores, the recipe (JSON),
timings and the device, and with an lm_eval fitness each item's result (which items, racing and
estimates: evomerge.search.scoring); a candidate that raises, scores NaN or runs out of memory
fails its own trial (with the reason) and the search goes on. A candidate that racing stops is
told PRUNED. Claiming, heartbeats and giving a trial back when
the worker stops are evomerge.search.workers'; the database, evomerge.search.storage's.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge import faults
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.fitness.harness import select_template
from evomerge.fitness.spec import FitnessSpec
from evomerge.recipe import Recipe, Source, is_template
from evomerge.refs import local_dir, resolve_path
from evomerge.search.attrs import CANDIDATE_FAILURE, FAILURE, ITEMS, ITEM_RESULTS, SAMPLED, SOURCES
from evomerge.search.genome import Genome
from evomerge.search.identity import check_layers, create_study, find_study
from evomerge.search.samplers import make_sampler
from evomerge.search.scoring import Evaluation, make_scoring
from evomerge.search.storage import open_database, sqlite_file_missing
from evomerge.search.workers import Worker, retry_dead_trial, sqlite_worker_lock

MAX_CONSECUTIVE_FAILURES = 20
BUSY_WAIT_S = 0.5  # polling the study while other workers hold the rest of a generation or budget


@dataclass
class Scored:
    objectives: dict[str, float]
    timings: dict[str, float]
    evaluation: Evaluation


def source_recipe(config: RunConfig, ref: str) -> Recipe:
    """A source model as a candidate: a one-model linear merge is the model itself, with the run's chat
    template when it sets one (sources and merges are then scored alike)."""
    return Recipe(method="linear", models=[Source(ref, {"weight": 1.0})], dtype=config.dtype,
                  tokenizer_source=config.tokenizer_source, chat_template=_template_text(config))


def _template_text(config: RunConfig) -> str | None:
    """The run's chat_template as a Jinja template (a model of the run stands for its own)."""
    from evomerge.export import model_chat_template

    if config.chat_template is None or is_template(config.chat_template):
        return config.chat_template
    text = model_chat_template(resolve_path(config.chat_template))
    if not isinstance(text, str):
        raise EvomergeError(f"{config.path}: chat_template: model {config.chat_template!r} has "
                            f"{'no chat template' if text is None else 'several named chat templates'}: give a "
                            "model with one template, or the Jinja template itself")
    return text


def check_chat_template(config: RunConfig, spec: FitnessSpec) -> None:
    """A spec that formats prompts with a chat template is refused in one line, before any model loads, when
    a model it would score (a source, or the merges' tokenizer model) has none or not the one it names."""
    wanted = spec.options.get("apply_chat_template")
    if not wanted:
        return
    from evomerge.export import chat_template  # transformers: only for a spec that applies a template
    refs = run_refs(config)
    paths = {ref: resolve_path(ref) for ref in refs}
    merge = Recipe(method="linear", models=[Source(m, {"weight": 1.0}) for m in config.models],
                   base_model=config.base_model, tokenizer_source=config.tokenizer_source,
                   chat_template=config.chat_template)
    for recipe in [*(source_recipe(config, ref) for ref in refs), merge]:
        select_template(chat_template(recipe, paths), wanted, f"{spec.source} (scoring {recipe.tokenizer_model})")


def run_refs(config: RunConfig) -> list[str]:
    """Every model of the run, the base first."""
    return ([config.base_model] if config.base_model else []) + config.models


class Search:
    """Everything loaded once for a run: evaluator, models, study, sampler.

    Checks come before anything is written: a study that exists must be the same search (its
    fingerprint), then the evaluator loads (a bad task or metric is reported before any model
    loads), then the models; only then is a new study created."""

    def __init__(self, config: RunConfig, *, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.config = config
        refs = run_refs(config)
        for ref in refs:
            local_dir(ref)  # a missing model is reported as such, before the study is read
        db = None if sqlite_file_missing(config.storage) else self._open_database()
        existing = find_study(config, db, to_run=True) if db else None
        sqlite_lock = sqlite_worker_lock(config.storage, config.study_name)  # a second SQLite worker: refused now
        check_chat_template(config, config.fitness)
        start = time.perf_counter()
        from evomerge.backends.build import make_backend  # torch, transformers, lm-eval
        from evomerge.fitness.evaluators import build_evaluator

        self.evaluator = build_evaluator(config.fitness, resolve_path(refs[0], allow_pickle=allow_pickle))
        self.backend = make_backend(config, refs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        self.load_seconds = time.perf_counter() - start
        self.genome = Genome(config.search_space, config.models, config.base_model, self.backend.n_layers,
                             config.tokenizer_source, config.chat_template, config.dtype)
        self.genome.x0  # a search space's x0 config that does not fit is refused before a study exists
        self.db = db or self._open_database()
        self.study = existing or create_study(config, self.db, self.backend.n_layers)
        check_layers(self.study, self.backend.n_layers)
        self.scoring = make_scoring(config, self.evaluator, self.study, self.db)
        if SOURCES not in self.study.user_attrs:
            self.study.set_user_attr(SOURCES, {ref: self.score_source(ref) for ref in refs})
        self.study.sampler = make_sampler(config, self.genome, self.db)
        self.worker = Worker(self.db, self.study, sqlite_lock)

    def _open_database(self):
        return open_database(self.config.storage, self.config.heartbeat, stale_trial_callback=retry_dead_trial,
                             reconnect_timeout_s=self.config.reconnect_timeout_s)

    def counts(self) -> dict[TrialState, int]:
        return self.worker.counts()

    def run(self, on_trial: Callable[[int, dict[str, Any]], None] | None = None) -> int:
        """Run trials until the study holds n_trials completed ones (or the wall clock runs out); returns how many ran."""
        started, ran, failures = time.monotonic(), 0, 0
        while True:
            self.worker.recover_dead_trials()
            done = self.counts()[TrialState.COMPLETE]
            if done >= self.config.n_trials:
                return ran
            if self.config.wall_clock_s is not None and time.monotonic() - started > self.config.wall_clock_s:
                return ran
            if self.config.n_items is not None and self.items_evaluated() >= self.config.n_items:
                return ran
            record = self.run_one()
            if record is None:
                time.sleep(BUSY_WAIT_S)  # the budget's last trials or a generation's last slots run elsewhere
                continue
            ran += 1
            failures = failures + 1 if record["state"] == "FAIL" else 0
            if on_trial:
                on_trial(done + (record["state"] == "COMPLETE"), record)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise EvomergeError(f"{failures} candidates failed in a row (last: {record['error']}); "
                                    "stopping: check the models, search space and fitness")

    def items_evaluated(self) -> int:
        """Items the study's trials evaluated, all of them (the `items` budget)."""
        return sum(t.user_attrs.get(ITEMS, 0) for t in self.study.get_trials(deepcopy=False))

    def run_one(self) -> dict[str, Any] | None:
        """One trial, or None when there is none to take now."""
        start = time.perf_counter()
        with self.worker.next_trial(self.config.n_trials) as trial:  # claimed; given back if anything escapes this block
            if trial is None:
                return None
            faults.begin(trial.number)
            params = {name: trial.suggest_float(name, d.low, d.high) for name, d in self.genome.distributions.items()}
            faults.at("sample")
            self.worker.mark_sampled(trial)
            try:
                recipe = self.genome.decode(params)
                scored = self._copied(trial) or self.score(recipe, trial)
            except Exception as exc:  # the candidate failed, not the search: record why and go on
                return self._failed(trial, exc)
            return self._tell(trial, scored, recipe.to_json(), time.perf_counter() - start)

    def score(self, recipe: Recipe, trial: optuna.Trial) -> Scored:
        """Materialize the recipe and evaluate it (racing, if the fitness races, happens in there):
        its objectives, timings and evaluation."""
        start = time.perf_counter()
        candidate = self.backend.materialize(recipe)
        faults.at("materialize")
        merged = time.perf_counter()
        evaluation = self.scoring.evaluate(candidate, trial)
        evaluation.scores = faults.scores(evaluation.scores)
        faults.at("evaluate")
        evaluated = time.perf_counter()
        objectives = self._objectives({**evaluation.scores, **candidate.costs}, evaluation.pruned)
        bad = [k for k, v in objectives.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite objective(s) {bad}")
        return Scored(objectives, {"materialize_s": merged - start, "evaluate_s": evaluated - merged}, evaluation)

    def _objectives(self, values: dict[str, float], pruned: bool) -> dict[str, float]:
        """The objectives; a pruned candidate's where its partial scores have every one (a task of a
        group may have had no item yet), else none."""
        fitness = self.config.fitness
        if pruned and any(o.metric not in values for o in fitness.objectives):
            return {}
        return fitness.objective_values(values)

    def score_source(self, ref: str) -> dict[str, Any]:
        """A source model on the fitness, as a candidate: the reference every merge is compared with (`evomerge archive --plot`, the demo); with an
        lm_eval fitness also its item results (an IRT estimator is fitted on them)."""
        candidate = self.backend.materialize(source_recipe(self.config, ref))
        evaluation = self.scoring.source(candidate)
        scored = {"objectives": self.config.fitness.objective_values({**evaluation.scores, **candidate.costs}),
                  "scores": evaluation.scores}
        if evaluation.results is not None:
            scored.update({ITEMS: evaluation.evaluated, ITEM_RESULTS: evaluation.results.to_json()})
        return scored

    def _tell(self, trial: optuna.Trial, scored: Scored, recipe: str, elapsed: float) -> dict[str, Any]:
        values, evaluation = scored.objectives, scored.evaluation
        scored.timings["overhead_s"] = elapsed - sum(scored.timings.values())
        for key, value in (("objectives", values), ("scores", evaluation.scores), ("timings", scored.timings),
                           ("recipe", recipe), ("device", str(self.backend.device)), *evaluation.attrs().items()):
            trial.set_user_attr(key, value)
        faults.at("store")
        record = {"number": trial.number, "objectives": values, "items": evaluation.evaluated}
        if evaluation.pruned:  # never read a pruned trial's `value`: its estimate is a user attr
            self.study.tell(trial, state=TrialState.PRUNED)
            return {**record, "state": "PRUNED", "value": evaluation.estimate}
        told = [self.config.fitness.scalarize(values)] if len(self.study.directions) == 1 else list(values.values())
        self.study.tell(trial, told)
        return {**record, "state": "COMPLETE", "value": told[0] if len(told) == 1 else None}

    def _copied(self, trial: optuna.Trial) -> Scored | None:
        """The result of a completed trial with the very same params, which this one then copies
        (user attr copy_of) instead of evaluating: scores are deterministic, and NSGA-II's children
        often copy a parent (a quarter of them at population 4, a few percent at 16). A twin that
        another worker is still evaluating is waited for, then copied (or, if it fails, evaluated here)."""
        while (earlier := self._twin(trial)) is not None and earlier.state != TrialState.COMPLETE:
            time.sleep(BUSY_WAIT_S)
            self.worker.recover_dead_trials()  # a twin whose worker died is failed, and no longer waited for
        if earlier is None:
            return None
        trial.set_user_attr("copy_of", earlier.number)
        attrs = earlier.user_attrs
        if ITEM_RESULTS in attrs:  # what its scores rest on; it evaluated nothing itself
            trial.set_user_attr(ITEM_RESULTS, attrs[ITEM_RESULTS])
            trial.set_user_attr(ITEMS, 0)
        return Scored(dict(attrs["objectives"]), {"materialize_s": 0.0, "evaluate_s": 0.0}, Evaluation(dict(attrs["scores"])))

    def _twin(self, trial: optuna.Trial) -> FrozenTrial | None:
        """A completed trial with the trial's params, else an earlier-numbered one running them (only the
        later of two running twins waits, so two never wait for each other), else None."""
        twins = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                 if t.params == trial.params and t.number != trial.number]
        return next((t for t in twins if t.state == TrialState.COMPLETE), None) or next(
            (t for t in twins if t.number < trial.number and t.system_attrs.get(SAMPLED)), None)

    def _failed(self, trial: optuna.Trial, exc: BaseException) -> dict[str, Any]:
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        traceback.clear_frames(exc.__traceback__)  # the frames' locals (activations of an OOM) go now, not later
        gc.collect()
        import torch  # loaded with the models

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trial.set_user_attr(FAILURE, CANDIDATE_FAILURE)
        trial.set_user_attr("error", error)
        try:
            trial.set_user_attr("recipe", self.genome.decode(trial.params).to_json())
        except EvomergeError:
            pass  # the genome itself was the problem; the error says so
        trial.set_user_attr("device", str(self.backend.device))
        self.study.tell(trial, state=TrialState.FAIL)
        return {"number": trial.number, "state": "FAIL", "error": error}
