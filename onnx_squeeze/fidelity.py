"""How closely one model's outputs match a reference's: whole outputs and per output channel.

A whole-output figure can hide a broken slice: a detector's output that concatenates box
coordinates (0…640 px) with class scores (0…1) keeps a cosine of 0.9995 when every score has
collapsed, because the boxes carry nearly all of the energy. So each output is also judged per
channel, along its channel axis:

- The channel axis is the one whose slices differ most in scale (the widest spread of the log of
  the slices' RMS, on the first feed), among the axes of fixed size other than the batch axis
  (axis 0 of outputs of rank 2 and more); ``channel_axes`` overrides it per output (None: the whole output is one
  channel). An output with no such axis is one channel.
- Per channel: SQNR in dB (reference power over error power, 200 dB when identical, -200 dB
  for values where the reference has none) and cosine.
  Channels whose reference is zero throughout are left out (nothing to preserve). The worst
  channel is named, and the mean over channels given.
- Score channels: in an output that a Sigmoid or Softmax (or Exp divided by a sum) produces
  (through Concat, Reshape, Transpose and other data-movement ops), the channels whose reference
  values all lie in [0, 1] are probabilities. Their SQNR is taken over the values where either model scores at least
  ``SCORE_ACTIVE`` (5 %): what a threshold or an argmax reads. Background scores near zero in
  both, and classes that never fire in the data, do not decide the verdict (a softmax over 6000
  characters moves its near-zero classes by more than their own size under INT8, harmlessly),
  while a detection whose score collapses, or a new one, does. ``score_cosine`` is the cosine
  over all score channels together. ``score_agreement`` judges scores as a threshold reads
  them: at each threshold of ``SCORE_THRESHOLDS``, the values at or above it in both models
  over those at or above it in either (pooled over the score channels), the lowest over the
  thresholds with at least ``ENOUGH_READS`` such values (else the one with the most). Given for
  score channels along a channel axis (a detector's classes, multi-label heads) outside a
  softmax over classes; a lone probability per position is read at 0.5 by
  ``argmax_agreement``. It reads decisions that are events, as a detector's class scores at
  its anchors are (YOLOv8's: nudenet's INT8 at 14 dB kept 86 % of its detections and 84 % of
  its scores' decisions; FP16 99 % of both; its classes reach 0.5 at 0.1 % of the anchors at
  most). Where a score channel is at or above 0.5 at more than ``DENSE_DECISIONS`` of its
  positions in the reference (at ``DENSE_EVIDENCE`` of them at least), the output's scores
  are not read (``dense_score_channel`` names that channel): such decisions are not events
  but conditional on another channel, as a YOLOX or YOLOv5 head's class scores are on its
  objectness (nothing trains them outside objects: ddddocr_det's class channel is at 0.5 or
  above at 13 % of its anchors, its objectness at 0.5 %; its INT8 kept 98 % of its
  detections and 41 % of its raw class decisions, 74 % with each class score multiplied by the
  objectness, still far from what the detections keep), or a dense map read some other way.
- ``argmax_agreement``: the share of positions whose argmax along the channel axis agrees (top-1
  per row of a classifier, per pixel of a segmentation map, per step of a tagger's sequence);
  not given for outputs that mix score and other channels. A probability output with no
  classes beside it (one sigmoid per position: voice activity, a binary head, a text map) is
  read where it crosses 0.5. A sequence output read as CTC (its most frequent top class, the
  blank, fills half the steps: :mod:`onnx_squeeze.sequences`) is judged on its decoded
  strings instead: the share of sequences that read exactly the same; ``token_agreement``
  gives the share of tokens that agree (one minus the edit distance over the length, for long
  transcripts), ``position_agreement`` the share of steps, ``ctc_blank`` the class read as the
  blank.
- Features: an output a pooling or a normalization produces (:func:`feature_outputs`: a
  sentence embedding, token embeddings) is read by its values only, never by argmax, top-1 or
  as CTC. A pooled embedding (one vector per sample) is also read as a similarity search reads
  it: ``neighbour_agreement``, the share of the distinct samples whose nearest other sample by
  cosine is the same in both models (paraphrase-MiniLM's INT8 kept a cosine of 0.996 and 13 dB
  on its worst dimension, and moved the nearest neighbour of 11 % of its sentences).
- Class probabilities: a probability output whose channels sum to 1 at every position (a
  softmax over classes) is read by its argmax, not by its values: ``class_probabilities`` marks
  it, and the default gate judges it by ``argmax_agreement`` alone (the rare classes of a
  softmax over 214 file types move by more than their own size, harmlessly).
- Box distributions: an output of raw logits (a Conv, Gemm or MatMul's, through data-movement
  ops) whose last axis holds 4 × ``bins`` values, beside a probability output with the same
  positions (:func:`box_distribution_outputs`), is a detector's box regression as a
  distribution over ``bins`` distances per side (Generalized Focal Loss: PP-PicoDet, NanoDet,
  GFL; decoded outside the model by a softmax per side and its expectation). It is read as
  that decoder reads it: the expected bin of each side, its channels the 4 sides, by value.
  An argmax over its 4 × ``bins`` logits mixes the sides, and the channel axis found by scale
  was the anchors (argmax: which anchor tops each bin): on PP-PicoDet's INT8 that argmax read
  0.38 where its box maps, decoded with float scores, kept 92 % of the regions, and 0.53-0.60
  where they kept 99.6 %; the decoded sides' worst SQNR read 7 dB and 14-18 dB.

Everything is accumulated feed by feed (sums per channel), so memory is bounded by one batch.
Non-finite values: where both models give the same non-finite value the element is left out;
where they differ the output's (and channel's) errors become infinite and cosines NaN, so every
gate on it fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze import sequences

__all__ = [
    "DISTRIBUTION_TOLERANCE",
    "ENOUGH_READS",
    "IDENTICAL_DB",
    "SCORE_ACTIVE",
    "SCORE_THRESHOLDS",
    "SPREAD_FLOOR",
    "OutputAccumulator",
    "OutputFidelity",
    "OutputKinds",
    "accumulators",
    "box_distribution_outputs",
    "channel_axis",
    "channel_error",
    "expected_bins",
    "feature_outputs",
    "gate_metrics",
    "output_shapes",
    "probability_outputs",
    "sqnr_db",
]

IDENTICAL_DB = 200.0  # SQNR reported for an exact match (float32 rounding alone gives ~140 dB)
SCORE_ACTIVE = 0.05  # a probability below this in both models is background: not judged
# The thresholds score_agreement reads scores at (a reader's is not known: ultralytics' 0.25,
# DBNet's 0.3, 0.5 ...).
SCORE_THRESHOLDS = np.round(np.arange(0.1, 0.95, 0.1), 2)
ENOUGH_READS = 50  # reads an agreement needs before one disagreement stays within 2 %
NEIGHBOUR_SAMPLES = 4096  # the most vectors a pooled embedding's neighbours are read among
# The share of its positions at which a score channel may reach 0.5 for its decisions to be
# events (see the module doc), and the values at 0.5 that show it: fewer say nothing on few
# positions (2 of 32 rows is no density).
DENSE_DECISIONS = 0.05
DENSE_EVIDENCE = 10
# A channel's spread, in per-channel errors, is at least this share of its mean square.
SPREAD_FLOOR = 1e-6
# Channels that sum to 1 within this at every position are a distribution over classes.
DISTRIBUTION_TOLERANCE = 1e-3
_PROBABILITY_OPS = {"Sigmoid", "Softmax", "HardSigmoid"}
BOX_SIDES = 4  # a box distribution's sides (left, top, right, bottom)
# The bins per side a box distribution may have: PP-PicoDet's and NanoDet's 8, YOLOv8's 16,
# GFL's 17. Fewer are not distributions (4 values are a box, 8 two points).
BOX_BINS = range(4, 33)
# Ops whose outputs are raw logits (no activation): what a box distribution comes from.
_LOGIT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}
# Ops that move or select values without changing them: a probability stays a probability.
_MOVING_OPS = {
    "Concat",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Split",
    "Gather",
    "GatherElements",
    "Identity",
    "Expand",
    "Cast",
    "TopK",
    # a mean, largest or smallest of probabilities is still one (silero-vad averages its frames)
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
}


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-noise ratio in dB within ±``IDENTICAL_DB`` (``IDENTICAL_DB`` at zero noise,
    ``-IDENTICAL_DB`` for noise where the reference is zero); NaN propagates."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise <= 0.0:
        return IDENTICAL_DB
    if signal <= 0.0:
        return -IDENTICAL_DB
    return max(-IDENTICAL_DB, min(IDENTICAL_DB, 10.0 * math.log10(signal / noise)))


def _cosine(dot: float, norm_a: float, norm_b: float) -> float:
    if norm_a == 0.0 and norm_b == 0.0:
        return 1.0
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(norm_a * norm_b)))


def output_shapes(model: ir.Model) -> dict[str, list[Any]]:
    """The graph outputs' declared shapes (ints for fixed dimensions), for :func:`measure`."""
    return {
        value.name: [d if isinstance(d, int) else None for d in value.shape]
        for value in model.graph.outputs
        if value.shape is not None
    }


def probability_outputs(model: ir.Model) -> set[str]:
    """Names of the graph outputs that carry Sigmoid/Softmax values, directly or through ops
    that only move them (a detector's Concat of boxes and scores included) and through the
    branches of an If (silero-vad's body sits in one)."""
    found = set()
    for output in model.graph.outputs:
        pending, seen = [output], set()
        while pending:
            value = pending.pop()
            node = value.producer()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in _PROBABILITY_OPS or _is_decomposed_softmax(node):
                found.add(output.name)
                break
            if node.op_type in _MOVING_OPS:
                data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
                pending.extend(v for v in data if v is not None)
            elif node.op_type == "If":
                index = list(node.outputs).index(value)
                pending.extend(
                    branch.value.outputs[index]
                    for branch in node.attributes.values()
                    if branch.type == ir.AttributeType.GRAPH
                )
    return found


# Ops whose outputs are features read by their values, not classes: a sentence embedding
# pooled (ReduceMean, or Div of a masked ReduceSum by the token count), token embeddings
# normalized (LayerNormalization), a vector scaled to unit length. An argmax over their
# channels reads noise among near-ties: FP16 kept paraphrase-MiniLM's embeddings at a cosine of
# 0.9999997 and every sentence's nearest neighbour, while the top dimension of 7 % of them
# moved, and an outlier dimension on top of most tokens was taken for a CTC blank.
_FEATURE_OPS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "LpNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "Div",
}

# Rectifying activations: what they produce is a feature map (a YOLO segmentation head's mask
# prototypes, [1, 32, 160, 160] after a SiLU), never logits or scores, and its top channel per
# pixel is no class: YOLO11-seg's FP16 read 0.9986 of them, its working INT8 0.86.
_RECTIFIER_OPS = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "HardSwish",
    "Softplus",
    "Mish",
    "ThresholdedRelu",
}


def _rectifies(node: ir.Node) -> bool:
    """A rectifying activation, SiLU (``x * Sigmoid(x)``) included."""
    if node.op_type in _RECTIFIER_OPS:
        return True
    if node.op_type != "Mul" or len(node.inputs) != 2 or None in node.inputs:
        return False
    x, y = node.inputs
    gates = [v.producer() for v in (x, y)]
    return any(
        g is not None and g.op_type == "Sigmoid" and g.inputs[0] is other
        for g, other in zip(gates, (y, x), strict=True)
    )


def feature_outputs(model: ir.Model) -> set[str]:
    """Names of the graph outputs that a pooling, a normalization (``_FEATURE_OPS``) or a
    rectifying activation produces, directly or through ops that only move values and through
    affine ops with constant operands (a LayerNorm's scale and shift written out): read by
    value (SQNR, cosine), never by argmax, top-1 or as CTC. Probability outputs are not among
    them."""
    probabilities = probability_outputs(model)
    found = set()
    for output in model.graph.outputs:
        if output.name in probabilities:
            continue
        value, seen = output, set()
        while (node := value.producer()) is not None and id(node) not in seen:
            seen.add(id(node))
            if node.op_type in _FEATURE_OPS or _rectifies(node):
                found.add(output.name)
                break
            data = [v for v in node.inputs if v is not None and v.const_value is None]
            if node.op_type in _MOVING_OPS or (node.op_type in ("Add", "Mul") and len(data) == 1):
                value = data[0] if data else node.inputs[0]
                continue
            break
    return found


def box_distribution_outputs(model: ir.Model) -> dict[str, int]:
    """The graph outputs that are box distributions (see the module doc), with their bins per
    side: raw logits (a ``_LOGIT_OPS`` output through ops that only move values) whose last
    axis, of fixed size, holds ``BOX_SIDES`` × bins (bins in ``BOX_BINS``), beside a
    probability output whose other axes are the same (the scores of the same positions).
    Mask coefficients beside scores (YOLACT's 32 after a Tanh) are no logits: not among
    them."""
    probabilities = probability_outputs(model)

    def positions(value: ir.Value) -> tuple[Any, ...] | None:
        shape = value.shape
        return tuple(shape.dims[:-1]) if shape is not None and len(shape) >= 2 else None

    scored = {positions(v) for v in model.graph.outputs if v.name in probabilities} - {None}
    found = {}
    for output in model.graph.outputs:
        if output.name in probabilities or positions(output) not in scored:
            continue
        last = output.shape.dims[-1] if output.shape is not None else None
        if not isinstance(last, int) or last % BOX_SIDES or last // BOX_SIDES not in BOX_BINS:
            continue
        if _source(output) in _LOGIT_OPS:
            found[output.name] = last // BOX_SIDES
    return found


def _source(value: ir.Value) -> str | None:
    """The op type of the first producer of ``value`` that does more than move values."""
    seen: set[int] = set()
    while (node := value.producer()) is not None and id(node) not in seen:
        seen.add(id(node))
        if node.op_type not in _MOVING_OPS or node.inputs[0] is None:
            return node.op_type
        value = node.inputs[0]
    return None


def expected_bins(logits: np.ndarray, bins: int) -> np.ndarray:
    """A box distribution decoded as a GFL decoder does: the last axis (``BOX_SIDES`` ×
    ``bins`` logits) becomes ``BOX_SIDES`` expected bins (softmax per side, then its mean)."""
    sides = np.asarray(logits, dtype=np.float64).reshape(*logits.shape[:-1], BOX_SIDES, bins)
    with np.errstate(invalid="ignore", over="ignore"):
        weights = np.exp(sides - sides.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ np.arange(bins, dtype=np.float64)


def _is_decomposed_softmax(node: ir.Node) -> bool:
    """``Exp(x) / sum(Exp(x))`` as some exporters write a softmax (tf2onnx: Div of an Exp by
    its ReduceSum, broadcast)."""
    if node.op_type != "Div" or len(node.inputs) != 2 or node.inputs[0] is None:
        return False
    numerator = node.inputs[0].producer()
    return numerator is not None and numerator.op_type == "Exp"


def channel_axis(reference: np.ndarray, fixed: Sequence[bool] | None = None) -> int | None:
    """The axis whose slices differ most in scale: the widest spread (standard deviation) of
    the logarithm of the slices' RMS, all-zero slices left out.

    Candidates: axes of size > 1, of fixed size (``fixed[axis]``, when known), and not axis 0
    of an output of rank 2 or more (the batch). None when there is no candidate.
    """
    values = np.asarray(reference, dtype=np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    best, best_spread = None, -1.0
    for axis in range(values.ndim):
        if values.shape[axis] < 2 or (axis == 0 and values.ndim > 1):
            continue
        if fixed is not None and axis < len(fixed) and not fixed[axis]:
            continue
        other = tuple(i for i in range(values.ndim) if i != axis)
        rms = np.sqrt(np.mean(values**2, axis=other))
        live = np.log(rms[rms > 0])
        spread = float(live.std()) if live.size > 1 else 0.0
        if spread > best_spread:
            best, best_spread = axis, spread
    return best


@dataclasses.dataclass
class OutputFidelity:
    """How closely model B's output matches model A's over all feeds."""

    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None
    nonfinite_a: int
    nonfinite_b: int
    samples: int
    elements: int = 0
    sqnr_db: float = IDENTICAL_DB
    channel_axis: int | None = None
    channels: int = 1
    worst_channel_sqnr_db: float = IDENTICAL_DB
    worst_sqnr_channel: int | None = None
    mean_channel_sqnr_db: float = IDENTICAL_DB
    worst_channel_cosine: float = 1.0
    worst_cosine_channel: int | None = None
    mean_channel_cosine: float = 1.0
    score_channels: int = 0
    score_cosine: float | None = None
    # Score decisions (see the module doc): the agreement, the threshold it was read at and
    # the values at or above that threshold in either model.
    score_agreement: float | None = None
    score_threshold: float | None = None
    score_reads: int = 0
    # The reads above counted as independent ones (see :func:`independent_reads`): the
    # anchors around one object in one image decide together.
    score_independent_reads: float = 0.0
    # A score channel whose decisions are dense (at or above 0.5 at more than DENSE_DECISIONS
    # of its positions): the output's score decisions are then not read.
    dense_score_channel: int | None = None
    # Where the worst SQNR channel holds scores: the values it was measured on (those at
    # least SCORE_ACTIVE in either model); a rare class's few detections decide it.
    worst_channel_reads: int | None = None
    argmax_agreement: float | None = None
    # Where argmax_agreement reads decoded CTC strings: the share of their tokens that agree,
    # the share of steps, and the class read as the blank.
    token_agreement: float | None = None
    position_agreement: float | None = None
    # What argmax_agreement counts: positions, or the sequences of a CTC output; and as many
    # independent ones (see :func:`independent_reads`): the pixels of one image move together.
    reads: int = 0
    independent_reads: float = 0.0
    ctc_blank: int | None = None
    # A softmax over classes (see the module doc): read by its argmax.
    class_probabilities: bool = False
    # A pooled embedding (one vector per sample, read by value): the share of its distinct
    # samples whose nearest other sample by cosine is the same in both models, and how many.
    neighbour_agreement: float | None = None
    neighbour_reads: int = 0
    # Σ|b - a|² / Σ|a - mean a|²: the share of A's variance that B misses (1 - R²).
    relative_error: float = 0.0
    # A box distribution (see the module doc): its bins per side; the figures are those of
    # the decoded sides (expected bins), its channels the sides.
    box_bins: int | None = None

    @property
    def read_by_value(self) -> bool:
        """Whether the output is read by its values: not a distribution over classes (read by
        its argmax) nor a map of scores only, read by their decisions (score_agreement):
        PP-PicoDet's score maps took the anchors for channels, and an anchor that scores in
        one model only read -200 dB where the regions hardly moved."""
        scores_only = self.score_agreement is not None and self.score_channels == self.channels
        return not self.class_probabilities and not scores_only

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; non-finite numbers become strings ("inf", "nan")."""
        data = {**dataclasses.asdict(self), "read_by_value": self.read_by_value}
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = str(value)
        return data


class OutputAccumulator:
    """Streaming sums, whole and per channel, for one output of A (reference) and B."""

    def __init__(
        self,
        name: str,
        *,
        fixed: Sequence[bool] | None = None,
        axis: int | str | None = "auto",
        probabilities: bool = False,
        features: bool = False,
        box_bins: int | None = None,
    ) -> None:
        self.name = name
        self.fixed = fixed
        self.axis = axis
        self.probabilities = probabilities
        self.features = features  # read by value only (see feature_outputs)
        self.box_bins = box_bins  # a box distribution, decoded (see box_distribution_outputs)
        self.samples = 0
        self.elements = 0
        self.compared = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.nonfinite_a = 0
        self.nonfinite_b = 0
        self.classifier: bool | None = None
        self.top1_matches = 0
        self.rows = 0
        self.argmax_matches = 0
        self.positions = 0
        # Σ over feeds of matches², matches·positions, positions² and the feeds that had any:
        # the spread of the agreement between feeds (see independent_reads).
        self.argmax_moments = np.zeros((4, 1))
        # Top classes per sequence ([sequences, steps] per feed) of rank-3 outputs, for CTC.
        self.steps: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        # A pooled embedding's vectors ([samples, dims] per feed), for nearest neighbours.
        self.vectors: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.sum_gap = 0.0  # the largest |Σ over channels - 1| of the reference, per position
        self.sums: dict[str, np.ndarray] = {}

    def _resolve_axis(self, a: np.ndarray) -> int | None:
        if self.axis == "auto":
            self.axis = channel_axis(a, self.fixed)
        elif self.axis is not None:
            axis = int(self.axis)
            if not -a.ndim <= axis < a.ndim:
                raise ValueError(
                    f"channel axis {axis} is out of range for output {self.name!r} of rank {a.ndim}"
                )
            self.axis = axis % a.ndim
        return self.axis

    def _per_channel(self, array: np.ndarray, axis: int | None) -> np.ndarray:
        if axis is None:
            return array.reshape(1, -1)
        return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)

    def _merge_channels(self) -> None:
        self.axis = None
        for key, value in self.sums.items():
            merge = np.min if key == "low" else np.max if key == "high" else np.sum
            self.sums[key] = merge(value, axis=0, keepdims=True)

    def _count_positions(self, matches: int, positions: int) -> None:
        self.argmax_matches += matches
        self.positions += positions
        self.argmax_moments += _moments(np.array([matches]), np.array([positions]))

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if self.box_bins:
            a, b = expected_bins(a, self.box_bins), expected_bins(b, self.box_bins)
        if self.classifier is None:
            self.classifier = (
                not self.features
                and a.ndim == 2
                and a.shape[1] > 1
                and np.issubdtype(a.dtype, np.floating)
            )
        if self.classifier:
            self.top1_matches += int(np.count_nonzero(a.argmax(axis=1) == b.argmax(axis=1)))
            self.rows += a.shape[0]
        axis = self._resolve_axis(a)
        x = self._per_channel(np.asarray(a, dtype=np.float64), axis)
        y = self._per_channel(np.asarray(b, dtype=np.float64), axis)
        if self.sums and x.shape[0] != self.sums["dot"].shape[0]:
            # The channel count changed between feeds: judge the whole output as one channel.
            self._merge_channels()
            axis = None
            x, y = x.reshape(1, -1), y.reshape(1, -1)
        self.samples += 1
        self.elements += x.size
        finite_x, finite_y = np.isfinite(x), np.isfinite(y)
        self.nonfinite_a += int(x.size - np.count_nonzero(finite_x))
        self.nonfinite_b += int(y.size - np.count_nonzero(finite_y))
        both = finite_x & finite_y
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        mismatched = np.count_nonzero(~both & ~same, axis=1)
        if (
            axis is not None
            and a.ndim > 1
            and np.issubdtype(a.dtype, np.floating)
            and not self.features
        ):
            top_a, top_b = a.argmax(axis=axis), b.argmax(axis=axis)
            self._count_positions(int(np.count_nonzero(top_a == top_b)), top_a.size)
            if a.ndim == 3:
                time = sequences.time_axis(a.shape, axis, self.fixed)
                time -= time > axis
                for kept, top in zip(self.steps, (top_a, top_b), strict=True):
                    kept.append(np.moveaxis(top, time, -1).astype(np.int64))
            if self.probabilities:
                totals = np.sum(a, axis=axis, dtype=np.float64)
                gap = np.abs(totals - 1.0)
                self.sum_gap = max(self.sum_gap, float(gap.max()) if gap.size else 0.0)
        elif self.probabilities and np.issubdtype(a.dtype, np.floating):
            # One probability per position, no classes beside it (a sigmoid's binary decision,
            # voice activity, a text map): read where it crosses 0.5.
            self._count_positions(int(np.count_nonzero((a >= 0.5) == (b >= 0.5))), a.size)
        elif (
            self.features
            and not self.box_bins
            and a.ndim == 2
            and np.issubdtype(a.dtype, np.floating)
            and sum(len(v) for v in self.vectors[0]) < NEIGHBOUR_SAMPLES
        ):
            for kept, vectors in zip(self.vectors, (a, b), strict=True):
                kept.append(np.asarray(vectors, dtype=np.float64))
        x, y = np.where(both, x, 0.0), np.where(both, y, 0.0)
        diff = x - y
        if both.any():
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        self.sum_abs += float(np.abs(diff).sum())
        self.compared += int(np.count_nonzero(both))
        low = np.where(both, x, np.inf).min(axis=1)
        high = np.where(both, x, -np.inf).max(axis=1)
        active = both & (np.maximum(x, y) >= SCORE_ACTIVE) if self.probabilities else both
        above_both, above_either = _above(x, y, SCORE_THRESHOLDS if self.probabilities else ())
        sums = {
            "above_both": above_both,
            "above_either": above_either,
            "above_moments": _moments(above_both, above_either),
            "half_a": np.count_nonzero(x >= 0.5, axis=1).astype(np.float64)
            if self.probabilities
            else np.zeros(x.shape[0]),
            "dot": np.einsum("ij,ij->i", x, y),
            "sum_a": x.sum(axis=1),
            "norm_a": np.einsum("ij,ij->i", x, x),
            "norm_b": np.einsum("ij,ij->i", y, y),
            "noise": np.einsum("ij,ij->i", diff, diff),
            "count": np.count_nonzero(both, axis=1).astype(np.float64),
            "mismatched": mismatched.astype(np.float64),
            "active_a": np.einsum("ij,ij->i", x * active, x),
            "active_noise": np.einsum("ij,ij->i", diff * active, diff),
            "active": np.count_nonzero(active, axis=1).astype(np.float64),
        }
        if not self.sums:
            self.sums = {**sums, "low": low, "high": high}
            return
        for key, value in sums.items():
            self.sums[key] += value
        self.sums["low"] = np.minimum(self.sums["low"], low)
        self.sums["high"] = np.maximum(self.sums["high"], high)

    def channel_spreads(self) -> np.ndarray:
        """Per channel: the reference's variance about its mean (per value), floored at a
        share ``SPREAD_FLOOR`` of its mean square (a constant channel's error counts against
        its size) and, for score channels, at ``SCORE_ACTIVE``² (a class that never fires does
        not count its harmless wiggles in millionths)."""
        s = self.sums
        if not s:
            return np.zeros(0)
        count = np.maximum(s["count"], 1.0)
        variance = (s["norm_a"] - np.square(s["sum_a"]) / count) / count
        floor = SPREAD_FLOOR * s["norm_a"] / count
        if self.probabilities:
            scores = (s["low"] >= 0.0) & (s["high"] <= 1.0)
            floor = np.where(scores, np.maximum(floor, SCORE_ACTIVE**2), floor)
        return np.maximum(variance, floor)

    def channel_errors(self) -> np.ndarray:
        """Per channel: mean squared error over the reference's spread (:meth:`channel_spreads`;
        1 - R² of the channel), so that a channel of scores in [0, 1] counts as much as one of
        pixel coordinates. Channels whose reference is zero throughout count 0, as in the
        per-channel SQNR; NaN where the models disagree on non-finite values."""
        s = self.sums
        if not s:
            return np.zeros(0)
        scale = np.maximum(s["count"], 1.0) * self.channel_spreads()
        live = s["norm_a"] > 0
        errors = np.where(live, s["noise"] / np.where(live, scale, 1.0), 0.0)
        return np.where(s["mismatched"] > 0, math.nan, errors)

    def result(self) -> OutputFidelity:
        s = self.sums or dict.fromkeys(_SUMS, np.zeros(1))
        broken = bool(s["mismatched"].sum())
        cosine = _cosine(float(s["dot"].sum()), float(s["norm_a"].sum()), float(s["norm_b"].sum()))
        whole_sqnr = sqnr_db(float(s["norm_a"].sum()), float(s["noise"].sum()))
        max_abs = self.max_abs
        mean_abs = self.sum_abs / self.compared if self.compared else 0.0
        if broken:
            max_abs, mean_abs, cosine, whole_sqnr = math.inf, math.inf, math.nan, math.nan
        scores = (
            (s["low"] >= 0.0) & (s["high"] <= 1.0)
            if self.probabilities
            else np.zeros_like(s["low"], dtype=bool)
        )
        signal = np.where(scores, s["active_a"], s["norm_a"])
        noise = np.where(scores, s["active_noise"], s["noise"])
        live = np.where(scores, s["active"] > 0, s["norm_a"] > 0)
        channel_sqnr = np.array(
            [
                math.nan if m else sqnr_db(p, n)
                for p, n, m in zip(signal, noise, s["mismatched"], strict=True)
            ]
        )
        channel_cosine = np.array(
            [
                math.nan if m else _cosine(d, na, nb)
                for d, na, nb, m in zip(
                    s["dot"], s["norm_a"], s["norm_b"], s["mismatched"], strict=True
                )
            ]
        )
        judged = live | (s["mismatched"] > 0)
        worst_sqnr, worst_sqnr_at, mean_sqnr = _worst_and_mean(channel_sqnr, judged)
        worst_cos, worst_cos_at, mean_cos = _worst_and_mean(channel_cosine, judged & live)
        score_cosine = None
        if scores.any():
            score_cosine = _cosine(
                float(s["dot"][scores].sum()),
                float(s["norm_a"][scores].sum()),
                float(s["norm_b"][scores].sum()),
            )
            if s["mismatched"][scores].any():
                score_cosine = math.nan
        mixed = scores.any() and not scores.all()
        decisions = not isinstance(self.axis, int)  # counted at 0.5, read only if probabilities
        distribution = (
            not decisions and bool(scores.all()) and self.sum_gap <= DISTRIBUTION_TOLERANCE
        )
        # independent scores along a channel axis (sigmoids that do not sum to 1) are read
        # against thresholds (score_agreement), not by their top channel: PP-PicoDet's score
        # maps took the anchors for the channel axis (they differ more in scale than its 10
        # classes), and FP16, keeping every region, moved one top anchor of 30
        readable = scores.all() if decisions else not mixed and (distribution or not scores.any())
        class_probabilities = readable and bool(self.positions) and distribution
        read = dense = None
        if scores.any() and not decisions and not class_probabilities:
            share = s["half_a"] > DENSE_DECISIONS * np.maximum(s["count"], 1.0)
            crowded = scores & share & (s["half_a"] >= DENSE_EVIDENCE)
            dense = int(np.argmax(crowded)) if crowded.any() else None
        if dense is None and scores.any() and not decisions and not class_probabilities:
            read = _score_decisions(
                s["above_both"][scores].sum(axis=0),
                s["above_either"][scores].sum(axis=0),
                s["above_moments"][scores].sum(axis=0),
            )
            if s["mismatched"][scores].any():  # non-finite where the reference is not
                read = (math.nan, *(read[1:] if read else (float(SCORE_THRESHOLDS[0]), 0, 0.0)))
        position = self.argmax_matches / self.positions if self.positions and readable else None
        blank = (
            sequences.ctc_blank(self.steps[0])
            if position is not None and isinstance(self.axis, int)
            else None
        )
        argmax, tokens = position, None
        sequences_read = sum(len(s) for s in self.steps[0])  # a CTC output reads lines
        if blank is not None:
            argmax, tokens = sequences.agreements(*self.steps, blank)
        total = float(s["count"].sum())
        spread = float(s["norm_a"].sum()) - float(s["sum_a"].sum()) ** 2 / max(total, 1.0)
        relative = float(s["noise"].sum()) / max(spread, 1e-30) if not broken else math.inf
        return OutputFidelity(
            name=self.name,
            max_abs=max_abs,
            mean_abs=mean_abs,
            cosine=cosine,
            top1_agreement=self.top1_matches / self.rows if self.classifier and self.rows else None,
            nonfinite_a=self.nonfinite_a,
            nonfinite_b=self.nonfinite_b,
            samples=self.samples,
            elements=self.elements,
            sqnr_db=whole_sqnr,
            channel_axis=self.axis if isinstance(self.axis, int) else None,
            channels=len(s["dot"]),
            worst_channel_sqnr_db=worst_sqnr,
            worst_sqnr_channel=worst_sqnr_at,
            mean_channel_sqnr_db=mean_sqnr,
            worst_channel_cosine=worst_cos,
            worst_cosine_channel=worst_cos_at,
            mean_channel_cosine=mean_cos,
            score_channels=int(scores.sum()),
            score_cosine=score_cosine,
            worst_channel_reads=(
                int(s["active"][worst_sqnr_at])
                if worst_sqnr_at is not None and scores[worst_sqnr_at]
                else None
            ),
            argmax_agreement=argmax,
            token_agreement=tokens,
            reads=self.positions if blank is None else sequences_read,
            independent_reads=(
                independent_reads(self.argmax_matches, self.positions, self.argmax_moments[:, 0])
                if blank is None
                else float(sequences_read)
            ),
            position_agreement=position if blank is not None else None,
            ctc_blank=blank,
            class_probabilities=class_probabilities,
            score_agreement=read[0] if read else None,
            score_threshold=read[1] if read else None,
            score_reads=read[2] if read else 0,
            score_independent_reads=read[3] if read else 0.0,
            dense_score_channel=dense,
            relative_error=relative,
            box_bins=self.box_bins,
            **_neighbours(self.vectors),
        )


_SUMS = (
    "dot",
    "sum_a",
    "norm_a",
    "norm_b",
    "noise",
    "count",
    "mismatched",
    "active_a",
    "active_noise",
    "active",
    "above_both",
    "above_either",
    "above_moments",
    "half_a",
    "low",
    "high",
)


def gate_metrics(outputs: Iterable[OutputFidelity]) -> dict[str, float]:
    """The fidelity metrics that gates read, over all outputs (see :mod:`onnx_squeeze.gates`):
    cosine, sqnr_db, worst_channel_sqnr_db, worst_channel_cosine: worst (lowest) output;
    worst_value_channel_sqnr_db: the same over the outputs read by value (all but class
    probabilities and maps of scores only: :attr:`OutputFidelity.read_by_value`);
    max_abs_error, mean_abs_error: worst (highest); top1_agreement,
    score_cosine, score_agreement, argmax_agreement, token_agreement: lowest over the outputs
    that have them;
    nonfinite: the non-finite values in B's outputs. A metric no output has is absent; NaN anywhere is NaN."""
    outputs = list(outputs)
    if not outputs:
        return {}
    metrics = {"nonfinite": float(sum(f.nonfinite_b for f in outputs))}
    by_value = [f for f in outputs if f.read_by_value]
    for key, attribute, pick, among in (
        ("cosine", "cosine", min, outputs),
        ("max_abs_error", "max_abs", max, outputs),
        ("mean_abs_error", "mean_abs", max, outputs),
        ("sqnr_db", "sqnr_db", min, outputs),
        ("worst_channel_sqnr_db", "worst_channel_sqnr_db", min, outputs),
        ("worst_value_channel_sqnr_db", "worst_channel_sqnr_db", min, by_value),
        ("worst_channel_cosine", "worst_channel_cosine", min, outputs),
        ("top1_agreement", "top1_agreement", min, outputs),
        ("score_cosine", "score_cosine", min, outputs),
        ("score_agreement", "score_agreement", min, outputs),
        ("argmax_agreement", "argmax_agreement", min, outputs),
        ("token_agreement", "token_agreement", min, outputs),
        ("neighbour_agreement", "neighbour_agreement", min, outputs),
    ):
        values = [float(v) for f in among if (v := getattr(f, attribute)) is not None]
        if values:
            metrics[key] = math.nan if any(map(math.isnan, values)) else pick(values)
    return metrics


def _above(x: np.ndarray, y: np.ndarray, thresholds: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Per channel (row) and threshold: the values at or above it in both, and in either."""
    both = np.zeros((x.shape[0], len(thresholds)))
    either = np.zeros_like(both)
    for i, threshold in enumerate(thresholds):
        a, b = x >= threshold, y >= threshold
        both[:, i] = np.count_nonzero(a & b, axis=1)
        either[:, i] = np.count_nonzero(a | b, axis=1)
    return both, either


def _score_decisions(
    both: np.ndarray, either: np.ndarray, moments: np.ndarray
) -> tuple[float, float, int, float] | None:
    """score_agreement, its threshold, its reads and as many independent ones from the counts
    pooled over the score channels (see the module doc; ``moments``: :func:`_moments` per
    threshold); None when no score reaches the lowest threshold."""
    if not either.any():
        return None
    enough = np.flatnonzero(either >= ENOUGH_READS)
    candidates = enough if enough.size else [int(np.argmax(either))]
    shares = {int(i): both[i] / either[i] for i in candidates}
    worst = min(reversed(shares), key=shares.__getitem__)  # ties: the fewest reads
    independent = independent_reads(both[worst], either[worst], moments[..., worst])
    return float(shares[worst]), float(SCORE_THRESHOLDS[worst]), int(either[worst]), independent


def _moments(agreed: np.ndarray, reads: np.ndarray) -> np.ndarray:
    """The sums :func:`independent_reads` needs from one group of reads (one feed of one
    channel): agreed², agreed·reads, reads², and 1 where it had any, stacked on axis -2 of
    what ``agreed`` and ``reads`` hold per channel and threshold."""
    agreed, reads = np.asarray(agreed, np.float64), np.asarray(reads, np.float64)
    return np.stack([agreed * agreed, agreed * reads, reads * reads, (reads > 0) * 1.0], axis=-2)


def independent_reads(agreed: float, reads: float, moments: np.ndarray) -> float:
    """How many independent reads an agreement ``agreed`` / ``reads`` is worth, from how much
    it differs between the groups its reads came in (``moments``: :func:`_moments` summed
    over the groups): the reads of one group (the anchors around one object, the pixels of one
    image) often decide together, and counted one by one they promise a bound that other data
    will not keep. nudenet's INT8 read 0.906 of 266 score decisions on 32 calibration images
    (0.887 at the bound) and 0.845 of 58 on 26 others. The ratio estimator's variance over
    groups (cluster sampling) gives share·(1 - share) / variance reads, never more than
    counted; as counted where every read agrees, or with fewer than 2 groups."""
    squared, cross, squares, groups = (float(m) for m in moments)
    if reads <= 0:
        return 0.0
    share = agreed / reads
    residual = squared - 2 * share * cross + share * share * squares
    if not 0 < share < 1 or groups < 2 or residual <= 0:
        return float(reads)
    variance = residual * groups / (groups - 1) / (reads * reads)
    return float(min(reads, share * (1 - share) / variance))


def _neighbours(vectors: tuple[list[np.ndarray], list[np.ndarray]]) -> dict[str, Any]:
    """``neighbour_agreement`` and its reads from a pooled embedding's vectors (see
    :class:`OutputFidelity`): what a similarity search reads. Samples repeated in the
    reference count once (a repeated sentence is its own nearest neighbour in both)."""
    if not vectors[0]:
        return {}
    a, b = (np.concatenate(v) for v in vectors)
    _, first = np.unique(a, axis=0, return_index=True)
    keep = np.sort(first)
    if keep.size < 3:
        return {}
    if not np.isfinite(b[keep]).all():
        return {"neighbour_agreement": math.nan, "neighbour_reads": int(keep.size)}
    nearest = []
    for x in (a[keep], b[keep]):
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        nearest.append(similarity.argmax(axis=1))
    agreement = float(np.mean(nearest[0] == nearest[1]))
    return {"neighbour_agreement": agreement, "neighbour_reads": int(keep.size)}


def _worst_and_mean(values: np.ndarray, judged: np.ndarray) -> tuple[float, int | None, float]:
    """The lowest value (NaN first) among the judged channels, its index, and their mean."""
    if not judged.any():
        return float(values.max()), None, float(values.max())
    picked = np.flatnonzero(judged)
    chosen = values[picked]
    nan = np.isnan(chosen)
    index = int(picked[np.argmax(nan)]) if nan.any() else int(picked[np.argmin(chosen)])
    finite = chosen[np.isfinite(chosen)]
    mean = float(finite.mean()) if finite.size == chosen.size else float(chosen.min())
    return float(values[index]), index, mean


@dataclasses.dataclass(frozen=True)
class OutputKinds:
    """How a reference model's graph outputs are read, found once from its graph (what the
    outputs carry cannot be told from their values): every measure of outputs against that
    reference reads them alike. The default knows nothing: no declared shapes, every output
    read as plain values."""

    shapes: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    probabilities: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()
    box_distributions: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model: ir.Model) -> OutputKinds:
        """The kinds of ``model``'s outputs: :func:`output_shapes`,
        :func:`probability_outputs`, :func:`feature_outputs`, :func:`box_distribution_outputs`."""
        return cls(
            shapes=output_shapes(model),
            probabilities=frozenset(probability_outputs(model)),
            features=frozenset(feature_outputs(model)),
            box_distributions=box_distribution_outputs(model),
        )


def accumulators(
    names: Sequence[str],
    *,
    kinds: OutputKinds | None = None,
    channel_axes: Mapping[str, int | None] | None = None,
) -> dict[str, OutputAccumulator]:
    """One accumulator per output, reading it as ``kinds`` says: the declared shapes say which
    axes may be channel axes, features are read by value only, box distributions decoded
    (their sides, the last axis, the channels)."""
    kinds = kinds or OutputKinds()
    channel_axes = channel_axes or {}
    result = {}
    for name in names:
        declared = kinds.shapes.get(name)
        fixed = [isinstance(d, int) and d > 0 for d in declared] if declared else None
        bins = kinds.box_distributions.get(name)
        result[name] = OutputAccumulator(
            name,
            fixed=fixed,
            axis=channel_axes.get(name, "auto" if bins is None else -1),
            probabilities=name in kinds.probabilities,
            features=name in kinds.features or bins is not None,
            box_bins=bins,
        )
    return result


def measure(
    reference: Sequence[Mapping[str, np.ndarray]],
    result: Sequence[Mapping[str, np.ndarray]],
    *,
    kinds: OutputKinds | None = None,
    channel_axes: Mapping[str, int | None] | None = None,
) -> dict[str, OutputFidelity]:
    """The fidelity of ``result``'s float outputs to ``reference``'s, batch by batch (outputs by
    name, as two runs return them): the one measure that comparison, pruning sensitivity,
    recovery, fine-tuning and INT8 checks read their figures from. ``kinds``: the reference
    model's (:meth:`OutputKinds.of`), so that each reads them as the comparison does (without
    declared shapes a mask's height or width could be taken for classes)."""
    found = _accumulated(reference, result, kinds, channel_axes)
    return {name: accumulator.result() for name, accumulator in found.items()}


def _accumulated(
    reference: Sequence[Mapping[str, np.ndarray]],
    result: Sequence[Mapping[str, np.ndarray]],
    kinds: OutputKinds | None,
    channel_axes: Mapping[str, int | None] | None,
) -> dict[str, OutputAccumulator]:
    """One accumulator per float output, fed every pair of runs."""
    names = [
        name
        for name in (reference[0] if reference else {})
        if np.issubdtype(np.asarray(reference[0][name]).dtype, np.floating)
    ]
    found = accumulators(names, kinds=kinds, channel_axes=channel_axes)
    for expected, actual in zip(reference, result, strict=True):
        for name, accumulator in found.items():
            accumulator.add(np.asarray(expected[name]), np.asarray(actual[name]))
    return found


def channel_error(
    reference: Sequence[Mapping[str, np.ndarray]],
    result: Sequence[Mapping[str, np.ndarray]],
    *,
    kinds: OutputKinds | None = None,
    channel_axes: Mapping[str, int | None] | None = None,
) -> dict[str, float]:
    """Per float output, the mean over its channels of each channel's error relative to that
    channel's own spread over all feeds (:meth:`OutputAccumulator.channel_errors`; the channel
    axis as :func:`measure` chooses it). What passes minimise where a whole-output error would
    let large-valued channels (pixel boxes) hide small-valued ones (scores) beside them."""
    found = _accumulated(reference, result, kinds, channel_axes)
    return {
        name: float(np.mean(errors)) if (errors := acc.channel_errors()).size else 0.0
        for name, acc in found.items()
    }


def counted_reads(outputs: Iterable[OutputFidelity], metric: str) -> float:
    """The fewest reads that agreement ``metric`` counted over the ``outputs`` that have it:
    positions (or CTC lines), score decisions, neighbours or rows; infinite where none has it."""
    field = {
        "score_agreement": "score_independent_reads",
        "neighbour_agreement": "neighbour_reads",
        "argmax_agreement": "independent_reads",
    }
    name = field.get(metric, "samples" if metric == "top1_agreement" else "reads")
    counts = [getattr(m, name) for m in outputs if getattr(m, metric, None) is not None]
    return float(min(counts)) if counts and min(counts) > 0 else math.inf
