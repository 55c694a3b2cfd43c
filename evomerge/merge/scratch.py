"""Scratch tensors kept from one merged tensor to the next, on the CPU.

A fresh buffer pays a page fault per 4 KB page the first time it is written: here ~0.45 ns a byte
from one thread (the draws of a 32000 x 768 tensor: 1.7 ns an entry into fresh memory, 0.23 into
memory written before), more than the pass that fills it. DARE and DELLA make four such buffers
per tensor (the deltas, the base in float32, the draws, the magnitudes), so they are taken from
here: one buffer per role and thread, grown to the largest tensor merged so far and kept for the
process's life (a search merges the same shapes trial after trial). A view is valid until the next
call for its role on the same thread. On other devices every call is a fresh torch.empty (the
CUDA allocator already caches).
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch

_kept = threading.local()


def scratch(role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialized tensor of `shape` for `role` (its contents: whatever its last user left)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _kept.__dict__.setdefault("buffers", {})
    n = math.prod(shape)
    buffer = buffers.get((role, dtype))
    if buffer is None or buffer.numel() < n:
        buffers[(role, dtype)] = buffer = None  # let the smaller one go before the larger one is made
        buffer = buffers[(role, dtype)] = torch.empty(n, dtype=dtype)
    return buffer[:n].view(tuple(shape))


def release() -> None:
    """Give back this thread's scratch memory (e.g. before a long evaluation on the CPU)."""
    _kept.__dict__.pop("buffers", None)
