"""Sensitivity: the output error when one group alone loses its lowest-scored channels,
measured on a few calibration batches with one onnxruntime session (producers' outputs masked).
The error is judged per output channel, each relative to its own spread
(:func:`fidelity.channel_error`): a detector whose one output holds pixel boxes beside class
scores would otherwise spend its pruning on the score branch, whose error the boxes drown.
Its cost is (groups x 3 x batches x rounds) inferences, so it reads only as many batches as
give every output channel ``CHANNEL_VALUES`` values (two for a detector's or a segmenter's
map, up to ``sensitivity_batches`` for a classifier) and skips the groups whose channels cost
nothing; ``allocation: uniform`` is the cheap one-ratio alternative."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnx_squeeze import fidelity, runtime
from onnx_squeeze.calibration import joined
from onnx_squeeze.layers import Layer
from onnx_squeeze.passes.prune_channels.allocation import ErrorCurve, Planner
from onnx_squeeze.passes.prune_channels.groups import ChannelAnalysis, Layout
from onnx_squeeze.passes.prune_channels.rewrite import kept_indices


class CachedSensitivity:
    """Error curves kept in ``store`` (the calibration service's, for this model and data) by
    their starting counts, so that other targets on the same model reuse them; the onnxruntime
    session and the feeds are made only when a curve must be measured."""

    def __init__(
        self,
        make: Callable[[], Sensitivity],
        feeds: Callable[[], list[dict]],
        store: dict,
    ) -> None:
        self.make, self.make_feeds, self.store = make, feeds, store
        self.sensitivity: Sensitivity | None = None
        self.feeds: list[dict] = []

    def curves(self, start: Mapping[int, int]) -> dict[int, ErrorCurve]:
        key = tuple(sorted(start.items()))
        if key not in self.store:
            if self.sensitivity is None:
                self.sensitivity = self.make()
                self.feeds = self.sensitivity.enough(self.make_feeds())
            self.store[key] = self.sensitivity.curves(self.feeds, start)
        return self.store[key]


# Shares of a group's channels removed when its sensitivity is measured.
SENSITIVITY_SHARES = (0.25, 0.5, 0.75)

# The values per output channel that the measured batches give at least (a classifier's logit
# has one per sample; a detector's score map thousands in one batch, where more batches only
# cost runs: ppocr_det's 36 groups took 888 runs, 720 s, on 4 batches and 2 rounds), from at
# least MIN_BATCHES batches: one image is no measure of a channel's spread (the zoo detector
# pruned by one image's curves lost 14 % of its detections, by two's none).
CHANNEL_VALUES = 32
MIN_BATCHES = 2
_JOINED_SAMPLES = 8  # samples per measured run at most


class Sensitivity:
    """Measures, on a few calibration batches, how much the model's outputs change when one
    group alone loses its lowest-scored channels. Each producer's output is multiplied by a 0/1
    mask fed as a graph input, so one onnxruntime session (weights still constant) serves every
    measurement; masking the output equals zeroing the producer's weights and biases, and
    approximates removal where an unfused BatchNormalization adds a per-channel offset after."""

    def __init__(
        self, model: ir.Model, channels: ChannelAnalysis, planner: Planner, provider: str
    ) -> None:
        self.channels = channels
        self.planner = planner
        self.model = model  # its batch axes say whether feeds may be joined into one run
        producers = {id(p): p for g in planner.groups for p in g.producers}
        self.layouts = [
            (node, channels.layouts[node.outputs[0]])
            for node in model.graph
            if id(node) in producers and node.outputs[0] in channels.layouts
        ]
        # The masked copy exposes no tensors and runs (groups x 3 x batches) times: a plain
        # session at full optimization runs it about twice as fast as the runner's policy.
        self.session = runtime.create_session(self._masked(model), provider)
        self.names = [output.name for output in self.session.get_outputs()]
        self.kinds = fidelity.OutputKinds.of(model)

    def _masked(self, model: ir.Model) -> ir.Model:
        """A clone whose producers' outputs are multiplied by inputs ``onnx_squeeze.mask.<i>``."""
        clone = model.clone()
        twin = dict(zip(map(id, model.graph), clone.graph, strict=True))
        for index, (node, layout) in enumerate(self.layouts):
            output = twin[id(node)].outputs[0]
            uses = list(output.uses())
            dtype = _weight_dtype(node)
            mask = ir.Value(
                name=f"onnx_squeeze.mask.{index}",
                type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                shape=ir.Shape(self._mask(layout, {}).shape),
            )
            clone.graph.inputs.append(mask)
            product = ir.node("Mul", [output, mask], name=f"onnx_squeeze.mask_mul.{index}")
            clone.graph.insert_after(twin[id(node)], product)
            for user, position in uses:
                user.replace_input_with(position, product.outputs[0])
        return clone

    def _mask(self, layout: Layout, plan: Mapping[int, np.ndarray]) -> np.ndarray:
        kept, length = kept_indices(self.channels, plan, layout.atoms, layout.repeat)
        mask = np.zeros(length, dtype=np.float32)
        mask[kept] = 1
        return mask.reshape(length, *[1] * (-layout.axis - 1))

    def _masks(self, plan: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            f"onnx_squeeze.mask.{index}": self._mask(layout, plan).astype(_weight_dtype(node))
            for index, (node, layout) in enumerate(self.layouts)
        }

    def _outputs(self, feeds: list[dict], plan: Mapping[int, np.ndarray]) -> list[dict]:
        masks = self._masks(plan)
        return [
            dict(zip(self.names, self.session.run(None, {**feed, **masks}), strict=True))
            for feed in feeds
        ]

    def enough(self, feeds: list[dict]) -> list[dict]:
        """The first of ``feeds`` that give every output channel ``CHANNEL_VALUES`` values,
        at least ``MIN_BATCHES`` (all of them when they give fewer), joined into one run where
        the batch axis is free (each measurement then pays onnxruntime's per-run cost once)."""
        first = fidelity.measure(*[self._outputs(feeds[:1], {})] * 2, kinds=self.kinds).values()
        values = min((m.elements / max(m.channels, 1) for m in first), default=1.0)
        count = max(MIN_BATCHES, math.ceil(CHANNEL_VALUES / max(values, 1.0)))
        return joined(feeds[:count], _JOINED_SAMPLES, self.model)

    def error(self, reference: list[dict], outputs: list[dict]) -> float:
        """Squared error relative to each output channel's spread over the feeds, averaged over
        the channels and summed over the outputs."""
        return sum(fidelity.channel_error(reference, outputs, kinds=self.kinds).values())

    def curves(self, feeds: list[dict], start: Mapping[int, int]) -> dict[int, ErrorCurve]:
        """Group id -> output error (:meth:`error`) against the share of its channels removed,
        each group measured alone on top of the kept counts ``start``: the error it adds to
        theirs against the original outputs (the first point is where ``start`` leaves it)."""
        base = self.planner.plan_counts(start)
        reference = self._outputs(feeds, {})
        floor = self.error(reference, self._outputs(feeds, base)) if base else 0.0
        curves = {}
        for group in self.planner.groups:
            before = start.get(group.id, group.channels)
            shares, errors = [1 - before / group.channels], [0.0]
            if self.planner.channel_cost(group, start) <= 0:
                curves[group.id] = ErrorCurve(np.array(shares), np.array(errors))
                continue  # its channels cost nothing, so the allocation takes none of them
            for share in SENSITIVITY_SHARES:
                keep = self.planner.keep_count(group, round((1 - share) * before))
                if keep >= before or 1 - keep / group.channels <= shares[-1]:
                    continue
                plan = {**base, group.id: self.planner.best_channels(group, keep)}
                shares.append(1 - keep / group.channels)
                error = self.error(reference, self._outputs(feeds, plan)) - floor
                errors.append(max(errors[-1], error))
            curves[group.id] = ErrorCurve(np.array(shares), np.array(errors))
        return curves


def _weight_dtype(node: ir.Node) -> np.dtype:
    """The float type of a producer's constant weight (its output has the same)."""
    layer = Layer.of(node)
    assert isinstance(layer, Layer) and layer.array is not None  # producers' weights are constants
    return layer.array.dtype
