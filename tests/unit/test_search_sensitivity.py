"""compress.search.sensitivity on tiny random models: groups, exact restore, measured KL against
a direct full-vocabulary computation, the Hessian proxy and its rank correlation."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.quant.config import PER_CHANNEL
from compress.quant.primitives import QuantSpec, fake_quantize
from compress.search.candidates import KEEP_16, Format
from compress.search.sensitivity import (
    fake_quantized,
    input_hessians,
    layer_groups,
    measured_sensitivity,
    proxy_sensitivity,
    rank_correlation,
)
from tests.families import tiny_family_model

VOCAB = 256
WINDOWS = torch.randint(0, VOCAB, (4, 40), generator=torch.Generator().manual_seed(0))
INT4 = Format(4, 32, False)
INT8 = Format(8, PER_CHANNEL, True)
FORMATS = (INT4, INT8, KEEP_16)


@pytest.fixture(scope="module")
def llama():
    return tiny_family_model("llama", VOCAB)


@pytest.fixture(scope="module")
def tables(llama):
    groups = layer_groups(llama)
    measured = measured_sensitivity(llama, groups, FORMATS, WINDOWS, batch_size=2)
    layers = [name for group in groups for name in group.layers]
    proxy = proxy_sensitivity(llama, groups, FORMATS, input_hessians(llama, layers, WINDOWS))
    return groups, measured, proxy


def test_groups_couple_the_layers_that_share_an_input(llama):
    names = [g.name for g in layer_groups(llama)][:4]
    assert names == [
        "model.layers.0.self_attn.q_k_v",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up",
        "model.layers.0.mlp.down_proj",
    ]
    phi3 = [g.layers for g in layer_groups(tiny_family_model("phi3", VOCAB))][:4]
    assert all(len(layers) == 1 for layers in phi3)  # already fused: one Linear each


def test_moe_routers_are_not_candidates():
    layers = [n for g in layer_groups(tiny_family_model("qwen2_moe", VOCAB)) for n in g.layers]
    assert not [n for n in layers if n.endswith((".mlp.gate", "shared_expert_gate"))]
    assert "model.layers.0.mlp.shared_expert.down_proj" in layers


def test_fake_quantization_is_exactly_undone(llama):
    before = copy.deepcopy(llama.state_dict())
    name = "model.layers.1.mlp.down_proj"
    with fake_quantized(llama, [name], INT4):
        weight = llama.get_submodule(name).weight
        expected = fake_quantize(before[f"{name}.weight"], QuantSpec(4, 32, False), weight.dtype)
        assert torch.equal(weight, expected.to(weight.dtype))
        assert not torch.equal(weight, before[f"{name}.weight"])
    with pytest.raises(RuntimeError), fake_quantized(llama, [name], INT4):
        raise RuntimeError("interrupted")
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_measured_kl_is_the_direct_full_vocabulary_kl(llama, tables):
    groups, measured, _ = tables
    group = groups[2]
    changed = copy.deepcopy(llama)
    with torch.no_grad():
        for name in group.layers:
            weight = changed.get_submodule(name).weight
            weight.copy_(fake_quantize(weight, QuantSpec(4, 32, False), weight.dtype))
        base = torch.log_softmax(llama(WINDOWS).logits[:, :-1].double(), dim=-1)
        test = torch.log_softmax(changed(WINDOWS).logits[:, :-1].double(), dim=-1)
    direct = float((base.exp() * (base - test)).sum(-1).mean())
    assert measured[group.name][INT4.name] == pytest.approx(direct, rel=1e-4)


def test_more_bits_cost_less_and_keeping_costs_nothing(tables):
    _, measured, proxy = tables
    for table in (measured, proxy):
        for row in table.values():
            assert row[KEEP_16.name] == 0.0
            assert 0 < row[INT8.name] < row[INT4.name]


def test_the_hessian_is_the_mean_outer_product_of_the_inputs(llama):
    name = "model.layers.0.mlp.down_proj"
    seen = []
    handle = llama.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        llama(WINDOWS)
    handle.remove()
    x = torch.cat(seen).double()
    hessian = input_hessians(llama, [name], WINDOWS, batch_size=3)[name]
    torch.testing.assert_close(hessian.double(), x.T @ x / len(x), rtol=1e-4, atol=1e-6)


def test_the_proxy_ranks_candidates_better_than_chance(tables):
    _, measured, proxy = tables
    assert rank_correlation(measured, proxy) > 0.3


def test_rank_correlation_of_known_orders():
    a = {"g": {"x": 1.0, "y": 2.0, "z": 3.0, "w": 4.0}}
    assert rank_correlation(a, a) == pytest.approx(1.0)
    reverse = {"g": {"x": 4.0, "y": 3.0, "z": 2.0, "w": 1.0}}
    assert rank_correlation(a, reverse) == pytest.approx(-1.0)
    tied = {"g": {"x": 1.0, "y": 1.0, "z": 3.0, "w": 4.0}}
    assert 0.9 < rank_correlation(a, tied) < 1.0
    with pytest.raises(ValueError, match="at least 3 pairs"):
        rank_correlation({"g": {"x": 1.0}}, {"g": {"x": 1.0}})
