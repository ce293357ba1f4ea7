"""patch() options: validated up front, re-patching never silently keeps old options, and a fuzz over
option values and generate() kwargs: every call ends (under a timeout) with stock's outcome."""
import contextlib
import random
import signal

import pytest
import torch

import braid_backend
from braid_backend import PatchOptions
from braid_backend.testing.presets import build_model
from helpers import outcome, same

CALL_TIMEOUT = 120   # seconds per generate() under the interpreter; a hang fails the test, not CI


@contextlib.contextmanager
def time_limit(seconds: int):
    def boom(signum, frame):
        raise TimeoutError(f"call did not finish in {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("bad,exc", [
    (dict(graph_steps=0), ValueError), (dict(graph_steps=-1), ValueError), (dict(graph_steps=129), ValueError),
    (dict(graph_steps="x"), TypeError), (dict(graph_steps=2.5), TypeError), (dict(graph_steps=True), TypeError),
    (dict(graphs="no"), TypeError), (dict(graphs=1), TypeError), (dict(fast_generate=None), TypeError),
    (dict(verify="yes"), TypeError), (dict(strict=0), TypeError), (dict(graph_step=4), TypeError),
])
def test_bad_options_raise_before_touching_the_model(bad, exc):
    model = build_model("tiny-llama", dtype=torch.float32, seed=1)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(exc, match="graph_step|graphs|fast_generate|verify|strict"):
        braid_backend.patch(model, **bad)
    assert not braid_backend.is_patched(model) and [p.data_ptr() for p in model.parameters()] == ptrs
    assert "forward" not in vars(model)


def test_options_are_frozen_and_normalised():
    o = PatchOptions.from_kwargs(graph_steps=torch.tensor(3).item())
    assert o.graph_steps == 3 and isinstance(o.graph_steps, int)
    with pytest.raises(Exception):
        o.graph_steps = 4


def test_repatch_with_other_options_repatches():
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=2)
    r1 = braid_backend.patch(model, graph_steps=2)
    assert braid_backend.patch(model, graph_steps=2) is r1            # same options: same patch
    s1 = model._braid_session   # internals: a re-patch makes a new session
    r2 = braid_backend.patch(model, graph_steps=3, fast_generate=False)
    s2 = model._braid_session
    assert r2 is not r1 and s2 is not s1 and s2.options.graph_steps == 3 and not s2.options.fast_generate
    assert r2.options["graph_steps"] == 3
    ids = torch.randint(3, 300, (1, 4))
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert braid_backend.status(model).last_path.startswith("hf-loop (fast_generate=False)")
    assert not s1.step.layers, "the old session must be released"
    braid_backend.unpatch(model)


def _kwargs(rnd: random.Random, vocab: int):
    B, T = rnd.randint(1, 3), rnd.randint(1, 6)
    g = torch.Generator().manual_seed(rnd.randint(0, 10**6))
    ids = torch.randint(3, vocab, (B, T), generator=g)
    kw = dict(input_ids=ids, max_new_tokens=rnd.choice([0, 1, 2, 5]), pad_token_id=0)
    if B > 1 and T > 2 and rnd.random() < 0.5:   # left padding
        mask = torch.ones_like(ids)
        mask[0, :rnd.randint(1, T - 1)] = 0
        ids[mask == 0] = 0
        kw["attention_mask"] = mask
    if rnd.random() < 0.3:
        kw["repetition_penalty"] = rnd.choice([0.7, 1.3])
    if rnd.random() < 0.3:
        kw["min_new_tokens"] = rnd.randint(0, 4)
    if rnd.random() < 0.4:
        kw["eos_token_id"] = rnd.sample(range(3, vocab), 2)
    kw["do_sample"] = rnd.random() < 0.5
    if kw["do_sample"]:
        for k, vals in (("temperature", [0.5, 1.7]), ("top_k", [0, 1, 7, 1000]), ("top_p", [0.3, 0.95, 1.0]),
                        ("min_p", [None, 0.1])):
            if rnd.random() < 0.5:
                kw[k] = rnd.choice(vals)
        if rnd.random() < 0.3:
            kw["num_return_sequences"] = 2
    if rnd.random() < 0.1:   # invalid values: whatever stock does (an error), the patched call does too
        kw[rnd.choice(["max_new_tokens", "top_k", "temperature"])] = -1
    return kw


def test_fuzz_options_and_generate_kwargs_end_with_stock_outcome():
    """Greedy calls must give stock's tokens (fp32); sampled calls the same tokens whatever graph_steps
    is (one draw per step, in step order) and stock's shape; invalid calls stock's exception type."""
    rnd = random.Random(2026)
    stock = build_model("tiny-qwen2", dtype=torch.float32, seed=3)
    patched = {K: build_model("tiny-qwen2", dtype=torch.float32, seed=3) for K in (1, 3)}
    for K, m in patched.items():
        braid_backend.patch(m, graph_steps=K)
    V = stock.config.vocab_size
    failures, paths = [], set()
    for case in range(10):
        kw = _kwargs(rnd, V)
        seed = rnd.randint(0, 1000)

        def call(m):
            torch.manual_seed(seed)
            with time_limit(CALL_TIMEOUT):
                return m.generate(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()})

        want = outcome(lambda: call(stock))
        got = {K: outcome(lambda m=m: call(m)) for K, m in patched.items()}
        paths.add(braid_backend.status(patched[3]).last_path)
        for K, g in got.items():
            assert g[1] is not TimeoutError, (case, K, kw)
            if want[0] == "exc" or not kw["do_sample"]:
                ok = same(want, g)
            else:
                ok = g[0] == "ok" and g[1].shape == want[1].shape and bool((g[1] >= 0).all() and (g[1] < V).all())
            if not ok:
                failures.append((case, K, {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask")},
                                 want[0], g[0]))
        if kw["do_sample"] and all(g[0] == "ok" for g in got.values()):
            if not torch.equal(got[1][1], got[3][1]):
                failures.append((case, "graph_steps changed the sampled tokens"))
    assert not failures, failures
    assert "fast" in paths, paths
