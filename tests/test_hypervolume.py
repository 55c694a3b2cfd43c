"""The exact hypervolume against hand-computed volumes, two brute-force references (counting unit
cells, inclusion-exclusion) and Optuna's own implementation. Every comparison runs both ways of
computing it: one grid, and slices down to one dimension (max_cells=1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evomerge.search.archive import hypervolume_of, non_dominated, prefix_volumes

BOTH_WAYS = pytest.mark.parametrize("max_cells", [2**20, 1], ids=["grid", "slices"])


def hv(losses, ref, max_cells):
    return hypervolume_of(np.array(losses, dtype=float), np.array(ref, dtype=float), max_cells)


@BOTH_WAYS
@pytest.mark.parametrize("losses, ref, expected", [
    ([[3], [1], [2]], [5], 4),
    ([[6], [5]], [5], 0),                                  # beyond and on the reference
    ([[1, 3], [2, 2], [3, 1]], [4, 4], 1 * 1 + 1 * 2 + 1 * 3),  # staircase, by x strips
    ([[1, 1, 1]], [2, 3, 4], 1 * 2 * 3),
    ([[0, 0, 1], [1, 1, 0]], [2, 2, 2], 4 + 2 - 1),         # two boxes minus their overlap
    ([[0, 0, 0, 0], [1, 1, 1, 1]], [2, 2, 2, 2], 16),      # the second is dominated
    ([[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], [2, 2, 2, 2], 4 * 2 - 6 + 4 - 1),  # boxes of 2, any overlap the unit cube
], ids=["1d", "1d-outside", "2d-staircase", "3d-box", "3d-two-boxes", "4d-dominated", "4d-four-boxes"])
def test_hand_computed(losses, ref, expected, max_cells):
    assert hv(losses, ref, max_cells) == pytest.approx(expected)


@BOTH_WAYS
def test_duplicates_dominated_and_outside_rows_add_nothing(max_cells):
    front = [[1, 4, 2], [2, 2, 2], [4, 1, 3]]
    ref = [5, 5, 5]
    extra = [[2, 2, 2], [1, 4, 2], [3, 3, 3], [2, 2, 4], [0, 0, 5], [6, 0, 0], [0, 7, 0]]
    assert hv(front + extra, ref, max_cells) == pytest.approx(hv(front, ref, max_cells))
    assert hv(np.empty((0, 3)), ref, max_cells) == hv([[5, 5, 5], [0, 9, 0]], ref, max_cells) == 0.0


def unit_cells_dominated(losses: np.ndarray, side: int) -> int:
    """Integer points, reference (side, ..., side): count the unit cells whose lower corner some row
    inside the reference box is <= everywhere."""
    inside = losses[np.all(losses < side, axis=1)]
    return sum(bool(np.all(inside <= cell, axis=1).any())
               for cell in itertools.product(range(side), repeat=losses.shape[1]))


def inclusion_exclusion(losses: np.ndarray, ref: np.ndarray) -> float:
    """The union of the boxes [row, ref]: every intersection of k boxes, signed (-1)^(k+1)."""
    total = 0.0
    for k in range(1, len(losses) + 1):
        for subset in itertools.combinations(losses, k):
            total += (-1) ** (k + 1) * np.prod(np.clip(ref - np.max(subset, axis=0), 0, None))
    return total


@BOTH_WAYS
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_equals_counting_unit_cells(d, max_cells):
    rng = np.random.default_rng(d)
    for n in (1, 2, 5, 9):
        losses = rng.integers(0, 7, size=(n, d)).astype(float)  # 6 is on the reference: outside
        assert hv(losses, [6] * d, max_cells) == unit_cells_dominated(losses, 6)


@BOTH_WAYS
@pytest.mark.parametrize("d", [2, 3, 4])
def test_prefix_volumes_equal_counting_each_prefix(d, max_cells):
    """What the hypervolume history and the slices build on: each row adds its box less what the
    front already covers, duplicates and dominated rows nothing."""
    losses = np.random.default_rng(20 + d).integers(0, 7, size=(14, d)).astype(float)
    expected = [unit_cells_dominated(losses[:i], 6) for i in range(1, 15)]
    assert prefix_volumes(losses, np.full(d, 6.0), max_cells) == pytest.approx(expected)


@BOTH_WAYS
@pytest.mark.parametrize("d", [2, 3, 5])
def test_equals_inclusion_exclusion(d, max_cells):
    rng = np.random.default_rng(10 + d)
    for n in (3, 6, 9):
        losses = rng.random((n, d))
        ref = np.full(d, 0.9)  # some rows beyond it
        assert hv(losses, ref, max_cells) == pytest.approx(inclusion_exclusion(losses, ref), rel=1e-12)


def sphere_front(n: int, d: int, seed: int) -> np.ndarray:
    """n points on the unit sphere's positive orthant: none dominates another."""
    x = np.abs(np.random.default_rng(seed).normal(size=(n, d)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@BOTH_WAYS
@pytest.mark.parametrize("d, n", [(2, 300), (3, 300), (4, 60)])
def test_agrees_with_optuna(d, n, max_cells):
    from optuna._hypervolume import compute_hypervolume  # private: a second reference here only

    rng = np.random.default_rng(d)
    for losses in (sphere_front(n, d, d), rng.random((n, d)), rng.integers(0, 5, size=(n, d)).astype(float)):
        ref = losses.max(axis=0) + 0.1
        front = losses[non_dominated(losses)]
        assert hypervolume_of(losses, ref, max_cells) == pytest.approx(compute_hypervolume(front, ref), rel=1e-10)


def test_a_4d_front_of_hundreds_takes_the_slices_and_agrees_with_optuna():
    from optuna._hypervolume import compute_hypervolume

    losses, ref = sphere_front(250, 4, 0), np.full(4, 1.1)  # 250^3 cells: sliced into 3-D grids
    assert hypervolume_of(losses, ref) == pytest.approx(compute_hypervolume(losses, ref), rel=1e-10)
