"""Where a candidate lives while it is scored: the backend materializes a recipe and hands the
evaluator something lm-eval can score.

- `hf` (default): the candidate is a Hugging Face model whose weights are written in place
  (evomerge.merge.materialize), wrapped in lm-eval's HF model class.
- `vllm`: the merged weights are streamed into a live vLLM engine built once per worker.

A backend is anything with `device`, `n_layers` and `materialize(recipe) -> Candidate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from evomerge.config import RunConfig
    from evomerge.recipe import Recipe


@dataclass
class Candidate:
    """One materialized candidate, valid until its backend's next `materialize`."""

    costs: dict[str, float]  # param_count, path_length (see evomerge.fitness.candidate_costs)
    model: PreTrainedModel | None = None  # the HF module, where the backend has one
    make_lm: Callable[[], Any] = field(default=lambda: None, repr=False)

    @cached_property
    def lm(self) -> Any:
        """An lm_eval.api.model.LM that scores this candidate (built on first use)."""
        return self.make_lm()


class Backend(Protocol):
    device: torch.device
    n_layers: int

    def materialize(self, recipe: Recipe) -> Candidate: ...


def make_backend(config: RunConfig, refs: list[str], *, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> Backend:
    """The run's backend with its sources loaded (torch, transformers and the engine load here)."""
    from evomerge.backends.hf import HfBackend
    from evomerge.merge.materialize import Materializer
    from evomerge.refs import resolve_path

    materializer = Materializer(refs, dtype=config.dtype, device=config.device, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, tokenizer_source=config.tokenizer_source)
    if config.search_space.route is not None:
        materializer.router  # a hub model that cannot be routed is refused before a study is made
    return HfBackend(materializer, resolve_path(refs[0], allow_pickle=allow_pickle),
                     batch_size=config.fitness.options.get("batch_size", 32))
