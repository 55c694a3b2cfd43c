"""DARE (Yu et al., 2023): drop each delta entry with probability 1 - density and rescale
the rest; merged linearly (dare_linear) or with TIES's sign election (dare_ties).

Rescaling defaults to mergekit's (restore the delta's L1 norm); `rescale_mode:
inverse_density` gives the paper's 1/density."""

from __future__ import annotations

import functools

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.rng import TensorRNG
from evomerge.merge.scratch import scratch
from evomerge.merge.task_arithmetic import DrawnMask, generalized_task_arithmetic


def random_mask(delta: torch.Tensor, params: dict[str, float], rng: TensorRNG | None) -> DrawnMask | None:
    density = params["density"]
    if density >= 1:
        return None
    if rng is None:
        raise EvomergeError("DARE needs a generator")
    draws = rng.uniform(delta.shape, delta.device, out=scratch("draws", delta.shape, torch.float32, delta.device))
    return DrawnMask(draws, float(max(density, 0.0)))


dare_ties = functools.partial(generalized_task_arithmetic, sparsifier=random_mask, consensus=True)
dare_linear = functools.partial(generalized_task_arithmetic, sparsifier=random_mask, consensus=False)
