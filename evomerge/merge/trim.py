"""Choosing a delta's entries by magnitude rank without sorting the tensor.

TIES keeps the k largest |delta|, breadcrumbs a band of ranks [lo, hi) of the ascending order.
A full argsort costs O(n log n) on every delta of every trial, and torch's default sort is not
stable: which of several equal magnitudes it keeps is an accident of the algorithm (it differs
between the CPU sort and CUDA's, and between tensor sizes). Here the band's bounds are found by
a radix selection over the magnitudes' float bits (one histogram per 16 bits of key, on fewer
and fewer candidates), and equal magnitudes are ordered by position: exactly the mask a stable
argsort gives, in a handful of linear passes.

Keys are the bits of |x| read as integers: for non-negative floats they order as the floats do
(NaN above inf, as torch's sort puts it), so the selection is exact integer work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGIT = 16  # bits per histogram
_SORT_BELOW = 1 << 12  # candidates this few are sorted: cheaper than a 65536-bin histogram (measured)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| flattened, as integers that order as the magnitudes do."""
    return x.abs().reshape(-1).view(_INT_OF[x.element_size()])


class OrderStatistic(NamedTuple):
    value: torch.Tensor  # the key at the asked rank (0-dim)
    below: int  # how many keys are smaller
    ties: torch.Tensor  # positions of the keys equal to it, ascending: ranks below, below + 1, ...


def order_statistics(keys: torch.Tensor, ranks: list[int]) -> list[OrderStatistic]:
    """The keys of ascending ranks `ranks` (0-based) among non-negative integer `keys` (1-D). A
    histogram of the top 16 bits (shared by the ranks) picks each one's bucket; histograms of the
    next 16 bits narrow the bucket's candidates; the last few are sorted."""
    if keys.numel() <= _SORT_BELOW:
        everything = torch.arange(keys.numel(), device=keys.device)
        return [_sorted_statistic(keys, rank, everything, 0) for rank in ranks]
    shift = keys.element_size() * 8 - _DIGIT
    digits = keys >> shift if shift else keys
    counts = torch.bincount(digits, minlength=1 << _DIGIT)
    reached = counts.cumsum(0)
    found = []
    for rank in ranks:
        digit = int(torch.searchsorted(reached, rank, right=True))
        below = int(reached[digit]) - int(counts[digit])
        found.append(_narrow(keys, rank, (digits == digit).nonzero().squeeze(1), below, shift))
    return found


def _narrow(keys: torch.Tensor, rank: int, positions: torch.Tensor, below: int, shift: int) -> OrderStatistic:
    """Select among the candidates at `positions` (all keys agree above bit `shift`; `below` keys are smaller)."""
    candidates = keys[positions]
    while candidates.numel() > _SORT_BELOW and shift > 0:
        shift -= _DIGIT
        digits = (candidates >> shift) & ((1 << _DIGIT) - 1)
        counts = torch.bincount(digits, minlength=1 << _DIGIT)
        reached = counts.cumsum(0)
        digit = int(torch.searchsorted(reached, rank - below, right=True))
        below += int(reached[digit]) - int(counts[digit])
        positions = positions[digits == digit]
        candidates = keys[positions]
    if shift == 0:  # every bit matched: the candidates are all equal
        return OrderStatistic(candidates[0], below, positions)
    return _sorted_statistic(candidates, rank, positions, below)


def _sorted_statistic(candidates: torch.Tensor, rank: int, positions: torch.Tensor, below: int) -> OrderStatistic:
    ordered, order = torch.sort(candidates, stable=True)
    value = ordered[rank - below]
    first, stop = int(torch.searchsorted(ordered, value)), int(torch.searchsorted(ordered, value, right=True))
    return OrderStatistic(value, below + first, positions[order[first:stop]])  # a stable sort keeps ties in position order


def rank_band(keys: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Bool mask of the entries at positions [lo, hi) of a stable ascending sort of `keys`."""
    n = keys.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return torch.zeros(n, dtype=torch.bool, device=keys.device)
    if lo == 0 and hi == n:
        return torch.ones(n, dtype=torch.bool, device=keys.device)
    first, last = order_statistics(keys, [lo, hi - 1])
    if bool(first.value == last.value):
        mask = torch.zeros(n, dtype=torch.bool, device=keys.device)
        mask[first.ties[lo - first.below: hi - first.below]] = True
        return mask
    mask = (keys > first.value) & (keys < last.value)
    mask[first.ties[lo - first.below:]] = True
    mask[last.ties[: hi - last.below]] = True
    return mask


def largest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest keys, equal keys taken in order of position: the first k of a
    stable descending sort."""
    n = keys.numel()
    k = max(0, min(k, n))
    if k == 0 or k == n:
        return torch.full((n,), k == n, dtype=torch.bool, device=keys.device)
    (threshold,) = order_statistics(keys, [n - k])
    mask = keys > threshold.value
    greater = n - threshold.below - threshold.ties.numel()
    mask[threshold.ties[: k - greater]] = True
    return mask
