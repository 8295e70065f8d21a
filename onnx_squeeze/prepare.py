"""Prepare a model for compression: shape inference, onnxsim, BatchNormalization folding, constants.

:func:`prepare` runs once, before the compression passes::

    model, report = prepare(model)            # may return a new model object, see below

Steps, each switchable in :class:`PrepareSettings`:

1. **Shape inference** (onnx's, through onnx-ir). It fails quietly inside onnx-ir, so a failure
   is detected here, retried without strict mode, and written to ``report.notes``.
2. **onnxsim** in a child process, so that a crash or a hang in its C++ core cannot take the tool
   down. The model is written to a temporary folder, simplified there and read back. A crash, a
   non-zero exit, a timeout, or a model above ``simplify_max_bytes`` keeps the unsimplified model
   and adds a note such as ``"onnxsim skipped: timed out after 300 s"``. onnxsim is asked not to
   fuse BatchNormalization (step 3 does that and keeps the BN scales) and is not given input
   shapes, so symbolic dimensions stay symbolic. Its fusions into onnxruntime contrib ops
   (``com.microsoft`` Attention/GroupQueryAttention), Q/K/V weight concatenation and batched
   MatMul -> Gemm rewrites are turned off, so the layers compression works on stay visible. Its
   result is rejected (with a note) when it changed the names or element types of the graph
   inputs/outputs, fixed a symbolic input dimension, or introduced an operator domain the model
   did not use; a renamed symbolic dimension is put back. Because the simplified model is read back
   from a file, **prepare returns a new model object when onnxsim ran**: always use the returned
   model, not the argument.
3. **BatchNormalization folding** into the Conv, ConvTranspose (any kernel rank, groups, with or
   without bias) or Gemm (``transB`` 0 or 1, with or without ``C``) that produces its input, when
   that output feeds only the BN, the producer's weight and the BN parameters are constants and the
   BN is in inference mode. A weight or bias shared with another node is copied (the copy is named
   ``<node>.weight_folded`` / ``<node>.bias_folded``) so the other user is unaffected. Each fold is
   recorded as ``"folded"`` on the producer; each BN left alone is recorded as skipped with the
   reason. Only the main graph is folded; subgraphs of If/Loop/Scan are left as they are.
4. **Constants**: Constant nodes become initializers, and nodes whose inputs are all constant are
   evaluated once (with onnx's reference evaluator) and replaced by initializers, in If/Loop/Scan
   bodies too (onnxsim leaves those: silero_vad rebuilds its LSTM weights by Slice/Concat in each
   branch); results go into the main graph, one per distinct content, so that bodies rebuilding
   one weight share it. onnxsim folds far more in the main graph (shape arithmetic with known
   shapes, etc.). Quantize/Dequantize and random ops are never folded.
5. **Cleanup**: unused nodes and initializers (of bodies too) are removed and the graph is sorted
   topologically.
   The graph inputs and outputs keep their original names, element types and declared shapes
   (symbolic dimension names included), whatever the steps above inferred.

BN scales: folding loses the BatchNormalization's per-channel scale, which the BN-scale pruning
criterion needs. The folded node keeps ``|gamma| / sqrt(running_var + epsilon)``, one float per
output channel, as a JSON list in its ``metadata_props`` under :data:`BN_SCALE_KEY`
(``"onnx_squeeze.bn_scale"``); :func:`onnx_squeeze.records.bn_scale` reads it back. It is saved with the model. A pass
that removes or reorders output channels of such a node must update the list the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
    TopologicalSortPass,
)

from onnx_squeeze import scratch
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import (
    UniqueNames,
    attribute,
    constant_array,
    flush_subnormals,
    remove_unused_initializers,
    set_input_constant,
)
from onnx_squeeze.records import BN_SCALE_KEY, PassReport

__all__ = [
    "PrepareSettings",
    "fold_batchnorm",
    "fold_constants",
    "infer_shapes",
    "prepare",
    "simplify",
]

logger = logging.getLogger(__name__)


# The child process that runs onnxsim: ``<command> SRC DST OPTIONS_JSON``. It writes the simplified
# model to DST and exits 0, or exits non-zero. Tests replace this to simulate crashes and hangs.
# onnxsim 0.8's package imports its quantizers and PyTorch (2.6-3.8 s here); its simplifier
# module alone takes 1.4 s, so the child imports that one without the package's __init__ (where
# that fails, the whole package).
_SIMPLIFY_SCRIPT = """\
import importlib.util, json, sys, types
spec = importlib.util.find_spec("onnxsim")
package = types.ModuleType("onnxsim")
package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
sys.modules["onnxsim"] = package
try:
    from onnxsim.onnx_simplifier import simplify
except ImportError:
    for name in [n for n in sys.modules if n == "onnxsim" or n.startswith("onnxsim.")]:
        del sys.modules[name]
    from onnxsim import simplify
source, target, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, check_ok = simplify(source, output_path=target, **options)
if not check_ok:
    sys.exit("onnxsim's own check of the simplified model failed")
"""
_SIMPLIFY_COMMAND: list[str] = [sys.executable, "-c", _SIMPLIFY_SCRIPT]

# onnxsim 0.8 optimizers that would hide the layers compression works on: fuse_attention and
# fuse_gqa replace Q/K/V projections + softmax with onnxruntime-only com.microsoft ops, fuse_qkv
# concatenates the Q/K/V weights into one MatMul, and the batched MatMul+Add -> Gemm rewrite
# wraps every rank-3 linear layer in Shape/Slice/Concat/Reshape scaffolding. BatchNormalization
# is folded by :func:`fold_batchnorm` instead (which keeps the BN scale).
_ONNXSIM_SKIPPED_OPTIMIZERS = (
    "fuse_attention",
    "fuse_gqa",
    "fuse_qkv",
    "fuse_matmul_add_bias_into_gemm_batched",
)

# Above this size the model goes to onnxsim with its weights in an external data file.
_INLINE_LIMIT_BYTES = 1_800_000_000

# Constant folding leaves a node alone when its result would be larger than this and larger than
# its inputs together (an Expand or Tile of a small constant would only bloat the file).
_FOLD_GROWTH_LIMIT_BYTES = 1 << 20

# Ops whose results must not be baked into initializers: quantization structure, randomness.
_NOT_FOLDABLE = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Constant",
    }
)

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)
_FOLD_INTO = frozenset({"Conv", "ConvTranspose", "Gemm"})


@dataclasses.dataclass
class PrepareSettings:
    """What :func:`prepare` does. All steps are on by default."""

    infer_shapes: bool = True
    simplify: bool = True
    simplify_timeout: float = 300.0  # seconds the onnxsim child process may run
    simplify_max_bytes: int = 1_500_000_000  # larger models (weights) are not given to onnxsim
    fold_batchnorm: bool = True
    fold_constants: bool = True

    def __post_init__(self) -> None:
        if not self.simplify_timeout > 0:
            raise SettingsError(
                f"simplify_timeout must be a positive number of seconds, got {self.simplify_timeout!r}"
            )
        if self.simplify_max_bytes <= 0:
            raise SettingsError(
                f"simplify_max_bytes must be positive, got {self.simplify_max_bytes!r}; "
                "set simplify=False to skip onnxsim"
            )


def prepare(
    model: ir.Model, settings: PrepareSettings | None = None
) -> tuple[ir.Model, PassReport]:
    """Prepare ``model`` for compression; return the prepared model and a report named "prepare".

    The model is changed in place, except that when onnxsim runs successfully the result is a
    new :class:`onnx_ir.Model` read back from onnxsim's output: always continue with the returned
    model. Graph input/output names, element types and declared shapes are kept.
    """
    settings = settings or PrepareSettings()
    report = PassReport("prepare", dataclasses.asdict(settings))
    start = time.perf_counter()
    signature = _Signature.of(model)

    if settings.infer_shapes:
        infer_shapes(model, report)
    if settings.simplify:
        model = simplify(model, report, settings=settings, signature=signature)
    if settings.fold_constants:
        fold_constants(model, report)
    if settings.infer_shapes and _untyped_values(model):
        infer_shapes(model, report)  # values onnxsim or folding created, e.g. in If branches
    if settings.fold_batchnorm:
        fold_batchnorm(model, report)
    if flushed := flush_subnormals(model):
        report.notes.append(
            f"{flushed} subnormal weight values set to 0 (CPUs compute with them many times "
            "slower; they are below float precision in any output)"
        )
    RemoveUnusedNodesPass()(model)
    remove_unused_initializers(model)  # RemoveUnusedNodesPass sweeps the main graph only
    TopologicalSortPass()(model)
    signature.restore(model, report)

    report.seconds = time.perf_counter() - start
    return model, report


# --------------------------------------------------------------------------------------------
# Graph signature: the names, types and declared shapes of inputs and outputs.


@dataclasses.dataclass(frozen=True)
class _Port:
    name: str
    type: ir.TypeProtocol | None
    dims: tuple[int | str | None, ...] | None

    @classmethod
    def of(cls, value: ir.Value) -> _Port:
        dims = None
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else d.value for d in value.shape.dims)
        return cls(value.name or "", value.type, dims)


@dataclasses.dataclass(frozen=True)
class _Signature:
    inputs: tuple[_Port, ...]
    outputs: tuple[_Port, ...]

    @classmethod
    def of(cls, model: ir.Model) -> _Signature:
        graph = model.graph
        # Initializers listed as inputs (old exporters) are not part of the contract: onnxsim
        # removes them from the inputs, and nobody feeds them.
        inputs = tuple(_Port.of(v) for v in graph.inputs if not v.is_initializer())
        return cls(inputs, tuple(_Port.of(v) for v in graph.outputs))

    def incompatibility(self, model: ir.Model) -> str | None:
        """Why ``model`` (onnxsim's result) does not keep this signature, or None when it does.

        Names, order and element types must match; input dimensions must match except for the
        names of symbolic dimensions; a named symbolic dimension must not have become a number.
        """
        other = _Signature.of(model)
        for kind, mine, theirs in (
            ("input", self.inputs, other.inputs),
            ("output", self.outputs, other.outputs),
        ):
            if [p.name for p in mine] != [p.name for p in theirs]:
                return (
                    f"it changed the graph {kind}s from {[p.name for p in mine]} "
                    f"to {[p.name for p in theirs]}"
                )
            for old, new in zip(mine, theirs, strict=True):
                if old.type is not None and new.type is not None and old.type != new.type:
                    return (
                        f"it changed the type of {kind} {old.name!r} from {old.type} to {new.type}"
                    )
                if old.dims is None or new.dims is None:
                    continue
                if len(old.dims) != len(new.dims):
                    return f"it changed the rank of {kind} {old.name!r}: {old.dims} -> {new.dims}"
                for a, b in zip(old.dims, new.dims, strict=True):
                    fixed = isinstance(b, int) and not isinstance(a, int)
                    if (kind == "input" and (fixed or (isinstance(a, int) and a != b))) or (
                        kind == "output" and fixed and a is not None
                    ):
                        return (
                            f"it changed the shape of {kind} {old.name!r} from "
                            f"{list(old.dims)} to {list(new.dims)}"
                        )
        return None

    def restore(self, model: ir.Model, report: PassReport) -> None:
        """Put the declared types and shapes back on the graph inputs and outputs."""
        graph = model.graph
        inputs = [v for v in graph.inputs if not v.is_initializer()]
        restored = []
        for ports, values in ((self.inputs, inputs), (self.outputs, list(graph.outputs))):
            for port, value in zip(ports, values, strict=False):
                if value.name != port.name:  # pragma: no cover - guarded by incompatibility()
                    raise AssertionError(f"graph port {port.name!r} was renamed to {value.name!r}")
                current = _Port.of(value)
                if port.type is not None and current.type != port.type:
                    value.type = port.type
                if port.dims is not None and current.dims != port.dims:
                    value.shape = ir.Shape(port.dims)
                    restored.append(port.name)
        if restored:
            report.notes.append(
                "kept the declared shapes of graph inputs/outputs " + ", ".join(restored)
            )


# --------------------------------------------------------------------------------------------
# Step 1: shape inference.


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured_warnings(logger_name: str) -> Iterator[_Collector]:
    """Collect (and keep from the console) the warnings one logger emits in the block."""
    target = logging.getLogger(logger_name)
    collector = _Collector()
    saved = target.propagate, target.level
    target.addHandler(collector)
    target.propagate = False
    if target.getEffectiveLevel() > logging.WARNING:
        target.setLevel(logging.WARNING)
    try:
        yield collector
    finally:
        target.removeHandler(collector)
        target.propagate, target.level = saved


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() if error is not None else ""
    return text.splitlines()[0][:300] if text else type(error).__name__


def _untyped_values(model: ir.Model) -> bool:
    """Whether some node output, in any graph, has no element type (passes need it)."""
    return any(
        output.dtype is None
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for output in node.outputs
    )


def infer_shapes(model: ir.Model, report: PassReport) -> bool:
    """Run onnx shape inference in place; note a failure in ``report``. True when it succeeded.

    onnx-ir's ShapeInferencePass logs failures instead of raising; they are caught here. A strict
    failure (e.g. one unknown custom op) is retried in non-strict mode, which infers what it can.
    """
    from onnx_ir.passes.common import shape_inference

    def attempt(strict: bool) -> str | None:
        with _captured_warnings(shape_inference.__name__) as collected:
            ShapeInferencePass(strict_mode=strict)(model)
        for record in collected.records:
            if record.getMessage().startswith("Shape inference failed"):
                error = record.exc_info[1] if record.exc_info else None
                return _first_line(error)
        return None

    error = attempt(strict=True)
    if error is None:
        return True
    error_relaxed = attempt(strict=False)
    if error_relaxed is None:
        report.notes.append(
            f"shape inference failed in strict mode ({error}); used non-strict inference"
        )
        return True
    report.notes.append(f"shape inference failed, shapes left as they were: {error_relaxed}")
    return False


# --------------------------------------------------------------------------------------------
# Step 2: onnxsim in a child process.


def _weight_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _process_failure(returncode: int, output: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name})"
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    last = f": {lines[-1][:300]}" if lines else ""
    return f"failed (exit code {returncode}){last}"


def simplify(
    model: ir.Model,
    report: PassReport,
    *,
    settings: PrepareSettings | None = None,
    signature: _Signature | None = None,
) -> ir.Model:
    """Run onnxsim on ``model`` in a child process; return its result or, on any failure, ``model``.

    onnxsim is told not to fuse BatchNormalization (see :func:`fold_batchnorm`) and given no input
    shapes, so dynamic dimensions stay dynamic. Failures, timeouts, oversized models and results
    that change the graph signature are noted in ``report`` as ``"onnxsim skipped: ..."``.
    """
    settings = settings or PrepareSettings()
    signature = signature or _Signature.of(model)
    size = _weight_bytes(model)
    if size > settings.simplify_max_bytes:
        report.notes.append(
            f"onnxsim skipped: the model has {size / 1e6:.0f} MB of weights, above "
            f"simplify_max_bytes ({settings.simplify_max_bytes / 1e6:.0f} MB)"
        )
        return model
    options: dict[str, Any] = {
        "skip_fuse_bn": True,
        "skipped_optimizers": list(_ONNXSIM_SKIPPED_OPTIMIZERS),
        "skip_constant_folding": not settings.fold_constants,
        "skip_shape_inference": not settings.infer_shapes,
        "check_n": 0,
        "external_data_threshold": "2GB",
        # no folded tensor larger than the largest weight: a ConstantOfShape of 1 GiB in a
        # 7 KB model took the child to 5.3 GB, only to be summed away again
        "tensor_size_threshold": f"{max(_largest_tensor_bytes(model), _FOLD_FLOOR_BYTES)}B",
    }
    with scratch.folder("sim") as folder:
        source = os.path.join(folder, "in.onnx")
        target = os.path.join(folder, "out.onnx")
        try:
            if size > _INLINE_LIMIT_BYTES:
                ir.save(model, source, external_data="in.onnx.data")
            else:
                ir.save(model, source)
        except (OSError, ValueError) as error:
            report.notes.append(
                f"onnxsim skipped: cannot write the model for it: {_first_line(error)}"
            )
            return model
        command = [*_SIMPLIFY_COMMAND, source, target, json.dumps(options)]
        try:
            finished = subprocess.run(
                command,
                preexec_fn=functools.partial(_bound_child, _child_memory_bytes(size)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=settings.simplify_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            report.notes.append(f"onnxsim skipped: timed out after {settings.simplify_timeout:g} s")
            return model
        output = finished.stdout.decode("utf-8", errors="replace")
        if finished.returncode != 0:
            reason = _process_failure(finished.returncode, output)
            report.notes.append(f"onnxsim skipped: {reason}")
            logger.debug("onnxsim output:\n%s", output)
            return model
        if not os.path.exists(target):
            report.notes.append("onnxsim skipped: it exited without writing a model")
            return model
        try:
            simplified = ir.load(target)
            ir.external_data.load_to_model(simplified)  # the folder is about to go away
        except Exception as error:
            report.notes.append(f"onnxsim skipped: its result cannot be read: {_first_line(error)}")
            return model

    problem = signature.incompatibility(simplified) or _new_domains(model, simplified)
    if problem is not None:
        report.notes.append(f"onnxsim skipped: its result was rejected because {problem}")
        return model
    _carry_over_metadata(model, simplified)
    nodes_before, nodes_after = _count_nodes(model), _count_nodes(simplified)
    report.notes.append(f"onnxsim: {nodes_before} -> {nodes_after} nodes")
    return simplified


# Folding may always produce tensors this large (shape arithmetic, small tables).
_FOLD_FLOOR_BYTES = 16 << 20


def _largest_tensor_bytes(model: ir.Model) -> int:
    return max(
        (v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value),
        default=0,
    )


def _child_memory_bytes(weight_bytes: int) -> int:
    """The address space the onnxsim child may use: ResNet-50 (98 MB) peaks at 525 MB of
    it; the bound stops runaway folding (30 nested Ifs took it to 6.3 GB) with a note."""
    return max(4 << 30, 12 * weight_bytes)


def _bound_child(memory_bytes: int) -> None:
    """In the onnxsim child, before exec: cap its memory, and have the kernel kill it when
    the tool dies (a SIGKILLed tool left it running)."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def _new_domains(original: ir.Model, simplified: ir.Model) -> str | None:
    """A reason to reject onnxsim's result when it uses operator domains the original did not."""

    def domains(model: ir.Model) -> set[str]:
        found = {node.domain or "" for node in ir.traversal.RecursiveGraphIterator(model.graph)}
        return {"" if d == "ai.onnx" else d for d in found}

    added = sorted(domains(simplified) - domains(original))
    if added:
        return f"it introduced operators of domain {', '.join(added)} (runtime-specific)"
    return None


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _carry_over_metadata(original: ir.Model, simplified: ir.Model) -> None:
    """Keep model-level and (by node name) node-level metadata that onnxsim may drop."""
    for key, value in original.metadata_props.items():
        simplified.metadata_props.setdefault(key, value)
    if original.doc_string and not simplified.doc_string:
        simplified.doc_string = original.doc_string
    by_name = {
        node.name: node.metadata_props
        for node in ir.traversal.RecursiveGraphIterator(original.graph)
        if node.name and node.metadata_props
    }
    if not by_name:
        return
    for node in ir.traversal.RecursiveGraphIterator(simplified.graph):
        if node.name in by_name:
            for key, value in by_name[node.name].items():
                node.metadata_props.setdefault(key, value)


# --------------------------------------------------------------------------------------------
# Step 3: BatchNormalization folding.


def _bn_problem(bn: ir.Node) -> str | None:
    """Why this BatchNormalization cannot be folded (independent of its producer), or None."""
    if attribute(bn, "training_mode", 0) != 0:
        return "it is in training mode (training_mode=1)"
    if attribute(bn, "spatial", 1) != 1:
        return "it normalizes per element (spatial=0)"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "its running-statistics outputs are used"
    for attr in bn.attributes.values():
        if attr.is_ref():
            return f"its attribute {attr.name!r} refers to a function attribute"
    return None


def _fold_one(bn: ir.Node, graph: ir.Graph, names: UniqueNames, report: PassReport) -> str | None:
    """Fold ``bn`` into its producer; return None on success or the reason it was left alone."""
    problem = _bn_problem(bn)
    if problem:
        return problem
    x = bn.inputs[0]
    if x is None:
        return "it has no input"
    producer = x.producer()
    if producer is None:
        kind = "an initializer" if x.is_initializer() else "a graph input"
        return f"its input {x.name!r} is {kind}, not a Conv/ConvTranspose/Gemm output"
    where = f"{producer.op_type} {producer.name or x.name!r}"
    if producer.op_type not in _FOLD_INTO or producer.domain not in ("", "ai.onnx"):
        return f"its input comes from {where}, not from Conv/ConvTranspose/Gemm"
    if producer.graph is not graph:
        return f"its producer {where} is in another graph"
    if x.is_graph_output() or len(x.uses()) != 1:
        return f"the output of {where} is also used elsewhere"
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if len(bn.inputs) < 5 or any(p is None for p in params):
        return "its scale/bias/mean/variance are not all constant initializers"
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    epsilon = float(attribute(bn, "epsilon", 1e-5))
    channels = gamma.size
    if not (beta.size == mean.size == var.size == channels):
        return "its parameters have different lengths"

    weight_value = producer.inputs[1] if len(producer.inputs) > 1 else None
    weight = constant_array(weight_value)
    if weight is None or weight_value is None:
        return f"the weight of {where} is not a constant initializer"
    dtype = weight_value.dtype or ir.DataType.FLOAT
    if dtype not in _FLOAT_TYPES:
        return f"the weight of {where} has type {dtype}, not a float type"
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = constant_array(bias_value) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return f"the bias of {where} is not a constant initializer"
    if any(a.is_ref() for a in producer.attributes.values()):
        return f"{where} has attributes that refer to a function attribute"

    scale = gamma / np.sqrt(var + epsilon)
    w = weight.astype(np.float64)
    op = producer.op_type
    if op == "Conv":
        if w.ndim < 3 or w.shape[0] != channels:
            return f"{where} has {w.shape[0]} output channels, the BN has {channels}"
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        b = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
        new_bias = (b - mean) * scale + beta
    elif op == "ConvTranspose":
        group = int(attribute(producer, "group", 1))
        if w.ndim < 3 or w.shape[1] * group != channels or w.shape[0] % group:
            return f"{where} has {w.shape[1] * group} output channels, the BN has {channels}"
        grouped = w.reshape((group, w.shape[0] // group, w.shape[1], *w.shape[2:]))
        factors = scale.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        w = (grouped * factors).reshape(w.shape)
        b = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
        new_bias = (b - mean) * scale + beta
    else:  # Gemm
        trans_b = int(attribute(producer, "transB", 0))
        if w.ndim != 2 or w.shape[0 if trans_b else 1] != channels:
            return f"{where} has {w.shape[0 if trans_b else 1]} outputs, the BN has {channels}"
        w = w * (scale[:, None] if trans_b else scale[None, :])
        c = 0.0 if bias is None else float(attribute(producer, "beta", 1.0)) * bias
        try:
            new_bias = (np.asarray(c, dtype=np.float64) - mean) * scale + beta
        except ValueError:
            return f"the C input of {where} does not broadcast over the BN's channels"
        if new_bias.ndim > 2:
            return f"the C input of {where} has rank {new_bias.ndim}"

    base = producer.name or x.name or "node"
    params_before = weight.size + (bias.size if bias is not None else 0) + 4 * channels
    np_dtype = dtype.numpy()
    set_input_constant(
        producer, 1, w.astype(np_dtype), dtype, f"{base}.weight_folded", graph, names
    )
    bias_dtype = (bias_value.dtype if bias_value is not None else None) or dtype
    set_input_constant(
        producer,
        2,
        new_bias.astype(bias_dtype.numpy()),
        bias_dtype,
        f"{base}.bias_folded",
        graph,
        names,
    )
    if op == "Gemm" and attribute(producer, "beta", 1.0) != 1.0:
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

    # Keep the BN scale for the BN-scale pruning criterion (composed when BNs are stacked).
    magnitude = np.abs(scale)
    if BN_SCALE_KEY in producer.metadata_props:
        earlier = np.asarray(json.loads(producer.metadata_props[BN_SCALE_KEY]), dtype=np.float64)
        if earlier.shape == magnitude.shape:
            magnitude = magnitude * earlier
    producer.metadata_props[BN_SCALE_KEY] = json.dumps([float(v) for v in magnitude])

    y = bn.outputs[0]
    output_name = y.name
    was_output = y.is_graph_output()
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    if was_output:
        x.name = output_name  # the graph output keeps its name
    report.record(
        producer,
        "folded",
        f"BatchNormalization {bn.name or output_name!r} folded",
        params_before=int(params_before),
        params_after=int(weight.size + new_bias.size),
    )
    return None


def fold_batchnorm(model: ir.Model, report: PassReport) -> int:
    """Fold inference-mode BatchNormalization nodes of the main graph into their producers.

    Returns the number folded. Each fold is recorded on the producer (action "folded"); each BN
    left alone is recorded as skipped with the reason. The BN scale is kept on the producer, see
    :data:`BN_SCALE_KEY`.
    """
    graph = model.graph
    names = UniqueNames(model)
    folded = 0
    for node in list(graph):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        reason = _fold_one(node, graph, names, report)
        if reason is None:
            folded += 1
        else:
            report.skip(node, f"not folded: {reason}")
    return folded


# --------------------------------------------------------------------------------------------
# Step 4: constants.


def fold_constants(model: ir.Model, report: PassReport) -> int:
    """Turn Constant nodes into initializers and evaluate nodes with constant inputs, in every graph.

    A deliberately small folder: one pass in graph order with onnx's reference evaluator, no
    shape-based folding (onnxsim does that). Returns the number of nodes folded.
    """
    try:
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    except ValueError as error:  # e.g. a sparse_value Constant
        report.notes.append(f"some Constant nodes were not lifted: {_first_line(error)}")

    from onnx.reference import ReferenceEvaluator

    main = model.graph
    opset = main.opset_imports.get("", None) or main.opset_imports.get("ai.onnx", None)
    if opset is None:
        return 0
    folded, failed = 0, 0
    made: dict[tuple, ir.Value] = {}  # one initializer per folded content
    names = UniqueNames(model)
    for node in [node for graph in list(model.graphs()) for node in list(graph)]:
        graph = node.graph
        assert graph is not None
        arrays = _foldable_inputs(node)
        if arrays is None:
            continue
        input_bytes = sum(a.nbytes for a in arrays.values())
        if _known_bytes(node.outputs) > max(input_bytes, _FOLD_GROWTH_LIMIT_BYTES):
            continue  # known too large before it is made (a ConstantOfShape of 400 MB)
        try:
            proto = ir.serde.serialize_node(node)
            evaluator = ReferenceEvaluator(proto, opsets={"": opset})
            feed = {v.name: a for v, a in arrays.items()}
            results = evaluator.run(None, feed)
        except Exception as error:  # the reference evaluator lacks or rejects some ops
            logger.debug("not folding %s %s: %s", node.op_type, node.name, error)
            failed += 1
            continue
        results = [np.asarray(r) for r in results]
        if sum(r.nbytes for r in results) > max(input_bytes, _FOLD_GROWTH_LIMIT_BYTES):
            continue
        if len(results) != len(node.outputs):
            continue
        for output, result in zip(node.outputs, results, strict=True):
            dtype = output.dtype or ir.DataType.from_numpy(result.dtype)
            # Results go into the main graph, which every If/Loop/Scan body sees: two bodies that
            # rebuild one weight (silero_vad's LSTM gates, reordered in each branch) share it.
            key = (dtype, result.shape, hashlib.sha256(result.tobytes()).digest())
            new = key not in made
            if new:  # a body's name may recur in a sibling body, the main graph sees all
                name = output.name if graph is main else names.new(output.name or "folded")
                made[key] = ir.Value(
                    name=name,
                    shape=ir.Shape(result.shape),
                    type=ir.TensorType(dtype),
                    const_value=ir.tensor(result, dtype=dtype, name=name),
                )
            output.replace_all_uses_with(made[key])
            output.name = None
            if new:
                main.register_initializer(made[key])
        graph.remove(node, safe=True)
        folded += 1
    if folded:
        report.notes.append(f"constant folding: {folded} node(s) evaluated into initializers")
    if failed:
        report.notes.append(
            f"constant folding: {failed} node(s) with constant inputs could not be evaluated"
        )
    return folded


def _known_bytes(values: Sequence[ir.Value]) -> int:
    """Bytes of the values whose shapes inference settled (0 for the others)."""
    total = 0
    for value in values:
        shape = value.shape
        if shape is None or value.dtype is None or not all(isinstance(d, int) for d in shape):
            continue
        total += math.prod(shape) * max(value.dtype.itemsize, 1)
    return total


def _foldable_inputs(node: ir.Node) -> dict[ir.Value, np.ndarray] | None:
    """The constant input arrays of a node worth folding, or None when it is not foldable."""
    if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDABLE:
        return None
    if not node.inputs or any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) or a.is_ref()
        for a in node.attributes.values()
    ):
        return None
    if any(out.is_graph_output() or not out.name for out in node.outputs):
        return None
    arrays: dict[ir.Value, np.ndarray] = {}
    for value in node.inputs:
        if value is None:
            continue
        if not value.is_initializer() or value.is_graph_input() or value.const_value is None:
            return None
        if value.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED) or value.dtype is None:
            return None
        arrays[value] = value.const_value.numpy()
    return arrays or None
