"""A merge of LoRA adapters written as one PEFT LoRA adapter (`--adapter DIR`), where one adapter
expresses it exactly: every source is an adapter of one base, and the method combines them
linearly, module by module (so per-group weights are fine: factors are per module).

- `task_arithmetic`, and `linear` with normalize (or weights summing to 1): the merge is
  base + sum_i c_i s_i B_i A_i, c_i = lambda w_i (/ sum_j w_j with normalize), which is one LoRA
  of the ranks stacked (PEFT's combination_type "cat"):
      B' = [c_1 B_1 ... c_n B_n],   A' = [s_1 A_1; ...; s_n A_n]
- `lora_linear`: B' = sum_i w_i B_i, A' = sum_i w_i s_i A_i, the very factors its kernel multiplies
  (evomerge.merge.lora_linear.composed_factors), so PEFT's merge of the adapter is evomerge's to the bit.

Every module's scaling is 1 (lora_alpha = r, with rank_pattern/alpha_pattern where ranks differ): the
factors carry the weights and the sources' scalings, stored in float32 (small; rounding them would add
an error the full checkpoint does not have). A tensor that some source replaces whole (modules_to_save)
is saved whole: evomerge's merged tensor there, in the recipe's dtype, as the checkpoint has it.
Everything else is no low-rank update of one base (sign election and sparsification act per element,
slerp and model_stock per tensor norm; a route or a re-indexed vocabulary changes the model's shape)
and is refused in one line, before any model loads. The folder gets a model card of its own
(evomerge.model_card.adapter_card), under PEFT's card metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge import lora
from evomerge.errors import EvomergeError
from evomerge.export import save_tokenizer, write_folder
from evomerge.merge.lora_linear import composed_factors
from evomerge.merge.materialize import merged_tensors, tensor_groups
from evomerge.merge.methods import get_method
from evomerge.merge.registry import compute_dtype, resolve_options, resolve_source_params
from evomerge.model_card import Evidence, adapter_card
from evomerge.models import SourceSet
from evomerge.recipe import Recipe
from evomerge.refs import resolve_path

METHODS = ("lora_linear", "task_arithmetic", "linear")
_REFUSED = "cannot write a PEFT adapter"


def adapter_base(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, Any]:
    """What the adapter's config takes from its sources (the base as they name it, their task type), or a
    one-line refusal when no LoRA adapter of one base expresses the recipe. Reads configs only."""
    if recipe.route is not None:
        raise EvomergeError(f"{_REFUSED}: the recipe routes layers, which changes the model's depth")
    if recipe.method not in METHODS:
        raise EvomergeError(f"{_REFUSED}: {recipe.method} is not a linear combination of the adapters' factors or "
                            f"deltas (only {', '.join(METHODS)} are); write the full checkpoint only")
    if recipe.tokenizer_source is not None:
        raise EvomergeError(f"{_REFUSED}: tokenizer_source re-indexes the embeddings, which an adapter on the base "
                            "cannot express")
    configs = {}
    for source in recipe.models:
        path = resolve_path(source.model, allow_pickle=allow_pickle)
        if not lora.is_adapter(path):
            raise EvomergeError(f"{_REFUSED}: model {source.model!r} is not a LoRA adapter; only a merge of "
                                "adapters of one base is one")
        configs[source.model] = lora.read_config(path, source.model)
    bases = {ref: c["base_model_name_or_path"] for ref, c in configs.items()}
    folders = {resolve_path(b, allow_pickle=allow_pickle).resolve() for b in bases.values()}
    if len(folders) > 1:
        raise EvomergeError(f"{_REFUSED}: the adapters adapt different bases ({bases})")
    base = next(iter(bases.values()))
    if recipe.base_model and get_method(recipe.method).needs_base \
            and resolve_path(recipe.base_model, allow_pickle=allow_pickle).resolve() not in folders:
        raise EvomergeError(f"{_REFUSED}: base_model {recipe.base_model!r} is not the base the adapters adapt "
                            f"({base!r}), so the merge is no update of that base")
    if recipe.method == "linear":
        lists = [len(v) for s in recipe.models for v in s.parameters.values() if isinstance(v, list)]
        lists += [len(v) for v in recipe.parameters.values() if isinstance(v, list)]
        for group in range(min(lists, default=1)):  # unequal lists: the merge refuses them
            coefficients(recipe, group)
    task_types = {c.get("task_type") for c in configs.values()}
    return {"base_model_name_or_path": base, "task_type": task_types.pop() if len(task_types) == 1 else None}


def coefficients(recipe: Recipe, group: int) -> list[float]:
    """c_i of the weighted sum of deltas, sum_i c_i D_i, that task_arithmetic and linear make in `group`."""
    method = get_method(recipe.method)
    weights = [p["weight"] for p in resolve_source_params(method, recipe.source_params(group))]
    options = resolve_options(method, recipe.options(group))
    total = sum(weights)
    if recipe.method == "task_arithmetic":
        divisor = total if options["normalize"] and abs(total) >= 1e-8 else 1.0  # the kernel's rule
        return [options["lambda"] * w / divisor for w in weights]
    if options["normalize"]:
        if total == 0:
            raise EvomergeError(f"{_REFUSED}: linear with normalize divides by the weights' sum, which is 0")
        return [w / total for w in weights]
    if abs(total - 1) > 1e-6:
        raise EvomergeError(f"{_REFUSED}: linear without normalize and weights summing to {total:g} scales the base's "
                            "weights, which no LoRA adapter does (set normalize, or weights summing to 1)")
    return weights


def module_factors(recipe: Recipe, adapters: list[lora.AdapterTensors], name: str, group: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B', A') of the merged adapter at tensor `name` (None: no source adapts it)."""
    present = [i for i, a in enumerate(adapters) if name in a.factors]
    if not present:
        return None
    if recipe.method == "lora_linear":
        params = resolve_source_params(get_method(recipe.method), recipe.source_params(group))
        return composed_factors([(adapters[i].factors[name], params[i]["weight"]) for i in present], dtype)
    c = coefficients(recipe, group)
    factors = [(adapters[i].factors[name], c[i]) for i in present]
    if len({f.fan_in_fan_out for f, _ in factors}) > 1:
        raise EvomergeError(f"{_REFUSED}: the adapters store {name} both transposed and not (fan_in_fan_out)")
    B = torch.cat([f.B.to(dtype) * w for f, w in factors], dim=1)
    A = torch.cat([f.A.to(dtype) * f.scaling for f, _ in factors], dim=0)
    return B, A


@torch.no_grad()
def adapter_tensors(recipe: Recipe, inputs: SourceSet) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str],
                                                                 bool]:
    """The merged adapter's tensors under PEFT's keys, the rank of each adapted module, the modules saved
    whole (modules_to_save), and whether the factors are stored transposed (fan_in_fan_out)."""
    adapters = [inputs.tensors[s.model] for s in recipe.models]
    internal = inputs.weights.internal  # checkpoint name -> the model's parameter name, as PEFT keys it
    groups = tensor_groups(inputs, recipe.layer_granularity)
    whole = {name for name in groups if any(name in a.replaced for a in adapters)}
    tensors, ranks, transposed = {}, {}, False
    for name, group in groups.items():
        factors = None if name in whole else module_factors(recipe, adapters, name, group,
                                                            compute_dtype(adapters[0].base[name]))
        if factors is None:
            continue
        module = internal[name].removesuffix(".weight")
        B, A = factors
        tensors[f"{lora.PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{lora.PREFIX}{module}.lora_B.weight"] = B.contiguous()
        ranks[module] = A.shape[0]
        transposed |= any(a.factors[name].fan_in_fan_out for a in adapters if name in a.factors)
    dtype = getattr(torch, recipe.dtype)
    for name, tensor in merged_tensors(recipe, inputs, only=whole):
        tensors[lora.PREFIX + internal[name]] = tensor.to(dtype).contiguous()
    saved_whole = sorted({internal[name].rsplit(".", 1)[0] for name in whole})
    return tensors, ranks, saved_whole, transposed


def target_modules(adapted: set[str], modules: set[str]) -> list[str]:
    """PEFT's target_modules for exactly the `adapted` modules of a model with these `modules`: PEFT matches
    a name by its end, so a leaf name (q_proj) where every module so named is adapted, else full names."""
    targets = []
    for leaf in sorted({m.rsplit(".", 1)[-1] for m in adapted}):
        named = {m for m in modules if m == leaf or m.endswith("." + leaf)}
        targets += [leaf] if named <= adapted else sorted(named & adapted)
    return targets


def adapter_config(taken: dict[str, Any], ranks: dict[str, int], modules: set[str], saved_whole: list[str],
                   transposed: bool) -> dict[str, Any]:
    """PEFT's adapter_config.json: scaling 1 everywhere (lora_alpha = r; the exceptions by full module name)."""
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != r}
    return {**taken, "peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,
            "target_modules": target_modules(set(ranks), modules), "modules_to_save": saved_whole or None,
            "fan_in_fan_out": transposed, "bias": "none", "use_rslora": False, "use_dora": False,
            "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True}


def write_adapter(inputs: SourceSet, recipe: Recipe, out: str | Path, *, force: bool = False,
                  allow_pickle: bool = False, trust_remote_code: bool = False,
                  evidence: Evidence | None = None) -> Path:
    """The merge of `recipe` over `inputs` as a PEFT LoRA adapter folder (adapter_config.json,
    adapter_model.safetensors, the recipe, the merge's tokenizer, a model card with `evidence` from the
    study in it, for a search's trial), or a one-line refusal."""
    taken = adapter_base(recipe, allow_pickle=allow_pickle)
    tensors, ranks, saved_whole, transposed = adapter_tensors(recipe, inputs)
    modules = {param.rsplit(".", 1)[0] for param in inputs.weights.internal.values()}
    config = adapter_config(taken, ranks, modules, saved_whole, transposed)
    # the adapters' own folders, for their licenses (inputs.paths holds each adapter's base)
    folders = {s.model: resolve_path(s.model, allow_pickle=allow_pickle) for s in recipe.models}
    card = adapter_card(recipe, name=Path(out).name, base=taken["base_model_name_or_path"], config=inputs.config,
                        source_dirs=folders, evidence=evidence)

    def fill(folder: Path) -> None:
        save_file(tensors, folder / lora.WEIGHTS, metadata={"format": "pt"})
        (folder / lora.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        recipe.save(folder / "recipe.yaml")
        save_tokenizer(inputs, recipe, folder, trust_remote_code)
        (folder / "README.md").write_text(card)

    return write_folder(out, force, fill)
