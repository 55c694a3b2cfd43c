"""Resident memory of a search over LoRA adapters: one base plus the factors, not N dense models.

Builds a random ~134M-parameter LLaMA (float32) and three rank-16 PEFT adapters on all seven
linear projections of every layer, then, each in a fresh process, loads a Materializer over
(base + 3 adapters) and merges several recipes into the candidate, reading every weight of it
after each merge (as scoring it does: tensors the candidate borrows from the base count once
touched), recording the process's RSS (VmRSS) after loading and its peak (VmHWM) over the
merges. The same is measured for three dense checkpoints (each adapter merged into the base),
which is what a search over adapters costs without lazy deltas. The bound to meet: peak - RSS
before loading <= base + 1 candidate + the factors (+ the scratch of one tensor's merge, which
this prints too).

    PYTHONPATH=$PWD python bench/lora_memory.py [--workdir /tmp/lora_memory]
    PYTHONPATH=$PWD python bench/lora_memory.py --smoke    # a 2-layer model under bench/out/smoke/: that it runs
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIB = 2**20
SHAPE = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
         "num_attention_heads": 12, "num_key_value_heads": 12}
SMOKE = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4}


def build(workdir: Path, shape: dict[str, int]) -> None:
    """The base, three adapters (PEFT format) and the adapters merged dense."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.lora import AdapterTensors, read_config, read_factors
    from evomerge.zoo import build_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    base.save_pretrained(workdir / "base")
    build_tokenizer().save_pretrained(workdir / "base")
    state = dict(base.state_dict())
    for i in range(3):
        path = workdir / f"adapter{i}"
        path.mkdir(exist_ok=True)
        generator = torch.Generator().manual_seed(i + 1)
        factors = {}
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                out_f, in_f = module.weight.shape
                factors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=generator) * 0.02
                factors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=generator) * 0.02
        save_file(factors, path / "adapter_model.safetensors", metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(workdir / "base"), "r": RANK, "lora_alpha": ALPHA,
             "target_modules": list(TARGETS), "bias": "none"}))
        # the same adapter merged into a full checkpoint (for the dense comparison)
        config_i = read_config(path, path.name)
        lazy = AdapterTensors(path.name, "base", state, *read_factors(path, path.name, config_i, torch.device("cpu")))
        dense = LlamaForCausalLM(config)
        dense.load_state_dict({k: lazy[k] for k in state})
        dense.save_pretrained(workdir / f"dense{i}")
        build_tokenizer().save_pretrained(workdir / f"dense{i}")


def sizes(workdir: Path) -> dict[str, int]:
    """Bytes of the base's tensors, of the three adapters' factors, and of the largest tensor."""
    def tensor_bytes(path: Path) -> list[int]:
        with safe_open(path, "pt") as f:
            return [math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys()]  # all float32 here

    base = tensor_bytes(workdir / "base" / "model.safetensors")
    factors = sum(sum(tensor_bytes(workdir / f"adapter{i}" / "adapter_model.safetensors")) for i in range(3))
    return {"base": sum(base), "factors": factors, "largest_tensor": max(base)}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(workdir: Path, kind: str) -> dict[str, float]:
    """In this (fresh) process: RSS before loading, after loading, and the peak over merges."""
    from transformers import AutoConfig

    from evomerge.layouts import build_model
    from evomerge.merge.materialize import Materializer
    from evomerge.recipe import Recipe

    build_model(AutoConfig.from_pretrained(workdir / "base"), torch.float32, "meta")  # model code imported first
    names = [f"{kind}{i}" for i in range(3)]
    refs = [str(workdir / "base"), *(str(workdir / n) for n in names)]
    torch.set_num_threads(1)
    before = _kib("VmRSS")
    materializer = Materializer(refs, dtype="float32", device="cpu")
    loaded = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    recipes = [{"method": "task_arithmetic", "base_model": refs[0]}, {"method": "ties", "base_model": refs[0]},
               {"method": "task_arithmetic", "base_model": refs[0]}]
    if kind == "adapter":
        recipes.append({"method": "lora_linear"})
    for i, recipe in enumerate(recipes):
        weights = [0.3 + 0.2 * i, -0.4, 0.8]
        candidate = materializer.apply(Recipe.from_dict({**recipe, "dtype": "float32", "models": [
            {"model": r, "parameters": {"weight": w}} for r, w in zip(refs[1:], weights)]}))
        for param in candidate.parameters():  # read every weight, as scoring the candidate does
            param.sum()
    return {"before": before, "loaded": loaded, "peak": _kib("VmHWM"), "merges": len(recipes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/lora_memory")
    parser.add_argument("--measure", choices=("adapter", "dense"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model under bench/out/smoke/ (that it runs)")
    args = parser.parse_args()
    workdir = Path(__file__).resolve().parent / "out" / "smoke" / "lora_memory" if args.smoke else Path(args.workdir)
    if args.measure:
        print(json.dumps(measure(workdir, args.measure)))
        return
    if not (workdir / "dense2" / "model.safetensors").is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        build(workdir, SMOKE if args.smoke else SHAPE)
    size = sizes(workdir)
    print(f"base {size['base'] / MIB:.0f} MiB (float32), candidate the same, factors of 3 rank-{RANK} adapters "
          f"{size['factors'] / MIB:.1f} MiB, largest tensor {size['largest_tensor'] / MIB:.0f} MiB")
    bound = 2 * size["base"] + size["factors"]
    for kind in ("adapter", "dense"):
        done = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--measure", kind],
                              capture_output=True, text=True, check=True)
        m = json.loads(done.stdout.strip().splitlines()[-1])
        grown, peak = m["loaded"] - m["before"], m["peak"] - m["before"]
        print(f"{kind:>7} sources: RSS +{grown / MIB:.0f} MiB after loading, peak +{peak / MIB:.0f} MiB over "
              f"{m['merges']} merges; bound base + candidate + factors = {bound / MIB:.0f} MiB: "
              f"{'below' if peak <= bound else 'ABOVE'} ({(peak - bound) / MIB:+.0f} MiB)")


if __name__ == "__main__":
    main()
