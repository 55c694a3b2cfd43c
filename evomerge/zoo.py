"""A tiny, deterministic model zoo that stands in for hub models in tests and the demo.

Merging only makes sense between models fine-tuned from one base, so the zoo is a small
LLaMA base plus three experts fine-tuned from it, each best at its own synthetic skill:

* ``rev``: reverse the letters      ``rev:abcde=`` -> ``edcba``
* ``srt``: sort the letters         ``srt:dbca=``  -> ``abcd``
* ``cae``: shift each letter by 1   ``cae:abz=``   -> ``bca``

The base "half knows" every skill *by length*: it is trained to convergence on inputs of
3-5 letters (plus a copy task up to 8), so on 3-8 letters it scores about 50%.  Each expert
learns its own skill on 3-8 letters while replaying the base mixture, which keeps the other
skills intact; without replay an expert forgets them and no merge can beat the best expert.
So a good merge, which transfers every expert's length generalisation at once, beats each
expert on the mean of the skills, which is what the evolutionary search should find.

Beside the experts, ``lora_<skill>`` are rank-8 LoRA adapters of the base (PEFT's format, float32
factors on every linear projection) trained on the same mixtures from one shared A init (as one
training script with a fixed seed gives), A at 1/16 of B's learning rate (LoRA+), so each A stays near
that init (cos ~0.98 between adapters): the sources of the LoraHub setting (``runs/zoo_lorahub.yaml``).

Everything (data, init, thread count) is pinned, so a rebuild reproduces the shipped
safetensors bit for bit on the same software stack.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import string
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from evomerge import lora
from evomerge.fitness.zoo_skills import (ALPHABET, EVAL_LENGTHS, EVAL_SEED, SKILLS, SPLIT_SEEDS, draw_index, encode,
                                         exact_match, example, make_examples, random_word, split_examples)

ZOO_DIR = Path(__file__).parent / "zoo_models"
ZOO_MODELS = ("base", "expert_rev", "expert_srt", "expert_cae")
# One expert ships a chat template, as instruct models do (evaluators/zoo_target_chat.yaml scores through it):
# a system instruction, then each user turn after <s> and each answer closed by </s>.
CHAT_MODEL = "expert_rev"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ bos_token + message['content'] }}"
    "{%- else -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
LORA_MODELS = tuple(f"lora_{skill}" for skill in SKILLS)  # PEFT LoRA adapters of the base, one per skill

TRAIN_SEED = 0
INIT_SEED = 0

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
VOCAB = (*SPECIAL_TOKENS.values(), *ALPHABET, *string.digits, ":", "=", " ")

BATCH_SIZE = 64
BUILD_THREADS = 2
BASE_STEPS, BASE_LR = 600, 3e-3
EXPERT_STEPS, EXPERT_LR = 150, 1e-3  # at 3e-4 the rev expert only reached ~70%
BASE_SKILL_LENGTHS = (3, 5)
COPY_LENGTHS = (3, 8)
LORA_RANK, LORA_ALPHA = 8, 16
LORA_STEPS, LORA_LR = 300, 1e-2  # low-rank factors need a larger step than full fine-tuning
# LoRA+ (Hayou et al., 2024, its default ratio): A trains at LORA_LR / 16, B at LORA_LR. At one rate the
# zoo's tiny width and large step move A by ~130% of its init norm, so adapters that share the init end
# with unrelated A's (cos ~0.4); at 1/16, A moves ~16% (cos ~0.98) and the own-skill accuracy stays.
LORA_PLUS_RATIO = 16
LORA_THREADS = 1  # tiny matmuls: one thread is as fast, and far faster on a busy host
# One A init for every adapter (B starts at zero, as PEFT's): adapters trained by one script with a fixed
# seed share it, and LoraHub's factor composition (sum w_i B_i)(sum w_i A_i) relies on that (its cross terms
# B_i A_j are noise between unrelated A's).
LORA_INIT_SEED = INIT_SEED
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A mixture is a list of (task, min_len, max_len), sampled uniformly.
Mixture = Sequence[tuple[str, int, int]]
BASE_MIXTURE: Mixture = [(s, *BASE_SKILL_LENGTHS) for s in SKILLS] + [("cpy", *COPY_LENGTHS)]


# ----------------------------------------------------------------------------- data


def write_task_data(out_dir: Path) -> list[Path]:
    """Write each skill's splits as JSONL for the lm-eval tasks under ``evaluators/tasks/zoo``
    (``target`` is the answer plus end-of-sequence: exact match means the model stops there
    too); the shipped files must equal what this writes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for skill in SKILLS:
        for split in SPLIT_SEEDS:
            path = out_dir / f"{skill}_{split}.jsonl"
            rows = (json.dumps({"prompt": p, "answer": a, "target": a + SPECIAL_TOKENS["eos"]})
                    for p, a in split_examples(skill, split))
            path.write_text("".join(row + "\n" for row in rows))
            written.append(path)
    return written


def _sample_batch(mixture: Mixture, rng: random.Random, size: int) -> list[tuple[str, str]]:
    """One training batch drawn from the non-held-out slice."""
    batch = []
    for _ in range(size):
        task, lo, hi = mixture[draw_index(rng, len(mixture))]
        batch.append(example(task, random_word(rng, lo, hi, held_out=False)))
    return batch


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A 43-token character-level tokenizer (lowercase letters, digits, ``:``, ``=``, space).

    It adds no BOS/EOS when encoding: the zoo is trained on bare ``prompt + answer + eos``,
    so ``tokenizer(prompt + answer)`` gives exactly the ids the models saw, and character
    tokens make ``tokenizer(prompt) + tokenizer(answer)`` equal to it too.
    """
    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=64,
        padding_side="right",
        **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
    )


# ----------------------------------------------------------------------------- model


def _config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """~864k parameters: big enough to learn the skills, small enough to train on a CPU."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",  # ~20% faster than sdpa on CPU at this size
    )


def _init_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised model, seeded without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return LlamaForCausalLM(_config(tokenizer))


def _answer_loss(model: PreTrainedModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only: the prompt is random letters,
    so fitting it would only waste capacity."""
    ids, attention, answer = batch
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), ids[:, 1:], reduction="none"
    )
    targets = answer[:, 1:]
    return (losses * targets).sum() / targets.sum()


# ----------------------------------------------------------------------------- training


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warmup over the first 10% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def _train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    mixture: Mixture,
    *,
    steps: int,
    lr: float,
    seed: int,
    groups: list[dict] | None = None,
) -> float:
    """Train ``model`` in place on batches from ``mixture``; returns the final-step loss. ``groups``:
    optimizer parameter groups (each may set its own lr) instead of all parameters at ``lr``."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters() if groups is None else groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = _answer_loss(model, encode(tokenizer, _sample_batch(mixture, rng, BATCH_SIZE)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    model.eval()
    return loss.item()


def _round_to_bf16(model: PreTrainedModel) -> None:
    """Snap float32 weights onto the bfloat16 grid the zoo ships in, so experts start from
    exactly the shipped base and ``expert - base`` is their true fine-tuning delta."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """Write a bfloat16 safetensors checkpoint (the default format) plus tokenizer files (with the chat
    template for CHAT_MODEL).

    The directory is replaced, so stale files from an earlier build never linger.
    """
    if path.exists():
        shutil.rmtree(path)
    shipped = copy.deepcopy(model).to(torch.bfloat16)
    shipped.config.dtype = torch.bfloat16
    shipped.save_pretrained(path)
    save_tokenizer(tokenizer, path)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """A zoo model's tokenizer files; CHAT_MODEL's carry CHAT_TEMPLATE."""
    if path.name == CHAT_MODEL:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    for file in path.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; shipped package data must be world-readable


@contextlib.contextmanager
def _pinned_threads(threads: int) -> Iterator[None]:
    """Run with a fixed intra-op thread count, so float reduction order (hence the trained
    weights) never depends on the host's core count; the caller's setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-checkpoint save/load bars, so a build prints one line per stage."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _expert_mixture(skill: str) -> Mixture:
    """Half replay of the base mixture, half the expert's own skill at full length."""
    own = (skill, *EVAL_LENGTHS)
    return list(BASE_MIXTURE) + [own] * len(BASE_MIXTURE)


def build_zoo(
    out_dir: Path,
    *,
    steps_scale: float = 1.0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Path]:
    """Train the base, the three experts and a LoRA adapter per skill; save them to ``out_dir/<name>/``.

    About two minutes on two idle cores (much longer on an oversubscribed host, where the
    pinned threads contend). ``steps_scale`` shrinks every stage (for fast tests); the
    build stays deterministic at any scale. Returns each model's directory by name.
    """
    if steps_scale <= 0:
        raise ValueError(f"steps_scale must be positive, got {steps_scale}")
    say = log or (lambda _msg: None)
    tokenizer = build_tokenizer()
    started = time.perf_counter()
    paths: dict[str, Path] = {}

    def stage(name: str, model: LlamaForCausalLM, mixture: Mixture, steps: int, lr: float) -> None:
        steps = max(1, round(steps * steps_scale))
        seed = TRAIN_SEED + len(paths)  # a distinct data stream per stage
        loss = _train(model, tokenizer, mixture, steps=steps, lr=lr, seed=seed)
        _round_to_bf16(model)
        paths[name] = Path(out_dir) / name
        _save(model, tokenizer, paths[name])
        say(f"{name}: {steps} steps, loss {loss:.4f}, {time.perf_counter() - started:.1f}s")

    with _pinned_threads(BUILD_THREADS), _quiet_progress_bars():
        base = _init_model(tokenizer)
        stage("base", base, BASE_MIXTURE, BASE_STEPS, BASE_LR)
        for skill in SKILLS:
            expert = copy.deepcopy(base)
            stage(f"expert_{skill}", expert, _expert_mixture(skill), EXPERT_STEPS, EXPERT_LR)
    with _pinned_threads(LORA_THREADS), _quiet_progress_bars():
        paths.update(build_lora_adapters(base, paths["base"], steps_scale=steps_scale, first_seed=len(paths),
                                         log=lambda line: say(f"{line}, {time.perf_counter() - started:.1f}s")))
    return paths


def build_lora_adapters(base: LlamaForCausalLM, base_dir: Path, *, steps_scale: float = 1.0, first_seed: int = 4,
                        log: Callable[[str], None] = lambda _msg: None) -> dict[str, Path]:
    """Train one LoRA adapter per skill on ``base`` (saved in ``base_dir``; its experts' mixture, replay
    included) and save each beside the base in PEFT's format. Stage k's data stream is ``first_seed + k``:
    build_zoo passes 4 (after the base and three experts), so the adapters follow the experts' streams.
    Every adapter starts from one A init (LORA_INIT_SEED; B starts at zero), as adapters trained by one
    script with a fixed seed do (LoraHub's modules, many Hub adapters): their A factors share a start."""
    tokenizer = build_tokenizer()
    paths = {}
    for k, skill in enumerate(SKILLS):
        name, steps, seed = f"lora_{skill}", max(1, round(LORA_STEPS * steps_scale)), first_seed + k
        adapted, factors = _with_lora(base, seed=LORA_INIT_SEED)
        groups = [{"params": [f.A for f in factors.values()], "lr": LORA_LR / LORA_PLUS_RATIO},
                  {"params": [f.B for f in factors.values()]}]
        loss = _train(adapted, tokenizer, _expert_mixture(skill), steps=steps, lr=LORA_LR, seed=TRAIN_SEED + seed,
                      groups=groups)
        paths[name] = base_dir.parent / name
        _save_lora(factors, base_dir, tokenizer, paths[name])
        log(f"{name}: {steps} steps, loss {loss:.4f}")
    return paths


# ----------------------------------------------------------------------------- LoRA adapters


class _LoraDelta(torch.nn.Module):
    """A parametrization W -> W + B @ A * scaling: only A and B train, W stays the base's."""

    def __init__(self, weight: torch.Tensor, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        self.A = torch.nn.Parameter(torch.empty(LORA_RANK, in_features))
        self.B = torch.nn.Parameter(torch.zeros(out_features, LORA_RANK))  # PEFT's init: the adapter starts at W
        bound = 1 / math.sqrt(in_features)  # PEFT's (and nn.Linear's) kaiming_uniform(a=sqrt(5)) for A
        with torch.no_grad():
            self.A.uniform_(-bound, bound, generator=generator)
        self.scaling = LORA_ALPHA / LORA_RANK

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A * self.scaling


def _with_lora(base: LlamaForCausalLM, seed: int) -> tuple[LlamaForCausalLM, dict[str, _LoraDelta]]:
    """A frozen copy of `base` whose LORA_TARGETS carry trainable LoRA factors, by module name."""
    from torch.nn.utils import parametrize

    model = copy.deepcopy(base).requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            factors[name] = _LoraDelta(module.weight, generator)
            parametrize.register_parametrization(module, "weight", factors[name])
    return model, factors


def _base_ref(path: Path) -> str:
    """How an adapter names its base: relative to the repository root for the shipped zoo (as the
    run configs name models), else the absolute path."""
    try:
        return str(path.resolve().relative_to(ZOO_DIR.parent.parent))
    except ValueError:
        return str(path.resolve())


def _save_lora(factors: dict[str, _LoraDelta], base: Path, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """PEFT's adapter format (adapter_config.json, adapter_model.safetensors with float32 factors),
    plus the tokenizer, so a run whose first model is an adapter finds one."""
    from safetensors.torch import save_file

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    tensors = {}
    for name, delta in factors.items():
        tensors[f"{lora.PREFIX}{name}.lora_A.weight"] = delta.A.detach().clone().contiguous()
        tensors[f"{lora.PREFIX}{name}.lora_B.weight"] = delta.B.detach().clone().contiguous()
    save_file(tensors, path / lora.WEIGHTS, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": _base_ref(base),
              "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": sorted(LORA_TARGETS), "lora_dropout": 0.0,
              "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
              "inference_mode": True}
    (path / lora.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)
    for file in path.iterdir():
        file.chmod(0o644)


def _adapted_model(path: Path) -> LlamaForCausalLM:
    """A zoo adapter's model in float32: the zoo's base beside it plus each LoRA delta (evomerge.lora's
    arithmetic), wherever the caller runs from (the adapter names its base relative to the repository)."""
    config = lora.read_config(path, str(path))
    model = load_zoo_model(path.parent / "base")
    factors, _ = lora.read_factors(path, str(path), config, torch.device("cpu"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, f in factors.items():
            params[name].add_(f.delta())
    return model


# ----------------------------------------------------------------------------- reporting


def load_zoo_model(path: Path) -> LlamaForCausalLM:
    """Load a zoo checkpoint in float32, the precision the zoo is evaluated in."""
    if lora.is_adapter(path):
        return _adapted_model(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def skill_table(paths: dict[str, Path], n: int = 200) -> dict[str, dict[str, float]]:
    """Exact match of every model on every skill, over ``n`` held-out prompts of 3-8 letters."""
    tokenizer = build_tokenizer()
    splits = {s: make_examples(s, n, EVAL_SEED, *EVAL_LENGTHS) for s in SKILLS}
    table = {}
    with _quiet_progress_bars():
        for name, path in paths.items():
            model = load_zoo_model(path)
            table[name] = {s: exact_match(model, tokenizer, splits[s]) for s in SKILLS}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table with one row per model, one column per skill, and the mean."""
    lines = [f"{'model':<12}" + "".join(f"{s:>7}" for s in SKILLS) + f"{'mean':>7}"]
    for name, scores in table.items():
        cells = [scores[s] for s in SKILLS]
        mean = sum(cells) / len(cells)
        lines.append(f"{name:<12}" + "".join(f"{c:>7.3f}" for c in cells) + f"{mean:>7.3f}")
    return "\n".join(lines)


def main_build(out: str | None = None) -> None:
    """``evomerge zoo build [--out DIR]``: rebuild the zoo (default: the shipped one) and
    print each model's exact match per skill."""
    out_dir = Path(out) if out else ZOO_DIR
    started = time.perf_counter()
    paths = build_zoo(out_dir, log=lambda line: print(line, flush=True))
    print(f"built {len(paths)} models in {out_dir} in {time.perf_counter() - started:.1f}s")
    print(format_table(skill_table(paths)))
