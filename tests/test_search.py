"""The search loop on the zoo: exact resume after SIGKILL, records, archive, one worker per
SQLite study. Failing candidates: tests/reliability/test_faults.py; bad input of every kind:
tests/reliability/test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.config import load_config
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


def test_a_second_worker_on_sqlite_is_refused_even_when_both_start_together(tmp_path, zoo):
    path = write_config(tmp_path, zoo, n_trials=50)
    workers = [run_cli(path) for _ in range(2)]
    try:
        while all(w.poll() is None for w in workers):
            time.sleep(0.1)
        refused = next(w for w in workers if w.returncode is not None)
        lines = refused.stdout.read().strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith("evomerge: error: another worker is running this SQLite study")
        assert "SQLite cannot share a study between workers: use a postgresql:// storage URL" in lines[0]
    finally:
        for w in workers:
            w.kill()
            w.wait()


_PROPOSE_THEN_STOP = """
import json, sys
from evomerge.config import load_config
from evomerge.search.loop import Search
search = Search(load_config(sys.argv[1], n_trials=3))
try:
    search.run()
except RuntimeError as exc:  # EVOMERGE_FAULT stops the trial once its params are recorded
    assert "injected" in str(exc), exc
print(json.dumps({"loaded": [m for m in ("torch", "transformers", "lm_eval") if m in sys.modules]}))
"""


def test_a_resumed_search_proposes_before_it_loads_torch_and_the_models(tmp_path, zoo):
    path = write_config(tmp_path, zoo, n_trials=2)
    assert main(["run", str(path), "--quiet"]) == 0
    env = {**os.environ, "EVOMERGE_FAULT": "trial=2:error@sample"}
    out = subprocess.run([sys.executable, "-c", _PROPOSE_THEN_STOP, str(path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"loaded": []}
    proposed = trials_of(path)[2]
    assert proposed.state == TrialState.RUNNING and len(proposed.params) == 6  # all of ps_ties_dare's genes


def test_models_failing_to_load_after_the_proposal_give_the_trial_back(tmp_path, zoo, capfd):
    """A resumed search proposes before it loads its models; if they then fail to load, the run stops
    with one line, the proposed trial is retried by the next run, and the sequence is unchanged."""
    models = tmp_path / "zoo"
    shutil.copytree(zoo, models)
    straight = write_config(tmp_path, models, "straight", n_trials=4)
    assert main(["run", str(straight), "--quiet"]) == 0
    path = write_config(tmp_path, models, "resumed", n_trials=2)
    assert main(["run", str(path), "--quiet"]) == 0
    weights = models / "expert_cae" / "model.safetensors"
    weights.rename(tmp_path / "aside.safetensors")
    for _ in range(2):  # giving a trial back does not use up the one retry a dead worker's trial gets
        capfd.readouterr()
        assert main(["run", str(path), "--quiet", "--n-trials", "4"]) == 2
        lines = capfd.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evomerge: error: ") and "expert_cae" in lines[0], lines
    *given_back, retry = trials_of(path)[2:]
    assert all(t.state == TrialState.FAIL and "stopped before evaluating it" in t.user_attrs["error"] for t in given_back)
    assert len(given_back) == 2 and retry.state == TrialState.WAITING and retry.params == given_back[0].params
    (tmp_path / "aside.safetensors").rename(weights)
    assert main(["run", str(path), "--quiet", "--n-trials", "4"]) == 0
    assert completed_sequence(path) == completed_sequence(straight)


def test_a_study_without_its_models_depth_gets_it_on_resume(tmp_path, zoo):
    """Studies made before n_layers was recorded load their models first once, then resume fast."""
    path = write_config(tmp_path, zoo, n_trials=1)
    assert main(["run", str(path), "--quiet"]) == 0
    config = load_config(path)
    optuna.load_study(study_name=config.study_name, storage=config.storage).set_user_attr("evomerge:n_layers", None)
    assert main(["run", str(path), "--quiet", "--n-trials", "2"]) == 0
    assert optuna.load_study(study_name=config.study_name, storage=config.storage).user_attrs["evomerge:n_layers"] == 4
