"""benchmarks/decode.py on the tiny preset, on the CPU: the table has a row per (variant,
batch) with real speeds, the quantized model is built from our QuantLinear by the quantize
stage's code, and its outputs stay close to the dense model's. Speeds themselves are the
benchmark's business, not asserted here."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys

import pytest
import torch
from torch import nn

from compress.quant.linear import QuantLinear
from tests.conftest import REPO

DTYPE = "float16"  # the benchmark's default


@pytest.fixture(scope="module")
def decode():
    """benchmarks/decode.py as a module (scripts there are not a package)."""
    name = "benchmarks_decode"
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def _table_rows(out: str) -> list[list[str]]:
    """Cells of the markdown table's header and body rows (the separator dropped)."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 2 and set(lines[1]) <= set("|-"), out
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_main_reports_each_variant_at_each_batch(decode, capsys):
    # 16 new tokens: the 15 cached steps, not generate's per-call noise, decide the difference
    # of the two medians even on a busy machine (with 4 it came out negative there: nan).
    argv = ["--preset", "tiny", "--device", "cpu", "--new-tokens", "16", "--prompt-len", "8"]
    assert decode.main([*argv, "--batch-sizes", "1", "2", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    title = out.splitlines()[0]
    # 2 layers × (q, k, v, o, gate, up, down) went through the quantize stage.
    assert "FP16 vs INT4 g128 QuantLinear (14 layers, lm_head dense)" in title
    assert "CPU: dequant_matmul's CPU path" in title and "torch 2." in out
    header, *rows = _table_rows(out)
    assert header == [
        "model",
        "batch",
        "prefill ms",
        "decode tok/s",
        "speedup vs FP16",
        "weights MB",
        "logit cos vs FP16",
    ]  # no peak GPU memory column on the CPU
    assert [(r[0], int(r[1])) for r in rows] == [
        ("FP16", 1),
        ("FP16", 2),
        ("INT4 g128", 1),
        ("INT4 g128", 2),
    ]
    for row in rows:
        prefill_ms, tokens_per_s = float(row[2]), float(row[3])
        assert math.isfinite(prefill_ms) and prefill_ms > 0, row
        assert math.isfinite(tokens_per_s) and tokens_per_s > 0, row
    dense, int4 = rows[:2], rows[2:]
    assert [r[4] for r in dense] == ["1.00×", "1.00×"] and [r[6] for r in dense] == ["—", "—"]
    for quantized, reference in zip(int4, dense, strict=True):
        speedup = float(quantized[4].rstrip("×"))
        # The cells are rounded (tok/s to 0.1, the speedup to 0.01): compare within that.
        ratio = float(quantized[3]) / float(reference[3])
        assert speedup == pytest.approx(ratio, rel=0.01, abs=0.006)
        # Dense 4.2 MB; INT4 stores the decoder Linears at ~1/4 (the tied table stays FP16).
        assert float(quantized[5]) < 0.6 * float(reference[5])
        assert 0.93 <= float(quantized[6]) < 1  # see the logits test below for the bound


def test_quantize_linears_swaps_in_quant_linear(decode):
    model = decode.build_model("tiny", DTYPE, "cpu")
    decoder_linears = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n
    }
    dense_bytes = decode.weight_bytes(model)
    result = decode.quantize_linears(model, bits=4, group_size=128, dtype=DTYPE)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quantized) == decoder_linears and len(quantized) == 14
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if ".layers." in n)
    for layer in quantized.values():
        assert (layer.spec.bits, layer.spec.group_size, layer.spec.symmetric) == (4, 128, True)
        # The CUDA kernels take scales in the activation dtype only (else: the slow path).
        assert layer.weight_scale.dtype == torch.float16
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert result.details["layers"] == 14
    assert decode.weight_bytes(model) < dense_bytes

    with_head = decode.build_model("tiny", DTYPE, "cpu")
    decode.quantize_linears(with_head, include_lm_head=True, dtype=DTYPE)
    assert isinstance(with_head.lm_head, QuantLinear)
    assert sum(isinstance(m, QuantLinear) for m in with_head.modules()) == 15


@torch.inference_mode()
def test_int4_logits_stay_close_to_the_dense_models(decode):
    """Bound: every position's centered logit cosine ≥ 0.93. Measured on this model (seed 0):
    INT4 g128 0.96 min / 0.97 mean (relative logit error ~0.24, as expected from RTN INT4 on
    Gaussian weights: step ≈ 0.4 σ per group of 128); INT8 ≥ 0.9998. The decoder layers carry
    the signal here (zeroing their Linears drops the cosine to ~0.27), and wrong weights in a
    single one of the 14 quantized layers (its output rows shifted by one, checked below) drop
    it to ~0.86: the bound fails on a broken layer, not only on a broken model."""
    dense = decode.build_model("tiny", DTYPE, "cpu")
    prompt = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(1))
    sequence = dense.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        min_new_tokens=8,
        max_new_tokens=8,
        pad_token_id=0,
    )  # (2, 24): the dense model's greedy continuation, scored by both models
    reference = dense(sequence).logits.float()  # (2, 24, vocab)

    def cosine_after(bits: int, corrupt: bool = False) -> torch.Tensor:
        model = copy.deepcopy(dense)
        decode.quantize_linears(model, bits=bits, group_size=128, dtype=DTYPE)
        if corrupt:
            layer = model.model.layers[1].mlp.down_proj
            layer.weight_packed.copy_(layer.weight_packed.roll(1, dims=0))
        logits = model(sequence).logits.float()
        assert torch.isfinite(logits).all()
        return decode.centered_cosine(logits, reference)

    int4 = cosine_after(4)
    assert int4.min() >= 0.93 and int4.mean() < 0.999, int4  # close, but really quantized
    assert cosine_after(8).min() >= 0.999
    assert cosine_after(4, corrupt=True).min() < 0.93


def _static_decoding_matches_full_forwards(decode, model, device: str) -> None:
    """StaticDecoder's logits after each step are a plain forward's over the sequence so far,
    its token is their argmax, its position advances, and rewind() returns to the start."""
    prompt = torch.randint(0, 2048, (2, 8), generator=torch.Generator().manual_seed(2))
    prompt = prompt.to(device)
    decoder = decode.StaticDecoder(model, prompt, steps=4)
    sequence = prompt
    with torch.inference_mode():
        for step in range(4):
            expected = model(input_ids=sequence).logits[:, -1].float()
            got = decoder.logits.float()
            assert (got - expected).norm() / expected.norm() < 1e-2, step
            assert torch.equal(decoder.token[:, 0], got.argmax(-1))
            assert int(decoder.position) == 8 + step
            sequence = torch.cat([sequence, decoder.token], dim=1)
            decoder.step()
    decoder.rewind()
    assert int(decoder.position) == 8 and torch.equal(decoder.token, decoder.first_token)


def test_static_decoder_matches_the_models_own_forward(decode):
    """The step that the CUDA-graph column captures, run eagerly on the CPU, on the dense model
    and on the same model after QuantLinear replaced its decoder Linears."""
    model = decode.build_model("tiny", "float32", "cpu")
    _static_decoding_matches_full_forwards(decode, model, "cpu")
    decode.quantize_linears(model, bits=4, group_size=128, dtype="float32")
    _static_decoding_matches_full_forwards(decode, model, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for CUDA graphs")
def test_graph_decode_step_replays_what_eager_steps_compute(decode):
    """On a GPU: the INT4 model's decode step captured as a CUDA graph gives, replay by replay,
    the tokens of the same steps run eagerly, and the timing returns a positive rate."""
    model = decode.build_model("tiny", DTYPE, "cuda")
    decode.quantize_linears(model, bits=4, group_size=128, dtype=DTYPE)
    _static_decoding_matches_full_forwards(decode, model, "cuda")
    prompt = torch.randint(0, 2048, (2, 8), generator=torch.Generator().manual_seed(3)).cuda()
    eager = decode.StaticDecoder(model, prompt, steps=6)
    eager_tokens = []
    for _ in range(4):
        eager.step()
        eager_tokens.append(eager.token.clone())
    graphed = decode.StaticDecoder(model, prompt, steps=6)
    graph = decode.capture_step(graphed)  # rewound: the replays redo the eager steps
    for expected in eager_tokens:
        graph.replay()
        assert torch.equal(graphed.token, expected)
    args = decode.parse_args(["--new-tokens", "4", "--repeats", "2"])
    assert decode.graph_tokens_per_s(model, prompt, args) > 0
