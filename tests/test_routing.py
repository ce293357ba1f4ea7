"""status() and the log after the routing decisions: counters that count what they name, verify's
"not asked", the last call's path even when it raised, one log line per distinct route, and the report's
rows from the step itself."""
import logging

import pytest
import torch

import braid_backend
from braid_backend.report import Route
from braid_backend.testing.presets import build_model
from helpers import gen, toks


@pytest.fixture(scope="module")
def model():
    m = build_model("tiny-llama", dtype=torch.float32, seed=3)
    assert braid_backend.patch(m, graph_steps=2).ok
    return m


def test_fast_path_counts_its_fused_steps(model):
    st = braid_backend.status(model)
    before = dict(st.stats)
    for _ in range(2):
        gen(model, toks(model, 1, 4, 1), max_new_tokens=3, min_new_tokens=3)
    assert st.last_route == Route("fast")
    assert st.stats["generate_fast"] == before["generate_fast"] + 2
    # 3 new tokens = the prefill's + 2 decode steps each; no graphs on the CPU
    assert st.stats["decode_fused"] == before["decode_fused"] + 4 and st.stats["decode_graph"] == 0, st.stats


def test_hf_loop_counts_its_fused_steps_too(model):
    st = braid_backend.status(model)
    before = st.stats["decode_fused"]
    out = gen(model, toks(model, 1, 4, 2), max_new_tokens=2, min_new_tokens=2, output_scores=True,
              return_dict_in_generate=True)
    assert out.sequences.shape[1] == 6 and str(st.last_route) == "hf-loop (output_scores=True)"
    assert st.stats["decode_fused"] == before + 1 and st.last_forward == Route("decode-fused")


def test_verified_says_not_asked_without_verify(model):
    assert braid_backend.status(model).verified is None


def test_a_call_that_raises_leaves_no_stale_path(model):
    st = braid_backend.status(model)
    gen(model, toks(model, 1, 4, 3), max_new_tokens=1, num_beams=2)
    assert st.last_route == Route("stock", "beam search") and st.last_error is None
    with pytest.raises(ValueError):   # HF rejects it before any decoding method runs
        gen(model, toks(model, 1, 4, 3), max_new_tokens=1, stop_strings=["x"])
    assert st.last_route == Route("fast") and st.last_error.startswith("ValueError"), st


def test_the_log_says_each_route_once(model, caplog):
    ids = toks(model, 1, 4, 4)
    with caplog.at_level(logging.INFO, logger="braid_backend"):
        for _ in range(3):
            gen(model, ids, max_new_tokens=1, bad_words_ids=[[9]])   # a route not seen before
    lines = [r.getMessage() for r in caplog.records if "NoBadWords" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("braid: generate: hf-loop"), lines


@pytest.mark.parametrize("family,words", [("tiny-gemma2", ("post-norm", "sliding window 4")),
                                          ("tiny-qwen2", ("+ bias",)), ("tiny-qwen3", ("q/k norm",))])
def test_report_rows_come_from_the_step(family, words):
    m = build_model(family, dtype=torch.float32, seed=1)
    rep = braid_backend.patch(m)
    rows = m._braid_session.step.describe()   # internals: the step that runs is the one described
    assert rep.patched == rows and rows[-1] == ("model.norm+lm_head", "rmsnorm + lm_head GEMV")
    text = " ".join(w for _, w in rows)
    assert all(w in text for w in words), (words, text)
    braid_backend.unpatch(m)


def test_step_events_reach_the_report(monkeypatch):
    """What the CuPy step records while it runs (a bucket's backend, a fallback) lands in the report
    after the call; simulated on the CPU by the step's own failure hook."""
    import braid_backend.api as api

    monkeypatch.setattr(api, "cupy_reason", lambda plan, device: None)
    m = build_model("tiny-qwen2", dtype=torch.float32, seed=2)
    rep = braid_backend.patch(m, backend="cupy")
    step = m._braid_session.step   # internals: trigger the step's failure path directly
    step.choice[1] = "cupy"
    step._fail("injected", RuntimeError("boom"))
    assert not any("boom" in e for e in rep.events), "moved after the call, not during it"
    step.layer_impl = "reference"
    gen(m, toks(m, 1, 4, 5), max_new_tokens=1)
    assert any("CuPy layer kernel off" in e and "boom" in e for e in rep.events), rep.events
    assert rep.backends == {1: "triton"}
    braid_backend.unpatch(m)
