"""Per-variant worker of braid-bench: ``python -m braid_backend.bench.runner SPEC.json OUT.jsonl``.

The parent (cli.py) starts one of these per variant, so a crash (segfault, abort, CUDA error) in one
variant is recorded and the others still run. The worker appends one JSON object per line to OUT:
first ``{"type": "meta", ...}`` (model facts, patch report, notes), then ``{"type": "row", ...}`` per
batch size as soon as it is measured, so rows finished before a crash survive it.

Test aids (not for users): variant ``crash`` runs like ``stock`` for the first batch size, then calls
``os.abort()``; ``hang`` sleeps forever (exercises ``--timeout``). A spec with ``"kind": "probe"``
measures the device-to-device copy bandwidth and describes the GPU instead of running a variant.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

PROGRESS = "[braid-bench]"
INTERPRET_NOTE = ("TRITON_INTERPRET=1 in the variant subprocesses: Triton kernels run in the CPU interpreter "
                  "(seconds per fused step; timings not representative)")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Variants that get a teacher-forced logits check against the fp32 reference.
CHECKED = ("stock", "braid", "braid-eager")


def progress(msg: str) -> None:
    print(f"{PROGRESS} {msg}", file=sys.stderr, flush=True)


class Emitter:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, obj: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def summary(xs):
    """median/min/max of a list of floats (None if empty)."""
    xs = [float(x) for x in xs]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ----------------------------------------------------------------------------------------- probe

def probe(spec: dict) -> dict:
    """GPU facts and the device-to-device copy bandwidth (bytes read + written per second)."""
    import torch

    info = {"type": "probe", "gpu_name": None, "driver": None, "cuda_runtime": torch.version.cuda,
            "capability": None, "sm_count": None, "total_mem_mib": None, "copy_bw_gbs": None,
            "copy_bw_samples_gbs": None}
    info["driver"] = nvidia_smi_driver()
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}",
                sm_count=props.multi_processor_count, total_mem_mib=round(props.total_memory / 2**20))
    nbytes = int(spec.get("copy_bytes", 1 << 30))
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.fill_(7)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    iters, samples = 10, []
    for _ in range(7):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        samples.append(2 * nbytes * iters / (ms / 1e3) / 1e9)
    info["copy_bw_samples_gbs"] = [round(s, 1) for s in samples]
    # The limit is the best rate the device showed; the median is next to it in the samples.
    info["copy_bw_gbs"] = max(samples)
    del src, dst
    return info


def nvidia_smi_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


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
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = cfg.num_hidden_layers
    return {
        "config_class": type(model.config).__name__, "model_class": type(model).__name__,
        "n_params": n_params, "weight_bytes": weight_bytes,
        "tied_embeddings": bool(out_emb is not None and model.get_input_embeddings() is not None
                                and out_emb.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()),
        "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
        "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * dtype_size,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }


def _eos_id(model):
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return 0 if eos is None else int(eos)


class Timer:
    """Host clock around a synchronized device: nothing queued before or after escapes the span."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def __call__(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0


def make_generate(model, prompt, extra: dict):
    import torch

    mask = torch.ones_like(prompt)
    pad = _eos_id(model)

    def gen(n: int):
        return model.generate(input_ids=prompt, attention_mask=mask, do_sample=False, num_beams=1,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=pad, **extra)
    return gen


def time_batch(model, prompt, spec: dict, extra: dict, timer: Timer, label: str) -> tuple[dict, object]:
    """prefill = generate(1); decode/step = (generate(N) - generate(1)) / (N - 1); first call excluded."""
    import torch

    n, warmup, reps = spec["new_tokens"], spec["warmup"], spec["reps"]
    gen = make_generate(model, prompt, extra)
    T = prompt.shape[1]
    if timer.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    progress(f"{label}: first call (generate {n})")
    out, t_first = timer(lambda: gen(n))
    tokens = out[:, T:].detach().cpu()
    for w in range(warmup):
        progress(f"{label}: warm-up {w + 1}/{warmup}")
        timer(lambda: gen(1))
        timer(lambda: gen(n))
    t1s, tns = [], []
    for r in range(reps):
        progress(f"{label}: rep {r + 1}/{reps}")
        _, t1 = timer(lambda: gen(1))
        _, tn = timer(lambda: gen(n))
        t1s.append(t1 * 1e3)
        tns.append(tn * 1e3)
    decode = [(tn - t1) / (n - 1) for t1, tn in zip(t1s, tns)]
    dec = summary(decode)
    b = prompt.shape[0]
    tok_s = b * 1000.0 / dec["median"] if dec["median"] > 0 else None
    e2e = summary(tns)
    row = {
        "prefill_ms": summary(t1s), "decode_ms_per_step": dec, "e2e_ms": e2e,
        "tok_s": tok_s,
        "tok_s_range": ({"min": b * 1000.0 / dec["max"], "max": b * 1000.0 / dec["min"]}
                        if dec["min"] > 0 else None),
        "first_call_s": t_first, "first_call_overhead_s": t_first - e2e["median"] / 1e3,
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if timer.cuda else None,
        "new_tokens_generated": int(tokens.shape[1]),
        "timings_ms": {"prefill": t1s, "generate_n": tns, "decode_per_step": decode},
    }
    if dec["median"] <= 0:
        row["notes"] = [f"decode time within timer noise (generate({n}) <= generate(1)); raise --new-tokens"]
    return row, tokens


# ----------------------------------------------------------------------------------- correctness

def check_inputs(vocab, b, spec, device):
    from ..testing.numerics import random_tokens

    ids = random_tokens(vocab, b, spec["check_prompt_len"] + spec["check_steps"], spec["seed"] + 7919 + b, device)
    return ids[:, :spec["check_prompt_len"]], ids[:, spec["check_prompt_len"]:]


def stock_check(model, vocab, b, spec, device) -> dict:
    """fp32 reference and the stock model's own error, before any patching."""
    from ..testing.numerics import fp32_reference_logits, rel_err, teacher_forced_logits

    prompt, cont = check_inputs(vocab, b, spec, device)
    ref = fp32_reference_logits(model, prompt, cont).cpu()
    stock = teacher_forced_logits(model, prompt, cont).cpu()
    return {"batch": b, "prompt_len": prompt.shape[1], "steps": cont.shape[1] + 1,
            "stock_err": rel_err(stock, ref), "_ref": ref}


def finish_check(model, vocab, chk: dict, spec, device, patched: bool) -> dict:
    from ..testing.numerics import rel_err, teacher_forced_logits

    ref = chk.pop("_ref")
    if patched:
        prompt, cont = check_inputs(vocab, chk["batch"], spec, device)
        logits = teacher_forced_logits(model, prompt, cont).cpu()
        err = rel_err(logits, ref)
        chk["variant_err"] = err
        chk["err_ratio"] = err / chk["stock_err"] if chk["stock_err"] > 0 else None
    else:
        chk["variant_err"] = chk["stock_err"]
        chk["err_ratio"] = 1.0
    return chk


# --------------------------------------------------------------------------------------- variant

def run_variant(spec: dict, emit: Emitter) -> None:
    import torch

    from ..testing.numerics import random_tokens
    from ..testing.presets import load_model

    variant = spec["variant"]
    torch.set_grad_enabled(False)
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    timer = Timer(device)
    notes = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        notes.append(INTERPRET_NOTE)

    progress(f"{variant}: loading {spec['model']} ({spec['dtype']}, {device})")
    t0 = time.perf_counter()
    model = load_model(spec["model"], dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    facts = model_facts(model, torch.empty((), dtype=dtype).element_size())
    vocab = facts["vocab"]
    batches = spec["batch_sizes"]
    prompts = {b: random_tokens(vocab, b, spec["prompt_len"], spec["seed"] + b, device) for b in batches}

    extra = {}
    if variant == "hf-static":
        extra["cache_implementation"] = "static"
        _raise_dynamo_limits(notes)
        if device.type != "cuda":
            if _gen_config_has("disable_compile"):
                extra["disable_compile"] = True
            notes.append("hf-static on CPU: static cache without generate's auto-compile (it compiles on GPU only)")
        else:
            notes.append("hf-static: static cache, generate() auto-compiles the forward (HF's own path)")

    # One small stock forward first, so every variant's first call is measured with the device, its
    # libraries (cuBLAS, SDPA) and allocator already up: first-call overhead is then the variant's own.
    model(input_ids=prompts[batches[0]][:1, :8], use_cache=False)
    timer.sync()

    # Correctness inputs from the stock model, before anything changes it.
    check_batches = {"first": batches[:1], "all": batches, "none": []}[spec["check"]]
    checks = {}
    if variant in CHECKED:
        for b in check_batches:
            progress(f"{variant}: fp32 reference logits (batch {b})")
            try:
                checks[b] = stock_check(model, vocab, b, spec, device)
            except Exception as e:  # the check must not cost the timing
                checks[b] = {"batch": b, "error": _err(e)}
            _free(device)
    ref_tokens = {}
    if variant in ("hf-static", "braid", "braid-eager") and spec.get("agreement", True):
        ref_tokens = _load_tokens(spec.get("ref_tokens"))   # the stock variant's own output, when it ran first
        for b in batches:
            if b in ref_tokens and tuple(ref_tokens[b].shape) == (b, spec["new_tokens"]):
                continue
            progress(f"{variant}: stock greedy tokens for agreement (batch {b})")
            out = make_generate(model, prompts[b], {})(spec["new_tokens"])
            ref_tokens[b] = out[:, prompts[b].shape[1]:].cpu()
    my_tokens = {}

    patch_info = None
    if variant in ("braid", "braid-eager"):
        import braid_backend

        graphs = variant == "braid"
        progress(f"{variant}: braid_backend.patch(model, graphs={graphs})")
        report, patch_s = timer(lambda: braid_backend.patch(model, graphs=graphs))
        patch_info = {"graphs": graphs, "patch_s": patch_s, "text": str(report),
                      "dict": _to_dict(report)}

    emit({"type": "meta", "variant": variant, "model": facts, "load_s": load_s, "notes": notes,
          "patch": patch_info, "generate_extra": {k: str(v) for k, v in extra.items()}})

    for i, b in enumerate(batches):
        if variant == "crash" and i >= 1:
            progress("crash: test aid, calling os.abort()")
            os.abort()
        label = f"{variant} b={b}"
        mean_ctx = spec["prompt_len"] + spec["new_tokens"] / 2  # context read by the average decode step
        row = {"type": "row", "variant": variant, "batch": b, "status": "ok", "error": None,
               "bytes_per_step": int(facts["weight_bytes"] + facts["kv_bytes_per_token"] * b * mean_ctx),
               "correctness": checks.get(b), "greedy_agreement": None}
        if row["correctness"] is not None:
            row["correctness"] = {k: v for k, v in row["correctness"].items() if k != "_ref"}
        try:
            meas, tokens = time_batch(model, prompts[b], spec, extra, timer, label)
            row.update(meas)
            row["distinct_tokens"] = int(tokens.unique().numel())
            if tuple(tokens.shape) != (b, spec["new_tokens"]):   # then the decode figures are wrong too
                row.update(status="error", error=f"generate() returned {tuple(tokens.shape)} new tokens, "
                                                 f"asked for {(b, spec['new_tokens'])}")
            elif b in ref_tokens and ref_tokens[b].shape == tokens.shape:
                row["greedy_agreement"] = (ref_tokens[b] == tokens).float().mean().item()
            if spec.get("tokens_out"):
                my_tokens[b] = tokens.tolist()
                with open(spec["tokens_out"], "w") as f:
                    json.dump({str(k): v for k, v in my_tokens.items()}, f)
        except Exception as e:
            row.update(status="error", error=_err(e))
            progress(f"{label}: ERROR {row['error'].splitlines()[-1] if row['error'] else ''}")
        # The variant's own logits after its timing, so the check can't pre-warm the first call it measures.
        chk = checks.get(b)
        if chk is not None and "error" not in chk:
            progress(f"{label}: teacher-forced logits check")
            try:
                chk = finish_check(model, vocab, chk, spec, device, patched=patch_info is not None)
            except Exception as e:
                chk = {"batch": b, "stock_err": chk.get("stock_err"), "error": _err(e)}
            row["correctness"] = chk
        emit(row)
        _free(device)
        if row["status"] == "ok":
            progress(f"{label}: decode {row['decode_ms_per_step']['median']:.3f} ms/step, "
                     f"{row['tok_s'] or 0:.1f} tok/s")


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


def _err(e: BaseException) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return "".join(tb)[-2000:]


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
    run_variant(spec, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
