"""Run two models on the same inputs: fidelity, latency, size, parameters and MACs side by side.

Fidelity is streamed: per output, running sums (absolute error, dot products, norms, top-1
matches) are accumulated feed by feed, so memory is bounded by one batch of outputs.

- ``max_abs`` / ``mean_abs``: over every element of an output, all feeds together.
- ``cosine``: between the two outputs flattened and concatenated over all feeds.
- ``top1_agreement``: for classifier-shaped outputs only, i.e. 2-D ``[N, C]`` with ``C > 1``
  and a floating-point type: the share of rows whose argmax agrees. Higher-rank outputs
  (``[B, S, vocab]`` logits, ``[N, C, H, W]`` segmentation maps, hidden states) get None,
  because the class axis of those cannot be told apart from a feature axis.
- Non-finite values: where both models give the same non-finite value (the same infinity, or
  NaN in both) the element is left out of the error metrics. Where they differ, the output's
  ``max_abs`` and ``mean_abs`` become infinite and its ``cosine`` NaN, so every accuracy gate
  on it fails; ``nonfinite_a`` / ``nonfinite_b`` count them.
- Outputs that are not numeric tensors (strings, sequences, maps) are not compared.

Latency runs the models interleaved (A, B, A, B, ... with the order rotated every round) so
that machine noise hits all of them alike. Timings are ``session.run`` wall time with inputs and
outputs in host memory, so GPU figures include the copies.

GPU execution providers (cuda, tensorrt) are used for real when this onnxruntime build offers
them and the session actually gets them (``session.get_providers()``); otherwise they are
skipped with the reason, never an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_squeeze import clocks, layer_times
from onnx_squeeze.analysis import MAC_OPS, ModelSummary, NodeCost, analyze
from onnx_squeeze.calibration.feeds import Feed
from onnx_squeeze.calibration.random_data import random_source
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.fidelity import OutputFidelity, OutputKinds, accumulators, gate_metrics
from onnx_squeeze.progress import track
from onnx_squeeze.records import SOURCE_NODE_KEY
from onnx_squeeze.runtime import create_session, resolve_provider
from onnx_squeeze.shapes import concrete_input_shapes, feed_shapes

__all__ = [
    "Comparison",
    "Latency",
    "OutputFidelity",
    "bench",
    "compare",
    "fidelity",
    "latency",
    "provider_unavailable_reason",
]

ModelLike = ir.Model | onnx.ModelProto | str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Models and sessions


@dataclasses.dataclass
class _Loaded:
    """A model as an IR model, with its file when known (for the size on disk).

    Sessions are created from the file only when the model was loaded from it here; a model
    given in memory is what gets run, even when a path is given for it.
    """

    model: ir.Model
    path: str | None = None
    from_file: bool = False

    def session(
        self, provider: str, threads: int | None, optimization: str
    ) -> ort.InferenceSession:
        source: Any = self.path if self.from_file else self.model
        return create_session(source, provider, threads=threads, optimization=optimization)


def _load(model: Any, path: str | os.PathLike | None = None) -> _Loaded:
    if isinstance(model, _Loaded):
        return model
    path = os.fspath(path) if path is not None else None
    if isinstance(model, ir.Model):
        return _Loaded(model, path)
    if isinstance(model, onnx.ModelProto):
        return _Loaded(ir.from_proto(model), path)
    if isinstance(model, str | os.PathLike):
        if not os.path.isfile(model):
            raise InputError(f"{os.fspath(model)}: no such model file")
        return _Loaded(ir.load(os.fspath(model)), os.fspath(model), from_file=True)
    raise TypeError(
        f"expected an onnx_ir.Model, onnx.ModelProto or path, got {type(model).__name__}"
    )


class _ProviderUnavailable(Exception):
    """A provider this build lacks, or one the session did not get."""


def provider_unavailable_reason(provider: str) -> str | None:
    """Why ``provider`` cannot be used with this onnxruntime build, or None when it can."""
    full = resolve_provider(provider)
    available = ort.get_available_providers()
    if full in available:
        return None
    return (
        f"{provider}: {full} not available in this onnxruntime build "
        f"(available: {', '.join(available)})"
    )


def _session_on(
    loaded: _Loaded, provider: str, threads: int | None, optimization: str
) -> ort.InferenceSession:
    """A session that really runs on ``provider``; raises _ProviderUnavailable otherwise."""
    reason = provider_unavailable_reason(provider)
    if reason:
        raise _ProviderUnavailable(reason)
    full = resolve_provider(provider)
    try:
        session = loaded.session(provider, threads, optimization)
    except InputError as error:
        if full == "CPUExecutionProvider":
            raise
        raise _ProviderUnavailable(f"{provider}: cannot create a session: {error}") from error
    got = session.get_providers()
    if not got or got[0] != full:
        raise _ProviderUnavailable(
            f"{provider}: onnxruntime fell back to {', '.join(got)} "
            f"({full} failed to initialize; are its libraries installed?)"
        )
    return session


def _select(session: ort.InferenceSession, feed: Feed) -> dict[str, np.ndarray]:
    """The part of ``feed`` the session takes; an error naming missing inputs."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feed]
    if missing:
        raise InputError(
            f"the inputs lack {', '.join(map(repr, missing))}; "
            f"they have {', '.join(map(repr, feed)) or 'nothing'}"
        )
    # np.asarray: scalars (a 0-d random bool is a numpy scalar) become arrays onnxruntime takes.
    return {n: np.asarray(feed[n]) for n in names}


# What onnxruntime raises when a model cannot run on a feed (a value or shape it rejects).
_RUN_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ort.capi.onnxruntime_pybind11_state.Fail,
)


def _run_given(
    session: ort.InferenceSession, names: list[str] | None, feed: Feed, model: str
) -> list[np.ndarray]:
    """A run of a model as the user gave it: where it rejects the feed, the inputs are at
    fault (a value such as a sample rate that does not suit the other inputs' shapes), so it
    is an :class:`InputError` naming the model, not an internal error."""
    try:
        return session.run(names, feed)
    except _RUN_ERRORS as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise InputError(
            f"{model} fails on these inputs: {text}; check the values and shapes given (data, "
            "--set, --shape)"
        ) from None


def _iter_feeds(feeds: Any) -> Iterator[Feed]:
    """Feed dicts from an iterable, a single dict, or a ``get_next()`` data reader."""
    if isinstance(feeds, Mapping):
        yield feeds
    elif hasattr(feeds, "get_next"):
        while (feed := feeds.get_next()) is not None:
            yield feed
    else:
        yield from feeds


# ---------------------------------------------------------------------------------------------
# Fidelity


def _check_outputs(session_a: ort.InferenceSession, session_b: ort.InferenceSession) -> list[str]:
    names_a = [o.name for o in session_a.get_outputs()]
    names_b = [o.name for o in session_b.get_outputs()]
    if set(names_a) != set(names_b):
        only_a = [n for n in names_a if n not in names_b]
        only_b = [n for n in names_b if n not in names_a]
        raise InputError(
            "the models' outputs differ: "
            f"only in A: {', '.join(map(repr, only_a)) or 'none'}; "
            f"only in B: {', '.join(map(repr, only_b)) or 'none'}. "
            "Compare models with the same output names"
        )
    return names_a


def _as_session(
    model: Any, provider: str, threads: int | None, optimization: str
) -> ort.InferenceSession:
    if isinstance(model, ort.InferenceSession):
        return model
    return _session_on(_load(model), provider, threads, optimization)


def fidelity(
    a: ModelLike | ort.InferenceSession,
    b: ModelLike | ort.InferenceSession,
    feeds: Iterable[Feed] | Any,
    *,
    provider: str = "cpu",
    optimization: str = "all",
    threads: int | None = None,
    total: int | None = None,
    kinds: OutputKinds | None = None,
    channel_axes: Mapping[str, int | None] | None = None,
) -> list[OutputFidelity]:
    """Run both models on every feed and accumulate per-output error metrics (streaming),
    whole and per output channel (:mod:`onnx_squeeze.fidelity`).

    Outputs are matched by name; different output names, or shapes that differ on a feed, are
    an :class:`InputError` naming them. ``feeds`` is any iterable of feed dicts or an object with
    onnxruntime's ``get_next()`` protocol. An unavailable provider is a :class:`SettingsError`.
    ``kinds`` says how A's outputs are read (:meth:`fidelity.OutputKinds.of`; without it, as
    plain values along the axes A's session declares fixed); ``channel_axes`` sets an output's
    channel axis (None: judged whole) instead of finding it.
    """
    try:
        session_a = _as_session(a, provider, threads, optimization)
        session_b = _as_session(b, provider, threads, optimization)
    except _ProviderUnavailable as error:
        raise SettingsError(str(error)) from None
    _check_outputs(session_a, session_b)
    types_b = {o.name: o.type for o in session_b.get_outputs()}
    numeric = [
        o.name
        for o in session_a.get_outputs()
        if _is_numeric_tensor(o.type) and _is_numeric_tensor(types_b[o.name])
    ]
    unknown = sorted(set(channel_axes or {}) - set(numeric))
    if unknown:
        raise SettingsError(
            f"--channel-axis names {', '.join(map(repr, unknown))}, which is not a numeric "
            f"output; the outputs are {', '.join(map(repr, numeric))}"
        )
    kinds = kinds or OutputKinds(shapes={o.name: o.shape for o in session_a.get_outputs()})
    sums = accumulators(numeric, kinds=kinds, channel_axes=channel_axes)
    for feed in track(_iter_feeds(feeds), "fidelity", total=total):
        outputs_a = _run_given(session_a, numeric, _select(session_a, feed), "model A")
        outputs_b = session_b.run(numeric, _select(session_b, feed))
        for name, out_a, out_b in zip(numeric, outputs_a, outputs_b, strict=True):
            if out_a.shape != out_b.shape:
                raise InputError(
                    f"output {name!r} has shape {list(out_a.shape)} in A but "
                    f"{list(out_b.shape)} in B on the same input"
                )
            try:
                sums[name].add(out_a, out_b)
            except ValueError as error:
                raise SettingsError(f"--channel-axis: {error}") from None
    return [sums[name].result() for name in numeric]


def _is_numeric_tensor(type_name: str) -> bool:
    """True for onnxruntime type strings like ``tensor(float)``; not strings, sequences, maps."""
    return type_name.startswith("tensor(") and type_name != "tensor(string)"


# ---------------------------------------------------------------------------------------------
# Latency


@dataclasses.dataclass
class Latency:
    """Wall time of ``session.run`` for one model on one provider and thread count."""

    provider: str
    threads: int | None
    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    min_ms: float = 0.0
    times_ms: list[float] = dataclasses.field(default_factory=list)  # every timed run, in order

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def latency(
    models: Sequence[ModelLike | ort.InferenceSession],
    feed: Feed | Sequence[Feed],
    *,
    provider: str = "cpu",
    threads: int | None = 1,
    warmup: int = 5,
    runs: int = 30,
    interleaved: bool = True,
    optimization: str = "all",
    skipped: list[str] | None = None,
) -> list[Latency] | None:
    """Time every model on ``provider`` with ``threads`` intra-op threads.

    ``feed`` is one feed for all models or one per model. Runs are timed on the wall clock by
    :func:`clocks.timed_runs`: interleaved (the order rotated each round) unless
    ``interleaved=False``, a fast model run back to back within each round as a serving loop
    runs it. Returns None when the provider is not available or the session does not get it;
    the reason is appended to ``skipped``.
    """
    if runs < 1:
        raise SettingsError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise SettingsError(f"warmup must be 0 or more, got {warmup}")
    feeds = [feed] * len(models) if isinstance(feed, Mapping) else list(feed)
    if len(feeds) != len(models):
        raise SettingsError(f"got {len(feeds)} feeds for {len(models)} models")
    try:
        sessions = [
            m
            if isinstance(m, ort.InferenceSession)
            else _session_on(_load(m), provider, threads, optimization)
            for m in models
        ]
    except _ProviderUnavailable as error:
        if skipped is not None:
            skipped.append(str(error))
        return None
    selected = [_select(s, f) for s, f in zip(sessions, feeds, strict=True)]
    for index, (session, data) in enumerate(zip(sessions, selected, strict=True)):
        _run_given(session, None, data, f"model {index + 1}")
        for _ in range(warmup):
            session.run(None, data)
    label = f"latency {provider}/t{threads}"
    times = clocks.timed_runs(
        sessions,
        selected,
        runs,
        cpu=False,
        interleaved=interleaved,
        rounds=lambda values, total: track(values, label, total=total),
    )
    return [_latency(provider, threads, samples) for samples in times]


def _latency(provider: str, threads: int | None, samples: Sequence[float]) -> Latency:
    values = np.asarray(samples)
    return Latency(
        provider=provider,
        threads=threads,
        median_ms=float(np.median(values)),
        p90_ms=float(np.percentile(values, 90)),
        mean_ms=float(values.mean()),
        runs=len(values),
        min_ms=float(values.min()),
        times_ms=[float(v) for v in values],
    )


# ---------------------------------------------------------------------------------------------
# Comparison


def _ratio(b: float | None, a: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


@dataclasses.dataclass
class Comparison:
    """The result of :func:`compare`: model A (the reference) against model B."""

    fidelity: list[OutputFidelity]
    latency: dict[str, list[Latency]]
    summaries: tuple[ModelSummary, ModelSummary]
    inputs_label: str
    skipped: list[str] = dataclasses.field(default_factory=list)
    fidelity_provider: str = "cpu"
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for accuracy gates (see :mod:`onnx_squeeze.gates`): the fidelity
        metrics of :func:`fidelity.gate_metrics`; latency_ratio (B/A median) and speedup (A/B)
        on the first provider/threads measured (absent when none was); size_ratio (file sizes
        when both are known, else bytes of weights), params_ratio, macs_ratio (absent when A
        has none, or either has layers whose MACs are unknown).
        """
        metrics = gate_metrics(self.fidelity)
        for timings in self.latency.values():
            a, b = timings[0], timings[1]
            if a.median_ms > 0 and b.median_ms > 0:
                metrics["latency_ratio"] = b.median_ms / a.median_ms
                metrics["speedup"] = a.median_ms / b.median_ms
            break
        summary_a, summary_b = self.summaries
        if summary_a.size_bytes is not None and summary_b.size_bytes is not None:
            size = _ratio(summary_b.size_bytes, summary_a.size_bytes)
        else:
            size = _ratio(summary_b.initializer_bytes, summary_a.initializer_bytes)
        # a ratio of counts that miss layers (shapes unknown past a contrib op) says nothing:
        # tashkeel's second LSTM, after a DynamicQuantizeLSTM, was counted in neither
        whole = not summary_a.unknown_macs and not summary_b.unknown_macs
        for name, value in (
            ("size_ratio", size),
            ("params_ratio", _ratio(summary_b.params, summary_a.params)),
            ("macs_ratio", _ratio(summary_b.macs, summary_a.macs) if whole else None),
        ):
            if value is not None:
                metrics[name] = value
        return metrics

    def to_dict(self, *, nodes: bool = False) -> dict[str, Any]:
        """A JSON-friendly dict (the report's ``comparison``); per-node costs only if asked."""
        models = []
        for summary in self.summaries:
            data = summary.to_dict()
            if not nodes:
                data.pop("nodes")
            models.append(data)
        return {
            "inputs_label": self.inputs_label,
            "input_shapes": dict(self.input_shapes),
            "fidelity_provider": self.fidelity_provider,
            "fidelity": [f.to_dict() for f in self.fidelity],
            "latency": {key: [t.to_dict() for t in pair] for key, pair in self.latency.items()},
            "models": models,
            "skipped": list(self.skipped),
            "metrics": self.metrics(),
            "layers": [dict(layer) for layer in self.layers],
        }


def _shapes_for(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    names = {v.name for v in model.graph.inputs}
    return {name: shape for name, shape in (shapes or {}).items() if name in names}


def compare(
    a: ModelLike,
    b: ModelLike,
    *,
    feeds: Iterable[Feed] | Any | None = None,
    inputs_label: str | None = None,
    providers: Sequence[str] = ("cpu",),
    threads: Sequence[int | None] = (1,),
    batch: int = 1,
    runs: int = 30,
    warmup: int = 5,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    samples: int = 8,
    paths: tuple[str | os.PathLike | None, str | os.PathLike | None] | None = None,
    optimization: str = "all",
    default_dim: int | None = None,
    channel_axes: Mapping[str, int | None] | None = None,
    constants: Mapping[str, Any] | None = None,
) -> Comparison:
    """Compare model B against model A: fidelity (whole and per output channel, see
    :mod:`onnx_squeeze.fidelity`), latency per provider/threads, size, MACs.

    Input shapes are those of the feeds' arrays. Without ``feeds``, ``samples`` random feeds
    are drawn from A's input spec at ``shapes`` (a symbolic first dimension takes ``batch``;
    any other symbolic one ``default_dim`` when given, else a :class:`ShapeUnknownError` with
    the ``--shape`` hint: sizes are never guessed), with the ``constants`` (``--set``) filled
    in, and labelled "random" (an integer or scalar input none gives is refused, never
    invented: :func:`calibration.random_data.random_source`); given feeds are
    labelled by ``inputs_label``, else their own ``label``. Fidelity runs on the
    first available provider of ``providers``; latency on each available one, for each thread
    count (``runs=0`` skips it). Unavailable providers are listed in
    :attr:`Comparison.skipped`. :attr:`Comparison.layers` pairs each weight layer's parameters
    and MACs in both models, with its time from onnxruntime's profiler when latency was timed
    on CPU (:func:`layer_costs`).
    """
    if batch < 1:
        raise SettingsError(f"batch must be at least 1, got {batch}")
    paths = paths or (None, None)
    loaded_a, loaded_b = _load(a, paths[0]), _load(b, paths[1])
    for provider in providers:
        resolve_provider(provider)  # a SettingsError for unknown names, before any work
    if inputs_label is None:
        inputs_label = getattr(feeds, "label", "given feeds" if feeds is not None else "random")
    if feeds is None:
        input_shapes = concrete_input_shapes(
            loaded_a.model, shapes, batch=batch, default_dim=default_dim
        )
        drawn = random_source(
            loaded_a.model, seed=seed, shapes=input_shapes, constants=constants, batches=samples
        )
        fidelity_feeds: Iterable[Feed] = drawn
        latency_feed: Feed = next(iter(drawn))
        total: int | None = samples
    else:
        iterator = _iter_feeds(feeds)
        first = next(iterator, None)
        if first is None:
            raise InputError(f"the inputs ({inputs_label}) yielded no feeds")
        fidelity_feeds = itertools.chain([first], iterator)
        latency_feed = first
        total = len(feeds) if isinstance(feeds, Sequence) else None
        input_shapes = _shapes_for(loaded_a.model, feed_shapes(first))
    summary_a = analyze(loaded_a.model, shapes=input_shapes, path=loaded_a.path)
    summary_b = analyze(
        loaded_b.model, shapes=_shapes_for(loaded_b.model, input_shapes), path=loaded_b.path
    )
    skipped: list[str] = []
    judged = {
        "kinds": OutputKinds.of(loaded_a.model),
        "channel_axes": channel_axes,
        "total": total,
    }

    fidelity_provider = "cpu"
    for provider in providers:
        if provider_unavailable_reason(provider) is None:
            fidelity_provider = provider
            break
    try:
        results = fidelity(
            _session_on(loaded_a, fidelity_provider, None, optimization),
            _session_on(loaded_b, fidelity_provider, None, optimization),
            fidelity_feeds,
            **judged,
        )
    except _ProviderUnavailable as error:
        skipped.append(f"{error}; fidelity measured on cpu")
        fidelity_provider = "cpu"
        results = fidelity(loaded_a, loaded_b, fidelity_feeds, optimization=optimization, **judged)

    timings: dict[str, list[Latency]] = {}
    if runs > 0:
        for provider in providers:
            reason = provider_unavailable_reason(provider)
            if reason:
                skipped.append(reason)
                continue
            for count in threads:
                measured = latency(
                    [loaded_a, loaded_b],
                    latency_feed,
                    provider=provider,
                    threads=count,
                    warmup=warmup,
                    runs=runs,
                    optimization=optimization,
                    skipped=skipped,
                )
                if measured is None:
                    break  # the provider failed; the reason is in skipped
                timings[f"{provider}/t{count}"] = measured
    else:
        skipped.append("latency: not measured (runs=0)")
    times = None
    timed_on_cpu = next((pair for key, pair in timings.items() if key.startswith("cpu/")), None)
    if timed_on_cpu is not None:
        times = _layer_times(
            (loaded_a.model, loaded_b.model),
            latency_feed,
            timed_on_cpu[0].threads or 1,
            [timing.median_ms for timing in timed_on_cpu],
        )
    return Comparison(
        fidelity=results,
        latency=timings,
        summaries=(summary_a, summary_b),
        inputs_label=inputs_label,
        skipped=_unique(skipped),
        fidelity_provider=fidelity_provider,
        input_shapes={name: list(shape) for name, shape in input_shapes.items()},
        layers=layer_costs(summary_a, summary_b, loaded_b.model, times),
    )


# Profiled runs per model for the per-layer times (their medians): at most this many, and no
# more than fit in LAYER_TIME_BUDGET_MS of the model's median latency (at least one).
LAYER_TIME_RUNS = 10
LAYER_TIME_BUDGET_MS = 2000.0


def _layer_times(
    models: Sequence[ir.Model], feed: Feed, threads: int, medians_ms: Sequence[float]
) -> tuple[dict[str, float], ...]:
    """Median milliseconds per run of each named node of each model: onnxruntime's profiler on
    CPU, its kernels given back to the nodes they came from (:mod:`onnx_squeeze.layer_times`)."""
    timed = []
    for model, median_ms in zip(models, medians_ms, strict=True):
        inputs = {value.name for value in model.graph.inputs}
        runs = int(min(LAYER_TIME_RUNS, max(1, LAYER_TIME_BUDGET_MS // max(median_ms, 1e-3))))
        measured = layer_times.measure(
            model,
            {name: array for name, array in feed.items() if name in inputs},
            threads=threads,
            runs=runs,
        )
        timed.append({node.name: us / 1000.0 for node, us in measured.nodes.items() if node.name})
    return tuple(timed)


def layer_costs(
    a: ModelSummary,
    b: ModelSummary,
    model_b: ir.Model,
    times: tuple[Mapping[str, float], Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Parameters and MACs of every weight layer of A beside B's: ``{node, op_type, params: [a,
    b], macs: [a, b]}``, and ``time_ms: [a, b]`` from ``times`` (node name -> milliseconds, per
    model) when given. B's figures are those of its node of the same name plus every node a
    pass made from it (``records.SOURCE_NODE_KEY``: the two factors of a low-rank layer); None
    where B has no such node (a pass renamed it without saying where it came from) or the
    profiler gave it no time."""
    sources = {
        node.name: node.metadata_props.get(SOURCE_NODE_KEY)
        for node in ir.traversal.RecursiveGraphIterator(model_b.graph)
        if node.name
    }
    in_b: dict[str, list[NodeCost]] = {}
    for cost in b.nodes:
        if cost.name not in sources:
            continue  # an unnamed node: its label is its position, which names nothing in A
        for key in {cost.name, sources[cost.name]} - {None}:
            in_b.setdefault(key, []).append(cost)
    layers = []
    for cost in a.nodes:
        if cost.weight is None or cost.op_type not in MAC_OPS:
            continue
        matched = in_b.get(cost.name) or []
        layer = {
            "node": cost.name,
            "op_type": cost.op_type,
            "params": [cost.params, sum(c.params for c in matched) if matched else None],
            "macs": [cost.macs, sum(c.macs for c in matched) if matched else None],
        }
        if times is not None:
            found = [times[1][c.name] for c in matched if c.name in times[1]]
            layer["time_ms"] = [times[0].get(cost.name), sum(found) if found else None]
        layers.append(layer)
    return layers


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# Bench


def bench(
    models: Mapping[str, ModelLike],
    *,
    providers: Sequence[str] = ("cpu",),
    threads: Sequence[int | None] = (1, 2),
    batch: int = 1,
    runs: int = 30,
    warmup: int = 5,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    optimization: str = "all",
    default_dim: int | None = None,
    constants: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Latency of several models, interleaved, per provider and thread count.

    Returns one row per model, provider and thread count: model, provider, threads, median_ms,
    p90_ms, mean_ms, runs, params, macs, size_bytes, skipped (None, or the reason the provider
    could not be used; then the timings are None and threads is None). A model given by path
    (or keyed by an existing file's path) reports its size on disk. Inputs are random, shaped
    as :func:`compare` shapes them (never at a guessed size), with the ``constants`` filled in.
    """
    if batch < 1:
        raise SettingsError(f"batch must be at least 1, got {batch}")
    for provider in providers:
        resolve_provider(provider)
    names = list(models)
    loaded = []
    for name in names:
        model = models[name]
        path = name if not isinstance(model, str | os.PathLike) and os.path.isfile(name) else None
        loaded.append(_load(model, path))
    summaries = []
    feeds = []
    for item in loaded:
        input_shapes = concrete_input_shapes(
            item.model, _shapes_for(item.model, shapes), batch=batch, default_dim=default_dim
        )
        summaries.append(analyze(item.model, shapes=input_shapes, path=item.path))
        drawn = random_source(
            item.model, seed=seed, shapes=input_shapes, constants=constants, batches=1
        )
        feeds.append(next(iter(drawn)))

    def row(
        index: int, provider: str, count: int | None, timing: Latency | None, reason: str | None
    ):
        summary = summaries[index]
        return {
            "model": names[index],
            "provider": provider,
            "threads": count,
            "median_ms": timing.median_ms if timing else None,
            "p90_ms": timing.p90_ms if timing else None,
            "mean_ms": timing.mean_ms if timing else None,
            "runs": timing.runs if timing else 0,
            "params": summary.params,
            "macs": summary.macs,
            "size_bytes": summary.size_bytes,
            "skipped": reason,
        }

    rows: list[dict[str, Any]] = []
    for provider in providers:
        reason = provider_unavailable_reason(provider)
        if reason:
            rows.extend(row(i, provider, None, None, reason) for i in range(len(loaded)))
            continue
        for count in threads:
            skipped: list[str] = []
            measured = latency(
                loaded,
                feeds,
                provider=provider,
                threads=count,
                warmup=warmup,
                runs=runs,
                optimization=optimization,
                skipped=skipped,
            )
            if measured is None:
                rows.extend(row(i, provider, None, None, skipped[0]) for i in range(len(loaded)))
                break
            rows.extend(row(i, provider, count, measured[i], None) for i in range(len(loaded)))
    return rows
