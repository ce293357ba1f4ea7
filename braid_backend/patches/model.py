"""The model-facing side: PatchState and the forward() that routes decode steps to fused kernels.

Only the CausalLM's `forward` and `generate` are replaced (as instance attributes, so unpatch is a
`del`); the HF modules stay in place and run prefill, filling the braid cache through `Cache.update`.
"""
from __future__ import annotations

import logging
import threading

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..runtime.cache import BraidCache, round_up
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
    return round_up(b, 64)


class PatchState:
    def __init__(self, model, plan: ModelPlan, report, options: dict):
        self.model_ref = model
        self.plan, self.report, self.options = plan, report, options
        self.cache_key = cache_kwarg_name(model)
        self.decode = DecodeState(plan)
        self.cache: BraidCache | None = None
        self.lock = threading.RLock()
        self.graphs = None                 # runtime.graphs.GraphRunner, created lazily on CUDA
        self.fast_loops: dict = {}         # runtime.fastgen.FastLoop per (bucket, cache, K, selection)
        self.last_path = None              # which generate() path ran last (for reports and tests)
        self.stats = {"decode_fused": 0, "decode_graph": 0, "stock_forward": 0, "generate_fast": 0,
                      "generate_hf_loop": 0, "generate_stock": 0}
        self._warned: set[str] = set()

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)
            self.report.events.append(msg)

    # -- caches ----------------------------------------------------------------------------------
    def new_cache(self, batch: int, length: int) -> BraidCache:
        p = self.plan
        return BraidCache(len(p.layers), batch_bucket(batch), p.n_kv_heads, round_up(max(length, 1), LEN_ROUND),
                          p.head_dim, self.decode.dtype, self.decode.device, owner_id=id(self))

    def shared_cache(self, batch: int, length: int) -> BraidCache:
        """The state's reusable cache (re-allocated only when too small), reset to empty."""
        c = self.cache
        if c is None or not c.fits(batch, length) or c.valid is None:
            if c is not None:
                c.release()
                self.cache = None
            c = self.cache = self.new_cache(batch, length)
        c.seen = 0
        return c

    def owns(self, cache) -> bool:
        return isinstance(cache, BraidCache) and cache.owner_id == id(self) and cache.valid is not None

    def release(self) -> None:
        self.fast_loops.clear()
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        if self.cache is not None:
            self.cache.release()
            self.cache = None
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

    def forward(self, model, orig_forward, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        cache = pop_cache_kwarg(kwargs)
        if self.decode.weights_moved():
            self.warn_once("moved", "braid: the model's parameters were moved or replaced after patch(); "
                                    "running stock from now on (call unpatch() and patch() again)")
            self.options["disabled"] = True
        if self.options.get("disabled"):
            return orig_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                **{self.cache_key: cache}, **kwargs)
        why = self.can_decode(input_ids, inputs_embeds, labels, cache, kwargs)
        if why is None:
            with self.lock:
                return self.decode_step(input_ids, attention_mask, position_ids, cache)
        if why == "grad mode":
            self.warn_once("grad", "braid: forward() called with grad enabled; the decode step ran stock "
                                   "(wrap inference in torch.no_grad() or torch.inference_mode())")
        if use_cache is None:
            use_cache = model.config.use_cache
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
        return orig_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                            **{self.cache_key: cache}, **kwargs)

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
        use_graph = self.options.get("graphs") and self.decode.device.type == "cuda"
        if use_graph:
            from ..runtime.graphs import GraphRunner

            if self.graphs is None:
                self.graphs = GraphRunner(self)
            logits = self.graphs.step(input_ids, position_ids, cache)
            self.stats["decode_graph"] += 1
        else:
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
