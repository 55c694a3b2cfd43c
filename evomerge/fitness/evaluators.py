"""What scores a candidate: an `Evaluator`, and which one a fitness spec gets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from evomerge.fitness.spec import FitnessSpec

if TYPE_CHECKING:
    from evomerge.backends.candidate import Candidate


class Evaluator(Protocol):
    def evaluate(self, candidate: Candidate) -> dict[str, float]: ...


def build_evaluator(spec: FitnessSpec, tokenizer_path: str | Path) -> Evaluator:
    """The spec's evaluator; `tokenizer_path` serves the zoo scorer (lm-eval's comes with the candidate)."""
    if spec.kind == "lm_eval":
        from evomerge.fitness.harness import LmEvalEvaluator  # lm-eval

        return LmEvalEvaluator(spec)
    from evomerge.fitness.zoo_skills import ZooSkillsEvaluator  # torch

    return ZooSkillsEvaluator(spec, tokenizer_path)
