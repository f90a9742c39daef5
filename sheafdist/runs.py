"""Training runs for the reproduction: the sheaf flow and SGD, with snapshots.

A :class:`RunSpec` names one training run of the paper's protocol (paper.md 5.3):
a task, an architecture, a weight seed (stalks use seed + 42, as ``sheafdist
train`` does), ``dt``, ``beta`` and a step count. :func:`run` trains it with the
same problem and engine as :func:`sheafdist.training.train_sheaf` (regression
runs are one warm-started run; classification restarts the stalks at the forward
pass of the current weights every ``steps_per_epoch`` rounds), and records the
train and test losses and a copy of the weights at every step in ``points``, and
the stalks at every step in ``stages``. With ``sgd`` it then trains the same
initial weights by full-batch gradient descent for as many steps, with the same
records. Runs are independent, so :func:`run_all` may spread them over processes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from .engines import make_engine
from .errors import DivergenceError
from .model import MLP, he_init, loss
from .problem import initial_stalks, training_problem
from .rules import Config
from .sgd import sgd_train
from .tasks import TASKS, Dataset, make_task

DATA_SEED = 42  # the paper's data seed (paper.md 5.3)
STALK_SEED_OFFSET = 42  # stalk seed = weight seed + 42, as in `sheafdist train`
N_TRAIN, N_TEST = 300, 100
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class RunSpec:
    task: str
    arch: tuple[int, ...]
    seed: int
    dt: float
    beta: float
    steps: int
    points: tuple[int, ...]  # record losses and weights here (0 and steps added)
    stages: tuple[int, ...] = ()  # keep the stalks here as well
    sgd: bool = False
    sgd_lr: float = 0.005
    alpha: float = 1.0
    engine: str = "local"
    engine_options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        hidden = len(self.arch) - 2
        return (f"{self.task} {hidden}H [{','.join(map(str, self.arch))}] seed "
                f"{self.seed} beta*n {self.beta * N_TRAIN:.3g}")

    def record_at(self) -> list[int]:
        return sorted({0, self.steps, *self.points, *self.stages} &
                      set(range(self.steps + 1)))


@dataclass
class Curve:
    """Losses and weights at recorded steps; NaN after a divergence."""

    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    models: dict[int, MLP] = field(default_factory=dict)

    def add(self, step: int, model: MLP | None, data: Dataset) -> None:
        self.steps.append(step)
        if model is None:
            self.train.append(math.nan)
            self.test.append(math.nan)
            return
        self.train.append(loss(model, data.X_train, data.Y_train))
        self.test.append(loss(model, data.X_test, data.Y_test))
        self.models[step] = model.copy()

    def at(self, step: int) -> tuple[float, float]:
        i = self.steps.index(step)
        return self.train[i], self.test[i]

    @property
    def final(self) -> tuple[float, float]:
        return self.train[-1], self.test[-1]


@dataclass
class RunRecord:
    spec: RunSpec
    sheaf: Curve
    stalks: dict[int, dict[str, np.ndarray]]
    diverged_at: int | None  # the last recorded step before the flow blew up
    seconds: float
    sgd: Curve | None = None
    sgd_seconds: float = 0.0


def task_data(task: str) -> Dataset:
    return make_task(task, DATA_SEED, N_TRAIN, N_TEST)


def initial_model(spec: RunSpec) -> MLP:
    return he_init(list(spec.arch), spec.seed, TASKS[spec.task].output)


def run(spec: RunSpec) -> RunRecord:
    """Train one spec (sheaf, then SGD if asked); see the module docstring."""
    data, task = task_data(spec.task), TASKS[spec.task]
    model = initial_model(spec)
    start = time.perf_counter()
    sheaf, stalks, diverged_at = _sheaf(spec, model, data, task)
    record = RunRecord(spec, sheaf, stalks, diverged_at, time.perf_counter() - start)
    if spec.sgd:
        start = time.perf_counter()
        record.sgd = _sgd(spec, model, data)
        record.sgd_seconds = time.perf_counter() - start
    return record


def _sheaf(spec: RunSpec, model: MLP, data: Dataset, task):
    X, Y = data.X_train, data.Y_train
    config = Config(alpha=spec.alpha, dt=spec.dt, beta=spec.beta)
    problem = training_problem(model, X, Y, config, task.init,
                               spec.seed + STALK_SEED_OFFSET)
    points = spec.record_at()
    epoch = task.steps_per_epoch
    cuts = set(points)
    if not task.warm_start:
        cuts |= set(range(epoch, spec.steps, epoch))
    curve, stalks = Curve(), {}
    curve.add(0, model, data)
    if 0 in spec.stages:
        stalks[0] = dict(problem.stalks)
    done, current, diverged_at = 0, model, None
    eng = make_engine(spec.engine, problem, **dict(spec.engine_options))
    try:
        for cut in sorted(cuts - {0}):
            if diverged_at is None:
                if not task.warm_start and done and done % epoch == 0:
                    eng.set_stalks(initial_stalks(current, problem.graph, X, "forward"))
                try:
                    result = eng.run(cut - done)
                    current = result.model
                    if not np.isfinite(loss(current, X, Y)):
                        raise DivergenceError(f"loss not finite at step {cut}")
                except DivergenceError:
                    diverged_at = done
            done = cut
            if cut in points:
                curve.add(cut, None if diverged_at is not None else current, data)
            if cut in spec.stages and diverged_at is None:
                stalks[cut] = result.stalks
    finally:
        eng.close()
    return curve, stalks, diverged_at


def _sgd(spec: RunSpec, model: MLP, data: Dataset) -> Curve:
    points = spec.record_at()
    every = math.gcd(*points) if len(points) > 1 else max(spec.steps, 1)
    curve = Curve()
    wanted = set(points)

    def keep(step, m, train, test) -> None:
        if step in wanted and step not in curve.models:
            curve.steps.append(step)
            curve.train.append(train)
            curve.test.append(test)
            curve.models[step] = m.copy()

    sgd_train(model, data.X_train, data.Y_train, spec.sgd_lr, spec.steps,
              max(every, 1), data.X_test, data.Y_test, callback=keep)
    return curve


def run_all(
    specs: list[RunSpec], jobs: int = 1, say: Callable[[str], None] | None = None
) -> list[RunRecord]:
    """Run every spec, in ``jobs`` processes (spawned) when ``jobs > 1``; the
    records come back in the order of ``specs``."""
    return map_jobs(run, specs, jobs, say, describe=_describe)


def _describe(record: RunRecord) -> str:
    train, test = record.sheaf.final
    text = (f"{record.spec.name}: sheaf train {train:.4g} test {test:.4g} after "
            f"{record.spec.steps} steps ({record.seconds:.1f}s)")
    if record.diverged_at is not None:
        text += f", diverged after step {record.diverged_at}"
    if record.sgd is not None:
        train, test = record.sgd.final
        text += f"; SGD train {train:.4g} test {test:.4g} ({record.sgd_seconds:.1f}s)"
    return text


def map_jobs(fn, items, jobs: int = 1, say=None, describe=None) -> list:
    """``[fn(item) for item in items]``, over ``jobs`` spawned processes if > 1."""
    items = list(items)
    results = []
    if jobs <= 1 or len(items) <= 1:
        for item in items:
            results.append(fn(item))
            if say and describe:
                say(describe(results[-1]))
        return results
    # one BLAS thread per worker: the arrays are small, and threads of several
    # workers spinning on 2 cores cost more than they give
    saved = {k: os.environ.get(k) for k in BLAS_THREADS}
    os.environ.update({k: "1" for k in BLAS_THREADS})
    try:
        with ProcessPoolExecutor(max_workers=jobs,
                                 mp_context=get_context("spawn")) as ex:
            for result in ex.map(fn, items):
                results.append(result)
                if say and describe:
                    say(describe(result))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results
