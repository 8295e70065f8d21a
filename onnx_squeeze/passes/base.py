"""The pass contract: typed settings, one entry point, a report of what changed per node.

onnx-ir's own ``PassManager`` only keeps a ``modified`` flag; our pipeline needs per-node records
(what was done, parameters and MACs before/after, or why a node was skipped), so a pass here
returns a :class:`~onnx_squeeze.records.PassReport` instead.
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

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.records import PassContext, PassReport


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
        context = context or PassContext()
        context.data.draw_random_for(model, context.input_shapes, seed=context.seed)
        start = time.perf_counter()
        self.apply(model, context, report)
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
