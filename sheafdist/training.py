"""Backprop-free training: the joint stalk and weight flow in epochs.

The loop of paper.md sections 5.2 and 5.3. One engine holds the training problem
for the whole run: every example's cochain is pinned at ``a0 = x`` and pulled
towards its label at the output edge, and each round moves the stalks and the
affine maps together (the dynamics live in :mod:`sheafdist.rules`). An epoch is
``steps_per_epoch`` rounds; at each epoch boundary the loop

1. reads the current weights from the engine and measures the train and test
   losses with the plain forward pass (never with the stalks);
2. writes a checkpoint, if asked to;
3. for classification (``warm_start=False``) re-initialises every stalk at the
   forward pass of the current weights before the next epoch.

With ``warm_start=True`` (regression) the epochs are one uninterrupted run, which
is how ``golden/train_paraboloid_short.npz`` was made.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engines import make_engine
from .engines.base import Observer
from .errors import DivergenceError
from .files import atomic_savez, read_npz
from .model import MLP, loss, save_model
from .problem import initial_stalks, training_problem
from .rules import Config

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.npz"
LATEST_MODEL = "model.npz"
HISTORY_KEYS = ("epoch", "step", "train_loss", "test_loss", "seconds")


@dataclass
class EpochRecord:
    """Where the run stands at the end of one epoch (epoch 0 is the start)."""

    epoch: int
    step: int  # rounds taken so far
    train_loss: float
    test_loss: float  # NaN without test data
    seconds: float  # wall time since the run started
    rounds_per_second: float  # over this epoch's rounds only


@dataclass
class TrainResult:
    model: MLP
    stalks: dict[str, np.ndarray]
    history: dict[str, list] = field(default_factory=dict)  # HISTORY_KEYS
    rounds: int = 0
    seconds: float = 0.0  # the whole call, checkpoints and losses included
    run_seconds: float = 0.0  # inside the engine only

    @property
    def rounds_per_second(self) -> float:
        return self.rounds / self.run_seconds if self.run_seconds > 0 else 0.0


def train_sheaf(
    model: MLP,
    data,
    config: Config,
    epochs: int,
    steps_per_epoch: int,
    engine: str = "local",
    engine_options: dict | None = None,
    init: str | dict[str, np.ndarray] = "random",
    seed: int | None = 42,
    warm_start: bool = True,
    observer: Observer | None = None,
    on_epoch: Callable[[EpochRecord, MLP], None] | None = None,
    on_start: Callable[[object], None] | None = None,
    checkpoint_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
    run_info: dict | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` for ``epochs * steps_per_epoch`` joint rounds.

    ``data`` has ``X_train``, ``Y_train`` and optionally ``X_test``, ``Y_test``
    (``(dim, n)`` arrays). ``config`` gives ``alpha``, ``dt`` and ``beta`` (the
    output edge is the label pull, whatever ``config.output_edge`` says). ``init``
    and ``seed`` fix the first epoch's stalks (``random``, ``forward``, ``zeros``
    or a state dict with one column per example); with ``warm_start=False`` every
    later epoch starts from the forward pass of the current weights.

    ``observer`` receives the engine's round reports, ``on_start`` the engine once
    it exists, ``on_epoch`` every :class:`EpochRecord` with the current weights,
    and ``progress`` one line of text per epoch. With ``checkpoint_dir`` each
    epoch ends by atomically writing ``checkpoint.npz`` (see
    :func:`checkpoint_arrays`) and ``model.npz`` there; ``run_info`` is added
    to the configuration stored in the checkpoint.

    Raises :class:`~sheafdist.errors.DivergenceError` if the flow blows up or a
    loss stops being finite; the checkpoints of earlier epochs stay intact.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"need epochs, steps_per_epoch >= 1, got {epochs}, "
                         f"{steps_per_epoch}")
    X, Y = data.X_train, data.Y_train
    X_test, Y_test = getattr(data, "X_test", None), getattr(data, "Y_test", None)
    start = time.perf_counter()

    def losses(m: MLP) -> tuple[float, float]:
        test = loss(m, X_test, Y_test) if X_test is not None else float("nan")
        return loss(m, X, Y), test

    problem = training_problem(model, X, Y, config, init, seed)
    settings = {
        "arch": model.arch, "output": model.output, "alpha": config.alpha,
        "dt": config.dt, "beta": config.beta, "epochs": epochs,
        "steps_per_epoch": steps_per_epoch, "engine": engine,
        "init": init if isinstance(init, str) else "state", "seed": seed,
        "warm_start": warm_start, **(run_info or {}),
    }
    history: dict[str, list] = {k: [] for k in HISTORY_KEYS}

    def record(r: EpochRecord) -> None:
        for k in HISTORY_KEYS:
            history[k].append(getattr(r, k))

    train0, test0 = losses(model)
    record(EpochRecord(0, 0, train0, test0, 0.0, 0.0))
    eng = make_engine(engine, problem, observer=observer, **(engine_options or {}))
    rounds, run_seconds, current = 0, 0.0, model.copy()
    try:
        if on_start is not None:
            on_start(eng)
        for epoch in range(1, epochs + 1):
            if epoch > 1 and not warm_start:
                eng.set_stalks(initial_stalks(current, problem.graph, X, "forward"))
            result = eng.run(steps_per_epoch)
            rounds += result.rounds
            run_seconds += result.seconds
            current = result.model
            train, test = losses(current)
            rate = result.rounds / result.seconds if result.seconds > 0 else 0.0
            rec = EpochRecord(
                epoch, rounds, train, test, time.perf_counter() - start, rate
            )
            if not np.isfinite(train):
                raise DivergenceError(
                    f"--beta: the training loss became {train} in epoch {epoch} "
                    f"with beta={config.beta:g}, dt={config.dt:g}; the weight step "
                    f"is stable only for beta*n_train < 2/(dt*lambda_max(E[a a^T])), "
                    f"so lower --beta or --dt"
                )
            record(rec)
            if checkpoint_dir is not None:
                save_checkpoint(
                    checkpoint_dir, current, result.stalks, rounds, epoch, history,
                    settings,
                )
            if on_epoch is not None:
                on_epoch(rec, current)
            if progress is not None:
                progress(format_record(rec, epochs))
        stalks = eng.stalks()
    finally:
        eng.close()
    return TrainResult(
        model=current, stalks=stalks, history=history, rounds=rounds,
        seconds=time.perf_counter() - start, run_seconds=run_seconds,
    )


def format_record(rec: EpochRecord, epochs: int) -> str:
    test = "" if np.isnan(rec.test_loss) else f"  test {rec.test_loss:.6g}"
    return (
        f"epoch {rec.epoch}/{epochs}  step {rec.step}  sheaf train "
        f"{rec.train_loss:.6g}{test}  {rec.rounds_per_second:.0f} rounds/s"
    )


# ---------------------------------------------------------------- checkpoints


def checkpoint_arrays(
    model: MLP,
    stalks: dict[str, np.ndarray],
    rounds: int,
    epoch: int,
    history: dict[str, list],
    settings: dict,
) -> dict[str, np.ndarray]:
    """Everything needed to inspect or resume a run, as plain arrays.

    Keys: the model file's (``W1..WK``, ``b1..bK``, ``output``), ``stalk_a0``,
    ``stalk_z1``, ... for every vertex, ``round``, ``epoch``, ``history_<key>`` for
    each of ``HISTORY_KEYS`` and ``config``, the settings as a JSON string.
    """
    arrays: dict[str, np.ndarray] = {**model.params(), "output": np.array(model.output)}
    arrays |= {f"stalk_{v}": s for v, s in stalks.items()}
    arrays["round"] = np.array(rounds, dtype=np.int64)
    arrays["epoch"] = np.array(epoch, dtype=np.int64)
    for k in HISTORY_KEYS:
        arrays[f"history_{k}"] = np.asarray(history[k])
    arrays["config"] = np.array(json.dumps(settings, sort_keys=True))
    return arrays


def save_checkpoint(
    folder: str,
    model: MLP,
    stalks: dict[str, np.ndarray],
    rounds: int,
    epoch: int,
    history: dict[str, list],
    settings: dict,
) -> str:
    """Write ``checkpoint.npz`` and ``model.npz`` in ``folder``, each by an atomic
    rename: a crash leaves the previous epoch's files whole. Returns the path."""
    path = os.path.join(folder, CHECKPOINT)
    atomic_savez(path, checkpoint_arrays(model, stalks, rounds, epoch, history,
                                         settings))
    save_model(model, os.path.join(folder, LATEST_MODEL))
    log.debug("checkpoint of epoch %d (round %d) in %s", epoch, rounds, path)
    return path


def load_checkpoint(path: str, arg: str = "--checkpoint") -> dict:
    """Read a checkpoint back: ``model`` (an :class:`MLP`), ``stalks``, ``round``,
    ``epoch``, ``history`` and ``config`` (the settings dict)."""
    data = read_npz(path, arg)
    K = sum(1 for k in data if k.startswith("W") and k[1:].isdigit())
    model = MLP(
        [data[f"W{layer}"] for layer in range(1, K + 1)],
        [data[f"b{layer}"] for layer in range(1, K + 1)],
        str(data["output"]),
    )
    return {
        "model": model,
        "stalks": {k[len("stalk_"):]: v for k, v in data.items()
                   if k.startswith("stalk_")},
        "round": int(data["round"]),
        "epoch": int(data["epoch"]),
        "history": {k: data[f"history_{k}"].tolist() for k in HISTORY_KEYS},
        "config": json.loads(str(data["config"])),
    }
