"""The ONNX export of every family in tests/families.py, run with ONNX Runtime on the CPU: logits
against the PyTorch model itself (stock transformers modules, float32), cached decoding against a
full forward over sequences longer than the sliding window, and the families that are refused
from their config.json before any weight loads.

The tiny models are sharpened before export (norm weights random around their identity, q/k
projections scaled up) so each convention changes the logits well beyond the tolerance: with
the initial norm weights of ones (zeros for Gemma's 1 + w) and near-uniform attention, a wrong
norm offset, window, or soft-cap could hide under it. `test_each_convention_is_visible` shows
that switching one off moves the logits by far more than the tolerance.

Tolerances (relative: max |Δlogit| / max |logit|; KL of the next-token distributions). Both
sides compute in float32 from the very same weights (MatMulNBits at accuracy_level 0 dequantizes
exactly in float32), so only the summation order differs: 1.7e-6 relative (3e-6 absolute, logits
of scale ~2) measured at most over the families, float and INT4, prefill and cached decode;
asserted 1e-5. KL is second order in the difference (6e-13 measured at most); asserted 1e-9.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from compress.errors import ArtifactError
from compress.kernels import cpu_kernel
from compress.quant.config import QuantizeConfig
from compress.registry import StageContext, handler_for
from tests.families import FAMILIES, family_config, sharpened, tiny_family_model

pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")

from compress.onnx.export import export_onnx, write_onnx_model
from compress.onnx.graph import ExportOptions, check_exportable_config
from compress.onnx.layers import check_ort_window_semantics
from compress.onnx.runtime import OnnxCausalLM

VOCAB = 256
CONTEXT = 64
TOKENS = 40  # longer than the tiny families' sliding window (24)
PREFILL = 10  # then one token at a time with the cache
REL_TOLERANCE = 1e-5
KL_TOLERANCE = 1e-9
# Families whose MoE layers the graph does not express: refused from config.json.
REFUSED = {"qwen2_moe": "mixture-of-experts", "mixtral": "mixture-of-experts"}
EXPORTED = [family for family in FAMILIES if family not in REFUSED]
# RTN INT4 g32 everywhere, the head too (a tied table is then read by GatherBlockQuantized).
INT4 = [
    QuantizeConfig(bits=4, group_size=32, symmetric=False),
    QuantizeConfig(bits=4, group_size=32, symmetric=True, include=["lm_head"]),
]
# Gemma 2's attention cap (50, as in the real checkpoints) barely bends the tiny model's attention
# logits: a cap of 5 does, so a missing one would show.
OVERRIDES = {"gemma2": {"attn_logit_softcapping": 5.0}}
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(1, TOKENS))


def family_model(family: str, **overrides) -> torch.nn.Module:
    overrides = {**OVERRIDES.get(family, {}), **overrides}
    return sharpened(tiny_family_model(family, VOCAB, **overrides))


def quantized(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for config in INT4:
        handler_for(config).apply(model, config, StageContext(dtype="float32"))
    return model


def torch_logits(model: torch.nn.Module, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad(), cpu_kernel("reference"):
        return model(torch.from_numpy(ids)).logits.float().numpy()


def rel_diff(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def max_kl(expected: np.ndarray, got: np.ndarray) -> float:
    """max over positions of KL(expected ‖ got) of the softmax distributions, in float64."""
    p = torch.log_softmax(torch.from_numpy(expected).double(), -1)
    q = torch.log_softmax(torch.from_numpy(got).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).max())


def cached_decode(lm: OnnxCausalLM, ids: np.ndarray) -> np.ndarray:
    """Logits of a PREFILL-token prompt, then of every further token fed alone with the cache."""
    logits, cache = lm.forward(ids[:, :PREFILL], lm.empty_cache(1))
    steps = [logits]
    for position in range(PREFILL, ids.shape[1]):
        logits, cache = lm.forward(ids[:, position : position + 1], cache)
        steps.append(logits)
    assert cache[0].shape == (1, lm.kv_heads, ids.shape[1], lm.head_dim)
    return np.concatenate(steps, axis=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, variant) → (model, export directory), built on first use."""
    root = tmp_path_factory.mktemp("onnx-families")
    cache: dict[tuple[str, str], tuple[torch.nn.Module, object]] = {}

    def get(family: str, variant: str):
        if (family, variant) not in cache:
            model = family_model(family)
            if variant == "int4":
                model = quantized(model)
            directory = root / f"{family}-{variant}"
            directory.mkdir()
            options = ExportOptions(
                context_length=CONTEXT, accuracy_level=0, quantized_only=variant == "int4"
            )
            write_onnx_model(model, directory, options)
            cache[family, variant] = model, directory
        return cache[family, variant]

    return get


@pytest.mark.parametrize("variant", ["float", "int4"])
@pytest.mark.parametrize("family", EXPORTED)
def test_logits_match_the_model(exported, family, variant):
    model, directory = exported(family, variant)
    lm = OnnxCausalLM(directory)
    got, _ = lm.forward(IDS, lm.empty_cache(1))
    expected = torch_logits(model)
    assert rel_diff(got, expected) <= REL_TOLERANCE
    assert max_kl(expected, got) <= KL_TOLERANCE


@pytest.mark.parametrize("variant", ["float", "int4"])
@pytest.mark.parametrize("family", EXPORTED)
def test_cached_decoding_equals_a_full_forward(exported, family, variant):
    model, directory = exported(family, variant)
    steps = cached_decode(OnnxCausalLM(directory), IDS)
    expected = torch_logits(model)
    assert rel_diff(steps, expected) <= REL_TOLERANCE
    assert max_kl(expected, steps) <= KL_TOLERANCE


def _attention_nodes(directory) -> list:
    import onnx

    graph = onnx.load(str(directory / "model.onnx")).graph
    return [n for n in graph.node if n.op_type == "GroupQueryAttention"]


def _attribute(node, name: str):
    from onnx import helper

    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize(
    ("family", "windows", "rotary"),
    [
        ("llama", [-1, -1], [1, 1]),
        ("mistral", [24, 24], [1, 1]),  # every layer
        ("gemma2", [24, -1], [1, 1]),  # layer_types: sliding, full
        ("gemma3_text", [24, -1], [1, 1]),
        ("smollm3", [-1, -1], [1, 0]),  # no_rope_layers: the 2nd layer has no RoPE
        ("phi3", [-1, -1], [0, 0]),  # rotary 12 of 16: RotaryEmbedding before attention
    ],
)
def test_the_graph_follows_each_layers_attention(exported, family, windows, rotary):
    nodes = _attention_nodes(exported(family, "float")[1])
    assert [_attribute(n, "local_window_size") for n in nodes] == windows
    assert [_attribute(n, "do_rotary") for n in nodes] == rotary


def test_gemma3_layers_read_their_own_rotary_table(exported):
    # Local (sliding) layers rotate with base 10k, global layers with 1M: two tables.
    nodes = _attention_nodes(exported("gemma3_text", "float")[1])
    assert [n.input[7] for n in nodes] == [
        "cos_cache.sliding_attention",
        "cos_cache.full_attention",
    ]


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_a_saved_artifact_exports_as_compress_load_runs_it(family, tmp_path):
    # The CLI's path: artifact on disk → config check → load → export; parity with its load.
    from compress.artifact import load_artifact, save_artifact

    model = quantized(family_model(family))
    artifact = save_artifact(
        model, None, tmp_path / "artifact", recipe_yaml="version: 1\n", manifest_fields={}
    )
    out = export_onnx(artifact, tmp_path / "onnx", accuracy_level=0, context_length=CONTEXT)
    loaded, _ = load_artifact(artifact, with_tokenizer=False)
    expected = torch_logits(loaded.float())
    assert rel_diff(cached_decode(OnnxCausalLM(out), IDS), expected) <= REL_TOLERANCE


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen3", "llama"])
def test_a_tied_quantized_table_is_stored_once(exported, family):
    # The embeddings read the quantized head's blocks (GatherBlockQuantized), then Gemma's scale.
    import onnx

    graph = onnx.load(str(exported(family, "int4")[1] / "model.onnx")).graph
    kinds = {n.op_type for n in graph.node}
    assert "GatherBlockQuantized" in kinds and "Gather" not in kinds


@pytest.mark.parametrize("family", EXPORTED)
def test_onnxruntime_genai_runs_every_family(exported, family):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    directory = exported(family, "float")[1]
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(IDS[:, :PREFILL].astype(np.int32))
    lm = OnnxCausalLM(directory)
    expected = lm.forward(IDS[:, :PREFILL], lm.empty_cache(1))[0]
    np.testing.assert_array_equal(generator.get_output("logits"), expected)


def test_windows_need_an_onnx_runtime_that_counts_the_current_token():
    check_ort_window_semantics("1.23.0")
    check_ort_window_semantics("1.32.0+cpu")
    with pytest.raises(ArtifactError, match=r"onnxruntime ≥ 1.23 .* installed: 1.22.1"):
        check_ort_window_semantics("1.22.1")


@pytest.mark.parametrize(
    ("family", "convention_off"),
    [
        # (None would fall back to the config class's default: "off" is a value out of reach)
        ("mistral", {"sliding_window": 4096}),
        ("gemma2", {"sliding_window": 4096}),
        ("gemma2", {"attn_logit_softcapping": 1e9}),
        ("gemma2", {"final_logit_softcapping": 1e9}),
        ("gemma3_text", {"query_pre_attn_scalar": 64}),
        ("gemma3_text", {"rope_local_base_freq": 1e6}),  # one table for both layer types
        ("smollm3", {"no_rope_layers": [1, 1]}),
        ("phi3", {"partial_rotary_factor": 1.0}),
        ("granite", {"residual_multiplier": 1.0}),
    ],
)
def test_each_convention_is_visible(exported, family, convention_off):
    # The same weights with one convention switched off give logits far outside the tolerance:
    # an export that missed it would fail the parity tests above.
    directory = exported(family, "float")[1]
    lm = OnnxCausalLM(directory)
    got, _ = lm.forward(IDS, lm.empty_cache(1))
    other = family_model(family, **convention_off)
    assert rel_diff(got, torch_logits(other)) > 100 * REL_TOLERANCE


@pytest.mark.parametrize(("family", "what"), REFUSED.items())
def test_moe_families_are_refused_from_their_config(family, what):
    with pytest.raises(ArtifactError, match=rf"architecture '{family}': {what}"):
        check_exportable_config(family_config(family, VOCAB))


@pytest.mark.parametrize(
    ("model_type", "fields", "message"),
    [
        ("cohere", {}, r"architecture 'cohere' is not supported .* supported: \['llama'"),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ("gemma2", {"hidden_activation": "relu"}, "hidden activation 'relu'"),
    ],
)
def test_what_the_graph_cannot_express_is_refused_from_the_config(model_type, fields, message):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **fields)
    with pytest.raises(ArtifactError, match=message):
        check_exportable_config(config)


def test_a_moe_artifact_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    # A sealed artifact whose weights are not even a safetensors file: the refusal names the
    # experts, from config.json, and the loader is never called.
    from compress.artifact import seal_manifest
    from compress.onnx import export

    artifact = tmp_path / "moe"
    artifact.mkdir()
    config = family_config("qwen2_moe", VOCAB).to_dict()
    config["quantization_config"] = {"format": "pack-quantized"}
    (artifact / "config.json").write_text(json.dumps(config))
    (artifact / "model.safetensors").write_bytes(b"not weights")
    seal_manifest(artifact, {"dtype": "bfloat16"})

    def never(*args, **kwargs):
        raise AssertionError("the artifact's weights were loaded")

    monkeypatch.setattr(export, "load_artifact", never)
    with pytest.raises(ArtifactError, match=r"'qwen2_moe': mixture-of-experts .*num_experts=4"):
        export_onnx(artifact, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
