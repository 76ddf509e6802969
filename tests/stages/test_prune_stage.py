"""The prune stage on tiny random Llama and Qwen2 models built from configs.

The decisive checks compare the pruned model with the original model in which the pruned
units are masked out (their output-projection columns zeroed, a removed layer bypassed): the
two must give the same logits, which proves that every coupled tensor was sliced and that
query heads still read the right KV heads.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import compress.stages  # noqa: F401  (registers the stages)
from compress.artifact import load_artifact, save_artifact
from compress.errors import PreflightError
from compress.models import count_params
from compress.prune.config import PruneConfig
from compress.quant.config import QuantizeConfig
from compress.registry import StageContext, StageResult, handler_for

VOCAB = 96
HEAD_DIM = 8
NUM_HEADS = 6
INTERMEDIATE = 64


def tiny_decoder(arch: str, num_kv_heads: int, *, num_layers: int = 3, seed: int = 0) -> nn.Module:
    """A float32 random decoder: 6 query heads of 8 dims, `num_kv_heads` KV heads.

    llama; qwen2 (q/k/v biases); qwen3 (q/k norms shared by all heads, one head_dim vector);
    olmo2 (q/k norms over all heads' features together)."""
    common = {
        "vocab_size": VOCAB,
        "hidden_size": NUM_HEADS * HEAD_DIM,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 256,
    }
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=HEAD_DIM))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=HEAD_DIM))
    else:
        model = Olmo2ForCausalLM(Olmo2Config(**common, eos_token_id=None, pad_token_id=None))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # HF initializes biases to zero and norms to one; make them count.
            if name.endswith(".bias") or "_norm" in name:
                param.normal_(mean=1.0 if "_norm" in name else 0.0, std=0.5)
    return model.eval()


ARCHS = [("llama", 1), ("llama", 2), ("llama", 3), ("qwen2", 2), ("qwen2", 3), ("qwen3", 2)]
ARCH_IDS = [f"{a}-kv{k}" for a, k in ARCHS]


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(seed))


def _context() -> StageContext:
    windows = _ids(seed=7)
    return StageContext(
        dtype="float32", calibration_windows=lambda: windows, calibration_batch_size=2
    )


def _prune(model: nn.Module, *, context: StageContext | None = None, **config) -> StageResult:
    prune = PruneConfig(**config)
    handler = handler_for(prune)
    handler.preflight(model, prune)
    return handler.apply(model, prune, context or _context())


def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids, use_cache=False).logits


def _source_indices(original: torch.Tensor, pruned: torch.Tensor, dim: int) -> list[int]:
    """Which rows (dim 0) / columns (dim 1) of `original` the pruned tensor kept."""
    original, pruned = (original, pruned) if dim == 0 else (original.T, pruned.T)
    return [int((original == row).all(1).nonzero()[0]) for row in pruned]


def _zero_columns(linear: nn.Linear, columns: list[int]) -> None:
    with torch.no_grad():
        linear.weight[:, columns] = 0


@pytest.mark.parametrize(("arch", "kv"), ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_ffn_pruning_equals_masking_the_channels(arch, kv, criterion):
    model = tiny_decoder(arch, kv)
    masked = copy.deepcopy(model)
    result = _prune(model, criterion=criterion, ffn={"ratio": 0.25, "multiple_of": 8})
    for index, layer in enumerate(model.model.layers):
        assert layer.mlp.gate_proj.weight.shape == (48, 48)
        assert layer.mlp.up_proj.weight.shape == (48, 48)
        assert layer.mlp.down_proj.weight.shape == (48, 48)
        source = masked.model.layers[index].mlp
        kept = _source_indices(source.gate_proj.weight, layer.mlp.gate_proj.weight, dim=0)
        assert kept == sorted(kept) and len(set(kept)) == 48
        assert kept == _source_indices(source.down_proj.weight, layer.mlp.down_proj.weight, dim=1)
        _zero_columns(source.down_proj, [c for c in range(INTERMEDIATE) if c not in kept])
    assert model.config.intermediate_size == 48
    torch.testing.assert_close(_logits(model), _logits(masked), atol=1e-5, rtol=1e-5)
    assert result.details["parameters_after"] == count_params(model)


@pytest.mark.parametrize(("arch", "kv"), [a for a in ARCHS if a[1] < NUM_HEADS], ids=ARCH_IDS)
@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_query_head_pruning_keeps_gqa_groups_and_equals_masking(arch, kv, criterion):
    model = tiny_decoder(arch, kv)
    masked = copy.deepcopy(model)
    per_group = NUM_HEADS // kv
    # Fewer query heads in every KV group, as many as the config class accepts (LlamaConfig
    # wants hidden_size % num_attention_heads == 0, so 6 → 5 heads of width 48 is refused).
    keep = max(k for k in range(kv, NUM_HEADS, kv) if (NUM_HEADS * HEAD_DIM) % k == 0)
    result = _prune(model, criterion=criterion, heads={"keep": keep})
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (keep, kv)
    assert model.config.head_dim == HEAD_DIM
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        assert attention.q_proj.weight.shape == (keep * HEAD_DIM, 48)
        assert attention.k_proj.weight.shape == (kv * HEAD_DIM, 48)
        assert attention.o_proj.weight.shape == (48, keep * HEAD_DIM)
        assert attention.num_key_value_groups == keep // kv
        heads = result.details["kept_query_heads"][index]
        groups = [h // per_group for h in heads]
        assert groups == sorted(groups)
        assert all(groups.count(g) == keep // kv for g in range(kv))  # same count per group
        removed = [h for h in range(NUM_HEADS) if h not in heads]
        _zero_columns(
            masked.model.layers[index].self_attn.o_proj,
            [h * HEAD_DIM + d for h in removed for d in range(HEAD_DIM)],
        )
    torch.testing.assert_close(_logits(model), _logits(masked), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "kv"),
    [a for a in ARCHS if a[1] > 1],
    ids=[i for a, i in zip(ARCHS, ARCH_IDS, strict=True) if a[1] > 1],
)
@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_kv_group_pruning_removes_whole_groups_and_equals_masking(arch, kv, criterion):
    model = tiny_decoder(arch, kv)
    masked = copy.deepcopy(model)
    per_group = NUM_HEADS // kv
    result = _prune(model, criterion=criterion, heads={"unit": "kv_group", "keep": kv - 1})
    assert model.config.num_key_value_heads == kv - 1
    assert model.config.num_attention_heads == (kv - 1) * per_group
    for index, layer in enumerate(model.model.layers):
        source = masked.model.layers[index].self_attn
        kept_kv_rows = _source_indices(source.k_proj.weight, layer.self_attn.k_proj.weight, 0)
        kept_groups = sorted({r // HEAD_DIM for r in kept_kv_rows})
        assert len(kept_groups) == kv - 1
        assert kept_kv_rows == _source_indices(
            source.v_proj.weight, layer.self_attn.v_proj.weight, 0
        )
        if arch == "qwen2":  # biases travel with their rows
            bias_rows = [g * HEAD_DIM + d for g in kept_groups for d in range(HEAD_DIM)]
            assert torch.equal(layer.self_attn.k_proj.bias, source.k_proj.bias[bias_rows])
        heads = result.details["kept_query_heads"][index]
        assert heads == [g * per_group + i for g in kept_groups for i in range(per_group)]
        removed = [h for h in range(NUM_HEADS) if h not in heads]
        _zero_columns(source.o_proj, [h * HEAD_DIM + d for h in removed for d in range(HEAD_DIM)])
    torch.testing.assert_close(_logits(model), _logits(masked), atol=1e-5, rtol=1e-5)


def test_mha_heads_are_pruned_with_q_k_v_and_o_together():
    model = tiny_decoder("llama", NUM_HEADS)  # MHA: every head has its own K and V
    masked = copy.deepcopy(model)
    result = _prune(model, criterion="magnitude", heads={"unit": "kv_group", "ratio": 0.5})
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 3)
    for index, layer in enumerate(model.model.layers):
        heads = result.details["kept_query_heads"][index]
        rows = [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]
        source = masked.model.layers[index].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(
                getattr(layer.self_attn, name).weight, getattr(source, name).weight[rows]
            )
        removed = [h for h in range(NUM_HEADS) if h not in heads]
        _zero_columns(source.o_proj, [h * HEAD_DIM + d for h in removed for d in range(HEAD_DIM)])
    torch.testing.assert_close(_logits(model), _logits(masked), atol=1e-5, rtol=1e-5)


class _Bypass:
    """A forward hook that makes a decoder layer return its input unchanged."""

    def __call__(self, _module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@pytest.mark.parametrize(("arch", "kv"), [("llama", 2), ("qwen2", 3)], ids=["llama", "qwen2"])
def test_layer_removal_equals_bypassing_the_layers_and_renumbers_them(arch, kv):
    model = tiny_decoder(arch, kv, num_layers=5)
    bypassed = copy.deepcopy(model)
    result = _prune(model, layers={"indices": [1, 3]})
    assert result.details["layers_removed"] == [1, 3]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 3
    for index in (1, 3):
        bypassed.model.layers[index].register_forward_hook(_Bypass(), with_kwargs=True)
    torch.testing.assert_close(_logits(model), _logits(bypassed), atol=1e-5, rtol=1e-5)
    # The KV cache is indexed by the renumbered layers: cached generation matches uncached.
    ids = _ids()[:1, :8]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(generated, uncached)


def test_layer_score_removes_a_layer_that_does_nothing():
    model = tiny_decoder("llama", 2, num_layers=4)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: input == output
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    result = _prune(model, layers={"remove": 1})
    assert result.details["layers_removed"] == [1]
    scores = result.details["layer_scores"]
    assert scores[1] == pytest.approx(0, abs=1e-6)
    assert min(scores[i] for i in (0, 2, 3)) > 1e-3


@pytest.mark.parametrize("criterion", ["activation", "taylor"])
def test_data_driven_scores_drop_a_dead_channel_first(criterion):
    model = tiny_decoder("llama", 2)
    with torch.no_grad():  # channel 5 never fires: gate and up rows are zero
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[5] = 0
            layer.mlp.up_proj.weight[5] = 0
    masked = copy.deepcopy(model)
    _prune(model, criterion=criterion, ffn={"keep": INTERMEDIATE - 1})
    for layer, source in zip(model.model.layers, masked.model.layers, strict=True):
        kept = _source_indices(source.mlp.down_proj.weight, layer.mlp.down_proj.weight, dim=1)
        assert 5 not in kept
    # Removing a channel that never fires changes nothing.
    torch.testing.assert_close(_logits(model), _logits(masked), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("arch", "kv"), [("llama", 3), ("qwen2", 2)], ids=["llama", "qwen2"])
def test_saved_pruned_model_loads_in_stock_transformers_with_equal_logits(tmp_path, arch, kv):
    model = tiny_decoder(arch, kv, num_layers=4)
    _prune(
        model,
        criterion="taylor",
        heads={"ratio": 0.5} if kv == 3 else {"unit": "kv_group", "keep": 1},
        ffn={"ratio": 0.5, "multiple_of": 16},
        layers={"remove": 1},
    )
    save_artifact(model, None, tmp_path / "a", recipe_yaml="", manifest_fields={"dtype": "float32"})
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "quantization_config" not in config and config["head_dim"] == HEAD_DIM
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    assert type(stock) is type(model)
    assert torch.equal(_logits(stock), _logits(model))
    ours, _ = load_artifact(tmp_path / "a", with_tokenizer=False)
    assert torch.equal(_logits(ours), _logits(model))


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_pruning_nothing_is_an_identity(criterion):
    model = tiny_decoder("qwen2", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    result = _prune(model, criterion=criterion, heads={"ratio": 0.0}, ffn={"ratio": 0.0})
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = {k for k, v in model.config.to_dict().items() if config_before.get(k) != v}
    assert changed <= {"head_dim"}  # written explicitly; the value is the same
    assert result.details["parameters_after"] == result.details["parameters_before"]
    assert result.summary.startswith("nothing pruned")


def test_planned_model_has_the_shapes_the_stage_produces():
    model = tiny_decoder("llama", 3, num_layers=4)
    prune = PruneConfig(
        heads={"keep": 3}, ffn={"ratio": 0.4, "multiple_of": 8}, layers={"remove": 1}
    )
    planned = handler_for(prune).plan(model, prune)
    assert all(p.is_meta for p in planned.parameters())
    _prune(model, **prune.model_dump())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in planned.named_parameters()}


def test_norms_spanning_all_heads_are_sliced_and_reported(tmp_path):
    model = tiny_decoder("olmo2", 2)
    source = copy.deepcopy(model)
    result = _prune(model, criterion="magnitude", heads={"keep": 4})
    assert result.details["norms_spanning_heads"] == ["q_norm"]  # k/v heads are all kept
    for index, layer in enumerate(model.model.layers):
        heads = result.details["kept_query_heads"][index]
        rows = [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]
        q_norm = source.model.layers[index].self_attn.q_norm.weight
        assert torch.equal(layer.self_attn.q_norm.weight, q_norm[rows])
    save_artifact(model, None, tmp_path / "a", recipe_yaml="", manifest_fields={})
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    assert torch.equal(_logits(stock), _logits(model))


# --------------------------------------------------------------------------- bad input


def _preflight(model: nn.Module, **config) -> None:
    prune = PruneConfig(**config)
    handler_for(prune).preflight(model, prune)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"heads": {"keep": 4}}, "heads.keep 4 breaks the GQA grouping"),
        ({"heads": {"keep": 12}}, "breaks the GQA grouping"),
        ({"heads": {"ratio": 0.9}}, "removes every query head of each KV group"),
        ({"heads": {"unit": "kv_group", "ratio": 0.9}}, "removes every KV group"),
        ({"heads": {"unit": "kv_group", "keep": 4}}, "the model has 3 KV groups"),
        ({"ffn": {"ratio": 0.9, "multiple_of": 64}}, "leaves no channel of 64"),
        ({"ffn": {"keep": 128}}, "the model has 64 FFN channels"),
        ({"layers": {"remove": 3}}, "leaves none"),
        ({"layers": {"indices": [0, 7]}}, "layers.indices [7]"),
    ],
)
def test_bad_targets_are_refused_by_preflight(config, message):
    model = tiny_decoder("llama", 3)  # 6 query heads in 3 KV groups, 64 channels, 3 layers
    with pytest.raises(PreflightError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _preflight(model, criterion="taylor", **config)


def test_query_unit_on_an_mha_model_points_to_kv_group():
    with pytest.raises(PreflightError, match=r"use heads\.unit kv_group"):
        _preflight(tiny_decoder("llama", NUM_HEADS), heads={"ratio": 0.5})


def test_unknown_architecture_names_the_expected_modules():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB))
    with pytest.raises(PreflightError, match=r"expected nn.Linear submodules.*self_attn.q_proj"):
        _preflight(gpt2, ffn={"ratio": 0.5})


def test_quantized_layers_are_refused():
    model = tiny_decoder("llama", 2)
    quantize = QuantizeConfig(bits=8)
    handler_for(quantize).apply(model, quantize, StageContext(dtype="float32"))
    with pytest.raises(PreflightError, match="already quantized; prune the dense model first"):
        _preflight(model, ffn={"ratio": 0.5})
