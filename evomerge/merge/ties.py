"""TIES-merging (Yadav et al., 2023): keep the largest-magnitude fraction of each delta,
elect a sign per element, average the deltas that agree with it."""

from __future__ import annotations

import functools

import torch

from evomerge.merge.rng import TensorRNG
from evomerge.merge.task_arithmetic import generalized_task_arithmetic


def magnitude_mask(delta: torch.Tensor, params: dict[str, float], rng: TensorRNG | None) -> torch.Tensor | None:
    """Keep the max(1, int(density * numel)) largest |delta| over the whole tensor (mergekit's rule)."""
    density = params["density"]
    if density >= 1:
        return None
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    if density <= 0 or delta.numel() == 0:
        return mask.view_as(delta)
    k = max(1, int(density * delta.numel()))
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    return mask.view_as(delta)


ties = functools.partial(generalized_task_arithmetic, sparsifier=magnitude_mask, consensus=True)
