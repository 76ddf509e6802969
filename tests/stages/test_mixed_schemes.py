"""Mixed precision in one quantize stage (`overrides`, what `compress search` writes): each layer
takes its override's scheme, preflight names the override at fault, and the artifact holds one
compressed-tensors group per scheme that our loader, stock transformers and the ONNX export read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import compress
from compress.artifact import describe_artifact
from compress.errors import PreflightError
from compress.kernels import cpu_kernel
from compress.quant.config import GPTQOptions, LayerScheme, QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec
from compress.registry import handler_for
from tests.stages.test_artifact import IDS, _quantized_tiny, _save
from tests.stages.test_interop_compressed_tensors import _calibrated_context

transformers = pytest.importorskip("transformers")


def _mixed(method: str = "rtn", symmetric_only: bool = False) -> QuantizeConfig:
    """INT4 g32 by default; layer 0's attention INT8 per channel, every down_proj INT4 g64,
    layer 1's o_proj kept 16-bit."""
    return QuantizeConfig(
        method=method,
        bits=4,
        group_size=32,
        symmetric=symmetric_only,
        exclude=["model.layers.1.self_attn.o_proj"],
        overrides=[
            LayerScheme(match=["model.layers.0.self_attn.*"], bits=8),
            LayerScheme(match=["*.down_proj"], bits=4, group_size=64, symmetric=symmetric_only),
        ],
        gptq=GPTQOptions(act_order=True) if method == "gptq" else None,
    )


def _specs(model: nn.Module) -> dict[str, QuantSpec]:
    return {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_layer_takes_its_overrides_scheme(tiny_llama_dir, method):
    config = _mixed(method)
    model, _ = _quantized_tiny(tiny_llama_dir, config, context=_calibrated_context())
    specs = _specs(model)
    int8 = QuantSpec(8, -1, True)
    assert {specs[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo"} == {int8}
    assert specs["model.layers.0.mlp.down_proj"] == QuantSpec(4, 64, False)
    assert specs["model.layers.1.mlp.down_proj"] == QuantSpec(4, 64, False)
    assert specs["model.layers.1.self_attn.q_proj"] == QuantSpec(4, 32, False)
    assert specs["model.layers.0.mlp.up_proj"] == QuantSpec(4, 32, False)
    assert "model.layers.1.self_attn.o_proj" not in specs  # excluded: kept 16-bit
    assert isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), nn.Linear)


def test_the_stage_reports_each_scheme(tiny_llama_dir):
    config = _mixed()
    model, _ = _quantized_tiny(tiny_llama_dir)
    handler = handler_for(config)
    handler.preflight(model, config)
    result = handler.apply(model, config, _calibrated_context())
    assert result.details["scheme"] == "mixed"
    # 13 layers in all: 4 in INT8, 2 down_proj in g64, 7 in the stage's g32.
    assert result.details["schemes"] == {
        "int4-g32-asym": 7,
        "int8-channel-sym": 4,
        "int4-g64-asym": 2,
    }
    assert "mixed (7 × int4-g32-asym" in result.summary


def test_the_artifact_holds_one_group_per_scheme_and_reloads_exactly(tiny_llama_dir, tmp_path):
    model, tokenizer = _quantized_tiny(tiny_llama_dir, _mixed())
    path = _save(model, tokenizer, tmp_path / "mixed")
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    by_scheme = {
        (g["weights"]["num_bits"], g["weights"]["group_size"]): len(g["targets"])
        for g in qconfig["config_groups"].values()
    }
    assert by_scheme == {(4, 32): 7, (8, None): 4, (4, 64): 2}
    assert "model.layers.1.self_attn.o_proj" in qconfig["ignore"]
    allocation = describe_artifact(path)["allocation"]  # what `compress inspect` prints
    assert allocation["model.layers.0.self_attn.q_proj"] == "int8-channel-sym"
    assert allocation["model.layers.1.mlp.down_proj"] == "int4-g64-asym"
    assert allocation["model.layers.1.mlp.up_proj"] == "int4-g32-asym"
    assert len(allocation) == 13
    loaded, _ = compress.load(path)
    assert _specs(loaded) == _specs(model)
    with torch.no_grad(), cpu_kernel("reference"):
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_a_symmetric_mix_loads_in_stock_transformers(tiny_llama_dir, tmp_path):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")
    model, tokenizer = _quantized_tiny(
        tiny_llama_dir, _mixed("gptq", symmetric_only=True), context=_calibrated_context()
    )
    path = _save(model, tokenizer, tmp_path / "mixed-sym")
    stock = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad(), cpu_kernel("reference"):
        ours = compress.load(path)[0](IDS).logits
        assert torch.equal(stock(IDS).logits, ours)


def test_the_onnx_export_writes_each_layers_bits_and_block(tiny_llama_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    from compress.onnx.export import export_onnx
    from compress.onnx.runtime import OnnxCausalLM

    model, tokenizer = _quantized_tiny(tiny_llama_dir, _mixed())
    path = _save(model, tokenizer, tmp_path / "mixed")
    out = export_onnx(path, tmp_path / "onnx", accuracy_level=0)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    schemes = {
        tuple(a.i for a in node.attribute if a.name in ("bits", "block_size"))
        for node in graph.node
        if node.op_type == "MatMulNBits"
    }
    # INT8 per channel is written as blocks of 64 (the whole 64-wide row).
    assert schemes == {(4, 32), (4, 64), (8, 64)}
    lm = OnnxCausalLM(out)
    got = lm.forward(IDS.numpy(), lm.empty_cache(1))[0]
    loaded, _ = compress.load(path)
    with torch.no_grad(), cpu_kernel("reference"):
        expected = loaded.float()(IDS).logits.numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ([LayerScheme(match=["*.nothing"], bits=8)], "overrides.0.match", "match no layer"),
        (
            [
                LayerScheme(match=["*.q_proj"], bits=8),
                LayerScheme(match=["model.layers.0.*"], bits=8, symmetric=False),
            ],
            "overrides.1.match",
            "matched by overrides 0 and 1",
        ),
        (
            [LayerScheme(match=["*.down_proj"], bits=4, group_size=96)],
            "overrides.0.group_size",
            "group_size 96 does not divide",
        ),
    ],
    ids=["unmatched", "twice", "group"],
)
def test_preflight_names_the_override_at_fault(tiny_llama_dir, overrides, field, message):
    config = QuantizeConfig(bits=4, group_size=32, overrides=overrides)
    model, _ = _quantized_tiny(tiny_llama_dir)
    with pytest.raises(PreflightError, match=message) as caught:
        handler_for(config).preflight(model, config)
    assert caught.value.field == field
