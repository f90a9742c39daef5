"""Partitions: which actor hosts which vertices.

Blocks are contiguous stretches of the path ``a0 - z1 - a1 - ... - zK [- a_out]``,
so the actors themselves form a path and each talks to at most two others.

- ``vertex``: one vertex per actor (small networks, locality studies);
- ``layer`` (the default): ``{a0, z1, a1}``, ``{z2, a2}``, ..., ``{zK, a_out}``;
  the input rides with the first layer, since it only holds ``W1``;
- ``blocks:N``: N stretches of about equal stalk size;
- ``single``: everything in one actor.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .sheaf import SheafGraph

PARTITIONS = ("vertex", "layer", "blocks:N", "single")


def partition(graph: SheafGraph, spec: str) -> list[list[str]]:
    order = list(graph.vertices)
    if spec == "vertex":
        return [[v] for v in order]
    if spec == "single":
        return [order]
    if spec == "layer":
        blocks: list[list[str]] = []
        for v in order:
            layer = graph.vertices[v].layer
            if v.startswith("z") or not blocks:
                if layer > 1 or not blocks:
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
    raise InputError("--partition", repr(spec), f"use one of {', '.join(PARTITIONS)}")
