"""TIES-merging (Yadav et al., 2023): keep the largest-magnitude fraction of each delta,
elect a sign per element, average the deltas that agree with it.

The largest entries are found by selection (evomerge.merge.trim), equal magnitudes at the
threshold taken in order of position, as a stable sort would."""

from __future__ import annotations

import functools

from evomerge.merge.task_arithmetic import generalized_task_arithmetic
from evomerge.merge.trim import Trim, by_rank


def kept_largest(n: int, params: dict[str, float]) -> Trim | None:
    """Keep the max(1, int(density * numel)) largest |delta| over the whole tensor (mergekit's rule)."""
    density = params["density"]
    if density >= 1:
        return None
    k = 0 if density <= 0 or n == 0 else max(1, int(density * n))
    return Trim(n, n - k, n, largest=True)


magnitude_mask = by_rank(kept_largest)

ties = functools.partial(generalized_task_arithmetic, sparsifier=magnitude_mask, consensus=True)
