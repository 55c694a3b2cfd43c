"""LoRA adapters (PEFT's folder format) as merge sources: an adapter stands for its base model
plus its low-rank delta, built one tensor at a time when a merge reads it.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` with, per
target module, factors A [r, in] and B [out, r]. The adapted weight is PEFT's own
`merge_and_unload()` arithmetic, in its order, so a float32 merge agrees to the bit:

    W' = W + transpose(B @ A, fan_in_fan_out) * scaling,   scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

with r and alpha per module from `rank_pattern` / `alpha_pattern` (PEFT's pattern rule).
`modules_to_save` stores whole replacement tensors: the adapted model simply has those. Only
additive LoRA is a delta on the base's weights: DoRA rescales columns by a norm, IA3 scales
activations, LoHa/LoKr are other products, aLoRA acts only after its invocation tokens; all
of those are refused.

Resident memory: an adapter keeps only its factors (plus replaced tensors); the base's
tensors are shared by every adapter of it, so a search over N adapters holds one base, not N
dense models. `AdapterTensors[name]` computes W' for that one tensor on demand, so every
merge method (all work per tensor) reads adapters like full checkpoints, and the factor
composition (`lora_linear`) reads the factors themselves (`low_rank_term`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from evomerge.errors import EvomergeError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's wrapper prefix on every saved key
_A, _B = ".lora_A.weight", ".lora_B.weight"
# LoraConfig fields that make an adapter something other than a plain additive B @ A delta
_NON_ADDITIVE = ("use_dora", "use_qalora", "use_bdlora", "lora_bias", "layer_replication", "trainable_token_indices",
                 "target_parameters", "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config",
                 "kasa_config")


def is_adapter(path: Path) -> bool:
    return (path / CONFIG).is_file()


@dataclass(frozen=True)
class Factors:
    """One module's LoRA factors and PEFT's scaling of their product."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float
    fan_in_fan_out: bool

    def delta(self) -> torch.Tensor:
        """PEFT's get_delta_weight, in its order (float32 for half-precision factors, as PEFT on a CPU)."""
        A, B = (f.float() if f.dtype in (torch.float16, torch.bfloat16) else f for f in (self.A, self.B))
        product = B @ A
        return (product.T if self.fan_in_fan_out else product).mul_(self.scaling)  # in place: the same rounding


@dataclass(frozen=True)
class LowRankTerm:
    """What the factor composition reads of one adapter at one tensor: the base tensor and the
    adapter's factors there (None where the adapter leaves the tensor as the base has it)."""

    base: torch.Tensor
    factors: Factors | None

    @property
    def shape(self) -> torch.Size:
        return self.base.shape


class AdapterTensors(Mapping[str, torch.Tensor]):
    """An adapted model's tensors under its base's checkpoint names, each built when read:
    the base's own tensor, a `modules_to_save` replacement, or base + the LoRA delta."""

    def __init__(self, ref: str, base_ref: str, base: Mapping[str, torch.Tensor], factors: dict[str, Factors],
                 replaced: dict[str, torch.Tensor]):
        self.ref, self.base_ref, self.base = ref, base_ref, base
        self.factors, self.replaced = factors, replaced

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name]
        factors = self.factors.get(name)
        if factors is None:
            return self.base[name]
        base, delta = self.base[name], factors.delta()
        if base.dtype == torch.float64:
            return base + delta
        return delta.add_(base)  # in place (one tensor less to hold): delta + W is W + delta bit for bit

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        """A re-indexed vocabulary tensor (tokenizer_source) replaces what the adapter gives there."""
        self.replaced[name] = tensor
        self.factors.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def stand_in(self) -> dict[str, torch.Tensor]:
        """Tensors with the shapes and dtypes of the adapted ones, without building any: for checks."""
        return {**self.base, **self.replaced}

    def renamed(self, names: Mapping[str, str], internal: Mapping[str, str]) -> AdapterTensors:
        """Under other checkpoint names (`names`: new -> own name). Factors and replacements are keyed
        by the model's parameter names, as PEFT saves them; `internal` maps own names to those."""
        by_param = {internal[own]: new for new, own in names.items()}
        for keyed in (self.factors, self.replaced):
            unknown = sorted(set(keyed) - set(by_param))
            if unknown:
                raise EvomergeError(f"adapter {self.ref!r} changes {unknown[0]!r}, which its base "
                                    f"{self.base_ref!r} does not have; the adapter was trained on another model")
        return AdapterTensors(self.ref, self.base_ref, {new: self.base[own] for new, own in names.items()},
                              {by_param[p]: f for p, f in self.factors.items()},
                              {by_param[p]: t for p, t in self.replaced.items()})


def stand_in(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`tensors` itself, or an adapter's stand-in (see AdapterTensors.stand_in)."""
    return tensors.stand_in() if isinstance(tensors, AdapterTensors) else tensors


def held(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The tensor object `tensors` holds at `name`, building nothing: None where an adapter changes it."""
    if isinstance(tensors, AdapterTensors):
        return None if name in tensors.factors or name in tensors.replaced else tensors.base[name]
    return tensors[name]


def low_rank_term(tensors: Mapping[str, torch.Tensor], name: str, ref: str) -> LowRankTerm:
    if not isinstance(tensors, AdapterTensors):
        raise EvomergeError(f"model {ref!r} is not a LoRA adapter; lora_linear composes the factors of "
                            "adapters of one base: use linear or task_arithmetic for full checkpoints")
    if name in tensors.replaced:
        raise EvomergeError(f"adapter {ref!r} replaces {name!r} whole (modules_to_save), which has no "
                            "low-rank factors to compose: use task_arithmetic or linear")
    return LowRankTerm(tensors.base[name], tensors.factors.get(name))


def read_config(path: Path, ref: str) -> dict:
    """The adapter's config, refused in one line unless it is a plain additive LoRA."""
    try:
        config = json.loads((path / CONFIG).read_text())
    except ValueError as exc:
        raise EvomergeError(f"adapter {ref!r}: {path / CONFIG} is not valid JSON ({exc})") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise EvomergeError(f"adapter {ref!r} is a {kind} adapter ({CONFIG}: peft_type); evomerge merges LoRA "
                            "adapters only, whose B @ A delta adds to the base's weights")
    variant = next((key for key in _NON_ADDITIVE if config.get(key)), None)
    if variant is not None:
        raise EvomergeError(f"adapter {ref!r} sets {variant} ({CONFIG}), which is not a plain additive LoRA delta; "
                            "merge it into its base with PEFT (merge_and_unload) and use that checkpoint")
    if config.get("bias", "none") != "none":
        raise EvomergeError(f"adapter {ref!r} trains biases (bias: {config['bias']!r} in {CONFIG}); evomerge reads "
                            "bias: none adapters only")
    if not isinstance(config.get("base_model_name_or_path"), str):
        raise EvomergeError(f"adapter {ref!r}: {CONFIG} names no base_model_name_or_path, the model it adapts")
    return config


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rule (get_pattern_key): the first pattern that matches the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_factors(path: Path, ref: str, config: dict, device: torch.device) -> tuple[dict[str, Factors],
                                                                                   dict[str, torch.Tensor]]:
    """Factors per adapted parameter, and whole replacement tensors (modules_to_save), by parameter name."""
    if not (path / WEIGHTS).is_file():
        raise EvomergeError(f"adapter {ref!r}: no {WEIGHTS} in {path}")
    try:
        stored = load_file(path / WEIGHTS, device=str(device))
        if torch.device(device).type == "cpu":  # out of the file's map, as models.load_tensors does (why: there)
            stored = {k: v.clone() for k, v in stored.items()}
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise EvomergeError(f"adapter {ref!r}: cannot read {WEIGHTS} ({str(exc).strip().splitlines()[0]})") from None
    factors, replaced = {}, {}
    for key, tensor in stored.items():
        name = key.removeprefix(PREFIX)
        if not tensor.is_floating_point():
            raise EvomergeError(f"adapter {ref!r} stores {key} as {tensor.dtype}: use an unquantized adapter")
        if name.endswith(_B):
            continue
        if not name.endswith(_A):
            if ".lora_" in name:
                raise EvomergeError(f"adapter {ref!r}: {key} is not a LoRA factor of a linear layer "
                                    "(lora_A/lora_B.weight); embedding and convolution LoRA are not supported")
            replaced[name] = tensor
            continue
        module = name.removesuffix(_A)
        if PREFIX + module + _B not in stored:
            raise EvomergeError(f"adapter {ref!r}: {key} has no lora_B beside it; the file is incomplete")
        factors[module + ".weight"] = _factors(ref, config, module, tensor, stored[PREFIX + module + _B])
    return factors, replaced


def _factors(ref: str, config: dict, module: str, A: torch.Tensor, B: torch.Tensor) -> Factors:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if A.shape[0] != r or B.shape[1] != r:
        raise EvomergeError(f"adapter {ref!r}: {module} has factors of rank {A.shape[0]}, but {CONFIG} says r={r}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Factors(A, B, scaling, bool(config.get("fan_in_fan_out")))


def load_adapter(ref: str, path: Path, device: torch.device,
                 load_base: Callable[[str], tuple[Path, Mapping[str, torch.Tensor]]]) -> tuple[Path, AdapterTensors]:
    """The adapter's base directory and its adapted tensors; `load_base(ref)` loads (or reuses) the base."""
    config = read_config(path, ref)
    base_ref = config["base_model_name_or_path"]
    try:
        base_path, base = load_base(base_ref)
    except EvomergeError as exc:  # say which adapter named that base, and where
        raise EvomergeError(f"adapter {ref!r} adapts {base_ref!r} (base_model_name_or_path in {CONFIG}): {exc}") from None
    if isinstance(base, AdapterTensors):
        raise EvomergeError(f"adapter {ref!r}: its base {base_ref!r} is an adapter too; merge that one into its "
                            "base first")
    factors, replaced = read_factors(path, ref, config, device)
    return base_path, AdapterTensors(ref, base_ref, base, factors, replaced)
