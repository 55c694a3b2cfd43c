"""The one entry point that runs a merge method on one tensor.

A method is one declaration (`evomerge.merge.methods`: name, parameters, defaults, and its
kernel by name); `merge_tensor` checks the inputs once, fills in defaults and calls the kernel,
imported on first use.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Mapping, Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.merge.rng import TensorRNG

# fn(base, sources, params, options, rng, out) -> merged tensor (written into `out` when given)
MergeFn = Callable[..., torch.Tensor]


@functools.cache
def kernel(name: str) -> MergeFn:
    """The tensor function a method declares (`module:function` in evomerge.merge)."""
    module, function = get_method(name).kernel.split(":")
    return getattr(importlib.import_module(f"evomerge.merge.{module}"), function)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: merges never accumulate in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def chunk_elements(device: torch.device) -> int:
    """Elements per step of slerp's two passes. Fixed, not tuned: slerp sums its norms and dot
    product chunk by chunk, so the chunk size is part of its arithmetic (its bits)."""
    return 1 << 18 if device.type == "cpu" else 1 << 26


def elementwise_chunk(device_type: str) -> int:
    """Elements per step of the elementwise merges, whose results do not depend on it. Each step
    is a handful of torch calls of ~5-10 us each, so small chunks are all call overhead: on this
    project's 2-core EPYC (512 KB L2), idle, a linear merge of three bf16 32000 x 768 tensors
    reaches 0.09 / 0.14 / 0.24 / 0.27 of the copy floor at 2^14 / 2^16 / 2^18 / 2^20 elements
    (task_arithmetic 0.05 / 0.08 / 0.15 / 0.19). On a GPU each step is a kernel launch: larger."""
    return 1 << 20 if device_type == "cpu" else 1 << 26


def resolve_source_params(method: MergeMethod, params: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """Fill per-source defaults; refuse unknown or missing parameters."""
    resolved = []
    for i, given in enumerate(params):
        unknown = set(given) - set(method.source_params)
        if unknown:
            raise EvomergeError(
                f"{method.name}: unknown parameter(s) {sorted(unknown)} for source {i}; "
                f"it takes {sorted(method.source_params) or 'none'}"
            )
        full = {}
        for key, default in method.source_params.items():
            if key in given:
                full[key] = float(given[key])
            elif default is None:
                raise EvomergeError(f"{method.name}: source {i} needs parameter {key!r}")
            else:
                full[key] = default
        resolved.append(full)
    return resolved


def resolve_options(method: MergeMethod, options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    unknown = set(options) - set(method.options)
    if unknown:
        raise EvomergeError(
            f"{method.name}: unknown option(s) {sorted(unknown)}; it takes {sorted(method.options) or 'none'}"
        )
    resolved = {**method.options, **options}
    missing = [k for k, v in resolved.items() if v is None]
    if missing:
        raise EvomergeError(f"{method.name}: option(s) {missing} must be set")
    return resolved


def check_inputs(method: MergeMethod, base: torch.Tensor | None, sources: Sequence[torch.Tensor], n_params: int) -> None:
    if method.needs_base and base is None:
        raise EvomergeError(f"{method.name} needs a base model")
    if len(sources) < method.min_sources or (method.max_sources is not None and len(sources) > method.max_sources):
        wanted = str(method.min_sources) if method.max_sources == method.min_sources else f"at least {method.min_sources}"
        raise EvomergeError(f"{method.name} takes {wanted} source model(s) besides the base, got {len(sources)}")
    if n_params != len(sources):
        raise EvomergeError(f"{method.name}: {len(sources)} sources but {n_params} parameter sets")
    shapes = {tuple(t.shape) for t in [*sources, *([base] if base is not None else [])]}
    if len(shapes) > 1:
        raise EvomergeError(f"{method.name}: tensors of different shapes {sorted(shapes)}")


def merge_tensor(
    method: str,
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    params: Sequence[Mapping[str, float]],
    options: Mapping[str, Any] | None = None,
    generator: TensorRNG | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor. Computes in float32 (float64 for float64 inputs); writes into `out` if given."""
    m = get_method(method)
    check_inputs(m, base, sources, len(params))
    if m.random and generator is None:
        raise EvomergeError(f"{m.name} is random: pass a generator (evomerge.merge.tensor_generator(seed, name))")
    return kernel(m.name)(base, list(sources), resolve_source_params(m, params), resolve_options(m, options), generator, out)
