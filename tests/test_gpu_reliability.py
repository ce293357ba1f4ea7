"""Reliability checks that need a CUDA GPU (issue #5): run by scripts/gpu_check.sh on the GPU machine.

The CPU side of the same issue, and the helpers used here, live in tests/test_reliability.py."""
import copy
import os

import pytest
import torch

import braid_backend
from braid_backend.testing.presets import build_model

from helpers import gen, outcome, same, toks  # noqa: E402,F401


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


@pytest.mark.gpu
def test_gpu_del_model_frees_every_byte():
    """`del model` (cyclic GC off) gives back the weights, the KV cache and the graph pool of a patched
    model that ran both generate() paths, like it does for a stock model (the control, run first so
    that cuBLAS workspaces and other one-time allocations exist before the patched round)."""
    import gc
    import json

    def round_trip(patched: bool) -> dict:
        before = _allocated()
        model = build_model("qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda", seed=31)
        loaded = _allocated()
        if patched:
            assert braid_backend.patch(model).ok
        ids = toks(model, 2, 40, 311, "cuda")
        gen(model, ids, max_new_tokens=24)                                          # fast path, K-step graphs
        gen(model, ids, max_new_tokens=4, output_scores=True, return_dict_in_generate=True)   # HF loop, 1-step graphs
        used = _allocated()
        if patched:
            st = braid_backend.status(model)
            assert st.last_path.startswith("hf-loop") and st.stats["decode_graph"] > 0, st
        gc.disable()
        try:
            del model
            after = _allocated()
        finally:
            gc.enable()
        torch.cuda.empty_cache()
        return dict(patched=patched, before=before, loaded=loaded, used=used, after=after)

    stock = round_trip(False)
    patched = round_trip(True)
    out = os.environ.get("BRAID_RELIABILITY_JSON")
    if out:
        path = out.replace(".json", "-del-model.json")
        with open(path, "w") as f:
            json.dump({"stock": stock, "patched": patched}, f, indent=1)
    assert patched["used"] - patched["loaded"] > 1 << 20, "the patched round should hold cache + graphs"
    assert patched["after"] <= patched["before"] + (1 << 20), (stock, patched)


@pytest.mark.gpu
def test_gpu_long_run_flat_memory_no_recapture_repeatable():
    """1,000 generate() calls, batch 1..8, prompt 8..64, 1..32 new tokens, greedy and sampling, some
    left-padded: allocated memory flat after warm-up, no graph re-capture, seeded calls repeat."""
    import gc
    import json
    import random
    import time

    model = build_model("qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda", seed=21)
    V = model.config.vocab_size
    assert braid_backend.patch(model).ok
    st = model._braid_session   # internals: graph captures, loops and the cache must stay put
    rnd = random.Random(1234)
    g = torch.Generator().manual_seed(4321)
    greedy = dict(do_sample=False)
    sampling = dict(do_sample=True, temperature=0.8, top_k=50)

    def call(B, T, new, sel, pad=0, seed=None):
        ids = torch.randint(3, V, (B, T), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, :pad] = 0
            ids[0, :pad] = 0
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, pad_token_id=0, **sel)

    def mem():
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    t0 = time.perf_counter()
    call(8, 64, 32, greedy)   # the largest shape first: the shared cache never has to grow later
    for B in (1, 2, 3, 5, 8):
        for sel in (greedy, sampling):
            call(B, rnd.randint(8, 64), 32, sel)
    assert st.status.last_path == "fast", st.status.last_path
    assert st.graphs is not None and st.graphs.captures > 0, st.report.events
    g_state = g.get_state()
    first_greedy = call(4, 40, 24, greedy, pad=5)
    first_sample = call(3, 20, 24, sampling, seed=99)
    mem0, caps0, loops0, cache0 = mem(), st.graphs.captures, len(st.loops), st.cache
    warm_s = time.perf_counter() - t0
    samples, t1 = [], time.perf_counter()
    N = int(os.environ.get("BRAID_LONG_RUN_CALLS", 1000))
    for i in range(N):
        B = rnd.randint(1, 8)
        call(B, rnd.randint(8, 64), rnd.randint(1, 32), sampling if i % 2 else greedy,
             pad=rnd.randint(1, 6) if i % 3 == 0 else 0)
        if i % 100 == 99:
            samples.append(mem())
    run_s = time.perf_counter() - t1
    g.set_state(g_state)
    again_greedy = call(4, 40, 24, greedy, pad=5)
    again_sample = call(3, 20, 24, sampling, seed=99)
    mem1 = mem()
    figures = dict(calls=N, warmup_s=round(warm_s, 1), run_s=round(run_s, 1), mem_after_warmup=mem0,
                   mem_end=mem1, drift_bytes=mem1 - mem0, mem_samples=samples,
                   captures_after_warmup=caps0, captures_end=st.graphs.captures,
                   fast_loops=(loops0, len(st.loops)), stats=dict(st.status.stats))
    print("braid long run:", json.dumps(figures))
    if os.environ.get("BRAID_RELIABILITY_JSON"):
        with open(os.environ["BRAID_RELIABILITY_JSON"], "w") as f:
            json.dump(figures, f, indent=1)
    assert st.graphs.captures == caps0 and len(st.loops) == loops0 and st.cache is cache0, figures
    assert st.status.stats["generate_stock"] == 0 and st.status.stats["generate_hf_loop"] == 0, figures
    assert max(samples + [mem1]) - mem0 <= 1 << 20, figures   # <= 1 MiB: nothing accumulates per call
    assert torch.equal(first_greedy, again_greedy) and torch.equal(first_sample, again_sample)


@pytest.mark.gpu
def test_gpu_graph_capture_failure_falls_back(monkeypatch):
    """A real CUDA model whose graph capture raises OOM: fast path and HF-loop steps run eagerly, output
    equal to the graphs=False run of the same kernels."""
    from braid_backend.runtime.graphs import GraphRunner

    model = build_model("tiny-qwen2", dtype=torch.float32, device="cuda", seed=22)
    ids = toks(model, 3, 9, 221, "cuda")
    kw = dict(max_new_tokens=12)
    braid_backend.patch(model, graphs=False)
    want_fast = gen(model, ids, **kw)
    want_loop = gen(model, ids, output_scores=True, return_dict_in_generate=True, **kw).sequences
    braid_backend.unpatch(model)

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(GraphRunner, "_capture", oom)   # the capture itself; the failure handling stays real
    report = braid_backend.patch(model)
    st = braid_backend.status(model)
    assert torch.equal(gen(model, ids, **kw), want_fast) and st.last_path == "fast"
    assert st.graphs is False and any("graph capture failed" in e for e in report.events)
    braid_backend.unpatch(model)
    braid_backend.patch(model)   # the HF loop (output_scores) hits the failure in decode_step
    st = braid_backend.status(model)
    got = gen(model, ids, output_scores=True, return_dict_in_generate=True, **kw).sequences
    assert torch.equal(got, want_loop) and st.last_path.startswith("hf-loop") and st.stats["decode_fused"] > 0
    braid_backend.unpatch(model)


@pytest.mark.gpu
def test_gpu_wrong_device_ids_and_model_moved_after_patch():
    model = build_model("tiny-llama", dtype=torch.float32, device="cuda", seed=23)
    stock = copy.deepcopy(model)
    ids = toks(model, 2, 6, 231, "cpu")
    braid_backend.patch(model)
    # ids on the CPU for a CUDA model: whatever stock does (HF warns, then the embedding raises)
    want = outcome(lambda: gen(stock, ids, max_new_tokens=3))
    got = outcome(lambda: gen(model, ids, max_new_tokens=3))
    assert same(want, got), (want, got)
    # moved to the CPU after patching on CUDA: the patched forward notices and runs stock
    model.to("cpu")
    stock.to("cpu")
    assert torch.equal(gen(model, ids, max_new_tokens=3), gen(stock, ids, max_new_tokens=3))
    assert braid_backend.status(model).disabled
    braid_backend.unpatch(model)
    assert torch.equal(gen(model, ids, max_new_tokens=3), gen(stock, ids, max_new_tokens=3))
