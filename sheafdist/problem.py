"""What a run is about: the sheaf, its starting stalks, its maps, pins and rates.

Both engines start from a :class:`Problem`; a partition then cuts it into
:class:`~sheafdist.rules.Block` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError
from .files import MAX_MAGNITUDE, real_array
from .memory import check_run
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
        """The affine maps owned by the tails among ``owned`` (each edge's block
        of its layer's map, when a row split cut the edge)."""
        from .rowsplit import map_of

        return {
            e.name: map_of(e, self.model)
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
    arg: str = "--init",
) -> dict[str, np.ndarray]:
    """Starting stalks: the forward pass, N(0,1) noise, zeros, or given arrays.

    ``a0`` is always ``x``; random draws follow the vertex order of the path.
    Errors about given arrays name ``arg``, the option that gave them.
    """
    batch = x.shape[1]
    if isinstance(init, dict):
        stalks = {"a0": x}
        for v, vert in graph.vertices.items():
            if v == "a0":
                continue
            if v not in init:
                raise InputError(arg, f"a state without {v}", f"add {v}")
            arr = real_array(init[v], arg, v)  # a copy; no strings, no complex
            if arr.shape != (vert.dim, batch):
                raise InputError(
                    arg, f"{v} of shape {arr.shape}",
                    f"it must be ({vert.dim}, {batch}) to match the input",
                )
            if not np.all(np.isfinite(arr)):
                raise InputError(arg, f"{v} with NaN or inf", "fix the state")
            stalks[v] = arr
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


def check_input(model: MLP, x: np.ndarray, arg: str = "--input",
                model_arg: str = "--model") -> np.ndarray:
    """``x`` as float64 ``(n0, batch)``: real, finite, at least one column, a run
    on it fits in memory (else the error names ``model_arg`` or ``arg``), and its
    forward pass stays in the range the energy can square."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2 or x.shape[0] != model.arch[0]:
        raise InputError(
            arg, f"an array of shape {x.shape}",
            f"it must be (n0, batch) = ({model.arch[0]}, batch) for this model",
        )
    if x.shape[1] == 0:
        raise InputError(arg, f"an array of shape {x.shape}, no inputs",
                         "give at least one column (one input per column)")
    x = real_array(x, arg, "an array", fix="give real numbers")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise InputError(
            arg, f"NaN or inf at row {bad[0]}, column {bad[1]}", "give finite values"
        )
    check_run(model.arch, x.shape[1], model.output, model_arg, arg,
              blame_net=False)
    check_forward(model, x, arg)
    return x


def check_forward(model: MLP, x: np.ndarray, arg: str) -> None:
    """Refuse inputs whose forward pass leaves the range of float64 that the
    energy, which squares the stalks, can hold."""
    with np.errstate(over="ignore", invalid="ignore"):  # reported below instead
        state = forward(model, x)
    for v, arr in state.items():
        peak = float(np.max(np.abs(arr)))
        if not peak <= MAX_MAGNITUDE:  # NaN included
            raise InputError(
                arg, f"values up to {float(np.max(np.abs(x))):.3g}, whose forward "
                f"pass reaches |{v}| = {peak:.3g}", "that overflows float64 when "
                "the energy squares it; scale the input (or the weights) down so "
                f"that the forward pass stays below {MAX_MAGNITUDE:g}")


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
