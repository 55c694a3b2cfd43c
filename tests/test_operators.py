"""Merge operators checked against independent references written from the formulas.

Each ``ref_*`` function below is a from-scratch re-statement of mergekit 0.1.5's semantics
(float64, plain loops / plain torch ops); none of them calls into ``evomerge``. Tiny cases have
their expected values written out by hand.

For the random sparsifiers (DARE, DELLA) the exact mask cannot be reproduced without copying
the implementation's draw order, so those tests recover the mask from the output and check
(a) everything that is deterministic given the mask (values, rescale factors, consensus) and
(b) the mask's statistics (keep rates per source, per rank, per row).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import METHODS
from evomerge.merge.registry import merge_tensor
from evomerge.merge.rng import tensor_generator

REPO_ROOT = Path(__file__).resolve().parents[1]
SQRT3_2 = math.sqrt(3.0) / 2.0
INV_SQRT2 = 1.0 / math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# Independent reference implementations
# --------------------------------------------------------------------------------------------

def ref_linear(sources, weights, normalize=True):
    out = sum(w * s.double() for w, s in zip(weights, sources))
    if normalize:
        out = out / sum(weights)
    return out


def ref_magnitude(d, rho):
    """Keep the k = max(1, int(rho*n)) largest-|d| entries of the flattened tensor."""
    d = d.double()
    if rho >= 1:
        return d.clone()
    if rho <= 0:
        return torch.zeros_like(d)
    flat = d.flatten().tolist()
    n = len(flat)
    k = max(1, int(rho * n))
    order = sorted(range(n), key=lambda i: abs(flat[i]), reverse=True)
    kept = [0.0] * n
    for i in order[:k]:
        kept[i] = flat[i]
    return torch.tensor(kept, dtype=torch.float64).reshape(d.shape)


def ref_magnitude_outliers(d, rho, gamma=0.01):
    """Breadcrumbs: drop the n_bot smallest-|d| entries and the n_top largest ones."""
    d = d.double()
    if rho >= 1:
        return d.clone()
    flat = d.flatten().tolist()
    n = len(flat)
    target = int(rho * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = sorted(range(n), key=lambda i: abs(flat[i]))  # ascending |d|
    kept = [0.0] * n
    for i in order[n_bot:n_bot + target]:
        kept[i] = flat[i]
    return torch.tensor(kept, dtype=torch.float64).reshape(d.shape)


def ref_l1_rescale(d, masked):
    """masked * (sum|d| / sum|masked|), skipped when either norm is < 1e-7."""
    d = d.double()
    masked = masked.double()
    old = d.abs().sum().item()
    new = masked.abs().sum().item()
    if old < 1e-7 or new < 1e-7:
        return masked
    return masked * (old / new)


def ref_gta(base, sparse_deltas, weights, consensus, normalize, lam=1.0):
    """Generalized task arithmetic, given the already-sparsified deltas."""
    base = base.double()
    e = [w * d.double() for w, d in zip(weights, sparse_deltas)]
    if consensus:
        total = sum(e)
        majority = torch.where(total >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(ei) == majority).double() for ei in e]
        mixed = sum(ei * mi for ei, mi in zip(e, masks))
        divisor = sum(w * mi for w, mi in zip(weights, masks))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = sum(e)
        divisor = float(sum(weights))
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed = mixed / divisor
    return base + mixed * lam


def ref_slerp(v0, v1, t):
    a = v0.double().flatten().tolist()
    b = v1.double().flatten().tolist()
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    na = 1.0 if na <= 1e-8 else na
    nb = 1.0 if nb <= 1e-8 else nb
    dot = sum((x / na) * (y / nb) for x, y in zip(a, b))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > 0.9995:
        out = [(1 - t) * x + t * y for x, y in zip(a, b)]
    else:
        theta = math.acos(dot)
        s0 = math.sin((1 - t) * theta) / math.sin(theta)
        s1 = math.sin(t * theta) / math.sin(theta)
        out = [s0 * x + s1 * y for x, y in zip(a, b)]
    return torch.tensor(out, dtype=torch.float64).reshape(v0.shape)


def _ref_model_stock_t(offset_rows):
    """offset_rows: list (one per source) of python lists (the offsets of one 'filter')."""
    n_src = len(offset_rows)
    cosines = []
    for i in range(n_src):
        for j in range(i + 1, n_src):
            oi, oj = offset_rows[i], offset_rows[j]
            dot = sum(x * y for x, y in zip(oi, oj))
            ni = math.sqrt(sum(x * x for x in oi))
            nj = math.sqrt(sum(x * x for x in oj))
            cosines.append(min(1.0, max(-1.0, dot / max(ni * nj, 1e-6))))
    cos = sum(cosines) / len(cosines)
    denom = 1 + (n_src - 1) * cos
    return 0.0 if abs(denom) < 1e-6 else n_src * cos / denom


def ref_model_stock(base, sources, filter_wise=False):
    base = base.double()
    srcs = [s.double() for s in sources]
    mean = sum(srcs) / len(srcs)
    if filter_wise:
        rows_base = base.reshape(1, -1) if base.dim() == 1 else base
        rows_src = [s.reshape(rows_base.shape) for s in srcs]
        ts = []
        for r in range(rows_base.shape[0]):
            offs = [(s[r] - rows_base[r]).tolist() for s in rows_src]
            ts.append(_ref_model_stock_t(offs))
        t = torch.tensor(ts, dtype=torch.float64).reshape(-1, 1)
        if base.dim() == 1:
            t = t.reshape(1)
    else:
        offs = [(s - base).flatten().tolist() for s in srcs]
        t = _ref_model_stock_t(offs)
    return t * mean + (1 - t) * base


# Method table from the spec: sparsifier, sign consensus, default normalize, default rescale.
GTA = {
    "task_arithmetic": dict(sparsifier=None, consensus=False, normalize=False, rescale=False),
    "ties": dict(sparsifier="magnitude", consensus=True, normalize=True, rescale=False),
    "dare_ties": dict(sparsifier="random", consensus=True, normalize=False, rescale=True),
    "dare_linear": dict(sparsifier="random", consensus=False, normalize=False, rescale=True),
    "breadcrumbs": dict(sparsifier="outliers", consensus=False, normalize=False, rescale=False),
    "breadcrumbs_ties": dict(sparsifier="outliers", consensus=True, normalize=False, rescale=False),
    "della": dict(sparsifier="magprune", consensus=True, normalize=True, rescale=True),
    "della_linear": dict(sparsifier="magprune", consensus=False, normalize=False, rescale=True),
}
GTA_METHODS = list(GTA)
SPARSE_METHODS = [m for m, s in GTA.items() if s["sparsifier"] is not None]  # these take `density`
RANDOM_METHODS = [m for m, s in GTA.items() if s["sparsifier"] in ("random", "magprune")]
DETERMINISTIC_SPARSE = [m for m, s in GTA.items() if s["sparsifier"] in ("magnitude", "outliers")]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def gen(name="model.layers.0.weight", seed=0):
    return tensor_generator(seed, name)


def merge(method, base, sources, params, options=None, generator=None):
    """merge_tensor with a fresh generator for the random methods unless one is given."""
    if generator is None and method in RANDOM_METHODS:
        generator = gen()
    return merge_tensor(method, base, sources, params, options, generator)


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def assert_close64(actual, expected, rtol=1e-5, atol=1e-6):
    """|actual - expected| <= atol + rtol * |expected| elementwise, compared in float64.
    (Plain torch ops: the first torch.testing call alone costs ~2 s of imports.)"""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.numel()} entries differ; max abs err {err.max().item():.3g}; "
        f"first bad: got {a[bad][:4].tolist()} expected {e[bad][:4].tolist()}"
    )


def rand_case(shape=(6, 5), n_sources=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    sources = [base + scale * torch.randn(shape, generator=g) for _ in range(n_sources)]
    return base, sources


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

def test_methods_registry_has_every_method():
    expected = set(GTA_METHODS) | {"linear", "slerp", "model_stock"}
    assert expected <= set(METHODS)


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------

def test_linear_hand_values_normalized():
    s1, s2 = t32([1, 2, 3, 4]), t32([5, 6, 7, 8])
    out = merge("linear", None, [s1, s2], [{"weight": 1.0}, {"weight": 3.0}])
    # (1*s1 + 3*s2) / 4
    assert torch.equal(out, t32([4, 5, 6, 7]))


def test_linear_hand_values_unnormalized_base_ignored():
    s1, s2 = t32([1, 2, 3, 4]), t32([5, 6, 7, 8])
    params = [{"weight": 1.0}, {"weight": 3.0}]
    out = merge("linear", t32([100, 100, 100, 100]), [s1, s2], params, {"normalize": False})
    assert torch.equal(out, t32([16, 20, 24, 28]))


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_random_matches_reference(normalize):
    _, sources = rand_case((4, 7), n_sources=3, seed=1)
    weights = [0.2, 0.7, -0.3]
    out = merge("linear", None, sources, [{"weight": w} for w in weights], {"normalize": normalize})
    assert out.dtype == torch.float32
    assert_close64(out, ref_linear(sources, weights, normalize))


# --------------------------------------------------------------------------------------------
# task_arithmetic and the shared GTA machinery (no sparsification)
# --------------------------------------------------------------------------------------------

TA_BASE = [1.0, 2.0, 3.0, 4.0]
TA_S1, TA_W1 = [2.0, 2.0, 2.0, 2.0], 0.5   # d1 = [1, 0, -1, -2]
TA_S2, TA_W2 = [0.0, 4.0, 3.0, 8.0], 2.0   # d2 = [-1, 2, 0, 4]


@pytest.mark.parametrize(
    "options, expected",
    [
        # mixed = 0.5*d1 + 2*d2 = [-1.5, 4, -0.5, 7]
        ({}, [-0.5, 6.0, 2.5, 11.0]),
        # mixed / 2.5 = [-0.6, 1.6, -0.2, 2.8]
        ({"normalize": True}, [0.4, 3.6, 2.8, 6.8]),
        # mixed * 0.5 = [-0.75, 2, -0.25, 3.5]
        ({"lambda": 0.5}, [0.25, 4.0, 2.75, 7.5]),
        # (mixed / 2.5) * 2 = [-1.2, 3.2, -0.4, 5.6]
        ({"normalize": True, "lambda": 2.0}, [-0.2, 5.2, 2.6, 9.6]),
    ],
)
def test_task_arithmetic_hand_values(options, expected):
    out = merge(
        "task_arithmetic", t32(TA_BASE), [t32(TA_S1), t32(TA_S2)],
        [{"weight": TA_W1}, {"weight": TA_W2}], options,
    )
    assert_close64(out, torch.tensor(expected, dtype=torch.float64))


def test_task_arithmetic_single_source_weight_one_gives_source_exactly():
    base = t32([0.5, -1.25, 3.0, 0.0, 7.75])
    src = t32([1.5, 2.0, -4.0, 0.125, 7.75])
    out = merge("task_arithmetic", base, [src], [{"weight": 1.0}])
    assert torch.equal(out, src)


def test_task_arithmetic_single_random_source_weight_one():
    base, (src,) = rand_case((5, 5), n_sources=1, seed=3)
    out = merge("task_arithmetic", base, [src], [{"weight": 1.0}])
    assert_close64(out, src, rtol=1e-6, atol=1e-6)


def test_normalize_with_weights_summing_to_zero_uses_divisor_one():
    base = t32([1.0, 1.0, 1.0])
    s1, s2 = t32([2.0, 1.0, 0.0]), t32([1.0, 3.0, 1.0])  # d1 = [1, 0, -1], d2 = [0, 2, 0]
    params = [{"weight": 1.0}, {"weight": -1.0}]
    out = merge("task_arithmetic", base, [s1, s2], params, {"normalize": True})
    # divisor 0 -> 1: out = base + d1 - d2
    assert torch.equal(out, t32([2.0, -1.0, 0.0]))


@pytest.mark.parametrize("method", GTA_METHODS)
@pytest.mark.parametrize(
    "options", [{}, {"normalize": True}, {"normalize": False, "lambda": 0.7}, {"normalize": True, "lambda": 1.3}]
)
def test_gta_density_one_matches_reference(method, options):
    """Density 1 switches every sparsifier off (and so also rescale): only weighting,
    consensus, normalization and lambda remain, which are deterministic."""
    base, sources = rand_case((5, 8), n_sources=3, seed=11)
    weights = [0.6, 1.1, -0.4]
    params = [{"weight": w} for w in weights]
    if method in SPARSE_METHODS:
        params = [dict(p, density=1.0) for p in params]
    spec = GTA[method]
    normalize = options.get("normalize", spec["normalize"])
    expected = ref_gta(
        base, [s - base for s in sources], weights, spec["consensus"], normalize, options.get("lambda", 1.0)
    )
    out = merge(method, base, sources, params, options)
    assert out.dtype == torch.float32
    assert_close64(out, expected)


@pytest.mark.parametrize("method", GTA_METHODS)
def test_gta_density_defaults_to_one(method):
    base, sources = rand_case((3, 4), n_sources=2, seed=12)
    weights = [0.8, 0.5]
    spec = GTA[method]
    expected = ref_gta(base, [s - base for s in sources], weights, spec["consensus"], spec["normalize"])
    out = merge(method, base, sources, [{"weight": w} for w in weights])
    assert_close64(out, expected)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_gta_density_zero_gives_base(method):
    base, sources = rand_case((4, 6), n_sources=2, seed=13)
    params = [{"weight": 1.0, "density": 0.0}, {"weight": 0.5, "density": 0.0}]
    out = merge(method, base, sources, params)
    assert torch.equal(out, base)


# --------------------------------------------------------------------------------------------
# ties: sign consensus and magnitude sparsification
# --------------------------------------------------------------------------------------------

def test_ties_consensus_hand_values_including_sign_tie():
    base = t32([1.0, 0.0, -1.0, 2.0, 4.0])
    s1 = t32([3.0, 1.0, -1.0, 2.0, 4.0])   # d1 = [2, 1, 0, 0, 0],  e1 = [1, .5, 0, 0, 0]
    s2 = t32([0.0, 2.0, 1.0, 1.0, 4.0])    # d2 = [-1, 2, 2, -1, 0], e2 = [-1, 2, 2, -1, 0]
    # S = [0, 2.5, 2, -1, 0] -> majority [+, +, +, -, +]
    # entry 0 is a sign tie: only e1 survives, divisor = w1 = 0.5 -> 1 / 0.5 = 2
    # entry 1: (0.5 + 2) / 1.5; entry 2: 2 / 1; entry 3: -1 / 1; entry 4: nothing, divisor 0 -> 1
    out = merge("ties", base, [s1, s2], [{"weight": 0.5}, {"weight": 1.0}])
    expected = torch.tensor([1 + 2.0, 0 + 2.5 / 1.5, -1 + 2.0, 2 - 1.0, 4.0], dtype=torch.float64)
    assert_close64(out, expected)


def test_ties_sign_tie_unnormalized():
    base = t32([0.0, 0.0])
    # weighted deltas at entry 0: +1 and -1 (tie -> +), entry 1: +1 and -3 (-)
    s1, s2 = t32([2.0, 2.0]), t32([-1.0, -3.0])
    out = merge("ties", base, [s1, s2], [{"weight": 0.5}, {"weight": 1.0}], {"normalize": False})
    assert torch.equal(out, t32([1.0, -3.0]))


def test_ties_divisor_zero_from_cancelling_weights_is_replaced_by_one():
    base = t32([0.0, 0.0])
    s1, s2 = t32([1.0, 2.0]), t32([-1.0, 0.0])  # weights 1, -1 -> e1 = [1, 2], e2 = [1, 0]
    out = merge("ties", base, [s1, s2], [{"weight": 1.0}, {"weight": -1.0}])
    # entry 0: both agree (+), divisor 1 + (-1) = 0 -> 1, mixed 2; entry 1: only e1, divisor 1
    assert torch.equal(out, t32([2.0, 2.0]))


def test_ties_magnitude_hand_values():
    base = torch.zeros(5)
    d = t32([0.1, -0.5, 0.3, -0.2, 0.05])
    # density 0.4 -> k = int(2.0) = 2 -> keep -0.5 and 0.3
    out = merge("ties", base, [base + d], [{"weight": 1.0, "density": 0.4}])
    assert torch.equal(out, t32([0.0, -0.5, 0.3, 0.0, 0.0]))
    # density 0.5 -> k = int(2.5) = 2 as well; density 0.6 -> k = 3
    out = merge("ties", base, [base + d], [{"weight": 1.0, "density": 0.5}])
    assert torch.equal(out, t32([0.0, -0.5, 0.3, 0.0, 0.0]))
    out = merge("ties", base, [base + d], [{"weight": 1.0, "density": 0.6}])
    assert torch.equal(out, t32([0.0, -0.5, 0.3, -0.2, 0.0]))


@pytest.mark.parametrize("density", [1e-6, 1e-3])
def test_ties_tiny_density_keeps_exactly_one_entry(density):
    base, (src,) = rand_case((7, 7), n_sources=1, seed=21)
    d = src - base
    out = merge("ties", base, [src], [{"weight": 1.0, "density": density}])
    changed = (out - base) != 0
    assert changed.sum().item() == 1
    idx = d.abs().flatten().argmax()
    assert changed.flatten()[idx]
    assert_close64(out, ref_gta(base, [ref_magnitude(d, density)], [1.0], True, True))


def test_ties_magnitude_is_over_the_whole_tensor_not_per_row():
    base = torch.zeros(2, 3)
    d = t32([[10.0, 20.0, 30.0], [0.1, 0.2, 0.3]])
    out = merge("ties", base, [d], [{"weight": 1.0, "density": 0.5}])  # k = 3
    assert torch.equal(out, t32([[10.0, 20.0, 30.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("densities", [(0.5, 0.5, 0.5), (0.3, 0.7, 0.1), (1.0, 0.25, 0.6)])
@pytest.mark.parametrize("normalize", [None, False])
def test_ties_random_matches_reference(densities, normalize):
    base, sources = rand_case((6, 7), n_sources=3, seed=22)
    weights = [0.9, 0.4, 1.3]
    params = [{"weight": w, "density": r} for w, r in zip(weights, densities)]
    options = {} if normalize is None else {"normalize": normalize}
    sparse = [ref_magnitude(s - base, r) for s, r in zip(sources, densities)]
    expected = ref_gta(base, sparse, weights, True, True if normalize is None else normalize)
    assert_close64(merge("ties", base, sources, params, options), expected)


def test_ties_with_rescale_option_applies_l1_rescale():
    base, (src,) = rand_case((4, 5), n_sources=1, seed=23)
    d = src - base
    out = merge("ties", base, [src], [{"weight": 1.0, "density": 0.3}], {"rescale": True})
    expected = base.double() + ref_l1_rescale(d, ref_magnitude(d, 0.3))
    assert_close64(out, expected)


# --------------------------------------------------------------------------------------------
# breadcrumbs (magnitude_outliers)
# --------------------------------------------------------------------------------------------

# |d| = 0.1 .. 1.0, in scrambled positions and with mixed signs
BC_D = [0.5, -0.1, 0.9, -0.4, 1.0, 0.2, -0.7, 0.3, -0.6, 0.8]


@pytest.mark.parametrize(
    "density, gamma, kept_magnitudes",
    [
        # target 5, n_top 1, n_bot 4: keep ascending positions [4, 9) -> 0.5 .. 0.9
        (0.5, 0.1, {0.5, 0.6, 0.7, 0.8, 0.9}),
        # target 9, n_top 2, n_bot = max(0, -1) = 0: keep [0, 9) -> drop only 1.0
        (0.9, 0.2, {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}),
        # target 3, n_top 3, n_bot 4: keep [4, 7) -> 0.5, 0.6, 0.7
        (0.3, 0.3, {0.5, 0.6, 0.7}),
        # default gamma 0.01: n_top = int(0.1) = 0 -> the 5 largest
        (0.5, None, {0.6, 0.7, 0.8, 0.9, 1.0}),
    ],
)
def test_breadcrumbs_hand_values(density, gamma, kept_magnitudes):
    base = torch.zeros(10)
    d = t32(BC_D)
    p = {"weight": 1.0, "density": density}
    if gamma is not None:
        p["gamma"] = gamma
    out = merge("breadcrumbs", base, [d], [p])
    expected = t32([x if round(abs(x), 1) in kept_magnitudes else 0.0 for x in BC_D])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [None, True])
def test_breadcrumbs_random_matches_reference(method, normalize):
    base, sources = rand_case((8, 25), n_sources=3, seed=31)
    weights = [0.7, -0.3, 1.2]
    densities = [0.5, 0.8, 0.3]
    gammas = [0.05, 0.01, 0.2]
    params = [{"weight": w, "density": r, "gamma": g} for w, r, g in zip(weights, densities, gammas)]
    options = {} if normalize is None else {"normalize": normalize}
    sparse = [ref_magnitude_outliers(s - base, r, g) for s, r, g in zip(sources, densities, gammas)]
    expected = ref_gta(base, sparse, weights, GTA[method]["consensus"], bool(normalize))
    assert_close64(merge(method, base, sources, params, options), expected)


def test_breadcrumbs_with_rescale_option_applies_l1_rescale():
    base, (src,) = rand_case((10, 10), n_sources=1, seed=32)
    d = src - base
    p = {"weight": 1.0, "density": 0.4, "gamma": 0.1}
    out = merge("breadcrumbs", base, [src], [p], {"rescale": True})
    expected = base.double() + ref_l1_rescale(d, ref_magnitude_outliers(d, 0.4, 0.1))
    assert_close64(out, expected)


# --------------------------------------------------------------------------------------------
# DARE (random sparsifier)
# --------------------------------------------------------------------------------------------

def test_dare_keep_fraction_without_rescale():
    n = 200_000
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g)
    d = torch.randn(n, generator=g).sign() * (0.5 + torch.rand(n, generator=g))  # |d| >= 0.5
    out = merge("dare_linear", base, [base + d], [{"weight": 1.0, "density": 0.3}], {"rescale": False})
    kept = (out - base).abs() > 0.1
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    # kept entries are the delta itself, dropped entries the base
    assert_close64(out[kept], (base + d)[kept], rtol=1e-6, atol=1e-6)
    assert torch.equal(out[~kept], base[~kept])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_l1_rescale_preserves_l1_norm(method):
    n = 200_000
    g = torch.Generator().manual_seed(6)
    base = torch.zeros(n)
    d = torch.randn(n, generator=g)
    out = merge(method, base, [d], [{"weight": 1.0, "density": 0.3}])  # rescale defaults to on
    masked = out - base
    kept = masked != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    assert math.isclose(masked.double().abs().sum().item(), d.double().abs().sum().item(), rel_tol=1e-5)
    expected = ref_l1_rescale(d, d * kept)  # same mask, reference factor
    assert_close64(masked, expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_inverse_density_rescale(method):
    n = 20_000
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(n)
    d = torch.randn(n, generator=g)
    out = merge(
        method, base, [d], [{"weight": 1.0, "density": 0.3}], {"rescale": True, "rescale_mode": "inverse_density"}
    )
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.02
    assert_close64(out[kept], d[kept].double() / 0.3, rtol=1e-6, atol=0)
    assert (out[~kept] == 0).all()


def _dare_keep_bits(densities, n=30_000):
    """dare_linear without rescale where source i moves every entry by 2**i: (out - base) spells
    the per-source keep bits."""
    base = torch.randn(n, generator=torch.Generator().manual_seed(8)).round()  # integer base: exact sums
    sources = [base + 2.0 ** i for i in range(len(densities))]
    params = [{"weight": 1.0, "density": r} for r in densities]
    out = merge("dare_linear", base, sources, params, {"rescale": False})
    code = (out - base).round().to(torch.int64)
    assert ((out - base) - code).abs().max().item() < 1e-4
    return [((code >> i) & 1).bool() for i in range(len(densities))]


def test_dare_masks_per_source_use_their_own_density():
    densities = [0.2, 0.5, 0.8]
    for b, r in zip(_dare_keep_bits(densities), densities):
        assert abs(b.double().mean().item() - r) < 0.015


@pytest.mark.parametrize("densities", [(0.2, 0.5), (0.5, 0.5)])
def test_dare_masks_are_independent_across_sources(densities):
    """Each entry is kept independently per source: P(both kept) = rho_0 * rho_1
    (masks drawn from one shared uniform per entry would give min(rho_0, rho_1))."""
    bits = _dare_keep_bits(list(densities))
    both = (bits[0] & bits[1]).double().mean().item()
    assert abs(both - densities[0] * densities[1]) < 0.015


def test_dare_ties_multi_source_disjoint_support_rescale_per_source():
    """Source i only moves block i, so each block shows one source's mask and rescale."""
    block, n_src = 20_000, 3
    g = torch.Generator().manual_seed(9)
    base = torch.randn(block * n_src, generator=g)
    weights, densities = [0.5, 1.0, 2.0], [0.2, 0.5, 0.9]
    deltas = []
    for i in range(n_src):
        d = torch.zeros(block * n_src)
        d[i * block:(i + 1) * block] = torch.randn(block, generator=g)
        deltas.append(d)
    params = [{"weight": w, "density": r} for w, r in zip(weights, densities)]
    out = merge("dare_ties", base, [base + d for d in deltas], params)
    mixed = (out.double() - base.double())
    for i, (w, r, d) in enumerate(zip(weights, densities, deltas)):
        sl = slice(i * block, (i + 1) * block)
        kept = mixed[sl].abs() > 1e-9
        assert abs(kept.double().mean().item() - r) < 0.015
        expected = w * ref_l1_rescale(d[sl], d[sl] * kept)
        assert_close64(mixed[sl], expected, rtol=1e-4, atol=1e-5)


def test_dare_ties_consensus_with_density_one_and_rescale_on():
    # density 1 -> no draw, no rescale: this is ties-without-sparsification, unnormalized
    base = t32([0.0, 0.0, 0.0])
    s1, s2 = t32([1.0, 2.0, -1.0]), t32([-3.0, 1.0, -1.0])
    out = merge("dare_ties", base, [s1, s2], [{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}])
    # S = [-2, 3, -2] -> keep [-3], [2 + 1], [-1 + -1]
    assert torch.equal(out, t32([-3.0, 3.0, -2.0]))


# --------------------------------------------------------------------------------------------
# DELLA (magprune)
# --------------------------------------------------------------------------------------------

def _quartile_keep_rates(d, kept):
    """Keep rate among each row's bottom and top quartile of |d| (rows of a 2-D tensor)."""
    rows = d.reshape(-1, d.shape[-1]) if d.dim() > 1 else d.reshape(1, -1)
    kept_rows = kept.reshape(rows.shape)
    n = rows.shape[1]
    q = n // 4
    order = rows.abs().argsort(dim=1)
    low = torch.gather(kept_rows, 1, order[:, :q])
    high = torch.gather(kept_rows, 1, order[:, n - q:])
    return low.double().mean().item(), high.double().mean().item()


@pytest.mark.parametrize("rho, eps", [(0.5, 0.2), (0.3, 0.15)])
def test_della_keep_rate_grows_with_magnitude_rowwise(rho, eps):
    rows, cols = 64, 400
    g = torch.Generator().manual_seed(41)
    # row scales span 8 orders of magnitude: a whole-tensor ranking would give the small rows
    # keep rate ~ rho - eps and the big rows ~ rho + eps; a row-wise one gives ~rho in every row
    scales = torch.logspace(-4, 4, rows).reshape(rows, 1)
    d = torch.randn(rows, cols, generator=g) * scales
    base = torch.zeros(rows, cols)
    out = merge("della_linear", base, [d], [{"weight": 1.0, "density": rho, "epsilon": eps}], {"rescale": False})
    kept = out != 0
    assert abs(kept.double().mean().item() - rho) < 0.01
    assert abs(kept[:16].double().mean().item() - rho) < 0.025
    assert abs(kept[-16:].double().mean().item() - rho) < 0.025
    low, high = _quartile_keep_rates(d, kept)
    assert abs(low - (rho - 0.75 * eps)) < 0.025
    assert abs(high - (rho + 0.75 * eps)) < 0.025
    # kept values are untouched when rescale is off
    assert torch.equal(out[kept], d[kept])


def test_della_one_dimensional_tensor_is_one_row():
    n = 40_000
    d = torch.randn(n, generator=torch.Generator().manual_seed(42))
    base = torch.zeros(n)
    rho, eps = 0.4, 0.2
    out = merge("della_linear", base, [d], [{"weight": 1.0, "density": rho, "epsilon": eps}], {"rescale": False})
    assert out.shape == (n,)
    kept = out != 0
    assert abs(kept.double().mean().item() - rho) < 0.01
    low, high = _quartile_keep_rates(d, kept)
    assert abs(low - (rho - 0.75 * eps)) < 0.02
    assert abs(high - (rho + 0.75 * eps)) < 0.02


def test_della_two_column_rows_use_the_extreme_probabilities():
    """With n = 2 per row, rank_norm is 0 or 1: the smaller entry is kept with rho - eps and the
    larger with rho + eps exactly."""
    rows = 20_000
    g = torch.Generator().manual_seed(49)
    d = torch.rand(rows, 2, generator=g) + 0.1
    out = merge("della_linear", torch.zeros(rows, 2), [d], [{"weight": 1.0, "density": 0.5, "epsilon": 0.15}],
                {"rescale": False})
    kept = out != 0
    small_first = d[:, 0] < d[:, 1]
    kept_small = torch.where(small_first, kept[:, 0], kept[:, 1]).double().mean().item()
    kept_large = torch.where(small_first, kept[:, 1], kept[:, 0]).double().mean().item()
    assert abs(kept_small - 0.35) < 0.015
    assert abs(kept_large - 0.65) < 0.015


def test_della_default_epsilon_is_0_15():
    rows, cols = 50, 400
    d = torch.randn(rows, cols, generator=torch.Generator().manual_seed(43))
    out = merge("della_linear", torch.zeros(rows, cols), [d], [{"weight": 1.0, "density": 0.5}], {"rescale": False})
    low, high = _quartile_keep_rates(d, out != 0)
    assert abs(low - (0.5 - 0.75 * 0.15)) < 0.03
    assert abs(high - (0.5 + 0.75 * 0.15)) < 0.03


def test_della_masks_are_independent_across_sources():
    """Two sources with the same magnitude ranking have the same keep probabilities p per entry;
    independent draws keep both with E[p^2] = rho^2 + (2 eps)^2 / 12 = 0.2575 for rho .5, eps .15
    (one shared uniform per entry would give E[p] = 0.5)."""
    n = 40_000
    d1 = torch.rand(n, generator=torch.Generator().manual_seed(48)) + 0.5
    out = merge("della_linear", torch.zeros(n), [d1, 2 * d1], [{"weight": 1.0, "density": 0.5}] * 2, {"rescale": False})
    code = (out / d1).round().to(torch.int64)  # bit 0: source 1 kept, bit 1: source 2 kept
    assert (code >= 0).all() and (code <= 3).all()
    assert abs(((code & 1) == 1).double().mean().item() - 0.5) < 0.015
    assert abs((code == 3).double().mean().item() - 0.2575) < 0.015


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_l1_rescale_given_mask(method):
    rows, cols = 20, 100
    g = torch.Generator().manual_seed(44)
    base = torch.randn(rows, cols, generator=g)
    d = torch.randn(rows, cols, generator=g)
    out = merge(method, base, [base + d], [{"weight": 1.0, "density": 0.4, "epsilon": 0.1}])  # rescale default on
    masked = out.double() - base.double()
    kept = masked.abs() > 1e-6
    assert abs(kept.double().mean().item() - 0.4) < 0.04
    # the l1 rescale uses the whole tensor's norms (not per row)
    assert_close64(masked, ref_l1_rescale(d, d * kept), rtol=1e-4, atol=1e-5)
    assert math.isclose(masked.abs().sum().item(), d.double().abs().sum().item(), rel_tol=1e-5)


def test_della_normalizes_by_weight():
    # della: consensus + normalize default on; single source weight 2 -> (2*masked)/2 = masked
    rows, cols = 10, 50
    d = torch.randn(rows, cols, generator=torch.Generator().manual_seed(45))
    base = torch.zeros(rows, cols)
    out = merge("della", base, [d], [{"weight": 2.0, "density": 0.5}], {"rescale": False})
    kept = out != 0
    assert 0.3 < kept.double().mean().item() < 0.7
    assert torch.equal(out[kept], d[kept])
    # della_linear: no normalize by default -> 2*masked
    out = merge("della_linear", base, [d], [{"weight": 2.0, "density": 0.5}], {"rescale": False})
    kept = out != 0
    assert torch.equal(out[kept], 2 * d[kept])


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_density_one_ignores_epsilon(method):
    base, sources = rand_case((3, 5), n_sources=2, seed=46)
    weights = [0.5, 0.5]
    params = [{"weight": w, "density": 1.0, "epsilon": 0.9} for w in weights]
    spec = GTA[method]
    expected = ref_gta(base, [s - base for s in sources], weights, spec["consensus"], spec["normalize"])
    assert_close64(merge(method, base, sources, params), expected)


@pytest.mark.parametrize("rho, eps", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5), (0.2, 0.2)])
def test_della_epsilon_out_of_range_raises(rho, eps):
    base, (src,) = rand_case((3, 4), n_sources=1, seed=47)
    with pytest.raises(EvomergeError):
        merge("della", base, [src], [{"weight": 1.0, "density": rho, "epsilon": eps}])


# --------------------------------------------------------------------------------------------
# Determinism of the random methods
# --------------------------------------------------------------------------------------------

def _random_inputs():
    g = torch.Generator().manual_seed(51)
    base = torch.randn(16, 32, generator=g)
    sources = [base + torch.randn(16, 32, generator=g) for _ in range(2)]
    params = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.4}]
    return base, sources, params


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_methods_deterministic_per_seed_and_name(method):
    base, sources, params = _random_inputs()
    a = merge_tensor(method, base, sources, params, None, tensor_generator(3, "layers.1.q_proj.weight"))
    b = merge_tensor(method, base, sources, params, None, tensor_generator(3, "layers.1.q_proj.weight"))
    c = merge_tensor(method, base, sources, params, None, tensor_generator(3, "layers.1.k_proj.weight"))
    e = merge_tensor(method, base, sources, params, None, tensor_generator(4, "layers.1.q_proj.weight"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, e)


def test_random_merge_same_across_processes():
    """Same (seed, tensor name) -> same DARE output in a fresh interpreter with another str-hash seed."""
    name = "model.layers.3.mlp.down_proj.weight"
    code = (
        "import torch\n"
        "from evomerge.merge.registry import merge_tensor\n"
        "from evomerge.merge.rng import tensor_generator\n"
        "base = torch.zeros(64)\n"
        "src = torch.arange(1, 65, dtype=torch.float32)\n"
        "out = merge_tensor('dare_linear', base, [src], [{'weight': 1.0, 'density': 0.5}], {'rescale': False},\n"
        f"                   tensor_generator(1234, {name!r}))\n"
        "print(repr(out.tolist()))\n"
    )
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "777"  # a str-hash-based seed would differ from this process
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    here = merge_tensor(
        "dare_linear", torch.zeros(64), [torch.arange(1, 65, dtype=torch.float32)],
        [{"weight": 1.0, "density": 0.5}], {"rescale": False}, tensor_generator(1234, name),
    )
    assert eval(res.stdout.strip()) == here.tolist()
    assert 0 < (here != 0).sum().item() < 64


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_methods_require_generator(method):
    base, sources, params = _random_inputs()
    with pytest.raises(EvomergeError):
        merge_tensor(method, base, sources, params, None, None)


# --------------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "v0, v1, t, expected",
    [
        # orthogonal unit vectors, t=0.5 -> (v0+v1)/sqrt(2)
        ([1.0, 0.0], [0.0, 1.0], 0.5, [INV_SQRT2, INV_SQRT2]),
        # orthogonal, non-unit: sin(pi/4) * v0 + sin(pi/4) * v1 on the unnormalized tensors
        ([2.0, 0.0], [0.0, 3.0], 0.5, [2 * INV_SQRT2, 3 * INV_SQRT2]),
        # orthogonal, t = 1/3: sin(pi/3) * v0 + sin(pi/6) * v1
        ([2.0, 0.0], [0.0, 3.0], 1 / 3, [2 * SQRT3_2, 1.5]),
        # 60 degrees, t = 0.5: (sin(pi/6)/sin(pi/3)) * (v0 + v1) = unit vector at 30 degrees
        ([1.0, 0.0], [0.5, SQRT3_2], 0.5, [SQRT3_2, 0.5]),
        # collinear -> lerp
        ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 0.25, [1.25, 2.5, 3.75]),
        # anti-collinear (dot = -1) -> lerp as well
        ([1.0, -2.0, 3.0], [-1.0, 2.0, -3.0], 0.5, [0.0, 0.0, 0.0]),
        # zero v0: its norm is replaced by 1, dot = 0, theta = pi/2
        ([0.0, 0.0], [3.0, 4.0], 0.5, [3 * INV_SQRT2, 4 * INV_SQRT2]),
    ],
)
def test_slerp_hand_values(v0, v1, t, expected):
    out = merge("slerp", t32(v0), [t32(v1)], [{}], {"t": t})
    assert_close64(out, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("t, which", [(0.0, 0), (1.0, 1)])
def test_slerp_endpoints(t, which):
    v0, (v1,) = rand_case((4, 6), n_sources=1, seed=61)
    out = merge("slerp", v0, [v1], [{}], {"t": t})
    assert_close64(out, (v0, v1)[which], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.77])
def test_slerp_random_matches_reference_and_keeps_shape(t):
    v0, (v1,) = rand_case((4, 6), n_sources=1, seed=62, scale=3.0)
    out = merge("slerp", v0, [v1], [{}], {"t": t})
    assert out.shape == (4, 6)
    assert_close64(out, ref_slerp(v0, v1, t))


def test_slerp_nearly_parallel_uses_lerp():
    v0 = t32([1.0, 2.0, 3.0, 4.0])
    v1 = t32([1.0, 2.0, 3.0, 4.05])  # cos ~ 0.99998 > 0.9995
    out = merge("slerp", v0, [v1], [{}], {"t": 0.3})
    expected = 0.7 * v0.double() + 0.3 * v1.double()
    assert_close64(out, expected)
    assert_close64(out, ref_slerp(v0, v1, 0.3))


# --------------------------------------------------------------------------------------------
# model_stock
# --------------------------------------------------------------------------------------------

def test_model_stock_sixty_degrees_hand_values():
    w0 = t32([1.0, 1.0])
    w1 = t32([2.0, 1.0])                # offset (1, 0)
    w2 = t32([1.5, 1.0 + SQRT3_2])      # offset (0.5, sqrt(3)/2): 60 degrees -> cos 0.5 -> t = 2/3
    out = merge("model_stock", w0, [w1, w2], [{}, {}])
    # t * mean + (1-t) * w0 = 2/3 * (1.75, 1 + sqrt(3)/4) + 1/3 * (1, 1)
    expected = torch.tensor([1.5, 1.0 + SQRT3_2 / 3.0], dtype=torch.float64)  # 1 + sqrt(3)/6 = 1.2886751...
    assert abs(expected[1].item() - 1.2886751) < 1e-7
    assert_close64(out, expected)


def test_model_stock_opposite_offsets_give_base():
    # cos = -1, N = 2 -> 1 + (N-1) cos = 0 -> t = 0
    w0 = t32([1.0, 2.0, 3.0])
    out = merge("model_stock", w0, [w0 + t32([1.0, -1.0, 2.0]), w0 - t32([1.0, -1.0, 2.0])], [{}, {}])
    assert torch.equal(out, w0)


def test_model_stock_orthogonal_offsets_give_base():
    w0 = t32([1.0, 2.0])
    out = merge("model_stock", w0, [t32([2.0, 2.0]), t32([1.0, 5.0])], [{}, {}])  # cos 0 -> t 0
    assert_close64(out, w0.double())


def test_model_stock_identical_offsets_give_mean():
    # cos = 1, N = 3 -> t = 3 / 3 = 1 -> plain mean of the sources
    w0 = t32([0.0, 1.0, -1.0])
    off = t32([0.5, -0.25, 2.0])
    srcs = [w0 + off, w0 + 2 * off, w0 + 3 * off]
    out = merge("model_stock", w0, srcs, [{}, {}, {}])
    assert_close64(out, (w0 + 2 * off).double())


@pytest.mark.parametrize("n_sources", [2, 3, 5])
def test_model_stock_random_matches_reference(n_sources):
    g = torch.Generator().manual_seed(71 + n_sources)
    base = torch.randn(5, 6, generator=g)
    common = torch.randn(5, 6, generator=g)  # correlated offsets -> nonzero cos
    srcs = [base + common + 0.8 * torch.randn(5, 6, generator=g) for _ in range(n_sources)]
    out = merge("model_stock", base, srcs, [{}] * n_sources)
    assert_close64(out, ref_model_stock(base, srcs))


def test_model_stock_filter_wise_hand_values():
    w0 = torch.zeros(2, 2)
    w1 = t32([[1.0, 0.0], [1.0, 1.0]])
    w2 = t32([[0.5, SQRT3_2], [1.0, 1.0]])
    # row 0: 60 degrees -> t = 2/3 -> 2/3 * mean(0.75, sqrt(3)/4); row 1: identical -> t = 1 -> mean
    out = merge("model_stock", w0, [w1, w2], [{}, {}], {"filter_wise": True})
    expected = torch.tensor([[0.5, SQRT3_2 / 3.0], [1.0, 1.0]], dtype=torch.float64)
    assert_close64(out, expected)
    assert_close64(out, ref_model_stock(w0, [w1, w2], filter_wise=True))
    # without filter_wise one t is shared by both rows (and differs from both per-row values)
    flat = merge("model_stock", w0, [w1, w2], [{}, {}])
    assert_close64(flat, ref_model_stock(w0, [w1, w2], filter_wise=False))
    assert not torch.allclose(flat, out)


def test_model_stock_filter_wise_random_and_1d():
    g = torch.Generator().manual_seed(75)
    base = torch.randn(6, 8, generator=g)
    common = torch.randn(6, 8, generator=g)
    srcs = [base + common + torch.randn(6, 8, generator=g) for _ in range(3)]
    out = merge("model_stock", base, srcs, [{}] * 3, {"filter_wise": True})
    assert_close64(out, ref_model_stock(base, srcs, filter_wise=True))
    b1, s1 = base[0], [s[0] for s in srcs]
    out1 = merge("model_stock", b1, s1, [{}] * 3, {"filter_wise": True})
    assert_close64(out1, ref_model_stock(b1, s1, filter_wise=False))


# --------------------------------------------------------------------------------------------
# Cross-method edge cases: all-zero deltas, dtypes, no mutation
# --------------------------------------------------------------------------------------------

BASE_USING = GTA_METHODS + ["slerp", "model_stock"]


def _params_for(method, n):
    if method in ("slerp", "model_stock"):
        return [{} for _ in range(n)]
    if method in SPARSE_METHODS:
        return [{"weight": 0.5 + 0.25 * i, "density": 0.5} for i in range(n)]
    return [{"weight": 0.5 + 0.25 * i} for i in range(n)]


def _options_for(method):
    return {"t": 0.3} if method == "slerp" else None


@pytest.mark.parametrize("method", BASE_USING)
def test_all_zero_deltas_give_base_exactly(method):
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(81))
    n = 1 if method == "slerp" else 2
    sources = [base.clone() for _ in range(n)]
    out = merge(method, base, sources, _params_for(method, n), _options_for(method))
    assert not torch.isnan(out).any()
    if method == "slerp":  # lerp (1-t)*v0 + t*v0 may round in the last bit
        assert_close64(out, base, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(out, base)


def _ref_for(method, base, sources, weights):
    """Reference for a deterministic configuration (density < 1 only for the magnitude ones)."""
    if method == "linear":
        return ref_linear(sources, weights)
    if method == "slerp":
        return ref_slerp(base, sources[0], 0.3)
    if method == "model_stock":
        return ref_model_stock(base, sources)
    spec = GTA[method]
    deltas = [s.double() - base.double() for s in sources]
    if spec["sparsifier"] == "magnitude":
        deltas = [ref_magnitude(d, 0.5) for d in deltas]
    elif spec["sparsifier"] == "outliers":
        deltas = [ref_magnitude_outliers(d, 0.5) for d in deltas]
    return ref_gta(base, deltas, weights, spec["consensus"], spec["normalize"])


def _bf16_case(n_sources, numel=35, seed=82):
    """bf16 base/sources whose deltas have distinct magnitudes within each source (no magnitude
    ties for the sparsifiers) and a shared sign pattern (so model_stock's cos is far from 0).
    All values are multiples of 1/64 below 4 in magnitude: exactly representable in bf16."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-96, 97, (numel,), generator=g).float() / 64
    signs = torch.randint(0, 2, (numel,), generator=g).float() * 2 - 1
    sources = [base + signs * (torch.randperm(numel, generator=g) + 1).float() / 64 for _ in range(n_sources)]
    shape = (5, 7)
    return base.reshape(shape).to(torch.bfloat16), [s.reshape(shape).to(torch.bfloat16) for s in sources]


@pytest.mark.parametrize("method", ["linear"] + BASE_USING)
def test_bf16_inputs_match_reference_on_upcast_values(method):
    n = 1 if method == "slerp" else 2
    base, sources = _bf16_case(n)
    weights = [0.75, 0.5][:n]
    if method in ("slerp", "model_stock"):
        params = [{} for _ in range(n)]
    else:
        # density 0.5 for the deterministic sparsifiers; density 1 keeps DARE/DELLA deterministic
        density = 0.5 if GTA.get(method, {}).get("sparsifier") in ("magnitude", "outliers") else 1.0
        params = [{"weight": w, "density": density} if method in SPARSE_METHODS else {"weight": w} for w in weights]
    out = merge(method, base, sources, params, _options_for(method))
    assert out.dtype == torch.float32
    assert out.shape == base.shape
    expected = _ref_for(method, base.float(), [s.float() for s in sources], weights)
    assert_close64(out, expected)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_bf16_random_methods_equal_upcast_float32_run(method):
    base, sources, params = _random_inputs()
    base16, sources16 = base.to(torch.bfloat16), [s.to(torch.bfloat16) for s in sources]
    out16 = merge_tensor(method, base16, sources16, params, None, tensor_generator(9, "w"))
    out32 = merge_tensor(method, base16.float(), [s.float() for s in sources16], params, None, tensor_generator(9, "w"))
    assert out16.dtype == torch.float32
    assert torch.equal(out16, out32)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp", "model_stock"])
def test_float64_inputs_give_float64(method):
    base, sources = rand_case((3, 4), n_sources=1 if method == "slerp" else 2, seed=83)
    base, sources = base.double(), [s.double() for s in sources]
    params = [{"weight": 1.0} for _ in sources] if method not in ("slerp", "model_stock") else [{} for _ in sources]
    out = merge(method, base, sources, params, _options_for(method))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("method", ["linear"] + BASE_USING)
def test_inputs_are_not_modified(method):
    base, sources = rand_case((4, 5), n_sources=1 if method == "slerp" else 2, seed=84)
    base_copy, sources_copy = base.clone(), [s.clone() for s in sources]
    merge(method, base, sources, _params_for(method, len(sources)), _options_for(method))
    assert torch.equal(base, base_copy)
    assert all(torch.equal(s, c) for s, c in zip(sources, sources_copy))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _call(method, base, sources, params, options=None):
    merge(method, base, sources, params, options)


def test_unknown_method_raises():
    with pytest.raises(EvomergeError, match="no_such_method"):
        _call("no_such_method", torch.zeros(3), [torch.ones(3)], [{"weight": 1.0}])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "breadcrumbs", "slerp", "model_stock"])
def test_missing_base_raises(method):
    n = 1 if method == "slerp" else 2
    with pytest.raises(EvomergeError):
        _call(method, None, [torch.ones(3)] * n, _params_for(method, n), _options_for(method))


@pytest.mark.parametrize("n", [0, 2])
def test_slerp_needs_exactly_one_source(n):
    with pytest.raises(EvomergeError):
        _call("slerp", torch.zeros(3), [torch.ones(3)] * n, [{}] * n, {"t": 0.5})


def test_slerp_missing_t_raises():
    with pytest.raises(EvomergeError):
        _call("slerp", torch.zeros(3), [torch.ones(3)], [{}], {})


def test_model_stock_single_source_raises():
    with pytest.raises(EvomergeError):
        _call("model_stock", torch.zeros(3), [torch.ones(3)], [{}])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp", "model_stock"])
def test_mismatched_shapes_raise(method):
    base = torch.zeros(3, 4)
    sources = [torch.ones(3, 4), torch.ones(4, 3)] if method != "slerp" else [torch.ones(4, 3)]
    with pytest.raises(EvomergeError):
        _call(method, base, sources, _params_for(method, len(sources)), _options_for(method))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_missing_weight_raises(method):
    with pytest.raises(EvomergeError, match="weight"):
        _call(method, torch.zeros(3), [torch.ones(3), torch.ones(3)], [{"weight": 1.0}, {}])


def test_params_length_mismatch_raises():
    with pytest.raises(EvomergeError):
        _call("task_arithmetic", torch.zeros(3), [torch.ones(3), torch.ones(3)], [{"weight": 1.0}])


def test_every_method_has_a_kernel_whatever_was_imported_first():
    """Method declarations are torch-free (evomerge.merge.methods) and name their kernel, which
    loads on first use, also when one operator module was imported before."""
    code = ("import sys\nfrom evomerge.merge.methods import METHODS\nassert 'torch' not in sys.modules\n"
            "import torch, evomerge.merge.ties\nfrom evomerge.merge.registry import merge_tensor\n"
            "from evomerge.merge.registry import kernel\n"
            "print(merge_tensor('linear', None, [torch.ones(2), torch.ones(2)], [{'weight': 1.0}] * 2).tolist(), "
            "all(callable(kernel(name)) for name in METHODS))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[1.0,", "1.0]", "True"]
