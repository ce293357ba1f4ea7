"""Prefill from CUDA graphs (runtime/prefill.py, issue #13 TTFT), checked on the CPU: the padded-bucket
body a graph captures, run eagerly, must give the unpadded stock prefill's last logits and cache
contents; ineligible calls must fall back to the eager prefill; a failed capture must turn the
feature off and still answer right. The real capture/replay is in tests/test_gpu.py."""
import copy
from types import SimpleNamespace

import pytest
import torch

import braid_backend
import braid_backend.hf.routing as routing
import braid_backend.hf.runner as hfrun
from braid_backend import PatchOptions
from braid_backend.hf.compat import cache_kwarg_name
from braid_backend.runtime.prefill import (PrefillGraphs, PrefillInputs, _Captured, finish_prefill,
                                           padded_prefill, prefill_bucket)
from braid_backend.testing.presets import build_model
from helpers import gen, rel_err, toks

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gemma2"]   # plain, qkv bias, sliding window 4 + soft-caps (eager attn)


def test_bucket_rule():
    prev = 0
    for T in range(1, 20000):
        Tb = prefill_bucket(T)
        assert Tb >= T and Tb >= prev and Tb % 64 == 0, T
        assert (Tb - T) < (T / 8 if T > 512 else 64), (T, Tb)
        prev = Tb
    assert [prefill_bucket(t) for t in (1, 64, 65, 512, 513, 1024, 1025, 2048, 2049, 8192)] == \
        [64, 64, 128, 512, 576, 1024, 1152, 2048, 2304, 8192]
    assert len({prefill_bucket(t) for t in range(1, 8193)}) <= 48, "a few buckets per octave"
    with pytest.raises(ValueError):
        prefill_bucket(0)


def _stock_prefill(model, cache, ids):
    """The eager path of HFRunner.decode: the patched forward (route -> stock HF modules) into `cache`."""
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, use_cache=True,
                logits_to_keep=1, **{cache_kwarg_name(model): cache})
    return out.logits[:, -1]


def _padded(model, cache, ids):
    """What a prefill graph replays, run eagerly."""
    B, T = ids.shape
    inp = PrefillInputs.new(B, prefill_bucket(T), ids.device)
    inp.fill(ids)
    logits = padded_prefill(hfrun.prefill_forward(model, cache, cache_kwarg_name(model)), cache, inp)
    finish_prefill(cache, B, T)
    return logits.clone()


def _poisoned_cache(s, B, length):
    c = s.new_cache(B, length)
    for t in c.k + c.v:
        t.fill_(float("nan"))
    return c


def _decode(model, cache, cont, T):
    """Teacher-forced fused decode steps after a prefill of T positions: (steps, B, V) logits."""
    B, out = cont.shape[0], []
    key = cache_kwarg_name(model)
    for i in range(cont.shape[1]):
        mask = torch.ones(B, T + i + 1, dtype=torch.long)
        pos = torch.full((B, 1), T + i)
        o = model(input_ids=cont[:, i:i + 1], attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache})
        out.append(o.logits[:, -1].float())
    return torch.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T", [1, 37, 64])
@torch.no_grad()
def test_padded_prefill_equals_stock_fp32(family, T):
    model = build_model(family, dtype=torch.float32, seed=5)
    assert braid_backend.patch(model).ok
    s = model._braid_session   # internals: its caches and prefill graphs
    B = 2
    ids, cont = toks(model, B, T, 40 + T), toks(model, B, 2, 41)
    c_ref, c_pad = s.new_cache(B, 256), _poisoned_cache(s, B, 256)
    want = _stock_prefill(model, c_ref, ids)
    got = _padded(model, c_pad, ids)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5
    assert c_pad.seen == c_ref.seen == T
    assert torch.equal(c_pad.valid[:B, :T], c_ref.valid[:B, :T]) and bool((c_pad.valid[:B, :T] == 1).all())
    for l in range(c_ref.num_layers):
        for a, b in ((c_pad.k[l], c_ref.k[l]), (c_pad.v[l], c_ref.v[l])):
            assert torch.isfinite(a[:B, :, :T]).all(), "a position < T was not written"
            assert rel_err(a[:B, :, :T], b[:B, :, :T]) < 1e-5, l
    # decode after the padded prefill overwrites the junk at T..Tb-1 before reading it
    assert rel_err(_decode(model, c_pad, cont, T), _decode(model, c_ref, cont, T)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_padded_prefill_bf16_within_2x_of_stock(family):
    model = build_model(family, dtype=torch.bfloat16, seed=6)
    ref_model = copy.deepcopy(model).float()
    B, T = 2, 45
    ids = toks(model, B, T, 50)
    ref = ref_model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
    stock = rel_err(model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float(), ref)
    assert braid_backend.patch(model).ok
    s = model._braid_session   # internals: its caches and prefill graphs
    c_ref, c_pad = s.new_cache(B, 256), _poisoned_cache(s, B, 256)
    eager = _stock_prefill(model, c_ref, ids).float()
    got = _padded(model, c_pad, ids).float()
    err = rel_err(got, ref)
    assert err <= 2 * stock + 1e-3, (err, stock)
    assert rel_err(eager, ref) <= 2 * stock + 1e-3
    for l in range(c_ref.num_layers):
        assert torch.isfinite(c_pad.k[l][:B, :, :T]).all() and torch.isfinite(c_pad.v[l][:B, :, :T]).all()
        # same cast points, only the padded shape differs: far below the bf16 step (2^-8)
        assert rel_err(c_pad.k[l][:B, :, :T], c_ref.k[l][:B, :, :T]) < 1e-2


def _forced_on(s):
    """A CPU session that believes it runs CUDA graphs, to reach the checks behind that switch."""
    s.status.graphs = s.status.prefill_graphs = True


@torch.no_grad()
def test_eligibility_reasons():
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=7)
    braid_backend.patch(model)
    s = model._braid_session   # internals: its caches and prefill graphs
    cache = s.new_cache(2, 256)
    ids = toks(model, 2, 20, 8)
    ones = torch.ones_like(ids)
    def reason(*a):
        return routing.prefill_route(*a).reason
    assert reason(s, cache, ids, ones) == "prefill graphs off"       # CPU: no graphs
    _forced_on(s)
    assert reason(s, cache, ids, ones) == "inputs on cpu"            # every other check passed
    assert reason(s, cache, ids, None) == "inputs on cpu"
    mask = ones.clone()
    mask[1, :3] = 0
    assert reason(s, cache, ids, mask) == "attention mask has padding"
    cache.seen = 4
    assert "already holds" in reason(s, cache, ids, ones)
    cache.seen = 0
    assert "above the cache" in reason(s, cache, toks(model, 3, 20, 8), None)
    assert "longer than the cache" in reason(s, cache, toks(model, 1, 300, 8), None)   # bucket 320 > 256
    s.prefill_graphs().token_cap = 64
    assert "cap 64" in reason(s, cache, toks(model, 2, 20, 8), None)                   # 2 x 64 tokens
    s.prefill_graphs().token_cap = 8192
    s.step.tp = object()
    try:
        assert reason(s, cache, ids, ones) == "tensor parallel"
    finally:
        s.step.tp = None
    assert reason(s, "not a braid cache", ids, ones) == "no braid cache"
    s.eager_only = True   # verify=True compares kernels without graphs
    assert reason(s, cache, ids, ones) == "prefill graphs off"


def test_option_validated_and_reported():
    with pytest.raises(TypeError, match="prefill_graphs"):
        PatchOptions(prefill_graphs="yes")
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=9)
    assert braid_backend.patch(model, prefill_graphs=False).options["prefill_graphs"] is False
    assert braid_backend.status(model).prefill_graphs is False
    assert braid_backend.patch(model).options["prefill_graphs"] is True
    assert braid_backend.status(model).prefill_graphs is False, "CPU: no graphs, so no prefill graphs"


def test_generate_on_cpu_with_option_on_and_off():
    model = build_model("tiny-llama", dtype=torch.float32, seed=10)
    ids = toks(model, 2, 13, 11)
    want = gen(model, ids, max_new_tokens=3)
    for on in (True, False):
        braid_backend.patch(model, prefill_graphs=on, graph_steps=2)
        for _ in range(2):
            assert torch.equal(gen(model, ids, max_new_tokens=3), want), on
            assert braid_backend.status(model).last_path == "fast"
        assert braid_backend.status(model).stats["prefill_graph"] == 0


def _fake_capture(self, key, cache, input_ids, forward):
    """Stands in for the CUDA capture on the CPU: the 'graph' re-runs the body eagerly on the same
    static buffers, so the keying, first-use, output clone and cache bookkeeping around it are tested."""
    B, Tb = key[:2]
    inp = PrefillInputs.new(B, Tb, input_ids.device)
    out = torch.full((B, cache_vocab(forward, cache, inp)), float("nan"))
    graph = SimpleNamespace(replay=lambda: out.copy_(padded_prefill(forward, cache, inp)))
    self.graphs[key] = _Captured(graph, inp, out)
    self.captures += 1
    return self.graphs[key]


def cache_vocab(forward, cache, inp):
    return padded_prefill(forward, cache, inp).shape[-1]


def _eligible_on_cpu(monkeypatch, s):
    _forced_on(s)
    orig = routing.prefill_route

    def eligible(*a):   # every check but the device's
        r = orig(*a)
        return routing.route(routing.PREFILL_GRAPH) if r.reason == "inputs on cpu" else r

    monkeypatch.setattr(hfrun, "prefill_route", eligible)


@torch.no_grad()
def test_graph_flow_with_a_fake_graph(monkeypatch):
    """Second use of a bucket captures, third replays; tokens equal stock's (fp32); padded batches and
    new buckets run eager; the K-step loop still runs eagerly (no real graphs on the CPU)."""
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=12)
    ids = toks(model, 1, 21, 13)
    want1, want5 = gen(model, ids, max_new_tokens=1), gen(model, ids, max_new_tokens=5)
    braid_backend.patch(model, graph_steps=2)
    s = model._braid_session   # internals: its caches and prefill graphs
    _eligible_on_cpu(monkeypatch, s)
    s.status.graphs = True
    monkeypatch.setattr(s, "graphs_active", lambda: True)
    monkeypatch.setattr(s, "fast_loop", _eager_fast_loop(s))
    monkeypatch.setattr(PrefillGraphs, "_capture", _fake_capture)
    st = braid_backend.status(model)
    stats = st.stats
    for i, want_graph in enumerate([0, 1, 2]):
        assert torch.equal(gen(model, ids, max_new_tokens=1), want1)
        assert stats["prefill_graph"] == want_graph, i
        assert st.last_prefill.path == ("prefill-graph" if want_graph else "prefill-eager"), (i, st.last_prefill)
    assert torch.equal(gen(model, ids, max_new_tokens=5), want5) and stats["prefill_graph"] == 3
    assert s.prefill.captures == 1
    # a left-padded batch: eager prefill, right answer
    ids2 = toks(model, 2, 21, 14)
    mask = torch.ones_like(ids2)
    mask[0, :5] = 0
    braid_backend.unpatch(model)
    want_pad = gen(model, ids2, attention_mask=mask, max_new_tokens=3)
    braid_backend.patch(model, graph_steps=2)
    s = model._braid_session   # internals: its caches and prefill graphs
    _eligible_on_cpu(monkeypatch, s)
    monkeypatch.setattr(s, "graphs_active", lambda: True)
    monkeypatch.setattr(s, "fast_loop", _eager_fast_loop(s))
    for _ in range(2):
        assert torch.equal(gen(model, ids2, attention_mask=mask, max_new_tokens=3), want_pad)
    st = braid_backend.status(model)
    assert st.stats["prefill_graph"] == 0 and str(st.last_prefill) == "prefill-eager (attention mask has padding)"


def _eager_fast_loop(s):
    from braid_backend.runtime.loop import FastLoop

    def fast_loop(cache, bucket, K, sel_cfg):
        return FastLoop(s.step, None, cache, bucket, K, sel_cfg)
    return fast_loop


@torch.no_grad()
def test_failed_capture_turns_prefill_graphs_off(monkeypatch, caplog):
    """The real capture path on the CPU fails (no CUDA streams): warned once, switched off, eager answer."""
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=15)
    ids = toks(model, 1, 30, 16)
    want = gen(model, ids, max_new_tokens=2)
    report = braid_backend.patch(model, graph_steps=1)
    s = model._braid_session   # internals: its caches and prefill graphs
    _eligible_on_cpu(monkeypatch, s)
    monkeypatch.setattr(s, "graphs_active", lambda: True)
    monkeypatch.setattr(s, "fast_loop", _eager_fast_loop(s))
    calls = []
    monkeypatch.setattr(PrefillGraphs, "_capture", lambda *a: calls.append(1) or (_ for _ in ()).throw(
        RuntimeError("capture exploded")))
    with caplog.at_level("WARNING", logger="braid_backend"):
        for _ in range(3):
            assert torch.equal(gen(model, ids, max_new_tokens=2), want)
    assert calls == [1], "one capture attempt, then the feature is off"
    st = braid_backend.status(model)
    assert st.prefill_graphs is False and s.prefill is None and st.stats["prefill_graph"] == 0
    assert st.last_prefill.path == "prefill-eager"
    assert sum("prefill graph capture failed" in r.message for r in caplog.records) == 1
    assert any("capture exploded" in e for e in report.events)


def test_run_resets_the_cache_when_the_capture_raises():
    """PrefillGraphs on its own: first use None (eager), second use tries to capture; a raise (here: no
    CUDA on this machine) reports through on_failure and leaves the cache empty for the eager prefill."""
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=17)
    braid_backend.patch(model)
    s = model._braid_session   # internals: its caches and prefill graphs
    cache = s.new_cache(1, 256)
    ids = toks(model, 1, 10, 18)
    seen = []
    pg = PrefillGraphs(on_failure=seen.append)
    fwd = hfrun.prefill_forward(model, cache, cache_kwarg_name(model))
    with torch.no_grad():
        assert pg.run(cache, ids, fwd) is None and not seen
        if torch.cuda.is_available():
            pytest.skip("the forced failure needs a machine without CUDA")
        assert pg.run(cache, ids, fwd) is None
    assert len(seen) == 1 and cache.seen == 0 and not pg.graphs
    pg.forget(cache.serial)
    assert not pg.used


def test_cache_update_returns_the_prompt_states_at_position_0_and_the_prefix_after():
    """A whole-prompt forward attends its own (projection-layout) key/value states, as stock's dynamic
    cache does, not the cache view; both hold the same values. A later chunk attends the cache prefix."""
    from braid_backend.runtime.cache import BraidCache

    c = BraidCache(2, 2, 3, 64, 8, torch.float32, "cpu")
    k = torch.randn(2, 5, 3, 8).transpose(1, 2)      # (B, KV, T, D) in the projection's layout
    v = torch.randn(2, 5, 3, 8).transpose(1, 2)
    for layer in c.layers:
        rk, rv = layer.update(k, v)
        assert rk is k and rv is v
        assert torch.equal(layer.keys[:, :, :5], k) and torch.equal(layer.values[:, :, :5], v)
    k2, v2 = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    rk, rv = c.layers[0].update(k2, v2)
    assert rk.shape[2] == 6 and torch.equal(rk[:, :, :5], k) and torch.equal(rk[:, :, 5:], k2)
    assert torch.equal(rv[:, :, 5:], v2)
    # another dtype than the cache's: the returned states are the cache's (cast) copy
    c2 = BraidCache(1, 1, 3, 64, 8, torch.bfloat16, "cpu")
    rk, _ = c2.layers[0].update(k[:1], v[:1])
    assert rk.dtype == torch.bfloat16 and rk.data_ptr() == c2.k[0].data_ptr()


def test_long_prompts_prefill_eagerly():
    """Above the cap (B x padded tokens) a prompt never captures: 4096 where the captured forward gets an
    explicit causal mask (it then loses to the eager prefill), 8192 where it gets none (measured on an
    H100: runtime/prefill.py)."""
    from braid_backend.runtime.prefill import MASKLESS_PREFILL_TOKEN_CAP, PREFILL_TOKEN_CAP

    assert PREFILL_TOKEN_CAP == 4096 and MASKLESS_PREFILL_TOKEN_CAP == 8192
    pg = PrefillGraphs()
    assert pg.token_cap == 4096
    cache = SimpleNamespace(seen=0, batch_capacity=2, max_len=16384)
    assert pg.reason(cache, 1, 4096) is None
    assert "cap 4096" in pg.reason(cache, 1, 4097)     # bucket 4608
    assert "cap 4096" in pg.reason(cache, 2, 2049)     # 2 x 2304
    assert pg.reason(cache, 2, 2048) is None
    pg = PrefillGraphs(token_cap=MASKLESS_PREFILL_TOKEN_CAP)
    assert pg.reason(cache, 1, 8192) is None and pg.reason(cache, 2, 4096) is None
    assert "cap 8192" in pg.reason(cache, 1, 8193)     # bucket 9216
    assert "cap 8192" in pg.reason(cache, 2, 4097)     # 2 x 4608


@pytest.mark.parametrize("family, sliding, cap", [("tiny-llama", False, 8192), ("tiny-qwen2", False, 8192),
                                                  ("tiny-qwen2", True, 4096), ("tiny-gemma2", False, 4096)])
def test_prefill_cap_follows_the_mask(family, sliding, cap):
    """The session's prefill graphs get the maskless cap only where the captured forward has no mask:
    full-attention SDPA models; a sliding window or another attention implementation keeps 4096."""
    model = build_model(family, dtype=torch.float32, seed=2)
    if sliding:
        model.config.use_sliding_window, model.config.sliding_window = True, 8
    assert (routing.maskless_reason(model) is None) == (cap == 8192), routing.maskless_reason(model)
    assert routing.prefill_token_cap(model) == cap
    braid_backend.patch(model)
    s = model._braid_session   # internals: its caches and prefill graphs
    _forced_on(s)
    cache = s.new_cache(2, 256)
    ids = toks(model, 2, 20, 8)
    assert s.prefill is None
    routing.prefill_route(s, cache, ids, None)   # what creates the session's prefill graphs
    assert s.prefill.token_cap == cap
    why = s.prefill.reason(SimpleNamespace(seen=0, batch_capacity=1, max_len=16384), 1, 8192)
    assert why == (None if cap == 8192 else "1 x 8192 padded tokens above the prefill graph cap 4096")


def test_maskless_prefill_eligibility():
    from braid_backend.hf.routing import maskless_reason

    for fam in ("tiny-llama", "tiny-qwen2"):
        m = build_model(fam, dtype=torch.float32, seed=1)
        assert m.config._attn_implementation == "sdpa"
        assert maskless_reason(m) is None, fam
    g2 = build_model("tiny-gemma2", dtype=torch.float32, seed=1)   # sliding windows, eager attention
    assert maskless_reason(g2) is not None
    q = build_model("tiny-qwen2", dtype=torch.float32, seed=1)
    q.config.use_sliding_window, q.config.sliding_window = True, 8
    assert "sliding" in maskless_reason(q)


@torch.no_grad()
def test_captured_prefill_gets_no_mask(monkeypatch):
    """Under CUDA stream capture transformers counts as tracing and builds an explicit causal mask
    (simulated here: masking_utils.is_tracing -> True). The prefill forward hands SDPA no mask and
    is_causal=True instead, with the same logits, and leaves the model's attention setting as it was."""
    import transformers.integrations.sdpa_attention as sa
    import transformers.masking_utils as mu

    model = build_model("tiny-llama", dtype=torch.float32, seed=5)
    assert braid_backend.patch(model).ok
    s = model._braid_session   # internals: its caches and prefill graphs
    ids = toks(model, 2, 40, 3)
    want = _stock_prefill(model, s.new_cache(2, 256), ids)
    seen = []
    orig = sa.torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *a, **kw):
        seen.append((attn_mask is None, kw.get("is_causal")))
        return orig(q, k, v, attn_mask, *a, **kw)

    monkeypatch.setattr(sa.torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(mu, "is_tracing", lambda *a, **k: True)
    # without the fix HF gives a mask here: the situation the fix is for
    model.model(input_ids=ids, use_cache=False)
    assert seen and not any(none for none, _ in seen)
    seen.clear()
    got = _padded(model, s.new_cache(2, 256), ids)
    assert seen and all(none and causal for none, causal in seen), seen
    assert rel_err(got, want) < 1e-5
    assert model.config._attn_implementation == "sdpa"
