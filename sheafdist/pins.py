"""Pins: boundary data on any vertex or coordinates.

A hard pin overwrites coordinates after every round; a soft pin adds the
restoring force ``-gamma * (v - target)`` inside the ``alpha * dt`` scaling.
Command-line forms: ``z1[0]=0.5``, ``z1[0,2]=0.5``, ``a_out=1`` for hard pins and
``z1=0@10`` or ``z1[3]=0.2@1`` (target ``@`` gamma) for soft pins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .sheaf import SheafGraph

_PIN = re.compile(
    r"^\s*(?P<vertex>[A-Za-z_][A-Za-z_0-9]*)\s*(\[(?P<coords>[0-9,\s]+)\])?\s*="
    r"\s*(?P<value>[^@]+?)\s*(@\s*(?P<gamma>\S+))?\s*$"
)


@dataclass(frozen=True)
class HardPin:
    vertex: str
    coords: tuple[int, ...] | None  # None pins the whole stalk
    values: np.ndarray  # broadcastable to (len(coords) or dim, batch)


@dataclass(frozen=True)
class SoftPin:
    vertex: str
    coords: tuple[int, ...] | None
    target: np.ndarray
    gamma: float


def rows(coords: tuple[int, ...] | None) -> slice | list[int]:
    return slice(None) if coords is None else list(coords)


def parse_pin(text: str, graph: SheafGraph, soft: bool = False) -> HardPin | SoftPin:
    arg = "--soft-pin" if soft else "--pin"
    example = '"z1=0@10"' if soft else '"z1[0]=0.5"'
    m = _PIN.match(text)
    if m is None or (m["gamma"] is not None) != soft:
        raise InputError(arg, repr(text), f"write it as {example}")
    vertex = m["vertex"]
    if vertex not in graph.vertices:
        raise InputError(
            arg, repr(text), f"vertex {vertex!r} does not exist; the vertices "
            f"are {', '.join(graph.vertices)}"
        )
    dim = graph.vertices[vertex].dim
    coords = None
    if m["coords"] is not None:
        coords = tuple(int(c) for c in m["coords"].split(",") if c.strip())
        bad = [c for c in coords if c >= dim]
        if not coords or bad:
            raise InputError(
                arg, repr(text), f"{vertex} has coordinates 0..{dim - 1}"
            )
    try:
        value = float(m["value"])
    except ValueError:
        raise InputError(
            arg, repr(text), f"the value must be a number, {example}"
        ) from None
    if not np.isfinite(value):
        raise InputError(arg, repr(text), "the value must be finite")
    values = np.full((dim if coords is None else len(coords), 1), value)
    if not soft:
        return HardPin(vertex, coords, values)
    try:
        gamma = float(m["gamma"])
    except ValueError:
        gamma = float("nan")
    if not np.isfinite(gamma) or gamma <= 0:
        raise InputError(arg, repr(text), "gamma after @ must be a positive number")
    return SoftPin(vertex, coords, values, gamma)


def parse_pins(texts: list[str], graph: SheafGraph,
               soft: bool = False) -> list[HardPin] | list[SoftPin]:
    """Every ``--pin`` (or ``--soft-pin``); two hard pins may not set the same
    coordinate, since only the last would hold."""
    pins = [parse_pin(text, graph, soft) for text in texts]
    if soft:  # two soft pins on one coordinate add up: two springs
        return pins
    seen: dict[tuple[str, int], int] = {}
    for i, pin in enumerate(pins):
        coords = range(graph.vertices[pin.vertex].dim) if pin.coords is None \
            else sorted(set(pin.coords))
        for c in coords:
            first = seen.setdefault((pin.vertex, c), i)
            if first != i:
                raise InputError("--pin", f"{texts[first]!r} and {texts[i]!r}",
                                 f"both pin "
                                 f"{pin.vertex}[{c}] and only the last would "
                                 "hold; pin each coordinate once")
    return pins


def with_input_pin(
    x: np.ndarray, hard: list[HardPin], soft: list[SoftPin]
) -> list[HardPin]:
    """Add the default pin ``a0 = x`` unless the user pinned a0 otherwise."""
    if any(p.vertex == "a0" for p in [*hard, *soft]):
        return list(hard)
    return [HardPin("a0", None, x), *hard]


def apply_hard(stalks: dict[str, np.ndarray], pins: list[HardPin]) -> None:
    for pin in pins:
        if pin.vertex in stalks:
            stalks[pin.vertex][rows(pin.coords)] = pin.values


def fully_pinned(vertex: str, dim: int, pins: list[HardPin]) -> bool:
    covered: set[int] = set()
    for pin in pins:
        if pin.vertex == vertex:
            if pin.coords is None:
                return True
            covered.update(pin.coords)
    return len(covered) == dim
