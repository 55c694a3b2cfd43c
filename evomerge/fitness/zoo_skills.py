"""The zoo's skills: what its models are trained on and scored on, and the scorer that needs no
lm-eval.

* ``rev``: reverse the letters      ``rev:abcde=`` -> ``edcba``
* ``srt``: sort the letters         ``srt:dbca=``  -> ``abcd``
* ``cae``: shift each letter by 1   ``cae:abz=``   -> ``bca``

Prompts and answers are pure functions of their seeds (evaluation splits are stable on every
machine); a fixed slice of all words is held out of training, so evaluation prompts are unseen.
Building the zoo (evomerge.zoo) draws its training data from here; scoring never needs the
builder.
"""

from __future__ import annotations

import random
import string
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.fitness.spec import FitnessSpec, ZOO_SKILLS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from evomerge.backends.candidate import Candidate

SKILLS: tuple[str, ...] = ZOO_SKILLS
TASKS: tuple[str, ...] = SKILLS + ("cpy",)  # "cpy" only teaches the base to read and copy
ALPHABET = string.ascii_lowercase
EVAL_SEED = 20_240_601  # seed for held-out splits; training streams use other seeds
EVAL_LENGTHS = (3, 8)  # (min, max) letters of the skill inputs in evaluation splits
HELD_OUT_MOD = 8  # words with crc32 % HELD_OUT_MOD == 0 are never trained on


def draw_index(rng: random.Random, n: int) -> int:
    """Uniform int in [0, n) from ``rng.random()`` alone: the one Random method whose
    sequence Python guarantees across versions, so splits are identical everywhere."""
    return int(rng.random() * n)


def is_held_out(word: str) -> bool:
    """A fixed 1/HELD_OUT_MOD slice of all words, reserved for evaluation, so held-out
    prompts are genuinely unseen (short words would otherwise recur in training)."""
    return zlib.crc32(word.encode()) % HELD_OUT_MOD == 0


def random_word(rng: random.Random, min_len: int, max_len: int, held_out: bool) -> str:
    """A random word of uniform length, rejection-sampled into the requested slice."""
    length = min_len + draw_index(rng, max_len - min_len + 1)
    while True:
        word = "".join(ALPHABET[draw_index(rng, len(ALPHABET))] for _ in range(length))
        if is_held_out(word) == held_out:
            return word


def _solve(task: str, word: str) -> str:
    """The answer of ``task`` on ``word``."""
    if task == "rev":
        return word[::-1]
    if task == "srt":
        return "".join(sorted(word))
    if task == "cae":
        return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in word)
    if task == "cpy":
        return word
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def example(task: str, word: str) -> tuple[str, str]:
    return f"{task}:{word}=", _solve(task, word)


def make_examples(
    skill: str, n: int, seed: int, min_len: int = 3, max_len: int = 8
) -> list[tuple[str, str]]:
    """``n`` held-out (prompt, answer) pairs, e.g. ``("rev:abc=", "cba")``.

    Words come from the slice the zoo never trains on, and the list depends only on the
    arguments (not on global RNG state or the machine), so evaluation splits are stable.
    """
    if skill not in TASKS:
        raise ValueError(f"unknown skill {skill!r}; expected one of {', '.join(TASKS)}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    return [example(skill, random_word(rng, min_len, max_len, held_out=True)) for _ in range(n)]


SPLIT_SEEDS = {"search": EVAL_SEED, "test": EVAL_SEED + 1}
SPLIT_SIZE = 200  # prompts per skill and split: one standard error on a 600-prompt mean is ~1.8 points


def split_examples(skill: str, split: str, n: int = SPLIT_SIZE) -> list[tuple[str, str]]:
    """The first ``n`` examples of a skill's ``search`` or ``test`` split.

    The test split never repeats a prompt of the (full-size) search split, so scores on it
    measure generalisation, not recall of what the search optimised for.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_SEEDS)}")
    seed = SPLIT_SEEDS[split] + 17 * TASKS.index(skill)
    if split == "search":
        return make_examples(skill, n, seed, *EVAL_LENGTHS)
    taken = {p for p, _ in split_examples(skill, "search", max(n, SPLIT_SIZE))}
    fresh = (ex for ex in make_examples(skill, 4 * n, seed, *EVAL_LENGTHS) if ex[0] not in taken)
    return [next(fresh) for _ in range(n)]


def encode(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer + eos`` ids, attention mask, and answer mask.

    The answer mask marks the answer and eos tokens: the only positions that are trained
    on and that exact match checks.
    """
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a for _, a in examples], add_special_tokens=False)["input_ids"]
    rows = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        answer[i, len(prompt) : len(row)] = True
    return ids, attention, answer


@torch.inference_mode()
def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[tuple[str, str]],
    batch_size: int = 256,
) -> float:
    """Fraction of examples whose greedy continuation is exactly ``answer + eos``.

    Greedy decoding emits the answer iff the argmax is right at every answer position given
    the correct prefix, so one teacher-forced forward pass per batch gives the same result
    as ``generate`` at a fraction of the cost.
    """
    if not examples:
        raise ValueError("exact_match needs at least one example")
    device = model.device
    hits = 0
    for start in range(0, len(examples), batch_size):
        ids, attention, answer = (
            t.to(device) for t in encode(tokenizer, examples[start : start + batch_size])
        )
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        correct = (logits.argmax(-1) == ids[:, 1:]) | ~answer[:, 1:]
        hits += int(correct.all(dim=1).sum())
    return hits / len(examples)



class ZooSkillsEvaluator:
    """Exact match on the zoo's skills by one teacher-forced pass per batch, without lm-eval:
    the cheapest real fitness for the shipped models (tests and benches use it)."""

    def __init__(self, spec: FitnessSpec, tokenizer_path: str | Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.examples = {s: split_examples(s, spec.options["split"], spec.options["n_examples"]) for s in SKILLS}

    @torch.inference_mode()
    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        if candidate.model is None:
            raise EvomergeError("the zoo_skills fitness scores Hugging Face models: use backend hf, or an lm_eval fitness")
        scores = {s: exact_match(candidate.model, self.tokenizer, ex) for s, ex in self.examples.items()}
        scores["mean"] = sum(scores.values()) / len(scores)
        return scores


