"""The search loop on the zoo: exact resume after SIGKILL, records, archive, and bad configs
that must not touch an existing study (failing candidates: tests/reliability/test_faults.py)."""

from __future__ import annotations

import json
import shutil
import signal
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.cli import main
from reliability.harness import completed_sequence, run_cli, trials_of, wait_for_running_trial_after, write_config


@pytest.mark.parametrize("sampler, kills", [({"name": "cmaes", "popsize": 4}, [2, 4, 7]),
                                             ({"name": "nsga2", "population_size": 4}, [0, 5])],
                         ids=["cmaes", "nsga2"])
def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, zoo, sampler, kills):
    """Killed mid-generation, at a generation boundary and during the first trial."""
    n = 10
    straight = write_config(tmp_path, zoo, "straight", sampler, n)
    assert main(["run", str(straight), "--quiet"]) == 0
    killed = write_config(tmp_path, zoo, "killed", sampler, n)
    for k in kills:  # kill while trial k+1 is running (mid-generation for most k)
        proc = run_cli(killed)
        wait_for_running_trial_after(killed, k)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = run_cli(killed)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    a, b = completed_sequence(killed), completed_sequence(straight)
    assert [i for i, (x, y) in enumerate(zip(a, b)) if x != y] == [] and len(a) == len(b), [t.number for t in trials_of(killed)]
    states = [t.state for t in trials_of(killed)]
    assert states.count(TrialState.COMPLETE) == n and TrialState.RUNNING not in states


def test_rerunning_a_finished_study_adds_nothing(tmp_path, zoo):
    path = write_config(tmp_path, zoo, n_trials=3)
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(path), "--quiet"]) == 0
    assert len(trials_of(path)) == 3
    assert main(["run", str(path), "--quiet", "--n-trials", "4"]) == 0
    assert sum(t.state == TrialState.COMPLETE for t in trials_of(path)) == 4


def test_every_trial_records_what_it_was(tmp_path, zoo):
    path = write_config(tmp_path, zoo, n_trials=2)
    assert main(["run", str(path), "--quiet"]) == 0
    for trial in trials_of(path):
        attrs = trial.user_attrs
        assert set(attrs["objectives"]) == {"rev", "srt", "cae"}
        assert {"rev", "srt", "cae", "mean"} <= set(attrs["scores"])
        assert {"materialize_s", "evaluate_s", "overhead_s"} == set(attrs["timings"])
        assert json.loads(attrs["recipe"])["method"] == "dare_ties" and attrs["device"] == "cpu"
        json.dumps(trial.system_attrs)  # nothing but JSON in the database


def test_archive_status_and_export(tmp_path, zoo, capsys):
    path = write_config(tmp_path, zoo, n_trials=4)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["archive", str(path), "--json", "--plot", str(tmp_path / "front.png")]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front and all({"number", "values", "recipe"} <= set(e) for e in front)
    assert (tmp_path / "front.png").stat().st_size > 1000
    assert main(["status", str(path)]) == 0
    assert "4 done / 4 budget" in capsys.readouterr().out
    best = front[0]["number"]
    assert main(["export", str(path), "--trial", str(best), "--out", str(tmp_path / "best")]) == 0
    assert (tmp_path / "best" / "model.safetensors").is_file()
    assert main(["export", str(path), "--trial", "99", "--out", str(tmp_path / "none")]) == 2
    assert "no trial 99" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_trial_study(tmp_path_factory, zoo):
    """A study with one completed trial, made once; each bad-config case works on a copy."""
    folder = tmp_path_factory.mktemp("one_trial")
    assert main(["run", str(write_config(folder, zoo, n_trials=1)), "--quiet"]) == 0
    return folder


@pytest.mark.parametrize("change, message", [
    ({"sampler": "cmaes2"}, "unknown sampler 'cmaes2'"),
    ({"models": ["no/such/model"]}, "no such directory"),
    ({"search_space": "search_spaces/missing.yaml"}, "search_space: file search_spaces/missing.yaml not found"),
    ({"budget": {"n_trials": 0}}, "n_trials: expected an integer >= 1"),
    ({"storage": "postgresql://u:secret@127.0.0.1:1/x"}, "cannot open storage postgresql://u:***@127.0.0.1:1/x"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"search_space": "SPACE:{method: tiez, per_source: {weight: {low: 0, high: 1}}}"}, "unknown merge method 'tiez'"),
    ({"search_space": "SPACE:{method: ties, per_source: {weight: {low: 1.5, high: 0}}}"}, "low (1.5) must be below high (0)"),
])
def test_bad_configs_give_one_line_and_leave_the_study_alone(tmp_path, one_trial_study, capsys, change, message):
    good = tmp_path / "t.yaml"
    shutil.copy(one_trial_study / "t.db", tmp_path / "t.db")
    data = yaml.safe_load((one_trial_study / "t.yaml").read_text())
    storage = data["storage"] = f"sqlite:///{tmp_path}/t.db"

    def snapshot():
        trials = optuna.load_study(study_name="t", storage=storage).get_trials(deepcopy=False)
        return [(t.number, t.state, t.params, t.user_attrs) for t in trials]

    before = snapshot()
    if str(change.get("search_space", "")).startswith("SPACE:"):  # a search space file with that content
        (tmp_path / "space.yaml").write_text(change["search_space"][len("SPACE:"):])
        change = {"search_space": str(tmp_path / "space.yaml")}
    data.update(change)
    good.write_text(yaml.safe_dump(data))
    assert main(["run", str(good), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "secret" not in err[0], err
    assert snapshot() == before


def test_resuming_with_another_search_space_is_refused(tmp_path, zoo, capsys):
    path = write_config(tmp_path, zoo, n_trials=1)
    assert main(["run", str(path), "--quiet"]) == 0
    data = yaml.safe_load(path.read_text())
    data["search_space"] = "search_spaces/ps_task_arithmetic.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--quiet"]) == 2
    assert "different search_space" in capsys.readouterr().err


def test_a_second_worker_on_sqlite_is_refused(tmp_path, zoo, capsys):
    path = write_config(tmp_path, zoo, n_trials=50)
    proc = run_cli(path)
    try:
        wait_for_running_trial_after(path, 0)
        assert main(["run", str(path), "--quiet"]) == 2
        assert "SQLite cannot share a study between workers" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
