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

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Protocol

import torch

_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGIT = 16  # bits per histogram
_SORT_BELOW = 1 << 12  # candidates this few are sorted: cheaper than a 65536-bin histogram (measured)
_SAMPLE = 1 << 16  # keys sampled to bracket a rank before one streaming pass


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| flattened, as integers that order as the magnitudes do."""
    return x.abs().reshape(-1).view(_INT_OF[x.element_size()])


class OrderStatistic(NamedTuple):
    value: torch.Tensor  # the key at the asked rank (0-dim)
    below: int  # how many keys are smaller
    ties: torch.Tensor  # positions of the keys equal to it, ascending: ranks below, below + 1, ...

    @property
    def count(self) -> int:
        return self.ties.numel()

    def position(self, j: int) -> int:
        """Where the j-th key equal to the statistic is (0-based, in order of position)."""
        return int(self.ties[j])


class StreamedStatistic(NamedTuple):
    """An order statistic of keys read chunk by chunk: as OrderStatistic, but the positions of
    its equal keys are found on demand (`position(j)` rereads one chunk), never all gathered."""

    value: int
    below: int
    count: int
    position: Callable[[int], int]


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


class Band(NamedTuple):
    """The entries of one delta a trim keeps: keys strictly above `above` and strictly below
    `below` (None: unbounded), plus, for each (value, start, stop) in `runs`, the keys equal to
    `value` at positions [start, stop): the equal magnitudes at a bound that a stable sort puts
    inside the band are a run of positions. Comparisons only, so it applies chunk by chunk."""

    above: int | None
    below: int | None
    runs: tuple[tuple[int, int, int], ...] = ()

    def mask(self, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Bool mask of `keys`, the entries at positions [start, start + keys.numel())."""
        keep = keys > self.above if self.above is not None else torch.ones_like(keys, dtype=torch.bool)
        if self.below is not None:
            keep &= keys < self.below
        for value, first, stop in self.runs:
            first, stop = max(first - start, 0), min(stop - start, keys.numel())
            if first < stop:
                keep[first:stop] |= keys[first:stop] == value
        return keep


_NOTHING = Band(0, 0)  # keys are >= 0: none is > 0 and < 0


@dataclass(frozen=True)
class Trim:
    """Which ranks of a delta's n magnitudes a trim keeps: the `hi - lo` largest, equal magnitudes
    taken in order of position (TIES: the first k of a stable descending sort), or with
    `largest=False` the ascending ranks [lo, hi) of a stable ascending sort (breadcrumbs)."""

    n: int
    lo: int
    hi: int
    largest: bool

    def ranks(self) -> list[int]:
        """The ascending order statistics the band's bounds come from."""
        return [self.lo] if self.largest else [self.lo, self.hi - 1]

    def band(self, statistics: list[OrderStatistic]) -> Band:
        if self.largest:  # the first `need` equal magnitudes at the threshold, by position
            (threshold,) = statistics
            value = int(threshold.value)
            need = self.hi - self.lo - (self.n - threshold.below - threshold.count)
            return Band(value, None, ((value, 0, threshold.position(need - 1) + 1),))
        first, last = statistics
        low, high = int(first.value), int(last.value)
        from_ = first.position(self.lo - first.below)  # ascending ranks: the later equal magnitudes at the low end
        upto = last.position(self.hi - 1 - last.below) + 1  # and the earlier ones at the high end
        if low == high:
            return Band(low, low, ((low, from_, upto),))
        return Band(low, high, ((low, from_, self.n), (high, 0, upto)))

    def mask(self, keys: torch.Tensor) -> torch.Tensor:
        """The whole tensor's bool mask."""
        return self.whole_band(keys).mask(keys)

    def fixed_band(self) -> Band | None:
        """The band when it keeps nothing or everything (no statistic needed), else None."""
        if self.lo >= self.hi:
            return _NOTHING
        if self.lo == 0 and self.hi == self.n:
            return Band(None, None)
        return None

    def whole_band(self, keys: torch.Tensor) -> Band:
        fixed = self.fixed_band()
        return fixed if fixed is not None else self.band(order_statistics(keys, self.ranks()))


def rank_band(keys: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Bool mask of the entries at positions [lo, hi) of a stable ascending sort of `keys`."""
    n = keys.numel()
    return Trim(n, max(lo, 0), min(hi, n), largest=False).mask(keys)


def largest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest keys, equal keys taken in order of position: the first k of a
    stable descending sort."""
    n = keys.numel()
    return Trim(n, n - max(0, min(k, n)), n, largest=True).mask(keys)


class KeyReader(Protocol):
    """n keys read in passes, never held whole (one delta's magnitude keys): ChunkedKeys reads them
    through torch chunk by chunk; evomerge.merge.native.DeltaKeys computes them in compiled passes."""

    n: int

    def sample(self, step: int) -> torch.Tensor:
        """The keys at positions 0, step, 2 * step, ..."""

    def bracket_pass(self, brackets: list[tuple[int, int | None]]) -> tuple[list[int], list[int], torch.Tensor | None]:
        """One pass: per (low, high) bracket, the keys below low; for a one-value bracket (low == high) the
        keys equal to it (else 0); and the keys inside the wide brackets (low <= key <= high, None: no
        bound), gathered (None if no bracket is wide)."""

    def nth_equal(self, value: int, j: int) -> int:
        """The position of the j-th (0-based) key equal to `value` (one found by the last pass)."""


class ChunkedKeys:
    """Keys read through `keys_of(start, stop, step)` (which may reuse one buffer), `size` at a time.
    It remembers, per chunk, the count of each one-value bracket and the gathered keys, so that
    `nth_equal` rereads just the chunk holding the wanted key."""

    def __init__(self, n: int, size: int, keys_of: Callable[[int, int, int], torch.Tensor]):
        self.n, self.size, self.keys_of = n, size, keys_of
        self.starts = range(0, n, size)
        self.counts: dict[int, list[int]] = {}  # value -> its count per chunk
        self.gathered: list[torch.Tensor] = []  # per chunk, the keys inside the wide brackets

    def sample(self, step: int) -> torch.Tensor:
        return self.keys_of(0, self.n, step)

    def bracket_pass(self, brackets):
        wide = [low != high for low, high in brackets]
        below, self.gathered = [0] * len(brackets), []
        single = [[] for _ in brackets]  # per one-value bracket, its count per chunk
        for start in self.starts:
            keys = self.keys_of(start, min(start + self.size, self.n), 1)
            inside = None
            for b, (low, high) in enumerate(brackets):
                if low > 0:
                    below[b] += int((keys < low).sum())
                if not wide[b]:
                    single[b].append(int((keys == low).sum()))
                    continue
                window = keys >= low
                if high is not None:
                    window &= keys <= high
                inside = window if inside is None else inside.logical_or_(window)
            if inside is not None:
                self.gathered.append(keys[inside])
        self.counts = {low: counts for (low, _), w, counts in zip(brackets, wide, single) if not w}
        equal = [sum(counts) for counts in single]
        return below, equal, torch.cat(self.gathered) if self.gathered else None

    def nth_equal(self, value: int, j: int) -> int:
        if value not in self.counts:
            self.counts[value] = [int((chunk == value).sum()) for chunk in self.gathered]
        for start, count in zip(self.starts, self.counts[value]):
            if j < count:
                return start + int((self.keys_of(start, min(start + self.size, self.n), 1) == value).nonzero()[j])
            j -= count
        raise IndexError(j)


def streamed_statistics(reader: KeyReader, ranks: list[int]) -> list[StreamedStatistic] | None:
    """The order statistics of n keys that are read in passes (`reader`), never held whole.

    A strided sample of the keys (one strided read, not a pass over every key) brackets each rank
    (4 standard deviations of its binomial count either side). One pass counts the keys below each
    bracket and gathers the values inside it (a bracket of a single value, as a tie-heavy bf16
    delta gives, is only counted), among which the same selection as for a whole tensor gives the
    statistic exactly. None when a bracket missed its rank (the sample misled: rare), for the
    caller to read the keys whole."""
    n = reader.n
    step = max(1, n // _SAMPLE)
    drawn = reader.sample(step).sort().values
    m = drawn.numel()
    brackets = []
    for rank in ranks:
        at, q = rank * m // n, rank / n
        margin = int(4 * math.sqrt(m * q * (1 - q))) + 8
        brackets.append((int(drawn[at - margin]) if at - margin >= 0 else 0,
                         int(drawn[at + margin]) if at + margin < m else None))
    below, equal, pool = reader.bracket_pass(brackets)
    found = []
    for rank, (low, high), count, equals in zip(ranks, brackets, below, equal):
        if low == high:
            if not count <= rank < count + equals:
                return None
            found.append(StreamedStatistic(low, count, equals, functools.partial(reader.nth_equal, low)))
            continue
        skipped = int((pool < low).sum()) if low > 0 else 0  # gathered for another bracket, below this one
        local = rank - count + skipped
        if not 0 <= local < pool.numel():
            return None
        (statistic,) = order_statistics(pool, [local])
        value = int(statistic.value)
        if value < low or (high is not None and value > high):
            return None
        found.append(StreamedStatistic(value, count + statistic.below - skipped, statistic.count,
                                       functools.partial(reader.nth_equal, value)))
    return found


def by_rank(trim_of: Callable[[int, dict[str, float]], Trim | None]) -> Callable:
    """A sparsifier (delta, params, rng) -> bool mask from a rule saying which ranks of n
    magnitudes to keep (None: all). The rule rides along as `.trim_of`, so that a merge can find
    each delta's band chunk by chunk instead of holding the delta whole."""

    def sparsify(delta: torch.Tensor, params: dict[str, float], rng: object) -> torch.Tensor | None:
        trim = trim_of(delta.numel(), params)
        return None if trim is None else trim.mask(magnitude_keys(delta)).view(delta.shape)

    sparsify.trim_of = trim_of
    return sparsify
