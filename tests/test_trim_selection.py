"""Magnitude trimming by selection (TIES, breadcrumbs, DELLA's ranks) against argsort references.

The references below are the sort formulas the operators used before (kept here, not in the
package), with `stable=True`: torch's default CPU sort is not stable, so which of several equal
magnitudes it kept was an accident of the algorithm (a 100k-entry bf16 delta gives a different
order from the stable sort; CUDA's sort orders ties differently again). The operators now take
equal magnitudes in order of position, which is what a stable sort does; the second group of
tests checks that, against the old unstable formula, the masks differ only in which of the
entries equal to the threshold magnitude are kept, never in how many.

Tensors are built to have many equal magnitudes at the threshold: deltas of bf16 weights (what
a merge of bf16 checkpoints sees), deltas that are bf16 themselves, all-equal and all-zero
tensors, and densities that keep one entry, every entry, or nothing. Every test runs with each of
the selection's paths (histograms only, histogram then sort, as shipped).
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import native, trim
from evomerge.merge.breadcrumbs import outlier_mask
from evomerge.merge.della import keep_probabilities
from evomerge.merge.ties import magnitude_mask
from evomerge.merge.trim import largest, magnitude_keys, rank_band


def bf16_delta(shape, seed, scale=0.05, dtype=torch.float32):
    """source - base for bf16 weights, computed in `dtype`: few distinct magnitudes, many ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).bfloat16()
    source = (base.float() + scale * torch.randn(shape, generator=g)).bfloat16()
    return source.to(dtype) - base.to(dtype)


def cases():
    yield "bf16-delta-f32", bf16_delta((64, 96), 0)
    yield "bf16-delta-f32-1d", bf16_delta((5000,), 1)
    yield "bf16-delta-bf16", bf16_delta((48, 40), 2, dtype=torch.bfloat16)
    yield "bf16-delta-f64", bf16_delta((30, 33), 3, dtype=torch.float64)
    yield "coarse", torch.randint(-3, 4, (40, 50)).float()  # 7 values: ties everywhere, zeros included
    yield "all-equal", torch.full((17, 13), -0.25)
    yield "zeros", torch.zeros(200)
    yield "one-entry", torch.tensor([0.5])
    yield "with-inf-nan", torch.tensor([1.0, float("inf"), -2.0, float("nan"), 1.0, -float("inf"), 0.0, -1.0])


CASES = list(cases())


@pytest.fixture(autouse=True, params=[0, 64, trim._SORT_BELOW], ids=["histograms", "mixed", "default"])
def sort_below(request, monkeypatch):
    """Run every test with the selection all by histograms (down to the last 16-bit digit), with a
    histogram then a sort of the remaining candidates, and as shipped (small tensors are sorted)."""
    monkeypatch.setattr(trim, "_SORT_BELOW", request.param)


DENSITIES = [0.0, 1e-9, 0.1, 0.25, 0.5, 0.73, 0.999, 1.0]


# ---------------------------------------------------------------- references (the old sort formulas, stable)


def ref_ties(delta, density, stable=True):
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    if density <= 0:
        return mask.view_as(delta)
    k = max(1, int(density * delta.numel()))
    mask[torch.argsort(delta.abs().reshape(-1), descending=True, stable=stable)[:k]] = 1
    return mask.view_as(delta)


def ref_breadcrumbs(delta, density, gamma, stable=True):
    n = delta.numel()
    target = int(max(density, 0.0) * n)
    n_bot = max(0, n - target - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1), descending=False, stable=stable).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[n_bot:n_bot + target]] = 1
    return mask.view_as(delta)


def ref_della_probabilities(delta, density, epsilon, stable=True):
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=stable), dim=1, stable=stable).to(delta.dtype)
    span = max(rows.shape[1] - 1, 1)
    return ((density - epsilon) + ranks / span * 2 * epsilon).view_as(delta)


def as_mask(mask, delta):
    """A sparsifier's mask (None = keep all) as 0/1 in delta's dtype, for exact comparison."""
    return torch.ones_like(delta) if mask is None else mask.to(delta.dtype)


# ---------------------------------------------------------------- exact agreement with the stable sort


@pytest.mark.parametrize("name,delta", CASES, ids=[c[0] for c in CASES])
def test_ties_mask_is_the_stable_argsort_mask(name, delta):
    for density in DENSITIES:
        ours = as_mask(magnitude_mask(delta, {"density": density}, None), delta)
        expected = torch.ones_like(delta) if density >= 1 else ref_ties(delta, density)
        assert torch.equal(ours, expected), density


@pytest.mark.parametrize("name,delta", CASES, ids=[c[0] for c in CASES])
def test_breadcrumbs_mask_is_the_stable_sort_band(name, delta):
    for density in DENSITIES:
        for gamma in (0.0, 0.05, 0.5):
            ours = as_mask(outlier_mask(delta, {"density": density, "gamma": gamma}, None), delta)
            expected = torch.ones_like(delta) if density >= 1 else ref_breadcrumbs(delta, density, gamma)
            assert torch.equal(ours, expected), (density, gamma)


@pytest.mark.parametrize("compiled", [True, False], ids=["radix", "torch"])
@pytest.mark.parametrize("name,delta", CASES, ids=[c[0] for c in CASES])
def test_della_probabilities_are_the_stable_double_argsort_ranks(name, delta, sort_below, compiled, monkeypatch):
    """By the compiled radix sort (float32 deltas, where it builds; it declines the others) and by
    the torch/numpy path."""
    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler here: the compiled sort is not built")
    else:
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
        takes = native.row_ramp(rows, torch.zeros(rows.shape[1], dtype=delta.dtype)) is not None
        assert takes == (delta.dtype == torch.float32)
    for density, epsilon in [(0.5, 0.1), (0.6, 0.15), (0.3, 0.29)]:
        assert torch.equal(keep_probabilities(delta, density, epsilon), ref_della_probabilities(delta, density, epsilon))


def test_della_probabilities_of_a_large_delta_sorted_on_two_threads(monkeypatch):
    delta = bf16_delta((300, 1024), 11)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(keep_probabilities(delta, 0.5, 0.1), ref_della_probabilities(delta, 0.5, 0.1))
    finally:
        torch.set_num_threads(threads)


def test_rank_band_every_window_of_a_tie_heavy_tensor():
    """Every [lo, hi) of a 7-valued tensor: bands that start, end or lie inside one run of ties."""
    keys = magnitude_keys(torch.randint(-3, 4, (60,)).float())
    order = torch.sort(keys, stable=True).indices
    for lo in range(0, 61, 4):
        for hi in range(lo, 61, 5):
            expected = torch.zeros(60, dtype=torch.bool)
            expected[order[lo:hi]] = True
            assert torch.equal(rank_band(keys, lo, hi), expected), (lo, hi)


def test_largest_every_k_of_a_tie_heavy_tensor():
    keys = magnitude_keys(bf16_delta((300,), 7, scale=0.002))  # a handful of magnitudes
    order = torch.argsort(keys, descending=True, stable=True)
    for k in range(0, 301, 13):
        expected = torch.zeros(300, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(largest(keys, k), expected), k


# ---------------------------------------------------------------- against the old unstable formula


def differ_only_among_ties_at(ours, old, magnitudes, thresholds):
    """ours and old keep the same number of entries, and every entry where they differ has one
    of the threshold magnitudes (the ones a sort had to choose among)."""
    if int(ours.sum()) != int(old.sum()):
        return False
    differing = magnitudes[ours != old]
    return bool(torch.isin(differing, torch.stack(thresholds)).all()) if differing.numel() else True


@pytest.mark.parametrize("density", [0.1, 0.5, 0.73])
def test_ties_against_the_old_unstable_sort_differs_only_at_the_threshold(density):
    delta = bf16_delta((256, 384), 11)
    magnitudes = delta.abs()
    ours = as_mask(magnitude_mask(delta, {"density": density}, None), delta)
    old = ref_ties(delta, density, stable=False)
    k = int(old.sum())
    threshold = torch.sort(magnitudes.reshape(-1), descending=True).values[k - 1]
    assert differ_only_among_ties_at(ours, old, magnitudes, [threshold])


def test_breadcrumbs_against_the_old_unstable_sort_differs_only_at_the_bounds():
    delta = bf16_delta((256, 384), 12)
    density, gamma = 0.8, 0.05
    magnitudes = delta.abs()
    ours = as_mask(outlier_mask(delta, {"density": density, "gamma": gamma}, None), delta)
    old = ref_breadcrumbs(delta, density, gamma, stable=False)
    n = delta.numel()
    target = int(density * n)
    n_bot = n - target - int(gamma * n)
    values = torch.sort(magnitudes.reshape(-1)).values
    assert differ_only_among_ties_at(ours, old, magnitudes, [values[n_bot], values[n_bot + target - 1]])


# ---------------------------------------------------------------- streaming: the band read chunk by chunk


def continuous_delta(n, seed):
    """float32 noise: nearly every magnitude distinct, so the sample's brackets are wide."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.01


STREAM_CASES = [("bf16-delta", bf16_delta((6000,), 7)), ("continuous", continuous_delta(6000, 8)),
                ("coarse", torch.randint(-3, 4, (5000,)).float()), ("zeros", torch.zeros(3000)),
                ("half-zeros", torch.cat([torch.zeros(2500), continuous_delta(2500, 9)]))]


def streamed_band(delta, trim_rule, size, reader="torch"):
    """The band as generalized_task_arithmetic finds it: keys read `size` at a time (or by the compiled
    passes, reader="native", from delta = delta - 0), whole keys on a miss."""
    keys = magnitude_keys(delta)
    n = keys.numel()
    size = size or n
    if reader == "native":
        keys_reader = native.DeltaKeys.of(delta.reshape(-1), torch.zeros(n), torch.float32)
        if keys_reader is None:
            pytest.skip("no compiled kernel here")
    else:
        keys_reader = trim.ChunkedKeys(n, size, lambda start, stop, step: keys[start:stop:step])
    statistics = trim.streamed_statistics(keys_reader, trim_rule.ranks())
    if statistics is None:
        statistics = trim.order_statistics(keys, trim_rule.ranks())
    band = trim_rule.band(statistics)
    return torch.cat([band.mask(keys[s:s + size], s) for s in range(0, n, size)])


@pytest.mark.parametrize("reader,size", [("torch", 97), ("torch", 1 << 20), ("native", None)])
@pytest.mark.parametrize("sample", [64, trim._SAMPLE], ids=["small-sample", "default"])
@pytest.mark.parametrize("name,delta", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_streamed_band_is_the_whole_tensor_band(name, delta, reader, size, sample, monkeypatch):
    """Every TIES and breadcrumbs band found chunk by chunk, or by the compiled passes (the sample
    small enough that brackets miss, so both the exact path and the fallback run; the compiled
    pass's room for gathered keys too small, so it runs again with more) equals the whole
    tensor's mask."""
    monkeypatch.setattr(trim, "_SAMPLE", sample)
    monkeypatch.setattr(native, "POOL_SLACK", 1)
    n = delta.numel()
    rules = [trim.Trim(n, n - k, n, largest=True) for k in (1, n // 3, n // 2, n - 1)]
    rules += [trim.Trim(n, lo, hi, largest=False) for lo, hi in ((0, n // 2), (n // 5, n - n // 5), (n // 2, n // 2 + 1),
                                                                  (n - 10, n), (1, n - 1))]
    keys = magnitude_keys(delta)
    for rule in rules:
        assert torch.equal(streamed_band(delta, rule, size, reader), rule.mask(keys)), (rule, size, reader)


def test_compiled_bands_of_a_large_delta_on_two_threads_with_too_little_room(monkeypatch):
    """Each thread gathers its part of the keys; with room for one key per thread, every wide
    bracket overflows and the pass runs again with the room the counts asked for."""
    if native.library() is None:
        pytest.skip("no C compiler here: the compiled reader is not built")
    monkeypatch.setattr(trim, "_SAMPLE", 256)
    monkeypatch.setattr(native, "POOL_SLACK", 1)
    delta = bf16_delta((200_000,), 12)
    keys, n = magnitude_keys(delta), delta.numel()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rule in (trim.Trim(n, n // 3, n, largest=True), trim.Trim(n, n // 10, n - n // 50, largest=False)):
            assert torch.equal(streamed_band(delta, rule, None, "native"), rule.mask(keys)), rule
    finally:
        torch.set_num_threads(threads)


def test_a_misleading_sample_is_caught_and_the_keys_are_read_whole(monkeypatch):
    """Sampled positions that are all outliers bracket the wrong magnitudes: the pass notices the
    rank fell outside its bracket (None), and the fallback still gives the exact band."""
    monkeypatch.setattr(trim, "_SAMPLE", 64)
    delta = continuous_delta(64 * 50, 10)
    delta[::50] = 100.0  # exactly the sampled positions
    keys, n = magnitude_keys(delta), delta.numel()
    rule = trim.Trim(n, n // 2, n, largest=True)
    assert trim.streamed_statistics(trim.ChunkedKeys(n, 500, lambda start, stop, step: keys[start:stop:step]), rule.ranks()) is None
    assert torch.equal(streamed_band(delta, rule, 500), rule.mask(keys))
