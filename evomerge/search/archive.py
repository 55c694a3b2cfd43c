"""The Pareto archive: the non-dominated completed trials of a study over every recorded
objective, whichever sampler proposed them, and its hypervolume as the study grew.

Objective values come from each trial's `objectives` user attribute, so single-objective
studies (which only tell Optuna a scalarization) still get a full multi-objective archive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # WFG; private but stable since optuna 4.0
from optuna.trial import FrozenTrial, TrialState


@dataclass(frozen=True)
class ArchiveEntry:
    number: int
    values: dict[str, float]
    recipe: dict[str, Any]


def to_losses(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Flip maximized columns so that smaller is better everywhere."""
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return values * signs


def non_dominated(losses: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows no other row dominates (<= everywhere, < somewhere); duplicates all stay."""
    keep = np.ones(len(losses), dtype=bool)
    for i, row in enumerate(losses):
        dominated_by = np.all(losses <= row, axis=1) & np.any(losses < row, axis=1)
        keep[i] = not dominated_by.any()
    return keep


def completed(study: optuna.Study, names: Sequence[str]) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if all(n in t.user_attrs.get("objectives", {}) for n in names)]


def pareto_archive(study: optuna.Study, names: Sequence[str], directions: Sequence[str]) -> list[ArchiveEntry]:
    trials = completed(study, names)
    if not trials:
        return []
    values = np.array([[t.user_attrs["objectives"][n] for n in names] for t in trials], dtype=float)
    mask = non_dominated(to_losses(values, directions))
    return [ArchiveEntry(t.number, dict(t.user_attrs["objectives"]), json.loads(t.user_attrs.get("recipe", "{}")))
            for t, keep in zip(trials, mask) if keep]


def hypervolume_history(study: optuna.Study, names: Sequence[str], directions: Sequence[str],
                        reference: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """(trials completed, hypervolume of the front so far), in completion order. The reference point is
    the worst value seen per objective unless given (in the objectives' own units)."""
    trials = sorted(completed(study, names), key=lambda t: t.datetime_complete or t.datetime_start)
    if not trials:
        return []
    losses = to_losses(np.array([[t.user_attrs["objectives"][n] for n in names] for t in trials], dtype=float), directions)
    ref = to_losses(np.array([reference], dtype=float), directions)[0] if reference is not None else losses.max(axis=0)
    history, front = [], np.empty((0, losses.shape[1]))
    for i, row in enumerate(losses, start=1):
        if np.all(row <= ref):
            front = np.vstack([front, row])
            front = front[non_dominated(front)]
        history.append((i, float(compute_hypervolume(front, ref)) if len(front) else 0.0))
    return history
