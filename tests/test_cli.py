"""The ``sheafdist`` command line, run in-process and once as ``python -m``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sheafdist.cli import main
from sheafdist.model import MLP, he_init, load_model, loss, save_model
from sheafdist.sheaf import stable_step
from sheafdist.tasks import make_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def case241(tmp_path, golden_dir):
    """inference_241 as CLI files: model, input and the golden initial state."""
    with np.load(golden_dir / "inference_241.npz", allow_pickle=False) as f:
        g = {k: f[k] for k in f.files}
    files = {
        "model": tmp_path / "model.npz",
        "input": tmp_path / "x.npy",
        "init": tmp_path / "init.npz",
    }
    np.savez(files["model"], W1=g["W1"], b1=g["b1"], W2=g["W2"], b2=g["b2"],
             output=np.array("identity"))
    np.save(files["input"], g["x"])
    np.savez(files["init"], a0=g["x"], z1=g["z1_init"], a1=g["a1_init"],
             z2=g["z2_init"])
    return g, {k: str(v) for k, v in files.items()}


def infer_args(files, *more):
    return ["infer", "--model", files["model"], "--input", files["input"],
            "--init", files["init"], *more]


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("sheafdist")
    assert "error" in lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert "Traceback" not in err


# ---------------------------------------------------------------- infer


def test_infer_json_reproduces_golden_241(capsys, case241):
    g, files = case241
    code, out, err = run(capsys, infer_args(files, "--tol", "1e-12", "--json"))
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON object on stdout
    golden = int(g["iterations"])
    assert abs(report["iterations"] - golden) <= max(0.01 * golden, 5)
    assert report["converged"] is True
    assert report["final_change"] < 1e-12
    output = np.array(report["output"])
    assert output.shape == (1, 1)
    np.testing.assert_allclose(output, g["forward_output"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(report["forward_output"], g["forward_output"],
                               rtol=1e-12)
    assert report["error"] < 1e-8
    assert set(report["discord"]) == {"W1", "R1", "W2"}
    assert report["energy"] < 1e-15
    assert report["engine"] == "local"
    assert report["seconds"] > 0


def test_python_m_sheafdist_matches_golden_fixed_steps(case241, tmp_path):
    g, files = case241
    state = tmp_path / "state.npz"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "sheafdist",
         *infer_args(files, "--steps", "1000", "--json", "--out", str(state))],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["iterations"] == 1000 and report["converged"] is None
    np.testing.assert_allclose(report["output"], g["output_step1000"],
                               rtol=1e-10, atol=1e-12)
    with np.load(state, allow_pickle=False) as f:
        assert sorted(f.files) == ["a0", "a1", "z1", "z2"]
        for v in ("z1", "a1", "z2"):
            np.testing.assert_allclose(f[v], g[f"{v}_step1000"], rtol=1e-10,
                                       atol=1e-12)
        np.testing.assert_array_equal(f["a0"], g["x"])


def test_infer_text_output_and_defaults(capsys, case241):
    _, files = case241
    code, out, err = run(capsys, ["infer", "--model", files["model"], "--input",
                                  files["input"], "--init", "forward"])
    assert code == 0, err
    assert out.startswith("converged in ")
    assert "forward pass" in out


def test_infer_serves_metrics_when_asked(capsys, case241):
    _, files = case241
    code, _, err = run(capsys, infer_args(files, "--steps", "50", "--metrics-port",
                                          "0"))
    assert code == 0, err
    line = [x for x in err.splitlines() if x.startswith("metrics: ")]
    assert line and line[0].startswith("metrics: http://127.0.0.1:")
    assert line[0].endswith("/metrics")


def test_not_converging_within_max_steps_exits_1(capsys, case241):
    _, files = case241
    code, out, err = run(capsys, infer_args(files, "--max-steps", "20", "--json"))
    assert code == 1
    assert json.loads(out)["converged"] is False
    assert_one_line_error(err, "--max-steps", "not converged")


@pytest.fixture
def bad_files(tmp_path, case241):
    g, files = case241
    missing = tmp_path / "missing_w2.npz"
    np.savez(missing, W1=g["W1"], b1=g["b1"], b2=g["b2"], output=np.array("identity"))
    misshaped = tmp_path / "misshaped_w2.npz"
    np.savez(misshaped, W1=g["W1"], b1=g["b1"], W2=np.ones((1, 3)), b2=g["b2"],
             output=np.array("identity"))
    rows = tmp_path / "rows.npy"
    np.save(rows, np.ones((3, 2)))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[0.5], [np.nan]]))
    return files, {"missing": str(missing), "misshaped": str(misshaped),
                   "rows": str(rows), "nan": str(nan)}


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", ["--model", "W2"]),
        ("misshaped", ["--model", "W2", "(1, 3)"]),
        ("rows", ["--input", "(3, 2)", "(2, batch)"]),
        ("nan", ["--input", "NaN"]),
        ("pin", ["--pin", "'z7'", "a0, z1, a1, z2"]),
        ("soft-pin", ["--soft-pin", "gamma"]),
        ("negative dt", ["--dt", "positive"]),
        ("async", ["--mode", "--engine ray"]),
        ("steps and tol", ["--steps", "--tol"]),
        ("init", ["--init", "forward, random, zeros"]),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, bad_files, case, words):
    files, bad = bad_files
    argv = {
        "missing": ["--model", bad["missing"], "--input", files["input"]],
        "misshaped": ["--model", bad["misshaped"], "--input", files["input"]],
        "rows": ["--model", files["model"], "--input", bad["rows"]],
        "nan": ["--model", files["model"], "--input", bad["nan"]],
        "pin": [*infer_args(files)[1:], "--pin", "z7[0]=1"],
        "soft-pin": [*infer_args(files)[1:], "--soft-pin", "z1=0@-3"],
        "negative dt": [*infer_args(files)[1:], "--dt", "-0.01"],
        "async": [*infer_args(files)[1:], "--mode", "async"],
        "steps and tol": [*infer_args(files)[1:], "--steps", "5", "--tol", "1e-3"],
        "init": ["--model", files["model"], "--input", files["input"], "--init",
                 "fwd"],
    }[case]
    code, out, err = run(capsys, ["infer", *argv])
    assert code == 2
    assert out == ""
    assert_one_line_error(err, *words)


def test_huge_dt_exits_2_naming_the_stable_bound(capsys, case241):
    g, files = case241
    model = MLP([g["W1"], g["W2"]], [g["b1"], g["b2"]])
    bound = stable_step(model, g["x"], 1.0)
    code, out, err = run(capsys, infer_args(files, "--dt", "5"))
    assert code == 2 and out == ""
    assert_one_line_error(err, "--dt", "2/lambda_max", f"{bound:.4g}")
    # just below the bound is accepted
    code, _, err = run(capsys, infer_args(files, "--dt", f"{0.9 * bound:.6g}",
                                          "--steps", "10"))
    assert code == 0, err


# ---------------------------------------------------------------- train


def test_train_json_reports_losses_and_writes_files(capsys, tmp_path):
    out_model = tmp_path / "trained.npz"
    folder = tmp_path / "run"
    code, out, err = run(capsys, [
        "train", "--engine", "local", "--epochs", "2", "--steps-per-epoch", "200",
        "--checkpoint", str(folder), "--out", str(out_model), "--json",
    ])
    assert code == 0, err
    report = json.loads(out)
    assert report["steps"] == 400 and report["arch"] == [2, 30, 1]
    sheaf, sgd = report["sheaf"], report["sgd"]
    assert sheaf["history"]["step"] == [0, 200, 400]
    assert sgd["history"]["step"] == [0, 200, 400]
    assert sheaf["train_loss"] < sheaf["history"]["train_loss"][0]  # it learned
    assert sgd["train_loss"] < sgd["history"]["train_loss"][0]
    assert sheaf["history"]["train_loss"][0] == sgd["history"]["train_loss"][0]

    # the reported loss is the forward-pass loss of the written model
    model = load_model(str(out_model))
    data = make_task("paraboloid", 42, 300, 100)
    assert loss(model, data.X_train, data.Y_train) == pytest.approx(
        sheaf["train_loss"], rel=1e-12)
    assert loss(model, data.X_test, data.Y_test) == pytest.approx(
        sheaf["test_loss"], rel=1e-12)
    assert sorted(os.listdir(folder)) == ["checkpoint.npz", "checkpoint.prev.npz",
                                          "loss.png", "model.npz"]
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # 400 steps is not in the paper's table: only its 100k-step numbers
    assert report["paper"]["points"] == [{"steps": 100_000, "sheaf_train": 0.0631,
                                          "sheaf_test": 0.0865, "sgd_train": 0.00329}]
    assert "epoch 2/2" in err and "paper's numbers after 100000 steps" in err


def test_train_without_checkpoint_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, [
        "train", "--engine", "local", "--epochs", "1", "--steps-per-epoch", "20",
        "--no-checkpoint", "--baseline", "none", "--no-progress", "--task",
        "circular",
    ])
    assert code == 0, err
    assert os.listdir(tmp_path) == []
    assert out.startswith("sheaf: train ")
    assert "SGD" not in out and err == ""


def test_train_classification_restarts_from_forward_pass(capsys, tmp_path):
    folder = tmp_path / "blobs"
    code, out, err = run(capsys, [
        "train", "--engine", "local", "--task", "blobs", "--epochs", "2",
        "--steps-per-epoch", "10", "--checkpoint", str(folder), "--json",
        "--baseline", "none",
    ])
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] == "softmax" and report["arch"] == [2, 25, 4]
    with np.load(folder / "checkpoint.npz", allow_pickle=False) as f:
        settings = json.loads(str(f["config"]))
    assert settings["warm_start"] is False and settings["init"] == "forward"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--arch", "3,5,1"], ["--arch", "2 inputs"]),
        (["--arch", "2,x,1"], ["--arch"]),
        (["--dt", "50"], ["--dt", "2/lambda_max"]),
        (["--data", "no/such.npz"], ["--data", "no such file"]),
        (["--task", "paraboloid", "--output", "softmax"], ["--output"]),
        (["--epochs", "0"], ["--epochs", "positive"]),
        (["--beta", "nan"], ["--beta"]),
    ],
)
def test_train_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, words):
    code, out, err = run(capsys, ["train", "--engine", "local", "--checkpoint",
                                  str(tmp_path / "run"), *argv])
    assert code == 2 and out == ""
    assert_one_line_error(err, *words)
    assert not (tmp_path / "run").exists()  # nothing ran


def test_train_from_a_model_file(capsys, tmp_path):
    """``--model`` starts from given weights: the first logged loss is theirs."""
    data = make_task("paraboloid", 42, 300, 100)
    start = he_init([2, 7, 1], 5)
    save_model(start, str(tmp_path / "init.npz"))
    code, out, err = run(capsys, [
        "train", "--engine", "local", "--model", str(tmp_path / "init.npz"),
        "--epochs", "1", "--steps-per-epoch", "5", "--no-checkpoint", "--json",
        "--baseline", "none",
    ])
    assert code == 0, err
    report = json.loads(out)
    assert report["arch"] == [2, 7, 1]
    assert report["sheaf"]["history"]["train_loss"][0] == pytest.approx(
        loss(start, data.X_train, data.Y_train), rel=1e-12)
    assert report["paper"] is None


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--task", "--data", "--arch", "--beta", "--baseline",
                   "--checkpoint", "--metrics-port", "--full", "--engine"):
        assert option in out
