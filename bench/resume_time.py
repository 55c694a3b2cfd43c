"""How long a large study takes to resume: from `evomerge run CONFIG` to its first new proposal.

Builds a study of N completed trials (default 10,000) on the shipped zoo's search space,
with realistic per-trial records (objectives, scores, recipe JSON, timings), then times the
real command, as a user would run it, until the database shows trial N (the first new one).
Also prints how long `import evomerge.cli` + the search's imports take on their own.

    python bench/resume_time.py [--trials 10000] [--sampler random|cmaes|nsga2]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

REPO = Path(__file__).resolve().parents[1]
ZOO = "evomerge/zoo_models"


def write_config(out: Path, sampler: str, n: int) -> Path:
    config = {"name": f"resume_{sampler}", "models": [f"{ZOO}/expert_{s}" for s in ("rev", "srt", "cae")],
              "base_model": f"{ZOO}/base", "search_space": "search_spaces/ps_ties_dare.yaml",
              "fitness": "evaluators/zoo_skills.yaml", "sampler": sampler, "budget": {"n_trials": n + 1},
              "seed": 0, "storage": f"sqlite:///{out}/study_{sampler}.db", "device": "cpu", "dtype": "float32"}
    path = out / f"resume_{sampler}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fake_objectives(params: dict[str, float]) -> dict[str, float]:
    """A smooth stand-in fitness, so the sampler sees a real landscape (no models are run)."""
    w = [params[f"weight/s{i}"] for i in range(3)]
    d = [params[f"density/s{i}"] for i in range(3)]
    return {s: max(0.0, 1 - (wi - 0.7) ** 2 - (di - 0.6) ** 2) for s, wi, di in zip(("rev", "srt", "cae"), w, d)}


def populate(config_path: Path, n: int) -> None:
    """Run the config's own sampler in memory for n trials, then copy the study into its SQLite storage."""
    from evomerge.config import load_config
    from evomerge.merge.materialize import Materializer
    from evomerge.search.genome import Genome
    from evomerge.search.samplers import make_sampler
    from evomerge.search.study import open_storage, open_study

    config = load_config(config_path)
    n_layers = Materializer([config.base_model], device="cpu").n_layers
    genome = Genome(config.search_space, config.models, config.base_model, n_layers)
    storage = open_storage(config.storage, config.heartbeat)
    study = open_study(config, storage, create=True)
    memory = optuna.create_study(directions=study.directions)
    memory.sampler = make_sampler(config, genome)
    for _ in range(n):
        trial = memory.ask()
        params = {k: trial.suggest_float(k, d.low, d.high) for k, d in genome.distributions.items()}
        objectives = fake_objectives(params)
        for key, value in (("objectives", objectives), ("scores", {**objectives, "mean": sum(objectives.values()) / 3}),
                           ("recipe", genome.decode(params).to_json()),
                           ("timings", {"materialize_s": 0.01, "evaluate_s": 0.2, "overhead_s": 0.001})):
            trial.set_user_attr(key, value)
        told = [config.fitness.scalarize(objectives)] if len(study.directions) == 1 else list(objectives.values())
        memory.tell(trial, told)
    dists = {k: FloatDistribution(d.low, d.high) for k, d in genome.distributions.items()}
    study.add_trials([create_trial(state=TrialState.COMPLETE, values=t.values, params=t.params, distributions=dists,
                                   user_attrs=t.user_attrs, system_attrs=t.system_attrs) for t in memory.trials])


def trial_count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from trials").fetchone()[0]


def time_resume(config_path: Path, db: Path, n: int) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(config_path), "--quiet"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while trial_count(db) <= n:
            if proc.poll() is not None:
                raise RuntimeError(f"evomerge run exited early: {proc.stderr.read()}")
            time.sleep(0.01)
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def study_part(config_path: Path, n: int) -> float:
    """In this process, imports done: open the storage and study, recover, count, build the sampler, propose."""
    from evomerge.config import load_config
    from evomerge.merge.materialize import Materializer
    from evomerge.search.genome import Genome
    from evomerge.search.samplers import make_sampler
    from evomerge.search.study import open_storage, open_study, recover_dead_trials

    config = load_config(config_path)
    genome = Genome(config.search_space, config.models, config.base_model,
                    Materializer([config.base_model], device="cpu").n_layers)
    start = time.perf_counter()
    study = open_study(config, open_storage(config.storage, config.heartbeat), create=False)
    recover_dead_trials(study)
    study.sampler = make_sampler(config, genome)
    trial = study.ask()
    for name, d in genome.distributions.items():
        trial.suggest_float(name, d.low, d.high)
    elapsed = time.perf_counter() - start
    study.tell(trial, state=TrialState.FAIL)
    assert trial.number >= n
    return elapsed


def import_time() -> float:
    code = "import evomerge.cli, evomerge.search.loop"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--sampler", default="random", choices=["random", "cmaes", "nsga2", "tpe"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = REPO / "bench" / "out" / "resume"
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(out, args.sampler, args.trials)
    db = out / f"study_{args.sampler}.db"
    if not db.exists() or trial_count(db) < args.trials:
        db.unlink(missing_ok=True)
        t = time.perf_counter()
        populate(config, args.trials)
        print(f"built a {args.trials}-trial {args.sampler} study in {time.perf_counter() - t:.0f} s ({db.stat().st_size / 1e6:.0f} MB)")
    times = []
    for _ in range(args.repeats):
        with sqlite3.connect(db) as conn:  # drop the previous repeat's new trial so every run resumes the same study
            conn.execute("pragma foreign_keys=on")
            for table in ("trial_params", "trial_values", "trial_user_attributes", "trial_system_attributes",
                          "trial_heartbeats", "trial_intermediate_values"):
                conn.execute(f"delete from {table} where trial_id in (select trial_id from trials where number >= ?)", (args.trials,))
            conn.execute("delete from trials where number >= ?", (args.trials,))
        times.append(time_resume(config, db, args.trials))
    imports = import_time()
    in_process = study_part(config, args.trials)
    median = sorted(times)[len(times) // 2]
    print(f"resume of a {args.trials}-trial study ({args.sampler}): command start -> first new proposal "
          f"median {median:.2f} s over {len(times)} runs (min {min(times):.2f}, max {max(times):.2f}); "
          f"Python imports alone (torch, transformers, optuna) {imports:.2f} s; the study part alone "
          f"(open, recover, count, sample, propose) {in_process:.2f} s; target < 3 s: {'met' if median < 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
