"""The pass contract: typed settings, one entry point, and a report of what changed per node.

onnx-ir's own ``PassManager`` only keeps a ``modified`` flag; our pipeline needs per-node records
(what was done, parameters and MACs before/after, or why a node was skipped), so a pass here
returns a :class:`PassReport` instead.
"""

from __future__ import annotations

import abc
import dataclasses
import time
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from onnx_squeeze.analysis import InputShapes, concrete_input_shapes
from onnx_squeeze.errors import SettingsError

# Metadata key set on every node a pass creates, naming the pass (provenance).
CREATED_BY_KEY = "onnx_squeeze.pass"


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

    ``calibration`` is a calibration source (see :mod:`onnx_squeeze.calibration`) or None;
    ``teacher`` is the prepared original model, for passes that fit the result to it;
    ``cache`` holds statistics that several passes can share (keyed by what they measured);
    ``shapes`` are the run's input shapes (from the options or the data), read through
    :meth:`input_shapes`. Weight tensors are shared with the teacher: replace a value's tensor,
    never write into it.
    """

    calibration: Any = None
    teacher: ir.Model | None = None
    providers: tuple[str, ...] = ("cpu",)
    seed: int = 0
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    shapes: InputShapes | None = None

    def input_shapes(self, model: ir.Model) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for ``model``; a :class:`ShapeUnknownError` with the ``--shape``
        hint when nothing gave a dimension (never a guessed 1)."""
        if self.shapes is None:
            return concrete_input_shapes(model)
        names = {value.name for value in model.graph.inputs}
        return {k: v for k, v in self.shapes.concrete().items() if k in names}


class Pass(abc.ABC):
    """Base class of compression passes.

    Subclasses set ``name`` and ``Settings`` (a dataclass whose fields are the pass's options,
    with defaults) and implement :meth:`apply`. Settings are validated when the pass is made, so
    a bad recipe fails before any work is done.
    """

    name: ClassVar[str]
    Settings: ClassVar[type]
    min_opset: ClassVar[int] = 0  # default-domain opset the pass's output needs

    def __init__(self, **settings: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise SettingsError(
                f"pass {self.name!r} has no setting {', '.join(unknown)}; "
                f"its settings are: {', '.join(sorted(fields)) or 'none'}"
            )
        settings = _numbers_read(self.name, self.Settings, settings)
        try:
            self.settings = self.Settings(**settings)
        except (TypeError, ValueError) as error:
            raise SettingsError(f"pass {self.name!r}: {error}") from None
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check the settings; raise :class:`SettingsError` with the fix when they are invalid."""

    def __call__(self, model: ir.Model, context: PassContext | None = None) -> PassReport:
        report = PassReport(self.name, dataclasses.asdict(self.settings))
        start = time.perf_counter()
        self.apply(model, context or PassContext(), report)
        report.seconds = time.perf_counter() - start
        return report

    @abc.abstractmethod
    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        """Rewrite ``model`` in place and add records to ``report``."""


def _numbers_read(name: str, kind: type, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with text given for a float-only setting read as a number: YAML reads
    ``1e-3`` (no dot) as text, so ``--pass finetune:learning_rate=1e-3`` arrives as a string."""
    hints = typing.get_type_hints(kind)
    read = dict(settings)
    for key, value in settings.items():
        hint = hints[key]
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        allowed = typing.get_args(hint) if union else (hint,)
        if isinstance(value, str) and float in allowed and str not in allowed:
            try:
                read[key] = float(value)
            except ValueError:
                raise SettingsError(
                    f"pass {name!r}: {key} must be a number, got {value!r}"
                ) from None
    return read


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator that makes a pass available to recipes and the CLI by its ``name``."""
    PASS_REGISTRY[cls.name] = cls
    return cls


def make_pass(name: str, settings: Mapping[str, Any] | None = None) -> Pass:
    """Instantiate a registered pass by name."""
    if name not in PASS_REGISTRY:
        from onnx_squeeze.passes import load_all

        load_all()
    if name not in PASS_REGISTRY:
        known = ", ".join(sorted(PASS_REGISTRY)) or "none yet"
        raise SettingsError(f"unknown pass {name!r}; available passes: {known}")
    return PASS_REGISTRY[name](**dict(settings or {}))


def mark_created(node: ir.Node, pass_name: str) -> None:
    """Tag a node created by a pass with the pass's name (provenance)."""
    node.metadata_props[CREATED_BY_KEY] = pass_name
