"""Several `evomerge run` workers on one PostgreSQL study: unique trial numbers, every budgeted
trial completed exactly once, no parameter set evaluated twice."""

from __future__ import annotations

import time

import pytest
from optuna.trial import TrialState

from reliability.harness import run_cli, trials_of, write_config

WORKERS = 4


@pytest.mark.parametrize("sampler", [{"name": "cmaes", "popsize": 4}, {"name": "nsga2", "population_size": 4}],
                         ids=["cmaes", "nsga2"])
def test_four_workers_share_one_study(tmp_path, zoo, pg_url, sampler):
    n = 16
    path = write_config(tmp_path, zoo, "shared", sampler, n, storage=pg_url)
    start = time.monotonic()
    workers = [run_cli(path) for _ in range(WORKERS)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    print(f"{WORKERS} workers: {time.monotonic() - start:.1f} s")
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n---\n".join(outputs)
    trials = trials_of(path)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    evaluated = [tuple(sorted(t.params.items())) for t in trials if "copy_of" not in t.user_attrs
                 and (t.state == TrialState.COMPLETE or t.user_attrs.get("failure") == "candidate")]
    assert len(evaluated) == len(set(evaluated)), "a parameter set was evaluated twice"


def test_bulk_reads_equal_optunas_own_on_postgresql(pg_url):
    """The storage's own trial reads (evomerge/search/bulk_storage.py) against Optuna's, on PostgreSQL's types."""
    from optuna.storages import RDBStorage
    from test_bulk_storage import _same, _varied_study

    from evomerge.search.bulk_storage import BulkRDBStorage

    study_id = _varied_study(pg_url)
    ours, optunas = BulkRDBStorage(pg_url), RDBStorage(pg_url)
    for states in (None, (TrialState.COMPLETE,), (TrialState.WAITING, TrialState.RUNNING)):
        _same(ours._get_trials(study_id, states, set(), -1), optunas._get_trials(study_id, states, set(), -1))
