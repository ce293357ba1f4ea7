"""braid-bench's own preset, on top of braid_backend.testing.presets: `tiny-peaked`, the CPU default.

The tiny random presets repeat one token under greedy decoding (their tied lm_head scores the input
token highest), so greedy agreement with stock would be 1.00 whatever the kernels did. tiny-peaked is
tiny-qwen2 with an untied lm_head made of the embedding rows in a random order, scaled: each step's top
logit is a different token, far above the runner-up, and the layers' output still moves it.
"""
from __future__ import annotations

import torch

PEAKED = "tiny-peaked"
BASE = "tiny-qwen2"
# 128 wide, 2 heads of 64 (q, k, v 128 rows each), inter 256: every --quant format's 128x128 blocks and
# groups fit (bench/quant.py)
SHAPE = dict(tie_word_embeddings=False, hidden_size=128, intermediate_size=256, num_attention_heads=2,
             num_key_value_heads=2)
LM_HEAD_SCALE = 8.0   # top logits ~5-13; top-1 margins mostly 1-9 (the bf16 spacing there is 0.03-0.06)
BENCH_PRESETS = {PEAKED: f"{BASE} at 128 wide, untied lm_head = the embedding rows permuted x {LM_HEAD_SCALE:g}: "
                         "greedy tokens vary and top-1 margins are clear"}


def build_peaked(dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0) -> torch.nn.Module:
    from ..testing.presets import build_model

    model = build_model(BASE, dtype=torch.float32, seed=seed, **SHAPE)
    perm = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.lm_head.weight.copy_(model.get_input_embeddings().weight[perm] * LM_HEAD_SCALE)
    return model.to(device=device, dtype=dtype).eval()


def load_model(name_or_path: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """A bench preset, or whatever braid_backend.testing.presets.load_model takes."""
    if name_or_path == PEAKED:
        return build_peaked(dtype, device)
    from ..testing.presets import load_model as _load

    return _load(name_or_path, dtype=dtype, device=device)


def known_presets() -> dict:
    from ..testing.presets import ALL_PRESETS

    return {**ALL_PRESETS, **BENCH_PRESETS}
