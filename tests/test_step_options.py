"""Opt-in variants of the decode step (A/B switches) give the default step's results on a real (tiny)
patched model: BRAID_FUSED_ROPE=1's rope in the attention kernel."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import braid_backend  # noqa: E402
from braid_backend.model import step as step_mod  # noqa: E402
from braid_backend.testing.presets import build_model  # noqa: E402
from helpers import KERNELS_USABLE, KERNELS_WHY, toks  # noqa: E402

pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
@torch.no_grad()
def test_fused_rope_step_equals_the_rope_kernel_step(preset, monkeypatch):
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    model = build_model(preset, dtype=torch.bfloat16, device=dev, seed=5)
    braid_backend.patch(model, graphs=False)
    ids = toks(model, 2, 9, 3, dev)
    model.generate(ids, do_sample=False, pad_token_id=0, max_new_tokens=2)
    st = model._braid_session
    step, cache = st.step, st.cache
    b = step.new_buffers(2, cache.max_len)
    b.ids.copy_(ids[:, -1])
    b.pos.copy_(torch.tensor([9, 4]))
    b.slots.copy_(torch.tensor([9, 4]))
    b.kv_lens.copy_(torch.tensor([10, 5], dtype=torch.int32))
    out = {}
    for fused in (False, True):
        monkeypatch.setattr(step_mod, "_FUSED_ROPE", fused)
        for i in range(len(cache.k)):   # poison the slots the step writes
            cache.k[i][0, :, 9] = float("nan")
            cache.v[i][1, :, 4] = float("nan")
        logits = step.run(cache, b).clone()
        out[fused] = (logits, torch.stack([k[:2, :, :10].clone() for k in cache.k]),
                      torch.stack([v[:2, :, :10].clone() for v in cache.v]))
    for a, c in zip(out[False], out[True]):
        assert not torch.isnan(a).any() and torch.equal(a, c)
