"""compress.search: exact storage costs of each format, and the allocation front against brute
force on random instances."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from compress.quant.config import PER_CHANNEL
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec
from compress.quant.rtn import rtn_quantize
from compress.search.allocate import (
    Allocation,
    Option,
    lowest_kl_within,
    pareto_front,
    smallest_within,
)
from compress.search.candidates import (
    DEFAULT_FORMATS,
    KEEP_16,
    Format,
    candidate_formats,
    fits,
    storage_bytes,
)

# --------------------------------------------------------------------------- storage costs

SHAPES = [(96, 128), (40, 576), (33, 64)]


QUANTIZED = [f for f in DEFAULT_FORMATS if f.bits != 16] + [Format(4, 32, True), Format(8, 64)]


@pytest.mark.parametrize(
    "fmt,out_features,in_features",
    [(f, n, k) for f in QUANTIZED for n, k in SHAPES if fits(f, k)],
    ids=lambda v: v.name if isinstance(v, Format) else str(v),
)
def test_storage_bytes_are_the_bytes_quantlinear_stores(fmt, out_features, in_features):
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    spec = QuantSpec(fmt.bits, fmt.group_size, fmt.symmetric)
    layer = QuantLinear.from_packed(
        rtn_quantize(weight, spec, torch.bfloat16), spec, None, torch.bfloat16
    )
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert storage_bytes(fmt, out_features, in_features) == stored


def test_a_kept_layer_costs_its_16_bit_weights():
    assert storage_bytes(KEEP_16, 96, 128) == 96 * 128 * 2


def test_formats_a_shape_cannot_take_are_left_out():
    names = [f.name for f in candidate_formats(576)]  # 576 = 9 × 64: no group of 128
    assert names == ["int4-g32-asym", "int4-g64-asym", "int8-channel-sym", "keep"]
    with pytest.raises(ValueError, match="does not fit"):
        storage_bytes(Format(4, 128, False), 8, 576)
    assert Format(8, PER_CHANNEL).name == "int8-channel-sym"


# --------------------------------------------------------------------------- the front


def random_groups(seed: int, groups: int = 5, options: int = 3) -> list[list[Option]]:
    rng = random.Random(seed)
    return [
        [Option(rng.randrange(1, 200), rng.random()) for _ in range(options)] for _ in range(groups)
    ]


def brute_force(groups: list[list[Option]]) -> list[Allocation]:
    every = []
    for choices in itertools.product(*(range(len(g)) for g in groups)):
        picked = [g[c] for g, c in zip(groups, choices, strict=True)]
        every.append(Allocation(sum(o.bytes for o in picked), sum(o.kl for o in picked), choices))
    return every


def optimum_within(every: list[Allocation], max_bytes: int) -> float:
    return min((a.kl for a in every if a.bytes <= max_bytes), default=float("inf"))


@pytest.mark.parametrize("seed", range(25))
def test_the_front_is_exact(seed):
    groups = random_groups(seed)
    every = brute_force(groups)
    front = pareto_front(groups)
    for point in front:  # consistent with its choices, and dominated by nothing
        picked = [g[c] for g, c in zip(groups, point.choices, strict=True)]
        assert point.bytes == sum(o.bytes for o in picked)
        assert point.kl == pytest.approx(sum(o.kl for o in picked))
        assert not any(a.bytes <= point.bytes and a.kl < point.kl - 1e-12 for a in every)
    for budget in range(0, 1001, 37):  # the best under every budget is on it
        best = lowest_kl_within(front, budget)
        expected = optimum_within(every, budget)
        assert (best.kl if best else float("inf")) == pytest.approx(expected)
    target = sorted(a.kl for a in every)[len(every) // 2]
    cheapest = smallest_within(front, target)
    assert cheapest.bytes == min(a.bytes for a in every if a.kl <= target)
    assert [p.bytes for p in front] == sorted(p.bytes for p in front)
    assert all(a.kl > b.kl for a, b in itertools.pairwise(front))


@pytest.mark.parametrize("seed", range(10))
def test_bucketed_costs_lose_less_than_a_bucket_per_group(seed):
    groups = random_groups(seed, groups=6)
    every = brute_force(groups)
    resolution = 16
    front = pareto_front(groups, resolution=resolution)
    assert len(front) <= sum(max(o.bytes for o in g) for g in groups) // resolution + 1
    slack = len(groups) * resolution
    for budget in range(0, 1201, 41):
        found = lowest_kl_within(front, budget + slack)
        expected = optimum_within(every, budget)
        assert (found.kl if found else float("inf")) <= expected + 1e-12


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="group 1 has no option"):
        pareto_front([[Option(1, 0.1)], []])
    with pytest.raises(ValueError, match="finite KL"):
        pareto_front([[Option(1, float("nan"))]])
    with pytest.raises(ValueError, match="resolution"):
        pareto_front([[Option(1, 0.1)]], resolution=0)
