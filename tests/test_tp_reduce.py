"""The flag-synced tensor-parallel reduce kernel (kernels/tp_reduce.py), on the CPU interpreter.

The ranks share this process: their "symmetric memory" is ordinary tensors whose addresses every
rank's kernel can read, which is what the peer mappings give each rank on the GPU. The interpreter
cannot run two kernels at once (it patches triton.language while one runs), so ranks run one after
another: rank r finds the signals of ranks < r written by their kernels and those of ranks > r set
by hand to what those ranks will send. `test_a_rank_waits_for_its_peer` shows the wait is real."""
import threading
import time

import pytest
import torch

from braid_backend.kernels.tp_reduce import programs_for, tp_reduce, tp_reduce_reference


class FakeGroup:
    """What FlagPartials holds per rank, with plain tensors."""

    def __init__(self, world, M, N, dtype):
        self.world, self.M, self.N, self.n = world, M, N, M * N
        self.nprog = programs_for(self.n)
        self.data = [torch.full((2 * self.n,), float("nan"), dtype=dtype) for _ in range(world)]
        self.flags = [torch.zeros(world * self.nprog, dtype=torch.int64) for _ in range(world)]
        self.counters = [torch.zeros(self.nprog, dtype=torch.int64) for _ in range(world)]
        self.data_ptrs = torch.tensor([d.data_ptr() for d in self.data], dtype=torch.int64)
        self.flag_ptrs = torch.tensor([f.data_ptr() for f in self.flags], dtype=torch.int64)

    def slot(self, r, k):
        return self.data[r][k * self.n:(k + 1) * self.n].view(self.M, self.N)

    def call(self, r, k, out, **kw):
        tp_reduce(self.data_ptrs, self.flag_ptrs, self.counters[r], k * self.n, r, self.world, out,
                  nprog=self.nprog, **kw)


def run_ranks(g, fns, epoch, timeout=120):
    P = g.nprog
    for r in range(g.world):
        for q in range(r + 1, g.world):
            g.flags[r][q * P:(q + 1) * P] = epoch
    for f in fns:
        t = threading.Thread(target=f, daemon=True)
        t.start()
        t.join(timeout)
        assert not t.is_alive(), "a rank is still waiting (handshake hang)"
    for r in range(g.world):   # every rank's kernel wrote its epoch into each peer's word for it
        for q in range(g.world):
            if q != r:
                assert torch.all(g.flags[r][q * P:(q + 1) * P] == epoch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world,M,N", [(2, 1, 1100), (3, 3, 517)])
def test_reduce_matches_reference_on_every_rank(dtype, world, M, N):
    g = FakeGroup(world, M, N, dtype)
    bias = torch.randn(N).to(dtype)
    xs = torch.randn(M, N).to(dtype)
    outs = [xs.clone() for _ in range(world)]        # residual stream, the same on every rank
    tmps = [torch.full((M, N), float("nan"), dtype=dtype) for _ in range(world)]
    # three calls in a row, alternating slots with fresh partials, as the step's sublayers do
    for call, (k, kw) in enumerate([(0, dict(residual=True)), (1, dict(residual=True, bias=True)), (0, {})]):
        parts = [torch.randn(M, N).to(dtype) * (r + 1) for r in range(world)]
        for r in range(world):
            g.slot(r, k).copy_(parts[r])
        x_before = outs[0].clone()
        dst = outs if kw.get("residual") else tmps

        def rank(r, k=k, kw=kw, dst=dst):
            return lambda: g.call(r, k, dst[r], residual=dst[r] if kw.get("residual") else None,
                                  bias=bias if kw.get("bias") else None)

        run_ranks(g, [rank(r) for r in range(world)], call + 1)
        want = tp_reduce_reference(parts, residual=x_before if kw.get("residual") else None,
                                   bias=bias if kw.get("bias") else None)
        for r in range(world):
            assert torch.equal(dst[r], dst[0]), "ranks disagree"
            assert torch.isfinite(dst[r]).all()
            torch.testing.assert_close(dst[r].float(), want.float(), rtol=0, atol=0)
        for r in range(world):
            assert torch.all(g.counters[r] == call + 1)


def test_a_rank_waits_for_its_peer():
    """Rank 0 alone must not finish (nor write) before rank 1 signals: the test that a missing or
    misplaced wait fails."""
    g = FakeGroup(2, 1, 300, torch.float32)
    parts = [torch.randn(1, 300), torch.randn(1, 300)]
    for r in range(2):
        g.slot(r, 1).copy_(parts[r])
    out = torch.full((1, 300), float("nan"))
    t = threading.Thread(target=lambda: g.call(0, 1, out), daemon=True)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "rank 0 finished without its peer's signal"
    assert torch.isnan(out).all()
    assert torch.all(g.flags[1][:g.nprog] == 1), "rank 0 did not signal rank 1's flag words for it"
    g.flags[0][g.nprog:2 * g.nprog] = 1               # rank 1's signal, by hand
    t.join(60)
    assert not t.is_alive()
    torch.testing.assert_close(out, tp_reduce_reference(parts), rtol=0, atol=0)


def test_bad_arguments_are_refused():
    g = FakeGroup(2, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="rank"):
        tp_reduce(g.data_ptrs, g.flag_ptrs, g.counters[0], 0, 2, 2, torch.zeros(2, 64), nprog=g.nprog)
    with pytest.raises(ValueError, match="residual"):
        g.call(0, 0, torch.zeros(2, 64), residual=torch.zeros(2, 63))
    with pytest.raises(ValueError, match="bias"):
        g.call(0, 0, torch.zeros(2, 64), bias=torch.zeros(65))
    with pytest.raises(ValueError, match="smaller"):
        tp_reduce(g.data_ptrs, g.flag_ptrs, g.counters[0], 0, 0, 2, torch.zeros(2, 4096), nprog=g.nprog)
