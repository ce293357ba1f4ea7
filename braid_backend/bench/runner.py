"""Per-variant worker of braid-bench: ``python -m braid_backend.bench.runner SPEC.json OUT.jsonl``.

The parent (cli.py) starts one of these per variant, so a crash (segfault, abort, CUDA error) in one
variant is recorded and the others still run. The worker appends one JSON object per line to OUT:
first ``{"type": "meta", ...}`` (model facts, patch report, notes), then ``{"type": "row", ...}`` per
batch size as soon as it is measured, so rows finished before a crash survive it.

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
import statistics
import subprocess
import sys
import time
import traceback

from .checks import finish_check, stock_check
from .prompts import batch_prompts, load_tokenizer, text_prompts

PROGRESS = "[braid-bench]"
TICK = "[braid-bench:tick]"
CRASH_LINE = "braid-bench crash test aid: simulated fatal error, aborting"
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


def tick(units: int) -> None:
    print(f"{TICK} {units}", flush=True)


def summary(xs):
    """median/min/max/mean/stdev of a list of floats (None if empty; stdev None below 2 samples)."""
    xs = [float(x) for x in xs]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else None}


def noise_ms(xs) -> float:
    """The timer noise of repeated identical calls: their spread (max - min); with a single call, 5% of
    it (there is no spread to measure)."""
    return max(xs) - min(xs) if len(xs) > 1 else 0.05 * xs[0]


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
    """Seconds one call takes, the device idle before it. GPU: CUDA events (start recorded on the idle
    device, end recorded after the call returns and waited for, so host work inside the call counts);
    CPU: time.perf_counter."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.name = "CUDA events around each generate() call" if self.cuda else "time.perf_counter"

    def __call__(self, fn):
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3


def make_generate(model, prompt, extra: dict, mask=None):
    import torch

    mask = torch.ones_like(prompt) if mask is None else mask
    pad = _eos_id(model)

    def gen(n: int):
        return model.generate(input_ids=prompt, attention_mask=mask, do_sample=False, num_beams=1,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=pad, **extra)
    return gen


def time_batch(model, prompt, spec: dict, extra: dict, timer: Timer, label: str, mask=None) -> tuple[dict, object]:
    """prefill = generate(1); decode/step = (generate(N) - generate(1)) / (N - 1), paired per rep; the first
    call is excluded and reported apart. A difference that is not above the timer noise (the spread of
    the repeats, noise_ms) is reported as None with a "below noise" note, never as a negative time."""
    import torch

    n, warmup, reps = spec["new_tokens"], spec["warmup"], spec["reps"]
    gen = make_generate(model, prompt, extra, mask)
    T = prompt.shape[1]
    if timer.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    progress(f"{label}: first call (generate {n})")
    out, t_first = timer(lambda: gen(n))
    tick(n)
    tokens = out[:, T:].detach().cpu()
    for w in range(warmup):
        progress(f"{label}: warm-up {w + 1}/{warmup}")
        timer(lambda: gen(1))
        tick(1)
        timer(lambda: gen(n))
        tick(n)
    t1s, tns = [], []
    for r in range(reps):
        progress(f"{label}: rep {r + 1}/{reps}")
        _, t1 = timer(lambda: gen(1))
        tick(1)
        _, tn = timer(lambda: gen(n))
        tick(n)
        t1s.append(t1 * 1e3)
        tns.append(tn * 1e3)
    b = prompt.shape[0]
    diffs = [tn - t1 for t1, tn in zip(t1s, tns)]
    noise = max(noise_ms(t1s), noise_ms(tns))
    notes, below = [], []
    if min(diffs) > 0 and statistics.median(diffs) > noise:
        decode = [d / (n - 1) for d in diffs]
        dec = summary(decode)
    else:
        decode, dec = None, None
        below.append("decode_ms_per_step")
        notes.append(f"{label}: decode below noise: generate({n}) {statistics.median(tns):.1f} ms vs generate(1) "
                     f"{statistics.median(t1s):.1f} ms (medians), noise {noise:.1f} ms; raise --new-tokens (or --reps)")
    e2e = summary(tns)
    overhead = t_first - e2e["median"] / 1e3
    if overhead <= noise_ms(tns) / 1e3:
        below.append("first_call_overhead_s")
        notes.append(f"{label}: first-call overhead below noise (first call {t_first:.3f} s, repeats "
                     f"{e2e['median'] / 1e3:.3f} s median, noise {noise_ms(tns) / 1e3:.3f} s)")
        overhead = None
    row = {
        "prompt_len": int(T), "prefill_ms": summary(t1s), "decode_ms_per_step": dec, "e2e_ms": e2e,
        "tok_s": b * 1000.0 / dec["median"] if dec else None,
        "tok_s_range": {"min": b * 1000.0 / dec["max"], "max": b * 1000.0 / dec["min"]} if dec else None,
        "first_call_s": t_first, "first_call_overhead_s": overhead, "below_noise": below,
        "noise_ms": noise,
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if timer.cuda else None,
        "new_tokens_generated": int(tokens.shape[1]),
        "timings_ms": {"prefill": t1s, "generate_n": tns, **({"decode_per_step": decode} if decode else {})},
        "notes": notes,
    }
    return row, tokens


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
    tokenizer, prompt_info = load_tokenizer(spec, notes)
    if tokenizer is not None:
        prompts = {b: text_prompts(tokenizer, b, device) for b in batches}
        prompt_info["tokens"] = {b: int(prompts[b][0].shape[1]) for b in batches}
    else:
        prompts = {b: (random_tokens(vocab, b, spec["prompt_len"], spec["seed"] + b, device), None) for b in batches}

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
    model(input_ids=prompts[batches[0]][0][:1, :8], use_cache=False)
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
            ids, mask = prompts[b]
            out = make_generate(model, ids, {}, mask)(spec["new_tokens"])
            ref_tokens[b] = out[:, ids.shape[1]:].cpu()
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
          "patch": patch_info, "generate_extra": {k: str(v) for k, v in extra.items()}, "prompts": prompt_info,
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
               "bytes_per_step": int(facts["weight_bytes"] + facts["kv_bytes_per_token"] * b * mean_ctx),
               "correctness": checks.get(b), "greedy_agreement": None, "sample": None}
        if row["correctness"] is not None:
            row["correctness"] = {k: v for k, v in row["correctness"].items() if k != "_ref"}
        try:
            meas, tokens = time_batch(model, ids, spec, extra, timer, label, mask)
            row.update(meas)
            if tokenizer is not None:
                row["sample"] = {"prompt": batch_prompts(1)[0],
                                 "output": tokenizer.decode(tokens[0], skip_special_tokens=True)}
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
        if row["status"] == "ok" and row["decode_ms_per_step"]:
            progress(f"{label}: decode {row['decode_ms_per_step']['median']:.3f} ms/step, {row['tok_s']:.1f} tok/s")
        elif row["status"] == "ok":
            progress(f"{label}: decode below noise")


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
