"""The pass contract: typed settings, one entry point, a report of what changed per node.

onnx-ir's own ``PassManager`` only keeps a ``modified`` flag; our pipeline needs per-node records
(what was done, parameters and MACs before/after, or why a node was skipped), so a pass here
returns a :class:`~onnx_squeeze.records.PassReport` instead.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import numbers
import time
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.layers import WEIGHT_OPS
from onnx_squeeze.records import PassContext, PassReport

logger = logging.getLogger(__name__)  # under onnx_squeeze: the CLI's -q/-v reach it


class Pass(abc.ABC):
    """Base class of compression passes.

    Subclasses set ``name`` and ``Settings`` (a dataclass whose fields are the pass's options,
    with defaults) and implement :meth:`apply`. Settings are validated when the pass is made, so
    a bad recipe fails before any work is done: first what the fields declare (:func:`choice`,
    :func:`subset`, :func:`bounded`), then :meth:`validate` for what spans several fields.
    """

    name: ClassVar[str]
    Settings: ClassVar[type]
    min_opset: ClassVar[int] = 0  # default-domain opset the pass's output needs
    # whether the pass rewrites layers inside If/Loop/Scan bodies; one that does not warns
    # when weight layers sit there (a stateful model's whole body can be an If branch)
    reaches_subgraphs: ClassVar[bool] = False

    def __init__(self, **settings: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise SettingsError(
                f"pass {self.name!r} has no setting {', '.join(unknown)}; "
                f"its settings are: {', '.join(sorted(fields)) or 'none'}"
            )
        settings = _read(self.name, self.Settings, settings)
        try:
            self.settings = self.Settings(**settings)
        except (TypeError, ValueError) as error:
            raise SettingsError(f"pass {self.name!r}: {error}") from None
        _check_fields(self.name, self.settings)
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check what the fields cannot declare alone (settings that depend on each other, an
        installed package); raise :class:`SettingsError` with the fix when invalid."""

    def __call__(self, model: ir.Model, context: PassContext | None = None) -> PassReport:
        report = PassReport(self.name, dataclasses.asdict(self.settings))
        context = context or PassContext()
        context.data.draw_random_for(model, context.input_shapes, seed=context.seed)
        start = time.perf_counter()
        logger.info("%s: running", self.name)
        self.apply(model, context, report)
        report.seconds = time.perf_counter() - start
        logger.info("%s: done in %.1f s", self.name, report.seconds)
        unreached = 0 if self.reaches_subgraphs else _layers_in_subgraphs(model)
        if unreached:
            report.notes.append(
                f"WARNING: {unreached} weight layers sit inside If/Loop/Scan bodies, which "
                f"{self.name} does not reach: they are left as they were"
            )
        return report

    @abc.abstractmethod
    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        """Rewrite ``model`` in place and add records to ``report``."""


def _layers_in_subgraphs(model: ir.Model) -> int:
    """Weight layers (Conv, ConvTranspose, Gemm, MatMul) inside subgraph bodies."""
    return sum(node.op_type in WEIGHT_OPS for graph in model.graph.subgraphs() for node in graph)


# ---------------------------------------------------------------------------------------------
# Declared settings: a field says which values it takes, and every pass reports a miss alike,
# "<pass>: <setting> must be ..., got <value>".

_CHECK = "onnx_squeeze.check"  # field metadata: (value, hinted types) -> what is wrong, or None
_NAMES = "onnx_squeeze.names"  # field metadata: a list of names, where one name means [name]


def choice(default: Any, options: Iterable[Any]) -> Any:
    """A setting that takes one of ``options``."""
    options = tuple(options)

    def problem(value: Any, kinds: tuple[type, ...]) -> str | None:
        if value in options:
            return None
        return f"must be one of {_listed(options)}, got {value!r}"

    return dataclasses.field(default=default, metadata={_CHECK: problem})


def subset(default: Iterable[str], options: Iterable[str], *, nonempty: bool = False) -> Any:
    """A list setting whose names are among ``options`` (at least one when ``nonempty``); a
    single name given alone stands for a list of one. Declare it ``Sequence[str]``: passes
    only read it."""
    default, options = list(default), tuple(options)

    def problem(value: Any, kinds: tuple[type, ...]) -> str | None:
        if not isinstance(value, list | tuple):
            return f"must be a list, got {value!r}"
        unknown = [name for name in value if name not in options]
        if unknown:
            return f"must hold only {_listed(options)}, got {_listed(map(repr, unknown))}"
        if nonempty and not value:
            return f"must hold at least one of {_listed(options)}"
        return None

    return dataclasses.field(
        default_factory=lambda: list(default), metadata={_CHECK: problem, _NAMES: True}
    )


def bounded(
    default: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A number setting within bounds: ``low``/``high`` inclusive, ``above``/``below``
    exclusive. An integer when its type is; None passes where the type allows it (unset)."""
    assert low is None or above is None, "give low or above"
    assert high is None or below is None, "give high or below"
    bound = _range(low, high, above, below)

    def problem(value: Any, kinds: tuple[type, ...]) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number, got {value!r}"
        if int in kinds and float not in kinds and not isinstance(value, numbers.Integral):
            return f"must be an integer, got {value!r}"
        inside = (
            (low is None or value >= low)
            and (high is None or value <= high)
            and (above is None or value > above)
            and (below is None or value < below)
        )
        return None if inside else f"must be {bound}, got {value!r}"

    return dataclasses.field(default=default, metadata={_CHECK: problem})


def _range(low: float | None, high: float | None, above: float | None, below: float | None) -> str:
    """``[0, 1)``-style words for a range; one-sided ranges as "at least 1", "> 0"."""
    start = "[" if low is not None else "(" if above is not None else ""
    end = "]" if high is not None else ")" if below is not None else ""
    first = low if low is not None else above
    last = high if high is not None else below
    if start and end:
        return f"in {start}{first}, {last}{end}"
    if start:
        return f"at least {first}" if start == "[" else f"> {first}"
    return f"at most {last}" if end == "]" else f"< {last}"


def _listed(items: Iterable[Any]) -> str:
    return ", ".join(map(str, items))


def _kinds(hint: Any) -> tuple[type, ...]:
    """The types a settings field's hint allows (``int | None`` -> ``(int, NoneType)``)."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _read(name: str, kind: type, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as the fields take them: text given for a float-only setting read as a
    number (YAML reads ``1e-3``, no dot, as text, so ``--pass finetune:learning_rate=1e-3``
    arrives as a string), and one name given to a list of names as a list of one."""
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind) if f.metadata.get(_NAMES)}
    read = dict(settings)
    for key, value in settings.items():
        allowed = _kinds(hints[key])
        if isinstance(value, str) and key in names:
            read[key] = [value]
        elif isinstance(value, str) and float in allowed and str not in allowed:
            try:
                read[key] = float(value)
            except ValueError:
                raise SettingsError(f"{name}: {key} must be a number, got {value!r}") from None
    return read


def _check_fields(name: str, settings: Any) -> None:
    """Raise :class:`SettingsError` for the first field whose value its declaration refuses."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        problem = field.metadata.get(_CHECK)
        value = getattr(settings, field.name)
        kinds = _kinds(hints[field.name])
        if problem is None or (value is None and type(None) in kinds):
            continue
        if (message := problem(value, kinds)) is not None:
            raise SettingsError(f"{name}: {field.name} {message}")


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
