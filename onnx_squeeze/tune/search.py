"""The search: first the family's named recipes as they are (``--recipe fast``, aimed at the
budget: under a time budget whatever comes later may not run, as on ppocr_cls at 2 cores shared
by 4 jobs, where the pilot's 10 trials spent 900 s); then its preset recipes with their pruning
fraction bisected (the pilot: INT8 alone, then the smallest fraction that meets the targets;
then pruning alone, then pruning fine-tuned, until one arm meets them within the budget); then
Optuna's TPE over the space, told what the pilot found. Each candidate is ranked on a subset
of the evaluation data (a user metric is given a file of that subset: :mod:`.subset`) and only
the best ``1/eta`` judged on all of it (successive halving; their models are judged again, not
made again), then a bisection on the pruning fraction of the best candidate (the smallest
fraction that meets the targets). Quantization's own accuracy control (INT8 ``target``) sends
the layers that hurt the metric most back to float inside each trial.

Every trial goes through the store first, and TPE is seeded, so a rerun after a crash asks for
the same candidates in the same order and finds the finished ones there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from onnx_squeeze import clocks, model_io
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.tune import results as results_module
from onnx_squeeze.tune.executors import Executor, make_executor
from onnx_squeeze.tune.metrics import is_user
from onnx_squeeze.tune.space import Space, build_space, family_of, recipe_for
from onnx_squeeze.tune.store import Store
from onnx_squeeze.tune.subset import (
    COUNTED,
    FLIPS,
    least_samples,
    subset_samples,
    subset_slack,
    write_subset,
)
from onnx_squeeze.tune.targets import (
    Budget,
    Target,
    distance,
    measured_gate,
    parse_budget,
    parse_targets,
)

FULL, SUBSET, BISECT, REFERENCE = "full", "subset", "bisect", "reference"
# seconds kept at the end of a time budget for stopping a trial and writing the results: a
# trial stopped at the very end overran it by 35-70 ms (ppocr_cls given NNCF's 19.74 s: 19.81)
WIND_DOWN_S = 0.25


@dataclasses.dataclass
class Trial:
    """One candidate as run: its number, stage, parameters, recipe, where its model is, and
    what it measured (``result``)."""

    number: int
    stage: str
    params: dict[str, Any]
    recipe: Recipe
    key: str
    result: dict[str, Any]
    cached: bool
    model_path: str

    @property
    def ok(self) -> bool:
        return self.result.get("status") == "ok"

    @property
    def metrics(self) -> dict[str, float] | None:
        return self.result.get("metrics") if self.ok else None

    @property
    def value(self) -> float | None:
        return self.result.get("value") if self.ok else None


@dataclasses.dataclass
class Search:
    """What a search needs besides the space: the targets, the budget, the store, where trials
    run, and the jobs' common part."""

    source: str
    targets: list[Target]
    budget: Budget
    store: Store
    executor: Executor
    base_job: dict[str, Any]
    gate: str | None
    echo: Callable[[str], None]
    trials: list[Trial] = dataclasses.field(default_factory=list)
    reference: Trial | None = None
    executed: int = 0
    floor: float = math.nan
    scale: float = 1.0
    first: bool = False  # stop at the first candidate that meets everything on all the data
    done: bool = False  # ... and one has
    slack: float = 0.0  # how far below the floor a subset's reading may be: subset_slack
    subset_file: str | None = None  # the subset's samples, for a user metric
    deadline: float = math.inf  # time.monotonic() when the time budget runs out
    # seconds kept at the end of the budget for judging the best candidate on all the data
    reserve: float = 0.0

    @property
    def end(self) -> float:
        """When trials stop: the time budget less the reserve for the last judgment, and the
        time stopping one takes."""
        return self.deadline - self.reserve - WIND_DOWN_S

    @property
    def out_of_time(self) -> bool:
        """Whether the trials' share of the time budget has run out: no more are started."""
        return time.monotonic() >= self.end

    def run(
        self,
        points: Sequence[tuple[str, dict[str, Any]]],
        limit: int | None = None,
        models: Sequence[str] | None = None,
        bounded: bool = True,
    ) -> list[Trial]:
        """Run (or find in the store) one trial per (stage, params); ``models``: the models
        earlier trials made for these points, to be judged again rather than made again;
        ``bounded``: stopped at :attr:`end` (not the reference, without which nothing is
        chosen, nor the judgment of the best candidate on all the data, which the reserve is
        kept for)."""
        jobs, keys, pending = [], [], []
        for index, (stage, params) in enumerate(points):
            job = dict(self.base_job, recipe=recipe_for(params, self.gate).to_dict())
            if models is not None:
                job["model_from"] = models[index]
            if stage == SUBSET:
                job["eval_limit"] = limit
                if self.subset_file:
                    job["evaluation_subset"] = self.subset_file
            if stage == REFERENCE:
                job["reference"] = True
            key = self.store.key(job)
            job["folder"] = os.fspath(self.store.folder(key))
            if self.store.get(key) is None and key not in keys:  # TPE may draw a point twice
                pending.append(job)
            jobs.append(job)
            keys.append(key)
        end = self.end if bounded and self.deadline < math.inf else None
        results = self.executor.run(pending, end)
        fresh = dict(zip((job["folder"] for job in pending), results, strict=True))
        self.executed += sum(1 for result in results if result.get("started", True))
        made_by = {t.model_path: t for t in self.trials}
        made = []
        stored = set()
        for index, ((stage, params), job, key) in enumerate(zip(points, jobs, keys, strict=True)):
            result = fresh.get(job["folder"])  # a point drawn twice ran once
            if result is not None and key not in stored and not result.get("stopped"):
                self.store.put(key, result)  # a stopped one runs again on --resume
                stored.add(key)
            found = result if result is not None else self.store.get(key) or {}
            if job.get("prepared"):
                found = self._against_original(found)
            if models is not None:
                found = _timed_twice(found, made_by.get(models[index]))
            trial = Trial(
                number=len(self.trials),
                stage=stage,
                params=dict(params),
                recipe=Recipe.from_dict(job["recipe"]),
                key=key,
                result=found,
                cached=job["folder"] not in fresh,
                model_path=os.fspath(self.store.model_path(key)),
            )
            self.trials.append(trial)
            made.append(trial)
            self.echo(results_module.trial_line(trial, self))
        met = [t for t in made if t.stage != REFERENCE and self.meets(t)]
        met = met or [t for t in made if t.stage == SUBSET and self.may_meet(t)]
        if self.first and met and not self.done:
            best = min(met, key=self.objective)
            if best.stage == SUBSET:  # judged on all the data at once: it may end the search
                if not any(t.stage == FULL and t.params == best.params for t in self.trials):
                    self.run([(FULL, best.params)], models=[best.model_path], bounded=False)
            else:
                self.done = True
        return made

    def _against_original(self, result: dict[str, Any]) -> dict[str, Any]:
        """A result measured against the prepared original, with its size, parameter and MAC
        ratios against the file (exact: the prepared model's own ratios multiply them in).
        Latency stays against the prepared model: onnxruntime's optimizer does at load time
        what onnxsim did, and a product of two timings is only noisier."""
        if result.get("status") != "ok" or self.reference is None or not self.reference.ok:
            return result
        base = self.reference.metrics or {}
        metrics = dict(result["metrics"])
        for key in ("size_ratio", "params_ratio", "macs_ratio"):
            if metrics.get(key) is not None and base.get(key) is not None:
                metrics[key] = metrics[key] * base[key]
        return {**result, "metrics": metrics}

    def distance(self, trial: Trial) -> tuple[float, float]:
        return distance(trial.metrics, trial.value, self.targets, self.floor, self.scale)

    def objective(self, trial: Trial) -> float:
        """What TPE minimizes: how far the targets and the budget are missed, or, once both
        hold, minus the metric's margin above the floor."""
        missed, below = self.distance(trial)
        if missed + below > 0:
            return min(missed + below, 1e6)
        assert trial.value is not None
        return max(-(trial.value - self.floor) / self.scale, -1e6)

    def meets(self, trial: Trial) -> bool:
        return self.distance(trial) == (0.0, 0.0)

    def may_meet(self, trial: Trial) -> bool:
        """Meets the targets, and misses the floor by no more than the subset's spread."""
        missed, below = self.distance(trial)
        return missed == 0 and below <= self.slack


def _timed_twice(result: dict[str, Any], made: Trial | None) -> dict[str, Any]:
    """A model judged again on all the data was timed again: its latency ratio is the geometric
    mean of both timings, two samples of the same model (the digits CNN's ``--recipe fast``
    read 0.43x when made and 0.50x when judged again, either side of a 2x target)."""
    before = made.metrics if made is not None else None
    if result.get("status") != "ok" or not before:
        return result
    metrics = dict(result["metrics"])
    now, then = metrics.get("latency_ratio"), before.get("latency_ratio")
    if not (now and then and math.isfinite(now) and math.isfinite(then)):
        return result
    ratio = math.sqrt(now * then)
    metrics.update(latency_ratio=ratio, speedup=1 / ratio, latency_ratios_timed=[then, now])
    return {**result, "metrics": metrics}


def _bisect(search: Search, space: Space, best: Trial, steps: int) -> None:
    """The smallest pruning fraction, the other parameters as ``best``'s, at which the targets
    are met (or the budget broken): the fraction where the budget is just spent."""
    param = space.param("prune")
    if param is None or steps <= 0 or "preset" in best.params:  # a preset finds its own
        return
    same = [
        t
        for t in search.trials
        if t.stage in (FULL, BISECT)
        and t.ok
        and {k: v for k, v in t.params.items() if k != "prune"}
        == {k: v for k, v in best.params.items() if k != "prune"}
    ]

    def settled(trial: Trial) -> bool:  # targets met, or budget broken: no higher fraction
        missed, below = search.distance(trial)
        return missed == 0 or below > 0

    lows = [t.params.get("prune", 0.0) for t in same if not settled(t)]
    highs = [t.params.get("prune", 0.0) for t in same if settled(t)]
    low = max(lows, default=param.low)
    high = min((h for h in highs if h > low), default=param.high)
    # on half the space's step: the edge of the budget can lie between two points of the pilot's
    # and TPE's grid (ppocr_cls at latency=0.8: pruned 0.15 with INT8, 0.83x with all but one
    # of 256 lines read right; 0.2, 0.75x with three lost, one more than the budget allows)
    grid = param.step / 2
    for _ in range(steps):
        middle = round(round((low + high) / 2 / grid) * grid, 4)
        if not low < middle < high or search.out_of_time:
            break
        (trial,) = search.run([(BISECT, {**best.params, "prune": middle})])
        if trial.ok and not settled(trial):
            low = middle
        else:
            high = middle


def tune(
    model: model_io.ModelSource,
    output: str | os.PathLike | None,
    *,
    targets: Sequence[Target | str],
    budget: Budget | None = None,
    metric: str = "agreement",
    max_drop: float | str | None = None,
    min_metric: float | None = None,
    calibration: Any = None,
    evaluation: Any = None,
    trials: int = 20,
    time_budget: float | None = None,
    executor: str | Executor = "local",
    ray_address: str | None = None,
    jobs: int = 1,
    trial_timeout: float | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    family: str | None = None,
    space: Space | None = None,
    finetune: bool = False,
    subset: float = 0.25,
    eta: int = 3,
    bisect_steps: int = 3,
    providers: Sequence[str] = ("cpu",),
    threads: Sequence[int] = (1,),
    runs: int = 10,
    batch: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    default_dim: int | None = None,
    constants: Mapping[str, Any] | None = None,
    preset: str = "imagenet",
    calibration_samples: int = 32,
    samples: int = 8,
    seed: int = 0,
    first: bool = False,
    patience: int = 6,
    echo: Callable[[str], None] = print,
) -> results_module.TuneResult:
    """Search recipes for one that meets every target (``"latency=0.5"``: half the original's
    time here; :class:`Target` objects or their text) within the accuracy budget (``budget``,
    or ``metric`` with ``max_drop``, e.g. ``0.01`` or ``"1%"``, or ``min_metric``); write it to
    ``output``.

    ``calibration`` is required (``"random"`` only when asked for, and said so); without
    ``evaluation`` every 5th calibration batch is held out, as in ``compress``. Trials and
    their models are kept in ``work_dir`` (default ``OUTPUT.tune/``) under content hashes:
    a rerun, or ``resume`` after a crash or Ctrl-C, skips the finished ones. Returns the
    chosen trial (the best that meets everything, else the closest), all trials and the
    Pareto front; nothing is written to ``output`` when no trial meets everything. ``first``:
    stop at the first candidate that meets everything on all the evaluation data (a candidate
    ranked on the subset that does, or that meets the targets and reads below the budget by no
    more than the subset's spread, is judged on all of it at once), for the search's time
    rather than the most metric kept. ``time_budget`` (seconds) ends the search on time: a
    trial still making a model then is stopped, and not stored; where candidates are ranked on
    a subset, trials stop as long before it as judging the original took, the time the last
    judgment on all the data is given. ``patience``: stop drawing after that many draws in a
    row that come no closer to the targets, nor keep more of the metric where they are met (0:
    draw ``trials``); the best drawn is still judged on all the data.
    """
    start = time.monotonic()  # the budget counts loading the model and starting Ray too
    targets = [
        one for t in targets for one in ([t] if isinstance(t, Target) else parse_targets([t]))
    ]
    if not targets:
        parse_targets([])  # the one error that says how to give a target
    budget = budget or parse_budget(metric, None if max_drop is None else str(max_drop), min_metric)
    if calibration is None:
        raise SettingsError(
            "tune needs calibration data: --calib DATA (and --eval HELD_OUT); random inputs "
            "only when asked for: --calib random"
        )
    if evaluation is None and budget.metric == "top1":
        raise SettingsError("--metric top1 needs --eval DATA.npz holding a 'labels' array")
    if not isinstance(model, str | os.PathLike):
        raise SettingsError("tune reads the model from a file: pass its path (or zoo:NAME)")
    source = os.fspath(model)
    if output is not None and model_io.same_file(source, output):
        raise SettingsError(f"{output}: refusing to overwrite the input model; choose another -o")
    original = model_io.load(source)
    work = Path(work_dir) if work_dir else Path(os.fspath(output or source) + ".tune")
    if resume and not (work / "trials").is_dir():
        raise SettingsError(f"--resume: no earlier search in {work}; run without --resume")
    space = space or build_space(family or family_of(original), providers, finetune)
    for line in space.describe():
        echo(line)
    runner = (
        executor
        if not isinstance(executor, str)
        else make_executor(executor, jobs=jobs, address=ray_address, timeout=trial_timeout)
    )
    base_job = {
        "model": source,
        "calibration": os.fspath(calibration)
        if isinstance(calibration, os.PathLike)
        else calibration,
        "evaluation": os.fspath(evaluation) if isinstance(evaluation, os.PathLike) else evaluation,
        "metric": budget.metric,
        "run": {
            "providers": list(providers),
            "threads": list(threads),
            "runs": runs,
            "batch": batch,
            "shapes": {k: list(v) for k, v in shapes.items()} if shapes else None,
            "default_dim": default_dim,
            "constants": dict(constants) if constants else None,
            "preset": preset,
            "calibration_samples": calibration_samples,
            "samples": samples,
            "seed": seed,
            "clock": "cpu" if clocks.cpu_clock(providers, threads) else "wall",
        },
    }
    if base_job["run"]["clock"] == "cpu":
        echo("latency: CPU time of the one thread that runs the model (other jobs do not move it)")
    search = Search(source, list(targets), budget, Store(work), runner, base_job, budget.gate, echo)
    search.first = first
    search.deadline = start + time_budget if time_budget is not None else math.inf
    try:
        reference = _strategy(
            search,
            space,
            original=original,
            evaluation=evaluation,
            trials=trials,
            jobs=jobs,
            subset=subset,
            eta=eta,
            bisect_steps=bisect_steps,
            seed=seed,
            patience=patience,
        )
    finally:
        if isinstance(executor, str):  # made here: its processes (or Ray connection) end here
            runner.close()
    return results_module.finish(
        search,
        reference=reference,
        output=output,
        work=work,
        seconds=time.monotonic() - start,
        where=runner.where,
        echo=echo,
    )


def _strategy(
    search: Search,
    space: Space,
    *,
    original: Any,
    evaluation: Any,
    trials: int,
    jobs: int,
    subset: float,
    eta: int,
    bisect_steps: int,
    seed: int,
    patience: int,
) -> Trial:
    """The reference, the pilot and TPE's draws (on the subset; ``patience``: see
    :func:`tune`), the promotions, the bisection; returns the reference trial."""
    (reference,) = search.run([(REFERENCE, {})], bounded=False)
    search.reference = reference
    if not reference.ok:
        raise SettingsError(
            f"the original model cannot be measured: {reference.result.get('error')}"
        )
    # the reference's model is the original prepared (simplified, BatchNorm folded: lossless,
    # what every compress run starts from): the trials start from it rather than each running
    # onnxsim again, and are compared with it
    search.base_job = dict(search.base_job, model=reference.model_path, prepared=True)
    search.gate = measured_gate(search.gate, reference.metrics or {})
    for target in search.targets:
        if target.metric not in (reference.metrics or {}):
            raise SettingsError(
                f"--target {target}: the original's {target.metric} cannot be "
                "measured here (MACs: shapes unknown past an op onnx cannot infer; latency: "
                "--runs 0): aim at latency or size instead"
            )
    baseline = float(reference.value)  # type: ignore[arg-type]
    search.floor = search.budget.floor(baseline)
    # the unit a shortfall is counted in: the drop allowed (the floor itself when the
    # original's value is infinite, as the SQNR of identical outputs)
    spread = baseline - search.floor if math.isfinite(baseline) else abs(search.floor)
    search.scale = max(abs(spread), 1e-3 * abs(search.floor), 1e-6)
    search.echo(
        f"original {search.budget.metric} = {baseline:.4g}; budget {search.budget}: "
        f"floor {search.floor:.4g}"
    )
    least = least_samples(search.budget.metric, baseline - search.floor)
    counted = subset_samples(search.base_job, original, evaluation, subset, least)
    limit = counted[0] if counted else None
    if counted and (search.budget.metric in COUNTED or is_user(search.budget.metric)):
        # a share of samples (a user's metric taken as one): worst channels, cosines and
        # neighbours found among the subset do not spread as a mean over it does
        search.slack = subset_slack(*counted) if math.isfinite(baseline) else 0.0
    if limit is None and least > 2 and 0 < subset < 1 and isinstance(evaluation, str):
        search.echo(
            f"candidates are ranked on all of the evaluation data: a subset of it would need "
            f"{least} samples for the budget to let {FLIPS} of them flip"
        )
    if limit and is_user(search.budget.metric):  # it reads the data itself: give it the subset
        written = write_subset(evaluation, original, limit, search.store.root)
        if written is None:
            search.echo(
                f"{search.budget.metric} reads {evaluation} itself, and a subset is written only "
                "from one .npz/.npy file: candidates are ranked on all of it"
            )
            limit = None
        search.subset_file = os.fspath(written) if written else None
    stage = SUBSET if limit else FULL
    if stage == SUBSET:  # the best candidate is judged on all the data at the end, against the
        # original as the reference judged the prepared original: the budget keeps that long for
        # it (without, ResNet-50 given 566 s ended 12 s past them)
        result = reference.result  # from a store without made_seconds: all of its seconds
        search.reserve = max(
            0.0, (result.get("seconds") or 0.0) - (result.get("made_seconds") or 0)
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    )
    drawn = _presets(search, space, stage, limit, trials)
    drawn += _pilot(search, space, study, stage, limit, trials - drawn)
    best = min(
        (search.objective(t) for t in search.trials if t.stage == stage and t.ok), default=math.inf
    )
    stale = 0  # draws in a row that came no closer (patience)
    while drawn < trials and not search.out_of_time and not search.done:
        if patience and stale >= patience:
            search.echo(
                f"no closer in the last {stale} draws: drawing stops at {drawn} of {trials}"
            )
            break
        asked = [study.ask() for _ in range(min(max(1, jobs), trials - drawn))]
        points = [space.draw(ask) for ask in asked]
        for ask, trial in zip(asked, search.run([(stage, p) for p in points], limit), strict=True):
            objective = search.objective(trial)
            study.tell(ask, objective)
            stale = 0 if objective < best else stale + 1
            best = min(best, objective)
        drawn += len(asked)
    if (
        stage == SUBSET and not search.done
    ):  # successive halving: the best 1/eta ranked on the subset, on all data
        promoted = [t.params for t in search.trials if t.stage == FULL]  # at once, by `first`
        distinct = {
            t.key: t
            for t in search.trials
            if t.stage == SUBSET and t.ok and t.params not in promoted
        }
        ranked = sorted(distinct.values(), key=search.objective)  # a point drawn twice counts once
        # out of time: the best one only, so that something is judged on all the data
        share = math.ceil(len(ranked) / eta) if not search.out_of_time else 1
        keep = ranked[: max(1, share)]
        # the best is judged in the reserve, unless the budget is spent and `first` has judged
        # one on all the data already; the others, and the bisection, within what is left
        judged_once = any(t.stage == FULL and t.ok for t in search.trials)
        if keep and not (judged_once and time.monotonic() >= search.deadline):
            search.run([(FULL, keep[0].params)], models=[keep[0].model_path], bounded=False)
        search.reserve = 0.0
        if keep[1:] and not search.out_of_time:
            search.run(
                [(FULL, t.params) for t in keep[1:]], models=[t.model_path for t in keep[1:]]
            )
    judged = [t for t in search.trials if t.stage in (FULL, BISECT) and t.ok]
    if judged and not search.out_of_time and not search.done:
        _bisect(search, space, min(judged, key=search.objective), bisect_steps)
    return reference


def _pilot(
    search: Search,
    space: Space,
    study: optuna.Study,
    stage: str,
    limit: int | None,
    trials: int,
) -> int:
    """The family's preset recipes (arms) with the pruning fraction bisected, before TPE draws,
    one arm after the other until one meets the targets within the budget. Without it, TPE's
    random start-up draws can all land on recipes too aggressive for the budget and leave no
    time to move back (the zoo transformer: four draws at 0.26-0.50x latency, none within it);
    with one arm only, a recipe whose speed stalls (INT8 on the pruned digits CNN: 0.40x at any
    fraction past 0.5) leaves a target past it to TPE's luck. The trials are told to TPE, which
    goes on from what they found. Returns how many trials it ran."""
    param = space.param("prune")
    if param is None or not space.pilots or trials < 1:
        return 0
    timed = any(t.name in ("latency", "speedup") for t in search.targets)
    ran: list[Trial] = []

    def probe(point: dict[str, Any]) -> Trial:
        """The trial at ``point``; where ``first`` judged it on all the data at once, that
        judgment (a candidate that met on the subset and not on all of it found nothing: the
        digits CNN's INT8 arm at 3x ended its pilot on such a one, and TPE's draws went on)."""
        study.enqueue_trial(point)
        ask = study.ask()
        (trial,) = search.run([(stage, space.draw(ask))], limit)
        last = search.trials[-1]
        if last is not trial and last.stage == FULL and last.params == trial.params:
            trial = last
        study.tell(ask, search.objective(trial))
        ran.append(trial)
        return trial

    for arm in space.pilots:
        if len(ran) >= trials or search.out_of_time or search.done:
            break
        if _pilot_arm(space, param, arm, timed, probe, ran, search, trials):
            break
    return len(ran)


def _presets(search: Search, space: Space, stage: str, limit: int | None, room: int) -> int:
    """The family's named recipes as they are, aimed at the budget (:attr:`.Space.presets`),
    at most ``room``, one at a time until one meets everything where the search stops at the
    first; not told to TPE, whose space holds no such point. Returns how many trials ran."""
    ran = 0
    for name in space.presets[: max(0, room)]:
        if search.done or search.out_of_time:
            break
        search.run([(stage, {"preset": name})], limit)
        ran += 1
    return ran


# A MACs ratio at which a pruned trial removed nothing (metadata and rounding aside).
WHOLE = 0.999


def _pilot_arm(
    space: Space,
    param: Any,
    arm: Mapping[str, Any],
    timed: bool,
    probe: Callable[[dict[str, Any]], Trial],
    ran: list[Trial],
    search: Search,
    trials: int,
) -> bool:
    """One arm's bisection on the pruning fraction: the smallest fraction that meets the targets
    (or where the budget breaks). First its lowest fraction (quantization alone may do), unless
    that is no recipe at all (the original) or an earlier arm pruned the same way: fine-tuning
    and the criterion move the metric, not the latency, size or MACs (pruning is steered to its
    fraction of the time or MACs whichever channels it scores lowest), so that arm's fractions
    that missed the targets bound this one's from below, and the smallest that met them (else
    the highest) is tried first (coarse to fine: a fine-tuned trial costs minutes, a pruned one
    seconds). A trial past the time limit ends the arm: another fraction of its recipe costs
    about as much (ResNet-50: pruning alone ran past 600 s at 0.35 of the time, then again at
    0.15); so does one whose pruning removed nothing: the model has no channels it can prune
    (magika: 6 of 12 trials bisected fractions that all left its MACs whole). At each fraction
    the arm's pruning scores channels with the space's cheap criterion first
    (:data:`.space.CHEAP_CRITERION`) and with its own only where that breaks the budget.
    Returns whether a trial met the targets within the budget."""

    def at(fraction: float, cheap: bool = False) -> dict[str, Any]:
        return space.pilot_point(arm, fraction, timed, cheap)

    def run(fraction: float) -> tuple[float, float] | None:
        """How far the arm at ``fraction`` misses the targets and the budget (a failed trial
        misses both); None when it ran past the time limit or pruned nothing. The cheap
        criterion first; where it breaks the budget, the arm's own decides."""
        cheap, own = at(fraction, cheap=True), at(fraction)
        trial = probe(cheap)
        if cheap != own and not trial.result.get("timed_out") and search.distance(trial)[1] > 0:
            trial = probe(own)
        # by MACs, or parameters where MACs are not counted (shapes unknown past a contrib op)
        kept = trial.metrics.get("macs_ratio", trial.metrics.get("params_ratio")) if trial.ok else 0
        whole = fraction > 0 and (kept or 0) >= WHOLE
        return None if trial.result.get("timed_out") or whole else search.distance(trial)

    def shape(params: Mapping[str, Any]) -> dict[str, Any]:  # what moves the time and size
        return {k: v for k, v in params.items() if k not in ("prune", "finetune", "criterion")}

    same = [t for t in ran if t.ok and shape(t.params) == shape(at(t.params.get("prune", 0.0)))]
    missed = [t.params.get("prune", 0.0) for t in same if search.distance(t)[0] > 0]
    low, high, found = max(missed, default=param.low), param.high, False
    if same:
        met = [t.params.get("prune", 0.0) for t in same if search.distance(t)[0] == 0]
        top = min((f for f in met if f > low), default=param.high)
        if top <= low or run(top) != (0.0, 0.0):
            return False  # the targets missed at the top, or the budget broken where they hold
        high, found = top, True
    elif recipe_for({**at(low), "finetune": 0}).steps:  # fine-tuning alone changes no time
        outcome = run(low)
        if outcome is None or outcome[0] == 0 or outcome[1] > 0:
            # past the time limit, met already, or the budget spent with no pruning
            return outcome == (0.0, 0.0)
    while len(ran) < trials and not search.out_of_time and not search.done:
        middle = round(round((low + high) / 2 / param.step) * param.step, 4)
        if not low < middle < high:
            break
        outcome = run(middle)
        if outcome is None:
            break
        short, below = outcome
        if short == 0 or below > 0:  # no higher fraction needed, or none can help
            high, found = middle, found or below == 0
        else:
            low = middle
    return found
