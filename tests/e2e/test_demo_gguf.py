"""The GGUF export of the real demo model (SmolLM2-135M-Instruct: hidden 576, 9 query heads in
3 KV groups, Llama layout, a tied 49,152-token table, byte-level BPE with the `smollm`
pre-tokenizer) read back by stock transformers, against `compress.load`.

RTN (seconds; the export does not care how the integers were chosen): INT4 g64 asymmetric on
every decoder Linear (Q4_1, 2 blocks per group) and INT8 per channel on the tied head (the
table, once, as Q8_0). Without `gguf_exact`, so fp16 rounding of m = −s·z is in play (it moves
1.7 M of 134 M weights, by at most 0.6 % of a step): measured KL 1.5e-6 nats/token and 99.6 %
top-1 agreement (one position of 255 flips) with the artifact in float32 on a 256-token
WikiText-2 window; asserted 1e-4 and 99 %. For scale: INT4 costs ~0.1 from the baseline.
"""

from __future__ import annotations

import pytest
import torch

from compress.artifact import load_artifact, save_artifact, verify_artifact
from compress.calibration import evaluation_windows, load_text
from compress.evaluate.quality import window_stats
from compress.gguf.export import GGUF_FILE, export_gguf
from compress.quant.config import QuantizeConfig
from compress.registry import StageContext, handler_for
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow

WIKITEXT = SHARED_DATA / "wikitext-2"


@pytest.fixture(scope="module")
def demo_gguf_export(tmp_path_factory, demo_model):
    if not (WIKITEXT / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
    root = tmp_path_factory.mktemp("demo-gguf")
    model, tokenizer = demo_model("bfloat16")
    text = load_text(str(WIKITEXT / "test.txt"), field="test")
    window = evaluation_windows(text, tokenizer, 256, 1)
    for config in (
        QuantizeConfig(bits=4, group_size=64, symmetric=False),
        QuantizeConfig(bits=8, group_size=-1, symmetric=True, include=["lm_head"]),
    ):
        handler_for(config).apply(model, config, StageContext(dtype="bfloat16"))
    artifact = save_artifact(
        model, tokenizer, root / "artifact", recipe_yaml="", manifest_fields={"dtype": "bfloat16"}
    )
    del model
    return artifact, export_gguf(artifact, root / "gguf"), window, text[:4000], tokenizer


def test_transformers_reads_the_demo_export_as_compress_load_runs_it(demo_gguf_export):
    from transformers import AutoModelForCausalLM

    artifact, export, window, _, _ = demo_gguf_export
    manifest = verify_artifact(export)["export"]
    # 30 layers × 7 Linear + the head's table once; 30 × 2 norms + the final one.
    assert manifest["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    model, _ = load_artifact(artifact, with_tokenizer=False)
    weights = sum(
        m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features")
    )
    # 5 bits per weight (Q4_1), 8.5 for the table (Q8_0), plus norms and the vocabulary.
    assert (
        manifest["gguf_bytes"]
        < (5 / 8) * weights + (3.5 / 8) * int(model.lm_head.weight_shape.prod()) + 3e6
    )
    model = model.float()
    with torch.no_grad():  # the table both ends use, at the exact values the GGUF holds
        model.model.embed_tokens.weight.copy_(model.lm_head.dequantized_weight())
        expected = model(window).logits[0]
    theirs = AutoModelForCausalLM.from_pretrained(export, gguf_file=GGUF_FILE, dtype=torch.float32)
    with torch.no_grad():
        got = theirs(window).logits[0]
    stats = window_stats(got, window[0], expected)
    assert stats.kl / stats.tokens < 1e-4
    assert stats.agree / stats.tokens > 0.99


def test_the_demo_tokenizer_round_trips(demo_gguf_export):
    from transformers import AutoTokenizer

    _, export, _, text, tokenizer = demo_gguf_export
    theirs = AutoTokenizer.from_pretrained(export, gguf_file=GGUF_FILE)
    assert theirs(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert theirs.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    ) == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
