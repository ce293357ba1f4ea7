"""Timing helpers shared by braid-bench's worker modules (runner.py, latency.py): progress and tick lines,
the timer, summary statistics, the greedy generate() call, and time_batch (one variant x batch size)."""
from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback

PROGRESS = "[braid-bench]"
TICK = "[braid-bench:tick]"


def progress(msg: str) -> None:
    print(f"{PROGRESS} {msg}", file=sys.stderr, flush=True)


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
        "prompt_len": int(T), "prefill_ms": summary(t1s), "ttft_ms": summary(t1s), "decode_ms_per_step": dec,
        "e2e_ms": e2e,
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


def format_error(e: BaseException) -> str:
    """The traceback of e, its last 2000 characters."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return "".join(tb)[-2000:]
