"""The wire format between actors: round trips, every receipt check, fuzzing.

No Ray here: ``pack``/``unpack`` are plain functions. The edges are those of the
sheaf of a [2, 4, 1] sigmoid network (``W1``, ``R1``, ``W2``, ``out``) at batch 3.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sheafdist.messages import (
    MAX_MESSAGE_BYTES,
    VERSION,
    EdgeInfo,
    MessageError,
    encode_edge,
    encode_reduce,
    pack,
    unpack,
)
from sheafdist.sheaf import build_graph

GRAPH = build_graph([2, 4, 1], "sigmoid")
EDGES = {e.name: EdgeInfo(e.tail, e.head, e.dim) for e in GRAPH.edges.values()}
BATCH = 3


def value(dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((dim, BATCH))


def edge_msg(edge="W1", src="a0", dst="z1", round_=7, dim=4, seed=0) -> dict:
    return encode_edge(edge, src, dst, round_, value(dim, seed))


def raw(*msgs) -> bytes:
    """Pack arbitrary (possibly invalid) messages as one Ray call's payload."""
    return msgpack.packb(list(msgs), use_bin_type=True)


def rejected(payload, *words, max_bytes: int = MAX_MESSAGE_BYTES) -> str:
    with pytest.raises(MessageError) as info:
        unpack(payload, EDGES, BATCH, max_bytes=max_bytes)
    text = str(info.value)
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    return text


# ---------------------------------------------------------------- round trips


def test_edge_messages_round_trip_bit_for_bit_as_read_only_arrays():
    special = value()
    special[0, 0], special[1, 1], special[2, 2] = -0.0, 5e-324, 1.7976931348623157e308
    sent = [
        ("W1", "a0", "z1", value(4, 1)),  # forward along an affine edge
        ("W1", "z1", "a0", value(4, 2)),  # backward: the head sends its stalk
        ("R1", "z1", "a1", special),
        ("W2", "a1", "z2", value(1, 3)),
        ("out", "a_out", "z2", value(1, 4)),
    ]
    payload = pack([encode_edge(e, s, d, 17, v) for e, s, d, v in sent])
    assert isinstance(payload, bytes)
    got = unpack(payload, EDGES, BATCH)
    assert len(got) == len(sent)
    for (edge, src, dst, v), m in zip(sent, got, strict=True):
        assert (m["kind"], m["edge"], m["src"], m["dst"], m["round"]) == (
            "edge", edge, src, dst, 17)
        out = m["value"]
        assert out.dtype == np.float64 and out.shape == v.shape
        assert out.tobytes() == v.tobytes()  # bit for bit, -0.0 and subnormals too
        assert m["nbytes"] == v.nbytes
        assert not out.flags.writeable
        with pytest.raises(ValueError):
            out[0, 0] = 1.0


def test_send_time_travels_when_given():
    (with_time, without) = unpack(
        pack([encode_edge("W1", "a0", "z1", 2, value(), sent=1796327848.25),
              edge_msg()]), EDGES, BATCH)
    assert with_time["sent"] == 1796327848.25
    assert without["sent"] is None


def test_payload_may_be_bytearray_or_memoryview():
    payload = pack([edge_msg()])
    for wrapped in (bytearray(payload), memoryview(payload)):
        (m,) = unpack(wrapped, EDGES, BATCH)
        np.testing.assert_array_equal(m["value"], value())


def test_float32_messages_arrive_as_read_only_float64():
    v32 = value().astype("<f4")
    msg = edge_msg() | {"dtype": "<f4", "data": v32.tobytes()}
    (m,) = unpack(raw(msg), EDGES, BATCH)
    assert m["value"].dtype == np.float64
    np.testing.assert_array_equal(m["value"], v32.astype(np.float64))
    assert not m["value"].flags.writeable
    assert m["nbytes"] == v32.nbytes


def test_encode_edge_makes_a_contiguous_little_endian_copy():
    fortran = np.asfortranarray(value())
    big_endian = value().astype(">f8")
    strided = value(8)[::2]  # every other row: not contiguous
    for given_value in (fortran, big_endian, strided):
        msg = encode_edge("W1", "a0", "z1", 3, given_value)
        assert msg["dtype"] == "<f8" and msg["shape"] == [4, BATCH]
        assert msg["v"] == VERSION and msg["round"] == 3
        (m,) = unpack(pack([msg]), EDGES, BATCH)
        np.testing.assert_array_equal(m["value"], given_value)


def test_reduce_messages_round_trip():
    entries = [[3, 0, 0.5, 1.25], [4, 1, 1, 2], [4, 2, 0.0, 1e-300]]
    payload = pack([encode_reduce(2, 5, entries), edge_msg(round_=5)])
    red, edge = unpack(payload, EDGES, BATCH)
    assert red == {"kind": "reduce", "src": 2, "round": 5,
                   "entries": [(3, 0, 0.5, 1.25), (4, 1, 1.0, 2.0),
                               (4, 2, 0.0, 1e-300)]}
    assert all(type(e[2]) is float and type(e[3]) is float for e in red["entries"])
    assert edge["kind"] == "edge"


def test_empty_payload_list_is_no_messages():
    assert unpack(pack([]), EDGES, BATCH) == []


# ---------------------------------------------------------------- each check


def _without(msg: dict, key: str) -> dict:
    return {k: v for k, v in msg.items() if k != key}


EDGE_CHECKS = {
    # name: (change to a valid W1 message, words the error must contain)
    "wrong version": ({"v": 2}, ["version", "expected 1", "got 2"]),
    "version as text": ({"v": "1"}, ["field 'v'", "'1'"]),
    "unknown kind": ({"kind": "gossip"}, ["kind", "gossip"]),
    "negative round": ({"round": -1}, ["round", "-1"]),
    "unknown edge": ({"edge": "W9"}, ["edge", "unknown", "W9"]),
    "src and dst not joined by the edge": (
        {"src": "a1", "dst": "z1"}, ["edge: W1 joins a0 and z1", "a1"]),
    "src is dst": ({"src": "z1", "dst": "z1"}, ["edge: W1 joins", "z1"]),
    "a vertex of another edge": (
        {"edge": "W2"}, ["edge: W2 joins a1 and z2", "a0"]),
    "dtype not allowed": ({"dtype": "<f2"}, ["dtype", "<f2"]),
    "big-endian dtype": ({"dtype": ">f8"}, ["dtype", ">f8"]),
    "object dtype": ({"dtype": "|O"}, ["dtype", "|O"]),
    "shape: wrong dim": ({"shape": [3, BATCH]}, ["shape", "W1 carries [4, 3]",
                                                  "[3, 3]"]),
    "shape: wrong batch": ({"shape": [4, BATCH + 1]}, ["shape", "[4, 4]"]),
    "shape: wrong rank": ({"shape": [4, BATCH, 1]}, ["shape", "[4, 3, 1]"]),
    "shape: not a list": ({"shape": "4x3"}, ["field 'shape'", "4x3"]),
    "byte count: short": ({"data": b"\0" * 95}, ["data", "expected 96 bytes",
                                                 "got 95"]),
    "byte count: long": ({"data": b"\0" * 97}, ["data", "expected 96", "got 97"]),
    "data as text": ({"data": "abc"}, ["field 'data'"]),
    "NaN": ({"data": np.full((4, BATCH), np.nan).tobytes()},
            ["values", "W1", "a0", "NaN or inf"]),
    "inf": ({"data": np.where(np.eye(4, BATCH) > 0, np.inf, 0.0).tobytes()},
            ["values", "NaN or inf"]),
    "-inf": ({"data": np.full((4, BATCH), -np.inf).tobytes()}, ["values"]),
    "NaN in float32": (
        {"dtype": "<f4", "data": np.full((4, BATCH), np.nan, "<f4").tobytes()},
        ["values"]),
    "bool version": ({"v": True}, ["field 'v'", "True"]),
    "bool round": ({"round": True}, ["field 'round'", "True"]),
    "float round": ({"round": 7.0}, ["field 'round'", "7.0"]),
    "edge as int": ({"edge": 1}, ["field 'edge'"]),
    "sent as text": ({"sent": "noon"}, ["field 'sent'", "noon"]),
    "sent as int": ({"sent": 5}, ["field 'sent'"]),
    "sent NaN": ({"sent": math.nan}, ["sent", "nan"]),
    "sent inf": ({"sent": math.inf}, ["sent", "inf"]),
}


@pytest.mark.parametrize("change, words", EDGE_CHECKS.values(), ids=EDGE_CHECKS)
def test_each_edge_check_rejects_naming_the_check(change, words):
    msg = edge_msg() | change
    rejected(raw(msg), *words)
    # one bad message fails the whole call, wherever it stands in the list
    rejected(raw(edge_msg(), msg), *words)


@pytest.mark.parametrize("key", ["v", "kind", "round", "edge", "src", "dst", "dtype",
                                 "shape", "data"])
def test_a_missing_field_is_named(key):
    rejected(raw(_without(edge_msg(), key)), f"field {key!r}", "missing")


def test_size_cap_rejects_a_declared_shape_above_the_cap():
    # W1 at batch 3 is 96 bytes; the cap is 64 and only 8 bytes are sent
    msg = edge_msg() | {"data": b"\0" * 8}
    rejected(raw(msg), "size", "96 bytes exceeds the cap 64", max_bytes=64)
    # a message within the cap is accepted with the same max_bytes
    (m,) = unpack(raw(edge_msg("W2", "a1", "z2", dim=1)), EDGES, BATCH, max_bytes=64)
    assert m["value"].shape == (1, BATCH)


def test_size_cap_rejects_a_complete_message_above_the_cap():
    # the bytes themselves exceed the cap: stopped while decoding, cap named
    rejected(raw(edge_msg()), "96", "64", max_bytes=64)


def test_non_map_message_is_rejected():
    rejected(raw(edge_msg(), [1, 2, 3]), "message: expected a map", "list")
    rejected(raw("edge"), "message: expected a map", "str")
    rejected(raw(None), "message: expected a map", "NoneType")


def test_non_list_payload_is_rejected():
    rejected(msgpack.packb(edge_msg(), use_bin_type=True), "payload: expected a list",
             "dict")
    rejected(msgpack.packb(7), "payload: expected a list", "int")
    rejected("not bytes", "payload: expected bytes", "str")
    rejected(None, "payload: expected bytes", "NoneType")


def test_garbage_and_truncated_payloads_are_rejected():
    rejected(b"garbage", "payload: not a msgpack list")
    rejected(b"", "payload: not a msgpack list")
    rejected(b"\xc1", "payload: not a msgpack list")  # a never-used msgpack byte
    good = pack([edge_msg(), edge_msg("R1", "z1", "a1", seed=1)])
    for cut in (1, 10, len(good) // 2, len(good) - 1):
        rejected(good[:cut], "payload: not a msgpack list")
    rejected(good + b"\x00", "payload: not a msgpack list")  # trailing bytes


def test_integer_map_keys_are_rejected():
    rejected(raw({1: 2}), "payload: not a msgpack list")


def test_ext_types_are_rejected_not_decoded():
    ext = msgpack.packb([msgpack.ExtType(1, b"\x80\x04N.")])  # a pickle, as an ext
    rejected(ext, "message: expected a map", "ExtType")


REDUCE_BAD = {
    "short entry": ([[3, 0, 0.5]], ["entries", "[3, 0, 0.5]"]),
    "long entry": ([[3, 0, 0.5, 1.0, 2.0]], ["entries"]),
    "entry not a list": (["3,0,0.5,1"], ["entries", "3,0,0.5,1"]),
    "bool round": ([[True, 0, 0.5, 1.0]], ["entries", "True"]),
    "bool block": ([[3, False, 0.5, 1.0]], ["entries", "False"]),
    "float round": ([[3.0, 0, 0.5, 1.0]], ["entries", "3.0"]),
    "text change": ([[3, 0, "0.5", 1.0]], ["entries", "'0.5'"]),
    "bool energy": ([[3, 0, 0.5, True]], ["entries", "True"]),
    "None energy": ([[3, 0, 0.5, None]], ["entries", "None"]),
}


@pytest.mark.parametrize("entries, words", REDUCE_BAD.values(), ids=REDUCE_BAD)
def test_bad_reduce_entries_are_rejected(entries, words):
    good = [4, 1, 0.25, 1.0]
    rejected(raw(encode_reduce(1, 4, [good, *entries])), *words)


def test_bad_reduce_fields_are_rejected():
    red = encode_reduce(1, 4, [[4, 1, 0.25, 1.0]])
    rejected(raw(red | {"src": True}), "field 'src'", "True")
    rejected(raw(red | {"src": "1"}), "field 'src'")
    rejected(raw(red | {"entries": {"a": 1}}), "field 'entries'")
    rejected(raw(_without(red, "entries")), "field 'entries'", "missing")
    rejected(raw(red | {"round": -3}), "round", "-3")
    rejected(raw(red | {"v": 0}), "version", "got 0")


def test_mixed_str_and_bytes_keys_are_rejected_with_message_error():
    rejected(raw({"x": 1, b"y": 2}), "field 'v'", "missing")


def test_all_bytes_keys_are_rejected_as_missing_fields():
    msg = {k.encode(): v for k, v in edge_msg().items()}
    rejected(raw(msg), "field 'v'", "missing")


# ---------------------------------------------------------------- fuzzing


def assert_valid(msgs) -> None:
    """What ``unpack`` returns must satisfy every check it claims to make."""
    assert isinstance(msgs, list)
    for m in msgs:
        assert isinstance(m, dict)
        assert type(m["round"]) is int and m["round"] >= 0
        if m["kind"] == "edge":
            info = EDGES[m["edge"]]
            assert {m["src"], m["dst"]} == {info.tail, info.head}
            assert m["src"] != m["dst"]
            v = m["value"]
            assert isinstance(v, np.ndarray) and v.dtype == np.float64
            assert v.shape == (info.dim, BATCH)
            assert not v.flags.writeable
            assert np.all(np.isfinite(v))
            sent = m.get("sent")
            assert sent is None or (type(sent) is float and math.isfinite(sent))
        else:
            assert m["kind"] == "reduce"
            assert type(m["src"]) is int
            for entry in m["entries"]:
                assert len(entry) == 4
                assert type(entry[0]) is int and type(entry[1]) is int
                assert type(entry[2]) is float and type(entry[3]) is float


def decode(payload) -> None:
    try:
        msgs = unpack(payload, EDGES, BATCH)
    except MessageError as exc:
        assert str(exc)  # says something
        return
    assert_valid(msgs)


FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

VALID_MESSAGES = [
    edge_msg(),
    edge_msg("W1", "z1", "a0", seed=1),
    edge_msg("R1", "z1", "a1", seed=2),
    edge_msg("W2", "a1", "z2", dim=1, seed=3),
    edge_msg("out", "z2", "a_out", dim=1, seed=4),
    encode_reduce(0, 7, [[6, 0, 0.5, 1.0], [5, 1, 2, 3]]),
]
VALID_PAYLOAD = pack(VALID_MESSAGES)

# anything msgpack can carry (ints within its 64-bit range)
scalars = (
    st.none() | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.binary(max_size=100)
    | st.sampled_from(["W1", "R1", "W2", "out", "a0", "z1", "a1", "z2", "a_out",
                       "edge", "reduce", "<f8", "<f4", ">f8"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_raise_message_error_or_decode_validly(payload):
    decode(payload)


@FUZZ
@given(st.data())
def test_byte_mutations_of_a_valid_payload(data):
    payload = bytearray(VALID_PAYLOAD)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if op == "flip" and payload:
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and payload:
            payload[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del payload[i:]
        elif op == "insert":
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del payload[i:i + data.draw(st.integers(1, 16))]
    decode(bytes(payload))


@FUZZ
@given(st.data())
def test_field_mutations_of_valid_messages(data):
    msgs = [dict(m) for m in VALID_MESSAGES]
    for _ in range(data.draw(st.integers(1, 3))):
        m = data.draw(st.sampled_from(msgs))
        key = data.draw(st.sampled_from(sorted(m)) | st.text(max_size=6))
        if data.draw(st.booleans()) and key in m:
            del m[key]
        else:
            m[key] = data.draw(values)
    if data.draw(st.booleans()):  # sometimes a whole message is not a message
        msgs.insert(data.draw(st.integers(0, len(msgs))), data.draw(values))
    if data.draw(st.booleans()):  # sometimes every key is bytes instead of str
        i = data.draw(st.integers(0, len(msgs) - 1))
        if isinstance(msgs[i], dict):
            msgs[i] = {k.encode(): v for k, v in msgs[i].items()}
    decode(raw(*msgs))


@FUZZ
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=12,
                max_size=12))
def test_any_float_values_are_accepted_exactly_when_finite(floats):
    v = np.array(floats, dtype=np.float64).reshape(4, BATCH)
    payload = pack([encode_edge("R1", "a1", "z1", 2, v)])
    if all(math.isfinite(f) for f in floats):
        (m,) = unpack(payload, EDGES, BATCH)
        assert m["value"].tobytes() == v.tobytes()
    else:
        rejected(payload, "values", "R1", "a1")
