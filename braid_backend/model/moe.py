"""Hugging Face MoE MLP blocks -> MoEPlan (what kernels/moe.py's moe_decode needs), or Unsupported.

Families (transformers 5.17 and 5.24 keep the same layouts): qwen3_moe, qwen2_moe, mixtral, olmoe, gpt_oss,
granitemoe. `MOE_FAMILIES` holds the per-family facts a family spec row needs (which attribute of the
decoder layer is the MoE block, its router, the pre-MLP norm, which layers are MoE), `plan_moe` reads one
layer's block (the packed expert parameters are used in place, never copied) and `moe_reference`
computes the block's output the way stock transformers does (grouped_mm / batched_mm by default, eager
on request), for 1..64 rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.moe import MoEWorkspace
from ..kernels.moe_route import topk_lowest_index
from .unsupported import Unsupported

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SILU = ("silu", "swish")


@dataclass(frozen=True)
class MoEFamily:
    model_type: str
    mlp_attr: str                    # decoder layer attribute holding the MoE block
    router_attr: str                 # block attribute: the router (weight [E, H], gpt-oss: + bias [E])
    n_experts_attr: str              # config attribute: number of experts
    route: str                       # kernels.moe_route.ROUTES
    renorm_attr: str | None          # config attribute of the top-k renormalisation (None: always `renorm`)
    renorm: bool = False
    round_weights: bool = True       # routing weights cast to the model dtype (Mixtral keeps them fp32)
    experts_attr: str = "experts"
    mlp_norm: str = "post_attention_layernorm"   # norm before the block; its output is the op's h
    norm_mode: int = 0               # kernels/_common.norm_reference's mode of that norm
    sparse_step: bool = False        # config.decoder_sparse_step / mlp_only_layers pick the MoE layers
    shared_expert: bool = False      # Qwen2-MoE: shared_expert (gate/up/down Linear) * sigmoid(shared_expert_gate)
    res_scale_attr: str | None = None   # Granite: residual + block(h) * config.residual_multiplier
    notes: str = ""


MOE_FAMILIES = {f.model_type: f for f in (
    MoEFamily("qwen3_moe", "mlp", "gate", "num_experts", "softmax_topk", "norm_topk_prob", sparse_step=True,
              notes="dense Qwen3MoeMLP in mlp_only_layers / off the sparse step; attention q/k norm per head"),
    MoEFamily("qwen2_moe", "mlp", "gate", "num_experts", "softmax_topk", "norm_topk_prob", sparse_step=True,
              shared_expert=True, notes="qkv bias; the shared expert may run as two fused_gemv calls"),
    MoEFamily("mixtral", "mlp", "gate", "num_local_experts", "softmax_topk", None, renorm=True,
              round_weights=False, notes="routing weights stay fp32 (stock multiplies bf16 * fp32)"),
    MoEFamily("olmoe", "mlp", "gate", "num_experts", "softmax_topk", "norm_topk_prob",
              notes="attention q_norm/k_norm over the whole projection (OLMo2-style)"),
    MoEFamily("gpt_oss", "mlp", "router", "num_local_experts", "topk_softmax", None, norm_mode=1,
              notes="router bias; expert biases; clamped SwiGLU on interleaved gate/up; experts transposed "
                    "[E, H, 2I] / [E, I, H]; block returns (out, scores); norms (w * x_f32).to(dtype), fp32 "
                    "weights when loaded with from_pretrained"),
    MoEFamily("granitemoe", "block_sparse_moe", "router", "num_local_experts", "topk_softmax", None,
              res_scale_attr="residual_multiplier",
              notes="residual + block * residual_multiplier (also on attention); embedding/logits multipliers"),
)}


def moe_layer_indices(config) -> list[int]:
    """The decoder layers whose MLP is a MoE block (the others are dense MLPs of the same attribute)."""
    fam = MOE_FAMILIES.get(getattr(config, "model_type", None))
    if fam is None:
        raise Unsupported(f"model type {getattr(config, 'model_type', None)!r} has no MoE family facts")
    n = config.num_hidden_layers
    if not fam.sparse_step:
        return list(range(n))
    only = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    ne = getattr(config, fam.n_experts_attr, 0) or 0
    return [i for i in range(n) if i not in only and ne > 0 and (i + 1) % step == 0]


@dataclass(frozen=True, eq=False)
class MoEPlan:
    family: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    dtype: torch.dtype
    router_weight: torch.Tensor          # [E, H]
    router_bias: torch.Tensor | None     # [E] (gpt-oss)
    gate_up: torch.Tensor                # the HF parameter itself: [E, 2I, H] ([E, H, 2I] transposed)
    down: torch.Tensor                   # [E, H, I] ([E, I, H] transposed)
    gate_up_bias: torch.Tensor | None    # [E, 2I] (gpt-oss)
    down_bias: torch.Tensor | None       # [E, H] (gpt-oss)
    route: str                           # "softmax_topk" | "topk_softmax"
    renorm: bool                         # top-k weights renormalised to sum 1 (softmax_topk only)
    round_weights: bool                  # routing weights cast to the dtype before use
    act: str                             # "silu_mul" | "gpt_oss_swiglu"
    transposed: bool                     # gpt-oss layouts
    interleaved: bool                    # gpt-oss: gate/up alternate along 2I
    limit: float | None                  # gpt-oss clamp limit
    alpha: float | None                  # gpt-oss sigmoid scale (1.702)
    shared_gate_proj: nn.Linear | None = None    # Qwen2-MoE shared expert
    shared_up_proj: nn.Linear | None = None
    shared_down_proj: nn.Linear | None = None
    shared_expert_gate: nn.Linear | None = None  # [1, H], sigmoid
    res_scale: float | None = None       # Granite residual multiplier (applied by the decoder layer)
    impl: str = "grouped_mm"             # the stock experts implementation moe_reference follows

    def op_kwargs(self, residual: bool = True) -> dict:
        """Keywords of kernels.moe.moe_decode after (h, x): the shared expert's output (shared_out) is the
        caller's; shared_gate is set when the family has one. residual: also pass Granite's res_scale."""
        kw = dict(router_weight=self.router_weight, gate_up=self.gate_up, down=self.down, top_k=self.top_k,
                  route=self.route, renorm=self.renorm, round_weights=self.round_weights,
                  router_bias=self.router_bias, gate_up_bias=self.gate_up_bias, down_bias=self.down_bias,
                  act=self.act, transposed=self.transposed, interleaved=self.interleaved)
        if self.act == "gpt_oss_swiglu":
            kw.update(limit=self.limit, alpha=self.alpha)
        if self.shared_expert_gate is not None:
            kw["shared_gate"] = self.shared_expert_gate.weight.reshape(-1)
        if residual and self.res_scale is not None:
            kw["res_scale"] = self.res_scale
        return kw

    def workspace(self, max_rows: int, device=None) -> MoEWorkspace:
        return MoEWorkspace(max_rows, self.num_experts, self.top_k, self.hidden, self.intermediate, self.dtype,
                            device if device is not None else self.gate_up.device)


def _plain(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise Unsupported(f"{what} is not a tensor ({type(t).__name__})")
    if type(t) not in (torch.Tensor, nn.Parameter):
        raise Unsupported(f"{what} is a {type(t).__name__} (tensor parallel or quantized), not a plain tensor")
    if t.dtype not in _FLOATS:
        raise Unsupported(f"{what} has dtype {t.dtype} (quantized weights are not supported here)")
    return t


def _linear(m, what: str, shape: tuple, dtype) -> nn.Linear:
    if not isinstance(m, nn.Linear) or type(m.weight) not in (torch.Tensor, nn.Parameter):
        raise Unsupported(f"{what} is not a plain nn.Linear ({type(m).__name__})")
    if tuple(m.weight.shape) != shape or m.weight.dtype != dtype or m.bias is not None:
        raise Unsupported(f"{what}: expected a bias-free {dtype} weight {shape}, got {tuple(m.weight.shape)} "
                          f"{m.weight.dtype} bias={m.bias is not None}")
    return m


def plan_moe(block: nn.Module, config=None) -> MoEPlan:
    """The plan of one layer's MoE block (layer.<MoEFamily.mlp_attr>), or Unsupported(reason)."""
    experts = getattr(block, "experts", None)
    config = config if config is not None else getattr(experts, "config", None)
    fam = MOE_FAMILIES.get(getattr(config, "model_type", None))
    if fam is None:
        raise Unsupported(f"model type {getattr(config, 'model_type', None)!r} has no MoE plan")
    router = getattr(block, fam.router_attr, None)
    if experts is None or router is None:
        raise Unsupported(f"{type(block).__name__} is not a {fam.model_type} MoE block (dense MLP layer?)")
    if "mxfp4" in type(experts).__name__.lower():
        raise Unsupported("gpt-oss experts are packed MXFP4 (no dequantization happened): quantized experts are "
                          "not supported yet; load with dequantize=True (Mxfp4Config) or without the MXFP4 kernels")
    if getattr(experts, "_is_expert_parallel", False):
        raise Unsupported("expert-parallel experts (each rank holds a subset)")
    gate_up = _plain(getattr(experts, "gate_up_proj", None), "experts.gate_up_proj")
    down = _plain(getattr(experts, "down_proj", None), "experts.down_proj")
    rw = _plain(getattr(router, "weight", None), "router weight")
    dt = gate_up.dtype
    if gate_up.dim() != 3 or down.dim() != 3 or rw.dim() != 2:
        raise Unsupported("experts must be packed 3-D parameters and the router weight 2-D")
    E, H = rw.shape
    gpt = fam.model_type == "gpt_oss"
    ne = getattr(config, fam.n_experts_attr)
    I = (gate_up.shape[2] if gpt else gate_up.shape[1]) // 2
    want_gu, want_dn = ((E, H, 2 * I), (E, I, H)) if gpt else ((E, 2 * I, H), (E, H, I))
    if ne != E or tuple(gate_up.shape) != want_gu or tuple(down.shape) != want_dn:
        raise Unsupported(f"unexpected expert shapes: router {tuple(rw.shape)}, gate_up {tuple(gate_up.shape)}, "
                          f"down {tuple(down.shape)} (config: {ne} experts)")
    if rw.dtype != dt or down.dtype != dt:
        raise Unsupported(f"router/expert dtypes differ ({rw.dtype}, {dt}, {down.dtype})")
    top_k = int(getattr(config, "num_experts_per_tok"))
    if not 1 <= top_k <= E:
        raise Unsupported(f"num_experts_per_tok {top_k} outside 1..{E}")
    if block.training and getattr(block, "jitter_noise", 0):
        raise Unsupported("router jitter noise is on (training mode)")
    impl = getattr(config, "_experts_implementation", None) or "grouped_mm"
    kw = {}
    rb = gub = dnb = None
    if gpt:
        rb = _plain(router.bias, "router bias")
        gub = _plain(experts.gate_up_proj_bias, "experts.gate_up_proj_bias")
        dnb = _plain(experts.down_proj_bias, "experts.down_proj_bias")
        if (tuple(rb.shape), tuple(gub.shape), tuple(dnb.shape)) != ((E,), (E, 2 * I), (E, H)):
            raise Unsupported("unexpected gpt-oss bias shapes")
        if {rb.dtype, gub.dtype, dnb.dtype} != {dt}:   # an fp32 bias would lift stock's adds to fp32
            raise Unsupported(f"gpt-oss biases are {rb.dtype}/{gub.dtype}/{dnb.dtype}, weights {dt}")
        kw.update(act="gpt_oss_swiglu", limit=float(experts.limit), alpha=float(experts.alpha))
    else:
        act = getattr(config, "hidden_act", None)
        if act not in _SILU:
            raise Unsupported(f"expert activation {act!r} (only SiLU-gated experts are fused)")
        if getattr(router, "bias", None) is not None:
            raise Unsupported("router has a bias this family does not define")
        kw.update(act="silu_mul", limit=None, alpha=None)
    if fam.shared_expert:
        se = getattr(block, "shared_expert", None)
        si = getattr(config, "shared_expert_intermediate_size", None)
        if se is None or getattr(config, "hidden_act", None) not in _SILU:
            raise Unsupported("Qwen2-MoE shared expert missing or not SiLU-gated")
        kw.update(shared_gate_proj=_linear(se.gate_proj, "shared_expert.gate_proj", (si, H), dt),
                  shared_up_proj=_linear(se.up_proj, "shared_expert.up_proj", (si, H), dt),
                  shared_down_proj=_linear(se.down_proj, "shared_expert.down_proj", (H, si), dt),
                  shared_expert_gate=_linear(block.shared_expert_gate, "shared_expert_gate", (1, H), dt))
    renorm = bool(getattr(config, fam.renorm_attr)) if fam.renorm_attr else fam.renorm
    res_scale = float(getattr(config, fam.res_scale_attr)) if fam.res_scale_attr else None
    return MoEPlan(fam.model_type, E, top_k, H, I, dt, rw, rb, gate_up, down, gub, dnb, fam.route, renorm,
                   fam.round_weights, transposed=gpt, interleaved=gpt, res_scale=res_scale, impl=impl, **kw)


# --------------------------------------------------------------------------------------- reference
def _stock_routing(plan: MoEPlan, h):
    logits = F.linear(h, plan.router_weight, plan.router_bias)
    if plan.route == "softmax_topk":
        vals, ids = topk_lowest_index(torch.softmax(logits, dim=-1, dtype=torch.float), plan.top_k)
        if plan.renorm:
            vals = vals / vals.sum(dim=-1, keepdim=True)
        w = vals.to(h.dtype) if plan.round_weights else vals
    else:   # gpt-oss: softmax(dtype=bf16) of bf16 logits; Granite: softmax of .float(), .type_as(h)
        vals, ids = topk_lowest_index(logits.float(), plan.top_k)
        w = torch.softmax(vals, dim=-1).to(h.dtype)
    return ids, w


def _stock_expert(plan: MoEPlan, e: int, x):
    """One expert's output for rows x, with stock's ops in the model dtype."""
    if plan.transposed:
        gu = x @ plan.gate_up[e] + plan.gate_up_bias[e]
    else:
        gu = F.linear(x, plan.gate_up[e])
    if plan.interleaved:
        g, u = gu[..., ::2], gu[..., 1::2]
    else:
        g, u = gu.chunk(2, dim=-1)
    if plan.act == "silu_mul":
        a = F.silu(g) * u
    else:
        g = g.clamp(min=None, max=plan.limit)
        u = u.clamp(min=-plan.limit, max=plan.limit)
        a = (u + 1) * (g * torch.sigmoid(g * plan.alpha))
    return a @ plan.down[e] + plan.down_bias[e] if plan.transposed else F.linear(a, plan.down[e])


def moe_reference(plan: MoEPlan, h: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """The block's output (M, H) for rows h (M, H) as stock transformers computes it (no residual, no
    Granite multiplier). impl: "grouped_mm"/"batched_mm" (fp32 sum of the k weighted outputs, one rounding)
    or "eager" (index_add_ in the dtype, ascending expert order); default plan.impl. Ties in the router
    go to the lower expert index, as CUDA's torch.topk does."""
    impl = impl or plan.impl
    dt = h.dtype
    ids, w = _stock_routing(plan, h)
    M, k = ids.shape
    if impl == "eager":
        out = torch.zeros_like(h)
        for e in sorted(set(ids.flatten().tolist())):
            tok, pos = torch.where(ids == e)
            order = torch.argsort(pos * M + tok)   # stock iterates torch.where(mask[e]) over (slot, row)
            tok, pos = tok[order], pos[order]
            y = _stock_expert(plan, e, h[tok]) * w[tok, pos, None]
            out.index_add_(0, tok, y.to(dt))
    else:
        y = torch.stack([torch.stack([_stock_expert(plan, int(ids[m, s]), h[m:m + 1])[0] for s in range(k)])
                         for m in range(M)])                       # (M, k, H) in the dtype
        out = (y * w[:, :, None]).sum(dim=1).to(dt)
    if plan.shared_expert_gate is not None:
        sh = plan.shared_down_proj(F.silu(plan.shared_gate_proj(h)) * plan.shared_up_proj(h))
        out = out + torch.sigmoid(plan.shared_expert_gate(h)) * sh
    return out


def shared_expert_reference(plan: MoEPlan, h: torch.Tensor) -> torch.Tensor | None:
    """Qwen2-MoE's ungated shared-expert output (what the caller passes moe_decode as shared_out)."""
    if plan.shared_down_proj is None:
        return None
    return plan.shared_down_proj(F.silu(plan.shared_gate_proj(h)) * plan.shared_up_proj(h))
