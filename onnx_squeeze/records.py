"""The records every stage shares: what a pass did per node, what a pass may use, and the
metadata keys and node selection that every pass writes and reads the same way.

This module sits below everything else (passes, prepare, report, pipeline import it; it imports
no stage), so a record's meaning is written once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.service import Calibration
from onnx_squeeze.calibration.sources import CalibrationSource
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.shapes import InputShapes, concrete_input_shapes

# Metadata on every node a pass creates: the pass's name (provenance), and the node it was made
# from (a factorized layer's halves, a quantized copy), for matching student and teacher.
CREATED_BY_KEY = "onnx_squeeze.pass"
SOURCE_NODE_KEY = "onnx_squeeze.source_node"
# On a value whose channels a pass removed: the axis and the original indices kept (JSON), so a
# later pass (recovery) can match the value to the teacher's.
KEPT_CHANNELS_KEY = "onnx_squeeze.kept_channels"
# On a node into which prepare folded a BatchNormalization: |gamma| / sqrt(var + eps) per output
# channel (JSON), for the BN-scale pruning criterion. Saved with the model.
BN_SCALE_KEY = "onnx_squeeze.bn_scale"


@dataclasses.dataclass
class NodeRecord:
    """What a pass did to one node, or why it left the node alone."""

    node: str
    op_type: str
    action: str  # e.g. "pruned", "factorized", "quantized", "folded", "skipped"
    detail: str = ""
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None

    @property
    def skipped(self) -> bool:
        return self.action == "skipped"


@dataclasses.dataclass
class PassReport:
    """The outcome of one pass: settings used, per-node records, free-form notes, wall time."""

    name: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[NodeRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def record(
        self, node: ir.Node | str, action: str, detail: str = "", **counts: int | None
    ) -> NodeRecord:
        """Append a record for ``node`` (a node or its name) and return it."""
        if isinstance(node, ir.Node):
            name, op_type = node.name or "", node.op_type
        else:
            name, op_type = node, counts.pop("op_type", "")  # type: ignore[assignment]
        entry = NodeRecord(name, str(op_type), action, detail, **counts)
        self.records.append(entry)
        return entry

    def skip(self, node: ir.Node | str, reason: str) -> NodeRecord:
        """Record that ``node`` was left alone and why."""
        return self.record(node, "skipped", reason)

    @property
    def changed(self) -> list[NodeRecord]:
        return [r for r in self.records if not r.skipped]

    @property
    def skipped(self) -> list[NodeRecord]:
        return [r for r in self.records if r.skipped]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PassContext:
    """What a pass may use besides the model.

    ``calibration`` is the run's calibration service (a source given here is wrapped in one;
    none given: random data drawn on first use, marked random);
    ``teacher`` is the prepared original model, for passes that fit the result to it;
    statistics that several passes share live in the service's store (``data.store``);
    ``shapes`` are the run's input shapes (from the options or the data), read through
    :meth:`input_shapes`. Weight tensors are shared with the teacher: replace a value's tensor,
    never write into it.
    """

    calibration: Calibration | CalibrationSource | None = None
    teacher: ir.Model | None = None
    providers: tuple[str, ...] = ("cpu",)
    seed: int = 0
    shapes: InputShapes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, Calibration):
            self.calibration = Calibration(self.calibration)

    @property
    def data(self) -> Calibration:
        """The calibration service, typed (``calibration`` is always one after construction)."""
        assert isinstance(self.calibration, Calibration)
        return self.calibration

    def require_teacher(self, pass_name: str) -> ir.Model:
        """The teacher, or the error that says how a pass that fits to it gets one."""
        if self.teacher is None:
            raise SettingsError(
                f"{pass_name} needs the original model as teacher: run it through compress() "
                "(onnx-squeeze compress), which provides it"
            )
        return self.teacher

    def input_shapes(self, model: ir.Model) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for ``model``; a :class:`ShapeUnknownError` with the ``--shape``
        hint when nothing gave a dimension (never a guessed 1)."""
        if self.shapes is None:
            return concrete_input_shapes(model)
        names = {value.name for value in model.graph.inputs}
        return {k: v for k, v in self.shapes.concrete().items() if k in names}


def mark_created(node: ir.Node, pass_name: str, source: ir.Node | None = None) -> None:
    """Tag a node a pass created with the pass's name and the node it was made from."""
    node.metadata_props[CREATED_BY_KEY] = pass_name
    if source is not None and source.name:
        node.metadata_props[SOURCE_NODE_KEY] = source.name


def unselected(name: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> str | None:
    """Why the node ``name`` is left out by a pass's ``include``/``exclude`` settings, or None.

    Both are lists of shell-style globs on node names (``fnmatch`` rules, case-sensitive:
    ``*`` any text, ``?`` one character, ``[ab]`` a set); a name without a glob character is
    an exact name. ``include`` empty means every node; ``exclude`` wins over ``include``.
    """
    hit = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if hit is not None:
        return f"excluded by {hit!r}"
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return "not matched by include"
    return None


def bn_scale(node: ir.Node) -> np.ndarray | None:
    """The folded BatchNormalization scale ``|gamma|/sqrt(var+eps)`` kept on ``node``, or None."""
    text = node.metadata_props.get(BN_SCALE_KEY)
    if text is None:
        return None
    return np.asarray(json.loads(text), dtype=np.float32)
