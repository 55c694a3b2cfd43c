"""SIGKILL in each phase of a trial (held there by EVOMERGE_FAULT), resume, and the study ends
as an uninterrupted run with the same seed: same completed trials in the same order, nothing
lost, nothing evaluated twice, same Pareto archive; on both backends (vLLM where it is installed: one engine
start per process). `python bench/soak.py` does 20+ kills.
(Kills at arbitrary moments for CMA-ES and NSGA-II: tests/test_search.py.)"""

from __future__ import annotations

import pytest

from reliability.harness import (BACKENDS, KILL_PHASES, Audit, archive_key, completed_sequence, evaluated_twice,
                                 kill_in_phase, need_backend, run_to_end, write_config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_in_every_phase_resumes_to_the_uninterrupted_search(tmp_path, zoo, backend):
    need_backend(backend)
    sampler, n = {"name": "nsga2", "population_size": 4}, 7
    straight = write_config(tmp_path, zoo, "straight", sampler, n, backend=backend)
    run_to_end(straight, backend)
    killed = write_config(tmp_path, zoo, "killed", sampler, n, backend=backend)
    audit = Audit()
    # vLLM: the phases where its engine holds the trial (weights swapped in, then scored); sampling and storing
    # are the search loop's, the same on both backends and killed on HF (one engine start per kill, ~25 s)
    phases = KILL_PHASES if backend == "hf" else ("materialize", "evaluate")
    for phase in phases:  # each process first completes the retry of the trial killed before
        assert kill_in_phase(killed, phase, nth=2), phase
        audit.record(killed)
    run_to_end(killed, backend)
    assert completed_sequence(killed) == completed_sequence(straight)
    assert audit.lost(killed) == [] and evaluated_twice(killed) == 0
    assert archive_key(killed) == archive_key(straight)
