"""Soak test of kill-and-resume: SIGKILL `evomerge run` 20+ times, resume each time, and compare
the study with an uninterrupted run of the same seed.

    python bench/soak.py [--kills 24] [--sampler cmaes|nsga2|random|tpe] [--seed 0]
    python bench/soak.py --smoke    # one kill (in the sample phase), 6 trials: that it runs, not a soak

Kills alternate between a trial held in one phase (EVOMERGE_FAULT sleep in sample, materialize,
evaluate or store) and an arbitrary moment (a random delay after the next trial starts). Each
killed process first finishes the retry of the trial killed before it, so no candidate is killed
twice (a candidate whose worker dies twice is given up: it could be what kills workers). Prints
kills survived, completed trials lost (must be 0), trials evaluated twice (must be 0) and whether
the Pareto archive equals the uninterrupted run's; exits 1 if any of them is wrong. Outputs
(configs, SQLite studies) go to bench/out/soak/.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.chdir(REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reliability.harness import (KILL_PHASES, Audit, archive_key, completed_sequence, evaluated_twice,  # noqa: E402
                                 kill_after, kill_in_phase, run_cli, trials_of, write_config)

SAMPLER_OPTIONS = {"cmaes": {"popsize": 6}, "nsga2": {"population_size": 8}, "random": {}, "tpe": {}}


def n_complete(path: Path) -> int:
    return sum(t.state.name == "COMPLETE" for t in trials_of(path))


def soak(path: Path, kills: int, rng: random.Random) -> tuple[int, Audit]:
    """Kill the run `kills` times (survived = kills after which the study resumed); returns the count and the audit."""
    audit, survived = Audit(), 0
    for i in range(kills):
        if i % 2 == 0:
            how, killed = f"held in {KILL_PHASES[i // 2 % 4]}", kill_in_phase(path, KILL_PHASES[i // 2 % 4], nth=2)
        else:
            delay = rng.uniform(0.0, 0.5)
            how, killed = f"{delay:.2f} s into a trial", kill_after(path, n_complete(path) + 1, delay)
        audit.record(path)
        survived += killed
        print(f"kill {i + 1:2d}: {how:28s} {'killed' if killed else 'finished first'}; {n_complete(path)} complete",
              flush=True)
    return survived, audit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--sampler", default="cmaes", choices=sorted(SAMPLER_OPTIONS))
    parser.add_argument("--seed", type=int, default=0, help="chooses the kill delays (the search seed is 0)")
    parser.add_argument("--smoke", action="store_true", help="one kill, random sampler, under bench/out/smoke/")
    args = parser.parse_args()
    if args.smoke:
        args.kills, args.sampler = 1, "random"
    out = REPO / "bench" / "out" / ("smoke/soak" if args.smoke else "soak")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sampler = {"name": args.sampler, **SAMPLER_OPTIONS[args.sampler]}
    n = 2 * args.kills + (4 if args.smoke else 16)  # a killed process completes one trial or more first
    zoo = Path("evomerge/zoo_models")
    straight, killed = (write_config(out, zoo, name, sampler, n) for name in ("straight", "killed"))
    start = time.perf_counter()
    assert run_cli(straight).wait() == 0
    print(f"uninterrupted: {n} trials ({args.sampler}) in {time.perf_counter() - start:.0f} s", flush=True)
    survived, audit = soak(killed, args.kills, random.Random(args.seed))
    assert run_cli(killed).wait() == 0
    lost, twice = audit.lost(killed), evaluated_twice(killed)
    same_archive = archive_key(killed) == archive_key(straight)
    same_sequence = completed_sequence(killed) == completed_sequence(straight)
    print(f"kills survived: {survived}/{args.kills}")
    print(f"completed trials lost: {len(lost)}{f' {lost}' if lost else ''}")
    print(f"trials evaluated twice: {twice}")
    print(f"archive equal to uninterrupted run: {'yes' if same_archive else 'no'}")
    print(f"completed trials identical and in the same order: {'yes' if same_sequence else 'no'}")
    return 0 if (survived == args.kills and not lost and twice == 0 and same_archive and same_sequence) else 1


if __name__ == "__main__":
    sys.exit(main())
