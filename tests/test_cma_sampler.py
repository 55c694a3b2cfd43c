"""PyCmaSampler: CMA-ES replayed from the study, exactly, across kills and resumes."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evomerge.search.attrs import CANDIDATE_FAILURE, FAILURE, GENERATION, SLOT
from evomerge.search.cma_sampler import ALL_FAILED_VALUE, PyCmaSampler, ReplayMismatch, slot_of, told_values
from evomerge.search.workers import retry_dead_trial

SPACE = {"a": FloatDistribution(0.0, 1.0), "b": FloatDistribution(-2.0, 3.0), "c": FloatDistribution(0.0, 10.0)}
POPSIZE = 4
N = 40  # trials of the uninterrupted run (10 generations)
N_SQLITE = 16  # SQLite is slow: resumed SQLite runs are checked against a prefix
TARGET = {"a": 0.3, "b": 1.7, "c": 7.5}


def f(params: dict[str, float]) -> float:
    """A deterministic bumpy quadratic with its minimum near TARGET."""
    q = sum(((params[k] - TARGET[k]) / (d.high - d.low)) ** 2 for k, d in SPACE.items())
    return q + 0.01 * math.sin(20 * params["a"])


def suggest(trial: optuna.Trial, space: dict[str, FloatDistribution] = SPACE) -> dict[str, float]:
    return {k: trial.suggest_float(k, d.low, d.high) for k, d in space.items()}


def sampler(seed: int = 7, **kw) -> PyCmaSampler:
    return PyCmaSampler(SPACE, seed=seed, popsize=POPSIZE, **kw)


def run_until(study: optuna.Study, n_complete: int) -> None:
    """The caller's sequential ask/tell loop, until n_complete trials are COMPLETE."""
    while sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) < n_complete:
        trial = study.ask()
        study.tell(trial, f(suggest(trial)))


def history(study: optuna.Study) -> list[tuple[dict[str, float], float]]:
    return [(t.params, t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))]


def new_storage(kind: str, tmp_path: Path) -> str | optuna.storages.BaseStorage:
    """A storage a run can be reloaded from: an SQLite file, or (faster) one in memory."""
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    path = tmp_path / "b.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL").fetchall()  # fewer fsyncs, same semantics
    con.close()
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def uninterrupted() -> list[tuple[dict[str, float], float]]:
    """N trials in one go (in memory: resumed SQLite runs must match it bit for bit)."""
    study = optuna.create_study(sampler=sampler())
    run_until(study, N)
    return history(study)


# ------------------------------------------------------------------- behaviour


def _best(sampler_: optuna.samplers.BaseSampler, objective, n: int, direction: str = "minimize") -> float:
    study = optuna.create_study(sampler=sampler_, direction=direction)
    study.optimize(objective, n_trials=n)
    return study.best_value


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_beats_random_on_quadratic(direction):
    space = {f"x{i}": FloatDistribution(-3.0, 5.0) for i in range(4)}
    sign = 1.0 if direction == "minimize" else -1.0

    def sphere(trial):
        return sign * sum((v - 1.2) ** 2 for v in suggest(trial, space).values())

    seeds = range(3)
    cmaes = [sign * _best(PyCmaSampler(space, seed=s), sphere, 48, direction) for s in seeds]
    rand = [sign * _best(optuna.samplers.RandomSampler(seed=s), sphere, 48, direction) for s in seeds]
    assert np.median(cmaes) < np.median(rand) / 3, (cmaes, rand)


def test_maximize_climbs():
    study = optuna.create_study(sampler=sampler(seed=3), direction="maximize")
    study.optimize(lambda t: -f(suggest(t)), n_trials=32)
    values = [t.value for t in study.trials]
    assert np.mean(values[-POPSIZE:]) > np.mean(values[:POPSIZE]) + 0.05, values


def test_same_seed_same_sequence():
    def params(seed: int) -> list[dict[str, float]]:
        study = optuna.create_study(sampler=sampler(seed))
        study.optimize(lambda t: f(suggest(t)), n_trials=14)
        return [t.params for t in study.trials]

    assert params(5) == params(5)
    assert params(5) != params(6)


def test_global_numpy_rng_untouched():
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    study = optuna.create_study(sampler=sampler())
    study.optimize(lambda t: f(suggest(t)), n_trials=6)
    assert np.array_equal(np.random.rand(3), expected)


def test_every_trial_is_a_cma_trial_with_slots_in_order():
    study = optuna.create_study(sampler=sampler())
    study.optimize(lambda t: f(suggest(t)), n_trials=10)
    assert [slot_of(t) for t in study.trials] == [(i // POPSIZE, i % POPSIZE) for i in range(10)]


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [0, 3, 8, 13])
def test_exact_resume(tmp_path, uninterrupted, k):
    storage = new_storage("memory", tmp_path)
    run_until(optuna.create_study(storage=storage, study_name="s", sampler=sampler()), k)
    resumed = optuna.load_study(study_name="s", storage=storage, sampler=sampler())  # new sampler, new Study
    run_until(resumed, N)
    assert history(resumed) == uninterrupted


def test_exact_resume_from_sqlite_in_a_fresh_process(tmp_path, uninterrupted):
    """Killed after 10 trials (mid-generation 2); a new process replays and goes on."""
    url = new_storage("sqlite", tmp_path)
    run_until(optuna.create_study(storage=url, study_name="s", sampler=sampler()), 10)
    script = textwrap.dedent(
        f"""
        import optuna, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cma_sampler import run_until, sampler, N_SQLITE
        run_until(optuna.load_study(study_name="s", storage={url!r}, sampler=sampler()), N_SQLITE)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    assert history(optuna.load_study(study_name="s", storage=url)) == uninterrupted[:N_SQLITE]


def test_resume_with_another_seed_is_detected(tmp_path):
    url = new_storage("memory", tmp_path)
    run_until(optuna.create_study(storage=url, study_name="s", sampler=sampler(seed=1)), 6)
    study = optuna.load_study(study_name="s", storage=url, sampler=sampler(seed=2))
    with pytest.raises(ReplayMismatch):
        suggest(study.ask())


# --------------------------------------------------------------- killed worker


def _kill_mid_trial(url: str | optuna.storages.BaseStorage, k: int) -> int:
    """Run k trials, then ask one and die before telling it. Returns its trial id."""
    study = optuna.create_study(storage=url, study_name="s", sampler=sampler())
    run_until(study, k)
    trial = study.ask()
    suggest(trial)
    return trial._trial_id


@pytest.mark.parametrize(("kind", "k"), [("memory", 8), ("sqlite", 6)])
def test_killed_trial_retried_with_same_slot(tmp_path, uninterrupted, kind, k):
    url = new_storage(kind, tmp_path)
    killed_id = _kill_mid_trial(url, k)
    study = optuna.load_study(study_name="s", storage=url, sampler=sampler())
    study._storage.set_trial_state_values(killed_id, TrialState.FAIL)  # what the heartbeat does
    killed = study._storage.get_trial(killed_id)
    retry_dead_trial(study, killed)  # what evomerge's workers do
    n = N if kind == "memory" else N_SQLITE
    run_until(study, n)
    assert history(study) == uninterrupted[:n]
    retry = study.trials[k + 1]
    assert retry.system_attrs["failed_trial"] == killed.number
    assert slot_of(retry) == slot_of(killed) == (k // POPSIZE, k % POPSIZE)


def test_optunas_retry_callback_keeps_the_slot(tmp_path, uninterrupted):
    storage = new_storage("memory", tmp_path)
    killed_id = _kill_mid_trial(storage, 10)
    study = optuna.load_study(study_name="s", storage=storage, sampler=sampler())
    study._storage.set_trial_state_values(killed_id, TrialState.FAIL)
    killed = study._storage.get_trial(killed_id)
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # optuna >= 4.9
    with warnings.catch_warnings():  # experimental / deprecated, depending on the version
        warnings.simplefilter("ignore")
        (retry or optuna.storages.RetryFailedTrialCallback)()(study, killed)  # copies system attrs and params
    run_until(study, N)
    assert history(study) == uninterrupted
    assert slot_of(study.trials[11]) == slot_of(killed) == (2, 2)


def test_killed_trial_without_retry_frees_its_slot(tmp_path, uninterrupted):
    url = new_storage("memory", tmp_path)
    killed_id = _kill_mid_trial(url, 5)
    study = optuna.load_study(study_name="s", storage=url, sampler=sampler())
    study._storage.set_trial_state_values(killed_id, TrialState.FAIL)
    run_until(study, N)
    assert history(study) == uninterrupted


def test_no_slot_while_the_rest_of_a_generation_runs():
    """next_slot is what a worker asks before taking a trial: None while every slot of the current
    generation is held; a trial that arrives without a slot then is refused, never given a guess."""
    study = optuna.create_study(sampler=sampler())
    s = study.sampler
    running = []
    for slot in range(POPSIZE):
        assert s.next_slot(study) == (0, slot)
        trial = study.ask()
        running.append((trial, f(suggest(trial))))
    assert s.next_slot(study) is None
    blocked = study.ask()
    with pytest.raises(RuntimeError, match="every slot of the current CMA-ES generation is taken"):
        suggest(blocked)
    study.tell(blocked, state=TrialState.FAIL)  # untagged: ignored by the sampler
    for trial, value in running:
        study.tell(trial, value)
    assert s.next_slot(study) == (1, 0)
    trial = study.ask()
    suggest(trial)
    assert slot_of(study._storage.get_trial(trial._trial_id)) == (1, 0)


def test_out_of_order_completion_gives_the_same_generations(uninterrupted):
    """Several workers: a generation's trials finish in any order; slots keep the replay exact."""
    study = optuna.create_study(sampler=sampler())
    for _ in range(3):
        running = [(t, f(suggest(t))) for t in (study.ask() for _ in range(POPSIZE))]
        for trial, value in reversed(running):
            study.tell(trial, value)
    assert history(study) == uninterrupted[: 3 * POPSIZE]


def test_duplicate_slot_lowest_complete_wins(uninterrupted):
    """Two trials on one slot: the generation waits for both, the lower-numbered COMPLETE counts."""
    study = optuna.create_study(sampler=sampler())
    first = study.ask()
    params = suggest(first)  # slot (0, 0)
    study.add_trial(create_trial(state=TrialState.WAITING, system_attrs={GENERATION: 0, SLOT: 0}))
    dup = study.ask()
    assert suggest(dup) == params
    study.tell(dup, f(params) + 100.0)  # finishes first, with another value: must not count
    for _ in range(POPSIZE - 1):
        trial = study.ask()
        study.tell(trial, f(suggest(trial)))
    assert study.sampler.next_slot(study) is None  # slot 0 still has a RUNNING trial
    study.tell(first, f(params))
    run_until(study, N + 1)
    assert [(t.params, t.value) for t in study.trials if t.number != dup.number] == uninterrupted


# ----------------------------------------------------------- candidate failure


def test_told_values_rule():
    assert told_values([1.0, None, 3.0]) == [1.0, 5.0, 3.0]  # worst 3 + spread 2
    assert told_values([2.0, None, 2.0]) == [2.0, 3.0, 2.0]  # no spread: worst + 1
    assert told_values([None, None]) == [ALL_FAILED_VALUE] * 2


def test_candidate_failures_do_not_stall():
    study = optuna.create_study(sampler=sampler())
    for i in range(4 * POPSIZE):
        trial = study.ask()
        params = suggest(trial)
        if i % POPSIZE == 1 or i // POPSIZE == 2:  # one bad candidate per generation, all of gen 2
            trial.set_user_attr(FAILURE, CANDIDATE_FAILURE)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, f(params))
    assert [slot_of(t) for t in study.trials] == [(i // POPSIZE, i % POPSIZE) for i in range(4 * POPSIZE)]
    assert sum(t.state == TrialState.FAIL for t in study.trials) == POPSIZE + 3


def test_nothing_pickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = new_storage("memory", tmp_path)  # RDB storages would refuse non-JSON attrs outright
    killed_id = _kill_mid_trial(url, 5)
    study = optuna.load_study(study_name="s", storage=url, sampler=sampler())
    study._storage.set_trial_state_values(killed_id, TrialState.FAIL)
    retry_dead_trial(study, study._storage.get_trial(killed_id))
    trial = study.ask()
    suggest(trial)
    trial.set_user_attr(FAILURE, CANDIDATE_FAILURE)
    study.tell(trial, state=TrialState.FAIL)
    run_until(study, 12)
    for t in study.trials:
        for attrs in (t.system_attrs, t.user_attrs):
            json.dumps(attrs)
            assert not any(key.startswith("cma:") for key in attrs)
        assert {GENERATION, SLOT} <= set(t.system_attrs)
    json.dumps(study._storage.get_study_system_attrs(study._study_id))
    assert not list(tmp_path.iterdir())  # pycma wrote no outcmaes/ logs


# ------------------------------------------------------------------ validation


def test_rejects_unsupported_spaces_and_multi_objective():
    with pytest.raises(ValueError):
        PyCmaSampler({"x": FloatDistribution(1e-3, 1.0, log=True)}, seed=0)
    with pytest.raises(ValueError):
        PyCmaSampler({"x": FloatDistribution(0.0, 1.0, step=0.1)}, seed=0)
    with pytest.raises(ValueError):
        PyCmaSampler(SPACE, seed=0, x0={"a": 2.0})
    study = optuna.create_study(sampler=sampler(), directions=["minimize", "minimize"])
    with pytest.raises(ValueError, match="single-objective"):
        suggest(study.ask())


def test_x0_and_params_outside_the_space():
    s = PyCmaSampler(SPACE, seed=0, popsize=POPSIZE, x0={"a": 0.9, "b": 2.5, "c": 9.0}, sigma0=1e-3)
    study = optuna.create_study(sampler=s)
    trial = study.ask()
    params = suggest(trial)
    assert params == pytest.approx({"a": 0.9, "b": 2.5, "c": 9.0}, abs=0.1)
    assert 0 <= trial.suggest_float("extra", 0, 1) <= 1  # sampled independently
