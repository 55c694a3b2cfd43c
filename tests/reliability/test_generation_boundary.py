"""NSGA-II killed while sampling the first trial of a generation: the retry must propose what the
killed trial would have. Optuna orders a generation's parents by elite rank when it first computes
them and by trial id when it reads them back from the study, and its tournament picks parents by
position: without care the retry (which finds them cached) draws another child. Found by
`python bench/soak.py --sampler nsga2`, where a kill happened to land on a generation's first trial."""

from __future__ import annotations

from evomerge.cli import main
from reliability.harness import Audit, archive_key, completed_sequence, evaluated_twice, kill_in_phase, write_config

POPULATION = 4


def test_a_kill_on_a_generations_first_trial_resumes_to_the_uninterrupted_search(tmp_path, zoo):
    sampler, n = {"name": "nsga2", "population_size": POPULATION}, POPULATION + 3
    straight = write_config(tmp_path, zoo, "straight", sampler, n)
    assert main(["run", str(straight), "--quiet"]) == 0
    killed = write_config(tmp_path, zoo, "killed", sampler, n)
    audit = Audit()
    assert kill_in_phase(killed, "sample", nth=POPULATION + 1)  # generation 1's first trial, its parents just chosen
    audit.record(killed)
    assert main(["run", str(killed), "--quiet"]) == 0
    assert completed_sequence(killed) == completed_sequence(straight)
    assert audit.lost(killed) == [] and evaluated_twice(killed) == 0
    assert archive_key(killed) == archive_key(straight)
