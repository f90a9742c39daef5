"""Per-edge Prometheus metrics of one run, and the ``/metrics`` endpoint.

:class:`RunMetrics` is an engine observer: the engine calls it about every
``REPORT_SECONDS`` with the cumulative round count, the latest round's
:class:`~sheafdist.rules.RoundStats` and the :class:`~sheafdist.rules.Traffic`
since the previous call. It writes into its own ``CollectorRegistry`` (a fresh one
unless given), never into the global one.

Every per-edge series carries exactly the labels ``edge``, ``kind`` and ``layer``
(plus ``direction`` and ``transport`` on the traffic counters, and ``le`` on the
latency buckets, which are fixed). All of them are created up front for every
edge of the graph, so the first scrape already shows every edge, and their number
depends only on the depth of the network: no label ever holds a neuron, a sample
or a message id. :func:`series_count` gives that number.

The ``*_created`` samples that ``prometheus_client`` adds to counters and
histograms are left out of the exposition: Prometheus 2 stores each of them as a
series of its own, which would add a third to the count and nothing to a panel.

A value that is not finite is never written: the update is skipped and a warning
is logged once per series.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import socket
import threading
import time
from types import TracebackType

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from .errors import InputError
from .rules import RoundStats, Traffic
from .sheaf import Edge, SheafGraph

log = logging.getLogger(__name__)

EDGE_LABELS = ("edge", "kind", "layer")
DIRECTIONS = ("forward", "backward")
TRANSPORTS = ("local", "remote")
METHODS = ("sheaf", "sgd")
SPLITS = ("train", "test")
MAX_RUN_KEYS = 16  # sheafdist_run_info is one series; keep its label set small
MAX_RUN_VALUE = 200  # characters kept of each run_info value
# message latency buckets in seconds: a Ray call takes about 0.5-1 ms on a small
# machine (DESIGN.md), a stalled or remote one up to seconds; fixed, so the series
# count never depends on what was measured
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
RATE_SECONDS = 1.0  # a pause this long shows as 0 rounds per second
MIN_RATE_SECONDS = 0.25  # the shortest time a rate is taken over
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class RunMetrics:
    """The Prometheus series of one run over ``graph``.

    ``run`` is a small dict of strings (engine, partition, arch, ...) exposed as
    ``sheafdist_run_info``; its keys must be label names and there are at most
    ``MAX_RUN_KEYS`` of them. ``training_output`` marks a training run: it adds
    the ``out`` edge (kind ``output``, the pull towards the label) when the graph
    has none, and creates the weight-update-norm series of the affine edges up
    front (otherwise they appear on the first reported update).
    """

    def __init__(
        self,
        graph: SheafGraph,
        registry: CollectorRegistry | None = None,
        run: dict[str, str] | None = None,
        training_output: bool = False,
    ):
        self.registry = CollectorRegistry() if registry is None else registry
        # the metrics live in a private registry that ``self.registry`` reads
        # through a filter dropping the *_created samples (see the module doc)
        own = CollectorRegistry()
        self.edges: dict[str, Edge] = dict(graph.edges)
        if training_output and "out" not in self.edges:
            K = graph.depth
            self.edges["out"] = Edge(
                "out", "output", K, f"z{K}", "target", graph.arch[K]
            )
        self._servers: list[tuple[object, threading.Thread]] = []
        self._warned: set[tuple[str, ...]] = set()
        self._last_rounds: int | None = None
        # rounds since the rate was last set, and when that was
        self._rate_rounds, self._rate_time = 0, 0.0

        reg = own
        self.discord = Gauge(
            "sheafdist_edge_discord",
            "Discord of the edge in the latest reported round: the squared norm of "
            "its discrepancy F_head(x_head) - F_tail(x_tail), averaged over the batch.",
            EDGE_LABELS, registry=reg,
        )
        self.messages = Counter(
            "sheafdist_edge_messages_total",
            "Edge-value messages sent along the edge, by direction (forward: tail to "
            "head) and transport (local: inside one process, remote: between actors).",
            EDGE_LABELS + ("direction", "transport"), registry=reg,
        )
        self.bytes = Counter(
            "sheafdist_edge_bytes_total",
            "Payload bytes of the edge-value messages sent along the edge, by "
            "direction and transport.",
            EDGE_LABELS + ("direction", "transport"), registry=reg,
        )
        self.flips = Counter(
            "sheafdist_edge_mask_flips_total",
            "ReLU mask entries that changed, summed over the reported rounds only "
            "(one round per observer call): a sample of the flip rate, not every flip.",
            EDGE_LABELS, registry=reg,
        )
        self.update_norm = Gauge(
            "sheafdist_edge_weight_update_norm",
            "Frobenius norm of the latest reported update of the edge's [W, b] "
            "(training only).",
            EDGE_LABELS, registry=reg,
        )
        self.latency = Histogram(
            "sheafdist_edge_message_latency_seconds",
            "Time from sending an edge-value message to its receipt, in seconds, "
            "for the messages that crossed between actors (Ray engine).",
            EDGE_LABELS, registry=reg, buckets=LATENCY_BUCKETS,
        )
        self.staleness = Gauge(
            "sheafdist_edge_staleness_rounds",
            "How many rounds old the neighbour value used along the edge in the "
            "latest reported round was (async mode; 0 in sync mode).",
            EDGE_LABELS, registry=reg,
        )
        self.pair_messages = Counter(
            "sheafdist_actor_messages_total",
            "Edge-value messages from one actor to another (Ray engine); "
            "src_actor = dst_actor counts the values that stayed inside one actor.",
            ("src_actor", "dst_actor"), registry=reg,
        )
        self.pair_bytes = Counter(
            "sheafdist_actor_bytes_total",
            "Payload bytes of the edge-value messages from one actor to another "
            "(Ray engine).",
            ("src_actor", "dst_actor"), registry=reg,
        )
        self.energy = Gauge(
            "sheafdist_energy",
            "Dirichlet energy per sample in the latest reported round: half the sum "
            "of the edge discords.",
            registry=reg,
        )
        self.rounds = Counter(
            "sheafdist_rounds_total", "Rounds taken by the run.", registry=reg
        )
        self.rounds_per_second = Gauge(
            "sheafdist_rounds_per_second",
            "Rounds per second over the latest second or more of the run.",
            registry=reg,
        )
        self.loss = Gauge(
            "sheafdist_loss",
            "Latest training or test loss, by method (sheaf or the sgd baseline) "
            "and split.",
            ("method", "split"), registry=reg,
        )
        self.actors = Gauge(
            "sheafdist_actors_alive", "Ray actors of the run that are alive.",
            registry=reg,
        )
        self.info = Info(
            "sheafdist_run", "Settings of the run (constant).", registry=reg
        )
        self.info.info(_run_labels(run))
        self._create_children(training_output)
        self.registry.register(_WithoutCreated(own))

    def _create_children(self, training: bool) -> None:
        for edge in self.edges.values():
            labels = _labels(edge)
            self.discord.labels(*labels)
            self.latency.labels(*labels)
            self.staleness.labels(*labels)
            for direction in DIRECTIONS:
                for transport in TRANSPORTS:
                    self.messages.labels(*labels, direction, transport)
                    self.bytes.labels(*labels, direction, transport)
            if edge.kind == "relu":
                self.flips.labels(*labels)
            if edge.kind == "affine" and training:
                self.update_norm.labels(*labels)

    # ---------------------------------------------------------------- observer

    def observe(self, rounds: int, stats: RoundStats, traffic: Traffic) -> None:
        """Record one engine report; this is an engine ``Observer``.

        ``rounds`` is cumulative; a count lower than the previous one means a new
        engine started counting from zero, and all of it is added.
        """
        now = time.monotonic()
        last = self._last_rounds
        advanced = rounds if last is None or rounds < last else rounds - last
        if advanced > 0:
            self.rounds.inc(advanced)
        self._update_rate(last is None, advanced, now)
        self._last_rounds = rounds

        if stats.actors_alive is not None:
            self.set_actors(stats.actors_alive)
        if stats.measured:
            self._set(self.energy, ("energy",), stats.energy)
        for name, value in stats.discord.items():
            edge = self._edge(name, "discord")
            if edge is not None:
                self._set(self.discord.labels(*_labels(edge)), ("discord", name), value)
        for name, value in stats.update_norm.items():
            edge = self._edge(name, "update_norm", "affine")
            if edge is not None:
                gauge = self.update_norm.labels(*_labels(edge))
                self._set(gauge, ("update_norm", name), value)
        for name, count in stats.flips.items():
            edge = self._edge(name, "flips", "relu")
            if edge is not None:
                self._inc(self.flips.labels(*_labels(edge)), ("flips", name), count)
        for name, samples in stats.latency.items():
            edge = self._edge(name, "latency")
            if edge is not None:
                self._observe(self.latency.labels(*_labels(edge)), name, samples)
        for name, age in stats.staleness.items():
            edge = self._edge(name, "staleness")
            if edge is None:
                continue
            if not math.isfinite(age) or age < 0:
                key = ("staleness", name)
                self._warn_once(key, "staleness/%s is %r; not recorded", name, age)
                continue
            self.staleness.labels(*_labels(edge)).set(age)
        for (src, dst), (count, nbytes) in stats.pairs.items():
            labels = (str(src), str(dst))
            self._inc(self.pair_messages.labels(*labels), ("pair messages", *labels),
                      count)
            self._inc(self.pair_bytes.labels(*labels), ("pair bytes", *labels),
                      nbytes)
        for (name, direction, transport), (count, nbytes) in traffic.items():
            edge = self._edge(name, "traffic")
            if edge is None:
                continue
            if direction not in DIRECTIONS or transport not in TRANSPORTS:
                self._warn_once(
                    ("traffic", direction, transport),
                    "traffic with direction %r and transport %r is not recorded",
                    direction, transport,
                )
                continue
            labels = (*_labels(edge), direction, transport)
            self._inc(self.messages.labels(*labels), ("messages", name), count)
            self._inc(self.bytes.labels(*labels), ("bytes", name), nbytes)

    __call__ = observe

    def _update_rate(self, first: bool, advanced: int, now: float) -> None:
        """Rounds per second since the rate was last set, over MIN_RATE_SECONDS
        at least. A report without new rounds soon after another (the closing
        report of an engine run, an epoch boundary) changes nothing; only
        RATE_SECONDS without progress bring the rate to 0."""
        if first:
            self._rate_rounds, self._rate_time = 0, now
            return
        self._rate_rounds += advanced
        elapsed = now - self._rate_time
        if elapsed >= RATE_SECONDS or (advanced > 0 and elapsed >= MIN_RATE_SECONDS):
            self.rounds_per_second.set(self._rate_rounds / elapsed)
            self._rate_rounds, self._rate_time = 0, now

    def set_loss(self, method: str, split: str, value: float) -> None:
        """``method`` is ``sheaf`` or ``sgd``, ``split`` is ``train`` or ``test``."""
        if method not in METHODS or split not in SPLITS:
            raise ValueError(
                f"loss of method {method!r} and split {split!r}: "
                f"method must be one of {METHODS} and split one of {SPLITS}"
            )
        # checked before the child exists: a loss series never starts at a fake 0
        if self._finite(("loss", method, split), float(value)):
            self.loss.labels(method, split).set(float(value))

    def set_actors(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"actors alive must be >= 0, got {n}")
        self.actors.set(n)

    # ---------------------------------------------------------------- server

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; return the
        bound port (``port=0`` picks a free one)."""
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise InputError(
                "--metrics-port", repr(port),
                "use a port from 0 to 65535 (0 picks a free one)",
            )
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                fix = "the port is in use; pick another or 0 for a free one"
                raise InputError("--metrics-port", port, fix) from None
            if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
                fix = (f"cannot listen on that address ({e.strerror or e}); use "
                       "127.0.0.1, or 0.0.0.0 for every interface")
                raise InputError("--metrics-host", repr(host), fix) from None
            fix = f"cannot listen ({e.strerror or e}); pick another or 0 for a free one"
            raise InputError("--metrics-port", f"{port} on {host}", fix) from None
        self._servers.append((server, thread))
        bound = int(server.server_port)
        log.debug("serving metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop every server started by :meth:`serve`; safe to call twice."""
        while self._servers:
            server, thread = self._servers.pop()
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def __enter__(self) -> RunMetrics:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers

    def _edge(self, name: str, what: str, kind: str | None = None) -> Edge | None:
        """The edge called ``name``; ``None`` (warned once) for an edge this run
        does not have, so labels stay bounded by the graph."""
        edge = self.edges.get(name)
        if edge is None or (kind is not None and edge.kind != kind):
            self._warn_once(
                ("edge", what, name),
                "%s reported for edge %r, not a%s edge of this run; not recorded",
                what, name, f" {kind}" if kind else "n",
            )
            return None
        return edge

    def _finite(self, key: tuple[str, ...], value: float) -> bool:
        if math.isfinite(value):
            return True
        where = "/".join(key)
        self._warn_once(("nonfinite", *key), "%s is %r; not recorded", where, value)
        return False

    def _set(self, gauge: Gauge, key: tuple[str, ...], value: float) -> None:
        if self._finite(key, float(value)):
            gauge.set(float(value))

    def _inc(self, counter: Counter, key: tuple[str, ...], amount: int) -> None:
        if not math.isfinite(amount) or amount < 0:
            where = "/".join(key)
            msg = "%s increment is %r; not recorded"
            self._warn_once(("increment", *key), msg, where, amount)
            return
        if amount:
            counter.inc(amount)

    def _observe(self, histogram: Histogram, name: str, samples: list[float]) -> None:
        """Every finite, non-negative sample; the others are skipped (a negative
        latency means the clocks of two machines disagree), warned once."""
        bad = 0
        for sample in samples:
            if math.isfinite(sample) and sample >= 0:
                histogram.observe(sample)
            else:
                bad += 1
        if bad:
            self._warn_once(
                ("latency", name),
                "latency/%s: %d samples negative or not finite; not recorded",
                name, bad,
            )

    def _warn_once(self, key: tuple[str, ...], message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message + " (warned once)", *args)


class _WithoutCreated:
    """A collector reading ``registry`` without its ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def describe(self):
        return list(self.registry.collect())

    def collect(self):
        for family in self.registry.collect():  # fresh objects on every call
            family.samples = [
                s for s in family.samples if not s.name.endswith("_created")
            ]
            yield family


def series_count(registry: CollectorRegistry) -> int:
    """The series one scrape of ``registry`` gives Prometheus: its samples."""
    return sum(len(family.samples) for family in registry.collect())


def _labels(edge: Edge) -> tuple[str, str, str]:
    return edge.name, edge.kind, str(edge.layer)


def _run_labels(run: dict[str, str] | None) -> dict[str, str]:
    run = dict(run or {})
    if len(run) > MAX_RUN_KEYS:
        raise ValueError(f"run info has {len(run)} keys; at most {MAX_RUN_KEYS}")
    bad = [k for k in run if not _LABEL_NAME.fullmatch(k) or k.startswith("__")]
    if bad:
        raise ValueError(f"run info keys {bad} are not Prometheus label names")
    return {k: str(v)[:MAX_RUN_VALUE] for k, v in run.items()}
