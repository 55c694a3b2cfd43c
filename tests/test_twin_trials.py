"""Two workers can be handed the very same params at once (NSGA-II's children often copy a parent;
`python bench/workers.py --sampler nsga2` once evaluated one set twice with 4 workers): the later
trial waits for the earlier one and copies its result instead of evaluating it again."""

from __future__ import annotations

import os
import threading
import time

import pytest
from optuna.trial import TrialState

from evomerge.config import load_config
from evomerge.search.attrs import SAMPLED, WORKER
from evomerge.search.loop import Search
from evomerge.search.workers import HOST
from reliability.harness import write_config


@pytest.fixture(scope="module")
def search(tmp_path_factory, zoo):
    folder = tmp_path_factory.mktemp("twins")
    return Search(load_config(write_config(folder, zoo, sampler="random", n_trials=10)))


def _running(search: Search, params: dict[str, float]):
    """A trial running `params`, sampled and claimed by a live worker on this host (as another
    worker's would be)."""
    search.study.enqueue_trial(params)
    trial = search.study.ask()
    for name, distribution in search.genome.distributions.items():
        trial.suggest_float(name, distribution.low, distribution.high)
    storage, trial_id = search.db.storage, trial._trial_id
    storage.set_trial_system_attr(trial_id, WORKER, {"host": HOST, "pid": os.getpid()})
    storage.set_trial_system_attr(trial_id, SAMPLED, True)
    return trial


def test_a_trial_waits_for_its_running_twin_and_copies_it(search):
    params = {name: (d.low + d.high) / 3 for name, d in search.genome.distributions.items()}
    first, second = _running(search, params), _running(search, params)
    objectives = {"rev": 0.25, "srt": 0.5, "cae": 0.75}

    def finish_first() -> None:
        time.sleep(1.0)
        first.set_user_attr("objectives", objectives)
        first.set_user_attr("scores", objectives)
        search.study.tell(first, search.config.fitness.scalarize(objectives))  # a single-objective study

    finisher = threading.Thread(target=finish_first)
    start = time.monotonic()
    finisher.start()
    assert search._twin(first) is None  # the earlier twin never waits for the later one
    scored = search._copied(second)
    finisher.join()
    assert time.monotonic() - start >= 1.0
    assert scored is not None and scored.objectives == objectives
    trials = {t.number: t for t in search.study.get_trials(deepcopy=False)}
    assert trials[second.number].user_attrs["copy_of"] == first.number
    assert trials[first.number].state == TrialState.COMPLETE


def test_a_twin_that_fails_is_not_copied(search):
    params = {name: (d.low + 2 * d.high) / 3 for name, d in search.genome.distributions.items()}
    first, second = _running(search, params), _running(search, params)
    finisher = threading.Timer(0.5, lambda: search.study.tell(first, state=TrialState.FAIL))
    finisher.start()
    assert search._copied(second) is None  # evaluated by this worker, then
    finisher.join()
