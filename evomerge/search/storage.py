"""The database a study lives in: opened once per command, with the few statements evomerge
runs itself (counts, locks), and connection losses ridden through.

`Database.storage` is what Optuna is given (its trial cache over an RDB storage whose bulk reads
are plain SELECTs: evomerge.search.bulk_storage); `Database.rdb` is that RDB storage, whose
engine serves evomerge's own statements. Callers pass this object around instead of reaching
into a study's private storage.

A days-long search on several machines must survive a database restart, a failover or a network
blip: every storage call, evomerge's own statements and the heartbeat thread's included, is
retried with backoff while the connection is lost, for `reconnect_timeout_s` (a few minutes by
default); only past that does the command stop, with one line saying that re-running resumes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from evomerge.errors import EvomergeError
from evomerge.search import bulk_storage
from evomerge.search.attrs import RETRY_HISTORY

T = TypeVar("T")
RECONNECT_TIMEOUT_S = 300.0
# The RDB storage's methods that touch the database: Optuna's storage interface, and the private
# ones its trial cache calls on the storage behind it (wrapped only where this Optuna has them).
_DATABASE_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials", "get_best_trial",
    "record_heartbeat", "_create_new_trial", "_get_trials", "_set_trial_param", "_get_stale_trial_ids",
    "_get_best_trial_id",
)


class DatabaseUnreachable(EvomergeError):
    """The connection stayed lost for longer than the reconnect timeout."""


def redact(url: str) -> str:
    """The storage URL with any password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def lost_connection(exc: BaseException) -> bool:
    """A server gone away (restart, failover, network) or a SQLite file busy, anywhere in the cause
    chain (Optuna wraps SQLAlchemy's errors in its own); not a bad statement, which never heals."""
    while exc is not None:
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            if "sqlite" not in type(exc.orig).__module__:
                return True
            return any(s in str(exc.orig) for s in ("database is locked", "unable to open database"))
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class Reconnect:
    """Runs database calls again with backoff while the connection is lost, up to `timeout_s`,
    once `armed` (after the database first opened: a server that never answered is a wrong URL
    or a server down, reported at once). Nested calls (a storage method calling another) run
    once, inside the outer retry."""

    url: str
    timeout_s: float = RECONNECT_TIMEOUT_S
    armed: bool = False
    _inside: threading.local = field(default_factory=threading.local)

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self.armed or getattr(self._inside, "active", False):
            return fn(*args, **kwargs)
        self._inside.active = True
        try:
            return self._retrying(fn, *args, **kwargs)
        finally:
            self._inside.active = False

    def _retrying(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        lost_at, delay = None, 0.5
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not lost_connection(exc):
                    raise
                now = time.monotonic()
                if lost_at is None:
                    lost_at = now
                    print(f"evomerge: lost the connection to {redact(self.url)} ({_first_line(exc)}); "
                          f"retrying for up to {self.timeout_s:g} s", file=sys.stderr, flush=True)
                if now - lost_at >= self.timeout_s:
                    raise DatabaseUnreachable(
                        f"database {redact(self.url)} unreachable for {now - lost_at:.0f} s ({_first_line(exc)}); "
                        "nothing is lost: re-running the same command resumes the study") from None
                time.sleep(min(delay, lost_at + self.timeout_s - now))
                delay = min(2 * delay, 10.0)
                continue
            if lost_at is not None:
                print(f"evomerge: reconnected to {redact(self.url)} after {time.monotonic() - lost_at:.1f} s",
                      file=sys.stderr, flush=True)
            return result


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return redact(text.splitlines()[0]) if text else type(exc).__name__


@functools.lru_cache(maxsize=None)
def _reconnecting(cls: type[RDBStorage]) -> type[RDBStorage]:
    """`cls` with every database call going through the instance's `reconnect` (see Reconnect)."""

    def wrap(name: str) -> Callable[..., Any]:
        method = getattr(cls, name)

        @functools.wraps(method)
        def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
            return self.reconnect(method, self, *args, **kwargs)

        return call

    def __init__(self: RDBStorage, *args: Any, reconnect: Reconnect, **kwargs: Any) -> None:
        self.reconnect = reconnect
        cls.__init__(self, *args, **kwargs)

    methods = {name: wrap(name) for name in _DATABASE_METHODS if callable(getattr(cls, name, None))}
    return type(f"Reconnecting{cls.__name__}", (cls,), {"__init__": __init__, **methods})


def _lock_number(key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"evomerge:{key}".encode()).digest()[:8], "big", signed=True)


@dataclass
class Database:
    """A study database as evomerge opened it (see the module docstring)."""

    url: str
    storage: BaseStorage
    rdb: RDBStorage
    reconnect: Reconnect
    _study_ids: dict[str, int] = field(default_factory=dict)

    @property
    def engine(self) -> sqlalchemy.Engine:
        return self.rdb.engine

    @property
    def single_worker(self) -> bool:
        """SQLite ignores row locks: one worker per study (see evomerge.search.workers)."""
        return self.engine.dialect.name == "sqlite"

    def study_id(self, study_name: str) -> int:
        if study_name not in self._study_ids:
            self._study_ids[study_name] = self.storage.get_study_id_from_name(study_name)
        return self._study_ids[study_name]

    def exclusive(self, key: str) -> AbstractContextManager[None]:
        """One worker at a time through a read-decide-write step on a shared study (see `exclusive`)."""
        return exclusive(self.engine, self.reconnect, key)

    def count_trials(self, study_id: int) -> dict[TrialState, int]:
        """Trials per state in one COUNT query (Optuna's get_n_trials reads every trial to count them)."""
        query = sqlalchemy.text("SELECT state, COUNT(*) FROM trials WHERE study_id = :study GROUP BY state")
        counts = dict.fromkeys(TrialState, 0)
        for state, n in self._rows(query, {"study": study_id}):
            counts[TrialState[state] if isinstance(state, str) else TrialState(state)] = n
        return counts

    def count_fresh_before(self, study_id: int, number: int) -> int:
        """Trials numbered below `number` that are not retries, in one COUNT query (not a read of the study)."""
        query = sqlalchemy.text("SELECT COUNT(*) FROM trials t WHERE t.study_id = :study AND t.number < :number AND NOT "
                                "EXISTS (SELECT 1 FROM trial_system_attributes a WHERE a.trial_id = t.trial_id AND "
                                "a.key = :key)")
        return int(self._rows(query, {"study": study_id, "number": number, "key": RETRY_HISTORY})[0][0])

    def _rows(self, query: sqlalchemy.TextClause, bound: dict[str, Any]) -> list[Any]:
        def run() -> list[Any]:
            with self.engine.connect() as connection:
                return connection.execute(query, bound).all()

        return self.reconnect(run)


@contextmanager
def exclusive(engine: sqlalchemy.Engine, reconnect: Reconnect, key: str) -> Iterator[None]:
    """PostgreSQL: an advisory lock on its own connection, which the server releases if the worker
    dies holding it (or the connection is lost: then the unlock has nothing left to do). A SQLite
    file: flock on the file, for the moments before a second worker is refused (two starting
    together would both create the tables); SQLite's own locks are fcntl byte ranges, which flock
    does not touch."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        with open(database, "a") as file:  # an empty file is an empty SQLite database
            fcntl.flock(file, fcntl.LOCK_EX)
            yield
        return
    if engine.dialect.name != "postgresql":
        yield
        return
    number = {"key": _lock_number(key)}

    def lock() -> sqlalchemy.Connection:
        connection = engine.connect()
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), number)
        except BaseException:
            connection.close()
            raise
        return connection

    connection = reconnect(lock)
    try:
        yield
    finally:
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), number)
        except sqlalchemy.exc.DBAPIError as exc:
            if not lost_connection(exc):
                raise
        finally:
            connection.close()


def sqlite_file_missing(url: str) -> bool:
    """A SQLite URL whose file does not exist yet (it holds no study; opening it would create it)."""
    if not url.startswith("sqlite:///"):
        return False
    database = sqlalchemy.make_url(url).database
    return bool(database) and database != ":memory:" and not Path(database).exists()


def open_database(url: str, heartbeat: dict[str, float] | None = None, *, reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
                  stale_trial_callback: Callable[..., None] | None = None) -> Database:
    """Open (creating the schema if needed) the database at `url`; one line on any failure."""
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
    reconnect = Reconnect(url, reconnect_timeout_s)
    try:
        # Workers starting together on a new database would race to create Optuna's tables.
        with exclusive(sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool), reconnect, "schema"):
            rdb = _reconnecting(bulk_storage.RDB)(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=int(max(1, heartbeat["interval"])),
                grace_period=int(max(2, heartbeat["grace"])), heartbeat_stale_trial_callback=stale_trial_callback,
                reconnect=reconnect)
    except Exception as exc:  # SQLAlchemy: unreachable host, wrong password, missing driver, bad URL
        raise EvomergeError(f"cannot open storage {redact(url)}: {_first_line(exc)}") from None
    reconnect.armed = True
    return Database(url, bulk_storage.cached(rdb), rdb, reconnect)
