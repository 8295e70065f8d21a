"""onnxruntime sessions for in-memory models, execution-provider selection and input specs.

Every module that runs a model (calibration, compare, bench, tests) goes through here so that
large models, provider fallbacks and symbolic input dimensions are handled in one place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import heapq
import itertools
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_squeeze import scratch
from onnx_squeeze.errors import InputError, RunLimitError, SettingsError

# Serialized protobufs are limited to 2 GiB; stay well below it before switching to a file.
_INLINE_LIMIT_BYTES = 1_500_000_000

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}

ModelLike = ir.Model | onnx.ModelProto | str | os.PathLike

# onnxruntime's own log lines (colour-coded errors of a failed run, warnings at load) would
# reach the user's terminal beside our one-line message; they are for --debug only.
LOG_SEVERITY = 4 if not os.environ.get("ONNX_SQUEEZE_DEBUG") else 2
ort.set_default_logger_severity(LOG_SEVERITY)


def show_onnxruntime_log() -> None:
    """Let onnxruntime's warnings and errors through (``--debug``)."""
    global LOG_SEVERITY
    LOG_SEVERITY = 2
    ort.set_default_logger_severity(LOG_SEVERITY)


# Seconds one run of a model may take before it is stopped (a Loop with 2**40 trips ran until
# killed). Far above any real model's run on a CPU; set ONNX_SQUEEZE_RUN_TIMEOUT to change it.
RUN_TIMEOUT_S = float(os.environ.get("ONNX_SQUEEZE_RUN_TIMEOUT", 600))


class _Watchdog:
    """One daemon thread that sets onnxruntime's terminate flag on runs past their deadline.

    A run registers its RunOptions (a lock and a heap push: microseconds, so latency timing is
    not disturbed) and the thread sleeps until the earliest deadline.
    """

    def __init__(self) -> None:
        self._deadlines: list[tuple[float, int, ort.RunOptions]] = []
        self._live: set[int] = set()
        self._ticket = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, options: ort.RunOptions, seconds: float) -> int:
        ticket = next(self._ticket)
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True)
                self._thread.start()
            earliest = self._deadlines[0][0] if self._deadlines else None
            heapq.heappush(self._deadlines, (time.monotonic() + seconds, ticket, options))
            self._live.add(ticket)
            if earliest is None or self._deadlines[0][0] < earliest:
                self._wake.notify()
        return ticket

    def release(self, ticket: int) -> None:
        with self._wake:
            self._live.discard(ticket)

    def _loop(self) -> None:
        with self._wake:
            while True:
                while self._deadlines and self._deadlines[0][1] not in self._live:
                    heapq.heappop(self._deadlines)
                if not self._deadlines:
                    self._wake.wait()
                    continue
                deadline, ticket, options = self._deadlines[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._deadlines)
                self._live.discard(ticket)
                options.terminate = True


_WATCHDOG = _Watchdog()


class BoundedSession(ort.InferenceSession):
    """An onnxruntime session whose runs stop after ``RUN_TIMEOUT_S`` seconds, or fail to get
    memory, with a one-line :class:`RunLimitError`, instead of running until killed or
    crashing. (Tensors whose size is known before a run are bounded earlier, at load:
    ``validation.check_tensor_sizes``.)"""

    limit_s: float = RUN_TIMEOUT_S

    def run(self, output_names, input_feed, run_options=None):
        options = run_options or ort.RunOptions()
        ticket = _WATCHDOG.watch(options, self.limit_s)
        try:
            return super().run(output_names, input_feed, options)
        except ort.capi.onnxruntime_pybind11_state.Fail as error:
            if options.terminate and run_options is None:
                raise RunLimitError(
                    f"a run of the model took over {self.limit_s:.0f} s and was stopped (a loop "
                    "that does not end, or inputs far larger than meant?); set "
                    "ONNX_SQUEEZE_RUN_TIMEOUT=SECONDS to allow more"
                ) from None
            if _ALLOCATION_FAILED in str(error):
                raise _out_of_memory(str(error)) from None
            raise
        except MemoryError:
            raise _out_of_memory("") from None
        finally:
            _WATCHDOG.release(ticket)


_ALLOCATION_FAILED = "Failed to allocate memory"


def _out_of_memory(message: str) -> RunLimitError:
    """A one-line error for a run that could not get memory, naming the node and size when
    onnxruntime says them."""
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", message)
    size = re.search(r"buffer of size (\d+)", message)
    where = f" in node {node[2] or '(unnamed)'!r} ({node[1]})" if node else ""
    amount = f" ({int(size[1]) / 2**30:.1f} GiB for one tensor)" if size else ""
    return RunLimitError(
        f"a run of the model ran out of memory{where}{amount}: a shape computed from the "
        "inputs is far larger than this machine holds; check the input data and --shape"
    )


def _malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Hand the memory that dropped sessions freed back to the system (glibc only).

    glibc keeps freed blocks in the arenas of onnxruntime's threads; without this, recovery on
    a ResNet-50 held 1026 instead of 832 MiB after its first full-model run, and every later
    session's peak stacked on top (1380 MiB peak; 1245 with a trim after each session). Call it
    after the last reference to a session is dropped; it takes milliseconds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def resolve_provider(name: str) -> str:
    """Map a short name (cpu, cuda, tensorrt) or a full provider name to onnxruntime's name."""
    full = PROVIDER_ALIASES.get(name.lower(), name)
    if full not in PROVIDER_ALIASES.values() and not full.endswith("ExecutionProvider"):
        raise SettingsError(
            f"unknown execution provider {name!r}: use one of cpu, cuda, tensorrt "
            "or a full onnxruntime provider name"
        )
    return full


def provider_available(name: str) -> bool:
    """True when this onnxruntime build offers the provider (it may still fail to load)."""
    return resolve_provider(name) in ort.get_available_providers()


def _provider_chain(provider: str) -> list[str]:
    """A provider followed by its usual fallbacks, so unsupported nodes still run."""
    full = resolve_provider(provider)
    if full == "TensorrtExecutionProvider":
        return [full, "CUDAExecutionProvider", "CPUExecutionProvider"]
    if full == "CPUExecutionProvider":
        return [full]
    return [full, "CPUExecutionProvider"]


def session_options(
    *,
    threads: int | None = None,
    optimization: str = "all",
    optimized_model_path: str | None = None,
    eager: bool = False,
    profile_prefix: str | None = None,
) -> ort.SessionOptions:
    """Session options with a thread count and graph optimization level (none/basic/extended/all).

    ``eager`` runs each node as soon as its inputs are ready (onnxruntime's priority-based
    order). A model whose side branches read big tensors (the calibration model's reductions)
    then frees every tensor once it is read; in the default order the branches run late and
    hold them all: 290 vs 112 MiB of activations on a 640x640 YOLO, and slower. It also
    turns off the memory pattern, the one block planned for all of a run's tensors at once:
    calibration of a ResNet-50 peaked at 441 instead of 497 MiB without it, no slower; and the
    CPU memory arena, which keeps a session's peak of activations after each run: recovery on
    a ResNet-50 peaked at 1370 instead of 1532 MiB without it, INT8 calibration no slower.
    ``profile_prefix`` turns onnxruntime's profiler on, writing to files with that prefix.
    """
    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise SettingsError(
            f"unknown optimization level {optimization!r}: use one of {list(levels)}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = LOG_SEVERITY
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    if eager:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_mem_pattern = False
        options.enable_cpu_mem_arena = False
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def _model_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for value in model.graph.initializers.values()
    )


def create_session(
    model: ModelLike,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    optimization: str = "all",
    optimized_model_path: str | None = None,
    eager: bool = False,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for a model held in memory or on disk.

    Models too large for one protobuf (or with external weights) are written to a temporary
    folder with external data first; the folder is removed once the session holds the weights.
    """
    options = session_options(
        threads=threads,
        optimization=optimization,
        optimized_model_path=optimized_model_path,
        eager=eager,
        profile_prefix=profile_prefix,
    )
    providers = _provider_chain(provider)
    try:
        if isinstance(model, str | os.PathLike):
            return BoundedSession(os.fspath(model), options, providers=providers)
        if isinstance(model, onnx.ModelProto):
            return BoundedSession(model.SerializeToString(), options, providers=providers)
        if _model_bytes(model) < _INLINE_LIMIT_BYTES and not _has_external_tensors(model):
            data = ir.to_proto(model).SerializeToString()
            return BoundedSession(data, options, providers=providers)
        with scratch.folder("session") as folder:
            path = os.path.join(folder, "model.onnx")
            # Save a detached copy so that the caller's model keeps pointing at its own files.
            ir.save(model, path, external_data="model.onnx.data")
            return BoundedSession(path, options, providers=providers)
    except (
        ort.capi.onnxruntime_pybind11_state.Fail,
        ort.capi.onnxruntime_pybind11_state.InvalidGraph,
    ) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise InputError(f"onnxruntime cannot load the model: {first_line}") from error


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (ints, or strings for symbolic dimensions)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def concrete_shape(
        self, overrides: Mapping[str, Sequence[int]] | None = None
    ) -> tuple[int, ...]:
        """The shape to feed: an override for this input, else symbolic dims set to 1."""
        if overrides and self.name in overrides:
            shape = tuple(int(d) for d in overrides[self.name])
            if len(shape) != len(self.shape):
                raise SettingsError(
                    f"--shape {self.name}: got {len(shape)} dims, the model input has {len(self.shape)}"
                )
            return shape
        return tuple(d if isinstance(d, int) and d > 0 else 1 for d in self.shape)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Graph inputs that need feeding (initializers listed as inputs are excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise InputError(f"graph input {value.name!r} has no element type; re-export the model")
        shape = tuple(
            d if isinstance(d, int) else (str(d) if d is not None and str(d) != "None" else None)
            for d in (value.shape.dims if value.shape is not None else ())
        )
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape))
    return specs


def parse_shape_overrides(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name:1x3x224x224`` strings (the CLI's ``--shape``) into a mapping."""
    overrides: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            overrides[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise SettingsError(f"bad --shape {item!r}: write it as NAME:1x3x224x224") from None
    return overrides


def random_feed(
    specs: Sequence[InputSpec],
    rng: np.random.Generator,
    overrides: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """One feed of random data shaped by the specs: normal floats, small non-negative integers."""
    feed = {}
    for spec in specs:
        shape = spec.concrete_shape(overrides)
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feed[spec.name] = rng.integers(0, 8, size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            raise InputError(
                f"cannot generate random data for input {spec.name!r} of type {spec.dtype}"
            )
    return feed
