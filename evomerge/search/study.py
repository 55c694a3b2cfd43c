"""The Optuna study as the single source of truth: storage, create-or-resume, the
fingerprint that stops a study from being resumed with a different search, and recovery
of trials whose worker died.

A worker that dies mid-trial leaves a RUNNING trial. If it ran on this host and its
process is gone, it is failed at once and retried with the same parameters (so a killed
single-worker search resumes exactly where it stopped); otherwise Optuna's heartbeats
fail it once its grace period passes, and the same retry applies.

Several workers share a study only on a server database (PostgreSQL): the few steps where a
worker reads the study, decides and writes (creating the schema or the study, taking a CMA-ES
slot) run under a PostgreSQL advisory lock, so two workers never take the same decision. A
SQLite study takes one worker; a lock file refuses a second one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.search.bulk_storage import open_rdb

FINGERPRINT = "evomerge:fingerprint"
OBJECTIVES = "evomerge:objectives"
N_LAYERS = "evomerge:n_layers"  # of the models: with it, a resumed search proposes before loading them
WORKER = "evomerge:worker"
SAMPLED = "evomerge:sampled"
RETRY_HISTORY = "retry_history"  # Optuna's retry callback: numbers of the earlier attempts, the original first
GIVEN_BACK = "evomerge:given_back"  # how many of those attempts never ran (see retry_dead_trial)
HOST = socket.gethostname()
# Heartbeats in an ask/tell loop are what Optuna's docs prescribe for it; its warnings say otherwise.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                        message=".*(heartbeat_interval|fail_stale_trials)")
MAX_RETRIES = 1  # a candidate whose worker died twice is given up: it may be what kills workers


def retry_dead_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, given_back: bool = False) -> None:
    """Enqueue the retry of a trial whose worker died (also Optuna's heartbeat callback), or that
    was `given_back` unevaluated (its models did not load, or Ctrl-C); only deaths count against
    MAX_RETRIES. As with Optuna's own retry callback, the retry records the earlier attempts
    (retry_history, the first attempt first: the retry takes its place in the search).

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


def redact(url: str) -> str:
    """The storage URL with any password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _backend(storage: BaseStorage) -> BaseStorage:
    """The storage behind Optuna's in-process cache (which studies wrap around an RDBStorage)."""
    return getattr(storage, "_backend", storage)


def _lock_number(key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"evomerge:{key}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def _advisory_lock(engine: sqlalchemy.Engine, key: str) -> Iterator[None]:
    """PostgreSQL: an advisory lock on its own connection, which the server releases if the
    worker dies holding it. A SQLite file: flock on the file, for the moments before a second
    worker is refused (two starting together would both create the tables); SQLite's own
    locks are fcntl byte ranges, which flock does not touch."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        with open(database, "a") as file:  # an empty file is an empty SQLite database
            fcntl.flock(file, fcntl.LOCK_EX)
            yield
        return
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _lock_number(key)})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _lock_number(key)})


@contextmanager
def exclusive(storage: BaseStorage, key: str) -> Iterator[None]:
    """One worker at a time through a read-decide-write step on a shared study."""
    backend = _backend(storage)
    if not isinstance(backend, RDBStorage):
        yield
        return
    with _advisory_lock(backend.engine, key):
        yield


def slot_lock(study: optuna.Study) -> AbstractContextManager[None]:
    """Held by a worker while it chooses the next CMA-ES slot of the study."""
    return exclusive(study._storage, f"slots:{study.study_name}")


def open_storage(url: str, heartbeat: dict[str, float] | None = None) -> BaseStorage:
    heartbeat = heartbeat or {"interval": 10.0, "grace": 30.0}
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvomergeError(f"cannot create folder {folder} for storage {redact(url)}: {exc.strerror}; "
                                "give a writable path (--storage sqlite:///PATH/study.db)") from None
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        # Workers starting together on a new database would race to create Optuna's tables.
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
        with _advisory_lock(engine, "schema"):
            return open_rdb(url, engine_kwargs=engine_kwargs, heartbeat_interval=int(max(1, heartbeat["interval"])),
                            grace_period=int(max(2, heartbeat["grace"])), heartbeat_stale_trial_callback=retry_dead_trial)
    except Exception as exc:  # SQLAlchemy: unreachable host, wrong password, missing driver, bad URL
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvomergeError(f"cannot open storage {redact(url)}: {redact(first)}") from None


def sqlite_file_missing(url: str) -> bool:
    """A SQLite URL whose file does not exist yet (it holds no study; opening it would create it)."""
    if not url.startswith("sqlite:///"):
        return False
    database = sqlalchemy.make_url(url).database
    return bool(database) and database != ":memory:" and not Path(database).exists()


def study_directions(config: RunConfig) -> list[str]:
    """NSGA-II sees every objective; single-objective samplers see the scalarization (maximized)."""
    return config.fitness.directions if config.sampler == "nsga2" else ["maximize"]


def find_study(config: RunConfig, storage: BaseStorage) -> optuna.Study | None:
    """The config's study, or None if there is none; refuses a study made by another search."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with exclusive(storage, f"study:{config.study_name}"):  # no worker sees a study half made (no fingerprint yet)
        try:
            study = optuna.load_study(study_name=config.study_name, storage=storage)
        except KeyError:
            return None
    stored = study.user_attrs.get(FINGERPRINT)
    if stored is None:
        raise EvomergeError(f"study {config.study_name!r} in {redact(config.storage)} was not made by evomerge; "
                            "choose another --study-name")
    differs = sorted(k for k in set(stored) | set(config.fingerprint()) if stored.get(k) != config.fingerprint().get(k))
    if differs:
        key = differs[0]
        raise EvomergeError(f"study {config.study_name!r} was made with a different {key} ({stored.get(key)!r}, "
                            f"now {config.fingerprint().get(key)!r}); use a new --study-name or restore the config")
    return study


def open_study(config: RunConfig, storage: BaseStorage, *, create: bool, n_layers: int | None = None) -> optuna.Study:
    """Resume the config's study, or create it when `create` (recording the models' `n_layers`)."""
    study = find_study(config, storage)
    if study is not None:
        return study
    if not create:
        raise EvomergeError(f"no study {config.study_name!r} in {redact(config.storage)}; "
                            f"start it with: evomerge run {config.path}")
    with exclusive(storage, f"study:{config.study_name}"):
        try:
            optuna.load_study(study_name=config.study_name, storage=storage)
        except KeyError:
            study = optuna.create_study(study_name=config.study_name, storage=storage,
                                        directions=study_directions(config))
            study.set_user_attr(FINGERPRINT, config.fingerprint())
            study.set_user_attr(OBJECTIVES, [[o.name, o.direction] for o in config.fitness.objectives])
            if n_layers is not None:
                study.set_user_attr(N_LAYERS, n_layers)
            return study
    return open_study(config, storage, create=False)  # another worker made it meanwhile: check its fingerprint


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def count_trials(study: optuna.Study) -> dict[TrialState, int]:
    """One COUNT query (Optuna's get_n_trials loads every trial to count them)."""
    backend = _backend(study._storage)
    counts = dict.fromkeys(TrialState, 0)
    if not isinstance(backend, RDBStorage):
        for trial in study.get_trials(deepcopy=False):
            counts[trial.state] += 1
        return counts
    query = sqlalchemy.text("SELECT state, COUNT(*) FROM trials WHERE study_id = :study GROUP BY state")
    with backend.engine.connect() as connection:
        for state, n in connection.execute(query, {"study": study._study_id}):
            counts[TrialState[state]] = n
    return counts


def count_fresh_before(study: optuna.Study, number: int) -> int:
    """Trials numbered below `number` that are not retries, in one COUNT query (not a read of the study)."""
    backend = _backend(study._storage)
    if not isinstance(backend, RDBStorage):
        return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and RETRY_HISTORY not in t.system_attrs)
    query = sqlalchemy.text("SELECT COUNT(*) FROM trials t WHERE t.study_id = :study AND t.number < :number AND NOT EXISTS "
                            "(SELECT 1 FROM trial_system_attributes a WHERE a.trial_id = t.trial_id AND a.key = :key)")
    with backend.engine.connect() as connection:
        return int(connection.execute(query, {"study": study._study_id, "number": number, "key": RETRY_HISTORY}).scalar())


def _is_dead(trial: optuna.trial.FrozenTrial, single_worker: bool, grace_s: float) -> bool:
    """Ours and gone: claimed on this host by a process that no longer exists. Unclaimed (killed
    between Optuna's ask and our claim, so no heartbeat either): dead at once where only one
    worker can exist (SQLite), else once its grace period has passed."""
    worker = trial.system_attrs.get(WORKER)
    if worker is None:
        started = trial.datetime_start or datetime.now()
        return single_worker or (datetime.now() - started).total_seconds() > grace_s
    return worker.get("host") == HOST and worker.get("pid") != os.getpid() and not _pid_alive(int(worker.get("pid", 0)))


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail (and retry once) RUNNING trials whose worker is gone; returns their numbers."""
    optuna.storages.fail_stale_trials(study)
    backend = _backend(study._storage)
    single_worker = isinstance(backend, RDBStorage) and backend.engine.dialect.name == "sqlite"
    grace = float(backend.get_heartbeat_interval() or 10) * 3 if isinstance(backend, RDBStorage) else 30.0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))  # in SQL (bulk_storage.TrialCache)
    dead = [t for t in running if _is_dead(t, single_worker, grace)]
    return [t.number for t in dead if fail_and_retry(study, t._trial_id, "its worker process died")]


def fail_and_retry(study: optuna.Study, trial_id: int, reason: str, *, given_back: bool = False) -> bool:
    """Fail a trial that is not the candidate's fault (its worker died, or gave it back
    unevaluated) and enqueue its retry; False if another worker did it first. The reason goes
    first: a finished trial takes no more attrs."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, "error", reason)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    retry_dead_trial(study, storage.get_trial(trial_id), given_back)
    return True


_ONE_WORKER = "SQLite cannot share a study between workers: use a postgresql:// storage URL for several workers"


def refuse_second_sqlite_worker(study: optuna.Study, url: str) -> IO[str] | None:
    """SQLite ignores row locks, so two workers can pop one queued trial twice: one worker per
    SQLite study. A lock file beside the database, held while the returned file stays open,
    refuses a second worker on this host even when both start at the same moment; a RUNNING
    trial of a live worker refuses one elsewhere (a shared folder)."""
    if not url.startswith("sqlite"):
        return None
    lock = None
    if url.startswith("sqlite:///"):
        path = Path(f"{url[len('sqlite:///'):]}-{study.study_name}.lock")
        lock = path.open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EvomergeError(f"another worker is running this SQLite study ({path} is locked); {_ONE_WORKER}") from None
    recover_dead_trials(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        worker = running[0].system_attrs.get(WORKER) or {}
        raise EvomergeError(f"another worker (pid {worker.get('pid', '?')} on {worker.get('host', '?')}) is running trial "
                            f"{running[0].number} of this SQLite study; {_ONE_WORKER}")
    return lock


def mark_sampled(study: optuna.Study, trial_id: int) -> None:
    """All the trial's params are recorded: a retry may carry them (see retry_dead_trial)."""
    study._storage.set_trial_system_attr(trial_id, SAMPLED, True)


def claim(study: optuna.Study, trial_id: int) -> None:
    """Mark the trial as this process's and beat once, so it is recoverable if the process dies."""
    study._storage.set_trial_system_attr(trial_id, WORKER, {"host": HOST, "pid": os.getpid()})
    study._storage.record_heartbeat(trial_id)


class Heartbeat:
    """Records the trial's heartbeat from a thread while the trial runs (an ask/tell loop must do
    this itself; only study.optimize does it for you)."""

    def __init__(self, storage: BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or 10
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self._stop.wait(interval):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
