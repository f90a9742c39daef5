"""Message traces: reading a ``--trace`` file, summarising it, checking locality.

A trace is a msgpack stream of maps written by the Ray engine. A message record
(``kind`` ``message``) holds ``round, edge, src, dst, bytes, sent, received,
transport`` (``local`` for a call inside one actor, ``remote`` between actors),
``src_block`` and ``dst_block``. In training, a weight-update record (``kind``
``update``) holds ``round, edge, block, time`` and ``reads``: the edge values
``[edge, vertex]`` and the stalk ``["stalk", vertex]`` the update of that edge's
map was computed from.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterator

import msgpack
import numpy as np

from .errors import InputError
from .sheaf import SheafGraph

FIELDS = ("round", "edge", "src", "dst", "bytes", "sent", "received", "transport",
          "src_block", "dst_block")
UPDATE_FIELDS = ("round", "edge", "block", "time", "reads")


def is_update(record: dict) -> bool:
    return record.get("kind") == "update"


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _time(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) \
        and math.isfinite(v)


def _name(v) -> bool:
    return isinstance(v, str)


def _reads(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)
        for r in v)


# what each field of a record must hold, and its words for the error
_CHECKS = {
    "round": (_count, "an integer >= 0"), "bytes": (_count, "an integer >= 0"),
    "src_block": (_count, "an integer >= 0"), "dst_block": (_count, "an integer >= 0"),
    "block": (_count, "an integer >= 0"),
    "sent": (_time, "a finite time in seconds"),
    "received": (_time, "a finite time in seconds"),
    "time": (_time, "a finite time in seconds"),
    "edge": (_name, "an edge name"), "src": (_name, "a vertex name"),
    "dst": (_name, "a vertex name"),
    "transport": (lambda v: v in ("local", "remote"), '"local" or "remote"'),
    "reads": (_reads, 'a list of [edge or "stalk", vertex] pairs'),
}

_KINDS = {int: "an integer", float: "a number", str: "a string", bytes: "binary data",
          list: "a list", bool: "a boolean", type(None): "nil"}


def _check_record(path: str, n: int, record) -> None:
    """One record of a trace: a map of the known fields, each of its type."""
    fix = "give a trace written by --trace"
    if not isinstance(record, dict):
        kind = _KINDS.get(type(record), type(record).__name__)
        raise InputError("FILE", f"{path}, whose record {n} is {kind}, not a trace "
                         "record (a map)", fix)
    kind = record.get("kind", "message")
    if kind not in ("message", "update"):
        raise InputError("FILE", f"{path}, whose record {n} has kind "
                         f"{kind!r:.40}", f"a record is a message or an update; "
                         f"{fix}")
    need = UPDATE_FIELDS if kind == "update" else FIELDS
    missing = [k for k in need if k not in record]
    if missing:
        raise InputError("FILE", f"{path}, whose record {n} is a map without "
                         f"{', '.join(missing)}", fix)
    for key in need:
        test, words = _CHECKS[key]
        if not test(record[key]):
            raise InputError("FILE", f"{path}, whose record {n} has {key} = "
                             f"{record[key]!r:.40}", f"{key} must be {words}; {fix}")


def read_trace(path: str, status: dict | None = None) -> Iterator[dict]:
    """Every record of a trace file, each checked to carry the known fields with
    values of their types.

    An empty file, or one without a complete record, is refused. A stream whose
    last record is incomplete (a run still writing, or stopped mid-write) yields
    the complete ones; ``status["truncated"]`` then holds the bytes of the
    incomplete tail (0 otherwise), and ``status["records"]`` the records read.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError("FILE", path, f"cannot read it ({exc.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise InputError("FILE", f"{path}, an empty file", "give a trace "
                             "written by --trace (a run writes its first records "
                             "after its first round)")
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=True,
                                    max_buffer_size=1 << 24)
        n, end = 0, 0
        try:
            for n, record in enumerate(unpacker, start=1):  # noqa: B007
                _check_record(path, n - 1, record)
                end = unpacker.tell()
                yield record
        except InputError:  # a ValueError too: keep its record and reason
            raise
        except (msgpack.UnpackException, ValueError) as exc:
            raise InputError("FILE", f"{path} ({exc.__class__.__name__} after "
                             f"{n} records)", "give a trace written by --trace"
                             ) from None
        if n == 0:
            raise InputError("FILE", f"{path}, {size} bytes without one complete "
                             "record", "give a trace written by --trace")
        if status is not None:
            status["records"], status["truncated"] = n, size - end


def check_model_of(records, graph: SheafGraph, path: str, model: str) -> None:
    """Refuse a model that is not the one the trace was written with: every
    edge and vertex a record names must be in the model's sheaf, and each
    message must carry ``8 x dim x batch`` bytes for its edge, one batch for all."""
    shape = f"[{','.join(map(str, graph.arch))}] {graph.output}"
    fix = "give the model the trace was written with"
    batch = None
    for n, r in enumerate(records):
        e = graph.edges.get(r["edge"])
        if e is None:
            raise InputError("--model", f"{model} ({shape}), whose sheaf has no "
                             f"edge {r['edge']!r:.40} (record {n} of {path}); the "
                             f"edges are {', '.join(graph.edges)}", fix)
        names = [x[1] for x in r["reads"]] if is_update(r) else [r["src"], r["dst"]]
        unknown = [v for v in names if v not in graph.vertices]
        if unknown:
            raise InputError("--model", f"{model} ({shape}), whose sheaf has no "
                             f"vertex {unknown[0]!r:.40} (record {n} of {path})",
                             fix)
        if is_update(r):
            continue
        per_column = 8 * e.dim
        if r["bytes"] % per_column or r["bytes"] == 0 or (
                batch is not None and r["bytes"] != per_column * batch):
            expect = f"8 x {e.dim} x {batch}" if batch else f"8 x {e.dim} x batch"
            raise InputError("--model", f"{model} ({shape}), whose edge {e.name} "
                             f"carries {expect} bytes, but record {n} of {path} "
                             f"has {r['bytes']}", fix)
        batch = r["bytes"] // per_column


def summarise(records) -> dict:
    """Messages, bytes and latency per edge, per pair of actors, and per round."""
    edges = defaultdict(lambda: {"messages": 0, "bytes": 0, "remote": 0,
                                 "latency": []})
    pairs = defaultdict(lambda: {"messages": 0, "bytes": 0})
    rounds = set()
    total = {"messages": 0, "bytes": 0, "remote_messages": 0, "remote_bytes": 0,
             "updates": 0}
    for r in records:
        if is_update(r):
            total["updates"] += 1
            continue
        e = edges[r["edge"]]
        e["messages"] += 1
        e["bytes"] += r["bytes"]
        total["messages"] += 1
        total["bytes"] += r["bytes"]
        rounds.add(r["round"])
        if r["transport"] == "remote":
            e["remote"] += 1
            e["latency"].append(r["received"] - r["sent"])
            total["remote_messages"] += 1
            total["remote_bytes"] += r["bytes"]
        # as the run's own count: a pair i->i holds the values kept inside actor i
        pair = pairs[f"{r['src_block']}->{r['dst_block']}"]
        pair["messages"] += 1
        pair["bytes"] += r["bytes"]
    n_rounds = max(len(rounds), 1)
    out_edges = {}
    for name, e in sorted(edges.items()):
        lat = np.array(e.pop("latency"))
        e["latency_ms"] = None if lat.size == 0 else {
            "p50": 1e3 * float(np.median(lat)),
            "p95": 1e3 * float(np.quantile(lat, 0.95)),
            "max": 1e3 * float(lat.max()),
        }
        out_edges[name] = e
    return {
        "rounds": len(rounds),
        "first_round": min(rounds, default=None),
        "last_round": max(rounds, default=None),
        **total,
        "messages_per_round": total["messages"] / n_rounds,
        "bytes_per_round": total["bytes"] / n_rounds,
        "edges": out_edges,
        "actor_pairs": dict(sorted(pairs.items())),
    }


def locality_violations(records, graph: SheafGraph) -> list[dict]:
    """Records that break locality: a message that does not run along its edge
    between the edge's two ends, or a weight update that read anything but its
    own edge's two values and the stalk of the vertex that owns the map."""
    bad = []
    for r in records:
        e = graph.edges.get(r["edge"])
        if e is None:
            bad.append(r)
        elif is_update(r):
            # a member of a shared discrepancy (a row split) reads its group's
            # edge values: still only its own edge of the whole sheaf
            allowed = {("stalk", e.tail)} | {
                (m.name, end) for m in graph.members(e.shared)
                for end in (m.head, m.tail)}
            reads = {tuple(x) for x in r["reads"]}
            if e.kind != "affine" or not reads or not reads <= allowed:
                bad.append(r)
        elif {r["src"], r["dst"]} != {e.tail, e.head} or r["src"] == r["dst"]:
            bad.append(r)
    return bad


def format_summary(s: dict) -> list[str]:
    lines = [
        f"{s['messages']} messages, {s['bytes']} bytes over {s['rounds']} rounds "
        f"({s['messages_per_round']:.1f} messages, {s['bytes_per_round']:.0f} bytes "
        f"per round); remote: {s['remote_messages']} messages, {s['remote_bytes']} "
        f"bytes; {s['updates']} weight updates",
        f"{'edge':<6} {'messages':>9} {'remote':>8} {'bytes':>12} {'p50 ms':>8} "
        f"{'p95 ms':>8}",
    ]
    for name, e in s["edges"].items():
        lat = e["latency_ms"] or {}
        p50 = f"{lat['p50']:.3f}" if lat else "-"
        p95 = f"{lat['p95']:.3f}" if lat else "-"
        lines.append(f"{name:<6} {e['messages']:>9} {e['remote']:>8} "
                     f"{e['bytes']:>12} {p50:>8} {p95:>8}")
    for pair, p in s["actor_pairs"].items():
        lines.append(f"actors {pair}: {p['messages']} messages, {p['bytes']} bytes")
    return lines
