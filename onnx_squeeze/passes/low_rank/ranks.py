"""Rank selection: per layer at an energy, rank or ratio, or across layers under a MACs or
parameter budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from onnx_squeeze.passes.low_rank.plans import Candidate, Plan, Rank, original_cost


@dataclasses.dataclass
class Option:
    """One plan at one rank, with what it keeps and costs."""

    plan: Plan
    rank: Rank
    energy: float
    macs: int
    params: int

    @classmethod
    def of(cls, plan: Plan, rank: Rank) -> Option:
        return cls(plan, rank, plan.energy(rank), *plan.cost(rank))


def unprofitable(option: Option, why: str = "") -> str:
    rank = "/".join(map(str, option.rank))
    macs = original_cost(option.plan.candidate)[0]
    return (
        f"{why}{option.plan.scheme} rank {rank} costs {option.macs} MACs, "
        f"not fewer than the original {macs}"
    )


def cheapest_with_energy(plans: Sequence[Plan], energy: float, multiple: int) -> Option:
    options = [Option.of(plan, rank) for plan in plans for rank in plan.ranks(multiple)]
    meeting = [option for option in options if option.energy >= energy - 1e-9]
    return min(meeting, key=lambda option: (option.macs, -option.energy))


def allocate(
    candidates: dict[Candidate, list[Option]], metric: str, goal: float, fixed: float, total: float
) -> tuple[dict[Candidate, Option | None], float]:
    """Per layer the option (None: keep it whole) minimising energy lost + λ·cost, with the
    smallest λ whose total cost (plus ``fixed``) meets ``goal``; and that total."""

    def pick(weight: float) -> tuple[dict[Candidate, Option | None], float]:
        chosen: dict[Candidate, Option | None] = {}
        spent = fixed
        for layer, options in candidates.items():
            whole = original_cost(layer)[0 if metric == "macs" else 1]
            best, best_score, best_cost = None, weight * whole / total, whole
            for option in options:
                cost = option.macs if metric == "macs" else option.params
                score = 1 - option.energy + weight * cost / total
                if score < best_score:
                    best, best_score, best_cost = option, score, cost
            chosen[layer] = best
            spent += best_cost
        return chosen, spent

    low, high = 0.0, 1.0
    while pick(high)[1] > goal and high < 1e9:
        low, high = high, high * 4
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if pick(middle)[1] <= goal else (middle, high)
    return pick(high)
