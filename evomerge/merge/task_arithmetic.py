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
from typing import Any, Callable, Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import native
from evomerge.merge.registry import chunk_elements, compute_dtype, elementwise_chunk
from evomerge.merge.rng import TensorRNG
from evomerge.merge.trim import Band, ChunkedKeys, magnitude_keys, order_statistics, streamed_statistics

# sparsifier(delta, params_of_this_source, rng) -> mask (bool or float, same shape) or None for "keep all"
Sparsifier = Callable[[torch.Tensor, dict[str, float], TensorRNG | None], torch.Tensor | None]

RESCALE_MODES = ("l1", "inverse_density")


def rescale_masked(delta: torch.Tensor, mask: torch.Tensor, density: float, mode: str | None) -> torch.Tensor:
    """Apply the mask to `delta`, in place; with `l1` (mergekit's rescale) restore the L1 norm the
    delta had, with `inverse_density` (the DARE paper's) divide the kept entries by the density.
    A bool mask is made a 0/1 tensor of delta's dtype first: multiplying by a bool tensor goes
    through a per-element cast, 2-3x slower (measured), for the same bits."""
    before = delta.abs().sum() if mode == "l1" else None
    delta.mul_(mask.to(delta.dtype))
    if mode == "inverse_density":
        return delta.div_(density)
    if mode is None:
        return delta
    after = delta.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return delta
    return delta.mul_(before / after)


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


def _sparse_deltas(base, sources, params, rng, sparsifier, rescale_mode, dtype) -> torch.Tensor:
    deltas = torch.empty((len(sources), *base.shape), dtype=dtype, device=base.device)
    base_c = base.to(dtype)
    for i, (source, p) in enumerate(zip(sources, params)):
        delta = deltas[i].copy_(source).sub_(base_c)
        mask = sparsifier(delta, p, rng.stream(i) if rng is not None else None)
        if mask is not None:
            rescale_masked(delta, mask, p["density"], rescale_mode)
    return deltas


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
    deltas = _sparse_deltas(base, sources, params, rng, sparsifier, rescale_mode, dtype) if sparse and not banded else None
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
                           divisor=divisor, scale=options["lambda"], deltas=rows):
        return out  # the same arithmetic in one compiled pass
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
