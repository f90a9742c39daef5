"""The command line on the Ray engine, and the live /metrics of a Ray run.

``ray_session`` starts Ray once in this process; ``cli.main`` runs in-process and
must reuse it (``init_ray`` joins an initialised Ray instead of starting one).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
from golden_cases import load_case, make_problem
from prometheus_client.parser import text_string_to_metric_families

from sheafdist.cli import main
from sheafdist.engines.ray_engine import RayEngine
from sheafdist.metrics import RunMetrics


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


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


# ---------------------------------------------------------------- train


def test_train_on_ray_prints_the_local_engine_losses(capsys, ray_session, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--epochs", "2", "--steps-per-epoch", "300", "--json",
            "--no-checkpoint", "--no-progress"]
    reports = {}
    for engine in ("ray", "local"):
        code, out, err = run(capsys, [*argv, "--engine", engine])
        assert code == 0, err
        reports[engine] = json.loads(out)
    assert ray_session.is_initialized()  # the CLI reused the session's Ray
    ray, local = reports["ray"], reports["local"]
    assert ray["engine"] == "ray" and local["engine"] == "local"
    assert ray["steps"] == local["steps"] == 600
    assert ray["sheaf"]["rounds"] == local["sheaf"]["rounds"] == 600
    for key in ("step", "epoch"):
        assert ray["sheaf"]["history"][key] == local["sheaf"]["history"][key]
    for key in ("train_loss", "test_loss"):
        mine, ref = ray["sheaf"]["history"][key], local["sheaf"]["history"][key]
        assert len(mine) == len(ref) == 3
        np.testing.assert_allclose(mine, ref, rtol=1e-12, atol=1e-12)
        assert ray["sheaf"][key] == pytest.approx(local["sheaf"][key], rel=1e-12)
    # the run learned, and the baseline does not depend on the engine
    assert ray["sheaf"]["train_loss"] < ray["sheaf"]["history"]["train_loss"][0]
    assert ray["sgd"]["history"]["train_loss"] == local["sgd"]["history"]["train_loss"]
    assert list(tmp_path.iterdir()) == []  # --no-checkpoint wrote nothing


# ---------------------------------------------------------------- infer


def test_infer_on_ray_converges_like_the_golden_run(capsys, ray_session, case241):
    g, files = case241
    code, out, err = run(capsys, [
        "infer", "--model", files["model"], "--input", files["input"], "--init",
        files["init"], "--tol", "1e-12", "--engine", "ray", "--partition", "layer",
        "--json",
    ])
    assert code == 0, err
    report = json.loads(out)
    assert report["engine"] == "ray" and report["partition"] == "layer"
    assert report["mode"] == "sync"
    assert report["iterations"] == int(g["iterations"]) == 8650
    assert report["converged"] is True and report["final_change"] < 1e-12
    np.testing.assert_allclose(report["output"], g["forward_output"], rtol=0,
                               atol=1e-8)
    np.testing.assert_allclose(report["output"], g["output_tol"], rtol=0,
                               atol=1e-10)
    assert report["error"] < 1e-8
    assert set(report["discord"]) == {"W1", "R1", "W2"}


def test_infer_on_ray_with_a_bad_partition_exits_2(capsys, ray_session, case241):
    _, files = case241
    code, out, err = run(capsys, [
        "infer", "--model", files["model"], "--input", files["input"], "--engine",
        "ray", "--partition", "rows", "--steps", "5",
    ])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--partition" in lines[0] and "rows" in lines[0]
    assert "Traceback" not in err


# ---------------------------------------------------------------- live metrics


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no series {name}{labels}"
    return samples[key]


EDGES = {"W1": ("affine", "1"), "R1": ("relu", "1"), "W2": ("affine", "2"),
         "out": ("output", "2")}


def edge_labels(edge: str, **more) -> dict[str, str]:
    kind, layer = EDGES[edge]
    return {"edge": edge, "kind": kind, "layer": layer, **more}


def messages(samples: dict, edge: str, direction: str, transport: str) -> float:
    return sample(samples, "sheafdist_edge_messages_total",
                  **edge_labels(edge, direction=direction, transport=transport))


def test_metrics_scraped_during_a_ray_training_run(golden_dir, ray_session):
    case = load_case(golden_dir, "train_paraboloid_short")
    problem = make_problem(case)
    batch = problem.batch
    rounds = 2000
    with RunMetrics(problem.graph, training_output=True) as metrics:
        port = metrics.serve(0)
        assert port > 0
        engine = RayEngine(problem, observer=metrics.observe, partition="layer")
        try:
            assert engine.n_actors == 2  # {a0, z1, a1} and {z2}: W2 crosses
            outcome: dict = {}

            def train():
                try:
                    outcome["result"] = engine.run(rounds)
                except BaseException as exc:
                    outcome["error"] = exc

            thread = threading.Thread(target=train, daemon=True)
            thread.start()
            during = []
            while thread.is_alive() and len(during) < 8:
                time.sleep(0.7)
                if thread.is_alive():
                    during.append(scrape(port))
            thread.join(120)
            assert not thread.is_alive(), "the run did not finish"
            final = scrape(port)
        finally:
            engine.close()
    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert len(during) >= 2, "the run ended before two scrapes"

    for samples in [*during, final]:
        for edge in EDGES:  # every edge has its series from the first scrape on
            sample(samples, "sheafdist_edge_discord", **edge_labels(edge))
            for direction in ("forward", "backward"):
                for transport in ("local", "remote"):
                    messages(samples, edge, direction, transport)

    # counters rise while the run goes on
    for key in (("W2", "forward", "remote"), ("W2", "backward", "remote"),
                ("W1", "forward", "local")):
        seen = [messages(s, *key) for s in [*during, final]]
        assert seen == sorted(seen), f"{key} went down: {seen}"
        assert seen[-2] > seen[0], f"{key} did not rise during the run: {seen}"
    seen = [sample(s, "sheafdist_rounds_total", ) for s in [*during, final]]
    assert seen == sorted(seen) and seen[-2] > seen[0], seen

    # and end at exactly what was sent
    assert sample(final, "sheafdist_rounds_total") == rounds
    for direction in ("forward", "backward"):
        assert messages(final, "W2", direction, "remote") == rounds
        assert messages(final, "W2", direction, "local") == 0
        assert sample(final, "sheafdist_edge_bytes_total",
                      **edge_labels("W2", direction=direction, transport="remote")
                      ) == rounds * 8 * 1 * batch
        for edge in ("W1", "R1"):
            assert messages(final, edge, direction, "local") == rounds
            assert messages(final, edge, direction, "remote") == 0
    # the out edge is the pull towards the label: no messages at all
    assert all(messages(final, "out", d, t) == 0 for d in ("forward", "backward")
               for t in ("local", "remote"))

    # the last report is the run's final state
    assert set(result.discord) == set(EDGES)
    for edge, value in result.discord.items():
        assert sample(final, "sheafdist_edge_discord", **edge_labels(edge)) == value
    assert sample(final, "sheafdist_energy") == pytest.approx(result.energy,
                                                              rel=1e-12)


# ---------------------------------------------------------------- --address


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


@pytest.mark.parametrize(
    "address, words",
    [(f"127.0.0.1:{closed_port()}", "no Ray cluster answers there"),
     ("nosuchhost.invalid:6379", "no Ray cluster answers there"),
     ("garbage", "give the Ray head as host:port")],
)
def test_an_address_without_a_cluster_is_one_line_at_once(case241, tmp_path,
                                                          address, words):
    """ray.init retries an unreachable head for minutes: the CLI must not. The
    trace of an earlier run at --trace stays as it was."""
    import subprocess
    import sys

    _, files = case241
    trace = tmp_path / "earlier.trace"
    trace.write_bytes(b"\x81\xa4kind\xa7message")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sheafdist", "infer", "--model", files["model"],
         "--input", files["input"], "--steps", "3", "--engine", "ray",
         "--address", address, "--trace", str(trace)],
        capture_output=True, text=True, timeout=120)
    assert trace.read_bytes() == b"\x81\xa4kind\xa7message"
    assert not (tmp_path / "earlier.trace.part").exists()
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"sheafdist: error: --address: got '{address}'")
    assert words in lines[0]


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_like_ctrl_c(tmp_path):
    """SIGTERM (what a scheduler sends) stops `train` on Ray with exit 143 and a
    hint to resume, not a stack dump; --resume then finishes the run."""
    import signal
    import subprocess
    import sys

    folder = tmp_path / "run"
    argv = [sys.executable, "-m", "sheafdist", "train", "--engine", "ray",
            "--epochs", "40", "--steps-per-epoch", "200", "--n-train", "50",
            "--baseline", "none", "--checkpoint", str(folder)]
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while not (folder / "checkpoint.npz").exists():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = err.read_text()
    assert code == 143, text
    assert "SIGTERM received" not in text and "Traceback" not in text, text
    assert text.strip().splitlines()[-1] == "sheafdist: error: terminated (SIGTERM)"
    assert f"--resume {folder}" in text
    done = subprocess.run([sys.executable, "-m", "sheafdist", "train", "--resume",
                           str(folder), "--json"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 40 * 200
