"""Checkpoints and `sheafdist train --resume` (issue 7, part 2).

A run is broken off (a KeyboardInterrupt from inside the engine or the SGD
baseline, as Ctrl-C would) after some checkpoints; `--resume DIR` then continues
it, and it must end with the weights and losses of the run without a break: bit
for bit with the local engine, to 1e-12 with Ray in sync mode.
"""

import json
import os

import numpy as np
import pytest

import sheafdist.sgd
from sheafdist.cli import main
from sheafdist.engines.local import LocalEngine
from sheafdist.model import load_model
from sheafdist.training import PREVIOUS, load_checkpoint


def small(*more, epochs=4, steps=50, every=30, task="paraboloid"):
    return ["train", "--task", task, "--engine", "local", "--epochs", str(epochs),
            "--steps-per-epoch", str(steps), "--n-train", "40", "--n-test", "10",
            "--checkpoint-every", str(every), "--json", *more]


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def interrupt_after(monkeypatch, owner, name, calls):
    """Make ``owner.name`` raise KeyboardInterrupt on its ``calls``-th call."""
    real, count = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def unbroken(capsys, tmp_path, argv):
    folder = tmp_path / "unbroken"
    code, out, err = run(capsys, [*argv, "--checkpoint", str(folder),
                                  "--out", str(folder / "out.npz")])
    assert code == 0, err
    return json.loads(out), load_model(str(folder / "out.npz"))


def assert_same_run(report, expected, model, expected_model, tol=0.0):
    for got, want in zip(model.W + model.b, expected_model.W + expected_model.b,
                         strict=True):
        if tol:
            np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        else:
            np.testing.assert_array_equal(got, want)
    for method in ("sheaf", "sgd"):
        got, want = report[method]["history"], expected[method]["history"]
        for key in ("step", "train_loss", "test_loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=0)


@pytest.mark.parametrize(
    "task, every, calls, at, more",
    [
        # regression: one warm-started run, broken off mid-epoch (runs of 30,
        # 20, 10 rounds, then the break: checkpoint at round 60)
        ("paraboloid", 30, 4, 60, []),
        # classification: each epoch restarts at the forward pass; broken off
        # right after the checkpoint at the end of epoch 2
        ("circular", 50, 3, 100, []),
        # a scheme with memory (heavy-ball velocity) carried by the checkpoint
        ("paraboloid", 30, 4, 60, ["--scheme", "momentum", "--dt", "0.002"]),
    ],
    ids=["regression", "classification", "momentum"],
)
def test_resume_reaches_the_weights_of_an_unbroken_run(capsys, tmp_path,
                                                       monkeypatch, task, every,
                                                       calls, at, more):
    argv = small(*more, task=task, every=every)
    expected, expected_model = unbroken(capsys, tmp_path, argv)

    folder = tmp_path / "broken"
    with monkeypatch.context() as m:
        interrupt_after(m, LocalEngine, "run", calls)
        code, _, err = run(capsys, [*argv, "--checkpoint", str(folder)])
    assert code == 130, err
    ckpt = load_checkpoint(str(folder / "checkpoint.npz"))
    assert ckpt["round"] == at and ckpt["sgd"] is None

    code, out, err = run(capsys, ["train", "--resume", str(folder), "--json",
                                  "--out", str(folder / "out.npz")])
    assert code == 0, err
    assert f"resuming {folder}/checkpoint.npz at round {ckpt['round']}" in err
    report = json.loads(out)
    assert_same_run(report, expected, load_model(str(folder / "out.npz")),
                    expected_model)
    assert report["sheaf"]["history"]["epoch"] == [0, 1, 2, 3, 4]


def test_resume_during_the_sgd_baseline(capsys, tmp_path, monkeypatch):
    argv = small()
    expected, expected_model = unbroken(capsys, tmp_path, argv)
    folder = tmp_path / "broken"
    with monkeypatch.context() as m:
        interrupt_after(m, sheafdist.sgd, "gradients", 120)  # SGD step 120 of 200
        code, _, err = run(capsys, [*argv, "--checkpoint", str(folder)])
    assert code == 130, err
    ckpt = load_checkpoint(str(folder / "checkpoint.npz"))
    assert ckpt["round"] == 200 and ckpt["sgd"]["step"] == 100

    code, out, err = run(capsys, ["train", "--resume", str(folder), "--json",
                                  "--out", str(folder / "out.npz")])
    assert code == 0, err
    assert "SGD step 100" in err
    assert_same_run(json.loads(out), expected, load_model(str(folder / "out.npz")),
                    expected_model)


def test_resume_on_ray_matches_the_unbroken_local_run(capsys, tmp_path, monkeypatch,
                                                      ray_session):
    from sheafdist.engines.ray_engine import RayEngine

    argv = small(epochs=2, steps=40, every=30)
    expected, expected_model = unbroken(capsys, tmp_path, argv)
    ray_argv = [a if a != "local" else "ray" for a in argv]
    folder = tmp_path / "ray"
    with monkeypatch.context() as m:
        interrupt_after(m, RayEngine, "run", 3)  # runs to 30, 40, then the break
        code, _, err = run(capsys, [*ray_argv, "--checkpoint", str(folder)])
    assert code == 130, err
    assert load_checkpoint(str(folder / "checkpoint.npz"))["round"] == 30
    code, out, err = run(capsys, ["train", "--resume", str(folder), "--json",
                                  "--out", str(folder / "out.npz")])
    assert code == 0, err
    report = json.loads(out)
    assert report["engine"] == "ray"
    assert_same_run(report, expected, load_model(str(folder / "out.npz")),
                    expected_model, tol=1e-12)


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture
def broken_run(capsys, tmp_path, monkeypatch):
    """A run stopped at round 90 with checkpoints at 60 (previous) and 90."""
    folder = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_after(m, LocalEngine, "run", 5)  # 30, 50, 60, 90, (100)
        code, _, err = run(capsys, [*small(), "--checkpoint", str(folder)])
    assert code == 130, err
    assert load_checkpoint(str(folder / "checkpoint.npz"))["round"] == 90
    assert load_checkpoint(str(folder / PREVIOUS))["round"] == 60
    return folder


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":  # bytes inside a member: its CRC no longer matches
        middle = len(data) // 3
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle
                                                                      + 64])
                         + data[middle + 64:])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a valid npz that is not a checkpoint
        np.savez(path, W1=np.ones((2, 2)))


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty", "not a checkpoint"])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_stays(
    capsys, tmp_path, monkeypatch, broken_run, how
):
    folder = broken_run
    damage(folder / "checkpoint.npz", how)
    previous = (folder / PREVIOUS).read_bytes()
    code, out, err = run(capsys, ["train", "--resume", str(folder)])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sheafdist: error: --resume: got ")
    assert str(folder / "checkpoint.npz") in lines[0]
    assert (folder / PREVIOUS).read_bytes() == previous  # untouched

    # the previous checkpoint still resumes, to the weights of an unbroken run
    expected, expected_model = unbroken(capsys, tmp_path, small())
    code, out, err = run(capsys, ["train", "--resume", str(folder / PREVIOUS),
                                  "--json", "--out", str(folder / "out.npz")])
    assert code == 0, err
    assert_same_run(json.loads(out), expected, load_model(str(folder / "out.npz")),
                    expected_model)
    assert load_checkpoint(str(folder / "checkpoint.npz"))["round"] == 200


def test_resume_refuses_options_that_change_the_run(capsys, broken_run):
    code, _, err = run(capsys, ["train", "--resume", str(broken_run), "--dt", "0.001"])
    assert code == 2
    assert err.strip() == ("sheafdist: error: --dt: got 0.001; a resumed run keeps "
                           "the configuration of its checkpoint (0.005); drop it, "
                           "or start a new run")


def test_resume_of_nothing_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, ["train", "--resume", str(tmp_path)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--resume: got" in err and "without checkpoint.npz" in err


def test_resume_refuses_changed_data(capsys, tmp_path, monkeypatch):
    from sheafdist.tasks import make_task, save_data

    data = tmp_path / "train.npz"
    save_data(make_task("paraboloid", 1, 30, 5), str(data))
    folder = tmp_path / "run"
    argv = ["train", "--data", str(data), "--engine", "local", "--epochs", "2",
            "--steps-per-epoch", "20", "--checkpoint", str(folder)]
    with monkeypatch.context() as m:
        interrupt_after(m, LocalEngine, "run", 2)
        assert run(capsys, argv)[0] == 130
    save_data(make_task("paraboloid", 2, 30, 5), str(data))
    code, _, err = run(capsys, ["train", "--resume", str(folder)])
    assert code == 2 and "missing or changed" in err
    assert len(err.strip().splitlines()) == 1


def test_no_file_of_a_run_is_partial_or_pickled(broken_run):
    for name in os.listdir(broken_run):
        assert not name.startswith(".tmp-"), name
        if name.endswith(".npz"):
            with np.load(broken_run / name, allow_pickle=False) as f:
                assert all(f[k].dtype != object for k in f.files)


# ---------------------------------------------------------------- edited configurations


@pytest.fixture
def finished_run(capsys, tmp_path):
    """The folder of a short finished run (checkpoints at rounds 20 and 40)."""
    folder = tmp_path / "run"
    code, _, err = run(capsys, [*small("--baseline", "none", epochs=2, steps=20,
                                       every=20), "--checkpoint", str(folder)])
    assert code == 0, err
    return folder


def edit_config(path, **changes):
    """Change keys of the run configuration stored in the checkpoint ``path``."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    config = json.loads(str(arrays["config"]))
    config["cli"].update(changes)
    arrays["config"] = np.array(json.dumps(config))
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("dt", -1, "--dt takes a positive number"),  # ran until it diverged
        ("alpha", 0, "--alpha takes a positive number"),  # fell back to 1
        ("steps_per_epoch", 0, "--steps-per-epoch takes a positive integer"),
        ("seed", "x", "--seed takes an integer >= 0"),  # a TypeError, exit 1
        ("epochs", -3, "--epochs takes a positive integer"),  # --checkpoint-every
        ("beta", None, "--beta takes a positive number"),  # fell back to 1/n
        ("n_train", 2.5, "--n-train takes a positive integer"),
        ("scheme", "leapfrog", "--scheme takes one of euler, momentum"),
        ("warm_start", "yes", "--warm-start takes true or false"),
        ("arch", [2, 30, 1], "--arch takes a string"),
        # checks after the parser's: still the checkpoint and the key
        ("arch", "2,x,1", "--arch refuses it (2,x,1; give at least two"),
        ("epochs", 1, "--epochs refuses it (1 x 20 rounds; the checkpoint is at "
                      "round 40"),
        ("mode", "async", "--mode refuses it (async; it applies to the Ray"),
    ],
)
def test_resume_checks_every_stored_value_as_its_option(capsys, finished_run,
                                                        monkeypatch, key, value,
                                                        says):
    path = finished_run / "checkpoint.npz"
    edit_config(path, **{key: value})
    monkeypatch.setattr(LocalEngine, "run", None)  # nothing may run
    code, out, err = run(capsys, ["train", "--resume", str(finished_run)])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sheafdist: error: --resume: got {key}="
                               f"{json.dumps(value)} in the configuration of "
                               f"{path}; "), lines[0]
    assert says in lines[0], lines[0]
    assert "resume from checkpoint.prev.npz beside it" in lines[0]


def test_resume_needs_a_task_or_data_in_the_checkpoint(capsys, finished_run):
    edit_config(finished_run / "checkpoint.npz", task_name=None)
    code, _, err = run(capsys, ["train", "--resume", str(finished_run)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--resume: got task_name=null and data=null in the configuration" in err


def test_a_bad_previous_checkpoint_never_replaces_a_good_current_one(capsys,
                                                                    broken_run):
    folder = broken_run
    with np.load(folder / PREVIOUS, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["stalk_z1"] = arrays["stalk_z1"][:, :-1]  # one example short
    np.savez(folder / PREVIOUS, **arrays)
    current = (folder / "checkpoint.npz").read_bytes()
    code, out, err = run(capsys, ["train", "--resume", str(folder / PREVIOUS)])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sheafdist: error: --resume: got ")
    assert "stalk_z1 of shape" in lines[0]
    assert (folder / "checkpoint.npz").read_bytes() == current


def test_an_option_given_with_resume_must_agree_with_the_checkpoint(capsys,
                                                                    broken_run):
    """Typing the checkpoint's own value is harmless; any other value, the
    default included, is refused rather than silently dropped."""
    code, _, err = run(capsys, ["train", "--resume", str(broken_run), "--engine",
                                "ray"])  # ray is the default; the run was local
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("sheafdist: error: --engine: got ray; a resumed run "
                          "keeps the configuration of its checkpoint ('local')")
    code, out, err = run(capsys, ["train", "--resume", str(broken_run), "--engine",
                                  "local", "--json"])
    assert code == 0, err
    assert json.loads(out)["sheaf"]["train_loss"] > 0


def test_a_new_run_never_overwrites_another_runs_checkpoint(capsys, broken_run):
    before = (broken_run / "checkpoint.npz").read_bytes()
    code, _, err = run(capsys, [*small(), "--checkpoint", str(broken_run)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"sheafdist: error: --checkpoint: got {broken_run}, "
                          "which holds the checkpoint of another run")
    assert f"--resume {broken_run}" in err
    assert (broken_run / "checkpoint.npz").read_bytes() == before
