"""The prune stage on every decoder family users bring (tests/families.py), a support matrix.

Each family × {heads, FFN channels, layers} either prunes, and the artifact loaded by stock
transformers gives the logits of the original model with the pruned units masked out (their
output-projection columns zeroed, a removed layer bypassed), or is refused by preflight with a
message naming the layout and why. The layer cells use three layers and remove the middle one,
so per-layer config fields (Gemma's alternating `layer_types`, SmolLM3's `no_rope_layers`,
Qwen2-MoE's dense `mlp_only_layers`) must follow the kept layers for the parity to hold.

The config checks use real shapes (a Gemma-3-like 640-wide model with 4 heads of 256 and one
KV head): transformers' config classes validate them, and the tiny test widths never hit that.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import compress.stages  # noqa: F401  (registers the stages)
from compress.artifact import save_artifact
from compress.errors import PreflightError
from compress.pipeline import preflight as pipeline_preflight
from compress.prune.config import PruneConfig
from compress.registry import StageContext, StageResult, handler_for
from tests.families import FAMILIES, tiny_family_model
from tests.stages.test_prune_stage import _Bypass, _source_indices, _zero_columns
from tests.stages.test_prune_stage import _prune as prune_with

log = logging.getLogger(__name__)

VOCAB = 128
HEAD_DIM = 16  # tests/families.py COMMON: 4 query heads over 2 KV heads, FFN 128
NUM_HEADS = 4
NUM_KV = 2
INTERMEDIATE = 128
MOE = {"qwen2_moe", "mixtral"}
# Longer than the families' sliding windows (24), so windowed layers differ from global ones.
SEQ_LEN = 40

TARGETS = {
    "heads": {"criterion": "taylor", "heads": {"keep": 2}},  # one query head per KV group
    "ffn": {"criterion": "taylor", "ffn": {"ratio": 0.25, "multiple_of": 32}},  # 128 → 96
    "layers": {"layers": {"indices": [1]}},  # of 3: per-layer config fields must shift
}
# family → the layer cell's overrides: three layers, and for Qwen2-MoE every second layer
# sparse (dense layers 0 and 2), so removing layer 1 changes which new index is sparse.
LAYER_OVERRIDES = {"qwen2_moe": {"decoder_sparse_step": 2}}


def _ids(seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _context() -> StageContext:
    windows = _ids(seed=7)
    return StageContext(
        dtype="float32", calibration_windows=lambda: windows, calibration_batch_size=2
    )


def _prune(model: nn.Module, **config) -> StageResult:
    return prune_with(model, context=_context(), **config)


def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids, use_cache=False).logits


def _stock_reload(model: nn.Module, directory: Path) -> nn.Module:
    """Save as the pipeline does (config validated by save_pretrained), load with stock
    transformers."""
    save_artifact(model, None, directory, recipe_yaml="", manifest_fields={"dtype": "float32"})
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _family(family: str, **overrides) -> nn.Module:
    model = tiny_family_model(family, VOCAB, **overrides)
    with torch.no_grad():  # HF initializes norms to one (Gemma: zero) and biases to zero
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.normal_(mean=0.0 if name.endswith(".bias") else 0.5, std=0.3)
    return model


def _head_columns(heads: list[int]) -> list[int]:
    return [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]


class _KeptHeadsRMSNorm(nn.Module):
    """OLMo2's q_norm as the pruned model computes it: the RMS statistic over the kept heads'
    features only (removed features are zero; their o_proj columns are zeroed anyway)."""

    def __init__(self, norm: nn.Module, kept: list[int]) -> None:
        super().__init__()
        self.weight, self.eps, self.kept = norm.weight, norm.variance_epsilon, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x[..., self.kept].float()
        normed = kept * torch.rsqrt(kept.pow(2).mean(-1, keepdim=True) + self.eps)
        out = torch.zeros_like(x)
        out[..., self.kept] = (self.weight[self.kept] * normed).to(x.dtype)
        return out


def _mask_heads(masked: nn.Module, kept_heads: dict[int, list[int]], family: str) -> None:
    for index, heads in kept_heads.items():
        attention = masked.model.layers[index].self_attn
        removed = [h for h in range(NUM_HEADS) if h not in heads]
        _zero_columns(attention.o_proj, _head_columns(removed))
        if family == "olmo2":
            attention.q_norm = _KeptHeadsRMSNorm(attention.q_norm, _head_columns(heads))


def _mask_channels(masked: nn.Module, model: nn.Module) -> None:
    for source, layer in zip(masked.model.layers, model.model.layers, strict=True):
        kept = _source_indices(source.mlp.down_proj.weight, layer.mlp.down_proj.weight, dim=1)
        assert kept == sorted(kept) and len(kept) == layer.mlp.down_proj.in_features
        _zero_columns(source.mlp.down_proj, [c for c in range(INTERMEDIATE) if c not in kept])


def _check_fused_rows(original: nn.Module, pruned: nn.Module, kept_heads: dict) -> None:
    """Phi-3: qkv_proj keeps [kept q heads | k heads | v heads], gate_up_proj both halves at the
    same channels, in order."""
    for index, (source, layer) in enumerate(
        zip(original.model.layers, pruned.model.layers, strict=True)
    ):
        qkv = source.self_attn.qkv_proj.weight
        if index in kept_heads:  # KV heads are all kept (unit query)
            q_size = NUM_HEADS * HEAD_DIM
            rows = _head_columns(kept_heads[index]) + list(range(q_size, qkv.shape[0]))
            assert torch.equal(layer.self_attn.qkv_proj.weight, qkv[rows])
        gate_up = source.mlp.gate_up_proj.weight
        kept = _source_indices(source.mlp.down_proj.weight, layer.mlp.down_proj.weight, dim=1)
        halves = kept + [INTERMEDIATE + c for c in kept]
        assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up[halves])


# --------------------------------------------------------------------------- the matrix

REFUSED = {
    ("qwen2_moe", "ffn"): "MLP is routed experts",
    ("mixtral", "ffn"): "MLP is routed experts",
}


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_pruning_matches_the_masked_original_after_a_stock_load(tmp_path, family, kind):
    overrides = {"num_hidden_layers": 3, **LAYER_OVERRIDES.get(family, {})}
    model = _family(family, **(overrides if kind == "layers" else {}))
    if (family, kind) in REFUSED:
        with pytest.raises(PreflightError, match=REFUSED[family, kind]) as refused:
            _prune(model, **TARGETS[kind])
        assert refused.value.field == "ffn" and type(model).__name__ in str(refused.value)
        return
    original = copy.deepcopy(model)
    masked = copy.deepcopy(model)
    result = _prune(model, **TARGETS[kind])
    if kind == "heads":
        assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == NUM_KV
        _mask_heads(masked, result.details["kept_query_heads"], family)
    elif kind == "ffn":
        assert model.config.intermediate_size == 96
        _mask_channels(masked, model)
    else:
        assert model.config.num_hidden_layers == 2
        masked.model.layers[1].register_forward_hook(_Bypass(), with_kwargs=True)
    if family == "phi3" and kind != "layers":
        _check_fused_rows(original, model, result.details["kept_query_heads"])
    stock = _stock_reload(model, tmp_path / "artifact")
    assert type(stock) is type(model)
    expected = _logits(masked)
    assert (expected - _logits(original)).abs().max() > 1e-3  # the pruning is not a no-op
    delta = (_logits(stock) - expected).abs().max().item()
    log.info("prune %s × %s: stock-load max |Δlogit| vs masked original %.2e", family, kind, delta)
    torch.testing.assert_close(_logits(stock), expected, atol=1e-4, rtol=1e-4)
    if family == "olmo2" and kind == "heads":
        # The q_norm statistic now spans the kept heads only: not the plainly masked model.
        plain = copy.deepcopy(original)
        for index, heads in result.details["kept_query_heads"].items():
            removed = [h for h in range(NUM_HEADS) if h not in heads]
            _zero_columns(plain.model.layers[index].self_attn.o_proj, _head_columns(removed))
        assert (_logits(stock) - _logits(plain)).abs().max() > 1e-3
        assert result.details["norms_spanning_heads"] == ["q_norm"]


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_fused_phi3_scores_and_slices_like_its_split_llama_twin(criterion):
    """A Phi-3 with full rotary is a Llama with fused weights: each criterion must keep the
    same heads and channels in both, and the pruned models must agree."""
    phi3 = _family("phi3", partial_rotary_factor=1.0)
    config = phi3.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            **{
                k: getattr(config, k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "max_position_embeddings",
                    "rms_norm_eps",
                    "hidden_act",
                    "tie_word_embeddings",
                )
            },
            head_dim=HEAD_DIM,
            pad_token_id=0,
        )
    ).eval()
    twin = {}
    for name, tensor in phi3.state_dict().items():
        if "qkv_proj" in name:
            q, k, v = tensor.split([NUM_HEADS * HEAD_DIM, NUM_KV * HEAD_DIM, NUM_KV * HEAD_DIM])
            for part, value in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                twin[name.replace("qkv_proj", part)] = value
        elif "gate_up_proj" in name:
            gate, up = tensor.chunk(2)
            twin[name.replace("gate_up_proj", "gate_proj")] = gate
            twin[name.replace("gate_up_proj", "up_proj")] = up
        else:
            twin[name] = tensor
    llama.load_state_dict(twin)
    torch.testing.assert_close(_logits(llama), _logits(phi3), atol=1e-5, rtol=1e-5)

    targets = {"heads": {"keep": 2}, "ffn": {"ratio": 0.5, "multiple_of": 32}}
    fused = _prune(phi3, criterion=criterion, **targets)
    split = _prune(llama, criterion=criterion, **targets)
    assert fused.details["kept_query_heads"] == split.details["kept_query_heads"]
    for a, b in zip(phi3.model.layers, llama.model.layers, strict=True):
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)
    torch.testing.assert_close(_logits(phi3), _logits(llama), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- config checks

# A Gemma-3-like shape: hidden 640, 4 query heads of 256 over one KV head (head_dim explicit,
# so hidden_size ≠ heads × head_dim), as in the small real checkpoints.
GEMMA_LIKE = {
    "hidden_size": 640,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "query_pre_attn_scalar": 256,
}


def _gemma_like(meta: bool = False) -> nn.Module:
    if not meta:
        return _family("gemma3_text", **GEMMA_LIKE)
    from tests.families import family_config

    with torch.device("meta"):  # what pipeline.prepare hands preflight: no weights
        return AutoModelForCausalLM.from_config(family_config("gemma3_text", VOCAB, **GEMMA_LIKE))


@pytest.mark.parametrize(
    ("heads", "field"), [({"keep": 3}, "heads.keep"), ({"ratio": 0.25}, "heads.ratio")]
)
def test_head_count_the_config_class_rejects_is_refused_in_preflight(heads, field):
    recipe = SimpleNamespace(stages=[PruneConfig(criterion="taylor", heads=heads)])
    with pytest.raises(PreflightError) as refused:
        pipeline_preflight(_gemma_like(meta=True), recipe)
    message = str(refused.value)
    assert message.startswith(f"stages[0].{field}: Gemma3TextConfig rejects the pruned config")
    assert "The hidden size (640) is not a multiple of the number of attention heads (3)" in message
    assert message.endswith("query heads per layer that Gemma3TextConfig accepts: 1, 2, 4")


def test_an_accepted_head_count_on_the_gemma_like_shape_saves_and_loads(tmp_path):
    model = _gemma_like()
    masked = copy.deepcopy(model)
    result = _prune(model, criterion="activation", heads={"keep": 2})
    assert model.config.query_pre_attn_scalar == 256  # the attention scale stays the model's
    attention = masked.model.layers[0].self_attn
    removed = [h for h in range(4) if h not in result.details["kept_query_heads"][0]]
    _zero_columns(attention.o_proj, [h * 256 + d for h in removed for d in range(256)])
    stock = _stock_reload(model, tmp_path / "artifact")
    torch.testing.assert_close(_logits(stock), _logits(masked), atol=1e-4, rtol=1e-4)


def test_phi3_longrope_factors_pin_the_head_count():
    """Phi-3 / Phi-4-mini longrope: the config checks its per-frequency factors against
    hidden_size // num_attention_heads, so no smaller head count is accepted."""
    model = _family(
        "phi3",
        original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0] * 6,  # (64 // 4) · 0.75 / 2
            "long_factor": [1.5] * 6,
        },
    )
    with pytest.raises(PreflightError, match=r"short_factor.*accepts: 2$") as refused:
        _prune(model, heads={"unit": "kv_group", "keep": 1}, criterion="magnitude")
    assert refused.value.field == "heads.keep"
    assert "KV groups per layer" in str(refused.value)
    # FFN channels are not part of that check.
    _prune(model, ffn={"ratio": 0.25, "multiple_of": 32}, criterion="magnitude")
    assert model.config.intermediate_size == 96


def test_planned_model_of_a_fused_layout_has_the_shapes_the_stage_produces():
    model = _family("phi3", num_hidden_layers=3)
    prune = PruneConfig(heads={"keep": 2}, ffn={"ratio": 0.5}, layers={"remove": 1})
    planned = handler_for(prune).plan(model, prune)
    assert all(p.is_meta for p in planned.parameters())
    _prune(model, **prune.model_dump())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in planned.named_parameters()}
