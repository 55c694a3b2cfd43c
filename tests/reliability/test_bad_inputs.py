"""Bad input of every kind: one line `evomerge: error: ...` on stderr that names the problem and
the way out, exit code 2, no traceback, and an existing study left byte for byte as it was.

Each case starts from a copy of one prepared study (a run config `t.yaml` with one completed
trial in `t.db`) and breaks one thing: the run config, the search space, the fitness spec, a
model, or the command line."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from reliability.harness import write_config
from reliability.pg import PASSWORD


@dataclass
class Inputs:
    """The prepared study's copy, and ways to break one input; each returns the command line."""

    folder: Path
    zoo: Path
    request: pytest.FixtureRequest

    @property
    def config(self) -> dict:
        return yaml.safe_load((self.folder / "t.yaml").read_text())

    def run(self, *args: str, **change: object) -> list[str]:
        """`evomerge run` on the prepared config with `change` applied."""
        (self.folder / "t.yaml").write_text(yaml.safe_dump({**self.config, **change}))
        return ["run", str(self.folder / "t.yaml"), "--quiet", *args]

    def file(self, name: str, text: str) -> str:
        (self.folder / name).write_text(text)
        return str(self.folder / name)

    def model(self, name: str, config: dict | None = None, weights: Callable[[Path], None] | None = None) -> str:
        """A copy of the zoo's base model, its config.json updated with `config`, its weights rewritten by `weights`."""
        path = self.folder / name
        shutil.copytree(self.zoo / "base", path)
        data = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**data, **(config or {})}))
        if weights:
            weights(path)
        return str(path)

    def with_model(self, *args: str, **model_kwargs) -> list[str]:
        """A new study (the prepared one refuses other models) with one source replaced by a broken copy."""
        models = self.config["models"]
        return self.run("--study-name", "new", *args, models=[models[0], self.model("odd", **model_kwargs), *models[2:]])

    def postgres(self, password: str) -> str:
        return self.request.getfixturevalue("pg_cluster").url(password=password)


def _fewer_tokens(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:40].clone()
    save_file(tensors, path / "model.safetensors")


def _pickled(path: Path) -> None:
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


SPACE = "search_spaces/ps_ties_dare.yaml"
CASES: dict[str, tuple[Callable[[Inputs], list[str]], str]] = {
    # run config
    "config missing": (lambda i: ["run", str(i.folder / "none.yaml")], "cannot read run config"),
    "config YAML syntax": (lambda i: ["run", i.file("c.yaml", "name: [t\nmodels: x\n")], "not valid YAML (line"),
    "config unknown key": (lambda i: i.run(colour="red"), "unknown key(s) ['colour']"),
    "config wrong type": (lambda i: i.run(models="evomerge/zoo_models/base"), "models: expected a non-empty list"),
    "config zero budget": (lambda i: i.run(budget={"n_trials": 0}), "n_trials: expected an integer >= 1"),
    "config unknown sampler": (lambda i: i.run(sampler="cmaes2"), "unknown sampler 'cmaes2'"),
    "config changed search space": (lambda i: i.run(search_space="search_spaces/ps_task_arithmetic.yaml"),
                                    "made with a different search_space"),
    # search space
    "space missing": (lambda i: i.run(search_space="search_spaces/missing.yaml"),
                      "search_space: file search_spaces/missing.yaml not found"),
    "space unknown method": (lambda i: i.run(search_space=i.file("s.yaml", "{method: tiez, per_source: {weight: "
                                                                           "{low: 0, high: 1}}}")), "unknown merge method 'tiez'"),
    "space reversed bounds": (lambda i: i.run(search_space=i.file("s.yaml", "{method: ties, per_source: {weight: "
                                                                            "{low: 1.5, high: 0}}}")), "low (1.5) must be below high (0)"),
    # fitness spec
    "fitness unknown kind": (lambda i: i.run(fitness=i.file("f.yaml", "kind: vibes\n")), "kind must be one of"),
    "fitness unknown metric": (lambda i: i.run(fitness=i.file("f.yaml", yaml.safe_dump(
        {"kind": "zoo_skills", "objectives": [{"name": "x", "metric": "bleu"}]}))), "uses metric 'bleu'"),
    # models
    "model missing": (lambda i: i.run(models=["no/such/model"]), "no such directory"),
    "model other architecture": (lambda i: i.with_model(config={"model_type": "mistral", "architectures": ["MistralForCausalLM"]}),
                                 "have different architectures"),
    "model other vocabulary": (lambda i: i.with_model(config={"vocab_size": 40}, weights=_fewer_tokens),
                               "different vocabulary sizes (43 vs 40 rows"),
    "model pickle weights": (lambda i: i.with_model(weights=_pickled), "has only pickle weights (pytorch_model.bin)"),
    "model remote code": (lambda i: i.with_model(config={"auto_map": {"AutoModelForCausalLM": "m.M"}}),
                          "pass --trust-remote-code only if you trust that code"),
    # storage
    "storage unwritable": (lambda i: i.run(storage=f"sqlite:///{i.file('blocker', '')}/sub/t.db"),
                           "cannot create folder"),
    "storage unreachable": (lambda i: i.run(storage=f"postgresql://u:{PASSWORD}@127.0.0.1:1/x"),
                            "cannot open storage postgresql://u:***@127.0.0.1:1/x"),
    "storage wrong password": (lambda i: i.run(storage=i.postgres(password=PASSWORD + "-wrong")),
                               "password authentication failed"),
    # command line
    "cli unknown command": (lambda i: ["rn", str(i.folder / "t.yaml")], "invalid choice: 'rn'"),
    "cli not a number": (lambda i: i.run("--n-trials", "ten"), "argument --n-trials: invalid int value: 'ten'"),
    "cli zero trials": (lambda i: i.run("--n-trials", "0"), "--n-trials: expected an integer >= 1, got 0"),
    "cli status of no study": (lambda i: ["status", str(i.folder / "t.yaml"), "--study-name", "other"],
                               "no study 'other'"),
    "cli export unknown trial": (lambda i: ["export", str(i.folder / "t.yaml"), "--trial", "99", "--out", str(i.folder / "o")],
                                 "has no trial 99 with a recipe; trials are numbered 0..0"),
    "cli merge unwritable out": (lambda i: ["merge", "runs/examples/zoo_linear.yaml", "--out", f"{i.file('blocker', '')}/sub"],
                                 "cannot create"),
    # recipes (evomerge merge)
    "recipe missing": (lambda i: ["merge", str(i.folder / "none.yaml"), "--out", str(i.folder / "o")], "cannot read recipe"),
    "recipe YAML syntax": (lambda i: ["merge", i.file("r.yaml", "method: ties\nmodels: [a\n"), "--out", str(i.folder / "o")],
                           "not valid YAML (line"),
    "recipe unknown method": (lambda i: ["merge", i.file("r.yaml", "method: nope\nmodels: [a]\n"), "--out", str(i.folder / "o")],
                              "unknown merge method 'nope'"),
    "recipe wrong type": (lambda i: ["merge", i.file("r.yaml", "method: linear\nmodels: [{model: evomerge/zoo_models/base, "
                                                               "parameters: {weight: one}}]\n"), "--out", str(i.folder / "o")],
                          "expected a finite number"),
    "recipe wrong group count": (lambda i: ["merge", i.file("r.yaml", "method: ties\nbase_model: evomerge/zoo_models/base\n"
                                                                      "models: [{model: evomerge/zoo_models/expert_rev, "
                                                                      "parameters: {weight: [1, 2, 3]}}]\n"), "--out", str(i.folder / "o")],
                                 "has 3 values but a 4-layer model"),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, zoo):
    """A study with one completed trial, made once; each case works on a copy."""
    folder = tmp_path_factory.mktemp("prepared")
    assert main(["run", str(write_config(folder, zoo, n_trials=1)), "--quiet"]) == 0
    return folder


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_leaves_the_study_alone(case, prepared, tmp_path, zoo, capfd, request):
    for name in ("t.yaml", "t.db", "fitness.yaml"):
        shutil.copy(prepared / name, tmp_path / name)
    config = tmp_path / "t.yaml"
    config.write_text(config.read_text().replace(str(prepared), str(tmp_path)))  # this copy's study and fitness
    inputs = Inputs(tmp_path, zoo, request)
    before = (tmp_path / "t.db").read_bytes()
    make_argv, message = CASES[case]
    argv = make_argv(inputs)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evomerge: error: ") and message in lines[0], (err, out)
    assert PASSWORD not in out + err
    assert (tmp_path / "t.db").read_bytes() == before
