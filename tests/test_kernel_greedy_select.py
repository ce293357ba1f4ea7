
import pytest
import torch

from helpers import KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY
from braid_backend.kernels.greedy_select import (
    BLOCK_V, GreedyWorkspace, greedy_select, greedy_select_reference,
)

DEV = KERNEL_DEV
pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")


def _state(M, seed, eos, count, done_rows):
    g = torch.Generator().manual_seed(seed)
    st = dict(done=torch.zeros(M, dtype=torch.bool), count=torch.tensor(count),
              eos=torch.tensor(eos, dtype=torch.long), out_tok=torch.full((M,), -7, dtype=torch.long),
              all_done=torch.zeros(1, dtype=torch.bool), ids=torch.full((M,), -7, dtype=torch.long),
              pos=torch.randint(0, 50, (M,), generator=g), slots=torch.randint(0, 50, (M,), generator=g),
              kv_lens=torch.randint(1, 50, (M,), generator=g).int())
    st["done"][list(done_rows)] = True
    return {k: v.to(DEV) for k, v in st.items()}


CASES = [  # M, V, eos, count, min_new, done rows
    (1, 97, [5], 0, 0, []),
    (3, 5000, [7, 4999], 1, 3, [1]),                      # EOS blocked (count < min_new)
    (3, 5000, [7, 4999], 3, 3, []),                       # no longer blocked
    (17, 2 * BLOCK_V + 31, [0, 1, 2], 0, 0, [0, 16]),
    (4, 9000, [-1], 0, 0, []),                            # no EOS: the loop passes -1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}V{c[1]}")
def test_matches_reference(case, dtype):
    M, V, eos, count, min_new, done_rows = case
    g = torch.Generator().manual_seed(M * V)
    logits = (torch.randn(M, V + 5, generator=g) * 4).to(dtype)[:, :V].to(DEV)   # wide rows: stride != V
    top = logits.float().amax(dim=1)
    # ties: the row maximum again in a later block (argmax must keep the first), and EOS made the best
    if V > BLOCK_V:
        logits[0, BLOCK_V + 3] = logits[0].max()
    logits[min(1, M - 1), eos[-1] if eos[-1] >= 0 else 0] = (top.max() + 1).to(dtype)
    a, b = _state(M, 1, eos, count, done_rows), _state(M, 1, eos, count, done_rows)
    ws = GreedyWorkspace(M, V, DEV)
    greedy_select(logits, ws, min_new=min_new, pad=3, **a)
    greedy_select_reference(logits, min_new=min_new, pad=3, **b)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, a[k], b[k])
    assert (a["out_tok"] >= 0).all() and (a["out_tok"] < V).all()


def test_blocked_eos_and_done_rows_change_the_answer():
    """The tests above could pass with a kernel that ignores min_new/done: check that they matter."""
    M, V = 2, 300
    logits = torch.zeros(M, V, device=DEV)
    logits[:, 42] = 5.0   # the EOS is every row's argmax
    st = _state(M, 2, [42], 0, [1])
    greedy_select(logits, GreedyWorkspace(M, V, DEV), min_new=2, pad=3, **st)
    assert st["out_tok"].tolist() == [0, 3] and st["done"].tolist() == [False, True] and not st["all_done"]
    st = _state(M, 2, [42], 2, [])
    greedy_select(logits, GreedyWorkspace(M, V, DEV), min_new=2, pad=3, **st)
    assert st["out_tok"].tolist() == [42, 42] and st["all_done"].item() and st["count"].item() == 3
