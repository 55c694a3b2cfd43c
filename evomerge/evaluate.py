"""Scoring candidates: lm-eval tasks (the harness this field trusts) and the zoo's scorer.

`LmEvalEvaluator` pays lm-eval's set-up costs once per run: the task index is built from
the local task folder alone when it holds every requested task (indexing lm-eval's ~15k
built-in names takes seconds) and datasets load once. Each trial then calls the lower-level
`evaluate` on the same task objects with the candidate's lm-eval model (which its backend
wraps: evomerge.backends), with lm-eval's progress bars and logs kept out of the user's
terminal.

`evaluate_items` also returns each item's result (evomerge.item_results): the search stores
them on every trial, evaluates a study's seeded subset or IRT anchors, and races candidates
chunk by chunk (evomerge.search.scoring).

Every problem with the spec (a task that does not exist, data missing offline, a metric
the tasks do not produce) raises `EvomergeError` here, before any candidate is built.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoTokenizer

from evomerge.backends import Candidate
from evomerge.errors import EvomergeError
from evomerge.fitness import COST_METRICS, Evaluator, FitnessSpec
from evomerge.item_results import ItemResults, evaluate_items
from evomerge.subset import SubsetSpec, choose_items, task_docs
from evomerge.zoo import SKILLS, exact_match, split_examples

_NOISY_LOGGERS = ("lm-eval", "lm_eval", "datasets", "evaluate", "absl")


class ZooSkillsEvaluator:
    """Exact match on the zoo's skills by one teacher-forced pass per batch, without lm-eval:
    the cheapest real fitness for the shipped models (tests and benches use it)."""

    def __init__(self, spec: FitnessSpec, tokenizer_path: str | Path):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.examples = {s: split_examples(s, spec.options["split"], spec.options["n_examples"]) for s in SKILLS}

    @torch.inference_mode()
    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        if candidate.model is None:
            raise EvomergeError("the zoo_skills fitness scores Hugging Face models: use backend hf, or an lm_eval fitness")
        scores = {s: exact_match(candidate.model, self.tokenizer, ex) for s, ex in self.examples.items()}
        scores["mean"] = sum(scores.values()) / len(scores)
        return scores


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence lm-eval and datasets while they work: their progress bars and INFO logs would
    flood the terminal once per trial. Errors still surface as exceptions."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def load_tasks(names: list[str], include_path: Path) -> tuple[Any, dict[str, Any]]:
    """Build lm-eval's task objects once; returns (task manager, task dict).

    Local task folders are indexed alone when they hold every name, else lm-eval's built-in
    tasks are indexed too (gsm8k, mgsm, arc, ... for users with hub access)."""
    from lm_eval.tasks import TaskManager

    include = str(include_path) if include_path.is_dir() else None
    with quiet():
        local = TaskManager(include_path=include, include_defaults=False) if include else None
        manager = local
        if local is None or set(names) - set(local.all_tasks):
            manager = TaskManager(include_path=include, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        local_names = sorted(local.all_tasks) if local else []
        raise EvomergeError(f"lm-eval task {unknown[0]!r} does not exist (not built in, not under {include_path}); "
                            f"local tasks: {local_names}")
    try:
        with quiet():
            return manager, manager.load(list(names))
    except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise EvomergeError(f"lm-eval tasks {names} could not be loaded{offline}: {first}; "
                            "check the task's dataset is downloaded or its local data files exist") from None


def metric_keys(task_dict: dict[str, Any]) -> list[str]:
    """Every `TASK/METRIC[,FILTER]` the tasks and groups will report (the filter is omitted
    when it is lm-eval's default `none`)."""
    keys = []
    for name, task in task_dict["tasks"].items():
        filters = [f["name"] for f in task.config.filter_list or []] or ["none"]
        keys += [_key(name, m, f) for m in task.aggregation() for f in filters]
    for name, group in task_dict["groups"].items():
        for agg in group.aggregate_metric_list or []:
            keys += [_key(name, agg.metric, f) for f in (agg.filter_list or ["none"])]
    return keys


def _key(task: str, metric: str, filter_name: str) -> str:
    return f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric},{filter_name}"


def resolve_metric(metric: str, available: list[str], where: str) -> str:
    """`zoo_gen/exact_match` names `zoo_gen/exact_match,first-word` when that is its only filter."""
    if metric in available:
        return metric
    matches = [k for k in available if k.startswith(metric + ",")]
    if len(matches) == 1:
        return matches[0]
    hint = f"it has filters {matches}: add one" if matches else f"available: {available}"
    raise EvomergeError(f"{where}: metric {metric!r} is not produced by the tasks; {hint}")


class LmEvalEvaluator:
    """lm-eval tasks built once, one `evaluate` call per trial."""

    def __init__(self, spec: FitnessSpec):
        options = spec.options
        self.options, self.source = options, spec.source
        include = Path(spec.source).parent / options["include_path"]
        self.manager, self.task_dict = load_tasks(options["tasks"], include)
        self._select_split(options["split"])
        for task in self.task_dict["tasks"].values():
            if options["num_fewshot"] is not None:
                task.set_config(key="num_fewshot", value=options["num_fewshot"])
            task.set_fewshot_seed(seed=options["seed"])
        available = metric_keys(self.task_dict)
        self.metrics = {o.metric: resolve_metric(o.metric, available, spec.source)
                        for o in spec.objectives if o.metric not in COST_METRICS}
        subset = options.get("subset")  # {task: doc ids}; None: every item, or the first `limit`
        self.subset = subset and choose_items(SubsetSpec(**subset), task_docs(self.task_dict), spec.source)

    def _select_split(self, split: str | None) -> None:
        if split is None:
            return
        for name, task in self.task_dict["tasks"].items():
            if split not in (task.dataset or {}):
                raise EvomergeError(f"lm-eval task {name!r} has no split {split!r}; it has {sorted(task.dataset or {})}")
            task.config.test_split = split

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        """The spec's scores: every item of the split, its first `limit`, or its `subset`."""
        return self.evaluate_items(candidate, self.subset)[0]

    @torch.inference_mode()
    def evaluate_items(self, candidate: Candidate,
                       items: dict[str, list[int]] | None = None) -> tuple[dict[str, float], ItemResults]:
        """Scores and each item's result on `items` ({task: doc ids}; None: the split, or its first `limit`)."""
        scores, results = evaluate_items(candidate.lm, self.task_dict, items,
                                         limit=self.options["limit"] if items is None else None)
        return self.named(scores), results

    def named(self, scores: dict[str, float]) -> dict[str, float]:
        """`scores` with each objective's metric also under the name the spec uses (`zoo_gen/exact_match`
        for `zoo_gen/exact_match,first-word`), where the scores have it."""
        return {**scores, **{wanted: scores[key] for wanted, key in self.metrics.items() if key in scores}}


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": 0.5, "acc_stderr,none": "N/A", ...}} -> {"task/acc": 0.5}."""
    flat = {}
    for task, entry in results.items():
        for name, value in entry.items():
            metric, sep, filter_name = name.partition(",")
            if sep and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                flat[_key(task, metric, filter_name)] = float(value)
    return flat


def build_evaluator(spec: FitnessSpec, tokenizer_path: str | Path) -> Evaluator:
    """The spec's evaluator; `tokenizer_path` serves the zoo scorer (lm-eval's comes with the candidate)."""
    if spec.kind == "lm_eval":
        return LmEvalEvaluator(spec)
    return ZooSkillsEvaluator(spec, tokenizer_path)
