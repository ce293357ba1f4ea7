"""The L2 streaming plan (model/l2stream.py): which weight bytes each projection kernel prefetches."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from braid_backend.model.l2stream import budget_bytes, plan_windows, stream_plan  # noqa: E402

MB = 1 << 20


def _check(sizes, budget, max_ranges=3):
    """Invariants of any plan; returns the 16-byte units asked for, in order."""
    win = plan_windows(sizes, budget, max_ranges)
    assert len(win) == len(sizes)
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s // 16 * 16)
    asked = []
    for j, ranges in enumerate(win):
        assert len(ranges) <= max_ranges
        for i, off, n in ranges:
            assert i > j, "a kernel prefetches only weights read after its own"
            assert off % 16 == 0 and n % 16 == 0 and n > 0 and off + n <= sizes[i]
            lo = starts[i] + off
            assert lo + n <= starts[j + 1] + budget, "beyond the budget past the next kernel's weights"
            asked.append((lo, lo + n))
    for (a0, a1), (b0, b1) in zip(asked, asked[1:]):
        assert a1 <= b0, "ranges follow the read order, no byte twice"
    if asked:
        assert asked[0][0] == starts[1]
    return win, asked, starts


@pytest.mark.parametrize("sizes,budget", [
    ([1001 * 16, 77 * 16 + 5, 500 * 16, 3 * 16], 64 * 16),
    ([16] * 30, 5 * 16),
    ([7, 100 * 16, 0, 9, 40 * 16], 50 * 16 + 3),      # sizes under 16 bytes, an empty weight
    ([2 * MB, 19 * MB, 17 * MB, 9 * MB] * 5, 20 * MB),
])
def test_plan_invariants(sizes, budget):
    _check(sizes, budget)
    _check(sizes, budget, max_ranges=1)


def test_plan_covers_the_stream_and_nothing_without_budget():
    sizes = [2 * MB, 1 * MB, 17 * MB, 9 * MB] * 3
    win, asked, starts = _check(sizes, 20 * MB)
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(asked, asked[1:])), "a budget this size leaves no gap"
    assert asked[-1][1] == starts[-1], "every byte after weight 0 is asked for"
    assert plan_windows(sizes, 0) == [[] for _ in sizes]
    assert plan_windows(sizes[:1], 20 * MB) == [[]]


def test_qwen_layer_plan():
    """Qwen2.5-0.5B shapes (qkv 1152x896, o 896x896, gate_up 9728x896, down 896x4864, bf16), 20 MB ahead:
    layer 0's qkv asks for o_proj, all of gate_up and the first MB-odd of down; o_proj for the rest of the
    20 MB past gate_up's start."""
    qkv, o, gu, down = 1152 * 896 * 2, 896 * 896 * 2, 9728 * 896 * 2, 896 * 4864 * 2
    sizes = [qkv, o, gu, down] * 2
    win, _, _ = _check(sizes, 20 * MB)
    assert win[0] == [(1, 0, o), (2, 0, gu), (3, 0, 20 * MB - o - gu)]
    assert win[1] == [(3, 20 * MB - o - gu, o)]
    assert win[-1] == []


def test_cpu_has_no_stream_and_bad_settings_are_refused(monkeypatch):
    w = [torch.zeros(64, 64) for _ in range(4)]
    for v in ("8", "auto", "0"):
        monkeypatch.setenv("BRAID_L2_PREFETCH_MB", v)
        assert budget_bytes(torch.device("cpu")) == 0
        assert stream_plan(w, torch.device("cpu")) == [None] * 4
    monkeypatch.setenv("BRAID_L2_PREFETCH_MB", "lots")
    with pytest.raises(ValueError, match="BRAID_L2_PREFETCH_MB"):
        budget_bytes(torch.device("cpu"))


def test_next_small_policy():
    from braid_backend.model.l2stream import plan_next_small

    sizes = [2 * MB, 1 * MB + 8, 17 * MB, 9 * MB, 2 * MB]
    assert plan_next_small(sizes, 2 * MB) == [[(1, 0, 1 * MB)], [], [], [(4, 0, 2 * MB)], []]
    assert plan_next_small(sizes, 0) == [[] for _ in sizes]
