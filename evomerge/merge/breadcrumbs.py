"""Model Breadcrumbs (Davari & Belilovsky, 2023): drop the largest `gamma` fraction of |delta|
(outliers) and the smallest ones, keeping `density` of the entries.

mergekit 0.1.5's rule, kept exactly: keep sorted positions [n_bot, n_bot + int(density*n))
with n_top = int(gamma*n), n_bot = max(0, n - int(density*n) - n_top). When density + gamma
exceeds 1 the outlier cut shrinks so the density is still met. The band is found by selection
(evomerge.merge.trim), equal magnitudes ordered by position, as a stable sort would."""

from __future__ import annotations

import functools

from evomerge.merge.task_arithmetic import generalized_task_arithmetic
from evomerge.merge.trim import Trim, by_rank


def kept_band(n: int, params: dict[str, float]) -> Trim | None:
    density = params["density"]
    if density >= 1:
        return None
    target = int(max(density, 0.0) * n)
    n_bot = max(0, n - target - int(params["gamma"] * n))
    return Trim(n, n_bot, min(n_bot + target, n), largest=False)


outlier_mask = by_rank(kept_band)

breadcrumbs = functools.partial(generalized_task_arithmetic, sparsifier=outlier_mask, consensus=False)
breadcrumbs_ties = functools.partial(generalized_task_arithmetic, sparsifier=outlier_mask, consensus=True)
