"""Several `evomerge run` workers on one PostgreSQL study: unique trial numbers, every budgeted
trial completed exactly once, no parameter set evaluated twice."""

from __future__ import annotations

import time

import pytest
from optuna.trial import TrialState

from evomerge.cli import main
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


def _counts(path) -> dict[str, int]:
    try:
        trials = trials_of(path)
    except Exception:  # noqa: BLE001 - the server is restarting, or the study is not made yet
        return {}
    return {s.name: sum(t.state == s for t in trials) for s in TrialState}


def _counts_once_readable(path, timeout: float = 60) -> dict[str, int]:
    """The counts, retried while a just-restarted server still refuses connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            trials = trials_of(path)
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        return {s.name: sum(t.state == s for t in trials) for s in TrialState}


def _wait_until_complete(path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _counts(path).get("COMPLETE", 0) < n:
        assert time.monotonic() < deadline, f"fewer than {n} trials completed in {timeout} s"
        time.sleep(0.2)


def test_workers_ride_through_a_database_restart(tmp_path, zoo, pg_url, pg_cluster):
    """A fast shutdown terminates every connection, the heartbeat threads' too: both workers retry
    until the server is back and finish the budget; nothing is lost or evaluated twice."""
    n = 40
    path = write_config(tmp_path, zoo, "restart", {"name": "nsga2", "population_size": 4}, n, storage=pg_url)
    workers = [run_cli(path) for _ in range(2)]
    _wait_until_complete(path, 10)
    pg_cluster.restart()
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n---\n".join(outputs)
    assert "Traceback" not in "".join(outputs)
    trials = trials_of(path)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n
    evaluated = [tuple(sorted(t.params.items())) for t in trials if "copy_of" not in t.user_attrs
                 and t.state == TrialState.COMPLETE]
    assert len(evaluated) == len(set(evaluated)), "a parameter set was evaluated twice"


def test_a_worker_stops_with_one_line_when_the_database_stays_away(tmp_path, zoo, pg_url, pg_cluster):
    path = write_config(tmp_path, zoo, "away", "random", 400, storage=pg_url, reconnect_timeout_s=3)
    worker = run_cli(path)
    _wait_until_complete(path, 2)
    pg_cluster.halt()
    try:
        output = worker.communicate(timeout=120)[0]
    finally:
        pg_cluster.resume()
    assert worker.returncode == 2, output
    last = output.strip().splitlines()[-1]
    assert "Traceback" not in output and last.startswith("evomerge: error:"), output
    assert "unreachable" in last and "resume" in last and "pg-test-secret" not in output
    done = _counts_once_readable(path)["COMPLETE"]
    assert main(["run", str(path), "--quiet", "--n-trials", str(done + 2)]) == 0  # re-running resumes
    assert _counts(path)["COMPLETE"] == done + 2 and _counts(path)["RUNNING"] == 0
