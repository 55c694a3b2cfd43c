"""The merged model's vocabulary: `tokenizer_source: base | union | <model>`, as mergekit means it.

mergekit 0.1.x (`mergekit/tokenizer/build.py`, `embed.py`), which evomerge follows:
- `base`: the base model's tokenizer (the first model when there is no base); `<model>`: that
  model's. `union`: the base tokenizer plus every other model's tokens it lacks, appended in
  model order (plain tokens first, then added/special tokens, which keep their settings).
- Every model's embedding and head rows are then re-indexed to the output vocabulary before
  the merge method runs. A token a model lacks gets a default row: the row of the one model
  that has it; the base model's row when several have it and the base is one of them; their
  mean otherwise; zeros when none has it. So a token only one expert knows keeps that
  expert's row in the merge, whatever the method.
- Rows without a token (padding rows past the tokenizer, as in Qwen or Llama 3 checkpoints)
  stay where they are: row i of each model that has one, so `tokenizer_source: base` over
  models that share a tokenizer changes nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from evomerge.errors import EvomergeError

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class Vocabulary:
    """The merged model's tokenizer, and for every model which of its rows fills each output row (-1: none)."""

    tokenizer: PreTrainedTokenizerBase
    source: str  # the model whose special-token ids and generation settings the merged model takes
    rows: int
    index: dict[str, torch.Tensor]


def load_tokenizer(path: Path, ref: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise EvomergeError(f"model {ref!r}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None


def union(base: PreTrainedTokenizerBase, others: list[tuple[PreTrainedTokenizerBase, int]]) -> PreTrainedTokenizerBase:
    """A copy of `base` with the tokens of `others` (each with its model's embedding rows) it lacks
    appended: plain tokens first, then added tokens with their settings (mergekit's order)."""
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's own tokenizer stays as it is
        base.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp)
    known = set(out.get_vocab())
    plain, added = {}, {}  # dicts as ordered sets
    for tokenizer, rows in others:
        special = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
        vocab = tokenizer.get_vocab()
        for token in sorted((t for t, i in vocab.items() if i < rows), key=vocab.get):
            if token in special:
                added.setdefault(token, special[token])
            elif token not in known:
                plain.setdefault(token, None)
    out.add_tokens(list(plain))
    out.add_tokens([t for content, t in added.items() if content not in known])
    return out


def build_vocabulary(tokenizer_source: str, paths: dict[str, Path], rows: dict[str, int],
                     trust_remote_code: bool = False) -> Vocabulary:
    """`paths` lists every model of the merge, the base (or first) model first; `rows` their embedding rows."""
    base = next(iter(paths))
    tokenizers = {ref: load_tokenizer(path, ref, trust_remote_code) for ref, path in paths.items()}
    if tokenizer_source == "union":
        source, out = base, union(tokenizers[base], [(t, rows[r]) for r, t in tokenizers.items() if r != base])
    else:
        source = base if tokenizer_source == "base" else tokenizer_source
        if source not in tokenizers:
            raise EvomergeError(f"tokenizer_source {tokenizer_source!r} is none of the merged models "
                                f"{list(paths)}; use base, union or one of them")
        out = tokenizers[source]
    vocab = out.get_vocab()
    n_rows = max(rows[source], max(vocab.values()) + 1)
    token_at = {i: t for t, i in vocab.items()}
    index = {}
    for ref, tokenizer in tokenizers.items():
        own = {t: i for t, i in tokenizer.get_vocab().items() if i < rows[ref]}
        index[ref] = torch.tensor([own.get(token_at[i], -1) if i in token_at else (i if i < rows[ref] else -1)
                                   for i in range(n_rows)])
    return Vocabulary(out, source, n_rows, index)


def reindex(vocabulary: Vocabulary, tensors: dict[str, torch.Tensor], base: str) -> dict[str, torch.Tensor]:
    """Each model's rows of one per-token tensor (embeddings or head) in the output vocabulary's
    order, missing rows filled with mergekit's defaults (see the module docstring)."""
    first = next(iter(tensors.values()))
    index = {ref: vocabulary.index[ref].to(first.device) for ref in tensors}
    total = torch.zeros((vocabulary.rows, *first.shape[1:]), dtype=torch.float32, device=first.device)
    count = torch.zeros(vocabulary.rows, dtype=torch.float32, device=first.device)
    for ref, tensor in tensors.items():
        has = index[ref] >= 0
        total[has] += tensor[index[ref][has]].float()
        count += has
    default = total / count.clamp(min=1).view(-1, *([1] * (first.dim() - 1)))  # one model: its row; none: zeros
    from_base = (index[base] >= 0) & (count > 1)
    default[from_base] = tensors[base][index[base][from_base]].float()
    out = {}
    for ref, tensor in tensors.items():
        has = index[ref] >= 0
        rows = default.to(tensor.dtype)
        rows[has] = tensor[index[ref][has]]
        out[ref] = rows
    return out


def configure(config: PretrainedConfig, vocabulary: Vocabulary, source_config: PretrainedConfig) -> None:
    """The merged config: one embedding row per output row, the tokenizer source's special-token ids."""
    for target, origin in ((config, source_config), (config.get_text_config(decoder=True),
                                                     source_config.get_text_config(decoder=True))):
        for key in SPECIAL_IDS:
            if hasattr(origin, key):
                setattr(target, key, getattr(origin, key))
    config.get_text_config(decoder=True).vocab_size = vocabulary.rows
