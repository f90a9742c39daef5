"""``sheafdist top``: a live per-edge view of a run, read from its ``/metrics``.

It polls the endpoint that ``--metrics-port`` serves, parses the exposition with
``prometheus_client.parser`` and prints one table per poll: every edge's discord,
messages and bytes per second (counter increases between two polls divided by the
time between them), mean message latency and staleness, under a header with the
run's settings, rounds per second, energy and losses. Nothing else is needed: no
Prometheus server, no Ray.

A URL that does not answer is a one-line error (exit 2) on the first poll; when a
watched run ends and its endpoint goes away, ``top`` says so and exits with 0.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .errors import InputError

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
TIMEOUT = 5.0  # seconds for one poll
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
EDGE_ORDER = {"affine": 0, "relu": 1, "output": 2}

# ---------------------------------------------------------------- command line


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``top`` on the ``sheafdist`` subparsers ``sub``."""
    top = sub.add_parser(
        "top", help="watch a run's per-edge metrics in the terminal",
        description="Poll the /metrics endpoint of a run started with "
        "--metrics-port and print per-edge discord, message and byte rates, "
        "latency and staleness, with the run's energy, loss and rounds per second.",
    )
    top.add_argument("--url", default=DEFAULT_URL,
                     help=f"the run's metrics endpoint (default {DEFAULT_URL})")
    top.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                     help="seconds between polls; rates are taken over it "
                     "(default 1)")
    top.add_argument("--once", action="store_true",
                     help="poll twice, --interval apart, print one table and exit")
    top.add_argument("-v", "--verbose", action="store_true",
                     help="debug logs on stderr")
    top.set_defaults(func=cmd_top)
    return top


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise argparse.ArgumentTypeError(
            f"got {text!r}; give seconds between 0 and 3600, e.g. 1 or 0.5"
        )
    return value


def cmd_top(args) -> int:
    refresh = sys.stdout.isatty() and not args.once
    try:
        before = scrape(args.url)
        while True:
            time.sleep(args.interval)
            try:
                after = scrape(args.url)
            except InputError as exc:
                print(f"sheafdist top: {args.url} stopped answering, the run has "
                      f"probably ended ({exc.fix.split(';')[0]})",
                      file=sys.stderr, flush=True)
                return 0
            table = render(before, after, args.url)
            print((CLEAR if refresh else "") + table, flush=True)
            if args.once:
                return 0
            if not refresh:
                print(flush=True)
            before = after
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------- one poll


@dataclass
class Snapshot:
    """What one poll of the endpoint read."""

    time: float
    run: dict[str, str] = field(default_factory=dict)
    edges: dict[str, dict[str, str]] = field(default_factory=dict)  # labels
    discord: dict[str, float] = field(default_factory=dict)
    messages: dict[str, float] = field(default_factory=dict)  # all directions
    remote: dict[str, float] = field(default_factory=dict)  # between actors
    bytes: dict[str, float] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)
    latency_count: dict[str, float] = field(default_factory=dict)
    staleness: dict[str, float] = field(default_factory=dict)
    loss: dict[tuple[str, str], float] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)  # per-run gauges


def scrape(url: str) -> Snapshot:
    """Read and parse ``url``; every failure is an :class:`InputError`."""
    if not url.startswith(("http://", "https://")):
        raise InputError("--url", repr(url), "give an http:// URL such as "
                         f"{DEFAULT_URL}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            body = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise InputError("--url", repr(url), f"the server answered HTTP {exc.code}; "
                         "give the run's /metrics endpoint") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {TIMEOUT:g}s"
        raise InputError("--url", repr(url), f"cannot read it ({reason}); start a "
                         "run with --metrics-port P and give "
                         "http://127.0.0.1:P/metrics") from None
    try:
        return parse(body, time.monotonic())
    except ValueError as exc:
        raise InputError("--url", repr(url), f"{exc}; give the /metrics endpoint of "
                         "a run started with --metrics-port") from None


def parse(text: str, now: float) -> Snapshot:
    """The sheafdist series of a Prometheus text exposition."""
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises several types on bad input
        raise ValueError(f"not a Prometheus text exposition ({exc})") from None
    snap = Snapshot(time=now)
    for family in families:
        for s in family.samples:
            labels, value = s.labels, float(s.value)
            edge = labels.get("edge")
            if edge is not None and s.name.startswith("sheafdist_edge_"):
                snap.edges.setdefault(edge, {
                    "kind": labels.get("kind", ""), "layer": labels.get("layer", ""),
                })
            _record(snap, s.name, edge, labels, value)
    if not snap.edges and not snap.scalars:
        raise ValueError("it serves no sheafdist_ series")
    return snap


def _record(snap: Snapshot, name: str, edge, labels, value: float) -> None:
    def add(into: dict) -> None:
        into[edge] = into.get(edge, 0.0) + value

    if name == "sheafdist_edge_discord":
        snap.discord[edge] = value
    elif name == "sheafdist_edge_messages_total":
        add(snap.messages)
        if labels.get("transport") == "remote":
            add(snap.remote)
    elif name == "sheafdist_edge_bytes_total":
        add(snap.bytes)
    elif name == "sheafdist_edge_message_latency_seconds_sum":
        snap.latency_sum[edge] = value
    elif name == "sheafdist_edge_message_latency_seconds_count":
        snap.latency_count[edge] = value
    elif name == "sheafdist_edge_staleness_rounds":
        snap.staleness[edge] = value
    elif name == "sheafdist_loss":
        snap.loss[(labels.get("method", ""), labels.get("split", ""))] = value
    elif name == "sheafdist_run_info":
        snap.run = dict(labels)
    elif name in ("sheafdist_energy", "sheafdist_rounds_total",
                  "sheafdist_rounds_per_second", "sheafdist_actors_alive"):
        snap.scalars[name] = value


# ---------------------------------------------------------------- the table


def _rate(after: dict, before: dict, key, seconds: float) -> float:
    """Per-second increase of a counter; a counter that went down restarted."""
    now, then = after.get(key, 0.0), before.get(key, 0.0)
    return (now - then if now >= then else now) / seconds


def render(before: Snapshot, after: Snapshot, url: str = "") -> str:
    """The table of ``after``, with rates over the time since ``before``."""
    seconds = max(after.time - before.time, 1e-9)
    s = after.scalars
    rounds = s.get("sheafdist_rounds_total", 0.0)
    rps = _rate(after.scalars, before.scalars, "sheafdist_rounds_total", seconds)
    run = after.run
    title = " ".join(f"{k} {run[k]}" for k in
                     ("command", "task", "arch", "engine", "partition") if k in run)
    losses = "  ".join(f"{m} {sp} {v:.4g}" for (m, sp), v in sorted(after.loss.items()))
    lines = [
        f"sheafdist top  {url}".rstrip(),
        title or "(no run info)",
        f"rounds {rounds:.0f}  rounds/s {rps:.0f}  energy "
        f"{_num(s.get('sheafdist_energy'))}  actors "
        f"{_num(s.get('sheafdist_actors_alive'), '.0f')}",
        f"loss {losses}" if losses else "loss -",
        "",
        f"{'edge':<6} {'kind':<7} {'layer':>5} {'discord':>10} {'msg/s':>9} "
        f"{'remote/s':>9} {'bytes/s':>9} {'latency':>9} {'stale':>5}",
    ]
    for edge in sorted(after.edges, key=lambda e: _edge_key(after.edges[e], e)):
        info = after.edges[edge]
        count = after.latency_count.get(edge, 0.0) - before.latency_count.get(edge, 0.0)
        total = after.latency_sum.get(edge, 0.0) - before.latency_sum.get(edge, 0.0)
        latency = _seconds(total / count) if count > 0 else "-"
        stale = after.staleness.get(edge)
        lines.append(
            f"{edge:<6} {info['kind']:<7} {info['layer']:>5} "
            f"{_num(after.discord.get(edge)):>10} "
            f"{_num(_rate(after.messages, before.messages, edge, seconds), '.0f'):>9} "
            f"{_num(_rate(after.remote, before.remote, edge, seconds), '.0f'):>9} "
            f"{_bytes(_rate(after.bytes, before.bytes, edge, seconds)):>9} "
            f"{latency:>9} {_num(stale, '.0f'):>5}"
        )
    return "\n".join(lines)


def _edge_key(info: dict[str, str], name: str):
    layer = int(info["layer"]) if info["layer"].isdigit() else 10**9
    return layer, EDGE_ORDER.get(info["kind"], 9), name


def _num(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _bytes(rate: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rate >= size:
            return f"{rate / size:.1f}{unit}"
    return f"{rate:.0f}"


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f}s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f}ms"
    return f"{value * 1e6:.0f}us"
