"""This process as one of a study's workers: taking the next trial, keeping it alive, giving it
back, and recovering the trials of workers that died.

`Worker.next_trial()` is the one place a trial is claimed. Under the study's budget lock it
checks the budget, chooses the sampler's slot (CMA-ES: the generation's next free candidate),
asks Optuna for the trial and marks it as this process's; while the caller works on it a thread
records its heartbeat; anything that escapes the caller's block (Ctrl-C, a lost database, a bug)
gives the trial back: it is failed with the reason and retried by the next run, with the same
parameters once they were all sampled. A candidate that fails is the caller's to record.

A worker that dies mid-trial leaves a RUNNING trial. If it ran on this host and its process is
gone, it is failed at once and retried (so a killed single-worker search resumes exactly where it
stopped); otherwise Optuna's heartbeats fail it once its grace period passes, and the same retry
applies. Several workers share a study only on a server database (PostgreSQL); a SQLite study
takes one worker, and a lock file refuses a second.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import EvomergeError
from evomerge.search.attrs import GENERATION, GIVEN_BACK, RETRY_HISTORY, SAMPLED, SLOT, WORKER
from evomerge.search.storage import Database, DatabaseUnreachable

HOST = socket.gethostname()
MAX_RETRIES = 1  # a candidate whose worker died twice is given up: it may be what kills workers
# Heartbeats in an ask/tell loop are what Optuna's docs prescribe for it; its warnings say otherwise.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                        message=".*(heartbeat_interval|fail_stale_trials)")
_ONE_WORKER = "SQLite cannot share a study between workers: use a postgresql:// storage URL for several workers"


def retry_dead_trial(study: optuna.Study, trial: FrozenTrial, given_back: bool = False) -> None:
    """Enqueue the retry of a trial whose worker died (also Optuna's heartbeat callback), or that
    was `given_back` unevaluated; only deaths count against MAX_RETRIES. As with Optuna's own
    retry callback, the retry records the earlier attempts (retry_history, the first attempt
    first: the retry takes its place in the search) and keeps the CMA-ES slot.

    The retry carries the trial's params only once all were sampled: a worker killed between
    two suggests leaves some, and fixing those would make the sampler draw the rest from
    another point of its stream. It never carries the dead worker's claim, which would get the
    retry failed as dead again before its new worker claims it, nor the dead attempt's records
    (its error, results stored before the kill)."""
    history = [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]
    given = trial.system_attrs.get(GIVEN_BACK, 0) + int(given_back)
    if len(history) - given > MAX_RETRIES:
        return
    system_attrs = {**trial.system_attrs, "failed_trial": trial.number, RETRY_HISTORY: history}
    system_attrs.pop(WORKER, None)
    if given:
        system_attrs[GIVEN_BACK] = given
    sampled = bool(trial.system_attrs.get(SAMPLED))
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=trial.params if sampled else {},
                                        distributions=trial.distributions if sampled else {}, system_attrs=system_attrs))


class Heartbeat:
    """Records the trial's heartbeat from a thread while the trial runs (an ask/tell loop must do
    this itself; only study.optimize does it for you). A database lost for good ends the thread
    quietly: the main thread meets the same error and reports it."""

    def __init__(self, storage: BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or 10
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - see the class docstring
                return
            if self._stop.wait(interval):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_dead(trial: FrozenTrial, single_worker: bool, grace_s: float) -> bool:
    """Ours and gone: claimed on this host by a process that no longer exists. Unclaimed (killed
    between Optuna's ask and our claim, so no heartbeat either): dead at once where only one
    worker can exist (SQLite), else once its grace period has passed."""
    worker = trial.system_attrs.get(WORKER)
    if worker is None:
        started = trial.datetime_start or datetime.now()
        return single_worker or (datetime.now() - started).total_seconds() > grace_s
    return worker.get("host") == HOST and worker.get("pid") != os.getpid() and not _pid_alive(int(worker.get("pid", 0)))


class Worker:
    """This process's part in a study (see the module docstring); holds a SQLite study's lock file."""

    def __init__(self, db: Database, study: optuna.Study, sqlite_lock: IO[str] | None = None):
        """`sqlite_lock`: `sqlite_worker_lock`'s file, taken before the models loaded (kept while this lives)."""
        self.db, self.study = db, study
        self.study_id = db.study_id(study.study_name)
        self._sqlite_lock = sqlite_lock
        self._refuse_second_sqlite_worker()

    def counts(self) -> dict[TrialState, int]:
        return self.db.count_trials(self.study_id)

    def recover_dead_trials(self) -> list[int]:
        """Fail (and retry once) RUNNING trials whose worker is gone; returns their numbers."""
        optuna.storages.fail_stale_trials(self.study)
        grace = float(self.db.rdb.get_heartbeat_interval() or 10) * 3
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))  # in SQL (bulk_storage)
        dead = [t for t in running if _is_dead(t, self.db.single_worker, grace)]
        return [t.number for t in dead if self.fail_and_retry(self._id(t.number), "its worker process died")]

    def fail_and_retry(self, trial_id: int, reason: str, *, given_back: bool = False) -> bool:
        """Fail a trial that is not the candidate's fault (its worker died, or gave it back
        unevaluated) and enqueue its retry; False if another worker did it first. The reason goes
        first: a finished trial takes no more attrs."""
        storage = self.db.storage
        try:
            storage.set_trial_user_attr(trial_id, "error", reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
        retry_dead_trial(self.study, storage.get_trial(trial_id), given_back)
        return True

    @contextmanager
    def next_trial(self, n_trials: int) -> Iterator[optuna.Trial | None]:
        """The trial this worker runs next, claimed and kept alive while the block runs; None when
        there is none to take now (a budget of `n_trials` completed trials is taken, or the rest of
        a CMA-ES generation runs on other workers: wait and ask again). If another worker failed the
        trial meanwhile (a heartbeat later than the grace period), the block ends there, with one line."""
        taken = self._take(n_trials)
        if taken is None:
            yield None
            return
        trial, trial_id = taken
        with Heartbeat(self.db.storage, trial_id):
            try:
                yield trial
            except UpdateFinishedTrialError:  # another worker saw its heartbeat late and failed it: its retry runs it
                print(f"evomerge: trial {trial.number} was failed as stale by another worker while this one ran it "
                      "(its heartbeat came late); its retry runs it again", file=sys.stderr, flush=True)
            except BaseException as exc:
                self._give_back(trial_id, exc)
                raise

    def mark_sampled(self, trial: optuna.Trial) -> None:
        """All the trial's params are recorded: a retry may carry them (see retry_dead_trial)."""
        self.db.storage.set_trial_system_attr(self._id(trial.number), SAMPLED, True)

    def _take(self, n_trials: int) -> tuple[optuna.Trial, int] | None:
        """Under the budget lock: budget, slot, ask, claim (see the module docstring)."""
        next_slot = getattr(self.study.sampler, "next_slot", None)  # CMA-ES: candidates have places
        with self.db.exclusive(f"budget:{self.study.study_name}"):  # workers must not overshoot the budget
            counts = self.counts()
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= n_trials:
                return None
            slot = None
            if next_slot is not None and not counts[TrialState.WAITING]:  # a waiting retry keeps its own slot
                slot = next_slot(self.study)
                if slot is None:
                    return None
            trial = self.study.ask()
            trial_id = self._id(trial.number)
            storage = self.db.storage
            if slot is not None and not {GENERATION, "fixed_params"} & set(storage.get_trial(trial_id).system_attrs):
                storage.set_trial_system_attr(trial_id, GENERATION, slot[0])
                storage.set_trial_system_attr(trial_id, SLOT, slot[1])
            storage.set_trial_system_attr(trial_id, WORKER, {"host": HOST, "pid": os.getpid()})
            storage.record_heartbeat(trial_id)  # at once: a worker killed from here on is recoverable
        return trial, trial_id

    def _give_back(self, trial_id: int, exc: BaseException) -> None:
        if isinstance(exc, DatabaseUnreachable):
            return  # nothing can be written; the next run finds the trial's worker gone and retries it
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
            f"its worker stopped before finishing it: {type(exc).__name__}: {str(exc).strip()[:200]}"
        try:
            self.fail_and_retry(trial_id, reason, given_back=True)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def _id(self, number: int) -> int:
        return self.db.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _refuse_second_sqlite_worker(self) -> None:
        """A RUNNING trial of a live worker refuses a second one on a SQLite study (one in a shared
        folder, on another host, which `sqlite_worker_lock` cannot see)."""
        if not self.db.single_worker:
            return
        self.recover_dead_trials()
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            worker = running[0].system_attrs.get(WORKER) or {}
            raise EvomergeError(f"another worker (pid {worker.get('pid', '?')} on {worker.get('host', '?')}) is running "
                                f"trial {running[0].number} of this SQLite study; {_ONE_WORKER}")


def sqlite_worker_lock(url: str, study_name: str) -> IO[str] | None:
    """SQLite ignores row locks, so two workers can pop one queued trial twice: one worker per SQLite
    study. A lock file beside the database, taken once the study's fingerprint is checked (before the
    models load or the study is created) and held while the run lives, refuses a second worker on this host at once, even when both start at the same
    moment. None for other databases."""
    if not url.startswith("sqlite:///"):
        return None
    database = sqlalchemy.make_url(url).database
    if not database or database == ":memory:":
        return None
    path = Path(f"{database}-{study_name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.open("w")
    except OSError:
        return None  # an unusable folder: opening the database reports it in one line
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise EvomergeError(f"another worker is running this SQLite study ({path} is locked); {_ONE_WORKER}") from None
    return lock
