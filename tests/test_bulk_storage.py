"""evomerge's storage reads the very trials Optuna's own RDBStorage reads (every state, value,
distribution and attribute kind), and a resumed study's first proposal reads no finished trial."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState, create_trial

from evomerge.search.bulk_storage import BulkRDBStorage, open_rdb


def _varied_study(url: str) -> int:
    """Trials in every state, with every kind of value, distribution and attribute."""
    study = optuna.create_study(storage=url, directions=["maximize", "minimize"])
    dists = {"x": FloatDistribution(0, 1), "lr": FloatDistribution(1e-5, 1, log=True), "q": FloatDistribution(0, 1, step=0.25),
             "n": IntDistribution(1, 9), "k": IntDistribution(2, 64, log=True), "c": CategoricalDistribution(["a", None, 3, 1.5])}
    params = {"x": 0.3, "lr": 1e-3, "q": 0.75, "n": 4, "k": 8, "c": None}
    values = [[0.5, 1.0], [math.inf, -math.inf], [-0.0, 1e300]]
    for i, v in enumerate(values):
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=v, params={**params, "x": i / 10}, distributions=dists,
                                     user_attrs={"recipe": '{"a": [1, 2]}', "scores": {"m": i}, "none": None},
                                     system_attrs={"retry_history": [i], "nested": {"a": [1.5, "b"]}}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=dists,
                                 intermediate_values={0: 1.0, 1: math.nan, 2: math.inf, 5: -math.inf}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"c": 3}, distributions={"c": dists["c"]},
                                 user_attrs={"error": "RuntimeError: boom"}))
    running = study.ask()
    running.suggest_float("x", 0, 1)
    running.set_user_attr("where", "running")
    study.enqueue_trial({"x": 0.9}, user_attrs={"queued": True})
    return study._study_id


def _same(a: list, b: list) -> None:
    def comparable(trial):  # FrozenTrial equality compares all fields; NaN never equals itself
        fields = dict(vars(trial))
        fields["intermediate_values"] = {k: "nan" if math.isnan(v) else v for k, v in trial.intermediate_values.items()}
        return fields

    assert [comparable(t) for t in a] == [comparable(t) for t in b]


@pytest.mark.parametrize("query", [
    (None, set(), -1),
    ((TrialState.COMPLETE,), set(), -1),
    ((TrialState.WAITING, TrialState.RUNNING), set(), -1),
    (None, {2, 5}, 3),  # what Optuna's cache asks: new trials and its unfinished ones
    (None, {9}, 2),
], ids=["all", "complete", "unfinished", "incremental", "newer-only"])
def test_bulk_reads_equal_optunas_own(tmp_path, query):
    url = f"sqlite:///{tmp_path}/s.db"
    study_id = _varied_study(url)
    ours, optunas = BulkRDBStorage(url), RDBStorage(url)
    ids = [t._trial_id for t in optunas.get_all_trials(study_id)]
    states, included, greater = query
    included = {ids[i] for i in included if i < len(ids)}
    greater = ids[greater] if greater >= 0 else -1
    expected = optunas._get_trials(study_id, states, set(included), greater)
    assert expected  # the query is not vacuous
    _same(ours._get_trials(study_id, states, set(included), greater), expected)


def test_an_unknown_study_raises_keyerror_like_optunas(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    _varied_study(url)
    with pytest.raises(KeyError):
        BulkRDBStorage(url)._get_trials(999, None, set(), -1)


def test_resumed_study_asks_without_reading_finished_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=url, study_name="s")
    for i in range(50):
        study.add_trial(create_trial(value=i, params={"x": i / 50}, distributions={"x": FloatDistribution(0, 1)}))
    study.enqueue_trial({"x": 0.5})

    storage = open_rdb(url)
    resumed = optuna.load_study(study_name="s", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    trial = resumed.ask()  # pops the queued trial
    assert trial.suggest_float("x", 0, 1) == 0.5
    cached = storage._studies[resumed._study_id].trials
    assert set(cached) == {trial.number}  # Optuna's own cache would hold all 51 here
    assert [t.number for t in resumed.get_trials(states=(TrialState.RUNNING,))] == [50]
    _same(resumed.get_trials(), optuna.load_study(study_name="s", storage=url).get_trials())  # and the full read agrees


def test_a_trial_changing_state_during_the_read_keeps_its_params_and_attrs(tmp_path):
    """Another worker pops a WAITING trial between the read of the trials and of their attributes."""
    import sqlite3

    from sqlalchemy import event

    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    study = optuna.create_study(storage=url)
    study.enqueue_trial({"x": 0.5}, user_attrs={"u": 1})
    with sqlite3.connect(db) as conn:  # readers do not block the other worker's write
        conn.execute("pragma journal_mode=wal")
    ours, other = BulkRDBStorage(url), RDBStorage(url)
    waiting = other.get_all_trials(study._study_id)[0]

    @event.listens_for(ours.engine, "after_cursor_execute")
    def pop_it(conn, cursor, statement, *args):
        if statement.startswith("SELECT trials.trial_id, trials.number") and other.get_trial(waiting._trial_id).state.name == "WAITING":
            other.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)

    [read] = ours._get_trials(study._study_id, (TrialState.WAITING,), set(), -1)
    assert read.state == TrialState.WAITING and read.user_attrs == {"u": 1} and "fixed_params" in read.system_attrs
    assert other.get_trial(waiting._trial_id).state == TrialState.RUNNING  # the pop did happen mid-read


def test_full_reads_survive_more_unfinished_trials_than_the_database_takes_bind_variables(tmp_path, monkeypatch):
    """Optuna's cache asks again for every unfinished trial it holds; past the database's limit on
    bound variables (999 on older SQLite, 32,766 now, 65,535 with psycopg) one IN list would fail
    every later read. Scaled down here: the limit is lowered to 64 and the ids per list to 32,
    so that 100 running trials cross it."""
    import sqlite3

    import sqlalchemy

    from evomerge.search import bulk_storage

    monkeypatch.setattr(bulk_storage, "_MAX_IDS", 32)

    storage = open_rdb(f"sqlite:///{tmp_path}/s.db")
    sqlalchemy.event.listen(storage._backend.engine, "connect",
                            lambda connection, _: connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 64))
    storage._backend.engine.dispose()  # connections opened from here on have the limit
    study = optuna.create_study(storage=storage)
    assert len(study.get_trials(deepcopy=False)) == 0
    trials = [study.ask() for _ in range(100)]
    study.tell(trials[-1], 99.0)
    assert len(study.get_trials(deepcopy=False)) == 100  # the cache now holds 99 unfinished ids below a finished one
    for i, trial in enumerate(trials[:-1]):
        study.tell(trial, float(i))
    done = study.get_trials(deepcopy=False)  # asks again for those 99 ids
    assert [t.state for t in done] == [TrialState.COMPLETE] * 100 and [t.value for t in done] == list(map(float, range(100)))


def test_the_internals_check_fails_when_optunas_cache_is_missing(monkeypatch):
    """Another Optuna without the private pieces the bulk reads use: the check says so (and the
    module then hands out Optuna's own storage; the next test runs a search that way)."""
    import sys

    from evomerge.search import bulk_storage

    assert bulk_storage.AVAILABLE and bulk_storage._internals_as_expected()
    monkeypatch.setitem(sys.modules, "optuna.storages._cached_storage", None)
    assert not bulk_storage._internals_as_expected()


def test_a_search_runs_and_resumes_on_optunas_own_storage(tmp_path, zoo, monkeypatch):
    from evomerge.cli import main
    from evomerge.search import bulk_storage
    from reliability.harness import completed_sequence, trials_of, write_config

    straight = write_config(tmp_path, zoo, "straight", n_trials=4)
    assert main(["run", str(straight), "--quiet"]) == 0
    monkeypatch.setattr(bulk_storage, "RDB", RDBStorage)
    monkeypatch.setattr(bulk_storage, "cached", lambda rdb: rdb)
    path = write_config(tmp_path, zoo, "fallback", n_trials=2)
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(path), "--quiet", "--n-trials", "4"]) == 0
    assert completed_sequence(path) == completed_sequence(straight)
    assert len(trials_of(path)) == 4
