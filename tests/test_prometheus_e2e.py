"""A real Prometheus scrapes a real ``sheafdist train --engine ray``.

The test starts ``prometheus`` on 127.0.0.1 with the scrape config of
``deploy/prometheus/prometheus.yml`` (its target moved to the run's port), runs a
short paraboloid training with ``--metrics-port``, and reads Prometheus's HTTP
API until the per-edge series have arrived: discord falling, counters rising,
bytes per message what the edge stalks weigh. Then it runs every query of the
Grafana dashboard against the live Prometheus, as Grafana would, and requires
each to return data. Prometheus and the run are stopped in every case.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sheafdist.json"
TRAIN = ["train", "--engine", "ray", "--epochs", "3", "--steps-per-epoch", "2000",
         "--no-checkpoint", "--baseline", "none"]
# the [2,30,1] paraboloid's edges, their stalk sizes, and its 300 training samples;
# the output edge ends at the label, which is no vertex, so no message crosses it
EDGE_DIMS = {"W1": 30, "R1": 30, "W2": 1, "out": 1}
MESSAGE_EDGES = ("W1", "R1", "W2")
BATCH = 300
JOB = 'job="sheafdist"'
MIN_SCRAPES = 8  # scrapes of a live run before the checks start
DATA_TIMEOUT = 75.0  # seconds from the start of the run to enough data
# Grafana's $__rate_interval is max($__interval + scrape, 4 * scrape) = 4 s for the
# 1 s timeInterval of the provisioned datasource; one more scrape of slack here
GRAFANA_BUILTINS = {"__rate_interval": "5s", "__interval": "1s", "__range": "1m"}
LATENCY = "sheafdist_edge_message_latency_seconds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def stop(proc: subprocess.Popen, first: int, grace: float) -> None:
    """Signal ``proc``'s own process group, then kill it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what it left behind, e.g. Ray's
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


class Prometheus:
    """The HTTP API of one Prometheus server."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> object:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # a bad query: say which and why
            pytest.fail(f"Prometheus refused {path} {params}: {exc.read().decode()}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        data = self.get("/api/v1/query", query=expr, time=at)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        data = self.get("/api/v1/query_range", query=expr, start=start, end=end,
                        step=1)
        return data["result"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


@pytest.fixture
def prometheus(tmp_path):
    """A Prometheus on 127.0.0.1 scraping 127.0.0.1:<port> every second, with the
    config of deploy/prometheus/prometheus.yml; yields it and the port."""
    binary = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    if binary is None:
        pytest.fail("the Prometheus server is not installed: this test runs a real "
                    "one. Install the Debian package (apt-get install prometheus), "
                    "as .ci/run does.", pytrace=False)
    metrics_port, web_port = free_port(), free_port()
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sheafdist"]
    assert job["scrape_interval"] == "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config_path}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        server = Prometheus(f"http://127.0.0.1:{web_port}")
        deadline = time.monotonic() + 30
        while not server.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not become ready:\n{tail(log)}")
            time.sleep(0.2)
        yield server, metrics_port
    finally:
        stop(proc, signal.SIGTERM, 10)


@pytest.fixture
def training(prometheus, tmp_path):
    """``python -m sheafdist train --engine ray ... --metrics-port <port>``."""
    _, port = prometheus
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # an embedded Ray, whatever the shell says
    out, err = tmp_path / "train.out", tmp_path / "train.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sheafdist", *TRAIN, "--metrics-port", str(port)],
            cwd=REPO, env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    proc.stderr_path = err  # for failure messages
    try:
        yield proc
    finally:
        stop(proc, signal.SIGINT, 20)  # KeyboardInterrupt: Ray shuts down cleanly


def values(series: dict) -> list[float]:
    return [float(v) for _, v in series["values"]]


def by_edge(result: list[dict]) -> dict[str, dict]:
    return {s["metric"]["edge"]: s for s in result}


def wait_for_data(prom: Prometheus, proc, start: float) -> float:
    """Poll until the run has been scraped ``MIN_SCRAPES`` times and has finished
    its first epoch; returns a time at which its series were live."""
    deadline = time.monotonic() + DATA_TIMEOUT
    seen = 0
    while time.monotonic() < deadline:
        now = time.time()
        rounds = prom.query_range(f"sheafdist_rounds_total{{{JOB}}} > 0", start, now)
        loss = prom.query_range(f"sheafdist_loss{{{JOB}}}", start, now)
        if rounds:
            seen = len(rounds[0]["values"])
            if seen >= MIN_SCRAPES and loss:
                return float(rounds[0]["values"][-1][0])
        if proc.poll() is not None:  # it ended before giving enough data
            break
        time.sleep(1)
    pytest.fail(f"after {DATA_TIMEOUT:.0f}s Prometheus holds {seen} scrapes of the "
                f"run (exit code {proc.poll()}); its stderr:\n"
                f"{tail(proc.stderr_path)}")


def test_prometheus_sees_the_run_and_every_panel_has_data(prometheus, training):
    prom, port = prometheus
    start = time.time() - 1
    at = wait_for_data(prom, training, start)

    def instant(expr: str) -> list[dict]:
        return prom.query(expr, at)

    def scalar(expr: str) -> float:
        (sample,) = instant(expr)
        return float(sample["value"][1])

    assert scalar(f"up{{{JOB}}}") == 1
    info = instant(f"sheafdist_run_info{{{JOB}}}")[0]["metric"]
    assert info["instance"] == f"127.0.0.1:{port}"
    assert (info["task"], info["engine"], info["arch"]) == ("paraboloid", "ray",
                                                           "2,30,1")
    assert scalar(f"sheafdist_actors_alive{{{JOB}}}") == 2  # one per layer block
    assert scalar(f"rate(sheafdist_rounds_total{{{JOB}}}[5s])") > 10
    assert 0 < scalar(f'sheafdist_loss{{{JOB}, method="sheaf", split="train"}}') < 100

    # discord falls on every edge while the stalks relax (and the weights learn)
    discord = by_edge(prom.query_range(f"sheafdist_edge_discord{{{JOB}}} > 0",
                                       start, at))
    assert set(discord) == set(EDGE_DIMS)
    for edge, series in discord.items():
        v = values(series)
        assert len(v) >= MIN_SCRAPES - 2, (edge, v)
        assert all(math.isfinite(x) for x in v), (edge, v)
        assert v[-1] < v[0], f"discord of {edge} did not fall: {v}"
    energy = values(prom.query_range(f"sheafdist_energy{{{JOB}}} > 0", start, at)[0])
    assert energy[-1] < 0.5 * energy[0], energy

    # counters only rise, and every edge between vertices carries messages
    rounds = values(prom.query_range(f"sheafdist_rounds_total{{{JOB}}}", start, at)[0])
    assert rounds == sorted(rounds) and rounds[-1] > rounds[0]
    messages = by_edge(prom.query_range(
        f"sum by (edge) (sheafdist_edge_messages_total{{{JOB}}})", start, at))
    assert set(messages) == set(EDGE_DIMS)
    for edge, series in messages.items():
        v = values(series)
        assert v == sorted(v), (edge, v)
        assert (v[-1] > v[0]) == (edge in MESSAGE_EDGES), (edge, v)
    # a message carries the edge stalk: dim x batch float64 values
    per_message = by_edge(instant(
        f"sum by (edge) (sheafdist_edge_bytes_total{{{JOB}}}) / "
        f"sum by (edge) (sheafdist_edge_messages_total{{{JOB}}})"))
    for edge in MESSAGE_EDGES:
        dim = EDGE_DIMS[edge]
        assert float(per_message[edge]["value"][1]) == 8 * dim * BATCH, edge
    remote = instant(f'sum(sheafdist_edge_messages_total{{{JOB}, transport="remote"}})')
    assert float(remote[0]["value"][1]) > 0  # two actors talk to each other
    # and their messages were timed: the latency histogram has observations
    assert scalar(f"sum({LATENCY}_count{{{JOB}}})") > 0

    shown = run_every_panel(prom, at, start, {"job": "sheafdist",
                                              "instance": f"127.0.0.1:{port}"})
    print("\n".join(shown))  # pytest -rP shows what the dashboard would show

    # serving the metrics did not get in the run's way
    try:
        code = training.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end:\n{tail(training.stderr_path)}")
    assert code == 0, tail(training.stderr_path)


def label_values(prom: Prometheus, definition: str, at: float) -> list[str]:
    """Grafana's ``label_values(selector, label)`` on the Prometheus API."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
    assert match, definition
    selector, label = match.groups()
    return prom.get(f"/api/v1/label/{label}/values", **{"match[]": selector},
                    start=at - 60, end=at)


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in {**variables, **GRAFANA_BUILTINS}.items():
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", value, expr)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def run_every_panel(
    prom: Prometheus, at: float, start: float, choose: dict[str, str]
) -> list[str]:
    """Each panel query as Grafana would send it, with the template variables
    set to ``choose`` (which their own queries must offer); each must return
    data."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        assert not var.get("multi") and not var.get("includeAll"), var["name"]
        options = label_values(prom, substitute(var["definition"], variables), at)
        assert choose[var["name"]] in options, (var["name"], options)
        # a single-value variable goes into the query as it is
        variables[var["name"]] = choose[var["name"]]
    observed = prom.query(f"sum({LATENCY}_count{{{JOB}}})", at)
    latency_measured = bool(observed) and float(observed[0]["value"][1]) > 0
    shown, checked = [], 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables)
            if target.get("instant"):
                result = prom.query(expr, at)
                points = {_legend(s): [float(s["value"][1])] for s in result}
            else:
                result = prom.query_range(expr, max(start, at - 60), at)
                points = {_legend(s): values(s) for s in result}
            assert points, f"panel {panel['title']!r}: no data for {expr}"
            finite = {k: [x for x in v if math.isfinite(x)] for k, v in points.items()}
            # a latency quantile is NaN while no message has been timed
            if LATENCY not in expr or latency_measured:
                assert any(finite.values()), \
                    f"panel {panel['title']!r}: only NaN for {expr}"
            last = ", ".join(f"{k} {v[-1]:.3g}" if v else f"{k} NaN"
                             for k, v in sorted(finite.items()))
            shown.append(f"{panel['title']} [{target['refId']}]: {last}")
            checked += 1
    assert checked == sum(len(p.get("targets", [])) for p in dashboard["panels"])
    return shown


def _legend(series: dict) -> str:
    metric = series["metric"]
    keys = [k for k in ("edge", "direction", "method", "split") if k in metric]
    return " ".join(metric[k] for k in keys) or metric.get("__name__", "value")
