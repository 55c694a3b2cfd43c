"""Spherical linear interpolation between two models (base at t=0, the other at t=1),
over each whole tensor flattened; nearly collinear tensors fall back to linear
interpolation (mergekit 0.1.5's thresholds: |cos| > 0.9995, norms below 1e-8 treated as 1)."""

from __future__ import annotations

import math

import torch

from evomerge.merge.registry import MergeMethod, compute_dtype, register


def slerp(base, sources, params, options, rng, out):
    dtype = compute_dtype(base, *sources)
    t = float(options["t"])
    v0, v1 = base.reshape(-1).to(dtype), sources[0].reshape(-1).to(dtype)
    norm0, norm1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    norm0 = norm0 if norm0 > 1e-8 else torch.ones_like(norm0)
    norm1 = norm1 if norm1 > 1e-8 else torch.ones_like(norm1)
    dot = float(((v0 / norm0) * (v1 / norm1)).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(dot)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    merged = (c0 * v0 + c1 * v1).view(base.shape)
    return merged if out is None else out.copy_(merged)


register(MergeMethod(name="slerp", fn=slerp, reference="https://en.wikipedia.org/wiki/Slerp",
                     source_params={}, options={"t": None}, min_sources=1, max_sources=1))
