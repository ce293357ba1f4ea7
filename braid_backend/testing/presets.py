"""Built-in model presets: real configs with random weights (no hub access needed).

Real checkpoints are loaded from a local path or hub id by `load_model`; presets build the
architecture from its published config and fill it with seeded random weights, which is what the
tests and benchmarks use on machines that cannot download weights.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("braid_backend")

_LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}

# name -> (config class name, kwargs). Real sizes from the published configs.
PRESETS: dict[str, tuple[str, dict]] = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)),
    "qwen3-0.6b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)),
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_parameters=dict(_LLAMA3_ROPE), rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001)),
    "mistral-7b-v0.3": ("MistralConfig", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)),
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
    # the 7-9B models people run (issue #13)
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_parameters=dict(_LLAMA3_ROPE, factor=8.0), rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001)),
    "qwen2.5-7b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643)),
    # a model that does not fit one GPU comfortably (issue #12: tensor parallelism)
    "qwen2.5-32b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643)),
    "gemma-2-9b": ("Gemma2Config", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)),
    # one real-sized config per family added for issue #6 (GPU bf16 checks; sizes from published configs)
    "gemma-2b": ("GemmaConfig", dict(
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)),
    "gemma-2-2b": ("Gemma2Config", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)),
    "gemma-3-1b": ("Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=32768, sliding_window=512, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)),
    "phi-3-mini-4k": ("Phi3Config", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000)),
    "granite-3.1-2b": ("GraniteConfig", dict(
        vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0}, rms_norm_eps=1e-5,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
        logits_scaling=8.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    "olmo-2-1b": ("Olmo2Config", dict(
        vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=100257, eos_token_id=100257, pad_token_id=100277)),
    "smollm3-3b": ("SmolLM3Config", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=65536,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0}, rms_norm_eps=1e-6,
        no_rope_layer_interval=4, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128012,
        pad_token_id=128004)),
    # mixture-of-experts models (issue #23), real sizes; they fit an H200 in bf16
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)),
    "gpt-oss-20b": ("GptOssConfig", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 12,
        max_position_embeddings=131072, rms_norm_eps=1e-5, swiglu_limit=7.0, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False},
        tie_word_embeddings=False, bos_token_id=199998, eos_token_id=200002, pad_token_id=199999)),
    "mixtral-8x7b": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, sliding_window=None, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)),
    "olmoe-1b-7b": ("OlmoeConfig", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=50279, pad_token_id=1)),
    "qwen1.5-moe-a2.7b": ("Qwen2MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151643)),
    "granite-3.1-3b-a800m": ("GraniteMoeConfig", dict(
        vocab_size=49155, hidden_size=1536, intermediate_size=512, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, num_local_experts=40, num_experts_per_tok=8,
        max_position_embeddings=131072, rms_norm_eps=1e-6, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=6.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0}, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)),
}

# Tiny configs of each family for CPU tests (Triton interpreter). Odd-ish sizes on purpose.
_TINY_COMMON = dict(vocab_size=307, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                    max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
TINY: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", dict(_TINY_COMMON, num_attention_heads=6, num_key_value_heads=2,
                                       head_dim=16, tie_word_embeddings=False,
                                       rope_parameters=dict(_LLAMA3_ROPE, original_max_position_embeddings=256))),
    "tiny-qwen2": ("Qwen2Config", dict(_TINY_COMMON, num_attention_heads=6, num_key_value_heads=2,
                                       tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "tiny-qwen3": ("Qwen3Config", dict(_TINY_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "tiny-mistral": ("MistralConfig", dict(_TINY_COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                           sliding_window=None, tie_word_embeddings=False,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # issue #6 families. Small sliding windows (4) so that the 9-token prompts of the tests exercise them;
    # soft-caps small enough to bend random-weight logits.
    "tiny-gemma": ("GemmaConfig", dict(_TINY_COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                       hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-gemma2": ("Gemma2Config", dict(_TINY_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                         query_pre_attn_scalar=32, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"],
                                         attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
                                         tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-gemma3": ("Gemma3TextConfig", dict(
        _TINY_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=2.0,
        tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
    "tiny-phi3": ("Phi3Config", dict(
        _TINY_COMMON, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
        sliding_window=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "tiny-granite": ("GraniteConfig", dict(_TINY_COMMON, num_attention_heads=6, num_key_value_heads=2,
                                           embedding_multiplier=12.0, residual_multiplier=0.22,
                                           attention_multiplier=0.1, logits_scaling=8.0, tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-olmo2": ("Olmo2Config", dict(_TINY_COMMON, num_attention_heads=6, num_key_value_heads=2,
                                       tie_word_embeddings=False, pad_token_id=0,
                                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "tiny-smollm3": ("SmolLM3Config", dict(_TINY_COMMON, num_attention_heads=6, num_key_value_heads=2,
                                           no_rope_layers=[1, 0], tie_word_embeddings=True, pad_token_id=0,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # mixture-of-experts families: few experts, top-2/3, odd sizes; every layer sparse
    "tiny-qwen3-moe": ("Qwen3MoeConfig", dict(
        _TINY_COMMON, moe_intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "tiny-qwen2-moe": ("Qwen2MoeConfig", dict(
        _TINY_COMMON, moe_intermediate_size=40, shared_expert_intermediate_size=72, num_attention_heads=6,
        num_key_value_heads=2, num_experts=5, num_experts_per_tok=3, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "tiny-mixtral": ("MixtralConfig", dict(
        _TINY_COMMON, intermediate_size=56, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "tiny-olmoe": ("OlmoeConfig", dict(
        _TINY_COMMON, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-gpt-oss": ("GptOssConfig", dict(
        _TINY_COMMON, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attention_bias=True, swiglu_limit=7.0,
        tie_word_embeddings=False, pad_token_id=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 64, "truncate": False})),
    "tiny-granitemoe": ("GraniteMoeConfig", dict(
        _TINY_COMMON, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.1,
        logits_scaling=8.0, tie_word_embeddings=True, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
TINY["tiny"] = TINY["tiny-qwen2"]
ALL_PRESETS = {**PRESETS, **TINY}
# gpt-oss has no sdpa path in transformers (attention sinks): eager, as stock loads it
EAGER_MODEL_TYPES = {"gemma2": "eager", "gpt_oss": "eager"}


def make_config(name: str, **overrides):
    import transformers

    if name not in ALL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(ALL_PRESETS))}")
    cls_name, kwargs = ALL_PRESETS[name]
    cfg = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    # sdpa cannot soft-cap attention logits (transformers 5.17 silently skips the cap, later versions
    # refuse): Gemma-2 runs eager, as HF itself prefers for it
    cfg._attn_implementation = EAGER_MODEL_TYPES.get(cfg.model_type, "sdpa")
    return cfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give norm weights and biases non-trivial random values.

    HF initialises norms to 1 and biases to 0, which would let a kernel that ignores either pass its
    tests; real checkpoints have neither."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith(".sinks"):   # gpt-oss attention sinks: init ~0.02 would hide a kernel that drops them
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            continue
        if name.endswith("bias") or "norm" in name.split(".")[-2]:
            base = 1.0 if "norm" in name.split(".")[-2] and not name.endswith("bias") else 0.0
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * (0.2 if base else 0.05)
            p.copy_((base + noise).to(p.dtype))
    return model


def build_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                seed: int = 0, **config_overrides):
    """A causal LM of a preset's architecture with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = make_config(name, **config_overrides)
    torch.manual_seed(seed)
    device = torch.device(device)
    if device.type == "cuda" and _approx_params(cfg) > 5e9:
        # a 7-9B model's fp32 init on the CPU needs ~32 GB of host memory and many minutes: init on the
        # GPU instead (other random values than a CPU init of the same seed; smaller presets keep the
        # CPU init, so their weights stay what earlier results were measured with)
        # beyond ~20B even the fp32 init does not fit one GPU: init in the target dtype
        init_dtype = dtype if _approx_params(cfg) > 2e10 else torch.float32
        with device:
            model = AutoModelForCausalLM.from_config(cfg, dtype=init_dtype)
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def _approx_params(cfg) -> float:
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if experts:   # MoE: every expert's gate/up/down (plus a shared expert where there is one)
        i = experts * (getattr(cfg, "moe_intermediate_size", None) or i)
        i += getattr(cfg, "shared_expert_intermediate_size", 0) or 0
    return n * (4 * h * h + 3 * h * i) + cfg.vocab_size * h


def load_model(name_or_path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """A preset name, a local checkpoint folder or a hub id (the hub needs network access)."""
    if name_or_path in ALL_PRESETS:
        return build_model(name_or_path, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    log.info("loading checkpoint %s", name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.to(device).eval()
