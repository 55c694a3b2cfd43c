"""The 2PL fit and the tinyBenchmarks estimators against independent references: parameters
recovered from data simulated from a known 2PL, abilities equal to a brute-force grid MAP,
estimates on the full item set equal to the plain mean, gp-IRT's documented formula, anchors
by hand, JSON round trip and determinism."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import pearsonr

from evomerge.fitness.harness import aggregate_scores
from evomerge.fitness.irt import (Irt2PL, IrtEstimator, Prior, anchors, answer_matrix, fit_2pl, fit_estimator, gp_irt,
                                  gp_lambda, naive_variance)
from evomerge.fitness.items import ItemResults


def simulate(n_subjects: int, n_items: int, n_dims: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n_subjects, n_dims))
    a, b = np.exp(rng.normal(0, 0.4, n_items)), rng.normal(0, 1.0, n_items)
    dims = np.arange(n_items) % n_dims
    p = 1 / (1 + np.exp(-a * (theta[:, dims] - b)))
    return (rng.random(p.shape) < p).astype(float), theta, a, b, dims


@pytest.fixture(scope="module")
def simulated():
    y, theta, a, b, dims = simulate(300, 200)
    model, fitted = fit_2pl(y)
    return y, theta, a, b, model, fitted


def test_recovers_a_known_2pl(simulated):
    """Fisher information sets the thresholds: 200 items give theta a standard error of ~0.15
    (corr ~0.99 with sd 1), 300 subjects give b ~0.15 (corr ~0.99 with sd 1) and a ~0.15 on a
    log-sd of 0.4 (corr ~0.9); the thresholds leave room for the MAP's shrinkage."""
    _, theta, a, b, model, fitted = simulated
    assert pearsonr(fitted[:, 0], theta[:, 0]).statistic > 0.97
    assert pearsonr(model.b, b).statistic > 0.95
    assert pearsonr(model.a, a).statistic > 0.8


def test_recovers_one_ability_per_task_and_tolerates_missing_answers():
    y, theta, a, b, dims = simulate(300, 200, n_dims=2, seed=1)
    y[np.random.default_rng(2).random(y.shape) < 0.3] = np.nan  # 30% of the answers never seen
    model, fitted = fit_2pl(y, dims)
    for d in range(2):
        assert pearsonr(fitted[:, d], theta[:, d]).statistic > 0.95
    assert abs(pearsonr(fitted[:, 0], fitted[:, 1]).statistic) < 0.3  # the dimensions stay apart
    assert pearsonr(model.b, b).statistic > 0.93


def test_abilities_are_the_map_a_grid_search_finds(simulated):
    """Newton's abilities vs. a brute-force maximum of the log-posterior on a fine grid, and the
    joint fit's own abilities (at the joint optimum each subject's theta is its conditional MAP)."""
    y, _, _, _, model, fitted = simulated
    shown = np.where(np.random.default_rng(3).random(y.shape[1]) < 0.1, y[:5], np.nan)  # ~20 items each
    grid = np.linspace(-5, 5, 100001)
    for row, theta in zip(shown, model.abilities(shown)[:, 0]):
        seen = ~np.isnan(row)
        z = model.a[seen] * (grid[:, None] - model.b[seen])
        log_post = (row[seen] * z - np.logaddexp(0, z)).sum(axis=1) - grid ** 2 / (2 * model.prior.ability_sd ** 2)
        assert theta == pytest.approx(grid[np.argmax(log_post)], abs=2e-4)
    fit_prior = replace(model, prior=replace(model.prior, ability_sd=model.prior.theta_sd))
    assert np.abs(fit_prior.abilities(y) - fitted).max() < 1e-4


def test_the_prior_keeps_a_perfect_score_finite():
    """20 answers all right: MLE says theta = +inf and 100%; the MAP stays finite and below 1."""
    y, *_ = simulate(300, 200)
    model, _ = fit_2pl(y)
    perfect = np.where(np.arange(200) < 20, 1.0, np.nan)
    theta = model.abilities(perfect)[0, 0]
    assert 0 < theta < 8
    assert 0.5 < model.completed(perfect).mean() < 1.0
    always_right = y.copy()
    always_right[:, 0] = 1.0
    assert np.isfinite(fit_2pl(always_right)[0].b[0])


def test_full_item_set_gives_the_plain_mean(simulated):
    y, _, _, _, model, _ = simulated
    items = np.arange(50, 120)
    naive = y[:, items].mean(axis=1)
    p_irt = model.completed(y)[:, items].mean(axis=1)
    assert np.array_equal(p_irt, naive)
    lam = gp_lambda(0.02, naive_variance(y, items, len(items), anchored=False))
    assert np.allclose(gp_irt(naive, p_irt, lam), naive, atol=1e-15)


def test_p_irt_is_seen_answers_plus_predicted_rest(simulated):
    y, _, _, _, model, _ = simulated
    shown = np.where(np.arange(200) % 10 == 0, y[7], np.nan)
    theta = model.abilities(shown)
    p = 1 / (1 + np.exp(-model.a * (theta[0, 0] - model.b)))
    by_hand = (np.nansum(shown) + p[np.isnan(shown)].sum()) / 200
    assert model.completed(shown).mean() == pytest.approx(by_hand, abs=1e-12)


def test_gp_irt_is_the_documented_convex_combination():
    """lam = bias^2 / (bias^2 + var); gp-IRT = lam * naive + (1 - lam) * p-IRT (tinyBenchmarks)."""
    assert gp_lambda(0.03, 0.0009) == pytest.approx(0.5)
    assert gp_lambda(0.04, 0.0009) == pytest.approx(0.0016 / 0.0025)
    assert gp_lambda(0.0, 0.01) == 0.0 and gp_lambda(0.1, 0.0) == 1.0 and gp_lambda(0.0, 0.0) == 0.0
    assert gp_irt(0.8, 0.6, 0.25) == pytest.approx(0.65)
    y = np.array([[1, 0, 1, 1], [0, 0, 0, 1]], dtype=float)  # per-subject variances 0.1875 and 0.1875
    assert naive_variance(y, np.arange(4), 3, anchored=False) == pytest.approx(0.1875 / 3)
    assert naive_variance(y, np.arange(4), 3, anchored=True) == pytest.approx(0.1875 / 12)


def test_anchors_by_hand():
    """Three kinds of item (50, 30, 20 alike): one anchor each weighs its kind's share; with 10
    anchors the extra 7 go by largest remainder on 49/29/19 spare items (4, 2, 1), so every
    anchor weighs 0.1."""
    a = np.repeat([0.5, 1.0, 2.0], [50, 30, 20])
    b = np.repeat([-1.0, 0.0, 1.5], [50, 30, 20])
    model = Irt2PL(a, b, np.zeros(100, dtype=int))
    chosen, weights = anchors(model, np.arange(100), 3)
    assert len(chosen) == 3
    assert dict(zip(np.digitize(chosen, [50, 80]), weights)) == pytest.approx({0: 0.5, 1: 0.3, 2: 0.2})
    chosen, weights = anchors(model, np.arange(100), 10)
    assert np.bincount(np.digitize(chosen, [50, 80])).tolist() == [5, 3, 2]
    assert weights == pytest.approx([0.1] * 10) and len(set(chosen.tolist())) == 10


def test_anchors_spread_over_the_embedding(simulated):
    *_, model, _ = simulated
    chosen, weights = anchors(model, np.arange(200), 20, seed=0)
    assert len(set(chosen.tolist())) == 20 and weights.sum() == pytest.approx(1.0)
    assert np.ptp(model.b[chosen]) > 0.6 * np.ptp(model.b)  # from easy to hard items, not one corner


def test_deterministic_and_plain_json(simulated):
    y, *_ = simulated
    first, theta = fit_2pl(y[:60])
    second, theta2 = fit_2pl(y[:60])
    assert np.array_equal(first.a, second.a) and np.array_equal(first.b, second.b) and np.array_equal(theta, theta2)
    assert np.array_equal(anchors(first, np.arange(200), 15, seed=4)[0], anchors(second, np.arange(200), 15, seed=4)[0])
    text = json.dumps(first.to_json(), allow_nan=False)
    back = Irt2PL.from_json(json.loads(text))
    assert back.prior == Prior() and np.array_equal(back.prob(theta), first.prob(theta))


@pytest.fixture(scope="module")
def three_tasks():
    """Answers of 80 subjects on three tasks of 200 items, one ability per task, as ItemResults."""
    y, *_ = simulate(80, 600, n_dims=3, seed=5)
    sizes = {"zoo_rev": 200, "zoo_srt": 200, "zoo_cae": 200}
    dims = np.arange(600) % 3
    order = np.concatenate([np.flatnonzero(dims == d) for d in range(3)])  # task-major columns
    rows = [ItemResults({t: list(range(200)) for t in sizes},
                        {t: {"acc,none": y[r, order[200 * k:200 * (k + 1)]].tolist()} for k, t in enumerate(sizes)})
            for r in range(len(y))]
    return rows, sizes


def test_answer_matrix_places_each_item_in_its_column(three_tasks):
    rows, sizes = three_tasks
    partial = ItemResults({"zoo_srt": [0, 199]}, {"zoo_srt": {"acc,none": [1.0, 0.0]}})
    y = answer_matrix([rows[0], partial], sizes, "acc,none")
    assert y[0, 200:400].tolist() == rows[0].values["zoo_srt"]["acc,none"]
    assert y[1, 200] == 1.0 and y[1, 399] == 0.0 and np.isnan(y[1]).sum() == 598


def test_estimator_on_every_item_is_the_plain_mean_and_round_trips(three_tasks):
    rows, sizes = three_tasks
    y = answer_matrix(rows, sizes, "acc,none")
    estimator = fit_estimator(y[:60], sizes)
    for kind in ("naive", "p_irt", "gp_irt"):
        for task, value in estimator.estimate(rows[70], "acc,none", kind).items():
            assert value == {"acc,none": pytest.approx(np.mean(rows[70].values[task]["acc,none"]), abs=1e-12)}
    back = IrtEstimator.from_json(json.loads(json.dumps(estimator.with_anchors(30).to_json(), allow_nan=False)))
    held_out = np.where(np.random.default_rng(0).random(600) < 0.05, y[60:], np.nan)
    for task, e in estimator.with_anchors(30).estimates(held_out).items():
        assert np.array_equal(back.estimates(held_out)[task]["gp_irt"], e["gp_irt"])


def test_anchored_estimates_beat_their_own_weighted_mean_on_held_out_subjects(three_tasks):
    """20 anchors (7/7/6 per task) of subjects the model never saw: p-IRT and gp-IRT are closer to
    the true task means than the anchors' weighted mean alone (the point of IRT), and gp-IRT
    lies between the two it combines."""
    rows, sizes = three_tasks
    y = answer_matrix(rows, sizes, "acc,none")
    estimator = fit_estimator(y[:60], sizes).with_anchors(20, seed=1)
    assert {t: len(ids) for t, ids in estimator.anchor_items().items()} == {"zoo_rev": 7, "zoo_srt": 7, "zoo_cae": 6}
    seen = np.array(sorted(estimator.anchor_weights))
    shown = np.full_like(y[60:], np.nan)
    shown[:, seen] = y[60:, seen]
    errors = {kind: [] for kind in ("naive", "p_irt", "gp_irt")}
    for task, e in estimator.estimates(shown).items():
        truth = y[60:, estimator.columns[task]].mean(axis=1)
        for kind in errors:
            errors[kind].append(np.abs(e[kind] - truth).mean())
        low, high = np.minimum(e["naive"], e["p_irt"]), np.maximum(e["naive"], e["p_irt"])
        assert np.all((low - 1e-12 <= e["gp_irt"]) & (e["gp_irt"] <= high + 1e-12))
    assert np.mean(errors["p_irt"]) < np.mean(errors["naive"]) and np.mean(errors["gp_irt"]) < np.mean(errors["naive"])


def test_estimates_aggregate_into_the_groups_scores(three_tasks):
    from pathlib import Path

    from evomerge.fitness.harness import load_tasks

    rows, sizes = three_tasks
    _, task_dict = load_tasks(["zoo_target"], Path("evaluators/tasks"))
    estimator = fit_estimator(answer_matrix(rows[:60], sizes, "acc,none"), sizes)
    few = ItemResults({t: [0, 5, 9] for t in sizes}, {t: {"acc,none": rows[70].values[t]["acc,none"][:3]} for t in sizes})
    per_task = estimator.estimate(few, "acc,none")
    scores = aggregate_scores(task_dict, per_task, sizes)
    assert scores["zoo_target/acc"] == pytest.approx(np.mean([v["acc,none"] for v in per_task.values()]))
    assert scores["zoo_rev/acc"] == per_task["zoo_rev"]["acc,none"]
