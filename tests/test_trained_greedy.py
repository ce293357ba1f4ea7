"""Greedy tokens of a model whose next token is confident must equal stock's exactly (issue #10, item 3).

Random-weight models repeat one token under greedy decoding, so "same tokens as stock" proves little
there. Here a tiny model is trained (CPU, 150 steps) on a deterministic "language": each
token is followed by perm[token] for a fixed random permutation, so a trained model predicts every next
token with a wide margin. Then braid's greedy generate() (fused kernels under the Triton interpreter)
must give stock's tokens exactly, in fp32 and bf16, and those tokens must be the chain (the model learnt).
"""

import pytest
import torch

import braid_backend
from braid_backend.testing.presets import build_model

V_USED = 64       # tokens 3..66 of the tiny vocab carry the chain


def _chain(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    perm = torch.arange(V_USED)[torch.randperm(V_USED, generator=g)] + 3
    nxt = torch.zeros(400, dtype=torch.long)
    nxt[3:3 + V_USED] = perm
    return nxt


def _batch(nxt: torch.Tensor, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0] = torch.randint(3, 3 + V_USED, (B,), generator=g)
    for t in range(1, T):
        x[:, t] = nxt[x[:, t - 1]]
    return x


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_model("tiny-llama", dtype=torch.float32, seed=3)
    nxt = _chain(7)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        x = _batch(nxt, 16, 24, g)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, nxt, float(loss.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_confident_model_greedy_equals_stock(trained, dtype):
    base, nxt, loss = trained
    assert loss < 0.05, f"the tiny model did not learn the chain (loss {loss:.3f})"
    model = build_model("tiny-llama", dtype=torch.float32, seed=3)
    model.load_state_dict(base.state_dict())
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(11)
    prompts = _batch(nxt, 2, 5, g)
    kw = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    want = model.generate(prompts, **kw)
    # the premise: every step's top token wins by a wide margin, and it is the chain's next token
    logits = model(input_ids=want).logits[:, prompts.shape[1] - 1:-1].float()
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 2.0
    assert torch.equal(want[:, 1:], nxt[want[:, :-1]])
    assert braid_backend.patch(model).ok
    got = model.generate(prompts, **kw)
    st = braid_backend.status(model)
    assert st.stats["generate_fast"] >= 1, st    # the fused path ran, not a stock fallback
    assert torch.equal(got, want)
    braid_backend.unpatch(model)
