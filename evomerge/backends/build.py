"""The run's backend, built from its run config (the one place a backend meets a RunConfig)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from evomerge.backends.vllm_options import EngineOptions
from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.backends.candidate import Backend
    from evomerge.config import RunConfig


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
