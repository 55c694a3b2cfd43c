"""The search loop: propose a genome, materialize it in place, score it, record everything.

Each trial records its parameters, every objective, the per-task scores, the recipe (JSON),
timings and the device; a candidate that raises, scores NaN or runs out of memory fails
its own trial (with the reason) and the search goes on.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import TrialState

from evomerge import faults
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.fitness import Evaluator, candidate_costs
from evomerge.refs import local_dir, resolve_path
from evomerge.search.cma_sampler import CANDIDATE_FAILURE, FAILURE_ATTR, GenerationBusy, PyCmaSampler
from evomerge.search.genome import Genome
from evomerge.search.samplers import make_sampler
from evomerge.search.study import (N_LAYERS, Heartbeat, claim, count_trials, exclusive, fail_and_retry, find_study,
                                   mark_sampled, open_storage, open_study, recover_dead_trials, refuse_second_sqlite_worker,
                                   sqlite_file_missing)

if TYPE_CHECKING:
    from evomerge.merge.materialize import Materializer

MAX_CONSECUTIVE_FAILURES = 20
BUSY_WAIT_S = 0.5  # polling the study while other workers hold the rest of a generation or budget


@dataclass
class Scored:
    objectives: dict[str, float]
    scores: dict[str, float]
    timings: dict[str, float]


class Search:
    """Everything loaded once for a run: sources, candidate, evaluator, study.

    A new study is created only once the evaluator and the models have loaded, so a bad task,
    metric or model is reported before anything is written. A study that exists has passed
    those checks already (its fingerprint is this config's): it is resumed up to its next
    proposal first, from the study alone, and the models load after that (seconds for the
    study, minutes for a 7B model's weights); if they then fail to load, the proposed trial
    is given back for the next run to retry."""

    def __init__(self, config: RunConfig, *, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.config = config
        self._load_options = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
        self._evaluator: Evaluator | None = None
        self._materializer: Materializer | None = None
        self.load_seconds: float | None = None  # how long the evaluator and models took to load, once they have
        for ref in self._refs():
            local_dir(ref)  # a missing model is reported as such, before the study is read
        new_file = sqlite_file_missing(config.storage)  # no study in it, and opening it would create the file
        self.storage = None if new_file else open_storage(config.storage, config.heartbeat)
        existing = find_study(config, self.storage) if self.storage else None
        n_layers = existing.user_attrs.get(N_LAYERS) if existing else None
        if n_layers is None:
            n_layers = self.materializer.n_layers  # loads everything: checks it before a study is made
        self.storage = self.storage or open_storage(config.storage, config.heartbeat)
        self.genome = Genome(config.search_space, config.models, config.base_model, n_layers)
        self.study = existing or open_study(config, self.storage, create=True, n_layers=n_layers)
        if existing and existing.user_attrs.get(N_LAYERS) is None:  # made before studies recorded it: now they do
            existing.set_user_attr(N_LAYERS, n_layers)
        self.study.sampler = make_sampler(config, self.genome)
        self._sqlite_lock = refuse_second_sqlite_worker(self.study, config.storage)  # held while this object lives

    def _refs(self) -> list[str]:
        return ([self.config.base_model] if self.config.base_model else []) + self.config.models

    @property
    def evaluator(self) -> Evaluator:
        self._load()
        return self._evaluator

    @property
    def materializer(self) -> "Materializer":
        self._load()
        return self._materializer

    def _load(self) -> None:
        """The evaluator first (a bad task or metric is reported before any model loads), then the models."""
        if self._materializer is not None:
            return
        from evomerge.evaluate import build_evaluator  # torch, transformers, lm-eval: after a resume's first proposal
        from evomerge.merge.materialize import Materializer

        start, config, refs = time.perf_counter(), self.config, self._refs()
        self._evaluator = build_evaluator(config.fitness, resolve_path(refs[0], allow_pickle=self._load_options["allow_pickle"]))
        materializer = Materializer(refs, dtype=config.dtype, device=config.device, **self._load_options)
        genome = getattr(self, "genome", None)
        if genome is not None and genome.n_layers != materializer.n_layers:
            raise EvomergeError(f"the models now have {materializer.n_layers} layers, but study {config.study_name!r} "
                                f"was made with {genome.n_layers}; restore the models or use a new --study-name")
        self._materializer = materializer
        self.load_seconds = time.perf_counter() - start

    def counts(self) -> dict[TrialState, int]:
        return count_trials(self.study)

    def _waiting(self) -> bool:
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))  # SQL: see bulk_storage

    def score(self, params: dict[str, float]) -> Scored:
        start = time.perf_counter()
        recipe = self.genome.decode(params)
        model = self.materializer.apply(recipe)
        if model.device.type == "cuda":
            import torch  # loaded with the models

            torch.cuda.synchronize()
        faults.at("materialize")
        merged = time.perf_counter()
        scores = faults.scores(self.evaluator.evaluate(model))
        faults.at("evaluate")
        evaluated = time.perf_counter()
        objectives = self.config.fitness.objective_values({**scores, **candidate_costs(model)})
        bad = [k for k, v in objectives.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite objective(s) {bad}")
        return Scored(objectives, scores, {"materialize_s": merged - start, "evaluate_s": evaluated - merged})

    def run(self, on_trial: Callable[[int, dict[str, Any]], None] | None = None) -> int:
        """Run trials until the study holds n_trials completed ones (or the wall clock runs out); returns how many ran."""
        started, ran, failures = time.monotonic(), 0, 0
        while True:
            recover_dead_trials(self.study)
            counts = self.counts()
            if counts[TrialState.COMPLETE] >= self.config.n_trials:
                return ran
            if self.config.wall_clock_s is not None and time.monotonic() - started > self.config.wall_clock_s:
                return ran
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= self.config.n_trials:
                time.sleep(BUSY_WAIT_S)  # other workers are finishing the budget; one may fail and need a retry
                continue
            record = self.run_one()
            if record is None:
                continue
            ran += 1
            failures = failures + 1 if record["state"] == "FAIL" else 0
            if on_trial:
                on_trial(counts[TrialState.COMPLETE] + (record["state"] == "COMPLETE"), record)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise EvomergeError(f"{failures} candidates failed in a row (last: {record['error']}); "
                                    "stopping: check the models, search space and fitness")

    def run_one(self) -> dict[str, Any] | None:
        trial_start = time.perf_counter()
        sampler = self.study.sampler
        if isinstance(sampler, PyCmaSampler) and not self._waiting() and sampler.is_busy(self.study):
            time.sleep(BUSY_WAIT_S)  # other workers hold the rest of this CMA-ES generation
            return None
        with exclusive(self.study._storage, f"budget:{self.study.study_name}"):  # workers must not overshoot it
            counts = self.counts()
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= self.config.n_trials:
                return None  # another worker took the budget's last trial since run() counted
            trial = self.study.ask()
            claim(self.study, trial._trial_id)  # at once: a worker killed from here on is recoverable
        faults.begin(trial.number)
        with Heartbeat(self.storage, trial._trial_id):  # from the claim on: sampling may wait for other workers
            try:
                for name, dist in self.genome.distributions.items():
                    trial.suggest_float(name, dist.low, dist.high)
            except GenerationBusy as exc:  # lost a race for the last free slot to another worker
                trial.set_user_attr("error", str(exc))
                self.study.tell(trial, state=TrialState.FAIL)
                return None
            faults.at("sample")
            mark_sampled(self.study, trial._trial_id)
            try:
                self._load()  # a resumed search loads its models here, after its first proposal
            except BaseException as exc:  # not the candidate's fault: the next run retries it
                fail_and_retry(self.study, trial._trial_id, f"its worker stopped before evaluating it: "
                               f"{exc or type(exc).__name__}", given_back=True)
                raise
            try:
                scored = self._scored_before(trial) or self.score(trial.params)
            except KeyboardInterrupt:
                self._interrupted(trial)
                raise
            except Exception as exc:  # the candidate failed, not the search: record why and go on
                return self._failed(trial, exc)
        values = scored.objectives
        told = [self.config.fitness.scalarize(values)] if len(self.study.directions) == 1 else list(values.values())
        scored.timings["overhead_s"] = time.perf_counter() - trial_start - sum(scored.timings.values())
        for key, value in (("objectives", values), ("scores", scored.scores), ("timings", scored.timings),
                           ("recipe", self.genome.decode(trial.params).to_json()),  # cheap: no tensors
                           ("device", str(self.materializer.device))):
            trial.set_user_attr(key, value)
        faults.at("store")
        self.study.tell(trial, told)
        return {"number": trial.number, "state": "COMPLETE", "objectives": values, "value": told[0] if len(told) == 1 else None}

    def _scored_before(self, trial: optuna.Trial) -> Scored | None:
        """The result of a completed trial with the very same params, which this one then copies
        (user attr copy_of) instead of evaluating: scores are deterministic, and NSGA-II's children
        often copy a parent (a quarter of them at population 4, a few percent at 16)."""
        for earlier in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if earlier.params == trial.params:
                trial.set_user_attr("copy_of", earlier.number)
                return Scored(dict(earlier.user_attrs["objectives"]), dict(earlier.user_attrs["scores"]),
                              {"materialize_s": 0.0, "evaluate_s": 0.0})
        return None

    def _failed(self, trial: optuna.Trial, exc: BaseException) -> dict[str, Any]:
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        traceback.clear_frames(exc.__traceback__)  # the frames' locals (activations of an OOM) go now, not later
        gc.collect()
        import torch  # loaded with the models

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trial.set_user_attr(FAILURE_ATTR, CANDIDATE_FAILURE)
        trial.set_user_attr("error", error)
        try:
            trial.set_user_attr("recipe", self.genome.decode(trial.params).to_json())
        except EvomergeError:
            pass  # the genome itself was the problem; the error says so
        trial.set_user_attr("device", str(self.materializer.device))
        self.study.tell(trial, state=TrialState.FAIL)
        return {"number": trial.number, "state": "FAIL", "error": error}

    def _interrupted(self, trial: optuna.Trial) -> None:
        """Ctrl-C: the trial is not the candidate's fault; fail it so that it is retried first on resume."""
        fail_and_retry(self.study, trial._trial_id, "interrupted", given_back=True)
