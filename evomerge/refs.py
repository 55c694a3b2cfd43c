"""What a model reference names: a local checkpoint directory or a hub id. No torch: a search
checks its models' references before it reads its study, and loads the models later."""

from __future__ import annotations

import re
from pathlib import Path

from evomerge.errors import EvomergeError

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What transformers loads (model*.safetensors and its index; not e.g. Mistral's consolidated.safetensors,
# a second copy of the weights in another naming), tokenizer files and chat templates (*.jinja).
_HUB_FILES = ["model*.safetensors", "adapter_model.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken",
              "*.jinja"]  # adapter_model: a PEFT adapter's weights (evomerge.lora)


def local_dir(ref: str) -> Path | None:
    """The directory `ref` names, or None for a hub id; an error for a path that is not a directory."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise EvomergeError(f"model {ref!r} is a file; point at the checkpoint directory (with config.json)")
    if ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise EvomergeError(f"model {ref!r}: no such directory (paths are relative to {Path.cwd()})")
    return None


def resolve_path(ref: str, *, allow_pickle: bool = False) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (weights in safetensors only, unless pickle is allowed)."""
    path = local_dir(ref)
    if path is not None:
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = _HUB_FILES + (["pytorch_model*.bin"] if allow_pickle else [])
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all one line for the user
        raise EvomergeError(f"model {ref!r}: not a local directory and the hub download failed: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
