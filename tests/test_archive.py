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


def testhypervolume_of_by_hand():
    # reference = worst seen = (0.1, 0.1); boxes above it: (0.1..0.2 x 0.1..0.9), (0.2..0.5 x 0.1..0.5), (0.5..0.9 x 0.1..0.2)
    expected = 0.1 * 0.8 + 0.3 * 0.4 + 0.4 * 0.1
    assert hypervolume(study_with(POINTS), ["a", "b"], ["maximize", "maximize"]) == pytest.approx(expected)
    history = hypervolume_history(study_with(POINTS), ["a", "b"], ["maximize", "maximize"])
    assert [n for n, _ in history] == [1, 2, 3, 4, 5, 6]
    assert all(h1 <= h2 + 1e-12 for (_, h1), (_, h2) in zip(history, history[1:]))
    assert history[-1][1] == pytest.approx(expected)


def test_non_dominated_equals_the_pairwise_definition():
    """Against every pair compared, on fronts with ties, duplicates and equal coordinates."""
    import numpy as np

    from evomerge.search.archive import non_dominated

    rng = np.random.default_rng(0)
    for n, d in ((1, 2), (40, 2), (200, 3), (300, 4)):
        losses = rng.integers(0, 6, size=(n, d)).astype(float)  # few values: many ties and duplicates
        expected = [not any((losses[j] <= losses[i]).all() and (losses[j] < losses[i]).any() for j in range(n))
                    for i in range(n)]
        assert non_dominated(losses).tolist() == expected


def testhypervolume_of_history_equals_recomputing_every_prefix():
    import numpy as np

    from evomerge.search.archive import hypervolume_of, to_losses

    points = [tuple(p) for p in np.random.default_rng(1).integers(0, 8, size=(60, 2)) / 8]
    history = hypervolume_history(study_with(points, failed=0), ["a", "b"], ["maximize", "maximize"])
    losses = to_losses(np.array(points), ["maximize", "maximize"])
    ref = losses.max(axis=0)
    assert [h for _, h in history] == pytest.approx([hypervolume_of(losses[:i], ref) for i in range(1, 61)])
