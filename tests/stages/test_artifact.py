"""Artifacts: save → load gives identical logits; verify catches changes; layout on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import compress
import compress.stages
from compress.artifact import describe_artifact, save_artifact, verify_artifact
from compress.errors import ArtifactError
from compress.models import load_model, resolve_source
from compress.quant.config import QuantizeConfig
from compress.recipe import ModelConfig
from compress.registry import StageContext, handler_for

IDS = torch.tensor([[1, 17, 230, 5, 99, 4, 1000, 7]])


def _quantized_tiny(tiny_llama_dir, *configs: QuantizeConfig, context: StageContext | None = None):
    model, tokenizer = load_model(
        resolve_source(ModelConfig(source=str(tiny_llama_dir))), "bfloat16"
    )
    for config in configs:
        handler_for(config).apply(model, config, context or StageContext(dtype="bfloat16"))
    return model, tokenizer


def _save(model, tokenizer, path):
    return save_artifact(
        model, tokenizer, path, recipe_yaml="version: 1\n", manifest_fields={"dtype": "bfloat16"}
    )


@pytest.fixture
def artifact(tmp_path, tiny_llama_dir):
    # Two schemes in one model: INT8 attention, INT4 g32 asymmetric MLP.
    model, tokenizer = _quantized_tiny(
        tiny_llama_dir,
        QuantizeConfig(bits=8, include=["*.self_attn.*"]),
        QuantizeConfig(bits=4, group_size=32, symmetric=False, include=["*.mlp.*"]),
    )
    path = _save(model, tokenizer, tmp_path / "artifact")
    return model, path


def test_load_gives_identical_logits(artifact):
    model, path = artifact
    loaded, tokenizer = compress.load(path)
    with torch.no_grad():
        expected = model(IDS).logits
        actual = loaded(IDS).logits
    assert torch.equal(expected, actual)
    assert tokenizer.decode([17]) != ""
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_files_and_tensor_layout(artifact):
    _, path = artifact
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "manifest.json", "recipe.lock.yaml"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".tmp"))]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.up_proj.weight_scale")
        zero = f.get_tensor("model.layers.0.mlp.up_proj.weight_zero_point")
        int8 = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
    assert "lm_head.weight" not in keys  # tied to the embeddings, stored once
    assert "model.layers.0.mlp.up_proj.weight" not in keys
    assert packed.dtype == torch.int32 and packed.shape == (128, 64 * 4 // 32)
    assert scale.dtype == torch.bfloat16 and scale.shape == (128, 2)
    assert zero.dtype == torch.int32 and zero.shape == (128 * 4 // 32, 2)
    assert int8.shape == (64, 64 * 8 // 32)
    config = json.loads((path / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["format"] == "pack-quantized"
    weights = sorted(
        (g["weights"]["num_bits"], g["weights"]["strategy"], len(g["targets"]))
        for g in qconfig["config_groups"].values()
    )
    assert weights == [(4, "group", 6), (8, "channel", 8)]
    assert "lm_head" in qconfig["ignore"]


def test_describe(artifact):
    _, path = artifact
    info = describe_artifact(path)
    assert info["dtype"] == "bfloat16"
    assert sum(g["layers"] for g in info["quantization"].values()) == 14
    assert info["total_bytes"] == sum(f["bytes"] for f in info["files"].values())


def test_verify_passes_then_fails_on_any_change(artifact):
    _, path = artifact
    verify_artifact(path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: sha256 differs"):
        verify_artifact(path)
    with pytest.raises(ArtifactError, match="sha256 differs"):
        compress.load(path)


def test_verify_reports_missing_and_unlisted_files(artifact):
    _, path = artifact
    (path / "config.json").unlink()
    (path / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError) as excinfo:
        verify_artifact(path)
    assert "missing file config.json" in str(excinfo.value)
    assert "unlisted file extra.bin" in str(excinfo.value)


def test_truncated_weights_give_clear_error_when_not_verifying(artifact):
    _, path = artifact
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="cannot read safetensors"):
        compress.load(path, verify=False)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        compress.load(tmp_path / "nope")
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        compress.load(tmp_path)


def test_failed_save_leaves_previous_artifact_intact(tmp_path, tiny_llama_dir):
    model, tokenizer = _quantized_tiny(tiny_llama_dir, QuantizeConfig(bits=8))
    path = _save(model, tokenizer, tmp_path / "artifact")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    class Exploding:
        def save_pretrained(self, _directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save(model, Exploding(), path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no staging leftovers


def test_cli_inspect_and_verify_exit_codes(artifact, capsys):
    from compress.cli import main
    from compress.errors import EXIT_BAD_INPUT, EXIT_OK

    _, path = artifact
    assert main(["inspect", str(path)]) == EXIT_OK
    described = json.loads(capsys.readouterr().out)
    assert described["dtype"] == "bfloat16" and len(described["quantization"]) == 2
    assert main(["verify", str(path)]) == EXIT_OK
    (path / "recipe.lock.yaml").write_text("tampered\n")
    assert main(["verify", str(path)]) == EXIT_BAD_INPUT
    assert main(["inspect", str(path / "missing")]) == EXIT_BAD_INPUT
