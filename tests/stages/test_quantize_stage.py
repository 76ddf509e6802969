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


def test_a_quantized_tied_head_gives_the_embeddings_its_table(tiny_model, tmp_path):
    from compress.artifact import load_artifact, save_artifact

    assert tiny_model.config.tie_word_embeddings
    before = tiny_model.get_input_embeddings().weight.detach().clone()
    result = _apply(tiny_model, QuantizeConfig(bits=4, group_size=32, include=["lm_head"]))
    table = tiny_model.get_input_embeddings().weight
    assert result.details["embeddings_from_quantized_lm_head"]
    assert torch.equal(table, tiny_model.lm_head.dequantized_weight())
    assert not torch.equal(table, before)  # it really is the quantized table now
    assert not tiny_model.config.tie_word_embeddings  # the loader must not re-tie a QuantLinear
    ids = torch.tensor([[1, 5, 900, 7]])
    path = save_artifact(
        tiny_model, None, tmp_path / "a", recipe_yaml="", manifest_fields={"dtype": "bfloat16"}
    )
    loaded, _ = load_artifact(path, with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)


def test_quantizing_the_decoder_leaves_tied_embeddings_alone(tiny_model):
    before = tiny_model.get_input_embeddings().weight.detach().clone()
    result = _apply(tiny_model, QuantizeConfig(bits=4, group_size=32))
    assert not result.details["embeddings_from_quantized_lm_head"]
    assert torch.equal(tiny_model.get_input_embeddings().weight, before)
    assert tiny_model.lm_head.weight is tiny_model.get_input_embeddings().weight


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
    assert "tensor-core kernel takes every layer at [32, -1]" in message  # g16 is not whole slices
    # Nothing was modified by the failed preflight.
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def _tensor_core_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tensor-core kernel" in r.getMessage()]


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        # K = 80 is not a multiple of INT4's 32-k slice: down_proj only.
        (QuantizeConfig(bits=4, group_size=-1), {80}),
        (QuantizeConfig(bits=4, group_size=16), {64, 80}),  # a group smaller than a slice
        (QuantizeConfig(bits=8, group_size=-1), set()),  # INT8's slice is 16 k
    ],
    ids=lambda v: v.scheme if isinstance(v, QuantizeConfig) else None,
)
def test_preflight_warns_of_layers_off_the_tensor_cores(
    tmp_path, demo_tokenizer, caplog, config, warned
):
    directory = save_tiny_llama(tmp_path / "k80", demo_tokenizer, intermediate_size=80)
    model, _ = load_model(resolve_source(ModelConfig(source=str(directory))), "bfloat16")
    with caplog.at_level("WARNING", logger="compress.quant.stage"):
        handler_for(config).preflight(model, config)
    messages = _tensor_core_warnings(caplog)
    if not warned:
        assert messages == []
        return
    (message,) = messages
    for k in (64, 80):
        assert (f"in_features={k}:" in message) == (k in warned)
    if 80 in warned:
        assert "model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj" in message
    assert "multiples of 32 for CUDA's tensor-core kernel at 4 bits" in message
