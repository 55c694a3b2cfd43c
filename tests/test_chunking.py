"""Elementwise merges stream through chunks: a tensor spanning several chunks must merge exactly
as the plain formula says, including at the chunk seams."""

from __future__ import annotations

import torch

from evomerge.merge.registry import chunk_elements, merge_tensor
from evomerge.merge.rng import tensor_generator

N = 3 * chunk_elements(torch.device("cpu")) + 123


def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=g, dtype=torch.float64)
    return base, [base + 0.1 * torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]


def test_task_arithmetic_across_chunks_is_exact():
    base, sources = tensors()
    weights = [0.3, -0.5, 0.9]
    out = merge_tensor("task_arithmetic", base, sources, [{"weight": w} for w in weights], {"lambda": 1.5})
    expected = base + 1.5 * sum(w * (s - base) for w, s in zip(weights, sources))
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_linear_across_chunks_is_exact():
    _, sources = tensors()
    weights = [0.3, 0.5, 0.9]
    out = merge_tensor("linear", None, sources, [{"weight": w} for w in weights])
    assert torch.allclose(out, sum(w * s for w, s in zip(weights, sources)) / sum(weights), rtol=0, atol=1e-12)


def test_sparsified_merge_is_the_same_chunked_or_written_in_place():
    base, sources = tensors()
    params = [{"weight": 0.7, "density": 0.4}] * 3
    whole = merge_tensor("dare_ties", base, sources, params, generator=tensor_generator(1, "w"))
    into = torch.empty(N, dtype=torch.float32)
    merge_tensor("dare_ties", base, sources, params, generator=tensor_generator(1, "w"), out=into)
    assert torch.equal(into, whole.float())
