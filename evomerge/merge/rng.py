"""Seeded randomness for DARE/DELLA masks, keyed by (recipe seed, tensor name, source).

Each mask draws from a fresh torch generator whose seed is a hash of that key, so a mask
never depends on which tensors were merged before it, on the order of the merge, or on
the process: the same recipe on the same kind of device gives bit-identical weights, and
the model a search trial scored is exactly the model that is exported. (CPU and CUDA
generators are different algorithms: the same recipe on another device type gives masks
of the same distribution, not the same bits.)
"""

from __future__ import annotations

import hashlib

import torch

from evomerge.merge import native


class TensorRNG:
    """Uniform draws for one tensor's masks, deterministic from (seed, tensor name, stream)."""

    def __init__(self, seed: int, tensor_name: str, stream: int = 0):
        self.seed, self.tensor_name = int(seed), tensor_name
        digest = hashlib.sha256(f"{self.seed}:{tensor_name}:{stream}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**63

    def stream(self, index: int) -> "TensorRNG":
        """An independent stream for the same tensor, e.g. one per source model's mask."""
        return TensorRNG(self.seed, self.tensor_name, index)

    def uniform(self, shape: torch.Size, device: torch.device | str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The draws a mask compares with its keep probabilities: uniform in [0, 1), float32 (into
        `out`, contiguous, where given). On a CPU the compiled generator (fused.c) gives torch's
        values for this seed, ~20x faster."""
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=device)
        if native.uniform_draws(self.key, out):
            return out
        generator = torch.Generator(device=out.device)
        generator.manual_seed(self.key)
        return torch.rand(out.shape, generator=generator, dtype=torch.float32, device=out.device, out=out)


def tensor_generator(seed: int, tensor_name: str) -> TensorRNG:
    return TensorRNG(seed, tensor_name)
