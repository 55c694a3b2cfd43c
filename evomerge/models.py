"""Loading source models: local directories or hub ids, safetensors unless the user opts in
to pickle, remote code only on request, and the compatibility checks a merge needs.

Weight files are chosen as transformers chooses them: the safetensors index when there is
one, else `model.safetensors` (pickle: `pytorch_model.bin[.index.json]`), never every file in
the folder (Mistral ships a `consolidated.safetensors` in another naming beside its HF weights).
A damaged file, a shard the index names but the folder lacks, or a quantized checkpoint is one
line that says which file and what to do.

Sources are resident (a search merges them again every trial) or streamed (a one-shot merge):
a streamed source holds weightless "meta" tensors read from its safetensors headers, so every
check below runs unchanged, and each real tensor is read from disk when the merge asks for it,
through a file handle opened for that tensor only (an open memory map keeps every page it
touched resident). `memory_line` sizes resident sources from the same headers before loading.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from evomerge import lora
from evomerge.errors import EvomergeError
from evomerge.layouts import WeightMap, build_model, decoder_layers, text_config
from evomerge.refs import resolve_path

if TYPE_CHECKING:
    from evomerge.recipe import Recipe

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MEMORY_ENV = "EVOMERGE_AVAILABLE_MEMORY"  # bytes a search may load its sources into, instead of what is free now
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class Source:
    """One model's weights under its checkpoint's names, with its config and directory: resident on the
    merge device, or (streamed) meta tensors plus the file each one is read from."""

    ref: str
    path: Path
    config: PretrainedConfig
    tensors: dict[str, torch.Tensor]
    files: dict[str, Path] | None = None  # streamed: checkpoint name -> its safetensors file


def load_config(path: Path, ref: str, trust_remote_code: bool) -> PretrainedConfig:
    if not (path / "config.json").is_file():
        raise EvomergeError(f"model {ref!r}: no config.json in {path}")
    raw = json.loads((path / "config.json").read_text())
    if "auto_map" in raw and not trust_remote_code:
        raise EvomergeError(f"model {ref!r} ships its own model code (auto_map in config.json); "
                            "pass --trust-remote-code only if you trust that code")
    if "quantization_config" in raw:
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) else "?"
        raise EvomergeError(f"model {ref!r} is quantized ({method}); merging needs its floating-point weights: "
                            "use the unquantized checkpoint")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise EvomergeError(f"model {ref!r}: cannot read its config: {str(exc).splitlines()[0]}") from None


def weight_files(path: Path, ref: str, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The files transformers would load, and whether they are pickles."""
    for index, single, pickled in ((SAFETENSORS_INDEX, SAFETENSORS, False), (PICKLE_INDEX, PICKLE, True)):
        if (path / index).is_file() or (path / single).is_file():
            if pickled and not allow_pickle:
                raise EvomergeError(f"model {ref!r} has only pickle weights ({single}), which can run code when loaded; "
                                    "convert it to safetensors or pass --allow-pickle")
            return (_shards(path, index, ref) if (path / index).is_file() else [path / single]), pickled
    others = sorted(p.name for p in path.glob("*.safetensors"))
    found = f" (it has {', '.join(others)}, which transformers does not load as this model either)" if others else ""
    raise EvomergeError(f"model {ref!r}: no {SAFETENSORS} or {SAFETENSORS_INDEX} in {path}{found}")


def _shards(path: Path, index: str, ref: str) -> list[Path]:
    try:
        weight_map = json.loads((path / index).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise EvomergeError(f"model {ref!r}: {path / index} is not a valid index (no weight_map); "
                            "download the model again") from None
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise EvomergeError(f"model {ref!r}: {index} names {missing[0]}, which is not in {path}; "
                            "the download is incomplete: download the model again")
    return [path / n for n in names]


def _damaged(ref: str, f: Path, exc: Exception) -> EvomergeError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EvomergeError(f"model {ref!r}: cannot read {f.name} ({detail}); the file is damaged or "
                         "incomplete: download the model again")


def load_tensors(path: Path, ref: str, device: torch.device, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory, in their stored dtype, on `device`.

    On the CPU, safetensors maps the file and its tensors point into the map; they are copied out
    into the process's own memory, one file at a time. A search reads every source once per trial,
    and the merge passes read mapped file pages ~30% slower than the same bytes in its own memory
    (linear on the 134M bench model: 0.42-0.54 of the copy floor mapped, 0.58-0.64 copied,
    measured alternately); and a file rewritten or truncated while a days-long search runs (a
    re-download, a fine-tune saved over it) would kill the process with SIGBUS at its next read."""
    files, pickled = weight_files(path, ref, allow_pickle)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if pickled:
                tensors.update(torch.load(f, map_location=device, weights_only=True))
                continue
            mapped = load_file(f, device=str(device))
            tensors.update({k: v.clone() for k, v in mapped.items()} if device.type == "cpu" else mapped)
            del mapped  # the file's map goes with its last tensor
        except Exception as exc:  # safetensors and torch.load raise their own types for a damaged file
            raise _damaged(ref, f, exc) from None
    return tensors


def tensor_headers(files: list[Path], ref: str) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor of safetensors files as a meta tensor of its shape and dtype, with its file; reads headers only."""
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    info = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(info.get_dtype())
                    if dtype is None:
                        raise EvomergeError(f"model {ref!r}: {f.name} stores {name} as {info.get_dtype()}, which "
                                            "evomerge cannot read: use a checkpoint of floating-point weights")
                    out[name] = (torch.empty(info.get_shape(), dtype=dtype, device="meta"), f)
        except EvomergeError:
            raise
        except Exception as exc:
            raise _damaged(ref, f, exc) from None
    return out


def read_tensor(ref: str, f: Path, name: str, device: torch.device) -> torch.Tensor:
    """One tensor of a safetensors file, through a handle opened for it alone (see the module docstring)."""
    try:
        with safe_open(f, framework="pt", device=str(device)) as handle:
            return handle.get_tensor(name)
    except Exception as exc:
        raise _damaged(ref, f, exc) from None


def load_source(ref: str, device: torch.device, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                resident: bool = True, loaded: dict[Path, Source] | None = None) -> Source:
    """A checkpoint, resident or (safetensors only: pickles are always loaded) streamed; or a LoRA adapter
    folder standing for its base plus its delta (evomerge.lora; resident: its base and its factors).
    Sources in `loaded` (by resolved directory) are reused, so adapters of one base and the base share
    its tensors."""
    loaded = {} if loaded is None else loaded
    path = resolve_path(ref, allow_pickle=allow_pickle)
    if lora.is_adapter(path):
        def load_base(base_ref: str) -> tuple[Path, dict[str, torch.Tensor]]:
            base = load_source(base_ref, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                               loaded=loaded)
            return base.path, base.tensors

        base_path, tensors = lora.load_adapter(ref, path, device, load_base)
        return Source(ref, base_path, loaded[base_path.resolve()].config, tensors)
    key = path.resolve()
    if key not in loaded:
        config = load_config(path, ref, trust_remote_code)
        files, pickled = weight_files(path, ref, allow_pickle)
        if resident or pickled:
            loaded[key] = Source(ref, path, config, load_tensors(path, ref, device, allow_pickle=allow_pickle))
        else:
            headers = tensor_headers(files, ref)
            loaded[key] = Source(ref, path, config, {n: t for n, (t, _) in headers.items()},
                                 {n: f for n, (_, f) in headers.items()})
    return Source(ref, path, loaded[key].config, loaded[key].tensors, loaded[key].files)


def source_size(ref: str, *, allow_pickle: bool = False) -> tuple[int, int]:
    """(elements, bytes) of a source's tensors once loaded in their stored dtype, read from its safetensors
    headers without loading it (a pickle: its file size, and half as many elements, as if 16-bit; a LoRA
    adapter: its factors, its base being a source of its own: see `resident_models`)."""
    path = resolve_path(ref, allow_pickle=allow_pickle)
    files, pickled = ([path / lora.WEIGHTS], False) if lora.is_adapter(path) else weight_files(path, ref, allow_pickle)
    if pickled:
        size = sum(f.stat().st_size for f in files)
        return size // 2, size
    tensors = [t for t, _ in tensor_headers(files, ref).values()]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device` now (GPU: the driver's free memory; CPU: MemAvailable), or
    $EVOMERGE_AVAILABLE_MEMORY where set (to leave room for other processes)."""
    if os.environ.get(MEMORY_ENV):
        try:
            return int(float(os.environ[MEMORY_ENV]))
        except ValueError:
            raise EvomergeError(f"{MEMORY_ENV}={os.environ[MEMORY_ENV]!r}: expected a number of bytes") from None
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_line(refs: list[str], device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False) -> str:
    """How much memory resident sources and one candidate of `dtype` (the first source's size) take on
    `device`: a line to print, or a one-line refusal when that is more than is available (checked before
    anything loads)."""
    models = resident_models(refs, allow_pickle)
    sizes = {ref: source_size(ref, allow_pickle=allow_pickle) for ref in models}
    sources = sum(size for _, size in sizes.values())
    candidate = max(elements for elements, _ in sizes.values()) * dtype.itemsize
    needed, available = sources + candidate, available_memory(device)
    text = (f"{len(sizes)} source models take {_size(sources)} and the candidate {_size(candidate)} on {device}: "
            f"{needed} bytes needed, {available} bytes available")
    if needed > available:
        raise EvomergeError(f"{text}; a search cannot hold them resident: free memory, use fewer or smaller "
                            "models, or merge one recipe with `evomerge merge`, which streams them")
    return text


def resident_models(refs: list[str], allow_pickle: bool = False) -> list[str]:
    """What a search over `refs` holds: each model once (by folder), and each LoRA adapter's base beside it."""
    models: dict[Path, str] = {}
    for ref in refs:
        path = resolve_path(ref, allow_pickle=allow_pickle)
        if lora.is_adapter(path):
            base = lora.read_config(path, ref)["base_model_name_or_path"]
            models.setdefault(resolve_path(base, allow_pickle=allow_pickle).resolve(), base)
        models.setdefault(path.resolve(), ref)
    return list(models.values())


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_architectures(sources: list[Source]) -> None:
    first = sources[0]
    for other in sources[1:]:
        if first.config.architectures != other.config.architectures or first.config.model_type != other.config.model_type:
            raise EvomergeError(f"models {first.ref!r} ({first.config.model_type}) and {other.ref!r} "
                                f"({other.config.model_type}) have different architectures; merging needs one architecture")


def check_hidden_sizes(sources: list[Source]) -> None:
    """Checked before tensor shapes, so the message names the real difference."""
    sizes = {s.ref: getattr(text_config(s.config), "hidden_size", None) for s in sources}
    if len(set(sizes.values())) > 1:
        raise EvomergeError(f"models have different hidden sizes {sizes}; neither merging nor layer routing can "
                            "combine them: use models of one architecture and size")


def check_floating_point(ref: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise EvomergeError(f"model {ref!r} stores {name} as {str(tensor.dtype).removeprefix('torch.')}: merging "
                                "needs floating-point weights (a quantized checkpoint?): use unquantized weights")


def check_shapes(first: Source, other: Source, tensors: dict[str, dict[str, torch.Tensor]], vocab_rows: set[str],
                 rows_may_differ: bool) -> None:
    """Same shapes everywhere; rows of the `vocab_rows` tensors (embeddings, head) may differ when a
    tokenizer_source re-indexes them."""
    for name, tensor in tensors[first.ref].items():
        theirs = tensors[other.ref][name]
        if tensor.shape == theirs.shape or (rows_may_differ and name in vocab_rows and tensor.shape[1:] == theirs.shape[1:]):
            continue
        if name in vocab_rows:
            raise EvomergeError(
                f"models {first.ref!r} and {other.ref!r} have different vocabulary sizes "
                f"({tensor.shape[0]} vs {theirs.shape[0]} rows in {name}); merge only models that share one tokenizer, "
                "or set tokenizer_source (base, union or a model) in the recipe")
        raise EvomergeError(f"models {first.ref!r} and {other.ref!r} differ in shape at {name}: "
                            f"{tuple(tensor.shape)} vs {tuple(theirs.shape)}")


def aligned(source: Source, reference: WeightMap, shell: PreTrainedModel) -> dict[str, str]:
    """The source's own name of each reference checkpoint name: checkpoints of one architecture may
    name a tensor differently (hub GPT-2 lacks the `transformer.` prefix), transformers loads both."""
    own = WeightMap(shell, source.tensors)
    by_internal = {own.internal[n]: n for n in own.names}
    out = {}
    for name in reference.names:
        theirs = by_internal.get(reference.internal[name])
        if theirs is None:
            raise EvomergeError(f"model {source.ref!r} lacks {name!r} (or its equivalent); the models are not "
                                "the same architecture and size")
        out[name] = theirs
    return out


def aligned_tensors(source: Source, names: dict[str, str], shell: PreTrainedModel) -> Mapping[str, torch.Tensor]:
    """The source's tensors under the reference names (`names`: reference name -> the source's own)."""
    if isinstance(source.tensors, lora.AdapterTensors):
        return source.tensors.renamed(names, WeightMap(shell, source.tensors).internal)
    return {name: source.tensors[theirs] for name, theirs in names.items()}


class StreamedTensors(Mapping):
    """A streamed source's tensors under the reference names, each read from disk when looked up."""

    def __init__(self, sources: SourceSet, ref: str):
        self._sources, self._ref = sources, ref

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sources.read(self._ref, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources.names[self._ref])

    def __len__(self) -> int:
        return len(self._sources.names[self._ref])


class SourceSet:
    """The source models of a merge, resident on one device (or streamed to it: `resident=False`), every
    tensor under the first model's checkpoint names; the architecture's weight map and decoder layers,
    read from a weightless ("meta") copy of the model; and the config of what they merge into."""

    def __init__(self, refs: list[str], device: torch.device, *, allow_pickle: bool = False,
                 trust_remote_code: bool = False, tokenizer_source: str | None = None, resident: bool = True):
        self.device, self.resident = device, resident
        loaded: dict[Path, Source] = {}
        self.sources = {ref: load_source(ref, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                         resident=resident, loaded=loaded) for ref in dict.fromkeys(refs)}
        self.paths = {ref: source.path for ref, source in self.sources.items()}  # each model's folder
        listed = list(self.sources.values())
        check_architectures(listed)
        check_hidden_sizes(listed)
        first = listed[0]
        self.trust_remote_code = trust_remote_code
        self.config = copy.deepcopy(first.config)  # of the merged model (its vocabulary may differ from the first's)
        shell = build_model(first.config, torch.float32, "meta", trust_remote_code)
        self.weights = WeightMap(shell, first.tensors)
        self.layers_path, layers = decoder_layers(shell)
        self.n_layers = len(layers)
        self.names = {s.ref: aligned(s, self.weights, shell) for s in listed}
        self.tensors = {s.ref: aligned_tensors(s, self.names[s.ref], shell) for s in listed}
        self.vocab_rows = vocab_tensors(shell, self.weights)
        stand_ins = {ref: lora.stand_in(tensors) for ref, tensors in self.tensors.items()}  # builds no adapter's delta
        for source in listed:
            check_floating_point(source.ref, stand_ins[source.ref])
        for other in listed[1:]:
            check_shapes(first, other, stand_ins, self.vocab_rows, rows_may_differ=tokenizer_source is not None)
        self.vocabulary = None
        if tokenizer_source is not None:
            self._reindex(tokenizer_source)
        self.shell = shell if self.vocabulary is None else build_model(self.config, torch.float32, "meta", trust_remote_code)
        self.shapes = {n: t.shape for n, t in self.reference.items()}
        self.weights.check(self.shell, self.shapes, first.ref)
        self._reindexed: tuple[str, dict[str, torch.Tensor]] | None = None  # streamed: the last vocabulary tensor read
        if not resident:
            self.tensors = {s.ref: StreamedTensors(self, s.ref) for s in listed}

    def _reindex(self, tokenizer_source: str) -> None:
        """The output vocabulary; every model's embedding and head rows re-indexed to it (streamed models'
        when they are read, see `read`: here their meta tensors only take the new shape)."""
        from evomerge import vocab  # tokenizers load only when a recipe asks for a tokenizer_source

        base, name = next(iter(self.sources)), min(self.vocab_rows)  # any of them: they share their rows
        rows = {ref: tensors[name].shape[0] for ref, tensors in self.tensors.items()}
        self.vocabulary = vocab.build_vocabulary(tokenizer_source, self.paths, rows, self.trust_remote_code)
        for name in self.vocab_rows:
            tensors = {r: t[name] for r, t in self.tensors.items()}
            if self.resident:
                tensors = vocab.reindex(self.vocabulary, tensors, base)
            for ref, tensor in tensors.items():
                self.tensors[ref][name] = tensor if self.resident else tensor.new_empty(
                    (self.vocabulary.rows, *tensor.shape[1:]), device="meta")
        vocab.configure(self.config, self.vocabulary, self.sources[self.vocabulary.source].config)

    def read(self, ref: str, name: str) -> torch.Tensor:
        """A streamed source's tensor `name` (a reference name), read from its file now; embedding and head
        rows re-indexed to a tokenizer_source's vocabulary, which needs every model's, so those are kept
        until another name is read."""
        if self.vocabulary is None or name not in self.vocab_rows:
            return self._read_file(ref, name)
        if self._reindexed is None or self._reindexed[0] != name:
            from evomerge import vocab

            self._reindexed = None  # the previous tensor's rows go before the next are read
            tensors = {r: self._read_file(r, name) for r in self.sources}
            self._reindexed = (name, vocab.reindex(self.vocabulary, tensors, next(iter(self.sources))))
        return self._reindexed[1][ref]

    def _read_file(self, ref: str, name: str) -> torch.Tensor:
        source = self.sources[ref]
        if source.files is None:  # a pickle among streamed sources is resident
            return source.tensors[self.names[ref][name]]
        theirs = self.names[ref][name]
        return read_tensor(ref, source.files[theirs], theirs, self.device)

    @property
    def reference(self) -> dict[str, torch.Tensor]:
        """The first model's tensors (an adapter's stand-in: see evomerge.lora), whose names every source's tensors
        go by (streamed: each read from disk when looked up; `shapes` has their shapes)."""
        return lora.stand_in(next(iter(self.tensors.values())))

    def check_loaded(self, refs: list[str]) -> None:
        unknown = [r for r in refs if r not in self.sources]
        if unknown:
            raise EvomergeError(f"recipe names model {unknown[0]!r}, which was not loaded; loaded: {list(self.sources)}")

    def check_recipe(self, recipe: Recipe, tokenizer_source: str | None, holder: str) -> None:
        """The recipe can be built from these sources, loaded for `tokenizer_source` by `holder` (for the
        error): its models are loaded, it is valid, and it asks for the same tokenizer_source."""
        self.check_loaded(recipe.refs)
        recipe.validate()
        if recipe.tokenizer_source != tokenizer_source:
            raise EvomergeError(f"recipe asks for tokenizer_source {recipe.tokenizer_source!r}, but {holder} "
                                f"{tokenizer_source!r}")

    def layer_of(self, name: str) -> int | None:
        return self.weights.layer_of(name, self.layers_path)

    def layer_prefixes(self) -> list[str]:
        """Per decoder layer, the checkpoint-name prefix all its tensors share ('model.layers.3.', 'h.3.', ...)."""
        by_layer: dict[int, list[list[str]]] = {}
        for name in self.weights.names:
            layer = self.layer_of(name)
            if layer is not None:
                by_layer.setdefault(layer, []).append(name.split("."))
        prefixes = []
        for layer in range(self.n_layers):
            parts = by_layer[layer]
            common: list[str] = []
            for column in zip(*(p[:-1] for p in parts)):  # never a whole name: a filter is a prefix of several
                if len(set(column)) > 1:
                    break
                common.append(column[0])
            prefixes.append(".".join(common) + ".")
        return prefixes


def vocab_tensors(model: PreTrainedModel, weights: WeightMap) -> set[str]:
    """Checkpoint names of the tensors with one row per token: input embeddings and the output head."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    ids = {id(m.weight) for m in modules if m is not None and getattr(m, "weight", None) is not None}
    params = {name for name, p in model.named_parameters() if id(p) in ids}
    return {name for name, target in weights.targets.items() if target.param in params}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
