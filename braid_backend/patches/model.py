"""The model-facing side: PatchState and the forward() that routes decode steps to fused kernels.

Only the CausalLM's `forward` and `generate` are replaced (as instance attributes, so unpatch is a
`del`); the HF modules stay in place and run prefill, filling the braid cache through `Cache.update`.

Whatever cannot be served correctly falls back to the stock forward rather than guessing: parameters
moved, cast or replaced after patch(), training mode, grad mode, a failed verification
(`patch(verify=True)`). A failed CUDA-graph capture drops to the same fused kernels launched eagerly.
"""
from __future__ import annotations

import logging
import threading
import weakref

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..runtime.cache import BraidCache, round_up
from ..runtime.graphs import GraphRunner
from ..runtime.hf_compat import cache_kwarg_name, pop_cache_kwarg
from .decode import DecodeState
from .spec import ModelPlan

log = logging.getLogger("braid_backend")

LEN_ROUND = 256          # cache lengths are rounded so that buffers and graphs are reused across prompts
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def batch_bucket(b: int) -> int:
    for size in BATCH_BUCKETS:
        if b <= size:
            return size
    return round_up(b, BATCH_BUCKETS[-1])


class GraphCaptureFailed(RuntimeError):
    """A CUDA-graph capture raised; the state has already switched to eager decode steps."""


class SafeGraphRunner(GraphRunner):
    """GraphRunner whose capture failures (out of memory, capture-invalid ops) turn graphs off for the
    state instead of failing the user's call; callers catch GraphCaptureFailed and run eagerly."""

    def capture(self, *args, **kwargs):
        try:
            return super().capture(*args, **kwargs)
        except Exception as e:
            self.st.graph_capture_failed(e)
            raise GraphCaptureFailed(f"CUDA graph capture failed: {type(e).__name__}: {e}") from e


def _forget_cache(state_ref, cache_id: int) -> None:
    # weakref.finalize callback: a freed cache's graphs would otherwise keep its buffers alive
    st = state_ref()
    if st is not None:
        st.forget_cache(cache_id)


def params_signature(model) -> tuple:
    """Storage addresses of every parameter: changes when one is replaced, re-assigned or moved."""
    return tuple(p.data_ptr() for p in model.parameters())


class PatchState:
    def __init__(self, model, plan: ModelPlan, report, options: dict):
        self.model_ref = model
        self.plan, self.report, self.options = plan, report, options
        self.cache_key = cache_kwarg_name(model)
        self.decode = DecodeState(plan)
        self.cache: BraidCache | None = None
        self.lock = threading.RLock()
        self.graphs = None                 # SafeGraphRunner, created lazily on CUDA
        self.fast_loops: dict = {}         # runtime.fastgen.FastLoop per (bucket, cache, K, selection)
        self.last_path = None              # which generate() path ran last (for reports and tests)
        self.stats = {"decode_fused": 0, "decode_graph": 0, "stock_forward": 0, "generate_fast": 0,
                      "generate_hf_loop": 0, "generate_stock": 0}
        self._warned: set[str] = set()
        self.orig_forward = None           # set by api.patch: the class's forward bound to the model
        self.verified = not options.get("verify")
        self.verify_result: dict | None = None
        self.eager_only = False            # verification compares the kernels, not graph capture
        self.params_sig = params_signature(model)

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)
            self.report.events.append(msg)

    # -- fallbacks -------------------------------------------------------------------------------
    def check_params(self, full: bool) -> bool:
        """False (and patched paths off) when the parameters are no longer the ones patch() fused.

        The cheap check (one pointer, lm_head dtype/device) runs every forward; the full one (every
        parameter's address) runs once per generate() and prefill, where it costs nothing that shows."""
        if self.options.get("disabled"):
            return False
        moved = self.decode.weights_moved() or (full and params_signature(self.model_ref) != self.params_sig)
        if moved:
            self.warn_once("moved", "braid: the model's parameters were moved, cast or replaced after patch(); "
                                    "running stock from now on (call unpatch() and patch() again)")
            self.disable()
        return not moved

    def disable(self) -> None:
        """Run stock from now on. Graphs go now; the fused weights and the shared cache (which a call
        in progress may still be using) go with unpatch()."""
        with self.lock:
            self.options["disabled"] = True
            self.fast_loops.clear()
            if self.graphs is not None:
                self.graphs.release()
                self.graphs = None

    def drop_runtime(self) -> None:
        self.fast_loops.clear()
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        if self.cache is not None:
            self.cache.release()
            self.cache = None

    def graphs_active(self) -> bool:
        return bool(self.options.get("graphs")) and self.decode.device.type == "cuda" and not self.eager_only

    def graph_runner(self) -> GraphRunner:
        if self.graphs is None:
            self.graphs = SafeGraphRunner(self)
        return self.graphs

    def graph_capture_failed(self, exc: BaseException) -> None:
        self.options["graphs"] = False
        self.report.options["graphs"] = False
        self.warn_once("graphs", f"braid: CUDA graph capture failed ({type(exc).__name__}: {exc}); decode steps "
                                 "run the fused kernels without graphs from now on")
        self.fast_loops.clear()
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        if self.decode.device.type == "cuda":
            try:  # a failed capture can leave pending work or a poisoned stream; surface it here, not later
                torch.cuda.synchronize(self.decode.device)
                torch.cuda.empty_cache()
            except Exception as e:  # pragma: no cover - GPU only
                log.warning("braid: after the failed capture: %s", e)

    def maybe_verify(self, model, input_ids, attention_mask) -> None:
        """patch(verify=True): compare a few decode steps with stock on the first call that has ids."""
        if self.verified or input_ids is None or input_ids.dim() != 2 or input_ids.numel() == 0:
            return
        with self.lock:
            if self.verified:
                return
            self.verified = True  # before running: the check itself goes through this forward
            from ..verify import verify_patch

            verify_patch(self, model, input_ids, attention_mask)

    # -- caches ----------------------------------------------------------------------------------
    def new_cache(self, batch: int, length: int) -> BraidCache:
        p = self.plan
        c = BraidCache(len(p.layers), batch_bucket(batch), p.n_kv_heads, round_up(max(length, 1), LEN_ROUND),
                       p.head_dim, self.decode.dtype, self.decode.device, owner_id=id(self))
        weakref.finalize(c, _forget_cache, weakref.ref(self), c.serial)
        return c

    def forget_cache(self, cache_id: int) -> None:
        """Drop graphs and loops captured on a cache that is gone (keys hold its serial number)."""
        runner = self.graphs
        if runner is not None:
            for k in [k for k in list(runner.graphs) if k[1] == cache_id]:
                runner.graphs.pop(k, None)
        for k in [k for k in list(self.fast_loops) if k[1] == cache_id]:
            self.fast_loops.pop(k, None)

    def shared_cache(self, batch: int, length: int) -> BraidCache:
        """The state's reusable cache (re-allocated only when too small), reset to empty."""
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
        return isinstance(cache, BraidCache) and cache.owner_id == id(self) and cache.valid is not None

    def release(self) -> None:
        self.drop_runtime()
        self.decode.release()

    # -- forward ---------------------------------------------------------------------------------
    def can_decode(self, input_ids, inputs_embeds, labels, cache, kwargs) -> str | None:
        """None when the fused decode step applies, else the reason it does not."""
        if not self.owns(cache):
            return "no braid cache"
        if input_ids is None or inputs_embeds is not None:
            return "inputs_embeds"
        if input_ids.shape[1] != 1 or cache.seen == 0:
            return "prefill"
        if labels is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return "labels/attentions/hidden states requested"
        if torch.is_grad_enabled():
            return "grad mode"
        if input_ids.shape[0] > cache.batch_capacity:
            return "batch larger than the cache"
        return None

    def _stock(self, model, orig_forward, cache, kw: dict):
        """The unpatched forward. A braid cache it continues must match the model's current weights."""
        if self.owns(cache):
            w = self.plan.lm_head.weight
            if cache.dtype != w.dtype or cache.k[0].device != w.device:
                raise RuntimeError(
                    f"braid: this cache was filled for {cache.dtype} on {cache.k[0].device}, but the model is now "
                    f"{w.dtype} on {w.device} (moved after patch()); start the sequence again without it")
            x = kw["input_ids"] if kw.get("input_ids") is not None else kw.get("inputs_embeds")
            T = x.shape[1] if x is not None else 0
            if cache.seen + T > cache.max_len:
                with self.lock:
                    self.grow(cache, cache.seen + T)
        self.stats["stock_forward"] += 1
        return orig_forward(**kw, **{self.cache_key: cache})

    def forward(self, model, orig_forward, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        cache = pop_cache_kwarg(kwargs)
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **kwargs)
        starts = cache is None or (self.owns(cache) and cache.seen == 0)
        self.check_params(full=starts)
        if starts and not self.options.get("disabled") and not model.training:
            self.maybe_verify(model, input_ids, attention_mask)
        if self.options.get("disabled"):
            return self._stock(model, orig_forward, cache, kw)
        if model.training:  # dropout and friends: the fused step implements inference only
            self.warn_once("training", "braid: model is in training mode; forward() runs stock until eval()")
            return self._stock(model, orig_forward, cache, kw)
        why = self.can_decode(input_ids, inputs_embeds, labels, cache, kwargs)
        if why is None:
            with self.lock:
                return self.decode_step(input_ids, attention_mask, position_ids, cache)
        if why == "grad mode":
            self.warn_once("grad", "braid: forward() called with grad enabled; the decode step ran stock "
                                   "(wrap inference in torch.no_grad() or torch.inference_mode())")
        if use_cache is None:
            use_cache = model.config.use_cache
            kw["use_cache"] = use_cache
        x = input_ids if input_ids is not None else inputs_embeds
        if cache is None and use_cache and x is not None and labels is None:
            cache = self.new_cache(x.shape[0], x.shape[1] + LEN_ROUND)
        if self.owns(cache):
            B, T = x.shape[0], x.shape[1]
            if B > cache.batch_capacity:
                raise ValueError(f"braid cache holds {cache.batch_capacity} sequences; this call has {B}")
            if cache.seen + T > cache.max_len:
                with self.lock:
                    self.grow(cache, cache.seen + T)
            cache.mark_prefill(attention_mask, B, T)
        self.stats["stock_forward"] += 1
        return orig_forward(**kw, **{self.cache_key: cache})

    @torch.no_grad()
    def decode_step(self, input_ids, attention_mask, position_ids, cache: BraidCache):
        B, seen = input_ids.shape[0], cache.seen
        if seen + 1 > cache.max_len:
            self.grow(cache, seen + 1)
        self.decode.ensure_rope_table(cache.max_len)
        valid_col = cache.valid[:B, seen]
        if attention_mask is not None:
            valid_col.copy_(attention_mask[:, -1])
        else:
            valid_col.fill_(1)
        logits = None
        if self.graphs_active():
            try:
                logits = self.graph_runner().step(input_ids, position_ids, cache)
                self.stats["decode_graph"] += 1
            except GraphCaptureFailed:
                logits = None  # graphs are off now; this very step runs eagerly below
        if logits is None:
            b = self.decode.buffers_for(B, cache.max_len)
            b.ids.copy_(input_ids[:, -1])
            if position_ids is not None:
                b.pos.copy_(position_ids[:, -1])
            else:
                b.pos.fill_(seen)
            b.slots.fill_(seen)
            b.kv_lens.fill_(seen + 1)
            logits = self.decode.forward(cache, b)
            self.stats["decode_fused"] += 1
        cache.seen = seen + 1
        # clone: the step's buffers are reused by the next step, a caller may keep these logits
        return CausalLMOutputWithPast(logits=logits[:B, None].clone(), **{self.cache_key: cache})

    def grow(self, cache: BraidCache, need: int) -> None:
        """Give the cache more positions (outside any captured graph; graphs re-capture on the new buffers)."""
        new_len = round_up(max(need, 2 * cache.max_len), LEN_ROUND)
        log.info("braid: growing the KV cache from %d to %d positions", cache.max_len, new_len)
        cache.grow(new_len)
