"""Peak memory of `evomerge merge` (streamed) of three sources of a ~1B-parameter random LLaMA.

    python bench/stream_merge_rss.py                    # builds bench/out/llama_1b/ once (3 x 2.2 GB bf16)
    python bench/stream_merge_rss.py --methods linear,ties,dare_ties
    python bench/stream_merge_rss.py --quick            # a 9M-parameter LLaMA: seconds, to check the bench runs

The sources are built here, not downloaded: a randomly initialised LLaMA of TinyLlama's shape
(hidden 2048, 22 layers, MLP 5632, 32000 tokens, 1.1B parameters) saved in bfloat16, then
perturbed in place and saved again for each expert, so only one model is ever in memory. Each
merge runs under `/usr/bin/time -v` in a process of its own; its peak RSS is reported against
the sources' total bytes (a resident merge holds all of them plus the candidate), with the same
command on the tiny zoo as the baseline (interpreter, torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from evomerge.models import source_size

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "evomerge" / "zoo_models"
SHAPE = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}
QUICK = {**SHAPE, "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4}
NAMES = ("base", "expert_a", "expert_b")
DELTA = 0.05  # each expert's noise, relative to each tensor's spread


def build(root: Path, shape: dict) -> list[Path]:
    """base, expert_a, expert_b under root (reused when complete); one model in memory at a time."""
    paths = [root / n for n in NAMES]
    stamp = root / "spec.json"
    wanted = json.dumps({**shape, "delta": DELTA, "seed": 0}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    for i, path in enumerate(paths):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * (DELTA * float(p.float().std()) if p.numel() > 1 else DELTA))
        model.save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ZOO / "base" / name, path / name)
        print(f"built {path}", flush=True)
    stamp.write_text(wanted)
    return paths


def recipe(method: str, paths: list[Path]) -> dict:
    base, experts = str(paths[0]), [str(p) for p in paths[1:]]
    if method == "linear":
        return {"method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1 / 3}} for p in paths]}
    params = {"weight": 0.5, **({"density": 0.5} if method != "task_arithmetic" else {})}
    return {"method": method, "base_model": base, "seed": 0, "models": [{"model": e, "parameters": params} for e in experts]}


def timed_merge(recipe_path: Path, out: Path) -> tuple[int, float, float]:
    """(peak RSS bytes, wall seconds, CPU seconds) of `evomerge merge` as /usr/bin/time -v reports them (CPU
    time says more than wall time on a shared machine)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "evomerge.cli", "merge", str(recipe_path),
                           "--out", str(out), "--device", "cpu", "--force"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"merge failed:\n{done.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":"))))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr).group(1)) for kind in ("User", "System"))
    return peak, seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="linear,ties", help="comma-separated merge methods")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"), help="folder for the models and merges")
    parser.add_argument("--quick", action="store_true", help="a 9M-parameter model instead (checks the bench runs)")
    args = parser.parse_args()
    root = Path(args.out)
    start = time.perf_counter()
    paths = build(root / ("llama_quick" if args.quick else "llama_1b"), QUICK if args.quick else SHAPE)
    built = time.perf_counter() - start
    total = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
    n_params, _ = source_size(str(paths[0]))
    print(f"sources: 3 x {n_params / 1e6:,.0f}M parameters, bfloat16, {total / 1e9:.2f} GB in all (built/found in "
          f"{built:.0f} s); load average {os.getloadavg()[0]:.1f}")
    baseline, _, _ = timed_merge(REPO / "runs" / "examples" / "zoo_linear.yaml", root / "stream_rss" / "zoo")
    print(f"baseline (same command on the zoo): peak RSS {baseline / 1e9:.2f} GB")
    print(f"{'method':<16}{'peak RSS':>10}{'/ sources':>11}{'wall':>9}{'CPU':>9}")
    for method in args.methods.split(","):
        path = root / "stream_rss" / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe(method, paths)))
        peak, seconds, cpu = timed_merge(path, root / "stream_rss" / method)
        print(f"{method:<16}{peak / 1e9:>8.2f} GB{peak / total:>11.3f}{seconds:>8.1f}s{cpu:>8.1f}s "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        shutil.rmtree(root / "stream_rss" / method)  # 2.2 GB each: keep the disk for the next one


if __name__ == "__main__":
    main()
