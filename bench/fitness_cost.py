"""How few items can score a candidate? Cheaper fitness estimators replayed offline on the zoo.

1. Ground truth: every item of zoo_target's search split (600) and test split (600) for the
   four sources and for >= 100 DARE-TIES candidates over the three experts (the paper's PS
   space, search_spaces/ps_ties_dare.yaml): uniformly random genomes, then "late-search
   neighbours", small Gaussian steps around the best random one (where a search spends its
   last evaluations and ranks are hardest). Scored the way a trial is (Materializer in place +
   lm-eval's HF model, one run per split, per-item results from evomerge.fitness.items);
   cached as plain JSON in bench/out/fitness_cost/matrix.json, so reruns only replay.
2. Replay, for N items per candidate x seeds, on held-out candidates (odd-numbered random
   ones + every neighbour; the IRT model is fitted on the sources + even-numbered random
   ones): Spearman correlation of each estimate with the full-split fitness (all held-out
   candidates, and within the top quartile by true fitness), the regret of the estimator's
   top pick (true fitness of the best minus that of the pick), the mean absolute error, and
   the pick's test-split accuracy minus the full-set pick's. Fitness = zoo_target/acc, the
   mean over the 600 items (the demo's scalarization, rev+srt+cae, is 3x it); in points.
3. Racing replay: the held-out candidates in search order (odd random ones, then the
   neighbours), each raced in its seeded order in chunks of 20 against the best fully scored
   one so far (evomerge.fitness.racing, Wilcoxon p < 0.1, >= 20 items), on the whole split or on a
   stratified subset: items per candidate, share pruned, regret and test delta of the winner.

    python bench/fitness_cost.py [--part replay|search|all] [--random 100] [--neighbours 50] [--seeds 20]
                                 [--rebuild] [--items 6000 | --quick] [--search-seeds 3]

The ground truth takes ~1 h on 2 busy cores (154 rows; ~15-25 s per row when shared), the
replay ~4 min (racing's in-memory pruner decisions dominate).

4. The search end to end (`--part search`): runs/demo.yaml's search (DARE-TIES, CMA-ES) once per
   fitness (full set, a fixed stratified subset of 60, racing, IRT on 60 anchors) and seed, each
   stopped by the same item budget (budget.items); each winner (best by the scalarization) is
   scored on the test split through `evomerge evaluate`'s path (evaluators/zoo_target_test.yaml,
   stored in its study). Prints items per finished trial and the winners' test accuracy, mean
   over seeds with its standard error and 95% interval. Studies under bench/out/fitness_cost/
   search_ITEMS/ (a rerun resumes them).

    python bench/fitness_cost.py --part search --quick     # 1200 items per search; ~40 min measured at load 10-13 on 2 cores
    python bench/fitness_cost.py --smoke    # both parts at toy size (3 random + 1 neighbour rows, one seed,
                                            # 120-item searches), under bench/out/smoke/: that it runs, not a figure
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
import torch
import yaml
from optuna.trial import TrialState
from scipy.stats import spearmanr
from scipy.stats import t as t_dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from evomerge.backends.hf import as_candidate
from evomerge.fitness.harness import LmEvalEvaluator
from evomerge.fitness.irt import IrtEstimator, answer_matrix, fit_estimator
from evomerge.fitness.items import ItemResults, item_positions
from evomerge.fitness.racing import chunks, partial_mean, race_order, should_prune
from evomerge.fitness.spec import FitnessSpec, SubsetSpec
from evomerge.fitness.subset import choose_items
from evomerge.merge.materialize import Materializer
from evomerge.search.genome import Genome
from evomerge.search_space import SearchSpace
from evomerge.yamlio import load_yaml_mapping

hf_logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "evomerge" / "zoo_models"
BASE, EXPERTS = str(ZOO / "base"), [str(ZOO / f"expert_{s}") for s in ("rev", "srt", "cae")]
OUT = REPO / "bench" / "out" / "fitness_cost"
SIZES = (10, 20, 50, 100, 200)
NEIGHBOUR_SD = (0.02, 0.05, 0.1)  # step sizes as a fraction of each gene's range, cycled


# --- 1. ground truth -------------------------------------------------------------------------

class Scorer:
    """The sources and one in-place candidate, each scored item by item on both splits."""

    def __init__(self):
        fitness = FitnessSpec.load(REPO / "evaluators" / "zoo_target.yaml")
        self.splits = {split: LmEvalEvaluator(_with_split(fitness, split)) for split in ("search", "test")}
        self.batch_size = fitness.options["batch_size"]
        self.tokenizer = AutoTokenizer.from_pretrained(BASE)
        self.materializer = Materializer([BASE, *EXPERTS], dtype="float32", device="cpu")
        self.genome = Genome(SearchSpace.load(REPO / "search_spaces" / "ps_ties_dare.yaml"), EXPERTS, BASE,
                             self.materializer.n_layers)

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        candidate = as_candidate(model, self.tokenizer, self.batch_size)
        return {split: evaluator.evaluate_items(candidate)[1].to_json() for split, evaluator in self.splits.items()}

    def source(self, path: str) -> dict[str, Any]:
        return self.score(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())

    def candidate(self, params: dict[str, float]) -> dict[str, Any]:
        return self.score(self.materializer.apply(self.genome.decode(params)))


def _with_split(fitness: FitnessSpec, split: str) -> FitnessSpec:
    return FitnessSpec(fitness.kind, fitness.objectives, fitness.scalarization, {**fitness.options, "split": split},
                       fitness.source)


def random_genomes(genome: Genome, n: int, rng: np.random.Generator) -> list[dict[str, float]]:
    dists = genome.distributions
    return [{k: float(rng.uniform(d.low, d.high)) for k, d in dists.items()} for _ in range(n)]


def neighbours(genome: Genome, centre: dict[str, float], n: int, rng: np.random.Generator) -> list[dict[str, float]]:
    dists = genome.distributions
    return [{k: float(np.clip(centre[k] + rng.normal(0, NEIGHBOUR_SD[i % len(NEIGHBOUR_SD)]) * (d.high - d.low),
                              d.low, d.high)) for k, d in dists.items()} for i in range(n)]


def build_matrix(folder: Path, n_random: int, n_neighbours: int, rebuild: bool) -> dict[str, Any]:
    """Every row scored once: rows already in the cache (same model or genome) are reused, and the
    cache grows row by row, so an interrupted or resized build resumes."""
    path = folder / "matrix.json"
    cached = {_key(r): r for r in json.loads(path.read_text())["rows"]} if path.exists() and not rebuild else {}
    data: dict[str, Any] = {"rows": []}
    scorer = Scorer()
    rng = np.random.default_rng(0)
    plan: list[tuple[str, Any]] = [("source", p) for p in (BASE, *EXPERTS)]
    plan += [("random", g) for g in random_genomes(scorer.genome, n_random, rng)]
    start = time.perf_counter()
    for kind, what in plan:
        _add_row(data, cached, kind, what, scorer, path)
    best = max((r for r in data["rows"] if r["kind"] == "random"), key=lambda r: _truth(r["search"]))
    for genome in neighbours(scorer.genome, best["params"], n_neighbours, np.random.default_rng(1)):
        _add_row(data, cached, "neighbour", genome, scorer, path)
    print(f"ground truth: {len(data['rows'])} rows x 600 items x 2 splits ({time.perf_counter() - start:.0f} s)")
    return data


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row["kind"], row.get("model") or row["params"]], sort_keys=True)


def _add_row(data: dict[str, Any], cached: dict[str, Any], kind: str, what: Any, scorer: Scorer, path: Path) -> None:
    row = {"kind": kind, **({"model": Path(what).name} if kind == "source" else {"params": what})}
    if _key(row) in cached:
        data["rows"].append(cached[_key(row)])
        return
    data["rows"].append({**row, **(scorer.source(what) if kind == "source" else scorer.candidate(what))})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _truth(results: dict[str, Any]) -> float:
    values = [v for task in ItemResults.from_json(results).values.values() for v in task["acc,none"]]
    return sum(values) / len(values)


def to_matrix(rows: list[dict[str, Any]], split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(rows, 600) answers in task order, and each task's columns."""
    parsed = [ItemResults.from_json(r[split]) for r in rows]
    sizes = {t: len(ids) for t, ids in parsed[0].ids.items()}
    offsets = np.cumsum([0, *sizes.values()])
    return answer_matrix(parsed, sizes, "acc,none"), {t: np.arange(offsets[k], offsets[k + 1]) for k, t in enumerate(sizes)}


# --- 2. replay -------------------------------------------------------------------------------

def metrics(estimate: np.ndarray, truth: np.ndarray, test: np.ndarray) -> dict[str, float]:
    top = truth >= np.quantile(truth, 0.75)
    pick, best = int(np.argmax(estimate)), int(np.argmax(truth))
    return {"spearman": _spearman(estimate, truth), "top_q": _spearman(estimate[top], truth[top]),
            "regret": 100 * (truth[best] - truth[pick]), "mae": 100 * float(np.mean(np.abs(estimate - truth))),
            "test_delta": 100 * (test[pick] - test[best])}


def _spearman(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Rank correlation; 0 for an estimate that ties every candidate (it ranks nothing)."""
    return float(spearmanr(estimate, truth).statistic) if np.ptp(estimate) > 0 else 0.0


class Replay:
    """Held-out candidates' answers, IRT estimators fitted on train rows, and each estimator as a
    function (n items, seed) -> estimated fitness of every held-out candidate."""

    def __init__(self, data: dict[str, Any]):
        rows = data["rows"]
        y, self.columns = to_matrix(rows, "search")
        y_test, _ = to_matrix(rows, "test")
        kinds = [r["kind"] for r in rows]
        randoms = [i for i, k in enumerate(kinds) if k == "random"]
        self.sources = [i for i, k in enumerate(kinds) if k == "source"]
        self.train = self.sources + randoms[0::2]
        self.held = randoms[1::2] + [i for i, k in enumerate(kinds) if k == "neighbour"]
        self.y, self.truth, self.test = y, y[self.held].mean(axis=1), y_test[self.held].mean(axis=1)
        self.sizes = {t: len(c) for t, c in self.columns.items()}
        self.irt = {"per task": fit_estimator(y[self.train], self.sizes),
                    "one ability": fit_estimator(y[self.train], self.sizes, per_task=False),
                    "sources only": fit_estimator(y[self.sources], self.sizes)}

    def random_subset(self, n: int, seed: int) -> np.ndarray:
        return np.sort(np.random.default_rng(seed).choice(self.y.shape[1], n, replace=False))

    def stratified_subset(self, n: int, seed: int) -> np.ndarray:
        chosen = choose_items(SubsetSpec(size=n, seed=seed), {t: [{}] * k for t, k in self.sizes.items()})
        return np.concatenate([self.columns[t][ids] for t, ids in chosen.items()])

    def plain_mean(self, seen: np.ndarray) -> np.ndarray:
        return self.y[np.ix_(self.held, seen)].mean(axis=1)

    def irt_estimate(self, estimator: IrtEstimator, seen: np.ndarray, kind: str) -> np.ndarray:
        """The fitness (size-weighted mean over tasks) of every held-out candidate from its answers on `seen`."""
        answers = np.full((len(self.held), self.y.shape[1]), np.nan)
        answers[:, seen] = self.y[np.ix_(self.held, seen)]
        per_task = estimator.estimates(answers)
        return sum(self.sizes[t] * e[kind] for t, e in per_task.items()) / self.y.shape[1]

    def estimators(self) -> dict[str, Callable[[int, int], np.ndarray]]:
        def irt(fit: str, kind: str, anchored: bool) -> Callable[[int, int], np.ndarray]:
            def estimate(n: int, seed: int) -> np.ndarray:
                if anchored:
                    estimator = self.irt[fit].with_anchors(n, seed)
                    return self.irt_estimate(estimator, np.array(sorted(estimator.anchor_weights)), kind)
                return self.irt_estimate(self.irt[fit], self.stratified_subset(n, seed), kind)
            return estimate

        return {
            "random subset (mean)": lambda n, s: self.plain_mean(self.random_subset(n, s)),
            "stratified subset (mean)": lambda n, s: self.plain_mean(self.stratified_subset(n, s)),
            "stratified + p-IRT": irt("per task", "p_irt", False),
            "stratified + gp-IRT": irt("per task", "gp_irt", False),
            "anchors (weighted mean)": irt("per task", "naive", True),
            "anchors + p-IRT": irt("per task", "p_irt", True),
            "anchors + gp-IRT": irt("per task", "gp_irt", True),
            "anchors + gp-IRT, one ability": irt("one ability", "gp_irt", True),
            "anchors + gp-IRT, sources-only fit": irt("sources only", "gp_irt", True),
            "stratified + gp-IRT, sources-only fit": irt("sources only", "gp_irt", False),
        }


def table(replay: Replay, seeds: int) -> None:
    head = f"{'estimator':<38} {'N':>4}  {'spearman':>8} {'top-q':>6} {'regret':>6} {'MAE':>5} {'test Δ':>6}"
    print(head)
    print("-" * len(head))
    full = metrics(replay.truth, replay.truth, replay.test)
    print(f"{'full split (reference)':<38} {replay.y.shape[1]:>4}  {full['spearman']:8.3f} {full['top_q']:6.3f} "
          f"{full['regret']:6.2f} {full['mae']:5.2f} {full['test_delta']:6.2f}")
    for name, estimate in replay.estimators().items():
        for n in SIZES:
            runs = [metrics(estimate(n, seed), replay.truth, replay.test) for seed in range(seeds)]
            m = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            print(f"{name:<38} {n:>4}  {m['spearman']:8.3f} {m['top_q']:6.3f} {m['regret']:6.2f} {m['mae']:5.2f} "
                  f"{m['test_delta']:6.2f}")


def race(replay: Replay, seed: int, items: list[tuple[str, int]], chunk: int, p_threshold: float,
         min_items: int) -> dict[str, float]:
    """A search's candidates in its order (exploration, then the late-search neighbours) raced
    against the best fully scored one so far; the winner is the best fully scored candidate."""
    steps = item_positions(replay.sizes)
    best: dict[int, float] | None = None
    best_row, used, pruned = 0, [], 0
    for k, row in enumerate(replay.held):
        answers = {s: float(replay.y[row, s]) for s in steps.values()}
        values: dict[int, float] = {}
        for part in chunks(race_order(seed, k, items), chunk):
            values.update({steps[(t, i)]: answers[steps[(t, i)]] for t, ids in part.items() for i in ids})
            if best is not None and should_prune(best, values, p_threshold, min_items):
                pruned += 1
                break
        else:
            if best is None or partial_mean(values) > partial_mean(best):
                best, best_row = values, k
        used.append(len(values))
    pick, top = best_row, int(np.argmax(replay.truth))
    return {"items": float(np.mean(used)), "pruned": 100 * pruned / len(replay.held),
            "regret": 100 * (replay.truth[top] - replay.truth[pick]), "test_delta": 100 * (replay.test[pick] - replay.test[top])}


def racing_table(replay: Replay, seeds: int) -> None:
    everything = [(t, i) for t, n in replay.sizes.items() for i in range(n)]
    print(f"\nracing replay: {len(replay.held)} held-out candidates in search order, Wilcoxon p < 0.1, chunks of 20, "
          f"at least 20 items; means over {seeds} seeds")
    head = f"{'items raced':<38} {'items/cand':>10} {'pruned %':>8} {'regret':>6} {'test Δ':>6}"
    print(head)
    print("-" * len(head))
    for label, items in (("full split (600)", lambda s: everything),
                         ("stratified subset of 200", lambda s: _subset_items(replay, 200, s)),
                         ("stratified subset of 100", lambda s: _subset_items(replay, 100, s))):
        runs = [race(replay, seed, items(seed), 20, 0.1, 20) for seed in range(seeds)]
        m = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        print(f"{label:<38} {m['items']:10.1f} {m['pruned']:8.1f} {m['regret']:6.2f} {m['test_delta']:6.2f}")


def _subset_items(replay: Replay, n: int, seed: int) -> list[tuple[str, int]]:
    chosen = choose_items(SubsetSpec(size=n, seed=seed), {t: [{}] * k for t, k in replay.sizes.items()})
    return [(t, i) for t, ids in chosen.items() for i in ids]


# --- 4. the search end to end ------------------------------------------------------------------

# Each fitness as the keys it adds to evaluators/zoo_target.yaml; N = 60 items is 1/10 of the split.
FITNESSES = {
    "full set": {},
    "fixed subset (60)": {"subset": {"size": 60}},
    "racing": {"racing": {}},
    "IRT, 60 anchors": {"estimator": {"kind": "irt", "anchors": 60}},
}


def search_config(folder: Path, label: str, keys: dict[str, Any], seed: int, items: int) -> Path:
    """A DARE-TIES search of the zoo's experts (runs/demo.yaml's) with this fitness, stopped by an item budget."""
    name = "".join(c if c.isalnum() else "_" for c in label) + f"_s{seed}"
    fitness = {**load_yaml_mapping(REPO / "evaluators" / "zoo_target.yaml", "fitness spec"), **keys,
               "include_path": str(REPO / "evaluators" / "tasks")}  # the spec is written outside evaluators/
    (folder / f"{name}.fitness.yaml").write_text(yaml.safe_dump(fitness))
    demo = load_yaml_mapping(REPO / "runs" / "demo.yaml", "run config")
    config = {**demo, "name": name, "fitness": str(folder / f"{name}.fitness.yaml"), "seed": seed, "device": "cpu",
              "budget": {"n_trials": 100_000, "items": items}, "storage": f"sqlite:///{folder / name}.db"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def end_to_end(folder: Path, items: int, seeds: int) -> list[dict[str, Any]]:
    """Every fitness x seed searched to the same item budget; its winner (best by the scalarization)
    scored on the test split through the held-out path (`evomerge evaluate`). Resumes finished runs."""
    from evomerge.config import load_config
    from evomerge.search.held_out import choose_trials, evaluate_held_out
    from evomerge.search.loop import Search

    folder.mkdir(parents=True, exist_ok=True)
    test_spec = FitnessSpec.load(REPO / "evaluators" / "zoo_target_test.yaml")
    test = LmEvalEvaluator(test_spec)
    runs = []
    for label, keys in FITNESSES.items():
        for seed in range(seeds):
            start = time.perf_counter()
            config = load_config(search_config(folder, label, keys, seed, items))
            with _quiet_optuna():
                search = Search(config)
                search.run()
            trials = search.study.get_trials(deepcopy=False)
            best = choose_trials(config, search.study, 1, None)[0]
            held = evaluate_held_out(config, search.study, test_spec, [best], search.backend, test, sources=False)
            runs.append({"fitness": label, "seed": seed, "items": search.items_evaluated(),
                         "finished": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
                         "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                         "test": held.trials[best.number]["scores"]["zoo_target/acc"],
                         "seconds": time.perf_counter() - start})
            print(f"  {label}, seed {seed}: {runs[-1]['finished']} trials ({runs[-1]['pruned']} pruned), "
                  f"{runs[-1]['items']} items, winner trial {best.number} test {100 * runs[-1]['test']:.1f}% "
                  f"({runs[-1]['seconds']:.0f} s)", flush=True)
    return runs


def end_to_end_table(runs: list[dict[str, Any]], items: int) -> None:
    """Per fitness: items per finished trial and the winner's test accuracy, mean over seeds with
    its standard error and 95% t interval; the test split's own binomial SE is ~1.8 points."""
    print(f"\nsearch end to end: DARE-TIES over the zoo's experts (CMA-ES), budget {items} evaluated items per run; "
          f"winner = best trial by the scalarization, scored on the 600 test-split items")
    head = (f"{'fitness':<22} {'seeds':>5} {'trials':>6} {'items/trial':>11} {'cut':>5} {'pruned %':>8} "
            f"{'test acc %':>10} {'SE':>5} {'95% CI':>13}")
    print(head)
    print("-" * len(head))
    full_per_trial = None
    for label in FITNESSES:
        rows = [r for r in runs if r["fitness"] == label]
        finished = sum(r["finished"] for r in rows)
        per_trial = sum(r["items"] for r in rows) / finished
        full_per_trial = full_per_trial or per_trial
        acc = 100 * np.array([r["test"] for r in rows])
        se = float(acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else float("nan")
        half = float(t_dist.ppf(0.975, len(acc) - 1)) * se if len(acc) > 1 else float("nan")
        pruned = 100 * sum(r["pruned"] for r in rows) / finished
        print(f"{label:<22} {len(rows):>5} {finished / len(rows):6.1f} {per_trial:11.1f} {full_per_trial / per_trial:4.1f}x "
              f"{pruned:8.1f} {acc.mean():10.2f} {se:5.2f} {acc.mean() - half:6.2f}-{acc.mean() + half:<6.2f}")


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=100, help="random DARE-TIES genomes")
    parser.add_argument("--neighbours", type=int, default=50, help="small steps around the best random genome")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--rebuild", action="store_true", help="score the ground truth again")
    parser.add_argument("--part", choices=("replay", "search", "all"), default="all",
                        help="the offline replay (1-3), the searches end to end (4), or both")
    parser.add_argument("--items", type=int, default=6000, help="item budget of each search (--quick: 1200)")
    parser.add_argument("--search-seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="searches of 1200 items each (~40 min on 2 busy cores)")
    parser.add_argument("--smoke", action="store_true", help="3 random + 1 neighbour rows, 1 seed, 120-item searches")
    args = parser.parse_args()
    os.chdir(REPO)
    folder = OUT.parent / "smoke" / OUT.name if args.smoke else OUT
    if args.smoke:
        args.random, args.neighbours, args.seeds, args.search_seeds, args.items = 3, 1, 1, 1, 120
    if args.part != "search":
        replay_part(args, folder)
    if args.part != "replay":
        items = 1200 if args.quick else args.items
        start = time.perf_counter()
        runs = end_to_end(folder / f"search_{items}", items, args.search_seeds)
        end_to_end_table(runs, items)
        print(f"searches {time.perf_counter() - start:.0f} s")


def replay_part(args: argparse.Namespace, folder: Path) -> None:
    data = build_matrix(folder, args.random, args.neighbours, args.rebuild)
    start = time.perf_counter()
    replay = Replay(data)
    truth = replay.truth
    print(f"held-out: {len(replay.held)} candidates (fitness {100 * truth.min():.1f}-{100 * truth.max():.1f}, "
          f"top quartile >= {100 * np.quantile(truth, 0.75):.1f}); IRT fitted on {len(replay.train)} rows "
          f"(4 sources + {len(replay.train) - 4} random); values are means over {args.seeds} seeds, in points")
    table(replay, args.seeds)
    racing_table(replay, args.seeds)
    print(f"replay {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
