"""The decoder as an ONNX graph for ONNX Runtime, built node by node from the loaded model.

We build the graph ourselves instead of tracing: the quantized layers must become
`com.microsoft.MatMulNBits` with our packed integers carried over bit for bit, and the fast
ONNX Runtime path for a decoder is its fused contrib ops, which a tracer does not emit:

    input_ids ─ Gather / GatherBlockQuantized (embedding) → × embedding scale (Gemma √hidden,
                Granite embedding_multiplier)
      per layer, two blocks, each:  stream + pending output → pre-norm (fused as
                 SkipSimplifiedLayerNormalization; OLMo2 has none) → block → post-norm (Gemma,
                 OLMo2) → × residual_multiplier (Granite) → the next pending output
        attention: MatMulNBits qkv (one matmul; Phi-3's fused qkv_proj as it is) → q/k norms
                 (Qwen3, Gemma 3 per head; OLMo2 over all heads) → GroupQueryAttention (RoPE
                 from the layer's cos/sin table, none for SmolLM3's NoPE layers; causal, sliding
                 window per layer, logit soft-cap, grouped KV heads, KV cache in and out)
                 → MatMulNBits o
        MLP:     MatMulNBits gate‖up → Split → act(gate) · up (SiLU, tanh-GELU) → MatMulNBits down
    final norm → lm_head (MatMulNBits, or MatMul for a float head) → / logits_scaling (Granite)
    → tanh soft-cap (Gemma 2) → logits

What differs per family is read from the model's own modules and config, and built, in
layers.py; this module assembles the graph and carries the weights. `check_exportable_config`
refuses what the graph cannot express (routed experts, other architectures) from config.json
alone, before any weight loads; `check_exportable` then checks the loaded modules.

Inputs and outputs follow onnxruntime-genai's names: `input_ids`, `attention_mask` (int64,
past + new tokens), `past_key_values.{i}.key|value` → `logits`, `present.{i}.key|value`
(float32, (batch, kv_heads, tokens, head_dim)). Activations are float32: ONNX Runtime's CPU
kernels are fastest there, and every stored value (bf16/fp16 scales, norms) widens exactly.

The packed layouts line up: our int32 words hold `32 // bits` values little-endian, low bits
first, which read as bytes is MatMulNBits' blob layout (two 4-bit values per byte, the first in
the low nibble). A group that is not a power of two long (or a whole row, per channel) is
written as several MatMulNBits blocks sharing the group's scale and zero point: the same
numbers, only repeated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.errors import ArtifactError
from compress.models import logit_postprocessing
from compress.onnx.layers import (
    MS_DOMAIN,
    AttentionSpec,
    NormLayout,
    RopeTable,
    act_fn,
    activation,
    activation_kind,
    attention_spec,
    check_exportable_config,
    embedding_scale,
    gqa_rotates,
    head_norm,
    norm_eps,
    norm_layout,
    norm_weight,
    position_ids,
    rms_norm,
    rope_by_layer_type,
    rope_tables,
    rotary,
    scaled,
    soft_cap,
)
from compress.onnx.layers import SUPPORTED_MODEL_TYPES as SUPPORTED_MODEL_TYPES  # re-exported
from compress.quant.config import PER_CHANNEL
from compress.quant.linear import QuantLinear
from compress.quant.packing import pack_rows, unpack_zero_points

OPSET = 17
QKV = ("q_proj", "k_proj", "v_proj")
MIN_BLOCK, MAX_BLOCK = 16, 128  # MatMulNBits: a power of two ≥ 16; MLAS is tuned up to 128

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    context_length: int  # rows of the RoPE tables: the longest sequence the export can run
    accuracy_level: int = 4  # MatMulNBits: 0 = float32 math, 4 = activations to int8 per block
    quantized_only: bool = True  # refuse a model whose decoder Linear layers are not quantized


@dataclass(frozen=True)
class NBitsWeight:
    """One quantized Linear in MatMulNBits' layout."""

    packed: np.ndarray  # uint8 (N, k_blocks, block_size · bits / 8)
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray | None  # uint8 (N, ceil(k_blocks · bits / 8)); None = 2^(bits-1)
    bits: int
    block_size: int
    in_features: int
    out_features: int


def block_size_for(group_len: int) -> int | None:
    """The MatMulNBits block for a group of `group_len` weights: the largest power of two that
    divides it (so every block lies inside one group), at most MAX_BLOCK; None below 16."""
    block = min(group_len & -group_len, MAX_BLOCK)
    return block if block >= MIN_BLOCK else None


def _little_endian_bytes(words: torch.Tensor) -> np.ndarray:
    """int32 (R, W) → uint8 (R, 4W), each word's bytes least significant first."""
    return words.contiguous().numpy().astype("<i4", copy=False).view(np.uint8)


def layer_block_size(layer: QuantLinear, name: str) -> int:
    """The MatMulNBits block of a quantized layer; ArtifactError naming it when there is none."""
    spec = layer.spec
    group_len = layer.in_features if spec.group_size == PER_CHANNEL else spec.group_size
    block = block_size_for(group_len)
    if block is None:
        what = "per-channel rows of" if spec.group_size == PER_CHANNEL else "group size"
        raise ArtifactError(
            f"{name}: {what} {group_len} cannot be expressed as MatMulNBits blocks (a power of "
            f"two ≥ {MIN_BLOCK} must divide it); quantize with group_size 32, 64 or 128"
        )
    return block


def to_matmul_nbits(layer: QuantLinear, name: str) -> NBitsWeight:
    """The layer's stored integers, scales and zero points, rearranged, never requantized."""
    spec, k, n = layer.spec, layer.in_features, layer.out_features
    block = layer_block_size(layer, name)
    repeat = spec.group_len(k) // block
    k_blocks = k // block
    packed = _little_endian_bytes(layer.weight_packed.cpu()).reshape(
        n, k_blocks, block * spec.bits // 8
    )
    scales = layer.weight_scale.detach().float().cpu().repeat_interleave(repeat, dim=1)
    zero_points = None
    if layer.weight_zero_point is not None:
        zero = unpack_zero_points(layer.weight_zero_point.cpu(), spec.bits, n)
        zero = zero.repeat_interleave(repeat, dim=1)  # (N, k_blocks)
        row_bytes = math.ceil(k_blocks * spec.bits / 8)
        zero_points = np.ascontiguousarray(
            _little_endian_bytes(pack_rows(zero, spec.bits))[:, :row_bytes]
        )
    return NBitsWeight(
        packed=np.ascontiguousarray(packed),
        scales=scales.numpy(),
        zero_points=zero_points,
        bits=spec.bits,
        block_size=block,
        in_features=k,
        out_features=n,
    )


# --------------------------------------------------------------------------- model checks


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise ArtifactError(
            f"{type(model).__name__}: expected a decoder at `model` with `embed_tokens` and "
            "`layers` (the Llama layout)"
        )
    return inner


def _check_layer(i: int, layer: nn.Module, layout: NormLayout, config: Any) -> None:
    """The layer's modules are the ones the graph reads; every probe runs (and refuses)."""
    prefix = f"model.layers.{i}"
    attn, mlp = layer.self_attn, layer.mlp
    if not (hasattr(attn, "qkv_proj") or all(hasattr(attn, p) for p in QKV)):
        raise ArtifactError(f"{prefix}.self_attn: expected q_proj/k_proj/v_proj or qkv_proj")
    if not (
        hasattr(mlp, "gate_up_proj") or (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"))
    ):
        raise ArtifactError(f"{prefix}.mlp: expected gate_proj/up_proj/down_proj or gate_up_proj")
    activation_kind(act_fn(mlp, f"{prefix}.mlp"), f"{prefix}.mlp")
    eps = float(config.rms_norm_eps)
    for role in ("attn_pre", "attn_post", "mlp_pre", "mlp_post"):
        name = getattr(layout, role)
        if name is None:
            continue
        norm = getattr(layer, name, None)
        if norm is None:
            raise ArtifactError(f"{prefix}.{name}: missing ({config.model_type} layers have one)")
        norm_weight(norm, f"{prefix}.{name}", norm_eps(norm, eps))
    for name in ("q_norm", "k_norm"):
        if hasattr(attn, name):
            norm = getattr(attn, name)
            norm_weight(norm, f"{prefix}.self_attn.{name}", norm_eps(norm, eps))


def check_exportable(model: nn.Module, options: ExportOptions) -> None:
    """Refuse, by name, what the graph does not express, before anything is built."""
    config = model.config
    check_exportable_config(config, options.context_length)
    decoder = _decoder(model)
    layout = norm_layout(config.model_type)
    rope_by_type = rope_by_layer_type(decoder.rotary_emb)
    for i, layer in enumerate(decoder.layers):
        _check_layer(i, layer, layout, config)
        attention_spec(i, layer.self_attn, config, rope_by_type)
    float_layers = [
        name for name, module in decoder.layers.named_modules() if isinstance(module, nn.Linear)
    ]
    quantized = any(isinstance(m, QuantLinear) for m in decoder.layers.modules())
    if options.quantized_only and not quantized and float_layers:
        raise ArtifactError(
            f"the decoder has no quantized Linear layer (e.g. model.layers.{float_layers[0]} "
            "is float); the ONNX export writes quantized artifacts made by `compress run` with "
            "a quantize stage"
        )
    if quantized and float_layers:
        # A mixed-precision artifact keeps some layers in 16 bits on purpose (`exclude`).
        log.info(
            "%d decoder Linear layers stay float in the export (kept unquantized by the "
            "recipe), e.g. model.layers.%s",
            len(float_layers),
            float_layers[0],
        )
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            layer_block_size(module, name)
    if options.accuracy_level not in (0, 1, 2, 3, 4):
        raise ArtifactError(f"accuracy_level must be 0–4, got {options.accuracy_level}")


# --------------------------------------------------------------------------- graph building


class _GraphBuilder:
    """Collects nodes and initializers; every name it hands out is unique."""

    def __init__(self) -> None:
        import onnx  # noqa: F401  (fail here, clearly, when the onnx extra is missing)

        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._constants: set[str] = set()
        self._count = 0

    def constant(self, name: str, array: np.ndarray) -> str:
        """An initializer called `name`; a name given twice is one tensor (shared weights)."""
        from onnx import numpy_helper

        if name not in self._constants:
            self._constants.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        *,
        outputs: int | list[str] = 1,
        name: str | None = None,
        domain: str = "",
        **attributes: Any,
    ) -> list[str]:
        from onnx import helper

        self._count += 1
        base = name or f"{op}_{self._count}"
        if isinstance(outputs, int):
            outputs = [f"{base}/out{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=base, domain=domain, **attributes)
        )
        return outputs

    def one(self, op: str, inputs: list[str], **kwargs: Any) -> str:
        return self.node(op, inputs, **kwargs)[0]


def _nbits_constants(g: _GraphBuilder, w: NBitsWeight, name: str) -> list[str]:
    """Initializer names of packed weight, scales and (or "") zero points."""
    return [
        g.constant(f"{name}.qweight", w.packed),
        g.constant(f"{name}.scales", w.scales),
        g.constant(f"{name}.qzeros", w.zero_points) if w.zero_points is not None else "",
    ]


def fusable(modules: list[nn.Module]) -> bool:
    """Whether one MatMulNBits (or MatMul) can compute these layers' outputs side by side: the
    same input width, the same quantization (or none), biases on all or none."""
    if len({m.in_features for m in modules}) != 1:
        return False
    if len({getattr(m, "bias", None) is None for m in modules}) != 1:
        return False
    if all(isinstance(m, QuantLinear) for m in modules):
        return len({m.spec for m in modules}) == 1
    return not any(isinstance(m, QuantLinear) for m in modules)


def _concatenated(weights: list[NBitsWeight]) -> NBitsWeight:
    """Several layers' blocks as one layer with their output rows stacked."""
    if len(weights) == 1:
        return weights[0]
    zeros = [w.zero_points for w in weights]
    return NBitsWeight(
        packed=np.concatenate([w.packed for w in weights]),
        scales=np.concatenate([w.scales for w in weights]),
        zero_points=None if zeros[0] is None else np.concatenate(zeros),
        bits=weights[0].bits,
        block_size=weights[0].block_size,
        in_features=weights[0].in_features,
        out_features=sum(w.out_features for w in weights),
    )


def _linear(
    g: _GraphBuilder, x: str, modules: list[nn.Module], name: str, accuracy_level: int
) -> str:
    """y = x [W₁; W₂; …]ᵀ + b: the `fusable` layers' outputs concatenated, as one MatMulNBits
    for QuantLinear layers, one MatMul (+ Add) for float Linear layers. Fewer, larger matmuls:
    at decode shapes each call has a fixed cost, and q/k/v or gate/up read the same input."""
    if not fusable(modules):
        raise ArtifactError(f"{name}: these layers cannot be computed by one matmul")
    biases = [getattr(m, "bias", None) for m in modules]
    bias = None if biases[0] is None else torch.cat([b.detach().float() for b in biases]).numpy()
    if isinstance(modules[0], QuantLinear):
        w = _concatenated([to_matmul_nbits(m, name) for m in modules])
        inputs = [
            x,
            *_nbits_constants(g, w, name),
            "",  # g_idx (deprecated)
            g.constant(f"{name}.bias", bias) if bias is not None else "",
        ]
        while inputs[-1] == "":
            inputs.pop()
        return g.one(
            "MatMulNBits",
            inputs,
            name=f"{name}/MatMulNBits",
            domain=MS_DOMAIN,
            K=w.in_features,
            N=w.out_features,
            bits=w.bits,
            block_size=w.block_size,
            accuracy_level=accuracy_level,
        )
    for module in modules:
        if not isinstance(module, nn.Linear):
            raise ArtifactError(f"{name}: expected a Linear layer, got {type(module).__name__}")
    weight = torch.cat([m.weight.detach().float() for m in modules]).t().contiguous().numpy()
    y = g.one("MatMul", [x, g.constant(f"{name}.weight_t", weight)], name=f"{name}/MatMul")
    if bias is not None:
        y = g.one("Add", [y, g.constant(f"{name}.bias", bias)])
    return y


def _projections(
    g: _GraphBuilder, x: str, modules: dict[str, nn.Module], fused_name: str, level: int
) -> list[str]:
    """One output per module (by name): from a single fused matmul split apart when the layers
    are `fusable`, from one matmul each otherwise."""
    layers = list(modules.values())
    if not fusable(layers):
        return [_linear(g, x, [m], name, level) for name, m in modules.items()]
    fused = _linear(g, x, layers, fused_name, level)
    sizes = np.array([m.out_features for m in layers])
    split = g.constant(f"split_{'_'.join(map(str, sizes))}", sizes)
    return g.node("Split", [fused, split], outputs=len(layers), axis=-1, name=f"{fused_name}/Split")


def embeddings_share_head(model: nn.Module) -> bool:
    """Whether the input embeddings are exactly the quantized lm_head's dequantized table (the
    quantize stage makes them so for a tied head), so the export can store the table once."""
    head, table = model.lm_head, _decoder(model).embed_tokens.weight
    if not isinstance(head, QuantLinear) or table.shape != (head.out_features, head.in_features):
        return False
    with torch.no_grad():
        return torch.equal(head.dequantized_weight().to(table.dtype), table)


def _embedding(g: _GraphBuilder, model: nn.Module) -> str:
    """Gather rows of the float table, or, when it is the quantized head's, GatherBlockQuantized
    over the head's own packed initializers (one copy of the table in the file)."""
    if embeddings_share_head(model):
        w = to_matmul_nbits(model.lm_head, "lm_head")
        packed, scales, zeros = _nbits_constants(g, w, "lm_head")
        rows = g.constant("lm_head.qweight_rows", np.array([w.out_features, -1]))
        data = g.one("Reshape", [packed, rows], name="lm_head.qweight_as_table")
        inputs = [data, "input_ids", scales] + ([zeros] if zeros else [])
        return g.one(
            "GatherBlockQuantized",
            inputs,
            name="embed",
            domain=MS_DOMAIN,
            bits=w.bits,
            block_size=w.block_size,
            gather_axis=0,
            quantize_axis=1,
        )
    table = _decoder(model).embed_tokens.weight.detach().float().numpy()
    return g.one(
        "Gather", [g.constant("model.embed_tokens.weight", table), "input_ids"], name="embed"
    )


def _output_layer(g: _GraphBuilder, x: str, model: nn.Module, level: int) -> str:
    """The lm_head. A float head tied to the embeddings reads the embedding table through a
    Transpose, which ONNX Runtime folds once at load: the file holds the table once."""
    head, table = model.lm_head, _decoder(model).embed_tokens.weight
    tied = not isinstance(head, QuantLinear) and head.weight is table and head.bias is None
    if not tied:
        return _linear(g, x, [head], "lm_head", level)
    transposed = g.one("Transpose", ["model.embed_tokens.weight"], perm=[1, 0], name="lm_head.t")
    return g.one("MatMul", [x, transposed], name="lm_head/MatMul")


@dataclass
class _Context:
    """What every layer's nodes share: sizes, the attention length inputs, the rotary tables."""

    g: _GraphBuilder
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    level: int
    seqlens_k: str
    total: str
    tables: dict[str, RopeTable]
    _positions: str | None = None

    def table_names(self, key: str) -> tuple[str, str]:
        t = self.tables[key]
        return self.g.constant(f"cos_cache.{key}", t.cos), self.g.constant(
            f"sin_cache.{key}", t.sin
        )

    def positions(self) -> str:
        if self._positions is None:
            self._positions = position_ids(self.g, self.seqlens_k, self.total)
        return self._positions


def _attention_lengths(g: _GraphBuilder) -> tuple[str, str]:
    """GroupQueryAttention's lengths: each row's tokens so far − 1, and the longest total."""
    from onnx import TensorProto

    mask_sum = g.one(
        "ReduceSum", ["attention_mask", g.constant("axis_1", np.array([1]))], keepdims=0
    )
    seqlens_k = g.one(
        "Cast",
        [g.one("Sub", [mask_sum, g.constant("one_i64", np.array(1))])],
        to=TensorProto.INT32,
        name="seqlens_k",
    )
    total = g.one("Shape", ["attention_mask"], start=1, end=2)
    total = g.one("Cast", [g.one("Squeeze", [total])], to=TensorProto.INT32, name="total_len")
    return seqlens_k, total


def _qkv(ctx: _Context, x: str, attn: nn.Module, prefix: str, apart: bool) -> tuple[str, str, str]:
    """(q, k, v), or (packed qkv, "", "") when GroupQueryAttention may split them itself: one
    matmul for a fused `qkv_proj` (Phi-3) or `fusable` q/k/v, split only when `apart`."""
    g, level = ctx.g, ctx.level
    fused = getattr(attn, "qkv_proj", None)
    modules = [fused] if fused is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    if fused is None and not fusable(modules):
        return tuple(  # type: ignore[return-value]
            _linear(g, x, [m], f"{prefix}.{p}_proj", level)
            for p, m in zip("qkv", modules, strict=True)
        )
    packed = _linear(g, x, modules, f"{prefix}.qkv_proj", level)
    if not apart:
        return packed, "", ""
    q_width, kv_width = ctx.heads * ctx.head_dim, ctx.kv_heads * ctx.head_dim
    sizes = g.constant(
        f"split_{q_width}_{kv_width}_{kv_width}", np.array([q_width, kv_width, kv_width])
    )
    q, k, v = g.node("Split", [packed, sizes], outputs=3, axis=-1, name=f"{prefix}.qkv_proj/Split")
    return q, k, v


def _qk_norm(ctx: _Context, x: str, norm: nn.Module, kind: str, name: str) -> str:
    """Gemma 3 / Qwen3 normalize every head over head_dim, OLMo2 all heads at once."""
    eps = norm_eps(norm, ctx.eps)
    gamma = norm_weight(norm, name, eps)
    if kind == "head":
        return head_norm(ctx.g, x, gamma, ctx.head_dim, name, eps)
    return rms_norm(ctx.g, x, None, gamma, name, eps)[0]


def _attention(ctx: _Context, i: int, x: str, attn: nn.Module, spec: AttentionSpec) -> str:
    """q/k/v projections → (q/k norms) → (RoPE outside GQA) → GroupQueryAttention → o_proj."""
    g, prefix = ctx.g, f"model.layers.{i}.self_attn"
    table = None if spec.rope is None else ctx.tables[spec.rope]
    gqa_rotary = table is not None and gqa_rotates(table.rotary_dim, ctx.head_dim)
    own_rotary = table is not None and not gqa_rotary
    q, k, v = _qkv(ctx, x, attn, prefix, apart=spec.qk_norm is not None or own_rotary)
    if spec.qk_norm is not None:  # before RoPE, as the model does
        q = _qk_norm(ctx, q, attn.q_norm, spec.qk_norm, f"{prefix}.q_norm")
        k = _qk_norm(ctx, k, attn.k_norm, spec.qk_norm, f"{prefix}.k_norm")
    cos = sin = ""
    if table is not None:
        names = ctx.table_names(spec.rope)
        if gqa_rotary:
            cos, sin = names
        else:  # a partial rotary narrower than GroupQueryAttention's rotary accepts
            positions = ctx.positions()
            q = rotary(g, q, positions, names, ctx.heads, table.rotary_dim, f"{prefix}.q")
            k = rotary(g, k, positions, names, ctx.kv_heads, table.rotary_dim, f"{prefix}.k")
    context = g.node(
        "GroupQueryAttention",
        [
            q,
            k,
            v,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            ctx.seqlens_k,
            ctx.total,
            cos,
            sin,
        ],
        outputs=[f"{prefix}/attn_out", f"present.{i}.key", f"present.{i}.value"],
        domain=MS_DOMAIN,
        name=f"model.layers.{i}/attention",
        num_heads=ctx.heads,
        kv_num_heads=ctx.kv_heads,
        do_rotary=int(gqa_rotary),
        rotary_interleaved=0,
        scale=spec.scale,
        local_window_size=-1 if spec.window is None else spec.window,
        softcap=0.0 if spec.softcap is None else spec.softcap,
    )[0]
    return _linear(g, context, [attn.o_proj], f"{prefix}.o_proj", ctx.level)


def _mlp(ctx: _Context, i: int, x: str, mlp: nn.Module) -> str:
    """down(act(gate) · up), gate and up from one matmul (fused `gate_up_proj`: gate first)."""
    g, prefix = ctx.g, f"model.layers.{i}.mlp"
    fused = getattr(mlp, "gate_up_proj", None)
    if fused is not None:
        both = _linear(g, x, [fused], f"{prefix}.gate_up_proj", ctx.level)
        half = fused.out_features // 2
        sizes = g.constant(f"split_{half}_{half}", np.array([half, half]))
        gate, up = g.node("Split", [both, sizes], outputs=2, axis=-1, name=f"{prefix}/Split")
    else:
        gate, up = _projections(
            g,
            x,
            {f"{prefix}.gate_proj": mlp.gate_proj, f"{prefix}.up_proj": mlp.up_proj},
            f"{prefix}.gate_up_proj",
            ctx.level,
        )
    kind = activation_kind(act_fn(mlp, prefix), prefix)
    hidden = g.one("Mul", [activation(g, gate, kind, prefix), up])
    return _linear(g, hidden, [mlp.down_proj], f"{prefix}.down_proj", ctx.level)


@dataclass(frozen=True)
class _Norm:
    name: str  # in the graph, as in the model's state dict
    eps: float
    gamma: np.ndarray  # float32; (1 + w) folded in for Gemma


def _norm_named(ctx: _Context, owner: nn.Module, name: str | None, prefix: str) -> _Norm | None:
    """A layer's (or the decoder's) norm by module name; None where the layout has none."""
    if name is None:
        return None
    norm = getattr(owner, name)
    eps = norm_eps(norm, ctx.eps)
    return _Norm(f"{prefix}.{name}", eps, norm_weight(norm, f"{prefix}.{name}", eps))


def _block_input(
    ctx: _Context, pending: str, residual: str | None, pre_norm: _Norm | None
) -> tuple[str, str]:
    """(the block's input, the residual stream): the pending output added to the stream, then
    the block's pre-norm (fused with the add) or, without one (OLMo2), the stream itself."""
    if pre_norm is not None:
        return rms_norm(ctx.g, pending, residual, pre_norm.gamma, pre_norm.name, pre_norm.eps)
    stream = pending if residual is None else ctx.g.one("Add", [pending, residual])
    return stream, stream


def _block_output(
    ctx: _Context, out: str, post_norm: _Norm | None, multiplier: float | None, name: str
) -> str:
    """The block's output as it is added to the stream: post-norm (Gemma, OLMo2), then
    Granite's residual_multiplier."""
    if post_norm is not None:
        out, _ = rms_norm(ctx.g, out, None, post_norm.gamma, post_norm.name, post_norm.eps)
    return scaled(ctx.g, out, multiplier, name)


def _logits(g: _GraphBuilder, logits: str, model: nn.Module) -> str:
    """The model's own logit post-processing (`models.logit_postprocessing`): Granite's
    / logits_scaling, Gemma's final soft-capping; a scale of 1 is left out (exact either way)."""
    post = logit_postprocessing(model)
    if post.multiply_by is not None and post.multiply_by != 1.0:
        factor = g.constant("logit_scale", np.array(post.multiply_by, dtype=np.float32))
        logits = g.one("Mul", [logits, factor], name="logits/scale")
    if post.divide_by is not None and post.divide_by != 1.0:
        divisor = g.constant("logits_scaling", np.array(post.divide_by, dtype=np.float32))
        logits = g.one("Div", [logits, divisor], name="logits/scaling")
    if post.softcap is not None:
        logits = soft_cap(g, logits, post.softcap, "logits")
    return logits


def build_decoder(model: nn.Module, options: ExportOptions) -> Any:
    """The ONNX ModelProto of `model` (call `check_exportable` first)."""
    from onnx import TensorProto, helper

    config = model.config
    decoder = _decoder(model)
    n_layers = len(decoder.layers)
    head_dim = decoder.layers[0].self_attn.head_dim
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    g = _GraphBuilder()
    rope_by_type = rope_by_layer_type(decoder.rotary_emb)
    specs = [
        attention_spec(i, layer.self_attn, config, rope_by_type)
        for i, layer in enumerate(decoder.layers)
    ]
    keys = {s.rope for s in specs if s.rope is not None}
    seqlens_k, total = _attention_lengths(g)
    ctx = _Context(
        g=g,
        heads=n_heads,
        kv_heads=n_kv,
        head_dim=head_dim,
        eps=float(config.rms_norm_eps),
        level=options.accuracy_level,
        seqlens_k=seqlens_k,
        total=total,
        tables=rope_tables(decoder.rotary_emb, options.context_length, keys),
    )
    layout = norm_layout(config.model_type)
    multiplier = getattr(config, "residual_multiplier", None)

    pending = scaled(
        g, _embedding(g, model), embedding_scale(decoder.embed_tokens, config), "model.embed_tokens"
    )
    residual = None  # the stream before `pending` is added; None: `pending` is the stream
    for i, layer in enumerate(decoder.layers):
        prefix = f"model.layers.{i}"
        x, residual = _block_input(
            ctx, pending, residual, _norm_named(ctx, layer, layout.attn_pre, prefix)
        )
        out = _attention(ctx, i, x, layer.self_attn, specs[i])
        pending = _block_output(
            ctx,
            out,
            _norm_named(ctx, layer, layout.attn_post, prefix),
            multiplier,
            f"{prefix}.self_attn.residual",
        )
        x, residual = _block_input(
            ctx, pending, residual, _norm_named(ctx, layer, layout.mlp_pre, prefix)
        )
        out = _mlp(ctx, i, x, layer.mlp)
        pending = _block_output(
            ctx,
            out,
            _norm_named(ctx, layer, layout.mlp_post, prefix),
            multiplier,
            f"{prefix}.mlp.residual",
        )
    final = _norm_named(ctx, decoder, "norm", "model")
    normed, _ = _block_input(ctx, pending, residual, final)
    logits = _logits(g, _output_layer(g, normed, model, options.accuracy_level), model)
    g.node("Identity", [logits], outputs=["logits"], name="logits")

    cache_shape = ["batch", n_kv, "past_tokens", head_dim]
    present_shape = ["batch", n_kv, "total_tokens", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch", "total_tokens"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", "tokens", config.vocab_size]
        )
    ]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache_shape
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, present_shape
                )
            )
    graph = helper.make_graph(g.nodes, "compress_decoder", inputs, outputs, g.initializers)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="compress",
    )
