"""lm-eval, the harness this field trusts: its tasks built once per run, one `evaluate` call per
candidate, and each item's result on the way.

`LmEvalEvaluator` pays lm-eval's set-up costs once per run: the task index is built from
the local task folder alone when it holds every requested task (indexing lm-eval's ~15k
built-in names takes seconds) and datasets load once. Each trial then calls the lower-level
`evaluate` on the same task objects with the candidate's lm-eval model (which its backend
wraps: evomerge.backends), with lm-eval's progress bars and logs kept out of the user's
terminal.

`evaluate_items` runs lm-eval once with sample logging on and returns both the aggregate
scores (keyed as `flatten_results` keys them) and each item's results
(evomerge.fitness.items): the search stores them on every trial, evaluates a study's seeded
subset or IRT anchors, and races candidates chunk by chunk (evomerge.search.scoring).

Facts about lm-eval 0.4.13's `evaluate(samples=...)` that shape this (read in its source):
- `samples` maps a task to doc indices, but the task iterates the *selected docs in dataset
  order* and then labels the k-th of them `samples[k]`: an unsorted list mislabels results.
  The ids are therefore always passed sorted.
- An empty list (or a task missing from `samples`) means "every doc": a task that should
  get no item is dropped from the task dict for that call instead. Its group then aggregates
  over the members that were evaluated (lm-eval's own `Group.aggregate` skips absent ones).

Every problem with the spec (a task that does not exist, data missing offline, a metric
the tasks do not produce) raises `EvomergeError` here, before any candidate is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.backends.candidate import quiet
from evomerge.errors import EvomergeError
from evomerge.fitness.items import ItemResults
from evomerge.fitness.spec import COST_METRICS, FitnessSpec, SubsetSpec
from evomerge.fitness.subset import choose_items, task_docs

if TYPE_CHECKING:  # torch, transformers and lm-eval load when a candidate is scored, not when results are read
    from evomerge.backends.candidate import Candidate


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
        for name, kwargs in options.get("gen_kwargs", {}).items():
            self._set_generation(name, kwargs)
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

    def _set_generation(self, name: str, kwargs: dict[str, Any]) -> None:
        """`gen_kwargs: {TASK: {...}}`: lm-eval's generation options of a generate_until task, overridden."""
        task = self.task_dict["tasks"].get(name)
        if task is None:
            raise EvomergeError(f"{self.source}: gen_kwargs names task {name!r}, which is not among the tasks "
                                f"evaluated: {sorted(self.task_dict['tasks'])}")
        if task.config.output_type != "generate_until":
            raise EvomergeError(f"{self.source}: gen_kwargs for task {name!r}, whose requests are {task.config.output_type}: "
                                "only generate_until tasks generate")
        task.set_config(key="generation_kwargs", value=dict(kwargs), update=True)

    def chat(self) -> dict[str, Any]:
        """lm-eval's own prompt-formatting arguments (its `evaluate`'s), as the spec sets them; few-shot
        examples become chat turns whenever a template is applied unless the spec says otherwise, as
        lm-eval's command line does."""
        applied = bool(self.options.get("apply_chat_template"))
        return {"apply_chat_template": applied, "system_instruction": self.options.get("system_instruction"),
                "fewshot_as_multiturn": self.options.get("fewshot_as_multiturn", applied)}

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        """The spec's scores: every item of the split, its first `limit`, or its `subset`."""
        return self.evaluate_items(candidate, self.subset)[0]

    def evaluate_items(self, candidate: Candidate,
                       items: dict[str, list[int]] | None = None) -> tuple[dict[str, float], ItemResults]:
        """Scores and each item's result on `items` ({task: doc ids}; None: the split, or its first `limit`)."""
        import torch

        wanted = self.options.get("apply_chat_template")
        template = select_template(candidate.chat_template, wanted, self.source) if wanted else None
        candidate.lm.score_with(template, self.options.get("max_length"))  # the wrapper may have served another spec
        with torch.inference_mode():
            scores, results = evaluate_items(candidate.lm, self.task_dict, items,
                                             limit=self.options["limit"] if items is None else None, chat=self.chat())
        return self.named(scores), results

    def named(self, scores: dict[str, float]) -> dict[str, float]:
        """`scores` with each objective's metric also under the name the spec uses (`zoo_gen/exact_match`
        for `zoo_gen/exact_match,first-word`), where the scores have it."""
        return {**scores, **{wanted: scores[key] for wanted, key in self.metrics.items() if key in scores}}


def select_template(templates: str | dict | None, wanted: bool | str, where: str) -> str:
    """The template `apply_chat_template: true | NAME` picks from a tokenizer's (one template, or named
    ones with a `default`), as transformers picks it; a missing one is refused in one line."""
    if templates is None:
        raise EvomergeError(f"{where}: apply_chat_template is set, but the candidate's tokenizer has no chat template: "
                            "set chat_template in the run config (a model that has one, or a Jinja template)")
    if isinstance(templates, str):
        if isinstance(wanted, str):
            raise EvomergeError(f"{where}: apply_chat_template names template {wanted!r}, but the tokenizer holds "
                                "one unnamed template: use true")
        return templates
    name = wanted if isinstance(wanted, str) else "default"
    if name not in templates:
        raise EvomergeError(f"{where}: apply_chat_template: the tokenizer has no template named {name!r}; "
                            f"it has {sorted(templates)}")
    return templates[name]


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": 0.5, "acc_stderr,none": "N/A", ...}} -> {"task/acc": 0.5}."""
    flat = {}
    for task, entry in results.items():
        for name, value in entry.items():
            metric, sep, filter_name = name.partition(",")
            if sep and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                flat[_key(task, metric, filter_name)] = float(value)
    return flat


def task_sizes(task_dict: dict[str, Any]) -> dict[str, int]:
    """Docs in each leaf task's evaluated split (after the spec's split is selected)."""
    return {name: len(task.eval_docs) for name, task in task_dict["tasks"].items()}


def evaluate_items(lm: Any, task_dict: dict[str, Any], items: dict[str, list[int]] | None = None,
                   limit: int | None = None, chat: dict[str, Any] | None = None) -> tuple[dict[str, float], ItemResults]:
    """Run lm-eval once on `items` ({task: doc ids}; None: every doc, or the first `limit`)
    and return (aggregate scores as flatten_results keys them, each item's results). `chat` holds
    lm-eval's prompt-formatting arguments (`LmEvalEvaluator.chat`).

    Tasks that `items` leaves out or gives no id are not evaluated, and their groups
    aggregate over the rest, exactly as lm-eval does for those items."""
    from lm_eval.evaluator import evaluate

    if items is not None and limit is not None:
        raise EvomergeError("a fitness subset and `limit` exclude each other: drop `limit`")
    tasks = task_dict["tasks"] if items is None else {t: task_dict["tasks"][t] for t in items if items[t]}
    samples = None if items is None else {t: _checked_ids(t, task_dict["tasks"][t], items[t]) for t in tasks}
    with quiet():
        results = evaluate(lm=lm, task_dict={**task_dict, "tasks": tasks}, limit=limit, samples=samples,
                           bootstrap_iters=0, log_samples=True, verbosity="ERROR", **(chat or {}))
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
    metrics: dict[str, dict[str, Any]] = {task: {"sample_len": sizes[task], **values} for task, values in per_task.items()}
    with quiet():  # a group whose members were not all evaluated warns about each absent one
        for name, group in task_dict["groups"].items():
            metrics[name] = group.aggregate(metrics)
    return flatten_results(metrics)


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
