"""A candidate as every backend hands it to the evaluator, and the lm-eval plumbing both backends
share (their progress bars and logs kept out of the user's terminal)."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from evomerge.recipe import Recipe

_NOISY_LOGGERS = ("lm-eval", "lm_eval", "datasets", "evaluate", "absl")


@dataclass
class Candidate:
    """One materialized candidate, valid until its backend's next `materialize`."""

    costs: dict[str, float]  # param_count, path_length (candidate_costs)
    model: PreTrainedModel | None = None  # the HF module, where the backend has one
    make_lm: Callable[[], Any] = field(default=lambda: None, repr=False)
    chat_template: str | dict | None = None  # the template it is exported with (evomerge.export.chat_template)

    @cached_property
    def lm(self) -> Any:
        """An lm_eval.api.model.LM that scores this candidate (built on first use)."""
        return self.make_lm()


class Backend(Protocol):
    device: torch.device
    n_layers: int

    def materialize(self, recipe: Recipe) -> Candidate: ...


class NoProgressBars:
    """Put first among the bases of an lm-eval model class: its request methods run without their
    per-call progress bars (lm-eval passes `disable=` explicitly, so they cannot be silenced from
    outside); one line per trial is evomerge's own output. The class also says how a fitness spec
    formats prompts for it (`score_with`)."""

    def score_with(self, chat_template: str | None, max_length: int | None) -> None:
        """The chat template prompts are formatted with (lm-eval's `apply_chat_template` path) and the
        longest prompt plus answer (None: the model's); set before each evaluation."""
        raise NotImplementedError

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=True)


def candidate_costs(model: PreTrainedModel) -> dict[str, float]:
    """Costs to minimize: stored parameters (a layer a route uses twice counts once) and path length
    (decoder layers a token passes through, which inference time grows with)."""
    return {"param_count": float(sum(p.numel() for p in model.parameters())),
            "path_length": float(model.config.num_hidden_layers)}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence lm-eval and datasets while they work: their progress bars and INFO logs would
    flood the terminal once per trial. Errors still surface as exceptions."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
