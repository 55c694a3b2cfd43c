"""What `evomerge status` and `evomerge archive` show: counts, best values, budget and ETA,
the Pareto archive as a table, JSON or a plot."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from evomerge.config import RunConfig
from evomerge.search.archive import ArchiveEntry, completed, hypervolume, hypervolume_history, pareto_archive

if TYPE_CHECKING:
    from evomerge.search.loop import Search


def _objectives(config: RunConfig) -> tuple[list[str], list[str]]:
    return [o.name for o in config.fitness.objectives], config.fitness.directions


def status_text(config: RunConfig, study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    names, directions = _objectives(config)
    done = completed(study, names)
    lines = [f"study {config.study_name!r} ({config.sampler}, seed {config.seed})",
             f"trials: {count[TrialState.COMPLETE]} done / {config.n_trials} budget, {count[TrialState.FAIL]} failed, "
             f"{count[TrialState.RUNNING]} running, {count[TrialState.WAITING]} waiting"]
    for name, direction in zip(names, directions):
        if done:
            pick = max if direction == "maximize" else min
            best = pick(done, key=lambda t: t.user_attrs["objectives"][name])
            lines.append(f"best {name} ({direction}): {best.user_attrs['objectives'][name]:.4g} (trial {best.number})")
    if done:
        lines.append(f"hypervolume: {hypervolume(study, names, directions):.4g} (reference: worst value seen per objective)")
    left = max(0, config.n_trials - count[TrialState.COMPLETE])
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done[-50:]
                 if t.datetime_complete and t.datetime_start]
    eta = f", ETA {_duration(left * statistics.median(durations))} at one worker" if durations and left else ""
    lines.append(f"budget left: {left} trials{eta}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def archive_entries(config: RunConfig, study: optuna.Study) -> list[ArchiveEntry]:
    names, directions = _objectives(config)
    return pareto_archive(study, names, directions)


def archive_json(entries: list[ArchiveEntry]) -> str:
    return json.dumps([{"number": e.number, "values": e.values, "recipe": e.recipe} for e in entries], indent=2)


def archive_table(config: RunConfig, entries: list[ArchiveEntry]) -> str:
    names, _ = _objectives(config)
    header = ["trial", *names, "scalarized"]
    rows = [[str(e.number), *(f"{e.values[n]:.4g}" for n in names), f"{config.fitness.scalarize(e.values):.4g}"]
            for e in sorted(entries, key=lambda e: -config.fitness.scalarize(e.values))]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows]) if rows else "no completed trials yet"


def plot_archive(config: RunConfig, study: optuna.Study, entries: list[ArchiveEntry], path: str | Path) -> None:
    """Front (highlighted) and dominated trials on the first two objectives, hypervolume over time beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, directions = _objectives(config)
    done = completed(study, names)
    front = {e.number for e in entries}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    x, y = names[0], names[1] if len(names) > 1 else names[0]
    for is_front, style in ((False, dict(c="0.7", s=14, label="dominated")), (True, dict(c="tab:red", s=30, label="Pareto archive"))):
        pts = [t.user_attrs["objectives"] for t in done if (t.number in front) == is_front]
        axes[0].scatter([p[x] for p in pts], [p[y] for p in pts], **style)
    axes[0].set_xlabel(f"{x} ({directions[0]})")
    axes[0].set_ylabel(f"{y} ({directions[names.index(y)]})")
    axes[0].legend()
    axes[0].set_title(f"{config.study_name}: {len(done)} trials")
    history = hypervolume_history(study, names, directions)
    axes[1].plot([h[0] for h in history], [h[1] for h in history])
    axes[1].set_xlabel("completed trials")
    axes[1].set_ylabel("hypervolume")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_with_progress(search: "Search", quiet: bool = False) -> None:
    """`search.run()` with one line per trial, and in a terminal a progress bar (trials done, best
    scalarized value, ETA) below them. Elsewhere (`nohup evomerge run ... > run.log`) no bar: its
    redraws would fill the log; each line is flushed as it happens, so `tail -f run.log` follows."""
    from tqdm import tqdm

    from evomerge.search.study import redact

    config = search.config
    done = search.counts()[TrialState.COMPLETE]
    print(f"study {config.study_name!r} in {redact(config.storage)}: {done}/{config.n_trials} trials done, "
          f"sampler {config.sampler}", flush=True)
    best: list[float | None] = [None]
    announced = [False]
    terminal = sys.stdout.isatty() and sys.stderr.isatty()  # the lines go to stdout, tqdm's bar to stderr
    with tqdm(total=config.n_trials, initial=min(done, config.n_trials), unit="trial", dynamic_ncols=True,
              disable=quiet or not terminal) as bar:
        def say(line: str) -> None:
            bar.write(line)  # above the bar, where there is one
            sys.stdout.flush()

        def on_trial(n_done: int, record: dict[str, Any]) -> None:
            if not announced[0] and search.load_seconds is not None:  # a resumed search loads them after its first proposal
                say(f"models loaded on {search.materializer.device} in {search.load_seconds:.1f} s")
                announced[0] = True
            bar.n = min(n_done, config.n_trials)
            if record.get("value") is not None and (best[0] is None or record["value"] > best[0]):
                best[0] = record["value"]
            bar.set_postfix_str(f"best {best[0]:.4g}" if best[0] is not None else "")
            say(trial_line(n_done, config.n_trials, record))

        search.run(on_trial)


def trial_line(n_done: int, total: int, record: dict[str, Any]) -> str:
    if record["state"] == "FAIL":
        return f"trial {record['number']}: failed ({record['error']})"
    values = ", ".join(f"{k} {v:.3g}" for k, v in record["objectives"].items())
    return f"trial {record['number']} [{n_done}/{total}]: {values}"
