"""Static quantization of weight layers inside If branches (silero_vad keeps its whole model in
an If on the sample rate).

onnxruntime cannot expose a value of a branch as a graph output, so a branch's activation ranges
cannot be collected in place. Instead each branch that holds weight layers becomes a model of its
own, whose inputs are the values it reads from the main graph; those are captured from the
calibration data on the batches where the If takes that branch, the pass quantizes the branch
model on them (calibration, accuracy control and all), and its nodes replace the branch's. A
branch the data never takes stays float, and a WARNING says so; Loop/Scan bodies (whose inputs
change at every iteration) are not reached and are named in a WARNING too. The captured values
are held in memory for the branch's run, one set per calibration batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import FeedsSource
from onnx_squeeze.graph_utils import UniqueNames, constant_array
from onnx_squeeze.records import PassContext, PassReport

Quantize = Callable[[ir.Model, PassContext, PassReport], None]


@dataclasses.dataclass
class Branch:
    """One branch of an If of the main graph, and the main-graph values it reads."""

    node: ir.Node
    attribute: str
    body: ir.Graph
    reads: list[ir.Value]  # non-constant values of the main graph, in first-read order
    constants: list[ir.Value]  # initializers of the main graph

    @property
    def label(self) -> str:
        return f"{self.attribute} of If {self.node.name!r}"

    def shared_weight(self, ops: tuple[str, ...]) -> ir.Value | None:
        """A main-graph constant that a node of ``ops`` here reads and a node outside the
        branch reads too: quantized here, its INT8 copy would sit beside the float one."""
        inside = _graphs_within(self.body)
        for value in self.constants:
            users = [use.node for use in value.uses()]
            if any(u.op_type in ops and id(u.graph) in inside for u in users) and any(
                id(u.graph) not in inside for u in users
            ):
                return value
        return None

    def as_model(self, model: ir.Model, feed: dict[str, np.ndarray]) -> ir.Model:
        """A copy of the branch as a model: what it reads are its inputs (typed as in ``feed``
        where the main graph does not say), constants its initializers (the same tensors), its
        outputs the branch's."""
        graph = ir.serde.serialize_graph(self.body)
        graph.input.extend(
            ir.serde.serialize_value(value)
            if value.type is not None
            else onnx.helper.make_tensor_value_info(
                value.name, onnx.helper.np_dtype_to_tensor_dtype(feed[value.name].dtype), None
            )
            for value in self.reads
        )
        graph.initializer.extend(
            ir.serde.serialize_tensor(value.const_value) for value in self.constants
        )
        proto = onnx.helper.make_model(
            graph,
            opset_imports=[
                onnx.helper.make_opsetid(domain, version)
                for domain, version in model.opset_imports.items()
            ],
            ir_version=model.ir_version,
        )
        copy = ir.serde.deserialize_model(proto)
        for index, node in enumerate(copy.graph):  # the pass tells layers apart by name
            node.name = node.name or f"{self.body.name}/{node.op_type}_{index}"
        return copy

    def replace_with(self, quantized: ir.Model, names: UniqueNames) -> None:
        """The branch's nodes, initializers and outputs become ``quantized``'s (taken out of
        it), which read the main graph's values again; a value the pass named like one of the
        main graph (``names``) is renamed, as a branch may not hide it."""
        for node in list(ir.traversal.RecursiveGraphIterator(self.body)):
            for index in range(len(node.inputs)):  # no read of the main graph's values is left
                node.replace_input_with(index, None)
        self.body.remove(list(self.body), safe=False)
        self.body.outputs.clear()
        for name in list(self.body.initializers):
            self.body.initializers.pop(name)
        graph = quantized.graph
        outer = {value.name: value for value in [*self.reads, *self.constants]}
        made = [*graph.initializers.values()]
        made += [v for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs]
        for value in made:
            if value.name in names.used and value.name not in outer:
                value.name = names.new(value.name)
        for value in list(graph.inputs):
            value.replace_all_uses_with(outer[value.name])
        for name, value in list(graph.initializers.items()):
            graph.initializers.pop(name)
            if name in outer:
                value.replace_all_uses_with(outer[name])
            elif value.uses() or value in graph.outputs:
                self.body.register_initializer(value)
        outputs = list(graph.outputs)
        graph.outputs.clear()
        nodes = list(graph)
        graph.remove(nodes, safe=False)
        self.body.extend(nodes)
        self.body.outputs.extend(outputs)


def _main_names(model: ir.Model) -> set[str]:
    """The names of the main graph's own values, which every branch sees."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values()]
    values += [value for node in graph for value in node.outputs]
    return {value.name for value in values if value.name}


def _bodies(node: ir.Node) -> list[ir.Graph]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    graphs = []
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            graphs.append(attribute.value)
        elif attribute.type == ir.AttributeType.GRAPHS:
            graphs.extend(attribute.value)
    return graphs


def _graphs_within(body: ir.Graph) -> set[int]:
    inner = ir.traversal.RecursiveGraphIterator(body)
    return {id(body)} | {id(graph) for node in inner for graph in _bodies(node)}


def _branch(node: ir.Node, attribute: str, body: ir.Graph) -> Branch:
    inside = _graphs_within(body)
    reads: dict[str, ir.Value] = {}
    for inner in ir.traversal.RecursiveGraphIterator(body):
        for value in inner.inputs:
            if value is not None and id(value.graph) not in inside:
                reads.setdefault(value.name, value)
    constant = [v for v in reads.values() if v.is_initializer() and constant_array(v) is not None]
    return Branch(
        node,
        attribute,
        body,
        [v for v in reads.values() if v not in constant],
        constant,
    )


def branches(model: ir.Model, ops: tuple[str, ...]) -> list[Branch]:
    """The branches of the main graph's Ifs that hold nodes of ``ops`` (nested ones included)."""
    found = []
    for node in model.graph:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        for attribute in ("then_branch", "else_branch"):
            body = node.attributes[attribute].value
            if any(inner.op_type in ops for inner in ir.traversal.RecursiveGraphIterator(body)):
                found.append(_branch(node, attribute, body))
    return found


def _captured_feeds(
    model: ir.Model, found: list[Branch], context: PassContext
) -> dict[int, list[dict]]:
    """Per branch, the feeds of its model: what it reads, on every calibration batch where
    its If takes it."""
    names = [b.node.inputs[0].name for b in found] + [v.name for b in found for v in b.reads]
    feeds: dict[int, list[dict]] = {id(b): [] for b in found}
    with TensorRunner(model, names, context.providers[0]) as runner:
        for batch in context.data:
            arrays = runner(batch)
            for branch in found:
                taken = bool(arrays[branch.node.inputs[0].name].reshape(-1)[0])
                if taken == (branch.attribute == "then_branch"):
                    feeds[id(branch)].append({v.name: arrays[v.name] for v in branch.reads})
    return feeds


def quantize_branches(
    model: ir.Model,
    context: PassContext,
    report: PassReport,
    quantize: Quantize,
    ops: tuple[str, ...],
) -> None:
    """Quantize every If branch of the main graph that holds nodes of ``ops`` with ``quantize``
    (the pass's own apply), each on the data that reaches it; records and notes go to
    ``report``, the notes prefixed with the branch."""
    unreached = [
        inner
        for node in model.graph
        if node.op_type != "If"
        for body in _bodies(node)
        for inner in ir.traversal.RecursiveGraphIterator(body)
        if inner.op_type in ops
    ]
    if unreached:
        report.notes.append(
            f"WARNING: {len(unreached)} weight layers sit inside Loop/Scan bodies, which "
            f"{report.name} does not reach: they are left as they were"
        )
    found = []
    for branch in branches(model, ops):
        shared = branch.shared_weight(ops)
        if shared is None:
            found.append(branch)
            continue
        report.notes.append(
            f"WARNING: {branch.label} stays float: it reads weight {shared.name!r}, which "
            "nodes outside it read too (an INT8 copy beside the float one would grow the file)"
        )
    if not found:
        return
    feeds = _captured_feeds(model, found, context)
    names = UniqueNames.among(_main_names(model))
    for branch in found:
        if not feeds[id(branch)]:
            report.notes.append(
                f"WARNING: {branch.label} stays float: the calibration data never takes it "
                f"(give data where {branch.node.inputs[0].name!r} selects it)"
            )
            continue
        sub_model = branch.as_model(model, feeds[id(branch)][0])
        sub_report = PassReport(report.name, report.settings)
        sub_context = dataclasses.replace(
            context, calibration=FeedsSource(feeds[id(branch)]), teacher=None, shapes=None
        )
        # as Pass.__call__ does: the data's batch axes, those of the branch model's inputs
        sub_context.data.draw_random_for(sub_model, sub_context.input_shapes, seed=context.seed)
        quantize(sub_model, sub_context, sub_report)
        branch.replace_with(sub_model, names)
        report.records.extend(sub_report.records)
        for note in sub_report.notes:  # a warning stays one
            warning, text = note.startswith("WARNING: "), note.removeprefix("WARNING: ")
            report.notes.append(f"{'WARNING: ' if warning else ''}{branch.label}: {text}")
