"""model/moe.py on tiny random configs of every MoE family: moe_reference against the stock block's own
forward, the fused op (through MoEPlan.op_kwargs) against stock + residual, and the refusals."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY, relerr  # noqa: E402
from braid_backend.kernels.moe import moe_decode  # noqa: E402
from braid_backend.model.moe import (MOE_FAMILIES, moe_layer_indices, moe_reference, plan_moe,  # noqa: E402
                                     shared_expert_reference)
from braid_backend.model.spec import Unsupported  # noqa: E402

transformers = pytest.importorskip("transformers")

# odd sizes wherever the family allows them (attention sizes only need heads * head_dim consistent)
COMMON = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
              vocab_size=64)
FAMILIES = {
    "qwen3_moe": dict(num_experts=7, num_experts_per_tok=3, moe_intermediate_size=24, intermediate_size=36,
                      norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=7, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=36,
                      shared_expert_intermediate_size=20, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=24),
    "olmoe": dict(num_experts=9, num_experts_per_tok=3, intermediate_size=24, norm_topk_prob=False),
    "gpt_oss": dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=24,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=24, residual_multiplier=0.37),
}


def build_block(family, seed=0, dtype=torch.float32, layer=0, **over):
    cfg = transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **over})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    block = getattr(model.model.layers[layer], MOE_FAMILIES[family].mlp_attr)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # weights of a trained scale (init is 0.02 / zeros): spread router logits, clear margins
        for name, p in block.named_parameters():
            fan_in = p.shape[1] if ("gate_up" in name and family == "gpt_oss") else p.shape[-1]
            router = "router" in name or name == "gate.weight"
            scale = 0.3 if p.dim() == 1 else (3.0 if router else 1.0) * fan_in ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model, block.to(dtype).eval(), cfg


def stock_forward(block, h):
    out = block(h[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_matches_stock_fp32(family):
    """moe_reference(plan) == the stock block's forward (its default experts implementation), 1..6 rows."""
    _, block, cfg = build_block(family)
    plan = plan_moe(block, cfg)
    assert plan.gate_up.data_ptr() == block.experts.gate_up_proj.data_ptr(), "experts must be used in place"
    assert plan.impl == cfg._experts_implementation
    g = torch.Generator().manual_seed(3)
    for M in (1, 6):
        h = torch.randn(M, cfg.hidden_size, generator=g)
        with torch.no_grad():
            ref, stock = moe_reference(plan, h), stock_forward(block, h)
            eager = moe_reference(plan, h, impl="eager")
        assert relerr(ref, stock) <= 1e-5, f"{family} M={M}: {relerr(ref, stock):.2e}"
        assert relerr(eager, stock) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_matches_stock_bf16(family):
    """bf16: the same ops in the same dtype; only fp32 summation order inside matmuls may differ."""
    _, block, cfg = build_block(family, seed=5, dtype=torch.bfloat16)
    plan = plan_moe(block, cfg)
    h = torch.randn(4, cfg.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        ref, stock = moe_reference(plan, h), stock_forward(block, h)
    assert relerr(ref, stock) <= 2e-2, f"{family}: {relerr(ref, stock):.2e}"


@pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_op_matches_stock_block(family):
    """The op wired by the plan (layouts, routing mode, biases, shared expert, multiplier) against stock:
    x + block(h) (Granite: x + block(h) * multiplier), fp32, batch 1 and a batch with overlapping experts."""
    model, block, cfg = build_block(family, seed=11)
    if KERNEL_DEV.type == "cuda":   # fp32 grouped_mm may be missing on CUDA; eager is the same arithmetic
        model.set_experts_implementation("eager")
    block = block.to(KERNEL_DEV)
    plan = plan_moe(block, cfg)
    ws = plan.workspace(5)
    g = torch.Generator().manual_seed(12)
    for M in (1, 5):
        h = torch.randn(M, cfg.hidden_size, generator=g).to(KERNEL_DEV)
        x = torch.randn(M, cfg.hidden_size, generator=g).to(KERNEL_DEV)
        with torch.no_grad():
            mlp = stock_forward(block, h)
            want = x + mlp * (plan.res_scale if plan.res_scale is not None else 1.0)
            out = torch.full_like(x, float("nan"))
            got = moe_decode(h, x, **plan.op_kwargs(), shared_out=shared_expert_reference(plan, h), out=out,
                             workspace=ws)
        assert relerr(got, want) <= 1e-5, f"{family} M={M}: {relerr(got, want):.2e}"
        ids = ws.ids[:M * plan.top_k].view(M, plan.top_k).long()
        with torch.no_grad():   # the stock router's choice (its output order differs across versions)
            stock_ids = next(t for t in getattr(block, MOE_FAMILIES[family].router_attr)(h) if t.dtype == torch.long)
        assert torch.equal(ids.sort(1).values, stock_ids.sort(1).values)
        if M > 1:
            assert ids.unique().numel() < M * plan.top_k, "the batch should share experts"


def test_layer_indices_and_dense_layers():
    cfg = transformers.AutoConfig.for_model("qwen3_moe", **{**COMMON, **FAMILIES["qwen3_moe"], "mlp_only_layers": [1]})
    assert moe_layer_indices(cfg) == [0]
    cfg2 = transformers.AutoConfig.for_model("qwen2_moe", **{**COMMON, **FAMILIES["qwen2_moe"],
                                                              "num_hidden_layers": 4, "decoder_sparse_step": 2})
    assert moe_layer_indices(cfg2) == [1, 3]
    for fam in ("mixtral", "gpt_oss", "olmoe", "granitemoe"):
        c = transformers.AutoConfig.for_model(fam, **{**COMMON, **FAMILIES[fam]})
        assert moe_layer_indices(c) == [0, 1]
    model, _, cfg = build_block("qwen3_moe", mlp_only_layers=[1])
    with pytest.raises(Unsupported, match="dense"):
        plan_moe(model.model.layers[1].mlp, cfg)


def test_refusals():
    _, block, cfg = build_block("qwen3_moe", hidden_act="gelu")
    with pytest.raises(Unsupported, match="activation"):
        plan_moe(block, cfg)
    _, block, cfg = build_block("mixtral")
    block.gate.weight.data = block.gate.weight.data.double()
    with pytest.raises(Unsupported, match="dtype"):
        plan_moe(block, cfg)
    _, block, cfg = build_block("gpt_oss", dtype=torch.bfloat16)
    block.experts.gate_up_proj_bias.data = block.experts.gate_up_proj_bias.data.float()
    with pytest.raises(Unsupported, match="biases"):
        plan_moe(block, cfg)
    _, block, cfg = build_block("gpt_oss")
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts
    block.experts = Mxfp4GptOssExperts(cfg)
    with pytest.raises(Unsupported, match="MXFP4"):
        plan_moe(block, cfg)
    with pytest.raises(Unsupported, match="no MoE"):
        plan_moe(block, transformers.AutoConfig.for_model("llama"))
