"""The SGD baseline, the sheaf training loop, its checkpoints and the loss plot."""

import json
import os

import numpy as np
import pytest

import sheafdist.training as training
from sheafdist.engines.local import LocalEngine
from sheafdist.errors import DivergenceError
from sheafdist.model import MLP, forward, he_init, load_model, loss
from sheafdist.plots import loss_plot
from sheafdist.rules import Config
from sheafdist.sgd import gradients, sgd_train
from sheafdist.tasks import Dataset, make_task
from sheafdist.training import HISTORY_KEYS, load_checkpoint, train_sheaf

RTOL, ATOL = 1e-10, 1e-12  # golden/README.md: fixed-step states and weights
SCALAR_RTOL = 1e-9  # golden/README.md: losses
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def golden_npz(golden_dir, name):
    with np.load(golden_dir / f"{name}.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def model_at(g, step, output="identity"):
    return MLP(
        [g[f"W1_step{step}"], g[f"W2_step{step}"]],
        [g[f"b1_step{step}"], g[f"b2_step{step}"]],
        output,
    )


def data_of(g):
    return Dataset(g["X_train"], g["Y_train"], g["X_test"], g["Y_test"],
                   "identity", "golden")


def assert_weights(model, g, step):
    for layer in (1, 2):
        for name, mine in (("W", model.W[layer - 1]), ("b", model.b[layer - 1])):
            ref = g[f"{name}{layer}_step{step}"]
            assert np.allclose(mine, ref, rtol=RTOL, atol=ATOL), (
                f"{name}{layer} after {step} steps is off by "
                f"{np.max(np.abs(mine - ref)):.3g}"
            )


# ---------------------------------------------------------------- SGD baseline


def test_sgd_reproduces_golden_in_one_run(golden_dir):
    g = golden_npz(golden_dir, "sgd_paraboloid_short")
    snapshots = {}

    def keep(step, model, train, test):
        if step in (0, 1, 10, 2000):
            snapshots[step] = (model.copy(), train, test)

    trained, history = sgd_train(
        model_at(g, 0), g["X_train"], g["Y_train"], float(g["lr"]), 2000, 1,
        g["X_test"], g["Y_test"], callback=keep,
    )
    for step in (1, 10, 2000):
        assert_weights(snapshots[step][0], g, step)
    assert_weights(trained, g, 2000)
    steps = list(g["loss_steps"])
    train = [snapshots[s][1] for s in steps]
    test = [snapshots[s][2] for s in steps]
    np.testing.assert_allclose(train, g["train_mse"], rtol=SCALAR_RTOL)
    np.testing.assert_allclose(test, g["test_mse"], rtol=SCALAR_RTOL)
    assert history["step"] == list(range(2001))


def test_sgd_in_pieces_equals_one_run_and_logs_every_n(golden_dir):
    g = golden_npz(golden_dir, "sgd_paraboloid_short")
    model = model_at(g, 0)
    for done, more in ((0, 1), (1, 9)):
        model, history = sgd_train(model, g["X_train"], g["Y_train"], float(g["lr"]),
                                   more, 4)
        assert_weights(model, g, done + more)
    assert history["step"] == [0, 4, 8, 9]  # every 4th step and the last one
    assert all(np.isnan(history["test_loss"]))  # no test data given


@pytest.mark.parametrize(
    "output, n_out", [("identity", 2), ("sigmoid", 1), ("softmax", 3)]
)
def test_sgd_gradients_are_those_of_the_mean_loss(output, n_out):
    """Central differences of ``model.loss`` (MSE / BCE / CE) match the backprop."""
    rng = np.random.default_rng(3)
    model = he_init([3, 5, 4, n_out], rng, output)
    model.b = [rng.normal(size=b.shape) * 0.1 for b in model.b]
    x = rng.normal(size=(3, 7))
    if output == "identity":
        y = rng.normal(size=(n_out, 7))
    elif output == "sigmoid":
        y = rng.integers(0, 2, size=(1, 7)).astype(float)
    else:
        y = np.eye(n_out)[:, rng.integers(0, n_out, size=7)]
    dW, db = gradients(model, x, y)
    h = 1e-6
    for params, grads in ((model.W, dW), (model.b, db)):
        for p, grad in zip(params, grads, strict=True):
            for idx in np.ndindex(p.shape):
                old = p[idx]
                p[idx] = old + h
                up = loss(model, x, y)
                p[idx] = old - h
                down = loss(model, x, y)
                p[idx] = old
                assert grad[idx] == pytest.approx((up - down) / (2 * h), abs=1e-7)


# ---------------------------------------------------------------- sheaf training


def golden_training(golden_dir):
    g = golden_npz(golden_dir, "train_paraboloid_short")
    config = Config(alpha=float(g["alpha"]), dt=float(g["dt"]), beta=float(g["beta"]))
    init = {v: g[f"{v}_init"] for v in ("z1", "a1", "z2")}
    return g, config, init


def test_train_sheaf_reproduces_golden_2000_steps(golden_dir):
    g, config, init = golden_training(golden_dir)
    result = train_sheaf(model_at(g, 0), data_of(g), config, epochs=2,
                         steps_per_epoch=1000, engine="local", init=init)
    assert result.rounds == 2000
    assert_weights(result.model, g, 2000)
    for v in ("z1", "a1", "z2"):
        assert np.allclose(result.stalks[v], g[f"{v}_step2000"], rtol=RTOL, atol=ATOL)
    assert result.history["step"] == [0, 1000, 2000]
    # losses come from the forward pass with the current weights
    assert result.history["train_loss"][0] == pytest.approx(g["train_mse"][0],
                                                            rel=SCALAR_RTOL)
    assert result.history["train_loss"][-1] == pytest.approx(g["train_mse"][3],
                                                             rel=SCALAR_RTOL)
    assert result.history["test_loss"][-1] == pytest.approx(g["test_mse"][3],
                                                            rel=SCALAR_RTOL)


def test_warm_start_epochs_are_one_run(golden_dir):
    """Ten epochs of one step each pass the golden weights after 1 and 10 steps."""
    g, config, init = golden_training(golden_dir)
    seen = {}
    result = train_sheaf(
        model_at(g, 0), data_of(g), config, epochs=10, steps_per_epoch=1,
        init=init, on_epoch=lambda rec, model: seen.setdefault(rec.step, model),
    )
    assert_weights(seen[1], g, 1)
    assert_weights(seen[10], g, 10)
    for v in ("z1", "a1", "z2"):
        assert np.allclose(result.stalks[v], g[f"{v}_step10"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        [result.history["train_loss"][i] for i in (1, 10)],
        g["train_mse"][1:3], rtol=SCALAR_RTOL,
    )


class SpyEngine(LocalEngine):
    """The local engine, remembering the stalks each ``run`` starts from."""

    starts: list

    def run(self, rounds, tol=None, **kw):
        type(self).starts.append(self.stalks())
        return super().run(rounds, tol, **kw)


@pytest.fixture
def spy(monkeypatch):
    SpyEngine.starts = []
    monkeypatch.setattr(
        training, "make_engine", lambda name, problem, **kw: SpyEngine(problem, **kw)
    )
    return SpyEngine.starts


def small_classification():
    data = make_task("circular", seed=1, n_train=40, n_test=10)
    return he_init([2, 6, 1], 0, "sigmoid"), data


def test_classification_restarts_each_epoch_at_the_forward_pass(spy):
    model, data = small_classification()
    models = {}
    train_sheaf(
        model, data, Config(dt=0.005, beta=1 / 40), epochs=3, steps_per_epoch=25,
        init="random", seed=7, warm_start=False,
        on_epoch=lambda rec, m: models.setdefault(rec.epoch, m),
    )
    assert len(spy) == 3
    # the first epoch starts where init says (random), not at the forward pass
    first = forward(model, data.X_train)
    assert not np.allclose(spy[0]["z1"], first["z1"])
    for epoch in (2, 3):
        fwd = forward(models[epoch - 1], data.X_train)
        for v in ("z1", "a1", "z2"):
            np.testing.assert_array_equal(spy[epoch - 1][v], fwd[v])
    # and the weights did move between epochs, so the check has teeth
    assert np.max(np.abs(models[1].W[0] - models[2].W[0])) > 1e-8


def test_warm_start_carries_the_stalks(spy):
    model, data = small_classification()
    result = train_sheaf(model, data, Config(dt=0.005, beta=1 / 40), epochs=2,
                         steps_per_epoch=10, init="forward", warm_start=True)
    assert len(spy) == 2
    assert not np.allclose(spy[1]["z1"], forward(result.model, data.X_train)["z1"])
    assert not np.allclose(spy[1]["z1"], spy[0]["z1"])


def test_divergence_is_reported():
    data = make_task("paraboloid", seed=0, n_train=50, n_test=0)
    with pytest.raises(DivergenceError, match="dt"):
        train_sheaf(he_init([2, 8, 1], 0), data, Config(dt=0.005, beta=400.0),
                    epochs=4, steps_per_epoch=100)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_holds_every_key_and_loads_without_pickle(tmp_path, golden_dir):
    g, config, init = golden_training(golden_dir)
    result = train_sheaf(model_at(g, 0), data_of(g), config, epochs=2,
                         steps_per_epoch=20, init=init, checkpoint_dir=str(tmp_path),
                         run_info={"task": "golden"})
    path = tmp_path / "checkpoint.npz"
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    expected = {"W1", "W2", "b1", "b2", "output", "round", "epoch", "config"}
    expected |= {f"stalk_{v}" for v in ("a0", "z1", "a1", "z2")}
    expected |= {f"history_{k}" for k in HISTORY_KEYS}
    # the starting weights (the SGD baseline of a resumed run starts there) and
    # the scheme's memory of the one block (Euler: an empty map)
    expected |= {"init_W1", "init_W2", "init_b1", "init_b2", "scheme.0.{}"}
    assert set(arrays) == expected
    np.testing.assert_array_equal(arrays["init_W1"], g["W1_step0"])
    assert str(arrays["output"]) == "identity"
    assert int(arrays["round"]) == 40 and int(arrays["epoch"]) == 2
    for layer in (1, 2):
        np.testing.assert_array_equal(arrays[f"W{layer}"], result.model.W[layer - 1])
    for v in ("a0", "z1", "a1", "z2"):
        np.testing.assert_array_equal(arrays[f"stalk_{v}"], result.stalks[v])
    np.testing.assert_array_equal(arrays["history_step"], [0, 20, 40])
    np.testing.assert_array_equal(arrays["history_train_loss"],
                                  result.history["train_loss"])
    settings = json.loads(str(arrays["config"]))
    assert settings["dt"] == config.dt and settings["beta"] == config.beta
    assert settings["task"] == "golden" and settings["init"] == "state"

    latest = load_model(str(tmp_path / "model.npz"))
    np.testing.assert_array_equal(latest.W[1], result.model.W[1])
    back = load_checkpoint(str(path))
    assert back["epoch"] == 2 and back["history"]["step"] == [0, 20, 40]
    assert set(back["stalks"]) == {"a0", "z1", "a1", "z2"}
    assert back["scheme"] == [{}] and back["sgd"] is None
    # the checkpoint of epoch 1 is kept whole beside the latest
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "checkpoint.prev.npz",
                                            "model.npz"]
    assert load_checkpoint(str(tmp_path / "checkpoint.prev.npz"))["round"] == 20


def test_a_crash_while_writing_leaves_the_last_checkpoint_whole(
    tmp_path, golden_dir, monkeypatch
):
    g, config, init = golden_training(golden_dir)
    real_savez, calls = np.savez, []

    def failing_savez(file, **arrays):
        calls.append(sorted(arrays))
        if len(calls) == 3:  # epoch 1 wrote checkpoint and model; epoch 2 fails
            file.write(b"half a file")
            raise OSError("disk full")
        real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        train_sheaf(model_at(g, 0), data_of(g), config, epochs=3, steps_per_epoch=5,
                    init=init, checkpoint_dir=str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "checkpoint.prev.npz",
                                            "model.npz"]
    back = load_checkpoint(str(tmp_path / "checkpoint.npz"))
    assert back["epoch"] == 1 and back["round"] == 5


# ---------------------------------------------------------------- plot


def test_loss_plot_writes_a_png(tmp_path):
    sheaf = {"step": [0, 10, 20], "train_loss": [3.0, 1.0, 0.5],
             "test_loss": [3.5, 1.2, float("nan")]}
    sgd = {"step": [0, 10, 20], "train_loss": [3.0, 0.3, 0.1],
           "test_loss": [3.5, 0.4, 0.2]}
    for name, other in (("both.png", sgd), ("sheaf.png", None)):
        path = tmp_path / "out" / name
        assert loss_plot(sheaf, other, str(path), "paraboloid") == str(path)
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 1000
    assert sorted(os.listdir(tmp_path / "out")) == ["both.png", "sheaf.png"]
