"""Cold-start precompile (runtime/precompile.py) and the launch indirection (kernels/_common.launch), on
the CPU.

The real path needs a GPU only for the driver (current device / stream / target): here a fake driver
stands in, so a real JITFunction's dry run goes through Triton's own binder, specialisation and
jit_cache_hook, the recorded variants compile for sm_90 in forked workers into a temporary
TRITON_CACHE_DIR, and the normal compile path afterwards must find them there (a cache hit: no new
file), which is what makes the cold first call cheap on the GPU."""
import os
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:   # imported by the binder of a first launch; with TRITON_INTERPRET=0 then (fake_gpu) the import
    import triton.experimental.gluon  # noqa: E402,F401   asserts (Triton 3.9): import it now, as a
except ImportError:                   # first interpreted launch would, so any test runs alone too
    pass

from braid_backend.kernels import _common  # noqa: E402
from braid_backend.kernels._common import dry_launches, launch  # noqa: E402
from braid_backend.runtime import graphs, precompile as pc  # noqa: E402


def _axpy(x, y, out, n, BLOCK: tl.constexpr, SCALE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out + i, tl.load(x + i, mask=m) * SCALE + tl.load(y + i, mask=m), mask=m)


def _interpreted():
    return InterpretedFunction(_axpy)


def _jitted():
    """A fresh JITFunction (not triton.jit: that gives an InterpretedFunction while TRITON_INTERPRET=1,
    which other test modules set), so no variant is compiled in memory yet."""
    return JITFunction(_axpy)


# ------------------------------------------------------------------------------------- launch (a)

def test_launch_runs_the_kernel_and_dry_runs_skip_it_only_on_their_thread():
    k = _interpreted()
    x, y = torch.arange(40, dtype=torch.float32), torch.ones(40)
    out = torch.full((40,), -1.0)
    launch(k, (3,))(x, y, out, 40, BLOCK=16, SCALE=2.0)
    torch.testing.assert_close(out, x * 2 + 1)
    # the same as the direct launch it replaces
    ref = torch.full((40,), -1.0)
    k[(3,)](x, y, ref, 40, BLOCK=16, SCALE=2.0)
    assert torch.equal(out, ref)

    out.fill_(-1.0)
    other = torch.full((40,), -1.0)
    with dry_launches():
        launch(k, (3,))(x, y, out, 40, BLOCK=16, SCALE=2.0)   # warmup: a no-op under the interpreter
        t = threading.Thread(target=lambda: launch(k, (3,))(x, y, other, 40, BLOCK=16, SCALE=2.0))
        t.start()
        t.join()
        with pytest.raises(RuntimeError):   # not re-entrant
            with dry_launches():
                pass
    assert torch.equal(out, torch.full((40,), -1.0)), "a dry launch wrote its output"
    assert torch.equal(other, ref), "another thread's launch was skipped by this thread's dry run"
    assert _common._DRY_THREAD is None


def test_precompile_under_the_interpreter_is_a_no_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    called = []
    s = pc.precompile(lambda: called.append(1))
    assert "TRITON_INTERPRET" in s["skipped"] and s["found"] == s["compiled"] == 0
    assert not called, "the body must not run when precompile cannot work"
    assert "skipped" in pc.describe(s)


# ------------------------------------------------------------------ record + compile, fake driver (b)

class _FakeDriver:
    """What JITFunction.run asks the driver for, without a GPU; only in this process: a worker that asked
    (on a GPU it would touch the CUDA context inherited through fork) gets an error."""

    def __init__(self):
        self.pid = os.getpid()

    def _here(self):
        if os.getpid() != self.pid:
            raise RuntimeError("a precompile worker asked the driver")

    def get_current_device(self):
        self._here()
        return 0

    def get_current_stream(self, device):
        self._here()
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        self._here()
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):   # anything else (utils, launcher, ...): never, anywhere
        raise RuntimeError(f"driver.{name} used")


# The Triton interpreter patches triton.language for good once an interpreted kernel calls a jit
# helper (InterpretedFunction.__call__ never restores it; seen on 3.9): after any kernel test in the same
# process, the real compiler these tests drive fails ("'value' object has no attribute 'dtype'"). So
# they run in a process of their own, started by the test below.
FRESH = os.environ.get("BRAID_PRECOMPILE_FRESH") == "1"


def test_real_compiler_tests_in_a_fresh_process():
    if FRESH:
        pytest.skip("this is the fresh process")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                       env={**os.environ, "BRAID_PRECOMPILE_FRESH": "1"}, capture_output=True, text=True,
                       timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    if not FRESH:
        pytest.skip("runs in test_real_compiler_tests_in_a_fresh_process")
    from triton.runtime.driver import driver

    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    saved = driver._active
    driver._active = _FakeDriver()
    try:
        yield cache
    finally:
        driver._active = saved


def _files(d) -> set:
    return {str(p) for p in d.rglob("*") if p.is_file()} if d.exists() else set()


def _args(n=64):
    x = torch.zeros(n)
    return x, torch.zeros(n), torch.zeros(n), n


def test_dry_run_records_variants_and_workers_fill_the_cache_the_launch_path_reads(fake_gpu):
    from triton import knobs

    k = _jitted()
    before_hook = knobs.runtime.jit_cache_hook

    def body():
        launch(k, (1,))(*_args(), BLOCK=64, SCALE=2.0)
        launch(k, (1,))(*_args(), BLOCK=64, SCALE=2.0)   # the same variant: compiled once
        launch(k, (2,))(*_args(), BLOCK=32, SCALE=2.0, num_warps=2)

    s = pc.precompile(body, workers=2)
    assert s["skipped"] == "" and s["failed"] == [], s
    assert (s["found"], s["compiled"], s["workers"]) == (2, 2, 2)
    assert knobs.runtime.jit_cache_hook is before_hook, "the hook must be restored"
    assert _common._DRY_THREAD is None
    filled = _files(fake_gpu)
    assert filled, "the workers wrote nothing to TRITON_CACHE_DIR"
    # the normal path (no hook): both variants are cache hits, so it writes nothing new ...
    k.warmup(*_args(), grid=(1,), BLOCK=64, SCALE=2.0)
    k.warmup(*_args(), grid=(2,), BLOCK=32, SCALE=2.0, num_warps=2)
    assert _files(fake_gpu) == filled, "the launch path missed the precompiled cache entries"
    # ... while a variant nobody precompiled does get compiled (the check above can fail)
    k.warmup(*_args(), grid=(1,), BLOCK=16, SCALE=2.0)
    assert _files(fake_gpu) > filled
    # compiled in memory now: a second dry run finds nothing to do and forks nothing
    s2 = pc.precompile(body)
    assert (s2["found"], s2["compiled"], s2["workers"], s2["failed"]) == (0, 0, 0, [])
    # a new process (here: a new JITFunction of the same source) with the cache kept: the marker the
    # first precompile wrote says all is on disk: nothing checked, forked or written
    k = _jitted()
    now = _files(fake_gpu)
    s3 = pc.precompile(body)
    assert (s3["found"], s3["on_disk"], s3["compiled"], s3["workers"], s3["marker"]) == (2, 2, 0, 0, True), s3
    assert _files(fake_gpu) == now and "all 2 variants known on disk (marker)" in pc.describe(s3)
    # without the marker: the disk check finds both, forks nothing, and writes the marker again
    markers = {f for f in now if pc.MARKER_DIR in f}
    assert len(markers) == 1
    os.remove(markers.pop())
    k = _jitted()
    s4 = pc.precompile(body)
    assert (s4["found"], s4["on_disk"], s4["compiled"], s4["workers"], s4["marker"]) == (2, 2, 0, 0, False), s4
    assert _files(fake_gpu) == now and "2 already in" in pc.describe(s4)


def _spec(k) -> pc.KernelSpec:
    """Recorded through the real hook (so the test sees what the GPU path records)."""
    rec = pc.record(lambda: launch(k, (1,))(*_args(), BLOCK=64, SCALE=3.0))
    assert len(rec.specs) == 1 and not rec.errors
    return rec.specs[0]


def test_hand_built_spec_compiles_in_a_worker_and_again_is_a_cache_hit(fake_gpu):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    k = _jitted()
    target = GPUTarget("cuda", 90, 32)
    opts = make_backend(target).parse_options({"num_warps": 4})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}   # 16-byte aligned pointers, n % 16 == 0
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7):
        attrs.update({(4,): [], (5,): []})   # 3.7+ list the constexprs too (no attributes)
    spec = pc.KernelSpec(k, {"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32", "BLOCK": "constexpr",
                             "SCALE": "constexpr"}, {(4,): 64, (5,): 3.0}, attrs, target, dict(opts.__dict__))
    assert not pc.cached_on_disk(spec)
    res = pc.compile_parallel([spec], 1)
    assert res["compiled"] == 1 and res["failed"] == [], res
    assert pc.cached_on_disk(spec)
    filled = _files(fake_gpu)
    assert filled
    t0 = time.perf_counter()
    pc.compile_spec(spec)   # in this process now: found on disk
    assert _files(fake_gpu) == filled and time.perf_counter() - t0 < 5
    # the hand-built spec is what the launch path compiles for this launch: a cache hit there too
    k.warmup(*_args(), grid=(1,), BLOCK=64, SCALE=3.0)
    assert _files(fake_gpu) == filled
    assert _spec(_jitted()).ident() == spec.ident()


# ------------------------------------------------------------------------------------------- marker

_KERNEL_SRC = """
import triton.language as tl


def scale_add(x, y, out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out + i, tl.load(x + i, mask=m) * {factor} + tl.load(y + i, mask=m), mask=m)
"""


def _kernel_from_source(tmp_path, factor):
    """A fresh JITFunction of module `braid_marker_kernel`, function `scale_add`, whose source differs
    only by `factor`: what an edited kernel is in the next process (same name, module, signature)."""
    import importlib.util

    path = tmp_path / f"kernel_{factor}" / "braid_marker_kernel.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(_KERNEL_SRC.format(factor=factor))
    spec = importlib.util.spec_from_file_location("braid_marker_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return JITFunction(mod.scale_add)


def test_marker_skips_the_check_and_the_workers_and_misses_on_a_changed_source_or_specialisation(
        fake_gpu, tmp_path, monkeypatch):
    def body_of(k, n=64):
        return lambda: launch(k, (1,))(*_args(n), BLOCK=64)

    s1 = pc.precompile(body_of(_kernel_from_source(tmp_path, 2.0)), workers=1)
    assert (s1["found"], s1["compiled"], s1["marker"], s1["failed"]) == (1, 1, False, []), s1
    assert len(list((fake_gpu / pc.MARKER_DIR).iterdir())) == 1

    checked, forked = [], []
    real_check, real_parallel = pc.cached_on_disk, pc.compile_parallel
    monkeypatch.setattr(pc, "cached_on_disk", lambda spec: checked.append(spec.name) or real_check(spec))
    monkeypatch.setattr(pc, "compile_parallel", lambda *a, **kw: forked.append(1) or real_parallel(*a, **kw))

    # the next process (a new JITFunction of the same source): marker hit, no hashing, no fork
    s2 = pc.precompile(body_of(_kernel_from_source(tmp_path, 2.0)))
    assert (s2["found"], s2["on_disk"], s2["marker"]) == (1, 1, True) and not checked and not forked, s2

    # the kernel's source changed (same module, name, signature): the marker misses, the variant compiles
    s3 = pc.precompile(body_of(_kernel_from_source(tmp_path, 3.0)), workers=1)
    assert (s3["marker"], s3["compiled"], s3["failed"]) == (False, 1, []), s3
    assert checked and forked

    # another specialisation of the first source (n = 63: not divisible by 16): misses too
    checked.clear(), forked.clear()
    s4 = pc.precompile(body_of(_kernel_from_source(tmp_path, 2.0), n=63), workers=1)
    assert (s4["marker"], s4["compiled"], s4["failed"]) == (False, 1, []), s4
    assert checked and forked
    # ... and both new sets have their own marker now
    checked.clear(), forked.clear()
    for k, n in ((_kernel_from_source(tmp_path, 3.0), 64), (_kernel_from_source(tmp_path, 2.0), 63)):
        assert pc.precompile(body_of(k, n))["marker"]
    assert not checked and not forked and len(list((fake_gpu / pc.MARKER_DIR).iterdir())) == 3


def test_no_marker_for_a_set_with_a_failed_variant(fake_gpu, monkeypatch):
    monkeypatch.setattr(pc, "compile_spec", _raise)
    body = lambda: launch(_jitted(), (1,))(*_args(), BLOCK=64, SCALE=2.0)   # noqa: E731
    assert pc.precompile(body)["failed"]
    assert not (fake_gpu / pc.MARKER_DIR).exists()


# ------------------------------------------------------------------ launchers (Triton 3.6 builds one)

def compile_module_from_src(src, name):
    """Stands in for Triton 3.6's builder (build_launcher looks for this name in the launcher's
    constructor): writes the 'module' into the cache with the pid that built it."""
    import hashlib

    from triton.runtime.cache import get_cache_manager
    get_cache_manager(hashlib.sha256(src.encode()).hexdigest()).put(str(os.getpid()), f"{name}.so")


class _BuildingLauncher:
    def __init__(self, src, metadata):
        compile_module_from_src(f"{src.name}{sorted(src.signature.items())}", "__triton_launcher")


class _GenericLauncher:   # Triton 3.7+: nothing to build
    def __init__(self, src, metadata):
        raise AssertionError("constructed although it builds nothing")


@pytest.mark.parametrize("cls, want", [(_BuildingLauncher, 1), (_GenericLauncher, 0)])
def test_workers_build_the_launcher_where_triton_builds_one(fake_gpu, monkeypatch, cls, want):
    from triton.runtime.driver import driver

    monkeypatch.setattr(type(driver._active), "launcher_cls", cls, raising=False)
    s = pc.precompile(lambda: launch(_jitted(), (1,))(*_args(), BLOCK=64, SCALE=2.0), workers=1)
    assert (s["compiled"], s["launchers"], s["failed"]) == (1, want, []), s
    so = [p for p in fake_gpu.rglob("__triton_launcher.so")]
    assert len(so) == want
    if want:   # built in the worker, not here
        assert so[0].read_text() != str(os.getpid()) and "1 launchers built" in pc.describe(s)


def _raise(spec):
    raise ValueError("bad kernel")


def _hang(spec):
    time.sleep(120)


def _die(spec):
    os._exit(3)


@pytest.mark.parametrize("fn, want, timeout", [(_raise, "ValueError: bad kernel", 60),
                                               (_hang, "worker killed", 1.0),
                                               (_die, "worker exited (3)", 60)])
def test_worker_failures_are_reported_not_raised_and_never_hang(fake_gpu, fn, want, timeout):
    spec = _spec(_jitted())
    t0 = time.perf_counter()
    res = pc.compile_parallel([spec, spec], 2, timeout=timeout, compile_fn=fn)
    assert time.perf_counter() - t0 < 20
    assert res["compiled"] == 0 and len(res["failed"]) == 2, res
    assert all(want in f and "_axpy" in f for f in res["failed"]), res["failed"]
    assert not [p for p in __import__("multiprocessing").active_children() if p.name.startswith("braid-")]


def test_failures_inside_precompile_are_a_summary(fake_gpu, monkeypatch):
    from triton import knobs

    k = _jitted()
    monkeypatch.setattr(pc, "compile_spec", _raise)
    s = pc.precompile(lambda: launch(k, (1,))(*_args(), BLOCK=64, SCALE=2.0))
    assert s["found"] == 1 and s["compiled"] == 0 and "bad kernel" in s["failed"][0]
    assert "1 failed" in pc.describe(s)

    def broken():
        raise RuntimeError("boom")

    hook = knobs.runtime.jit_cache_hook
    s = pc.precompile(broken)
    assert "dry run failed" in s["skipped"] and "boom" in s["skipped"]
    assert knobs.runtime.jit_cache_hook is hook and _common._DRY_THREAD is None


def test_recorder_passes_other_threads_to_the_previous_hook():
    seen = []
    rec = pc.Recorder(previous=lambda **kw: seen.append(kw) or "prev")
    got = []
    t = threading.Thread(target=lambda: got.append(rec(fn=None, compile={}, key="k")))
    t.start()
    t.join()
    assert got == ["prev"] and len(seen) == 1 and not rec.specs
    # its own thread: recorded or not, never compiled now
    bad = types.SimpleNamespace(jit_function=None, name="k")
    assert rec(fn=bad, compile={}, key="k") is True and rec.errors and not rec.specs


def test_recorder_parses_each_kernel_device_and_key_once(monkeypatch):
    parsed = []
    monkeypatch.setattr(pc, "spec_from_hook", lambda jit_fn, info, key=None: parsed.append((jit_fn, key)) or key)
    rec = pc.Recorder()
    a, b = (types.SimpleNamespace(jit_function=object(), name=n) for n in "ab")
    for fn, dev, key in [(a, 0, "k1"), (a, 0, "k1"), (a, 0, "k2"), (b, 0, "k1"), (a, 1, "k1"), (a, 0, "k2"),
                         (a, 0, ("k", 3)), (a, 0, ("k", 3)), (a, 0, None), (a, 0, None), (a, 0, ["x"]), (a, 0, ["x"])]:
        assert rec(fn=fn, compile={"device": dev}, key=key) is True
    # each distinct (kernel, device, key) once; no key, or an unhashable one, every time (as before)
    assert rec.specs == ["k1", "k2", "k1", "k1", ("k", 3), None, None, ["x"], ["x"]], rec.specs
    assert len(parsed) == 9
    # a variant that cannot be recorded is reported once, not at each of its launches
    def unparsable(*a, **kw):
        raise KeyError("x")

    monkeypatch.setattr(pc, "spec_from_hook", unparsable)
    rec = pc.Recorder()
    for _ in range(3):
        rec(fn=a, compile={"device": 0}, key="k")
    assert len(rec.errors) == 1 and not rec.specs


def test_dry_run_parses_a_repeated_launch_once_and_records_every_variant(fake_gpu, monkeypatch):
    parsed = []
    real = pc.spec_from_hook
    monkeypatch.setattr(pc, "spec_from_hook", lambda *a, **kw: parsed.append(1) or real(*a, **kw))
    k, k2 = _jitted(), _jitted()

    def body():
        for _ in range(5):
            launch(k, (1,))(*_args(), BLOCK=64, SCALE=2.0)
            launch(k, (1,))(*_args(), BLOCK=32, SCALE=2.0)
            launch(k2, (1,))(*_args(), BLOCK=64, SCALE=2.0)   # another kernel with an equal key

    rec = pc.record(body)
    assert len(parsed) == 3 and len(rec.specs) == 3 and not rec.errors
    assert len({s.ident() for s in rec.specs}) == 2   # k2's variant is k's (same source): one compile


# ----------------------------------------------------------------------------- GraphRunner's switch

def test_graph_runner_precompiles_once_per_tag_and_bucket_and_obeys_the_tuning(monkeypatch):
    from braid_backend.tuning import Tuning

    calls = []
    monkeypatch.setattr(graphs._precompile, "precompile", lambda body: calls.append(body) or {"found": 0})
    runner = types.SimpleNamespace(precompiled={}, step=types.SimpleNamespace(tuning=Tuning(precompile=False)))
    key = graphs.GraphKey(1, 0, 0, 64, "hf-step")
    assert graphs.GraphRunner._precompile(runner, key, "body") is None and not calls
    runner.step.tuning = Tuning()
    assert graphs.GraphRunner._precompile(runner, key, "body") == {"found": 0}
    assert graphs.GraphRunner._precompile(runner, graphs.GraphKey(1, 0, 1, 128, "hf-step"), "body") is None
    graphs.GraphRunner._precompile(runner, graphs.GraphKey(2, 0, 0, 64, "hf-step"), "body")
    graphs.GraphRunner._precompile(runner, graphs.GraphKey(1, 0, 0, 64, ("fast", 8)), "body")
    assert len(calls) == 3


class _CountingStep:
    """A DecodeStep without kernels that logs the slot of each run (the runner only needs the protocol)."""
    device, vocab = torch.device("cpu"), 16

    def __init__(self):
        from braid_backend.tuning import Tuning

        self.slots, self.tuning = [], Tuning()

    def prepare(self, max_len):
        pass

    def new_buffers(self, M, max_len):
        z = lambda dt=torch.long: torch.zeros(M, dtype=dt)   # noqa: E731
        return types.SimpleNamespace(M=M, max_len=max_len, ids=z(), pos=z(), slots=z(), kv_lens=z(torch.int32),
                                     logits=torch.zeros(M, self.vocab))

    def run(self, cache, b):
        self.slots.append(int(b.slots[0]))
        return b.logits

    def agree(self, tokens):
        pass


def test_fast_loop_capture_dry_runs_one_step_and_warms_up_and_captures_all_k(monkeypatch):
    """GraphRunner._capture and FastLoop on the CPU, CUDA's stream/graph calls stubbed: the precompile's
    dry run gets one primed step of the K-step body; warm-up (2 runs) and capture run all K."""
    import contextlib

    from braid_backend.runtime.loop import FastLoop
    from braid_backend.runtime.sampling import SelectConfig

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    for name, value in [("Stream", lambda: stream), ("current_stream", lambda *a: stream),
                        ("stream", contextlib.nullcontext), ("graph", lambda g, pool=None: contextlib.nullcontext()),
                        ("CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None)),
                        ("graph_pool_handle", lambda: "pool"), ("get_rng_state", lambda dev=None: None),
                        ("set_rng_state", lambda state, dev=None: None)]:
        monkeypatch.setattr(torch.cuda, name, value)
    step, dry = _CountingStep(), []

    def fake_precompile(body):
        n = len(step.slots)
        body()
        dry.append(step.slots[n:])
        return {"skipped": "stub"}

    monkeypatch.setattr(graphs._precompile, "precompile", fake_precompile)
    runner, K, max_len = graphs.GraphRunner(step), 4, 32
    cache = types.SimpleNamespace(serial=1, version=0, max_len=max_len, valid=torch.zeros(2, max_len, dtype=torch.int8))
    FastLoop(step, runner, cache, 2, K, SelectConfig(do_sample=True))
    first = max_len - K
    assert dry == [[first]], dry                            # one step, at the primed slot
    assert step.slots[1:] == list(range(first, max_len)) * 3   # 2 warm-ups + the capture, K steps each
    # the one-step body (HF's loop) has no dry body of its own: its body is the dry run
    dry.clear()
    runner.step_once(cache, 2, torch.zeros(2, dtype=torch.long), None, 3)
    assert dry == [[max_len - 1]] and runner.captures == 2


@pytest.mark.parametrize("bucket", [1, 2, 3])
def test_one_greedy_step_records_every_variant_of_the_k_step_body(fake_gpu, monkeypatch, bucket):
    """What makes the one-step dry run enough: through Triton's own binder, the K steps of the fused
    greedy body launch exactly step 0's variants (with unaligned ring rows they did not: 3-4 vs 2)."""
    from braid_backend.kernels import greedy_select as gs
    from braid_backend.runtime.loop import FastLoop
    from braid_backend.runtime.sampling import SelectConfig

    for name in ("_block_argmax_kernel", "_finish_kernel"):   # compilable kernels, not the interpreter's
        monkeypatch.setattr(gs, name, JITFunction(getattr(gs, name).fn))
    step = _CountingStep()
    step.vocab = 5000   # two vocabulary blocks
    cache = types.SimpleNamespace(valid=torch.zeros(bucket, 32, dtype=torch.int8), max_len=32)
    loop = FastLoop(step, None, cache, bucket, 8, SelectConfig(do_sample=False, eos=(2,)))
    assert loop.greedy is not None
    variants = [{s.ident() for s in pc.record(lambda: loop._body(cache, loop.bufs, steps=n)).specs} for n in (1, 8)]
    assert len(variants[0]) == 2 and variants[0] == variants[1]


def test_warm_triton_key_runs_it_in_a_thread_only_where_something_compiles(monkeypatch):
    import triton.runtime.cache as tcache

    calls = []
    monkeypatch.setattr(tcache, "triton_key", lambda: calls.append(threading.current_thread().name))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pc.warm_triton_key() is None and not calls        # the interpreter compiles nothing
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pc.warm_triton_key(enabled=False) is None and not calls
    t = pc.warm_triton_key()
    if pc.unavailable_reason():
        assert t is None
        pytest.skip(pc.unavailable_reason())
    t.join(10)
    assert calls == ["braid-triton-key"]


def test_join_triton_key_waits_for_the_thread_and_is_bounded(monkeypatch):
    monkeypatch.setattr(pc, "_KEY_THREAD", None)
    t0 = time.perf_counter()
    assert pc.join_triton_key(30) is True and time.perf_counter() - t0 < 0.5   # nothing started
    go, finished = threading.Event(), []
    t = threading.Thread(target=lambda: (go.wait(30), time.sleep(0.3), finished.append(1)), daemon=True)
    t.start()
    monkeypatch.setattr(pc, "_KEY_THREAD", t)
    t0 = time.perf_counter()
    assert pc.join_triton_key(0.2) is False and 0.15 < time.perf_counter() - t0 < 5   # bounded
    go.set()
    assert pc.join_triton_key(30) is True and finished == [1]   # waited for the rest of its work
    t0 = time.perf_counter()
    assert pc.join_triton_key(30) is True and time.perf_counter() - t0 < 0.5   # finished: at once


def test_precompile_joins_the_background_triton_key_before_its_disk_check(fake_gpu, monkeypatch):
    """The disk check (cached_on_disk, a cold cache here) needs triton_key: the main thread waits for
    the background thread's value instead of computing it a second time alongside."""
    import triton.runtime.cache as tcache

    calls, value = [], []

    def slow_key():   # what lru_cache does: a caller that finds no value computes it
        if not value:
            calls.append(threading.current_thread().name)
            time.sleep(0.5)
            value.append("key")
        return value[0]

    monkeypatch.setattr(tcache, "triton_key", slow_key)
    monkeypatch.setattr(pc, "_KEY_THREAD", None)
    t = pc.warm_triton_key()
    assert t is not None and pc.warm_triton_key() is t   # still running: not started twice
    s = pc.precompile(lambda: launch(_jitted(), (1,))(*_args(), BLOCK=64, SCALE=2.0), workers=1)
    assert (s["found"], s["compiled"], s["failed"]) == (1, 1, []), s
    assert calls == ["braid-triton-key"], calls
