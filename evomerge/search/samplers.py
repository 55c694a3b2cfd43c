"""Building the sampler for the next trial.

Optuna samplers seed their RNG once, at construction, so a restarted process would
restart the stream. Building a fresh sampler before every ask, seeded from (run seed,
completed trials, running trials), makes a killed and resumed single worker propose
exactly what an uninterrupted one would. CMA-ES replays its own generations from the
study and always gets the run seed.
"""

from __future__ import annotations

import hashlib

import optuna
from optuna.samplers import BaseSampler

from evomerge.config import RunConfig
from evomerge.search.cma_sampler import PyCmaSampler
from evomerge.search.genome import Genome


def trial_seed(seed: int, n_complete: int, n_running: int) -> int:
    digest = hashlib.sha256(f"{seed}:{n_complete}:{n_running}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_sampler(config: RunConfig, genome: Genome, n_complete: int, n_running: int,
                 previous: BaseSampler | None = None) -> BaseSampler:
    """The sampler for the next ask; CMA-ES keeps its instance (`previous`), whose in-memory
    memo spares replaying the whole history on every trial."""
    options = dict(config.sampler_options)
    if config.sampler == "cmaes":
        if isinstance(previous, PyCmaSampler):
            return previous
        return PyCmaSampler(genome.distributions, seed=config.seed, x0=genome.x0, **options)
    seed = trial_seed(config.seed, n_complete, n_running)
    if config.sampler == "nsga2":
        options.setdefault("population_size", 16)
        return optuna.samplers.NSGAIISampler(seed=seed, **options)
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **options)
    return optuna.samplers.RandomSampler(seed=seed)
