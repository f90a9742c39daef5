"""Partitions: which actor hosts which vertices.

Blocks are contiguous stretches of the path ``a0 - z1 - a1 - ... - zK [- a_out]``,
so the actors themselves form a path and each talks to at most two others.

- ``vertex``: one vertex per actor (small networks, locality studies);
- ``layer`` (the default): ``{a0, z1, a1}``, ``{z2, a2}``, ..., ``{zK, a_out}``;
  the input rides with the first layer, since it only holds ``W1``. A layer cut
  by a row split (:mod:`sheafdist.rowsplit`) gives one block per piece,
  ``{z2[k], a2[k]}``;
- ``blocks:N``: N stretches of about equal stalk size;
- ``single``: everything in one actor;
- a path to a JSON file: a list of blocks (lists of vertex names) or a map from
  vertex to block number. Any grouping works; the engines only need every
  vertex in exactly one block.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .errors import InputError
from .sheaf import SheafGraph

PARTITIONS = ("vertex", "layer", "blocks:N", "single", "FILE.json")


def partition(graph: SheafGraph, spec: str) -> list[list[str]]:
    order = list(graph.vertices)
    if spec == "vertex":
        return [[v] for v in order]
    if spec == "single":
        return [order]
    if spec == "layer":
        blocks: list[list[str]] = []
        for v in order:
            vert = graph.vertices[v]
            # a row split's later pieces of z1 start blocks of their own too
            later_piece = vert.rows is not None and vert.rows[0] > 0
            if not blocks or (v.startswith("z") and (vert.layer > 1 or later_piece)):
                blocks.append([])
            blocks[-1].append(v)
        return blocks
    if spec.startswith("blocks:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if not 1 <= n <= len(order):
            raise InputError(
                "--partition", repr(spec), f"N must be 1..{len(order)} for this network"
            )
        sizes = np.array([graph.vertices[v].dim for v in order], dtype=float)
        targets = np.searchsorted(np.cumsum(sizes) / sizes.sum(), np.arange(1, n) / n)
        bounds = [0]
        for i, cut in enumerate(targets.tolist()):
            # at least one vertex per block on both sides of every cut
            lo, hi = bounds[-1] + 1, len(order) - (n - 1 - i)
            bounds.append(min(max(cut + 1, lo), hi))
        bounds.append(len(order))
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if spec.endswith(".json") or os.path.exists(spec):
        return from_file(graph, spec)
    raise InputError("--partition", repr(spec), f"use one of {', '.join(PARTITIONS)}")


def from_file(graph: SheafGraph, path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError("--partition", path, f"not a readable JSON file ({exc})") \
            from None
    if isinstance(raw, dict):
        for v, b in raw.items():  # True == 1 and 1.0 == 1 would merge blocks
            if isinstance(b, bool) or not isinstance(b, int | str):
                raise InputError("--partition", f"{path}, which maps {v!r} to "
                                 f"{json.dumps(b)}", "a map gives each vertex a "
                                 'block number or name, e.g. {"a0": 0, "z1": 0, '
                                 '"a1": 1, "z2": 1}')
        numbers = sorted(set(raw.values()), key=str)
        raw = [[v for v, b in raw.items() if b == n] for n in numbers]
    if not isinstance(raw, list) or not all(
        isinstance(b, list) and b and all(isinstance(v, str) for v in b) for b in raw
    ):
        raise InputError("--partition", path, 'give a list of blocks, e.g. [["a0", '
                         '"z1"], ["a1", "z2"]], or a map from vertex to block')
    seen = [v for b in raw for v in b]
    missing = [v for v in graph.vertices if v not in seen]
    unknown = sorted({v for v in seen if v not in graph.vertices})
    twice = sorted({v for v in seen if seen.count(v) > 1})
    for what, names in (("misses", missing), ("names unknown vertices", unknown),
                        ("repeats", twice)):
        if names:
            raise InputError("--partition", f"{path}, which {what} {names}",
                             f"place each of {', '.join(graph.vertices)} once")
    return raw
