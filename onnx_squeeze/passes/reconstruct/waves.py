"""Fitting: one run of the student over the calibration feeds per wave of layers, then each
layer refitted by its method (least squares, joint low rank, per-channel statistics)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import ChannelStatistics
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.graph_utils import attribute, constant_array
from onnx_squeeze.least_squares import Regression, RidgeFolds
from onnx_squeeze.passes.reconstruct.linear import Edits, bias_array, current, write_bias
from onnx_squeeze.passes.reconstruct.planner import Target
from onnx_squeeze.passes.reconstruct.settings import ReconstructSettings
from onnx_squeeze.passes.reconstruct.targets import FITTED, LayerTargets, Targets, channel_axis
from onnx_squeeze.records import KEPT_CHANNELS_KEY, PassReport

# A channel whose student output varies less than this (relative) is not rescaled by ``bn``.
_DEAD_VARIANCE = 1e-12
# A layer whose output already matches the teacher's this well (1 - R²) is left as it is.
_EXACT = 1e-10


class Wave:
    """Layers fitted from one run of the student over the calibration feeds, against the
    teacher's side already taken (:class:`~.targets.Targets`)."""

    def __init__(self, layers: list[Target], settings: ReconstructSettings) -> None:
        self.layers = layers
        self.settings = settings

    def student_names(self) -> list[str]:
        names = []
        for layer in self.layers:
            names.append(layer.input.name)
            if layer.method in ("bn", "bias"):
                names.append(layer.output.name)
        return names

    def fit(
        self,
        model: ir.Model,
        feeds: list[Feed],
        targets: Targets,
        edits: Edits,
        report: PassReport,
    ) -> None:
        sums: list[Any] = [None] * len(self.layers)
        with TensorRunner(model, self.student_names()) as student_run:
            for batch, feed in enumerate(feeds):
                student = student_run(feed)
                for index, layer in enumerate(self.layers):
                    sums[index] = self.accumulate(
                        layer, student, targets[layer], batch, sums[index]
                    )
                del student
        for index, layer in enumerate(self.layers):
            accumulated, sums[index] = sums[index], None  # each layer's sums go once applied
            problem = self.mismatch(layer, accumulated)
            if problem:
                report.skip(layer.node, problem)
                continue
            if layer.method not in FITTED:
                accumulated = (accumulated, targets[layer].statistics)
            getattr(self, f"apply_{layer.method}")(layer, accumulated, edits, report)

    def accumulate(self, layer, student, teacher: LayerTargets, batch: int, sums):
        """Add one batch to the layer's sums (None until a batch matched the layer's shape):
        the regression's sums, or the student's output statistics."""
        if layer.method in FITTED:
            target = teacher.rows[batch]
            if target is None:
                return sums
            fitted = layer.first or layer.linear
            x = fitted.inputs(student[layer.input.name], teacher.picks[batch])
            if sums is None:
                sums = RidgeFolds(
                    x.shape[0],
                    x.shape[2],
                    target.shape[2],
                    intercept=layer.linear.bias_slot,
                    per_output=layer.output_layer,
                )
            sums.update(x, target)
            return sums
        observed = student[layer.input.name if layer.method == "batchnorm" else layer.output.name]
        axis = channel_axis(layer)
        if teacher.statistics is None or teacher.statistics.channels != observed.shape[axis]:
            return sums
        if sums is None:
            sums = ChannelStatistics(axis)
        sums.update(observed)
        return sums

    def mismatch(self, layer: Target, sums: Any) -> str | None:
        """Why the teacher's tensor could not serve as target, or None."""
        if sums is None or (isinstance(sums, RidgeFolds) and sums.folds[0].rows == 0):
            return (
                f"the teacher's {layer.output.name!r} does not match the student's channels "
                f"(no {KEPT_CHANNELS_KEY} metadata?)"
            )
        return None

    def ridges(self) -> list[float]:
        ridge = self.settings.ridge
        if not self.settings.cross_validate:
            return [ridge]
        start = ridge if ridge > 0 else 1e-6
        return ([0.0] if ridge == 0 else []) + [start * 10**k for k in range(0, 7, 2)]

    def apply_lstsq(self, layer, folds, edits, report):
        linear = layer.linear
        prior = current(linear, layer.node)
        ridge = folds.choose_ridge(self.ridges(), prior)
        sums = folds.total()
        solution = sums.solve(ridge, prior)
        before, after = sums.relative_error(prior), sums.relative_error(solution)
        if before < _EXACT or not after < before:
            report.record(layer.node, "kept", f"refit would not help ({before:.3g})")
            return
        dtype = layer.node.inputs[1].dtype
        features = linear.matrix().shape[1]
        edits.set(layer.node, 1, linear.to_weight(solution[:, :features]), dtype, "weight_refit")
        if linear.bias_slot:
            write_bias(edits, layer.node, linear, solution[:, features].reshape(-1), dtype)
        report.record(layer.node, "refit", self.detail("lstsq", before, after, sums, ridge))

    def apply_lowrank(self, layer, folds, edits, report):
        first, second = layer.first, layer.linear
        rank = first.matrix().shape[2]
        current = first.matrix()[0] @ second.matrix()[0]
        if rank >= min(current.shape):
            self.apply_lstsq(dataclasses.replace(layer, first=None), folds, edits, report)
            return
        prior = current
        if second.bias_slot:
            old_bias = bias_array(second.node, second)
            bias = np.zeros(current.shape[1]) if old_bias is None else old_bias
            prior = np.concatenate([current, bias[None]])
        prior = prior[None]
        ridge = folds.choose_ridge(self.ridges(), prior)
        sums = folds.total()
        a, b, new_bias = sums.reduced_rank(ridge, prior, rank)
        solution = a @ b
        if second.bias_slot:
            solution = np.concatenate([solution, new_bias[None]])
        solution = solution[None]
        before, after = sums.relative_error(prior), sums.relative_error(solution)
        if not after < before:
            report.record(layer.node, "kept", f"joint refit would not help ({before:.3g})")
            return
        dtype = second.node.inputs[1].dtype
        edits.set(first.node, 1, first.to_weight(a[None]), dtype, "weight_refit")
        if bias_array(first.node, first) is not None:
            write_bias(edits, first.node, first, np.zeros(rank), dtype)
        edits.set(second.node, 1, second.to_weight(b[None]), dtype, "weight_refit")
        if second.bias_slot:
            write_bias(edits, second.node, second, new_bias, dtype)
        detail = self.detail("joint low-rank", before, after, sums, ridge)
        report.record(layer.node, "refit", detail)

    def detail(
        self, method: str, before: float, after: float, sums: Regression, ridge: float
    ) -> str:
        unknowns = sums.unknowns
        measure = "mean of each output's 1 - R²" if sums.per_output else "1 - R²"
        text = (
            f"{method}: error {before:.4g} -> {after:.4g} ({measure}, calibration), "
            f"{sums.rows} rows, ridge {ridge:.3g}"
        )
        if sums.rows < unknowns:
            text += f"; fewer rows than the {unknowns} unknowns: regularised"
        return text

    def apply_bias(self, layer, sums, edits, report):
        student, teacher = sums
        shift = teacher.mean - student.mean
        bias = bias_array(layer.node, layer.linear)
        bias = np.zeros_like(shift) if bias is None else bias
        dtype = layer.output.dtype or ir.DataType.FLOAT
        write_bias(edits, layer.node, layer.linear, bias + shift, dtype)
        report.record(
            layer.node, "refit", f"bias: mean shift max |Δ| {np.abs(shift).max():.4g} corrected"
        )

    def apply_bn(self, layer, sums, edits, report):
        student, teacher = sums
        linear = layer.linear
        dtype = layer.node.inputs[1].dtype
        if linear.bias_slot:
            scale = _variance_ratio(student.var, teacher.var)
            bias = bias_array(layer.node, linear)
            bias = np.zeros_like(scale) if bias is None else bias
            write_bias(
                edits, layer.node, linear, scale * (bias - student.mean) + teacher.mean, dtype
            )
            matched = "mean and variance"
        else:  # no bias to shift (a MatMul without Add): match the mean square instead
            squares = (student.var + student.mean**2, teacher.var + teacher.mean**2)
            scale = _variance_ratio(*squares)
            matched = "mean square (no bias)"
        matrix = linear.matrix()
        scaled = matrix * scale.reshape(matrix.shape[0], 1, -1)
        edits.set(layer.node, 1, linear.to_weight(scaled), dtype, "weight_refit")
        report.record(
            layer.node,
            "refit",
            f"bn: per-channel {matched} matched (scale {scale.min():.3g}..{scale.max():.3g})",
        )

    def apply_batchnorm(self, layer, sums, edits, report):
        """BatchNormalization: new scale and shift so its output statistics match the teacher's."""
        student_in, teacher_out = sums
        node = layer.node
        gamma, _, mean, var = (constant_array(node.inputs[i]) for i in (1, 2, 3, 4))
        if any(a is None for a in (gamma, mean, var)):
            report.skip(node, "BatchNormalization parameters are not constants")
            return
        epsilon = float(attribute(node, "epsilon", 1e-5))
        ratio = _variance_ratio(student_in.var, teacher_out.var) * np.where(gamma < 0, -1, 1)
        new_gamma = ratio * np.sqrt(var.astype(np.float64) + epsilon)
        new_beta = teacher_out.mean - ratio * (student_in.mean - mean)
        dtype = node.inputs[1].dtype
        edits.set(node, 1, new_gamma, dtype, "scale_recalibrated")
        edits.set(node, 2, new_beta, dtype, "bias_recalibrated")
        report.record(
            node, "refit", "bn: scale and shift matched to the teacher's output statistics"
        )


def _variance_ratio(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Per-channel std ratio teacher/student; 1 where the student's output does not vary."""
    floor = _DEAD_VARIANCE * max(float(teacher.max(initial=0.0)), 1e-30)
    alive = student > floor
    return np.where(alive, np.sqrt(teacher / np.where(alive, student, 1.0)), 1.0)
