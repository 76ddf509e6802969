"""compress.evaluate.quality: perplexity, KL(baseline ‖ model), top-1 agreement.

Uses the tiny random Llama of tests/conftest.py (2 layers, hidden 64, the demo vocabulary of
49,152 tokens) on random token windows; every check is against a direct computation over the
full vocabulary.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import BadInputError
from compress.evaluate.quality import (
    BaselineLogProbs,
    LogitPostprocessing,
    QualityResult,
    baseline_logprobs,
    logit_postprocessing,
    measure_perplexity,
    measure_quality,
    window_stats,
)
from tests.families import tiny_family_model

NUM_WINDOWS, SEQ_LEN, BATCH = 5, 24, 2  # the last capture batch holds one window


def load(directory: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def perturbed(model: nn.Module, scale: float = 0.01, seed: int = 1) -> nn.Module:
    """A copy with noise on every decoder Linear (embeddings and lm_head untouched)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in other.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                noise = torch.randn(module.weight.shape, generator=generator) * scale
                module.weight.add_(noise.to(module.weight.dtype))
    return other


@pytest.fixture(scope="module")
def windows(tiny_llama_dir: Path) -> torch.Tensor:
    vocab = load(tiny_llama_dir, torch.bfloat16).config.vocab_size
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (NUM_WINDOWS, SEQ_LEN), generator=generator)


@pytest.fixture(scope="module")
def bf16_model(tiny_llama_dir: Path) -> nn.Module:
    return load(tiny_llama_dir, torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_baseline(bf16_model: nn.Module, windows: torch.Tensor) -> BaselineLogProbs:
    return baseline_logprobs(bf16_model, windows, batch_size=BATCH)


@pytest.fixture(scope="module")
def f32_case(tiny_llama_dir: Path, windows: torch.Tensor) -> SimpleNamespace:
    """float32 baseline and perturbed model, their result, and direct float64 log-probs."""
    model = load(tiny_llama_dir, torch.float32)
    other = perturbed(model)
    baseline = baseline_logprobs(model, windows, batch_size=BATCH)
    result = measure_quality(other, windows, baseline)
    with torch.no_grad():
        base = torch.log_softmax(model(windows).logits[:, :-1].double(), dim=-1)
        test = torch.log_softmax(other(windows).logits[:, :-1].double(), dim=-1)
    return SimpleNamespace(baseline=baseline, result=result, base=base, test=test)


# --------------------------------------------------------------------------- a model vs itself


def test_model_against_itself(
    bf16_model: nn.Module, bf16_baseline: BaselineLogProbs, windows: torch.Tensor
) -> None:
    result = measure_quality(bf16_model, windows, bf16_baseline)
    assert abs(result.kl_divergence) <= 1e-6
    assert result.top1_agreement == 1.0
    assert result.num_windows == NUM_WINDOWS
    assert result.num_tokens == NUM_WINDOWS * (SEQ_LEN - 1)

    with torch.no_grad():
        logits = bf16_model(windows).logits.float()
    cross_entropy = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    expected = math.exp(cross_entropy.item())
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.baseline_perplexity == result.perplexity
    assert bf16_baseline.perplexity.perplexity == result.perplexity
    assert measure_perplexity(bf16_model, windows, batch_size=3).perplexity == pytest.approx(
        expected, rel=1e-5
    )


def test_baseline_survives_in_place_changes_to_the_model(
    tiny_llama_dir: Path, windows: torch.Tensor
) -> None:
    model = load(tiny_llama_dir, torch.bfloat16)
    reference = copy.deepcopy(model)
    baseline = baseline_logprobs(model, windows, batch_size=BATCH)
    with torch.no_grad():  # what a stage does: rewrite weights in place, lm_head included
        for parameter in model.parameters():
            parameter.mul_(0.5)
    assert measure_quality(reference, windows, baseline).kl_divergence == 0.0
    assert measure_quality(model, windows, baseline).kl_divergence > 0.0


# --------------------------------------------------------------------------- a perturbed model


def test_perturbed_model_diverges(
    bf16_model: nn.Module, bf16_baseline: BaselineLogProbs, windows: torch.Tensor
) -> None:
    result = measure_quality(perturbed(bf16_model), windows, bf16_baseline)
    assert result.kl_divergence > 1e-4
    assert 0.0 < result.top1_agreement < 1.0
    assert result.perplexity != result.baseline_perplexity


def test_kl_and_agreement_match_a_direct_float64_computation(f32_case: SimpleNamespace) -> None:
    base, test = f32_case.base, f32_case.test
    kl_per_token = (base.exp() * (base - test)).sum(-1)  # (windows, positions)
    agree = (base.argmax(-1) == test.argmax(-1)).double()
    result = f32_case.result
    assert result.kl_divergence == pytest.approx(kl_per_token.mean().item(), rel=1e-5, abs=1e-6)
    assert result.per_window["kl"] == pytest.approx(
        kl_per_token.mean(-1).tolist(), rel=1e-5, abs=1e-6
    )
    assert 0.0 < result.top1_agreement < 1.0
    assert result.top1_agreement == pytest.approx(agree.mean().item())
    assert result.per_window["agreement"] == pytest.approx(agree.mean(-1).tolist())


def test_replayed_baseline_logprobs_are_the_models(f32_case: SimpleNamespace) -> None:
    for window in range(NUM_WINDOWS):  # crosses capture batches, including the short last one
        replayed = f32_case.baseline.logprobs(window)[:-1].double()
        assert torch.allclose(replayed, f32_case.base[window], atol=1e-5)


def test_chunked_positions_sum_like_one_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, baseline = torch.randn(2, 13, 50, generator=generator)
    tokens = torch.randint(0, 50, (13,), generator=generator)
    whole = window_stats(logits, tokens, baseline)
    chunked = window_stats(logits, tokens, baseline, chunk=5)
    assert whole.tokens == chunked.tokens == 12
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-6)
    assert chunked.kl == pytest.approx(whole.kl, rel=1e-6)
    assert chunked.agree == whole.agree


def test_per_window_values_pool_to_the_aggregates(f32_case: SimpleNamespace) -> None:
    result = f32_case.result
    per_window = result.per_window
    assert all(len(values) == result.num_windows for values in per_window.values())
    tokens = per_window["tokens"]
    assert sum(tokens) == result.num_tokens

    def pooled(key: str) -> float:
        return sum(v * n for v, n in zip(per_window[key], tokens, strict=True)) / sum(tokens)

    assert math.exp(pooled("nll")) == pytest.approx(result.perplexity, rel=1e-9)
    assert math.exp(pooled("baseline_nll")) == pytest.approx(result.baseline_perplexity, rel=1e-9)
    assert pooled("kl") == pytest.approx(result.kl_divergence, rel=1e-9)
    assert pooled("agreement") == pytest.approx(result.top1_agreement, rel=1e-9)


def test_result_round_trips_through_json(f32_case: SimpleNamespace) -> None:
    data = json.loads(json.dumps(f32_case.result.to_dict()))
    assert QualityResult.from_dict(data) == f32_case.result


def test_result_rejects_per_window_lists_of_the_wrong_length(f32_case: SimpleNamespace) -> None:
    data = f32_case.result.to_dict()
    data["per_window"]["kl"] = data["per_window"]["kl"][:-1]
    with pytest.raises(ValueError, match="num_windows"):
        QualityResult.from_dict(data)


# --------------------------------------------------------------------------- memory and limits


def test_baseline_is_smaller_than_full_logprobs(f32_case: SimpleNamespace) -> None:
    baseline = f32_case.baseline
    vocab = f32_case.base.shape[-1]
    assert baseline.nbytes < NUM_WINDOWS * SEQ_LEN * vocab * 4


class SoftCapped(nn.Module):
    """A model whose logits are post-processed after its output layer (like Gemma-2)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        logits = self.inner(input_ids=input_ids, **kwargs).logits
        return SimpleNamespace(logits=0.05 * torch.tanh(logits / 0.05))


def test_undeclared_logit_post_processing_is_refused(
    bf16_model: nn.Module, windows: torch.Tensor
) -> None:
    """Post-processing the config does not name cannot be replayed: refused, not mis-measured."""
    with pytest.raises(BadInputError, match="known post-processing"):
        baseline_logprobs(SoftCapped(bf16_model), windows)


# family → (config overrides, the post-processing its forward applies)
POSTPROCESSING_FAMILIES = {
    "gemma2": ({"final_logit_softcapping": 0.5}, LogitPostprocessing(softcap=0.5)),
    "gemma3_text": ({"final_logit_softcapping": 0.5}, LogitPostprocessing(softcap=0.5)),
    "granite": ({"logits_scaling": 3.0}, LogitPostprocessing(divide_by=3.0)),
    "cohere": ({"logit_scale": 0.25}, LogitPostprocessing(multiply_by=0.25)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("family", sorted(POSTPROCESSING_FAMILIES))
def test_post_processed_logits_are_replayed_exactly(family: str, dtype: torch.dtype) -> None:
    """The model's own post-processing is replayed bit for bit: the model against itself has
    KL 0, and against a perturbed copy KL equals the direct full-vocabulary computation."""
    overrides, expected = POSTPROCESSING_FAMILIES[family]
    model = tiny_family_model(family, 256, dtype=dtype, **overrides)
    assert logit_postprocessing(model) == expected
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    baseline = baseline_logprobs(model, windows, batch_size=2)
    assert measure_quality(model, windows, baseline).kl_divergence == 0.0
    other = perturbed(model, scale=0.05)
    with torch.no_grad():
        base = torch.log_softmax(model(windows).logits[:, :-1].double(), dim=-1)
        test = torch.log_softmax(other(windows).logits[:, :-1].double(), dim=-1)
    direct = (base.exp() * (base - test)).sum(-1).mean().item()
    assert direct > 1e-4  # the perturbation is visible, so equality below means something
    assert measure_quality(other, windows, baseline).kl_divergence == pytest.approx(
        direct, rel=1e-3
    )


def test_soft_capping_bounds_replayed_logits() -> None:
    capped = LogitPostprocessing(softcap=2.0)(torch.tensor([-100.0, 0.0, 1.0, 100.0]))
    assert capped.abs().max() <= 2.0
    assert capped[1] == 0.0 and capped[2] == pytest.approx(2.0 * math.tanh(0.5))


def test_windows_must_be_the_baselines(
    bf16_model: nn.Module, bf16_baseline: BaselineLogProbs, windows: torch.Tensor
) -> None:
    with pytest.raises(ValueError, match="differ from the ones the baseline"):
        measure_quality(bf16_model, windows[:, :-1].contiguous(), bf16_baseline)
