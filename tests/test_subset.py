"""Seeded, stratified subsets: deterministic in (seed, documents), sizes by largest remainder
(hand-computed), exact proportions over strata, uniform inside a stratum, and one-line errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.fitness.harness import load_tasks
from evomerge.fitness.spec import SubsetSpec
from evomerge.fitness.subset import allocate, choose_items, stratified_sample, task_docs


def docs(n: int, levels: dict[str, int] | None = None) -> list[dict]:
    if levels is None:
        return [{"prompt": f"p{i}"} for i in range(n)]
    return [{"prompt": f"p{i}", "level": level} for level, k in levels.items() for i in range(k)]


def test_largest_remainder_by_hand():
    assert allocate(10, [200, 200, 200]) == [4, 3, 3]  # equal remainders: the earlier task
    assert allocate(4, [5, 3, 2]) == [2, 1, 1]  # quotas 2.0, 1.2, 0.8: the leftover seat to 0.8
    assert allocate(7, [10, 10, 1]) == [4, 3, 0]  # quotas 3.33, 3.33, 0.33: ties go to the larger, then earlier
    assert allocate(21, [10, 10, 1]) == [10, 10, 1]
    for size in range(1, 601):
        shares = allocate(size, [200, 150, 250])
        assert sum(shares) == size and all(0 <= s <= c for s, c in zip(shares, [200, 150, 250]))


def test_deterministic_in_seed_and_documents():
    tasks = {"a": docs(200), "b": docs(100)}
    spec = SubsetSpec(size=30, seed=7)
    chosen = choose_items(spec, tasks)
    assert chosen == choose_items(spec, {"a": docs(200), "b": docs(100)})
    assert chosen != choose_items(SubsetSpec(size=30, seed=8), tasks)
    assert [len(chosen["a"]), len(chosen["b"])] == [20, 10]
    assert all(ids == sorted(set(ids)) for ids in chosen.values())
    # a task's items depend on its own documents and share only: adding a task (shares 20, 10, 15) leaves them alone
    more = choose_items(SubsetSpec(size=45, seed=7), {"a": docs(200), "b": docs(100), "c": docs(150)})
    assert more["a"] == chosen["a"] and more["b"] == chosen["b"]


def test_strata_keep_their_share_of_the_split():
    tasks = {"t": docs(100, {"easy": 50, "mid": 30, "hard": 20})}
    for seed in range(5):
        chosen = choose_items(SubsetSpec(size=10, seed=seed, stratify_by="level"), tasks)["t"]
        assert Counter(tasks["t"][i]["level"] for i in chosen) == {"easy": 5, "mid": 3, "hard": 2}
    # an unstratified draw of 10 from the same documents misses that split in most seeds
    unstratified = [Counter(tasks["t"][i]["level"] for i in choose_items(SubsetSpec(size=10, seed=s), tasks)["t"])
                    for s in range(20)]
    assert sum(c == {"easy": 5, "mid": 3, "hard": 2} for c in unstratified) < 10


def test_uniform_inside_a_stratum():
    """Each of 20 items is chosen with probability 5/20 (binomial: 2000 draws, sd ~0.0097)."""
    counts = np.zeros(20)
    for seed in range(2000):
        counts[stratified_sample([""] * 20, 5, np.random.default_rng(seed))] += 1
    assert np.abs(counts / 2000 - 0.25).max() < 0.04


def test_zoo_group_split_evenly_over_its_members():
    _, task_dict = load_tasks(["zoo_target"], Path("evaluators/tasks"))
    for task in task_dict["tasks"].values():
        task.config.test_split = "search"
    chosen = choose_items(SubsetSpec(size=60, seed=0), task_docs(task_dict))
    assert {t: len(ids) for t, ids in chosen.items()} == {"zoo_rev": 20, "zoo_srt": 20, "zoo_cae": 20}
    assert all(0 <= i < 200 for ids in chosen.values() for i in ids)


@pytest.mark.parametrize("data, message", [
    ({"size": 0}, "subset.size must be a positive integer"),
    ({"size": 10, "seed": -1}, "subset.seed must be a non-negative integer"),
    ({"size": 10, "stratify": "level"}, r"unknown key\(s\) \['stratify'\]"),
    ({"size": 10, "stratify_by": ""}, "subset.stratify_by must be a field name"),
    (20, "subset must be"),
])
def test_bad_specs_are_refused_in_one_line(data, message):
    with pytest.raises(EvomergeError, match=message) as info:
        SubsetSpec.from_dict(data, "spec.yaml")
    assert str(info.value).startswith("spec.yaml") and "\n" not in str(info.value)


@pytest.mark.parametrize("spec, message", [
    (SubsetSpec(size=401), "subset.size 401 exceeds the 400 items of the evaluated split; use at most 400"),
    (SubsetSpec(size=2), r"subset.size 2 leaves task 'c' without items \(tasks of \[200, 100, 100\] items\); "
                         "use a size of at least 3"),
    (SubsetSpec(size=10, stratify_by="level"), r"'level' is not a field of task 'a'.s documents; they have \['prompt'\]"),
])
def test_subsets_the_split_cannot_give_are_refused(spec, message):
    with pytest.raises(EvomergeError, match=message) as info:
        choose_items(spec, {"a": docs(200), "b": docs(100), "c": docs(100)}, "spec.yaml")
    assert "\n" not in str(info.value)
