"""The HF-facing side of a patched model: what model.generate and model.forward run while patched.

HFRunner holds the PatchSession (which holds the model only weakly) and runs the path hf/routing.py
picks, recording it in status() (last_route / last_prefill / last_forward):

  generate()  stock:   the unpatched generate (beam search, assisted decoding, a caller's cache, ...)
              hf-loop: HF's whole generate with the braid cache, every step the patched forward
              fast:    HF's generate with our decoding method (`custom_generate=`): HF keeps input
                       validation, generation-config defaults, mask inference, num_return_sequences
                       expansion and the prompt's streamer.put; our method prefills (from a CUDA graph per
                       prompt-length bucket from the bucket's second use on: runtime/prefill.py) and runs
                       the K-step device loop (runtime/loop.py), or hands the loop to HF's _sample
                       (processors or outputs it does not implement: still the patched forward per step)
  forward()   the fused decode step (a CUDA-graph replay on CUDA) for single-token steps on a braid
              cache; everything else (prefill, training, grad mode, labels, ...) the stock forward,
              writing the braid cache. Whatever cannot be served correctly runs stock rather than guessing.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..runtime.cache import LEN_ROUND, batch_bucket
from ..runtime.graphs import GraphCaptureFailed
from ..runtime.interface import fill_inputs
from ..runtime.loop import decode_tokens
from ..runtime.prefill import prefill_bucket
from ..session import PatchSession
from .causal_mask import causal_without_mask
from .compat import cache_kwarg_name, pop_cache_kwarg, stock_forward, stock_generate
from .routing import (DECODE_FUSED, DECODE_GRAPH, GRAD_MODE, HF_LOOP, PREFILL_EAGER, PREFILL_GRAPH, STOCK,
                      decode_loop_route, forward_route, generate_route, maskless_reason, prefill_route, route)
from .select import max_length_of
from .verify import Verifier

log = logging.getLogger("braid_backend")

# The eager prefill of B x T tokens above this runs a group of max(1, this // T) rows at a time, each
# writing its rows of the braid cache. One forward's activations grow with B * T: Llama-3.1-8B at batch 8
# x 32768 tokens OOMed on an 80 GB H100 (stock, HF static and braid alike) asking for 7 GiB at once,
# 262144 tokens x 14336 (MLP width) x 2 bytes. 32768 tokens bound that tensor to ~0.9 GiB on such a
# model. The price is G forwards instead of one, each still long enough to keep the GEMMs large
# (GPU-unmeasured); below the budget nothing changes.
PREFILL_ROW_TOKENS = 32768

_R_DECODE_GRAPH, _R_DECODE_FUSED = route(DECODE_GRAPH), route(DECODE_FUSED)


class PatchedForward:
    """What `model.forward` is while patched (HF reads its (*args, **kwargs) signature as before)."""

    def __init__(self, runner: "HFRunner"):
        self.runner = runner

    def __call__(self, *args, **kwargs):
        if args:  # HF forwards take input_ids first positionally
            if len(args) > 1:
                raise TypeError("braid-patched forward takes input_ids positionally and the rest by keyword")
            if "input_ids" in kwargs:
                raise TypeError("forward() got input_ids both positionally and by keyword")
            kwargs["input_ids"] = args[0]
        return self.runner.forward(**kwargs)


class PatchedGenerate:
    """What `model.generate` is while patched."""

    def __init__(self, runner: "HFRunner"):
        self.runner = runner

    def __call__(self, *args, **kwargs):
        return self.runner.generate(*args, **kwargs)


class HFRunner:
    """generate() and forward() of one patched model: the stock path, HF's loop and the fast path."""

    def __init__(self, session: PatchSession):
        self.session = session
        self.prefill_row_tokens = PREFILL_ROW_TOKENS   # per model, so a test can lower it on one

    # -- generate() --------------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        s = self.session
        s.status.last_route = s.status.last_error = None   # a call that raises leaves no stale path
        try:
            return self._generate(s.model, args, kwargs)
        except BaseException as e:
            s.status.last_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            s.collect_step_events()

    def _generate(self, model, args, kwargs):
        s = self.session
        orig_generate = stock_generate(model)
        # before any path (stock fallbacks too): tensor-parallel ranks that sample apart feed different
        # tokens into the same all-reduces and stop at different steps, i.e. hang. Every rank takes rank
        # 0's random state (agree is a no-op on one device; the state is then set back unchanged).
        rng = _rng_state(s.step.device)
        for t in rng:
            if t is not None:
                s.step.agree(t)
        _set_rng_state(rng, s.step.device)
        s.check_params(full=True)
        if not s.disabled and not model.training:
            self.maybe_verify(model, input_ids_of(args, kwargs), kwargs.get("attention_mask"))
        cfg = None if s.disabled else resolve_generation_config(model, kwargs)
        x = input_tensor(args, kwargs)
        r = generate_route(s, model, cfg, x, kwargs)
        s.record("generate", r)
        if r.path == STOCK:
            s.status.stats["generate_stock"] += 1
            return orig_generate(*args, **kwargs)
        B, T = int(x.shape[0]), int(x.shape[1])
        B *= max(1, getattr(cfg, "num_return_sequences", 1) or 1)
        new = cfg.max_new_tokens if cfg.max_new_tokens is not None else max(cfg.max_length - T, 0)
        K = s.options.graph_steps
        with s.lock:
            # K spare positions: a K-step graph may run past the last needed token, and its capture warms
            # up on the cache's last K slots
            need = T + new + K + 1
            if s.prefill_graphs_active() and T > 0:
                # room for the padded prompt of a prefill graph, so that a short generation never grows the
                # cache (a re-allocation re-captures every graph) or misses the graph for want of slots
                need = max(need, prefill_bucket(T))
            cache = s.shared_cache(B, need)
            kwargs[cache_kwarg_name(model)] = cache
            if r.path == HF_LOOP:   # HF's own generate and loop; each step the patched forward
                s.status.stats["generate_hf_loop"] += 1
                return orig_generate(*args, **kwargs)
            kwargs["custom_generate"] = self._decoding_method(cache)
            # HF hands a callable custom_generate only the keyword arguments that _sample lacks, so
            # the streamer travels under its own name too (HF still puts the prompt to it itself)
            if kwargs.get("streamer") is not None:
                kwargs["braid_streamer"] = kwargs["streamer"]
            return orig_generate(*args, **kwargs)

    def _decoding_method(self, cache):
        s = self.session

        def decoding_method(model_self, input_ids, braid_streamer=None, **kw):
            kw["streamer"] = braid_streamer
            rng = _rng_state(s.step.device)
            try:
                return self.decode(model_self, input_ids, **kw)
            except GraphCaptureFailed:
                # graphs are off now. Nothing was streamed or returned yet (the loop is built before the
                # first token is picked): redo the prefill into the same cache with the RNG as it was,
                # so a seeded call draws what it would have drawn
                cache.seen = 0
                _set_rng_state(rng, s.step.device)
                return self.decode(model_self, input_ids, **kw)

        return decoding_method

    def decode(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
               streamer=None, **model_kwargs):
        """Our decoding method (HF's _sample signature; returns what _sample returns): the device loop,
        or HF's _sample where the loop does not reproduce HF (routing.decode_loop_route)."""
        s = self.session
        B, T = input_ids.shape
        key = cache_kwarg_name(model)
        r, sel_cfg = decode_loop_route(s, logits_processor, stopping_criteria, generation_config, model_kwargs,
                                       key, T)
        s.record("generate", r)
        if r.path == HF_LOOP:
            s.status.stats["generate_hf_loop"] += 1
            return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                       streamer=streamer, **model_kwargs)
        s.status.stats["generate_fast"] += 1
        new = max_length_of(stopping_criteria, T + 20) - T
        cache = model_kwargs[key]
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        seq = input_ids
        if new > 0:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            last = self.prefill(model, cache, input_ids, mask, pos, key)
            s.step.prepare(cache.max_len)
            loop = s.fast_loop(cache, min(batch_bucket(B), cache.batch_capacity), s.options.graph_steps, sel_cfg)
            tokens = decode_tokens(loop, cache, input_ids, last, pos[:, -1] + 1, new, streamer)
            steps = tokens.shape[1] - 1   # the first token comes from the prefill's logits
            s.status.stats["decode_fused"] += steps
            if loop.graph is not None:
                s.status.stats["decode_graph"] += steps
            seq = torch.cat([input_ids, tokens], dim=1)
        if streamer is not None:
            streamer.end()
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=seq, **{key: cache})
        return seq

    # -- the fast path's prefill --------------------------------------------------------------------
    def prefill(self, model, cache, input_ids, mask, pos, key: str) -> torch.Tensor:
        """The prompt's (B, V) last-position logits, the cache filled: a prefill graph where it applies
        and is captured, else the eager prefill."""
        s = self.session
        r = prefill_route(s, cache, input_ids, mask)
        if r.path == PREFILL_GRAPH:
            last = s.prefill_graphs().run(cache, input_ids, prefill_forward(model, cache, key))
            if last is not None:
                s.status.stats["prefill_graph"] += 1
                s.record("prefill", r)
                return last
            r = route(PREFILL_EAGER, "first use of this prompt-length bucket" if s.prefill_graphs_active()
                      else "prefill graph capture failed")
        s.record("prefill", r)
        return eager_prefill(model, cache, input_ids, mask, pos, key, self.prefill_row_tokens)

    # -- forward() ---------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, **kwargs):
        s = self.session
        try:
            return self._forward(s.model, input_ids, attention_mask, position_ids, inputs_embeds, labels,
                                 use_cache, kwargs)
        finally:
            s.collect_step_events()

    def _forward(self, model, input_ids, attention_mask, position_ids, inputs_embeds, labels, use_cache, kwargs):
        s = self.session
        cache = pop_cache_kwarg(kwargs)
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **kwargs)
        starts = cache is None or (s.owns(cache) and cache.seen == 0)
        s.check_params(full=starts)
        if starts and not s.disabled and not model.training:
            self.maybe_verify(model, input_ids, attention_mask)
        r = forward_route(s, model, input_ids, inputs_embeds, labels, cache, kwargs)
        if r.path != STOCK:
            with s.lock:
                return self._decode_step(model, input_ids, attention_mask, position_ids, cache)
        s.record("forward", r)
        if s.disabled or model.training:
            if not s.disabled:
                s.warn_once("training", "braid: model is in training mode; forward() runs stock until eval()")
            return self._stock_forward(model, cache, kw)
        if r.reason == GRAD_MODE:
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
            if cache.row0 + B > cache.batch_capacity:   # row0: a row group of a chunked prefill (eager_prefill)
                raise ValueError(f"braid cache holds {cache.batch_capacity} sequences; this call has {B}"
                                 + (f" from row {cache.row0}" if cache.row0 else ""))
            if cache.seen + T > cache.max_len:
                with s.lock:
                    s.grow(cache, cache.seen + T)
            cache.mark_prefill(attention_mask, B, T)
        s.status.stats["stock_forward"] += 1
        return stock_forward(model)(**kw, **{cache_kwarg_name(model): cache})

    def _stock_forward(self, model, cache, kw: dict):
        """The unpatched forward (patch disabled, training). A braid cache it continues must match the
        model's current weights."""
        s = self.session
        if s.owns(cache):
            w = model.get_input_embeddings().weight   # always dense (a quantized lm_head may have no .weight)
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

    @torch.no_grad()
    def _decode_step(self, model, input_ids, attention_mask, position_ids, cache):
        s = self.session
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
                s.record("forward", _R_DECODE_GRAPH)
            except GraphCaptureFailed:
                logits = None  # graphs are off now; this very step runs eagerly below
        if logits is None:
            b = s.eager_buffers(B, cache.max_len)
            fill_inputs(b, cache, ids, pos, seen)
            logits = s.step.run(cache, b)
            s.record("forward", _R_DECODE_FUSED)
        s.status.stats["decode_fused"] += 1
        cache.seen = seen + 1
        # clone: the step's buffers are reused by the next step, a caller may keep these logits
        return CausalLMOutputWithPast(logits=logits[:B, None].clone(), **{cache_kwarg_name(model): cache})

    # -- verify=True -------------------------------------------------------------------------------
    def maybe_verify(self, model, input_ids, attention_mask) -> None:
        """verify=True: compare a few decode steps with stock on the first call that has ids."""
        s = self.session
        if not s.options.verify or s.status.verified:
            return
        if input_ids is None or input_ids.dim() != 2 or input_ids.numel() == 0:
            return
        with s.lock:
            if s.status.verified:
                return
            s.status.verified = True  # before running: the check itself goes through this forward
            Verifier(s).run(model, input_ids, attention_mask, patched=lambda **kw: self.forward(**kw))


# -- helpers that need no session ------------------------------------------------------------------
def resolve_generation_config(model, kwargs: dict):
    cfg = kwargs.get("generation_config")
    cfg = copy.deepcopy(cfg if cfg is not None else model.generation_config)
    cfg.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return cfg


def input_ids_of(args, kwargs):
    x = kwargs.get("input_ids", kwargs.get("inputs"))
    if x is None and args:
        x = args[0]
    return x if isinstance(x, torch.Tensor) else None


def input_tensor(args, kwargs):
    """input_ids (or inputs), else inputs_embeds: what sizes the cache and must sit on the model's device."""
    x = input_ids_of(args, kwargs)
    return x if x is not None else kwargs.get("inputs_embeds")


def _rng_state(device):
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if cuda else None)


def _set_rng_state(state, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def eager_prefill(model, cache, input_ids, mask, pos, key: str, row_tokens: int = PREFILL_ROW_TOKENS) -> torch.Tensor:
    """The prompt's (B, V) last-position logits from the patched forward (stock HF modules writing the
    braid cache), the whole batch in one forward or, above `row_tokens`, a group of rows at a time."""
    B, T = input_ids.shape

    def forward(rows: slice):
        out = model(input_ids=input_ids[rows], attention_mask=mask[rows], position_ids=pos[rows], use_cache=True,
                    logits_to_keep=1, **{key: cache})
        return out.logits[:, -1]

    if B <= 1 or B * T <= row_tokens:
        return forward(slice(None))
    R = max(1, row_tokens // T)
    G = -(-B // R)
    log.info("braid: prefill of %d x %d tokens in %d row groups of %d rows (memory)", B, T, G, R)
    last = []
    try:
        for r0 in range(0, B, R):
            # each group is a whole prompt from position 0 for its rows; the last layer's update leaves
            # seen = T, the same for every group
            cache.seen = 0
            with cache.rows(r0):
                last.append(forward(slice(r0, r0 + R)))
    except BaseException:
        # rows before the failed group hold their prompt, the rest do not: no length is true of all
        cache.seen = 0
        raise
    return torch.cat(last)


def prefill_forward(model, cache, key: str):
    """forward(ids, pos, keep) -> (B, 1, V) logits: the stock forward writing the braid cache. Made per
    call (stored, it would hold the model). attention_mask=None: HF then uses SDPA's is_causal or builds
    the causal / sliding-window mask on the device, never reading a mask on the host (which a capture
    forbids); logits_to_keep as a 1-element device index keeps the last real position of any T."""
    fwd = stock_forward(model)
    # the padded prompt has no padding before its end and the cache is empty: no mask is the exact
    # answer, and HF would otherwise build an explicit one under capture (hf/causal_mask.py)
    maskless = maskless_reason(model) is None

    def forward(ids, pos, keep):
        with causal_without_mask(model) if maskless else contextlib.nullcontext():
            return fwd(input_ids=ids, attention_mask=None, position_ids=pos, use_cache=True,
                       logits_to_keep=keep, **{key: cache}).logits

    return forward
