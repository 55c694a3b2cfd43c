"""Racing: score a candidate in chunks of items and stop it once it is clearly worse than the
best candidate so far (Optuna's `WilcoxonPruner`, a paired signed-rank test per item).

    racing: {pruner: wilcoxon, p_threshold: 0.1, min_items: 20, chunk: 20}

The search wires these pieces per trial in evomerge.search.scoring (`ItemScoring.evaluate`):
the reference's item values (`race_reference`, `item_values`), the trial's order (`race_order`),
and `race`, which evaluates chunk by chunk, stores the results after each, and asks
`should_prune` while items remain.

Facts about Optuna 5.0 behind these choices (checked in tests/test_racing.py):
- `trial.report(value, step=item)` + `trial.should_prune()` works only in a single-objective
  study (both raise NotImplementedError with several directions, i.e. with NSGA-II), writes
  one row per item to the storage, and compares with `study.best_trial`, whatever that is.
  On SQLite here (2 shared cores) a report took ~22 ms (13 s for 600 items, against ~3 s to
  evaluate them) and `should_prune` ~230 ms; this module's decision takes ~9 ms.
  `should_prune` here runs the very same `WilcoxonPruner` on an in-memory study holding only
  the best fully scored trial, so the decision is the same, the storage sees one write per
  chunk (`item_results`) instead of one per item, and a pruned trial can never become the
  reference. The test checks both paths agree decision by decision.
- A trial told `state=PRUNED` gets as its `value` the intermediate value of its *largest
  step*: with item ids as steps that is one item's 0/1, not a partial mean. Nothing may read
  a pruned trial's `value`; its estimate lives in user attrs.
- The order must be shuffled per trial (the pruner's docs say so too): a fixed order lets
  the first items decide every race. The search seeds it by (study seed, the trial's fresh
  place: evomerge.search.samplers), which a retry shares with the trial it retries and which
  no kill shifts (trial numbers do), so a resumed search races the same orders; a killed
  attempt's `item_results` (stored after every chunk) are carried by its retry and skipped
  by `chunks`, so nothing is evaluated twice and, against the same reference, every decision
  is the same.

What each sampler is told about a pruned trial. It is stored as `state=PRUNED` (so Optuna's
`best_trial`, the Pareto archive and the race's reference hold fully scored trials only) with
user attrs `items` (how many were evaluated), `item_results`, and `estimate`: the best
available estimate of its full-split scalarized fitness, i.e. the estimator's value
(`estimator: {kind: irt}`: gp-IRT from its answers) or, without an estimator,
`paired_estimate`: the reference's full mean plus the candidate's mean difference from it on
the items it saw (the comparison that stopped it; the partial mean alone errs more, since
the items drawn so far may be easy or hard for every candidate).
- CMA-ES (evomerge's pycma sampler) needs a value for every member of a generation: it is
  told `estimate`, not the failure penalty (worst + spread) a failed slot gets
  (`_slot_outcome` in evomerge/search/cma_sampler.py). CMA-ES uses ranks only; a pruned
  member is significantly worse than the best *so far*, not necessarily worse than its
  generation's other members, and active CMA (pycma's default) weighs the ranks of the worst
  members too, so a penalty would throw away real information.
- TPE sees PRUNED trials itself: without intermediate values (none are reported to Optuna)
  it ranks them below every complete trial; told nothing more.
- Random: nothing to tell.
- NSGA-II: racing is refused (a race compares one scalar per item; a candidate worse on the
  scalarization may still be on the Pareto front): `racing` with `sampler: nsga2` is a config error.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from evomerge.fitness.items import Item, ItemResults, by_task


def race_order(seed: int, trial_number: int, items: Sequence[Item]) -> list[Item]:
    """`items` in an order drawn from (study seed, trial number): the same on every resume."""
    permutation = np.random.default_rng([seed, trial_number]).permutation(len(items))
    return [items[i] for i in permutation]


def chunks(order: Sequence[Item], size: int, done: ItemResults | None = None) -> Iterator[dict[str, list[int]]]:
    """Consecutive chunks of the race order as {task: doc ids}, the form `evaluate_items` takes,
    leaving out the items `done` holds: a retried trial carries its killed attempt's results
    (stored whole after each chunk) and races on from the next chunk, evaluating nothing twice."""
    evaluated = set(done.items()) if done is not None else set()
    remaining = [item for item in order if item not in evaluated]
    for start in range(0, len(remaining), size):
        yield by_task(remaining[start:start + size])


def race(evaluate: Callable[[dict[str, list[int]]], ItemResults], order: Sequence[Item], size: int,
         carried: ItemResults | None, stop: Callable[[ItemResults], bool],
         store: Callable[[ItemResults], None]) -> tuple[ItemResults | None, bool]:
    """Evaluate `order` chunk by chunk, `store` the results so far after each chunk, until `stop`
    says so or the order is done; returns (results, stopped). `stop` is asked only while items
    remain (a candidate scored on every item is fully scored, whatever the test says), and
    first on `carried` results (a retry's killed attempt: as the attempt decided after its last
    stored chunk), which are never evaluated again."""
    results = carried
    parts = list(chunks(order, size, done=results))
    if results is not None and parts and stop(results):
        return results, True
    for k, part in enumerate(parts):
        new = evaluate(part)
        results = new if results is None else results.merged(new)
        store(results)
        if k + 1 < len(parts) and stop(results):
            return results, True
    return results, False


def item_weights(signed: dict[str, float], task_dict: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per leaf task and lm-eval metric key, the factor that turns an item's metric value into its
    share of the scalarized fitness, scaled so that the mean over every item of the split is the
    fitness itself (racing compares means of these per-item values).

    `signed` maps each scored objective's resolved metric (`zoo_rev/acc`, `zoo_target/acc`,
    `zoo_gen/exact_match,first-word`) to its scalarization weight, negated when minimized. A
    group's metric spreads over its leaf tasks as lm-eval aggregates it (weight_by_size: per
    item; otherwise per task)."""
    tasks, groups = task_dict["tasks"], task_dict["groups"]
    total = sum(len(t.eval_docs) for t in tasks.values())
    weights: dict[str, dict[str, float]] = {}
    for metric, weight in signed.items():
        name, _, key = metric.partition("/")
        metric_name, _, filter_name = key.partition(",")
        lm_eval_key = f"{metric_name},{filter_name or 'none'}"
        if name in tasks:
            members = {name: total / len(tasks[name].eval_docs)}
        else:
            members = _group_shares(groups[name], metric_name, total)
        for task, share in members.items():
            per_task = weights.setdefault(task, {})
            per_task[lm_eval_key] = per_task.get(lm_eval_key, 0.0) + weight * share
    return weights


def _group_shares(group: Any, metric: str, total: int) -> dict[str, float]:
    leaves = group.get_all_tasks()
    by_size = next((a.weight_by_size for a in group.aggregate_metric_list or [] if a.metric == metric), True)
    n_group = sum(len(t.eval_docs) for t in leaves)
    return {t.task_name: total / n_group if by_size else total / (len(leaves) * len(t.eval_docs)) for t in leaves}


def item_values(results: ItemResults, weights: dict[str, dict[str, float]], steps: dict[Item, int],
                constant: float = 0.0) -> dict[int, float]:
    """{step: the item's contribution to the scalarized fitness} (see `item_weights`), steps from
    `item_positions`; `constant` is the part of the fitness that does not depend on items
    (weighted costs such as param_count)."""
    values: dict[int, float] = {}
    for task, ids in results.ids.items():
        per_metric = [(np.asarray(results.values[task][key]), w) for key, w in weights.get(task, {}).items()]
        total = sum((w * v for v, w in per_metric), np.zeros(len(ids))) + constant
        values.update({steps[(task, i)]: float(v) for i, v in zip(ids, total)})
    return values


def should_prune(best: dict[int, float], current: dict[int, float], p_threshold: float = 0.1,
                 min_items: int = 20) -> bool:
    """Optuna's WilcoxonPruner decision for `current` (item values so far) against `best` (the best
    fully scored trial's item values), without touching the study's storage."""
    import optuna
    from optuna.pruners import WilcoxonPruner
    from optuna.trial import TrialState, create_trial

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner = WilcoxonPruner(p_threshold=p_threshold, n_startup_steps=min_items)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" per call
    try:
        reference = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    reference.add_trial(create_trial(value=float(np.mean(list(best.values()))), intermediate_values=best))
    return pruner.prune(reference, create_trial(state=TrialState.RUNNING, intermediate_values=current))


def partial_mean(values: dict[int, float]) -> float:
    """The mean item value so far."""
    return float(np.mean(list(values.values())))


def paired_estimate(best: dict[int, float], current: dict[int, float]) -> float:
    """A pruned candidate's full-split fitness without an estimator: the reference's mean over every
    item plus the candidate's mean difference from it on the items it saw. The reference's
    values are a control variate: the difference varies far less than the item values themselves
    (both candidates find the same items hard), so this errs less than the partial mean, and it
    rests on the very comparison that stopped the candidate."""
    return partial_mean(best) + float(np.mean([v - best[step] for step, v in current.items()]))
