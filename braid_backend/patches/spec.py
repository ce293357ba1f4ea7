"""Per-family spec rows and the generic checks that decide whether a model can be patched.

Adding a family means adding a FamilySpec row (and a tiny config test), not copying code: the
decode step in `decode.py` is generic and reads everything model-specific from the LayerPlan built
here from the config and the module tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# rope types whose cos/sin depend on the position only, so one precomputed table is exact
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}
ACTS = {"silu": "silu_mul", "swish": "silu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul", "gelu_tanh": "gelu_tanh_mul"}


@dataclass(frozen=True)
class FamilySpec:
    family: str
    model_types: tuple[str, ...]
    qk_norm: bool = False          # per-head RMSNorm of q and k before RoPE (Qwen3)
    norm_mode: int = 0             # 0: w * x.to(dtype) (Llama); 1: (x * (offset + w)).to(dtype) (Gemma)
    norm_offset: float = 0.0
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    proj: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_proj: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    notes: str = ""


REGISTRY: list[FamilySpec] = [
    FamilySpec("llama", ("llama",), notes="Llama 2/3 incl. llama3 rope scaling"),
    FamilySpec("qwen2", ("qwen2",), notes="Qwen2/2.5: qkv bias"),
    FamilySpec("qwen3", ("qwen3",), qk_norm=True, notes="q_norm/k_norm, head_dim != hidden/heads"),
    FamilySpec("mistral", ("mistral",), notes="sliding window handled in the decode kernel"),
]


def find_spec(model_type: str) -> FamilySpec | None:
    for spec in REGISTRY:
        if model_type in spec.model_types:
            return spec
    return None


class Unsupported(Exception):
    """Raised with the reason a model (or part of it) is left stock."""


@dataclass
class LayerPlan:
    index: int
    attn: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    post_attn_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    scale: float
    window: int


@dataclass
class ModelPlan:
    spec: FamilySpec
    causal_lm: nn.Module
    backbone: nn.Module
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
    rope_type: str
    warnings: list[str] = field(default_factory=list)


def norm_eps(m: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(m, name):
            return float(getattr(m, name))
    raise Unsupported(f"norm module {type(m).__name__} has no eps attribute")


def _linear(parent: nn.Module, name: str, where: str) -> nn.Linear:
    m = getattr(parent, name, None)
    if m is None:
        raise Unsupported(f"{where}.{name} is missing")
    if type(m) is not nn.Linear:  # quantized / LoRA / other Linear subclasses compute something else
        raise Unsupported(f"{where}.{name} is a {type(m).__name__}, not a plain nn.Linear")
    return m


def _layer_window(config, i: int) -> int:
    layer_types = getattr(config, "layer_types", None)
    sw = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return int(sw or 0) if layer_types[i] == "sliding_attention" else 0
    if getattr(config, "use_sliding_window", True) is False:
        return 0
    return int(sw or 0)


def plan_model(model: nn.Module) -> ModelPlan:
    """Check every assumption the fused decode step makes; raise Unsupported with the first miss."""
    config = getattr(model, "config", None)
    if config is None:
        raise Unsupported("not a Hugging Face PreTrainedModel (no config)")
    if getattr(config, "is_encoder_decoder", False):
        raise Unsupported(f"{config.model_type}: encoder-decoder models are not supported")
    spec = find_spec(getattr(config, "model_type", ""))
    if spec is None:
        raise Unsupported(f"model type {config.model_type!r} has no braid family spec "
                          f"(supported: {', '.join(t for s in REGISTRY for t in s.model_types)})")
    if model.training:
        raise Unsupported("model is in training mode (call model.eval() first)")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise Unsupported("quantized models are not supported")
    devmap = getattr(model, "hf_device_map", None)
    if devmap and len({str(d) for d in devmap.values()}) > 1:
        raise Unsupported(f"model is sharded over several devices by device_map ({sorted({str(d) for d in devmap.values()})})")
    params = list(model.parameters())
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) != 1:
        raise Unsupported(f"parameters live on several devices: {sorted(map(str, devices))}")
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.bfloat16, torch.float16):
        raise Unsupported(f"parameter dtypes {sorted(map(str, dtypes))}: need one of fp32/bf16/fp16")

    backbone = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if backbone is None or lm_head is None or not hasattr(backbone, "layers"):
        raise Unsupported("expected <CausalLM>.model.layers and .lm_head")
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        raise Unsupported("lm_head is not a bias-free nn.Linear")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise Unsupported(f"rope type {rope_type!r} depends on the sequence length (supported: {sorted(STATIC_ROPE_TYPES)})")
    act = ACTS.get(getattr(config, "hidden_act", None))
    if act is None:
        raise Unsupported(f"activation {getattr(config, 'hidden_act', None)!r} is not fused")
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        raise Unsupported(f"attention implementation {config._attn_implementation!r}: prefill through it "
                          "with the braid cache is untested (use sdpa or eager)")

    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    layers = []
    for i, layer in enumerate(backbone.layers):
        where = f"model.layers.{i}"
        attn, mlp = getattr(layer, spec.attn, None), getattr(layer, spec.mlp, None)
        if attn is None or mlp is None:
            raise Unsupported(f"{where} lacks {spec.attn}/{spec.mlp}")
        q, k, v, o = (_linear(attn, n, f"{where}.{spec.attn}") for n in spec.proj)
        gate, up, down = (_linear(mlp, n, f"{where}.{spec.mlp}") for n in spec.mlp_proj)
        if q.out_features != n_heads * head_dim or k.out_features != n_kv * head_dim:
            raise Unsupported(f"{where}: projection sizes do not match heads x head_dim")
        if (q.bias is None) != (k.bias is None) or (k.bias is None) != (v.bias is None):
            raise Unsupported(f"{where}: q/k/v disagree on bias")
        if (gate.bias is None) != (up.bias is None):
            raise Unsupported(f"{where}: gate/up disagree on bias")
        qn = getattr(attn, "q_norm", None) if spec.qk_norm else None
        kn = getattr(attn, "k_norm", None) if spec.qk_norm else None
        if spec.qk_norm and (qn is None or kn is None or qn.weight.shape[-1] != head_dim):
            raise Unsupported(f"{where}: expected per-head q_norm/k_norm of size {head_dim}")
        ln1, ln2 = getattr(layer, spec.input_norm, None), getattr(layer, spec.post_attn_norm, None)
        if ln1 is None or ln2 is None:
            raise Unsupported(f"{where}: missing {spec.input_norm}/{spec.post_attn_norm}")
        layers.append(LayerPlan(i, attn, mlp, ln1, ln2, q, k, v, o, gate, up, down, qn, kn,
                                float(getattr(attn, "scaling", head_dim ** -0.5)), _layer_window(config, i)))
    return ModelPlan(spec, model, backbone, layers, backbone.embed_tokens, backbone.norm, lm_head,
                     backbone.rotary_emb, n_heads, n_kv, head_dim, config.hidden_size,
                     config.intermediate_size, norm_eps(backbone.norm), act, rope_type)
