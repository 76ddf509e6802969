"""The decoder as an ONNX graph for ONNX Runtime, built node by node from the loaded model.

We build the graph ourselves instead of tracing: the quantized layers must become
`com.microsoft.MatMulNBits` with our packed integers carried over bit for bit, and the fast
ONNX Runtime path for a decoder is its fused contrib ops, which a tracer does not emit:

    input_ids ─ Gather / GatherBlockQuantized (embedding)
      per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm)
                 MatMulNBits qkv (one matmul) → GroupQueryAttention (RoPE from cos/sin
                 tables, causal, grouped KV heads, KV cache in and out) → MatMulNBits o
                 SkipSimplifiedLayerNormalization → MatMulNBits gate‖up → Split → SiLU · up
                 → MatMulNBits down
    final norm → lm_head (MatMulNBits, or MatMul for a float head) → logits

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

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.errors import ArtifactError
from compress.quant.config import PER_CHANNEL
from compress.quant.linear import QuantLinear
from compress.quant.packing import pack_rows, unpack_zero_points

OPSET = 17
MS_DOMAIN = "com.microsoft"
# Architectures whose decoder layer is exactly the graph above (RMSNorm, RoPE on q/k, SiLU-gated
# MLP, optional q/k/v biases). Others are refused by name rather than exported wrongly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
MIN_BLOCK, MAX_BLOCK = 16, 128  # MatMulNBits: a power of two ≥ 16; MLAS is tuned up to 128


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


def check_exportable(model: nn.Module, options: ExportOptions) -> None:
    """Refuse, by name, what the graph does not express, before anything is built."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArtifactError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported by the ONNX "
            f"export; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ArtifactError(f"hidden_act {config.hidden_act!r}: the export writes SiLU MLPs")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        raise ArtifactError(
            f"sliding_window={window}: sliding-window attention is not exported; only full "
            "causal attention"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") == "dynamic":
        raise ArtifactError("rope_type 'dynamic' recomputes its tables per length: not exported")
    decoder = _decoder(model)
    for i, layer in enumerate(decoder.layers):
        if getattr(layer.mlp, "act_fn", None) is None or not hasattr(layer.mlp, "gate_proj"):
            raise ArtifactError(f"model.layers.{i}.mlp: expected gate_proj/up_proj/down_proj")
    if options.quantized_only:
        unquantized = [
            name for name, module in decoder.layers.named_modules() if isinstance(module, nn.Linear)
        ]
        if unquantized:
            raise ArtifactError(
                f"the decoder has Linear layers that are not quantized (e.g. "
                f"model.layers.{unquantized[0]}); the ONNX export writes quantized artifacts "
                "made by `compress run` with a quantize stage"
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


def _rope_tables(model: nn.Module, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(context_length, head_dim / 2) cos and sin, from the model's own rotary module (so every
    rope_type's frequencies and attention scaling are the model's)."""
    rotary = _decoder(model).rotary_emb
    positions = torch.arange(context_length).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    halves_equal = all(torch.equal(t[..., :half], t[..., half:]) for t in (cos, sin))
    if not halves_equal:
        raise ArtifactError("rotary tables are not the rotate-half layout GroupQueryAttention uses")
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


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


def _rms_norm(
    g: _GraphBuilder, x: str, residual: str | None, norm: nn.Module, name: str, eps: float
) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual): the residual add fused into the norm, as
    SkipSimplifiedLayerNormalization does; the first norm of the model has no residual yet."""
    weight = g.constant(f"{name}.weight", norm.weight.detach().float().numpy())
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


def build_decoder(model: nn.Module, options: ExportOptions) -> Any:
    """The ONNX ModelProto of `model` (call `check_exportable` first)."""
    from onnx import TensorProto, helper

    config = model.config
    decoder = _decoder(model)
    n_layers = len(decoder.layers)
    attention = decoder.layers[0].self_attn
    head_dim = attention.head_dim
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    eps = float(config.rms_norm_eps)
    level = options.accuracy_level
    g = _GraphBuilder()

    cos, sin = _rope_tables(model, options.context_length)
    cos_name, sin_name = g.constant("cos_cache", cos), g.constant("sin_cache", sin)
    # GroupQueryAttention's lengths: each row's tokens so far − 1, and the longest total.
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

    hidden = _embedding(g, model)
    residual = None
    for i, layer in enumerate(decoder.layers):
        prefix = f"model.layers.{i}"
        normed, residual = _rms_norm(
            g, hidden, residual, layer.input_layernorm, f"{prefix}.input_layernorm", eps
        )
        attn = layer.self_attn
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        if fusable(qkv):  # GroupQueryAttention takes packed QKV and splits it itself
            q = _linear(g, normed, qkv, f"{prefix}.self_attn.qkv_proj", level)
            k = v = ""
        else:
            q, k, v = (
                _linear(g, normed, [m], f"{prefix}.self_attn.{p}_proj", level)
                for p, m in zip("qkv", qkv, strict=True)
            )
        context = g.node(
            "GroupQueryAttention",
            [
                q,
                k,
                v,
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                seqlens_k,
                total,
                cos_name,
                sin_name,
            ],
            outputs=[f"{prefix}/attn_out", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            name=f"{prefix}/attention",
            num_heads=n_heads,
            kv_num_heads=n_kv,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(attn.scaling),
        )[0]
        hidden = _linear(g, context, [attn.o_proj], f"{prefix}.self_attn.o_proj", level)
        normed, residual = _rms_norm(
            g,
            hidden,
            residual,
            layer.post_attention_layernorm,
            f"{prefix}.post_attention_layernorm",
            eps,
        )
        mlp = layer.mlp
        gate, up = _projections(
            g,
            normed,
            {f"{prefix}.mlp.gate_proj": mlp.gate_proj, f"{prefix}.mlp.up_proj": mlp.up_proj},
            f"{prefix}.mlp.gate_up_proj",
            level,
        )
        silu = g.one("Mul", [gate, g.one("Sigmoid", [gate])])
        hidden = _linear(
            g, g.one("Mul", [silu, up]), [mlp.down_proj], f"{prefix}.mlp.down_proj", level
        )
    normed, _ = _rms_norm(g, hidden, residual, decoder.norm, "model.norm", eps)
    logits = _output_layer(g, normed, model, level)
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
