"""Linear merge / model soup (Wortsman et al., 2022): a weighted average of the sources.

Accumulates with addcmul into a float32 chunk, as mergekit 0.1.5 does, so results agree
to the bit; runs in one pass in the compiled kernel (merge/native.py) where it applies, else
chunk by chunk (registry.elementwise_chunk) straight into the output tensor."""

from __future__ import annotations

import torch

from evomerge.merge import native
from evomerge.merge.registry import compute_dtype, elementwise_chunk


def linear(base, sources, params, options, rng, out):
    dtype = compute_dtype(*sources)
    first = sources[0]
    if out is None:
        out = torch.empty(first.shape, dtype=dtype, device=first.device)
    stacked = torch.tensor([p["weight"] for p in params], dtype=dtype, device=first.device)
    weights, total = list(stacked), stacked.sum()
    if native.weighted_sum(sources, stacked, out, divisor=total if options["normalize"] else None):
        return out
    numel = first.numel()
    flat_out, flat_sources = out.view(-1), [s.reshape(-1) for s in sources]
    chunk = elementwise_chunk(first.device.type)
    acc = torch.empty(min(chunk, numel), dtype=dtype, device=first.device)
    buf = torch.empty_like(acc)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        acc_c, buf_c = acc[: stop - start].zero_(), buf[: stop - start]
        for source, weight in zip(flat_sources, weights):
            buf_c.copy_(source[start:stop])  # convert once; addcmul on float32 is mergekit's exact kernel
            acc_c.addcmul_(buf_c, weight)
        if options["normalize"]:
            acc_c.div_(total)
        flat_out[start:stop] = acc_c
    return out

