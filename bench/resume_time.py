"""How long a large study takes to resume: from `evomerge run CONFIG` to its first new trial
being evaluated, minus loading the evaluator and the models (which a resumed user waits for in
any case: seconds for the zoo, minutes for 7B weights).

Builds a study of N completed trials (default 10,000) on the shipped zoo's search space,
with realistic per-trial records (objectives, scores, recipe JSON, timings), then times the
real command, as a user would run it, until the database holds the params of trial N (the first
new one: its evaluation starts there) and marks it sampled. The load time is the command's own
figure ("models loaded ... in X s": importing torch, transformers and lm-eval, building the
tasks, loading the weights); the rest is the overhead the target is about.

    python bench/resume_time.py [--trials 10000] [--sampler random|cmaes|nsga2]
    python bench/resume_time.py --smoke    # a 30-trial study, one resume: that it runs, not the figure
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evomerge.search.attrs import SOURCES

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
    from evomerge.search.identity import create_study
    from evomerge.search.samplers import make_sampler
    from evomerge.search.storage import open_database

    config = load_config(config_path)
    n_layers = Materializer([config.base_model], device="cpu").n_layers
    genome = Genome(config.search_space, config.models, config.base_model, n_layers, dtype=config.dtype)
    db = open_database(config.storage, config.heartbeat)
    study = create_study(config, db, n_layers)
    memory_db = open_database("sqlite:///:memory:")  # TrialSeeded counts fresh trials with SQL
    memory = optuna.create_study(directions=study.directions, storage=memory_db.storage)
    memory.sampler = make_sampler(config, genome, memory_db)
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
    # NSGA-II caches each generation's parents in the study's system attrs as trial ids (without
    # them a resumed sampler recomputes every generation, recursively): carry them over, renumbered.
    number_of = {t._trial_id: t.number for t in memory.trials}
    id_of = {t.number: t._trial_id for t in study.get_trials(deepcopy=False)}
    for key, value in memory_db.storage.get_study_system_attrs(memory_db.study_id(memory.study_name)).items():
        if key.startswith("NSGAIISampler:parent:"):
            db.storage.set_study_system_attr(db.study_id(study.study_name), key, [id_of[number_of[i]] for i in value])


def trial_count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from trials").fetchone()[0]


def proposed(db: Path, n: int) -> bool:
    """Trial n or later has all its params recorded (evomerge marks it sampled)."""
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from trials t join trial_system_attributes a on a.trial_id = t.trial_id "
                            "where t.number >= ? and a.key = 'evomerge:sampled'", (n,)).fetchone()[0] > 0


def time_resume(config_path: Path, db: Path, n: int) -> tuple[float, float]:
    """(command start -> trial n sampled, of which the command's own load time)."""
    log = db.with_suffix(".log")
    with log.open("w") as output:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(config_path), "--quiet"],
                                cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        try:
            while not proposed(db, n):
                if proc.poll() is not None:
                    raise RuntimeError(f"evomerge run exited early: {log.read_text()[-2000:]}")
                time.sleep(0.01)
            total = time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait()
    loaded = re.search(r"models loaded on \S+ in ([0-9.]+) s", log.read_text())
    return total, float(loaded.group(1))


def sources_scored(db: Path) -> bool:
    """The study holds its sources' scores (the first `evomerge run` on a study scores them, once)."""
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from study_user_attributes where key = ?", (SOURCES,)).fetchone()[0] > 0


def reset(db: Path, n: int) -> None:
    """Drop every trial numbered n or later (the previous measurement's), so each one resumes the same study."""
    with sqlite3.connect(db) as conn:
        for table in ("trial_params", "trial_values", "trial_user_attributes", "trial_system_attributes",
                      "trial_heartbeats", "trial_intermediate_values"):
            conn.execute(f"delete from {table} where trial_id in (select trial_id from trials where number >= ?)", (n,))
        conn.execute("delete from trials where number >= ?", (n,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--sampler", default="random", choices=["random", "cmaes", "nsga2", "tpe"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="30 trials, one resume, under bench/out/smoke/")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.repeats = 30, 1
    out = REPO / "bench" / "out" / ("smoke/resume" if args.smoke else "resume")
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(out, args.sampler, args.trials)
    db = out / f"study_{args.sampler}.db"
    if not db.exists() or trial_count(db) < args.trials:
        db.unlink(missing_ok=True)
        t = time.perf_counter()
        populate(config, args.trials)
        print(f"built a {args.trials}-trial {args.sampler} study in {time.perf_counter() - t:.0f} s ({db.stat().st_size / 1e6:.0f} MB)")
    if not sources_scored(db):  # as on the study's first start, not on a resume: not timed
        reset(db, args.trials)
        time_resume(config, db, args.trials)
        print("scored the source models once (a resumed study has their scores)")
    runs = []
    for _ in range(args.repeats):
        reset(db, args.trials)
        runs.append(time_resume(config, db, args.trials))
    reset(db, args.trials)
    overheads = sorted(total - load for total, load in runs)
    median = overheads[len(overheads) // 2]
    print(f"resume of a {args.trials}-trial study ({args.sampler}), {len(runs)} runs: command start -> first new "
          f"trial evaluated {statistics.median(t for t, _ in runs):.2f} s (median), of which loading the evaluator "
          f"and models {statistics.median(l for _, l in runs):.2f} s; overhead median {median:.2f} s "
          f"(min {overheads[0]:.2f}, max {overheads[-1]:.2f}); target <= 3 s: {'met' if median <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
