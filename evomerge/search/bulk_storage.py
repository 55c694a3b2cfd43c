"""Optuna's RDB storage and trial cache, with reads that scale to studies of many thousand trials.

Optuna's `RDBStorage._get_trials` builds one ORM object per stored row (a trial, each of its
params, values and attributes) and parses every param's distribution JSON twice: reading a
10,000-trial study took 7.5 s here, and the first query of a resumed study reads it all, even
one that asks only for WAITING trials. `BulkRDBStorage` reads the same rows with six plain
SELECTs over Optuna's own tables (so column types, enums and dialects are SQLAlchemy's, as
before), parses each distinct distribution once, and builds the very same `FrozenTrial`s:
a test compares them field by field with Optuna's. Everything else, writes included, is
Optuna's code, on Optuna's schema (`optuna-dashboard` opens the study as usual).

`TrialCache` is Optuna's own in-process cache, except that a query for unfinished trials
only (WAITING, RUNNING: a handful of rows) goes straight to the database: Optuna's
`study.ask()` asks for WAITING trials first thing, and its cache would load the whole
study to answer. A resumed search that never needs the history (random search) then never
reads it, and the others read it once, in bulk.

Both lean on Optuna internals (its private cache class, ORM models and `_get_trials` hook),
checked when this module is imported: where they are not what this code was written against
(another Optuna release), `RDB` is Optuna's own `RDBStorage` and `cached` leaves it to Optuna's
own cache, which reads the same rows, slower.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import gc
import json
from collections import defaultdict
from collections.abc import Container, Iterator
from typing import Any

import inspect
import sqlalchemy
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

_GET_TRIALS = ["self", "study_id", "states", "included_trial_ids", "trial_id_greater_than"]
_MAX_IDS = 500  # ids per IN (...) list: far below every database's limit on bound variables (SQLite's 999)


def _internals_as_expected() -> bool:
    try:
        from optuna.storages._cached_storage import _CachedStorage, _StudyInfo  # noqa: F401
        from optuna.storages._rdb import models

        tables = {m.__table__.name: set(m.__table__.c.keys()) for m in (
            models.TrialModel, models.TrialParamModel, models.TrialValueModel, models.TrialUserAttributeModel,
            models.TrialSystemAttributeModel, models.TrialIntermediateValueModel, models.StudyModel)}
        return (list(inspect.signature(RDBStorage._get_trials).parameters) == _GET_TRIALS
                and {"trial_id", "number", "state", "datetime_start", "datetime_complete"} <= tables["trials"]
                and callable(models.TrialValueModel.stored_repr_to_value)
                and hasattr(_CachedStorage, "_add_trials_to_cache") and hasattr(_StudyInfo(), "unfinished_trial_ids"))
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return False


AVAILABLE = _internals_as_expected()
if AVAILABLE:
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
    from optuna.storages._rdb import models

    _VALUE = models.TrialValueModel.stored_repr_to_value
    _FINITE = models.TrialValueModel.TrialValueType.FINITE
    _INTERMEDIATE = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
else:
    _CachedStorage = object  # type: ignore[misc,assignment]  # the classes below are then never used


@functools.lru_cache(maxsize=4096)
def _distribution(text: str) -> BaseDistribution:
    """A study's params share a handful of distinct distributions: parse each once."""
    return json_to_distribution(text)


def _local(utc: datetime.datetime | None) -> datetime.datetime | None:
    """Stored naive UTC -> naive local time, as Optuna's TrialModel does."""
    if utc is None:
        return None
    return utc.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a study's trials are built: the objects are all kept, and
    the collector would otherwise rescan the growing heap again and again (a third of the read)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class BulkRDBStorage(RDBStorage):
    """An RDBStorage whose bulk trial reads are plain SELECTs (see the module docstring)."""

    def _get_trials(self, study_id: int, states: Container[TrialState] | None, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        trials = models.TrialModel.__table__
        in_study = trials.c.study_id == study_id  # and which trials, by id: unlike their state, that never changes
        batches = [sqlalchemy.true()]
        if trial_id_greater_than > -1:  # Optuna's cache asks for new trials and for its unfinished ones
            included = sorted(i for i in included_trial_ids if i <= trial_id_greater_than)
            batches = [trials.c.trial_id > trial_id_greater_than, *_in_batches(trials.c.trial_id, included)]
        in_states = trials.c.state.in_(list(states)) if states is not None else sqlalchemy.true()

        def selecting(table: Any, rows: list[Any]) -> list[Any]:
            """Filters for the child rows of exactly the trials read (a trial may change state meanwhile):
            by the same condition for a read by id alone, else by the ids read, in batches."""
            if states is None and len(batches) == 1:
                return [table.c.trial_id.in_(sqlalchemy.select(trials.c.trial_id).where(in_study & batches[0])
                                             .scalar_subquery())]
            return _in_batches(table.c.trial_id, [row.trial_id for row in rows])

        def children(model: Any, order: str, *columns: str) -> dict[int, list[tuple]]:
            """(columns...) per trial, ordered as Optuna orders them."""
            table = model.__table__
            grouped: dict[int, list[tuple]] = defaultdict(list)
            for chosen in selecting(table, rows):
                query = sqlalchemy.select(table.c.trial_id, *(table.c[c] for c in columns)).where(chosen)
                for row in connection.execute(query.order_by(table.c[order])).all():
                    grouped[row[0]].append(row)  # (trial_id, *columns)
            return grouped

        def attrs(model: Any) -> dict[int, dict[str, Any]]:
            """key -> value per trial; the JSON of all of them parsed in one call, not one per row."""
            table = model.__table__
            grouped: dict[int, dict[str, Any]] = defaultdict(dict)
            for chosen in selecting(table, rows):
                query = sqlalchemy.select(table.c.trial_id, table.c.key, table.c.value_json).where(chosen)
                found = connection.execute(query.order_by(table.primary_key.columns.values()[0])).all()
                values = json.loads("[" + ",".join(row[2] for row in found) + "]")
                for (trial_id, key, _), value in zip(found, values):
                    grouped[trial_id][key] = value
            return grouped

        with self.engine.connect() as connection, _gc_paused():
            studies = models.StudyModel.__table__
            if connection.execute(sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id)).first() is None:
                raise KeyError(f"No study with study_id {study_id} exists.")
            rows = sorted((row for batch in batches for row in connection.execute(
                sqlalchemy.select(trials).where(in_study & batch & in_states)).all()), key=lambda row: row.trial_id)
            params = children(models.TrialParamModel, "param_id", "param_name", "param_value", "distribution_json")
            values = children(models.TrialValueModel, "objective", "value", "value_type")
            user = attrs(models.TrialUserAttributeModel)
            system = attrs(models.TrialSystemAttributeModel)
            intermediate = children(models.TrialIntermediateValueModel, "step", "step", "intermediate_value",
                                    "intermediate_value_type")
            return [self._frozen(row, params[row.trial_id], values[row.trial_id], user[row.trial_id],
                                 system[row.trial_id], intermediate[row.trial_id]) for row in rows]

    @staticmethod
    def _frozen(row: Any, params: list[tuple], values: list[tuple], user: dict[str, Any], system: dict[str, Any],
                intermediate: list[tuple]) -> FrozenTrial:
        """The FrozenTrial Optuna's RDBStorage builds; child rows are (trial_id, *columns)."""
        distributions = {name: _distribution(text) for _, name, _, text in params}
        return FrozenTrial(
            number=row.number, state=row.state, value=None,
            values=[value if kind is _FINITE else _VALUE(value, kind) for _, value, kind in values] if values else None,
            datetime_start=_local(row.datetime_start), datetime_complete=_local(row.datetime_complete),
            params={name: distributions[name].to_external_repr(value) for _, name, value, _ in params},
            distributions=distributions, user_attrs=user, system_attrs=system,
            intermediate_values={step: _INTERMEDIATE(value, kind) for _, step, value, kind in intermediate},
            trial_id=row.trial_id)


def _in_batches(column: Any, ids: list[int]) -> list[Any]:
    """`column IN (...)` conditions of at most _MAX_IDS ids each."""
    return [column.in_(ids[i:i + _MAX_IDS]) for i in range(0, len(ids), _MAX_IDS)]


class TrialCache(_CachedStorage):
    """Optuna's trial cache; unfinished-only queries skip it (see the module docstring)."""

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if states is None or any(state.is_finished() for state in TrialState if state in states):
            return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)
        trials = sorted(self._backend.get_all_trials(study_id, deepcopy=False, states=states), key=lambda t: t.number)
        with self._lock:  # cached as unfinished, as Optuna's own read would: they are re-read until they finish
            study = self._studies.setdefault(study_id, _StudyInfo())
            self._add_trials_to_cache(study_id, trials)
            study.unfinished_trial_ids.update(t._trial_id for t in trials)
        return copy.deepcopy(trials) if deepcopy else trials


RDB: type[RDBStorage] = BulkRDBStorage if AVAILABLE else RDBStorage


def cached(rdb: RDBStorage) -> BaseStorage:
    """The storage a study should use over `rdb`: Optuna wraps a plain RDBStorage in its own cache
    when it opens a study, and leaves a TrialCache be."""
    return TrialCache(rdb) if AVAILABLE else rdb


def open_rdb(url: str, **kwargs: Any) -> BaseStorage:
    return cached(RDB(url, **kwargs))
