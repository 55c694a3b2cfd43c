"""The run config: which models, which search space and fitness, which sampler, what budget,
and where the study lives. Every error names the file, the key and what was expected.

    name: zoo_ps                             # outputs under runs/<name>/; default study name
    models: [evomerge/zoo_models/expert_rev, evomerge/zoo_models/expert_srt]
    base_model: evomerge/zoo_models/base
    search_space: search_spaces/ps_ties_dare.yaml
    fitness: evaluators/zoo_skills.yaml
    sampler: cmaes                           # or {name: cmaes, popsize: 8, sigma0: 0.1667}
    budget: {n_trials: 100}                  # completed trials in the study; wall_clock_s per command;
                                             # items: stop once the study's trials evaluated this many items
    seed: 0
    storage: null                            # default sqlite:///runs/<name>/study.db
    device: auto                             # auto | cpu | cuda | cuda:N
    backend: hf                              # or vllm, or {name: vllm, max_model_len: 2048, ...} (EngineOptions)
    tokenizer_source: null                   # base | union | a model: experts whose vocabularies differ
    chat_template: null                      # a model of the run (its template) or a Jinja template: what merges
                                             # are exported with, and scored with when the fitness applies one
    reconnect_timeout_s: 300                 # a lost database connection is retried this long
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evomerge.backends.vllm_options import EngineOptions
from evomerge.errors import EvomergeError
from evomerge.fitness.spec import FitnessSpec
from evomerge.recipe import is_template
from evomerge.routing_layouts import check_routable
from evomerge.search_space import SearchSpace
from evomerge.yamlio import check_keys, load_yaml_mapping

SAMPLERS = {
    "cmaes": {"popsize", "sigma0"},
    "nsga2": {"population_size", "mutation_prob", "crossover_prob"},
    "tpe": {"n_startup_trials"},
    "random": set(),
}
_KEYS = {"name", "models", "base_model", "search_space", "fitness", "sampler", "budget", "seed", "storage",
         "study_name", "device", "dtype", "heartbeat", "reconnect_timeout_s", "tokenizer_source", "chat_template",
         "description", "backend"}
BACKENDS = ("hf", "vllm")


@dataclass
class RunConfig:
    path: Path
    name: str
    models: list[str]
    base_model: str | None
    search_space: SearchSpace
    search_space_path: str
    fitness: FitnessSpec
    fitness_path: str
    sampler: str
    sampler_options: dict[str, Any]
    n_trials: int
    wall_clock_s: float | None
    seed: int
    storage: str
    study_name: str
    device: str | None
    dtype: str = "bfloat16"
    heartbeat: dict[str, float] = field(default_factory=lambda: {"interval": 10.0, "grace": 30.0})
    reconnect_timeout_s: float = 300.0  # how long a lost database connection is retried before the run stops
    tokenizer_source: str | None = None  # base | union | a model: experts whose vocabularies differ (see recipe.py)
    chat_template: str | None = None  # a model's template or a Jinja template: what merges are exported and scored with
    n_items: int | None = None  # budget.items: evaluated items (racing spends a varying number per trial)
    backend: str = "hf"  # where candidates are scored (evomerge.backends); not in the fingerprint: see `fingerprint`
    engine: EngineOptions = field(default_factory=EngineOptions)  # the vllm backend's options

    @property
    def out_dir(self) -> Path:
        return Path("runs") / self.name

    def fingerprint(self) -> dict[str, Any]:
        """What makes two commands the same study: resuming with a different one is refused.
        Like device and dtype, the backend is how trials are scored, not what they mean: both backends give
        the same scores (tests/test_backend_cli.py), so a study may be resumed on either."""
        space = {k: v for k, v in asdict(self.search_space).items() if k != "x0" or v is not None}  # as before x0 existed
        fingerprint = {"models": self.models, "base_model": self.base_model, "search_space": space,
                       "fitness": self.fitness.fingerprint(), "sampler": self.sampler, "seed": self.seed}
        for key in ("tokenizer_source", "chat_template"):  # absent when unset, as in studies made before the keys
            if getattr(self, key) is not None:
                fingerprint[key] = getattr(self, key)
        return json.loads(json.dumps(fingerprint))  # the JSON form, as the study stores it


def _err(where: str, key: str, expected: str, got: Any) -> EvomergeError:
    return EvomergeError(f"{where}: {key}: expected {expected}, got {got!r}")


def _int(data: dict, key: str, where: str, default: int | None, minimum: int) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _err(where, key, f"an integer >= {minimum}", value)
    return value


def load_config(path: str | Path, *, n_trials: int | None = None, storage: str | None = None,
                study_name: str | None = None, seed: int | None = None, backend: str | None = None) -> RunConfig:
    """Read and validate a run config; command-line overrides win over the file."""
    path = Path(path)
    where = str(path)
    data = load_yaml_mapping(path, "run config")
    check_keys(data, _KEYS, where)
    for key in ("models", "search_space", "fitness"):
        if key not in data:
            raise EvomergeError(f"{where}: missing key {key!r}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise _err(where, "name", "a run name without '/'", name)
    models = data["models"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise _err(where, "models", "a non-empty list of model paths or hub ids", models)
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise _err(where, "base_model", "a model path or hub id", base)
    space = SearchSpace.load(_existing(data["search_space"], where, "search_space"))
    if space.route is not None:  # before any study exists: a layout routing cannot fold is refused now
        for ref in [*([base] if base else []), *models]:
            try:
                check_routable(ref)
            except EvomergeError as exc:
                raise EvomergeError(f"{where}: search_space {data['search_space']} routes layers: {exc}") from None
    fitness = FitnessSpec.load(_existing(data["fitness"], where, "fitness"))
    sampler, sampler_options = _sampler(data.get("sampler", "cmaes"), where)
    if sampler == "cmaes" and len(fitness.objectives) > 1 and not fitness.scalarization:
        raise EvomergeError(f"{where}: cmaes is single-objective: give the fitness spec a scalarization")
    if sampler == "nsga2" and "racing" in fitness.options:
        raise EvomergeError(f"{where}: racing compares candidates on one scalar per item, but nsga2 keeps every "
                            "objective: use racing with cmaes, tpe or random, or drop it from the fitness spec")
    budget = data.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - {"n_trials", "wall_clock_s", "items"}:
        raise _err(where, "budget", "{n_trials: N, wall_clock_s: SECONDS, items: N}", budget)
    if "items" in budget and fitness.kind != "lm_eval":
        raise EvomergeError(f"{where}: budget.items counts lm-eval items, which a {fitness.kind} fitness does not "
                            "record: use n_trials or wall_clock_s")
    wall = budget.get("wall_clock_s")
    if wall is not None and (not isinstance(wall, (int, float)) or isinstance(wall, bool) or wall <= 0):
        raise _err(where, "budget.wall_clock_s", "a positive number of seconds", wall)
    heartbeat = data.get("heartbeat") or {}
    if not isinstance(heartbeat, dict) or set(heartbeat) - {"interval", "grace"} or not all(
            isinstance(v, (int, float)) and v > 0 for v in heartbeat.values()):
        raise _err(where, "heartbeat", "{interval: SECONDS, grace: SECONDS}", heartbeat)
    reconnect = data.get("reconnect_timeout_s", 300.0)
    if not isinstance(reconnect, (int, float)) or isinstance(reconnect, bool) or reconnect < 0:
        raise _err(where, "reconnect_timeout_s", "a number of seconds >= 0", reconnect)
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise _err(where, "tokenizer_source", "base, union or one of the models", tokenizer_source)
    chat_template = data.get("chat_template")
    if chat_template is not None and not (chat_template in [base, *models] or is_template(chat_template)):
        raise _err(where, "chat_template", "one of the models (its template) or a Jinja template ({{ }} or {% %})",
                   chat_template)
    device = data.get("device", "auto")
    dtype = data.get("dtype", "bfloat16")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise _err(where, "dtype", "bfloat16, float16 or float32", dtype)
    backend_name, engine = _backend(data.get("backend", "hf"), where)
    backend_name = backend or backend_name
    if backend_name == "vllm" and fitness.kind != "lm_eval":
        raise EvomergeError(f"{where}: fitness {data['fitness']} is kind {fitness.kind}, which scores Hugging Face "
                            "models only: use backend hf, or an lm_eval fitness with the vllm backend")
    return RunConfig(
        path=path, name=name, models=models, base_model=base, search_space=space,
        search_space_path=str(data["search_space"]), fitness=fitness, fitness_path=str(data["fitness"]),
        sampler=sampler, sampler_options=sampler_options,
        n_trials=_int(budget, "n_trials", f"{where}: budget", 100, 1) if n_trials is None else
        _int({"--n-trials": n_trials}, "--n-trials", "command line", None, 1),
        wall_clock_s=wall,
        seed=_int(data, "seed", where, 0, 0) if seed is None else _int({"--seed": seed}, "--seed", "command line", None, 0),
        storage=storage or data.get("storage") or f"sqlite:///runs/{name}/study.db",
        study_name=study_name or data.get("study_name") or name,
        device=None if device == "auto" else str(device), dtype=dtype,
        heartbeat={"interval": 10.0, "grace": 30.0, **{k: float(v) for k, v in heartbeat.items()}},
        reconnect_timeout_s=float(reconnect), tokenizer_source=tokenizer_source, chat_template=chat_template,
        backend=backend_name, engine=engine,
        n_items=_int(budget, "items", f"{where}: budget", None, 1),
    )


def _existing(value: Any, where: str, key: str) -> Path:
    if not isinstance(value, str):
        raise _err(where, key, "a file path", value)
    path = Path(value)
    if not path.is_file():
        raise EvomergeError(f"{where}: {key}: file {value} not found (paths are relative to {Path.cwd()})")
    return path


def _backend(value: Any, where: str) -> tuple[str, EngineOptions]:
    """`hf`, `vllm` or {name: vllm, ...EngineOptions}; the engine options are kept when the command line
    switches the backend (`evomerge run --backend`)."""
    data = {"name": value} if isinstance(value, str) else value
    if not isinstance(data, dict) or data.get("name") not in BACKENDS:
        raise _err(where, "backend", "hf, vllm or {name: vllm, ...engine options}", value)
    options = {k: v for k, v in data.items() if k != "name"}
    if data["name"] == "hf" and options:
        raise EvomergeError(f"{where}: backend: hf takes no options, got {sorted(options)} (engine options are vllm's)")
    return data["name"], EngineOptions.from_dict(options, f"{where}: backend")


def _sampler(value: Any, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise _err(where, "sampler", f"one of {sorted(SAMPLERS)} or {{name: NAME, ...options}}", value)
    name, options = value["name"], {k: v for k, v in value.items() if k != "name"}
    if name not in SAMPLERS:
        raise EvomergeError(f"{where}: sampler: unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    bad = set(options) - SAMPLERS[name]
    if bad:
        raise EvomergeError(f"{where}: sampler: {name} has no option(s) {sorted(bad)}; it takes {sorted(SAMPLERS[name]) or 'none'}")
    return name, options
