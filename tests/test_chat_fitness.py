"""Chat models scored through their chat template (issue 18): the fitness spec's apply_chat_template,
system_instruction, fewshot_as_multiturn, gen_kwargs and max_length reach lm-eval; a candidate is
formatted with the template its merge is exported with; the scores equal `lm_eval run
--apply_chat_template --system_instruction` on the exported checkpoint; a spec asking for a
template that a model lacks is refused in one line before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.backends.hf import HfBackend
from evomerge.config import load_config
from evomerge.errors import EvomergeError
from evomerge.export import save_checkpoint
from evomerge.fitness.harness import LmEvalEvaluator, flatten_results, select_template
from evomerge.fitness.spec import FitnessSpec
from evomerge.merge.materialize import Materializer
from evomerge.recipe import Recipe
from evomerge.search.loop import check_chat_template
from evomerge.zoo import CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
ZOO = "evomerge/zoo_models"
TASKS = str(REPO / "evaluators" / "tasks")
REFS = [f"{ZOO}/base", f"{ZOO}/expert_rev", f"{ZOO}/expert_srt", f"{ZOO}/expert_cae"]
LIMIT = 12
SYSTEM = "be exact"
SKILLS = ("rev", "srt", "cae")


def spec(**options) -> FitnessSpec:
    return FitnessSpec.from_dict({"kind": "lm_eval", "tasks": ["zoo_target"], "limit": LIMIT, "include_path": TASKS,
                                  "objectives": [{"name": s, "metric": f"zoo_{s}/acc"} for s in SKILLS], **options},
                                 "chat spec")


def merge(chat_template: str | None = f"{ZOO}/expert_rev") -> Recipe:
    """A TIES merge whose export carries expert_rev's template (the base, its tokenizer model, has none)."""
    return Recipe.from_dict({
        "method": "ties", "base_model": REFS[0], "dtype": "float32", "chat_template": chat_template,
        "models": [{"model": ref, "parameters": {"weight": 0.6, "density": 0.7}} for ref in REFS[1:]]})


@pytest.fixture(scope="module")
def backend() -> HfBackend:
    return HfBackend(Materializer(REFS, dtype="float32", device="cpu"), REFS[0], batch_size=16)


class Recorder:
    """Wraps a live lm-eval model's request methods to keep what it was asked."""

    def __init__(self, lm):
        self.requests: list = []
        for name in ("loglikelihood", "generate_until"):
            method = getattr(lm, name)
            setattr(lm, name, lambda requests, disable_tqdm=False, _m=method: self.keep(requests, _m))

    def keep(self, requests, method):
        self.requests += [r.args for r in requests]
        return method(requests)


def test_a_candidate_is_prompted_through_the_template_it_is_exported_with(backend):
    candidate = backend.materialize(merge())
    assert candidate.chat_template == CHAT_TEMPLATE  # expert_rev's: the export's, not the base tokenizer's (none)
    recorder = Recorder(candidate.lm)
    LmEvalEvaluator(spec(apply_chat_template=True, system_instruction=SYSTEM)).evaluate(candidate)
    contexts = [context for context, _ in recorder.requests]
    assert len(contexts) == 3 * LIMIT
    assert all(c.startswith(f"{SYSTEM} <s>") and c.count("<s>") == 1 and c.endswith("=") for c in contexts)
    assert all(target.endswith("</s>") for _, target in recorder.requests)


def test_without_the_option_prompts_stay_raw_even_after_a_chat_evaluation(backend):
    candidate = backend.materialize(merge())
    LmEvalEvaluator(spec(apply_chat_template=True)).evaluate(candidate)  # the wrapper is reused across specs
    recorder = Recorder(candidate.lm)
    LmEvalEvaluator(spec()).evaluate(candidate)
    assert all("<s>" not in c and c.startswith(("rev:", "srt:", "cae:")) for c, _ in recorder.requests)


def test_scores_equal_the_lm_eval_command_line_with_the_template_on_the_export(backend, tmp_path):
    recipe = merge()
    ours = LmEvalEvaluator(spec(apply_chat_template=True, system_instruction=SYSTEM)).evaluate(
        backend.materialize(recipe))
    exported = save_checkpoint(Materializer.for_recipe(recipe, device="cpu"), recipe, tmp_path / "merged")
    assert (exported / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={exported.resolve()},dtype=float32", "--tasks", "zoo_target",
           "--include_path", TASKS, "--limit", str(LIMIT), "--batch_size", "16", "--device", "cpu",
           "--apply_chat_template", "--system_instruction", SYSTEM, "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = flatten_results(json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"])
    for key in ("zoo_rev/acc", "zoo_srt/acc", "zoo_cae/acc", "zoo_target/acc"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-12), key
    raw = LmEvalEvaluator(spec()).evaluate(backend.materialize(recipe))
    assert raw["zoo_target/acc"] != ours["zoo_target/acc"]  # the template changes what is measured


def test_gen_kwargs_override_a_generation_tasks_options_and_max_length_reaches_the_model(backend):
    fitness = FitnessSpec.from_dict({"kind": "lm_eval", "tasks": ["zoo_gen"], "limit": LIMIT, "include_path": TASKS,
                                     "objectives": [{"name": "gen", "metric": "zoo_gen/exact_match"}],
                                     "gen_kwargs": {"zoo_gen": {"max_gen_toks": 2}}, "max_length": 48}, "gen spec")
    candidate = backend.materialize(Recipe.from_dict({"method": "linear", "dtype": "float32",
                                                      "models": [{"model": REFS[1], "parameters": {"weight": 1.0}}]}))
    recorder = Recorder(candidate.lm)
    scores = LmEvalEvaluator(fitness).evaluate(candidate)
    assert all(kwargs["max_gen_toks"] == 2 and kwargs["until"] == ["</s>", "="] for _, kwargs in recorder.requests)
    assert scores["zoo_gen/exact_match"] == 0.0  # every answer has 3+ letters: two tokens cannot hold one
    assert candidate.lm.max_length == 48


@pytest.mark.parametrize("options, message", [
    ({"gen_kwargs": {"zoo_nope": {"max_gen_toks": 2}}}, "gen_kwargs names task 'zoo_nope', which is not among"),
    ({"gen_kwargs": {"zoo_rev": {"max_gen_toks": 2}}}, "whose requests are loglikelihood"),
])
def test_gen_kwargs_for_a_task_that_does_not_generate_are_refused(options, message):
    with pytest.raises(EvomergeError, match=message):
        LmEvalEvaluator(spec(**options))


@pytest.mark.parametrize("options, message", [
    ({"apply_chat_template": ""}, "apply_chat_template must be true, false, or the name"),
    ({"fewshot_as_multiturn": True}, "fewshot_as_multiturn needs apply_chat_template"),
    ({"system_instruction": 7}, "system_instruction must be a non-empty string"),
    ({"max_length": 0}, "max_length must be a positive integer"),
    ({"gen_kwargs": {"zoo_gen": {"until": [1]}}}, "gen_kwargs must be a mapping of task names"),
])
def test_bad_chat_options_fail_when_the_spec_loads(options, message):
    with pytest.raises(EvomergeError, match=message):
        spec(**options)


def test_chat_options_are_part_of_the_fingerprint_and_false_is_the_default():
    plain = spec().fingerprint()
    assert spec(apply_chat_template=False).fingerprint() == plain  # a study made before the keys existed keeps its own
    assert spec(apply_chat_template=True).fingerprint() != plain
    assert spec(apply_chat_template=True, system_instruction=SYSTEM).fingerprint() != spec(
        apply_chat_template=True).fingerprint()
    assert spec(max_length=32).fingerprint() != plain


def test_template_selection_by_name_and_its_refusals():
    named = {"default": "{{ a }}", "tool_use": "{{ b }}"}
    assert select_template(named, True, "s") == "{{ a }}" and select_template(named, "tool_use", "s") == "{{ b }}"
    assert select_template("{{ c }}", True, "s") == "{{ c }}"
    for templates, wanted, message in [(None, True, "has no chat template"), ("{{ c }}", "x", "one unnamed template"),
                                       (named, "x", r"no template named 'x'; it has \['default', 'tool_use'\]")]:
        with pytest.raises(EvomergeError, match=message):
            select_template(templates, wanted, "s")


def run_config(folder: Path, fitness: dict, **extra) -> Path:
    (folder / "fitness.yaml").write_text(yaml.safe_dump(fitness))
    config = {"name": "chat", "models": REFS[1:], "base_model": REFS[0], "search_space": "search_spaces/ps_ties_dare.yaml",
              "fitness": str(folder / "fitness.yaml"), "storage": f"sqlite:///{folder}/chat.db", "dtype": "float32",
              "budget": {"n_trials": 1}, **extra}
    path = folder / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_chat_spec_on_models_without_a_template_is_refused_in_one_line_before_loading(tmp_path):
    fitness = {"kind": "lm_eval", "tasks": ["zoo_rev"], "include_path": TASKS, "apply_chat_template": True,
               "objectives": [{"name": "rev", "metric": "zoo_rev/acc"}]}
    path = run_config(tmp_path, fitness)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(path)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "scoring evomerge/zoo_models/base): apply_chat_template is set, but" in done.stderr
    assert "no chat template" in done.stderr and not (tmp_path / "chat.db").exists()
    check_chat_template(load_config(run_config(tmp_path, fitness, chat_template=REFS[1])), FitnessSpec.from_dict(fitness))
    shipped = load_config(REPO / "runs" / "zoo_chat.yaml")
    check_chat_template(shipped, shipped.fitness)  # the shipped example passes the check


def test_the_run_config_chat_template_is_fingerprinted_and_checked(tmp_path):
    fitness = {"kind": "zoo_skills", "objectives": [{"name": "m", "metric": "mean"}]}
    plain = load_config(run_config(tmp_path, fitness)).fingerprint()
    assert "chat_template" not in plain
    assert load_config(run_config(tmp_path, fitness, chat_template=REFS[1])).fingerprint()["chat_template"] == REFS[1]
    with pytest.raises(EvomergeError, match="chat_template: expected one of the models"):
        load_config(run_config(tmp_path, fitness, chat_template="not/a/model"))
