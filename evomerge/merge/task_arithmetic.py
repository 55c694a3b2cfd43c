"""Task arithmetic and the generalized form that TIES, DARE, breadcrumbs and DELLA share.

merged = base + lambda * combine_i(w_i * sparsify(source_i - base)), where `combine` is a
plain sum or TIES's sign-consensus sum, optionally divided by the summed weights. Order
of operations follows mergekit 0.1.5 (generalized_task_arithmetic.py) so the same recipe
gives the same bits. Sparsifiers work on whole tensors; everything after is elementwise,
so it runs chunk by chunk straight into the output tensor, or on a CPU as one compiled pass
(merge/native.py) with the same arithmetic.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import native
from evomerge.merge.registry import chunk_elements, compute_dtype, elementwise_chunk
from evomerge.merge.rng import TensorRNG
from evomerge.merge.scratch import scratch
from evomerge.merge.trim import Band, ChunkedKeys, magnitude_keys, order_statistics, streamed_statistics


class DrawnMask(NamedTuple):
    """A random keep mask not yet formed (DARE, DELLA): entry j is kept where draws[j] is below its
    keep probability, `probability` itself (DARE) or, for DELLA, a della.RankRamp's value at the
    entry's magnitude rank in its row. On a CPU one compiled pass applies it (native.keep_drawn);
    elsewhere it is formed as torch's bool mask. The same bits either way."""
    draws: torch.Tensor
    probability: Any  # float, or della.RankRamp

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        p = self.probability
        return self.draws < (p if isinstance(p, float) else p.probabilities(delta))

    def apply_compiled(self, delta: torch.Tensor, divisor: float | None, magnitudes: torch.Tensor | None) -> bool:
        p = self.probability
        target, threshold = (delta, p) if isinstance(p, float) else (p.rows(delta), p.ramp(delta))
        return native.keep_drawn(target, self.draws, threshold, divisor=divisor, magnitudes=magnitudes)


# sparsifier(delta, params_of_this_source, rng) -> mask (bool or float, same shape, or a DrawnMask) or None for "keep all"
Sparsifier = Callable[[torch.Tensor, dict[str, float], TensorRNG | None], torch.Tensor | DrawnMask | None]

RESCALE_MODES = ("l1", "inverse_density")


def rescale_masked(delta: torch.Tensor, mask: torch.Tensor | DrawnMask, density: float, mode: str | None,
                   magnitudes: torch.Tensor | None = None, measured: bool = False) -> torch.Tensor | None:
    """Apply the mask to `delta`, in place; with `inverse_density` (the DARE paper's) divide the kept
    entries by the density; with `l1` (mergekit's rescale) return the factor, a 0-dim tensor, that
    restores the L1 norm the delta had (None: no factor), for the caller to multiply by (the
    compiled merge does it in its own pass). A bool mask is made a 0/1 tensor of delta's dtype
    first: multiplying by a bool tensor goes through a per-element cast, 2-3x slower (measured),
    for the same bits. `magnitudes`: scratch like delta for |delta| (the L1 sums), reusable across
    sources; `measured`: it holds |delta| already."""
    if mode == "l1" and magnitudes is None:
        magnitudes = torch.empty_like(delta)
    before = (magnitudes if measured else torch.abs(delta, out=magnitudes)).sum() if mode == "l1" else None
    divisor = density if mode == "inverse_density" else None
    l1 = magnitudes if mode == "l1" else None
    if not (isinstance(mask, DrawnMask) and mask.apply_compiled(delta, divisor, l1)):
        delta.mul_((mask.mask(delta) if isinstance(mask, DrawnMask) else mask).to(delta.dtype))
        if divisor is not None:
            delta.div_(divisor)
        if l1 is not None:
            torch.abs(delta, out=l1)
    if mode != "l1":
        return None
    after = magnitudes.sum()
    if before < 1e-7 or after < 1e-7:
        return None
    return before / after


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES's elected sign: per element, the sign of the summed weighted deltas (0 counts as +).
    Returns which entries agree with it; zero entries never do."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority


def consensus_sum(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES's combination: the weighted deltas that agree with the elected sign, summed (and divided by
    the weights that agree); `deltas` is [n_sources, chunk] and is scaled in place."""
    weights = weights.view(-1, 1)
    deltas.mul_(weights)
    mask = sign_consensus(deltas)
    mixed = (deltas * mask).sum(dim=0)
    if normalize:
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


def _sparse_deltas(base, sources, params, rng, sparsifier, rescale_mode, dtype):
    """Each source's delta, sparsified, in scratch memory (merge/scratch.py), and its L1 rescale
    factor (None: none; see rescale_masked)."""
    deltas = scratch("deltas", (len(sources), *base.shape), dtype, base.device)
    magnitudes = scratch("magnitudes", base.shape, dtype, base.device) if rescale_mode == "l1" else None
    base_c, scales = None, []
    for i, (source, p) in enumerate(zip(sources, params)):
        delta = deltas[i]
        measured = native.source_delta(source, base, delta, magnitudes)  # the next two lines in one pass
        if not measured:
            if base_c is None:
                base_c = base if base.dtype == dtype else scratch("base", base.shape, dtype, base.device).copy_(base)
            delta.copy_(source).sub_(base_c)
        mask = sparsifier(delta, p, rng.stream(i) if rng is not None else None)
        scales.append(None if mask is None else
                      rescale_masked(delta, mask, p["density"], rescale_mode, magnitudes, measured))
    return deltas, scales


def _trim_bands(base, sources, params, trim_of, dtype, size) -> list[Band | None]:
    """Each source's trim band (None: keeps all), found from its delta read chunk by chunk: a
    magnitude trim never holds the n deltas whole, only a chunk at a time."""
    n = base.numel()
    flat_base = base.reshape(-1)
    scratch = torch.empty(min(size, n), dtype=dtype, device=base.device)
    bands: list[Band | None] = []
    for source, p in zip(sources, params):
        trim, flat = trim_of(n, p), source.reshape(-1)
        fixed = trim.fixed_band() if trim is not None else None
        if trim is None or fixed is not None:
            bands.append(fixed)
            continue

        def keys_of(start: int, stop: int, step: int, flat=flat) -> torch.Tensor:
            source, base_part = flat[start:stop:step], flat_base[start:stop:step]
            into = scratch[: source.numel()] if source.numel() <= scratch.numel() else torch.empty_like(source, dtype=dtype)
            return magnitude_keys(into.copy_(source).sub_(base_part.to(dtype)))

        reader = native.DeltaKeys.of(flat, flat_base, dtype) or ChunkedKeys(n, size, keys_of)
        statistics = streamed_statistics(reader, trim.ranks())
        if statistics is None:  # the sample missed: read the keys whole
            statistics = order_statistics(torch.cat([keys_of(s, min(s + size, n), 1).clone() for s in range(0, n, size)]),
                                          trim.ranks())
        bands.append(trim.band(statistics))
    return bands


def generalized_task_arithmetic(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    params: Sequence[dict[str, float]],
    options: dict[str, Any],
    rng: TensorRNG | None,
    out: torch.Tensor | None,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
) -> torch.Tensor:
    dtype = compute_dtype(base, *sources)
    if out is None:
        out = torch.empty(base.shape, dtype=dtype, device=base.device)
    rescale_mode = options.get("rescale_mode", "l1") if options.get("rescale", False) else None
    if rescale_mode not in (None, *RESCALE_MODES):
        raise EvomergeError(f"rescale_mode must be one of {RESCALE_MODES}, got {rescale_mode!r}")
    weights = torch.tensor([p["weight"] for p in params], dtype=dtype, device=base.device)
    sparse = sparsifier is not None and any(p.get("density", 1.0) < 1 for p in params)
    trim_of = getattr(sparsifier, "trim_of", None)
    banded = sparse and trim_of is not None and rescale_mode is None  # trims by rank, chunk by chunk
    deltas, scales = (_sparse_deltas(base, sources, params, rng, sparsifier, rescale_mode, dtype) if sparse and not banded
                      else (None, None))
    n, numel = len(sources), base.numel()
    flat_out, flat_base, flat_sources = out.view(-1), base.reshape(-1), [s.reshape(-1) for s in sources]
    rows = deltas.view(n, -1) if deltas is not None else None
    divisor = weights.sum()
    divisor = torch.ones_like(divisor) if divisor.abs() < 1e-8 else divisor
    # torch's sum over the sources (dim 0) adds them in order, onto zero, up to 4 of them on a CPU
    # (measured, torch 2.13): a running sum chunk by chunk gives its bits. Beyond 4, and on
    # other devices, the order depends on the block's width, so the block is summed by torch in
    # fixed chunks (their bits depend on the chunk size, as slerp's do).
    running = not consensus and n <= 4 and base.device.type == "cpu"
    size = max(1, min(elementwise_chunk(base.device.type) if running else chunk_elements(base.device), numel))
    bands = _trim_bands(base, sources, params, trim_of, dtype, size) if banded else [None] * n
    if native.banded_merge(sources, base, bands, weights, out, consensus=consensus, normalize=options["normalize"],
                           divisor=divisor, scale=options["lambda"], deltas=rows, scales=scales):
        return out  # the same arithmetic in one compiled pass
    for row, factor in zip(rows if rows is not None else (), scales or ()):
        if factor is not None:
            row.mul_(factor)
    base_buf, acc = (torch.empty(size, dtype=dtype, device=base.device) for _ in range(2))
    delta_buf = torch.empty((1 if running else n, size), dtype=dtype, device=base.device) if rows is None else None

    def delta(i: int, start: int, stop: int, base_c: torch.Tensor) -> torch.Tensor:
        """Source i's delta over [start, stop): a slice of the sparsified deltas, or computed (and
        trimmed by its band) into scratch."""
        if rows is not None:
            return rows[i, start:stop]
        chunk = delta_buf[0 if running else i, : stop - start].copy_(flat_sources[i][start:stop]).sub_(base_c)
        if bands[i] is not None:
            chunk.mul_(bands[i].mask(magnitude_keys(chunk), start).to(dtype))
        return chunk

    for start in range(0, numel, size):
        stop = min(start + size, numel)
        base_c = base_buf[: stop - start].copy_(flat_base[start:stop])
        if running:  # mergekit's (w * deltas).sum(dim=0), one pass per source
            mixed = acc[: stop - start].zero_()
            for i in range(n):
                mixed += delta(i, start, stop, base_c).mul_(weights[i])
        else:
            if rows is None:
                for i in range(n):
                    delta(i, start, stop, base_c)  # into delta_buf[i]
            block = rows[:, start:stop] if rows is not None else delta_buf[:, : stop - start]
            mixed = consensus_sum(block, weights, options["normalize"]) if consensus else block.mul_(weights.view(-1, 1)).sum(dim=0)
        if options["normalize"] and not consensus:
            mixed /= divisor
        if options["lambda"] != 1:
            mixed *= options["lambda"]
        flat_out[start:stop] = mixed.add_(base_c)
    return out


task_arithmetic = functools.partial(generalized_task_arithmetic, sparsifier=None, consensus=False)
