"""Reading user YAML files safely (yaml.safe_load) with one-line errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise EvomergeError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise EvomergeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def check_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    """Refuse typos early: an unknown key is named with the keys that are allowed."""
    unknown = set(data) - known
    if unknown:
        raise EvomergeError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
