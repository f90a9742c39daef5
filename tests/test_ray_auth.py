"""`--address` with a Ray cluster that uses token authentication (issue 7, part 6).

A real head node is started with ``RAY_AUTH_MODE=token`` on a free port and its
own temp dir, in its own process group (``ray start --head --block``); it is
stopped by signalling that group only, never by a global ``ray stop``. The CLI
runs as a subprocess: Ray reads the token from its environment.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TOKEN = "sheafdist-test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_auth() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}


@pytest.fixture(scope="module")
def token_cluster():
    port = free_port()
    temp = tempfile.mkdtemp(prefix="sdauth", dir="/tmp")  # short: socket paths
    env = without_auth() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--include-dashboard=false", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    pytest.fail("the token-authenticated Ray head did not start")
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        group = os.getpgid(head.pid)
        os.killpg(group, signal.SIGTERM)
        try:  # a throwaway head: no need to wait for Ray's orderly shutdown
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def files(tmp_path, golden_dir):
    with np.load(golden_dir / "inference_241.npz", allow_pickle=False) as f:
        g = {k: f[k] for k in f.files}
    np.savez(tmp_path / "m.npz", W1=g["W1"], b1=g["b1"], W2=g["W2"], b2=g["b2"],
             output=np.array("identity"))
    np.save(tmp_path / "x.npy", g["x"])
    return g, ["infer", "--model", str(tmp_path / "m.npz"), "--input",
               str(tmp_path / "x.npy"), "--init", "forward", "--tol", "1e-9",
               "--engine", "ray", "--json"]


def sheafdist(argv, env):
    return subprocess.run([sys.executable, "-m", "sheafdist", *argv], env=env,
                          capture_output=True, text=True, timeout=240)


def test_infer_joins_a_token_cluster_with_the_token(token_cluster, files):
    address, env = token_cluster
    g, argv = files
    done = sheafdist([*argv, "--address", address], env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["converged"] and report["error"] < 1e-8


def test_without_the_token_the_error_says_so(token_cluster, files):
    address, _ = token_cluster
    _, argv = files
    done = sheafdist([*argv, "--address", address], without_auth())
    assert done.returncode == 2
    # Ray logs its refusals first; the last line is ours, naming the fix
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sheafdist: error: --address: got '{address}'")
    assert "RAY_AUTH_MODE=token" in last and "RAY_AUTH_TOKEN" in last
    assert "Traceback" not in done.stderr
