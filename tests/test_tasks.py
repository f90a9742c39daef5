"""The synthetic tasks of paper.md 7.1, their settings (5.3) and ``--data`` files."""

import numpy as np
import pytest

from sheafdist.errors import InputError
from sheafdist.tasks import (
    TASKS,
    Dataset,
    load_data,
    make_task,
    save_data,
)

NAMES = ["paraboloid", "saddle", "circular", "blobs"]
N_OUT = {"paraboloid": 1, "saddle": 1, "circular": 1, "blobs": 4}

# paper.md 7.1, written out here rather than imported, so a typo in tasks.py fails
NOISE_STD = 0.02
BLOB_CENTRES = np.array([[-1.5, -1.5], [1.8, -1.0], [1.0, 2.0], [-2.0, 1.5]])
BLOB_COVARIANCES = np.array(
    [
        [[0.8, 0.3], [0.3, 0.4]],
        [[0.3, -0.2], [-0.2, 1.0]],
        [[1.2, 0.5], [0.5, 0.5]],
        [[0.5, 0.0], [0.0, 0.8]],
    ]
)


def all_arrays(d: Dataset) -> list[np.ndarray]:
    return [d.X_train, d.Y_train, d.X_test, d.Y_test]


def pooled(d: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Train and test side by side: the n_train + n_test points drawn together."""
    return np.hstack([d.X_train, d.X_test]), np.hstack([d.Y_train, d.Y_test])


# ---------------------------------------------------------------- shapes, seeds


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtype_and_output(name):
    d = make_task(name)
    k = N_OUT[name]
    assert d.X_train.shape == (2, 300) and d.Y_train.shape == (k, 300)
    assert d.X_test.shape == (2, 100) and d.Y_test.shape == (k, 100)
    assert all(a.dtype == np.float64 for a in all_arrays(d))
    assert all(np.all(np.isfinite(a)) for a in all_arrays(d))
    assert d.output == TASKS[name].output and d.name == name
    assert (d.n_in, d.n_out, d.n_train) == (2, k, 300)


@pytest.mark.parametrize("name", NAMES)
def test_sizes_are_honoured(name):
    d = make_task(name, seed=3, n_train=37, n_test=11)
    assert d.X_train.shape[1] == d.Y_train.shape[1] == 37
    assert d.X_test.shape[1] == d.Y_test.shape[1] == 11
    no_test = make_task(name, n_test=0)
    assert no_test.X_test is None and no_test.Y_test is None


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_arrays(name):
    a, b = make_task(name, seed=7), make_task(name, seed=7)
    for x, y in zip(all_arrays(a), all_arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_different_seed_different_arrays(name):
    a, b = make_task(name, seed=7), make_task(name, seed=8)
    assert not np.array_equal(a.X_train, b.X_train)
    assert not np.array_equal(a.X_test, b.X_test)


def test_global_numpy_state_is_neither_used_nor_touched():
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    a = make_task("blobs")
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.random.seed(12345)
    np.testing.assert_array_equal(make_task("blobs").X_train, a.X_train)


def test_generator_accepted_as_seed():
    a = make_task("saddle", seed=np.random.default_rng(5))
    np.testing.assert_array_equal(a.X_train, make_task("saddle", seed=5).X_train)


def test_train_and_test_are_disjoint_draws():
    d = make_task("paraboloid")
    X = pooled(d)[0]
    assert np.unique(X, axis=1).shape[1] == 400


# ---------------------------------------------------------------- regression


def test_paraboloid_matches_formula_within_noise():
    X, Y = pooled(make_task("paraboloid"))
    assert X.min() >= -2 and X.max() <= 2
    # the draws must fill the square, not a corner of it
    assert X.min(axis=1).max() < -1.9 and X.max(axis=1).min() > 1.9
    f = X[0] ** 2 + X[1] ** 2 - 2 / 3
    residual = Y[0] - f
    assert np.abs(residual).max() < 5 * NOISE_STD
    # noise present, with the stated spread (400 draws: std within about 15%)
    assert 0.8 * NOISE_STD < residual.std() < 1.2 * NOISE_STD
    assert abs(residual.mean()) < 3 * NOISE_STD / np.sqrt(400) + 1e-3


def test_saddle_matches_formula_within_noise():
    X, Y = pooled(make_task("saddle"))
    assert X.min() >= 0 and X.max() <= 2
    assert X.min(axis=1).max() < 0.1 and X.max(axis=1).min() > 1.9
    f = X[0] ** 2 - X[1] ** 2 + 0.5 * np.sin(2 * X[0])
    residual = Y[0] - f
    assert np.abs(residual).max() < 5 * NOISE_STD
    assert 0.8 * NOISE_STD < residual.std() < 1.2 * NOISE_STD


# ---------------------------------------------------------------- classification


def test_circular_classes_radii_and_balance():
    X, Y = pooled(make_task("circular"))
    assert set(np.unique(Y)) == {0.0, 1.0}
    assert Y.sum() == 200  # 400 points, equal classes
    r = np.hypot(X[0], X[1])
    inner, outer = r[Y[0] == 0], r[Y[0] == 1]
    # sqrt(U) lies in [0, 1] and the annulus radius in [1.5, 2.5]; jitter has std 0.1
    assert inner.max() < 1 + 5 * 0.1 and outer.min() > 1.5 - 5 * 0.1
    assert outer.max() < 2.5 + 5 * 0.1
    # angles cover the circle: every quadrant holds points of both classes
    quadrant = (X[0] > 0) * 2 + (X[1] > 0)
    for c in (0, 1):
        assert set(quadrant[Y[0] == c]) == {0, 1, 2, 3}


def test_circular_radii_are_uniform_in_area():
    d = make_task("circular", n_train=4000, n_test=0)
    r, y = np.hypot(*d.X_train), d.Y_train[0]
    # E sqrt(U) = 2/3; E sqrt(1.5^2 + 4U) = (2.5^3 - 1.5^3) / 6; standard errors of
    # the means are below 0.01 with 2000 points a class, the margin is over 4 of them
    assert r[y == 0].mean() == pytest.approx(2 / 3, abs=0.04)
    assert r[y == 1].mean() == pytest.approx((2.5**3 - 1.5**3) / 6, abs=0.04)
    # the jitter N(0, 0.1^2) is there: some inner radii exceed 1
    assert 0 < np.mean(r[y == 0] > 1) < 0.2


def test_circular_is_shuffled():
    Y = make_task("circular").Y_train[0]
    # unshuffled, the first half would be all zeros; shuffled, both halves mix
    assert 0.3 < Y[:150].mean() < 0.7 and 0.3 < Y[150:].mean() < 0.7


def test_blobs_one_hot_and_balanced():
    Y = pooled(make_task("blobs"))[1]
    assert set(np.unique(Y)) == {0.0, 1.0}
    np.testing.assert_array_equal(Y.sum(axis=0), np.ones(400))
    np.testing.assert_array_equal(Y.sum(axis=1), [100, 100, 100, 100])
    labels = Y.argmax(axis=0)
    assert 0 < labels[:200].mean() < 3  # classes interleaved, not in blocks


def test_blobs_follow_their_gaussians():
    d = make_task("blobs", n_train=4000, n_test=0)
    labels = d.Y_train.argmax(axis=0)
    for c in range(4):
        pts = d.X_train[:, labels == c]  # 1000 points
        # the mean within 4.5 standard errors of the centre; the covariance entries
        # have standard errors below 0.06 here, so 0.2 is over 3 of them
        se = np.sqrt(np.diag(BLOB_COVARIANCES[c]) / 1000)
        assert np.all(np.abs(pts.mean(axis=1) - BLOB_CENTRES[c]) < 4.5 * se)
        np.testing.assert_allclose(np.cov(pts), BLOB_COVARIANCES[c], atol=0.2)


def test_blobs_uneven_count_spreads_remainder():
    d = make_task("blobs", n_train=10, n_test=3)
    counts = np.hstack([d.Y_train, d.Y_test]).sum(axis=1)
    np.testing.assert_array_equal(counts, [4, 3, 3, 3])


# ---------------------------------------------------------------- settings


def test_task_table_matches_paper_5_3():
    assert set(TASKS) == set(NAMES)
    for name, cfg in TASKS.items():
        k = N_OUT[name]
        regression = name in ("paraboloid", "saddle")
        hidden_1h = 30 if regression else 25
        assert cfg.arch_1h == (2, hidden_1h, k) and cfg.arch_2h == (2, 10, 8, k)
        assert (cfg.alpha, cfg.beta) == (1.0, 1 / 300)
        assert (cfg.dt_1h, cfg.dt_2h) == (0.005, 0.01)
        assert (cfg.steps_1h, cfg.steps_2h) == (100_000, 200_000)
        assert cfg.init == ("random" if regression else "forward")
        assert cfg.warm_start is regression
        assert cfg.sgd_lr == (0.005 if regression else 0.01)
    outputs = {n: c.output for n, c in TASKS.items()}
    assert outputs == {
        "paraboloid": "identity",
        "saddle": "identity",
        "circular": "sigmoid",
        "blobs": "softmax",
    }


def test_task_table_is_read_only():
    with pytest.raises(TypeError):
        TASKS["moons"] = TASKS["blobs"]


# ---------------------------------------------------------------- bad task input


def test_unknown_task_names_the_flag_and_choices():
    with pytest.raises(InputError) as err:
        make_task("moons")
    msg = str(err.value)
    assert err.value.arg == "--task" and "'moons'" in msg
    assert "paraboloid, saddle, circular, blobs" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "kwargs", [{"n_train": 0}, {"n_test": -1}, {"n_train": 2.5}, {"n_train": True}]
)
def test_bad_sizes_raise(kwargs):
    with pytest.raises(InputError):
        make_task("paraboloid", **kwargs)


# ---------------------------------------------------------------- --data files


def test_load_data_round_trip(tmp_path):
    d = make_task("blobs")
    path = tmp_path / "blobs.npz"
    np.savez(path, X_train=d.X_train, Y_train=d.Y_train, X_test=d.X_test,
             Y_test=d.Y_test)  # fmt: skip
    back = load_data(str(path), output="softmax")
    for x, y in zip(all_arrays(back), all_arrays(d), strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == np.float64
    assert back.output == "softmax"


def test_load_data_defaults_to_identity_and_optional_test(tmp_path):
    path = tmp_path / "train_only.npz"
    X = np.arange(6, dtype=np.int64).reshape(2, 3)  # integers are read as float64
    np.savez(path, X_train=X, Y_train=np.ones((1, 3)))
    d = load_data(str(path))
    assert d.output == "identity" and d.X_test is None and d.Y_test is None
    assert d.X_train.dtype == np.float64
    np.testing.assert_array_equal(d.X_train, X)


def test_save_data_round_trip(tmp_path):
    d = make_task("circular")
    path = str(tmp_path / "circ.npz")
    save_data(d, path)
    back = load_data(path, output="sigmoid")
    for x, y in zip(all_arrays(back), all_arrays(d), strict=True):
        np.testing.assert_array_equal(x, y)


X2, Y1 = np.zeros((2, 5)), np.zeros((1, 5))
NAN_X = np.array([[0.0, np.nan, 1, 2, 3], [0, 1, 2, 3, 4]])
INF_Y = np.array([[0.0, 1, np.inf, 3, 4]])
BAD_ARRAYS = {
    "missing Y_train": {"X_train": X2},
    "missing X_train": {"Y_train": Y1},
    "X_test without Y_test": {"X_train": X2, "Y_train": Y1, "X_test": X2},
    "1-D X_train": {"X_train": np.zeros(5), "Y_train": Y1},
    "3-D Y_train": {"X_train": X2, "Y_train": np.zeros((1, 5, 1))},
    "columns disagree": {"X_train": X2, "Y_train": np.zeros((1, 4))},
    "test columns disagree": {
        "X_train": X2, "Y_train": Y1, "X_test": X2, "Y_test": np.zeros((1, 3)),
    },
    "test rows disagree": {
        "X_train": X2, "Y_train": Y1, "X_test": np.zeros((3, 5)), "Y_test": Y1,
    },
    "no examples": {"X_train": np.zeros((2, 0)), "Y_train": np.zeros((1, 0))},
    "NaN in X_train": {"X_train": NAN_X, "Y_train": Y1},
    "inf in Y_train": {"X_train": X2, "Y_train": INF_Y},
    "NaN in Y_test": {
        "X_train": X2, "Y_train": Y1, "X_test": X2, "Y_test": INF_Y * np.nan,
    },
    "strings": {"X_train": np.array([["a", "b"]]), "Y_train": np.zeros((1, 2))},
    "complex": {"X_train": X2 + 1j, "Y_train": Y1},
}  # fmt: skip


def assert_one_line_data_error(err, *fragments):
    msg = str(err.value)
    assert err.value.arg == "--data" and msg.startswith("--data: got ")
    assert "\n" not in msg and err.value.exit_code == 2
    for fragment in fragments:
        assert fragment in msg


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_arrays_raise_input_error_naming_data(tmp_path, case):
    path = tmp_path / "bad.npz"
    np.savez(path, **BAD_ARRAYS[case])
    with pytest.raises(InputError) as err:
        load_data(str(path))
    assert_one_line_data_error(err, str(path))


def test_messages_say_what_arrived(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, X_train=X2, Y_train=np.zeros((1, 4)))
    with pytest.raises(InputError) as err:
        load_data(str(path))
    assert_one_line_data_error(err, "(2, 5)", "(1, 4)")
    np.savez(path, X_train=NAN_X, Y_train=Y1)
    with pytest.raises(InputError) as err:
        load_data(str(path))
    assert_one_line_data_error(err, "X_train", "NaN")


def write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p / "missing.npz",
        lambda p: write_bytes(p / "empty.npz", b""),
        lambda p: write_bytes(p / "junk.npz", b"not a zip archive at all"),
        lambda p: (p / "dir.npz").mkdir() or p / "dir.npz",
    ],
    ids=["missing", "empty", "junk", "directory"],
)
def test_unreadable_files_raise_input_error_naming_data(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        load_data(str(path))
    assert_one_line_data_error(err, str(path))
    assert "allow_pickle=True" not in str(err.value)


def test_npy_and_truncated_files_raise(tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, X2)
    with pytest.raises(InputError) as err:
        load_data(str(npy))
    assert_one_line_data_error(err, str(npy))
    whole = tmp_path / "whole.npz"
    np.savez(whole, X_train=X2, Y_train=Y1)
    cut = write_bytes(tmp_path / "cut.npz", whole.read_bytes()[:-40])
    with pytest.raises(InputError) as err:
        load_data(str(cut))
    assert_one_line_data_error(err, str(cut))


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, X_train=np.array([object()] * 2, dtype=object), Y_train=Y1)
    with pytest.raises(InputError) as err:
        load_data(str(path))
    assert_one_line_data_error(err, str(path))


@pytest.mark.parametrize(
    ("output", "Y"),
    [
        ("sigmoid", np.array([[0.0, 2.0, 1.0, 0.0, 1.0]])),
        ("sigmoid", np.zeros((2, 5))),
        ("softmax", np.zeros((1, 5))),
        ("softmax", np.full((2, 5), 0.7)),
    ],
)
def test_labels_must_suit_cross_entropy(tmp_path, output, Y):
    path = tmp_path / "labels.npz"
    np.savez(path, X_train=X2, Y_train=Y)
    with pytest.raises(InputError) as err:
        load_data(str(path), output=output)
    assert_one_line_data_error(err, output)


def test_unknown_output_names_output(tmp_path):
    path = tmp_path / "ok.npz"
    np.savez(path, X_train=X2, Y_train=Y1)
    with pytest.raises(InputError) as err:
        load_data(str(path), output="tanh")
    assert err.value.arg == "--output" and "'tanh'" in str(err.value)
