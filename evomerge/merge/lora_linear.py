"""LoraHub's factor composition (Huang et al., 2023): one adapter whose factors are the weighted
sums of the sources' factors,

    merged = W + transpose((sum_i w_i B_i) @ (sum_i w_i s_i A_i), fan_in_fan_out)

with s_i each adapter's PEFT scaling (alpha / r). With one scaling s for all it is LoraHub's
s * (sum w_i B_i)(sum w_i A_i), which is not the weighted sum of deltas sum_i w_i s_i B_i A_i
(task_arithmetic over adapters): the cross terms B_i A_j stay. It needs the factors of
adapters of one base with one rank per module (the sums must be defined). For w_i >= 0 it is
PEFT's `add_weighted_adapter(combination_type="linear")` with weights w_i ** 2 (PEFT takes
square roots), merged; for negative weights PEFT puts the sign on A only, and LoraHub on both.
Sources are `evomerge.lora.LowRankTerm`s (the method is declared `low_rank`).
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.lora import Factors
from evomerge.merge.registry import compute_dtype


def lora_linear(base, sources, params, options, rng, out):
    first = sources[0]
    if any(s.base is not first.base for s in sources):
        raise EvomergeError("lora_linear composes adapters of one base; these adapters name different bases")
    terms = [(s.factors, p["weight"]) for s, p in zip(sources, params) if s.factors is not None]
    dtype = compute_dtype(first.base)
    merged = first.base.to(dtype)
    if terms:
        B, A = composed_factors(terms, dtype)
        product = B @ A
        merged = merged + (product.T if terms[0][0].fan_in_fan_out else product)
    if out is None:
        return merged if merged is not first.base else merged.clone()
    return out.copy_(merged)


def composed_factors(terms: list[tuple[Factors, float]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum w_i B_i, sum w_i s_i A_i) of (factors, weight) terms, as the kernel multiplies them; also what a
    PEFT adapter of the composition stores (evomerge.lora_export), so PEFT's merge of it is this one's."""
    layouts = {(tuple(f.A.shape), tuple(f.B.shape), f.fan_in_fan_out) for f, _ in terms}
    if len(layouts) > 1:
        raise EvomergeError(f"lora_linear sums the adapters' factors, so they need one rank layout; this tensor has "
                            f"factors of shapes {sorted(layouts)}: use task_arithmetic (the weighted sum of deltas)")
    # PEFT's order (task_arithmetic in peft.utils.merge_utils): stack the weighted factors, then sum
    A = torch.stack([f.A.to(dtype) * (w * f.scaling) for f, w in terms]).sum(dim=0)
    B = torch.stack([f.B.to(dtype) * w for f, w in terms]).sum(dim=0)
    return B, A
