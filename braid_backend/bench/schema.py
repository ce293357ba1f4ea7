"""The results.json JSON Schema of braid-bench (checked with jsonschema when it is installed).

History:
2: decode_ms_per_step / tok_s / first_call_overhead_s may be null on an ok row, with the field named in
   below_noise (the difference was not above the timer noise); new keys below_noise, noise_ms, prompt_len,
   sample; top-level prompts and samples.
3: row keys ttft_ms (time to first token: the generate(max_new_tokens=1) timings, the same numbers as
   prefill_ms) and cold_first_call_s (--cold); top-level ttft (--ttft-prompts: TTFT at extra prompt lengths,
   batch 1), chat (--chat: end-to-end latency of a short chat-like call, batch 1) and cold (--cold: which
   caches were emptied, each variant's cold vs warm first call).
Everything an earlier version had is still there with the same meaning.
"""
from __future__ import annotations

SCHEMA_VERSION = 3
STATUSES = ("ok", "error", "crashed")

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_POS_OR_NULL = {"type": ["number", "null"], "exclusiveMinimum": 0}
_POS_INT = {"type": "integer", "minimum": 1}
_STR_OR_NULL = {"type": ["string", "null"]}
_NOTES = {"type": "array", "items": {"type": "string"}}
_STATS = {   # {"median", "min", "max", "n", ...} over the timed reps, milliseconds; never negative
    "type": "object", "required": ["median", "min", "max", "n"],
    "properties": {"median": {"type": "number", "minimum": 0}, "min": {"type": "number", "minimum": 0},
                   "max": {"type": "number", "minimum": 0}, "n": {"type": "integer", "minimum": 1},
                   "mean": _NUM, "stdev": _NUM_OR_NULL},
}
_STATS_OR_NULL = {"anyOf": [_STATS, {"type": "null"}]}
_POSITIVE_STATS = {"allOf": [_STATS, {"properties": {"min": {"exclusiveMinimum": 0}}}]}
_FAILED_SAYS_WHY = {   # a failed row or item says why
    "if": {"properties": {"status": {"enum": ["error", "crashed"]}}, "required": ["status"]},
    "then": {"anyOf": [{"properties": {"error": {"type": "string", "minLength": 1}}},
                       {"properties": {"stderr_tail": {"type": "string", "minLength": 1}}}]},
}


def _ok_needs(props: dict) -> dict:
    """An ok row or item carries these (stricter) values."""
    return {"if": {"properties": {"status": {"const": "ok"}}, "required": ["status"]},
            "then": {"properties": props}}


# Every result row (one per variant x batch size) carries all of these keys; null where not measured.
ROW_PROPERTIES: dict[str, dict] = {
    "variant": {"type": "string"}, "batch": _POS_INT,
    "status": {"enum": list(STATUSES)},
    "error": _STR_OR_NULL, "returncode": {"type": ["integer", "null"]},
    "stderr_tail": _STR_OR_NULL,
    "prompt_len": {"type": ["integer", "null"]},   # prompt tokens per sequence (text prompts: padded length)
    "prefill_ms": _STATS_OR_NULL,            # generate(max_new_tokens=1)
    "ttft_ms": _STATS_OR_NULL,               # time to first token: the same generate(1) timings (schema 3)
    "decode_ms_per_step": _STATS_OR_NULL,    # (generate(N) - generate(1)) / (N - 1), paired per rep
    "e2e_ms": _STATS_OR_NULL,                # generate(N)
    "tok_s": _POS_OR_NULL,                   # batch * 1000 / median decode ms
    "tok_s_range": {"type": ["object", "null"]},   # {"min", "max"} from the decode max / min
    "first_call_s": _POS_OR_NULL,            # the process's first generate(N), compile caches as found
    "first_call_overhead_s": _POS_OR_NULL,   # first generate(N) minus the median one
    "cold_first_call_s": _POS_OR_NULL,       # --cold, first batch size: the same call, compile caches empty
    "below_noise": {"type": "array", "items": {"type": "string"}},   # fields left null: not above noise
    "noise_ms": _NUM_OR_NULL,                # spread of the repeated calls (the noise those fields missed)
    "peak_mem_mib": _NUM_OR_NULL,            # torch.cuda.max_memory_allocated; null on CPU
    "bytes_per_step": {"type": ["integer", "null"]},   # weights (tied once) + KV at the mean context
    "bw_limit_pct": _POS_OR_NULL,            # (bytes_per_step / copy bandwidth) / decode time * 100
    "speedup_vs_stock": _POS_OR_NULL, "speedup_vs_hf_static": _POS_OR_NULL,   # decode-time ratios
    # {"batch", "prompt_len", "steps", "stock_err", "variant_err", "err_ratio"} or {"error"}
    "correctness": {"type": ["object", "null"]},
    "greedy_agreement": {"type": ["number", "null"], "minimum": 0, "maximum": 1},   # null for stock
    "sample": {"type": ["object", "null"]},  # {"prompt", "output"}: first sequence, text prompts only
    "notes": _NOTES, "patch": {"type": ["object", "null"]},
}
ROW_KEYS = tuple(ROW_PROPERTIES)
# optional (added within schema 3): true when stock's greedy tokens, the agreement reference, repeat one
# token in every sequence, so greedy_agreement checks next to nothing
# quant: the --quant format of a stock-Q / braid-Q row (bench/quant.py), null elsewhere
OPTIONAL_ROW_PROPERTIES = {"agreement_vacuous": {"type": ["boolean", "null"]}, "quant": {"type": ["string", "null"]}}
ENV_KEYS = ("gpu_name", "driver", "torch", "transformers", "triton", "python", "date", "hostname", "args")

ROW_SCHEMA = {
    "type": "object", "required": list(ROW_KEYS), "properties": {**ROW_PROPERTIES, **OPTIONAL_ROW_PROPERTIES},
    "allOf": [
        {   # ok: the timings are there; a decode left null must say it was below noise
            "if": {"properties": {"status": {"const": "ok"}}, "required": ["status"]},
            "then": {
                "properties": {"prefill_ms": _STATS, "ttft_ms": _POSITIVE_STATS, "e2e_ms": _STATS},
                "if": {"properties": {"decode_ms_per_step": {"type": "null"}}},
                "then": {"properties": {"below_noise": {"contains": {"const": "decode_ms_per_step"}}}},
                "else": {"properties": {"decode_ms_per_step": _POSITIVE_STATS, "tok_s": _NUM}},
            },
        },
        _FAILED_SAYS_WHY,
    ],
}

# --ttft-prompts: one item per variant x (clamped) prompt length, batch 1.
TTFT_PROPERTIES: dict[str, dict] = {
    "variant": {"type": "string"}, "batch": {"const": 1}, "status": {"enum": list(STATUSES)},
    "error": _STR_OR_NULL,
    "requested_prompt_len": _POS_INT,        # as given to --ttft-prompts
    "prompt_len": {"type": ["integer", "null"], "minimum": 1},   # measured (clamped to the model's limit)
    "ttft_ms": _STATS_OR_NULL,               # generate(max_new_tokens=1), warm (after the warm-up calls)
    "first_call_ms": _POS_OR_NULL,           # the first call at this length (a new shape), excluded
    "notes": _NOTES,
}
TTFT_SCHEMA = {"type": "object", "required": list(TTFT_PROPERTIES), "properties": TTFT_PROPERTIES,
               "allOf": [_ok_needs({"ttft_ms": _POSITIVE_STATS, "prompt_len": _POS_INT}), _FAILED_SAYS_WHY]}

# --chat P,N: one item per variant: generate(N) on a P-token prompt, batch 1, warm.
CHAT_PROPERTIES: dict[str, dict] = {
    "variant": {"type": "string"}, "batch": {"const": 1}, "status": {"enum": list(STATUSES)},
    "error": _STR_OR_NULL,
    "requested": {"type": "object", "required": ["prompt_len", "new_tokens"]},   # as given to --chat
    "prompt_len": {"type": ["integer", "null"], "minimum": 1},   # measured (clamped to the model's limit)
    "new_tokens": {"type": ["integer", "null"], "minimum": 1},
    "e2e_ms": _STATS_OR_NULL,                # the whole generate() call
    "e2e_tok_s": _POS_OR_NULL,               # new_tokens * 1000 / median e2e ms (prefill included)
    "speedup_vs_stock": _POS_OR_NULL,        # stock's median e2e / this one's
    "first_call_ms": _POS_OR_NULL,           # the first call at this shape, excluded
    "notes": _NOTES,
}
CHAT_SCHEMA = {"type": "object", "required": list(CHAT_PROPERTIES), "properties": CHAT_PROPERTIES,
               "allOf": [_ok_needs({"e2e_ms": _POSITIVE_STATS, "e2e_tok_s": _NUM, "prompt_len": _POS_INT,
                                    "new_tokens": _POS_INT}), _FAILED_SAYS_WHY]}

# --cold: per variant with compiled kernels, the first generate() call of a fresh process whose compile
# caches point to empty temp dirs, next to the warm-cache first call of the main run.
COLD_ITEM_PROPERTIES: dict[str, dict] = {
    "variant": {"type": "string"}, "batch": _POS_INT, "status": {"enum": list(STATUSES)},
    "error": _STR_OR_NULL,
    "cold_first_call_s": _POS_OR_NULL, "warm_first_call_s": _POS_OR_NULL, "patch_s": _NUM_OR_NULL,
    # env var -> {"entries_before": 0, "entries_after": n}: what the cold process found and left there
    "caches": {"type": "object"},
}
COLD_SCHEMA = {
    "type": ["object", "null"],
    "required": ["emptied", "warm", "results", "notes"],
    "properties": {
        "emptied": {"type": "array", "items": {"type": "string"}},   # env vars pointed at empty temp dirs
        "warm": {"type": "object"},    # env var -> {"dir", "entries_before"}: the main runs' caches as found
        "results": {"type": "array", "items": {
            "type": "object", "required": list(COLD_ITEM_PROPERTIES), "properties": COLD_ITEM_PROPERTIES,
            "allOf": [_ok_needs({"cold_first_call_s": {"type": "number", "exclusiveMinimum": 0}}),
                      _FAILED_SAYS_WHY]}},
        "notes": _NOTES,
    },
}

RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "braid-bench results.json",
    "type": "object",
    "required": ["schema_version", "tool", "env", "model", "device", "copy_bw_gbs", "probe", "results", "notes",
                 "ttft", "chat", "cold"],
    "properties": {
        "schema_version": {"type": "integer"}, "tool": {"const": "braid-bench"},
        "env": {"type": "object", "required": list(ENV_KEYS)},
        "model": {"type": "object"}, "device": {"type": "string"},
        "copy_bw_gbs": _POS_OR_NULL, "probe": {"type": ["object", "null"]},
        "results": {"type": "array", "items": ROW_SCHEMA},
        "notes": _NOTES,
        "prompts": {"type": ["object", "null"]},    # {"source": "random" | "text", "chat_template", "tokens", "texts"}
        "samples": {"type": ["object", "null"]},    # {"batch", "prompt", "outputs": {variant: text}}
        "ttft": {"type": "array", "items": TTFT_SCHEMA},    # empty without --ttft-prompts
        "chat": {"type": "array", "items": CHAT_SCHEMA},    # empty with --chat none
        "cold": COLD_SCHEMA,                                # null without --cold
    },
}


def validate(doc: dict) -> list[str]:
    """Problems with a results.json document against RESULTS_SCHEMA (empty list: valid). Needs jsonschema."""
    import jsonschema

    v = jsonschema.Draft202012Validator(RESULTS_SCHEMA)
    out = []
    for e in sorted(v.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "doc" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        out.append(f"{where}: {e.message}")
    return out


def decode_weight_bytes(facts: dict, batch: int = 1) -> int:
    """Weight bytes one decode step of `batch` rows reads: the model facts' decode_weight_bytes (every weight
    once, an untied input embedding table left out), or weight_bytes in files written before that field.
    Mixture of experts (facts["moe"]): of the routed experts only those some row selects, expected
    E * (1 - (1 - k/E)^batch) of E under uniform top-k routing (what random-weight routers do)."""
    total = facts.get("decode_weight_bytes", facts["weight_bytes"])
    moe = facts.get("moe")
    if not moe:
        return total
    E, k, xb = moe["experts"], moe["top_k"], moe["expert_bytes"]
    used = E * (1.0 - (1.0 - k / E) ** max(1, batch))
    return int(total - xb + xb * used / E)
