"""Per-item results from lm-eval on the zoo's group task: each item's value is the zoo's own
teacher-forced exact match of that very prompt, per-item means are lm-eval's aggregates (tasks
and the group), a subset returns exactly its items, chunks merge into the whole, and the
JSON form round-trips and stays small."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.backends.hf import quiet_hflm
from evomerge.errors import EvomergeError
from evomerge.fitness.harness import evaluate_items, load_tasks, scores_from_items, task_sizes
from evomerge.fitness.items import ItemResults, by_task
from evomerge.fitness.zoo_skills import SKILLS, exact_match, split_examples

ZOO = Path("evomerge/zoo_models")


@pytest.fixture(scope="module")
def tasks():
    _, task_dict = load_tasks(["zoo_target"], Path("evaluators/tasks"))
    for task in task_dict["tasks"].values():
        task.config.test_split = "search"
    return task_dict


@pytest.fixture(scope="module")
def lm():
    model = AutoModelForCausalLM.from_pretrained(ZOO / "expert_srt", dtype=torch.float32).eval()
    return quiet_hflm(model, AutoTokenizer.from_pretrained(ZOO / "base"), batch_size=64)


@pytest.fixture(scope="module")
def full(lm, tasks):
    return evaluate_items(lm, tasks)


def test_per_item_means_are_lm_evals_aggregates(full, tasks):
    scores, results = full
    assert results.ids == {f"zoo_{s}": list(range(200)) for s in SKILLS} == {t: list(range(n)) for t, n in task_sizes(tasks).items()}
    pooled = []
    for skill in SKILLS:
        values = results.values[f"zoo_{skill}"]["acc,none"]
        assert set(values) <= {0.0, 1.0}
        assert sum(values) / len(values) == scores[f"zoo_{skill}/acc"]
        pooled += values
    assert sum(pooled) / len(pooled) == pytest.approx(scores["zoo_target/acc"], abs=1e-15)  # weight_by_size
    assert scores_from_items(tasks, results) == scores


def test_each_item_is_that_prompts_exact_match(full, lm):
    """An independent code path: the zoo's teacher-forced exact match of the prompt at that doc id."""
    _, results = full
    rng = random.Random(0)
    for skill in SKILLS:
        examples = split_examples(skill, "search")
        for i in rng.sample(range(200), 8):
            assert results.metric(f"zoo_{skill}", "acc,none")[i] == exact_match(lm.model, lm.tokenizer, [examples[i]])


def test_a_subset_returns_exactly_its_items_with_the_full_runs_values(lm, tasks, full):
    """Unsorted ids in, the same items out (lm-eval itself would mislabel an unsorted list);
    a task given no item is not evaluated and the group aggregates over the rest."""
    _, everything = full
    asked = {"zoo_rev": [150, 3, 17, 99], "zoo_srt": [], "zoo_cae": [199, 0]}
    scores, results = evaluate_items(lm, tasks, asked)
    assert results.ids == {"zoo_rev": [3, 17, 99, 150], "zoo_cae": [0, 199]}
    for task, ids in results.ids.items():
        assert results.values[task]["acc,none"] == [everything.metric(task, "acc,none")[i] for i in ids]
    pooled = results.values["zoo_rev"]["acc,none"] + results.values["zoo_cae"]["acc,none"]
    assert scores["zoo_target/acc"] == pytest.approx(sum(pooled) / 6, abs=1e-15)
    assert "zoo_srt/acc" not in scores
    assert scores_from_items(tasks, results) == scores


def test_chunks_merge_into_the_run_on_their_union(lm, tasks):
    first = {"zoo_rev": [5, 40], "zoo_srt": [7]}
    second = {"zoo_rev": [1, 60], "zoo_cae": [3, 4]}
    _, a = evaluate_items(lm, tasks, first)
    _, b = evaluate_items(lm, tasks, second)
    union = by_task([*a.items(), *b.items()])
    scores, whole = evaluate_items(lm, tasks, union)
    assert a.merged(b) == whole == b.merged(a)
    assert scores_from_items(tasks, a.merged(b)) == scores
    with pytest.raises(ValueError, match="overlap"):
        a.merged(a)


def test_json_round_trip_and_size(full):
    _, results = full
    encoded = json.dumps(results.to_json())
    assert ItemResults.from_json(json.loads(encoded)) == results
    assert len(encoded) < 800  # 600 binary items: ~1 byte each, plus ids as ranges
    gsm_like = ItemResults({"gsm": list(range(1069))}, {"gsm": {"exact_match,strict": [float(i % 3 == 0) for i in range(1069)]}})
    assert len(json.dumps(gsm_like.to_json())) < 1200
    scattered = ItemResults({"t": [0, 2, 3, 4, 9]}, {"t": {"f1,none": [0.5, 1.0, 0.0, math.nan, 0.25]}})
    data = json.loads(json.dumps(scattered.to_json(), allow_nan=False))  # strict JSON: no NaN token
    assert data["tasks"]["t"]["ids"] == "0,2-4,9"
    back = ItemResults.from_json(data)
    assert back.ids == scattered.ids and back.values["t"]["f1,none"][:3] == [0.5, 1.0, 0.0]
    assert math.isnan(back.values["t"]["f1,none"][3])


def test_ids_beyond_the_split_are_refused_in_one_line(lm, tasks):
    with pytest.raises(EvomergeError, match=r"task 'zoo_cae' has 200 items but item 200 was asked for") as info:
        evaluate_items(lm, tasks, {"zoo_cae": [3, 200]})
    assert "\n" not in str(info.value)
