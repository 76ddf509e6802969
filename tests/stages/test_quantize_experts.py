"""MoE experts through the quantize stage: tiny random Qwen2-MoE and Mixtral (transformers 5 fused
3-D experts), every expert quantized, GPTQ on each expert's routed tokens, and the artifact read
back by our loader and by stock transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.artifact import load_artifact, save_artifact
from compress.errors import PreflightError
from compress.kernels import cpu_kernel
from compress.quant.config import GPTQOptions, QuantizeConfig
from compress.quant.experts import (
    PROJECTIONS,
    QuantExperts,
    expert_matrices,
    quantize_experts_rtn,
    routed_rows,
)
from compress.quant.linear import QuantLinear
from compress.quant.plan import spec_of
from compress.quant.rtn import rtn_quantize
from compress.quant.sequential import capture_first_layer_inputs, routed_inputs
from compress.registry import StageContext, handler_for
from tests.families import tiny_family_model

FAMILIES = ("qwen2_moe", "mixtral")
VOCAB = 256
INT4 = QuantizeConfig(bits=4, group_size=32)
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def _model(family: str) -> nn.Module:
    return tiny_family_model(family, VOCAB)  # float32: comparisons are not blurred by bf16


def _windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))


def _apply(model: nn.Module, config: QuantizeConfig):
    handler = handler_for(config)
    handler.preflight(model, config)
    windows = _windows()
    context = StageContext(
        dtype="float32", calibration_windows=lambda: windows, calibration_batch_size=8
    )
    return handler.apply(model, config, context)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), cpu_kernel("reference"):
        return model(IDS).logits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _decoder_matrices(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if ".layers." in n and p.ndim >= 2}


def _corrupt_one_expert(model: nn.Module) -> None:
    """Expert 0 of layer 0 computes with garbage: its codes' bits inverted (q → 15 − q)."""
    expert = model.model.layers[0].mlp.experts.expert(0)
    for module in expert.modules():
        if isinstance(module, QuantLinear):
            module.weight_packed.bitwise_not_()


def _experts_calls(model: nn.Module) -> tuple[tuple, torch.Tensor]:
    """What layer 0's experts module is called with on IDS, and what it returns."""
    calls = []
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_hook(lambda _m, args, out: calls.append((args, out)))
    _logits(model)
    handle.remove()
    (call,) = calls
    return call


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_quantized_and_the_share_reported(family, method):
    model = _model(family)
    reference = _logits(model)
    matrices = _decoder_matrices(model)
    routers = {n: v for n, v in matrices.items() if ".mlp.gate." in n or "shared_expert_gate" in n}
    assert routers  # the families have routers, which must stay in the source dtype
    experts_args, experts_out = _experts_calls(model)

    result = _apply(model, QuantizeConfig(bits=4, group_size=32, method=method))

    left = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.ndim == 3]
    assert left == []  # no fused float experts left anywhere
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == model.config.num_hidden_layers
    for layer in model.model.layers:
        assert not isinstance(layer.mlp.gate, QuantLinear)
        assert layer.mlp.gate.weight.dtype == torch.float32
    if family == "qwen2_moe":
        assert isinstance(model.model.layers[0].mlp.shared_expert.down_proj, QuantLinear)
        assert isinstance(model.model.layers[0].mlp.shared_expert_gate, nn.Linear)  # a gate
    expected = 1 - sum(routers.values()) / sum(matrices.values())
    assert result.details["quantized_weight_share"] == pytest.approx(expected)
    assert result.details["experts_modules"] == model.config.num_hidden_layers
    assert 0 < _relative(_logits(model), reference) < 0.3

    # The experts themselves, on the routing the float model gave layer 0's tokens: INT4 g32
    # moves their output a little; one expert of four computing with garbage codes, a lot
    # (so the bound fails if the experts did not compute with their own codes).
    quantized = model.model.layers[0].mlp.experts
    with torch.no_grad(), cpu_kernel("reference"):
        error = _relative(quantized(*experts_args), experts_out)
        _corrupt_one_expert(model)
        corrupted_error = _relative(quantized(*experts_args), experts_out)
    assert 0 < error < 0.2
    assert corrupted_error > 3 * error


@pytest.mark.parametrize("family", FAMILIES)
def test_quant_experts_computes_what_the_transformers_module_does(family):
    """QuantExperts on any routing equals transformers' own experts module (eager and
    grouped_mm) holding the dequantized weights."""
    model = _model(family)
    original = model.model.layers[0].mlp.experts
    spec = spec_of(INT4)
    quantized = quantize_experts_rtn(
        original, spec, lambda _n, w: rtn_quantize(w, spec, torch.float32)
    )
    with torch.no_grad():
        for e in range(quantized.num_experts):
            expert = quantized.expert(e)
            gate, up, down = (expert.projection(p).dequantized_weight() for p in PROJECTIONS)
            original.gate_up_proj[e] = torch.cat([gate, up])
            original.down_proj[e] = down
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, model.config.hidden_size, generator=generator)
    scores = torch.randn(40, quantized.num_experts, generator=generator).softmax(-1)
    weights, index = scores.topk(model.config.num_experts_per_tok, dim=-1)
    with torch.no_grad(), cpu_kernel("reference"):
        ours = quantized(hidden, index, weights)
        for implementation in ("eager", "grouped_mm"):
            original.config._experts_implementation = implementation
            theirs = original(hidden, index, weights)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 0


def test_gptq_calibrates_each_expert_on_the_tokens_the_router_sends_it():
    family = "qwen2_moe"
    model = _model(family)
    windows = _windows()
    layer = model.model.layers[0]
    num_experts = model.config.num_experts

    # The model's own routing, from the router's output in a plain forward.
    chosen: list[torch.Tensor] = []
    handle = layer.mlp.gate.register_forward_hook(lambda _m, _a, out: chosen.append(out[2]))
    with torch.no_grad():
        for batch in windows.split(8):
            model(input_ids=batch, use_cache=False)
    handle.remove()

    with torch.no_grad():
        inputs = capture_first_layer_inputs(model, windows, batch_size=8)
        routed = routed_inputs(layer, layer.mlp.experts, inputs)
    assert len(routed) == len(chosen) == 2
    counts = []
    for e in range(num_experts):
        for batch, router_index in zip(routed, chosen, strict=True):
            expected = torch.nonzero((router_index == e).any(-1)).flatten()
            assert torch.equal(routed_rows(batch.top_k_index, e), expected)
        counts.append(sum(int((c == e).any(-1).sum()) for c in chosen))
    assert sum(counts) == windows.numel() * model.config.num_experts_per_tok

    # Layer 0's experts alone: their inputs are the float model's, so the stage's routed-token
    # counts are the router's. A threshold between the smallest and largest count sends the
    # experts below it to round to nearest, bit for bit, and the others through GPTQ.
    hidden = model.config.hidden_size
    low = sorted(counts)[0]
    ratio = (low + 1) / hidden
    config = QuantizeConfig(
        method="gptq",
        bits=4,
        group_size=32,
        include=["model.layers.0.mlp.experts"],
        exclude=["model.layers.1.mlp.experts"],  # explicitly left in float
        gptq=GPTQOptions(expert_min_tokens_per_feature=ratio),
    )
    float_experts = {e: expert_matrices(layer.mlp.experts, e) for e in range(num_experts)}
    float_experts = {e: {k: w.clone() for k, w in m.items()} for e, m in float_experts.items()}
    result = _apply(model, config)
    assert result.details["expert_tokens_min"] == min(counts)
    assert result.details["expert_tokens_max"] == max(counts)
    quantized = model.model.layers[0].mlp.experts
    assert isinstance(quantized, QuantExperts)
    assert model.model.layers[1].mlp.experts.gate_up_proj.ndim == 3  # excluded: untouched
    intermediate = model.config.moe_intermediate_size
    expected_fallback = sum(
        (counts[e] < ratio * hidden) * 2 + (counts[e] < ratio * intermediate)
        for e in range(num_experts)
    )
    assert result.details["expert_matrices_rtn_fallback"] == expected_fallback
    assert 0 < expected_fallback < 3 * num_experts
    spec = spec_of(config)
    for e in range(num_experts):
        for kind, weight in float_experts[e].items():
            in_features = hidden if kind != "down_proj" else intermediate
            rtn = rtn_quantize(weight, spec, torch.float32).weight_packed
            stored = quantized.expert(e).projection(kind).weight_packed
            assert torch.equal(stored, rtn) == (counts[e] < ratio * in_features), (e, kind)


def test_gptq_experts_beat_round_to_nearest_on_their_routed_tokens():
    """Per-expert Hessians are the right ones: on the calibration tokens, the experts' output
    error after GPTQ is below round to nearest's."""
    errors = {}
    for method in ("rtn", "gptq"):
        model = _model("mixtral")
        layer = model.model.layers[0]
        with torch.no_grad():
            inputs = capture_first_layer_inputs(model, _windows(), batch_size=8)
            routed = routed_inputs(layer, layer.mlp.experts, inputs)
            weights = [torch.ones(b.top_k_index.shape) for b in routed]
            reference = [
                layer.mlp.experts(b.hidden, b.top_k_index, w)
                for b, w in zip(routed, weights, strict=True)
            ]
        config = QuantizeConfig(
            method=method,
            bits=4,
            group_size=32,
            include=["model.layers.0.mlp.experts"],
            exclude=["model.layers.1.mlp.experts"],
            gptq=GPTQOptions(expert_min_tokens_per_feature=0) if method == "gptq" else None,
        )
        _apply(model, config)
        with torch.no_grad(), cpu_kernel("reference"):
            out = [
                model.model.layers[0].mlp.experts(b.hidden, b.top_k_index, w)
                for b, w in zip(routed, weights, strict=True)
            ]
        pairs = zip(out, reference, strict=True)
        errors[method] = sum(float((o - r).pow(2).sum()) for o, r in pairs)
    assert errors["gptq"] < 0.9 * errors["rtn"]


@pytest.mark.parametrize("family", FAMILIES)
def test_artifact_round_trip_and_stock_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = _model(family)
    _apply(model, INT4)
    path = save_artifact(
        model, None, tmp_path / "a", recipe_yaml="", manifest_fields={"dtype": "float32"}
    )
    ours = _logits(model)
    loaded, _ = load_artifact(path, with_tokenizer=False)
    assert isinstance(loaded.model.layers[0].mlp.experts, QuantExperts)
    assert torch.equal(_logits(loaded), ours)

    # Stock transformers + compressed-tensors reads the per-expert layout into its fused
    # experts (dequantized); equal up to float32 summation order (gate and up multiply as one
    # matrix there, as two here).
    stock = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert stock.model.layers[0].mlp.experts.gate_up_proj.ndim == 3
    stock_logits = _logits(stock)
    torch.testing.assert_close(stock_logits, ours, rtol=0, atol=1e-5 * float(ours.abs().max()))
    _corrupt_one_expert(loaded)  # the comparison would see a wrong expert
    assert (_logits(loaded) - stock_logits).abs().max() > 1e-2


def test_asymmetric_experts_round_trip_and_stock_transformers_refuses(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = _model("qwen2_moe")
    _apply(model, QuantizeConfig(bits=4, group_size=32, symmetric=False))
    path = save_artifact(
        model, None, tmp_path / "a", recipe_yaml="", manifest_fields={"dtype": "float32"}
    )
    loaded, _ = load_artifact(path, with_tokenizer=False)
    assert torch.equal(_logits(loaded), _logits(model))
    # Upstream (transformers 5 + compressed-tensors 0.20): asymmetric pack-quantized does not
    # load (experts: "Asymmetric quant requires zero-point values"), as for Linear layers
    # (test_interop_compressed_tensors.py): a refusal, not a silently wrong model.
    with pytest.raises(RuntimeError):
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_experts_left_out_by_include_are_refused_by_name():
    model = _model("qwen2_moe")
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    config = QuantizeConfig(bits=4, group_size=32, include=["*_proj"])
    with pytest.raises(PreflightError) as refused:
        handler_for(config).preflight(model, config)
    message = str(refused.value)
    assert "model.layers.0.mlp.experts (gate_up_proj, down_proj)" in message
    assert "model.layers.1.mlp.experts" in message
    assert "exclude" in message
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, before)

    # Excluding them says so: the stage runs, leaves them in float, and reports the share.
    matrices = _decoder_matrices(model)
    excluded = QuantizeConfig(bits=4, group_size=32, include=["*_proj"], exclude=["*.experts"])
    result = _apply(model, excluded)
    assert model.model.layers[0].mlp.experts.gate_up_proj.ndim == 3
    quantized = sum(v for n, v in matrices.items() if n.endswith("_proj.weight"))
    share = result.details["quantized_weight_share"]
    assert share == pytest.approx(quantized / sum(matrices.values()))
    assert share < 0.5  # the experts are most of the weights


def test_an_experts_layout_the_stage_cannot_quantize_is_refused():
    model = _model("mixtral")
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(PreflightError, match=r"model\.layers\.1\.mlp\.experts .*is_transposed"):
        handler_for(INT4).preflight(model, INT4)
    handler_for(INT4).preflight(
        model, QuantizeConfig(bits=4, group_size=32, exclude=["model.layers.1.mlp.experts"])
    )


def test_group_size_is_checked_against_the_experts_inputs():
    model = _model("qwen2_moe")  # experts' down_proj reads 32 features, every Linear 64
    config = QuantizeConfig(bits=4, group_size=64)
    with pytest.raises(
        PreflightError, match=r"in_features=32: model\.layers\.0\.mlp\.experts\.down_proj"
    ):
        handler_for(config).preflight(model, config)
