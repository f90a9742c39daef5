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


def read_trace(path: str) -> Iterator[dict]:
    """Every record of a trace file, each checked to carry the known fields."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError("FILE", path, f"cannot read it ({exc.strerror})") from None
    with f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=True,
                                    max_buffer_size=1 << 24)
        try:
            for n, record in enumerate(unpacker):
                need = UPDATE_FIELDS if isinstance(record, dict) and is_update(
                    record) else FIELDS
                if not isinstance(record, dict) or not set(need) <= set(record):
                    raise InputError("FILE", f"{path}, record {n} = {record!r:.80}",
                                     "give a trace written by --trace")
                yield record
        except InputError:  # a ValueError too: keep its record and reason
            raise
        except (msgpack.UnpackException, ValueError) as exc:
            raise InputError("FILE", f"{path} ({exc.__class__.__name__})",
                             "give a trace written by --trace") from None


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
            allowed = {(e.name, e.head), (e.name, e.tail), ("stalk", e.tail)}
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
