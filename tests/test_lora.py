"""LoRA adapters as sources, checked against PEFT itself: one adapter merged alone is PEFT's
merge_and_unload() to the bit; a weighted sum of adapters' deltas is add_weighted_adapter("cat")
merged; the factor composition (lora_linear) is add_weighted_adapter("linear") merged. Adapters
are made by PEFT on small random float32 models (LLaMA, and GPT-2 for fan_in_fan_out's Conv1D).
A merge written as one PEFT adapter (`--adapter`) is, merged by PEFT on the base, the full checkpoint
evomerge writes: to the bit for lora_linear, within a few ulps for the weighted sum of deltas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from evomerge.cli import main  # noqa: E402
from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.merge.methods import METHODS  # noqa: E402
from evomerge.merge.materialize import Materializer  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.zoo import build_tokenizer  # noqa: E402

# name -> (LoraConfig kwargs, seed): rank/alpha patterns, rsLoRA and modules_to_save all covered
ADAPTERS = {
    "a1": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                alpha_pattern={"down_proj": 3}), 1),
    "a2": (dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
                modules_to_save=["lm_head"]), 2),
    # one rank layout and one scaling, as the factor composition needs
    "h1": (dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "gate_proj"]), 3),
    "h2": (dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "gate_proj"]), 4),
    "h3": (dict(r=4, lora_alpha=4, target_modules=["q_proj", "gate_proj"]), 5),
    "r2": (dict(r=2, lora_alpha=2, target_modules=["q_proj"]), 6),
}


def _adapter(base_dir: Path, out: Path, seed: int, model_cls=LlamaForCausalLM, **lora) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(model_cls.from_pretrained(base_dir), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # B @ A comparable to the base weights somewhere, so rounding is exercised
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(4)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    build_tokenizer().save_pretrained(root / "base")  # an export writes the base's tokenizer
    paths = {"base": root / "base"}
    for name, (kwargs, seed) in ADAPTERS.items():
        paths[name] = _adapter(root / "base", root / name, seed, **kwargs)
    return paths


def _recipe(method: str, paths: dict[str, Path], weights: dict[str, float], base: bool) -> Recipe:
    return Recipe.from_dict({"method": method, "dtype": "float32",
                             **({"base_model": str(paths["base"])} if base else {}),
                             "models": [{"model": str(paths[n]), "parameters": {"weight": w}} for n, w in weights.items()]})


def _merged(recipe: Recipe) -> dict[str, torch.Tensor]:
    materializer = Materializer.for_recipe(recipe, device="cpu")
    return {k: v.clone() for k, v in materializer.apply(recipe).state_dict().items()}


def _peft(paths: dict[str, Path], names: list[str], model_cls=LlamaForCausalLM) -> PeftModel:
    model = PeftModel.from_pretrained(model_cls.from_pretrained(paths["base"]), paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    return model


def _weighted(paths, weights: dict[str, float], combination: str) -> dict[str, torch.Tensor]:
    model = _peft(paths, list(weights))
    model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=combination)
    model.set_adapter("mix")
    return model.merge_and_unload(adapter_names=["mix"]).state_dict()


def _differing(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    assert ours.keys() == theirs.keys()
    return [k for k in theirs if not torch.equal(ours[k], theirs[k])]


@pytest.mark.parametrize("name", ["a1", "a2"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_one_adapter_is_peft_merge_and_unload_to_the_bit(zoo, name, method):
    expected = _peft(zoo, [name]).merge_and_unload().state_dict()
    ours = _merged(_recipe(method, zoo, {name: 1.0}, base=method == "task_arithmetic"))
    assert not _differing(ours, expected)
    base = LlamaForCausalLM.from_pretrained(zoo["base"]).state_dict()
    assert _differing(ours, base)  # the adapter did change something


def test_fan_in_fan_out_conv1d_adapter_is_peft_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "base")
    paths = {"base": tmp_path / "base"}
    paths["g"] = _adapter(tmp_path / "base", tmp_path / "g", 7, GPT2LMHeadModel, r=4, lora_alpha=8,
                          target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert json.loads((paths["g"] / "adapter_config.json").read_text())["fan_in_fan_out"]
    expected = _peft(paths, ["g"], GPT2LMHeadModel).merge_and_unload().state_dict()
    ours = _merged(_recipe("linear", paths, {"g": 1.0}, base=False))
    assert not _differing({k: ours[k] for k in expected}, expected)


def test_weighted_sum_of_deltas_is_peft_cat(zoo):
    weights = {"a1": 0.7, "a2": -0.4, "h1": 1.3}
    expected = _weighted(zoo, weights, "cat")
    ours = _merged(_recipe("task_arithmetic", zoo, weights, base=True))
    ours.pop("lm_head.weight"), expected.pop("lm_head.weight")  # a2's modules_to_save: PEFT's cat ignores it
    for key in expected:  # one matmul over the concatenated ranks vs per-adapter deltas: rounding only
        torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=4 * torch.finfo(torch.float32).eps
                                   * float(expected[key].abs().max()))
    assert _differing(ours, expected)  # ... so not bit-identical: the bound above is what holds


def test_factor_composition_is_peft_linear(zoo):
    weights = {"h1": 0.5, "h2": 0.25, "h3": 0.75}  # PEFT takes square roots: give it w ** 2
    expected = _weighted(zoo, {n: w * w for n, w in weights.items()}, "linear")
    ours = _merged(_recipe("lora_linear", zoo, weights, base=False))
    assert not _differing(ours, expected)  # exact square roots and scaling 1: PEFT's very arithmetic


def test_factor_composition_keeps_cross_terms(zoo):
    """(w1 B1 + w2 B2)(w1 A1 + w2 A2) is not w1 B1 A1 + w2 B2 A2 (the weighted sum of deltas)."""
    weights = {"h1": 0.5, "h2": 0.5}
    composed = _merged(_recipe("lora_linear", zoo, weights, base=False))
    summed = _merged(_recipe("task_arithmetic", zoo, weights, base=True))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(composed[key], summed[key])
    assert torch.equal(composed["model.embed_tokens.weight"], summed["model.embed_tokens.weight"])


def test_sources_share_one_base_and_hold_only_factors(zoo):
    materializer = Materializer.for_recipe(_recipe("task_arithmetic", zoo, {"a1": 1.0, "h1": 1.0, "h2": 1.0},
                                                   base=True), device="cpu")
    tensors = materializer.inputs.tensors
    base = tensors[str(zoo["base"])]
    for name in ("a1", "h1", "h2"):
        adapter = tensors[str(zoo[name])]
        assert all(adapter.base[k] is base[k] for k in base)  # one resident base for all of them
        assert all(f.A.numel() < base[k].numel() for k, f in adapter.factors.items())


def test_candidate_borrows_what_no_adapter_changes_and_never_writes_into_it(zoo):
    """Where every source holds the base's very tensor and the method keeps its base (task_arithmetic), the
    candidate's parameter is that tensor; a method that changes it (linear, normalize off) gets its own storage
    back first, so the base stays as loaded and each merge equals a fresh one."""
    refs = [str(zoo[n]) for n in ("base", "h1", "h2")]
    materializer = Materializer(refs, dtype="float32", device="cpu")
    base = materializer.inputs.tensors[refs[0]]
    loaded = {k: v.clone() for k, v in base.items()}
    summed = _recipe("task_arithmetic", zoo, {"h1": 0.6, "h2": 0.4}, base=True)
    params = dict(materializer.apply(summed).named_parameters())
    assert params["model.embed_tokens.weight"].data_ptr() == base["model.embed_tokens.weight"].data_ptr()
    assert params["model.layers.0.self_attn.q_proj.weight"].data_ptr() != base["model.layers.0.self_attn.q_proj.weight"].data_ptr()
    scaled = Recipe.from_dict({**_recipe("linear", zoo, {"h1": 0.7, "h2": 0.6}, base=False).to_dict(),
                               "parameters": {"normalize": False}})
    for recipe in (scaled, summed, scaled):
        merged = {k: v.clone() for k, v in materializer.apply(recipe).state_dict().items()}
        assert not _differing(merged, _merged(recipe))
    assert not _differing(dict(base), loaded)
    assert params["model.embed_tokens.weight"].data_ptr() != base["model.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "sets use_dora"),
    ({"peft_type": "IA3"}, "is a IA3 adapter"),
    ({"bias": "all"}, "trains biases"),
    ({"base_model_name_or_path": None}, "names no base_model_name_or_path"),
    ({"r": 8}, "rank 4, but adapter_config.json says r=8"),
])
def test_unsupported_adapters_are_refused_in_one_line(zoo, tmp_path, change, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((zoo["h1"] / "adapter_model.safetensors").read_bytes())
    config = {**json.loads((zoo["h1"] / "adapter_config.json").read_text()), **change}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EvomergeError, match=message):
        Materializer([str(bad)], dtype="float32", device="cpu")


@pytest.mark.parametrize("weights, base, message", [
    ({"h1": 1.0, "r2": 1.0}, False, "one rank layout"),
    ({"a2": 1.0}, False, "modules_to_save"),
    ({"h1": 1.0}, True, "is not a LoRA adapter"),
])
def test_factor_composition_refuses_what_has_no_shared_factors(zoo, weights, base, message):
    recipe = _recipe("lora_linear", zoo, weights, base=False)
    if base:
        recipe.models.insert(0, type(recipe.models[0])(str(zoo["base"]), {"weight": 1.0}))
    with pytest.raises(EvomergeError, match=message):
        _merged(recipe)


def test_cli_merge_of_adapters_writes_a_full_checkpoint(zoo, tmp_path):
    recipe = _recipe("task_arithmetic", zoo, {"h1": 0.6, "h2": 0.4}, base=True)
    recipe.save(tmp_path / "recipe.yaml")
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "recipe.yaml"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert not _differing(written, _merged(recipe))
    mergekit = yaml.safe_load((tmp_path / "out" / "mergekit.yaml").read_text())  # adapters named BASE+ADAPTER
    assert [m["model"] for m in mergekit["models"]] == [f"{zoo['base']}+{zoo[n]}" for n in ("h1", "h2")]
    assert "--lora-merge-dtype float32" in (tmp_path / "out" / "mergekit.yaml").read_text()
    assert "mergekit" in ModelCard.load(tmp_path / "out" / "README.md").data.tags


def test_factor_composition_has_no_mergekit_config(zoo, tmp_path):
    _recipe("lora_linear", zoo, {"h1": 0.6, "h2": 0.4}, base=False).save(tmp_path / "recipe.yaml")
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert not (tmp_path / "out" / "mergekit.yaml").exists()
    assert "mergekit merges each adapter into its base first" in (tmp_path / "out" / "mergekit.yaml.txt").read_text()
    assert "mergekit" not in ModelCard.load(tmp_path / "out" / "README.md").data.tags


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_lorahub_config_runs_on_the_shipped_adapters(tmp_path):
    """The LoraHub setting end to end: a few trials of runs/zoo_lorahub.yaml from the repo root."""
    repo = Path(__file__).resolve().parents[1]
    done = _cli("run", "runs/zoo_lorahub.yaml", "--n-trials", "3", "--quiet",
                "--storage", f"sqlite:///{tmp_path / 'study.db'}", cwd=repo)
    assert done.returncode == 0, done.stderr
    assert "3 done / 3 budget, 0 failed" in done.stdout
    done = _cli("export", "runs/zoo_lorahub.yaml", "--trial", "0", "--storage", f"sqlite:///{tmp_path / 'study.db'}",
                "--out", str(tmp_path / "full"), "--adapter", str(tmp_path / "adapter"), cwd=repo)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_adapter_whose_base_is_missing_is_one_line(zoo, tmp_path):
    moved = tmp_path / "h1"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes((zoo["h1"] / "adapter_model.safetensors").read_bytes())
    config = json.loads((zoo["h1"] / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "./no/such/base"}))
    recipe = Recipe.from_dict({"method": "linear", "models": [{"model": str(moved), "parameters": {"weight": 1.0}}]})
    recipe.save(tmp_path / "recipe.yaml")
    done = _cli("merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "adapts './no/such/base' (base_model_name_or_path" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def dense(zoo, tmp_path_factory) -> dict[str, Path]:
    """h1 and h2 merged into full checkpoints by PEFT itself."""
    root = tmp_path_factory.mktemp("dense")
    paths = {}
    for name in ("h1", "h2"):
        paths[name] = root / name
        _peft(zoo, [name]).merge_and_unload().save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"lora_linear"}))
def test_every_method_merges_adapters_as_their_merged_checkpoints(zoo, dense, method):
    """An adapter source is its PEFT-merged checkpoint to the bit, so every method gives the same merge."""
    spec = METHODS[method]
    names = ["h1"] if spec.max_sources == 1 else ["h1", "h2"]
    params = {k: v for k, v in {"weight": 0.6, "density": 0.7}.items() if k in spec.source_params}

    def recipe(paths: dict[str, Path]) -> Recipe:
        return Recipe.from_dict({"method": method, "dtype": "float32", "base_model": str(zoo["base"]),
                                 **({"parameters": {"t": 0.3}} if "t" in spec.options else {}),
                                 "models": [{"model": str(paths[n]), "parameters": params} for n in names]})

    assert not _differing(_merged(recipe(zoo)), _merged(recipe(dense)))


# ---- the merge as one PEFT adapter (evomerge.lora_export, `--adapter DIR`) ------------------------------------

SHIPPED = "evomerge/zoo_models"
F32_EPS = torch.finfo(torch.float32).eps


def _export(recipe: Recipe, tmp_path: Path, base: Path, model_cls=LlamaForCausalLM) -> tuple[dict, dict, dict]:
    """`evomerge merge --adapter`: the full checkpoint's tensors, PEFT's merge_and_unload() of the written adapter
    on the base (float32), and the adapter's config."""
    recipe.save(tmp_path / "recipe.yaml")
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "full"), "--adapter",
                 str(tmp_path / "adapter"), "--device", "cpu"]) == 0
    full = model_cls.from_pretrained(tmp_path / "full", dtype=torch.float32).state_dict()
    peft_merged = PeftModel.from_pretrained(model_cls.from_pretrained(base, dtype=torch.float32),
                                            tmp_path / "adapter").merge_and_unload().state_dict()
    return full, peft_merged, json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


def _shipped(method: str, weights: dict[str, object], **options) -> Recipe:
    return Recipe.from_dict({"method": method, "dtype": "float32", "layer_granularity": 2,
                             **({"base_model": f"{SHIPPED}/base"} if METHODS[method].needs_base else {}),
                             **({"parameters": options} if options else {}),
                             "models": [{"model": f"{SHIPPED}/lora_{n}", "parameters": {"weight": w}}
                                        for n, w in weights.items()]})


def _within_ulps(ours: dict, theirs: dict, ulps: float) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=ulps * F32_EPS * float(ours[key].abs().max()))


def test_factor_composition_exports_as_an_adapter_peft_merges_to_the_bit(tmp_path):
    """B' = sum w_i B_i, A' = sum w_i s_i A_i are the factors lora_linear multiplies, scaling 1: PEFT's
    merge of the adapter is the same float32 arithmetic (per-group weights, a negative one)."""
    recipe = _shipped("lora_linear", {"rev": 0.7, "srt": -0.4, "cae": [0.5, 1.2, 0.9]})
    full, peft_merged, config = _export(recipe, tmp_path, Path(f"{SHIPPED}/base"))
    assert not _differing(full, peft_merged)
    assert config["r"] == config["lora_alpha"] == 8 and config["base_model_name_or_path"] == f"{SHIPPED}/base"
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("method, options", [("task_arithmetic", {"lambda": 0.8}),
                                             ("task_arithmetic", {"normalize": True}), ("linear", {})])
def test_weighted_sum_of_deltas_exports_as_stacked_ranks(tmp_path, method, options):
    """[c_1 B_1 ... c_n B_n] @ [s_1 A_1; ...; s_n A_n] is the weighted sum of deltas exactly, but evomerge rounds
    each adapted tensor W + D_i and subtracts W again before weighting, where PEFT adds one product over the
    stacked ranks to W: two float32 roundings of one value, a few ulps of the tensor's magnitude apart."""
    recipe = _shipped(method, {"rev": 0.7, "srt": -0.4, "cae": [0.5, 1.2, 0.9]}, **options)
    full, peft_merged, config = _export(recipe, tmp_path, Path(f"{SHIPPED}/base"))
    _within_ulps(full, peft_merged, 4)
    base = AutoModelForCausalLM.from_pretrained(f"{SHIPPED}/base", dtype=torch.float32).state_dict()
    assert _differing(full, base)
    assert config["r"] == config["lora_alpha"] == 24 and not config["rank_pattern"]  # 3 adapters of rank 8


def test_mixed_ranks_scalings_and_whole_modules_export(zoo, tmp_path):
    """a1 (rank and alpha patterns), a2 (rsLoRA, lm_head saved whole) and h1 stacked: modules of different ranks get
    rank_pattern/alpha_pattern entries; lm_head, replaced by a2, is evomerge's merged tensor to the bit."""
    recipe = _recipe("task_arithmetic", zoo, {"a1": 0.7, "a2": -0.4, "h1": 1.3}, base=True)
    full, peft_merged, config = _export(recipe, tmp_path, zoo["base"])
    _within_ulps(full, peft_merged, 4)
    assert torch.equal(full["lm_head.weight"], peft_merged["lm_head.weight"])
    assert config["modules_to_save"] == ["lm_head"]
    # q_proj: 4 + 4 + 4; v_proj: 2 + 4; down_proj: 4; up_proj: 4; o_proj and gate_proj: 4 (h1)
    assert config["r"] == 4 and config["rank_pattern"] == config["alpha_pattern"] == {
        f"model.layers.{i}.{m}": r for i in range(2) for m, r in (("self_attn.q_proj", 12), ("self_attn.v_proj", 6))}


@pytest.mark.parametrize("method", ["lora_linear", "task_arithmetic"])
def test_transposed_conv1d_factors_export(tmp_path, method):
    """GPT-2's Conv1D stores weights transposed (fan_in_fan_out): the adapter says so, and PEFT merges it back."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "base")
    paths = {"base": tmp_path / "base"}
    for name, seed in (("g1", 7), ("g2", 8)):
        paths[name] = _adapter(tmp_path / "base", tmp_path / name, seed, GPT2LMHeadModel, r=4, lora_alpha=8,
                               target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    recipe = _recipe(method, paths, {"g1": 0.8, "g2": -0.3}, base=method == "task_arithmetic")
    full, peft_merged, config = _export(recipe, tmp_path, paths["base"], GPT2LMHeadModel)
    assert config["fan_in_fan_out"] and config["target_modules"] == ["c_attn", "c_fc"]
    full = {k: full[k] for k in peft_merged}
    if method == "lora_linear":
        assert not _differing(full, peft_merged)
    else:
        _within_ulps(full, peft_merged, 4)


def test_target_modules_name_leaves_only_where_every_such_module_is_adapted():
    from evomerge.lora_export import target_modules

    modules = {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    assert target_modules({m for m in modules if "q_proj" in m} | {"model.layers.1.self_attn.v_proj"}, modules) == [
        "q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("change, message", [
    ({"method": "ties"}, "ties is not a linear combination"),
    ({"models": [{"model": f"{SHIPPED}/expert_rev", "parameters": {"weight": 1.0}}]}, "is not a LoRA adapter"),
    ({"base_model": f"{SHIPPED}/expert_rev"}, "is not the base the adapters adapt"),
    ({"method": "linear", "parameters": {"normalize": False}}, "weights summing to 1.5 scales the base's weights"),
    ({"tokenizer_source": "base"}, "tokenizer_source re-indexes the embeddings"),
])
def test_what_no_adapter_expresses_is_refused_in_one_line(tmp_path, capsys, change, message):
    recipe = {**_shipped("task_arithmetic", {"rev": 1.0, "srt": 0.5}).to_dict(), **change}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    code = main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "full"), "--adapter",
                 str(tmp_path / "adapter"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "full").exists() and not (tmp_path / "adapter").exists()  # refused before merging


def test_a_hub_download_takes_every_file_an_adapter_folder_needs():
    """A hub adapter is fetched with the hub file patterns (huggingface_hub's allow_patterns, fnmatch):
    every file of a PEFT adapter folder evomerge reads must match one (the weights once did not)."""
    from fnmatch import fnmatch

    from evomerge.refs import _HUB_FILES

    files = [p.name for p in (Path(__file__).resolve().parents[1] / SHIPPED / "lora_rev").iterdir()]
    assert "adapter_model.safetensors" in files
    assert [name for name in files if not any(fnmatch(name, pattern) for pattern in _HUB_FILES)] == []
