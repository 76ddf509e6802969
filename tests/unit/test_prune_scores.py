"""Pruning scores and selection: pure functions on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.prune.scores import (
    Projections,
    UnitStats,
    cosine_distance_sum,
    element_scores,
    expand_units,
    head_output_energy,
    keep_top,
    keep_top_per_group,
    layers_to_remove,
    unit_scores,
)
from compress.prune.statistics import COLUMN_OWNED, ROW_OWNED, collect_statistics


def _ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> Projections:
    return Projections(rows=(gate, up), columns=(down,))


@pytest.mark.parametrize("norm", [1, 2])
def test_magnitude_is_the_norm_of_everything_a_unit_owns(norm):
    torch.manual_seed(0)
    gate, up, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    scores = unit_scores(
        element_scores(_ffn(gate, up, down), "magnitude", UnitStats(), norm), 1, "magnitude", norm
    )
    for j in range(6):
        owned = torch.cat([gate[j], up[j], down[:, j]])
        assert scores[j] == pytest.approx(
            float(torch.linalg.vector_norm(owned, ord=norm)), rel=1e-5
        )


def test_magnitude_of_a_head_spans_its_head_dim_rows_and_columns():
    torch.manual_seed(0)
    head_dim, heads = 4, 3
    q, o = torch.randn(heads * head_dim, 8), torch.randn(8, heads * head_dim)
    elements = element_scores(Projections((q,), (o,)), "magnitude", UnitStats(), 2)
    scores = unit_scores(elements, head_dim, "magnitude", 2)
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        expected = torch.cat([q[rows].reshape(-1), o[:, rows].reshape(-1)]).norm()
        assert scores[h] == pytest.approx(float(expected), rel=1e-5)


def test_activation_scores_of_a_channel_are_input_norm_times_output_column_norm():
    down = torch.ones(4, 3)  # every channel has the same outgoing weights
    input_sq = torch.tensor([4.0, 0.0, 9.0])  # ‖x‖ = 2, 0, 3
    elements = element_scores(
        _ffn(torch.zeros(3, 4), torch.zeros(3, 4), down),
        "activation",
        UnitStats(input_sq=input_sq),
        2,
    )
    # ‖x_j‖ · ‖down[:, j]‖₂ = ‖x_j‖ · 2
    torch.testing.assert_close(elements, torch.tensor([4.0, 0.0, 6.0]))
    assert keep_top(unit_scores(elements, 1, "activation"), 2).tolist() == [0, 2]


def test_head_output_energy_is_the_heads_contribution_to_the_residual_stream():
    torch.manual_seed(0)
    heads, head_dim, hidden, tokens = 3, 4, 6, 50
    activations = torch.randn(tokens, heads, head_dim)  # o_proj's input, per head
    activations[:, 1] *= 0.1  # head 1 is quiet
    o_weight = torch.randn(hidden, heads * head_dim)
    gram = torch.einsum("nhd,nhe->hde", activations, activations)
    energy = head_output_energy(o_weight, gram)
    for h in range(heads):
        columns = o_weight[:, h * head_dim : (h + 1) * head_dim]  # (hidden, D)
        contribution = activations[:, h] @ columns.T  # (tokens, hidden): what head h adds
        assert energy[h] == pytest.approx(float(contribution.pow(2).sum()), rel=1e-4)
    assert int(energy.argmin()) == 1


def test_taylor_scores_sum_signed_terms_before_the_absolute_value():
    stats = UnitStats(
        taylor_rows=(torch.tensor([1.0, -2.0]), torch.tensor([0.5, -1.0])),
        taylor_columns=(torch.tensor([-3.0, 0.0]),),
    )
    dummy = _ffn(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(1, 2))
    scores = unit_scores(element_scores(dummy, "taylor", stats), 1, "taylor")
    torch.testing.assert_close(scores, torch.tensor([1.5, 3.0]))  # |1+0.5-3|, |-2-1+0|


def test_data_driven_criteria_refuse_missing_statistics():
    dummy = _ffn(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="input statistics"):
        element_scores(dummy, "activation", UnitStats())
    with pytest.raises(ValueError, match="gradient statistics"):
        element_scores(dummy, "taylor", UnitStats())


def test_keep_top_returns_ascending_indices_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, 2.0, 0.5, 1.0, 0.5])
    assert keep_top(scores, 2).tolist() == [1, 3]
    assert keep_top(scores, 3).tolist() == [0, 1, 3]  # the first of the tied 0.5s
    assert keep_top(scores, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        keep_top(scores, 0)


def test_keep_top_per_group_keeps_the_same_count_in_every_group():
    # Two KV groups of three query heads; group 0's best are 0 and 2, group 1's are 3 and 4.
    scores = torch.tensor([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])
    assert keep_top_per_group(scores, groups=2, keep_per_group=2).tolist() == [0, 2, 3, 4]
    # A global top-4 would take all three heads of group 1 and break the GQA grouping.
    assert keep_top(scores, 4).tolist() == [0, 3, 4, 5]


def test_expand_units_lists_each_units_elements():
    assert expand_units(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_layer_selection_takes_the_lowest_scores_and_later_layers_on_ties():
    scores = torch.tensor([0.9, 0.1, 0.3, 0.1, 0.5])
    assert layers_to_remove(scores, 1) == [3]
    assert layers_to_remove(scores, 2) == [1, 3]
    assert layers_to_remove(scores, 3) == [1, 2, 3]


def test_cosine_distance_is_zero_for_a_layer_that_changes_nothing():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    assert float(cosine_distance_sum(hidden, hidden)) == pytest.approx(0, abs=1e-5)
    assert float(cosine_distance_sum(hidden, 3 * hidden)) == pytest.approx(0, abs=1e-5)
    assert float(cosine_distance_sum(hidden, -hidden)) == pytest.approx(2 * 10, rel=1e-5)


def _tiny_llama(num_layers: int) -> LlamaForCausalLM:
    """4 query heads of 8 dims in 2 KV groups, 48 FFN channels, float32, seeded."""
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_taylor_statistics_equal_gradient_times_weight_over_all_batches():
    """The batch-by-batch reduction equals Σ g·w from the gradient of the summed losses."""
    model = _tiny_llama(num_layers=2)
    windows = torch.randint(0, 50, (6, 12), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(
        model, windows, 2, activations=False, gradients=True, layer_distances=False
    )
    assert all(p.grad is None for p in model.parameters())  # nothing left behind

    model.zero_grad()
    total = sum(model(input_ids=b, labels=b).loss for b in windows.split(2))
    total.backward()
    for index, layer in enumerate(model.model.layers):
        for name in (*ROW_OWNED, *COLUMN_OWNED):
            weight = layer.get_submodule(name).weight
            product = weight.grad * weight.detach()
            expected = product.sum(1) if name in ROW_OWNED else product.sum(0)
            torch.testing.assert_close(
                stats.layers[index].taylor[name], expected, rtol=1e-4, atol=1e-7
            )
    assert stats.tokens == windows.numel()


def test_activation_statistics_are_sums_of_squared_inputs():
    model = _tiny_llama(num_layers=1)
    windows = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(2))
    stats = collect_statistics(
        model, windows, 3, activations=True, gradients=False, layer_distances=True
    )
    captured = {}
    layer = model.model.layers[0]
    handles = [
        module.register_forward_pre_hook(lambda _m, a, name=name: captured.setdefault(name, a[0]))
        for name, module in (("down", layer.mlp.down_proj), ("o", layer.self_attn.o_proj))
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    expected = captured["down"].pow(2).sum((0, 1))
    torch.testing.assert_close(stats.layers[0].ffn_input_sq, expected, rtol=1e-5, atol=1e-6)
    heads = captured["o"].reshape(-1, 4, 8)  # (tokens, H, D)
    for h in range(4):
        gram = heads[:, h].T @ heads[:, h]
        torch.testing.assert_close(stats.layers[0].attention_gram[h], gram, rtol=1e-4, atol=1e-5)
    assert 0 < float(stats.layer_scores()[0]) < 2
