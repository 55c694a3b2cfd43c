"""Loading source models: local directories or hub ids, safetensors unless the user opts in
to pickle, remote code only on request, and the compatibility checks a merge needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig

from evomerge.errors import EvomergeError
from evomerge.refs import resolve_path



@dataclass
class Source:
    """One model's weights resident on the merge device, with its config and directory."""

    ref: str
    path: Path
    config: PretrainedConfig
    tensors: dict[str, torch.Tensor]


def load_config(path: Path, ref: str, trust_remote_code: bool) -> PretrainedConfig:
    if not (path / "config.json").is_file():
        raise EvomergeError(f"model {ref!r}: no config.json in {path}")
    raw = json.loads((path / "config.json").read_text())
    if "auto_map" in raw and not trust_remote_code:
        raise EvomergeError(f"model {ref!r} ships its own model code (auto_map in config.json); "
                            "pass --trust-remote-code only if you trust that code")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise EvomergeError(f"model {ref!r}: cannot read its config: {str(exc).splitlines()[0]}") from None


def load_tensors(path: Path, ref: str, device: torch.device, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory, in their stored dtype, on `device`."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(f, device=str(device)))
        return tensors
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if not pickles:
        raise EvomergeError(f"model {ref!r}: no weights (*.safetensors) in {path}")
    if not allow_pickle:
        raise EvomergeError(f"model {ref!r} has only pickle weights ({pickles[0].name}), which can run code when loaded; "
                            "convert it to safetensors or pass --allow-pickle")
    tensors = {}
    for f in pickles:
        tensors.update(torch.load(f, map_location=device, weights_only=True))
    return tensors


def load_source(ref: str, device: torch.device, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Source:
    path = resolve_path(ref, allow_pickle=allow_pickle)
    config = load_config(path, ref, trust_remote_code)
    return Source(ref, path, config, load_tensors(path, ref, device, allow_pickle=allow_pickle))


def check_compatible(sources: list[Source]) -> None:
    """Same architecture, same tensor names and shapes; a vocabulary mismatch gets its own message."""
    first = sources[0]
    for other in sources[1:]:
        if first.config.architectures != other.config.architectures or first.config.model_type != other.config.model_type:
            raise EvomergeError(f"models {first.ref!r} ({first.config.model_type}) and {other.ref!r} "
                                f"({other.config.model_type}) have different architectures; merging needs one architecture")
        missing = sorted(set(first.tensors) ^ set(other.tensors))
        if missing:
            raise EvomergeError(f"models {first.ref!r} and {other.ref!r} have different tensors (e.g. {missing[0]!r}); "
                                "they are not the same architecture and size")
        for name, tensor in first.tensors.items():
            if tensor.shape != other.tensors[name].shape:
                if "embed" in name or "lm_head" in name:
                    raise EvomergeError(
                        f"models {first.ref!r} and {other.ref!r} have different vocabulary sizes "
                        f"({tensor.shape[0]} vs {other.tensors[name].shape[0]} rows in {name}); "
                        "merge only models that share one tokenizer")
                raise EvomergeError(f"models {first.ref!r} and {other.ref!r} differ in shape at {name}: "
                                    f"{tuple(tensor.shape)} vs {tuple(other.tensors[name].shape)}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
