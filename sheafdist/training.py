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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engines import make_engine
from .engines.base import Observer
from .errors import DivergenceError, InputError, one_line
from .files import atomic_savez, read_npz
from .model import MLP, check_model, loss, save_model
from .problem import initial_stalks, training_problem
from .rules import Config
from .sheaf import build_graph, stable_step

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.npz"
PREVIOUS = "checkpoint.prev.npz"  # the checkpoint before, kept whole
LATEST_MODEL = "model.npz"
HISTORY_KEYS = ("epoch", "step", "train_loss", "test_loss", "seconds")
SGD_HISTORY_KEYS = ("step", "train_loss", "test_loss")


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
    checkpoint_every: int | None = None,
    resume: dict | None = None,
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
    and ``progress`` one line of text per epoch. With ``checkpoint_dir``,
    ``checkpoint.npz`` (see :func:`checkpoint_arrays`) and ``model.npz`` are
    written there atomically every ``checkpoint_every`` rounds (default: every
    epoch) and at the end; the checkpoint they replace is kept as
    ``checkpoint.prev.npz``. ``run_info`` is added to the configuration stored in
    the checkpoint.

    ``resume`` is a checkpoint read by :func:`load_checkpoint`: the run continues
    from its round with its weights, stalks, scheme memory and history, and ends
    where the run without a break would have (the same weights; bit for bit with
    the local engine). ``model``, ``init`` and ``seed`` then only describe the
    original start.

    Raises :class:`~sheafdist.errors.DivergenceError` if the flow blows up or a
    loss stops being finite; the checkpoints written before stay intact.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"need epochs, steps_per_epoch >= 1, got {epochs}, "
                         f"{steps_per_epoch}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"need checkpoint_every >= 1, got {checkpoint_every}")
    every = checkpoint_every or steps_per_epoch
    total = epochs * steps_per_epoch
    X, Y = data.X_train, data.Y_train
    X_test, Y_test = getattr(data, "X_test", None), getattr(data, "Y_test", None)
    start = time.perf_counter()

    def losses(m: MLP) -> tuple[float, float]:
        test = loss(m, X_test, Y_test) if X_test is not None else float("nan")
        return loss(m, X, Y), test

    history: dict[str, list] = {k: [] for k in HISTORY_KEYS}

    def record(r: EpochRecord) -> None:
        for k in HISTORY_KEYS:
            history[k].append(getattr(r, k))

    if resume is None:
        settings = {
            "arch": model.arch, "output": model.output, "alpha": config.alpha,
            "dt": config.dt, "beta": config.beta, "scheme": config.scheme,
            "momentum": config.momentum, "omega": config.omega, "epochs": epochs,
            "steps_per_epoch": steps_per_epoch, "engine": engine,
            "init": init if isinstance(init, str) else "state", "seed": seed,
            "warm_start": warm_start, **(run_info or {}),
        }
        initial, current, rounds, elapsed = model.copy(), model.copy(), 0, 0.0
        stalks0, schemes = init, None
        train0, test0 = losses(model)
        record(EpochRecord(0, 0, train0, test0, 0.0, 0.0))
    else:
        settings = dict(resume["config"])
        initial = resume.get("initial") or model.copy()
        current, rounds = resume["model"].copy(), int(resume["round"])
        stalks0, schemes = resume["stalks"], resume.get("scheme")
        history = {k: list(resume["history"][k]) for k in HISTORY_KEYS}
        elapsed = float(history["seconds"][-1]) if history["seconds"] else 0.0
        if not 0 <= rounds <= total:
            raise ValueError(f"the checkpoint is at round {rounds}, outside this "
                             f"run of {total} rounds")
    settings["checkpoint_every"] = every
    # the checkpoint in the folder is ours (written or resumed from) and may be
    # kept as the previous one; a file we did not read is never kept as good
    trusted = resume is not None and resume.get("trusted", False)
    run_seconds, stalks = 0.0, None
    if rounds >= total:  # the sheaf part was over when the run stopped
        return TrainResult(model=current, stalks=dict(stalks0), history=history,
                           rounds=rounds, seconds=time.perf_counter() - start)
    problem = training_problem(current, X, Y, config, stalks0, seed)
    eng = make_engine(engine, problem, observer=observer, **(engine_options or {}))
    base = rounds  # the engine counts its rounds from here
    epoch_rounds, epoch_seconds = 0, 0.0
    try:
        if schemes:
            load_scheme_states(eng, schemes)
        if on_start is not None:
            on_start(eng)
        while rounds < total:
            epoch, offset = divmod(rounds, steps_per_epoch)
            epoch += 1
            if offset == 0 and epoch > 1 and not warm_start:
                eng.set_stalks(initial_stalks(current, problem.graph, X, "forward"))
            chunk = min(steps_per_epoch - offset, every - rounds % every)
            try:
                result = eng.run(chunk)
            except DivergenceError as exc:
                raise training_divergence(exc, current, X, config, base) from None
            rounds += result.rounds
            run_seconds += result.seconds
            epoch_rounds += result.rounds
            epoch_seconds += result.seconds
            current = result.model
            rec = None
            if rounds % steps_per_epoch == 0:
                train, test = losses(current)
                rate = epoch_rounds / epoch_seconds if epoch_seconds > 0 else 0.0
                epoch_rounds, epoch_seconds = 0, 0.0
                rec = EpochRecord(epoch, rounds, train, test,
                                  elapsed + time.perf_counter() - start, rate)
                if not np.isfinite(train):
                    raise DivergenceError(
                        f"--beta: the training loss became {train} in epoch "
                        f"{epoch} with beta={config.beta:g}, dt={config.dt:g}; the "
                        f"weight step is stable only for beta*n_train < "
                        f"2/(dt*lambda_max(E[a a^T])), so lower --beta or --dt"
                    )
                record(rec)
            if checkpoint_dir is not None and (rounds % every == 0
                                               or rounds == total):
                save_checkpoint(
                    checkpoint_dir, current, result.stalks, rounds,
                    rounds // steps_per_epoch, history, settings, initial=initial,
                    scheme=scheme_states(eng), keep_previous=trusted,
                )
                trusted = True
            if rec is not None and on_epoch is not None:
                on_epoch(rec, current)
            if rec is not None and progress is not None:
                progress(format_record(rec, epochs))
        stalks = eng.stalks()
    finally:
        eng.close()
    return TrainResult(
        model=current, stalks=stalks, history=history, rounds=rounds,
        seconds=time.perf_counter() - start, run_seconds=run_seconds,
    )


def training_divergence(exc: DivergenceError, model: MLP, x: np.ndarray,
                        config: Config, base: int) -> DivergenceError:
    """The engine's divergence error, retold for training: the round counted from
    the start of the run, and the bound ``2/lambda_max`` at the forward pattern of
    the current weights (the last ones known finite), label pull included."""
    if getattr(exc, "round", None) is None or config.scheme not in ("euler",
                                                                     "momentum"):
        return exc
    try:
        identity = MLP(model.W, model.b, "identity")
        bound = 2.0 / (2.0 / stable_step(identity, x, 1.0) + 1.0)
        hint = (f"the stable bound at the forward pattern of the current weights is "
                f"alpha*dt < 2/lambda_max = {bound:.4g}; lower --dt below "
                f"{bound / config.alpha:.4g}")
    except Exception:  # the bound is advice; never hide the divergence behind it
        hint = "lower --dt"
    err = DivergenceError(
        f"--dt: the scheme diverged at round {base + exc.round} with "
        f"alpha={config.alpha:g}, dt={config.dt:g} (energy {exc.energy:.3g}); {hint}"
    )
    err.round, err.energy = base + exc.round, exc.energy
    return err


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
    initial: MLP | None = None,
    scheme: list[dict] | None = None,
) -> dict[str, np.ndarray]:
    """Everything needed to inspect or resume a run, as plain arrays.

    Keys: the model file's (``W1..WK``, ``b1..bK``, ``output``), ``stalk_a0``,
    ``stalk_z1``, ... for every vertex, ``round``, ``epoch`` (complete epochs),
    ``history_<key>`` for each of ``HISTORY_KEYS``, ``config``, the settings as a
    JSON string (seeds included: nothing random is drawn after the start, so the
    seeds are the whole random state), ``init_W1..``, ``init_b1..`` (the weights
    the run started from, for the SGD baseline) and ``scheme.<block>.<field>``,
    the time-stepping scheme's memory per block (nothing for Euler).
    """
    arrays: dict[str, np.ndarray] = {**model.params(), "output": np.array(model.output)}
    arrays |= {f"stalk_{v}": s for v, s in stalks.items()}
    arrays["round"] = np.array(rounds, dtype=np.int64)
    arrays["epoch"] = np.array(epoch, dtype=np.int64)
    for k in HISTORY_KEYS:
        arrays[f"history_{k}"] = np.asarray(history[k])
    arrays["config"] = np.array(json.dumps(settings, sort_keys=True))
    if initial is not None:
        arrays |= {f"init_{k}": v for k, v in initial.params().items()}
    for i, state in enumerate(scheme or []):
        _flatten(f"scheme.{i}", state, arrays)
    return arrays


def save_checkpoint(
    folder: str,
    model: MLP,
    stalks: dict[str, np.ndarray],
    rounds: int,
    epoch: int,
    history: dict[str, list],
    settings: dict,
    initial: MLP | None = None,
    scheme: list[dict] | None = None,
    keep_previous: bool = False,
) -> str:
    """Write ``checkpoint.npz`` and ``model.npz`` in ``folder``, each by an atomic
    rename: a crash leaves the previous files whole. With ``keep_previous`` the
    checkpoint being replaced stays as ``checkpoint.prev.npz``. Weights or stalks
    that are not finite are refused (a :class:`DivergenceError`), never written.
    Returns the path."""
    for name, arr in [*model.params().items(), *stalks.items()]:
        if not np.all(np.isfinite(arr)):
            raise DivergenceError(
                f"--dt: {name} holds NaN or inf at round {rounds}; no checkpoint "
                f"written (the one before stays); lower --dt or --beta"
            )
    arrays = checkpoint_arrays(model, stalks, rounds, epoch, history, settings,
                               initial, scheme)
    path = write_checkpoint(folder, arrays, keep_previous)
    save_model(model, os.path.join(folder, LATEST_MODEL))
    log.debug("checkpoint of epoch %d (round %d) in %s", epoch, rounds, path)
    return path


def write_checkpoint(folder: str, arrays: dict[str, np.ndarray],
                     keep_previous: bool = False) -> str:
    """Atomically write ``arrays`` as ``folder/checkpoint.npz``; with
    ``keep_previous``, first keep the current file as ``checkpoint.prev.npz``
    (a hard link renamed into place: at every instant both names hold whole
    files)."""
    path = os.path.join(folder, CHECKPOINT)
    if keep_previous and os.path.exists(path):
        tmp = os.path.join(folder, ".tmp-previous.npz")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copy2(path, tmp)
        os.replace(tmp, os.path.join(folder, PREVIOUS))
    atomic_savez(path, arrays)
    return path


def save_sgd_state(folder: str, model: MLP, step: int,
                   history: dict[str, list]) -> str:
    """Add the SGD baseline's weights, step and history to the checkpoint in
    ``folder`` (the sheaf part is over), keeping the one before as previous."""
    path = os.path.join(folder, CHECKPOINT)
    arrays = read_npz(path, "--checkpoint")
    arrays = {k: v for k, v in arrays.items() if not k.startswith("sgd_")}
    arrays |= {f"sgd_{k}": v for k, v in model.params().items()}
    arrays["sgd_step"] = np.array(step, dtype=np.int64)
    for k in SGD_HISTORY_KEYS:
        arrays[f"sgd_history_{k}"] = np.asarray(history[k])
    return write_checkpoint(folder, arrays, keep_previous=True)


def checkpoint_path(path: str) -> str:
    """``path`` itself, or ``path/checkpoint.npz`` for a folder."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


def load_checkpoint(path: str, arg: str = "--checkpoint") -> dict:
    """Read a checkpoint back: ``model`` (an :class:`MLP`), ``stalks``, ``round``,
    ``epoch``, ``history``, ``config`` (the settings dict), ``initial`` (an MLP
    or None), ``scheme`` (per block), and ``sgd`` (``model``, ``step``,
    ``history``) once the baseline has started.

    A truncated, damaged or incomplete file is refused with one
    :class:`InputError` naming ``arg``; nothing is written."""
    data = read_npz(path, arg)
    try:
        return _parse_checkpoint(data)
    except InputError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        previous = os.path.join(os.path.dirname(os.path.abspath(path)), PREVIOUS)
        fix = "it is not a complete sheafdist training checkpoint"
        if os.path.exists(previous) and os.path.abspath(path) != previous:
            fix += f"; resume from the previous one with {arg} {previous}"
        raise InputError(arg, f"{path} ({one_line(reason, 120)})", fix) from None


def _layers(data: dict, prefix: str) -> int:
    return sum(1 for k in data if k.startswith(prefix + "W") and
               k[len(prefix) + 1:].isdigit())


def _mlp(data: dict, prefix: str, output: str, arg: str) -> MLP:
    K = _layers(data, prefix)
    if K < 1:
        raise KeyError(f"{prefix}W1")
    model = MLP([np.asarray(data[f"{prefix}W{i}"], float) for i in range(1, K + 1)],
                [np.asarray(data[f"{prefix}b{i}"], float) for i in range(1, K + 1)],
                output)
    check_model(model, arg)
    return model


def _parse_checkpoint(data: dict) -> dict:
    output = str(data["output"])
    model = _mlp(data, "", output, "checkpoint weights")
    config = json.loads(str(data["config"]))
    if not isinstance(config, dict):
        raise ValueError("config is not a JSON object")
    stalks = {k[len("stalk_"):]: np.asarray(v, float) for k, v in data.items()
              if k.startswith("stalk_")}
    if "a0" not in stalks:
        raise KeyError("stalk_a0")
    for v, s in stalks.items():
        if s.ndim != 2 or not np.all(np.isfinite(s)):
            raise ValueError(f"stalk_{v} is not a finite (dim, batch) array")
    # one stalk per vertex of the training sheaf, each (width, the same batch)
    vertices = build_graph(model.arch, "identity").vertices
    if set(stalks) != set(vertices):
        raise ValueError(f"stalks of {sorted(stalks)}, not of the vertices "
                         f"{list(vertices)} of [{','.join(map(str, model.arch))}]")
    batch = stalks["a0"].shape[1]
    for v, s in stalks.items():
        if s.shape != (vertices[v].dim, batch):
            raise ValueError(f"stalk_{v} of shape {s.shape}, not "
                             f"({vertices[v].dim}, {batch})")
    history = {k: data[f"history_{k}"].tolist() for k in HISTORY_KEYS}
    if len({len(h) for h in history.values()}) != 1:
        raise ValueError("history columns of different lengths")
    out = {
        "model": model, "stalks": stalks, "round": int(data["round"]),
        "epoch": int(data["epoch"]), "history": history, "config": config,
        "initial": _mlp(data, "init_", output, "checkpoint initial weights")
        if "init_W1" in data else None,
        "scheme": _unflatten_blocks(data), "sgd": None,
    }
    if out["round"] < 0 or out["epoch"] < 0:
        raise ValueError(f"round {out['round']}, epoch {out['epoch']}")
    if "sgd_step" in data:
        out["sgd"] = {
            "model": _mlp(data, "sgd_", output, "checkpoint SGD weights"),
            "step": int(data["sgd_step"]),
            "history": {k: data[f"sgd_history_{k}"].tolist()
                        for k in SGD_HISTORY_KEYS},
        }
    return out


# the scheme's memory as npz keys: dicts by ".name", tuples marked by ".()"


def _flatten(prefix: str, value, out: dict[str, np.ndarray]) -> None:
    if isinstance(value, dict):
        out[f"{prefix}.{{}}"] = np.zeros(0)
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, tuple | list):
        out[f"{prefix}.()"] = np.array(len(value))
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = np.asarray(value)


def _unflatten(prefix: str, data: dict):
    if f"{prefix}.()" in data:
        n = int(data[f"{prefix}.()"])
        return tuple(_unflatten(f"{prefix}.{i}", data) for i in range(n))
    if f"{prefix}.{{}}" in data:
        names = {k[len(prefix) + 1:].split(".")[0] for k in data
                 if k.startswith(prefix + ".")} - {"{}", "()"}
        return {k: _unflatten(f"{prefix}.{k}", data) for k in sorted(names)}
    value = data[prefix]
    return value.item() if value.ndim == 0 else np.array(value)


def _unflatten_blocks(data: dict) -> list[dict]:
    blocks = sorted({int(k.split(".")[1]) for k in data if k.startswith("scheme.")})
    if blocks != list(range(len(blocks))):
        raise ValueError(f"scheme memory of blocks {blocks}")
    return [_unflatten(f"scheme.{i}", data) for i in blocks]


# ---------------------------------------------------------------- scheme memory


def scheme_states(engine) -> list[dict]:
    """The time-stepping scheme's memory of every block of ``engine`` (empty
    dicts for Euler): momentum, round parity. Block order is the partition's."""
    if hasattr(engine, "block"):  # the local engine
        return [engine.block.scheme.state()]
    states = engine._states()  # the Ray engine: one snapshot per actor
    return [s["scheme"] if isinstance(s, dict) else {} for s in states]


def load_scheme_states(engine, states: list[dict]) -> None:
    """Put a checkpoint's scheme memory back into a fresh engine."""
    if not any(states):
        return
    if hasattr(engine, "block"):
        blocks = 1
    else:
        blocks = len(engine.actors)
    if len(states) != blocks:
        raise InputError("--resume", f"a checkpoint with the scheme memory of "
                         f"{len(states)} blocks", f"resume with the engine and "
                         f"partition it was written with ({blocks} blocks now)")
    if hasattr(engine, "block"):
        engine.block.scheme.load(states[0])
        return
    # the Ray engine: each actor restores its snapshot with this memory in it
    snaps = engine._states()
    for snap, state in zip(snaps, states, strict=True):
        snap["scheme"] = state
    engine._get([a.restore.remote(engine.rounds, snap, engine.generation)
                 for a, snap in zip(engine.actors, snaps, strict=True)])
