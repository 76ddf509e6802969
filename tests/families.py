"""Tiny random models of each decoder family users bring, built offline from stock transformers
config classes with each family's own conventions switched on (sliding windows, q/k norms, Gemma's
norms and soft-capping, fused projections, partial rotary, layers without RoPE, logit scaling,
routed experts).

Shapes are small so a whole pipeline runs in seconds, but every size is a multiple of 32 so the
default quantization schemes apply; `head_dim` is explicit where the family allows it, as in the
real checkpoints of those families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# Shared by every family: 2 layers, 4 query heads over 2 KV heads (GQA), head_dim 16.
COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "initializer_range": 0.05,
}

# family → the config overrides that switch on its conventions.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {  # Llama 3.x: rope_type llama3 (low frequencies stretched past a wavelength)
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {"sliding_window": 24},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": True},  # q_norm / k_norm per head
    "gemma2": {  # (1 + w) norms, √hidden embedding scale, soft-capping, alternating windows
        "sliding_window": 24,
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "gemma3_text": {"sliding_window": 24, "query_pre_attn_scalar": 16, "sliding_window_pattern": 2},
    "phi3": {"partial_rotary_factor": 0.75, "head_dim": None},  # fused qkv_proj, gate_up_proj
    "olmo2": {},  # q/k norms over all heads, norms after attention and MLP
    "smollm3": {"no_rope_layer_interval": 2},  # every 2nd layer without RoPE
    "granite": {  # scaled embeddings, residuals, attention and logits
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.25,
        "logits_scaling": 2.0,
    },
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def family_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """The family's config class filled with COMMON, its conventions and `overrides` (any other
    model_type, e.g. "cohere", gets COMMON and `overrides` only)."""
    from transformers import AutoConfig

    # Special token ids inside the tiny vocabulary (some families default to ids above it).
    tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    kwargs = {**COMMON, **tokens, **FAMILIES.get(family, {}), "vocab_size": vocab_size, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoConfig.for_model(family, **kwargs)


def tiny_family_model(
    family: str, vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = family_config(family, vocab_size, **overrides)
    torch.manual_seed(seed)
    # dtype at construction, as from_pretrained does: `.to(dtype)` would also round the
    # float32 rotary buffers (inv_freq) and change the logits a reloaded model gives.
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def save_tiny_family(
    directory: Path, family: str, tokenizer: Any, *, seed: int = 0, **overrides: Any
) -> Path:
    """A tiny random model of `family` saved as a Hub checkpoint (bf16 safetensors + tokenizer)."""
    model = tiny_family_model(
        family,
        len(tokenizer),
        seed=seed,
        dtype=torch.bfloat16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sharpened(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Norm weights random around their identity; q/k scaled so attention is peaked (windows,
    soft-capping and RoPE then change the logits by much more than rounding does)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(4.0)
    return model
