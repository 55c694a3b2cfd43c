"""The lm-eval fitness: zoo tasks, in-place scoring == the `lm_eval` command line on the
exported checkpoint, generation == one-pass scoring, determinism, and spec errors raised
before any candidate is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.backends.hf import HfBackend, as_candidate
from evomerge.errors import EvomergeError
from evomerge.export import save_checkpoint
from evomerge.fitness.evaluators import build_evaluator
from evomerge.fitness.harness import LmEvalEvaluator, flatten_results
from evomerge.fitness.spec import FitnessSpec
from evomerge.fitness.zoo_skills import SKILLS, exact_match, split_examples
from evomerge.merge.materialize import Materializer
from evomerge.recipe import Recipe
from evomerge.zoo import write_task_data

ZOO = Path("evomerge/zoo_models")
TASKS = Path("evaluators/tasks")
LIMIT = 24
TOKENIZER = AutoTokenizer.from_pretrained(ZOO / "base")


def score(evaluator, model) -> dict[str, float]:
    return evaluator.evaluate(as_candidate(model, TOKENIZER))


def spec(**options) -> FitnessSpec:
    data = {"kind": "lm_eval", "tasks": ["zoo_target"], "limit": LIMIT, "include_path": str(TASKS.resolve()),
            "objectives": [{"name": s, "metric": f"zoo_{s}/acc"} for s in SKILLS], **options}
    return FitnessSpec.from_dict(data, "test spec")


@pytest.fixture(scope="module")
def evaluator() -> LmEvalEvaluator:
    return build_evaluator(spec(), ZOO / "base")


@pytest.fixture(scope="module")
def candidate(tmp_path_factory):
    """A TIES merge of the three experts, float32, in place; plus its exported checkpoint."""
    recipe = Recipe.from_dict({
        "method": "ties", "base_model": str(ZOO / "base"), "dtype": "float32",
        "models": [{"model": str(ZOO / f"expert_{s}"), "parameters": {"weight": 0.6, "density": 0.7}} for s in SKILLS]})
    materializer = Materializer.for_recipe(recipe, device="cpu")
    model = materializer.apply(recipe)
    out = save_checkpoint(materializer, recipe, tmp_path_factory.mktemp("export") / "ties")
    return model, out


def test_shipped_task_data_is_what_the_zoo_writes(tmp_path):
    for path in write_task_data(tmp_path):
        assert path.read_text() == (TASKS / "zoo" / "data" / path.name).read_text(), path.name


def test_search_and_test_splits_share_no_prompt():
    for skill in SKILLS:
        search = {p for p, _ in split_examples(skill, "search")}
        assert not search & {p for p, _ in split_examples(skill, "test")}


def test_lm_eval_acc_is_exact_match_of_the_greedy_answer(evaluator):
    """The loglikelihood task's acc (is_greedy) equals evomerge's own teacher-forced exact match."""
    model = AutoModelForCausalLM.from_pretrained(ZOO / "expert_srt", dtype=torch.float32).eval()
    scores = score(evaluator, model)
    for skill in SKILLS:
        assert scores[f"zoo_{skill}/acc"] == exact_match(model, TOKENIZER, split_examples(skill, "search", LIMIT))
    assert scores["zoo_target/acc"] == pytest.approx(sum(scores[f"zoo_{s}/acc"] for s in SKILLS) / 3)


def test_generation_task_agrees_with_one_pass_scoring(candidate):
    """generate_until with an extraction filter gives the same exact match as the loglikelihood task."""
    model, _ = candidate
    both = build_evaluator(spec(tasks=["zoo_target", "zoo_gen"], limit=10,
                                objectives=[{"name": "gen", "metric": "zoo_gen/exact_match"}]), ZOO / "base")
    scores = score(both, model)
    assert both.metrics == {"zoo_gen/exact_match": "zoo_gen/exact_match,first-word"}
    gen_docs = both.task_dict["tasks"]["zoo_gen"].test_docs()  # the first 10 are rev prompts
    assert [d["prompt"][:3] for d in list(gen_docs)[:10]] == ["rev"] * 10
    assert scores["zoo_gen/exact_match"] == pytest.approx(scores["zoo_rev/acc"])


def test_same_candidate_same_scores_and_weights_are_read_live(evaluator, candidate):
    model, _ = candidate
    first = score(evaluator, model)
    assert score(evaluator, model) == first
    expert = AutoModelForCausalLM.from_pretrained(ZOO / "expert_rev", dtype=torch.float32).eval()
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters()}
        for name, param in model.named_parameters():
            param.copy_(dict(expert.named_parameters())[name])
        assert score(evaluator, model) == score(evaluator, expert)
        for name, param in model.named_parameters():
            param.copy_(saved[name])
    assert score(evaluator, model) == first


def test_in_place_scores_equal_the_lm_eval_command_line_on_the_export(evaluator, candidate, tmp_path):
    model, exported = candidate
    ours = score(evaluator, model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={exported.resolve()},dtype=float32", "--tasks", "zoo_target",
           "--include_path", str(TASKS.resolve()), "--limit", str(LIMIT), "--batch_size", "16",
           "--device", "cpu", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    theirs = flatten_results(results)
    for key in ("zoo_rev/acc", "zoo_srt/acc", "zoo_cae/acc", "zoo_target/acc"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-12), key


def test_the_hf_backend_wraps_each_new_model_object_once(evaluator):
    """A parameter-space candidate is one module object, wrapped once; a routed candidate is a new
    object and gets a new lm-eval wrapper around it (never an old wrapper re-pointed)."""
    experts = [str(ZOO / f"expert_{s}") for s in SKILLS]
    backend = HfBackend(Materializer(experts, dtype="float32", device="cpu"), ZOO / "base", batch_size=16)
    merge = Recipe.from_dict({"method": "linear", "dtype": "float32",
                              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts]})
    first, again = backend.materialize(merge), backend.materialize(merge)
    assert first.model is again.model and first.lm is again.lm
    def route(*layers: int):
        return backend.materialize(Recipe.from_dict({"dtype": "float32", "route": {
            "embed_from": experts[0], "layers": [{"model": experts[0], "layer": i} for i in layers]}}))

    identity = route(0, 1, 2, 3)  # the first expert's own path: the expert's scores
    scores, lm = evaluator.evaluate(identity), identity.lm
    assert scores == score(evaluator, AutoModelForCausalLM.from_pretrained(experts[0], dtype=torch.float32).eval())
    shorter = route(0, 1, 3)
    assert shorter.model is not identity.model and shorter.lm is not lm
    assert shorter.lm.model is shorter.model and shorter.costs["path_length"] == 3


def test_split_selects_the_held_out_prompts(candidate):
    model, _ = candidate
    test = build_evaluator(spec(split="test", limit=None), ZOO / "base")
    scores = score(test, model)
    for skill in SKILLS:
        expected = exact_match(model, TOKENIZER, split_examples(skill, "test"))
        assert scores[f"zoo_{skill}/acc"] == pytest.approx(expected)


@pytest.mark.parametrize("options, message", [
    ({"tasks": ["zoo_nonexistent"]}, "lm-eval task 'zoo_nonexistent' does not exist"),
    ({"objectives": [{"name": "x", "metric": "zoo_target/f1"}]}, "metric 'zoo_target/f1' is not produced"),
    ({"objectives": [{"name": "x", "metric": "zoo_gen/exact_match,strict"}], "tasks": ["zoo_gen"]},
     "metric 'zoo_gen/exact_match,strict' is not produced"),
    ({"split": "validation"}, "has no split 'validation'"),
])
def test_bad_fitness_specs_fail_before_any_model(options, message):
    with pytest.raises(EvomergeError, match=message.replace("(", r"\(")):
        build_evaluator(spec(**options), ZOO / "base")


def test_task_whose_local_data_is_missing(tmp_path):
    (tmp_path / "broken.yaml").write_text(
        "task: zoo_broken\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: /nonexistent/data.jsonl}\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: prompt\ndoc_to_target: target\n")
    with pytest.raises(EvomergeError, match="could not be loaded.*check the task's dataset"):
        build_evaluator(spec(tasks=["zoo_broken"], include_path=str(tmp_path),
                             objectives=[{"name": "x", "metric": "zoo_broken/acc"}]), ZOO / "base")


@pytest.mark.parametrize("options, message", [
    ({"tasks": []}, "tasks must be a non-empty list"),
    ({"limit": 0}, "limit must be a positive integer"),
    ({"objectives": [{"name": "x", "metric": "acc"}]}, "metric must be TASK/METRIC"),
    ({"n_examples": 3}, "unknown key"),
])
def test_bad_lm_eval_options_are_caught_when_the_spec_loads(options, message):
    with pytest.raises(EvomergeError, match=message):
        spec(**options)


def test_run_with_a_bad_task_prints_one_line_and_builds_nothing(tmp_path):
    fitness = tmp_path / "fitness.yaml"
    fitness.write_text(f"kind: lm_eval\ntasks: [no_such_task]\ninclude_path: {TASKS.resolve()}\n"
                       "objectives: [{name: x, metric: no_such_task/acc}]\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"name: bad\nmodels: [{ZOO}/expert_rev, {ZOO}/expert_srt]\nbase_model: {ZOO}/base\n"
                      f"search_space: search_spaces/ps_ties_dare.yaml\nfitness: {fitness}\nsampler: random\n"
                      f"budget: {{n_trials: 2}}\nstorage: sqlite:///{tmp_path}/study.db\n")
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(config)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "lm-eval task 'no_such_task' does not exist" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "study.db").exists()


def test_fingerprint_ignores_where_the_spec_lives():
    a = FitnessSpec.load("evaluators/zoo_target.yaml")
    assert replace(a, source="/elsewhere/zoo_target.yaml").fingerprint() == a.fingerprint()


def test_demo_runs_then_resumes(tmp_path):
    """The demo end to end on a tiny budget (the full one is in README); a second run resumes."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "evomerge.cli", "demo", "--n-trials", "3", "--out", str(out), "--quiet"]
    # --out keeps the test away from the checkout's runs/demo
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for heading in ("Source models on the search split", "Pareto archive", "On the test split", "best merge (trial",
                    "Phase 2, layer routing", "Best route (trial"):
        assert heading in first.stdout
    assert (out / "pareto.png").stat().st_size > 0 and (out / "best" / "model.safetensors").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert second.returncode == 0 and second.stdout.count("3/3 trials done") == 2  # both phases resumed, none added
    table = lambda text: text[text.index("On the test split"):text.index("Pareto plot")]  # noqa: E731
    assert table(second.stdout) == table(first.stdout)


def test_builtin_task_without_its_data_offline():
    """gsm8k-style built-in tasks need the hub: offline, one clear error and no model loaded."""
    with pytest.raises(EvomergeError, match="mgsm_native_cot_ja.*could not be loaded.*offline"):
        build_evaluator(FitnessSpec.load("evaluators/mgsm_ja.yaml"), ZOO / "base")


def test_demo_outside_a_checkout_says_what_it_needs(tmp_path, monkeypatch):
    """Installed from a wheel, the package has no runs/, evaluators/ or search_spaces/ beside it."""
    from evomerge import demo

    monkeypatch.setattr(demo, "REPO", tmp_path)
    with pytest.raises(EvomergeError, match="clone the repository and run `pip install -e .` there"):
        demo.main(n_trials=1, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
