"""Per-variant worker of braid-bench: ``python -m braid_backend.bench.runner SPEC.json OUT.jsonl``.

The parent (cli.py) starts one of these per variant, so a crash (segfault, abort, CUDA error) in one
variant is recorded and the others still run. The worker appends one JSON object per line to OUT:
first ``{"type": "meta", ...}`` (model facts, patch report, notes), then ``{"type": "row", ...}`` per
batch size as soon as it is measured, so rows finished before a crash survive it, then the batch-1
latencies of latency.py: ``{"type": "ttft", ...}`` per --ttft-prompts length and ``{"type": "chat", ...}``.
A spec with ``"cold": true`` (--cold) only makes the variant's first generate() call, in a process whose
compile caches the parent pointed at empty dirs, and writes ``{"type": "cold", ...}``.

Progress: human-readable lines start with ``[braid-bench]``; after every timed generate() call the worker
prints ``[braid-bench:tick] K`` (K = tokens generated per sequence), which the parent turns into its
progress bar and ETA and leaves out of the log.

Prompts: random tokens for presets; for a checkpoint with a tokenizer, the built-in text prompts
(prompts.py) through its chat template, and the first sequence's output is decoded into a text sample.

Test aids (not for users): variant ``crash`` runs like ``stock`` for the first batch size, then prints
CRASH_LINE to stderr and calls ``os.abort()``; ``hang`` sleeps forever (exercises ``--timeout``). A spec
with ``"kind": "probe"`` measures the device-to-device copy bandwidth and describes the GPU instead of
running a variant.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import types

from ..tuning import interpret_mode
from .checks import finish_check, stock_check
from .latency import chat_latency, cold_first_call, ttft_sweep
from .probe import probe
from .quant import QUANT, dense_twins, load_quant_model, split_variant
from .prompts import batch_prompts, load_tokenizer, text_prompts
from .schema import decode_weight_bytes
from .timing import Timer, format_error, make_generate, progress, time_batch
CRASH_LINE = "braid-bench crash test aid: simulated fatal error, aborting"
INTERPRET_NOTE = ("TRITON_INTERPRET=1 in the variant subprocesses: Triton kernels run in the CPU interpreter "
                  "(seconds per fused step; timings not representative)")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Variants that get a teacher-forced logits check against the fp32 reference.
CHECKED = ("stock", "braid", "braid-eager", "braid-triton", "braid-cupy")
# braid variants: patch() options (braid = the defaults: backend "triton")
BRAID_VARIANTS = {"braid": {}, "braid-eager": {"graphs": False}, "braid-triton": {"backend": "triton"},
                  "braid-cupy": {"backend": "cupy"}}


class Emitter:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, obj: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------- model

def model_facts(model, dtype_size: int) -> dict:
    """Parameter bytes (shared storage such as tied embeddings counted once) and KV bytes per token."""
    seen, n_params, weight_bytes = set(), 0, 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel(), p.dtype)
        if key in seen:
            continue
        seen.add(key)
        n_params += p.numel()
        weight_bytes += p.numel() * p.element_size()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = bool(out_emb is not None and in_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr())
    # A decode step reads every weight once except an untied input embedding table, of which it reads
    # only the batch's rows: the bandwidth limit counts those bytes out (issue #13's Llama-3.1-8B limit,
    # ~200 tok/s on an H100, is 15.0 GB of 16.1 GB)
    emb_bytes = in_emb.weight.numel() * in_emb.weight.element_size() if in_emb is not None and not tied else 0
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = cfg.num_hidden_layers
    # routed experts (packed 3-D gate_up_proj / down_proj): a step reads only the selected ones
    experts = [m for m in model.modules() if getattr(getattr(m, "gate_up_proj", None), "dim", lambda: 0)() == 3]
    moe = None
    if experts:
        xb = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
        moe = {"experts": int(experts[0].gate_up_proj.shape[0]), "top_k": int(cfg.num_experts_per_tok),
               "expert_bytes": xb}
    return {
        "config_class": type(model.config).__name__, "model_class": type(model).__name__,
        "n_params": n_params, "weight_bytes": weight_bytes, "decode_weight_bytes": weight_bytes - emb_bytes,
        "tied_embeddings": tied,
        "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
        "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * dtype_size,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "moe": moe,
    }


# --------------------------------------------------------------------------------------- variant

def setup(spec: dict):
    """Everything before the variant's first measured call, shared by the main run and the cold run: the
    model (stock), its facts, the prompts per batch size, generate()'s extra kwargs, the timer, notes."""
    import torch

    from ..testing.numerics import random_tokens
    from .presets import load_model

    variant = spec["variant"]
    base, quant = split_variant(variant)
    torch.set_grad_enabled(False)
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    c = types.SimpleNamespace(variant=variant, base=base, quant=quant, device=device, timer=Timer(device), notes=[],
                              extra={})
    if interpret_mode():
        c.notes.append(INTERPRET_NOTE)

    progress(f"{variant}: loading {spec['model']} ({spec['dtype']}, {device})")
    t0 = time.perf_counter()
    c.model = load_model(spec["model"], dtype=dtype, device=device)
    if quant:
        progress(f"{variant}: writing and loading the {quant} checkpoint")
        c.model = load_quant_model(c.model, quant, c.notes)
    c.load_s = time.perf_counter() - t0
    c.facts = model_facts(c.model, torch.empty((), dtype=dtype).element_size())
    batches = spec["batch_sizes"]
    c.tokenizer, c.prompt_info = load_tokenizer(spec, c.notes)
    if c.tokenizer is not None:
        c.prompts = {b: text_prompts(c.tokenizer, b, device) for b in batches}
        c.prompt_info["tokens"] = {b: int(c.prompts[b][0].shape[1]) for b in batches}
    else:
        c.prompts = {b: (random_tokens(c.facts["vocab"], b, spec["prompt_len"], spec["seed"] + b, device), None)
                     for b in batches}

    if variant == "hf-static":
        c.extra["cache_implementation"] = "static"
        _raise_dynamo_limits(c.notes)
        if device.type != "cuda":
            if _gen_config_has("disable_compile"):
                c.extra["disable_compile"] = True
            c.notes.append("hf-static on CPU: static cache without generate's auto-compile (it compiles on GPU only)")
        else:
            c.notes.append("hf-static: static cache, generate() auto-compiles the forward (HF's own path)")

    # One small stock forward first, so every variant's first call is measured with the device, its
    # libraries (cuBLAS, SDPA) and allocator already up: first-call overhead is then the variant's own.
    # Not for a quantized model: a stock forward of compressed-tensors decompresses its weights for good (the
    # checks' reference reads them quantized, braid-Q patches them so), and stock FineGrainedFP8 raises offline.
    if quant is None:
        c.model(input_ids=c.prompts[batches[0]][0][:1, :8], use_cache=False)
    elif base == "stock" and QUANT[quant][0] in ("fp8_channel", "int4"):   # compressed-tensors
        c.notes.append(f"stock-{quant}: compressed-tensors decompresses every weight to dense on the first forward "
                       "(transformers' hook), so these rows time the dense model it leaves")
    c.timer.sync()
    return c


def apply_patch(c) -> dict | None:
    """braid_backend.patch() for the braid variants (BRAID_VARIANTS: graphs off for braid-eager, a forced
    decode-layer backend for braid-triton / braid-cupy, the defaults for braid)."""
    if c.base not in BRAID_VARIANTS:
        return None
    import braid_backend

    opts = BRAID_VARIANTS[c.base]
    graphs = opts.get("graphs", True)
    progress(f"{c.variant}: braid_backend.patch(model{''.join(f', {k}={v!r}' for k, v in opts.items())})")
    report, patch_s = c.timer(lambda: braid_backend.patch(c.model, **opts))
    return {"graphs": graphs, "patch_s": patch_s, "text": str(report), "dict": _to_dict(report),
            "backend": getattr(report, "backend", None)}


def layer_backend(model, batch: int) -> str | None:
    """Which backend ran the decode layers of this batch size's bucket ("cupy" / "triton"), where the
    patch report says (backend "auto" decides per bucket at first use)."""
    s = getattr(model, "_braid_session", None)
    rep = getattr(s, "report", None)
    if rep is None or getattr(rep, "backend", None) is None:
        return None
    from braid_backend.runtime.cache import batch_bucket

    return (getattr(rep, "backends", None) or {}).get(batch_bucket(batch)) or (
        rep.backend if rep.backend != "auto" else None)


def run_cold(spec: dict, emit: Emitter) -> None:
    """--cold: the variant's first generate() call in this fresh process (the parent pointed the compile
    caches at empty dirs): the same call as the main run's first one, without the checks before it."""
    c = setup(spec)
    patch_info = apply_patch(c)
    b = spec["batch_sizes"][0]
    ids, mask = c.prompts[b]
    rec = {"type": "cold", "variant": c.variant, "batch": b, "status": "ok", "error": None,
           "cold_first_call_s": None, "patch_s": patch_info["patch_s"] if patch_info else None, "notes": c.notes}
    try:
        rec["cold_first_call_s"] = cold_first_call(make_generate(c.model, ids, c.extra, mask), spec["new_tokens"],
                                                   c.timer, f"{c.variant} cold b={b}")
    except Exception as e:
        rec.update(status="error", error=format_error(e))
    emit(rec)


def run_variant(spec: dict, emit: Emitter) -> None:
    c = setup(spec)
    variant, model, device, timer, extra, prompts = c.variant, c.model, c.device, c.timer, c.extra, c.prompts
    vocab, facts, batches = c.facts["vocab"], c.facts, spec["batch_sizes"]

    # Correctness inputs from the stock model, before anything changes it.
    check_batches = {"first": batches[:1], "all": batches, "none": []}[spec["check"]]
    checks, ref_tokens, agree = {}, {}, spec.get("agreement", True)
    # a quantized variant's reference is the fp32 model with its dequantised weights, its yardstick (and
    # greedy reference) the same weights in the run's dtype (bench/quant.py)
    twins = dense_twins(model, model.dtype) if c.quant and ((c.base in CHECKED and check_batches) or agree) else None
    if c.base in CHECKED:
        for b in check_batches:
            progress(f"{variant}: fp32 reference logits (batch {b})")
            try:
                checks[b] = stock_check(model, vocab, b, spec, device, twins)
            except Exception as e:  # the check must not cost the timing
                checks[b] = {"batch": b, "error": format_error(e)}
            _free(device)
    if (variant == "hf-static" or c.base in BRAID_VARIANTS or c.quant) and agree:
        # the stock variant's own output, when it ran first (not the quantized weights' reference)
        ref_tokens = {} if c.quant else _load_tokens(spec.get("ref_tokens"))
        for b in batches:
            if b in ref_tokens and tuple(ref_tokens[b].shape) == (b, spec["new_tokens"]):
                continue
            progress(f"{variant}: {'dequantised' if c.quant else 'stock'} greedy tokens for agreement (batch {b})")
            ids, mask = prompts[b]
            out = make_generate(twins[1] if c.quant else model, ids, {}, mask)(spec["new_tokens"])
            ref_tokens[b] = out[:, ids.shape[1]:].cpu()
    twins = None
    _free(device)
    my_tokens = {}

    patch_info = apply_patch(c)
    emit({"type": "meta", "variant": variant, "model": facts, "load_s": c.load_s, "notes": c.notes,
          "patch": patch_info, "generate_extra": {k: str(v) for k, v in extra.items()}, "prompts": c.prompt_info,
          "timer": timer.name})

    for i, b in enumerate(batches):
        if variant == "crash" and i >= 1:
            progress("crash: test aid, calling os.abort()")
            print(CRASH_LINE, file=sys.stderr, flush=True)
            os.abort()
        label = f"{variant} b={b}"
        ids, mask = prompts[b]
        mean_ctx = ids.shape[1] + spec["new_tokens"] / 2  # context read by the average decode step
        row = {"type": "row", "variant": variant, "batch": b, "status": "ok", "error": None,
               "bytes_per_step": int(decode_weight_bytes(facts, b) + facts["kv_bytes_per_token"] * b * mean_ctx),
               "correctness": checks.get(b), "greedy_agreement": None, "sample": None, "quant": c.quant}
        if row["correctness"] is not None:
            row["correctness"] = {k: v for k, v in row["correctness"].items() if k != "_ref"}
        try:
            meas, tokens = time_batch(model, ids, spec, extra, timer, label, mask)
            row.update(meas)
            if c.tokenizer is not None:
                row["sample"] = {"prompt": batch_prompts(1)[0],
                                 "output": c.tokenizer.decode(tokens[0], skip_special_tokens=True)}
            row["distinct_tokens"] = int(tokens.unique().numel())
            if tuple(tokens.shape) != (b, spec["new_tokens"]):   # then the decode figures are wrong too
                row.update(status="error", error=f"generate() returned {tuple(tokens.shape)} new tokens, "
                                                 f"asked for {(b, spec['new_tokens'])}")
            elif b in ref_tokens and ref_tokens[b].shape == tokens.shape:
                row["greedy_agreement"] = (ref_tokens[b] == tokens).float().mean().item()
                # stock repeating one token per sequence: agreeing with it checks next to nothing
                row["agreement_vacuous"] = all(len(set(seq)) == 1 for seq in ref_tokens[b].tolist())
            if spec.get("tokens_out"):
                my_tokens[b] = tokens.tolist()
                with open(spec["tokens_out"], "w") as f:
                    json.dump({str(k): v for k, v in my_tokens.items()}, f)
        except Exception as e:
            row.update(status="error", error=format_error(e))
            progress(f"{label}: ERROR {row['error'].splitlines()[-1] if row['error'] else ''}")
        if patch_info is not None:
            row["layer_backend"] = layer_backend(model, b)
        # The variant's own logits after its timing, so the check can't pre-warm the first call it measures.
        chk = checks.get(b)
        if chk is not None and "error" not in chk:
            progress(f"{label}: teacher-forced logits check")
            try:
                chk = finish_check(model, vocab, chk, spec, device, own=patch_info is not None or bool(c.quant))
            except Exception as e:
                chk = {"batch": b, "stock_err": chk.get("stock_err"), "error": format_error(e)}
            row["correctness"] = chk
        emit(row)
        _free(device)
        if row["status"] == "ok" and row["decode_ms_per_step"]:
            progress(f"{label}: decode {row['decode_ms_per_step']['median']:.3f} ms/step, {row['tok_s']:.1f} tok/s")
        elif row["status"] == "ok":
            progress(f"{label}: decode below noise")
    # batch 1 latencies after the sweep (its rows are safe on disk if these crash)
    ttft_sweep(model, spec, extra, timer, facts, device, emit)
    chat_latency(model, spec, extra, timer, facts, device, emit)


def _load_tokens(path) -> dict:
    import torch

    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return {int(k): torch.tensor(v, dtype=torch.long) for k, v in json.load(f).items()}
    except (OSError, ValueError):
        return {}


def _raise_dynamo_limits(notes):
    """A batch sweep recompiles once per shape; don't let dynamo fall back to eager mid-sweep."""
    try:
        import torch._dynamo as dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(int(getattr(dynamo.config, name)), 256))
    except Exception as e:  # pragma: no cover - depends on the torch build
        notes.append(f"could not raise dynamo recompile limits: {e}")


def _gen_config_has(field: str) -> bool:
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), field)


def _to_dict(report):
    try:
        d = report.to_dict()
        json.dumps(d, default=str)
        return d
    except Exception as e:
        return {"error": f"report.to_dict() failed: {e}"}


def _free(device):
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    emit = Emitter(argv[1])
    if spec.get("kind") == "probe":
        emit(probe(spec))
        return 0
    if spec["variant"] == "hang":
        progress("hang: test aid, sleeping until the parent's timeout")
        time.sleep(10**6)
    (run_cold if spec.get("cold") else run_variant)(spec, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
