"""Per-family spec rows and the generic checks that decide whether a model can be patched.

Adding a family means adding a FamilySpec row (and a tiny config test), not copying code: the
decode step in `step.py` is generic and reads everything model-specific from the LayerPlan /
ModelPlan built here from the config and the module tree. Every spec field below names a module or
switches one generic hook of the decode step; `plan_model` turns it into concrete modules/numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..tuning import DEFAULT as DEFAULT_TUNING
from ..tuning import Tuning
from .moe import moe_layer_indices, plan_moe
from .quant import (QUANT_LINEAR_CLASSES, QuantPlan, check_packable, has_quantized, model_quant_method, plan_quant,
                    quant_weight)
from .unsupported import Unsupported
from .tp import TPComm, TPMismatch, has_dtensors, tp_layout

# rope types whose cos/sin depend on the position only, so one precomputed table is exact
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}
# longrope picks short or long factors from max(position_ids) of each forward: exact with two tables
# and a per-step on-device choice (step.py), see ModelPlan.longrope
SWITCHED_ROPE_TYPES = {"longrope"}
# ...but HF's Phi-3 generate() also drops the KV cache and re-prefills the whole sequence (so every key
# gets the long factors) the first time it grows past original_max_position_embeddings. braid's fast
# generate loop (runtime/loop.py) keeps its cache, so a longrope model that can cross that length is
# refused (see _check_rope) until that loop re-prefills at the crossing too.
ACTS = {"silu": "silu_mul", "swish": "silu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul", "gelu_tanh": "gelu_tanh_mul"}


@dataclass(frozen=True)
class FamilySpec:
    family: str
    model_types: tuple[str, ...]
    # --- module names (attributes of model.layers[i] / of its attention and MLP modules) ---
    attn: str = "self_attn"
    mlp: str = "mlp"
    # ("q_proj", "k_proj", "v_proj", "o_proj"), or ("qkv_proj", "o_proj") when the checkpoint
    # already packs q|k|v (Phi-3): packed weights are used as they are, nothing is re-packed.
    proj: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # ("gate_proj", "up_proj", "down_proj"), or ("gate_up_proj", "down_proj") when packed [gate; up]
    mlp_proj: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # --- norms: None = the layer has no such norm ---
    attn_norm: str | None = "input_layernorm"            # before attention (None: OLMo2)
    mlp_norm: str | None = "post_attention_layernorm"    # before the MLP (Llama naming)
    attn_out_norm: str | None = None   # on the attention output, before the residual add (Gemma-2/3, OLMo2)
    mlp_out_norm: str | None = None    # on the MLP output, before the residual add
    norm_mode: int = 0             # 0: w * x.to(dtype) (Llama); 1: (x * (offset + w)).to(dtype) (Gemma, OLMo2)
    norm_offset: float = 0.0
    # "head": per-head q_norm/k_norm before RoPE (Qwen3, Gemma-3); "full": one RMSNorm over the whole
    # q (and k) projection (OLMo2)
    qk_norm: str | None = None
    act_attr: str = "hidden_act"   # config attribute naming the MLP activation
    # --- scalars ---
    embed_scale: bool = False      # Gemma: embeds * embed_tokens.embed_scale.to(dtype) (sqrt(hidden) rounded)
    multipliers: bool = False      # Granite: embedding/residual multipliers, logits / logits_scaling
    attn_softcap: bool = False     # Gemma-2: attention passes attn_logit_softcapping to the kernel
    final_softcap: bool = False    # Gemma-2/3: logits = tanh(logits / cap) * cap (config.final_logit_softcapping)
    # --- rope ---
    rope_per_layer_type: bool = False  # Gemma-3: rotary(x, pos, layer_type), one table per layer type
    nope_layers: bool = False      # SmolLM3: config.no_rope_layers[i] == 0 -> that layer has no RoPE
    rope_half_table: bool = False  # gpt-oss: the rotary module returns cos/sin of head_dim / 2 (halves rotated)
    # --- mixture of experts ---
    moe: bool = False              # the MLP of (some) layers is a sparse MoE block (model/moe.py plans it)
    attn_sinks: bool = False       # gpt-oss: self_attn.sinks, one extra logit per head in the softmax
    notes: str = ""


REGISTRY: list[FamilySpec] = [
    FamilySpec("llama", ("llama",), notes="Llama 2/3 incl. llama3 rope scaling"),
    FamilySpec("qwen2", ("qwen2",), notes="Qwen2/2.5: qkv bias"),
    FamilySpec("qwen3", ("qwen3",), qk_norm="head", notes="q_norm/k_norm, head_dim != hidden/heads"),
    FamilySpec("mistral", ("mistral",), notes="sliding window handled in the decode kernel"),
    FamilySpec("gemma", ("gemma",), norm_mode=1, norm_offset=1.0, embed_scale=True,
               notes="(1 + w) RMSNorm, GeGLU (tanh GELU), embeddings * sqrt(hidden) rounded to the dtype"),
    FamilySpec("gemma2", ("gemma2",), norm_mode=1, norm_offset=1.0, embed_scale=True,
               mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
               mlp_out_norm="post_feedforward_layernorm", act_attr="hidden_activation",
               attn_softcap=True, final_softcap=True,
               notes="sandwich norms, attention + final logit soft-capping, sliding-window layers "
                     "(window in the decode kernel); attention softcap only with eager attention, like stock"),
    FamilySpec("gemma3", ("gemma3_text",), norm_mode=1, norm_offset=1.0, embed_scale=True, qk_norm="head",
               mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
               mlp_out_norm="post_feedforward_layernorm", act_attr="hidden_activation",
               final_softcap=True, rope_per_layer_type=True,
               notes="text-only Gemma3ForCausalLM: as Gemma-2 plus (1 + w) q/k norm, local/global rope "
                     "tables per layer type; stock ignores attn_logit_softcapping, so do we"),
    FamilySpec("phi3", ("phi3",), proj=("qkv_proj", "o_proj"), mlp_proj=("gate_up_proj", "down_proj"),
               notes="packed qkv_proj / gate_up_proj used as is; partial rotary; longrope only while it "
                     "cannot pass original_max_position_embeddings"),
    FamilySpec("granite", ("granite",), multipliers=True,
               notes="embedding multiplier and logits_scaling in torch on the step's buffers, the residual "
                     "multiplier in the o_proj / down GEMV epilogue; "
                     "attention_multiplier is the attention scale"),
    FamilySpec("olmo2", ("olmo2",), attn_norm=None, mlp_norm=None, attn_out_norm="post_attention_layernorm",
               mlp_out_norm="post_feedforward_layernorm", norm_mode=1, qk_norm="full",
               notes="post-norms only; q/k RMSNorm over the whole projection (rmsnorm kernel on the qkv slices)"),
    FamilySpec("smollm3", ("smollm3",), nope_layers=True,
               notes="NoPE layers (no_rope_layers[i] == 0) use an identity rope table (cos 1, sin 0: exact)"),
    # mixture-of-experts families: attention as their dense relatives, the MLP through kernels/moe.py
    FamilySpec("qwen3_moe", ("qwen3_moe",), qk_norm="head", moe=True,
               notes="Qwen3 attention; router softmax -> top-k (renormalised); dense layers off the sparse step"),
    FamilySpec("qwen2_moe", ("qwen2_moe",), moe=True,
               notes="qkv bias; shared expert * sigmoid(shared_expert_gate) next to the routed experts"),
    FamilySpec("mixtral", ("mixtral",), moe=True,
               notes="top-2 of 8 experts, routing weights in fp32; sliding window in the decode kernel"),
    FamilySpec("olmoe", ("olmoe",), qk_norm="full", moe=True,
               notes="pre-norms with q/k RMSNorm over the whole projection (rmsnorm kernel on the qkv slices)"),
    FamilySpec("gpt_oss", ("gpt_oss",), norm_mode=1, moe=True, attn_sinks=True, rope_half_table=True,
               notes="attention sinks and alternating sliding-window layers in the decode kernel; router and "
                     "expert biases, clamped SwiGLU; yarn rope on head halves; the bf16 (dequantised) model "
                     "only: packed MXFP4 experts are refused"),
    FamilySpec("granitemoe", ("granitemoe",), mlp="block_sparse_moe", multipliers=True, moe=True,
               notes="Granite multipliers; router top-k -> softmax; experts * residual multiplier"),
]

# Model types that look close to a registry family but are refused as a whole, with the reason.
REFUSED: dict[str, str] = {
    "gemma3": "multimodal Gemma3ForConditionalGeneration (vision tower + language_model): only the text-only "
              "Gemma3ForCausalLM (model_type gemma3_text) is fused",
    "olmo": "OLMo-1 uses a non-parametric LayerNorm (mean-centred, no weight), not RMSNorm: no fused norm for it",
    "phi": "Phi-1/1.5/2: LayerNorm with bias, parallel attention+MLP block and an ungated GELU MLP are not fused",
}


def find_spec(model_type: str) -> FamilySpec | None:
    for spec in REGISTRY:
        if model_type in spec.model_types:
            return spec
    return None




@dataclass
class LayerPlan:
    index: int
    attn_norm: nn.Module | None
    mlp_norm: nn.Module | None
    attn_out_norm: nn.Module | None
    mlp_out_norm: nn.Module | None
    qkv: tuple[nn.Linear, ...]        # (q, k, v), or (qkv,) already packed
    o: nn.Linear
    gate_up: tuple[nn.Linear, ...]    # (gate, up), or (gate_up,) already packed
    down: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    scale: float
    window: int
    softcap: float = 0.0
    rope_key: str | None = None       # key of the rope table (None: the model's single table, "": no rope)
    moe: object | None = None         # model/moe.py MoEPlan when the MLP is a sparse MoE block (gate_up/down empty)
    sinks: torch.Tensor | None = None  # gpt-oss attention sinks (n_heads,)

    @property
    def q(self) -> nn.Linear:         # the report reads q.bias; for packed weights that is qkv's bias
        return self.qkv[0]


@dataclass
class ModelPlan:
    spec: FamilySpec
    layers: list[LayerPlan]
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear
    rotary: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    eps: float
    act: str
    embed_scale: torch.Tensor | float | None = None   # multiply the embeddings by this (same op as HF)
    residual_mult: float | None = None                # x = x + rnd(sublayer_out * m)    (Granite)
    logits_div: float | None = None                   # logits = logits / d              (Granite)
    final_softcap: float | None = None                # logits = tanh(logits / c) * c    (Gemma-2/3)
    longrope: int | None = None                       # original_max_position_embeddings of a longrope table
    tp: TPComm | None = None                          # tensor-parallel rank layout (transformers tp_plan)
    quant: QuantPlan | None = None                    # quantized checkpoint: method, per-module formats
    warnings: list[str] = field(default_factory=list)  # patch() logs them and puts them in the report


def norm_eps(m: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(m, name):
            return float(getattr(m, name))
    raise Unsupported(f"norm module {type(m).__name__} has no eps attribute")


def _linear(parent: nn.Module, name: str, where: str) -> nn.Linear:
    """A plain nn.Linear, or a quantized one the kernels read (model/quant.py: FP8Linear, compressed-tensors,
    bitsandbytes Linear4bit)."""
    m = getattr(parent, name, None)
    if m is None:
        raise Unsupported(f"{where}.{name} is missing")
    if type(m) is not nn.Linear and type(m).__name__ not in QUANT_LINEAR_CLASSES:
        # LoRA / other Linear subclasses compute something else
        raise Unsupported(f"{where}.{name} is a {type(m).__name__}, not a plain nn.Linear")
    try:
        quant_weight(m)   # a QuantWeight, None (dense), or Unsupported with the reason
    except Unsupported as e:
        raise Unsupported(f"{where}.{name}: {e}") from None
    return m


def _norm(layer: nn.Module, name: str | None, size: int, where: str) -> nn.Module | None:
    if name is None:
        return None
    m = getattr(layer, name, None)
    w = getattr(m, "weight", None)
    if m is None or w is None or w.shape != (size,):
        raise Unsupported(f"{where}.{name}: expected an RMSNorm with a weight of size {size}")
    norm_eps(m)
    return m


def _layer_window(config, i: int) -> int:
    layer_types = getattr(config, "layer_types", None)
    sw = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return int(sw or 0) if layer_types[i] == "sliding_attention" else 0
    if getattr(config, "use_sliding_window", True) is False:
        return 0
    return int(sw or 0)


def _rope_types(config, spec: FamilySpec) -> dict[str | None, dict]:
    """rope parameters per table key (None: one table; else a layer type)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if spec.rope_per_layer_type:
        return {t: dict(rope.get(t) or {}) for t in sorted(set(config.layer_types))}
    return {None: rope}


def _check_rope(config, spec: FamilySpec) -> int | None:
    """original_max_position_embeddings when the rope is longrope (two tables), else None."""
    longrope = None
    for key, rope in _rope_types(config, spec).items():
        rt = rope.get("rope_type", rope.get("type", "default"))
        if rt in SWITCHED_ROPE_TYPES and key is None:
            orig = rope.get("original_max_position_embeddings",
                            getattr(config, "original_max_position_embeddings", None))
            if orig is None:
                raise Unsupported("longrope without original_max_position_embeddings")
            longrope = int(orig)
            if config.max_position_embeddings > longrope:
                raise Unsupported(
                    f"longrope with max_position_embeddings {config.max_position_embeddings} > "
                    f"original_max_position_embeddings {longrope}: stock generate() drops the KV cache and "
                    "re-prefills the whole sequence with the long factors when it first exceeds the original "
                    "length; braid's decode loop keeps its cache, so longer generations would differ "
                    "(the fused step itself switches factors exactly like stock's forward)")
        elif rt not in STATIC_ROPE_TYPES:
            raise Unsupported(f"rope type {rt!r} depends on the sequence length (supported: "
                              f"{sorted(STATIC_ROPE_TYPES | SWITCHED_ROPE_TYPES)})")
    return longrope


def _check_family_config(config, spec: FamilySpec) -> None:
    """Config switches that change the math of a family beyond what its spec row describes."""
    if getattr(config, "use_bidirectional_attention", False):
        raise Unsupported("use_bidirectional_attention=True (non-causal attention) is not fused")
    if spec.multipliers:
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if getattr(config, name, None) is None:
                raise Unsupported(f"config.{name} is missing")


def _model_scalars(model, config, spec: FamilySpec, embed: nn.Module) -> dict:
    out = {}
    if spec.embed_scale:
        scale = getattr(embed, "embed_scale", None)
        if not isinstance(scale, torch.Tensor):
            raise Unsupported(f"{type(embed).__name__} has no embed_scale buffer")
        # HF: embeds * embed_scale.to(weight.dtype): the normaliser is rounded to the dtype first
        out["embed_scale"] = scale.to(embed.weight.dtype)
    if spec.multipliers:
        out["embed_scale"] = float(config.embedding_multiplier)
        out["residual_mult"] = float(config.residual_multiplier)
        out["logits_div"] = None if float(config.logits_scaling) == 1.0 else float(config.logits_scaling)
    if spec.final_softcap and getattr(config, "final_logit_softcapping", None):
        out["final_softcap"] = float(config.final_logit_softcapping)
    return out


def _check_model(model, config) -> str | None:
    """The model-wide checks; returns the quant_method of a quantized checkpoint the kernels read (else None)."""
    if model.training:
        raise Unsupported("model is in training mode (call model.eval() first)")
    quantizer = getattr(model, "hf_quantizer", None)
    qc = getattr(quantizer, "quantization_config", None)
    method = None
    if getattr(qc, "quant_method", None) == "mxfp4" and getattr(qc, "dequantize", False):
        pass   # gpt-oss with its MXFP4 experts dequantised to bf16 at load: plain parameters
    elif quantizer is not None or getattr(model, "is_quantized", False):
        try:
            method = model_quant_method(model)
        except Unsupported as e:
            raise Unsupported(f"quantized model: {e}") from None
        if method is None and not getattr(qc, "dequantize", False):
            raise Unsupported("quantized model without a readable quantization_config")
    if any("mxfp4" in type(m).__name__.lower() for m in model.modules()):
        raise Unsupported("gpt-oss experts are packed MXFP4: quantized experts are not fused yet; load the checkpoint "
                          "with Mxfp4Config(dequantize=True) (bf16 experts) to patch it")
    devmap = getattr(model, "hf_device_map", None)
    if devmap and len({str(d) for d in devmap.values()}) > 1:
        raise Unsupported(f"model is sharded over several devices by device_map ({sorted({str(d) for d in devmap.values()})})")
    params = list(model.parameters())
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) != 1:
        raise Unsupported(f"parameters live on several devices: {sorted(map(str, devices))}")
    if method is None and (len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.bfloat16,
                                                                           torch.float16)):
        raise Unsupported(f"parameter dtypes {sorted(map(str, dtypes))}: need one of fp32/bf16/fp16")
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        raise Unsupported(f"attention implementation {config._attn_implementation!r}: prefill through it "
                          "with the braid cache is untested (use sdpa or eager)")
    return method


def _attn_projections(spec, attn, where, n_heads, n_kv, head_dim):
    qkv = tuple(_linear(attn, n, f"{where}.{spec.attn}") for n in spec.proj[:-1])
    o = _linear(attn, spec.proj[-1], f"{where}.{spec.attn}")
    sizes = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
    if [m.out_features for m in qkv] != ([sum(sizes)] if len(qkv) == 1 else sizes):
        raise Unsupported(f"{where}: projection sizes do not match heads x head_dim")
    if len({m.bias is None for m in qkv}) > 1:
        raise Unsupported(f"{where}: q/k/v disagree on bias")
    check_packable(qkv, f"{where}.{spec.attn} q|k|v")
    return qkv, o


def _projections(spec, attn, mlp, where, n_heads, n_kv, head_dim):
    qkv, o = _attn_projections(spec, attn, where, n_heads, n_kv, head_dim)
    gate_up = tuple(_linear(mlp, n, f"{where}.{spec.mlp}") for n in spec.mlp_proj[:-1])
    down = _linear(mlp, spec.mlp_proj[-1], f"{where}.{spec.mlp}")
    if len({m.bias is None for m in gate_up}) > 1:
        raise Unsupported(f"{where}: gate/up disagree on bias")
    if len(gate_up) == 1 and gate_up[0].out_features % 2:
        raise Unsupported(f"{where}: packed gate_up has an odd number of rows")
    check_packable(gate_up, f"{where}.{spec.mlp} gate|up", act=True)
    return qkv, o, gate_up, down


def _qk_norms(spec, attn, where, n_heads, n_kv, head_dim):
    if spec.qk_norm is None:
        return None, None
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    want = (head_dim, head_dim) if spec.qk_norm == "head" else (n_heads * head_dim, n_kv * head_dim)
    if qn is None or kn is None or (qn.weight.shape[-1], kn.weight.shape[-1]) != want:
        raise Unsupported(f"{where}: expected {spec.qk_norm} q_norm/k_norm of sizes {want}")
    return qn, kn


def plan_model(model: nn.Module, tuning: Tuning = DEFAULT_TUNING) -> ModelPlan:
    """Check every assumption the fused decode step makes; raise Unsupported with the first miss.
    `tuning` picks the tensor-parallel all-reduce (the only knob planning reads)."""
    config = getattr(model, "config", None)
    if config is None:
        raise Unsupported("not a Hugging Face PreTrainedModel (no config)")
    if getattr(config, "is_encoder_decoder", False):
        raise Unsupported(f"{config.model_type}: encoder-decoder models are not supported")
    mtype = getattr(config, "model_type", "")
    if mtype in REFUSED:
        raise Unsupported(f"model type {mtype!r}: {REFUSED[mtype]}")
    spec = find_spec(mtype)
    if spec is None:
        raise Unsupported(f"model type {config.model_type!r} has no braid family spec "
                          f"(supported: {', '.join(t for s in REGISTRY for t in s.model_types)})")
    method = _check_model(model, config)
    _check_family_config(config, spec)
    quant = None
    if method is not None:   # the dense-dtype check of _check_model, minus the quantized Linears' storage
        if has_dtensors(model):
            raise Unsupported("tensor-parallel quantized models are not fused")
        quant = plan_quant(model, method)

    backbone = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if backbone is None or lm_head is None or not hasattr(backbone, "layers"):
        raise Unsupported("expected <CausalLM>.model.layers and .lm_head")
    if (type(lm_head) is not nn.Linear and type(lm_head).__name__ != "FP8Linear") or lm_head.bias is not None:
        raise Unsupported("lm_head is not a bias-free nn.Linear")
    _linear(model, "lm_head", "model")   # dense or quantized (a quantized lm_head runs quant_gemv)
    longrope = _check_rope(config, spec)
    act_name = getattr(config, spec.act_attr, None)
    act = ACTS.get(act_name)
    if act is None:
        raise Unsupported(f"activation {act_name!r} is not fused")

    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    hidden = config.hidden_size
    attn_impl = getattr(config, "_attn_implementation", "sdpa")
    warnings: list[str] = []
    layers = []
    moe_layers = set(moe_layer_indices(config)) if spec.moe else set()
    if moe_layers and has_dtensors(model):
        raise Unsupported("tensor-parallel mixture-of-experts layers are not fused")
    intermediate = 0
    for i, layer in enumerate(backbone.layers):
        where = f"model.layers.{i}"
        attn, mlp = getattr(layer, spec.attn, None), getattr(layer, spec.mlp, None)
        if attn is None or mlp is None:
            raise Unsupported(f"{where} lacks {spec.attn}/{spec.mlp}")
        moe = None
        if i in moe_layers:
            qkv, o = _attn_projections(spec, attn, where, n_heads, n_kv, head_dim)
            if quant is not None and has_quantized(mlp):
                raise Unsupported(f"{where}.{spec.mlp}: quantized MoE experts are not fused yet (the MoE kernels "
                                  "read dense experts only)")
            try:
                moe = plan_moe(mlp, config)
            except Unsupported as e:
                raise Unsupported(f"{where}.{spec.mlp}: {e}") from None
            gate_up, down = (), None
        else:
            qkv, o, gate_up, down = _projections(spec, attn, mlp, where, n_heads, n_kv, head_dim)
            intermediate = gate_up[0].out_features // 2 if len(gate_up) == 1 else gate_up[0].out_features
        sinks = None
        if spec.attn_sinks:
            sinks = getattr(attn, "sinks", None)
            if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (n_heads,):
                raise Unsupported(f"{where}.{spec.attn}.sinks: expected ({n_heads},) attention sinks")
        qn, kn = _qk_norms(spec, attn, where, n_heads, n_kv, head_dim)
        norms = [_norm(layer, n, hidden, where)
                 for n in (spec.attn_norm, spec.mlp_norm, spec.attn_out_norm, spec.mlp_out_norm)]
        softcap = float(getattr(attn, "attn_logit_softcapping", None) or 0.0) if spec.attn_softcap else 0.0
        if softcap and attn_impl != "eager":
            # stock sdpa ignores it (transformers 5.17) or raises (newer): mirror the stock model
            if i == 0:
                warnings.append(f"attn_logit_softcapping={softcap} is not applied by {attn_impl} attention "
                                "in the stock model, so the fused step does not apply it either")
            softcap = 0.0
        rope_key = None
        if spec.rope_per_layer_type:
            rope_key = config.layer_types[i]
        if spec.nope_layers and not config.no_rope_layers[i]:
            rope_key = ""
        layers.append(LayerPlan(i, *norms, qkv, o, gate_up, down, qn, kn,
                                float(getattr(attn, "scaling", head_dim ** -0.5)), _layer_window(config, i),
                                softcap, rope_key, moe, sinks))
    final_norm = _norm(backbone, "norm", hidden, "model")
    try:
        tp = tp_layout(model, _roles(model, layers, backbone.embed_tokens, final_norm, lm_head), n_heads, n_kv,
                       tuning)
    except TPMismatch as e:
        raise Unsupported(f"tensor-parallel layout: {e}") from None
    if tp is not None and any(len(lp.qkv) == 1 or len(lp.gate_up) == 1 for lp in layers):
        raise Unsupported("tensor-parallel layout: packed qkv_proj / gate_up_proj shards are not fused")
    return ModelPlan(spec, layers, backbone.embed_tokens, final_norm,
                     lm_head, backbone.rotary_emb, n_heads, n_kv, head_dim, hidden, intermediate,
                     norm_eps(backbone.norm), act, longrope=longrope, warnings=warnings, tp=tp, quant=quant,
                     **_model_scalars(model, config, spec, backbone.embed_tokens))


def _roles(model, layers: list[LayerPlan], embed, final_norm, lm_head) -> dict:
    """module name -> (tensor-parallel role, module) for every module the fused step reads."""
    names = {id(m): n for n, m in model.named_modules()}
    roles = {names[id(embed)]: ("embed", embed), names[id(lm_head)]: ("lm_head", lm_head),
             names[id(final_norm)]: ("replicated", final_norm)}
    for lp in layers:
        for m in (*lp.qkv, *lp.gate_up):
            roles[names[id(m)]] = ("col", m)
        for m in (lp.o, lp.down):
            if m is not None:   # a MoE layer has no dense down projection
                roles[names[id(m)]] = ("row", m)
        for m in (lp.attn_norm, lp.mlp_norm, lp.attn_out_norm, lp.mlp_out_norm, lp.q_norm, lp.k_norm):
            if m is not None:
                roles[names[id(m)]] = ("replicated", m)
    return roles
