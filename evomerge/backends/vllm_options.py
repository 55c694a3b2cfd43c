"""The vLLM backend's settings as the run config gives them (`backend: {name: vllm, ...}`), checked
without importing torch or vLLM: a config is read (and a search resumed up to its next proposal)
before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from evomerge.errors import EvomergeError
from evomerge.yamlio import check_keys


def _count(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _positive(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)


@dataclass(frozen=True)
class EngineOptions:
    max_path_length: int | None = None  # engine depth = the longest route; None: the sources' depth
    max_model_len: int | None = None  # prompt + generated tokens; None: the model's own limit
    gpu_memory_utilization: float = 0.9  # GPU share vLLM takes for weights + activations (+ KV cache, unless set below)
    kv_cache_space_gib: float | None = None  # None: 1 GiB on a CPU; on a GPU what gpu_memory_utilization leaves
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None  # None: eager on a CPU (compiling takes minutes there), vLLM's default on a GPU
    max_num_seqs: int | None = None  # sequences per engine step; None: vLLM's default
    batch_size: int | None = None  # requests per lm-eval -> engine call; None: all of a task's at once
    engine_args: dict[str, Any] = field(default_factory=dict)  # anything else, passed to vllm.LLM as is

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "EngineOptions":
        """`where` names the file and key for messages, e.g. "runs/x.yaml: backend"."""
        check_keys(dict(data), {f.name for f in fields(cls)}, where)
        checks = {
            "max_path_length": (_count, "an integer >= 1 or null"),
            "max_model_len": (_count, "an integer >= 1 or null"),
            "tensor_parallel_size": (lambda v: v is not None and _count(v), "an integer >= 1"),
            "max_num_seqs": (_count, "an integer >= 1 or null"),
            "batch_size": (_count, "an integer >= 1 or null"),
            "gpu_memory_utilization": (lambda v: v is not None and _positive(v) and v <= 1, "a number in (0, 1]"),
            "kv_cache_space_gib": (_positive, "a number > 0 or null"),
            "enforce_eager": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
            "engine_args": (lambda v: isinstance(v, dict), "a mapping of vllm.LLM arguments"),
        }
        for key, value in data.items():
            check, expected = checks[key]
            if not check(value):
                raise EvomergeError(f"{where}.{key}: expected {expected}, got {value!r}")
        return cls(**data)
