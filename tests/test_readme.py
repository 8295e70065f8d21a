"""The README's examples run as written (in a scratch folder): the Python example does what it
says, and every shell command of its bash blocks runs on small stand-ins for the files it names."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import numpy as np

from onnx_squeeze import cli, model_io, zoo

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "RANDOM" in out.splitlines()[0]
    assert (tmp_path / "mlp.int8.onnx").is_file() and (tmp_path / "report.html").is_file()


# Commands the test leaves to others: installing (CI runs README's two commands itself), the
# demo (tests/test_cli.py runs it), and examples elided with "..." (a sketch, not a command).
_NOT_HERE = ("python -m pip install", "onnx-squeeze demo")


def _shell_commands() -> list[str]:
    """Every command of the README's bash blocks: continuation lines joined, comments left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def _needs(command: str) -> str | None:
    """Why ``command`` cannot run here, or None."""
    if command.startswith(_NOT_HERE) or "..." in command:
        return "not a command this test runs"
    if "ray://head" in command:
        return "needs the reader's Ray cluster"
    extras = {"--executor ray": "ray", "--finetune": "torch"}
    for flag, module in extras.items():
        if flag in command and importlib.util.find_spec(module) is None:
            return f"needs {module}"
    return None


def _materials(folder: Path) -> None:
    """The files the examples name, made small: a narrow ResNet-18 (input [N, 3, 224, 224]) as
    model.onnx (a.onnx, b.onnx too), RANDOM calibration and evaluation images (eval.npz with
    labels), and recipe.yaml from the README's recipe example."""
    model_io.save(zoo.build("resnet18", width=0.125), folder / "model.onnx")
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(folder / "model.onnx", folder / name)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((24, 3, 224, 224), dtype=np.float32)
    np.savez(folder / "calib.npz", input=images[:16])
    np.savez(folder / "eval.npz", input=images[16:], labels=rng.integers(0, 1000, 8))
    (recipe,) = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (folder / "recipe.yaml").write_text(recipe)


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """Each command of the README's bash blocks, in order, in one folder holding the files they
    name: no usage error (exit 1) and no internal error (exit 2); an accuracy gate may fail
    (exit 3) on this random model, and tune may miss its target (exit 3). Searches are cut to one
    trial (the one change to a command: a full search takes minutes)."""
    _materials(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in _shell_commands():
        if _needs(command):
            continue
        words = shlex.split(command)
        if "|" in words:
            words = words[: words.index("|")]
        assert words[0] == "onnx-squeeze", command
        if words[1] == "tune":  # as written but for the search's length: one trial
            words += ["--trials", "1", "--bisect-steps", "0"]
        code = cli.run(words[1:])
        capsys.readouterr()
        assert code in (cli.EXIT_OK, cli.EXIT_GATE), command
        ran.append(words[1])
    assert {"compress", "inspect", "compare", "bench", "zoo", "tune", "passes"} <= set(ran)
