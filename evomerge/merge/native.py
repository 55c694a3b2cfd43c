"""Compiled merge passes (fused.c): the elementwise merges and the magnitude trims in one pass over memory.

torch spends ~5-9 passes over every chunk on linear and task arithmetic (0.14-0.18 of the copy
floor on a 134M model), and ~15-20 on a trimmed chunk of TIES or breadcrumbs; here one C loop
reads each source once and writes the output once, with torch's arithmetic step by step, so
the bits are the same. DARE's and DELLA's masks are drawn by a copy of torch's CPU generator
(the same values) and applied in one pass. The library is built on first use with the
machine's C compiler (`cc`, or $CC) for this CPU and cached under ~/.cache/evomerge (else a
private folder in the temp dir); with no compiler, or EVOMERGE_NATIVE=0, the merges run on
torch's kernels (same bits, slower). Each entry point
returns False (or None) where it does not apply, for the caller to run torch's kernels: not
on the CPU, not contiguous, float64, a dtype other than float32/bfloat16/float16.
"""

from __future__ import annotations

import ctypes
import functools
import getpass
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from evomerge.merge.trim import Band

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
# -ffp-contract=off: no fused multiply-add, which would round once where torch rounds twice.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread", "-lm"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cache_dirs() -> list[Path]:
    """Where the library may be cached: the user's cache, else a private folder in the temp dir."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    return [Path(root) / "evomerge", Path(tempfile.gettempdir()) / f"evomerge-{user}"]


def _cpu_signature() -> str:
    """-march=native code runs only where the CPU has the same features: part of the cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = " ".join(sorted({line for line in lines if line.startswith(("flags", "Features", "CPU part"))}))
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _private(path: Path) -> None:
    """Refuse a folder or library another user could have written: a library is code we run."""
    if not hasattr(os, "getuid"):
        return
    info = path.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{path} is not this user's alone")


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file and rename it into place, so that concurrent workers never
    load a half-written library."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(target.parent)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        pass
    try:
        done = subprocess.run([*shlex.split(compiler), str(SOURCE), *FLAGS, "-o", tmp.name], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {(done.stderr.strip().splitlines() or [f'exit {done.returncode}'])[-1]}")
        os.replace(tmp.name, target)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)


def _load(compiler: str, name: str) -> ctypes.CDLL:
    """The cached library, built where the first usable cache folder is."""
    errors = []
    for folder in _cache_dirs():
        target = folder / name
        try:
            if not target.exists():
                _build(compiler, target)
            _private(folder)
            _private(target)
            return ctypes.CDLL(str(target))
        except OSError as error:
            errors.append(str(error))
    raise OSError("; ".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, build failed, or EVOMERGE_NATIVE=0)."""
    if os.environ.get("EVOMERGE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc): merges run on torch's kernels (the same bits, 2-5x slower on a CPU)")
        return None
    try:
        return _checked(compiler)
    except Exception as error:  # anything at all: the merges still run, on torch's kernels
        log.warning("could not build the fused merge kernel (%s): torch's kernels are used instead", error)
        return None


def _checked(compiler: str) -> ctypes.CDLL | None:
    """Build (or find) the library, declare its functions, check it gives torch's bits."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    lib = _load(compiler, f"fused-{key}.so")
    declare(lib)
    if not _agrees_with_torch(lib):
        log.warning("the fused merge kernel does not give torch's bits on this machine: torch's kernels are used instead")
        return None
    return lib


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give ctypes fused.c's signatures."""
    i32, i64, u64, f32, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p
    signatures = {  # name: (result, arguments), as fused.c declares them
        "weighted_sum": (None, [i64, i32, ptr, ptr, ptr, i32, f32, ptr, i32, i32]),
        "bracket_pass": (i32, [i64, ptr, i32, ptr, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i32]),
        "nth_equal": (i64, [i64, ptr, i32, ptr, i32, i64, i64]),
        "banded_merge": (None, [i64, i32, ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, i32, i32, f32, i32, f32, ptr, i32, i32]),
        "source_delta": (None, [i64, ptr, i32, ptr, i32, ptr, ptr, i32]),
        "row_ramp": (i32, [i64, i64, ptr, ptr, ptr, ptr, i32, f32, ptr, i32]),
        "keep_drawn": (None, [i64, ptr, ptr, f32, i32, f32, ptr, i32]),
        "uniform_draws": (None, [u64, i64, ptr]),
    }
    for name, (result, arguments) in signatures.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = result, arguments
    return lib


def _agrees_with_torch(lib: ctypes.CDLL) -> bool:
    """The premises that depend on the machine and torch's build, checked once: torch's addcmul_
    (linear's kernel) rounds its multiply-add once (fmaf in fused.c) and task arithmetic's mul_
    then add_ twice; torch's CPU generator is MT19937 with float32 draws of 24 bits (uniform_draws).
    A torch build or CPU where that differs gets torch's kernels."""
    n, weights = 4099, [0.7, -0.35, 1.3]
    f32, cpu = torch.float32, torch.device("cpu")  # explicit: a caller may have set torch's defaults (vLLM does)
    g = torch.Generator(device=cpu).manual_seed(0)
    sources = [torch.randn(n, generator=g, dtype=f32, device=cpu).to(torch.bfloat16) for _ in weights]
    base = sources[0].float()
    linear, task = torch.zeros(n, dtype=f32, device=cpu), torch.zeros(n, dtype=f32, device=cpu)
    for source, w in zip(sources, weights):
        linear.addcmul_(source.float(), torch.tensor(w, dtype=f32, device=cpu))
        task += (source.float() - base).mul_(torch.tensor(w, dtype=f32, device=cpu))
    task += base
    # NaN-filled, not empty: memory just freed by an earlier check may already hold the right values
    ours = [torch.full((n,), float("nan"), dtype=f32, device=cpu) for _ in range(2)]
    pointers, dtypes = _array(ctypes.c_void_p, (s.data_ptr() for s in sources)), _array(ctypes.c_int32, [1] * 3)
    floats = _array(ctypes.c_float, weights)
    lib.weighted_sum(n, 3, pointers, dtypes, floats, 0, 1.0, ours[0].data_ptr(), 0, 1)
    lib.banded_merge(n, 3, pointers, dtypes, sources[0].data_ptr(), 1, None, None, None, _array(_Band, [_Band(trims=0)] * 3),
                     floats, 0, 0, 1.0, 0, 1.0, ours[1].data_ptr(), 0, 1)
    seed = 0x7E57_0000_0000_0001  # high bits set: torch seeds MT19937 with the low 32
    draws = torch.rand(1500, generator=torch.Generator(device=cpu).manual_seed(seed), dtype=f32, device=cpu)
    ours.append(torch.full((1500,), float("nan"), dtype=f32, device=cpu))
    lib.uniform_draws(seed, 1500, ours[2].data_ptr())
    return torch.equal(ours[0], linear) and torch.equal(ours[1], task) and torch.equal(ours[2], draws)


def _applies(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is one the kernels take (contiguous, on the CPU, a known dtype)."""
    lib = library()
    if lib is None or any(t.device.type != "cpu" or t.dtype not in DTYPES or not t.is_contiguous() for t in tensors):
        return None
    return lib


def _array(ctype, values):
    values = list(values)
    return (ctype * len(values))(*values)


def weighted_sum(sources: Sequence[torch.Tensor], weights: torch.Tensor, out: torch.Tensor, *,
                 divisor: torch.Tensor | None = None) -> bool:
    """Linear's out = sum_i w_i * source_i [/ divisor], float32 arithmetic in torch's order (fused.c)."""
    lib = _applies(*sources, out)
    if lib is None or weights.dtype != torch.float32 or any(t.numel() != out.numel() for t in sources):
        return False
    lib.weighted_sum(
        out.numel(), len(sources), _array(ctypes.c_void_p, (s.data_ptr() for s in sources)),
        _array(ctypes.c_int32, (DTYPES[s.dtype] for s in sources)), _array(ctypes.c_float, weights.tolist()),
        divisor is not None, float(divisor) if divisor is not None else 1.0, out.data_ptr(), DTYPES[out.dtype],
        torch.get_num_threads(),
    )
    return True


class _Band(ctypes.Structure):
    _fields_ = [("trims", ctypes.c_int32), ("has_above", ctypes.c_int32), ("has_below", ctypes.c_int32),
                ("n_runs", ctypes.c_int32), ("above", ctypes.c_int64), ("below", ctypes.c_int64),
                ("value", ctypes.c_int64 * 2), ("first", ctypes.c_int64 * 2), ("stop", ctypes.c_int64 * 2)]


def _band(band: Band | None) -> _Band:
    if band is None:
        return _Band(trims=0)
    runs = list(band.runs)
    return _Band(1, band.above is not None, band.below is not None, len(runs), band.above or 0, band.below or 0,
                 (ctypes.c_int64 * 2)(*[r[0] for r in runs]), (ctypes.c_int64 * 2)(*[r[1] for r in runs]),
                 (ctypes.c_int64 * 2)(*[r[2] for r in runs]))


MAX_SOURCES = 4  # fused.c; torch's sum over more sources adds in another order
POOL_SLACK = 1 << 16  # room per thread for gathered keys beyond the sample's estimate
POOL_PAD = 16  # fused.c: slots past each thread's room, where a vector store may reach
MAX_BRACKETS = 4  # fused.c


def banded_merge(sources: Sequence[torch.Tensor], base: torch.Tensor, bands: Sequence[Band | None], weights: torch.Tensor,
                 out: torch.Tensor, *, consensus: bool, normalize: bool, divisor: torch.Tensor, scale: float,
                 deltas: torch.Tensor | None = None, scales: Sequence[torch.Tensor | None] | None = None) -> bool:
    """out = base + scale * combine_i(w_i * trim_i(source_i - base)), generalized_task_arithmetic's
    arithmetic with each delta kept where its band (trim.Band, None: everywhere) keeps it, and
    combine TIES's sign consensus or the running sum (divided by `divisor` when normalize). With
    `deltas` (float32 [n_sources, numel]: DARE's and DELLA's masked deltas) they replace source_i - base,
    each multiplied first by its L1 rescale factor in `scales` (None: none)."""
    lib = _applies(*sources, out, base, *([deltas] if deltas is not None else []))
    if (lib is None or weights.dtype != torch.float32 or len(sources) > MAX_SOURCES
            or (deltas is not None and (deltas.dtype != torch.float32 or deltas.numel() != len(sources) * out.numel()))
            or any(t.numel() != out.numel() for t in (*sources, base))
            or any(b is not None and len(b.runs) > 2 for b in bands)
            or any(s is not None and s.dtype != torch.float32 for s in scales or ())):
        return False
    factors = _array(ctypes.c_float, (1.0 if s is None else float(s) for s in scales)) if scales else None
    scaled = _array(ctypes.c_int32, (s is not None for s in scales)) if scales else None
    lib.banded_merge(
        out.numel(), len(sources), _array(ctypes.c_void_p, (s.data_ptr() for s in sources)),
        _array(ctypes.c_int32, (DTYPES[s.dtype] for s in sources)), base.data_ptr(), DTYPES[base.dtype],
        deltas.data_ptr() if deltas is not None else None, factors, scaled,
        _array(_Band, (_band(b) for b in bands)), _array(ctypes.c_float, weights.tolist()), consensus, normalize,
        float(divisor), scale != 1.0, scale, out.data_ptr(), DTYPES[out.dtype], torch.get_num_threads(),
    )
    return True


def source_delta(source: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, magnitudes: torch.Tensor | None) -> bool:
    """delta = float32(source) - float32(base) (torch's copy_ then sub_), and |delta| into `magnitudes`
    where given, in one pass. False where it does not apply."""
    others = [delta, *([magnitudes] if magnitudes is not None else [])]
    lib = _applies(source, base, *others)
    if lib is None or any(t.dtype != torch.float32 for t in others) or any(t.numel() != delta.numel() for t in (source, base, *others)):
        return False
    lib.source_delta(delta.numel(), source.data_ptr(), DTYPES[source.dtype], base.data_ptr(), DTYPES[base.dtype],
                     delta.data_ptr(), magnitudes.data_ptr() if magnitudes is not None else None, torch.get_num_threads())
    return True


class DeltaKeys:
    """The magnitude keys of float32(source) - float32(base) (trim.magnitude_keys of the delta),
    computed by compiled passes and never stored: a trim.KeyReader."""

    def __init__(self, lib: ctypes.CDLL, source: torch.Tensor, base: torch.Tensor):
        self.lib, self.source, self.base, self.n = lib, source.reshape(-1), base.reshape(-1), source.numel()
        self.args = (self.source.data_ptr(), DTYPES[source.dtype], self.base.data_ptr(), DTYPES[base.dtype])
        self.drawn: torch.Tensor | None = None

    @classmethod
    def of(cls, source: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> DeltaKeys | None:
        """A reader of the delta's keys, where the kernels apply (float32 deltas)."""
        lib = _applies(source, base)
        return cls(lib, source, base) if lib is not None and dtype == torch.float32 else None

    def sample(self, step: int) -> torch.Tensor:
        part = self.source[::step].to(torch.float32) - self.base[::step].to(torch.float32)
        self.drawn = part.abs().view(torch.int32)
        return self.drawn

    def bracket_pass(self, brackets):
        k = len(brackets)
        if k > MAX_BRACKETS:
            raise ValueError(f"at most {MAX_BRACKETS} brackets in one pass, got {k}")
        wide = [low != high for low, high in brackets]
        lows = _array(ctypes.c_int64, (low for low, _ in brackets))
        highs = _array(ctypes.c_int64, (-1 if high is None else high for _, high in brackets))
        below, equal = (ctypes.c_int64 * k)(), (ctypes.c_int64 * k)()
        threads = max(1, torch.get_num_threads())
        gathered = (ctypes.c_int64 * threads)()
        cap = self._expected_inside(brackets, wide) // threads + POOL_SLACK
        while True:
            pool = torch.empty(threads * (cap + POOL_PAD), dtype=torch.int32, device="cpu")
            used = self.lib.bracket_pass(self.n, *self.args, k, lows, highs, _array(ctypes.c_int32, wide), below,
                                         equal, pool.data_ptr(), cap, gathered, threads)
            counts = list(gathered)[:used]
            if max(counts) <= cap:
                break
            cap = max(counts)  # a part held more than the sample said: once more, with room for it
        keys = torch.cat([pool[t * (cap + POOL_PAD):][:c] for t, c in enumerate(counts)]) if any(wide) else None
        return list(below), [0 if w else e for w, e in zip(wide, equal)], keys

    def _expected_inside(self, brackets, wide) -> int:
        """How many keys the wide brackets should gather, from the sample's share, with room to spare."""
        if self.drawn is None or not any(wide):
            return 0
        inside = torch.zeros_like(self.drawn, dtype=torch.bool)
        for (low, high), w in zip(brackets, wide):
            if w:
                inside |= (self.drawn >= low) & (self.drawn <= high if high is not None else True)
        return int(1.5 * float(inside.float().mean()) * self.n)

    def nth_equal(self, value: int, j: int) -> int:
        position = self.lib.nth_equal(self.n, *self.args, value, j)
        if position < 0:
            raise IndexError(j)
        return position


def uniform_draws(seed: int, out: torch.Tensor) -> bool:
    """Fill `out` (float32, contiguous, CPU) with torch.rand's values for a generator given
    manual_seed(seed), in the same order (fused.c). False where it does not apply."""
    lib = _applies(out)
    if lib is None or out.dtype != torch.float32:
        return False
    lib.uniform_draws(seed, out.numel(), out.data_ptr())
    return True


def row_ramp(rows: torch.Tensor, ramp: torch.Tensor, threads: int | None = None) -> torch.Tensor | None:
    """DELLA's keep probabilities: for each entry of the float32 matrix `rows`, ramp[its rank], its
    rank being its place in a stable ascending sort of its row's magnitudes (fused.c's radix sort)."""
    lib = _ramp_applies(rows, ramp)
    if lib is None:
        return None
    prob = torch.empty_like(rows)
    if lib.row_ramp(rows.shape[0], rows.shape[1], rows.data_ptr(), ramp.data_ptr(), prob.data_ptr(), None, 0, 1.0, None,
                    threads or torch.get_num_threads()) != 0:
        return None  # no memory for a row's sort: torch's path (which needs more) will say so
    return prob


def _ramp_applies(rows: torch.Tensor, ramp: torch.Tensor, *others: torch.Tensor) -> ctypes.CDLL | None:
    lib = _applies(rows, ramp, *others)
    if (lib is None or any(t.dtype != torch.float32 for t in (rows, ramp, *others)) or rows.dim() != 2
            or ramp.numel() != rows.shape[1] or rows.shape[1] >= 1 << 32  # columns are tagged in 32 bits
            or any(t.numel() != rows.numel() for t in others)):
        return None
    return lib


def keep_drawn(delta: torch.Tensor, draws: torch.Tensor, threshold: float | torch.Tensor, *, divisor: float | None,
               magnitudes: torch.Tensor | None) -> bool:
    """A random keep mask applied to a float32 delta in place, as task_arithmetic.rescale_masked does in
    torch: delta *= (draws < p) [then /= divisor], and |delta| into `magnitudes` where given. p is
    `threshold` (DARE), or, given a ramp tensor for `threshold` and `delta` as rows, DELLA's
    ramp[the entry's rank in its row] (row_ramp's sort). False where the compiled pass does not apply."""
    others = [draws, *([magnitudes] if magnitudes is not None else [])]
    lib = (_ramp_applies(delta, threshold, *others) if isinstance(threshold, torch.Tensor)
           else _applies(delta, *others))
    if lib is None or any(t.dtype != torch.float32 or t.numel() != delta.numel() for t in (delta, *others)):
        return False
    # a divisor of 0 (density 0) is a divisor: torch divides by it too
    flags = (divisor is not None, divisor if divisor is not None else 1.0,
             magnitudes.data_ptr() if magnitudes is not None else None, torch.get_num_threads())
    if isinstance(threshold, torch.Tensor):
        return lib.row_ramp(delta.shape[0], delta.shape[1], delta.data_ptr(), threshold.data_ptr(), None,
                            draws.data_ptr(), *flags) == 0  # no memory for the sort: torch's path, delta unchanged
    lib.keep_drawn(delta.numel(), delta.data_ptr(), draws.data_ptr(), threshold, *flags)
    return True
