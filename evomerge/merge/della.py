"""DELLA (Deep et al., 2024): magnitude-ranked drop probabilities. Within each row, an entry's
keep probability rises linearly with its magnitude rank from density - epsilon to
density + epsilon; kept entries are rescaled (mergekit: restore the L1 norm).

Ranks come from one stable sort of each row's magnitude bits (equal magnitudes ranked by
position): the ramp's value for each rank is scattered to the entry sorted there, where
mergekit's argsort of the argsort sorts twice. On a CPU that sort is
numpy's of (key << 32 | position): the keys are distinct, so any sort gives the stable order, and
numpy's vectorized integer sort is ~4x torch's comparison sort of rows (measured, see row_order).
Where the compiled passes apply (evomerge.merge.native: float32 deltas on the CPU), the mask
needs few ranks at all: a histogram of each row's magnitudes bounds every entry's rank, and
only an entry whose draw falls between the ramp at its bounds gets its exact rank (fused.c,
row_thresholds; rows with many equal magnitudes are radix-sorted). The probabilities are
never stored (task_arithmetic.DrawnMask); the mask is the same."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import native
from evomerge.merge.rng import TensorRNG
from evomerge.merge.scratch import scratch
from evomerge.merge.task_arithmetic import DrawnMask, generalized_task_arithmetic
from evomerge.merge.trim import magnitude_keys


def row_order(keys: torch.Tensor) -> torch.Tensor:
    """Each row's positions in a stable ascending sort of its keys (int64), for non-negative integer keys.

    On a CPU, keys of up to 32 bits are sorted by numpy as (key << 32 | column): unique, so the
    order is the stable one whatever the algorithm, and numpy's SIMD sort of int64 rows takes ~11 ns
    an entry here against ~48 for torch's stable argsort of the keys (EPYC, AVX2, one thread)."""
    if keys.device.type == "cpu" and keys.element_size() <= 4:
        columns = torch.arange(keys.shape[1], dtype=torch.int64)
        tagged = keys.to(torch.int64).bitwise_left_shift_(32).bitwise_or_(columns)
        tagged.numpy().sort(axis=1)  # in place: numpy shares the tensor's memory
        return tagged.bitwise_and_(0xFFFFFFFF)
    return torch.argsort(keys, dim=1, stable=True)


class RankRamp(NamedTuple):
    """DELLA's keep probability: a linear ramp over an entry's magnitude rank in its row, from
    density - epsilon to density + epsilon. A 1-D tensor is one row; a 1-entry row gets density - epsilon."""
    density: float
    epsilon: float

    def rows(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)

    def ramp(self, delta: torch.Tensor) -> torch.Tensor:
        """The probability of each rank, 0 to the row's length - 1, in delta's dtype."""
        cols = self.rows(delta).shape[1]
        ranks = torch.arange(cols, device=delta.device).to(delta.dtype)
        return (self.density - self.epsilon) + ranks / max(cols - 1, 1) * 2 * self.epsilon

    def probabilities(self, delta: torch.Tensor) -> torch.Tensor:
        return keep_probabilities(delta, self.density, self.epsilon)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's RankRamp probability. The ramp is computed once per rank (the same arithmetic on
    each rank as per entry) and scattered to the entries in sorted order: no per-entry rank tensor."""
    spec = RankRamp(density, epsilon)
    rows, ramp = spec.rows(delta), spec.ramp(delta)
    compiled = native.row_ramp(rows, ramp)  # the same order by a radix sort, where it applies
    if compiled is not None:
        return compiled.view_as(delta)
    order = row_order(magnitude_keys(rows).view(rows.shape))
    return torch.empty(rows.shape, dtype=delta.dtype, device=delta.device).scatter_(1, order, ramp.expand_as(order)).view_as(delta)


def magprune_mask(delta: torch.Tensor, params: dict[str, float], rng: TensorRNG | None) -> torch.Tensor | DrawnMask | None:
    density, epsilon = params["density"], params["epsilon"]
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(delta)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise EvomergeError(f"della: density +- epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")
    if rng is None:
        raise EvomergeError("DELLA needs a generator")
    draws = rng.uniform(delta.shape, delta.device, out=scratch("draws", delta.shape, torch.float32, delta.device))
    return DrawnMask(draws, RankRamp(float(density), float(epsilon)))


della = functools.partial(generalized_task_arithmetic, sparsifier=magprune_mask, consensus=True)
della_linear = functools.partial(generalized_task_arithmetic, sparsifier=magprune_mask, consensus=False)
