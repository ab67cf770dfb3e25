"""4-bit weight quantization at load beyond round-to-nearest, same packed format (codes, fp16
mins and scales per group of the input dim: what the fused kernels read), no data needed.

Schemes (Policy.weight_scheme):
- rtn: min-max round to nearest (quant.compress), as FlexGen;
- hqq: half-quadratic optimisation of each group's zero point (HQQ, Badri & Shaji 2023):
  alternate codes with a shrinkage of the error under an Lp norm (p = 0.7), which fits
  most values closely and lets a few be off;
- synth: a grid search of each group's clipping range (both ends shrunk by 0..20% of the
  range) minimising the output error sum_j a_j (w_j - w^_j)^2, where a_j is input channel
  j's mean square activation measured on random token ids (memory/synth_stats.py).

Every group keeps round-to-nearest unless the search finds a strictly smaller error, so a
group RTN represents exactly (a Q4_1 GGUF's blocks at group 32) is never moved. Results are
cached per checkpoint (WeightCache) so only the first load pays for the search.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from flexrun.kernels import quant_search
from flexrun.memory.quant import (Compressed, compress, decompress, encode, from_codes, grouped,
                                  minmax, scale_of)

CHUNK = 1 << 22                 # values per chunk of groups searched at once (CPU)
CHUNK_CUDA = 1 << 24            # on a GPU: fewer launches, ~0.5 GB of fp32 temporaries
LOAD_CHUNK = 1 << 26            # values of one weight quantized at once at load (by_rows)
GRID = torch.linspace(0.0, 0.2, 9).tolist()    # shrink of each end, fractions of the range
HQQ = dict(p=0.7, beta=10.0, kappa=1.01, iters=20)
VERSION = 1                     # of the searches and the cache layout (part of the key)
MIN_CACHE_BYTES = 16 << 20      # smaller checkpoints search in about a second: not cached


def quantize(x: torch.Tensor, bits: int, group: int, scheme: str,
             importance: torch.Tensor | None = None) -> Compressed:
    """x (out, in) quantized along its input dim by `scheme`; importance (in,): the input
    channels' mean square activations (synth; None weighs every channel alike)."""
    if scheme == "rtn" or x.dim() != 2:
        return compress(x, bits, group, dim=-1)
    g, pad = grouped(x, group, 1)                            # (out, ngroups, group)
    w = None
    if scheme == "synth":
        imp = torch.ones(x.shape[1], device=x.device) if importance is None else \
            importance.to(x.device, torch.float32)
        imp = imp / imp.mean().clamp_min(1e-30) + 1e-3      # no channel weighs nothing
        if pad:
            imp = torch.cat([imp, imp.new_zeros(pad)])
        w = imp.view(1, -1, group)
    if scheme == "synth" and quant_search.applies(g):       # one Triton pass on the GPU
        found = _kernel_search(g, w, bits)
        if found is not None:
            return from_codes(encode(g, *found, bits), *found, x.shape, 1, bits, group, pad,
                              x.dtype)
    mins, scales = minmax(g, bits)
    rows = max(1, (CHUNK_CUDA if x.is_cuda else CHUNK) // max(1, x.shape[1] + pad))
    for r0 in range(0, g.shape[0], rows):
        sl = slice(r0, r0 + rows)
        m, s = (_grid(g[sl], w, bits) if scheme == "synth" else _hqq(g[sl], bits))
        mins[sl], scales[sl] = m, s
    return from_codes(encode(g, mins, scales, bits), mins, scales, x.shape, 1, bits, group,
                      pad, x.dtype)


_KERNEL_FAILED: list[str] = []


def _kernel_search(g: torch.Tensor, w: torch.Tensor, bits: int):
    """The grid search's (mins, scales) by the Triton kernel; None (torch's search then
    runs, said once) where it fails to build or run on this device."""
    if _KERNEL_FAILED:
        return None
    try:
        return quant_search.grid_search(g, w, GRID, bits)
    except torch.OutOfMemoryError:
        raise                   # not the kernel's fault: torch's search needs more memory
    except Exception as e:      # a Triton build error: the load goes on, slower
        _KERNEL_FAILED.append(repr(e))
        note(f"weights: the Triton grid search failed ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:120] if str(e) else ''}); torch's search runs instead "
             "(FLEXRUN_TRITON_QUANT=0 skips the kernel)")
        return None


def _err(g: torch.Tensor, m: torch.Tensor, s: torch.Tensor, bits: int,
         w: torch.Tensor | None) -> torch.Tensor:
    d = torch.addcmul(m.float(), encode(g, m, s, bits), s.float()).sub_(g).square_()
    return (d if w is None else d.mul_(w)).sum(-1, keepdim=True)


def _keep_better(best: list, g, m, s, bits, w) -> None:
    """best = [err, m, s] per group, replaced where (m, s) is strictly better."""
    e = _err(g, m, s, bits, w)
    b = e < best[0]
    best[0] = torch.where(b, e, best[0])
    best[1] = torch.where(b, m, best[1])
    best[2] = torch.where(b, s, best[2])


def _grid(g: torch.Tensor, w: torch.Tensor | None, bits: int):
    """fp16 (min, scale) per group: the best clipped range of the grid (RTN first)."""
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    rng = mx - mn
    m0, s0 = mn.half(), scale_of(rng, bits)       # minmax(g, bits), its extrema reused
    best = [_err(g, m0, s0, bits, w), m0, s0]
    if not bool((best[0] > 0).any()):       # every group exact already
        return m0, s0
    for a in GRID:
        for b in GRID:
            if a or b:
                lo, hi = mn + a * rng, mx - b * rng
                _keep_better(best, g, lo.half(), scale_of(hi - lo, bits), bits, w)
    return best[1], best[2]


def _hqq(g: torch.Tensor, bits: int):
    """fp16 (min, scale) per group: HQQ's zero-point optimisation at RTN's scale, kept only
    where it lowers the squared error."""
    levels = 2 ** bits - 1
    m0, s0 = minmax(g, bits)
    s = s0.float().clamp_min(1e-12)
    m, beta = m0.float(), HQQ["beta"]
    for _ in range(HQQ["iters"]):
        q = ((g - m) / s).round_().clamp_(0, levels)
        r = g - (m + s * q)
        e = r.sign() * torch.relu(r.abs() - r.abs().clamp_min(1e-12).pow(HQQ["p"] - 1) / beta)
        m = (g - e - s * q).mean(-1, keepdim=True)
        beta *= HQQ["kappa"]
    best = [_err(g, m0, s0, bits, None), m0, s0]
    _keep_better(best, g, m.half(), s0, bits, None)
    return best[1], best[2]


# ---- the cache ------------------------------------------------------------------------------
def cache_dir() -> Path:
    """FLEXRUN_QUANT_CACHE, else ~/.cache/flexrun/quant (FLEXRUN_CACHE moves ~/.cache/flexrun)."""
    if os.environ.get("FLEXRUN_QUANT_CACHE"):
        return Path(os.environ["FLEXRUN_QUANT_CACHE"])
    root = os.environ.get("FLEXRUN_CACHE") or Path.home() / ".cache" / "flexrun"
    return Path(root) / "quant"


def checkpoint_files(source: str) -> list[Path]:
    """The files a checkpoint's tensors come from: a .gguf, or an HF directory's weights."""
    p = Path(source) if source else None
    if p is None or not p.exists():
        return []
    if p.is_file():
        return [p]
    return sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))


def cache_key(source: str, bits: int, group: int, scheme: str, dtype: torch.dtype,
              part: str = "") -> str | None:
    """Key of a checkpoint's quantized weights: each file's name, size and mtime (not its
    content: hashing tens of GB at every load would cost more than the search), the scheme,
    bits, group and dtype (and `part`, a pipeline stage's units); None when the checkpoint
    has no files (dummy weights)."""
    files = checkpoint_files(source)
    if not files:
        return None
    ident = {"files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
             "path": str(Path(source).resolve()), "bits": bits, "group": group,
             "scheme": scheme, "dtype": str(dtype), "part": part, "version": VERSION}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return f"{Path(source).name}-{scheme}-{bits}b-g{group}-{digest}"


def note(msg: str) -> None:
    print(f"[flexrun] {msg}", file=sys.stderr, flush=True)


class WeightCache:
    """One checkpoint's quantized weights in one file (mode 0600): each weight's codes, mins
    and scales back to back, then a JSON index and its length. Read through mmap."""
    SUFFIX = ".fq4"

    def __init__(self, key: str | None, directory: Path | None = None):
        self.path = None if key is None else (directory or cache_dir()) / (key + self.SUFFIX)
        self.index: dict = {}
        self._mm = None
        self._out = None
        self._tmp = None

    def open_read(self) -> bool:
        """Whether the cache holds this checkpoint (then get() serves its weights)."""
        if self.path is None or not self.path.is_file():
            return False
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            n = int.from_bytes(self._mm[-8:], "little")
            self.index = json.loads(self._mm[-8 - n:-8].decode())
            return True
        except (OSError, ValueError) as e:
            note(f"quantized-weight cache {self.path} unreadable ({e}); quantizing again")
            self.close()
            return False

    def get(self, name: str, shape, dtype: torch.dtype) -> Compressed | None:
        ent = self.index.get(name)
        if ent is None or self._mm is None or tuple(ent["shape"]) != tuple(shape):
            return None
        parts = []
        for (off, n), dt, shp in zip(ent["spans"], (torch.uint8, torch.float16, torch.float16),
                                     ent["shapes"]):
            t = torch.frombuffer(bytearray(self._mm[off:off + n]), dtype=torch.uint8)
            parts.append(t.view(dt).view(shp))
        return Compressed(parts[0], parts[1], parts[2], tuple(ent["shape"]), ent["dim"],
                          ent["bits"], ent["group"], ent["pad"], dtype)

    def open_write(self, need_bytes: int) -> bool:
        """Start a new cache file; False (with a one-line note) where the directory cannot
        be written or has less free space than need_bytes."""
        if self.path is None or need_bytes < MIN_CACHE_BYTES:
            return False
        d = self.path.parent
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            free = shutil.disk_usage(d).free
            if need_bytes > free:
                note(f"quantized weights not cached: {need_bytes / 2**20:.0f} MiB needed, "
                     f"{free / 2**20:.0f} MiB free in {d}")
                return False
            self._tmp = d / f".{self.path.name}.{os.getpid()}.tmp"
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            self._out = os.fdopen(fd, "wb")
            return True
        except OSError as e:
            note(f"quantized weights not cached: cannot write {d} ({e.strerror or e})")
            self._out = None
            return False

    def put(self, name: str, c: Compressed) -> None:
        if self._out is None:
            return
        try:
            spans, shapes = [], []
            for t in (c.data, c.mins, c.scales):
                b = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                spans.append((self._out.tell(), len(b)))
                shapes.append(list(t.shape))
                self._out.write(b)
            self.index[name] = {"spans": spans, "shapes": shapes, "shape": list(c.shape),
                                "dim": c.dim, "bits": c.bits, "group": c.group_size,
                                "pad": c.pad}
        except OSError as e:
            note(f"quantized weights not cached: writing {self._tmp} failed ({e.strerror or e})")
            self.abort()

    def commit(self) -> bool:
        """Finish the file (index, then rename into place); whether it was written."""
        if self._out is None:
            return False
        try:
            idx = json.dumps(self.index).encode()
            self._out.write(idx)
            self._out.write(len(idx).to_bytes(8, "little"))
            self._out.close()
            self._out = None
            os.replace(self._tmp, self.path)
            return True
        except OSError as e:
            note(f"quantized weights not cached: writing {self._tmp} failed ({e.strerror or e})")
            self.abort()
            return False

    def abort(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except OSError:
                pass
            self._out = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)

    def close(self) -> None:
        self.abort()
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def by_rows(t: torch.Tensor, fn, values: int | None = None) -> Compressed:
    """fn(t) for a 2-D t quantized along its rows, a block of whole rows at a time: groups
    never cross rows, so the parts joined are fn(t) itself (the search keeps a part's exact
    round-to-nearest groups as it keeps the whole's), while the temporaries (~15 bytes a
    value: fp32 groups, codes, the RTN try) are bounded by `values`, not by the tensor.
    OPT-175B's fc2 (604M values) held 8.8 GB of them on the GPU at once."""
    rows = max(1, (values or LOAD_CHUNK) // max(1, t.shape[-1]))
    if t.dim() != 2 or t.shape[0] <= rows:
        return fn(t)
    parts = [fn(t[r:r + rows]) for r in range(0, t.shape[0], rows)]

    def cat(field: str) -> torch.Tensor:
        return torch.cat([getattr(c, field) for c in parts])
    return dataclasses.replace(parts[0], data=cat("data"), mins=cat("mins"),
                               scales=cat("scales"), shape=tuple(t.shape))


class WeightQuantizer:
    """Quantizes a checkpoint's compressible weights at load by the policy's scheme, from
    its cache when the checkpoint was quantized before, into it otherwise.

    stats: a callable giving the synth scheme's activation statistics (name -> (in,)),
    called only on a cache miss; need_bytes: what the cache file will take."""

    def __init__(self, source: str, bits: int, group: int, scheme: str, dtype: torch.dtype,
                 stats=None, need_bytes: int = 0, part: str = ""):
        self.bits, self.group, self.scheme = bits, group, scheme
        self.cache = WeightCache(cache_key(source, bits, group, scheme, dtype, part)
                                 if scheme != "rtn" else None)
        self.hit = self.cache.open_read()
        self.stats, self.need_bytes = stats, need_bytes
        self.seconds = self.stats_seconds = 0.0
        self.count = 0              # tensors searched (not exact under round-to-nearest)
        self.importance = None

    def __call__(self, name: str, t: torch.Tensor) -> Compressed:
        t0 = time.perf_counter()
        c = self.cache.get(name, t.shape, t.dtype) if self.hit else None
        if c is None:
            searched = []

            def one(x: torch.Tensor) -> Compressed:
                c = compress(x, self.bits, self.group, dim=-1)
                # rows round-to-nearest keeps exactly (a Q4 GGUF at its own group) stay so
                if self.scheme != "rtn" and x.dim() == 2 and not torch.equal(decompress(c), x):
                    c = None                    # freed before the search's temporaries
                    c = quantize(x, self.bits, self.group, self.scheme,
                                 self._importance(name))
                    searched.append(True)
                return c
            c = by_rows(t, one)
            if searched:
                if not self.count and not self.hit:
                    self.cache.open_write(self.need_bytes)
                self.count += 1
                self.cache.put(name, c)
        c = c.to(t.device)
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
        self.seconds += time.perf_counter() - t0
        return c

    def _importance(self, name: str) -> torch.Tensor | None:
        """The synth scheme's statistics of `name`'s input (computed at the first need)."""
        if self.scheme != "synth" or self.stats is None:
            return None
        if self.importance is None:
            t0 = time.perf_counter()
            self.importance = self.stats()
            self.stats_seconds = time.perf_counter() - t0
        return self.importance.get(name)

    def finish(self) -> float:
        """Write the cache; the seconds spent quantizing (statistics included), logged when
        a search ran."""
        written = self.cache.commit()
        self.cache.close()
        total = self.seconds + self.stats_seconds
        if self.count and self.scheme != "rtn":
            where = f"; cached in {self.cache.path}" if written else ""
            stats = f" (activation statistics {self.stats_seconds:.1f} s)" \
                if self.stats_seconds else ""
            note(f"weights: {self.scheme} {self.bits}-bit groups of {self.group}: "
                 f"{self.count} tensors in {total:.1f} s{stats}{where}")
        return total


def weight_quantizer(ckpt, policy, device: torch.device, dtype: torch.dtype, shapes: dict,
                     compressible, model, units: range | None = None) -> WeightQuantizer:
    """The load's WeightQuantizer for checkpoint `ckpt` (source, spec, iter_tensors) under
    `policy`: shapes name -> shape of the weights placed, compressible(name, shape), model
    the math object (synth statistics); units: a pipeline stage's share (its own cache)."""
    part = "" if units is None or len(units) == ckpt.spec.num_units else f"units {units}"
    from flexrun.memory.quant import compressed_nbytes
    from flexrun.memory.synth_stats import activation_stats
    b, g = policy.quant_bits, policy.quant_group
    need = sum(compressed_nbytes(s, b, g) for n, s in shapes.items() if compressible(n, s))

    def stats():
        return activation_stats(ckpt.spec, model, ckpt.iter_tensors(lambda n: device), device,
                                dtype, compressible)
    return WeightQuantizer(ckpt.source, b, g, policy.weight_scheme, dtype, stats, need, part)
