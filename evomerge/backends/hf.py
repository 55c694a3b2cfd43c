"""The Hugging Face backend: one candidate model written in place, scored through lm-eval's HF
model class.

A parameter-space candidate is the same module object every trial, so its lm-eval wrapper is
built once; a routed candidate is a new module object, and gets a new wrapper (lm-eval's HFLM
keeps the model's config and device from when it was built, so it is never re-pointed)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from evomerge.backends.candidate import Candidate, NoProgressBars, candidate_costs
from evomerge.export import chat_template
from evomerge.merge.materialize import Materializer
from evomerge.recipe import Recipe


class HfBackend:
    def __init__(self, materializer: Materializer, tokenizer_path: str | Path, batch_size: int = 32):
        self.materializer, self.batch_size = materializer, batch_size
        self.device, self.n_layers = materializer.device, materializer.n_layers
        self.tokenizer = materializer.tokenizer or AutoTokenizer.from_pretrained(tokenizer_path)  # a union's, or the first's
        self._wrapped: tuple[PreTrainedModel, Any] | None = None

    def materialize(self, recipe: Recipe) -> Candidate:
        model = self.materializer.apply(recipe)
        if model.device.type == "cuda":
            torch.cuda.synchronize()  # the merge's time is the merge's, not the first forward's
        return Candidate(candidate_costs(model), model, make_lm=lambda: self._lm(model),
                         chat_template=chat_template(recipe, self.materializer.inputs.paths,
                                                     self.materializer.trust_remote_code))

    def _lm(self, model: PreTrainedModel) -> Any:
        if self._wrapped is None or self._wrapped[0] is not model:
            self._wrapped = (model, quiet_hflm(model, self.tokenizer, self.batch_size))
        return self._wrapped[1]


def as_candidate(model: PreTrainedModel, tokenizer: Any, batch_size: int = 32) -> Candidate:
    """Any live HF model (a source, a reloaded export) as a candidate to score; `tokenizer` is a
    tokenizer or the checkpoint folder it is read from."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return Candidate(candidate_costs(model), model, make_lm=lambda: quiet_hflm(model, tokenizer, batch_size),
                     chat_template=tokenizer.chat_template)


def quiet_hflm(model: PreTrainedModel, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HF model class around a live model (see `_quiet_hflm_class`)."""
    from evomerge.backends.candidate import quiet

    with quiet():  # it warns that a live model object skips its loading options: intended
        return _quiet_hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))


@functools.cache
def _quiet_hflm_class() -> type:
    """lm-eval's HF model class with its per-call progress bars off (NoProgressBars)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(NoProgressBars, HFLM):
        def score_with(self, chat_template: str | None, max_length: int | None) -> None:
            self.chat_template_args = {"chat_template": chat_template} if chat_template else {}
            self._max_length = max_length

    return QuietHFLM
