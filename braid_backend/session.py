"""PatchSession: everything a patched model holds at run time, in one object that frees it all.

It owns the DecodeStep (fused weights), the shared KV cache, the CUDA-graph runner and the K-step
loops, the lock that serialises their use, and the Status that reports what ran (the routes hf/routing.py
decides, recorded here). It refers to the model only weakly: model -> its patched forward/generate ->
hf.runner.HFRunner -> session -> step, never back, so `del model` frees every byte the patch allocated
without waiting for the cyclic GC.
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch

from .options import PatchOptions
from .report import PatchReport, Route, StepEvents
from .runtime.cache import LEN_ROUND, BraidCache, batch_bucket, round_up
from .runtime.graphs import GraphKey, GraphRunner
from .runtime.interface import DecodeStep, StepBuffers
from .runtime.loop import FastLoop
from .runtime.precompile import warm_triton_key
from .runtime.prefill import PREFILL_TOKEN_CAP, PrefillGraphs
from .runtime.sampling import SelectConfig

log = logging.getLogger("braid_backend")

_SERIALS = itertools.count(1)
STAT_KEYS = ("decode_fused", "decode_graph", "prefill_graph", "stock_forward", "generate_fast", "generate_hf_loop",
             "generate_stock")


@dataclass
class Status:
    """What the session did and is doing (braid_backend.status(model)).

    stats, counters since patch():
      decode_fused      decode steps the fused kernels ran (one new token per sequence each), whichever loop
                        ran them: the fast path's device loop (steps whose token generate() returned) or HF's
                        loop / a caller's own loop through the patched forward
      decode_graph      of those, the steps replayed from a CUDA graph
      prefill_graph     prompt prefills replayed from a CUDA graph
      stock_forward     forward() calls that ran the stock HF forward (prefill, or a step the fused step
                        cannot serve: see last_forward)
      generate_fast     generate() calls whose decode loop ran on the device (the fast path)
      generate_hf_loop  generate() calls whose decode loop was HF's (steps through the patched forward)
      generate_stock    generate() calls that ran the unpatched generate()
    """
    graphs: bool                           # CUDA graphs in use (off: asked so, not CUDA, or a capture failed)
    verified: bool | None                  # None: verify=False (not asked); False: not run yet; True: ran
    disabled: str | None = None            # why everything runs stock from now on
    last_route: Route | None = None        # the last generate() call's path, set as it starts (see Route)
    last_error: str | None = None          # what the last generate() call raised (None: it returned)
    last_prefill: Route | None = None      # the last fast-path prefill's path
    last_forward: Route | None = None      # the last forward() call's path
    verify_result: dict | None = None
    prefill_graphs: bool = False           # prompt prefill from CUDA graphs (off: asked so, no graphs, capture failed)
    stats: dict = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))

    @property
    def last_path(self) -> str | None:
        """str(last_route): "fast", "hf-loop (why)", "stock (why)"."""
        return None if self.last_route is None else str(self.last_route)


_ROUTE_FIELD = {"generate": "last_route", "prefill": "last_prefill", "forward": "last_forward"}


def params_signature(model) -> tuple:
    """Storage addresses of every parameter: changes when one is replaced, re-assigned or moved."""
    return tuple(_shard_ptr(p) for p in model.parameters())


def _shard_ptr(p) -> int:
    """A tensor-parallel (DTensor) parameter's address is its local shard's. DTensor.to_local() is an
    autograd call (~13 us; a 32B model has ~770 parameters, checked once per generate()), the attribute
    it returns ~0.3 us: use that where it exists."""
    t = getattr(p, "_local_tensor", None)
    if t is None and hasattr(p, "to_local"):
        t = p.to_local()
    return (p if t is None else t).data_ptr()


def _forget_cache(session_ref, serial: int) -> None:
    # weakref.finalize callback: graphs and loops captured on a freed cache must never replay
    s = session_ref()
    if s is not None:
        s.forget_cache(serial)


class PatchSession:
    def __init__(self, model, step: DecodeStep, report: PatchReport, options: PatchOptions,
                 step_events: StepEvents | None = None):
        self.serial = next(_SERIALS)
        self._model = weakref.ref(model)
        self.step, self.report, self.options = step, report, options
        self.lock = threading.RLock()
        graphs = options.graphs and step.device.type == "cuda"
        self.status = Status(graphs=graphs, verified=False if options.verify else None,
                             prefill_graphs=graphs and options.prefill_graphs)
        self.cache: BraidCache | None = None           # the cache generate() reuses from call to call
        self.graphs: GraphRunner | None = None         # created on first use, on CUDA
        self.prefill: PrefillGraphs | None = None      # prefill graphs (runtime/prefill.py), their own pool
        self.loops: dict[GraphKey, FastLoop] = {}
        self._eager: dict[tuple[int, int], StepBuffers] = {}
        self.eager_only = False                        # verification compares the kernels, not graph capture
        self._warned: set[str] = set()
        self._logged: set[tuple[str, Route]] = set()
        # what the step records while it runs (the CuPy step); collect_step_events moves it into the report
        self.step_events = step_events if step_events is not None else StepEvents()
        self.params_sig = params_signature(model)
        if graphs:   # the first graph capture compiles or loads kernels: start Triton's hash now
            warm_triton_key(options.tuning.precompile)

    @property
    def model(self):
        return self._model()

    @property
    def disabled(self) -> bool:
        return self.status.disabled is not None

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)
            self.report.events.append(msg)

    def record(self, stage: str, route: Route) -> None:
        """Make `route` the last of its stage ("generate", "prefill", "forward") in status; the log gets
        one line per distinct route of a stage (its first occurrence), not one per call or token."""
        setattr(self.status, _ROUTE_FIELD[stage], route)
        key = (stage, route)
        if key not in self._logged:
            self._logged.add(key)
            log.info("braid: %s: %s", stage, route)

    def collect_step_events(self) -> None:
        """Move what the step recorded while it ran into the report (after each call)."""
        ev = self.step_events
        if ev.events:
            self.report.events.extend(ev.events)
            ev.events.clear()
        if ev.backends:
            self.report.backends.update(ev.backends)
            ev.backends.clear()

    # -- fallbacks -------------------------------------------------------------------------------
    def disable(self, reason: str) -> None:
        """Run stock from now on. Graphs and loops go now; the fused weights and the shared cache
        (which a call in progress may still be using) go with unpatch() or the model."""
        with self.lock:
            self.status.disabled = reason
            self._drop_graphs()

    def check_params(self, full: bool) -> bool:
        """False (and the patched paths off) when the parameters are no longer the ones patch() fused.

        The cheap check runs every forward; the full one (every parameter's address) once per
        generate() and prefill, where it costs nothing that shows."""
        if self.disabled:
            return False
        model = self.model
        moved = self.step.weights_moved() or (full and model is not None
                                              and params_signature(model) != self.params_sig)
        if moved:
            self.warn_once("moved", "braid: the model's parameters were moved, cast or replaced after patch(); "
                                    "running stock from now on (call unpatch() and patch() again)")
            self.disable("parameters moved, cast or replaced after patch()")
        return not moved

    def graphs_active(self) -> bool:
        return self.status.graphs and not self.eager_only and not self.disabled

    def graph_runner(self) -> GraphRunner:
        if self.graphs is None:
            ref = weakref.ref(self)   # a bound method would make session -> runner -> session

            def failed(exc):
                s = ref()
                if s is not None:
                    s._graph_capture_failed(exc)

            self.graphs = GraphRunner(self.step, on_failure=failed)
        return self.graphs

    def _graph_capture_failed(self, exc: BaseException) -> None:
        self.status.graphs = False
        log.debug("braid: decode graph capture traceback", exc_info=exc)
        self.warn_once("graphs", f"braid: CUDA graph capture failed ({type(exc).__name__}: {exc}); decode steps "
                                 "run the fused kernels without graphs from now on")
        self._drop_graphs()
        self._settle_after_failed_capture()

    def _settle_after_failed_capture(self) -> None:
        if self.step.device.type == "cuda":
            try:  # a failed capture can leave pending work or a poisoned stream; surface it here, not later
                torch.cuda.synchronize(self.step.device)
                torch.cuda.empty_cache()
            except Exception as e:  # pragma: no cover - GPU only
                log.warning("braid: after the failed capture: %s", e)

    def prefill_graphs_active(self) -> bool:
        return self.status.prefill_graphs and self.graphs_active()

    def prefill_graphs(self, token_cap: int | None = None) -> PrefillGraphs:
        """The session's prefill graphs, created on first use with `token_cap` (None: PREFILL_TOKEN_CAP).
        hf/ passes the cap: it depends on the model's attention, which this layer does not read. Later
        calls leave an existing cap alone (a benchmark may have set its own)."""
        if self.prefill is None:
            ref = weakref.ref(self)

            def failed(exc):
                s = ref()
                if s is not None:
                    s._prefill_capture_failed(exc)

            self.prefill = PrefillGraphs(on_failure=failed, token_cap=token_cap or PREFILL_TOKEN_CAP)
        return self.prefill

    def _prefill_capture_failed(self, exc: BaseException) -> None:
        # decode graphs stay: they were captured (and checked) on their own
        self.status.prefill_graphs = False
        log.debug("braid: prefill graph capture traceback", exc_info=exc)
        self.warn_once("prefill-graphs", f"braid: prefill graph capture failed ({type(exc).__name__}: {exc}); "
                                         "prompts prefill eagerly from now on")
        if self.prefill is not None:
            self.prefill.release()
            self.prefill = None
        self._settle_after_failed_capture()

    def _drop_graphs(self) -> None:
        self.loops.clear()
        if self.prefill is not None:   # prefill and decode graphs go together
            self.prefill.release()
            self.prefill = None
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    # -- caches ----------------------------------------------------------------------------------
    def new_cache(self, batch: int, length: int) -> BraidCache:
        s = self.step
        c = BraidCache(s.num_layers, batch_bucket(batch), s.n_kv_heads, round_up(max(length, 1), LEN_ROUND),
                       s.head_dim, s.dtype, s.device, owner_id=self.serial)
        weakref.finalize(c, _forget_cache, weakref.ref(self), c.serial)
        return c

    def forget_cache(self, serial: int) -> None:
        """Drop graphs and loops captured on a cache that is gone."""
        if self.graphs is not None:
            self.graphs.forget(serial)
        if self.prefill is not None:
            self.prefill.forget(serial)
        for k in [k for k in self.loops if k.cache_serial == serial]:
            del self.loops[k]

    def shared_cache(self, batch: int, length: int) -> BraidCache:
        """The session's reusable cache (re-allocated only when too small), reset to empty."""
        c = self.cache
        if c is None or not c.fits(batch, length) or c.valid is None:
            if c is not None:
                self.forget_cache(c.serial)
                c.release()
                self.cache = None
            c = self.cache = self.new_cache(batch, length)
        c.seen = 0
        return c

    def owns(self, cache) -> bool:
        return isinstance(cache, BraidCache) and cache.owner_id == self.serial and cache.valid is not None

    def grow(self, cache: BraidCache, need: int) -> None:
        """Give the cache more positions (outside any captured graph; graphs re-capture on the new buffers)."""
        new_len = round_up(max(need, 2 * cache.max_len), LEN_ROUND)
        log.info("braid: growing the KV cache from %d to %d positions", cache.max_len, new_len)
        cache.grow(new_len)

    # -- what the HF side runs -------------------------------------------------------------------
    def eager_buffers(self, M: int, max_len: int) -> StepBuffers:
        """Buffers for un-graphed steps, kept per (rows, cache length) like a graph's own."""
        key = (M, max_len)
        if key not in self._eager:
            for k in [k for k in self._eager if k[1] != max_len]:
                del self._eager[k]
            self._eager[key] = self.step.new_buffers(M, max_len)
        return self._eager[key]

    def fast_loop(self, cache: BraidCache, bucket: int, K: int, sel_cfg: SelectConfig) -> FastLoop:
        """The K-step loop for this cache and selection config (captured on first use when graphs are on)."""
        key = GraphKey.of(bucket, cache, ("fast", K, sel_cfg))
        loop = self.loops.get(key)
        if loop is None:
            # loops of other caches or older buffers of this one would only hold memory
            self.loops = {k: v for k, v in self.loops.items()
                          if (k.cache_serial, k.cache_version) == (key.cache_serial, key.cache_version)}
            runner = self.graph_runner() if self.graphs_active() else None
            loop = self.loops[key] = FastLoop(self.step, runner, cache, bucket, K, sel_cfg)
        return loop

    def release(self) -> None:
        """Free graphs, loops, caches and the fused weights (unpatch)."""
        with self.lock:
            self._drop_graphs()
            self._eager.clear()
            if self.cache is not None:
                self.cache.release()
                self.cache = None
            self.step.release()
