"""``sheafdist top`` against a real ``/metrics`` endpoint served by RunMetrics."""

from __future__ import annotations

import http.server
import io
import re
import socket
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sheafdist.cli import main
from sheafdist.metrics import RunMetrics
from sheafdist.rules import RoundStats
from sheafdist.sheaf import build_graph
from sheafdist.top import parse, render

EDGES = {"W1": 30, "R1": 30, "W2": 1, "out": 1}  # [2,30,1] training: edge dims
BATCH = 300


def report(m: RunMetrics, rounds: int, per_report: int, discord: float) -> None:
    """One observer call: ``per_report`` rounds of every edge, both directions,
    W-edges between actors, ReLU and output edges inside one."""
    traffic = {}
    for edge, dim in EDGES.items():
        transport = "remote" if edge.startswith("W") else "local"
        for direction in ("forward", "backward"):
            traffic[(edge, direction, transport)] = [per_report,
                                                     per_report * 8 * dim * BATCH]
    stats = RoundStats(
        discord={e: discord for e in EDGES}, flips={"R1": 2},
        latency={"W1": [0.002] * per_report, "W2": [0.004] * per_report},
        staleness={e: 0 for e in EDGES},
    )
    m.observe(rounds, stats, traffic)


@pytest.fixture
def live():
    """A served RunMetrics fed by a thread, like a running training."""
    m = RunMetrics(build_graph([2, 30, 1]), CollectorRegistry(),
                   run={"command": "train", "task": "paraboloid", "arch": "2,30,1",
                        "engine": "ray", "partition": "layer"},
                   training_output=True)
    port = m.serve(0)
    m.set_actors(2)
    m.set_loss("sheaf", "train", 1.25)
    stop = threading.Event()

    def feed() -> None:
        rounds, discord = 0, 1.0
        while not stop.wait(0.02):
            rounds += 10
            discord *= 0.99
            report(m, rounds, 10, discord)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    yield m, f"http://127.0.0.1:{port}/metrics"
    stop.set()
    thread.join(timeout=5)
    m.close()


def rows(table: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in table.splitlines()
            if line.split() and line.split()[0] in EDGES}


def test_once_prints_every_edge_with_live_rates(live, capsys):
    _, url = live
    assert main(["top", "--url", url, "--once", "--interval", "0.3"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "task paraboloid" in out and "arch 2,30,1" in out
    assert "loss sheaf train 1.25" in out and "actors 2" in out
    table = rows(out)
    assert list(table) == ["W1", "R1", "W2", "out"]  # by layer, then kind
    for edge, cells in table.items():
        _, kind, layer, discord, msgs, remote, nbytes, latency, stale = cells
        assert 0 < float(discord) < 1
        assert float(msgs) > 0  # exact rates: the next test
        assert (float(remote) > 0) == edge.startswith("W")
        assert nbytes[-1] in "kMG" or float(nbytes) > 0
        assert latency == {"W1": "2.0ms", "W2": "4.0ms"}.get(edge, "-")
        assert stale == "0"
    rps = float(re.search(r"rounds/s (\d+)", out).group(1))
    assert 0 < rps < 1000  # 10 rounds every 20 ms at most, give or take a poll


def test_rates_are_counter_increases_over_the_interval():
    m = RunMetrics(build_graph([2, 30, 1]), CollectorRegistry(),
                   training_output=True)
    report(m, 100, 100, 0.5)
    before = parse(generate_latest(m.registry).decode(), now=10.0)
    report(m, 300, 200, 0.25)
    after = parse(generate_latest(m.registry).decode(), now=12.0)
    table = rows(render(before, after))
    # 200 rounds in 2 s, two directions: 200 messages/s of 30x300 (W1) or 1x300
    # (out) float64 values
    assert table["W1"][3:8] == ["0.25", "200", "200", "14.4M", "2.0ms"]
    assert table["out"][3:8] == ["0.25", "200", "0", "480.0k", "-"]
    assert "rounds/s 100" in render(before, after)


def test_a_refused_connection_is_one_line_and_exit_2(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    assert main(["top", "--url", url, "--once"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("sheafdist: error: --url: got")
    assert str(port) in err and "--metrics-port" in err


@pytest.mark.parametrize("url", ["127.0.0.1:9464/metrics", "ftp://host/metrics",
                                 "http://[::1/metrics"])
def test_a_bad_url_is_one_line_and_exit_2(url, capsys):
    assert main(["top", "--url", url, "--once", "--interval", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--url" in err


def test_an_endpoint_that_is_not_sheafdist_is_refused(capsys):
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = b"<html>not metrics</html>" if self.path == "/" else \
                b"# TYPE other_total counter\nother_total 3\n"
            self.send_response(200 if self.path in ("/", "/other") else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        for path, why in (("/", "not a Prometheus"), ("/other", "no sheafdist_"),
                          ("/missing", "HTTP 404")):
            assert main(["top", "--url", base + path, "--once"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and why in err, err
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_bad_interval_is_a_usage_error(capsys):
    assert main(["top", "--interval", "0"]) == 2
    err = capsys.readouterr().err
    assert "--interval" in err and err.count("\n") == 1


def test_watching_stops_cleanly_when_the_run_ends(live, capsys, monkeypatch):
    m, url = live
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)

    def end_the_run() -> None:  # after two refreshes its endpoint goes away
        deadline = time.monotonic() + 30
        while screen.getvalue().count("sheafdist top") < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        m.close()

    closer = threading.Thread(target=end_the_run, daemon=True)
    closer.start()
    assert main(["top", "--url", url, "--interval", "0.2"]) == 0
    closer.join(timeout=5)
    assert screen.getvalue().count("sheafdist top") >= 2
    err = capsys.readouterr().err
    assert "stopped answering" in err and err.count("\n") == 1
