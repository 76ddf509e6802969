"""What llama.cpp expects of each family: architecture, hyperparameter keys, tensor names and the
few tensor conventions that differ from transformers' (one table, read from the model's config).

Names come from the gguf package's own map (`gguf.get_tensor_name_map`), the one llama.cpp's
converter uses. The conventions that are not names:

- Llama (and Mistral, which llama.cpp runs as Llama): llama.cpp rotates interleaved pairs of
  q/k rows where transformers rotates halves, so q and k rows are permuted per head; a quantized
  layer's codes, scales and zero points are permuted with its rows.
- Gemma: RMSNorm multiplies by (1 + w); llama.cpp multiplies by the stored weight, so norms are
  stored as 1 + w.
- Llama 3's rope scaling is a `rope_freqs` tensor of per-frequency divisors.
- Sliding windows: llama.cpp runs them for Gemma 2 / 3 (per-layer pattern written as an array);
  for the others it runs every layer with full attention, so the context the GGUF declares is
  capped at the window, where full and sliding attention agree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

from compress.errors import ArtifactError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_plus_one: bool = False
    sliding_windows: bool = False  # llama.cpp runs this architecture's sliding-window layers
    logit_softcaps: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3),
    "phi3": Family(gguf.MODEL_ARCH.PHI3),
    "gemma2": Family(
        gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True, sliding_windows=True, logit_softcaps=True
    ),
    "gemma3_text": Family(
        gguf.MODEL_ARCH.GEMMA3, norm_plus_one=True, sliding_windows=True, logit_softcaps=True
    ),
}


def family_of(config: Any, where: str) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ArtifactError(
            f"{where}: model_type {config.model_type!r} has no GGUF layout here (supported: "
            f"{sorted(FAMILIES)}; MoE experts are not written to GGUF yet)"
        )
    return family


def arch_name(family: Family) -> str:
    return gguf.MODEL_ARCH_NAMES[family.arch]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers 5's rope parameters for one layer type (flat or keyed by layer type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        return params[layer_type]
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _layer_types(config: Any) -> list[str]:
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * config.num_hidden_layers


def context_length(config: Any, family: Family) -> int:
    """max_position_embeddings, or the sliding window where llama.cpp would run it as full
    attention (the model's own outputs are only reproduced up to the window there)."""
    length = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    sliding = window and (
        "sliding_attention" in _layer_types(config) or config.model_type == "mistral"
    )
    if sliding and not family.sliding_windows and window < length:
        log.warning(
            "%s: llama.cpp runs every layer with full attention for this architecture; the "
            "GGUF declares a context of %d tokens (the sliding window), where that is exact",
            config.model_type,
            window,
        )
        return int(window)
    return length


def llama3_rope_factors(config: Any) -> np.ndarray | None:
    """Llama 3's rope scaling as llama.cpp reads it: per-frequency divisors (`rope_freqs`)."""
    rope = _rope(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    dim = head_dim(config)
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelength, high_wavelength = original / low, original / high
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def check_expressible(config: Any, family: Family, where: str) -> None:
    """Refuse what llama.cpp would run differently from the model (before anything is written)."""
    rope = _rope(config)
    rope_type = str(rope.get("rope_type", "default")).lower()
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise ArtifactError(f"{where}: rope_type {rope_type!r} is not written to GGUF here")
    if family.arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        # llama.cpp scales queries by 1/sqrt(head_dim), except for its 27B (62 layers, 46 for
        # Gemma 2), where it uses 1/sqrt(hidden / heads).
        big = config.num_hidden_layers == (46 if family.arch == gguf.MODEL_ARCH.GEMMA2 else 62)
        expected = config.hidden_size / config.num_attention_heads if big else head_dim(config)
        scalar = getattr(config, "query_pre_attn_scalar", None) or head_dim(config)
        if not math.isclose(scalar, expected):
            raise ArtifactError(
                f"{where}: query_pre_attn_scalar {scalar} is not the {expected:g} llama.cpp "
                f"assumes for a {config.num_hidden_layers}-layer {config.model_type}"
            )
        if family.arch == gguf.MODEL_ARCH.GEMMA3 and getattr(
            config, "attn_logit_softcapping", None
        ):
            raise ArtifactError(f"{where}: llama.cpp's gemma3 has no attention soft-capping")
    if config.model_type == "phi3" and rope_type not in ("default",):
        raise ArtifactError(f"{where}: phi3 rope scaling ({rope_type}) is not written here")


def write_hparams(writer: gguf.GGUFWriter, config: Any, family: Family, n_vocab: int) -> None:
    """The architecture's hyperparameters, under the keys llama.cpp's loader reads."""
    writer.add_context_length(context_length(config, family))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    dim = head_dim(config)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    rope = _rope(config)
    partial = float(
        rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    )
    writer.add_rope_dimension_count(int(dim * partial))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = str(rope.get("rope_type", "default")).lower()
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if family.sliding_windows and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in _layer_types(config)])
        local = _rope(config, "sliding_attention")
        if local is not rope and "rope_theta" in local:
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if family.logit_softcaps:
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def gguf_tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight` (None: no such tensor)."""
    base, _, suffix = hf_name.rpartition(".")
    mapped = name_map.get_name(base)
    return None if mapped is None else f"{mapped}.{suffix}"


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Within each head, rows [half 0 | half 1] → interleaved (0₀, 1₀, 0₁, 1₁, …): what
    llama.cpp's interleaved rope expects of rows transformers rotates in halves. Any tensor
    whose first dimension is the layer's output rows (weights, codes, scales, zero points,
    biases) is permuted the same way."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def row_transform(
    config: Any, family: Family, hf_layer: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a layer's rows go through on the way to GGUF (identity for most)."""
    if family.permute_qk:
        if hf_layer.endswith("self_attn.q_proj"):
            return lambda rows: permute_rows(rows, config.num_attention_heads)
        if hf_layer.endswith("self_attn.k_proj"):
            return lambda rows: permute_rows(rows, config.num_key_value_heads)
    return lambda rows: rows


def float_tensor(hf_name: str, tensor: torch.Tensor, family: Family) -> torch.Tensor:
    """A tensor kept in floating point, with the family's value conventions applied."""
    if family.norm_plus_one and hf_name.endswith("norm.weight"):
        return tensor.to(torch.float32) + 1.0
    return tensor
