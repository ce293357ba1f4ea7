"""generate(): route each call to the fastest path that reproduces HF's behaviour exactly.

1. fast path (runtime.fastgen): prefill, then K decode steps per host round-trip from CUDA graphs with
   device-side token selection; only for settings it implements.
2. HF's own loop with the braid cache: every step goes through the patched forward (fused kernels,
   graph replay on CUDA). Everything HF supports that needs per-step host logic lands here.
3. stock: beam search, assisted decoding, a cache the caller passed, other cache implementations.
"""
from __future__ import annotations

import copy
import logging

import torch

from .model import GraphCaptureFailed

log = logging.getLogger("braid_backend")


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


def braid_generate(st, model, orig_generate, *args, **kwargs):
    st.check_params(full=True)
    if not st.options.get("disabled") and not model.training:
        ids = input_ids_of(args, kwargs)
        st.maybe_verify(model, ids, kwargs.get("attention_mask"))
    if st.options.get("disabled"):
        st.last_path = "stock (disabled)"
        return orig_generate(*args, **kwargs)
    cfg = resolve_generation_config(model, kwargs)
    why = stock_reason(cfg, kwargs)
    if why is None and model.training:
        why = "model is in training mode"
    shape = input_shape(args, kwargs)
    if why is None and shape is None:
        why = "no input_ids/inputs_embeds tensor to size the cache from"
    x = input_tensor(args, kwargs)
    if why is None and isinstance(x, torch.Tensor) and x.device != st.decode.device:
        # stock warns and carries on (what it then does is HF's business); we never guess
        why = f"inputs are on {x.device}, the model on {st.decode.device}"
    if why is not None:
        log.info("braid: generate() runs stock: %s", why)
        st.stats["generate_stock"] += 1
        st.last_path = f"stock ({why})"
        return orig_generate(*args, **kwargs)
    B, T = shape
    B *= max(1, getattr(cfg, "num_return_sequences", 1) or 1)
    new = cfg.max_new_tokens if cfg.max_new_tokens is not None else max(cfg.max_length - T, 0)
    K = int(st.options.get("graph_steps", 8))
    with st.lock:
        # K spare positions: a K-step graph may run past the last needed token, and its capture warms
        # up on the cache's last K slots
        cache = st.shared_cache(B, T + new + K + 1)
        kwargs[st.cache_key] = cache
        if st.graphs_active():
            st.graph_runner()   # before fastgen makes a plain GraphRunner: capture failures must fall back
        if kwargs.get("custom_generate") is None:
            kwargs["custom_generate"] = _decoding_method(st, cache)
            # HF hands a callable custom_generate only the keyword arguments that _sample lacks, so
            # the streamer travels under its own name too (HF still puts the prompt to it itself)
            if kwargs.get("streamer") is not None:
                kwargs["braid_streamer"] = kwargs["streamer"]
        else:
            st.last_path = "hf (custom_generate given)"
            st.stats["generate_hf_loop"] += 1
        return orig_generate(*args, **kwargs)


def _decoding_method(st, cache):
    def decoding_method(model_self, input_ids, braid_streamer=None, **kw):
        from ..runtime import fastgen  # looked up per call: tests swap fast_generate to inject faults

        kw["streamer"] = braid_streamer

        rng = _rng_state(st.decode.device)
        try:
            return fastgen.fast_generate(st, model_self, input_ids, **kw)
        except GraphCaptureFailed:
            # graphs are off now. Nothing was streamed or returned yet (the loop is built before the
            # first token is picked): redo the prefill into the same cache with the RNG as it was,
            # so a seeded call draws what it would have drawn
            cache.seen = 0
            _set_rng_state(rng, st.decode.device)
            return fastgen.fast_generate(st, model_self, input_ids, **kw)

    return decoding_method
