"""Recipes: an ordered list of passes with their settings, from Python, YAML/JSON or the CLI.

A recipe file looks like::

    prepare: {simplify: true, fold_batchnorm: true}
    passes:
      - prune_channels: {ratio: 0.3}
      - pass: quantize_int8
        calibration: percentile

Each pass is validated when the recipe is built, so a typo fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.passes.base import Pass, make_pass

# Named recipes usable as --recipe NAME: the common jobs, one word each. They are meant to run
# with --calib (real data is what makes the lossy ones usable); int8, fast and reconstruct fall
# back to random inputs with a warning without it, int4 (GPTQ) and fast-transformer ask for it.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"passes": []},
    "int8": {"passes": ["quantize_int8"]},
    "int8-dynamic": {"passes": ["quantize_dynamic"]},
    "fp16": {"passes": ["fp16"]},
    "int4": {"passes": [{"quantize_weights": {"bits": 4, "algorithm": "gptq"}}]},
    # up to 30 % of the MACs pruned, as much as meets the gate after recovery, then INT8
    "fast": {"passes": [{"prune_channels": {"recover": True}}, "quantize_int8"]},
    "fast-transformer": {
        "passes": [
            {"low_rank": {"macs_target": 0.3, "data_aware": True}},
            "reconstruct",
            "quantize_dynamic",
        ]
    },
}


@dataclasses.dataclass
class Step:
    """One pass of a recipe: its registered name and settings."""

    name: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self) -> Pass:
        return make_pass(self.name, self.settings)


@dataclasses.dataclass
class Recipe:
    """Prepare settings plus an ordered list of steps."""

    steps: list[Step] = dataclasses.field(default_factory=list)
    prepare: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.passes()  # validate every step now

    def passes(self) -> list[Pass]:
        """Instantiate the passes in order (raises SettingsError for a bad step)."""
        return [step.build() for step in self.steps]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Sequence[Any], where: str = "recipe") -> Recipe:
        """Build from the parsed form of a recipe file (a mapping, or a bare list of passes)."""
        if isinstance(data, Sequence) and not isinstance(data, str):
            data = {"passes": list(data)}
        if not isinstance(data, Mapping):
            raise SettingsError(f"{where}: expected a mapping with a 'passes' list")
        unknown = sorted(set(data) - {"passes", "prepare"})
        if unknown:
            raise SettingsError(
                f"{where}: unknown key(s) {', '.join(unknown)}; use 'prepare' and 'passes'"
            )
        prepare = data.get("prepare") or {}
        if not isinstance(prepare, Mapping):
            raise SettingsError(f"{where}: 'prepare' must be a mapping of settings")
        steps = [
            _parse_step(item, f"{where}: passes[{index}]")
            for index, item in enumerate(data.get("passes") or [])
        ]
        return cls(steps=steps, prepare=dict(prepare))

    @classmethod
    def load(cls, source: str | os.PathLike) -> Recipe:
        """A preset name or a YAML/JSON recipe file."""
        text = os.fspath(source)
        if text in PRESETS:
            return cls.from_dict(PRESETS[text], where=f"preset {text!r}")
        path = Path(text)
        if not path.is_file():
            raise SettingsError(
                f"recipe {text!r} is neither a file nor a preset; presets: {', '.join(sorted(PRESETS))}"
            )
        try:
            data = (
                json.loads(path.read_text())
                if path.suffix == ".json"
                else yaml.safe_load(path.read_text())
            )
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise SettingsError(
                f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}"
            ) from None
        return cls.from_dict(data or {}, where=str(path))

    @classmethod
    def from_cli(cls, items: Iterable[str]) -> Recipe:
        """Steps from ``--pass NAME[:key=value,key=value]`` flags.

        Values are YAML scalars (``0.3``, ``true``, ``mse``); a list is ``[a,b]``; a value
        YAML cannot read (a glob such as ``*stft*``) is taken as the text written.
        """
        steps = []
        for item in items:
            name, _, settings_text = item.partition(":")
            settings: dict[str, Any] = {}
            for pair in _split_top_level(settings_text):
                key, sep, value = pair.partition("=")
                if not sep or not key.strip():
                    raise SettingsError(
                        f"--pass {item!r}: write settings as key=value, e.g. {name}:ratio=0.3 "
                        "(a list as key=[a,b])"
                    )
                settings[key.strip()] = _cli_value(value.strip())
            steps.append(Step(name.strip(), settings))
        return cls(steps=steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prepare": dict(self.prepare),
            "passes": [{"pass": s.name, **s.settings} for s in self.steps],
        }


def _split_top_level(text: str) -> list[str]:
    """``text`` cut at the commas outside brackets and quotes, empty pieces dropped."""
    pieces, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth <= 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return [piece for piece in pieces if piece.strip()]


def _cli_value(text: str) -> Any:
    """One ``--pass`` value: a YAML scalar, a ``[a,b]`` list of them, or the text itself."""
    if text.startswith("[") and text.endswith("]"):
        return [_cli_value(piece.strip()) for piece in _split_top_level(text[1:-1])]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) else value  # 'a: b' is text, not a mapping


def _parse_step(item: Any, where: str) -> Step:
    if isinstance(item, str):
        return Step(item)
    if isinstance(item, Mapping):
        if "pass" in item:
            settings = {k: v for k, v in item.items() if k != "pass"}
            return Step(str(item["pass"]), settings)
        if len(item) == 1:
            ((name, settings),) = item.items()
            if settings is not None and not isinstance(settings, Mapping):
                raise SettingsError(f"{where}: settings of {name!r} must be a mapping")
            return Step(str(name), dict(settings or {}))
    raise SettingsError(f"{where}: write a pass as '- NAME: {{settings}}' or '- pass: NAME'")
