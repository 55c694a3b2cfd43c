"""Cheaper fitness in real searches on the zoo (lm-eval tasks, SQLite studies): per-item results
on every trial, the study's seeded subset, racing (PRUNED with a paired estimate, what CMA-ES is
told), IRT estimates refitted as the study grows, and `evomerge evaluate` (held-out results).

Candidates are enqueued by hand so that the races are decided by construction: expert_rev alone
(weight 1 on it, the others 0: ~99% on zoo_rev) against the base model (every weight 0: ~57%)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.config import load_config
from evomerge.errors import EvomergeError
from evomerge.fitness.irt import IrtEstimator
from evomerge.fitness.items import ItemResults, parse_ranges
from evomerge.search.attrs import ESTIMATE, HELD_OUT, IRT, IRT_ROWS, ITEMS, ITEM_RESULTS, MEASURED, STUDY_ITEMS
from evomerge.search.cma_sampler import _slot_outcome
from evomerge.search.loop import Search
from evomerge.search.scoring import make_scoring
from reliability.harness import write_config

REPO = Path(__file__).resolve().parents[1]
TASKS = str(REPO / "evaluators" / "tasks")  # the specs are written outside evaluators/
REV = {"kind": "lm_eval", "tasks": ["zoo_rev"], "split": "search", "batch_size": 64, "include_path": TASKS,
       "objectives": [{"name": "rev", "metric": "zoo_rev/acc"}], "scalarization": {"rev": 1.0}}
EXPERT_REV = {"weight/s0": 1.0, "density/s0": 1.0, "weight/s1": 0.0, "density/s1": 1.0, "weight/s2": 0.0,
              "density/s2": 1.0}
BASE_ONLY = {**EXPERT_REV, "weight/s0": 0.0}
RACING = {"chunk": 10, "min_items": 10, "p_threshold": 0.1}


def config_for(folder: Path, zoo: Path, fitness: dict, name: str = "t", **extra) -> Path:
    spec = folder / f"{name}.fitness.yaml"
    spec.write_text(yaml.safe_dump(fitness))
    return write_config(folder, zoo, name=name, sampler="random", fitness=str(spec), **extra)


def plain_json(value) -> bool:
    """Only what JSON itself holds (no numpy scalars, no pickled objects)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_json(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def run_enqueued(search: Search, *params: dict) -> list[dict]:
    for p in params:
        search.study.enqueue_trial(p)
    return [search.run_one() for _ in params]


def trial(search: Search, number: int):
    return next(t for t in search.study.get_trials(deepcopy=False) if t.number == number)


def acc(trial_attrs: dict) -> list[float]:
    results = ItemResults.from_json(trial_attrs[ITEM_RESULTS])
    return [v for task in results.values.values() for v in task["acc,none"]]


# ------------------------------------------------------------------ a raced study on a subset

@pytest.fixture(scope="module")
def raced(tmp_path_factory, zoo):
    """zoo_rev on a seeded subset of 60, raced in chunks of 10: expert_rev (fully scored), then the
    base model (clearly worse: pruned)."""
    folder = tmp_path_factory.mktemp("raced")
    path = config_for(folder, zoo, {**REV, "subset": {"size": 60, "seed": 3}, "racing": RACING})
    search = Search(load_config(path))
    records = run_enqueued(search, EXPERT_REV, BASE_ONLY)
    return path, search, records


def test_every_trial_stores_its_items_as_plain_json_whose_mean_is_the_score(raced):
    _, search, records = raced
    full = trial(search, 0)
    assert full.state == TrialState.COMPLETE and records[0]["items"] == full.user_attrs[ITEMS] == 60
    assert plain_json(full.user_attrs[ITEM_RESULTS]) and plain_json(search.study.user_attrs[STUDY_ITEMS])
    values = acc(full.user_attrs)
    assert len(values) == 60 and np.mean(values) == pytest.approx(full.user_attrs["scores"]["zoo_rev/acc"])
    pruned = trial(search, 1)  # a pruned trial's scores are lm-eval's on the items it saw
    assert np.mean(acc(pruned.user_attrs)) == pytest.approx(pruned.user_attrs["scores"]["zoo_rev/acc"])
    for source in search.study.user_attrs["evomerge:sources"].values():
        assert source[ITEMS] == 60 and np.mean(acc(source)) == pytest.approx(source["scores"]["zoo_rev/acc"])


def test_the_subset_is_stored_at_creation_and_every_trial_sees_only_it(raced):
    _, search, _ = raced
    stored = parse_ranges(search.study.user_attrs[STUDY_ITEMS]["subset"]["zoo_rev"])
    assert len(stored) == 60 == len(set(stored)) and all(0 <= i < 200 for i in stored)
    assert stored == sorted(search.evaluator.subset["zoo_rev"])  # the spec's seeded choice
    assert ItemResults.from_json(trial(search, 0).user_attrs[ITEM_RESULTS]).ids == {"zoo_rev": stored}
    assert set(ItemResults.from_json(trial(search, 1).user_attrs[ITEM_RESULTS]).ids["zoo_rev"]) < set(stored)


def test_a_resumed_run_or_second_worker_reads_the_stored_subset_back(raced):
    path, search, _ = raced
    stored = search.study.user_attrs[STUDY_ITEMS]
    other = sorted(set(range(200)) - set(parse_ranges(stored["subset"]["zoo_rev"])))[:60]
    search.study.set_user_attr(STUDY_ITEMS, {**stored, "subset": {"zoo_rev": ",".join(map(str, other))}})
    config = load_config(path)  # a resumed run or another worker reads the study's items as Search does here
    try:  # the stored ids win over choosing again: a second worker would use these, not its own choice
        assert make_scoring(config, search.evaluator, search.study, search.db).subset == {"zoo_rev": other}
    finally:
        search.study.set_user_attr(STUDY_ITEMS, stored)
    again = make_scoring(config, search.evaluator, search.study, search.db)
    assert again.subset == {"zoo_rev": parse_ranges(stored["subset"]["zoo_rev"])}


def test_changing_the_subset_of_a_study_is_a_fingerprint_change(raced):
    path = raced[0]
    changed = yaml.safe_load(path.read_text())
    spec = yaml.safe_load(Path(changed["fitness"]).read_text())
    spec["subset"]["seed"] = 4
    changed["fitness"] = str(path.with_name("changed.fitness.yaml"))
    Path(changed["fitness"]).write_text(yaml.safe_dump(spec))
    path.with_name("changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(EvomergeError, match="fitness") as info:
        Search(load_config(path.with_name("changed.yaml")))
    assert "subset" in str(info.value) and "\n" not in str(info.value)


def test_racing_prunes_the_clearly_worse_candidate_with_a_paired_estimate(raced):
    _, search, records = raced
    best, pruned = trial(search, 0), trial(search, 1)
    assert records[1]["state"] == "PRUNED" and pruned.state == TrialState.PRUNED
    seen = ItemResults.from_json(pruned.user_attrs[ITEM_RESULTS])
    assert RACING["min_items"] <= pruned.user_attrs[ITEMS] == seen.n_items < 60
    assert pruned.user_attrs[ITEMS] % RACING["chunk"] == 0  # stopped at a chunk's end
    # by hand: the reference's mean on all 60 items + the mean difference on the items the candidate saw
    ref = ItemResults.from_json(best.user_attrs[ITEM_RESULTS]).metric("zoo_rev", "acc,none")
    mine = seen.metric("zoo_rev", "acc,none")
    expected = np.mean(list(ref.values())) + np.mean([v - ref[i] for i, v in mine.items()])
    assert pruned.user_attrs[ESTIMATE] == pytest.approx(expected) == records[1]["value"]
    assert pruned.user_attrs[ESTIMATE] < best.value


def test_cma_es_is_told_a_pruned_trials_estimate(raced):
    _, search, _ = raced
    pruned = trial(search, 1)
    assert _slot_outcome([pruned], -1.0) == pytest.approx(-pruned.user_attrs[ESTIMATE])  # maximized: negated
    assert _slot_outcome([trial(search, 0)], -1.0) == pytest.approx(-trial(search, 0).value)


def test_a_pruned_trial_stays_out_of_the_archive_unless_asked(raced):
    from evomerge.search.report import archive_entries

    path, search, _ = raced
    config = load_config(path)
    assert [e.number for e in archive_entries(config, search.study)] == [0]
    assert {e.number for e in archive_entries(config, search.study, estimates=True)} >= {0}


# ------------------------------------------------------------------ evomerge evaluate

def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def held_out_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "rev_test.yaml"
    path.write_text(yaml.safe_dump({**REV, "split": "test", "limit": 20}))
    return path


def test_evaluate_stores_held_out_results_per_trial_and_spec_and_reports_show_them(raced, held_out_spec):
    path = raced[0]
    top = cli("evaluate", str(path), "--top", "1", "--fitness", str(held_out_spec))
    assert top.returncode == 0, top.stderr[-2000:]
    assert "held-out rev_test" in top.stdout and "trial 0" in top.stdout
    chosen = cli("evaluate", str(path), "--trials", "0,1", "--fitness", str(held_out_spec))
    assert chosen.returncode == 0 and "5 result(s) stored earlier reused" in chosen.stdout  # 4 sources, trial 0
    study = load_config(path)
    import optuna

    attrs = optuna.load_study(study_name=study.study_name, storage=study.storage).user_attrs
    for number in (0, 1):
        result = attrs[f"{HELD_OUT}{number}/rev_test"]
        assert plain_json(result) and result[ITEMS] == 20
        assert np.mean(acc(result)) == pytest.approx(result["scores"]["zoo_rev/acc"])
        assert ItemResults.from_json(result[ITEM_RESULTS]).ids == {"zoo_rev": list(range(20))}  # test split, limit
    assert attrs[f"{HELD_OUT}0/rev_test"]["scores"]["zoo_rev/acc"] > attrs[f"{HELD_OUT}1/rev_test"]["scores"]["zoo_rev/acc"]
    assert set(attrs[f"{HELD_OUT}sources/rev_test"]) == {str(Path(r)) for r in [study.base_model, *study.models]}
    status, archive = cli("status", str(path)), cli("archive", str(path))
    assert "held-out rev_test: trial 0" in status.stdout and "items evaluated:" in status.stdout
    assert "rev_test" in archive.stdout
    assert json.loads(cli("archive", str(path), "--json").stdout)[0]["held_out"]["rev_test"]


@pytest.mark.parametrize("args, message", [
    (["--trials", "7"], "has no trial 7 with a recipe"),
    (["--fitness", "no/such/spec.yaml"], "no/such/spec.yaml"),
])
def test_evaluate_refuses_bad_input_in_one_line(raced, held_out_spec, args, message):
    path = raced[0]
    fitness = [] if "--fitness" in args else ["--fitness", str(held_out_spec)]
    done = cli("evaluate", str(path), *fitness, *args)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


# ------------------------------------------------------------------ IRT refitted as the study grows

@pytest.fixture(scope="module")
def irt(tmp_path_factory, zoo):
    """zoo_rev's whole split, raced in chunks of 50 with IRT estimates refitted after every fully
    scored trial: two variants of expert_rev (fully scored), then the base model (pruned)."""
    folder = tmp_path_factory.mktemp("irt")
    fitness = {**REV, "racing": {**RACING, "chunk": 50, "min_items": 10}, "estimator": {"kind": "irt", "refit_every": 1}}
    search = Search(load_config(config_for(folder, zoo, fitness)))
    fits = []
    for params in (EXPERT_REV, {**EXPERT_REV, "density/s0": 0.9}, BASE_ONLY):
        run_enqueued(search, params)
        fits.append(search.study.user_attrs[IRT])
    return search, fits


def test_the_irt_fit_is_stored_as_plain_numbers_and_refitted_as_fully_scored_trials_arrive(irt):
    search, fits = irt
    assert [fit["rows"] for fit in fits] == [4, 5, 6]  # the 4 sources, then each fully scored trial
    assert all(plain_json(fit) for fit in fits)
    assert fits[0]["estimator"]["model"]["b"] != fits[1]["estimator"]["model"]["b"]
    assert len(fits[0]["estimator"]["model"]["b"]) == 200
    assert [trial(search, n).user_attrs[IRT_ROWS] for n in range(3)] == [4, 5, 6]


def test_trials_carry_estimates_from_the_stored_fit(irt):
    search, fits = irt
    full, pruned = trial(search, 0), trial(search, 2)
    assert full.user_attrs[ITEMS] == 200 and MEASURED not in full.user_attrs  # every item seen: scores are measured
    assert np.mean(acc(full.user_attrs)) == pytest.approx(full.user_attrs["scores"]["zoo_rev/acc"])
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs[ITEMS] < 200
    measured = pruned.user_attrs[MEASURED]["zoo_rev/acc"]
    assert measured == pytest.approx(np.mean(acc(pruned.user_attrs)))
    # the stored numbers alone reproduce the trial's estimate (a fresh estimator from the study's JSON)
    estimator = IrtEstimator.from_json(fits[2]["estimator"])
    again = estimator.estimate(ItemResults.from_json(pruned.user_attrs[ITEM_RESULTS]), "acc,none")["zoo_rev"]
    assert pruned.user_attrs["scores"]["zoo_rev/acc"] == pytest.approx(again["acc,none"])
    assert pruned.user_attrs[ESTIMATE] == pytest.approx(pruned.user_attrs["scores"]["zoo_rev/acc"])
    assert 0.0 < pruned.user_attrs[ESTIMATE] < full.value
