"""Runs the cases of :mod:`benchmarks.hostile_cases` through the CLI in this process and judges
each run: the exit code the case allows (never 2), one error line and nothing else on stderr
(no traceback, onnxruntime log or Python warning), every input file unchanged, nothing left in
the output or working folder or the temp folder, no file outside the model's folder opened (by
this process: an audit hook; by any process: the outside file's access time), no pickled
payload run, and any written model passing ``onnx.checker`` and running.

:func:`sweep` runs each case in a forked child (its peak memory measured, a hang cut off) and
:func:`table` summarises: cases tried, handled cleanly, exit 2 left, invalid outputs, files read
outside the model's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from benchmarks.hostile_cases import CANARY, CASES, OUT, OUTSIDE, PICKLE_RAN, Case, build, words


@dataclasses.dataclass
class Outcome:
    case: str
    command: str
    code: int
    message: str  # the last line on stderr
    problems: list[str]
    seconds: float = 0.0


def inputs(root: Path) -> dict[str, str]:
    """sha256 of every file (a link: its target) in the model's folder and beside it."""
    hashes = {}
    for folder in ("model", "outside"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_symlink():
                hashes[str(path)] = "link to " + os.readlink(path)
            elif path.is_file():
                hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


_OPENED: list[str] = []
_WATCHED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], str | bytes | os.PathLike):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(_WATCHED[0]):
            _OPENED.append(path)


@contextlib.contextmanager
def watching_opens(folder: Path) -> Iterator[list[str]]:
    """The files under ``folder`` this process opens inside the block (an audit hook: it sees
    Python's and numpy's opens; C++ reads show in the file's access time, see :func:`judge`)."""
    if not getattr(sys, "_onnx_squeeze_hostile_hook", False):
        sys.addaudithook(_audit)  # hooks stay for the process: installed once
        sys._onnx_squeeze_hostile_hook = True  # type: ignore[attr-defined]
    _OPENED.clear()
    _WATCHED[:] = [os.path.realpath(folder)]
    try:
        yield _OPENED
    finally:
        _WATCHED.clear()


def _age_canary(root: Path) -> int:
    """Set the outside file's access time before its modification time, so that any read,
    by any process, moves it (relatime); return it."""
    canary = root / OUTSIDE
    stat = canary.stat()
    os.utime(canary, ns=(stat.st_mtime_ns - 10**9, stat.st_mtime_ns))
    return canary.stat().st_atime_ns


def scratch_left() -> list[str]:
    """Temporary folders of this process still there (every exit path must remove them)."""
    mark = f"onnx-squeeze.pid{os.getpid()}."
    return [entry.name for entry in Path(tempfile.gettempdir()).iterdir() if mark in entry.name]


def run_case(case: Case, root: Path, run: callable, stderr: callable) -> list[Outcome]:
    """Build ``case`` under ``root`` and run its commands with ``run(argv) -> exit code``;
    ``stderr()`` returns what the run wrote there since the last call."""
    from onnx_squeeze import runtime

    build(case, root)
    before = inputs(root)
    here, limit = os.getcwd(), runtime.BoundedSession.limit_s
    os.chdir(root / "work")
    if case.run_timeout:
        runtime.BoundedSession.limit_s = case.run_timeout
    outcomes = []
    try:
        for command, exits in case.commands:
            argv = words(command, root)
            stderr()
            accessed = _age_canary(root)
            start = time.perf_counter()
            with watching_opens(root / "outside") as opened:
                code = run(argv)
            seconds = time.perf_counter() - start
            read = list(opened)
            if (root / OUTSIDE).stat().st_atime_ns != accessed:
                read.append(f"{root / OUTSIDE} (its access time moved)")
            outcome = judge(case, argv, exits, root, code, stderr(), before, read)
            outcome.seconds = seconds
            outcomes.append(outcome)
            for path in (root / "out").iterdir():  # the next command starts from nothing
                path.unlink()
    finally:
        os.chdir(here)
        runtime.BoundedSession.limit_s = limit
    return outcomes


def judge(
    case: Case,
    argv: Sequence[str],
    exits: frozenset[int],
    root: Path,
    code: int,
    stderr: str,
    before: dict[str, str],
    read_outside: Sequence[str],
) -> Outcome:
    """What went wrong in one run (nothing: ``problems`` is empty)."""
    problems = []
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code == 2:
        problems.append("exit 2 (internal error)")
    elif code not in exits:
        problems.append(f"exit {code}, expected {'/'.join(map(str, sorted(exits)))}")
    if code != 0:
        said = [line for line in lines if line.startswith("onnx-squeeze:")]
        if len(said) != 1 or lines[-1] != said[0]:
            problems.append(f"{len(said)} error lines, not one last line")
    noise = [
        line
        for line in lines
        if "Traceback" in line
        or line.startswith(("[E:onnxruntime", "[W:onnxruntime"))
        or "Warning:" in line
    ]
    if noise:
        problems.append(f"noise on stderr: {noise[0][:100]}")
    if read_outside:
        problems.append(f"read outside the model's folder: {read_outside[0]}")
    if inputs(root) != before:
        problems.append("an input file changed")
    if (root / PICKLE_RAN).exists():
        problems.append("a pickled payload ran")
    problems += _leftovers(root, code)
    if (root / OUT).is_file():
        problems += output_problems(root / OUT)
    return Outcome(case.name, argv[0], code, lines[-1] if lines else "", problems)


def _leftovers(root: Path, code: int) -> list[str]:
    left = [f"work/{path.name}" for path in (root / "work").iterdir()]
    for path in (root / "out").iterdir():
        written = path.name == "out.onnx" or (
            path.name.startswith("out.onnx.") and path.name.endswith(".data")
        )
        if code != 0 or not written:
            left.append(f"out/{path.name}")
    left += scratch_left()
    return [f"left behind: {', '.join(left)}"] if left else []


def output_problems(path: Path) -> list[str]:
    """Why a written model is not valid (the outside file's bytes in it, checker, a run)."""
    import onnxruntime as ort

    for file in path.parent.iterdir():
        if CANARY[:40] in file.read_bytes():
            return [f"invalid output: it holds the outside file's bytes ({file.name})"]
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # any complaint is the finding
        return [f"invalid output: fails onnx.checker: {_first_line(error)}"]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {}
        for spec in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
            dtype = np.float32 if "float" in spec.type else np.int64
            feed[spec.name] = np.ones(shape, dtype)
        session.run(None, feed)
    except Exception as error:
        return [f"invalid output: does not run: {_first_line(error)}"]
    return []


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:120]


# ------------------------------------------------------------------------------ the sweep


def _in_child(case: Case, root: Path, write: int) -> None:
    """In a forked child: run the case with stderr (fd 2) going to a file, send the outcomes."""
    from onnx_squeeze import cli

    log = root / "stderr.txt"
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the commands print is not judged
    sys.stderr = os.fdopen(2, "w", buffering=1)
    position = [0]

    def stderr() -> str:
        sys.stderr.flush()
        text = log.read_text(errors="replace")
        new, position[0] = text[position[0] :], len(text)
        return new

    outcomes = run_case(case, root / "case", cli.run, stderr)
    # the simplifier's child, the largest process this one waited for
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows = []
    for outcome in outcomes:
        row = dataclasses.asdict(outcome)
        row["message"] = row["message"].replace(f"{root}/case/", "")  # the same on every run
        rows.append({**row, "children_mb": round(children_mb)})
    os.write(write, json.dumps(rows).encode())


def sweep(cases: Sequence[Case], timeout_s: float = 300) -> list[dict]:
    """Each case in a forked child of this process (imports paid once): its outcomes, its
    peak memory, and a hang cut off after ``timeout_s``."""
    import onnx_squeeze.cli  # noqa: F401 - imported before forking

    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
            read, write = os.pipe()
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(read)
                    _in_child(case, Path(folder), write)
                    code = 0
                finally:
                    os._exit(code)
            os.close(write)
            data = _read_until(read, pid, timeout_s)
            _, status, usage = os.wait4(pid, 0)
            seconds = time.perf_counter() - start
        peak_mb = usage.ru_maxrss / 1024
        if data:
            outcomes = json.loads(data)
        else:
            why = "hang (killed)" if status == 9 else f"the run died (status {status})"
            outcomes = [
                {**dataclasses.asdict(Outcome(case.name, "?", -1, "", [why])), "children_mb": 0}
            ]
        for outcome in outcomes:
            rows.append({**outcome, "peak_mb": round(peak_mb), "case_seconds": round(seconds, 1)})
        status_text = "ok" if all(not o["problems"] for o in outcomes) else "PROBLEM"
        print(f"{status_text:8} {case.name} ({seconds:.1f} s, peak {peak_mb:.0f} MB)", flush=True)
    return rows


def _read_until(read: int, pid: int, timeout_s: float) -> bytes:
    import select

    chunks = []
    deadline = time.monotonic() + timeout_s
    while True:
        ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, 9)
            break
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    return b"".join(chunks)


def table(rows: Sequence[dict]) -> str:
    """The closing note's table (Markdown), then every run with its exit and message."""
    cases = list(dict.fromkeys(row["case"] for row in rows))
    clean = [c for c in cases if all(not r["problems"] for r in rows if r["case"] == c)]
    exit2 = {r["case"] for r in rows if r["code"] == 2}
    invalid = {r["case"] for r in rows if any("invalid output" in p for p in r["problems"])}
    outside = {r["case"] for r in rows if any("read outside" in p for p in r["problems"])}
    lines = [
        "| measure | value | goal |",
        "|---|---|---|",
        f"| cases tried | {len(cases)} ({len(rows)} runs) | |",
        f"| handled cleanly | {len(clean)} | {len(cases)} |",
        f"| exit 2 left | {len(exit2)} | 0 |",
        f"| invalid outputs | {len(invalid)} | 0 |",
        f"| files read outside the model's folder | {len(outside)} | 0 |",
        "",
        "| case | command | exit | s | peak MB | child MB | message or problem |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        text = "; ".join(row["problems"]) or row["message"] or "(nothing on stderr)"
        text = text.replace("|", "\\|")[:240]
        lines.append(
            f"| {row['case']} | {row['command']} | {row['code']} | {row['seconds']:.1f} "
            f"| {row['peak_mb']} | {row['children_mb']} | {text} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="the hostile inputs of issue 23 through the CLI")
    parser.add_argument("--cases", help="only cases whose name holds this text")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.cases or args.cases in c.name]
    start = time.perf_counter()
    text = table(sweep(cases))
    print("\n" + text + f"\n\n{time.perf_counter() - start:.0f} s in all")
    if args.markdown:
        note = (
            "# Hostile inputs (issue 23)\n\n`python benchmarks/robustness.py --hostile` (or "
            "`python -m benchmarks.hostile_judge`): each case in a forked child of one process "
            "that imported onnx-squeeze; peak MB is the largest resident set of that child and "
            "the processes it waited for (Linux's wait4), child MB of those it started (the "
            "simplifier); s is one command's time on a shared 2-core machine. Paths in the "
            "messages start at the case's folder.\n\n"
        )
        Path(args.markdown).write_text(note + text + "\n")


if __name__ == "__main__":
    main()
