"""Fitness specs: what each candidate is scored on, which objectives the search sees, and
the scalarization that single-objective samplers optimize.

    kind: zoo_skills                 # the evaluator; lm-eval tasks arrive as kind: lm_eval
    n_examples: 200                  # per task, on the search split
    objectives:                      # every objective is recorded on every trial
      - {name: rev, metric: rev}     # direction: maximize (default) or minimize
      - {name: params, metric: param_count, direction: minimize}
    scalarization: {rev: 1.0}        # weighted sum (minimized objectives enter negated)

Metrics are the evaluator's scores, plus costs measured on the candidate itself
(`param_count`; `path_length` comes with layer routing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, PreTrainedModel

from evomerge.errors import EvomergeError
from evomerge.yamlio import check_keys, load_yaml_mapping
from evomerge.zoo import EVAL_SEED, SKILLS, exact_match, make_examples

COST_METRICS = ("param_count", "path_length")
_KEYS = {"kind", "n_examples", "split", "objectives", "scalarization", "description"}


@dataclass(frozen=True)
class Objective:
    name: str
    metric: str
    direction: str = "maximize"


class Evaluator(Protocol):
    metrics: tuple[str, ...]

    def evaluate(self, model: PreTrainedModel) -> dict[str, float]: ...


@dataclass(frozen=True)
class FitnessSpec:
    kind: str
    objectives: tuple[Objective, ...]
    scalarization: dict[str, float]
    n_examples: int = 200
    split: str = "search"

    @classmethod
    def load(cls, path: str | Path) -> "FitnessSpec":
        return cls.from_dict(load_yaml_mapping(path, "fitness spec"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "fitness spec") -> "FitnessSpec":
        check_keys(data, _KEYS, where)
        kind = data.get("kind")
        if kind not in EVALUATORS:
            raise EvomergeError(f"{where}: kind must be one of {sorted(EVALUATORS)}, got {kind!r}")
        entries = data.get("objectives")
        if not isinstance(entries, list) or not entries:
            raise EvomergeError(f"{where}: objectives must be a non-empty list of {{name, metric, direction}}")
        objectives = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) - {"name", "metric", "direction"} or "metric" not in entry:
                raise EvomergeError(f"{where}: objectives[{i}] must be {{name: NAME, metric: METRIC, direction: maximize|minimize}}")
            direction = entry.get("direction", "maximize")
            if direction not in ("maximize", "minimize"):
                raise EvomergeError(f"{where}: objectives[{i}].direction must be maximize or minimize, got {direction!r}")
            objectives.append(Objective(str(entry.get("name", entry["metric"])), str(entry["metric"]), direction))
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise EvomergeError(f"{where}: objective names must be unique, got {names}")
        scalarization = data.get("scalarization") or {names[0]: 1.0}
        if not isinstance(scalarization, dict) or set(scalarization) - set(names) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in scalarization.values()):
            raise EvomergeError(f"{where}: scalarization must map objective names {names} to numbers, got {scalarization!r}")
        n_examples = data.get("n_examples", 200)
        if not isinstance(n_examples, int) or isinstance(n_examples, bool) or n_examples < 1:
            raise EvomergeError(f"{where}: n_examples must be a positive integer, got {n_examples!r}")
        spec = cls(kind, tuple(objectives), {k: float(v) for k, v in scalarization.items()}, n_examples,
                   str(data.get("split", "search")))
        known = set(EVALUATORS[kind].metrics) | set(COST_METRICS)
        for o in objectives:
            if o.metric not in known:
                raise EvomergeError(f"{where}: objective {o.name!r} uses metric {o.metric!r}, which {kind} does not "
                                    f"produce; available: {sorted(known)}")
        return spec

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def objective_values(self, scores: dict[str, float]) -> dict[str, float]:
        return {o.name: float(scores[o.metric]) for o in self.objectives}

    def scalarize(self, values: dict[str, float]) -> float:
        """The weighted sum single-objective samplers maximize (minimized objectives count negatively)."""
        sign = {o.name: 1.0 if o.direction == "maximize" else -1.0 for o in self.objectives}
        return sum(w * sign[name] * values[name] for name, w in self.scalarization.items())


def candidate_costs(model: PreTrainedModel) -> dict[str, float]:
    """Costs to minimize: stored parameters (a layer a route uses twice counts once) and path length
    (decoder layers a token passes through, which inference time grows with)."""
    return {"param_count": float(sum(p.numel() for p in model.parameters())),
            "path_length": float(model.config.num_hidden_layers)}


class ZooSkillsEvaluator:
    """Exact match on the zoo's synthetic skills by one teacher-forced pass per batch: a cheap,
    real fitness for the shipped models while lm-eval tasks are wired in."""

    metrics = (*SKILLS, "mean")

    def __init__(self, spec: FitnessSpec, tokenizer_path: str | Path):
        splits = {"search": EVAL_SEED, "test": EVAL_SEED + 1}
        if spec.split not in splits:
            raise EvomergeError(f"fitness spec: split must be one of {sorted(splits)}, got {spec.split!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.examples = {s: make_examples(s, spec.n_examples, splits[spec.split] + 17 * i)
                         for i, s in enumerate(SKILLS)}

    @torch.inference_mode()
    def evaluate(self, model: PreTrainedModel) -> dict[str, float]:
        scores = {s: exact_match(model, self.tokenizer, ex) for s, ex in self.examples.items()}
        scores["mean"] = sum(scores.values()) / len(scores)
        return scores


EVALUATORS: dict[str, Any] = {"zoo_skills": ZooSkillsEvaluator}


def build_evaluator(spec: FitnessSpec, tokenizer_path: str | Path) -> Evaluator:
    return EVALUATORS[spec.kind](spec, tokenizer_path)
