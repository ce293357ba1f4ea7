"""Why a long prompt's prefill is slower than stock (GPU diagnostic, issue #13 TTFT at 8192).

    python benchmarks/prefill_diag.py [preset] [--len 8192]

Prints: stock vs braid TTFT (generate(max_new_tokens=1), warm, median of 5); the prefill graph
capture's traceback if it fails (debug log); the top CUDA kernels of one stock and one braid
TTFT call (profiler), so the two prefills can be compared kernel by kernel."""
import logging
import statistics
import sys
import time

import torch

import braid_backend
from braid_backend.testing.numerics import random_tokens
from braid_backend.testing.presets import build_model


def ttft(model, ids, reps=5):
    kw = dict(max_new_tokens=1, do_sample=False, pad_token_id=0)
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def top_kernels(model, ids, n=12):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def main(argv):
    preset = argv[0] if argv and not argv[0].startswith("--") else "qwen2.5-0.5b"
    T = int(argv[argv.index("--len") + 1]) if "--len" in argv else 8192
    torch.set_grad_enabled(False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("braid_backend").setLevel(logging.DEBUG)
    model = build_model(preset, dtype=torch.bfloat16, device="cuda")
    ids = random_tokens(model.config.vocab_size, 1, T, 0, "cuda")
    for _ in range(2):
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    print(f"stock TTFT {T}: {ttft(model, ids):.2f} ms", flush=True)
    print(top_kernels(model, ids), flush=True)
    braid_backend.patch(model)
    for _ in range(3):   # first use eager, second captures
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    st = braid_backend.status(model)
    print(f"braid TTFT {T}: {ttft(model, ids):.2f} ms; status {st}", flush=True)
    print(top_kernels(model, ids), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
