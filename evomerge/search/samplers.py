"""Building the run's sampler.

Optuna samplers seed their RNG once, at construction, so a restarted process would restart
the stream. `TrialSeeded` rebuilds the sampler before every trial with a seed keyed on that
trial's place among the study's fresh trials (a retry takes the place of the trial it
retries), so a killed and resumed single worker proposes exactly what an uninterrupted one
would, and concurrent workers, or a trial after a failed one, never share a seed. CMA-ES
replays its own generations from the study and always gets the run seed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import RunConfig
from evomerge.search.attrs import RETRY_HISTORY
from evomerge.search.cma_sampler import PyCmaSampler
from evomerge.search.genome import Genome
from evomerge.search.storage import Database


def trial_seed(seed: int, place: int) -> int:
    digest = hashlib.sha256(f"{seed}:{place}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TrialSeeded(BaseSampler):
    """A sampler built anew for each trial by `build(seed)`, seeded from (run seed, fresh place)."""

    def __init__(self, build: Callable[[int], BaseSampler], seed: int, db: Database):
        self._build, self._seed, self._db = build, seed, db
        self._inner = build(seed)

    def fresh_place(self, study: Study, trial: FrozenTrial) -> int:
        """How many fresh trials (not retries) precede the trial, or the trial it retries."""
        first = trial.system_attrs.get(RETRY_HISTORY, [trial.number])[0]
        return self._db.count_fresh_before(self._db.study_id(study.study_name), first)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._inner = self._build(trial_seed(self._seed, self.fresh_place(study, trial)))
        if isinstance(self._inner, optuna.samplers.NSGAIISampler):
            # Optuna orders a generation's parents by elite rank when it first chooses them, by trial
            # id when it reads them back from the study, and picks parents by position: choosing (and
            # storing) them first means every proposal reads them back, so the retry of a generation's
            # killed first trial proposes what that trial would have.
            self._inner.get_parent_population(study, self._inner.get_trial_generation(study, trial))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)


def make_sampler(config: RunConfig, genome: Genome, db: Database) -> BaseSampler:
    """The run's sampler; one instance serves the whole run (CMA-ES keeps an in-memory memo
    that spares replaying the whole history on every trial)."""
    options = dict(config.sampler_options)
    if config.sampler == "cmaes":
        return PyCmaSampler(genome.distributions, seed=config.seed, x0=genome.x0, **options)
    if config.sampler == "nsga2":
        options.setdefault("population_size", 16)
        return TrialSeeded(lambda seed: optuna.samplers.NSGAIISampler(seed=seed, **options), config.seed, db)
    if config.sampler == "tpe":
        return TrialSeeded(lambda seed: optuna.samplers.TPESampler(seed=seed, **options), config.seed, db)
    return TrialSeeded(lambda seed: optuna.samplers.RandomSampler(seed=seed), config.seed, db)
