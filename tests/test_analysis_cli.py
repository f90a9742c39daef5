"""``sheafdist diagnose``, ``sheafdist reproduce``, the rate keys of
``sheafdist infer --json`` and imported PyTorch models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sheafdist import diagnostics as diag
from sheafdist.cli import main
from sheafdist.model import forward, he_init, predict, save_model
from sheafdist.reproduce import FILES
from sheafdist.training import train_sheaf


def run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *words) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sheafdist: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    model = he_init([2, 8, 1], 3)
    model.b = [0.2 * rng.standard_normal(b.shape) for b in model.b]
    x = rng.uniform(-2, 2, (2, 6))
    y = forward(model, x)["z2"] + 0.3
    paths = {k: tmp_path / f"{k}.{ext}" for k, ext in
             (("model", "npz"), ("x", "npy"), ("y", "npy"), ("state", "npz"))}
    save_model(model, str(paths["model"]))
    np.save(paths["x"], x)
    np.save(paths["y"], y)
    state = forward(model, x)
    state["z1"] = state["z1"] + 0.1
    np.savez(paths["state"], **state)
    return model, x, y, {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------- infer


def test_infer_json_reports_the_measured_and_predicted_rates(capsys, tmp_path):
    """Check 5 through the CLI: [2,4,1] (He seed 7), x = (0.5, -0.3), dt 0.01."""
    save_model(he_init([2, 4, 1], 7), str(tmp_path / "m.npz"))
    np.save(tmp_path / "x.npy", np.array([[0.5], [-0.3]]))
    code, out, _ = run(capsys, ["infer", "--model", tmp_path / "m.npz", "--input",
                                tmp_path / "x.npy", "--seed", "42", "--tol",
                                "1e-13", "--json"])
    assert code == 0
    r = json.loads(out)
    assert r["rate_predicted"] == pytest.approx(0.5642, abs=1e-4)
    assert r["rate_predicted_continuous"] == pytest.approx(0.5634, abs=1e-4)
    assert r["rate_measured"] == pytest.approx(r["rate_predicted"], rel=0.01)


@pytest.mark.parametrize("scheme", ["red-black", "momentum"])
def test_infer_json_has_no_euler_prediction_for_another_scheme(capsys, tmp_path,
                                                               scheme):
    """The Euler rate beside the measured rate of another scheme would mislead:
    it is null; the continuous rate and the measured one stay."""
    save_model(he_init([2, 4, 1], 7), str(tmp_path / "m.npz"))
    np.save(tmp_path / "x.npy", np.array([[0.5], [-0.3]]))
    code, out, _ = run(capsys, ["infer", "--model", tmp_path / "m.npz", "--input",
                                tmp_path / "x.npy", "--seed", "42", "--tol",
                                "1e-13", "--json", "--scheme", scheme])
    assert code == 0
    r = json.loads(out)
    assert r["scheme"] == scheme and r["rate_predicted"] is None
    assert r["rate_predicted_continuous"] == pytest.approx(0.5634, abs=1e-4)
    assert r["rate_measured"] > 0


def test_infer_json_rates_are_null_with_pins_or_without_decay(capsys, files):
    _, _, _, p = files
    base = ["infer", "--model", p["model"], "--input", p["x"], "--json"]
    code, out, _ = run(capsys, [*base, "--pin", "z1[0]=0.5"])
    assert code == 0
    r = json.loads(out)
    assert r["rate_measured"] is None and r["rate_predicted"] is None
    code, out, _ = run(capsys, [*base, "--init", "forward", "--steps", "50"])
    r = json.loads(out)
    assert r["rate_measured"] is None  # it starts at the fixed point
    assert r["rate_predicted"] > 0 and r["rate_predicted_continuous"] > 0


# ---------------------------------------------------------------- diagnose


def test_diagnose_json_has_spectra_pinned_state_and_flips(capsys, files):
    model, x, y, p = files
    code, out, err = run(capsys, [
        "diagnose", "--model", p["model"], "--input", p["x"], "--labels", p["y"],
        "--state", p["state"], "--flips", "--max-steps", "20000", "--json",
        "--per-input"])
    assert code == 0, err
    r = json.loads(out)
    assert r["model"]["arch"] == [2, 8, 1] and r["inputs"]["count"] == 6
    s = diag.spectral(model, x)
    assert r["spectral"]["lambda_1"]["median"] == pytest.approx(np.median(s.lambda_1))
    assert r["spectral"]["blocks"] == ["z1", "a1", "z2"]
    assert len(r["spectral"]["per_input"]["lambda_1"]) == 6
    pinned = diag.pinned_discord(model, x, y, max_steps=20_000)
    assert r["pinned"]["by_edge"] == pytest.approx(pinned.discord.by_edge)
    assert set(r["pinned"]["by_kind"]) == {"affine", "relu"}
    assert r["pinned"]["by_layer"]["1"] == pytest.approx(
        pinned.discord.by_edge["W1"] + pinned.discord.by_edge["R1"])
    state = r["state"]
    assert state["by_edge"]["W1"] == pytest.approx(0.01 * 8)  # z1 moved by 0.1
    assert r["flips"]["columns"] == ["round", "vertex", "coordinate", "sample"]
    assert r["flips"]["count"] == len(r["flips"]["events"]) > 0
    assert all(e[1] == "z1" and 0 <= e[3] < 6 for e in r["flips"]["events"])


def test_diagnose_a_task_and_a_training_checkpoint(capsys, tmp_path):
    from sheafdist.rules import Config
    from sheafdist.tasks import make_task

    data = make_task("paraboloid", 42)  # what --task paraboloid draws
    model = he_init([2, 6, 1], 0)
    res = train_sheaf(model, data, Config(dt=0.005, beta=1 / 300), 1, 200,
                      checkpoint_dir=str(tmp_path))
    save_model(res.model, str(tmp_path / "m.npz"))
    code, out, err = run(capsys, [
        "diagnose", "--model", tmp_path / "m.npz", "--task", "paraboloid",
        "--split", "train", "--n", "300", "--training-state",
        tmp_path / "checkpoint.npz", "--no-pinned", "--json"])
    assert code == 0, err
    r = json.loads(out)
    expect = diag.discord(res.model, res.stalks, target=data.Y_train)
    assert r["training_state"]["by_edge"] == pytest.approx(expect.by_edge)
    assert "pinned" not in r
    code, out, _ = run(capsys, ["diagnose", "--model", tmp_path / "m.npz",
                                "--task", "paraboloid", "--n", "5",
                                "--max-steps", "300"])
    assert code == 0
    assert "output-pinned discord (300 rounds" in out and "lambda_1" in out


@pytest.mark.parametrize("argv, words", [
    (["--labels", "{y_bad}"], ["--labels", "(1, 6)"]),
    (["--training-state", "{state}"], ["--training-state", "labels"]),
    (["--task", "paraboloid", "--labels", "{y}"], ["--labels", "--task"]),
    (["--dt", "5", "--labels", "{y}"], ["--dt", "2/lambda_max"]),
])
def test_diagnose_bad_input_exits_2_with_one_line(capsys, files, tmp_path, argv,
                                                  words):
    _, _, _, p = files
    np.save(tmp_path / "y_bad.npy", np.zeros((1, 4)))
    p = {**p, "y_bad": str(tmp_path / "y_bad.npy")}
    argv = [a.format(**p) for a in argv]
    if "--task" not in argv:
        argv = ["--input", p["x"], *argv]
    code, _, err = run(capsys, ["diagnose", "--model", p["model"], *argv])
    assert code == 2
    one_line_error(err, *words)


@pytest.mark.parametrize("argv, words", [
    # a state's a0 of another batch once broke np.allclose with a ValueError
    (["--input", "{x}", "--state", "{st_a0}"], ["--state", "a0 of shape (2, 3)",
                                                "(2, 6)", "drop --input"]),
    # a stalk of the wrong shape was blamed on --init, an option not given
    (["--input", "{x}", "--state", "{st_z1}"], ["--state", "z1 of shape (3, 6)"]),
    (["--input", "{x}", "--state", "{st_text}"], ["--state", "z1", "<U3"]),
    (["--input", "{x}", "--state", "{st_complex}"], ["--state", "z1", "complex128"]),
    (["--input", "{x}", "--labels", "{y_text}"], ["--labels", "<U1",
                                                  "real numbers"]),
    (["--input", "{x}", "--labels", "{y_empty}"], ["--labels", "(1, 0)"]),
    (["--input", "{x}", "--labels", "{y_big}"], ["--labels", "overflows float64"]),
    (["--input", "{x_empty}"], ["--input", "(2, 0)", "at least one column"]),
    (["--input", "{x_complex}"], ["--input", "complex128"]),
    (["--task", "paraboloid", "--n", "5", "--training-state", "{st_task}"],
     ["--training-state", "a0 of shape (2, 300)", "(2, 5)", "--n"]),
])
def test_diagnose_refuses_states_labels_and_inputs_that_do_not_fit(
        capsys, files, tmp_path, argv, words):
    model, x, _, p = files
    state = forward(model, x)
    paths = dict(p)

    def save(name, value=None, **arrays):
        if value is not None:
            paths[name] = str(tmp_path / f"{name}.npy")
            np.save(paths[name], value)
        else:
            paths[name] = str(tmp_path / f"{name}.npz")
            np.savez(paths[name], **arrays)

    save("st_a0", **{**state, "a0": x[:, :3]})
    save("st_z1", **{**state, "z1": np.zeros((3, 6))})
    save("st_text", **{**state, "z1": np.array("abc")})
    save("st_complex", **{**state, "z1": state["z1"] + 1j})
    save("y_text", np.array([["a"] * 6]))
    save("y_empty", np.zeros((1, 0)))
    save("y_big", np.full((1, 6), 1e200))
    save("x_empty", np.zeros((2, 0)))
    save("x_complex", x + 1j)
    big = he_init([2, 30, 1], 0)
    task = forward(big, np.random.default_rng(0).standard_normal((2, 300)))
    save("st_task", **{f"stalk_{k}": v for k, v in task.items()})
    paths["model"] = p["model"]
    if "--task" in argv:
        save_model(big, str(tmp_path / "big.npz"))
        paths["model"] = str(tmp_path / "big.npz")
    code, out, err = run(capsys, ["diagnose", "--model", paths["model"],
                                  *[a.format(**paths) for a in argv]])
    assert code == 2 and out == ""
    one_line_error(err, *words)
    assert "--init" not in err and "Warning" not in err


def test_diagnose_refuses_spectra_larger_than_the_memory(capsys, files,
                                                         monkeypatch, tmp_path):
    """The spectral diagnostics take a dense eigendecomposition per input: for a
    100000-wide layer once a MemoryError asking for 298 GiB."""
    import sheafdist.memory

    monkeypatch.setattr(sheafdist.memory, "physical_memory", lambda: 1 << 30)
    _, _, _, p = files
    save_model(he_init([2, 5000, 1], 0), str(tmp_path / "wide.npz"))
    code, out, err = run(capsys, ["diagnose", "--model", tmp_path / "wide.npz",
                                  "--input", p["x"]])
    assert code == 2 and out == ""
    one_line_error(err, "--model", "[2,5000,1]", "10001 x 10001", "GiB", "--n")


def test_diagnose_help_says_which_torch_layers_it_takes(capsys):
    assert main(["diagnose", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "optionally ending in Sigmoid or Softmax(dim=-1)" in text


def test_diagnose_without_torch_says_how_to_get_it(capsys, files, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    _, _, _, p = files
    code, _, err = run(capsys, ["diagnose", "--torch", "m.pt", "--input", p["x"]])
    assert code == 2
    one_line_error(err, "--torch", "sheafdist[torch]")


# ---------------------------------------------------------------- PyTorch


def test_from_torch_matches_the_torch_forward_pass(capsys, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is an optional extra "
                                "(pip install 'sheafdist[torch]')")
    from torch import nn

    from sheafdist.model import from_torch, load_torch

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(),
                        nn.Linear(5, 3), nn.Softmax(dim=-1))
    x = np.random.default_rng(1).standard_normal((2, 9))
    with torch.no_grad():
        ref = seq.double()(torch.from_numpy(x.T)).numpy().T
    model = from_torch(seq)
    assert model.arch == [2, 7, 5, 3] and model.output == "softmax"
    np.testing.assert_allclose(predict(model, x), ref, rtol=1e-12, atol=1e-14)

    path = tmp_path / "net.pt"
    torch.save(seq, path)
    loaded = load_torch(str(path))
    np.testing.assert_allclose(predict(loaded, x), ref, rtol=1e-12, atol=1e-14)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run(capsys, ["diagnose", "--torch", path, "--input",
                                  tmp_path / "x.npy", "--json"])
    assert code == 0, err
    assert json.loads(out)["model"]["arch"] == [2, 7, 5, 3]


def test_torch_files_with_other_layers_or_code_are_refused(capsys, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is an optional extra "
                                "(pip install 'sheafdist[torch]')")
    from torch import nn

    bad = tmp_path / "tanh.pt"
    torch.save(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), bad)
    np.save(tmp_path / "x.npy", np.zeros((2, 1)))
    code, _, err = run(capsys, ["diagnose", "--torch", bad, "--input",
                                tmp_path / "x.npy"])
    assert code == 2
    # the message names every layer that is taken, the output ones too
    one_line_error(err, "--torch", "Tanh", "ReLU between each pair",
                   "Sigmoid or Softmax(dim=-1)")

    class Evil:  # unpickling this would call os.system
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save(Evil(), tmp_path / "evil.pt")
    code, _, err = run(capsys, ["diagnose", "--torch", tmp_path / "evil.pt",
                                "--input", tmp_path / "x.npy"])
    assert code == 2 and not (tmp_path / "pwned").exists()
    one_line_error(err, "--torch")

    torch.save(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), tmp_path / "ll.pt")
    code, _, err = run(capsys, ["diagnose", "--torch", tmp_path / "ll.pt",
                                "--input", tmp_path / "x.npy"])
    assert code == 2
    one_line_error(err, "--torch", "ReLU between")


# ---------------------------------------------------------------- reproduce


@pytest.mark.slow
def test_reproduce_quick_writes_every_file_it_promises(capsys, tmp_path):
    """Issue 3, part 5: ``reproduce --quick`` (a few minutes) writes every file of
    FILES, and report.md sets the numbers the quick runs reach beside the
    paper's."""
    out = tmp_path / "repro"
    code, stdout, err = run(capsys, ["reproduce", "--out", out, "--quick",
                                     "--jobs", "2", "--json"])
    assert code == 0, err
    r = json.loads(stdout)
    assert r["level"] == "quick"
    assert sorted(os.path.basename(f) for f in r["files"]) == sorted(FILES)
    for name in FILES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        if name.endswith(".csv"):
            lines = path.read_text().splitlines()
            assert len(lines) >= 2 and "," in lines[0], name
    report = (out / "report.md").read_text()
    for name in FILES[1:]:
        assert f"`{name}`" in report, name
    assert "Level **quick**" in report and "## Summary" in report
    # the quick runs reach 10,000 steps, where the notebook has numbers [NB]
    assert "sheaf train MSE at 10,000" in report
    assert "sheaf lambda_1 at 10,000" in report
    results = json.loads((out / "results.json").read_text())
    assert results["convergence"]["rate_predicted"] == pytest.approx(0.5642, abs=1e-4)
    assert results["convergence"]["reached_1e-28"]
    assert len(results["table_e1"]) == 8
    assert len({row["beta"] for row in results["beta_sweep"]["rows"]}) == 5
    # the spreads report.md flags by: every seed of the paraboloid rows of E.1
    # and of the depth x time sweep, and the test loss over other test draws
    para = [row for row in results["table_e1"] if row["task"] == "paraboloid"]
    assert all(len(row["by_seed"]["sheaf_test"]) == 3 for row in para)
    assert all(len(row["test_by_seed"]) == 3 for row in results["depth"]["time"])
    draws = results["training"]["paraboloid"]["test_draws"]["sheaf"]["0"]
    assert 0 < draws["sd"] < draws["mean"]
