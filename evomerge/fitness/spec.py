"""Fitness specs: what each candidate is scored on, which objectives the search sees, and
the scalarization that single-objective samplers optimize.

    kind: lm_eval                    # lm-eval tasks (or zoo_skills: the zoo's built-in scorer)
    tasks: [zoo_target]              # task or group names; local ones live under tasks/ beside this file
    limit: 200                       # examples per task during search (default: all)
    split: search                    # optional: evaluate this split instead of the task's test_split
    objectives:                      # every objective is recorded on every trial
      - {name: target, metric: zoo_target/acc}   # TASK/METRIC[,FILTER]; direction: maximize (default)
      - {name: params, metric: param_count, direction: minimize}
    scalarization: {target: 1.0}     # weighted sum (minimized objectives enter negated)

Cheaper fitness (lm_eval kind; each key optional, all in the study's fingerprint):

    subset: {size: 60, seed: 0, stratify_by: level}   # the same seeded, stratified items for every
                                     # candidate (evomerge.fitness.subset); not with `limit`
    racing: {pruner: wilcoxon, p_threshold: 0.1, min_items: 20, chunk: 20}
                                     # evaluate in chunks, stop a candidate clearly worse than the
                                     # best so far (evomerge.fitness.racing); single-objective samplers only
    estimator: {kind: irt, anchors: 50, refit_every: 10}
                                     # scores = IRT estimates of the whole split (evomerge.fitness.irt): from
                                     # `anchors` items, or from a subset's or a pruned race's answers

Metrics are the evaluator's scores, plus costs measured on the candidate itself
(`param_count`, and `path_length` for routed candidates). Each kind declares its own
options; lm-eval metric names are checked against the loaded tasks before any candidate is
built (evomerge.fitness.harness).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.yamlio import check_keys, load_yaml_mapping

COST_METRICS = ("param_count", "path_length")
_COMMON = {"kind", "objectives", "scalarization", "description"}
ITEM_KEYS = ("subset", "racing", "estimator")  # lm_eval only: which items a candidate is evaluated on, and how


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Per kind: option -> (default, check, what is expected); `required` options have no default.
REQUIRED = object()
KINDS: dict[str, dict[str, tuple[Any, Any, str]]] = {
    "zoo_skills": {
        "n_examples": (200, _positive, "a positive integer"),
        "split": ("search", lambda v: v in ("search", "test"), "search or test"),
    },
    "lm_eval": {
        "tasks": (REQUIRED, lambda v: isinstance(v, list) and v and all(isinstance(t, str) and t for t in v),
                  "a non-empty list of lm-eval task or group names"),
        "limit": (None, lambda v: v is None or _positive(v), "a positive integer (examples per task) or null"),
        "num_fewshot": (None, lambda v: v is None or _non_negative(v), "a non-negative integer or null"),
        "batch_size": (32, _positive, "a positive integer"),
        "split": (None, lambda v: v is None or (isinstance(v, str) and v), "a split name or null"),
        "seed": (1234, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        "include_path": ("tasks", lambda v: isinstance(v, str) and v, "a folder of task YAMLs"),
    },
}


def _gen_kwargs(value: Any) -> bool:
    plain = (str, int, float, bool)
    return isinstance(value, dict) and bool(value) and all(
        isinstance(task, str) and isinstance(kwargs, dict) and kwargs and all(
            isinstance(k, str) and (isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, str) for x in v)))
            for k, v in kwargs.items())
        for task, kwargs in value.items())


# lm_eval only: how prompts are formatted and answers generated, lm-eval's own options of these names
# (chat models are scored through their chat template). Stored only when given, so a study made
# before they existed keeps its fingerprint.
CHAT_OPTIONS: dict[str, tuple[Any, str]] = {
    "apply_chat_template": (lambda v: isinstance(v, bool) or (isinstance(v, str) and bool(v)),
                            "true, false, or the name of a chat template the tokenizer holds"),
    "system_instruction": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "fewshot_as_multiturn": (lambda v: isinstance(v, bool), "true or false (default: as apply_chat_template)"),
    "gen_kwargs": (_gen_kwargs, "a mapping of task names to generation options, e.g. {zoo_gen: {max_gen_toks: 16, "
                                "until: ['</s>']}}"),
    "max_length": (_positive, "a positive integer (the longest prompt plus answer, in tokens)"),
}
ZOO_SKILLS = ("rev", "srt", "cae")  # the zoo's skills (evomerge.zoo trains one expert per skill)
ZOO_METRICS = (*ZOO_SKILLS, "mean")


@dataclass(frozen=True)
class Objective:
    name: str
    metric: str
    direction: str = "maximize"


@dataclass(frozen=True)
class FitnessSpec:
    kind: str
    objectives: tuple[Objective, ...]
    scalarization: dict[str, float]
    options: dict[str, Any]
    source: str = "fitness spec"  # the spec file: named in errors; relative task folders are found beside it

    @classmethod
    def load(cls, path: str | Path) -> "FitnessSpec":
        return cls.from_dict(load_yaml_mapping(path, "fitness spec"), str(path))

    def fingerprint(self) -> dict[str, Any]:
        """What must not change under a running study (not where the checkout lives)."""
        return {"kind": self.kind, "objectives": [asdict(o) for o in self.objectives],
                "scalarization": self.scalarization, "options": self.options}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "fitness spec") -> "FitnessSpec":
        kind = data.get("kind")
        if kind not in KINDS:
            raise EvomergeError(f"{where}: kind must be one of {sorted(KINDS)}, got {kind!r}")
        lm_eval_only = {*ITEM_KEYS, *CHAT_OPTIONS} if kind == "lm_eval" else set()
        check_keys(data, _COMMON | set(KINDS[kind]) | lm_eval_only, where)
        options = {**_options(data, kind, where), **_item_options(data, where), **_chat_options(data, where)}
        entries = data.get("objectives")
        if not isinstance(entries, list) or not entries:
            raise EvomergeError(f"{where}: objectives must be a non-empty list of {{name, metric, direction}}")
        objectives = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) - {"name", "metric", "direction"} or "metric" not in entry:
                raise EvomergeError(f"{where}: objectives[{i}] must be {{name: NAME, metric: METRIC, direction: maximize|minimize}}")
            direction = entry.get("direction", "maximize")
            if direction not in ("maximize", "minimize"):
                raise EvomergeError(f"{where}: objectives[{i}].direction must be maximize or minimize, got {direction!r}")
            objectives.append(Objective(str(entry.get("name", entry["metric"])), str(entry["metric"]), direction))
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise EvomergeError(f"{where}: objective names must be unique, got {names}")
        scalarization = data.get("scalarization") or {names[0]: 1.0}
        if not isinstance(scalarization, dict) or set(scalarization) - set(names) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in scalarization.values()):
            raise EvomergeError(f"{where}: scalarization must map objective names {names} to numbers, got {scalarization!r}")
        for o in objectives:
            if o.metric in COST_METRICS:
                continue
            if kind == "zoo_skills" and o.metric not in ZOO_METRICS:
                raise EvomergeError(f"{where}: objective {o.name!r} uses metric {o.metric!r}, which zoo_skills does not "
                                    f"produce; available: {sorted((*ZOO_METRICS, *COST_METRICS))}")
            if kind == "lm_eval" and "/" not in o.metric:
                raise EvomergeError(f"{where}: objective {o.name!r}: metric must be TASK/METRIC (e.g. zoo_target/acc) "
                                    f"or one of {list(COST_METRICS)}, got {o.metric!r}")
        return cls(kind, tuple(objectives), {k: float(v) for k, v in scalarization.items()}, options, where)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def objective_values(self, scores: dict[str, float]) -> dict[str, float]:
        return {o.name: float(scores[o.metric]) for o in self.objectives}

    def scalarize(self, values: dict[str, float]) -> float:
        """The weighted sum single-objective samplers maximize (minimized objectives count negatively)."""
        sign = {o.name: 1.0 if o.direction == "maximize" else -1.0 for o in self.objectives}
        return sum(w * sign[name] * values[name] for name, w in self.scalarization.items())


def _item_options(data: dict[str, Any], where: str) -> dict[str, Any]:
    """`subset`, `racing` and `estimator` with their defaults filled in, present only when given (a
    study made before they existed keeps its fingerprint); combinations that cannot work are refused."""
    parsers = {"subset": SubsetSpec.from_dict, "racing": RacingSpec.from_dict, "estimator": EstimatorSpec.from_dict}
    given = {key: parsers[key](data[key], where).to_dict() for key in ITEM_KEYS if key in data}
    limit, subset, racing, estimator = data.get("limit"), given.get("subset"), given.get("racing"), given.get("estimator")
    anchors = estimator and estimator["anchors"]
    if subset and limit is not None:
        raise EvomergeError(f"{where}: subset and limit exclude each other (both choose the items): drop limit")
    if estimator and limit is not None:
        raise EvomergeError(f"{where}: estimator {estimator['kind']} estimates the whole split: drop limit")
    if anchors and (subset or racing):
        raise EvomergeError(f"{where}: estimator.anchors chooses the items every candidate sees: drop "
                            f"{'subset' if subset else 'racing'}, or drop anchors to estimate from the subset's or "
                            "the race's answers")
    if estimator and not (anchors or subset or racing):
        raise EvomergeError(f"{where}: estimator {estimator['kind']} estimates the items a candidate did not see, but "
                            "every candidate sees every item: give it anchors: N, or use it with subset or racing")
    return given


def _chat_options(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The chat and generation options given (none has a stored default: see CHAT_OPTIONS)."""
    given = {key: data[key] for key in CHAT_OPTIONS if key in data}
    for key, value in given.items():
        check, expected = CHAT_OPTIONS[key]
        if not check(value):
            raise EvomergeError(f"{where}: {key} must be {expected}, got {value!r}")
    if given.get("fewshot_as_multiturn") and not given.get("apply_chat_template"):
        raise EvomergeError(f"{where}: fewshot_as_multiturn needs apply_chat_template (few-shot turns are chat turns)")
    if given.get("apply_chat_template") is False:
        del given["apply_chat_template"]  # false is the default: the same study as leaving it out
    return given


def _options(data: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    options = {}
    for key, (default, check, expected) in KINDS[kind].items():
        if key not in data and default is REQUIRED:
            raise EvomergeError(f"{where}: {kind} needs {key!r}: {expected}")
        value = data.get(key, default)
        if not check(value):
            raise EvomergeError(f"{where}: {key} must be {expected}, got {value!r}")
        options[key] = value
    return options


# ---------------------------------------------------------------- the item keys: subset, racing, estimator

@dataclass(frozen=True)
class SubsetSpec:
    size: int
    seed: int = 0
    stratify_by: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "fitness spec") -> "SubsetSpec":
        if not isinstance(data, dict):
            raise EvomergeError(f"{where}: subset must be {{size: N, seed: S, stratify_by: FIELD}}, got {data!r}")
        check_keys(data, {"size", "seed", "stratify_by"}, f"{where}: subset")
        size, seed, field = data.get("size"), data.get("seed", 0), data.get("stratify_by")
        if not _positive(size):
            raise EvomergeError(f"{where}: subset.size must be a positive integer (items per candidate), got {size!r}")
        if not _non_negative(seed):
            raise EvomergeError(f"{where}: subset.seed must be a non-negative integer, got {seed!r}")
        if field is not None and (not isinstance(field, str) or not field):
            raise EvomergeError(f"{where}: subset.stratify_by must be a field name of the task's documents, got {field!r}")
        return cls(size, seed, field)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the fitness fingerprint."""
        return asdict(self)


PRUNERS = ("wilcoxon",)


@dataclass(frozen=True)
class RacingSpec:
    """`racing:` of a fitness spec (every key optional; the defaults are WilcoxonPruner's own
    p_threshold and a chunk as large as the smallest sample it decides on)."""

    pruner: str = "wilcoxon"
    p_threshold: float = 0.1
    min_items: int = 20
    chunk: int = 20

    @classmethod
    def from_dict(cls, data: Any, where: str = "fitness spec") -> "RacingSpec":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise EvomergeError(f"{where}: racing must be {{pruner: wilcoxon, p_threshold: P, min_items: N, chunk: N}}, "
                                f"got {data!r}")
        check_keys(data, {"pruner", "p_threshold", "min_items", "chunk"}, f"{where}: racing")
        spec = cls(**data)
        if spec.pruner not in PRUNERS:
            raise EvomergeError(f"{where}: racing.pruner must be one of {list(PRUNERS)}, got {spec.pruner!r}")
        p = spec.p_threshold
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p < 1:
            raise EvomergeError(f"{where}: racing.p_threshold must be a number between 0 and 1, got {p!r}")
        for key in ("min_items", "chunk"):
            value = getattr(spec, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EvomergeError(f"{where}: racing.{key} must be a positive integer (items), got {value!r}")
        return cls(spec.pruner, float(p), spec.min_items, spec.chunk)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EstimatorSpec:
    """`estimator:` of a fitness spec: `anchors` (items every candidate is evaluated on, chosen
    from the fit on the source models) or none (the estimator then completes the answers of a
    `subset` or of a pruned race), and how many new fully scored rows trigger a refit."""

    kind: str = "irt"
    anchors: int | None = None
    refit_every: int = 10

    @classmethod
    def from_dict(cls, data: Any, where: str = "fitness spec") -> "EstimatorSpec":
        if not isinstance(data, dict):
            raise EvomergeError(f"{where}: estimator must be {{kind: irt, anchors: N, refit_every: K}}, got {data!r}")
        check_keys(data, {"kind", "anchors", "refit_every"}, f"{where}: estimator")
        spec = cls(**data)
        if spec.kind != "irt":
            raise EvomergeError(f"{where}: estimator.kind must be irt, got {spec.kind!r}")
        if spec.anchors is not None and not _positive(spec.anchors):
            raise EvomergeError(f"{where}: estimator.anchors must be a positive integer (items per candidate), "
                                f"got {spec.anchors!r}")
        if not _positive(spec.refit_every):
            raise EvomergeError(f"{where}: estimator.refit_every must be a positive integer (fully scored trials), "
                                f"got {spec.refit_every!r}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
