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


def compile_spec(spec: KernelSpec) -> None:
    """Compile one variant into Triton's on-disk cache (a cache hit if it is there). No CUDA call: the
    target is given, and the compiled kernel is not loaded onto a device (that happens at first launch)."""
    from triton.compiler import ASTSource, compile as triton_compile

    src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    triton_compile(src, target=spec.target, options=dict(spec.options))


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


def spec_from_hook(jit_fn, info: dict) -> KernelSpec:
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
                      target, dict(parsed.__dict__))


class Recorder:
    """jit_cache_hook for a dry run: records the variants of its own thread's launches and returns True
    (do not compile). Another thread compiling meanwhile goes to the hook that was there before (or
    compiles as usual): its kernels must not be skipped."""

    def __init__(self, previous=None):
        self.thread = threading.get_ident()
        self.previous = previous
        self.specs: list[KernelSpec] = []
        self.errors: list[str] = []

    def __call__(self, *, fn, compile, **kw):
        if threading.get_ident() != self.thread:
            return self.previous(fn=fn, compile=compile, **kw) if self.previous is not None else None
        try:
            self.specs.append(spec_from_hook(fn.jit_function, compile))
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
    """In a forked child: compile each (index, spec), reporting (index, error or None, seconds)."""
    for i, spec in jobs:
        t0 = time.perf_counter()
        try:
            compile_fn(spec)
            err = None
        except BaseException as e:   # reported, never raised: the parent decides
            err = f"{type(e).__name__}: {e}"[:500]
        conn.send((i, err, time.perf_counter() - t0))
    conn.close()


def compile_parallel(specs: list[KernelSpec], workers: int, timeout: float = DEFAULT_TIMEOUT_S,
                     compile_fn: Callable[[KernelSpec], None] | None = None) -> dict:
    """Compile specs in `workers` forked processes (round-robin). Returns {"compiled": n, "failed":
    [messages], "worker_s": [seconds per spec that compiled]}. Workers still running after `timeout`
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
                i, err, dt = r.recv()
                done[i] = (err, dt)
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
    return {"compiled": sum(1 for e, _ in done.values() if e is None), "failed": failed,
            "worker_s": [dt for e, dt in done.values() if e is None]}


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


def precompile(body: Callable[[], object], workers: int | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Dry-run body() to find the kernel variants it would compile, compile them in parallel into the
    on-disk cache, and return a summary: {"found" (variants not compiled in this process yet),
    "on_disk" (of those, already in the on-disk cache: not compiled again), "compiled", "failed"
    (messages), "workers", "seconds", "skipped" (why nothing was done, else "")}. Never raises for a
    failure of its own.

    body() runs its torch ops for real but no Triton kernel: whatever a kernel would have written keeps
    its old contents, so body() must not index memory with values only a kernel writes (runtime/graphs.py
    says why its bodies are safe)."""
    t0 = time.perf_counter()
    out = {"found": 0, "on_disk": 0, "compiled": 0, "failed": [], "workers": 0, "seconds": 0.0, "skipped": ""}

    def done(**kw):
        out.update(kw, seconds=round(time.perf_counter() - t0, 3))
        log.info("braid: %s", describe(out))
        return out

    why = unavailable_reason()
    if why:
        return done(skipped=why)
    try:
        rec = record(body)
    except Exception as e:
        return done(skipped=f"dry run failed ({type(e).__name__}: {e})")
    uniq = list({s.ident(): s for s in rec.specs}.values())
    todo = [s for s in uniq if not cached_on_disk(s)]   # a warm cache: nothing to fork for
    if not todo:
        return done(found=len(uniq), on_disk=len(uniq), failed=rec.errors)
    n = workers or min(len(todo), os.cpu_count() or 1, MAX_WORKERS)
    try:
        res = compile_parallel(todo, n, timeout)
    except Exception as e:   # e.g. fork refused (out of memory, process limit)
        return done(found=len(uniq), on_disk=len(uniq) - len(todo), failed=rec.errors,
                    skipped=f"workers failed ({type(e).__name__}: {e})")
    return done(found=len(uniq), on_disk=len(uniq) - len(todo), compiled=res["compiled"],
                failed=rec.errors + res["failed"], workers=min(n, len(todo)))


def describe(s: dict) -> str:
    """One line for the log."""
    if s.get("skipped"):
        return f"precompile skipped: {s['skipped']}"
    line = (f"precompile: {s['found']} kernel variants to compile, {s['on_disk']} already in the on-disk "
            f"cache, {s['compiled']} compiled in {s['seconds']:.2f}s ({s['workers']} processes)")
    if s["failed"]:
        line += f"; {len(s['failed'])} failed, first: {s['failed'][0]}"
    return line
