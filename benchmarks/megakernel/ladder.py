"""Issue #25's ladder, rungs 1 and 2 (H200): the streaming floor of a whole decode step, and what one
cross-SM hand-off costs. README.md beside this file says what each number means.

    python benchmarks/megakernel/ladder.py --rung 1 --model qwen2.5-0.5b --out rung1.json
    python benchmarks/megakernel/ladder.py --rung 2 --out rung2.json
    python benchmarks/megakernel/ladder.py --dry-run [--compile-check]     # no GPU, no cupy, no torch

Rung 1 (stream_floor.cu): every weight matrix of the step is its own device buffer (random bf16, step
order); a static schedule cuts them into tiles, spreads every op over all SMs balanced by bytes, and
one persistent CTA per SM streams its tiles through a ring of shared-memory pages (cp.async.bulk +
mbarriers; consumers do no arithmetic), or with plain 16-byte loads (ld_floor). Reported per variant:
ms per step (CUDA graph of 20 launches, and plain back-to-back launches), GB/s, % of the copy bandwidth
measured in the same run. Every variant is checked first: bytes seen by the consumers == schedule
bytes, and in the checksum modes the sum of the words read == the host's sum over the buffers.

Rung 2 (handoff.cu): (a) token ring through global counters (ping-pong between two SMs chosen by
%smid, ring over all SMs), (b) op boundaries (fan-in of all CTAs + fan-out), each as the slope of
kernel time over the round count (launch overhead cancels); (c) the dependency chain estimate of
each model's step next to its byte time.

Every spin on the GPU is bounded (error flag after 1 s, checked after each launch) and every host
wait has a deadline (--host-timeout): a broken kernel ends the run with an error, never a hung GPU.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ANCHOR_COPY_GBPS = 4230.0        # shared/anchors/h200-baselines.md: D2D copy, read + written bytes
ANCHOR_KERNEL_HANDOFF_US = 1.09  # same file: one kernel -> kernel hand-off inside a CUDA graph
SPREAD_FLOOR = 1024              # no tile below 1 KB: a norm vector stays one tile on one SM
FORCE_ONE_CTA_SMEM = 116 * 1024  # > half of an SM's 228 KB: two CTAs can never share an SM

MODELS = {
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, inter=4864, vocab=151936,
                         qkv_bias=True),
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, inter=8192, vocab=128256,
                         qkv_bias=False),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, inter=1536, vocab=49152,
                         qkv_bias=False),
}


def log(*a):
    print(*a, flush=True)


# ============================================================================ the step's weights
@dataclass(frozen=True)
class Op:
    name: str
    rows: int
    cols: int

    @property
    def row_bytes(self) -> int:
        return self.cols * 2          # bf16

    @property
    def bytes(self) -> int:
        return self.rows * self.row_bytes


def step_ops(cfg: dict) -> list[Op]:
    """Every weight buffer of one decode step in the order the step reads it (tied lm_head counted once)."""
    H, hd = cfg["hidden"], cfg["head_dim"]
    nqkv = (cfg["heads"] + 2 * cfg["kv_heads"]) * hd
    ops = []
    for l in range(cfg["layers"]):
        ops.append(Op(f"L{l}.attn_norm", 1, H))
        ops.append(Op(f"L{l}.qkv", nqkv, H))
        if cfg["qkv_bias"]:
            ops.append(Op(f"L{l}.qkv_bias", 1, nqkv))
        ops.append(Op(f"L{l}.o_proj", H, cfg["heads"] * hd))
        ops.append(Op(f"L{l}.mlp_norm", 1, H))
        ops.append(Op(f"L{l}.gate_up", 2 * cfg["inter"], H))
        ops.append(Op(f"L{l}.down", H, cfg["inter"]))
    ops.append(Op("final_norm", 1, H))
    ops.append(Op("lm_head", cfg["vocab"], H))
    return ops


def step_bytes(cfg: dict) -> int:
    return sum(op.bytes for op in step_ops(cfg))


# ============================================================================ static schedule
def cut_op(op: Op, tile_max: int, min_tiles: int, tiling: str) -> np.ndarray:
    """Tile edges (bytes, 16-aligned) of one buffer. rows: whole-row blocks (a row longer than tile_max
    is cut into equal K-chunks); flat: equal contiguous chunks (a kernel would need weights packed
    tile-major or split-K across chunk edges). At least min_tiles tiles (all SMs) unless tiles would
    fall below SPREAD_FLOOR bytes."""
    B, R, rb = op.bytes, op.rows, op.row_bytes
    spread = 1 if R == 1 else max(1, min(min_tiles, B // SPREAD_FLOOR))   # a vector is one tile (one SM)
    if tiling == "flat" or R == 1:
        G = B // 16
        n = min(max(spread, -(-B // tile_max)), G)
        return (np.arange(n + 1, dtype=np.int64) * G) // n * 16
    if rb <= tile_max:
        n = min(max(min(spread, R), -(-R // (tile_max // rb))), R)
        return (np.arange(n + 1, dtype=np.int64) * R) // n * rb
    g = rb // 16
    c = min(max(-(-rb // tile_max), -(-spread // R)), g)
    within = (np.arange(c, dtype=np.int64) * g) // c * 16
    edges = (np.arange(R, dtype=np.int64)[:, None] * rb + within[None, :]).ravel()
    return np.append(edges, B)


@dataclass
class Schedule:
    seg_op: np.ndarray      # per tile (SM-major, step order within an SM): buffer index
    seg_off: np.ndarray     # byte offset in the buffer
    seg_bytes: np.ndarray
    seg_flags: np.ndarray   # bit 0: last tile of its page
    sm_seg: np.ndarray      # (n_sm + 1) tile ranges
    page_bytes: np.ndarray  # per page (SM-major)
    sm_page: np.ndarray     # (n_sm + 1) page ranges
    stats: dict


def build_schedule(ops: list[Op], n_sm: int, tile_max: int, page_cap: int, tiling: str, pack: str) -> Schedule:
    """Cut every op into tiles; deal each op's tiles round robin over the SMs sorted by the bytes they
    already hold (every op on all SMs, totals balanced); each SM's list in step order; then group
    consecutive tiles of an SM into ring pages of <= page_cap bytes (pack: none = one tile a page,
    op = tiles of one op share a page, any = any consecutive tiles)."""
    assert tile_max <= page_cap and tile_max % 16 == 0 and page_cap % 16 == 0
    load = np.zeros(n_sm, dtype=np.int64)
    parts_op, parts_off, parts_sz, parts_sm = [], [], [], []
    spread_all = matrices = 0
    for i, op in enumerate(ops):
        edges = cut_op(op, tile_max, n_sm, tiling)
        sz = np.diff(edges)
        order = np.argsort(load, kind="stable")
        sm = order[np.arange(len(sz)) % n_sm]
        load += np.bincount(sm, weights=sz, minlength=n_sm).astype(np.int64)
        parts_op.append(np.full(len(sz), i, dtype=np.int32))
        parts_off.append(edges[:-1])
        parts_sz.append(sz)
        parts_sm.append(sm)
        if op.rows > 1:
            matrices += 1
            spread_all += int(len(np.unique(sm)) == n_sm)
    t_op, t_off, t_sz, t_sm = (np.concatenate(p) for p in (parts_op, parts_off, parts_sz, parts_sm))
    order = np.argsort(t_sm, kind="stable")          # SM-major; the stable sort keeps step order
    t_op, t_off, t_sz, t_sm = t_op[order], t_off[order], t_sz[order], t_sm[order]
    sm_seg = np.searchsorted(t_sm, np.arange(n_sm + 1)).astype(np.int32)
    flags = np.zeros(len(t_sz), dtype=np.uint32)
    pages, sm_page = [], [0]
    szl, opl = t_sz.tolist(), t_op.tolist()
    for s in range(n_sm):
        lo, hi = int(sm_seg[s]), int(sm_seg[s + 1])
        cur, cur_op = 0, -1
        for i in range(lo, hi):
            if cur and (pack == "none" or cur + szl[i] > page_cap or (pack == "op" and opl[i] != cur_op)):
                flags[i - 1] = 1
                pages.append(cur)
                cur = 0
            cur += szl[i]
            cur_op = opl[i]
        if cur:
            flags[hi - 1] = 1
            pages.append(cur)
        sm_page.append(len(pages))
    page_bytes = np.array(pages, dtype=np.uint32)
    total = int(t_sz.sum())
    # self-checks: every buffer covered exactly once, aligned, pages within the ring's page size
    assert total == sum(op.bytes for op in ops)
    for i, op in enumerate(ops):
        m = t_op == i
        o = np.sort(t_off[m])
        s_ = t_sz[m][np.argsort(t_off[m])]
        assert o[0] == 0 and np.all(o[1:] == (o + s_)[:-1]) and o[-1] + s_[-1] == op.bytes, op.name
    assert np.all(t_off % 16 == 0) and np.all(t_sz % 16 == 0) and np.all(t_sz > 0)
    assert int(page_bytes.max()) <= page_cap and int(page_bytes.sum()) == total
    per_sm = np.bincount(t_sm, weights=t_sz, minlength=n_sm)
    stats = dict(total_bytes=total, tiles=len(t_sz), pages=len(pages),
                 tile_bytes_min=int(t_sz.min()), tile_bytes_median=int(np.median(t_sz)), tile_bytes_max=int(t_sz.max()),
                 page_fill=total / (len(pages) * page_cap), pages_per_sm_max=int(np.diff(sm_page).max()),
                 sm_bytes_min=int(per_sm.min()), sm_bytes_max=int(per_sm.max()), sm_imbalance=float(per_sm.max() / per_sm.mean()),
                 matrices_on_all_sms=f"{spread_all}/{matrices}")
    return Schedule(t_op, t_off, t_sz, flags, sm_seg, page_bytes, np.array(sm_page, dtype=np.int32), stats)


# ============================================================================ rung 1 variants
@dataclass(frozen=True)
class Variant:
    kind: str = "tma"        # tma: stream_floor (bulk copies into smem pages); ld: ld_floor (16-B loads)
    page: int = 16384        # ring page bytes (tma) / the tile size bound (ld)
    depth: int = 13          # ring pages
    tile: int = 0            # max tile bytes (0: = page)
    tiling: str = "rows"
    pack: str = "op"
    mode: int = 0            # consumer: 0 none, 1 token word, 2 sum 8 B per 16 B chunk, 3 sum every word
    cwarps: int = 4          # consumer warps (tma) / warps (ld)
    l2hint: int = 0          # tma: L2::cache_hint evict_first on the bulk copies
    unroll: int = 8          # ld: 16-byte loads in flight per lane
    reps: int = 1            # tma: the schedule walked reps times in one launch (time reported per step)

    @property
    def tile_max(self) -> int:
        return self.tile or self.page

    def smem(self) -> int:
        need = 16 * self.depth + 128 + self.depth * self.page if self.kind == "tma" else 0
        return max(need, FORCE_ONE_CTA_SMEM)

    def threads(self) -> int:
        return 32 * (self.cwarps + (1 if self.kind == "tma" else 0))

    def label(self) -> str:
        k = lambda b: f"{b // 1024}K"
        if self.kind == "ld":
            return f"ld   tile{k(self.tile_max):>4} {self.tiling} W{self.cwarps} U{self.unroll} sum16"
        m = {0: "none", 1: "token", 2: "sum8", 3: "sum16"}[self.mode]
        return (f"tma  p{k(self.page):>3}x{self.depth:<2} tile{k(self.tile_max):>4} {self.tiling}/{self.pack} "
                f"C{self.cwarps} {m}{' evict_first' if self.l2hint else ''}{f' x{self.reps} in-kernel' if self.reps > 1 else ''}")


def rung1_variants(quick: bool) -> list[Variant]:
    V = Variant
    ring = [(16384, 13), (16384, 14), (16384, 12), (16384, 8), (16384, 4), (8192, 27), (8192, 24), (8192, 16),
            (32768, 7), (32768, 6), (32768, 4), (65536, 3)]
    if quick:
        ring = [(16384, 13), (8192, 24), (32768, 7)]
    vs = [V(page=p, depth=d) for p, d in ring]
    vs += [V(pack="none"), V(pack="any"), V(tiling="flat"), V(tile=8192), V(tile=4096)]      # tiling / packing
    vs += [V(mode=1), V(mode=2), V(mode=3), V(mode=3, cwarps=8), V(mode=3, cwarps=1)]         # consumer touch
    vs += [V(l2hint=1), V(page=32768, depth=7, l2hint=1)]
    vs += [V(reps=4), V(page=32768, depth=7, reps=4), V(mode=3, reps=4)]                       # no launch ramp
    vs += [V(kind="ld", cwarps=16, unroll=8), V(kind="ld", cwarps=32, unroll=4), V(kind="ld", cwarps=32, unroll=8),
           V(kind="ld", cwarps=16, unroll=8, tiling="flat"), V(kind="ld", cwarps=16, unroll=8, page=65536)]
    if quick:
        vs = [v for v in vs if not (v.kind == "ld" and v.cwarps == 32 and v.unroll == 4)]
    return vs


# ============================================================================ rung 2 (c): chain estimate
def chain_estimates(handoff_us: float, boundary_us: float, copy_gbps: float, source: str) -> list[dict]:
    """Per model: the step's bytes at copy bandwidth vs its dependency chain. Hand-offs per layer:
    5 = qkv -> attention -> o_proj -> gate_up -> down; 6 = + the attention combine; 7 = + rope / q-k
    norm as their own step. Plus 2 after the layers (final norm + lm_head, token selection)."""
    rows = []
    for name, cfg in MODELS.items():
        b = step_bytes(cfg)
        bytes_us = b / (copy_gbps * 1e3)
        for h in (5, 6, 7):
            n = h * cfg["layers"] + 2
            chain_b, chain_a = n * boundary_us, n * handoff_us
            step = max(bytes_us, chain_b)
            rows.append(dict(model=name, MB=b / 1e6, bytes_us=bytes_us, handoffs_per_layer=h, handoffs=n,
                             chain_us_op_boundary=chain_b, chain_us_pairwise=chain_a, bound="bytes" if bytes_us >= chain_b else "chain",
                             predicted_step_us=step, predicted_tok_s=1e6 / step, source=source))
    return rows


def print_estimates(rows: list[dict], handoff_us: float, boundary_us: float, copy_gbps: float, source: str):
    log(f"\n(c) step = max(bytes / copy, chain); {source}: copy {copy_gbps:.0f} GB/s, op boundary "
        f"{boundary_us:.3f} us, pairwise hand-off {handoff_us:.3f} us")
    log(f"  {'model':<14}{'MB':>8}{'bytes us':>10}{'h/layer':>8}{'hand-offs':>10}{'chain us':>10}"
        f"{'(pairwise)':>11}{'bound':>7}{'step us':>9}{'tok/s':>8}")
    for r in rows:
        log(f"  {r['model']:<14}{r['MB']:>8.1f}{r['bytes_us']:>10.1f}{r['handoffs_per_layer']:>8}{r['handoffs']:>10}"
            f"{r['chain_us_op_boundary']:>10.1f}{r['chain_us_pairwise']:>11.1f}{r['bound']:>7}"
            f"{r['predicted_step_us']:>9.1f}{r['predicted_tok_s']:>8.0f}")


# ============================================================================ compile checks (no GPU)
def _nvrtc_lib():
    cands = [os.environ.get("BRAID_NVRTC_LIB", "")]
    for p in sys.path:
        cands += glob.glob(os.path.join(p, "nvidia", "cu13", "lib", "libnvrtc.so.13"))
        cands += glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.1*"))
    for c in cands:
        if c and os.path.exists(c):
            try:
                return ctypes.CDLL(c), c
            except OSError:
                continue
    return None, None


def compile_check() -> dict:
    """nvcc (sm_90a cubin, ptxas report) and, where a libnvrtc is found, NVRTC for sm_90 / sm_90a."""
    out = {}
    nvcc = shutil.which("nvcc")
    for src in ("stream_floor.cu", "handoff.cu"):
        if nvcc:
            with tempfile.TemporaryDirectory() as d:
                cmd = [nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", "-cubin", "-Xptxas", "-v",
                       "-o", os.path.join(d, "x.cubin"), str(HERE / src)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                rep = [l.strip() for l in (p.stdout + p.stderr).splitlines() if "Used" in l or "error" in l or "spill" in l]
                out[f"nvcc {src}"] = dict(rc=p.returncode, report=rep)
                log(f"nvcc  {src}: rc {p.returncode}")
                for l in rep:
                    log(f"      {l}")
        lib, path = _nvrtc_lib()
        if lib is None:
            out[f"nvrtc {src}"] = "no libnvrtc found (set BRAID_NVRTC_LIB)"
            continue
        for arch in ("sm_90", "sm_90a"):
            prog = ctypes.c_void_p()
            code = (HERE / src).read_bytes()
            lib.nvrtcCreateProgram(ctypes.byref(prog), code, src.encode(), 0, None, None)
            opts = [b"-std=c++17", f"-arch={arch}".encode(), b"-ftz=true"]
            rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            n = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
            buf = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetProgramLog(prog, buf)
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
            out[f"nvrtc {arch} {src}"] = dict(rc=rc, log=buf.value.decode(errors="replace").strip())
            log(f"nvrtc {arch} {src}: rc {rc} {buf.value.decode(errors='replace').strip()[:500]}")
    return out


# ============================================================================ dry run (no GPU)
def dry_run(args) -> dict:
    res = dict(mode="dry-run", sms=args.sms, models={}, schedules=[])
    for name in _models(args):
        cfg = MODELS[name]
        ops = step_ops(cfg)
        b = sum(o.bytes for o in ops)
        res["models"][name] = dict(bytes=b, buffers=len(ops), per_layer_bytes=sum(o.bytes for o in ops if o.name.startswith("L0.")),
                                   lm_head_bytes=ops[-1].bytes)
        log(f"{name}: {len(ops)} buffers, {b / 1e6:.1f} MB per step (layer {res['models'][name]['per_layer_bytes'] / 1e6:.2f} MB, "
            f"lm_head {ops[-1].bytes / 1e6:.1f} MB); at {ANCHOR_COPY_GBPS:.0f} GB/s: {b / ANCHOR_COPY_GBPS / 1e3:.1f} us, "
            f"90% target {b / (0.9 * ANCHOR_COPY_GBPS) / 1e3:.1f} us")
        seen = set()
        for v in rung1_variants(args.quick):
            key = (v.tile_max, v.page if v.kind == "tma" else v.tile_max, v.tiling, v.pack if v.kind == "tma" else "none")
            if key in seen:
                continue
            seen.add(key)
            t0 = time.time()
            s = build_schedule(ops, args.sms, v.tile_max, key[1], v.tiling, key[3])
            st = s.stats
            log(f"  schedule tile<={v.tile_max // 1024}K page {key[1] // 1024}K {v.tiling}/{key[3]}: {st['tiles']} tiles "
                f"({st['tile_bytes_min']}-{st['tile_bytes_max']} B, median {st['tile_bytes_median']}), {st['pages']} pages "
                f"(fill {st['page_fill']:.2f}, <= {st['pages_per_sm_max']} per SM), SM bytes {st['sm_bytes_min']}-{st['sm_bytes_max']} "
                f"(max/mean {st['sm_imbalance']:.4f}), matrices on all SMs {st['matrices_on_all_sms']}, {time.time() - t0:.2f} s")
            res["schedules"].append(dict(model=name, tile=v.tile_max, page=key[1], tiling=v.tiling, pack=key[3], **st))
    for v in rung1_variants(args.quick):
        if v.smem() > 232448:
            log(f"  note: {v.label()} needs {v.smem()} B of shared memory (> 227 KB): skipped on the GPU")
    src = "anchors (shared/anchors/h200-baselines.md; the kernel hand-off stands in for both hand-off numbers)"
    est = chain_estimates(ANCHOR_KERNEL_HANDOFF_US, ANCHOR_KERNEL_HANDOFF_US, ANCHOR_COPY_GBPS, src)
    print_estimates(est, ANCHOR_KERNEL_HANDOFF_US, ANCHOR_KERNEL_HANDOFF_US, ANCHOR_COPY_GBPS, src)
    res["estimates"] = est
    res["rung1_variants"] = [dict(asdict(v), label=v.label(), smem=v.smem(), threads=v.threads()) for v in rung1_variants(args.quick)]
    return res


def _models(args) -> list[str]:
    return list(MODELS) if args.model == "all" else [args.model]


# ============================================================================ GPU side
class Gpu:
    """torch for buffers, events and graphs; cupy (NVRTC, or an nvcc cubin) for the kernels, launched
    on torch's current stream as braid_backend/kernels/cupy_layer.py does."""

    def __init__(self, args, out: dict):
        import cupy
        import torch

        self.torch, self.cupy, self.args, self.out = torch, cupy, args, out
        self.dev, self.device = 0, "cuda"
        torch.cuda.set_device(self.dev)
        props = cupy.cuda.runtime.getDeviceProperties(self.dev)
        self.n_sm = int(props["multiProcessorCount"])
        self.smem_optin = int(props.get("sharedMemPerBlockOptin", 232448))
        self._streams = {}
        self.info = dict(gpu=torch.cuda.get_device_name(self.dev), sms=self.n_sm, smem_optin=self.smem_optin,
                         l2_bytes=int(props.get("l2CacheSize", 0)), cc=torch.cuda.get_device_capability(self.dev),
                         driver=cupy.cuda.runtime.driverGetVersion(), cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                         torch=torch.__version__, torch_cuda=torch.version.cuda, cupy=cupy.__version__,
                         numpy=np.__version__, python=platform.python_version())
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
            self.info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                                     capture_output=True, text=True, timeout=15).stdout.strip()
        except Exception as e:
            self.info["nvidia_smi"] = f"unavailable: {e}"
        log(f"GPU: {self.info}")

    # ------------------------------------------------------------------ compile / launch
    def module(self, src: str, defines: dict | None = None):
        code = "".join(f"#define {k} {v}\n" for k, v in (defines or {}).items()) + (HERE / src).read_text()
        first = "stream_floor" if src.startswith("stream") else "chain"
        if self.args.compiler in ("auto", "nvrtc"):
            try:
                mod = self.cupy.RawModule(code=code, options=("-std=c++17",))   # CuPy adds -arch=sm_90 itself
                mod.get_function(first)
                self.out.setdefault("compiled", {})[f"{src} {defines or ''}"] = "nvrtc (cupy default arch)"
                return mod
            except Exception as e:
                log(f"NVRTC rejected {src} ({type(e).__name__}: {str(e)[:800]}); trying nvcc")
                if self.args.compiler == "nvrtc":
                    raise
        d = tempfile.mkdtemp()
        cu, cubin = os.path.join(d, "k.cu"), os.path.join(d, "k.cubin")
        Path(cu).write_text(code)
        cmd = ["nvcc", "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", "-cubin", "-o", cubin, cu]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        self.out.setdefault("compiled", {})[f"{src} {defines or ''}"] = "nvcc sm_90a cubin"
        return self.cupy.RawModule(path=cubin)

    def _stream(self):
        ptr = self.torch.cuda.current_stream().cuda_stream
        st = self._streams.get(ptr)
        if st is None:
            st = self._streams[ptr] = self.cupy.cuda.ExternalStream(ptr, self.dev)
        return st

    def launch(self, fn, grid, block, args, smem):
        with self.cupy.cuda.Device(self.dev), self._stream():
            fn((grid,), (block,), args, shared_mem=smem)

    @staticmethod
    def set_smem(fn, smem):
        fn.max_dynamic_shared_size_bytes = smem

    # ------------------------------------------------------------------ waiting and timing
    def wait(self, what="GPU work"):
        """Host-side deadline on everything queued so far: a spin that never ends cannot hang the run."""
        ev = self.torch.cuda.Event()
        ev.record()
        t0 = time.time()
        while not ev.query():
            if time.time() - t0 > self.args.host_timeout:
                msg = f"{what} did not finish within {self.args.host_timeout} s (a kernel spin did not end): exiting"
                log("FATAL: " + msg)
                self.out.setdefault("errors", []).append(msg)
                write_json(self.args.out, self.out)
                os._exit(3)
            time.sleep(0.0002)

    def events_ms(self, fn, n: int) -> float:
        E = self.torch.cuda.Event
        a, b = E(enable_timing=True), E(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        self.wait("timed launches")
        return a.elapsed_time(b) / n

    def graph_ms(self, fn, per_graph: int, replays: int) -> float:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.wait("graph warm-up")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(per_graph):
                fn()
        g.replay()
        self.wait("graph replay")
        ms = self.events_ms(g.replay, replays) / per_graph
        del g
        return ms

    def copy_bandwidth(self) -> dict:
        """D2D copy of a 2 GiB buffer ((read + written) / time, like the anchors) and a read-only sum."""
        torch = self.torch
        n = 1 << 30
        src = torch.ones(n, dtype=torch.bfloat16, device=self.device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        copy_ms = min(self.events_ms(lambda: dst.copy_(src), 10) for _ in range(3))
        for _ in range(2):
            src.sum()
        read_ms = min(self.events_ms(lambda: src.sum(), 10) for _ in range(3))
        del src, dst
        torch.cuda.empty_cache()
        r = dict(copy_GBps=2 * 2 * n / copy_ms / 1e6, read_GBps=2 * n / read_ms / 1e6, buffer_bytes=2 * n)
        log(f"copy floor: D2D copy {r['copy_GBps']:.0f} GB/s (read + written), read-only sum {r['read_GBps']:.0f} GB/s")
        return r

    def u64(self, t) -> np.ndarray:
        return t.cpu().numpy().view(np.uint64)


def write_json(path, obj):
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    os.replace(tmp, path)


# ============================================================================ rung 1 on the GPU
def rung1(gpu: Gpu, args, out: dict):
    torch = gpu.torch
    copy = gpu.copy_bandwidth()
    out["copy"] = copy
    mod_tma = gpu.module("stream_floor.cu")
    ld_mods = {}
    out["rung1"] = []
    t_start = time.time()
    for name in _models(args):
        cfg = MODELS[name]
        ops = step_ops(cfg)
        torch.manual_seed(0)
        bufs = [torch.randn(op.rows * op.cols, dtype=torch.bfloat16, device=gpu.device) for op in ops]   # step order
        base = np.array([b.data_ptr() for b in bufs], dtype=np.uint64)
        assert np.all(base % 16 == 0)
        ref8 = ref16 = 0
        for b in bufs:     # host reference checksums: u32 words of every 16-byte chunk, as the kernels sum them
            w = b.view(torch.int32).view(-1, 4).to(torch.int64) & 0xFFFFFFFF
            ref8 += int(w[:, :2].sum())
            ref16 += int(w.sum())
            del w
        total = sum(op.bytes for op in ops)
        log(f"\n== rung 1, {name}: {len(bufs)} buffers, {total / 1e6:.1f} MB per step; at copy bandwidth "
            f"{total / copy['copy_GBps'] / 1e3:.1f} us, 90% target {total / (0.9 * copy['copy_GBps']) / 1e3:.1f} us")
        stats = torch.zeros(4 * gpu.n_sm, dtype=torch.int64, device=gpu.device)
        err = torch.zeros(4, dtype=torch.int32, device=gpu.device)
        sched_cache = {}
        for v in rung1_variants(args.quick):
            if time.time() - t_start > args.budget:
                log(f"  budget of {args.budget} s spent: skipping {v.label()}")
                out.setdefault("skipped", []).append(f"{name} {v.label()}")
                continue
            rec = dict(model=name, label=v.label(), **asdict(v), smem=v.smem(), threads=v.threads())
            if v.smem() > gpu.smem_optin:
                rec["skipped"] = f"needs {v.smem()} B shared memory > {gpu.smem_optin}"
                out["rung1"].append(rec)
                log(f"  {v.label():<48}: skipped ({rec['skipped']})")
                continue
            page = v.page if v.kind == "tma" else v.tile_max
            key = (v.tile_max, page, v.tiling, v.pack if v.kind == "tma" else "none")
            if key not in sched_cache:
                sched_cache[key] = build_schedule(ops, gpu.n_sm, v.tile_max, page, v.tiling, key[3])
            s = sched_cache[key]
            rec["schedule"] = s.stats
            if v.kind == "tma" or v.cwarps == 16:
                st_ = s.stats
                log(f"    schedule: {st_['tiles']} tiles of {st_['tile_bytes_min']}-{st_['tile_bytes_max']} B in {st_['pages']} "
                    f"pages (fill {st_['page_fill']:.2f}), SM bytes max/mean {st_['sm_imbalance']:.4f}")
            addr = base[s.seg_op] + s.seg_off.astype(np.uint64)
            segs = np.stack([(addr & 0xFFFFFFFF).astype(np.uint32), (addr >> 32).astype(np.uint32),
                             s.seg_bytes.astype(np.uint32), s.seg_flags], axis=1)
            d_segs = torch.from_numpy(segs.view(np.int32).copy()).to(gpu.device)
            d_smseg = torch.from_numpy(s.sm_seg.copy()).to(gpu.device)
            d_pages = torch.from_numpy(s.page_bytes.view(np.int32).copy()).to(gpu.device)
            d_smpage = torch.from_numpy(s.sm_page.copy()).to(gpu.device)
            P = lambda t: np.uint64(t.data_ptr())
            if v.kind == "tma":
                fn = mod_tma.get_function("stream_floor")
                kargs = (P(d_segs), P(d_smseg), P(d_pages), P(d_smpage), np.uint32(v.page), np.uint32(v.depth),
                         np.int32(v.mode), np.int32(v.l2hint), np.int32(v.reps), P(stats), P(err))
            else:
                if v.unroll not in ld_mods:
                    ld_mods[v.unroll] = gpu.module("stream_floor.cu", {"LD_UNROLL": v.unroll})
                fn = ld_mods[v.unroll].get_function("ld_floor")
                kargs = (P(d_segs), P(d_smseg), P(stats))
            gpu.set_smem(fn, v.smem())
            go = lambda: gpu.launch(fn, gpu.n_sm, v.threads(), kargs, v.smem())
            # correctness first: one launch, every byte accounted for, checksums where the consumers sum
            stats.zero_()
            err.zero_()
            go()
            gpu.wait(f"{v.label()} check launch")
            e = err.cpu().tolist()
            st = gpu.u64(stats).reshape(gpu.n_sm, 4)
            reps = v.reps if v.kind == "tma" else 1
            seen = int(sum(int(x) for x in st[:, 0]))
            csum = int(sum(int(x) for x in st[:, 1])) & 0xFFFFFFFFFFFFFFFF
            want = {2: ref8, 3: ref16}.get(v.mode) if v.kind == "tma" else ref16
            want = None if want is None else want * reps
            rec.update(err=e, bytes_seen=seen, bytes_ok=seen == total * reps, distinct_sms=len(set(st[:, 3].tolist())),
                       checksum=csum if want is not None else None, checksum_want=want,
                       checksum_ok=None if want is None else csum == (want & 0xFFFFFFFFFFFFFFFF))
            if e[0] or not rec["bytes_ok"] or rec["checksum_ok"] is False:
                rec["failed"] = True
                log(f"  {v.label():<48}: FAILED err {e} bytes {seen}/{total * reps} checksum {rec['checksum_ok']}")
                out["rung1"].append(rec)
                write_json(args.out, out)
                continue
            ms_ev = min(gpu.events_ms(go, args.launches) for _ in range(2)) / reps        # per step
            ms_gr = min(gpu.graph_ms(go, 20, args.replays) for _ in range(2)) / reps
            e2 = err.cpu().tolist()
            gbps = total / ms_gr / 1e6
            rec.update(ms_events=ms_ev, ms_graph=ms_gr, GBps=gbps, pct_copy=100 * gbps / copy["copy_GBps"],
                       pct_read=100 * gbps / copy["read_GBps"], err_after_timing=e2)
            ck = "" if rec["checksum_ok"] is None else ", checksum ok"
            log(f"  {v.label():<48}: {ms_gr * 1e3:7.1f} us/step (plain launches {ms_ev * 1e3:7.1f}) {gbps:6.0f} GB/s "
                f"{rec['pct_copy']:5.1f}% of copy  [bytes ok{ck}, {rec['distinct_sms']} SMs, fill {s.stats['page_fill']:.2f}"
                f"{', ERR ' + str(e2) if e2[0] else ''}]")
            if reps > 1:       # launch + ramp + tail of one launch: the same config at reps = 1 minus this rate
                one = [r for r in out["rung1"] if r["model"] == name and "ms_graph" in r and r["label"] == v.label().split(" x")[0]]
                if one:
                    rec["launch_ramp_us"] = (one[0]["ms_graph"] - ms_gr) * 1e3
                    log(f"    -> per launch, start-up + ramp + tail cost {rec['launch_ramp_us']:.1f} us over the steady stream")
            out["rung1"].append(rec)
            write_json(args.out, out)
            del d_segs, d_smseg, d_pages, d_smpage
        ok = [r for r in out["rung1"] if r["model"] == name and "GBps" in r and r.get("reps", 1) == 1]
        if ok:
            best = max(ok, key=lambda r: r["GBps"])
            verdict = "MET" if best["pct_copy"] >= 90 else "MISSED"
            log(f"  best: {best['label']}: {best['ms_graph'] * 1e3:.1f} us, {best['pct_copy']:.1f}% of copy -> "
                f">= 90% target {verdict}")
            out.setdefault("rung1_best", {})[name] = dict(label=best["label"], us=best["ms_graph"] * 1e3,
                                                         pct_copy=best["pct_copy"], target_met=verdict == "MET")
        del bufs
        torch.cuda.empty_cache()


# ============================================================================ rung 2 on the GPU
def rung2(gpu: Gpu, args, out: dict):
    torch = gpu.torch
    copy = gpu.copy_bandwidth()
    out["copy"] = copy
    mod = gpu.module("handoff.cu")
    f_chain, f_fan = mod.get_function("chain"), mod.get_function("fanin")
    smem = FORCE_ONE_CTA_SMEM
    for f in (f_chain, f_fan):
        gpu.set_smem(f, smem)
    n = gpu.n_sm
    threads = 256
    T = lambda *shape, dt=torch.int32: torch.zeros(*shape, dtype=dt, device=gpu.device)
    P = lambda t: np.uint64(t.data_ptr())
    ctr, gen, claims, smids, err = T(32 * n), T(8), T(n), T(n), T(4)
    cnt, flag = T(32), T(32)
    pos_of = T(1024)

    def reset():
        for t in (ctr, gen, claims, err, cnt, flag):
            t.zero_()

    # probe: which SM each CTA lands on (one CTA per SM, forced by the shared memory size)
    pos_of.fill_(-1)
    reset()
    gpu.launch(f_chain, n, threads, (P(pos_of), np.int32(0), np.int32(2), np.int32(2), np.int32(0), np.int32(0),
                                     P(ctr), P(gen), P(claims), P(smids), P(err)), smem)
    gpu.wait("smid probe")
    sm_list = sorted(set(smids.cpu().tolist()))
    log(f"\n== rung 2: {n} CTAs of {threads} threads on {len(sm_list)} distinct SMs (smid {sm_list[0]}..{sm_list[-1]})")
    out["rung2"] = dict(distinct_sms=len(sm_list), smids=sm_list, chain=[], fanin=[])
    if len(sm_list) != n:
        out.setdefault("errors", []).append("CTAs did not land one per SM: results below are suspect")

    def run_chain(label, table, by_smid, ring, full, poll, r1, r2):
        res = dict(label=label, ring=ring, by_smid=by_smid, full_cta=full, poll=poll, rounds=(r1, r2))
        pos_of.fill_(-1)
        pos_of[: len(table)] = torch.tensor(table, dtype=torch.int32, device=gpu.device)
        times = {}
        for R in (r1, r2):
            reset()
            kargs = (P(pos_of), np.int32(by_smid), np.int32(ring), np.int32(R), np.int32(full), np.int32(poll),
                     P(ctr), P(gen), P(claims), P(smids), P(err))
            go = lambda: gpu.launch(f_chain, n, threads, kargs, smem)
            go()
            gpu.wait(label)
            launches = 1 + args.chain_launches
            times[R] = gpu.events_ms(go, args.chain_launches)
            e, c = err.cpu().tolist(), claims.cpu().tolist()
            played = [x for x in c if x]
            if e[0] or len(played) != ring or any(x != launches for x in played) or int(gen[0]) != launches:
                res.update(failed=True, err=e, claims=played, gen=int(gen[0]))
                log(f"  {label:<44}: FAILED err {e}, claims {sorted(set(played))}, gen {int(gen[0])}/{launches}")
                return res
        us = (times[r2] - times[r1]) * 1e3 / ((r2 - r1) * ring)
        res.update(ms=times, us_per_handoff=us, us_per_round=us * ring)
        log(f"  {label:<44}: {us:6.3f} us per hand-off ({us * ring:8.2f} us per round of {ring})")
        return res

    def run_fan(label, mode, full, poll, r1, r2):
        res = dict(label=label, mode=mode, full_cta=full, poll=poll, rounds=(r1, r2))
        times = {}
        for R in (r1, r2):
            reset()
            kargs = (np.int32(R), np.int32(mode), np.int32(full), np.int32(poll), P(cnt), P(flag), P(gen), P(err))
            go = lambda: gpu.launch(f_fan, n, threads, kargs, smem)
            go()
            gpu.wait(label)
            times[R] = gpu.events_ms(go, args.chain_launches)
            e = err.cpu().tolist()
            if e[0] or int(gen[0]) != 1 + args.chain_launches:
                res.update(failed=True, err=e, gen=int(gen[0]))
                log(f"  {label:<44}: FAILED err {e}, gen {int(gen[0])}")
                return res
        us = (times[r2] - times[r1]) * 1e3 / (r2 - r1)
        res.update(ms=times, us_per_boundary=us)
        log(f"  {label:<44}: {us:6.3f} us per op boundary")
        return res

    # (a) ping-pong between SM sm_list[0] and a partner further down the smid list; then rings
    log("(a) hand-off through a global counter (thread 0 spins with ld.acquire.gpu, releases with red.release.gpu)")
    s0 = sm_list[0]
    for j in [1, 2, 4, 8, 16, 33, 66, 100, len(sm_list) - 1]:
        if j >= len(sm_list):
            continue
        t = [-1] * 1024
        t[s0], t[sm_list[j]] = 0, 1
        out["rung2"]["chain"].append(run_chain(f"ping-pong smid {s0} <-> {sm_list[j]}", t, 1, 2, 0, 0, 500, 2500))
    t = [-1] * 1024
    t[s0], t[sm_list[len(sm_list) // 2]] = 0, 1
    mid = sm_list[len(sm_list) // 2]
    out["rung2"]["chain"].append(run_chain(f"ping-pong smid {s0} <-> {mid} full CTA", t, 1, 2, 1, 0, 500, 2500))
    out["rung2"]["chain"].append(run_chain(f"ping-pong smid {s0} <-> {mid} relaxed+fence", t, 1, 2, 0, 1, 500, 2500))
    ring_b = list(range(n))
    out["rung2"]["chain"].append(run_chain(f"ring of {n} CTAs (blockIdx order)", ring_b, 0, n, 0, 0, 20, 100))
    out["rung2"]["chain"].append(run_chain(f"ring of {n} CTAs (blockIdx order) full CTA", ring_b, 0, n, 1, 0, 20, 100))
    out["rung2"]["chain"].append(run_chain(f"ring of {n} CTAs relaxed+fence", ring_b, 0, n, 0, 1, 20, 100))
    t = [-1] * 1024
    for i, s in enumerate(sm_list):
        t[s] = i
    out["rung2"]["chain"].append(run_chain(f"ring of {len(sm_list)} SMs (smid order)", t, 1, len(sm_list), 0, 0, 20, 100))

    # (b) op boundaries: all CTAs arrive, all wait
    log(f"(b) op boundary over {n} CTAs (mode 0: CTA 0 polls the count, releases a flag; 1: all poll the count; "
        f"2: the last arriver releases the flag)")
    for mode in (0, 1, 2):
        for full in (0, 1):
            out["rung2"]["fanin"].append(run_fan(f"fan-in mode {mode}{' full CTA' if full else ''}", mode, full, 0, 200, 1000))
    out["rung2"]["fanin"].append(run_fan("fan-in mode 0 relaxed+fence", 0, 0, 1, 200, 1000))

    # epochs in a CUDA graph: 10 captured launches replayed 3 times must run without any reset
    reset()
    kargs = (np.int32(50), np.int32(0), np.int32(1), np.int32(0), P(cnt), P(flag), P(gen), P(err))
    go = lambda: gpu.launch(f_fan, n, threads, kargs, smem)
    gpu.graph_ms(go, 10, 3)       # launches run: 1 warm-up, then the graph (capture runs nothing) 1 + 3 times
    g_val, e = int(gen[0]), err.cpu().tolist()
    out["rung2"]["graph_epoch_check"] = dict(gen=g_val, want=1 + 10 * 4, err=e, ok=g_val == 41 and not e[0])
    log(f"  graph replay epoch check: gen {g_val} (want 41), err {e}: {'ok' if g_val == 41 and not e[0] else 'FAILED'}")
    write_json(args.out, out)

    # (c) the chain estimate, measured numbers
    good_a = [r for r in out["rung2"]["chain"] if "us_per_handoff" in r and r["label"].startswith("ping-pong") and "full" not in r["label"]]
    good_b = [r for r in out["rung2"]["fanin"] if "us_per_boundary" in r]
    if good_a and good_b:
        hand = float(np.median([r["us_per_handoff"] for r in good_a]))
        full_b = [r["us_per_boundary"] for r in good_b if r["full_cta"]]
        bnd = min(full_b) if full_b else min(r["us_per_boundary"] for r in good_b)
        src = ("measured: pairwise = median ping-pong hand-off, op boundary = best full-CTA fan-in mode, "
               "copy = this run's D2D copy")
        est = chain_estimates(hand, bnd, copy["copy_GBps"], src)
        print_estimates(est, hand, bnd, copy["copy_GBps"], src)
        out["rung2"]["estimates"] = est
        log(f"  (for scale: a kernel-to-kernel hand-off in a CUDA graph is {ANCHOR_KERNEL_HANDOFF_US} us on this card, anchors)")


# ============================================================================ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rung", type=int, choices=(1, 2), default=1)
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=list(MODELS) + ["all"])
    ap.add_argument("--out", default=None, help="JSON with every number (written as the run goes)")
    ap.add_argument("--dry-run", action="store_true", help="schedules, byte counts, chain estimates from anchors; no GPU")
    ap.add_argument("--compile-check", action="store_true", help="nvcc sm_90a + NVRTC (if libnvrtc is found) on both .cu")
    ap.add_argument("--sms", type=int, default=132, help="SM count for --dry-run")
    ap.add_argument("--quick", action="store_true", help="fewer rung-1 variants")
    ap.add_argument("--compiler", choices=("auto", "nvrtc", "nvcc"), default="auto")
    ap.add_argument("--launches", type=int, default=30, help="rung 1: plain back-to-back launches per timing")
    ap.add_argument("--replays", type=int, default=10, help="rung 1: replays of the 20-launch graph per timing")
    ap.add_argument("--chain-launches", type=int, default=4, help="rung 2: launches per timing")
    ap.add_argument("--budget", type=float, default=140.0, help="rung 1: seconds after which variants are skipped")
    ap.add_argument("--host-timeout", type=float, default=30.0, help="seconds any GPU wait may take before exiting")
    args = ap.parse_args()
    t0 = time.time()
    out = dict(rung=args.rung, args=vars(args), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.dry_run or args.compile_check:
        if args.compile_check:
            out["compile_check"] = compile_check()
        if args.dry_run:
            out["dry_run"] = dry_run(args)
        write_json(args.out, out)
        log(f"done in {time.time() - t0:.1f} s")
        return
    gpu = Gpu(args, out)
    out["info"] = gpu.info
    if args.rung == 1:
        rung1(gpu, args, out)
    else:
        rung2(gpu, args, out)
    out["seconds"] = time.time() - t0
    write_json(args.out, out)
    log(f"done in {out['seconds']:.1f} s{' -> ' + args.out if args.out else ''}")


if __name__ == "__main__":
    main()
