"""The Pareto archive and hypervolume, on hand-made studies."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evomerge.search.archive import hypervolume, hypervolume_history, pareto_archive

POINTS = [(0.2, 0.9), (0.5, 0.5), (0.9, 0.2), (0.4, 0.4), (0.5, 0.5), (0.1, 0.1)]  # maximize both


def study_with(points, failed=1):
    study = optuna.create_study()
    for i, (a, b) in enumerate(points):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=a + b, params={"x": float(i)},
                                     distributions={"x": FloatDistribution(0, 100)},
                                     user_attrs={"objectives": {"a": a, "b": b}, "recipe": "{\"method\": \"linear\"}"}))
    for _ in range(failed):
        study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.0}, distributions={"x": FloatDistribution(0, 100)}))
    return study


def test_front_keeps_exactly_the_non_dominated_trials_and_ties():
    entries = pareto_archive(study_with(POINTS), ["a", "b"], ["maximize", "maximize"])
    assert sorted(e.number for e in entries) == [0, 1, 2, 4]
    assert entries[0].recipe == {"method": "linear"}


def test_direction_matters():
    entries = pareto_archive(study_with(POINTS), ["a", "b"], ["minimize", "minimize"])
    assert [e.number for e in entries] == [5]


def test_hypervolume_by_hand():
    # reference = worst seen = (0.1, 0.1); boxes above it: (0.1..0.2 x 0.1..0.9), (0.2..0.5 x 0.1..0.5), (0.5..0.9 x 0.1..0.2)
    expected = 0.1 * 0.8 + 0.3 * 0.4 + 0.4 * 0.1
    assert hypervolume(study_with(POINTS), ["a", "b"], ["maximize", "maximize"]) == pytest.approx(expected)
    history = hypervolume_history(study_with(POINTS), ["a", "b"], ["maximize", "maximize"])
    assert [n for n, _ in history] == [1, 2, 3, 4, 5, 6]
    assert all(h1 <= h2 + 1e-12 for (_, h1), (_, h2) in zip(history, history[1:]))
    assert history[-1][1] == pytest.approx(expected)
