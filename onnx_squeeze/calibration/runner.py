"""The one way to run a copy of a model that exposes intermediate tensors.

Every pass that needs activations (statistics, Gram matrices, layer outputs for recovery or
sensitivity) runs them through here, so all share one session policy: the copy shares the
original's weight tensors, is loaded from a file with external data (onnxruntime maps the
weights instead of copying them out of a serialized model), at level "extended" with eager
order. Measured on ResNet-50: level "all" copies every Conv weight into NCHWc layout and
peaked calibration at 433 instead of 343 MiB, for at most 8 % speed on whole calibrations
(ResNet-18, MobileNetV2; YOLO and ResNet-50 none), since every exposed tensor has to be
reordered back. Eager order frees each tensor as soon as it is reduced. The copy keeps only the
nodes its outputs need: onnxruntime runs every node of a graph, wanted or not, so a layer's
input early in ResNet-18 cost a whole forward pass (0.37 s of 0.40 for 8 images).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from onnx_squeeze import scratch
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import create_session, release_memory

# A run this long hands the memory it freed back to the system (glibc's trim takes ~25 ms on
# a ResNet-50's heap): two runs of a ResNet-50 at batch 8 on one session then peaked at 763
# instead of 825 MiB; quicker runs (small models, many of them) skip it.
_TRIM_AFTER_S = 0.5


def exposed_session(model: ir.Model, provider: str = "cpu") -> Any:
    """A session on ``model`` (an exposed or reduced copy) under the policy above."""
    with scratch.folder("exposed") as folder:
        path = os.path.join(folder, "exposed.onnx")
        ir.save(model, path, external_data="exposed.onnx.data")
        return create_session(path, provider, optimization="extended", eager=True)


def expose(model: ir.Model, names: Sequence[str]) -> tuple[ir.Model | None, list[str]]:
    """A copy of ``model`` whose outputs are the requested tensors that are not graph inputs
    (None when there are none), without the nodes they do not need, and the requested graph
    inputs (read from the feeds)."""
    copy = model.clone()  # initializer tensors are shared, not copied
    graph = copy.graph
    constants = [name for name in names if name in graph.initializers]
    if constants:
        raise SettingsError(
            f"{', '.join(map(repr, constants))}: initializers are constant; read their values "
            "from the model instead of collecting statistics"
        )
    inputs = {value.name: value for value in graph.inputs}
    values = dict(inputs)
    values.update((value.name, value) for node in graph for value in node.outputs if value.name)
    missing = [name for name in names if name not in values]
    if missing:
        raise SettingsError(
            f"no tensor named {', '.join(map(repr, missing))} in the model's main graph "
            "(tensors inside If/Loop/Scan bodies cannot be collected)"
        )
    if any(values[name].dtype is None for name in names):
        ShapeInferencePass(strict_mode=False)(copy)
    untyped = [name for name in names if values[name].dtype is None]
    if untyped:
        raise InputError(
            f"the element type of {', '.join(map(repr, untyped))} is unknown and shape inference "
            "cannot find it: re-export the model with value types"
        )
    for name in names:
        dtype = values[name].dtype
        if not (dtype.is_floating_point() or dtype.is_integer() or dtype == ir.DataType.BOOL):
            raise SettingsError(f"tensor {name!r} is {dtype.name}: statistics need numbers")
    outputs = [values[name] for name in names if name not in inputs]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    if outputs:
        RemoveUnusedNodesPass()(copy)
    return (copy if outputs else None), [name for name in names if name in inputs]


def run_checked(session: Any, outputs: list[str], feed: Feed, where: str) -> list[np.ndarray]:
    """One onnxruntime run; a feed it rejects is the data's fault, reported with ``where``."""
    try:
        return session.run(outputs, feed)
    except (InvalidArgument, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"{where}: {first_line}") from None


class TensorRunner:
    """Runs a copy of a model whose outputs are the named tensors (graph inputs among them are
    read from the feed); the caller's model is never modified, initializers are shared.

    Used as a context manager (or with :meth:`close`), the session and the memory its runs
    used go back to the system as soon as the caller is done (:func:`runtime.release_memory`).
    """

    def __init__(self, model: ir.Model, names: Sequence[str], provider: str = "cpu") -> None:
        copy, self.fed = expose(model, list(dict.fromkeys(names)))
        self.outputs = [v.name for v in copy.graph.outputs] if copy is not None else []
        self.session = exposed_session(copy, provider) if copy is not None else None
        self.closed = False

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        if self.closed:
            raise RuntimeError("TensorRunner called after close()")
        arrays = {name: feed[name] for name in self.fed}
        if self.session is not None:
            start = time.perf_counter()
            found = run_checked(self.session, self.outputs, feed, "a calibration batch")
            arrays.update(zip(self.outputs, found, strict=True))
            if time.perf_counter() - start > _TRIM_AFTER_S:
                release_memory()
        return arrays

    def close(self) -> None:
        """Drop the session and hand its memory back to the system."""
        self.session, self.closed = None, True
        release_memory()

    def __enter__(self) -> TensorRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
