"""Injected failures (EVOMERGE_FAULT): a candidate that runs out of memory, scores NaN or
raises fails its own trial with the reason, memory returns to its baseline, and the study
finishes its budget. Also: a candidate identical to a completed one is copied, not re-scored."""

from __future__ import annotations

import gc

import pytest
import torch
from optuna.trial import TrialState

from evomerge import faults
from evomerge.config import load_config
from evomerge.errors import EvomergeError
from evomerge.search.loop import Search
from reliability.harness import trials_of, write_config


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_rules_parse_and_a_bad_rule_is_a_user_error():
    assert faults.parse("trial=3:oom; nth=2:sleep@store=1.5; trial=*:nan") == [
        faults.Rule("trial", 3, "oom", "evaluate", 3600.0), faults.Rule("nth", 2, "sleep", "store", 1.5),
        faults.Rule("*", -1, "nan", "evaluate", 3600.0)]
    for bad in ("trial=3", "trial=x:oom", "trial=1:melt", "trial=1:oom@lunch", "nth=*:oom"):
        with pytest.raises(EvomergeError, match="EVOMERGE_FAULT: cannot read rule"):
            faults.parse(bad)


@pytest.fixture(scope="module")
def search(tmp_path_factory, zoo):
    folder = tmp_path_factory.mktemp("faults")
    return Search(load_config(write_config(folder, zoo, sampler="random", n_trials=2)))


def test_failing_candidates_fail_their_trials_release_memory_and_the_study_finishes(search, monkeypatch):
    search.run()  # two good trials: the process is warm, its memory is the baseline
    gc.collect()
    rss, cuda = rss_mib(), torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    monkeypatch.setenv(faults.ENV, "trial=2:oom; trial=3:nan; trial=4:error; trial=5:oom@materialize; trial=6:oom")
    search.config.n_trials = 4
    search.run()
    trials = trials_of(search.config.path)
    errors = {t.number: t.user_attrs["error"] for t in trials if t.state == TrialState.FAIL}
    assert sorted(errors) == [2, 3, 4, 5, 6] and sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert errors[2].startswith("OutOfMemoryError: injected out of memory")
    assert errors[3].startswith("FloatingPointError: non-finite objective(s)")
    assert errors[4].startswith("RuntimeError: injected evaluator error")
    assert all(t.user_attrs["failure"] == "candidate" and "recipe" in t.user_attrs for t in trials if t.number in errors)
    params = [tuple(t.params.values()) for t in trials]
    assert len(set(params)) == len(params)  # the trial after a failed one is a new candidate
    gc.collect()
    assert rss_mib() - rss < faults.OOM_BYTES / 2**20, "three injected OOMs of 64 MiB each left memory behind"
    if torch.cuda.is_available():
        assert torch.cuda.memory_allocated() <= cuda


def test_a_candidate_already_scored_is_copied_not_evaluated(search):
    done = [t for t in trials_of(search.config.path) if t.state == TrialState.COMPLETE]
    search.study.enqueue_trial(done[0].params)
    search.config.n_trials = len(done) + 1
    search.run()
    copy = trials_of(search.config.path)[-1]
    assert copy.state == TrialState.COMPLETE and copy.user_attrs["copy_of"] == done[0].number
    assert copy.user_attrs["objectives"] == done[0].user_attrs["objectives"]
    assert copy.user_attrs["timings"]["evaluate_s"] == 0.0


def test_ctrl_c_fails_the_trial_as_not_the_candidates_fault_and_enqueues_its_retry(search, monkeypatch):
    def interrupt(recipe, trial):
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "score", interrupt)
    search.config.n_trials += 1
    with pytest.raises(KeyboardInterrupt):
        search.run()
    *_, stopped, retry = trials_of(search.config.path)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs == {"error": "interrupted"}
    assert retry.state == TrialState.WAITING and retry.params == stopped.params and retry.user_attrs == {}
