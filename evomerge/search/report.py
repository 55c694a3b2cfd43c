"""What `evomerge status` and `evomerge archive` show: counts, best values, budget and ETA,
items evaluated, held-out results (`evomerge evaluate`), the Pareto archive as a table, JSON or
a plot; and the progress `evomerge run` prints."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import RunConfig
from evomerge.search import held_out
from evomerge.search.archive import (ArchiveEntry, completed, hypervolume, hypervolume_history, pareto_archive,
                                     source_objectives)
from evomerge.search.attrs import ITEMS
from evomerge.search.identity import settings

if TYPE_CHECKING:
    from evomerge.model_card import Evidence
    from matplotlib.figure import Figure

    from evomerge.search.loop import Search


def _objectives(config: RunConfig) -> tuple[list[str], list[str]]:
    return [o.name for o in config.fitness.objectives], config.fitness.directions


def status_text(config: RunConfig, study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    names, directions = _objectives(config)
    done = completed(study, names)
    made = settings(study)
    lines = [f"study {config.study_name!r} ({made.get('sampler', config.sampler)}, seed {made.get('seed', config.seed)})",
             f"trials: {count[TrialState.COMPLETE]} done / {config.n_trials} budget, "
             + (f"{count[TrialState.PRUNED]} pruned, " if count[TrialState.PRUNED] else "")
             + f"{count[TrialState.FAIL]} failed, {count[TrialState.RUNNING]} running, {count[TrialState.WAITING]} waiting"]
    lines += _items_line(config, trials)
    sources = source_objectives(study)
    for name, direction in zip(names, directions):
        pick = max if direction == "maximize" else min
        line = f"best {name} ({direction}): "
        if done:
            best = pick(done, key=lambda t: t.user_attrs["objectives"][name])
            line += f"{best.user_attrs['objectives'][name]:.4g} (trial {best.number})"
        scored = {ref: values[name] for ref, values in sources.items() if name in values}
        if scored:
            ref = pick(scored, key=scored.get)
            line += f"{'; ' if done else ''}best source {scored[ref]:.4g} ({ref})"
        if done or scored:
            lines.append(line)
    if done:
        lines.append(f"hypervolume: {hypervolume(study, names, directions):.4g} (reference: worst value seen per objective)")
    lines += held_out_lines(study)
    left = max(0, config.n_trials - count[TrialState.COMPLETE])
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done[-50:]
                 if t.datetime_complete and t.datetime_start]
    eta = f", ETA {_duration(left * statistics.median(durations))} at one worker" if durations and left else ""
    lines.append(f"budget left: {left} trials{eta}")
    return "\n".join(lines)


def _items_line(config: RunConfig, trials: list[FrozenTrial]) -> list[str]:
    """Items the trials evaluated (lm_eval fitness), per finished trial, against an items budget."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "copy_of" not in t.user_attrs]
    total = sum(t.user_attrs.get(ITEMS, 0) for t in trials)
    if not total:
        return []
    budget = f" of {config.n_items} budget" if config.n_items else ""
    per = f", {total / len(finished):.1f} per finished trial" if finished else ""
    return [f"items evaluated: {total}{budget}{per}"]


def held_out_lines(study: optuna.Study) -> list[str]:
    """Per held-out spec: its scalarization for each evaluated trial (best first) and the best source."""
    lines = []
    for name, results in held_out.stored(study).items():
        trials = sorted(((n, held_out_value(r)) for n, r in results.items() if n != held_out.SOURCES_KEY),
                        key=lambda nv: -nv[1])
        more = f" (+{len(trials) - 3} more)" if len(trials) > 3 else ""
        line = f"held-out {name}: " + ", ".join(f"trial {n} {v:.4g}" for n, v in trials[:3]) + more
        sources = {ref: held_out_value(r) for ref, r in results.get(held_out.SOURCES_KEY, {}).items()}
        if sources:
            ref = max(sources, key=sources.get)
            line += f"{'; ' if trials else ''}best source {sources[ref]:.4g} ({ref})"
        lines.append(line)
    return lines


def held_out_value(result: dict[str, Any]) -> float:
    """A stored held-out result's scalarization, by the spec it was scored with (its fingerprint)."""
    spec = result["fingerprint"]
    sign = {o["name"]: 1.0 if o["direction"] == "maximize" else -1.0 for o in spec["objectives"]}
    return sum(w * sign[name] * result["objectives"][name] for name, w in spec["scalarization"].items())


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def archive_entries(config: RunConfig, study: optuna.Study, estimates: bool = False) -> list[ArchiveEntry]:
    """The Pareto archive of the fully scored (COMPLETE) trials; with `estimates`, pruned trials
    (racing) compete with their estimated objectives too."""
    names, directions = _objectives(config)
    states = (TrialState.COMPLETE, TrialState.PRUNED) if estimates else (TrialState.COMPLETE,)
    return pareto_archive(study, names, directions, states)


def archive_json(entries: list[ArchiveEntry], study: optuna.Study | None = None) -> str:
    results = held_out.stored(study) if study is not None else {}
    return json.dumps([{"number": e.number, "values": e.values, "recipe": e.recipe,
                        **_held_out_of(e.number, results, lambda r: r["objectives"])} for e in entries], indent=2)


def _held_out_of(number: int, results: dict[str, dict[Any, Any]], show: Any) -> dict[str, Any]:
    found = {name: show(by_trial[number]) for name, by_trial in results.items() if number in by_trial}
    return {"held_out": found} if found else {}


def archive_table(config: RunConfig, entries: list[ArchiveEntry], study: optuna.Study | None = None) -> str:
    """One row per entry, best scalarization first; a column per held-out spec (its scalarization)
    where trials were scored on one; a pruned trial's number is starred (estimated objectives)."""
    names, _ = _objectives(config)
    results = held_out.stored(study) if study is not None else {}
    pruned = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))} if study else set()
    header = ["trial", *names, "scalarized", *(f"held-out {name}" for name in results)]
    rows = [[f"{e.number}{'*' if e.number in pruned else ''}", *(f"{e.values[n]:.4g}" for n in names),
             f"{config.fitness.scalarize(e.values):.4g}",
             *(f"{held_out_value(by_trial[e.number]):.4g}" if e.number in by_trial else "-" for by_trial in results.values())]
            for e in sorted(entries, key=lambda e: -config.fitness.scalarize(e.values))]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    table = "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows]) if rows else "no completed trials yet"
    return table + ("\n* pruned by racing: estimated objectives" if pruned & {e.number for e in entries} else "")


def plot_archive(config: RunConfig, study: optuna.Study, entries: list[ArchiveEntry], path: str | Path) -> None:
    """`evomerge archive --plot` and the demo's pareto.png."""
    archive_figure(config, study, entries).savefig(path, dpi=110)


def archive_figure(config: RunConfig, study: optuna.Study, entries: list[ArchiveEntry]) -> "Figure":
    """Every pair of objectives (a scatter-plot matrix's lower triangle; parallel coordinates past
    three objectives, where pairs get too many), the Pareto archive highlighted against the
    dominated trials, the source models as labelled reference points, and the hypervolume over time."""
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no backend to choose

    names, directions = _objectives(config)
    done = completed(study, names)
    front = {e.number for e in entries}
    groups = {label: [t for t in done if (t.number in front) == is_front]
              for label, is_front in (("dominated", False), ("Pareto archive", True))}
    sources = _short_names(source_objectives(study))
    k = len(names)
    if k == 1:
        fig = Figure(figsize=(11, 4.5))
        panels = fig.subplots(1, 2)
        _value_panel(panels[0], names[0], directions[0], groups, sources)
    elif k <= 3:  # the pair (x = names[c], y = names[r + 1]) at row r, column c <= r; hypervolume top right
        fig = Figure(figsize=(5.5 * max(k - 1, 2), 4.5 * (k - 1)))
        grid = fig.subplots(k - 1, max(k - 1, 2), squeeze=False)
        for r in range(k - 1):
            for c in range(r + 1):
                _pair_panel(grid[r][c], (names[c], names[r + 1]), (directions[c], directions[r + 1]), groups, sources)
        panels = [grid[0][-1]]
    else:
        fig = Figure(figsize=(5 + 1.2 * k, 4.5))
        panels = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        _parallel_panel(panels[0], names, directions, groups, sources)
    _hypervolume_panel(panels[-1], hypervolume_history(study, names, directions))
    fig.suptitle(f"{config.study_name}: {len(done)} completed trials, {len(entries)} in the Pareto archive")
    _legend_below(fig)
    return fig


def _legend_below(fig: "Figure") -> None:
    """One legend for all panels, from every panel's labels: a source may be missing from some."""
    legend: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))


_TRIALS = {"dominated": dict(color="0.7", s=12, zorder=1), "Pareto archive": dict(color="tab:red", s=30, zorder=2)}
_SOURCES = list(zip(("*", "D", "P", "X", "^", "s", "v", "h"),
                    ("tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan", "tab:olive", "tab:pink")))


def _short_names(sources: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Labels a plot can hold: `expert_rev`, not `evomerge/zoo_models/expert_rev` (whole refs if two end alike)."""
    short = [ref.rstrip("/").rsplit("/", 1)[-1] for ref in sources]
    return dict(zip(short, sources.values())) if len(set(short)) == len(short) else sources


def _source_style(i: int) -> dict[str, Any]:
    marker, color = _SOURCES[i % len(_SOURCES)]
    return dict(marker=marker, color=color, edgecolor="black", linewidth=0.6, s=130, zorder=3)


def _pair_panel(ax: Any, pair: tuple[str, str], directions: tuple[str, str], groups: dict[str, list[FrozenTrial]],
                sources: dict[str, dict[str, float]]) -> None:
    x, y = pair
    for label, trials in groups.items():
        ax.scatter(_values(trials, x), _values(trials, y), label=label, **_TRIALS[label])
    placed = {}
    for i, (name, values) in enumerate(sources.items()):
        if x in values and y in values:  # a source scored before an objective was added has no value for it
            ax.scatter([values[x]], [values[y]], label=name, **_source_style(i))
            placed[name] = (values[x], values[y])
    _name_points(ax, placed)
    ax.set_xlabel(f"{x} ({directions[0]})")
    ax.set_ylabel(f"{y} ({directions[1]})")


def _values(trials: list[FrozenTrial], name: str) -> list[float]:
    return [t.user_attrs["objectives"][name] for t in trials]


def _name_points(ax: Any, points: dict[str, tuple[float, float]]) -> None:
    """Each source's name beside it; sources at the same place (equal scores) share one label."""
    names_at: dict[tuple[float, float], list[str]] = {}
    for name, xy in points.items():
        names_at.setdefault(xy, []).append(name)
    for xy, names in names_at.items():
        ax.annotate(", ".join(names), xy, xytext=(6, 4), textcoords="offset points", fontsize=8)


def _value_panel(ax: Any, name: str, direction: str, groups: dict[str, list[FrozenTrial]],
                 sources: dict[str, dict[str, float]]) -> None:
    """One objective: each trial's value by trial number, the sources as horizontal lines."""
    for label, trials in groups.items():
        ax.scatter([t.number for t in trials], _values(trials, name), label=label, **_TRIALS[label])
    for i, (source, values) in enumerate(sources.items()):
        if name in values:
            ax.axhline(values[name], color=_source_style(i)["color"], linestyle="--", label=source)
    _name_points(ax, {source: (0, values[name]) for source, values in sources.items() if name in values})
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{name} ({direction})")


def _parallel_panel(ax: Any, names: list[str], directions: list[str], groups: dict[str, list[FrozenTrial]],
                    sources: dict[str, dict[str, float]]) -> None:
    """One vertical axis per objective, scaled so better is up; a polyline per trial and per source."""
    from matplotlib.collections import LineCollection

    points = {label: [t.user_attrs["objectives"] for t in trials] for label, trials in groups.items()}
    seen = [p for ps in points.values() for p in ps] + list(sources.values())
    lows = {n: min((p[n] for p in seen if n in p), default=0.0) for n in names}
    highs = {n: max((p[n] for p in seen if n in p), default=1.0) for n in names}

    def height(p: dict[str, float], n: str, d: str) -> float:
        if n not in p:
            return float("nan")  # a gap in a source's line
        span = highs[n] - lows[n] or 1.0
        return (p[n] - lows[n]) / span if d == "maximize" else (highs[n] - p[n]) / span

    xs = range(len(names))
    for label, ps in points.items():
        lines = [list(zip(xs, (height(p, n, d) for n, d in zip(names, directions)))) for p in ps]
        style = _TRIALS[label]
        ax.add_collection(LineCollection(lines, colors=style["color"], linewidths=0.8 if label == "dominated" else 1.6,
                                         alpha=0.5 if label == "dominated" else 0.9, zorder=style["zorder"], label=label))
    for i, (source, values) in enumerate(sources.items()):
        style = _source_style(i)
        ax.plot(xs, [height(values, n, d) for n, d in zip(names, directions)], marker=style["marker"], markersize=10,
                color=style["color"], markeredgecolor="black", linewidth=2, zorder=3, label=source)
    _parallel_axes(ax, names, directions, lows, highs)


def _parallel_axes(ax: Any, names: list[str], directions: list[str], lows: dict[str, float],
                   highs: dict[str, float]) -> None:
    """A vertical line per objective with its best value seen at the top and its worst at the bottom."""
    for j, (n, d) in enumerate(zip(names, directions)):
        ax.axvline(j, color="black", linewidth=0.8)
        best, worst = (highs[n], lows[n]) if d == "maximize" else (lows[n], highs[n])
        for value, y, offset in ((best, 1.0, 10), (worst, 0.0, -16)):
            ax.annotate(f"{value:.4g}", (j, y), xytext=(0, offset), textcoords="offset points", ha="center",
                        fontsize=8, bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"))
    ax.set_xlim(-0.3, len(names) - 0.7)
    ax.set_ylim(-0.15, 1.15)
    ax.set_xticks(range(len(names)), [f"{n}\n({d})" for n, d in zip(names, directions)])
    ax.set_yticks([])
    ax.set_ylabel("each objective scaled to its range, better up")


def _hypervolume_panel(ax: Any, history: list[tuple[int, float]]) -> None:
    ax.plot([h[0] for h in history], [h[1] for h in history], color="black")
    ax.set_xlabel("completed trials")
    ax.set_ylabel("hypervolume (reference: worst value seen)")
    ax.set_title("hypervolume over time")


def run_with_progress(search: "Search", quiet: bool = False) -> None:
    """`search.run()` with one line per trial, and in a terminal a progress bar (trials done, best
    scalarized value, ETA) below them. Elsewhere (`nohup evomerge run ... > run.log`) no bar: its
    redraws would fill the log; each line is flushed as it happens, so `tail -f run.log` follows."""
    from tqdm import tqdm

    from evomerge.search.storage import redact

    config = search.config
    done = search.counts()[TrialState.COMPLETE]
    print(f"study {config.study_name!r} in {redact(config.storage)}: {done}/{config.n_trials} trials done, "
          f"sampler {config.sampler}", flush=True)
    print(f"models loaded on {search.backend.device} in {search.load_seconds:.1f} s", flush=True)
    best: list[float | None] = [None]
    terminal = sys.stdout.isatty() and sys.stderr.isatty()  # the lines go to stdout, tqdm's bar to stderr
    with tqdm(total=config.n_trials, initial=min(done, config.n_trials), unit="trial", dynamic_ncols=True,
              disable=quiet or not terminal) as bar:
        def say(line: str) -> None:
            bar.write(line)  # above the bar, where there is one
            sys.stdout.flush()

        def on_trial(n_done: int, record: dict[str, Any]) -> None:
            bar.n = min(n_done, config.n_trials)
            if record.get("value") is not None and (best[0] is None or record["value"] > best[0]):
                best[0] = record["value"]
            bar.set_postfix_str(f"best {best[0]:.4g}" if best[0] is not None else "")
            say(trial_line(n_done, config.n_trials, record))

        search.run(on_trial)


def trial_line(n_done: int, total: int, record: dict[str, Any]) -> str:
    if record["state"] == "FAIL":
        return f"trial {record['number']}: failed ({record['error']})"
    if record["state"] == "PRUNED":
        return f"trial {record['number']}: pruned after {record['items']} items (estimate {record['value']:.3g})"
    values = ", ".join(f"{k} {v:.3g}" for k, v in record["objectives"].items())
    return f"trial {record['number']} [{n_done}/{total}]: {values}"


def study_evidence(config: RunConfig, study: optuna.Study, trial: FrozenTrial) -> Evidence:
    """The evidence for `trial` as the study stores it: the sources' scores from when the study was made
    (attrs.SOURCES), the trial's objectives, and each held-out spec scored for that trial (attrs.HELD_OUT)."""
    from evomerge.model_card import Evidence  # huggingface_hub: only when a card is written

    made = settings(study)
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    fitness = Path(config.fitness_path).stem
    evidence = Evidence(config.study_name, made.get("sampler", config.sampler), made.get("seed", config.seed),
                        trial.number, n_complete, fitness)
    specs = [(fitness, dict(trial.user_attrs.get("objectives", {})), source_objectives(study))]
    for name, results in held_out.stored(study).items():
        if trial.number in results:
            held = {ref: r["objectives"] for ref, r in results.get(held_out.SOURCES_KEY, {}).items()}
            specs.append((name, results[trial.number]["objectives"], held))
    for name, merged, sources in specs:
        objectives = list(dict.fromkeys([*merged, *(o for values in sources.values() for o in values)]))
        evidence.columns += [(name, o) for o in objectives]
        evidence.merged.update({(name, o): v for o, v in merged.items()})
        for ref, values in sources.items():
            evidence.sources.setdefault(ref, {}).update({(name, o): v for o, v in values.items()})
    return evidence
