"""The settings of ``prune_channels``, beside the pass so that the planning modules can read
them without importing the pass."""

from __future__ import annotations

import dataclasses

from onnx_squeeze.passes.base import bounded, choice
from onnx_squeeze.passes.prune_channels.criteria import CRITERIA

MODES = ("remove", "zero")
ALLOCATIONS = ("sensitivity", "uniform")


@dataclasses.dataclass
class PruneChannelsSettings:
    """``ratio``: share of channels removed from each prunable group (ranked across all groups
    when ``global_ranking``); ``macs_target``: share of the model's MACs to remove instead;
    with none of ``ratio``, ``macs_target`` and ``latency_target`` given, the default removes up
    to 30 % of the MACs, as much as still meets the fidelity gate (:mod:`.gate_search`);
    ``round_to``: kept counts are multiples of this (0: 8 for groups of 32+ channels, else 1);
    ``protect``: node names whose groups are left alone. ``allocation`` spreads a MACs target:
    ``sensitivity`` (each group measured alone on ``sensitivity_batches`` calibration batches,
    random data when none is given; cheapest output error per MAC first, measured again on top
    of the channels already removed in each of ``sensitivity_rounds`` parts) or ``uniform`` (one
    ratio for every group). ``split_heads`` follows channels through the Reshapes that split
    them into attention heads, so the head size shrinks (same in every head; queries and keys
    together). ``latency_target``: share of the model's time (``latency_batch`` samples, 1
    thread) to remove instead of MACs: channels priced by each node's profiled time, the plan
    checked by timing the pruned model and made again until it saves the target."""

    mode: str = choice("remove", MODES)  # "remove" channels, or "zero" their weights in place
    # which channels go first: weight norms (l1, l2), BN scale, activation statistics, or
    # reconstruction (those the next layer can best make up for)
    criterion: str = choice("l1", sorted(CRITERIA))
    ratio: float | None = bounded(None, low=0, below=1)
    global_ranking: bool = False
    macs_target: float | None = bounded(None, low=0, below=1)
    latency_target: float | None = bounded(None, low=0, below=1)
    latency_batch: int = bounded(1, low=1)
    min_channels: int = bounded(1, low=1)  # the fewest channels a group keeps
    round_to: int = bounded(0, low=0)
    protect: list[str] = dataclasses.field(default_factory=list)
    calibration_batches: int = bounded(8, low=1)
    allocation: str = choice("sensitivity", ALLOCATIONS)
    sensitivity_batches: int = bounded(4, low=1)
    sensitivity_rounds: int = bounded(1, low=1)
    split_heads: bool = True
    # the default's gate, a --check expression (empty: verdict.DEFAULT_GATE; the run aims it
    # at the checks the user gives)
    target: str = ""
    # the default judges its candidates recovered by reconstruct (on the calibration data but
    # the batches held back to judge on) and keeps the one recovered: set when recovery follows
    recover: bool = False
    gate_steps: int = bounded(3, low=1)  # candidates the default tries: 30 %, then bisection
