"""pareto.png: every pair of objectives (parallel coordinates past three), the Pareto archive apart
from the dominated trials, the source models as labelled reference points, the hypervolume over
time; checked on the figure's panels, labels and plotted data, and on the PNG written."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from evomerge.config import load_config
from evomerge.fitness.spec import FitnessSpec
from evomerge.search.archive import hypervolume_history, source_objectives
from evomerge.search.attrs import SOURCES as SOURCES_ATTR
from evomerge.search.report import archive_entries, archive_figure, plot_archive

OBJECTIVES = [("rev", "maximize"), ("srt", "maximize"), ("cae", "maximize"), ("mean", "maximize"),
              ("param_count", "minimize")]
SOURCES = {f"evomerge/zoo_models/expert_{s}": {"objectives": {"rev": 0.2, "srt": 0.2, "cae": 0.2, s: 0.95, "mean": 0.45,
                                                              "param_count": 2e6}}
           for s in ("rev", "srt", "cae")}
SOURCE_NAMES = {"expert_rev", "expert_srt", "expert_cae"}
TRIAL_STYLES = {"dominated", "Pareto archive"}


def setup(k: int, sources: bool, n: int = 40):
    """A run config with the first k objectives, and a study of n completed trials (one failed)."""
    objectives = OBJECTIVES[:k]
    fitness = FitnessSpec.from_dict({"kind": "zoo_skills", "objectives": [{"name": m, "metric": m, "direction": d}
                                                                          for m, d in objectives]})
    config = dataclasses.replace(load_config("runs/demo.yaml"), fitness=fitness, study_name="plotted")
    rng = np.random.default_rng(k)
    study = optuna.create_study()
    for i in range(n):
        values = {m: float(rng.random() * (1e6 if m == "param_count" else 0.9)) for m, _ in objectives}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0, params={"x": float(i)},
                                     distributions={"x": FloatDistribution(0, 1000)}, user_attrs={"objectives": values}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1000)}))
    if sources:
        study.set_user_attr(SOURCES_ATTR, SOURCES)
    return config, study


def labels(ax) -> set[str]:
    return {a.get_label() for a in [*ax.collections, *ax.lines] if not a.get_label().startswith("_")}


def hypervolume_panel(fig, config, study):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "hypervolume over time"]
    names, directions = [o.name for o in config.fitness.objectives], config.fitness.directions
    assert ax.lines[0].get_ydata().tolist() == [h for _, h in hypervolume_history(study, names, directions)]
    return ax


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("sources", [True, False], ids=["sources", "no-sources"])
def test_png_is_written(tmp_path, k, sources):
    config, study = setup(k, sources)
    path = tmp_path / "pareto.png"
    plot_archive(config, study, archive_entries(config, study), path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400
        image.verify()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("sources", [True, False], ids=["sources", "no-sources"])
def test_every_pair_of_objectives_has_a_panel(k, sources):
    config, study = setup(k, sources)
    entries = archive_entries(config, study)
    fig = archive_figure(config, study, entries)
    hv = hypervolume_panel(fig, config, study)
    pairs = [ax for ax in fig.axes if ax is not hv]
    names = [o.name for o in config.fitness.objectives]
    expected = {(f"{x} (maximize)", f"{y} (maximize)") for x, y in itertools.combinations(names, 2)}
    assert len(pairs) == len(expected) and {(ax.get_xlabel(), ax.get_ylabel()) for ax in pairs} == expected
    front = {(e.values[names[0]], e.values[names[-1]]) for e in entries}
    panel = next(ax for ax in pairs if ax.get_xlabel().startswith(names[0]) and ax.get_ylabel().startswith(names[-1]))
    plotted = {c.get_label(): {tuple(o) for o in c.get_offsets()} for c in panel.collections}
    assert plotted["Pareto archive"] == front and len(entries) < 40
    assert len(plotted["dominated"]) == 40 - len(entries) and not plotted["dominated"] & front
    for ax in pairs:
        assert labels(ax) == TRIAL_STYLES | (SOURCE_NAMES if sources else set())
    if sources:  # at the source's values, named on the picture too
        values = SOURCES["evomerge/zoo_models/expert_srt"]["objectives"]
        assert plotted["expert_srt"] == {(values[names[0]], values[names[-1]])}
        assert {t.get_text() for t in panel.texts} == SOURCE_NAMES
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert legend == TRIAL_STYLES | (SOURCE_NAMES if sources else set())


def test_a_source_appears_only_where_it_has_both_values():
    config, study = setup(3, sources=False)
    study.set_user_attr(SOURCES_ATTR, {"org/base": {"objectives": {"rev": 0.5, "cae": 0.5}}})  # scored before srt existed
    fig = archive_figure(config, study, archive_entries(config, study))
    with_base = {(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if "base" in labels(ax)}
    assert with_base == {("rev (maximize)", "cae (maximize)")}
    assert "base" in {t.get_text() for t in fig.legends[0].get_texts()}


def test_five_objectives_in_parallel_coordinates():
    config, study = setup(5, sources=True)
    entries = archive_entries(config, study)
    fig = archive_figure(config, study, entries)
    hv = hypervolume_panel(fig, config, study)
    (ax,) = [a for a in fig.axes if a is not hv]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{n}\n({d})" for n, d in OBJECTIVES]
    lines = {c.get_label(): c.get_segments() for c in ax.collections}
    assert len(lines["Pareto archive"]) == len(entries) and len(lines["dominated"]) == 40 - len(entries)
    heights = {line.get_label(): line.get_ydata() for line in ax.lines if line.get_label() in SOURCE_NAMES}
    assert set(heights) == SOURCE_NAMES
    # each source has the best skill value seen for its own skill (top), 0.2 elsewhere, and the
    # largest param_count (minimized: bottom)
    assert heights["expert_srt"][1] == 1.0 and heights["expert_srt"][4] == 0.0
    assert heights["expert_rev"][0] == 1.0 and heights["expert_cae"][2] == 1.0
    assert all(0.0 <= h <= 1.0 for hs in heights.values() for h in hs)


def test_one_objective_by_trial_with_the_sources_as_lines():
    config, study = setup(1, sources=True)
    fig = archive_figure(config, study, archive_entries(config, study))
    hv = hypervolume_panel(fig, config, study)
    (ax,) = [a for a in fig.axes if a is not hv]
    assert ax.get_ylabel() == "rev (maximize)"
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.lines}
    assert lines == {"expert_rev": 0.95, "expert_srt": 0.2, "expert_cae": 0.2}
    assert {t.get_text() for t in ax.texts} == {"expert_rev", "expert_srt, expert_cae"}  # one label where they coincide


def test_sources_by_short_name_unless_two_end_alike():
    _, study = setup(2, sources=True)
    assert set(source_objectives(study)) == set(SOURCES)
    study.set_user_attr(SOURCES_ATTR, {"a/model": {"objectives": {"rev": 0.1, "srt": 0.1}},
                                       "b/model": {"objectives": {"rev": 0.2, "srt": 0.2}}})
    config, _ = setup(2, sources=False)
    fig = archive_figure(config, study, archive_entries(config, study))
    assert {"a/model", "b/model"} <= labels(fig.axes[0])
