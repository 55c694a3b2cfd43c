"""Benchmark model families: a randomly initialised LLaMA base plus perturbed "fine-tunes".

The weights mean nothing; they only have the shapes, dtype and file layout of a real
family, so merge speed and tool agreement can be measured at a realistic size. A variant
is base + noise, with the noise scaled to each tensor's spread (a few percent), so deltas
are small against the weights, as fine-tuning deltas are. Everything is seeded, and a
family already on disk with the same spec is reused (see `ensure_family`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM


FORMAT = 2  # bump when the files written change, so cached families are rebuilt


@dataclass(frozen=True)
class FamilySpec:
    hidden: int = 768
    layers: int = 12
    intermediate: int = 2048
    vocab: int = 32000
    heads: int = 12
    variants: int = 3
    delta_scale: float = 0.05  # std of a variant's delta, relative to the tensor's std
    seed: int = 0
    dtype: str = "bfloat16"

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            max_position_embeddings=2048, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
        )

    def n_params(self) -> int:
        h, i, v, n = self.hidden, self.intermediate, self.vocab, self.layers
        return n * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


@dataclass
class Family:
    base: str
    experts: list[str]
    n_layers: int
    n_params: int


def _save(directory: Path, config: LlamaConfig, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def _perturbed(tensors: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(tensors):
        t = tensors[name].float()
        spread = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 0.02
        noise = torch.randn(t.shape, generator=generator) * (scale * spread)
        out[name] = (t + noise).to(tensors[name].dtype)
    return out


def build_family(root: Path, spec: FamilySpec) -> None:
    """Write root/base and root/variant_{1..n}; deterministic from `spec`."""
    dtype = getattr(torch, spec.dtype)
    config = spec.config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    base = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    del model
    _save(root / "base", config, base)
    for i in range(1, spec.variants + 1):
        _save(root / f"variant_{i}", config, _perturbed(base, spec.delta_scale, spec.seed * 1000 + i))


def ensure_family(root: str | Path, spec: FamilySpec = FamilySpec()) -> Family:
    """The family under `root`, built first unless a complete one with this spec is there."""
    root = Path(root)
    stamp = root / "spec.json"
    wanted = json.dumps({"format": FORMAT, **asdict(spec)}, sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == wanted):
        shutil.rmtree(root, ignore_errors=True)
        build_family(root, spec)
        stamp.write_text(wanted)  # written last: its presence means the family is complete
    experts = [str(root / f"variant_{i}") for i in range(1, spec.variants + 1)]
    return Family(base=str(root / "base"), experts=experts, n_layers=spec.layers, n_params=spec.n_params())
