"""Per-layer format allocation: the exact Pareto front of (bytes, predicted KL).

Each group (a layer, or layers that must share a format, e.g. q/k/v) offers options
`(bytes, predicted KL)`; an allocation picks one option per group. Predicted KL is additive
over groups (the search measures how well that holds). The front is every allocation that no
other beats on both bytes and KL; the smallest artifact under a KL target and the lowest KL
under a byte budget both lie on it.

Built group by group, as a multiple-choice knapsack by dynamic programming: the front of the
first i groups, combined with every option of group i + 1, pruned to its non-dominated
points. That is exact, because an allocation whose prefix is dominated is itself dominated
(replace the prefix). With `resolution` > 1, costs are bucketed: of the partial allocations
whose running cost falls in one bucket of `resolution` bytes only the lowest KL is kept, which
bounds the front's size by total bytes / resolution; then for any budget B the front holds an
allocation of KL at most the exact optimum at B that costs less than B + groups × resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    bytes: int
    kl: float


@dataclass(frozen=True)
class Allocation:
    """One point of the front: total bytes, predicted KL, and the option index of each group."""

    bytes: int
    kl: float
    choices: tuple[int, ...]


@dataclass(frozen=True)
class _State:
    bytes: int
    kl: float
    parent: int  # index into the previous step's states (-1 at the start)
    option: int


def _check(groups: Sequence[Sequence[Option]], resolution: int) -> None:
    if resolution < 1:
        raise ValueError(f"resolution must be ≥ 1 byte, got {resolution}")
    for index, options in enumerate(groups):
        if not options:
            raise ValueError(f"group {index} has no option")
        bad = [o for o in options if o.bytes < 0 or not math.isfinite(o.kl)]
        if bad:
            raise ValueError(f"group {index}: options need bytes ≥ 0 and a finite KL: {bad}")


def _non_dominated(states: list[_State], resolution: int) -> list[_State]:
    """Sorted by bytes, each with a lower KL than every cheaper one; per bucket of
    `resolution` bytes only the lowest KL."""
    best: dict[int, _State] = {}
    for state in states:
        bucket = -(-state.bytes // resolution)
        kept = best.get(bucket)
        if kept is None or (state.kl, state.bytes) < (kept.kl, kept.bytes):
            best[bucket] = state
    front: list[_State] = []
    for state in sorted(best.values(), key=lambda s: (s.bytes, s.kl)):
        if not front or state.kl < front[-1].kl:
            front.append(state)
    return front


def pareto_front(groups: Sequence[Sequence[Option]], *, resolution: int = 1) -> list[Allocation]:
    """The front, cheapest first (module docstring); exact with `resolution` 1."""
    _check(groups, resolution)
    steps: list[list[_State]] = []
    previous = [_State(0, 0.0, -1, -1)]
    for options in groups:
        combined = [
            _State(state.bytes + option.bytes, state.kl + option.kl, parent, index)
            for parent, state in enumerate(previous)
            for index, option in enumerate(options)
        ]
        previous = _non_dominated(combined, resolution)
        steps.append(previous)
    return [_allocation(steps, end) for end in range(len(previous))]


def _allocation(steps: list[list[_State]], end: int) -> Allocation:
    choices = []
    index = end
    for states in reversed(steps):
        state = states[index]
        choices.append(state.option)
        index = state.parent
    last = steps[-1][end]
    return Allocation(bytes=last.bytes, kl=last.kl, choices=tuple(reversed(choices)))


def lowest_kl_within(front: Sequence[Allocation], max_bytes: int) -> Allocation | None:
    """The allocation of least predicted KL that costs at most `max_bytes`; None if none does."""
    within = [a for a in front if a.bytes <= max_bytes]
    return min(within, key=lambda a: a.kl) if within else None


def smallest_within(front: Sequence[Allocation], max_kl: float) -> Allocation | None:
    """The cheapest allocation of predicted KL at most `max_kl`; None if none reaches it."""
    within = [a for a in front if a.kl <= max_kl]
    return min(within, key=lambda a: a.bytes) if within else None
