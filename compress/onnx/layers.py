"""The per-family parts of the decoder graph: what each layer's attention and norms are, read
from the model's own modules and config, and the ONNX nodes that compute them.

Families differ in a handful of conventions (DESIGN.md, "Many families, one code path"). Most
are read from the loaded model, so a checkpoint that switches one on is exported as it runs:

    sliding window     attention module's `sliding_window` (Qwen2/3, Gemma 2/3, SmolLM3: per
                       layer from `layer_types`), else the config's (Mistral, Phi-3: every layer)
    rotary table       the model's own rotary module; Gemma 3 has one per layer type (local and
                       global bases), called with the layer's `layer_type`
    no RoPE            attention module's `use_rope` (SmolLM3's `no_rope_layers`)
    partial rotary     the table is narrower than head_dim (Phi-3 / Phi-4-mini)
    q/k norms          `q_norm` / `k_norm` over head_dim (Qwen3, Gemma 3) or over all heads (OLMo2)
    norm weight        w or (1 + w) (Gemma): probed by running the norm module itself
    attention scale    attention module's `scaling` (Gemma's query_pre_attn_scalar, Granite's
                       attention_multiplier), `attn_logit_softcapping` (Gemma 2)
    MLP activation     probed by running the module's activation (SiLU, tanh GELU, GELU)
    fused projections  `qkv_proj` (q‖k‖v rows, GroupQueryAttention's packed order), `gate_up_proj`
                       (gate rows first) (Phi-3)
    embedding scale    the embedding module's `embed_scale` in the table's dtype (Gemma), the
                       config's `embedding_multiplier` (Granite)
    residual, logits   the config's `residual_multiplier`, `logits_scaling` (Granite) and
                       `final_logit_softcapping` (Gemma 2)

What cannot be read, where each layer's norms sit, is the one table here (NORM_LAYOUTS). What
cannot be exported (routed experts, other architectures, rope tables that change with the
length) is refused by `check_exportable_config` from the config alone.

Attention is one `com.microsoft.GroupQueryAttention` per layer. It takes packed QKV and rotates
q and k itself when it can. With q/k norms, q, k and v go in apart, normalized first (the norm
comes before RoPE). Its rotary needs a cos table whose width is a multiple of 8 (ONNX Runtime's
check); a narrower partial rotary (e.g. 12 of head_dim 16) is done by `RotaryEmbedding` first.
`local_window_size` is the window counting the current token, as HF's `kv > q − window`: ONNX
Runtime ≥ 1.23 (earlier releases excluded the current token, one more key; refused by
`check_ort_window_semantics`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress.errors import ArtifactError

if TYPE_CHECKING:
    from compress.onnx.graph import _GraphBuilder

MS_DOMAIN = "com.microsoft"
# ONNX Runtime's GroupQueryAttention does the rotary itself only for cos tables this wide.
GQA_ROTARY_MULTIPLE = 8
# The release where local_window_size started to count the current token (PR #25927).
ORT_WINDOW_INCLUDES_CURRENT = (1, 23)
# Architectures whose decoder layer is graph.py's graph with the per-family parts of this module
# (RMSNorm, RoPE on q/k, gated MLP, optional biases). Others are refused by name from their
# config, before their weights load, rather than exported wrongly.
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "smollm3",
    "granite",
)
# Config fields that announce routed experts (Qwen2/3-MoE, OLMoE; Mixtral; DeepSeek).
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
# Activation names the configs of those families use; the module itself is probed at export.
CONFIG_ACTIVATIONS = frozenset({"silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu"})


@dataclass(frozen=True)
class NormLayout:
    """Module names of a decoder layer's norms; None where the family has none. `*_pre` norms
    read the residual stream, `*_post` norms the block's output before it is added."""

    attn_pre: str | None
    attn_post: str | None
    mlp_pre: str | None
    mlp_post: str | None


PRE_NORM = NormLayout("input_layernorm", None, "post_attention_layernorm", None)
# The names alone mislead: Gemma's and OLMo2's `post_attention_layernorm` is a post-norm, Llama's
# the MLP's pre-norm.
NORM_LAYOUTS: dict[str, NormLayout] = {
    "gemma2": NormLayout(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    "olmo2": NormLayout(None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}
NORM_LAYOUTS["gemma3_text"] = NORM_LAYOUTS["gemma2"]


def norm_layout(model_type: str) -> NormLayout:
    return NORM_LAYOUTS.get(model_type, PRE_NORM)


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes, beyond the projections."""

    scale: float
    window: int | None  # keys within `window` positions, the current one included
    softcap: float | None  # tanh(s / c) · c on the attention logits
    rope: str | None  # key of the rotary table; None: this layer uses no RoPE
    qk_norm: str | None  # "head" (over head_dim), "all" (over all heads), or None


def attention_spec(
    layer_index: int, attn: nn.Module, config: Any, rope_by_type: bool
) -> AttentionSpec:
    """The layer's attention, read from its module (and the config where the module does not
    carry it, as Mistral's and Phi-3's window)."""
    name = f"model.layers.{layer_index}.self_attn"
    window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
    if window is not None and int(window) <= 0:
        raise ArtifactError(f"{name}: sliding_window {window} is not a window")
    softcap = getattr(attn, "attn_logit_softcapping", None)
    rope: str | None = "default"
    if rope_by_type:
        rope = getattr(attn, "layer_type", None)
        if rope is None:
            raise ArtifactError(f"{name}: the rotary tables are per layer type, the layer has none")
    if not getattr(attn, "use_rope", True):
        rope = None
    qk_norm = None
    if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
        raise ArtifactError(f"{name}: a q_norm without a k_norm (or the reverse)")
    if hasattr(attn, "q_norm"):
        width = attn.q_norm.weight.numel()
        if width == attn.head_dim:
            qk_norm = "head"
        elif width == attn.q_proj.out_features:
            qk_norm = "all"
        else:
            raise ArtifactError(f"{name}.q_norm: {width} wide, neither head_dim nor all heads")
    return AttentionSpec(
        scale=float(attn.scaling),
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        rope=rope,
        qk_norm=qk_norm,
    )


def check_ort_window_semantics(version: str) -> None:
    """Refuse sliding windows for an ONNX Runtime whose local_window_size means one key more."""
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if numbers < ORT_WINDOW_INCLUDES_CURRENT:
        raise ArtifactError(
            f"sliding-window attention needs onnxruntime ≥ "
            f"{'.'.join(map(str, ORT_WINDOW_INCLUDES_CURRENT))} (its local_window_size counts "
            f"the current token, as transformers' window does); installed: {version}"
        )


# --------------------------------------------------------------------------- config


def _rope_parameters(config: Any) -> list[dict[str, Any]]:
    """The config's rope parameter sets: one, or one per layer type (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return nested or [rope]


def config_has_sliding_window(config: Any) -> bool:
    """Whether any layer attends within a window, as transformers builds its masks."""
    if not getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return "sliding_attention" in layer_types
    return bool(getattr(config, "use_sliding_window", True))


def check_exportable_config(config: Any, context_length: int | None = None) -> None:
    """Refuse, from the config alone (before any weight loads), what the graph cannot express,
    naming it: routed experts, other architectures, rope types whose tables change with the
    length, activations without an ONNX Runtime kernel here."""
    model_type = getattr(config, "model_type", None)
    experts = {f: getattr(config, f) for f in EXPERT_FIELDS if getattr(config, f, None)}
    if experts:
        field, count = next(iter(experts.items()))
        raise ArtifactError(
            f"architecture {model_type!r}: mixture-of-experts layers ({field}={count}) are not "
            "exported to ONNX (the graph has one dense MLP per layer)"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArtifactError(
            f"architecture {model_type!r} is not supported by the ONNX export; supported: "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act not in CONFIG_ACTIVATIONS:
        raise ArtifactError(
            f"hidden activation {act!r}: the export writes {sorted(CONFIG_ACTIVATIONS)}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ArtifactError("use_bidirectional_attention: the export writes causal attention")
    for rope in _rope_parameters(config):
        rope_type = rope.get("rope_type", "default")
        if rope_type == "dynamic":
            raise ArtifactError(
                "rope_type 'dynamic' recomputes its tables per length: not exported"
            )
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        if rope_type == "longrope" and context_length and original and context_length > original:
            # Below `original` transformers uses the short factors, above it the long ones:
            # one static table cannot be both.
            raise ArtifactError(
                f"rope_type 'longrope': context length {context_length} exceeds "
                f"original_max_position_embeddings {original}, where the rotary factors switch; "
                f"export with --context-length {original} or less"
            )
    if config_has_sliding_window(config):
        try:
            import onnxruntime
        except ImportError:  # the export itself does not need ONNX Runtime
            return
        check_ort_window_semantics(onnxruntime.__version__)


# --------------------------------------------------------------------------- rotary tables


def rope_by_layer_type(rotary: nn.Module) -> bool:
    """Whether the rotary module holds one table per layer type (Gemma 3: local and global)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


@dataclass(frozen=True)
class RopeTable:
    cos: np.ndarray  # (context_length, rotary_dim / 2)
    sin: np.ndarray

    @property
    def rotary_dim(self) -> int:
        return 2 * self.cos.shape[1]


def rope_tables(rotary: nn.Module, context_length: int, keys: set[str]) -> dict[str, RopeTable]:
    """Cos and sin tables from the model's own rotary module (so every rope_type's frequencies
    and attention scaling are the model's), one per key: "default", or a layer type."""
    by_type = rope_by_layer_type(rotary)
    positions = torch.arange(context_length).unsqueeze(0)
    tables = {}
    for key in sorted(keys):
        with torch.no_grad():
            x = torch.zeros(1, dtype=torch.float32)
            cos, sin = rotary(x, positions, key) if by_type else rotary(x, positions)
        half = cos.shape[-1] // 2
        if not all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin)):
            raise ArtifactError(
                f"rotary tables ({key}) are not the rotate-half layout GroupQueryAttention uses"
            )
        tables[key] = RopeTable(cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy())
    return tables


# --------------------------------------------------------------------------- probes


def _probe(width: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, width, generator=generator).to(dtype)


def norm_weight(norm: nn.Module, name: str, eps: float) -> np.ndarray:
    """The float32 weight γ with norm(x) = x / rms(x) · γ: the module's `weight` (Llama), or
    `1 + weight` (Gemma), decided by running the module on a probe. Anything else (a LayerNorm,
    a bias) matches neither and is refused by name."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ArtifactError(f"{name}: expected an RMSNorm with a weight")
    w = weight.detach().float()
    x = _probe(w.numel(), weight.dtype)
    with torch.no_grad():
        y = norm(x).float()
    xf = x.float()
    normalized = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    scale = y.abs().max().clamp_min(1e-12)
    # A bf16 module rounds its output (2^-9 relative); the two candidates differ by x / rms(x).
    for gamma in (w, 1.0 + w):
        if float((normalized * gamma - y).abs().max() / scale) < 2e-2:
            return gamma.numpy()
    raise ArtifactError(f"{name}: {type(norm).__name__} is not x / rms(x) · w nor · (1 + w)")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
}


def activation_kind(fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> str:
    """Which of ACTIVATIONS the module's activation computes (run on a probe, not by name)."""
    x = torch.linspace(-8.0, 8.0, 257)
    with torch.no_grad():
        y = fn(x).float()
    for kind, reference in ACTIVATIONS.items():
        if torch.allclose(y, reference(x), rtol=1e-5, atol=1e-6):
            return kind
    raise ArtifactError(f"{name}: activation {fn!r} is none of {sorted(ACTIVATIONS)}")


def act_fn(mlp: nn.Module, name: str) -> Any:
    fn = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if fn is None:
        raise ArtifactError(f"{name}: no act_fn / activation_fn")
    return fn


def embedding_scale(table: nn.Module, config: Any) -> float:
    """Gemma's √hidden (in the table's dtype, as transformers multiplies it: √3072 is 55.5 in
    bf16) and Granite's embedding_multiplier."""
    factor = 1.0
    buffer = getattr(table, "embed_scale", None)
    if buffer is not None:
        factor *= float(buffer.to(table.weight.dtype))
    multiplier = getattr(config, "embedding_multiplier", None)
    if multiplier is not None:
        factor *= float(multiplier)
    return factor


# --------------------------------------------------------------------------- nodes


def norm_eps(norm: nn.Module, default: float) -> float:
    """The norm module's own epsilon (`variance_epsilon` in Llama's, `eps` in Gemma's)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(default if eps is None else eps)


def rms_norm(
    g: _GraphBuilder, x: str, residual: str | None, gamma: np.ndarray, name: str, eps: float
) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual): the residual add fused into the norm, as
    SkipSimplifiedLayerNormalization does; without a residual, the norm of x alone."""
    weight = g.constant(f"{name}.weight", gamma)
    if residual is None:
        normed = g.one(
            "SimplifiedLayerNormalization",
            [x, weight],
            axis=-1,
            epsilon=eps,
            stash_type=1,
            name=f"{name}/norm",
        )
        return normed, x
    normed, _, _, total = g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, weight],
        outputs=4,
        domain=MS_DOMAIN,
        epsilon=eps,
        name=f"{name}/norm",
    )
    return normed, total


def head_norm(
    g: _GraphBuilder, x: str, gamma: np.ndarray, head_dim: int, name: str, eps: float
) -> str:
    """RMSNorm of every head of (batch, tokens, heads · head_dim) over its head_dim."""
    heads = g.constant(f"shape_heads_{head_dim}", np.array([0, 0, -1, head_dim]))
    flat = g.constant("shape_flat_heads", np.array([0, 0, -1]))
    split = g.one("Reshape", [x, heads], name=f"{name}/heads")
    normed, _ = rms_norm(g, split, None, gamma, name, eps)
    return g.one("Reshape", [normed, flat], name=f"{name}/flat")


def position_ids(g: _GraphBuilder, seqlens_k: str, total: str) -> str:
    """(batch, tokens) positions of the new tokens, by GroupQueryAttention's own rule: 0.. for a
    prompt (no past), else each row's past length (seqlens_k + 1 − tokens) onwards."""
    from onnx import TensorProto

    tokens = g.one("Squeeze", [g.one("Shape", ["input_ids"], start=1, end=2)])
    seen = g.one("Cast", [seqlens_k], to=TensorProto.INT64)
    past = g.one("Sub", [g.one("Add", [seen, g.constant("one_i64", np.array(1))]), tokens])
    total64 = g.one("Cast", [total], to=TensorProto.INT64)
    prompt = g.one("Equal", [total64, tokens])
    zero = g.constant("zero_i64", np.array(0))
    start = g.one("Where", [prompt, zero, past])  # (batch,)
    steps = g.one("Range", [zero, tokens, g.constant("one_i64", np.array(1))])  # (tokens,)
    column = g.one("Unsqueeze", [start, g.constant("axis_1", np.array([1]))])
    return g.one("Add", [column, steps], name="position_ids")


def rotary(
    g: _GraphBuilder,
    x: str,
    positions: str,
    tables: tuple[str, str],
    heads: int,
    dim: int,
    name: str,
) -> str:
    """RoPE (rotate-half layout) on the first `dim` of every head's values, the rest unchanged."""
    cos, sin = tables
    return g.one(
        "RotaryEmbedding",
        [x, positions, cos, sin],
        name=f"{name}/rotary",
        domain=MS_DOMAIN,
        interleaved=0,
        num_heads=heads,
        rotary_embedding_dim=dim,
    )


def gqa_rotates(rotary_dim: int, head_dim: int) -> bool:
    """Whether GroupQueryAttention's own rotary accepts a table for `rotary_dim` of head_dim."""
    half = rotary_dim // 2
    return half % GQA_ROTARY_MULTIPLE == 0 and rotary_dim <= head_dim


def activation(g: _GraphBuilder, x: str, kind: str, name: str) -> str:
    if kind == "silu":
        return g.one("Mul", [x, g.one("Sigmoid", [x])], name=f"{name}/silu")
    op = {"gelu_tanh": "FastGelu", "gelu": "Gelu"}[kind]  # FastGelu: the tanh approximation
    return g.one(op, [x], domain=MS_DOMAIN, name=f"{name}/{kind}")


def soft_cap(g: _GraphBuilder, x: str, cap: float, name: str) -> str:
    """tanh(x / cap) · cap."""
    c = g.constant(f"{name}.cap", np.array(cap, dtype=np.float32))
    return g.one("Mul", [g.one("Tanh", [g.one("Div", [x, c])]), c], name=f"{name}/softcap")


def scaled(g: _GraphBuilder, x: str, factor: float | None, name: str) -> str:
    """x · factor (no node for None or 1)."""
    if factor is None or factor == 1.0:
        return x
    c = g.constant(f"{name}.factor", np.array(factor, dtype=np.float32))
    return g.one("Mul", [x, c], name=f"{name}/scale")
