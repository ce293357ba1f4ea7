"""The patched model.forward: routes single-token decode steps to the fused DecodeStep, everything
else (prefill, training, grad mode, labels, ...) to the stock forward writing the braid cache.

Only the CausalLM's `forward` and `generate` are replaced (instance attributes set by api.patch, so
unpatch is a `del`); the HF modules stay in place and run prefill, filling the braid cache through
`Cache.update`. Whatever cannot be served correctly runs stock rather than guessing: parameters moved,
cast or replaced after patch(), training mode, grad mode, a failed verification (verify=True).
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..runtime.cache import LEN_ROUND, batch_bucket
from ..runtime.graphs import GraphCaptureFailed
from ..runtime.interface import fill_inputs
from ..session import PatchSession
from .compat import cache_kwarg_name, pop_cache_kwarg, stock_forward
from .verify import verify_patch


class PatchedForward:
    """What `model.forward` is while patched. It holds the session, which holds the model weakly."""

    def __init__(self, session: PatchSession):
        self.session = session

    def __call__(self, *args, **kwargs):
        if args:  # HF forwards take input_ids first positionally
            if len(args) > 1:
                raise TypeError("braid-patched forward takes input_ids positionally and the rest by keyword")
            if "input_ids" in kwargs:
                raise TypeError("forward() got input_ids both positionally and by keyword")
            kwargs["input_ids"] = args[0]
        return route(self.session, self.session.model, **kwargs)


def maybe_verify(s: PatchSession, model, input_ids, attention_mask) -> None:
    """verify=True: compare a few decode steps with stock on the first call that has ids."""
    if s.status.verified or input_ids is None or input_ids.dim() != 2 or input_ids.numel() == 0:
        return
    with s.lock:
        if s.status.verified:
            return
        s.status.verified = True  # before running: the check itself goes through this forward
        verify_patch(s, model, input_ids, attention_mask, patched=lambda **kw: route(s, model, **kw))


def decode_reason(s: PatchSession, input_ids, inputs_embeds, labels, cache, kwargs) -> str | None:
    """None when the fused decode step applies, else the reason it does not."""
    if not s.owns(cache):
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
    if cache.row0:   # the fused step reads and writes rows 0..B-1; the stock forward honours the offset
        return "cache rows offset"
    return None


def _stock(s: PatchSession, model, cache, kw: dict):
    """The unpatched forward. A braid cache it continues must match the model's current weights."""
    if s.owns(cache):
        w = model.get_output_embeddings().weight
        if cache.dtype != w.dtype or cache.k[0].device != w.device:
            raise RuntimeError(
                f"braid: this cache was filled for {cache.dtype} on {cache.k[0].device}, but the model is now "
                f"{w.dtype} on {w.device} (moved after patch()); start the sequence again without it")
        x = kw["input_ids"] if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        T = x.shape[1] if x is not None else 0
        if cache.seen + T > cache.max_len:
            with s.lock:
                s.grow(cache, cache.seen + T)
    s.status.stats["stock_forward"] += 1
    return stock_forward(model)(**kw, **{cache_kwarg_name(model): cache})


def route(s: PatchSession, model, input_ids=None, attention_mask=None, position_ids=None,
          inputs_embeds=None, labels=None, use_cache=None, **kwargs):
    cache = pop_cache_kwarg(kwargs)
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **kwargs)
    starts = cache is None or (s.owns(cache) and cache.seen == 0)
    s.check_params(full=starts)
    if starts and not s.disabled and not model.training:
        maybe_verify(s, model, input_ids, attention_mask)
    if s.disabled:
        return _stock(s, model, cache, kw)
    if model.training:  # dropout and friends: the fused step implements inference only
        s.warn_once("training", "braid: model is in training mode; forward() runs stock until eval()")
        return _stock(s, model, cache, kw)
    why = decode_reason(s, input_ids, inputs_embeds, labels, cache, kwargs)
    if why is None:
        with s.lock:
            return decode_step(s, model, input_ids, attention_mask, position_ids, cache)
    if why == "grad mode":
        s.warn_once("grad", "braid: forward() called with grad enabled; the decode step ran stock "
                            "(wrap inference in torch.no_grad() or torch.inference_mode())")
    if use_cache is None:
        use_cache = model.config.use_cache
        kw["use_cache"] = use_cache
    x = input_ids if input_ids is not None else inputs_embeds
    if cache is None and use_cache and x is not None and labels is None:
        cache = s.new_cache(x.shape[0], x.shape[1] + LEN_ROUND)
    if s.owns(cache):
        B, T = x.shape[0], x.shape[1]
        if cache.row0 + B > cache.batch_capacity:   # row0: a row group of a chunked prefill (hf/generate.py)
            raise ValueError(f"braid cache holds {cache.batch_capacity} sequences; this call has {B}"
                             + (f" from row {cache.row0}" if cache.row0 else ""))
        if cache.seen + T > cache.max_len:
            with s.lock:
                s.grow(cache, cache.seen + T)
        cache.mark_prefill(attention_mask, B, T)
    s.status.stats["stock_forward"] += 1
    return stock_forward(model)(**kw, **{cache_kwarg_name(model): cache})


@torch.no_grad()
def decode_step(s: PatchSession, model, input_ids, attention_mask, position_ids, cache):
    B, seen = input_ids.shape[0], cache.seen
    if seen + 1 > cache.max_len:
        s.grow(cache, seen + 1)
    s.step.prepare(cache.max_len)
    valid_col = cache.valid[:B, seen]
    if attention_mask is not None:
        valid_col.copy_(attention_mask[:, -1])
    else:
        valid_col.fill_(1)
    ids = input_ids[:, -1]
    pos = position_ids[:, -1] if position_ids is not None else None
    logits = None
    if s.graphs_active():
        try:
            bucket = min(batch_bucket(B), cache.batch_capacity)
            logits = s.graph_runner().step_once(cache, bucket, ids, pos, seen)
            s.status.stats["decode_graph"] += 1
        except GraphCaptureFailed:
            logits = None  # graphs are off now; this very step runs eagerly below
    if logits is None:
        b = s.eager_buffers(B, cache.max_len)
        fill_inputs(b, cache, ids, pos, seen)
        logits = s.step.run(cache, b)
        s.status.stats["decode_fused"] += 1
    cache.seen = seen + 1
    # clone: the step's buffers are reused by the next step, a caller may keep these logits
    return CausalLMOutputWithPast(logits=logits[:B, None].clone(), **{cache_kwarg_name(model): cache})
