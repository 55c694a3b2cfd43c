"""Parameter-space merge operators, one module per family, registered by name in METHODS."""

from evomerge.merge import breadcrumbs, dare, della, linear, model_stock, slerp, task_arithmetic, ties  # noqa: F401 (registers)
from evomerge.merge.registry import METHODS, MergeMethod, get_method, merge_tensor
from evomerge.merge.rng import TensorRNG, tensor_generator

__all__ = ["METHODS", "MergeMethod", "TensorRNG", "get_method", "merge_tensor", "tensor_generator"]
