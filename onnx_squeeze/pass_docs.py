"""Every pass's settings as a user reads them (``onnx-squeeze passes``): name, type, default,
the values its declaration takes, and a one-line doc, all read from the settings dataclass
itself so that the listing cannot drift from the code.

A setting's doc is, in order: ``doc`` in the field's metadata; the comment beside the field;
the comment lines right above it; the clause of the class docstring that names it in double
backquotes (````ratio````: ...); another field's comment that names it so; the shared meaning
of a name many passes use alike (``include``, ``exclude``, ...). A test holds every setting of every pass to having one.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import re
import textwrap
import tokenize
import typing
from typing import Any

from onnx_squeeze.passes import load_all
from onnx_squeeze.passes.base import _CHECK, PASS_REGISTRY, Pass

# Names whose meaning is the same in every pass that has them.
SHARED_DOCS = {
    "include": "node-name globs the pass works on (fnmatch: * any text, ? one character); "
    "empty: every node",
    "exclude": "node-name globs the pass leaves alone (wins over include)",
    "op_types": "op types the pass works on",
    "exclude_op_types": "op types the pass leaves alone",
    "per_channel": "one scale per output channel (else one per tensor)",
    "calibration_batches": "batches of calibration data read",
    "seed": "random seed",
}


@dataclasses.dataclass(frozen=True)
class SettingDoc:
    """One setting of a pass, as ``onnx-squeeze passes`` lists it."""

    name: str
    type: str
    default: Any
    values: str  # what the declaration takes ("one of a, b", "in [0, 1)"), or ""
    doc: str  # "" when nothing documents it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PassDoc:
    name: str
    summary: str
    settings: list[SettingDoc]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "settings": [s.to_dict() for s in self.settings],
        }


def all_passes() -> list[PassDoc]:
    """Every registered pass, by name."""
    load_all()
    return [describe(PASS_REGISTRY[name]) for name in sorted(PASS_REGISTRY)]


def describe(cls: type[Pass]) -> PassDoc:
    """The documentation of one pass class."""
    settings = cls.Settings
    hints = typing.get_type_hints(settings)
    comments = {  # a base's fields (accuracy control's) documented where they are declared
        name: text
        for cls in reversed(settings.__mro__)
        for name, text in _field_comments(cls).items()
    }
    docstring = inspect.getdoc(settings) or ""
    rows = []
    for field in dataclasses.fields(settings):
        doc = (
            field.metadata.get("doc")
            or comments.get(field.name)
            or _docstring_clause(docstring, field.name)
            or _mentioned(comments, field.name)
            or SHARED_DOCS.get(field.name, "")
        )
        rows.append(
            SettingDoc(
                field.name,
                _type_name(hints[field.name]),
                _default(field),
                _values(field, hints[field.name]),
                doc,
            )
        )
    summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return PassDoc(cls.name, summary, rows)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    text = str(hint)
    for prefix in ("typing.", "collections.abc."):
        text = text.replace(prefix, "")
    # a Sequence setting takes a list (passes only read it)
    return text.replace("NoneType", "None").replace("Sequence[", "list[")


def _values(field: dataclasses.Field, hint: Any) -> str:
    """What the field's declaration accepts, in its own words: its check is asked about
    values no declaration takes, and its answer ("must be one of a, b, got ...") kept."""
    check = field.metadata.get(_CHECK)
    if check is None:
        return ""
    args = typing.get_args(hint)
    kinds = args if args and type(None) in args else (hint,)
    for probe in (math.nan, -(10**18), 10**18, [object()]):
        message = check(probe, kinds)
        if message and not message.startswith(_NOT_SAID):
            message = re.sub(r", got .*$", "", message, flags=re.S)
            return message.removeprefix("must be ").removeprefix("must hold only ")
    return ""


# answers to a probe of the wrong kind, which say nothing about the values taken
_NOT_SAID = ("must be a list", "must be a number", "must be an integer")


def _field_comments(settings: type) -> dict[str, str]:
    """Field name -> the comment beside it, else the comment lines right above it."""
    try:
        source = textwrap.dedent(inspect.getsource(settings))
    except (OSError, TypeError):  # no source (a frozen build): docs come from elsewhere
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    found: dict[str, str] = {}
    for number, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if not match or match.group(1) in found:
            continue
        if number in comments:
            found[match.group(1)] = comments[number]
            continue
        above = []
        index = number - 1
        while index in comments and index not in code_lines:
            above.insert(0, comments[index])
            index -= 1
        if above:
            found[match.group(1)] = " ".join(above)
    return found


def _mentioned(comments: dict[str, str], name: str) -> str:
    """Another field's comment that names ````name```` (one comment over a group of fields)."""
    return next((text for text in comments.values() if f"``{name}``" in text), "")


def _docstring_clause(docstring: str, name: str) -> str:
    """The clause of the class docstring that names ````name````: what follows
    ````name````: when the clause starts so, else the whole clause."""
    text = " ".join(docstring.split())
    for clause in re.split(r"(?<=[.;])\s+", text):
        if f"``{name}``" in clause:
            clause = re.sub(rf"^``{name}``\s*:\s*", "", clause)
            return clause.replace("``", "").rstrip(".;").strip()
    return ""
