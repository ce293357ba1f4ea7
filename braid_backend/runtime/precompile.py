"""Compile a decode body's Triton kernels in parallel before its first real run (cold start, issue #13).

With an empty Triton cache the first capture of a decode graph compiles ~15-20 kernel variants one
after another (~0.3 s each); threads do not help, the compiler holds the GIL (benchmarks/NOTES.md,
"Cold start"). So:
  1. dry run: the body runs with every launch replaced by the launcher's `warmup` (kernels/_common.py
     `launch` inside `dry_launches()`), and Triton's `jit_cache_hook` records each variant that would
     compile (kernel, signature, constexprs, attrs, parsed options, target) and answers True, so
     nothing compiles. Variants already compiled in this process never reach the hook (nothing to do).
  2. the recorded variants compile in forked worker processes (fork: they inherit the imported modules
     and the kernels' JITFunction objects; they never touch CUDA, which the parent has initialised),
     each writing Triton's on-disk cache (TRITON_CACHE_DIR) exactly as the launch path would: the same
     `ASTSource(fn, signature, constexprs, attrs)` and `compile(src, target, options.__dict__)` as
     JITFunction._do_compile, with the options rebuilt the way JITFunction.preload does.
  3. the caller's normal warm-up then finds every variant in the on-disk cache and only loads it.
Anything that goes wrong (no hook in this Triton, no fork, a worker error or timeout) is logged and
reported in the summary; the normal path then compiles what is missing, as before.

Written against Triton 3.6-3.9 (the hook's keyword arguments and `device_caches` layout are the same
there; 3.6's specialization_data has no target, so the target comes from the kernel's device cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from ..kernels._common import HAS_TRITON, dry_launches, interpret_mode

log = logging.getLogger("braid_backend")

MAX_WORKERS = 16
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant to compile: what JITFunction._do_compile hands to triton.compile."""
    fn: object              # the JITFunction
    signature: dict         # arg name -> type string ("*bf16", "i32", "constexpr", ...)
    constexprs: dict        # arg path (tuple) -> value
    attrs: dict             # arg path (tuple) -> [["tt.divisibility", 16], ...]
    target: object          # triton.backends.compiler.GPUTarget
    options: dict           # the backend's parsed options, as a dict (options.__dict__)
    key: str = ""           # the jit_cache_hook's specialisation key (str(specialisation) + str(launch options))

    @property
    def name(self) -> str:
        fn = getattr(self.fn, "fn", None)
        return getattr(fn, "__qualname__", None) or repr(self.fn)

    def ident(self) -> str:
        """Equal for two specs that compile to the same cache entry (for deduplication)."""
        return json.dumps([f"{getattr(self.fn, 'module', '')}:{self.name}", self.signature,
                           sorted((repr(k), repr(v)) for k, v in self.constexprs.items()),
                           sorted((repr(k), repr(v)) for k, v in self.attrs.items()),
                           repr(self.target), self.options], sort_keys=True, default=repr)


def compile_spec(spec: KernelSpec) -> str:
    """Compile one variant into Triton's on-disk cache (a cache hit if it is there), then its launcher
    where this Triton builds one per kernel (see build_launcher). No CUDA call: the target is given, and
    the compiled kernel is not loaded onto a device (that happens at first launch). Returns what
    build_launcher returns."""
    from triton.compiler import ASTSource, compile as triton_compile

    src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    kernel = triton_compile(src, target=spec.target, options=dict(spec.options))
    return build_launcher(kernel)


def _launcher_builds_a_module(cls) -> bool:
    """Whether this driver's launcher class compiles a C module in its constructor (Triton <= 3.6:
    CudaLauncher.__init__ calls compile_module_from_src; 3.7+ use one generic launcher, nothing to build)."""
    code = getattr(getattr(cls, "__init__", None), "__code__", None)
    return code is not None and "compile_module_from_src" in code.co_names


def build_launcher(kernel) -> str:
    """Triton 3.6 builds a C launcher per kernel signature (`__triton_launcher.so`, gcc, ~0.3 s) when a
    compiled kernel is first loaded, in the launching process, one after another, and keeps it in the
    on-disk cache under a hash of its source. That is what the H100 run found written after the
    precompile (6 files = 6 distinct signatures of the 11 variants: a variant writes 8 files). Built here,
    in the worker, by the driver's own launcher class on the compiled kernel (what
    CompiledKernel._init_handles does, without the device part), the parent's first load finds it on
    disk. Returns "built", "" (this Triton has nothing to build, or the driver says nothing) or an error
    message; an error costs only time (the parent builds it at first load, as before)."""
    try:
        from triton.runtime.driver import driver

        cls = driver.active.launcher_cls
    except Exception:
        return ""
    if not _launcher_builds_a_module(cls):
        return ""
    try:
        cls(kernel.src, kernel.metadata)
        return "built"
    except Exception as e:
        return f"launcher not built ({type(e).__name__}: {e})"[:300]


def cached_on_disk(spec: KernelSpec) -> bool:
    """Whether triton.compile would find this variant in the on-disk cache: its own hit test, with the
    names of its own module (Triton 3.6-3.9). Run in the parent before forking, which also computes
    once what every worker would otherwise compute again (Triton's own source/library hash, ~0.5 s,
    the ptxas version, the kernels' source hashes) and leaves it to them in memory. Anything
    unexpected answers False: the worker then compiles (or loads) it as usual."""
    try:
        from triton.compiler import compiler as cc

        if cc.knobs.compilation.always_compile:
            return False
        src = cc.ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
        backend = cc.make_backend(spec.target)
        options = backend.parse_options(dict(spec.options, **src.parse_options()))
        key = cc.get_cache_key(src, backend, options, env_vars=cc.get_cache_invalidating_env_vars())
        group = cc.get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
        return group.get_group(f"{src.name[:150]}.json") is not None
    except Exception:
        return False


def _jit_runtime_knobs():
    """triton.knobs.runtime if it has the jit_cache_hook (Triton 3.4+), else None."""
    try:
        from triton import knobs
    except Exception:
        return None
    rt = getattr(knobs, "runtime", None)
    return rt if rt is not None and hasattr(rt, "jit_cache_hook") else None


def spec_from_hook(jit_fn, info: dict, key=None) -> KernelSpec:
    """The KernelSpec of a jit_cache_hook call (`fn.jit_function`, `compile=info`).

    Options: the hook gets them only serialised (specialization_data), so they are parsed back the way
    JITFunction.preload does (lists -> tuples, then the backend's parse_options) and required to
    serialise identically, or the variant is refused (its cache key could differ). The target (absent
    from 3.6's specialization_data) and the backend are the kernel's own, from its device cache."""
    device = info["device"]
    _, _, target, backend, _ = jit_fn.device_caches[device]
    data = json.loads(info["specialization_data"])
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    parsed = backend.parse_options(opts)
    if json.dumps(parsed.__dict__, sort_keys=True, default=repr) != json.dumps(data["options"], sort_keys=True,
                                                                             default=repr):
        raise RuntimeError("options do not survive parse_options unchanged")
    return KernelSpec(jit_fn, dict(info["signature"]), dict(info["constants"]), dict(info["configs"][0]),
                      target, dict(parsed.__dict__), "" if key is None else str(key))


class Recorder:
    """jit_cache_hook for a dry run: records the variants of its own thread's launches and returns True
    (do not compile). Another thread compiling meanwhile goes to the hook that was there before (or
    compiles as usual): its kernels must not be skipped.

    Answering True leaves Triton's in-memory cache empty, so every launch of a variant comes back here
    (a decode step launches the same few variants ~170 times): a variant is recorded, or fails, once
    per (kernel, device, hook key), the identity of Triton's own in-memory cache (`kernel_cache[key]`
    of the device), skipping spec_from_hook's option parsing for the repeats (a key of None, or one
    that cannot be hashed, is recorded every time, as before)."""

    def __init__(self, previous=None):
        self.thread = threading.get_ident()
        self.previous = previous
        self.specs: list[KernelSpec] = []
        self.errors: list[str] = []
        self.seen: dict = {}   # (id(kernel), device, key) -> kernel (kept alive: its id stays unique)

    def __call__(self, *, fn, compile, **kw):
        if threading.get_ident() != self.thread:
            return self.previous(fn=fn, compile=compile, **kw) if self.previous is not None else None
        key, jit_fn = kw.get("key"), getattr(fn, "jit_function", None)
        if key is not None:
            once = (id(jit_fn), compile.get("device") if isinstance(compile, dict) else None, key)
            try:
                if once in self.seen:
                    return True
                self.seen[once] = jit_fn
            except TypeError:   # an unhashable key: recorded every time
                pass
        try:
            self.specs.append(spec_from_hook(jit_fn, compile, key))
        except Exception as e:   # this variant compiles at its real launch instead
            self.errors.append(f"{getattr(fn, 'name', fn)}: not recorded ({type(e).__name__}: {e})")
        return True


def record(body: Callable[[], object]) -> Recorder:
    """Run body() with launches dry and the recorder as jit_cache_hook (restored after)."""
    rt = _jit_runtime_knobs()
    if rt is None:
        raise RuntimeError("this Triton has no knobs.runtime.jit_cache_hook")
    rec = Recorder(rt.jit_cache_hook)
    rt.jit_cache_hook = rec
    try:
        with dry_launches():
            body()
    finally:
        rt.jit_cache_hook = rec.previous
    return rec


def _worker(jobs: list, conn, compile_fn) -> None:
    """In a forked child: compile each (index, spec), reporting (index, error or None, seconds, what
    compile_fn returned: build_launcher's answer for compile_spec)."""
    for i, spec in jobs:
        t0 = time.perf_counter()
        note = None
        try:
            note = compile_fn(spec)
            err = None
        except BaseException as e:   # reported, never raised: the parent decides
            err = f"{type(e).__name__}: {e}"[:500]
        conn.send((i, err, time.perf_counter() - t0, note if isinstance(note, str) else ""))
    conn.close()


def compile_parallel(specs: list[KernelSpec], workers: int, timeout: float = DEFAULT_TIMEOUT_S,
                     compile_fn: Callable[[KernelSpec], None] | None = None) -> dict:
    """Compile specs in `workers` forked processes (round-robin). Returns {"compiled": n, "failed":
    [messages], "worker_s": [seconds per spec that compiled], "launchers": n built (build_launcher),
    "launcher_errors": [messages]}. Workers still running after `timeout`
    seconds are killed and their unfinished specs reported as failed; nothing raises or hangs.
    compile_fn: compile_spec by default (looked up at call time)."""
    compile_fn = compile_fn or compile_spec
    ctx = mp.get_context("fork")
    workers = max(1, min(workers, len(specs)))
    jobs = [[(i, s) for i, s in enumerate(specs) if i % workers == w] for w in range(workers)]
    procs, conns, done = [], {}, {}
    with warnings.catch_warnings():
        # Python 3.12+ warns that fork in a multi-threaded process may deadlock the child: the child
        # only compiles (no lock of the parent's other threads is needed), and the timeout bounds it.
        warnings.simplefilter("ignore", DeprecationWarning)
        for w in range(workers):
            r, wr = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(jobs[w], wr, compile_fn), daemon=True,
                            name=f"braid-precompile-{w}")
            p.start()
            wr.close()   # now, before the next fork: the parent must not keep (or pass on) a write end
            procs.append(p)
            conns[r] = w
    deadline = time.monotonic() + timeout
    while conns:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for r in mp.connection.wait(list(conns), timeout=left):
            try:
                i, err, dt, note = r.recv()
                done[i] = (err, dt, note)
            except (EOFError, OSError):   # the worker exited (all sent) or died
                del conns[r]
                r.close()
    killed = {w for w in conns.values() if procs[w].is_alive()}   # still at it after the deadline
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    for r in conns:
        r.close()
    failed = []
    for i, s in enumerate(specs):
        w = i % workers
        if i not in done:
            failed.append(f"{s.name}: " + (f"not compiled within {timeout:g} s (worker killed)" if w in killed
                                           else f"worker exited ({procs[w].exitcode}) before reporting it"))
        elif done[i][0] is not None:
            failed.append(f"{s.name}: {done[i][0]}")
    notes = [n for _, _, n in done.values()]
    return {"compiled": sum(1 for e, _, _ in done.values() if e is None), "failed": failed,
            "worker_s": [dt for e, dt, _ in done.values() if e is None],
            "launchers": sum(1 for n in notes if n == "built"),
            "launcher_errors": [n for n in notes if n and n != "built"]}


def unavailable_reason() -> str:
    """Why precompile cannot run here ("" if it can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if interpret_mode():
        return "TRITON_INTERPRET=1: nothing is compiled"
    if _jit_runtime_knobs() is None:
        return "this Triton has no knobs.runtime.jit_cache_hook"
    if "fork" not in mp.get_all_start_methods():
        return "no fork start method on this platform"
    return ""


_KEY_THREAD: threading.Thread | None = None   # the last thread warm_triton_key() started
KEY_JOIN_TIMEOUT_S = 30.0


def warm_triton_key(enabled: bool = True) -> threading.Thread | None:
    """Start Triton's per-process installation hash (`triton_key()`: its sources and libtriton) in a
    daemon thread. The first compile or disk-cache lookup of a process needs it: 0.59 s of a warm first
    call on the H100 host (results/2026-11-26-h100-s5, run2). Started at patch(), it overlaps HF's
    generate() setup and the eager prefill that come before the first graph capture; file reads and
    sha256 release the GIL. lru_cache does not make a second caller wait for a computation in progress
    (both would compute it), so precompile() joins this thread (join_triton_key) before its first need,
    and a thread still running is returned instead of starting another. None (nothing started) without
    Triton, under the interpreter, or with precompile off (enabled=False: Tuning.precompile)."""
    global _KEY_THREAD
    if unavailable_reason() or not enabled:
        return None
    if _KEY_THREAD is not None and _KEY_THREAD.is_alive():
        return _KEY_THREAD
    try:
        from triton.runtime.cache import triton_key
    except ImportError:   # an older layout: skip, the first compile computes it as before
        return None

    def run():
        try:
            triton_key()
        except Exception as e:   # never fatal: the compile path computes it (and reports) itself
            log.debug("braid: triton_key() in the background failed: %s", e)

    t = threading.Thread(target=run, name="braid-triton-key", daemon=True)
    t.start()
    _KEY_THREAD = t
    return t


def join_triton_key(timeout: float = KEY_JOIN_TIMEOUT_S) -> bool:
    """Wait, at most `timeout` seconds, for the triton_key() that warm_triton_key() started, so that
    this thread's first need of it finds it cached instead of computing it a second time alongside.
    True unless it is still running after the timeout (the caller then computes it itself, as before:
    only time is lost, nothing hangs). Returns at once when no such thread runs."""
    t = _KEY_THREAD
    if t is None or not t.is_alive() or t is threading.current_thread():
        return True
    t.join(max(0.0, timeout))
    return not t.is_alive()


MARKER_DIR = "braid-precompile"   # under Triton's cache dir: one empty-ish file per recorded set


def marker_path(specs: list[KernelSpec]) -> str | None:
    """Where the marker of this recorded set lives, or None (no marker: Triton's cache is not its plain
    file cache, always_compile is on, or anything fails).

    The name hashes what is cheap in this process: Triton's version, the cache-invalidating env vars,
    and per variant the kernel's `cache_key` (Triton's hash of its source and dependencies, which the
    real launch needs anyway and keeps on the JITFunction), the hook's specialisation key and
    everything ident() holds (signature, constexprs, attributes, parsed options, target). Not in it:
    Triton's own source/library hash (`triton_key`, ~0.4-0.9 s to compute, which is what a disk check
    costs; the version stands in for it) and ptxas's version.

    Wrong in either direction, it costs only time, never correctness: a marker that exists although a
    variant is gone from the cache (files deleted, Triton rebuilt under the same version) skips the
    workers, and the first real launch compiles that variant itself, as without precompile; a marker
    that is missing although everything is on disk sends the set through the normal check (found on
    disk, nothing forked) and writes it. What a launch loads is decided by Triton's own cache key
    either way, never by the marker."""
    try:
        from triton import __version__, knobs
        from triton.compiler import compiler as cc

        if knobs.cache.manager_class is not None or knobs.compilation.always_compile:
            return None
        d = knobs.cache.dir
        if not d:
            return None
        parts = sorted(json.dumps([str(s.fn.cache_key), s.key, s.ident()]) for s in specs)
        env = sorted((str(k), str(v)) for k, v in (cc.get_cache_invalidating_env_vars() or {}).items())
        h = hashlib.sha256(json.dumps([__version__, env, parts]).encode("utf-8")).hexdigest()
        return os.path.join(d, MARKER_DIR, f"{h[:40]}.json")
    except Exception:
        return None


def write_marker(path: str | None, specs: list[KernelSpec]) -> None:
    """Write the marker atomically (its content, the variants' names, is only for a person looking)."""
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(s.name for s in specs), f)
        os.replace(tmp, path)
    except OSError:
        pass


# The parent checks the on-disk cache before forking (cached_on_disk) instead of sending every recorded
# variant to the workers and letting each worker's triton.compile find its own hit. Measured on the CPU
# (Triton 3.6, fake driver): the check's cost is almost all Triton's `triton_key` (hashes its own
# sources and libtriton.so: 0.4-0.9 s, once per process, lru-cached); after it a variant costs ~0.5 ms.
# The parent needs triton_key anyway for its own first launches (every launch of an uncompiled variant
# goes through triton.compile's cache key, a disk hit included), and computed before the fork it is
# inherited by every worker; without the check each worker computes it again (in parallel, but on the
# critical path of each) and, with a warm cache, N processes are forked for nothing. So the check stays;
# the marker skips it (and the fork) when the whole set is known to be on disk.


def precompile(body: Callable[[], object], workers: int | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Dry-run body() to find the kernel variants it would compile, compile them in parallel into the
    on-disk cache, and return a summary: {"found" (variants not compiled in this process yet),
    "on_disk" (of those, already in the on-disk cache: not compiled again), "compiled", "failed"
    (messages), "workers", "launchers" (built in the workers, Triton 3.6), "marker" (True: the set was
    known to be on disk from an earlier process's marker: no check, no workers), "seconds", "skipped"
    (why nothing was done, else "")}. Never raises for a failure of its own.

    body() runs its torch ops for real but no Triton kernel: whatever a kernel would have written keeps
    its old contents, so body() must not index memory with values only a kernel writes (runtime/graphs.py
    says why its bodies are safe)."""
    t0 = time.perf_counter()
    out = {"found": 0, "on_disk": 0, "compiled": 0, "failed": [], "workers": 0, "launchers": 0,
           "marker": False, "seconds": 0.0, "skipped": ""}

    def done(**kw):
        out.update(kw, seconds=round(time.perf_counter() - t0, 3))
        log.info("braid: %s", describe(out))
        return out

    why = unavailable_reason()
    if why:
        return done(skipped=why)
    try:
        rec, failed = record(body), None
    except Exception as e:
        rec, failed = None, e
    # The dry run needs no triton_key (the hook stops each launch before any cache key), so it overlaps
    # the background hash; the disk check below and the caller's warm-up (loading the variants) do.
    if not join_triton_key():
        log.info("braid: triton_key() still running in the background after %gs; computing it here",
                 KEY_JOIN_TIMEOUT_S)
    if failed is not None:
        return done(skipped=f"dry run failed ({type(failed).__name__}: {failed})")
    uniq = list({s.ident(): s for s in rec.specs}.values())
    if not uniq:
        return done(failed=rec.errors)
    marker = marker_path(uniq)
    if marker is not None and os.path.exists(marker):
        return done(found=len(uniq), on_disk=len(uniq), marker=True, failed=rec.errors)
    todo = [s for s in uniq if not cached_on_disk(s)]   # a warm cache: nothing to fork for
    if not todo:
        write_marker(marker, uniq)
        return done(found=len(uniq), on_disk=len(uniq), failed=rec.errors)
    n = workers or min(len(todo), os.cpu_count() or 1, MAX_WORKERS)
    try:
        res = compile_parallel(todo, n, timeout)
    except Exception as e:   # e.g. fork refused (out of memory, process limit)
        return done(found=len(uniq), on_disk=len(uniq) - len(todo), failed=rec.errors,
                    skipped=f"workers failed ({type(e).__name__}: {e})")
    if not res["failed"]:   # every variant on disk now (launcher errors do not matter here)
        write_marker(marker, uniq)
    return done(found=len(uniq), on_disk=len(uniq) - len(todo), compiled=res["compiled"],
                failed=rec.errors + res["failed"] + res["launcher_errors"], workers=min(n, len(todo)),
                launchers=res["launchers"])


def describe(s: dict) -> str:
    """One line for the log."""
    if s.get("skipped"):
        return f"precompile skipped: {s['skipped']}"
    if s.get("marker"):
        line = f"precompile: all {s['found']} variants known on disk (marker) in {s['seconds']:.2f}s"
        return line + (f"; {len(s['failed'])} not recorded, first: {s['failed'][0]}" if s["failed"] else "")
    line = (f"precompile: {s['found']} kernel variants to compile, {s['on_disk']} already in the on-disk "
            f"cache, {s['compiled']} compiled in {s['seconds']:.2f}s ({s['workers']} processes)")
    if s.get("launchers"):
        line += f", {s['launchers']} launchers built"
    if s["failed"]:
        line += f"; {len(s['failed'])} failed, first: {s['failed'][0]}"
    return line
