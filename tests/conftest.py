"""Shared fixtures: the shipped zoo, and tests run from the repo root so recipe paths resolve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `pytest -n 2` (README): two workers on two cores. Each worker and the `evomerge` processes it starts
# run one torch thread, or their thread pools wait on each other's busy cores (measured: 18 min 22 s
# with torch's default threads, 11-14 min with one, against 22 min 17 s serially).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "runs" / "examples").glob("zoo_*.yaml"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def zoo() -> Path:
    from evomerge.zoo import ZOO_DIR

    return ZOO_DIR.relative_to(REPO) if ZOO_DIR.is_relative_to(REPO) else ZOO_DIR


os.environ.setdefault("HF_HUB_OFFLINE", "1")
