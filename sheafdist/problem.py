"""What a run is about: the sheaf, its starting stalks, its maps, pins and rates.

Both engines start from a :class:`Problem`; a partition then cuts it into
:class:`~sheafdist.rules.Block` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError
from .model import MLP, forward
from .pins import HardPin, SoftPin, with_input_pin
from .rules import Block, Config
from .sheaf import SheafGraph, build_graph

INITS = ("forward", "random", "zeros")


@dataclass
class Problem:
    graph: SheafGraph
    model: MLP
    stalks: dict[str, np.ndarray]  # every vertex, a0 included
    config: Config
    hard: list[HardPin] = field(default_factory=list)
    soft: list[SoftPin] = field(default_factory=list)
    target: np.ndarray | None = None  # training labels, pinned at the output

    @property
    def batch(self) -> int:
        return self.stalks["a0"].shape[1]

    def maps_of(self, owned: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The affine maps owned by the tails among ``owned``."""
        return {
            e.name: (self.model.W[e.layer - 1], self.model.b[e.layer - 1])
            for e in self.graph.edges.values()
            if e.kind == "affine" and e.tail in owned
        }

    def block(self, owned: list[str]) -> Block:
        return Block(
            self.graph, owned, {v: self.stalks[v] for v in owned},
            self.maps_of(owned), self.config, self.hard, self.soft, self.target,
        )


def initial_stalks(
    model: MLP,
    graph: SheafGraph,
    x: np.ndarray,
    init: str | dict[str, np.ndarray],
    seed: int | np.random.Generator | None = 0,
) -> dict[str, np.ndarray]:
    """Starting stalks: the forward pass, N(0,1) noise, zeros, or given arrays.

    ``a0`` is always ``x``; random draws follow the vertex order of the path.
    """
    batch = x.shape[1]
    if isinstance(init, dict):
        stalks = {"a0": x}
        for v, vert in graph.vertices.items():
            if v == "a0":
                continue
            if v not in init:
                raise InputError("--init", f"a state without {v}", f"add {v}")
            arr = np.asarray(init[v], dtype=np.float64)
            if arr.shape != (vert.dim, batch):
                raise InputError(
                    "--init", f"{v} of shape {arr.shape}",
                    f"it must be ({vert.dim}, {batch}) to match the input",
                )
            if not np.all(np.isfinite(arr)):
                raise InputError("--init", f"{v} with NaN or inf", "fix the state")
            stalks[v] = arr.copy()
        return stalks
    if init == "forward":
        fwd = forward(model, x)
        return {v: fwd[v].copy() if v in fwd else fwd[graph.last].copy()
                for v in graph.vertices}
    if init == "random":
        rng = np.random.default_rng(seed)
        stalks = {"a0": x}
        for v, vert in graph.vertices.items():
            if v != "a0":
                stalks[v] = rng.standard_normal((vert.dim, batch))
        return stalks
    if init == "zeros":
        return {
            v: x if v == "a0" else np.zeros((vert.dim, batch))
            for v, vert in graph.vertices.items()
        }
    raise InputError("--init", repr(init), f"use one of {INITS} or a state .npz")


def check_input(model: MLP, x: np.ndarray, arg: str = "--input") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2 or x.shape[0] != model.arch[0]:
        raise InputError(
            arg, f"an array of shape {x.shape}",
            f"it must be (n0, batch) = ({model.arch[0]}, batch) for this model",
        )
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(arg, f"dtype {x.dtype}", "give a numeric array")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise InputError(
            arg, f"NaN or inf at row {bad[0]}, column {bad[1]}", "give finite values"
        )
    return x


def inference_problem(
    model: MLP,
    x: np.ndarray,
    config: Config,
    init: str | dict[str, np.ndarray] = "random",
    seed: int | None = 0,
    hard: list[HardPin] = (),
    soft: list[SoftPin] = (),
) -> Problem:
    graph = build_graph(model.arch, model.output)
    x = check_input(model, x)
    stalks = initial_stalks(model, graph, x, init, seed)
    hard = with_input_pin(x, list(hard), list(soft))
    return Problem(graph, model.copy(), stalks, config, hard, list(soft))


def training_problem(
    model: MLP,
    x: np.ndarray,
    y: np.ndarray,
    config: Config,
    init: str | dict[str, np.ndarray] = "random",
    seed: int | None = 0,
) -> Problem:
    """Joint stalk and weight flow: no ``a_out`` vertex, the label is pinned at
    the output edge (paper.md section 5.1)."""
    graph = build_graph(model.arch, "identity")
    graph.output = model.output  # phi still shapes the pull towards the label
    stalks = initial_stalks(model, graph, x, init, seed)
    hard = with_input_pin(x, [], [])
    cfg = replace(config, output_edge="identity")  # keeps the scheme
    return Problem(graph, model.copy(), stalks, cfg, hard, [], np.asarray(y, float))
