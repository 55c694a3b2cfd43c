"""Helpers shared by the search tests, the reliability tests and bench/soak.py: a run config on
the zoo with a fast fitness, reading a study back, and running `evomerge run` as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import load_config

FAST_FITNESS = {"kind": "zoo_skills", "n_examples": 24, "objectives": [{"name": s, "metric": s} for s in ("rev", "srt", "cae")],
                "scalarization": {"rev": 1.0, "srt": 1.0, "cae": 1.0}}


def write_config(folder: Path, zoo: Path, name: str = "t", sampler: object = "cmaes", n_trials: int = 6, **extra) -> Path:
    """A run config on the zoo (SQLite in `folder` unless `storage=` is given); returns its path."""
    (folder / "fitness.yaml").write_text(yaml.safe_dump(FAST_FITNESS))
    config = {"name": name, "models": [str(zoo / f"expert_{s}") for s in ("rev", "srt", "cae")],
              "base_model": str(zoo / "base"), "search_space": "search_spaces/ps_ties_dare.yaml",
              "fitness": str(folder / "fitness.yaml"), "sampler": sampler, "budget": {"n_trials": n_trials},
              "seed": 0, "storage": f"sqlite:///{folder}/{name}.db", "device": "cpu", "dtype": "float32",
              "heartbeat": {"interval": 1, "grace": 3}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trials_of(path: Path) -> list[FrozenTrial]:
    config = load_config(path)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage)
    return study.get_trials(deepcopy=False)


def completed_sequence(path: Path) -> list[tuple[dict, dict]]:
    """(params, objectives) of the completed trials, in trial order: what two runs must agree on."""
    return [(t.params, t.user_attrs["objectives"]) for t in trials_of(path) if t.state == TrialState.COMPLETE]


def run_cli(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`evomerge run PATH --quiet ARGS` in a new process (stdout and stderr together)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(path), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_running_trial_after(path: Path, k: int, timeout: float = 240) -> None:
    """Until k trials are complete and the next one is running (the moment to SIGKILL the worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = [t.state for t in trials_of(path)]
        except KeyError:  # the study is not created yet
            states = []
        if states.count(TrialState.COMPLETE) >= k and TrialState.RUNNING in states:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no running trial after {k} completed")
