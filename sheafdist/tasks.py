"""The paper's four synthetic 2-D tasks, their training settings, and ``--data`` files.

Each task draws ``n_train + n_test`` points from ``numpy.random.default_rng(seed)``
(never global state) and splits them in that order, so one seed fixes both sets.
Arrays are ``(dim, batch)`` float64: ``X`` is ``(2, n)`` and ``Y`` is ``(n_out, n)``.
The generators and the settings in ``TASKS`` follow paper.md sections 7.1 and 5.3,
which take them from the authors' ``datasets.py`` and ``TASK_CONFIGS``. The RNG is
numpy's, not torch's, so the points differ from the authors' while the distributions
agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from .errors import InputError
from .files import atomic_savez, check_magnitude, read_npz, real_array
from .memory import DATA_COPIES, FLOAT, check_fits
from .model import OUTPUTS

__all__ = [
    "BLOB_CENTRES",
    "BLOB_COVARIANCES",
    "NOISE_STD",
    "TASKS",
    "Dataset",
    "TaskConfig",
    "load_data",
    "make_task",
    "save_data",
]

NOISE_STD = 0.02  # regression target noise
RADIUS_NOISE_STD = 0.1  # circular: jitter of each radius

BLOB_CENTRES = np.array([[-1.5, -1.5], [1.8, -1.0], [1.0, 2.0], [-2.0, 1.5]])
# the overlap between blobs is deliberate (paper.md 7.1): the task is not separable
BLOB_COVARIANCES = np.array(
    [
        [[0.8, 0.3], [0.3, 0.4]],
        [[0.3, -0.2], [-0.2, 1.0]],
        [[1.2, 0.5], [0.5, 0.5]],
        [[0.5, 0.0], [0.0, 0.8]],
    ]
)


@dataclass
class Dataset:
    """Training (and optionally test) examples, one column per example.

    ``X_train`` is ``(n0, n_train)``, ``Y_train`` is ``(nK, n_train)``; the test pair
    is either both arrays with the same row counts or both ``None``. ``output`` is
    the network output the targets are meant for: ``identity`` (real targets),
    ``sigmoid`` (one row in {0, 1}) or ``softmax`` (one-hot columns).
    """

    X_train: np.ndarray
    Y_train: np.ndarray
    X_test: np.ndarray | None
    Y_test: np.ndarray | None
    output: str
    name: str

    @property
    def n_train(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_in(self) -> int:
        return self.X_train.shape[0]

    @property
    def n_out(self) -> int:
        return self.Y_train.shape[0]


@dataclass(frozen=True)
class TaskConfig:
    """The paper's settings for one task (paper.md 5.3, ``TASK_CONFIGS`` in [CODE]).

    ``1h``/``2h`` are the one- and two-hidden-layer versions. Stalks move at rate
    ``alpha``, weights at ``beta = 1/n_train`` (their force is a sum over the batch).
    Training runs ``epochs * steps_per_epoch`` joint Euler steps of size ``dt``.
    ``init`` is the stalk initialisation: ``random`` (N(0, 1), carried across epochs
    when ``warm_start``) or ``forward`` (the current forward pass, redone every epoch).
    ``sgd_lr`` is the step of the full-batch gradient-descent baseline.
    """

    name: str
    arch_1h: tuple[int, ...]
    arch_2h: tuple[int, ...]
    output: str
    init: str
    warm_start: bool
    sgd_lr: float
    alpha: float = 1.0
    beta: float = 1.0 / 300  # 1 / n_train for the default n_train = 300
    dt_1h: float = 0.005
    dt_2h: float = 0.01
    epochs_1h: int = 100
    epochs_2h: int = 200
    steps_per_epoch: int = 1000

    @property
    def steps_1h(self) -> int:
        return self.epochs_1h * self.steps_per_epoch

    @property
    def steps_2h(self) -> int:
        return self.epochs_2h * self.steps_per_epoch


def _regression(name: str) -> TaskConfig:
    return TaskConfig(
        name=name,
        arch_1h=(2, 30, 1),
        arch_2h=(2, 10, 8, 1),
        output="identity",
        init="random",
        warm_start=True,
        sgd_lr=0.005,
    )


def _classification(name: str, output: str, n_classes: int) -> TaskConfig:
    return TaskConfig(
        name=name,
        arch_1h=(2, 25, n_classes),
        arch_2h=(2, 10, 8, n_classes),
        output=output,
        init="forward",
        warm_start=False,
        sgd_lr=0.01,
    )


TASKS: MappingProxyType[str, TaskConfig] = MappingProxyType(
    {
        "paraboloid": _regression("paraboloid"),
        "saddle": _regression("saddle"),
        "circular": _classification("circular", "sigmoid", 1),
        "blobs": _classification("blobs", "softmax", 4),
    }
)


# ---------------------------------------------------------------- generators


def paraboloid(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``y = x1^2 + x2^2 - 2/3 + eps`` with x ~ U([-2, 2]^2), eps ~ N(0, 0.02^2).

    The shift -2/3 is [CODE]'s; it does not centre the targets (their mean is 2).
    """
    X = rng.uniform(-2.0, 2.0, size=(2, n))
    f = X[0] ** 2 + X[1] ** 2 - 2.0 / 3.0
    return X, (f + NOISE_STD * rng.standard_normal(n))[None, :]


def saddle(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``y = x1^2 - x2^2 + 0.5 sin(2 x1) + eps`` with x ~ U([0, 2]^2), eps as above."""
    X = rng.uniform(0.0, 2.0, size=(2, n))
    f = X[0] ** 2 - X[1] ** 2 + 0.5 * np.sin(2.0 * X[0])
    return X, (f + NOISE_STD * rng.standard_normal(n))[None, :]


def circular(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A disc (class 0) inside an annulus (class 1), half the points each.

    Radii: class 0 ``r = sqrt(U) + N(0, 0.1^2)``, class 1
    ``r = sqrt(1.5^2 + U (2.5^2 - 1.5^2)) + N(0, 0.1^2)`` with U ~ U[0, 1]; the
    square root makes each class uniform in area over its disc or annulus. The angle
    is U[0, 2 pi) and ``x = r (cos theta, sin theta)``. Labels are ``(1, n)``.
    """
    n0 = n // 2
    n1 = n - n0  # an odd n gives class 1 the extra point
    r0 = np.sqrt(rng.uniform(size=n0)) + RADIUS_NOISE_STD * rng.standard_normal(n0)
    r1 = np.sqrt(1.5**2 + rng.uniform(size=n1) * (2.5**2 - 1.5**2))
    r1 = r1 + RADIUS_NOISE_STD * rng.standard_normal(n1)
    r = np.concatenate([r0, r1])
    theta = rng.uniform(0.0, 2.0 * np.pi, size=n)
    X = np.stack([r * np.cos(theta), r * np.sin(theta)])
    Y = np.concatenate([np.zeros(n0), np.ones(n1)])[None, :]
    return _shuffle(rng, X, Y)


def blobs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian blobs ``x = mu_c + L_c z``, ``L_c L_c^T = Sigma_c``, z ~ N(0, I).

    Class c gets ``n // 4`` points (one more for the first ``n % 4`` classes), so the
    paper's 300 + 100 gives 100 each. Labels are one-hot, ``(4, n)``.
    """
    counts = [n // 4 + (c < n % 4) for c in range(4)]
    X, labels = [], []
    for c, m in enumerate(counts):
        L = np.linalg.cholesky(BLOB_COVARIANCES[c])
        X.append(BLOB_CENTRES[c][:, None] + L @ rng.standard_normal((2, m)))
        labels.append(np.full(m, c))
    Y = np.eye(4)[:, np.concatenate(labels)]
    return _shuffle(rng, np.concatenate(X, axis=1), Y)


def _shuffle(rng, X, Y):
    """Permute the columns, so that classes are interleaved before the split."""
    perm = rng.permutation(X.shape[1])
    return X[:, perm], Y[:, perm]


_GENERATORS: dict[str, Callable] = {
    "paraboloid": paraboloid,
    "saddle": saddle,
    "circular": circular,
    "blobs": blobs,
}


def make_task(
    name: str,
    seed: int | np.random.Generator = 42,
    n_train: int = 300,
    n_test: int = 100,
) -> Dataset:
    """Draw a task; the first ``n_train`` columns are the training set, the rest test.

    ``n_test = 0`` gives a dataset without a test set (``X_test is None``).
    """
    if name not in _GENERATORS:
        raise InputError(
            "--task", repr(name), "use one of paraboloid, saddle, circular, blobs"
        )
    _check_count("n_train", n_train, minimum=1)
    _check_count("n_test", n_test, minimum=0)
    arch, n = TASKS[name].arch_1h, n_train + n_test
    check_fits("--n-test" if n_test > n_train else "--n-train",
               f"{n_train} training and {n_test} test examples of {name}",
               FLOAT * DATA_COPIES * (arch[0] + arch[-1]) * n, "give fewer")
    rng = np.random.default_rng(seed)
    X, Y = _GENERATORS[name](rng, n_train + n_test)
    test = (X[:, n_train:], Y[:, n_train:]) if n_test else (None, None)
    return Dataset(X[:, :n_train], Y[:, :n_train], *test, TASKS[name].output, name)


def _check_count(arg: str, value: object, minimum: int) -> None:
    # bool is an int subclass; True would silently mean one example
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(arg, repr(value), f"give an integer >= {minimum}")
    if value < minimum:
        raise InputError(arg, value, f"give an integer >= {minimum}")


# ---------------------------------------------------------------- --data files


def load_data(path: str, output: str = "identity") -> Dataset:
    """Read ``X_train`` (n0, n), ``Y_train`` (nK, n) and maybe a test pair from an .npz.

    Opened with ``allow_pickle=False``. Every problem with the file raises an
    ``InputError`` naming ``--data`` (or ``--output`` for an unknown output), so
    the CLI prints one line and exits with code 2.
    """
    if output not in OUTPUTS:
        raise InputError("--output", repr(output), f"use one of {', '.join(OUTPUTS)}")
    data = read_npz(path, "--data")
    for key in ("X_train", "Y_train"):
        if key not in data:
            raise InputError(
                "--data",
                f"{path} with keys {sorted(data)}",
                "it needs X_train (n0, n) and Y_train (nK, n), one column per example",
            )
    if ("X_test" in data) != ("Y_test" in data):
        raise InputError(
            "--data",
            f"{path} with keys {sorted(data)}",
            "give both X_test and Y_test, or neither",
        )
    keys = [k for k in ("X_train", "Y_train", "X_test", "Y_test") if k in data]
    arrays = {k: _as_matrix(path, k, data[k]) for k in keys}
    _check_shapes(path, arrays)
    _check_targets(path, arrays, output)
    if "X_test" in arrays and arrays["X_test"].shape[1] == 0:
        # a test pair without examples is no test set, as with --n-test 0
        del arrays["X_test"], arrays["Y_test"]
    return Dataset(
        arrays["X_train"],
        arrays["Y_train"],
        arrays.get("X_test"),
        arrays.get("Y_test"),
        output,
        str(path),
    )


def save_data(dataset: Dataset, path: str) -> None:
    """Write a dataset as a ``--data`` file (atomically; no strings, no pickle)."""
    arrays = {"X_train": dataset.X_train, "Y_train": dataset.Y_train}
    if dataset.X_test is not None:
        arrays |= {"X_test": dataset.X_test, "Y_test": dataset.Y_test}
    atomic_savez(path, arrays)


def _as_matrix(path: str, key: str, value: np.ndarray) -> np.ndarray:
    """A finite real 2-D float64 copy of ``value``."""
    # a float64 copy; strings and complex numbers are refused
    value = real_array(value, "--data", key, f" in {path}")
    if value.ndim != 2:
        raise InputError(
            "--data",
            f"{key} of shape {value.shape} in {path}",
            "store it 2-D as (dim, n), one column per example",
        )
    if not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise InputError(
            "--data", f"{key} with {bad} NaN or inf entries in {path}", "remove them"
        )
    check_magnitude(value, "--data", f"{key} in {path}", "scale them down")
    return value


def _check_shapes(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Columns agree within each pair; rows agree between train and test."""

    def shape(k):
        return f"{k} {arrays[k].shape}"

    for k in arrays:
        if arrays[k].shape[0] == 0:
            raise InputError("--data", f"{shape(k)} in {path}", "give at least one row")
    if arrays["X_train"].shape[1] == 0:
        raise InputError("--data", f"{shape('X_train')} in {path}", "give examples")
    pairs = [("X_train", "Y_train")]
    if "X_test" in arrays:
        pairs += [("X_test", "Y_test")]
    for x, y in pairs:
        if arrays[x].shape[1] != arrays[y].shape[1]:
            raise InputError(
                "--data",
                f"{shape(x)} and {shape(y)} in {path}",
                f"{x} and {y} need one column per example, the same count",
            )
    for a, b in [("X_train", "X_test"), ("Y_train", "Y_test")]:
        if b in arrays and arrays[a].shape[0] != arrays[b].shape[0]:
            raise InputError(
                "--data",
                f"{shape(a)} and {shape(b)} in {path}",
                f"{b} needs the same number of rows as {a}",
            )


def _check_targets(path: str, arrays: dict[str, np.ndarray], output: str) -> None:
    """Cross-entropy needs labels: one row in [0, 1], or columns on the simplex."""
    if output == "identity":
        return
    for key in ("Y_train", "Y_test"):
        Y = arrays.get(key)
        if Y is None or Y.size == 0:
            continue
        if output == "sigmoid":
            ok, want = Y.shape[0] == 1 and Y.min() >= 0 and Y.max() <= 1, "one row"
        else:
            ok = Y.shape[0] >= 2 and Y.min() >= 0
            ok = ok and bool(np.allclose(Y.sum(axis=0), 1.0, atol=1e-9))
            want = "two or more rows, columns summing to 1 (one-hot)"
        if not ok:
            raise InputError(
                "--data",
                f"{key} {Y.shape} with values in [{Y.min():g}, {Y.max():g}] in {path}",
                f"--output {output} needs labels in [0, 1], {want}",
            )
