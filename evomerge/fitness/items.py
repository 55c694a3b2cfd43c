"""Each item's result, and the compact plain-JSON form the study stores it in.

Cheaper fitness (a fixed subset, racing, IRT estimates) needs to know *which* items a
candidate got right, not only its mean. `ItemResults` holds them, keyed by the document's
index in the task's evaluated split (lm-eval's `doc_id`, stable as long as the task's data
does not change); evomerge.fitness.harness fills it from one lm-eval run.

Only numeric per-item metrics are kept (accuracy, exact match, any metric lm-eval averages);
corpus-level metrics whose per-item value is not a number (BLEU's (ref, pred) pairs) have
no per-item result to estimate from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from evomerge.errors import EvomergeError

Item = tuple[str, int]  # (leaf task name, doc index in its evaluated split)
FORMAT = 1


@dataclass(frozen=True)
class ItemResults:
    """Per leaf task: the evaluated doc ids (ascending) and each per-item metric's values in
    that order, keyed as lm-eval keys them (`acc,none`, `exact_match,first-word`)."""

    ids: dict[str, list[int]]
    values: dict[str, dict[str, list[float]]]

    @property
    def n_items(self) -> int:
        return sum(len(ids) for ids in self.ids.values())

    def items(self) -> list[Item]:
        return [(task, i) for task, ids in self.ids.items() for i in ids]

    def metric(self, task: str, key: str) -> dict[int, float]:
        """One task's values of one metric, by doc id."""
        return dict(zip(self.ids[task], self.values[task][key]))

    def merged(self, other: "ItemResults") -> "ItemResults":
        """The union of two runs on disjoint items (racing accumulates its chunks this way)."""
        ids: dict[str, list[int]] = {}
        values: dict[str, dict[str, list[float]]] = {}
        for task in dict.fromkeys([*self.ids, *other.ids]):
            parts = [r for r in (self, other) if task in r.ids]
            pairs = sorted((i, r, k) for r in parts for k, i in enumerate(r.ids[task]))
            ids[task] = [i for i, _, _ in pairs]
            if len(set(ids[task])) != len(ids[task]):
                raise ValueError(f"item results of task {task!r} overlap; a chunk was evaluated twice")
            keys = set.intersection(*(set(r.values[task]) for r in parts))
            values[task] = {key: [r.values[task][key][k] for _, r, k in pairs] for key in sorted(keys)}
        return ItemResults(ids, values)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (no pickle): ids as ranges ("0-199" or "3,7,10-12"), a binary metric as a
        string of '0'/'1' (~1 byte per item), any other metric as a list of numbers."""
        return {"format": FORMAT, "tasks": {
            task: {"ids": ranges(self.ids[task]), **{k: _encode(v) for k, v in self.values[task].items()}}
            for task in self.ids}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ItemResults":
        if data.get("format") != FORMAT:
            raise EvomergeError(f"item results in format {data.get('format')!r}; this evomerge reads format {FORMAT}")
        ids, values = {}, {}
        for task, entry in data["tasks"].items():
            ids[task] = parse_ranges(entry["ids"])
            values[task] = {k: _decode(v) for k, v in entry.items() if k != "ids"}
        return cls(ids, values)


def by_task(items: Iterable[Item]) -> dict[str, list[int]]:
    """[(task, doc id), ...] -> {task: sorted doc ids} (the form `evaluate_items` takes)."""
    grouped: dict[str, list[int]] = {}
    for task, i in items:
        grouped.setdefault(task, []).append(int(i))
    return {task: sorted(ids) for task, ids in grouped.items()}


def item_positions(sizes: dict[str, int]) -> dict[Item, int]:
    """Each item's place in the evaluated split, tasks in task-dict order: the column of a results
    matrix and the step number a pruner sees."""
    positions, offset = {}, 0
    for task, n in sizes.items():
        positions.update({(task, i): offset + i for i in range(n)})
        offset += n
    return positions


def ranges(ids: list[int]) -> str:
    """Sorted ids as text: [0, 1, 2, 5] -> "0-2,5" (how item ids are stored in a study)."""
    parts, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            parts.append(str(i) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def parse_ranges(text: str) -> list[int]:
    ids: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def _encode(values: list[float]) -> str | list[float]:
    if all(v in (0.0, 1.0) for v in values):
        return "".join("1" if v else "0" for v in values)
    return [v if math.isfinite(v) else str(v) for v in values]  # NaN/inf as "nan"/"inf": strict JSON has none


def _decode(encoded: str | list[float | str]) -> list[float]:
    if isinstance(encoded, str):
        return [float(c) for c in encoded]
    return [float(v) for v in encoded]
