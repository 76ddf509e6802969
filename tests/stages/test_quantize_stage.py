"""The quantize stage on a tiny random Llama: selection, preflight errors, what it stores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress.stages  # noqa: F401
from compress.errors import PreflightError
from compress.models import load_model, resolve_source
from compress.quant.config import QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.recipe import ModelConfig
from compress.registry import StageContext, handler_for
from tests.conftest import save_tiny_llama


@pytest.fixture
def tiny_model(tiny_llama_dir):
    model, _ = load_model(resolve_source(ModelConfig(source=str(tiny_llama_dir))), "bfloat16")
    return model


def _apply(model: nn.Module, config: QuantizeConfig):
    handler = handler_for(config)
    handler.preflight(model, config)
    return handler.apply(model, config, StageContext(dtype="bfloat16"))


@pytest.mark.parametrize(
    "config",
    [
        QuantizeConfig(bits=8, group_size=-1, symmetric=True),
        QuantizeConfig(bits=4, group_size=64, symmetric=False),
        QuantizeConfig(bits=4, group_size=32, symmetric=True),
    ],
    ids=lambda c: c.scheme,
)
def test_default_selection_quantizes_every_decoder_linear(tiny_model, config):
    decoder_linears = [
        n for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n
    ]
    ids = torch.tensor([[1, 17, 230, 5, 99, 4]])
    with torch.no_grad():
        before = tiny_model(ids).logits.float()
    result = _apply(tiny_model, config)
    quantized = [n for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(quantized) == sorted(decoder_linears)
    assert len(quantized) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    assert isinstance(tiny_model.lm_head, nn.Linear)  # kept in the source dtype
    assert result.details["layers"] == 14
    assert result.details["bytes_after"] < result.details["bytes_before"]
    with torch.no_grad():
        after = tiny_model(ids).logits.float()
    assert torch.isfinite(after).all()
    # Quantization perturbs the output but must not destroy it (random weights, small model).
    relative = (after - before).norm() / before.norm()
    assert 0 < relative < (0.05 if config.bits == 8 else 0.5)


def test_include_exclude_patterns(tiny_model):
    config = QuantizeConfig(bits=8, include=["model.layers.*.mlp.*"], exclude=["*.down_proj"])
    _apply(tiny_model, config)
    quantized = sorted(n for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear))
    assert quantized == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_include_can_select_lm_head_explicitly(tiny_model):
    _apply(tiny_model, QuantizeConfig(bits=8, include=["lm_head"]))
    assert isinstance(tiny_model.lm_head, QuantLinear)


def test_pattern_matching_nothing_is_refused(tiny_model):
    with pytest.raises(PreflightError, match=r"match no Linear layer: \['model.decoder.\*'\]"):
        handler_for(QuantizeConfig(bits=8)).preflight(
            tiny_model, QuantizeConfig(bits=8, include=["model.decoder.*"])
        )


def test_quantizing_twice_is_refused(tiny_model):
    _apply(tiny_model, QuantizeConfig(bits=8))
    with pytest.raises(PreflightError, match="already quantized"):
        _apply(tiny_model, QuantizeConfig(bits=4, group_size=32, include=["model.layers.0.*"]))


def test_group_size_not_dividing_names_layers_and_workable_sizes(tmp_path, demo_tokenizer):
    directory = save_tiny_llama(tmp_path / "odd", demo_tokenizer, intermediate_size=96)
    model, _ = load_model(resolve_source(ModelConfig(source=str(directory))), "bfloat16")
    config = QuantizeConfig(bits=4, group_size=64)
    with pytest.raises(PreflightError) as excinfo:
        handler_for(config).preflight(model, config)
    message = str(excinfo.value)
    assert "group_size 64 does not divide in_features" in message
    assert "in_features=96: model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj" in message
    assert "[16, 32, -1]" in message  # the sizes dividing both 64 and 96 (and per channel)
    # Nothing was modified by the failed preflight.
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
