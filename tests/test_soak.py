"""Load (issue 7, part 7): asynchronous training on one actor per vertex for a few
minutes, sampling what could leak: the driver's and the actors' memory, the
number of metric series served, the calls in flight between actors (sent but not
yet received, from the actors' own counts) and how stale the values they use get.

``SHEAFDIST_SOAK_SECONDS`` sets the length (default 90; longer runs found
nothing more).
"""

import os
import threading
import time
import urllib.request

import numpy as np
import pytest

from sheafdist.engines import make_engine
from sheafdist.engines.ray_engine import DRIVER_CALLS, MAX_PENDING_CALLS
from sheafdist.metrics import RunMetrics
from sheafdist.model import he_init
from sheafdist.problem import training_problem
from sheafdist.rules import Config
from sheafdist.tasks import make_task

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("SHEAFDIST_SOAK_SECONDS", "90"))
SAMPLE_SECONDS = 5.0
MAX_STALENESS = 2
MiB = 1 << 20


def rss(pid: int | str = "self") -> int:
    """Resident memory of a process on this machine, in bytes (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def series(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_async_training_stays_bounded(ray_session):
    data = make_task("paraboloid", 42, 100, 0)
    model = he_init([2, 30, 30, 1], 0)
    problem = training_problem(model, data.X_train, data.Y_train,
                               Config(dt=0.005, beta=1 / 100), "forward", 0)
    metrics = RunMetrics(problem.graph, run={"command": "soak"},
                         training_output=True)
    port = metrics.serve(0)
    seen = {"staleness": 0, "rounds": 0}

    def observe(rounds, stats, traffic):
        metrics.observe(rounds, stats, traffic)
        seen["rounds"] = rounds
        if stats.staleness:
            seen["staleness"] = max(seen["staleness"], max(stats.staleness.values()))

    engine = make_engine("ray", problem, observer=observe, partition="vertex",
                         mode="async", max_staleness=MAX_STALENESS)
    pids = [p["pid"] for p in engine.placement]
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(SAMPLE_SECONDS):
            samples.append({
                "t": time.monotonic() - start, "rounds": seen["rounds"],
                "driver": rss(), "actors": sum(rss(p) for p in pids),
                "series": series(port), "staleness": seen["staleness"],
                "in_flight": engine.calls["sent"] - engine.calls["received"],
            })

    start = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runs = 0
    try:
        metrics.set_actors(len(pids))
        while time.monotonic() - start < SECONDS:
            result = engine.run(500)  # an epoch: the driver's call and collect
            runs += 1
            assert np.isfinite(result.energy)
            metrics.set_loss("sheaf", "train", float(result.energy))
    finally:
        stop.set()
        sampler.join(30)
        engine.close()
        metrics.close()

    for s in samples:  # the record, for the report (pytest -s shows it)
        print(f"soak t={s['t']:5.0f}s rounds={s['rounds']:7d} driver="
              f"{s['driver'] / MiB:6.1f}MiB actors={s['actors'] / MiB:7.1f}MiB "
              f"series={s['series']} staleness<={s['staleness']} "
              f"in_flight={s['in_flight']}")
    assert len(samples) >= 9 and runs >= 3
    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]
    # the rounds went on all along
    assert last[-1]["rounds"] > first[-1]["rounds"] > 0
    # labels are bounded by the graph: the series are the same at every scrape
    assert {s["series"] for s in samples[1:]} == {samples[1]["series"]}
    for key, slack in (("driver", 20 * MiB), ("actors", 40 * MiB)):
        before = max(s[key] for s in first)
        after = max(s[key] for s in last)
        assert after <= 1.2 * before + slack, (key, before / MiB, after / MiB)
    # calls do not pile up: never more in flight than Ray's bound per ordered
    # pair of neighbours, and no more at the end than at the start
    pairs = 2 * (len(pids) - 1)
    assert engine.max_in_flight <= pairs * (MAX_PENDING_CALLS + DRIVER_CALLS)
    assert max(s["in_flight"] for s in last) <= max(
        max(s["in_flight"] for s in first), pairs * (MAX_STALENESS + 2))
