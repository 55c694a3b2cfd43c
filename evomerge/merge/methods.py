"""Every merge method, one definition each: its name, parameters, defaults, source counts and
the tensor function that computes it, named `module:function` in evomerge.merge.

Plain data, no torch: reading a recipe or a search space needs only this. The kernel is
imported by name when a tensor is first merged (`evomerge.merge.registry.merge_tensor`); a
family of methods shares one module (task_arithmetic.py holds what TIES, DARE, breadcrumbs
and DELLA have in common). Defaults follow mergekit 0.1.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    reference: str
    kernel: str  # "module:function" in evomerge.merge: fn(base, sources, params, options, rng, out)
    source_params: Mapping[str, float | None]  # per-source parameter -> default (None = required)
    options: Mapping[str, Any] = field(default_factory=dict)  # method-wide option -> default (None = required)
    needs_base: bool = True
    min_sources: int = 1
    max_sources: int | None = None
    random: bool = False
    low_rank: bool = False  # reads LoRA factors (evomerge.lora.LowRankTerm) instead of dense source tensors
    keeps_base: bool = False  # gives the base back where every source is the base (a -0.0 aside: it adds +0.0)


def _task_arithmetic_family(name: str, reference: str, kernel: str, *, sparse: bool, normalize: bool, rescale: bool,
                            extra_params: dict[str, float] | None = None, random: bool = False) -> MergeMethod:
    """merged = base + lambda * combine(w_i * sparsify(source_i - base)); see task_arithmetic.py."""
    source_params: dict[str, float | None] = {"weight": None}
    options: dict[str, Any] = {"normalize": normalize, "lambda": 1.0}
    if sparse:
        source_params["density"] = 1.0
        options.update(rescale=rescale, rescale_mode="l1")
    source_params.update(extra_params or {})
    return MergeMethod(name, reference, kernel, source_params, options, random=random, keeps_base=True)


_TIES, _DARE, _BREADCRUMBS, _DELLA = (f"https://arxiv.org/abs/{n}" for n in ("2306.01708", "2311.03099", "2312.06795",
                                                                             "2406.11617"))
METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", "https://arxiv.org/abs/2203.05482", "linear:linear", {"weight": None}, {"normalize": True},
                needs_base=False),
    MergeMethod("lora_linear", "https://arxiv.org/abs/2307.13269", "lora_linear:lora_linear", {"weight": None},
                needs_base=False, low_rank=True, keeps_base=True),
    MergeMethod("slerp", "https://en.wikipedia.org/wiki/Slerp", "slerp:slerp", {}, {"t": None}, max_sources=1),
    MergeMethod("model_stock", "https://arxiv.org/abs/2403.19522", "model_stock:model_stock", {}, {"filter_wise": False},
                min_sources=2),
    _task_arithmetic_family("task_arithmetic", "https://arxiv.org/abs/2212.04089", "task_arithmetic:task_arithmetic",
                            sparse=False, normalize=False, rescale=False),
    _task_arithmetic_family("ties", _TIES, "ties:ties", sparse=True, normalize=True, rescale=False),
    _task_arithmetic_family("dare_ties", _DARE, "dare:dare_ties", sparse=True, normalize=False, rescale=True, random=True),
    _task_arithmetic_family("dare_linear", _DARE, "dare:dare_linear", sparse=True, normalize=False, rescale=True,
                            random=True),
    _task_arithmetic_family("breadcrumbs", _BREADCRUMBS, "breadcrumbs:breadcrumbs", sparse=True, normalize=False,
                            rescale=False, extra_params={"gamma": 0.01}),
    _task_arithmetic_family("breadcrumbs_ties", _BREADCRUMBS, "breadcrumbs:breadcrumbs_ties", sparse=True,
                            normalize=False, rescale=False, extra_params={"gamma": 0.01}),
    _task_arithmetic_family("della", _DELLA, "della:della", sparse=True, normalize=True, rescale=True,
                            extra_params={"epsilon": 0.15}, random=True),
    _task_arithmetic_family("della_linear", _DELLA, "della:della_linear", sparse=True, normalize=False, rescale=True,
                            extra_params={"epsilon": 0.15}, random=True),
)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise EvomergeError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
