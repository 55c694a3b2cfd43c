"""The search loop on the zoo: exact resume after SIGKILL, records, archive, one worker per
SQLite study. Failing candidates: tests/reliability/test_faults.py; bad input of every kind:
tests/reliability/test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
import signal
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.config import load_config
from reliability.harness import (completed_sequence, need_backend, run_cli, run_to_end, trials_of,
                                 wait_for_running_trial_after, write_config)


CMAES, NSGA2 = {"name": "cmaes", "popsize": 4}, {"name": "nsga2", "population_size": 4}


@pytest.mark.parametrize("sampler, kills, backend", [(CMAES, [2, 4, 7], "hf"), (NSGA2, [0, 5], "hf"),
                                                     (CMAES, [4], "vllm")],  # one engine start per kill
                         ids=["cmaes-hf", "nsga2-hf", "cmaes-vllm"])
def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, zoo, sampler, kills, backend):
    """Killed mid-generation, at a generation boundary and during the first trial. On vLLM (one engine start
    per process) with CMA-ES only, killed once, at the generation boundary (trial 5 of populations of 4): NSGA-II
    resumes the same whatever scores its trials, and
    tests/reliability/test_kill_resume.py kills an NSGA-II search on vLLM in every phase."""
    need_backend(backend)
    n = 10
    straight = write_config(tmp_path, zoo, "straight", sampler, n, backend=backend)
    run_to_end(straight, backend)
    killed = write_config(tmp_path, zoo, "killed", sampler, n, backend=backend)
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


def test_an_exported_trial_is_the_model_it_scored_in_the_searchs_dtype(tmp_path, zoo):
    """The harness searches in float32: the export is that float32 candidate, bit for bit, not a
    bfloat16 rounding of it (a trial's recipe once defaulted to bfloat16 whatever the run's dtype)."""
    from safetensors.torch import load_file

    from evomerge.merge.materialize import Materializer
    from evomerge.recipe import Recipe

    path = write_config(tmp_path, zoo, n_trials=1)
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["export", str(path), "--trial", "0", "--out", str(tmp_path / "best")]) == 0
    recipe = Recipe.load(tmp_path / "best" / "recipe.yaml")
    assert recipe.dtype == "float32"
    scored = Materializer.for_recipe(recipe, device="cpu").apply(recipe).state_dict()
    saved = load_file(tmp_path / "best" / "model.safetensors")
    assert saved and all(torch.equal(tensor, scored[name]) for name, tensor in saved.items())


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


def test_models_failing_to_load_on_resume_change_nothing(tmp_path, zoo, capfd):
    """A resumed search loads its models before it takes a trial: if they fail to load, the run
    stops with one line and the study is as it was; restored, the search goes on as if never stopped."""
    models = tmp_path / "zoo"
    shutil.copytree(zoo, models)
    straight = write_config(tmp_path, models, "straight", n_trials=4)
    assert main(["run", str(straight), "--quiet"]) == 0
    path = write_config(tmp_path, models, "resumed", n_trials=2)
    assert main(["run", str(path), "--quiet"]) == 0
    weights = models / "expert_cae" / "model.safetensors"
    weights.rename(tmp_path / "aside.safetensors")
    capfd.readouterr()
    assert main(["run", str(path), "--quiet", "--n-trials", "4"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: ") and "expert_cae" in lines[0], lines
    assert [t.state for t in trials_of(path)] == [TrialState.COMPLETE] * 2
    (tmp_path / "aside.safetensors").rename(weights)
    assert main(["run", str(path), "--quiet", "--n-trials", "4"]) == 0
    assert completed_sequence(path) == completed_sequence(straight)


def test_a_study_without_its_models_depth_gets_it_on_resume(tmp_path, zoo):
    """Studies made before n_layers was recorded get it on their next run."""
    path = write_config(tmp_path, zoo, n_trials=1)
    assert main(["run", str(path), "--quiet"]) == 0
    config = load_config(path)
    optuna.load_study(study_name=config.study_name, storage=config.storage).set_user_attr("evomerge:n_layers", None)
    assert main(["run", str(path), "--quiet", "--n-trials", "2"]) == 0
    assert optuna.load_study(study_name=config.study_name, storage=config.storage).user_attrs["evomerge:n_layers"] == 4
