"""Several `evomerge run` workers on one PostgreSQL study vs one worker: wall time and checks.

    python bench/workers.py [--workers 4] [--trials 48] [--sampler cmaes|nsga2|random|tpe]
    python bench/workers.py --smoke    # 2 workers, 4 trials: that it runs (tests/test_benches.py), not a figure

Starts a throwaway PostgreSQL server (tests/reliability/pg.py: needs PostgreSQL's binaries and,
as root, the `postgres` user), then runs the same search with 1 worker and with N workers, each
on a fresh database. The fitness is the zoo's with 8 examples (~0.05 s a candidate) and one
torch thread per worker, so the difference shows coordination (slot locks, waiting for a
CMA-ES generation, process start-up), not a faster search. Prints, per run: wall time from
launch to the last exit, the study's span (first trial start to last completion), trials
completed, trials evaluated twice (must be 0) and trial numbers that are not unique (must be 0);
exits 1 if a worker failed or a check is wrong, 3 if no PostgreSQL server can start here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.chdir(REPO)
os.environ.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})

import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from reliability.harness import FAST_FITNESS, evaluated_twice, run_cli, trials_of, write_config  # noqa: E402
from reliability.pg import Cluster, Unavailable  # noqa: E402

NO_SERVER = 3  # exit status when no PostgreSQL server can start here (tests/test_benches.py skips on it)

SAMPLER_OPTIONS = {"cmaes": {}, "nsga2": {"population_size": 8}, "random": {}, "tpe": {}}


def run(cluster: Cluster, out: Path, workers: int, sampler: dict, n: int) -> bool:
    """One search with `workers` processes; whether every worker succeeded and the checks hold."""
    folder = out / f"w{workers}"
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, Path("evomerge/zoo_models"), f"w{workers}", sampler, n,
                        storage=cluster.create_database(f"{sampler['name']}_w{workers}"))
    (folder / "fitness.yaml").write_text(yaml.safe_dump({**FAST_FITNESS, "n_examples": 8}))
    start = time.perf_counter()
    procs = [run_cli(path) for _ in range(workers)]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    failed = [o.strip().splitlines()[-1] for p, o in zip(procs, outputs) if p.returncode != 0]
    trials = trials_of(path)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in trials)).total_seconds()
    numbers = [t.number for t in trials]
    print(f"{workers} worker(s): wall {wall:6.1f} s, study span {span:6.1f} s ({span / len(done):.3f} s/trial), "
          f"{len(done)}/{n} complete, {len(trials) - len(done)} other trials, evaluated twice {evaluated_twice(path)}, "
          f"duplicate numbers {len(numbers) - len(set(numbers))}{f', FAILED: {failed}' if failed else ''}", flush=True)
    return not failed and len(done) == n and evaluated_twice(path) == 0 and len(numbers) == len(set(numbers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--sampler", default="cmaes", choices=sorted(SAMPLER_OPTIONS))
    parser.add_argument("--smoke", action="store_true", help="2 workers, 4 trials, under bench/out/smoke/")
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.trials = 2, 4
    sampler = {"name": args.sampler, **SAMPLER_OPTIONS[args.sampler]}
    out = REPO / "bench" / "out" / ("smoke/workers" if args.smoke else "workers")
    try:
        cluster = Cluster()
    except Unavailable as exc:
        print(f"no PostgreSQL server: {exc}")
        return NO_SERVER
    try:
        print(f"{args.sampler}, {args.trials} trials, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}")
        ok = [run(cluster, out, workers, sampler, args.trials) for workers in (1, args.workers)]
    finally:
        cluster.stop()
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
