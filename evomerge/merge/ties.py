"""TIES-merging (Yadav et al., 2023): keep the largest-magnitude fraction of each delta,
elect a sign per element, average the deltas that agree with it.

The largest entries are found by selection (evomerge.merge.trim), equal magnitudes at the
threshold taken in order of position, as a stable sort would."""

from __future__ import annotations

import functools

import torch

from evomerge.merge.rng import TensorRNG
from evomerge.merge.task_arithmetic import generalized_task_arithmetic
from evomerge.merge.trim import largest, magnitude_keys


def magnitude_mask(delta: torch.Tensor, params: dict[str, float], rng: TensorRNG | None) -> torch.Tensor | None:
    """Keep the max(1, int(density * numel)) largest |delta| over the whole tensor (mergekit's rule)."""
    density = params["density"]
    if density >= 1:
        return None
    if density <= 0 or delta.numel() == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    return largest(magnitude_keys(delta), max(1, int(density * delta.numel()))).view(delta.shape)


ties = functools.partial(generalized_task_arithmetic, sparsifier=magnitude_mask, consensus=True)
