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


def test_json_stdout_holds_the_json_and_nothing_else(capsys, monkeypatch):
    """Ray's driver prints notices (a worker died, ...) on stdout; with --json
    they go to stderr, and stdout stays one JSON object."""
    import sheafdist.cli as cli

    def noisy(args):
        print("(raylet) A worker died or was killed")  # what Ray's driver does
        cli._print_json({"iterations": 3})
        return 0

    monkeypatch.setattr(cli, "cmd_infer", noisy)
    code = main(["infer", "--model", "m.npz", "--input", "x.npy", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == {"iterations": 3}
    assert "A worker died" in err


def test_a_pin_that_makes_the_state_chatter_says_so(capsys, tmp_path):
    """Pinning the output of this [2,4,1] net holds a z1 coordinate on its ReLU
    boundary: Euler chatters across it and can never meet --tol. The error says
    that, not "raise --max-steps" (which cannot help)."""
    model = tmp_path / "m.npz"
    np.savez(model, output=np.array("identity"),
             W1=np.array([[0.1257302210933933, -0.1321048632913019],
                          [0.6404226504432821, 0.10490011715303971],
                          [-0.535669373161111, 0.36159505490948474],
                          [1.3040000451301372, 0.9470809631292422]]),
             b1=np.array([[-0.07037352358069926], [-0.12654214710460526],
                          [-0.06232744625373522], [0.00413259793472436]]),
             W2=np.array([[-1.1625153873194172, -0.10939583196627287,
                           -0.6229554736265326, -0.3661336773517258]]),
             b2=np.zeros((1, 1)))
    x = tmp_path / "x.npy"
    np.save(x, np.array([[-0.5442589828573099, -0.31630015636915454,
                          0.4116305363741328, 1.0425133694426776,
                          -0.12853466294403426],
                         [1.3664634705496859, -0.6651946734866135,
                          0.3515100700930197, 0.9034701816518086,
                          0.09401229776087457]]))
    argv = ["infer", "--model", str(model), "--input", str(x), "--max-steps",
            "20000"]
    code = main([*argv, "--pin", "z2[0]=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("sheafdist: error: --tol: not converged within 20000 "
                              "steps: a pre-activation sits on a ReLU boundary")
    # without the pin the same net simply needs more rounds: the usual advice
    code = main([*argv[:-1], "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "raise --max-steps" in err[-1]


def test_a_tolerance_too_loose_for_the_step_is_warned(capsys, tmp_path):
    save_model(he_init([2, 4, 1], 0), str(tmp_path / "m.npz"))
    np.save(tmp_path / "x.npy", np.array([[0.5], [-0.3]]))
    argv = ["infer", "--model", str(tmp_path / "m.npz"), "--input",
            str(tmp_path / "x.npy")]
    assert main([*argv, "--dt", "1e-10", "--max-steps", "50"]) == 0
    err = capsys.readouterr().err
    assert "warning: --tol 1e-09 with alpha*dt = 1e-10 stops once every force is " \
           "below 10" in err
    assert main([*argv, "--max-steps", "50"]) == 1  # the default step: no warning
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- bad inputs
# each of these once ended in a ValueError, a TypeError or a MemoryError (exit 1,
# "this is not a usage error") or was accepted with a part of it dropped


@pytest.fixture
def small(tmp_path):
    """A [2,5,1] model file, an input of 4 columns and variants of both."""
    rng = np.random.default_rng(0)
    W1, W2 = rng.standard_normal((5, 2)), rng.standard_normal((1, 5))
    b1, b2 = np.zeros((5, 1)), np.zeros((1, 1))
    paths = {}

    def model(name, **arrays):
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], **{"W1": W1, "b1": b1, "W2": W2, "b2": b2, **arrays})

    def array(name, value):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], value)

    model("good")
    model("strW", W1=np.array([["a", "b"]] * 5))
    model("complexW", W1=W1 + 1j)
    model("superscript", **{"W\u00b2": W2})
    model("hugeW", W1=W1 * 1e200, W2=W2 * 1e200)
    array("x", rng.standard_normal((2, 4)))
    array("x_complex", np.zeros((2, 4)) + 1j)
    array("x_empty", np.zeros((2, 0)))
    array("x_big", np.full((2, 3), 1e200))
    state = {"a0": np.load(paths["x"]), "z1": np.zeros((5, 4)),
             "a1": np.zeros((5, 4)), "z2": np.zeros((1, 4))}
    for name, z1 in (("st_text", np.array("abc")), ("st_complex", state["z1"] + 1j)):
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], **{**state, "z1": z1})
    return paths


@pytest.mark.parametrize("command", ["infer", "train", "diagnose"])
@pytest.mark.parametrize("name, words", [
    ("strW", ["W1", "dtype <U1", "real numbers"]),
    ("complexW", ["W1", "complex128", "real numbers"]),
    ("superscript", ["'W\u00b2'", "ASCII digits"]),
    ("hugeW", ["W1", "overflows float64", "scale them down"]),
])
def test_model_files_that_are_not_real_weights_are_refused(capsys, small, command,
                                                            name, words):
    argv = {"infer": ["--input", small["x"]],
            "train": ["--engine", "local", "--no-checkpoint", "--epochs", "1"],
            "diagnose": ["--input", small["x"]]}[command]
    code, out, err = run(capsys, [command, "--model", small[name], *argv])
    assert code == 2 and out == ""
    assert_one_line_error(err, "--model", *words)
    assert "Warning" not in err


@pytest.mark.parametrize("argv, words", [
    (["--input", "{x_complex}"], ["--input", "complex128", "real numbers"]),
    (["--input", "{x_empty}"], ["--input", "(2, 0)", "at least one column"]),
    (["--input", "{x_big}"], ["--input", "1e+200", "overflows float64",
                              "forward pass"]),
    (["--input", "{x}", "--init", "{st_text}"], ["--init", "z1", "<U3"]),
    (["--input", "{x}", "--init", "{st_complex}"], ["--init", "z1", "complex128"]),
    (["--input", "{x}", "--pin", "z1[0]=0.5", "--pin", "z1[0]=0.6"],
     ["--pin", "'z1[0]=0.5' and 'z1[0]=0.6'", "z1[0]", "once"]),
    (["--input", "{x}", "--pin", "z1=0.5", "--pin", "z1[3]=0.6"],
     ["--pin", "z1[3]", "once"]),
])
def test_infer_refuses_bad_arrays_and_clashing_pins(capsys, small, argv, words):
    argv = [a.format(**small) for a in argv]
    code, out, err = run(capsys, ["infer", "--model", small["good"], *argv,
                                  "--steps", "5"])
    assert code == 2 and out == ""
    assert_one_line_error(err, *words)
    assert "Warning" not in err


def test_pins_on_different_coordinates_are_still_accepted(capsys, small):
    code, _, err = run(capsys, ["infer", "--model", small["good"], "--input",
                                small["x"], "--pin", "z1[0,0]=0.5", "--pin",
                                "z1[1]=0.6", "--steps", "5"])
    assert code == 0, err


@pytest.mark.parametrize("content", ['{"a0": [1], "z1": 1, "a1": 1, "z2": 1}',
                                     '{"a0": 0.0, "z1": 0, "a1": 1, "z2": true}',
                                     '{"a0": null, "z1": 0, "a1": 0, "z2": 0}'])
def test_a_partition_map_to_anything_but_block_numbers_is_refused(tmp_path,
                                                                 content):
    from sheafdist.errors import InputError
    from sheafdist.partition import partition
    from sheafdist.sheaf import build_graph

    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(InputError) as caught:
        partition(build_graph([2, 5, 1]), str(path))
    assert caught.value.arg == "--partition" and "maps 'a0' to" in str(caught.value)
    path.write_text('{"a0": 0, "z1": 0, "a1": "b", "z2": "b"}')  # names work too
    assert partition(build_graph([2, 5, 1]), str(path)) == [["a0", "z1"],
                                                            ["a1", "z2"]]


@pytest.fixture
def memory_of_16_gib(monkeypatch):
    import sheafdist.memory

    monkeypatch.setattr(sheafdist.memory, "physical_memory", lambda: 16 << 30)


@pytest.mark.parametrize("argv, words", [
    (["--n-train", "1000000000"], ["--n-train", "GiB of memory", "16 GiB"]),
    (["--arch", "2,1000000,1"], ["--arch", "[2,1000000,1] with 300 examples",
                                 "GiB of memory", "16 GiB"]),
    (["--arch", "2,100000,100000,1"], ["--arch", "not fit even for one example"]),
    (["--n-train", "10000000"], ["--n-train", "10000000 examples on [2,30,1]",
                                 "give at most"]),
])
def test_train_refuses_runs_larger_than_the_memory(capsys, memory_of_16_gib, argv,
                                                   words):
    code, out, err = run(capsys, ["train", "--engine", "local", "--no-checkpoint",
                                  "--epochs", "1", "--steps-per-epoch", "1", *argv])
    assert code == 2 and out == ""
    assert_one_line_error(err, *words)


def test_infer_refuses_an_input_larger_than_the_memory(capsys, small, monkeypatch,
                                                       tmp_path):
    import sheafdist.memory

    monkeypatch.setattr(sheafdist.memory, "physical_memory", lambda: 1 << 30)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((2, 2_000_000)))  # 32 MB; a run holds 8 x 13 rows
    code, out, err = run(capsys, ["infer", "--model", small["good"], "--input",
                                  str(wide)])
    assert code == 2 and out == ""
    assert_one_line_error(err, "--input", "2000000 inputs on [2,5,1]", "1 GiB",
                          "give at most")


def test_the_stable_step_of_a_wide_layer_needs_no_square_matrix():
    """A 100000-wide layer once asked for a dense 100000 x 100000 diag(b) and a
    Laplacian with its dense W2^T W2 block; the bound is now matrix-free."""
    import tracemalloc

    from sheafdist.sheaf import coboundary, forward_pattern

    model = he_init([2, 3000, 1], 0)
    model.b = [np.full(b.shape, 0.1) for b in model.b]
    x = np.random.default_rng(0).standard_normal((2, 1))
    tracemalloc.start()
    try:
        stable_step(model, x, 1.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6  # a dense 3000 x 3000 is 72 MB
    # and the bound is the one of the dense spectrum
    model = he_init([2, 500, 1], 0)
    model.b = [np.full(b.shape, 0.1) for b in model.b]
    L, _ = coboundary(model, forward_pattern(model, x[:, 0])).blocks_of_laplacian()
    lam = np.linalg.eigvalsh(L.toarray())[-1]
    assert stable_step(model, x, 1.0) == pytest.approx(2.0 / lam, rel=1e-10)


def test_a_data_file_with_an_empty_test_pair_trains_without_a_warning(capsys,
                                                                      tmp_path):
    """An X_test of zero columns is no test set (as --n-test 0); it once gave
    numpy's "Mean of empty slice" warnings on stderr."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X_train=rng.standard_normal((2, 20)),
             Y_train=rng.standard_normal((1, 20)), X_test=np.zeros((2, 0)),
             Y_test=np.zeros((1, 0)))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(capsys, ["train", "--data", str(tmp_path / "d.npz"),
                                      "--engine", "local", "--no-checkpoint",
                                      "--epochs", "1", "--steps-per-epoch", "20",
                                      "--json"])
    assert code == 0, err
    assert [str(w.message) for w in caught] == []
    assert "Warning" not in err and "warning" not in err
    assert json.loads(out)["sheaf"]["test_loss"] is None


def test_python_warnings_are_one_line_on_stderr(capsys, monkeypatch):
    import warnings

    import sheafdist.cli as cli

    def warns(args):
        np.log(np.zeros(1))  # numpy's RuntimeWarning: divide by zero
        return 0

    monkeypatch.setattr(cli, "cmd_trace", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run(capsys, ["trace", "t.msgpack"])
    assert code == 0
    assert err == ("sheafdist: warning: RuntimeWarning: divide by zero encountered "
                   "in log\n")
