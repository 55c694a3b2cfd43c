"""Counter-based randomness for DARE/DELLA masks, keyed by (recipe seed, tensor name).

A hash of each element's index, not a stateful generator: the same recipe gives the same
mask on any device (a trial scored on a GPU exports bit-identical weights on a CPU), in
any tensor order, and in any chunking.
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for h < 2**32, split in 16-bit halves so int64 never overflows."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer: a bijection on 32-bit ints with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


class TensorRNG:
    """Uniform 32-bit integers per element index, deterministic from (seed, tensor name, stream)."""

    def __init__(self, seed: int, tensor_name: str, stream: int = 0):
        self.seed, self.tensor_name = int(seed), tensor_name
        digest = hashlib.sha256(f"{self.seed}:{tensor_name}:{stream}".encode()).digest()
        self.key1 = int.from_bytes(digest[:4], "little")
        self.key2 = int.from_bytes(digest[4:8], "little")

    def stream(self, index: int) -> "TensorRNG":
        """An independent stream for the same tensor, e.g. one per source model's mask."""
        return TensorRNG(self.seed, self.tensor_name, index)

    def bits(self, numel: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
        """int64 tensor of `numel` values in [0, 2**32), for element indices start..start+numel-1."""
        idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
        h = _fmix32((idx & _M32) ^ self.key1)
        return _fmix32(h ^ (idx >> 32) ^ self.key2)

    def keep_mask(self, prob: torch.Tensor | float, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        """Bernoulli(prob) mask of `shape`; `prob` a float or a tensor broadcastable to `shape`."""
        numel = int(torch.Size(shape).numel())
        threshold = torch.as_tensor(prob, dtype=torch.float64, device=device) * 2.0**32
        mask = torch.empty(numel, dtype=torch.bool, device=device)
        flat_threshold = threshold.expand(shape).reshape(-1) if threshold.dim() else threshold
        for start in range(0, numel, _CHUNK):
            stop = min(numel, start + _CHUNK)
            t = flat_threshold[start:stop] if flat_threshold.dim() else flat_threshold
            mask[start:stop] = self.bits(stop - start, device, start) < t
        return mask.view(shape)


def tensor_generator(seed: int, tensor_name: str) -> TensorRNG:
    return TensorRNG(seed, tensor_name)
