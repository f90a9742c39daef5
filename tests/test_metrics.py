"""The per-edge Prometheus series: values, accumulation, exposition, bad input."""

from __future__ import annotations

import logging
import math
import socket
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sheafdist.errors import InputError
from sheafdist.metrics import LATENCY_BUCKETS, RunMetrics, series_count
from sheafdist.rules import RoundStats
from sheafdist.sheaf import build_graph

EDGES_2_6_4_4_1 = {
    "W1": ("affine", "1"), "R1": ("relu", "1"),
    "W2": ("affine", "2"), "R2": ("relu", "2"),
    "W3": ("affine", "3"), "R3": ("relu", "3"),
    "W4": ("affine", "4"),
}


@pytest.fixture
def made():
    """Build RunMetrics on fresh registries and close every one afterwards."""
    built: list[RunMetrics] = []

    def make(arch, output="identity", **kw):
        m = RunMetrics(build_graph(arch, output), CollectorRegistry(), **kw)
        built.append(m)
        return m

    yield make
    for m in built:
        m.close()


def value(m: RunMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def edge(name: str, kind: str, layer: int | str, **more) -> dict[str, str]:
    return {"edge": name, "kind": kind, "layer": str(layer), **more}


def edge_samples(m: RunMetrics) -> list:
    return [
        s for fam in m.registry.collect() for s in fam.samples if "edge" in s.labels
    ]


def stats(discord, flips=None, update_norm=None) -> RoundStats:
    return RoundStats(
        max_change=0.1, discord=dict(discord), flips=dict(flips or {}),
        update_norm=dict(update_norm or {}),
    )


def test_every_edge_has_a_series_from_the_start(made):
    m = made([2, 6, 4, 4, 1])
    for name, (kind, layer) in EDGES_2_6_4_4_1.items():
        labels = edge(name, kind, layer)
        assert value(m, "sheafdist_edge_discord", **labels) == 0.0
        for d in ("forward", "backward"):
            for t in ("local", "remote"):
                more = dict(labels, direction=d, transport=t)
                assert value(m, "sheafdist_edge_messages_total", **more) == 0.0
                assert value(m, "sheafdist_edge_bytes_total", **more) == 0.0
        flips = value(m, "sheafdist_edge_mask_flips_total", **labels)
        assert (flips == 0.0) if kind == "relu" else (flips is None)
        # inference: no weight updates, so no update-norm series
        assert value(m, "sheafdist_edge_weight_update_norm", **labels) is None
    assert {s.labels["edge"] for s in edge_samples(m)} == set(EDGES_2_6_4_4_1)


class Clock:
    """A stand-in for time.monotonic in sheafdist.metrics."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("sheafdist.metrics.time.monotonic", c)
    return c


def test_observe_sets_gauges_and_accumulates_counters(made, clock):
    m = made([2, 30, 1])
    disc = {"W1": 0.5, "R1": 0.25, "W2": 1.0}
    m.observe(10, stats(disc, flips={"R1": 3}), {
        ("W1", "forward", "local"): [10, 4800],
        ("W1", "backward", "local"): [10, 4800],
        ("R1", "forward", "remote"): [10, 2400],
    })
    clock.now += 0.5
    m.observe(25, stats({"W1": 0.125, "R1": 0.0625, "W2": 0.5}, flips={"R1": 2}), {
        ("W1", "forward", "local"): [15, 7200],
        ("R1", "forward", "remote"): [15, 3600],
    })
    assert value(m, "sheafdist_edge_discord", **edge("W1", "affine", 1)) == 0.125
    assert value(m, "sheafdist_edge_discord", **edge("R1", "relu", 1)) == 0.0625
    assert value(m, "sheafdist_edge_discord", **edge("W2", "affine", 2)) == 0.5
    assert value(m, "sheafdist_energy") == pytest.approx(0.5 * (0.125 + 0.0625 + 0.5))
    w1f = edge("W1", "affine", 1, direction="forward", transport="local")
    assert value(m, "sheafdist_edge_messages_total", **w1f) == 25
    assert value(m, "sheafdist_edge_bytes_total", **w1f) == 12000
    w1b = edge("W1", "affine", 1, direction="backward", transport="local")
    assert value(m, "sheafdist_edge_messages_total", **w1b) == 10
    r1 = edge("R1", "relu", 1, direction="forward", transport="remote")
    assert value(m, "sheafdist_edge_messages_total", **r1) == 25
    assert value(m, "sheafdist_edge_bytes_total", **r1) == 6000
    r1_local = dict(r1, transport="local")
    assert value(m, "sheafdist_edge_messages_total", **r1_local) == 0
    assert value(m, "sheafdist_edge_mask_flips_total", **edge("R1", "relu", 1)) == 5
    assert value(m, "sheafdist_rounds_total") == 25
    assert value(m, "sheafdist_rounds_per_second") == 15 / 0.5


def test_rounds_per_second_ignores_closing_reports(made, clock):
    m = made([2, 30, 1])

    def at(t: float, rounds: int) -> float:
        clock.now = 100.0 + t
        m.observe(rounds, stats({}), {})
        return value(m, "sheafdist_rounds_per_second")

    assert at(0.0, 0) == 0
    assert at(0.5, 100) == 200
    assert at(0.51, 100) == 200  # an engine's closing report, no new rounds
    assert at(0.6, 110) == 200  # too soon for a new rate
    assert at(1.0, 300) == 400  # 200 rounds in the 0.5 s since the last rate
    assert at(1.9, 300) == 400  # a short pause, e.g. between epochs
    assert at(2.0, 300) == 0  # a second without progress: stalled
    assert at(2.5, 10) == 20  # a new engine counts from zero


def test_rounds_restart_counts_the_new_run(made):
    m = made([2, 30, 1])
    m.observe(40, stats({}), {})
    m.observe(40, stats({}), {})  # a final report with no new rounds
    assert value(m, "sheafdist_rounds_total") == 40
    assert value(m, "sheafdist_rounds_per_second") == 0
    m.observe(7, stats({}), {})  # a new engine counts from zero
    assert value(m, "sheafdist_rounds_total") == 47


def test_training_adds_the_output_edge_and_update_norms(made):
    m = made([2, 30, 1], training_output=True)
    out = edge("out", "output", 2)
    assert value(m, "sheafdist_edge_discord", **out) == 0.0
    assert value(m, "sheafdist_edge_weight_update_norm", **edge("W1", "affine", 1)) == 0
    m.observe(
        5, stats({"W1": 1.0, "R1": 1.0, "W2": 1.0, "out": 2.0},
                 update_norm={"W1": 0.03, "W2": 0.01}), {},
    )
    assert value(m, "sheafdist_edge_discord", **out) == 2.0
    assert value(m, "sheafdist_energy") == 2.5
    w2 = edge("W2", "affine", 2)
    assert value(m, "sheafdist_edge_weight_update_norm", **w2) == 0.01
    # a sigmoid graph already has its out edge: not duplicated
    s = made([2, 30, 1], output="sigmoid", training_output=True)
    outs = [x for x in edge_samples(s) if x.name == "sheafdist_edge_discord"
            and x.labels["edge"] == "out"]
    assert len(outs) == 1


def feed(
    m: RunMetrics, batch: int, reports: int, training: bool, per_report: int = 50
) -> None:
    """``reports`` observer calls shaped like a real run's with ``batch`` samples:
    every statistic of every edge (update norms in training only), latencies
    spread over all the buckets, and the four losses."""
    rng = np.random.default_rng(batch + reports)
    edges = m.edges.values()
    for r in range(1, reports + 1):
        latency = {e.name: list(10.0 ** rng.uniform(-5, 1.5, per_report))
                   for e in edges}
        report = RoundStats(
            max_change=0.1,
            discord={e.name: float(rng.random()) for e in edges},
            flips={e.name: batch for e in edges if e.kind == "relu"},
            update_norm={e.name: 0.01 for e in edges
                         if training and e.kind == "affine"},
            latency=latency,
            staleness={e.name: r % 3 for e in edges},
        )
        traffic = {
            (e.name, d, t): [per_report, per_report * 8 * e.dim * batch]
            for e in edges for d in ("forward", "backward")
            for t in ("local", "remote")
        }
        m.observe(r * per_report, report, traffic)
    for method in ("sheaf", "sgd"):
        for split in ("train", "test"):
            m.set_loss(method, split, 0.5)
    m.set_actors(3)


# series per edge: discord, messages and bytes (2 directions x 2 transports each),
# staleness, and the latency histogram (its buckets, +Inf, _sum and _count)
PER_EDGE = 1 + 4 + 4 + 1 + len(LATENCY_BUCKETS) + 3
# per run: energy, rounds, rounds per second, actors, run info and four losses
PER_RUN = 5 + 4


def expected_series(depth: int, training: bool) -> int:
    """``depth`` affine edges, ``depth - 1`` ReLU edges (each with its flips),
    and in training the output edge and an update norm per affine edge."""
    edges = 2 * depth - 1 + training
    return PER_EDGE * edges + (depth - 1) + training * depth + PER_RUN


@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
def test_series_count_depends_only_on_depth(made, training):
    def count(arch, batch=10, reports=1):
        m = made(arch, training_output=training)
        feed(m, batch, reports, training)
        return series_count(m.registry)

    base = count([2, 30, 1])
    assert base == expected_series(2, training)
    assert count([2, 300, 1]) == base  # width
    assert count([7, 30, 4]) == base  # input and output sizes
    assert count([2, 30, 1], batch=1000) == base  # batch
    assert count([2, 30, 1], reports=300) == base  # length of the run
    for depth in (1, 3, 5, 10):
        arch = [2] + [16] * (depth - 1) + [1]
        assert count(arch, reports=3) == expected_series(depth, training)
    # the numbers quoted for issue 5: a training run of [2,30,1] and of ten
    # affine layers (nine hidden ReLU layers of 30), with the SGD baseline
    ten_layers = [2] + [30] * 9 + [1]
    assert (base, count(ten_layers)) == ((97, 569) if not training else (128, 608))


def test_exposition_has_no_created_series(made):
    m = made([2, 30, 1], training_output=True)
    feed(m, 10, 2, training=True)
    text = _exposition(m)
    assert "_created" not in text
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert len(samples) == series_count(m.registry) == expected_series(2, True)
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"sheafdist_edge_message_latency_seconds",
            "sheafdist_edge_staleness_rounds"} <= families


def test_latency_histogram_observes_every_sample(made, caplog):
    caplog.set_level(logging.WARNING, logger="sheafdist.metrics")
    m = made([2, 30, 1])
    w1 = edge("W1", "affine", 1)
    name = "sheafdist_edge_message_latency_seconds"
    assert value(m, f"{name}_count", **w1) == 0  # every edge from the start
    first = [0.0004, 0.0008, 0.003]
    m.observe(1, RoundStats(latency={"W1": first, "R1": [20.0]}), {})
    m.observe(2, RoundStats(latency={"W1": [2.0, -0.001, float("nan")]}), {})
    assert value(m, f"{name}_count", **w1) == 4
    assert value(m, f"{name}_sum", **w1) == pytest.approx(sum(first) + 2.0)
    buckets = {"0.0005": 1, "0.001": 2, "0.0025": 2, "0.005": 3, "1.0": 3,
               "2.5": 4, "+Inf": 4}
    for le, n in buckets.items():
        assert value(m, f"{name}_bucket", **w1, le=le) == n
    r1 = edge("R1", "relu", 1)
    assert value(m, f"{name}_bucket", **r1, le="10.0") == 0
    assert value(m, f"{name}_bucket", **r1, le="+Inf") == 1
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "W1" in warned[0] and "2 samples" in warned[0]


def test_staleness_gauge(made, caplog):
    caplog.set_level(logging.WARNING, logger="sheafdist.metrics")
    m = made([2, 30, 1])
    name = "sheafdist_edge_staleness_rounds"
    for e, (kind, layer) in {"W1": ("affine", 1), "R1": ("relu", 1)}.items():
        assert value(m, name, **edge(e, kind, layer)) == 0  # sync mode: 0
    m.observe(1, RoundStats(staleness={"W1": 3, "R1": 1}), {})
    m.observe(2, RoundStats(staleness={"W1": 2, "R1": -1, "W7": 4}), {})
    assert value(m, name, **edge("W1", "affine", 1)) == 2  # the latest, not a max
    assert value(m, name, **edge("R1", "relu", 1)) == 1  # -1 is refused
    assert value(m, name, **edge("W7", "affine", 7)) is None
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "staleness/R1" in warned and "'W7'" in warned


def test_non_finite_values_are_not_written(made, caplog):
    m = made([2, 30, 1])
    m.observe(1, stats({"W1": 0.5, "R1": 0.5, "W2": 0.5}), {})
    caplog.set_level(logging.WARNING, logger="sheafdist.metrics")
    for r in (2, 3):
        m.observe(r, stats({"W1": float("nan"), "R1": float("inf"), "W2": 0.25}), {})
    assert value(m, "sheafdist_edge_discord", **edge("W1", "affine", 1)) == 0.5
    assert value(m, "sheafdist_edge_discord", **edge("R1", "relu", 1)) == 0.5
    assert value(m, "sheafdist_edge_discord", **edge("W2", "affine", 2)) == 0.25
    assert value(m, "sheafdist_energy") == 0.75  # the energy is NaN too: kept
    m.set_loss("sheaf", "train", float("nan"))
    assert value(m, "sheafdist_loss", method="sheaf", split="train") is None
    warned = [r.getMessage() for r in caplog.records]
    assert sum("W1" in w for w in warned) == 1  # once, not every report
    assert any("R1" in w for w in warned)
    exposed = text_string_to_metric_families(_exposition(m))
    assert all(math.isfinite(s.value) for f in exposed for s in f.samples)


def test_unknown_edges_are_not_recorded(made, caplog):
    caplog.set_level(logging.WARNING, logger="sheafdist.metrics")
    m = made([2, 30, 1])
    traffic = {("n17", "forward", "local"): [1, 8]}
    m.observe(1, stats({"W9": 1.0}, flips={"W1": 4}), traffic)
    assert {s.labels["edge"] for s in edge_samples(m)} == {"W1", "R1", "W2"}
    w9 = edge("W9", "affine", 9)
    assert value(m, "sheafdist_edge_discord", **w9) is None
    w1 = edge("W1", "affine", 1)
    assert value(m, "sheafdist_edge_mask_flips_total", **w1) is None
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "'W9'" in warned and "'n17'" in warned and "'W1'" in warned


def test_loss_actors_and_run_info(made):
    m = made([2, 30, 1], run={"engine": "local", "arch": "2,30,1"})
    m.set_loss("sheaf", "train", 0.5)
    m.set_loss("sgd", "test", 0.25)
    m.set_actors(3)
    assert value(m, "sheafdist_loss", method="sheaf", split="train") == 0.5
    assert value(m, "sheafdist_loss", method="sgd", split="test") == 0.25
    assert value(m, "sheafdist_actors_alive") == 3
    assert value(m, "sheafdist_run_info", engine="local", arch="2,30,1") == 1
    with pytest.raises(ValueError, match="method"):
        m.set_loss("adam", "train", 1.0)
    with pytest.raises(ValueError, match="label names"):
        made([2, 30, 1], run={"bad key": "x"})


def test_default_registry_is_fresh_not_global():
    from prometheus_client import REGISTRY

    m = RunMetrics(build_graph([2, 30, 1]))
    assert m.registry is not REGISTRY
    assert REGISTRY.get_sample_value("sheafdist_energy") is None


def _exposition(m: RunMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_serve_exposes_every_edge(made):
    m = made([2, 6, 4, 4, 1])
    port = m.serve(0)
    assert port > 0
    m.observe(4, stats({"W1": 0.5}), {("W2", "backward", "local"): [4, 128]})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        body = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    discord = {
        s.labels["edge"]: s.labels for s in families["sheafdist_edge_discord"].samples
    }
    for name, (kind, layer) in EDGES_2_6_4_4_1.items():
        assert discord[name] == edge(name, kind, layer)
    messages = {
        (s.labels["edge"], s.labels["direction"], s.labels["transport"]): s.value
        for s in families["sheafdist_edge_messages"].samples
        if s.name == "sheafdist_edge_messages_total"
    }
    assert len(messages) == 4 * len(EDGES_2_6_4_4_1)
    assert messages[("W2", "backward", "local")] == 4
    flips = {s.labels["edge"] for s in families["sheafdist_edge_mask_flips"].samples}
    assert flips == {"R1", "R2", "R3"}


def test_serve_on_a_taken_port_is_an_input_error(made):
    m = made([2, 30, 1])
    port = m.serve(0)
    with pytest.raises(InputError, match="--metrics-port") as info:
        made([2, 30, 1]).serve(port)
    assert str(port) in str(info.value) and "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(InputError, match="--metrics-port"):
        m.serve(port)  # the same object cannot bind its own port twice
    with pytest.raises(InputError, match="0 to 65535"):
        m.serve(70000)


def test_close_stops_the_server(made):
    m = made([2, 30, 1])
    port = m.serve(0)
    m.close()
    m.close()  # twice is fine
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_local_engine_reports_into_the_metrics(made, caplog):
    from sheafdist.engines.local import LocalEngine
    from sheafdist.model import he_init
    from sheafdist.problem import training_problem
    from sheafdist.rules import Config

    caplog.set_level(logging.WARNING, logger="sheafdist.metrics")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 20)), rng.normal(size=(1, 20))
    problem = training_problem(he_init([2, 6, 1], 0), x, y, Config(1.0, 0.01, 0.05))
    m = RunMetrics(problem.graph, CollectorRegistry(), training_output=True)
    result = LocalEngine(problem, observer=m.observe).run(50)
    assert value(m, "sheafdist_rounds_total") == 50
    assert value(m, "sheafdist_energy") == pytest.approx(result.energy)
    w2f = edge("W2", "affine", 2, direction="forward", transport="local")
    assert value(m, "sheafdist_edge_messages_total", **w2f) == 50
    assert value(m, "sheafdist_edge_bytes_total", **w2f) == 50 * 1 * 20 * 8
    assert value(m, "sheafdist_edge_discord", **edge("out", "output", 2)) > 0
    assert value(m, "sheafdist_edge_weight_update_norm", **edge("W1", "affine", 1)) > 0
    assert not caplog.records  # every reported edge is a known one


def test_serve_on_a_bad_host_names_metrics_host(made):
    m = made([2, 30, 1])
    for host in ("no-such-host.invalid", "192.0.2.1"):  # unresolvable; not ours
        with pytest.raises(InputError, match="--metrics-host") as info:
            m.serve(0, host)
        assert host in str(info.value) and "0.0.0.0" in str(info.value)


def test_traffic_between_pairs_of_actors_accumulates(made):
    m = made([2, 6, 4, 4, 1])
    first = RoundStats(pairs={(0, 1): [3, 300], (1, 0): [3, 120], (1, 1): [6, 48]})
    m.observe(3, first, {})
    m.observe(5, RoundStats(pairs={(0, 1): [2, 200]}), {})
    assert value(m, "sheafdist_actor_messages_total", src_actor="0",
                 dst_actor="1") == 5
    assert value(m, "sheafdist_actor_bytes_total", src_actor="0",
                 dst_actor="1") == 500
    assert value(m, "sheafdist_actor_bytes_total", src_actor="1",
                 dst_actor="0") == 120
    assert value(m, "sheafdist_actor_messages_total", src_actor="1",
                 dst_actor="1") == 6
    # a pair never reported has no series (the local engine reports none)
    assert value(m, "sheafdist_actor_messages_total", src_actor="2",
                 dst_actor="0") is None
