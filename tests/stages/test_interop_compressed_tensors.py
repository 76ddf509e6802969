"""Interoperability: our artifacts in stock transformers + compressed-tensors, and in its format.

Tolerance: none. Stock transformers dequantizes each weight to the model dtype and runs the
ordinary Linear; so does our pure-PyTorch op, so the logits must be bitwise equal.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import compress
from compress.cli import main as cli_main
from compress.errors import ArtifactError, BadInputError
from compress.export import export_artifact
from compress.kernels import cpu_kernel, dequantize_packed
from compress.quant.config import GPTQOptions, QuantizeConfig
from compress.quant.packing import unpack_zero_points
from compress.registry import StageContext
from tests.stages.test_artifact import IDS, _quantized_tiny, _save

ct = pytest.importorskip(
    "compressed_tensors", reason="compressed-tensors not installed (scripts/setup.sh installs it)"
)
transformers = pytest.importorskip("transformers")

SYMMETRIC = (
    QuantizeConfig(bits=8, include=["*.self_attn.*"]),
    # act-order with static groups: the stored layout must need no permutation (no g_idx).
    QuantizeConfig(
        method="gptq", bits=4, group_size=32, include=["*.mlp.*"], gptq=GPTQOptions(act_order=True)
    ),
)
ASYMMETRIC = (
    QuantizeConfig(bits=8, symmetric=False, include=["*.self_attn.*"]),
    QuantizeConfig(bits=4, group_size=32, symmetric=False, include=["*.mlp.*"]),
)


def _calibrated_context() -> StageContext:
    torch.manual_seed(0)
    windows = torch.randint(0, 1000, (4, 32))
    return StageContext(
        dtype="bfloat16", calibration_windows=lambda: windows, calibration_batch_size=2
    )


def _stock_logits(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        return model(IDS).logits


def _our_logits(path) -> torch.Tensor:
    """Through the reference kernel, which dequantizes and multiplies as compressed-tensors
    does: these tests prove the stored format, so they compare bit for bit."""
    model, _ = compress.load(path)
    with torch.no_grad(), cpu_kernel("reference"):
        return model(IDS).logits


@pytest.fixture
def symmetric_artifact(tmp_path, tiny_llama_dir):
    model, tokenizer = _quantized_tiny(tiny_llama_dir, *SYMMETRIC, context=_calibrated_context())
    return _save(model, tokenizer, tmp_path / "symmetric")


@pytest.fixture
def asymmetric_artifact(tmp_path, tiny_llama_dir):
    model, tokenizer = _quantized_tiny(tiny_llama_dir, *ASYMMETRIC)
    return _save(model, tokenizer, tmp_path / "asymmetric")


def test_symmetric_artifact_loads_in_stock_transformers(symmetric_artifact):
    config = json.loads((symmetric_artifact / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"].values()
    assert all(g["weights"]["actorder"] is None for g in groups)  # nothing to permute
    assert not any(k.endswith("g_idx") for k in load_file(symmetric_artifact / "model.safetensors"))

    stock = _stock_logits(symmetric_artifact)
    ours = _our_logits(symmetric_artifact)
    assert torch.equal(stock, ours)
    assert stock.abs().max() > 0


def test_asymmetric_int_quantized_export_loads_in_stock_transformers(tmp_path, asymmetric_artifact):
    out = tmp_path / "exported"
    args = ["export", str(asymmetric_artifact), str(out), "--format", "int-quantized"]
    assert cli_main(args) == 0

    assert torch.equal(_stock_logits(out), _our_logits(asymmetric_artifact))
    tensors = load_file(out / "model.safetensors")
    up = "model.layers.0.mlp.up_proj"
    assert tensors[f"{up}.weight"].dtype == torch.int8
    assert tensors[f"{up}.weight"].shape == (128, 64)
    assert tensors[f"{up}.weight_zero_point"].shape == (128, 2)
    assert tensors[f"{up}.weight"].min() >= -8 and tensors[f"{up}.weight"].max() <= 7
    manifest = compress.artifact.verify_artifact(out)  # sealed with its own hashes
    assert manifest["export"]["format"] == "int-quantized"
    with pytest.raises(ArtifactError, match="int-quantized"):
        compress.load(out)  # an export is for other runtimes, and says so


def test_export_refuses_existing_destination_and_tampered_source(tmp_path, asymmetric_artifact):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="already exists"):
        export_artifact(asymmetric_artifact, out, "int-quantized")
    assert (out / "keep.txt").read_text() == "mine"

    (asymmetric_artifact / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"config\.json"):
        export_artifact(asymmetric_artifact, tmp_path / "other", "int-quantized")
    assert not (tmp_path / "other").exists()


def test_asymmetric_packing_matches_the_compressed_tensors_reference(asymmetric_artifact):
    """Our packed asymmetric layers are what compressed-tensors itself writes and reads.

    Its PackedQuantizationCompressor is the reference for the format vLLM loads: compressing
    our dequantized weight with our scale and zero point must give our exact tensors, and
    decompressing our tensors must give our exact weight.
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((asymmetric_artifact / "config.json").read_text())
    stored = load_file(asymmetric_artifact / "model.safetensors")
    model, _ = compress.load(asymmetric_artifact)
    checked = 0
    for group in config["quantization_config"]["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        bits = group["weights"]["num_bits"]
        for layer in ("model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
            if not any(layer in t.replace("\\", "") for t in group["targets"]):
                continue
            module = model.get_submodule(layer)
            weight = module.dequantized_weight()
            prefix = layer + "."
            ours = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)}
            zero = unpack_zero_points(ours["weight_zero_point"], bits, module.out_features)
            zero = (zero - (1 << (bits - 1))).to(torch.int8)  # compressed-tensors: signed

            # float32, where (q − z)·s is exact (in bf16, 8-bit codes times the scale round).
            exact = weight_of(ours, bits, module, torch.float32)
            theirs = PackedQuantizationCompressor.compress(
                {"weight": exact, "weight_scale": ours["weight_scale"], "weight_zero_point": zero},
                scheme,
            )
            for name in ("weight_packed", "weight_zero_point", "weight_shape", "weight_scale"):
                assert torch.equal(theirs[name], ours[name]), (layer, name)

            decompressed = PackedQuantizationCompressor.decompress(dict(ours), scheme)
            assert torch.equal(decompressed["weight"], weight), layer
            checked += 1
    assert checked == 2


def weight_of(tensors, bits, module, dtype) -> torch.Tensor:
    return dequantize_packed(
        tensors["weight_packed"],
        tensors["weight_scale"],
        tensors["weight_zero_point"],
        bits,
        module.spec.group_size,
        module.in_features,
        dtype,
    )


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="upstream: transformers + compressed-tensors 0.20 allocate weight_zero_point "
    "unpacked (N, G) when loading pack-quantized, so asymmetric checkpoints (ours and "
    "llm-compressor's) fail on a size mismatch; `compress export --format int-quantized` "
    "is the workaround. When this starts passing, drop the workaround note in compress/export.py",
)
def test_asymmetric_pack_quantized_in_stock_transformers(asymmetric_artifact):
    assert torch.equal(_stock_logits(asymmetric_artifact), _our_logits(asymmetric_artifact))
