"""The patched model.generate: route each call to the fastest path that reproduces HF's behaviour.

1. fast path: HF's generate() with our decoding method (`custom_generate=`): prefill (from a CUDA graph
   per prompt-length bucket from the bucket's second use on: runtime/prefill.py), then the K-step
   device loop (runtime/loop.py) from CUDA graphs with device-side token selection; only for the
   settings hf/select.py recognises. HF keeps input validation, generation-config defaults, mask
   inference, num_return_sequences expansion and the prompt's streamer.put.
2. HF's own loop with the braid cache: every step goes through the patched forward (fused kernels,
   graph replay on CUDA). Everything HF supports that needs per-step host logic lands here.
3. stock: beam search, assisted decoding, a cache the caller passed, other cache implementations.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..runtime.cache import batch_bucket
from ..runtime.graphs import GraphCaptureFailed
from ..runtime.loop import decode_tokens
from ..runtime.prefill import MASKLESS_PREFILL_TOKEN_CAP, PREFILL_TOKEN_CAP, prefill_bucket
from ..session import PatchSession
from .causal_mask import causal_without_mask, maskless_reason
from .compat import cache_kwarg_name, stock_forward, stock_generate
from .forward import maybe_verify
from .select import max_length_of, select_config

log = logging.getLogger("braid_backend")

# The eager prefill of B x T tokens above this runs a group of max(1, this // T) rows at a time, each
# writing its rows of the braid cache. One forward's activations grow with B * T: Llama-3.1-8B at batch 8
# x 32768 tokens OOMed on an 80 GB H100 (stock, HF static and braid alike) asking for 7 GiB at once,
# 262144 tokens x 14336 (MLP width) x 2 bytes. 32768 tokens bound that tensor to ~0.9 GiB on such a
# model. The price is G forwards instead of one, each still long enough to keep the GEMMs large
# (GPU-unmeasured); below the budget nothing changes.
PREFILL_ROW_TOKENS = 32768

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
_LOOP_KWARGS = {"attention_mask", "position_ids", "use_cache", "cache", "past_key_values", "logits_to_keep",
                "synced_gpus", "streamer", "output_attentions", "output_hidden_states", "return_dict"}


class PatchedGenerate:
    """What `model.generate` is while patched. It holds the session, which holds the model weakly."""

    def __init__(self, session: PatchSession):
        self.session = session

    def __call__(self, *args, **kwargs):
        return braid_generate(self.session, self.session.model, *args, **kwargs)


def resolve_generation_config(model, kwargs: dict):
    cfg = kwargs.get("generation_config")
    cfg = copy.deepcopy(cfg if cfg is not None else model.generation_config)
    cfg.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return cfg


def stock_reason(cfg, kwargs: dict) -> str | None:
    """Why this generate() call must run fully stock, or None."""
    if any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
        return "the caller passed its own cache"
    if (getattr(cfg, "num_beams", 1) or 1) > 1:
        return "beam search"
    if kwargs.get("assistant_model") is not None or getattr(cfg, "prompt_lookup_num_tokens", None):
        return "assisted decoding"
    if getattr(cfg, "cache_implementation", None) not in (None, "dynamic"):
        return f"cache_implementation={cfg.cache_implementation!r}"
    if getattr(cfg, "use_cache", True) is False:
        return "use_cache=False"
    return None


def input_ids_of(args, kwargs):
    x = kwargs.get("input_ids", kwargs.get("inputs"))
    if x is None and args:
        x = args[0]
    return x if isinstance(x, torch.Tensor) else None


def input_tensor(args, kwargs):
    """input_ids (or inputs), else inputs_embeds: what sizes the cache and must sit on the model's device."""
    x = input_ids_of(args, kwargs)
    return x if x is not None else kwargs.get("inputs_embeds")


def input_shape(args, kwargs) -> tuple[int, int] | None:
    x = input_tensor(args, kwargs)
    if x is None or not hasattr(x, "shape") or x.dim() < 2:
        return None
    return int(x.shape[0]), int(x.shape[1])


def _rng_state(device):
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if cuda else None)


def _set_rng_state(state, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def braid_generate(s: PatchSession, model, *args, **kwargs):
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
        maybe_verify(s, model, input_ids_of(args, kwargs), kwargs.get("attention_mask"))
    if s.disabled:
        s.status.last_path = "stock (disabled)"
        return orig_generate(*args, **kwargs)
    cfg = resolve_generation_config(model, kwargs)
    why = stock_reason(cfg, kwargs)
    if why is None and model.training:
        why = "model is in training mode"
    shape = input_shape(args, kwargs)
    if why is None and shape is None:
        why = "no input_ids/inputs_embeds tensor to size the cache from"
    x = input_tensor(args, kwargs)
    if why is None and isinstance(x, torch.Tensor) and x.device != s.step.device:
        # stock warns and carries on (what it then does is HF's business); we never guess
        why = f"inputs are on {x.device}, the model on {s.step.device}"
    if why is not None:
        log.info("braid: generate() runs stock: %s", why)
        s.status.stats["generate_stock"] += 1
        s.status.last_path = f"stock ({why})"
        return orig_generate(*args, **kwargs)
    B, T = shape
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
        if kwargs.get("custom_generate") is None:
            kwargs["custom_generate"] = _decoding_method(s, cache)
            # HF hands a callable custom_generate only the keyword arguments that _sample lacks, so
            # the streamer travels under its own name too (HF still puts the prompt to it itself)
            if kwargs.get("streamer") is not None:
                kwargs["braid_streamer"] = kwargs["streamer"]
        else:
            s.status.last_path = "hf (custom_generate given)"
            s.status.stats["generate_hf_loop"] += 1
        return orig_generate(*args, **kwargs)


def _decoding_method(s: PatchSession, cache):
    def decoding_method(model_self, input_ids, braid_streamer=None, **kw):
        kw["streamer"] = braid_streamer
        rng = _rng_state(s.step.device)
        try:
            return fast_decode(s, model_self, input_ids, **kw)
        except GraphCaptureFailed:
            # graphs are off now. Nothing was streamed or returned yet (the loop is built before the
            # first token is picked): redo the prefill into the same cache with the RNG as it was,
            # so a seeded call draws what it would have drawn
            cache.seen = 0
            _set_rng_state(rng, s.step.device)
            return fast_decode(s, model_self, input_ids, **kw)

    return decoding_method


def fast_path_reason(s: PatchSession, generation_config, model_kwargs, cache_key: str) -> str | None:
    if not s.options.fast_generate:
        return "fast_generate=False"
    for flag in _UNSUPPORTED_OUTPUTS:
        if getattr(generation_config, flag, False):
            return f"{flag}=True"
    if model_kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds"
    if not s.owns(model_kwargs.get(cache_key)):
        return "no braid cache"
    extra = set(model_kwargs) - _LOOP_KWARGS
    if extra:
        return f"model kwargs {sorted(extra)}"
    return None


def fast_decode(s: PatchSession, model, input_ids, logits_processor, stopping_criteria, generation_config,
                streamer=None, **model_kwargs):
    """HF decoding-method signature; returns what HF's _sample returns."""
    B, T = input_ids.shape
    key = cache_kwarg_name(model)
    sel_cfg, why = select_config(logits_processor, stopping_criteria, generation_config, T)
    why = why or fast_path_reason(s, generation_config, model_kwargs, key)
    if why is not None:
        log.info("braid: generate() decode loop is HF's (%s); steps still run the fused forward", why)
        s.status.last_path = f"hf-loop ({why})"
        s.status.stats["generate_hf_loop"] += 1
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                   streamer=streamer, **model_kwargs)
    s.status.stats["generate_fast"] += 1
    s.status.last_path = "fast"
    new = max_length_of(stopping_criteria, T + 20) - T
    cache = model_kwargs[key]
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    seq = input_ids
    if new > 0:
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        last = graph_prefill(s, model, cache, input_ids, mask, key)
        if last is None:
            last = eager_prefill(model, cache, input_ids, mask, pos, key)
        s.step.prepare(cache.max_len)
        loop = s.fast_loop(cache, min(batch_bucket(B), cache.batch_capacity), s.options.graph_steps, sel_cfg)
        tokens = decode_tokens(loop, cache, input_ids, last, pos[:, -1] + 1, new, streamer)
        seq = torch.cat([input_ids, tokens], dim=1)
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=seq, **{key: cache})
    return seq


def eager_prefill(model, cache, input_ids, mask, pos, key: str) -> torch.Tensor:
    """The prompt's (B, V) last-position logits from the patched forward (stock HF modules writing the
    braid cache), the whole batch in one forward or, above PREFILL_ROW_TOKENS, a group of rows at a time."""
    B, T = input_ids.shape

    def forward(rows: slice):
        out = model(input_ids=input_ids[rows], attention_mask=mask[rows], position_ids=pos[rows], use_cache=True,
                    logits_to_keep=1, **{key: cache})
        return out.logits[:, -1]

    if B <= 1 or B * T <= PREFILL_ROW_TOKENS:
        return forward(slice(None))
    R = max(1, PREFILL_ROW_TOKENS // T)
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


def prefill_token_cap(model) -> int:
    """The prefill graphs' B * Tb cap for this model: higher where the captured forward gets no mask
    (runtime/prefill.py has the measurements)."""
    return MASKLESS_PREFILL_TOKEN_CAP if maskless_reason(model) is None else PREFILL_TOKEN_CAP


def prefill_graph_reason(s: PatchSession, cache, input_ids, mask) -> str | None:
    """Why this prompt's prefill cannot replay a graph (runtime/prefill.py), or None."""
    if not s.prefill_graphs_active():
        return "prefill graphs off"
    if getattr(s.step, "tp", None) is not None:
        # every rank would have to capture and replay in step with the others' collectives
        return "tensor parallel"
    if not s.owns(cache):
        return "no braid cache"
    why = s.prefill_graphs(prefill_token_cap(s.model)).reason(cache, *input_ids.shape)
    if why is not None:
        return why
    # the graph's positions are 0..Tb-1 with no mask: left padding needs the eager prefill. One host
    # sync, after the checks that cost nothing
    if mask is not None and not bool(mask.all()):
        return "attention mask has padding"
    if input_ids.device.type != "cuda":   # cannot happen with graphs on (inputs sit on the model's device)
        return f"inputs on {input_ids.device.type}"
    return None


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


def graph_prefill(s: PatchSession, model, cache, input_ids, mask, key: str):
    """The prompt's (B, V) last-position logits from a prefill graph, the cache filled; None: the caller
    runs the eager prefill (not eligible, first use of the length bucket, or the capture failed)."""
    why = prefill_graph_reason(s, cache, input_ids, mask)
    if why is not None:
        return None
    logits = s.prefill_graphs().run(cache, input_ids, prefill_forward(model, cache, key))
    if logits is not None:
        s.status.stats["prefill_graph"] += 1
    return logits
