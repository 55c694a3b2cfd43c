"""CMA-ES (pycma) as an Optuna sampler whose state is replayed, never stored.

Why replay
----------
Optuna's own ``CmaEsSampler`` pickles its optimizer into trial system attrs and
unpickles it on the next trial. With a shared SQLite/PostgreSQL storage that
turns the database into a code-execution channel, and it ties a days-long run
to the pickle format of one library version. :class:`PyCmaSampler` stores no
optimizer state at all: on every :meth:`~PyCmaSampler.sample_relative` it
builds a fresh ``cma.CMAEvolutionStrategy`` and replays the finished
generations recorded in the study (``ask()`` then ``tell()`` with the stored
objective values). Trials carry only two JSON-safe ints as system attrs,
``pycma:generation`` and ``pycma:slot``; a killed search resumes from the
storage alone, with a new sampler instance, in a new process.

Exact replay
------------
The replay is exact because every random draw is a function of
``(seed, generation)``. pycma 4.5 draws its Gaussian samples through its
``randn`` option (default ``np.random.randn``, the global RNG;
``cma.sampler.GaussFullSampler.sample`` and the mirror/elitist rescaling in
``ask_geno``/``tell`` all call ``opts['randn']``); we pass a per-instance
``randn`` backed by a ``numpy.random.Generator`` re-seeded before the ``ask()``
of each generation, and set ``seed=nan`` so construction doesn't reseed the
global RNG. A few non-default pycma code paths (TPA step-size consistency
checks, integer centering, rotations) use ``np.random`` directly, so as a
second guard the global RNG is also seeded from ``(seed, generation)`` before
each ``ask()``; the caller's global state is saved and restored around the
whole replay.

Generations and slots
---------------------
Generation ``g`` has ``popsize`` slots; candidate ``s`` is the ``s``-th vector of
the ``ask()`` that follows the replay of generations ``0..g-1``. A new trial
takes the lowest free slot of the first unfinished generation. Per slot:

* the lowest-numbered COMPLETE trial, or PRUNED trial with an ``estimate`` user
  attr (racing), gives the value (a non-finite value counts as a failure);
* otherwise a FAIL trial with user attr ``failure == "candidate"`` (or a PRUNED
  trial without an estimate) makes the slot finished-as-failed;
* a FAIL trial *without* that attr is a killed worker: it neither holds nor
  finishes the slot; its retry carries the same ``(generation, slot)``. If no retry is enqueued, the next new trial re-takes
  the slot, so a generation can't deadlock;
* RUNNING/WAITING trials hold the slot.

A generation is finished when every slot is decided and none of its trials is
still RUNNING/WAITING (so late duplicates can't rewrite a generation that later
ones were built on). Failed slots are told to pycma (which minimizes) as
``worst + (spread if spread > 0 else 1.0)``, where worst/spread are the max and
max-min of the generation's finite completed values in minimization sign; when
the whole generation failed, every slot gets :data:`ALL_FAILED_VALUE`.

Slots are chosen from the history alone (:meth:`PyCmaSampler.next_slot`). With several
workers, the choice must be made and recorded by one worker at a time, and a worker must wait
while the rest of a generation runs elsewhere: that is worker coordination, not sampling, and
lives in :mod:`evomerge.search.workers`, which records the slot on the trial before it is
sampled. A trial that arrives without a slot (a single worker calling ``study.optimize``) takes
the next free one here.

Retries of killed trials must carry the killed trial's ``pycma:*`` system attrs, as evomerge's
retry (:func:`evomerge.search.workers.retry_dead_trial`) and Optuna's own heartbeat callback
(``RetryHeartbeatStaleTrialCallback``) do: both copy all system attrs. A trial enqueued by the
user (``fixed_params`` without ``pycma:*`` attrs) is not part of the CMA search: its missing
params come from the ``RandomSampler``.

The global-RNG guard is process-wide (replays are serialized by a lock): prefer processes to
threads for parallel workers.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.search.attrs import CANDIDATE_FAILURE, ESTIMATE, FAILURE, GENERATION, SLOT

if TYPE_CHECKING:  # pycma is imported when first used (see _import_cma)
    import cma

ALL_FAILED_VALUE = 1e30
"""Value told for every slot of a generation in which no candidate completed."""

_PENDING = (TrialState.RUNNING, TrialState.WAITING)
_GLOBAL_RNG_LOCK = threading.Lock()


class ReplayMismatch(RuntimeError):
    """The replayed candidates differ from the params recorded in the study.

    The sampler was built with another seed, popsize, sigma0, x0 or search
    space than the one that produced the study, or the history was edited.
    """


# ---------------------------------------------------------------- trial helpers


def slot_of(trial: FrozenTrial) -> tuple[int, int] | None:
    """The ``(generation, slot)`` a trial was sampled for, or None."""
    g = trial.system_attrs.get(GENERATION)
    s = trial.system_attrs.get(SLOT)
    if isinstance(g, int) and isinstance(s, int):
        return g, s
    return None


def is_candidate_failure(trial: FrozenTrial) -> bool:
    """True for a FAIL trial whose candidate itself was bad (it won't be retried)."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get(FAILURE) == CANDIDATE_FAILURE


def _is_killed(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and not is_candidate_failure(trial)


# ------------------------------------------------------------------ generations


@dataclass(frozen=True)
class _Generation:
    number: int
    popsize: int
    slots: dict[int, list[FrozenTrial]]  # slot -> its trials, by trial number

    def pending(self) -> list[int]:
        return sorted(t.number for ts in self.slots.values() for t in ts if t.state in _PENDING)

    def free_slot(self) -> int | None:
        for s in range(self.popsize):
            if all(_is_killed(t) for t in self.slots.get(s, [])):
                return s
        return None

    def outcomes(self, sign: float) -> list[float | None] | None:
        """Per slot: value in minimization sign, None if failed; None if not finished."""
        if self.pending():
            return None
        out: list[float | None] = []
        for s in range(self.popsize):
            outcome = _slot_outcome(self.slots.get(s, []), sign)
            if outcome is _UNDECIDED:
                return None
            out.append(outcome)  # type: ignore[arg-type]
        return out


_UNDECIDED = object()


def _slot_outcome(trials: list[FrozenTrial], sign: float) -> float | None | object:
    """A slot's value (minimization sign), None for a failed slot, or _UNDECIDED. A PRUNED trial
    (racing) gives its `estimate` (evomerge.fitness.racing: a pruned member is worse than the best so
    far, not necessarily than its generation, and CMA-ES ranks the whole generation), a value
    never read from Optuna's `value`, which for a pruned trial is meaningless."""
    for t in trials:  # sorted by number: lowest COMPLETE or estimated PRUNED wins
        estimate = t.user_attrs.get(ESTIMATE) if t.state == TrialState.PRUNED else None
        if t.state == TrialState.COMPLETE or estimate is not None:
            value = sign * float(t.value if estimate is None else estimate)  # type: ignore[arg-type]
            return value if math.isfinite(value) else None
    if any(t.state == TrialState.PRUNED or is_candidate_failure(t) for t in trials):
        return None
    return _UNDECIDED


def told_values(outcomes: Sequence[float | None]) -> list[float]:
    """Values told to pycma (minimizing): failures become worst + (spread or 1.0)."""
    finite = [v for v in outcomes if v is not None]
    if not finite:
        return [ALL_FAILED_VALUE] * len(outcomes)
    worst, spread = max(finite), max(finite) - min(finite)
    penalty = worst + (spread if spread > 0 else 1.0)
    return [penalty if v is None else v for v in outcomes]


def _group(trials: Sequence[FrozenTrial], popsize: int) -> dict[int, _Generation]:
    slots: dict[int, dict[int, list[FrozenTrial]]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        key = slot_of(t)
        if key is None:
            continue
        g, s = key
        if not 0 <= s < popsize:
            raise ReplayMismatch(f"trial {t.number} has slot {s} but popsize is {popsize}")
        slots.setdefault(g, {}).setdefault(s, []).append(t)
    return {g: _Generation(g, popsize, by_slot) for g, by_slot in slots.items()}


# ----------------------------------------------------------------------- random


def _generation_seed(seed: int, generation: int) -> int:
    digest = hashlib.sha256(f"evomerge.pycma:{seed}:{generation}".encode()).digest()
    return int.from_bytes(digest[:16], "big")


def _import_cma() -> Any:
    """`import cma`, without the optional matplotlib and scipy.stats it tries to import for its
    plots and surrogate models, which this sampler never uses: measured at 1.2-2.4 s of a
    resumed search's ~3 s overhead (pycma 4.5 imports them eagerly and offers no switch). Only
    that import is spared them; they load as usual for everything else in the process. Checked
    with the pycma releases pyproject.toml allows (4.4.4, 4.5.0)."""
    if "cma" in sys.modules:
        return sys.modules["cma"]
    hidden = [name for name in ("matplotlib", "scipy") if name not in sys.modules]
    try:
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Could not import matplotlib")
            import cma
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return cma


@contextmanager
def _sandbox() -> Iterator[None]:
    """Restore numpy's global RNG and pycma's global verbosity afterwards; one replay at a time."""
    _import_cma()
    import cma.utilities.utils as cma_utils

    with _GLOBAL_RNG_LOCK:
        saved_state, saved_verbosity = np.random.get_state(), cma_utils.global_verbosity
        try:
            yield
        finally:
            np.random.set_state(saved_state)
            cma_utils.global_verbosity = saved_verbosity


class _GenerationRandn:
    """Per-instance ``randn(*shape)`` for pycma, reseeded for each generation.

    pycma keeps the callable it is given (a plain function survives its option
    copying), so ``draw`` is a closure over this holder.
    """

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

        def draw(*shape: int) -> np.ndarray:
            return self.rng.standard_normal(shape)

        self.draw: Callable[..., np.ndarray] = draw

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        np.random.seed(seed % 2**32)  # guard for pycma paths that use np.random directly


# ---------------------------------------------------------------------- sampler


class PyCmaSampler(BaseSampler):
    """CMA-ES over a fixed space of bounded floats, replayed from the study.

    CMA runs in the normalized cube [0, 1]^n (pycma ``bounds=[0, 1]``); each
    dimension maps linearly onto its distribution's ``[low, high]``.

    Args:
        search_space: name -> ``FloatDistribution`` (bounded, no log, no step).
            Every trial samples these through CMA, including the first.
        seed: makes the whole search a deterministic function of the history;
            also seeds the ``RandomSampler`` used for params outside the space.
        popsize: candidates per generation (default pycma's
            ``4 + floor(3 ln n)``).
        sigma0: initial step size in normalized units (default 1/6).
        x0: initial mean in each distribution's own units (default: the middle
            of each range; missing names also take the middle).
    """

    def __init__(
        self,
        search_space: dict[str, FloatDistribution],
        *,
        seed: int,
        popsize: int | None = None,
        sigma0: float = 1 / 6,
        x0: dict[str, float] | None = None,
    ) -> None:
        _validate_space(search_space)
        n = len(search_space)
        self._space: dict[str, FloatDistribution] = dict(search_space)
        self._names = list(search_space)
        self._seed = int(seed)
        self._popsize = int(popsize) if popsize is not None else 4 + int(3 * math.log(n))
        if self._popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {self._popsize}")
        if not (sigma0 > 0 and math.isfinite(sigma0)):
            raise ValueError(f"sigma0 must be a positive finite number, got {sigma0}")
        self._sigma0 = float(sigma0)
        self._x0 = _normalized_x0(self._space, x0 or {})
        self._independent = RandomSampler(seed=seed)
        # In-memory only (never stored): the strategy after the last replay, so a long-lived sampler
        # tells just the generations finished since, instead of replaying the whole history per trial.
        self._memo: tuple[list[list[float]], cma.CMAEvolutionStrategy, _GenerationRandn, list[np.ndarray]] | None = None

    @property
    def popsize(self) -> int:
        return self._popsize

    @property
    def search_space(self) -> dict[str, FloatDistribution]:
        return dict(self._space)

    # -- BaseSampler -----------------------------------------------------------

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        _require_single_objective(study)
        return dict(self._space)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        _require_single_objective(study)
        if not search_space:
            return {}
        slot = slot_of(trial)  # recorded by the worker that took the trial, or carried by a retry
        if slot is None and "fixed_params" in trial.system_attrs:
            return {}  # a user-enqueued trial: not part of the CMA search
        generations = _group([t for t in study.get_trials(deepcopy=False) if t.number != trial.number], self._popsize)
        if slot is None:  # a single worker's study.optimize: the next free slot (see the module docstring)
            slot = self._free_slot(generations, _sign(study))
            if slot is None:
                raise RuntimeError("every slot of the current CMA-ES generation is taken by a running trial; "
                                   "with several workers, take trials through evomerge.search.workers.Worker")
            study._storage.set_trial_system_attr(trial._trial_id, GENERATION, slot[0])  # as Optuna's samplers record
            study._storage.set_trial_system_attr(trial._trial_id, SLOT, slot[1])
        g, s = slot
        candidates = self._replay(self._finished_before(generations, g, _sign(study)), generations)
        return self._to_params(candidates[s])

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        """Reseed the independent sampler only; CMA stays a function of ``seed``."""
        self._independent.reseed_rng()

    # -- public helpers --------------------------------------------------------

    def next_slot(self, study: Study) -> tuple[int, int] | None:
        """The ``(generation, slot)`` a new trial should take: the lowest free slot of the first
        unfinished generation; None while that generation's remaining slots are all held by
        RUNNING/WAITING trials (its next candidates depend on their results)."""
        return self._free_slot(_group(study.get_trials(deepcopy=False), self._popsize), _sign(study))

    # -- internals -------------------------------------------------------------

    def _free_slot(self, generations: dict[int, _Generation], sign: float) -> tuple[int, int] | None:
        g = 0
        while generations.get(g, _Generation(g, self._popsize, {})).outcomes(sign) is not None:
            g += 1
        slot = generations.get(g, _Generation(g, self._popsize, {})).free_slot()
        return None if slot is None else (g, slot)

    def _finished_before(self, generations: dict[int, _Generation], g: int, sign: float) -> list[list[float]]:
        finished = []
        for i in range(g):
            outcomes = generations.get(i, _Generation(i, self._popsize, {})).outcomes(sign)
            if outcomes is None:
                raise ReplayMismatch(f"a trial of generation {g} exists but generation {i} is not finished")
            finished.append(told_values(outcomes))
        return finished

    def _new_strategy(self, randn: _GenerationRandn) -> cma.CMAEvolutionStrategy:
        options = {
            "bounds": [0.0, 1.0],
            "popsize": self._popsize,
            "randn": randn.draw,
            "seed": float("nan"),  # don't touch the global RNG at construction
            "verbose": -9,
            "verb_log": 0,  # no outcmaes/ files
            "verb_disp": 0,
        }
        return _import_cma().CMAEvolutionStrategy(list(self._x0), self._sigma0, options)

    def _replay(self, finished: list[list[float]], generations: dict[int, _Generation]) -> list[np.ndarray]:
        """Rebuild CMA, tell the finished generations, return the next generation's candidates.

        Resumes from the memo when its told values are a prefix of `finished` (they always are
        in one process: finished generations never change), else starts from scratch. The
        recorded params are checked against the replay in the first and last generations it
        replays and the one it proposes from: a replay that drifts (another seed, pycma
        version...) never comes back, and checking every generation was a tenth of a
        10,000-trial resume."""
        with _sandbox():
            start, es, randn, candidates = self._resume_point(finished)
            for g in range(start, len(finished)):
                if g in (start, len(finished) - 1):
                    self._check_recorded(generations.get(g), candidates)
                es.tell(candidates, finished[g])
                candidates = self._ask(es, randn, g + 1)
            self._memo = ([list(v) for v in finished], es, randn, candidates)
        self._check_recorded(generations.get(len(finished)), candidates)
        return [np.array(x, dtype=float) for x in candidates]

    def _resume_point(self, finished: list[list[float]]):
        if self._memo is not None:
            told, es, randn, candidates = self._memo
            if len(told) <= len(finished) and finished[: len(told)] == told:
                return len(told), es, randn, candidates
        randn = _GenerationRandn()
        es = self._new_strategy(randn)
        return 0, es, randn, self._ask(es, randn, 0)

    def _ask(self, es: cma.CMAEvolutionStrategy, randn: _GenerationRandn, generation: int) -> list[np.ndarray]:
        randn.reseed(_generation_seed(self._seed, generation))
        return es.ask()

    def _to_params(self, u: np.ndarray) -> dict[str, float]:
        params = {}
        for name, ui in zip(self._names, u):
            d = self._space[name]
            params[name] = min(max(d.low + float(ui) * (d.high - d.low), d.low), d.high)
        return params

    def _check_recorded(self, gen: _Generation | None, candidates: list[np.ndarray]) -> None:
        if gen is None:
            return
        for s, trials in gen.slots.items():
            expected = self._to_params(candidates[s])
            for t in trials:
                for name, value in expected.items():
                    if name in t.params and not _close(t.params[name], value, self._space[name]):
                        raise ReplayMismatch(
                            f"trial {t.number} (generation {gen.number}, slot {s}) has {name}={t.params[name]!r} "
                            f"but the replay gives {value!r}: the sampler's seed/popsize/sigma0/x0/search space "
                            "differ from the run that produced this study"
                        )


# ------------------------------------------------------------------- validation


def _validate_space(search_space: dict[str, FloatDistribution]) -> None:
    if not search_space:
        raise ValueError("search_space is empty")
    for name, d in search_space.items():
        if not isinstance(d, FloatDistribution) or d.log or d.step is not None:
            raise ValueError(f"{name}: PyCmaSampler supports only FloatDistribution without log/step, got {d!r}")
        if not (math.isfinite(d.low) and math.isfinite(d.high) and d.high > d.low):
            raise ValueError(f"{name}: needs finite bounds with high > low, got [{d.low}, {d.high}]")


def _normalized_x0(space: dict[str, FloatDistribution], x0: dict[str, float]) -> list[float]:
    unknown = set(x0) - set(space)
    if unknown:
        raise ValueError(f"x0 names not in the search space: {sorted(unknown)}")
    out = []
    for name, d in space.items():
        value = float(x0.get(name, (d.low + d.high) / 2))
        if not d.low <= value <= d.high:
            raise ValueError(f"x0[{name!r}]={value} is outside [{d.low}, {d.high}]")
        out.append((value - d.low) / (d.high - d.low))
    return out


def _require_single_objective(study: Study) -> None:
    if len(study.directions) != 1:
        raise ValueError("PyCmaSampler supports single-objective studies only")


def _sign(study: Study) -> float:
    return -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0


def _close(recorded: Any, replayed: float, d: FloatDistribution) -> bool:
    return math.isclose(float(recorded), replayed, rel_tol=1e-9, abs_tol=1e-12 * (d.high - d.low))

