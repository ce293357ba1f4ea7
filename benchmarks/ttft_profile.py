"""Time to first token (generate(max_new_tokens=1)), stock vs braid, and where braid's host time goes.

    python benchmarks/ttft_profile.py [preset] [--prompts 128,2048] [--out ttft.json]

Random-weight preset on CUDA, bf16, batch 1; medians of 7 warm calls (CUDA-synchronised wall time);
then cProfile of 5 braid calls at the first prompt length (top functions by cumulative time)."""
import cProfile
import io
import json
import pstats
import statistics
import sys
import time

import torch

import braid_backend
from braid_backend.testing.numerics import random_tokens
from braid_backend.testing.presets import build_model


def ttft(model, ids, reps=7):
    kw = dict(max_new_tokens=1, do_sample=False, pad_token_id=0)
    for _ in range(2):
        model.generate(ids, **kw)
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv):
    preset = argv[0] if argv and not argv[0].startswith("--") else "qwen2.5-0.5b"
    prompts = [int(x) for x in (argv[argv.index("--prompts") + 1] if "--prompts" in argv else "128,2048").split(",")]
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    torch.set_grad_enabled(False)
    model = build_model(preset, dtype=torch.bfloat16, device="cuda")
    V = model.config.vocab_size
    res = {"preset": preset, "gpu": torch.cuda.get_device_name(), "rows": []}
    ids = {T: random_tokens(V, 1, T, T, "cuda") for T in prompts}
    stock = {T: ttft(model, ids[T]) for T in prompts}
    braid_backend.patch(model)
    braid = {T: ttft(model, ids[T]) for T in prompts}
    for T in prompts:
        res["rows"].append({"prompt": T, "stock_ms": stock[T], "braid_ms": braid[T]})
        print(f"prompt {T:6d}: stock {stock[T]:7.2f} ms  braid {braid[T]:7.2f} ms", flush=True)
    prof = cProfile.Profile()
    kw = dict(max_new_tokens=1, do_sample=False, pad_token_id=0)
    prof.enable()
    for _ in range(5):
        model.generate(ids[prompts[0]], **kw)
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
    res["profile"] = s.getvalue()
    print(s.getvalue())
    if out:
        json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
