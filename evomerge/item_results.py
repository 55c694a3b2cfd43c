"""Each item's result from one lm-eval run, and a compact plain-JSON form for the study.

Cheaper fitness (a fixed subset, racing, IRT estimates) needs to know *which* items a
candidate got right, not only its mean. lm-eval computes every document's metric values on
the way to its aggregates; `evaluate_items` runs lm-eval once with sample logging on and
returns both: the aggregate scores (the keys of `evomerge.evaluate.flatten_results`) and
`ItemResults`, keyed by the document's index in the task's evaluated split (lm-eval's
`doc_id`, stable as long as the task's data does not change).

Facts about lm-eval 0.4.13's `evaluate(samples=...)` that shape this (read in its source):
- `samples` maps a task to doc indices, but the task iterates the *selected docs in dataset
  order* and then labels the k-th of them `samples[k]`: an unsorted list mislabels results.
  The ids are therefore always passed sorted.
- An empty list (or a task missing from `samples`) means "every doc": a task that should
  get no item is dropped from the task dict for that call instead. Its group then aggregates
  over the members that were evaluated (lm-eval's own `Group.aggregate` skips absent ones).

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


def task_sizes(task_dict: dict[str, Any]) -> dict[str, int]:
    """Docs in each leaf task's evaluated split (after the spec's split is selected)."""
    return {name: len(task.eval_docs) for name, task in task_dict["tasks"].items()}


def evaluate_items(lm: Any, task_dict: dict[str, Any], items: dict[str, list[int]] | None = None,
                   limit: int | None = None) -> tuple[dict[str, float], ItemResults]:
    """Run lm-eval once on `items` ({task: doc ids}; None: every doc, or the first `limit`)
    and return (aggregate scores as flatten_results keys them, each item's results).

    Tasks that `items` leaves out or gives no id are not evaluated, and their groups
    aggregate over the rest, exactly as lm-eval does for those items."""
    from lm_eval.evaluator import evaluate

    from evomerge.evaluate import flatten_results, quiet

    if items is not None and limit is not None:
        raise EvomergeError("a fitness subset and `limit` exclude each other: drop `limit`")
    tasks = task_dict["tasks"] if items is None else {t: task_dict["tasks"][t] for t in items if items[t]}
    samples = None if items is None else {t: _checked_ids(t, task_dict["tasks"][t], items[t]) for t in tasks}
    with quiet():
        results = evaluate(lm=lm, task_dict={**task_dict, "tasks": tasks}, limit=limit, samples=samples,
                           bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    return flatten_results(results["results"]), _from_samples(results["samples"])


def scores_from_items(task_dict: dict[str, Any], results: ItemResults) -> dict[str, float]:
    """The aggregate scores lm-eval reports on exactly these items (each task's own aggregation
    function, lm-eval's group aggregation), without running the model again: the score of a
    candidate whose items were evaluated in several chunks."""
    from lm_eval.api.metrics import mean

    per_task = {}
    for task, values in results.values.items():
        aggregation = task_dict["tasks"][task].aggregation()
        per_task[task] = {key: aggregation.get(key.partition(",")[0], mean)(v) for key, v in values.items()}
    return aggregate_scores(task_dict, per_task, {task: len(ids) for task, ids in results.ids.items()})


def aggregate_scores(task_dict: dict[str, Any], per_task: dict[str, dict[str, float]],
                     sizes: dict[str, int]) -> dict[str, float]:
    """Scores keyed as flatten_results keys them from per-task metric values ({task: {"acc,none":
    0.5}}) standing for `sizes[task]` items each, with the groups lm-eval would report over them."""
    from evomerge.evaluate import flatten_results, quiet  # torch-free imports for whoever only reads results

    metrics: dict[str, dict[str, Any]] = {task: {"sample_len": sizes[task], **values} for task, values in per_task.items()}
    with quiet():  # a group whose members were not all evaluated warns about each absent one
        for name, group in task_dict["groups"].items():
            metrics[name] = group.aggregate(metrics)
    return flatten_results(metrics)


def item_positions(sizes: dict[str, int]) -> dict[Item, int]:
    """Each item's place in the evaluated split, tasks in task-dict order: the column of a results
    matrix and the step number a pruner sees."""
    positions, offset = {}, 0
    for task, n in sizes.items():
        positions.update({(task, i): offset + i for i in range(n)})
        offset += n
    return positions


def _checked_ids(name: str, task: Any, ids: list[int]) -> list[int]:
    ordered = sorted(int(i) for i in ids)
    n = len(task.eval_docs)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"task {name!r}: item ids repeat")
    bad = [i for i in (ordered[0], ordered[-1]) if not 0 <= i < n]
    if bad:
        raise EvomergeError(f"task {name!r} has {n} items but item {bad[0]} was asked for: "
                            "its data changed since the study chose its items; use a new study")
    return ordered


def _from_samples(samples: dict[str, list[dict[str, Any]]]) -> ItemResults:
    ids, values = {}, {}
    for task, logged in samples.items():
        per_doc: dict[int, dict[str, float]] = {}
        for entry in logged:  # one entry per (doc, filter)
            row = per_doc.setdefault(int(entry["doc_id"]), {})
            for metric in entry["metrics"]:
                if _is_number(entry[metric]):
                    row[f"{metric},{entry['filter']}"] = float(entry[metric])
        ids[task] = sorted(per_doc)
        keys = set.intersection(*(set(r) for r in per_doc.values())) if per_doc else set()
        values[task] = {key: [per_doc[i][key] for i in ids[task]] for key in sorted(keys)}
    return ItemResults(ids, values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, complex)


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
