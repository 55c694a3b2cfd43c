"""DELLA (Deep et al., 2024): magnitude-ranked drop probabilities. Within each row, an entry's
keep probability rises linearly with its magnitude rank from density - epsilon to
density + epsilon; kept entries are rescaled (mergekit: restore the L1 norm).

Ranks come from one stable sort of each row's magnitude bits (equal magnitudes ranked by
position), scattered back: mergekit's argsort of the argsort sorts twice."""

from __future__ import annotations

import functools

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.rng import TensorRNG
from evomerge.merge.task_arithmetic import generalized_task_arithmetic
from evomerge.merge.trim import magnitude_keys


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-row linear ramp over magnitude ranks; a 1-D tensor is one row, a 1-entry row gets density - epsilon."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    order = torch.argsort(magnitude_keys(rows).view(rows.shape), dim=1, stable=True)
    positions = torch.arange(rows.shape[1], device=delta.device, dtype=order.dtype).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(delta.dtype)
    span = max(rows.shape[1] - 1, 1)
    return ((density - epsilon) + ranks / span * 2 * epsilon).view_as(delta)


def magprune_mask(delta: torch.Tensor, params: dict[str, float], rng: TensorRNG | None) -> torch.Tensor | None:
    density, epsilon = params["density"], params["epsilon"]
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(delta)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise EvomergeError(f"della: density +- epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")
    if rng is None:
        raise EvomergeError("DELLA needs a generator")
    return rng.keep_mask(keep_probabilities(delta, density, epsilon), delta.shape, delta.device)


della = functools.partial(generalized_task_arithmetic, sparsifier=magprune_mask, consensus=True)
della_linear = functools.partial(generalized_task_arithmetic, sparsifier=magprune_mask, consensus=False)
