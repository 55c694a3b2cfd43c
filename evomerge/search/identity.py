"""Which study a command means, and whether it is the same search.

A study records its fingerprint when it is made. Two parts of it matter differently:
- what its trials *mean* (models, search space, fitness): every command refuses a study made
  with others, since its scores would not be comparable;
- how its trials were *proposed* (sampler, seed): `evomerge run` refuses others (a resumed
  search must continue the same sequence), while read-only commands (`status`, `archive`,
  `export`, `evaluate`) open the study whatever the command line says, and report the study's
  own settings.
"""

from __future__ import annotations

from typing import Any

import optuna

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.search.attrs import FINGERPRINT, N_LAYERS, OBJECTIVES
from evomerge.search.storage import Database, redact

MEANING = ("models", "base_model", "search_space", "fitness")


def study_directions(config: RunConfig) -> list[str]:
    """NSGA-II sees every objective; single-objective samplers see the scalarization (maximized)."""
    return config.fitness.directions if config.sampler == "nsga2" else ["maximize"]


def settings(study: optuna.Study) -> dict[str, Any]:
    """The fingerprint the study was made with."""
    return study.user_attrs.get(FINGERPRINT, {})


def find_study(config: RunConfig, db: Database, *, to_run: bool) -> optuna.Study | None:
    """The config's study, or None if there is none; refuses a study made by another search
    (`to_run`: also one proposed by another sampler or seed)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with db.exclusive(f"study:{config.study_name}"):  # no worker sees a study half made (no fingerprint yet)
        try:
            study = optuna.load_study(study_name=config.study_name, storage=db.storage)
        except KeyError:
            return None
    stored, wanted = settings(study), config.fingerprint()
    if not stored:
        raise EvomergeError(f"study {config.study_name!r} in {redact(config.storage)} was not made by evomerge; "
                            "choose another --study-name")
    keys = sorted(set(stored) | set(wanted)) if to_run else MEANING
    differs = [k for k in keys if stored.get(k) != wanted.get(k)]
    if differs:
        key = differs[0]
        raise EvomergeError(f"study {config.study_name!r} was made with a different {key} ({stored.get(key)!r}, "
                            f"now {wanted.get(key)!r}); use a new --study-name or restore the config")
    return study


def open_study(config: RunConfig, db: Database) -> optuna.Study:
    """An existing study, for the read-only commands."""
    study = find_study(config, db, to_run=False)
    if study is None:
        raise EvomergeError(f"no study {config.study_name!r} in {redact(config.storage)}; "
                            f"start it with: evomerge run {config.path}")
    return study


def create_study(config: RunConfig, db: Database, n_layers: int) -> optuna.Study:
    """A new study for the config, recording what it means; if another worker made it meanwhile,
    that one (once its fingerprint is checked)."""
    with db.exclusive(f"study:{config.study_name}"):
        try:
            optuna.load_study(study_name=config.study_name, storage=db.storage)
        except KeyError:
            study = optuna.create_study(study_name=config.study_name, storage=db.storage,
                                        directions=study_directions(config))
            study.set_user_attr(FINGERPRINT, config.fingerprint())
            study.set_user_attr(OBJECTIVES, [[o.name, o.direction] for o in config.fitness.objectives])
            study.set_user_attr(N_LAYERS, n_layers)
            return study
    return find_study(config, db, to_run=True)


def check_layers(study: optuna.Study, n_layers: int) -> None:
    """The models still have the depth the study was made with (a route gene names layers)."""
    recorded = study.user_attrs.get(N_LAYERS)
    if recorded is None:
        study.set_user_attr(N_LAYERS, n_layers)  # made before studies recorded it
    elif recorded != n_layers:
        raise EvomergeError(f"the models now have {n_layers} layers, but study {study.study_name!r} was made with "
                            f"{recorded}; restore the models or use a new --study-name")
