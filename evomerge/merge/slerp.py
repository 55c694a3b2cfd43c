"""Spherical linear interpolation between two models (base at t=0, the other at t=1),
over each whole tensor flattened; nearly collinear tensors fall back to linear
interpolation (mergekit 0.1.5's thresholds: |cos| > 0.9995, norms below 1e-8 treated as 1).

Two streaming passes through a float32 chunk: norms and dot product, then the output."""

from __future__ import annotations

import math

import torch

from evomerge.merge.registry import chunk_elements, compute_dtype


def _chunks(numel: int, device: torch.device):
    step = chunk_elements(device)
    return ((start, min(start + step, numel)) for start in range(0, numel, step))


def slerp(base, sources, params, options, rng, out):
    dtype = compute_dtype(base, *sources)
    t = float(options["t"])
    v0, v1 = base.reshape(-1), sources[0].reshape(-1)
    sq0 = sq1 = dot = torch.zeros((), dtype=torch.float64, device=base.device)
    for start, stop in _chunks(v0.numel(), base.device):
        a, b = v0[start:stop].to(dtype), v1[start:stop].to(dtype)
        sq0, sq1, dot = sq0 + a.square().sum(), sq1 + b.square().sum(), dot + (a * b).sum()
    norm0, norm1 = math.sqrt(float(sq0)), math.sqrt(float(sq1))
    norm0, norm1 = norm0 if norm0 > 1e-8 else 1.0, norm1 if norm1 > 1e-8 else 1.0
    cos = max(-1.0, min(1.0, float(dot) / (norm0 * norm1)))
    if abs(cos) > 0.9995:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(cos)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    if out is None:
        out = torch.empty(base.shape, dtype=dtype, device=base.device)
    flat_out = out.view(-1)
    for start, stop in _chunks(v0.numel(), base.device):
        flat_out[start:stop] = torch.mul(v0[start:stop].to(dtype), c0).add_(v1[start:stop].to(dtype), alpha=c1)
    return out

