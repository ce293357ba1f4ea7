"""Which path a call takes, and why: every call-level decision of the HF side, each a Route(path, reason).

    generate_route  one generate() call: "stock" (the unpatched generate), "hf-loop" (HF's whole generate
                    with the braid cache, every step the patched forward) or "fast" (HF's generate with our
                    decoding method, which may still hand its loop to HF: decode_loop_route)
    decode_loop_route  inside our decoding method: "fast" (device-side K-step loop) or "hf-loop"
    prefill_route   the fast path's prompt prefill: "prefill-graph" or "prefill-eager"
    forward_route   one forward() call: "decode-graph" / "decode-fused" (the fused step) or "stock"

hf/runner.py runs what these return and records it (status(model).last_route / last_prefill /
last_forward, one log line per distinct route). The CuPy backend's own choices (per model and bucket)
stay in model/cupy_step.py.
"""
from __future__ import annotations

import functools

import torch
from transformers.generation.configuration_utils import GenerationMode

from ..report import Route
from ..runtime.prefill import MASKLESS_PREFILL_TOKEN_CAP, PREFILL_TOKEN_CAP
from ..session import PatchSession
from .causal_mask import maskless_available
from .select import select_config

FAST, HF_LOOP, STOCK = "fast", "hf-loop", "stock"
DECODE_GRAPH, DECODE_FUSED = "decode-graph", "decode-fused"
PREFILL_GRAPH, PREFILL_EAGER = "prefill-graph", "prefill-eager"

TRAINING = "model is in training mode"
GRAD_MODE = "grad mode"

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
# model kwargs the fast loop handles (HF's own, or what it sets itself)
_LOOP_KWARGS = {"attention_mask", "position_ids", "use_cache", "cache", "past_key_values", "logits_to_keep",
                "synced_gpus", "streamer", "output_attentions", "output_hidden_states", "return_dict"}
_FAST_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


@functools.lru_cache(maxsize=256)
def route(path: str, reason: str | None = None) -> Route:
    """One Route object per (path, reason): the per-token forward builds none."""
    return Route(path, reason)


# -- generate() ------------------------------------------------------------------------------------
def generate_route(s: PatchSession, model, cfg, x, kwargs: dict) -> Route:
    """The path of one generate() call. `cfg`: the call's generation config; `x`: its input tensor."""
    if s.disabled:
        return route(STOCK, f"disabled: {s.status.disabled}")
    why = _stock_reason(s, model, cfg, x, kwargs)
    if why is not None:
        return route(STOCK, why)
    why = _hf_generate_reason(cfg, kwargs)
    if why is not None:
        return route(HF_LOOP, why)
    return route(FAST)


def _stock_reason(s: PatchSession, model, cfg, x, kwargs: dict) -> str | None:
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
    # contrastive search, DoLa, constrained beams, ...: HF would hand OUR decoding method these modes
    # (a callable custom_generate replaces any mode's), so only greedy and sampling may take it
    mode = cfg.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in _FAST_MODES:
        return f"generation mode {getattr(mode, 'value', mode)}"
    if model.training:
        return TRAINING
    if x is None or not hasattr(x, "shape") or x.dim() < 2:
        return "no input_ids/inputs_embeds tensor to size the cache from"
    if isinstance(x, torch.Tensor) and x.device != s.step.device:
        # stock warns and carries on (what it then does is HF's business); we never guess
        return f"inputs are on {x.device}, the model on {s.step.device}"
    return None


def _hf_generate_reason(cfg, kwargs: dict) -> str | None:
    """Why HF's own generate (its loop, with the braid cache) runs the call instead of our decoding method.

    transformers (5.17-5.24, _extract_generation_mode_kwargs) hands a callable custom_generate only the
    keyword arguments its signature adds to _sample's, after popping tokenizer and assistant_tokenizer:
    those never reach it, nor HF's own use of them (stop strings, token healing). The streamer travels
    under its own name (hf/runner.py); synced_gpus would be lost too."""
    if kwargs.get("custom_generate") is not None:
        return "custom_generate given"
    if kwargs.get("tokenizer") is not None and (getattr(cfg, "stop_strings", None) or getattr(cfg, "token_healing", False)):
        return "stop_strings/token_healing need the tokenizer, which HF withholds from a custom decoding method"
    if kwargs.get("assistant_tokenizer") is not None:
        return "assistant_tokenizer given"
    if kwargs.get("synced_gpus"):
        return "synced_gpus=True"
    return None


def decode_loop_route(s: PatchSession, logits_processor, stopping_criteria, generation_config, model_kwargs: dict,
                      cache_key: str, prompt_len: int):
    """(Route, SelectConfig or None): the fast path's device loop, or HF's loop and why."""
    sel_cfg, why = select_config(logits_processor, stopping_criteria, generation_config, prompt_len)
    why = why or _fast_loop_reason(s, generation_config, model_kwargs, cache_key)
    return (route(FAST), sel_cfg) if why is None else (route(HF_LOOP, why), None)


def _fast_loop_reason(s: PatchSession, generation_config, model_kwargs: dict, cache_key: str) -> str | None:
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


# -- prefill ---------------------------------------------------------------------------------------
def maskless_reason(model) -> str | None:
    """Why the prefill of an unpadded prompt cannot drop the mask on this model (hf/causal_mask.py), or None."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r}, not sdpa"
    if not getattr(cfg, "is_causal", True):
        return "not a causal model"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and set(layer_types) != {"full_attention"}:
        return f"layer types {sorted(set(layer_types))}"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False:
        return "sliding-window attention"
    if not maskless_available():
        return "could not register the attention implementation"
    return None


def prefill_token_cap(model) -> int:
    """The prefill graphs' B * Tb cap for this model: higher where the captured forward gets no mask
    (runtime/prefill.py has the measurements)."""
    return MASKLESS_PREFILL_TOKEN_CAP if maskless_reason(model) is None else PREFILL_TOKEN_CAP


def prefill_route(s: PatchSession, cache, input_ids, mask) -> Route:
    """Whether this prompt's prefill may replay a graph (runtime/prefill.py; the first use of a length
    bucket or a failed capture still prefills eagerly), else why not."""
    why = _prefill_graph_reason(s, cache, input_ids, mask)
    return route(PREFILL_GRAPH) if why is None else route(PREFILL_EAGER, why)


def _prefill_graph_reason(s: PatchSession, cache, input_ids, mask) -> str | None:
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


# -- forward() -------------------------------------------------------------------------------------
def forward_route(s: PatchSession, model, input_ids, inputs_embeds, labels, cache, kwargs: dict) -> Route:
    """The path of one forward() call: the fused decode step (graph replay where graphs are on) or stock."""
    if s.disabled:
        return route(STOCK, f"disabled: {s.status.disabled}")
    if model.training:  # dropout and friends: the fused step implements inference only
        return route(STOCK, TRAINING)
    why = _decode_reason(s, input_ids, inputs_embeds, labels, cache, kwargs)
    if why is not None:
        return route(STOCK, why)
    return route(DECODE_GRAPH) if s.graphs_active() else route(DECODE_FUSED)


def _decode_reason(s: PatchSession, input_ids, inputs_embeds, labels, cache, kwargs) -> str | None:
    if not s.owns(cache):
        return "no braid cache"
    if input_ids is None or inputs_embeds is not None:
        return "inputs_embeds"
    if input_ids.shape[1] != 1 or cache.seen == 0:
        return "prefill"
    if labels is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return "labels/attentions/hidden states requested"
    if torch.is_grad_enabled():
        return GRAD_MODE
    if input_ids.shape[0] > cache.batch_capacity:
        return "batch larger than the cache"
    if cache.row0:   # the fused step reads and writes rows 0..B-1; the stock forward honours the offset
        return "cache rows offset"
    return None
