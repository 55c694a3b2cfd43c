"""A seeded, stratified subset of the evaluated split: the items every candidate of a study sees.

    subset: {size: 60, seed: 0, stratify_by: level}   # in a fitness spec; stratify_by optional

Why stratified: a mean over n random items has variance p(1-p)/n, but a subset that keeps
each stratum's share of the split (the member tasks of a group; a difficulty or category
field) removes the between-strata part of it, and never leaves a member task of a group
without items (which would drop that task's objective).

How the size is split:
- over the leaf tasks (the members of a group such as zoo_target): in proportion to each
  task's item count. A size-weighted group mean (lm-eval's `weight_by_size`) over the subset
  then weights each task as the full split does; every task must get at least one item,
  else the spec is refused with the smallest size that works;
- within a task, over the values of `stratify_by` (a field of the task's documents), in
  proportion to each value's count; small strata may get no item.
Both use the largest-remainder method (Hamilton): floors of the exact quotas, the leftover
items to the largest remainders (ties: the larger stratum, then the earlier one).

Which items: a uniform draw without replacement inside each stratum, from a generator seeded
by (seed, task name), so the choice depends only on the seed and that task's documents, and
adding a task to a spec does not change the items chosen for the others.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.fitness.spec import SubsetSpec


def task_docs(task_dict: dict[str, Any]) -> dict[str, Sequence[dict[str, Any]]]:
    """Each leaf task's documents in its evaluated split, in doc-id order."""
    return {name: task.eval_docs for name, task in task_dict["tasks"].items()}


def choose_items(spec: SubsetSpec, docs: dict[str, Sequence[dict[str, Any]]],
                 where: str = "fitness spec") -> dict[str, list[int]]:
    """{task: sorted doc ids}: `spec.size` items in all, split over tasks and strata as above."""
    counts = [len(d) for d in docs.values()]
    total = sum(counts)
    if spec.size > total:
        raise EvomergeError(f"{where}: subset.size {spec.size} exceeds the {total} items of the evaluated split; "
                            f"use at most {total}")
    shares = allocate(spec.size, counts)
    empty = [task for task, n in zip(docs, shares) if n == 0]
    if empty:
        smallest = next(s for s in range(len(counts), total + 1) if min(allocate(s, counts)) > 0)
        raise EvomergeError(f"{where}: subset.size {spec.size} leaves task {empty[0]!r} without items "
                            f"(tasks of {counts} items); use a size of at least {smallest}")
    return {task: _choose_in_task(task, documents, n, spec, where)
            for (task, documents), n in zip(docs.items(), shares)}


def _choose_in_task(task: str, docs: Sequence[dict[str, Any]], n: int, spec: SubsetSpec, where: str) -> list[int]:
    labels = ["" if spec.stratify_by is None else _label(task, doc, spec.stratify_by, where) for doc in docs]
    rng = np.random.default_rng([spec.seed, zlib.crc32(task.encode())])
    return stratified_sample(labels, n, rng)


def _label(task: str, doc: dict[str, Any], field: str, where: str) -> str:
    if field not in doc:
        raise EvomergeError(f"{where}: subset.stratify_by {field!r} is not a field of task {task!r}'s documents; "
                            f"they have {sorted(doc)}")
    return json.dumps(doc[field], sort_keys=True, default=str)


def stratified_sample(labels: Sequence[str], size: int, rng: np.random.Generator) -> list[int]:
    """Sorted positions: `size` of them, allocated over the distinct labels by largest remainder,
    drawn uniformly without replacement inside each label (labels visited in sorted order)."""
    strata: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        strata.setdefault(label, []).append(position)
    ordered = sorted(strata)
    chosen: list[int] = []
    for label, n in zip(ordered, allocate(size, [len(strata[s]) for s in ordered])):
        chosen += rng.choice(strata[label], size=n, replace=False).tolist()
    return sorted(chosen)


def allocate(size: int, counts: Sequence[int]) -> list[int]:
    """Largest-remainder apportionment of `size` over groups of `counts` items (exact integer
    arithmetic; never more than a group holds, as size <= sum(counts))."""
    total = sum(counts)
    if size == 0:
        return [0] * len(counts)
    shares = [size * c // total for c in counts]
    remainders = [size * c % total for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-remainders[i], -counts[i], i))
    for i in order[:size - sum(shares)]:
        shares[i] += 1
    return shares
