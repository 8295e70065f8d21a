"""Bias correction: the mean output error that quantization causes, cancelled in the INT32
biases.

At every quantized layer, the error of rounded weights times the mean of each input channel
(Nagel et al. 2019); at the last quantized layers, the whole mean error, measured against the
float model on calibration data.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import ChannelMeans, StatisticsCollector, TensorStatistics
from onnx_squeeze.graph_utils import attribute, constant_array
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.params import INT32
from onnx_squeeze.passes.quantize.qdq import Outcome
from onnx_squeeze.records import PassContext, PassReport

OUTPUT_BATCHES = 32  # calibration batches that measure the last layers' mean output error
# The kind under which the float model's output means are stored (context.data.store).
OUTPUT_MEANS = "quantize_int8.output_means"


def correct_biases(
    float_model: ir.Model,
    model: ir.Model,
    outcome: Outcome,
    statistics: dict[str, TensorStatistics],
    report: PassReport,
) -> None:
    """Cancel the mean output error that weight rounding causes (Nagel et al. 2019): shift
    each output channel's INT32 bias by ``-(W_q - W) · E[x]``, with ``E[x]`` the mean of
    each input channel on calibration data (collected with the ranges). Local to each
    layer, so corrections do not add up along the network."""
    nodes = {node.name: node for node in float_model.graph}
    if not outcome.biases:
        report.notes.append("bias correction: no quantized layer with a bias")
        return
    quantized_nodes = {node.name: node for node in model.graph}
    for name, bias in outcome.biases.items():
        original = nodes[name]
        weight = constant_array(original.inputs[1])
        dq = quantized_nodes[name].inputs[1].producer()
        axis = dq.attributes["axis"].value if "axis" in dq.attributes else None
        rounded = quant_params.dequantize(
            constant_array(dq.inputs[0]), constant_array(dq.inputs[1]), 0, axis
        )
        means = statistics[original.inputs[0].name].means
        if means is None:  # an input whose channel axis is out of range
            continue
        _shift_bias(bias, -_weight_error_times_mean(original, rounded - weight, means.mean))
    report.notes.append(f"bias correction applied to {len(outcome.biases)} layers")


def correct_outputs(
    float_model: ir.Model,
    model: ir.Model,
    outcome: Outcome,
    context: PassContext,
    report: PassReport,
    *,
    sample_values: int,
) -> None:
    """Cancel the whole mean error, measured, at the last quantized layers with a bias.

    Weight bias correction leaves the error that quantized activations carry into a layer;
    at the layers whose outputs reach no other quantized layer, the mean difference from
    the float model on calibration data is the model's own and can be subtracted without
    later layers compensating twice (on the transformer it lifted output cosine by 0.02)."""
    finals = [n for n in final_anchors(model, outcome.details) if n.name in outcome.biases]
    if not finals:
        return
    axes = output_axes(finals)

    def output_means(each: ir.Model, limit: int | None) -> dict[str, TensorStatistics]:
        collector = StatisticsCollector(
            each,
            list(axes),
            keep=("means",),
            channel_axis=axes,
            sample_values=sample_values,
            join=False,  # few small outputs: joined runs would hold many samples' activations
        )
        return collector.collect(context.data, limit=limit, progress=False)

    # the float model's side is the same for every method: kept by calibration, which read
    # it over its first batches, or measured here once per model and source
    stored = context.data.store(float_model, OUTPUT_MEANS)
    reference = stored.get("first")
    if reference is None or not set(axes) <= set(reference.means):
        reference = FirstMeans(axes)
        reference.take_last(output_means(float_model, OUTPUT_BATCHES), OUTPUT_BATCHES)
        stored["first"] = reference
    measured_means = output_means(model, reference.read)
    for node in finals:
        name = node.outputs[0].name
        expected, measured = reference.means[name], measured_means[name].means
        if expected is None or measured is None:  # channel axis out of range
            continue
        _shift_bias(outcome.biases[node.name], expected.mean - measured.mean)
    listed = ", ".join(n.name for n in finals[:4]) + (" ..." if len(finals) > 4 else "")
    batches = "all" if reference.read is None else f"the first {reference.read}"
    report.notes.append(
        f"output bias correction: mean error of {len(finals)} last layer(s) ({listed}) "
        f"measured on {batches} calibration batches and subtracted"
    )


def _shift_bias(bias: ir.Value, shift: np.ndarray) -> None:
    """Add ``shift`` (float, per output channel) to an INT32 bias in its own scale."""
    scale = constant_array(next(iter(bias.uses())).node.inputs[1]).astype(np.float64)
    corrected = bias.const_value.numpy().astype(np.int64) + np.rint(shift / scale)
    corrected = np.clip(corrected, INT32.qmin, INT32.qmax).astype(np.int32)
    bias.const_value = ir.tensor(corrected, dtype=ir.DataType.INT32, name=bias.name)


def final_anchors(model: ir.Model, names: Container[str]) -> list[ir.Node]:
    """The anchors (by name) from whose output no other of them can be reached."""
    anchors = {node.name: node for node in model.graph if node.name in names}
    finals = []
    for node in anchors.values():
        stack, seen, reaches = list(node.outputs), set(), False
        while stack and not reaches:
            for use in stack.pop().uses():
                consumer = use.node
                reaches = consumer.name in anchors and consumer is not node
                if reaches:
                    break
                if id(consumer) not in seen:
                    seen.add(id(consumer))
                    stack.extend(consumer.outputs)
        if not reaches:
            finals.append(node)
    return finals


def output_axes(anchors: Iterable[ir.Node]) -> dict[str, int]:
    """Each anchor's output and its channel axis."""
    return {node.outputs[0].name: 1 if node.op_type == "Conv" else -1 for node in anchors}


class FirstMeans:
    """The channel means of tensors (named in ``axes``, with their channel axis) over the first
    ``read`` batches of a collection, at least ``OUTPUT_BATCHES`` of them (None: all it read):
    a ``stop`` callback that never stops, so that the quantized model can be measured on the
    very same batches."""

    def __init__(self, axes: Mapping[str, int]) -> None:
        self.axes = dict(axes)
        self.read: int | None = None
        self.means: dict[str, ChannelMeans | None] = {}

    def __call__(self, read: int, statistics: Mapping[str, TensorStatistics]) -> bool:
        if self.axes and not self.means and read >= OUTPUT_BATCHES:
            self.read = read
            self._keep(statistics)
        return False

    def take_last(self, statistics: Mapping[str, TensorStatistics], limit: int | None) -> None:
        """Keep the means a whole collection (at most ``limit`` batches) ended with, unless
        the first batches' were kept already."""
        if not self.means:
            self.read = limit
            self._keep(statistics)

    def _keep(self, statistics: Mapping[str, TensorStatistics]) -> None:
        self.means = {name: copy.deepcopy(statistics[name].means) for name in self.axes}


def _weight_error_times_mean(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The mean output error per output channel that a weight error causes, given the mean of
    each input channel (padding borders ignored)."""
    if node.op_type == "Conv":
        group = attribute(node, "group", 1)
        outputs, per_group = error.shape[0], error.shape[1]
        per_input = error.sum(axis=tuple(range(2, error.ndim)))  # [out, in/group]
        means = mean.reshape(group, per_group)
        return np.einsum(
            "gok,gk->go", per_input.reshape(group, outputs // group, -1), means
        ).ravel()
    matrix = error.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else error
    return mean @ matrix
