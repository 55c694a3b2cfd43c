"""Parameter-space merge operators, one module per family; METHODS declares what each accepts.

`METHODS`, `MergeMethod` and `get_method` are plain data (no torch), so reading recipes and
search spaces stays light; `merge_tensor`, `TensorRNG` and `tensor_generator` load torch and
the operators on first use.
"""

from typing import Any

from evomerge.merge.methods import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "TensorRNG", "get_method", "merge_tensor", "tensor_generator"]
_LAZY = {"merge_tensor": "evomerge.merge.registry", "TensorRNG": "evomerge.merge.rng",
         "tensor_generator": "evomerge.merge.rng"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evomerge.merge' has no attribute {name!r}")
