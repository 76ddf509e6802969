"""GPTQ through the quantize stage: sequential calibration on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import PreflightError
from compress.kernels import cpu_kernel
from compress.models import load_model, replace_module, resolve_source
from compress.quant.config import QuantizeConfig
from compress.quant.gptq import accumulate_hessian, gptq_quantize
from compress.quant.linear import QuantLinear
from compress.quant.plan import spec_of
from compress.quant.sequential import capture_first_layer_inputs, data_flow_steps
from compress.recipe import ModelConfig
from compress.registry import StageContext, handler_for

GPTQ_INT4 = QuantizeConfig(bits=4, group_size=32, symmetric=False, method="gptq")


@pytest.fixture
def tiny(tiny_llama_dir):
    model, _ = load_model(resolve_source(ModelConfig(source=str(tiny_llama_dir))), "float32")
    return model


@pytest.fixture
def windows(tiny):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny.config.vocab_size, (8, 32), generator=generator)


def _context(windows: torch.Tensor) -> StageContext:
    return StageContext(
        dtype="float32", calibration_windows=lambda: windows, calibration_batch_size=4
    )


def _output_error(model: nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - reference).pow(2).mean())


def test_data_flow_steps_follow_the_llama_block(tiny, windows):
    layer = tiny.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    inputs = capture_first_layer_inputs(tiny, windows, batch_size=4)
    assert len(inputs.hidden) == 2 and inputs.hidden[0].shape == (4, 32, 64)
    steps = data_flow_steps(layer, linears, inputs)
    assert steps == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_first_layer_equals_non_sequential_reference(tiny_llama_dir, windows):
    """Layer 0's q_proj sees unquantized inputs, so sequential GPTQ must equal GPTQ run on a
    Hessian collected by a plain forward pass with a hook."""
    reference_model, _ = load_model(
        resolve_source(ModelConfig(source=str(tiny_llama_dir))), "float32"
    )
    q_proj = reference_model.model.layers[0].self_attn.q_proj
    collected: dict[str, object] = {"h": None, "n": 0}

    def hook(_m, args):
        collected["h"], collected["n"] = accumulate_hessian(collected["h"], args[0], collected["n"])

    handle = q_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for batch in windows.split(4):
            reference_model(input_ids=batch, use_cache=False)
    handle.remove()
    expected = gptq_quantize(
        q_proj.weight.detach(), collected["h"], spec_of(GPTQ_INT4), torch.float32
    )

    handler_for(GPTQ_INT4).apply(reference_model, GPTQ_INT4, _context(windows))
    actual = reference_model.model.layers[0].self_attn.q_proj
    assert isinstance(actual, QuantLinear)
    assert torch.equal(actual.weight_packed, expected.packed.weight_packed)
    assert torch.equal(actual.weight_scale, expected.packed.weight_scale)


LLAMA_STEPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def test_whole_model_equals_a_plain_reference(tiny_llama_dir, windows):
    """Everything the sequential pass does for speed (one captured input per layer, forwards
    stopped after the step, one Hessian shared per step, dense stand-ins for quantized layers)
    changes nothing: a plain loop that runs the whole model for every step, with one Hessian
    hook per Linear and QuantLinears in place, gives bit-identical packed weights."""
    source = resolve_source(ModelConfig(source=str(tiny_llama_dir)))
    reference, _ = load_model(source, "float32")
    spec = spec_of(GPTQ_INT4)
    for layer in reference.model.layers:
        for step in LLAMA_STEPS:
            collected = {name: (None, 0) for name in step}
            handles = []
            for name in step:

                def hook(_m, args, name=name, collected=collected):
                    hessian, rows = collected[name]
                    collected[name] = accumulate_hessian(hessian, args[0], rows)

                handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
            # The reference kernel: QuantLinears compute exactly dequantize → linear, as the
            # sequential pass's dense stand-ins do (the packed CPU path rounds differently).
            with torch.no_grad(), cpu_kernel("reference"):
                for batch in windows.split(4):
                    reference(input_ids=batch, use_cache=False)
            for handle in handles:
                handle.remove()
            for name in step:
                linear = layer.get_submodule(name)
                result = gptq_quantize(
                    linear.weight.detach(), collected[name][0], spec, torch.float32
                )
                replace_module(
                    layer, name, QuantLinear.from_packed(result.packed, spec, None, torch.float32)
                )

    model, _ = load_model(source, "float32")
    handler_for(GPTQ_INT4).apply(model, GPTQ_INT4, _context(windows))
    expected = {k: v for k, v in reference.state_dict().items() if "weight_" in k}
    actual = {k: v for k, v in model.state_dict().items() if "weight_" in k}
    assert expected.keys() == actual.keys() and len(expected) == 14 * 4
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def test_gptq_beats_rtn_on_the_calibration_distribution(tiny_llama_dir, windows):
    source = resolve_source(ModelConfig(source=str(tiny_llama_dir)))
    baseline, _ = load_model(source, "float32")
    with torch.no_grad():
        reference = baseline(windows).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model, _ = load_model(source, "float32")
        config = GPTQ_INT4.model_copy(update={"method": method})
        handler = handler_for(config)
        handler.preflight(model, config)
        result = handler.apply(model, config, _context(windows))
        assert result.details["layers"] == 14
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        errors[method] = _output_error(model, reference, windows)
    assert errors["gptq"] < errors["rtn"]
    assert result.details["calibration_tokens"] == windows.numel()


def test_gptq_refuses_layers_outside_the_decoder(tiny):
    config = QuantizeConfig(bits=8, method="gptq", include=["lm_head"])
    with pytest.raises(PreflightError, match=r"\['lm_head'\] are outside"):
        handler_for(config).preflight(tiny, config)


def test_gptq_needs_calibration(tiny):
    with pytest.raises(PreflightError, match="calibration"):
        handler_for(GPTQ_INT4).apply(tiny, GPTQ_INT4, StageContext(dtype="float32"))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: calibration layer by layer on the GPU, model in CPU memory",
)
def test_calibration_on_gpu_moves_one_layer_at_a_time(tiny_llama_dir, windows):
    source = resolve_source(ModelConfig(source=str(tiny_llama_dir)))
    on_cpu, _ = load_model(source, "float32")
    handler_for(GPTQ_INT4).apply(on_cpu, GPTQ_INT4, _context(windows))
    on_gpu, _ = load_model(source, "float32")
    context = StageContext(
        dtype="float32",
        calibration_windows=lambda: windows,
        calibration_batch_size=4,
        calibration_device=torch.device("cuda"),
    )
    result = handler_for(GPTQ_INT4).apply(on_gpu, GPTQ_INT4, context)
    assert result.details["calibration_device"] == "cuda"
    tensors = list(on_gpu.parameters()) + list(on_gpu.buffers())
    assert all(t.device.type == "cpu" for t in tensors)  # every layer went back
    # GPU and CPU matmuls round differently, so a few codes may flip; the model must not.
    with torch.no_grad():
        cpu_logits, gpu_logits = on_cpu(windows).logits, on_gpu(windows).logits
    assert torch.allclose(cpu_logits, gpu_logits, atol=1e-2, rtol=0)
