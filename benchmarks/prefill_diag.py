"""Why a long prompt's prefill is slower than stock (GPU diagnostic, issue #13 TTFT at 8192).

    python benchmarks/prefill_diag.py [preset] [--len 8192] [--cap N]

For stock, braid with eager prefill (prefill_graphs=False) and braid with prefill graphs: TTFT
(generate(max_new_tokens=1), warm, median of 5), the summed device time of the SDPA kernels in one
call (profiler), and what HF decided for the attention mask (transformers.masking_utils:
_ignore_causal_mask_sdpa's answers, and the mask / is_causal SDPA received), logged per call."""
import collections
import logging
import sys

import torch

import braid_backend
from braid_backend.testing.numerics import random_tokens
from braid_backend.testing.presets import build_model
from ttft_profile import ttft   # sibling script (benchmarks/ is on sys.path when run as a script)

SEEN = collections.Counter()


def _spy():
    import transformers.integrations.sdpa_attention as sa
    import transformers.masking_utils as mu

    orig_ignore = mu._ignore_causal_mask_sdpa

    def ignore(*a, **k):
        r = orig_ignore(*a, **k)
        SEEN[f"ignore_causal_mask={r} capturing={torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()}"] += 1
        return r

    mu._ignore_causal_mask_sdpa = ignore
    orig_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, *a, **kw):
        SEEN[f"sdpa q{tuple(q.shape)} k{tuple(k.shape)} kstride{tuple(k.stride())} mask="
             f"{None if attn_mask is None else (tuple(attn_mask.shape), str(attn_mask.dtype))} "
             f"is_causal={kw.get('is_causal')} gqa={kw.get('enable_gqa')}"] += 1
        return orig_sdpa(q, k, v, attn_mask, *a, **kw)

    sa.torch.nn.functional.scaled_dot_product_attention = sdpa


def sdpa_ms(model, ids):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    att = sum(e.device_time for e in ev if "sdpa" in e.name or "flash" in e.name or "attention" in e.name)
    return att / 1e3, sum(e.device_time for e in ev) / 1e3


def report(tag, model, ids):
    SEEN.clear()
    for _ in range(3):   # braid with graphs: first use eager, second captures, third replays
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    decisions = dict(SEEN)
    t = ttft(model, ids, reps=5)
    try:
        a, tot = sdpa_ms(model, ids)
    except Exception as e:  # the profiler is a diagnostic
        a = tot = float("nan")
        print(f"profiler: {e}")
    print(f"{tag}: TTFT {t:.2f} ms; attention kernels {a:.2f} ms of {tot:.2f} ms device time", flush=True)
    for k, v in decisions.items():
        print(f"    {v:4d} x {k}", flush=True)


def main(argv):
    preset = argv[0] if argv and not argv[0].startswith("--") else "qwen2.5-0.5b"
    T = int(argv[argv.index("--len") + 1]) if "--len" in argv else 8192
    # --cap: the prefill graph's token cap for this run (to measure graphs above the default cap)
    cap = int(argv[argv.index("--cap") + 1]) if "--cap" in argv else None
    torch.set_grad_enabled(False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("braid_backend").setLevel(logging.DEBUG)
    _spy()
    model = build_model(preset, dtype=torch.bfloat16, device="cuda")
    ids = random_tokens(model.config.vocab_size, 1, T, 0, "cuda")
    import transformers
    print(f"{torch.cuda.get_device_name()} transformers {transformers.__version__} {preset} T={T}", flush=True)
    report("stock", model, ids)
    braid_backend.patch(model, prefill_graphs=False, backend="triton")
    report("braid eager prefill", model, ids)
    braid_backend.patch(model, backend="triton")
    if cap is not None:
        model._braid_session.prefill_graphs().token_cap = cap
    report(f"braid graph prefill (cap {cap or 'default'})", model, ids)
    print(braid_backend.status(model), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
