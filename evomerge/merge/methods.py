"""What each merge method accepts: its name, parameters, defaults and source counts.

Plain data, no torch: reading a recipe or a search space, and so resuming a search up to
its next proposal, needs only this. The tensor functions live in the operator modules and
are looked up by name when a tensor is merged (`evomerge.merge.registry.merge_tensor`).
Defaults follow mergekit 0.1.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    reference: str
    source_params: Mapping[str, float | None]  # per-source parameter -> default (None = required)
    options: Mapping[str, Any] = field(default_factory=dict)  # method-wide option -> default (None = required)
    needs_base: bool = True
    min_sources: int = 1
    max_sources: int | None = None
    random: bool = False


def _task_arithmetic_family(name: str, reference: str, *, sparse: bool, normalize: bool, rescale: bool,
                            extra_params: dict[str, float] | None = None, random: bool = False) -> MergeMethod:
    """merged = base + lambda * combine(w_i * sparsify(source_i - base)); see task_arithmetic.py."""
    source_params: dict[str, float | None] = {"weight": None}
    options: dict[str, Any] = {"normalize": normalize, "lambda": 1.0}
    if sparse:
        source_params["density"] = 1.0
        options.update(rescale=rescale, rescale_mode="l1")
    source_params.update(extra_params or {})
    return MergeMethod(name, reference, source_params, options, random=random)


_TIES, _DARE, _BREADCRUMBS, _DELLA = (f"https://arxiv.org/abs/{n}" for n in ("2306.01708", "2311.03099", "2312.06795",
                                                                             "2406.11617"))
METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", "https://arxiv.org/abs/2203.05482", {"weight": None}, {"normalize": True}, needs_base=False),
    MergeMethod("slerp", "https://en.wikipedia.org/wiki/Slerp", {}, {"t": None}, max_sources=1),
    MergeMethod("model_stock", "https://arxiv.org/abs/2403.19522", {}, {"filter_wise": False}, min_sources=2),
    _task_arithmetic_family("task_arithmetic", "https://arxiv.org/abs/2212.04089", sparse=False, normalize=False,
                            rescale=False),
    _task_arithmetic_family("ties", _TIES, sparse=True, normalize=True, rescale=False),
    _task_arithmetic_family("dare_ties", _DARE, sparse=True, normalize=False, rescale=True, random=True),
    _task_arithmetic_family("dare_linear", _DARE, sparse=True, normalize=False, rescale=True, random=True),
    _task_arithmetic_family("breadcrumbs", _BREADCRUMBS, sparse=True, normalize=False, rescale=False,
                            extra_params={"gamma": 0.01}),
    _task_arithmetic_family("breadcrumbs_ties", _BREADCRUMBS, sparse=True, normalize=False, rescale=False,
                            extra_params={"gamma": 0.01}),
    _task_arithmetic_family("della", _DELLA, sparse=True, normalize=True, rescale=True, extra_params={"epsilon": 0.15},
                            random=True),
    _task_arithmetic_family("della_linear", _DELLA, sparse=True, normalize=False, rescale=True,
                            extra_params={"epsilon": 0.15}, random=True),
)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise EvomergeError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
