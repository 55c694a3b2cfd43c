"""The model card (README.md) written beside every merged checkpoint, so publishing a merge keeps
what made it: the Hub's metadata (base_model = the sources, base_model_relation: merge, tags,
pipeline tag, a license only where every source declares the same one), the method and recipe,
the mergekit config, and for a search's winner (`evomerge export`) how it was found and how it
and its sources scored on the search fitness and on every held-out spec stored for that trial.

A merge of adapters written as one PEFT adapter (`--adapter`) gets a card of its own with the same
evidence, under the metadata PEFT's own save_pretrained writes (library_name: peft, base_model = the
adapters' base, base_model_relation: adapter, lora tags), and how PEFT loads it.

The Hub builds its model tree and search from the front matter; it is written with
huggingface_hub's own ModelCardData, so it reads back with `ModelCard.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import ModelCardData
from huggingface_hub.repocard import metadata_load

from evomerge.merge.methods import get_method
from evomerge.recipe import Recipe

MERGED_ROW = "this merge"


@dataclass
class Evidence:
    """What a study says about one of its trials: how it was found, and scores per (spec, objective)
    of the sources (by model ref) and of the trial itself."""

    study: str
    sampler: str
    seed: int
    trial: int
    n_trials: int  # completed trials in the study
    fitness: str  # the search fitness spec's name
    columns: list[tuple[str, str]] = field(default_factory=list)  # (spec name, objective name)
    sources: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)
    merged: dict[tuple[str, str], float] = field(default_factory=dict)


def pipeline_tag(config: Any) -> str | None:
    """The Hub's task for the architecture: causal LMs generate text; a *ForConditionalGeneration
    with a vision tower (Gemma 3, LLaVA, Qwen2-VL, ...) answers about images."""
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture.endswith("ForCausalLM"):
        return "text-generation"
    if architecture.endswith("ForConditionalGeneration") and getattr(config, "vision_config", None) is not None:
        return "image-text-to-text"
    return None


def shared_license(source_dirs: Mapping[str, Path]) -> str | None:
    """The license every source's own card declares, if they all declare the same one."""
    licenses = set()
    for path in source_dirs.values():
        readme = Path(path) / "README.md"
        metadata = metadata_load(readme) if readme.is_file() else None
        licenses.add((metadata or {}).get("license"))
    return licenses.pop() if len(licenses) == 1 and None not in licenses else None


def card_data(recipe: Recipe, config: Any, source_dirs: Mapping[str, Path], reproduces_in_mergekit: bool) -> ModelCardData:
    tags = ["merge", "evomerge", *(["mergekit"] if reproduces_in_mergekit else [])]
    return ModelCardData(base_model=recipe.refs, library_name="transformers", license=shared_license(source_dirs),
                         pipeline_tag=pipeline_tag(config), tags=tags, base_model_relation="merge")


def adapter_card_data(base: str, config: Any, source_dirs: Mapping[str, Path]) -> ModelCardData:
    """PEFT's own card metadata for a LoRA adapter (library_name peft, the base, the lora and
    base_model:adapter tags), so the Hub files the merge under its base's adapters."""
    tags = ["merge", "evomerge", "lora", "transformers", f"base_model:adapter:{base}"]
    return ModelCardData(base_model=base, library_name="peft", license=shared_license(source_dirs),
                         pipeline_tag=pipeline_tag(config), tags=tags, base_model_relation="adapter")


def model_card(recipe: Recipe, *, name: str, config: Any, source_dirs: Mapping[str, Path], mergekit: str | None,
               no_mergekit: str | None = None, evidence: Evidence | None = None) -> str:
    """README.md text for a merged checkpoint: `config` is its transformers config, `source_dirs` the sources'
    folders (for their licenses), `mergekit` the mergekit YAML written beside it (else `no_mergekit`, why not)."""
    random = recipe.method is not None and get_method(recipe.method).random
    data = card_data(recipe, config, source_dirs, reproduces_in_mergekit=mergekit is not None and not random)
    intro = "This is a merge of pre-trained language models made with evomerge (evolutionary search over merge recipes)."
    return _card(data, name, [_method(recipe, intro), *_recipe(recipe, "evomerge merge recipe.yaml", "model"),
                              "## mergekit", _mergekit(mergekit, no_mergekit, random)], evidence)


def adapter_card(recipe: Recipe, *, name: str, base: str, config: Any, source_dirs: Mapping[str, Path],
                 evidence: Evidence | None = None) -> str:
    """README.md text for the merge written as one PEFT LoRA adapter of `base` (as the adapters name it):
    `config` is the base's transformers config, `source_dirs` the adapters' folders (for their licenses).
    No mergekit section: mergekit's config of the merge builds the full checkpoint, not this adapter."""
    intro = (f"This is a LoRA adapter of `{base}` (PEFT): a merge of LoRA adapters made with evomerge (evolutionary "
             "search over merge recipes).")
    command = f"evomerge merge recipe.yaml --out merged --adapter {name}"
    return _card(adapter_card_data(base, config, source_dirs), name,
                 [_method(recipe, intro), "## Usage", _peft_usage(base, name), *_recipe(recipe, command, "adapter")],
                 evidence)


def _card(data: ModelCardData, name: str, sections: list[str], evidence: Evidence | None) -> str:
    """Front matter, title, the card's own sections, then how a study found it: every card is laid out alike."""
    parts = [f"---\n{data.to_yaml()}\n---", f"# {name}", *sections]
    if evidence is not None:
        parts += ["## Search", _search(evidence)]
    return "\n\n".join(parts) + "\n"


def _recipe(recipe: Recipe, command: str, made: str) -> list[str]:
    return ["## Recipe", f"evomerge's recipe (`{command}` rebuilds this {made}):\n\n```yaml\n{recipe.to_yaml()}```"]


def _peft_usage(base: str, name: str) -> str:
    return ("Load it on its base with PEFT (`model.merge_and_unload()` then folds it into the base's weights):\n\n"
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {name!r})\n```")


def _method(recipe: Recipe, intro: str) -> str:
    lines = [intro]
    if recipe.method is not None:
        method = get_method(recipe.method)
        base = f" on base `{recipe.base_model}`" if recipe.base_model and method.needs_base else ""
        lines.append(f"\nMethod: [{method.name}]({method.reference}){base}, of:\n")
        lines += [f"- `{source.model}`" for source in recipe.models]
    if recipe.route is not None:
        models = list(dict.fromkeys(step.model for step in recipe.route.layers))
        lines.append(f"\nLayer route (data-flow space): {len(recipe.route.layers)} decoder layers taken from "
                     f"{', '.join(f'`{m}`' for m in models)}; embeddings and head from `{recipe.route.embed_from}`.")
    return "\n".join(lines)


def _mergekit(text: str | None, reason: str | None, random: bool) -> str:
    if text is None:
        return f"No mergekit equivalent: {reason}"
    caveat = (" DARE/DELLA masks in mergekit come from its own random stream: its merge matches this one in "
              "distribution, not bit for bit." if random else "")
    return f"The same merge as a mergekit 0.1.x config (`mergekit.yaml`).{caveat}\n\n```yaml\n{text.rstrip()}\n```"


def _search(evidence: Evidence) -> str:
    head = (f"Trial {evidence.trial} of study `{evidence.study}` (sampler {evidence.sampler}, seed {evidence.seed}, "
            f"{evidence.n_trials} completed trials). Scores of the sources and of this merge on the search fitness "
            f"(`{evidence.fitness}`) and on every held-out spec it was scored on (`evomerge evaluate`):")
    header = ["model", *(f"{spec}: {objective}" for spec, objective in evidence.columns)]
    rows = [[f"`{ref}`", *(_cell(values.get(c)) for c in evidence.columns)] for ref, values in evidence.sources.items()]
    rows.append([f"**{MERGED_ROW} (trial {evidence.trial})**", *(_cell(evidence.merged.get(c)) for c in evidence.columns)])
    table = [header, ["---"] * len(header), *rows]
    return head + "\n\n" + "\n".join("| " + " | ".join(row) + " |" for row in table)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"
