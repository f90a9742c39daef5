"""The wire format between actors: msgpack maps, checked on receipt.

An edge message carries one edge value, for example::

    {"v": 1, "kind": "edge", "edge": "W2", "src": "a1", "dst": "z2",
     "round": 17, "dtype": "<f8", "shape": [4, 300], "data": <bytes>,
     "sent": 1796327848.25}

``sent`` (optional) is the sender's wall-clock time, for the latency metric.
Along an edge a row split cut (:mod:`sheafdist.rowsplit`) the tail's value is
its partial sum and the head's is its answer to that tail; both have the edge
stalk's shape, so the checks are the same.

A reduce message carries what a block knows of recent rounds' convergence
statistics (used to stop on a tolerance without a central barrier)::

    {"v": 1, "kind": "reduce", "src": 2, "round": 17,
     "entries": [[round, block, max_change, energy], ...]}

All messages of one Ray call travel as one msgpack list. Decoding never
unpickles anything, and every check failure raises :class:`MessageError`
saying which check failed and what arrived. Decoded arrays are read-only views
of the received bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgpack
import numpy as np

VERSION = 1
KINDS = ("edge", "reduce")
DTYPES = {"<f8": np.dtype("<f8"), "<f4": np.dtype("<f4")}
MAX_MESSAGE_BYTES = 1 << 30  # one edge value; a width-30000 layer at batch 4000
MAX_ENTRIES = 1 << 16


class MessageError(ValueError):
    """A message failed a check; the text names the check and what arrived."""


@dataclass(frozen=True)
class EdgeInfo:
    tail: str
    head: str
    dim: int


def encode_edge(
    edge: str, src: str, dst: str, round_: int, value: np.ndarray,
    sent: float | None = None,
) -> dict:
    value = np.ascontiguousarray(value, dtype="<f8")
    msg = {
        "v": VERSION, "kind": "edge", "edge": edge, "src": src, "dst": dst,
        "round": int(round_), "dtype": "<f8", "shape": list(value.shape),
        # a view: msgpack copies it once, into the payload the wire carries
        "data": memoryview(value).cast("B"),
    }
    if sent is not None:
        msg["sent"] = float(sent)
    return msg


def encode_reduce(src: int, round_: int, entries: list[list]) -> dict:
    return {"v": VERSION, "kind": "reduce", "src": int(src), "round": int(round_),
            "entries": entries}


def pack(messages: list[dict]) -> bytes:
    return msgpack.packb(messages, use_bin_type=True)


def unpack(
    payload: bytes,
    edges: Mapping[str, EdgeInfo],
    batch: int,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> list[dict]:
    """Decode one Ray call's list of messages and check each one.

    Edge messages come back with ``"value"``: a read-only ``(dim, batch)`` array.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MessageError(f"payload: expected bytes, got {type(payload).__name__}")
    try:
        raw = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_bytes, max_str_len=1 << 10,
            max_array_len=MAX_ENTRIES, max_map_len=64,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"payload: not a msgpack list ({exc.__class__.__name__}: "
                           f"{exc})") from None
    if not isinstance(raw, list):
        raise MessageError(f"payload: expected a list, got {type(raw).__name__}")
    return [check(m, edges, batch, max_bytes) for m in raw]


def _field(msg: dict, key: str, kind: type | tuple[type, ...]):
    if key not in msg:
        raise MessageError(f"field {key!r}: missing from a message with keys "
                           f"{sorted(map(repr, msg))[:8]}")
    value = msg[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MessageError(f"field {key!r}: expected {kind}, got {value!r:.60}")
    return value


def check(msg, edges: Mapping[str, EdgeInfo], batch: int, max_bytes: int) -> dict:
    if not isinstance(msg, dict):
        raise MessageError(f"message: expected a map, got {type(msg).__name__}")
    version = _field(msg, "v", int)
    if version != VERSION:
        raise MessageError(f"version: expected {VERSION}, got {version}")
    kind = _field(msg, "kind", str)
    if kind not in KINDS:
        raise MessageError(f"kind: expected one of {KINDS}, got {kind!r:.40}")
    round_ = _field(msg, "round", int)
    if round_ < 0:
        raise MessageError(f"round: expected >= 0, got {round_}")
    if kind == "reduce":
        return _check_reduce(msg)
    edge, src, dst = (_field(msg, k, str) for k in ("edge", "src", "dst"))
    info = edges.get(edge)
    if info is None:
        raise MessageError(f"edge: unknown edge {edge!r:.40}")
    if {src, dst} != {info.tail, info.head} or src == dst:
        raise MessageError(
            f"edge: {edge} joins {info.tail} and {info.head}, not {src!r:.40} and "
            f"{dst!r:.40}"
        )
    dtype_name = _field(msg, "dtype", str)
    if dtype_name not in DTYPES:
        raise MessageError(f"dtype: expected one of {sorted(DTYPES)}, got "
                           f"{dtype_name!r:.20}")
    shape = _field(msg, "shape", list)
    if shape != [info.dim, batch]:
        raise MessageError(f"shape: {edge} carries [{info.dim}, {batch}], got "
                           f"{shape!r:.60}")
    data = _field(msg, "data", bytes)
    dtype = DTYPES[dtype_name]
    expected = info.dim * batch * dtype.itemsize
    if expected > max_bytes:
        raise MessageError(f"size: {expected} bytes exceeds the cap {max_bytes}")
    if len(data) != expected:
        raise MessageError(f"data: expected {expected} bytes for shape {shape}, got "
                           f"{len(data)}")
    value = np.frombuffer(data, dtype=dtype).reshape(info.dim, batch)
    if dtype != np.float64:
        value = value.astype(np.float64)
        value.flags.writeable = False
    if not np.all(np.isfinite(value)):
        raise MessageError(f"values: {edge} from {src} holds NaN or inf")
    sent = None
    if "sent" in msg:
        sent = _field(msg, "sent", float)
        if not np.isfinite(sent):
            raise MessageError(f"sent: expected a finite time, got {sent}")
    return {"kind": "edge", "edge": edge, "src": src, "dst": dst, "round": round_,
            "value": value, "nbytes": len(data), "sent": sent}


def _check_reduce(msg: dict) -> dict:
    src = _field(msg, "src", int)
    entries = _field(msg, "entries", list)
    out = []
    for entry in entries:
        if (
            not isinstance(entry, list) or len(entry) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool)
                       for v in entry[:2])
            or not all(isinstance(v, float | int) and not isinstance(v, bool)
                       for v in entry[2:])
        ):
            raise MessageError(f"entries: expected [round, block, max_change, "
                               f"energy], got {entry!r:.60}")
        out.append((entry[0], entry[1], float(entry[2]), float(entry[3])))
    return {"kind": "reduce", "src": src, "round": msg["round"], "entries": out}
