"""Where a candidate lives while it is scored: the backend materializes a recipe and hands the
evaluator something lm-eval can score.

- `hf` (default): the candidate is a Hugging Face model whose weights are written in place
  (evomerge.merge.materialize), wrapped in lm-eval's HF model class.
- `vllm`: the merged weights are streamed into a live vLLM engine built once per worker.

A backend is anything with `device`, `n_layers` and `materialize(recipe) -> Candidate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Protocol

from evomerge.backends.vllm_options import EngineOptions
from evomerge.errors import EvomergeError

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


class NoProgressBars:
    """Put first among the bases of an lm-eval model class: its request methods run without their
    per-call progress bars (lm-eval passes `disable=` explicitly, so they cannot be silenced from
    outside); one line per trial is evomerge's own output."""

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=True)


def make_backend(config: RunConfig, refs: list[str], *, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> Backend:
    """The run's backend with its sources loaded (torch, transformers and the engine load here)."""
    if config.backend == "vllm":
        from evomerge.backends.vllm import VllmBackend

        return VllmBackend(refs, dtype=config.dtype, options=engine_options(config, refs[0], trust_remote_code),
                           device=config.device, routes=config.search_space.route is not None, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, tokenizer_source=config.tokenizer_source)
    import torch

    from evomerge.backends.hf import HfBackend
    from evomerge.merge.materialize import Materializer
    from evomerge.models import default_device, memory_line
    from evomerge.refs import resolve_path

    device = torch.device(config.device) if config.device else default_device()
    print(memory_line(refs, device, getattr(torch, config.dtype), allow_pickle=allow_pickle), flush=True)  # or a refusal
    materializer = Materializer(refs, dtype=config.dtype, device=config.device, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, tokenizer_source=config.tokenizer_source)
    if config.search_space.route is not None:
        materializer.router  # a hub model that cannot be routed is refused before a study is made
    return HfBackend(materializer, resolve_path(refs[0], allow_pickle=allow_pickle),
                     batch_size=config.fitness.options.get("batch_size", 32))


def engine_options(config: RunConfig, first: str, trust_remote_code: bool = False) -> EngineOptions:
    """The run's vLLM engine options, its depth (max_path_length) defaulting to the longest route the search
    space can decode (evomerge.search.genome.RouteCodec: the space's max_path_length, else 2 x the depth)."""
    from evomerge.layouts import text_config
    from evomerge.models import load_config
    from evomerge.refs import resolve_path

    options, route = config.engine, config.search_space.route
    if route is None:
        return options
    depth = text_config(load_config(resolve_path(first), first, trust_remote_code)).num_hidden_layers
    longest = route.max_path_length or 2 * depth
    if options.max_path_length is None:
        return replace(options, max_path_length=longest)
    if options.max_path_length < longest:
        raise EvomergeError(f"{config.path}: backend.max_path_length {options.max_path_length} is below the search "
                            f"space's longest route ({longest} layers): raise it, or leave it unset")
    return options
