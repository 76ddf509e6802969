"""compress.search.sensitivity on tiny random models: groups, exact restore, measured KL against
a direct full-vocabulary computation, the Hessian proxy and its rank correlation."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.quant.config import PER_CHANNEL, GPTQOptions, QuantizeConfig
from compress.quant.primitives import QuantSpec, fake_quantize
from compress.search.candidates import KEEP_16, Format
from compress.search.sensitivity import (
    anchored_sensitivity,
    fake_quantized,
    float32_copy,
    group_hessians,
    input_hessians,
    layer_groups,
    measured_sensitivity,
    proxy_sensitivity,
    rank_correlation,
    round_to_nearest,
    stage_rounder,
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
    proxy = proxy_sensitivity(
        llama, groups, FORMATS, input_hessians(llama, layers, WINDOWS).__getitem__
    )
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


def test_anchored_sensitivity_measures_the_coarsest_format_and_scales_the_rest(llama, tables):
    groups, measured, _ = tables
    formats = (INT4, Format(4, 64, False), INT8, KEEP_16)
    full_proxy = proxy_sensitivity(
        llama,
        groups,
        formats,
        input_hessians(llama, [n for g in groups for n in g.layers], WINDOWS).__getitem__,
    )
    anchored, proxy, anchors = anchored_sensitivity(
        llama,
        groups,
        formats,
        WINDOWS,
        input_hessians(llama, [n for g in groups for n in g.layers], WINDOWS).__getitem__,
        batch_size=2,
    )
    for name, row in full_proxy.items():
        assert proxy[name] == pytest.approx(row)
    for group in groups:
        errors = full_proxy[group.name]
        anchor = anchors[group.name]
        assert anchor == max((f for f in errors if f != "keep"), key=errors.get)
        row = anchored[group.name]
        assert row["keep"] == 0.0
        for name, value in row.items():
            if name != "keep":
                assert value == pytest.approx(row[anchor] * errors[name] / errors[anchor])
        # int4 g32 is measured directly in `tables`: the anchored value scales a measured KL,
        # so it agrees in magnitude (the within-group proxy ratio is not exact).
        assert 0.2 < row[INT4.name] / measured[group.name][INT4.name] < 5


def test_the_float32_copy_leaves_the_model_alone():
    model = tiny_family_model("llama", VOCAB).to(torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    copied = float32_copy(model)
    assert {p.dtype for p in copied.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, param in copied.named_parameters():
        assert torch.equal(param.to(torch.bfloat16), before[name])


def test_group_hessians_are_each_layers_own_input_hessian(llama):
    groups = layer_groups(llama)
    lookup = group_hessians(llama, groups, WINDOWS, batch_size=2)
    layers = [n for g in groups for n in g.layers]
    direct = input_hessians(llama, layers, WINDOWS, batch_size=2)
    for name in layers:
        torch.testing.assert_close(lookup(name), direct[name])


def test_the_stage_rounder_rounds_as_the_stage_stores(llama):
    groups = layer_groups(llama)
    hessians = group_hessians(llama, groups, WINDOWS)
    rtn = stage_rounder(QuantizeConfig(bits=4), torch.float32, hessians)
    weight = llama.get_submodule(groups[0].layers[0]).weight.detach()
    assert torch.equal(rtn("x", weight, INT4), round_to_nearest("x", weight, INT4))
    gptq = stage_rounder(
        QuantizeConfig(method="gptq", bits=4, gptq=GPTQOptions(act_order=True)),
        torch.float32,
        hessians,
    )
    # GPTQ minimizes the Hessian-weighted error that the proxy measures.
    rtn_proxy = proxy_sensitivity(llama, groups, (INT4,), hessians, rtn)
    gptq_proxy = proxy_sensitivity(llama, groups, (INT4,), hessians, gptq)
    for group in groups:
        assert gptq_proxy[group.name][INT4.name] < rtn_proxy[group.name][INT4.name]
