"""Distillation losses, schedule, data order and the QAT fake quantizer: pure functions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.distill.config import DistillConfig
from compress.distill.fake_quant import FakeQuantize
from compress.distill.losses import distillation_loss, hidden_loss, kd_loss, next_token_loss
from compress.distill.trainer import batch_rows, lr_factor
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec, RangeSearch
from compress.quant.rtn import rtn_quantize


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kd_loss_is_zero_for_identical_logits():
    logits = _logits(0)
    assert float(kd_loss(logits, logits.clone(), temperature=2.0)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_is_t_squared_times_the_kl_of_softened_distributions(temperature):
    student, teacher = _logits(1), _logits(2)
    expected = F.kl_div(
        F.log_softmax(student / temperature, -1).reshape(-1, 11),
        F.log_softmax(teacher / temperature, -1).reshape(-1, 11),
        log_target=True,
        reduction="batchmean",
    )
    measured = kd_loss(student, teacher, temperature)
    assert float(measured) == pytest.approx(temperature**2 * float(expected), rel=1e-5)


def test_kd_loss_refuses_a_different_vocabulary():
    with pytest.raises(ValueError, match="different vocabulary"):
        kd_loss(_logits(0), _logits(1, (2, 5, 12)), 2.0)


def test_kd_loss_masks_positions():
    student, teacher = _logits(1), _logits(2)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    expected = kd_loss(student[:1, :3], teacher[:1, :3], 2.0)
    assert float(kd_loss(student, teacher, 2.0, mask)) == pytest.approx(float(expected), rel=1e-6)


def test_next_token_loss_is_the_shifted_cross_entropy():
    logits = _logits(3)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert float(next_token_loss(logits, ids)) == pytest.approx(float(expected), rel=1e-6)


def test_hidden_losses():
    a = torch.randn(2, 3, 4)
    assert float(hidden_loss(a, a, "mse")) == 0
    assert float(hidden_loss(a, 2 * a, "cosine")) == pytest.approx(0, abs=1e-6)
    assert float(hidden_loss(a, -a, "cosine")) == pytest.approx(2, rel=1e-6)
    assert float(hidden_loss(a, a + 1, "mse")) == pytest.approx(1, rel=1e-6)


def test_distillation_loss_mixes_by_alpha():
    kd, task, hidden = torch.tensor(2.0), torch.tensor(4.0), torch.tensor(1.0)
    assert float(distillation_loss(kd, task, 0.7)) == pytest.approx(0.7 * 2 + 0.3 * 4)
    assert float(distillation_loss(kd, task, 0.7, hidden, 0.5)) == pytest.approx(3.1)


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[20] == pytest.approx(0.1)
    assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_batches_are_seeded_and_cover_every_sequence_once_per_epoch():
    config = DistillConfig(steps=10, batch_size=3, grad_accumulation=2, seed=5)
    epoch = [
        r for step in range(2) for micro in range(2) for r in batch_rows(step, micro, config, 12)
    ]
    assert sorted(epoch) == list(range(12))
    assert batch_rows(7, 1, config, 12) == batch_rows(7, 1, config, 12)
    other_seed = DistillConfig(steps=10, batch_size=3, grad_accumulation=2, seed=6)
    assert [batch_rows(0, m, other_seed, 12) for m in range(2)] != [
        batch_rows(0, m, config, 12) for m in range(2)
    ]


@pytest.mark.parametrize(
    ("spec", "search"),
    [
        (QuantSpec(bits=4, group_size=16, symmetric=False), None),
        (QuantSpec(bits=4, group_size=32, symmetric=True), RangeSearch()),
        (QuantSpec(bits=8, group_size=-1, symmetric=True), None),
    ],
)
def test_fake_quantizer_forward_is_what_the_quantize_stage_stores(spec, search):
    torch.manual_seed(0)
    latent = torch.randn(24, 64)  # float32 master weights, as in training
    fake = FakeQuantize(spec, torch.bfloat16, search)
    trained_view = fake(latent)
    # The quantize stage gets the weight in the recipe dtype and stores it packed.
    packed = rtn_quantize(latent.to(torch.bfloat16), spec, torch.bfloat16, search=search)
    stored = QuantLinear.from_packed(packed, spec, None, torch.bfloat16).dequantized_weight()
    assert torch.equal(trained_view, stored.float())


def test_fake_quantizer_passes_gradients_straight_through():
    latent = torch.randn(8, 32, requires_grad=True)
    FakeQuantize(QuantSpec(bits=4, group_size=16, symmetric=True), torch.float32, None)(latent).mul(
        torch.arange(32.0)
    ).sum().backward()
    assert torch.equal(latent.grad, torch.arange(32.0).expand(8, 32))


def test_a_linear_with_fake_quantization_still_trains():
    from compress.distill.fake_quant import add_fake_quantization, remove_fake_quantization

    linear = nn.Linear(32, 8)
    latent_before = linear.weight.detach().clone()
    layers = {"l": linear}
    add_fake_quantization(
        layers, QuantSpec(bits=4, group_size=16, symmetric=True), torch.float32, None
    )
    linear(torch.randn(4, 32)).sum().backward()
    torch.optim.SGD(linear.parameters(), lr=0.1).step()
    remove_fake_quantization(layers)
    assert isinstance(linear.weight, nn.Parameter) and not torch.equal(linear.weight, latent_before)
