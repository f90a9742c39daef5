"""Numerical faults (issue 7, part 3): divergence is reported with the stable
bound of the current pattern, NaN or inf input is refused, and no NaN reaches a
file unannounced."""

import json

import numpy as np
import pytest

from sheafdist.cli import main
from sheafdist.errors import DivergenceError
from sheafdist.model import MLP, he_init
from sheafdist.rules import Config
from sheafdist.sheaf import stable_step
from sheafdist.tasks import make_task, save_data
from sheafdist.training import save_checkpoint, train_sheaf


def training_bound(model, x) -> float:
    identity = MLP(model.W, model.b, "identity")
    return 2.0 / (2.0 / stable_step(identity, x, 1.0) + 1.0)  # + the label pull


def test_training_divergence_names_the_bound_of_the_current_weights():
    data = make_task("paraboloid", seed=0, n_train=40, n_test=0)
    model = he_init([2, 8, 1], 0)
    # epoch 1 is stable and moves the weights; then dt jumps far above the bound
    first = train_sheaf(model, data, Config(dt=0.005, beta=1 / 40), epochs=1,
                        steps_per_epoch=200)
    bound = training_bound(first.model, data.X_train)
    assert abs(bound - training_bound(model, data.X_train)) > 1e-6  # it moved
    resume = {"model": first.model, "stalks": first.stalks, "round": 200,
              "history": first.history, "config": {}, "initial": model,
              "scheme": [], "trusted": False}
    with pytest.raises(DivergenceError) as info:
        train_sheaf(model, data, Config(dt=3 * bound, beta=1 / 40), epochs=2,
                    steps_per_epoch=200, resume=resume)
    text = str(info.value)
    assert text.startswith("--dt: the scheme diverged at round ")
    assert info.value.round > 200  # counted from the start of the run
    assert f"2/lambda_max = {bound:.4g}" in text
    assert "current weights" in text


@pytest.mark.parametrize("where", ["X_train", "Y_train", "X_test"])
def test_train_refuses_nan_or_inf_data(capsys, tmp_path, where):
    data = make_task("paraboloid", 1, 20, 5)
    getattr(data, where)[0, 3] = np.inf if where == "X_test" else np.nan
    path = tmp_path / "d.npz"
    save_data(data, str(path))
    code = main(["train", "--data", str(path), "--engine", "local", "--epochs",
                 "1", "--steps-per-epoch", "2", "--no-checkpoint"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--data" in err and where in err


def test_train_refuses_a_model_or_state_with_nan(capsys, tmp_path):
    model = he_init([2, 30, 1], 0)
    model.W[1][0, 0] = np.nan
    np.savez(tmp_path / "m.npz", **model.params(), output=np.array("identity"))
    code = main(["train", "--model", str(tmp_path / "m.npz"), "--engine", "local",
                 "--no-checkpoint"])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "got W2 with NaN or inf" in err

    state = {v: np.zeros((n, 300)) for v, n in (("z1", 30), ("a1", 30), ("z2", 1))}
    state["a1"][2, 7] = np.inf
    np.savez(tmp_path / "s.npz", **state)
    code = main(["train", "--init", str(tmp_path / "s.npz"), "--engine", "local",
                 "--no-checkpoint"])
    err = capsys.readouterr().err
    assert code == 2 and "--init: got a1 with NaN or inf" in err


def test_a_checkpoint_with_nan_is_never_written(tmp_path):
    model = he_init([2, 4, 1], 0)
    stalks = {"a0": np.zeros((2, 3)), "z1": np.zeros((4, 3)),
              "a1": np.zeros((4, 3)), "z2": np.full((1, 3), np.nan)}
    history = {k: [0] for k in ("epoch", "step", "train_loss", "test_loss",
                                "seconds")}
    with pytest.raises(DivergenceError, match="z2 holds NaN or inf at round 7"):
        save_checkpoint(str(tmp_path), model, stalks, 7, 0, history, {})
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_sgd_baseline_is_announced(capsys, tmp_path):
    code = main(["train", "--engine", "local", "--epochs", "1", "--steps-per-epoch",
                 "50", "--sgd-lr", "1000", "--no-checkpoint", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "baseline: SGD diverged" in err and "--sgd-lr" in err
    assert '"train_loss": null' in out and "NaN" not in out


def test_a_diverged_sgd_baseline_never_reaches_a_checkpoint(capsys, tmp_path):
    """The checkpoint keeps the baseline's last finite state: both files still
    load, and a resumed run diverges the same way."""
    from sheafdist.training import PREVIOUS, load_checkpoint

    folder = tmp_path / "run"
    argv = ["train", "--engine", "local", "--epochs", "3", "--steps-per-epoch",
            "50", "--sgd-lr", "1000", "--json", "--checkpoint", str(folder)]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["sgd"]["train_loss"] is None
    current = load_checkpoint(str(folder / "checkpoint.npz"))["sgd"]
    assert current is not None and current["step"] < 150
    for name in ("checkpoint.npz", PREVIOUS):  # both load: nothing is NaN
        sgd = load_checkpoint(str(folder / name))["sgd"]
        assert sgd is None or all(np.all(np.isfinite(w)) for w in sgd["model"].W)
    assert main(["train", "--resume", str(folder), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sgd"]["history"] == first["sgd"]["history"]
