"""Row-chunked eager prefill (issue #13, memory): above PREFILL_ROW_TOKENS a batch's prompt runs a group
of rows at a time, each group writing its rows of the braid cache (BraidCache.rows). Checked on the CPU
in fp32 with a small budget: the same tokens and the same cache contents as one whole-batch forward,
and the cache's row offset and length right afterwards, also when a group raises."""
import logging

import pytest
import torch

import braid_backend
import braid_backend.hf.runner as hfrun
from braid_backend.hf.compat import cache_kwarg_name
from braid_backend.runtime.cache import BraidCache, CacheTooSmall
from braid_backend.testing.presets import build_model
from helpers import gen, rel_err, toks

B, T, NEW = 3, 12, 4


def _prompt(model):
    ids = toks(model, B, T, 21)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0      # left padding of different lengths, one row without
    mask[2, :5] = 0
    return ids, mask


def _spy_prefill(monkeypatch, s):
    """Records, right after each eager prefill, the cache's length and row offset and a copy of what
    the prompt's rows hold (k/v of every layer, valid)."""
    got = []
    orig = hfrun.eager_prefill

    def spy(model, cache, input_ids, mask, pos, key, row_tokens):
        last = orig(model, cache, input_ids, mask, pos, key, row_tokens)
        n = input_ids.shape[0]
        got.append(dict(seen=cache.seen, row0=cache.row0, last=last.clone(),
                        k=[k[:n, :, :T].clone() for k in cache.k], v=[v[:n, :, :T].clone() for v in cache.v],
                        valid=cache.valid[:n, :T].clone()))
        return last

    monkeypatch.setattr(hfrun, "eager_prefill", spy)
    return got


def _poison(cache):
    """NaN keys/values and an impossible `valid`: a row or position the prefill missed shows."""
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    cache.valid.fill_(7)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma2"])   # sdpa; eager attention + sliding window
@torch.no_grad()
def test_row_groups_equal_one_forward_fp32(monkeypatch, caplog, family):
    model = build_model(family, dtype=torch.float32, seed=3)
    ids, mask = _prompt(model)
    stock = gen(model, ids, attention_mask=mask, max_new_tokens=NEW)
    assert braid_backend.patch(model, graph_steps=2).ok
    s = model._braid_session   # internals: the shared cache the prefill writes
    got = _spy_prefill(monkeypatch, s)
    with caplog.at_level(logging.INFO, logger="braid_backend"):
        want = gen(model, ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(want, stock) and braid_backend.status(model).last_path == "fast"
    assert not any("row groups" in r.message for r in caplog.records), "B x T below the budget: one forward"
    ref = got.pop()
    assert ref["seen"] == T and ref["row0"] == 0
    assert torch.equal(ref["valid"], mask.to(torch.int8))
    # rows of 1 (3 groups), of 2 (2 + 1), and B * T exactly at the budget (one forward)
    for budget, groups, rows in ((T, 3, 1), (2 * T + 5, 2, 2), (B * T, None, None)):
        monkeypatch.setattr(model.generate.runner, "prefill_row_tokens", budget)   # this model's budget
        _poison(s.cache)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="braid_backend"):
            out = gen(model, ids, attention_mask=mask, max_new_tokens=NEW)
        assert torch.equal(out, want), budget
        lines = [r.message for r in caplog.records if "row groups" in r.message]
        if groups is None:
            assert not lines
        else:
            assert lines == [f"braid: prefill of {B} x {T} tokens in {groups} row groups of {rows} rows (memory)"]
        g = got.pop()
        assert g["seen"] == T and g["row0"] == 0 and s.cache.row0 == 0
        # the lm_head GEMM over 1 or 2 rows may round apart from one over 3 (1 ulp seen on the CPU)
        assert rel_err(g["last"], ref["last"]) < 1e-6, budget
        assert torch.equal(g["valid"], ref["valid"]), budget
        for layer in range(s.cache.num_layers):
            for name in ("k", "v"):
                a, b = g[name][layer], ref[name][layer]
                # padded positions hold keys/values too (stock's as well); every one of them must match
                assert torch.isfinite(a).all(), (budget, name, layer)
                assert torch.equal(a, b), (budget, name, layer, (a - b).abs().max())


@torch.no_grad()
def test_a_group_that_raises_leaves_the_cache_empty_and_at_row_0(monkeypatch):
    model = build_model("tiny-llama", dtype=torch.float32, seed=4)
    ids, mask = _prompt(model)
    assert braid_backend.patch(model, graph_steps=2).ok
    want = gen(model, ids, attention_mask=mask, max_new_tokens=NEW)
    s = model._braid_session   # internals: the shared cache's rows and length
    monkeypatch.setattr(model.generate.runner, "prefill_row_tokens", T)
    patched = model.forward
    calls = []

    def forward(*a, **kw):
        calls.append((s.cache.row0, s.cache.seen, kw["input_ids"].shape[0]))
        out = patched(*a, **kw)
        if len(calls) == 2:   # after the group's forward: its rows are written and seen is T
            raise RuntimeError("group 2 exploded")
        return out

    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(RuntimeError, match="group 2 exploded"):
        gen(model, ids, attention_mask=mask, max_new_tokens=NEW)
    assert calls == [(0, 0, 1), (1, 0, 1)], "each group starts from an empty cache at its own row"
    assert s.cache.row0 == 0 and s.cache.seen == 0
    monkeypatch.setattr(model, "forward", patched)
    assert torch.equal(gen(model, ids, attention_mask=mask, max_new_tokens=NEW), want), "the cache is usable again"


def test_cache_rows_offsets_update_and_valid():
    c = BraidCache(2, 4, 2, 32, 8, torch.float32, "cpu")
    for t in c.k + c.v:
        t.zero_()
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with c.rows(2):
        assert c.row0 == 2
        c.mark_prefill(mask, 2, 5)
        # another dtype than the cache's: the returned prefix is the group's own rows of the cache
        rk, _ = c.layers[0].update(k.double(), v.double())
        assert rk.data_ptr() == c.k[0][2:4].data_ptr() and rk.shape == (2, 2, 5, 8)
        assert c.seen == 0, "only the last layer's update moves seen"
        for layer in c.layers:
            rk, rv = layer.update(k, v)
            assert rk is k and rv is v
    assert c.row0 == 0 and c.seen == 5
    for layer in range(2):
        assert torch.equal(c.k[layer][2:4, :, :5], k) and torch.equal(c.v[layer][2:4, :, :5], v)
        assert not c.k[layer][:2].any() and not c.v[layer][:2].any(), "rows 0-1 untouched"
    assert torch.equal(c.valid[2:4, :5], mask.to(torch.int8)) and not c.valid[:2].any()
    c.seen = 0
    with pytest.raises(CacheTooSmall), c.rows(3):
        c.layers[0].update(k, v)              # rows 3..4 of 4
    with pytest.raises(CacheTooSmall), c.rows(3):
        c.mark_prefill(None, 2, 5)
    with pytest.raises(CacheTooSmall), c.rows(4):
        pass
    with pytest.raises(KeyError), c.rows(1):
        raise KeyError("inside")
    assert c.row0 == 0


@torch.no_grad()
def test_patched_forward_checks_the_group_against_the_capacity():
    model = build_model("tiny-llama", dtype=torch.float32, seed=5)
    assert braid_backend.patch(model).ok
    s = model._braid_session   # internals: a cache of the session's own
    cache = s.new_cache(2, 64)                     # capacity 2
    ids = toks(model, 2, 6, 6)
    key = cache_kwarg_name(model)
    with cache.rows(1), pytest.raises(ValueError, match="from row 1"):
        model(input_ids=ids, use_cache=True, **{key: cache})
    with cache.rows(1):
        out = model(input_ids=ids[1:], use_cache=True, logits_to_keep=1, **{key: cache})
    assert cache.seen == 6 and cache.row0 == 0 and bool((cache.valid[1, :6] == 1).all())
    assert out.logits.shape[0] == 1
