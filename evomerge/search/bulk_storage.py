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
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import gc
import json
from collections import defaultdict
from collections.abc import Container, Iterable, Iterator
from typing import Any

import sqlalchemy
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

_VALUE = models.TrialValueModel.stored_repr_to_value
_FINITE = models.TrialValueModel.TrialValueType.FINITE
_INTERMEDIATE = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value


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
        by_id = trials.c.study_id == study_id  # which trials, by id: unlike their state, this never changes
        if trial_id_greater_than > -1:  # Optuna's cache asks for new trials and for its unfinished ones
            newer = trials.c.trial_id > trial_id_greater_than
            included = sorted(i for i in included_trial_ids if i <= trial_id_greater_than)
            by_id = by_id & (sqlalchemy.or_(newer, trials.c.trial_id.in_(included)) if included else newer)
        where = by_id
        if states is not None:
            assert isinstance(states, Iterable)
            where = by_id & trials.c.state.in_(list(states))

        def selecting(table: Any, rows: list[Any]) -> list[Any]:
            """Filters for the child rows of exactly the trials read (a trial may change state meanwhile):
            by the same ids for a whole read, else by the few ids read, in chunks."""
            if states is None:
                return [table.c.trial_id.in_(sqlalchemy.select(trials.c.trial_id).where(by_id).scalar_subquery())]
            ids = [row.trial_id for row in rows]
            return [table.c.trial_id.in_(ids[i:i + 500]) for i in range(0, len(ids), 500)]

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
            rows = connection.execute(sqlalchemy.select(trials).where(where).order_by(trials.c.trial_id)).all()
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


def open_rdb(url: str, **kwargs: Any) -> TrialCache:
    """The storage a study should use: Optuna wraps an RDBStorage in its cache, and leaves this one be."""
    return TrialCache(BulkRDBStorage(url, **kwargs))
