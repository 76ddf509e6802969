"""`compress export --format onnx` on tiny random models, run with ONNX Runtime on the CPU:
logits against `compress.load`, cached decoding against a full recompute, external data, and
the refusals.

Tolerances (relative: max |Δlogit| / max |logit|), each a few times what was measured.
Against the artifact cast to float32: 1e-5 with `accuracy_level 0` (both sides compute in
float32 from identical weights, only the summation order differs: 2.5e-7 measured), 2e-2 with
level 4 (ONNX Runtime rounds activations to int8 per block: 6.5e-3). A head-tied table is
stored once and dequantized exactly in float32, while the bf16 artifact holds it rounded to
bf16 (2^-9 relative per value): 5e-3 at level 0 (1.6e-3). Against the bf16 artifact as the
gate evaluated it: 2e-2 (7.9e-3).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress.artifact import verify_artifact
from compress.cli import main
from compress.errors import EXIT_BAD_INPUT, EXIT_OK, ArtifactError
from compress.kernels import cpu_kernel
from compress.quant.config import QuantizeConfig
from compress.registry import StageContext, handler_for
from tests.stages.test_artifact import _quantized_tiny, _save

pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")

from compress.artifact import load_artifact
from compress.onnx.export import EXTERNAL_DATA, export_onnx, write_onnx_model
from compress.onnx.graph import ExportOptions, check_exportable
from compress.onnx.runtime import OnnxCausalLM

PROMPT = np.array([[1, 17, 230, 5, 99, 4, 1000, 7, 42, 3]])
SCHEMES = {
    # INT8 per-channel attention, INT4 g32 asymmetric MLP; embeddings and head stay float.
    "mixed": [
        QuantizeConfig(bits=8, include=["*.self_attn.*"]),
        QuantizeConfig(bits=4, group_size=32, symmetric=False, include=["*.mlp.*"]),
    ],
    # q and up INT8, the rest INT4: q/k/v and gate/up cannot share one matmul, so they stay apart.
    "split": [
        QuantizeConfig(bits=8, include=["*.q_proj", "*.up_proj"]),
        QuantizeConfig(bits=4, group_size=32, symmetric=False, exclude=["*.q_proj", "*.up_proj"]),
    ],
    # INT4 g32 everywhere, the tied head too: the embeddings use its table (GatherBlockQuantized).
    "edge": [
        QuantizeConfig(bits=4, group_size=32, symmetric=False),
        QuantizeConfig(bits=4, group_size=32, symmetric=True, include=["lm_head"]),
    ],
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("onnx-artifacts")
    return {
        name: _save(*_quantized_tiny(tiny_llama_dir, *configs), root / name)
        for name, configs in SCHEMES.items()
    }


@pytest.fixture(scope="module")
def exports(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-exports")
    out = {}
    for name, path in artifacts.items():
        for level in (0, 4):
            out[name, level] = export_onnx(path, root / f"{name}-{level}", accuracy_level=level)
    return out


def rel_diff(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def torch_logits(artifact, dtype: torch.dtype) -> np.ndarray:
    model, _ = load_artifact(artifact, with_tokenizer=False)
    with torch.no_grad(), cpu_kernel("reference"):
        logits = model.to(dtype)(torch.from_numpy(PROMPT)).logits
    return logits.float().numpy()


def onnx_logits(directory) -> np.ndarray:
    lm = OnnxCausalLM(directory)
    return lm.forward(PROMPT, lm.empty_cache(1))[0]


def test_cli_writes_a_sealed_export(artifacts, tmp_path, caplog):
    out = tmp_path / "onnx"
    argv = ["export", str(artifacts["edge"]), "--format", "onnx", "--out", str(out)]
    assert main(argv) == EXIT_OK
    manifest = verify_artifact(out)
    verify_artifact(artifacts["edge"])  # the source is read, never changed
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "config.json"} <= set(
        manifest["files"]
    )
    export = manifest["export"]
    assert export["format"] == "onnx" and export["accuracy_level"] == 4
    # 2 layers × (qkv, o, gate‖up, down) + lm_head; the embeddings read the head's blocks.
    assert export["ops"]["MatMulNBits"] == 9 and export["ops"]["GatherBlockQuantized"] == 1
    assert export["ops"]["GroupQueryAttention"] == 2 and "Gather" not in export["ops"]
    genai = json.loads((out / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == (2, 2)
    assert (decoder["num_attention_heads"], decoder["head_size"]) == (4, 16)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["model"]["context_length"] == 2048  # the tiny model's max positions
    # The table is stored once: the export is smaller than the head and embeddings in bf16.
    assert (out / "model.onnx").stat().st_size < 49152 * 64 * 2


@pytest.mark.parametrize(
    ("scheme", "nbits", "split"), [("mixed", 8, 2), ("split", 14, 0), ("edge", 9, 2)]
)
def test_layers_sharing_an_input_and_a_scheme_share_one_matmul(exports, scheme, nbits, split):
    ops = json.loads((exports[scheme, 0] / "manifest.json").read_text())["export"]["ops"]
    assert ops["MatMulNBits"] == nbits and ops.get("Split", 0) == split
    # A float head tied to the embeddings: one MatMul over the transposed table, stored once.
    assert ops.get("MatMul", 0) == ops.get("Transpose", 0) == (scheme != "edge")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("level", [0, 4])
def test_logits_match_compress_load(artifacts, exports, scheme, level):
    got = onnx_logits(exports[scheme, level])
    float32 = torch_logits(artifacts[scheme], torch.float32)
    tolerance = 1e-5 if level == 0 else 2e-2
    if scheme == "edge" and level == 0:
        tolerance = 5e-3  # the bf16-rounded copy of the table in the artifact (module doc)
    assert rel_diff(got, float32) <= tolerance
    assert rel_diff(got, torch_logits(artifacts[scheme], torch.bfloat16)) <= 2e-2


def test_the_parity_check_can_fail(artifacts, exports):
    # Another model's logits are far outside the tolerance.
    assert (
        rel_diff(onnx_logits(exports["mixed", 0]), torch_logits(artifacts["edge"], torch.float32))
        > 0.1
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_decoding_equals_a_full_recompute(exports, scheme):
    lm = OnnxCausalLM(exports[scheme, 0])
    full, _ = lm.forward(PROMPT, lm.empty_cache(1))
    logits, cache = lm.forward(PROMPT[:, :4], lm.empty_cache(1))
    steps = [logits]
    for position in range(4, PROMPT.shape[1]):
        logits, cache = lm.forward(PROMPT[:, position : position + 1], cache)
        steps.append(logits)
    assert cache[0].shape == (1, 2, PROMPT.shape[1], 16)
    assert rel_diff(np.concatenate(steps, axis=1), full) <= 1e-5


def test_greedy_decoding_matches_torch(artifacts, exports):
    model, _ = load_artifact(artifacts["mixed"], with_tokenizer=False)
    model = model.float()
    with torch.no_grad(), cpu_kernel("reference"):
        expected = model.generate(
            input_ids=torch.from_numpy(PROMPT),
            attention_mask=torch.ones_like(torch.from_numpy(PROMPT)),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )[:, PROMPT.shape[1] :]
    tokens = OnnxCausalLM(exports["mixed", 0]).greedy(PROMPT, 8)
    np.testing.assert_array_equal(tokens, expected.numpy())


def test_cuda_execution_provider_matches_the_cpu(exports):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device (CUDAExecutionProvider absent)")
    cpu = onnx_logits(exports["edge", 0])
    lm = OnnxCausalLM(exports["edge", 0], providers=["CUDAExecutionProvider"])
    assert "CUDAExecutionProvider" in lm.session.get_providers()
    assert rel_diff(lm.forward(PROMPT, lm.empty_cache(1))[0], cpu) <= 1e-4


def test_onnxruntime_genai_runs_the_export_as_written(exports):
    # genai reads genai_config.json, names the cache tensors itself and owns the decode loop:
    # its logits for the prompt and its greedy tokens must be ours.
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    directory = exports["edge", 0]
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=PROMPT.shape[1] + 6)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT.astype(np.int32))
    lm = OnnxCausalLM(directory)
    np.testing.assert_array_equal(
        generator.get_output("logits"), lm.forward(PROMPT, lm.empty_cache(1))[0]
    )
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == lm.greedy(PROMPT, 6)[0].tolist()
    from transformers import AutoTokenizer

    text = "Edge deployment, measured."
    expected = AutoTokenizer.from_pretrained(directory)(text, add_special_tokens=False).input_ids
    assert og.Tokenizer(model).encode(text).tolist() == expected


def test_external_data_gives_the_same_model(artifacts, exports, tmp_path):
    out = export_onnx(
        artifacts["mixed"], tmp_path / "external", accuracy_level=0, external_data_above=0
    )
    assert (out / EXTERNAL_DATA).stat().st_size > (out / "model.onnx").stat().st_size
    assert json.loads((out / "manifest.json").read_text())["export"]["external_data"]
    np.testing.assert_array_equal(onnx_logits(out), onnx_logits(exports["mixed", 0]))


def test_qwen2_attention_biases_are_exported(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            torch.nn.init.normal_(module.bias, std=0.5)  # initialized to zero otherwise
    quantize = QuantizeConfig(bits=4, group_size=32, symmetric=False)
    handler_for(quantize).apply(model, quantize, StageContext(dtype="float32"))
    write_onnx_model(model, tmp_path, ExportOptions(context_length=128, accuracy_level=0))
    lm = OnnxCausalLM(tmp_path)
    with torch.no_grad(), cpu_kernel("reference"):
        expected = model(torch.from_numpy(PROMPT % 512)).logits.numpy()
    assert rel_diff(lm.forward(PROMPT % 512, lm.empty_cache(1))[0], expected) <= 1e-5


def test_an_unquantized_artifact_is_refused(tiny_llama_dir, tmp_path, caplog):
    from compress.models import load_model, resolve_source
    from compress.recipe import ModelConfig

    model, tokenizer = load_model(
        resolve_source(ModelConfig(source=str(tiny_llama_dir))), "bfloat16"
    )
    artifact = _save(model, tokenizer, tmp_path / "dense")
    out = tmp_path / "onnx"
    assert main(["export", str(artifact), "--format", "onnx", "--out", str(out)]) == EXIT_BAD_INPUT
    assert "not quantized" in caplog.text
    assert not out.exists()


def test_a_group_size_matmul_nbits_cannot_express_is_refused(tiny_llama_dir, tmp_path, caplog):
    model, tokenizer = _quantized_tiny(tiny_llama_dir, QuantizeConfig(bits=4, group_size=8))
    artifact = _save(model, tokenizer, tmp_path / "g8")
    out = tmp_path / "onnx"
    assert main(["export", str(artifact), str(out), "--format", "onnx"]) == EXIT_BAD_INPUT
    assert "model.layers.0.self_attn.q_proj: group size 8 cannot be expressed" in (caplog.text)
    assert not out.exists() and not list(tmp_path.glob(".onnx.*"))  # nothing half-written


def test_an_existing_destination_is_kept(artifacts, tmp_path, caplog):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(artifacts["mixed"]), "--format", "onnx", "--out", str(out)]) == (
        EXIT_BAD_INPUT
    )
    assert "already exists" in caplog.text
    assert (out / "keep.txt").read_text() == "mine"


def test_architectures_the_graph_does_not_express_are_refused():
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(ArtifactError, match=r"architecture 'cohere' is not supported"):
        check_exportable(CohereForCausalLM(config), ExportOptions(context_length=16))


def test_a_float_decoder_is_refused_unless_asked_for(tiny_llama_dir):
    from compress.models import load_model, resolve_source
    from compress.recipe import ModelConfig

    model, _ = load_model(resolve_source(ModelConfig(source=str(tiny_llama_dir))), "float32")
    with pytest.raises(ArtifactError, match=r"model.layers.0.self_attn.q_proj"):
        check_exportable(model, ExportOptions(context_length=16))
    check_exportable(model, ExportOptions(context_length=16, quantized_only=False))
