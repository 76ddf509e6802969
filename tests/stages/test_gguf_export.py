"""`compress export --format gguf` on tiny random models of each supported family: the file is
read back by stock transformers (`from_pretrained(dir, gguf_file=...)`, which undoes llama.cpp's
conventions: Llama's q/k permutation, Gemma's 1 + w norms) and its logits compared with
`compress.load`'s; the gguf reader's dequantized tensors with ours; what GGUF cannot hold is
refused before anything is written.

Both sides run in float32. With `gguf_exact` scales every weight is carried bit-exact, so only
the summation order differs (rel. 1e-6 measured; asserted 1e-5). Without it, fp16 rounding of
m = −s·z moves some weights by < 0.4 % of a step: KL 1e-7-ish measured; asserted 1e-5.

transformers' GGUF reader has limits of its own, so the parity models avoid them (llama.cpp
itself reads these keys; test_llama3_rope_factors and test_gemma_metadata check them against
the model): it does not read Llama 3's `rope_freqs`, Phi-3's rope dimension count (partial
rotary), Gemma 3's per-layer sliding-window pattern, Gemma 2's attention soft-cap, or the head
size and query scale of Qwen 3 and Gemma (it takes the class defaults of the real checkpoints).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import compress
from compress.artifact import save_artifact, verify_artifact
from compress.cli import main
from compress.errors import EXIT_OK, ArtifactError
from compress.gguf.export import GGUF_FILE, export_gguf
from compress.gguf.layout import permute_rows
from compress.quant.config import LayerScheme, QuantizeConfig
from compress.registry import StageContext, handler_for
from tests.families import sharpened, tiny_family_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]
# What transformers' GGUF reader can express (see the module docstring).
PARITY_OVERRIDES = {
    "llama": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "phi3": {"partial_rotary_factor": 1.0},
    # The reader takes Qwen3's and Gemma's class defaults for head_dim (128) and the query
    # scale (256), which the real checkpoints use; llama.cpp reads key_length.
    "qwen3": {"head_dim": 128},
    "gemma3_text": {"sliding_window_pattern": 6, "head_dim": 256, "query_pre_attn_scalar": 256},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256},
}
# transformers loads the demo tokenizer inside a qwen2 model as Qwen2Tokenizer, which splits text
# with Qwen's own regex: a vocabulary no converter has hashed, with llama.cpp's `qwen2` split.
PRE_TOKENIZERS = {"qwen2": "qwen2"}
TOKENS = {"mistral": 20}  # llama.cpp runs Mistral's layers in full: exact up to its window (24)
REL_TOLERANCE = 1e-5
KL_TOLERANCE = 1e-5


def stages(exact: bool) -> list[QuantizeConfig]:
    """Q4_1 (INT4 g32 asym), Q4_0 (o_proj INT4 g64 sym), Q8_0 (down_proj INT8 per channel) and
    the head in INT8 per channel (for a tied head: one table, `token_embd`, in Q8_0)."""
    return [
        QuantizeConfig(
            bits=4,
            group_size=32,
            symmetric=False,
            gguf_exact=exact,
            overrides=[
                LayerScheme(match=["*.o_proj"], bits=4, group_size=64, symmetric=True),
                LayerScheme(match=["*.down_proj"], bits=8, group_size=-1, symmetric=True),
            ],
        ),
        QuantizeConfig(
            bits=8, group_size=-1, symmetric=True, gguf_exact=exact, include=["lm_head"]
        ),
    ]


def build_artifact(path, family, tokenizer, *, exact=True, configs=None, **overrides):
    model = tiny_family_model(
        family,
        len(tokenizer),
        dtype=torch.bfloat16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    model = sharpened(model)
    for config in configs if configs is not None else stages(exact):
        handler_for(config).apply(model, config, StageContext(dtype="bfloat16"))
    return save_artifact(
        model, tokenizer, path, recipe_yaml="version: 1\n", manifest_fields={"dtype": "bfloat16"}
    )


def ids(family: str, vocab: int) -> torch.Tensor:
    generator = np.random.default_rng(0)
    return torch.from_numpy(generator.integers(3, vocab, size=(1, TOKENS.get(family, 40))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_tokenizer):
    """(family, exact) → (artifact, export), built on first use."""
    root = tmp_path_factory.mktemp("gguf-families")
    cache: dict = {}

    def get(family: str, exact: bool = True):
        if (family, exact) not in cache:
            name = f"{family}-{'exact' if exact else 'plain'}"
            artifact = build_artifact(
                root / name, family, demo_tokenizer, exact=exact, **PARITY_OVERRIDES.get(family, {})
            )
            export = export_gguf(
                artifact, root / f"{name}.gguf", tokenizer_pre=PRE_TOKENIZERS.get(family)
            )
            cache[family, exact] = (artifact, export)
        return cache[family, exact]

    return get


def both_logits(artifact, export, tokens):
    from transformers import AutoModelForCausalLM

    ours, _ = compress.load(artifact)
    ours = ours.float()
    if theirs_tied(export):
        # A tied quantized head: the artifact stores the table both ends use as the head's
        # dequantized weights in its dtype (bf16); in float32 that table is the exact products.
        with torch.no_grad():
            ours.model.embed_tokens.weight.copy_(ours.lm_head.dequantized_weight())
    theirs = AutoModelForCausalLM.from_pretrained(export, gguf_file=GGUF_FILE, dtype=torch.float32)
    with torch.no_grad():
        expected = ours(tokens).logits.double()
        got = theirs(tokens).logits.double()
    return ours, theirs, expected, got


def theirs_tied(export) -> bool:
    names = {t.name for t in gguf.GGUFReader(export / GGUF_FILE).tensors}
    return "output.weight" not in names


def max_kl(expected: torch.Tensor, got: torch.Tensor) -> float:
    p, q = expected.log_softmax(-1), got.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_the_export_as_compress_load_runs_the_artifact(exported, family):
    artifact, export = exported(family)
    manifest = verify_artifact(export)["export"]
    assert manifest["fp16_rounding"]["bit_exact"], manifest["fp16_rounding"]
    assert {"Q4_0", "Q4_1", "Q8_0"} <= set(manifest["tensor_types"])
    ours, theirs, expected, got = both_logits(artifact, export, ids(family, 49152))
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel < REL_TOLERANCE, (family, rel)
    # Every quantized weight as the reader dequantized it (transformers undoes the Llama
    # permutation) is ours, bit for bit.
    for name, module in ours.named_modules():
        if hasattr(module, "dequantized_weight"):
            target = (
                "model.embed_tokens"
                if name == "lm_head" and theirs.config.tie_word_embeddings
                else name
            )
            weight = theirs.get_submodule(target).weight
            assert torch.equal(weight, module.dequantized_weight().float()), (family, name)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_without_gguf_exact_the_rounding_is_reported_and_small(exported, family):
    artifact, export = exported(family, exact=False)
    rounding = verify_artifact(export)["export"]["fp16_rounding"]
    assert not rounding["bit_exact"] and rounding["changed_weights"] > 0
    assert 0 < rounding["max_steps"] <= 15 * 2**-11
    _, _, expected, got = both_logits(artifact, export, ids(family, 49152))
    assert max_kl(expected, got) < KL_TOLERANCE
    assert torch.equal(expected.argmax(-1), got.argmax(-1))


def test_the_parity_check_can_fail(exported, tmp_path):
    # Llama's q/k rows in transformers' order (the permutation skipped) give other logits.
    artifact, _ = exported("llama")
    import compress.gguf.layout as layout

    original = layout.permute_rows
    layout.permute_rows = lambda rows, heads: rows
    try:
        broken = export_gguf(artifact, tmp_path / "unpermuted")
    finally:
        layout.permute_rows = original
    _, _, expected, got = both_logits(artifact, broken, ids("llama", 49152))
    assert max_kl(expected, got) > 100 * KL_TOLERANCE


def test_the_tied_table_is_written_once(exported):
    _, export = exported("qwen2")  # tied, its head quantized to INT8
    reader = gguf.GGUFReader(export / GGUF_FILE)
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["token_embd.weight"] == "Q8_0" and "output.weight" not in names
    _, export = exported("mistral")  # untied: both ends
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(export / GGUF_FILE).tensors}
    assert names["output.weight"] == "Q8_0" and names["token_embd.weight"] == "BF16"


def test_the_tokenizer_round_trips(exported, demo_tokenizer):
    from transformers import AutoTokenizer

    _, export = exported("qwen3")
    reader = gguf.GGUFReader(export / GGUF_FILE)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert reader.fields["tokenizer.chat_template"].contents() == demo_tokenizer.chat_template
    theirs = AutoTokenizer.from_pretrained(export, gguf_file=GGUF_FILE)
    text = "The 3 quick brown foxes — naïve café, 1234567 tokens!\n\n  def f(x): return x**2"
    assert theirs(text)["input_ids"] == demo_tokenizer(text)["input_ids"]


def test_bos_is_written_as_the_tokenizer_behaves(tmp_path, bos_tokenizer):
    artifact = build_artifact(tmp_path / "art", "qwen3", bos_tokenizer)
    export = export_gguf(artifact, tmp_path / "out")
    fields = gguf.GGUFReader(export / GGUF_FILE).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == bos_tokenizer.bos_token_id


def test_llama3_rope_factors_match_the_models_own_rotary_embedding(tmp_path, demo_tokenizer):
    artifact = build_artifact(tmp_path / "art", "llama", demo_tokenizer)  # rope_type llama3
    export = export_gguf(artifact, tmp_path / "out")
    tensors = {t.name: t for t in gguf.GGUFReader(export / GGUF_FILE).tensors}
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data)).double()
    model, _ = compress.load(artifact)
    scaled = model.model.rotary_emb.inv_freq.double()
    dim = model.config.head_dim
    base = model.config.rope_parameters["rope_theta"]
    plain = 1.0 / base ** (torch.arange(0, dim, 2).double() / dim)
    # llama.cpp divides each frequency by its factor: the model's own scaled frequencies.
    assert torch.allclose(plain / factors, scaled, rtol=1e-6)
    assert bool((factors > 1).any()) and bool((factors == 1).any())


def test_gemma_metadata(exported, tmp_path, demo_tokenizer):
    artifact = build_artifact(tmp_path / "art", "gemma3_text", demo_tokenizer)  # pattern 2
    export = export_gguf(artifact, tmp_path / "out")
    reader = gguf.GGUFReader(export / GGUF_FILE)
    model, _ = compress.load(artifact)
    pattern = reader.fields["gemma3.attention.sliding_window_pattern"].contents()
    assert pattern == [t == "sliding_attention" for t in model.config.layer_types]
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 24
    assert reader.fields["gemma3.rope.freq_base_swa"].contents() == 10000.0
    tensors = {t.name: t for t in reader.tensors}
    stored = torch.from_numpy(np.array(tensors["blk.0.attn_norm.weight"].data))
    norm = model.model.layers[0].input_layernorm.weight.float()
    assert torch.equal(stored, norm + 1.0)  # Gemma's (1 + w), as llama.cpp multiplies by it
    artifact = build_artifact(
        tmp_path / "art2", "gemma2", demo_tokenizer, attn_logit_softcapping=5.0
    )
    fields = gguf.GGUFReader(export_gguf(artifact, tmp_path / "out2") / GGUF_FILE).fields
    assert fields["gemma2.attn_logit_softcapping"].contents() == 5.0
    assert fields["gemma2.final_logit_softcapping"].contents() == 30.0
    assert fields["gemma2.attention.sliding_window_pattern"].contents() == [True, False]


def test_mistral_context_is_capped_at_its_window(exported):
    _, export = exported("mistral")
    fields = gguf.GGUFReader(export / GGUF_FILE).fields
    assert fields["llama.context_length"].contents() == 24


def test_llama_rows_are_permuted_with_their_scales(exported):
    artifact, export = exported("llama")
    tensors = {t.name: t for t in gguf.GGUFReader(export / GGUF_FILE).tensors}
    model, _ = compress.load(artifact)
    q_proj = model.float().model.layers[0].self_attn.q_proj  # dequantized exactly, in float32
    stored = gguf.quants.dequantize(
        tensors["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q4_1
    )
    expected = permute_rows(q_proj.dequantized_weight().float(), model.config.num_attention_heads)
    assert torch.equal(torch.from_numpy(np.array(stored)), expected)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (QuantizeConfig(bits=4, group_size=16, symmetric=False), "group_size 16"),
        (QuantizeConfig(bits=8, group_size=-1, symmetric=False), "asymmetric"),
    ],
)
def test_what_gguf_cannot_hold_is_refused_before_writing(tmp_path, demo_tokenizer, config, words):
    artifact = build_artifact(tmp_path / "art", "qwen3", demo_tokenizer, configs=[config])
    with pytest.raises(ArtifactError, match=rf"layer model\.layers\.0\.[a-z_.]+ .*{words}"):
        export_gguf(artifact, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging directory left


def test_moe_is_refused_from_its_config(tmp_path, demo_tokenizer):
    artifact = build_artifact(tmp_path / "art", "qwen2_moe", demo_tokenizer, configs=[])
    with pytest.raises(ArtifactError, match="'qwen2_moe' has no GGUF layout"):
        export_gguf(artifact, tmp_path / "out")


def test_an_unknown_pre_tokenizer_is_refused_unless_named(tmp_path, demo_tokenizer):
    artifact = build_artifact(tmp_path / "art", "qwen3", demo_tokenizer)
    spec = json.loads((artifact / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {  # the demo's, but with a space put in front of the text
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    (artifact / "tokenizer.json").write_text(json.dumps(spec))
    manifest = json.loads((artifact / "manifest.json").read_text())
    from compress.artifact import seal_manifest

    seal_manifest(artifact, {k: v for k, v in manifest.items() if k not in ("files",)})
    with pytest.raises(ArtifactError, match="--tokenizer-pre"):
        export_gguf(artifact, tmp_path / "out")
    export = export_gguf(artifact, tmp_path / "out", tokenizer_pre="gpt-2")
    assert gguf.GGUFReader(export / GGUF_FILE).fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_cli_writes_a_sealed_export(exported, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="compress")
    artifact, _ = exported("qwen3")
    out = tmp_path / "cli"
    assert main(["export", str(artifact), "--format", "gguf", "--out", str(out)]) == EXIT_OK
    manifest = verify_artifact(out)
    assert manifest["export"]["format"] == "gguf"
    assert manifest["export"]["architecture"] == "qwen3"
    assert (out / GGUF_FILE).stat().st_size == manifest["export"]["gguf_bytes"]
    assert "bit-exact" in caplog.text


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A SentencePiece-style BPE vocabulary (as Llama 2's, Gemma's and Phi-3's tokenizer.json
    are): `▁` for spaces, the 256 byte pieces in the vocabulary for byte fallback, merges
    trained here on the text of compress's own sources."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaTokenizerFast

    sources = sorted(Path(compress.__file__).parent.rglob("*.py"))
    lines = [line for path in sources for line in path.read_text(encoding="utf-8").splitlines()]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    pieces += sorted(learned["vocab"], key=learned["vocab"].get)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    backend = Tokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return LlamaTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_a_sentencepiece_vocabulary_round_trips(tmp_path, sentencepiece_tokenizer):
    from transformers import AutoTokenizer

    artifact = build_artifact(tmp_path / "art", "llama", sentencepiece_tokenizer)
    export = export_gguf(artifact, tmp_path / "out")
    fields = gguf.GGUFReader(export / GGUF_FILE).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[3 + 0x41] == gguf.TokenType.BYTE  # <0x41>
    assert types[1] == gguf.TokenType.CONTROL  # <s>
    # transformers rebuilds the merges from the scores: the same ids as the source tokenizer.
    theirs = AutoTokenizer.from_pretrained(export, gguf_file=GGUF_FILE)
    text = "The quick brown fox, 1234 naïve café — ünïcödé bytes: 漢字\n\tdef f(x):"
    ours = sentencepiece_tokenizer(text)["input_ids"]
    assert theirs(text)["input_ids"] == ours
    assert 3 + "漢".encode()[0] in ours and 0 not in ours  # bytes, never <unk>


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_pruned_artifact_exports(tmp_path, demo_tokenizer, family):
    # Heads pruned to 2 of 4 (the permutation then runs over the kept heads), FFN halved, a
    # layer removed; then INT4 g32 + the head in INT8, as a prune → quantize recipe leaves it.
    from compress.prune.config import PruneConfig

    model = sharpened(
        tiny_family_model(
            family,
            len(demo_tokenizer),
            bos_token_id=demo_tokenizer.bos_token_id,
            eos_token_id=demo_tokenizer.eos_token_id,
            **PARITY_OVERRIDES.get(family, {}),
        )
    )
    windows = torch.randint(3, len(demo_tokenizer), (4, 32), generator=torch.Generator())
    prune = PruneConfig(heads={"keep": 2}, ffn={"ratio": 0.5}, layers={"remove": 1})
    context = StageContext(
        dtype="float32", calibration_windows=lambda: windows, calibration_batch_size=2
    )
    handler_for(prune).apply(model, prune, context)
    model = model.to(torch.bfloat16)
    for config in (
        QuantizeConfig(bits=4, group_size=32, symmetric=False, gguf_exact=True),
        QuantizeConfig(bits=8, group_size=-1, symmetric=True, gguf_exact=True, include=["lm_head"]),
    ):
        handler_for(config).apply(model, config, StageContext(dtype="bfloat16"))
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 64
    artifact = save_artifact(
        model,
        demo_tokenizer,
        tmp_path / "art",
        recipe_yaml="",
        manifest_fields={"dtype": "bfloat16"},
    )
    export = export_gguf(artifact, tmp_path / "out")
    _, _, expected, got = both_logits(artifact, export, ids(family, len(demo_tokenizer)))
    assert float((got - expected).abs().max() / expected.abs().max()) < REL_TOLERANCE
