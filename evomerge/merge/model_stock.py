"""Model Stock (Jang et al., 2024): interpolate between the base and the average of N >= 2
fine-tunes with t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of their deltas
(over the whole tensor, or per row with `filter_wise`). Where the denominator vanishes
the base is kept, as in mergekit 0.1.5."""

from __future__ import annotations

import itertools

import torch

from evomerge.merge.registry import compute_dtype


def model_stock(base, sources, params, options, rng, out):
    dtype = compute_dtype(base, *sources)
    w0 = base.to(dtype)
    rows = (lambda x: x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)) if options["filter_wise"] \
        else (lambda x: x.reshape(1, -1))
    offsets = [rows(s.to(dtype) - w0) for s in sources]
    cosines = [
        ((a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
        for a, b in itertools.combinations(offsets, 2)
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(sources)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    average = rows(sum(s.to(dtype) for s in sources) / n)
    merged = (t * average + (1 - t) * rows(w0)).view(base.shape)
    return merged if out is None else out.copy_(merged)

