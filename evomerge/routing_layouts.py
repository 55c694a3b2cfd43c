"""Which architectures layer routing supports, and where each keeps its branch outputs.

Plain data, no torch: a run config with a route is checked against this table when it is
read, before any model loads or any study is made (`check_routable`); evomerge.routing folds
scales into the parameters named here and checks the layers have exactly this layout.

Why a table and not a guess from module names: folding a route's scale is exact only where
the residual stream reaches each branch through a scale-invariant norm and the branch output
is linear in known parameters up to the residual add. LLaMA's `post_attention_layernorm` is
the MLP's pre-norm, OLMo2's and Gemma's the attention's post-norm: same name, different place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

LINEAR = "linear"  # branch output linear in the parameter: divide it by the running scale
ONE_PLUS = "one_plus"  # Gemma RMSNorm after the branch, output * (1 + weight): (1 + weight) / scale - 1


@dataclass(frozen=True)
class RoutingLayout:
    """Per decoder layer: its children, the attention child that carries `layer_idx` (the KV-cache
    slot), and per branch the module or parameter paths holding its output (the first that exists)."""

    children: frozenset[str]
    attention: str
    branches: tuple[tuple[str, ...], ...]
    fold: str = LINEAR
    optional: frozenset[str] = frozenset()  # children that may be there and change nothing at inference (dropout)


PRE_NORM = RoutingLayout(frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}), "self_attn",
                         (("self_attn.o_proj",), ("mlp.down_proj", "mlp.experts.down_proj")),
                         optional=frozenset({"resid_attn_dropout", "resid_mlp_dropout"}))
SANDWICH = RoutingLayout(frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm",
                                    "mlp", "post_feedforward_layernorm"}), "self_attn",
                         (("post_attention_layernorm",), ("post_feedforward_layernorm",)), fold=ONE_PLUS)

LAYOUTS: dict[str, RoutingLayout] = {
    "llama": PRE_NORM, "mistral": PRE_NORM, "qwen2": PRE_NORM, "qwen3": PRE_NORM, "phi3": PRE_NORM,
    "mixtral": PRE_NORM, "qwen3_moe": PRE_NORM,
    "gemma2": SANDWICH, "gemma3_text": SANDWICH, "gemma3": SANDWICH,
}


def layout_for(config: dict[str, Any], ref: str) -> RoutingLayout:
    """The routing layout of a checkpoint's config.json contents, or a one-line refusal."""
    model_type = config.get("model_type")
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise EvomergeError(f"model {ref!r} ({model_type}): unsupported architecture for layer routing, which folds "
                            f"a route's scales into each layer's branch outputs, known for {', '.join(sorted(LAYOUTS))}; "
                            "use a parameter-space search space for this model")
    text = config.get("text_config") or config
    if text.get("mlp_only_layers") or text.get("decoder_sparse_step", 1) != 1:
        raise EvomergeError(f"model {ref!r} mixes dense and sparse MLP layers by position (mlp_only_layers / "
                            "decoder_sparse_step), which a routed checkpoint's config cannot express")
    return layout


def check_routable(ref: str) -> None:
    """Refuse, from config.json alone, a model that layer routing cannot handle. A hub id (not
    downloaded yet) is checked when its weights load; a missing model is reported where it is loaded."""
    path = Path(ref).expanduser() / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"model {ref!r}: cannot read its config.json: {exc}") from None
    layout_for(config, ref)
