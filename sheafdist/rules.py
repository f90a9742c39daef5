"""The vertex program: what a vertex sends, how it moves, how its maps learn.

This is the only place the dynamics are written; both engines call it. A
:class:`Block` owns some vertices of the sheaf (all of them in the local engine,
one partition block in a Ray actor). A round is

1. :meth:`Block.send`: every owned vertex computes its edge value ``F_v(x_v)``
   along each incident edge;
2. :meth:`Block.step`: with the neighbours' edge values, each discrepancy
   ``d_e = F_head(x_head) - F_tail(x_tail)`` is formed and every owned vertex moves
   by ``alpha*dt*(sum over tail sides F_v^T d_e - sum over head sides d_e + soft
   pin forces)``; in training the owner of ``W_l`` (the vertex ``a_{l-1}``) moves
   ``[W_l, b_l]`` by ``+beta*dt*d_e [a;1]^T`` summed over the batch, which is
   ``-beta*dt`` times the gradient of the edge energy ``1/2 ||d_e||^2``.

Every force comes from the old state (explicit Euler) and hard pins are written
back afterwards, exactly as paper.md section 2.8 and the golden data define.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .model import phi, phi_pullback, relu_mask
from .pins import HardPin, SoftPin, apply_hard, fully_pinned, rows
from .sheaf import Edge, SheafGraph

OUTPUT_EDGE_MODES = ("jacobian", "identity")


@dataclass
class Config:
    alpha: float = 1.0
    dt: float = 0.01
    beta: float = 0.0  # 0 means inference: the maps stay fixed
    output_edge: str = "jacobian"


@dataclass
class RoundStats:
    """What one round of one block measured."""

    max_change: float = 0.0
    discord: dict[str, float] = field(default_factory=dict)  # per edge, batch mean
    flips: dict[str, int] = field(default_factory=dict)  # per ReLU edge
    update_norm: dict[str, float] = field(default_factory=dict)  # per affine edge
    # filled by the Ray engine, per edge, for what was received since the last
    # report: message latencies in seconds (send to receipt) and, in async mode,
    # how many rounds old the neighbour values used in the latest round were
    latency: dict[str, list[float]] = field(default_factory=dict)
    staleness: dict[str, int] = field(default_factory=dict)


    @property
    def energy(self) -> float:
        """``1/2 sum_e discord_e``: the Dirichlet energy per sample."""
        return 0.5 * sum(self.discord.values())


# messages and bytes per (edge, direction, transport): direction is "forward"
# (tail to head) or "backward"; transport is "local" (a call inside one process)
# or "remote" (a message between actors)
Traffic = dict[tuple[str, str, str], list[int]]


def direction(edge: Edge, sender: str) -> str:
    return "forward" if sender == edge.tail else "backward"


def add_traffic(total: Traffic, key: tuple[str, str, str], count: int, nbytes: int):
    entry = total.setdefault(key, [0, 0])
    entry[0] += count
    entry[1] += nbytes


class Block:
    """The vertices of one partition block, their stalks and their own maps.

    ``maps`` holds ``(W_l, b_l)`` for each affine edge whose tail vertex this block
    owns. ``target`` (training) is the label pinned at the far side of the output
    edge; the pull on the last vertex is then ``phi(z) - y`` with no Jacobian.
    """

    def __init__(
        self,
        graph: SheafGraph,
        owned: list[str],
        stalks: dict[str, np.ndarray],
        maps: dict[str, tuple[np.ndarray, np.ndarray]],
        config: Config,
        hard: list[HardPin] = (),
        soft: list[SoftPin] = (),
        target: np.ndarray | None = None,
    ):
        self.graph = graph
        self.owned = list(owned)
        self.config = config
        self.stalks = {v: np.array(stalks[v], dtype=np.float64) for v in owned}
        self.maps = {e: (np.array(w), np.array(b)) for e, (w, b) in maps.items()}
        self.hard = [p for p in hard if p.vertex in self.owned]
        self.soft = [p for p in soft if p.vertex in self.owned]
        self.target = target if graph.last in self.owned else None
        self.batch = next(iter(self.stalks.values())).shape[1]
        apply_hard(self.stalks, self.hard)
        # vertices that move, with their incident edges in path order
        self.free = [
            v for v in owned
            if not fully_pinned(v, graph.vertices[v].dim, self.hard)
        ]
        self.incident = {v: graph.incident(v) for v in owned}
        self.edges = {e.name: e for v in owned for e in self.incident[v]}
        # an edge's discord is recorded once, by the block owning its head
        self.recorded = [e for e in self.edges.values() if e.head in self.owned]
        self._masks = {
            v: relu_mask(self.stalks[v]) for v in owned if v.startswith("z")
        }
        self._sent: dict[tuple[str, str], np.ndarray] = {}

    # ---------------------------------------------------------------- send

    def edge_value(self, edge: Edge, vertex: str) -> np.ndarray:
        """``F_v(x_v)``: the image of the vertex's stalk in the edge stalk."""
        x = self.stalks[vertex]
        if vertex == edge.head:
            return x
        if edge.kind == "affine":
            w, b = self.maps[edge.name]
            return w @ x + b
        if edge.kind == "relu":
            return self._masks[vertex] * x
        return phi(self.graph.output, x)

    def send(self) -> dict[tuple[str, str], np.ndarray]:
        """Edge values of every owned vertex, keyed by ``(edge, vertex)``."""
        for v in self._masks:
            self._masks[v] = relu_mask(self.stalks[v])
        self._sent = {
            (e.name, v): self.edge_value(e, v)
            for v in self.owned
            for e in self.incident[v]
        }
        return self._sent

    # ---------------------------------------------------------------- step

    def _pullback(self, edge: Edge, vertex: str, d: np.ndarray) -> np.ndarray:
        """``F_v^T d`` on the tail side (the Jacobian transpose for the output)."""
        if edge.kind == "affine":
            return self.maps[edge.name][0].T @ d
        if edge.kind == "relu":
            return self._masks[vertex] * d
        if self.config.output_edge == "identity":
            return d
        return phi_pullback(self.graph.output, self.stalks[vertex], d)

    def step(
        self, received: dict[tuple[str, str], np.ndarray], stats: bool = True
    ) -> RoundStats:
        """One explicit Euler round from the values of :meth:`send` and the
        neighbours' values in ``received``."""
        cfg, out = self.config, RoundStats()
        values = {**self._sent, **received}
        disc: dict[str, np.ndarray] = {}
        for e in self.edges.values():
            disc[e.name] = values[(e.name, e.head)] - values[(e.name, e.tail)]
        forces = {}
        for v in self.free:
            f = None
            for e in self.incident[v]:
                term = (
                    -disc[e.name] if v == e.head
                    else self._pullback(e, v, disc[e.name])
                )
                f = term if f is None else f + term
            if v == self.graph.last and self.target is not None:
                # output edge pinned to the label: the cross-entropy pull
                d_out = self.target - phi(self.graph.output, self.stalks[v])
                disc["out"] = d_out
                f = d_out if f is None else f + d_out
            for pin in self.soft:
                if pin.vertex == v:
                    r = rows(pin.coords)
                    f[r] = f[r] - pin.gamma * (self.stalks[v][r] - pin.target)
            forces[v] = f
        if cfg.beta:  # from the old stalks, before they move
            self._learn(disc, out if stats else None)
        step = cfg.alpha * cfg.dt
        old = {v: self.stalks[v] for v in self.free}
        for v, f in forces.items():
            self.stalks[v] = self.stalks[v] + step * f
        apply_hard(self.stalks, self.hard)
        for v in self.free:
            change = float(np.max(np.abs(self.stalks[v] - old[v])))
            out.max_change = max(out.max_change, change)
        if stats:
            for e in self.recorded:
                d = disc[e.name]
                out.discord[e.name] = float(np.einsum("ij,ij->", d, d)) / self.batch
            if "out" in disc and self.target is not None:
                d = disc["out"]
                out.discord["out"] = float(np.einsum("ij,ij->", d, d)) / self.batch
            self._count_flips(out)
        return out

    def _learn(self, disc: dict[str, np.ndarray], out: RoundStats | None) -> None:
        """Each owned affine map descends its own edge energy, summed over the batch."""
        rate = self.config.dt * self.config.beta
        for name, (w, b) in self.maps.items():
            d = disc[name]
            a = self.stalks[self.edges[name].tail]
            dw, db = d @ a.T, d.sum(axis=1, keepdims=True)
            self.maps[name] = (w + rate * dw, b + rate * db)
            if out is not None:
                out.update_norm[name] = rate * float(
                    np.sqrt(np.einsum("ij,ij->", dw, dw) + np.einsum("ij,ij->", db, db))
                )

    def _count_flips(self, out: RoundStats) -> None:
        for v, m in self._masks.items():
            edge = "R" + v[1:]
            if edge in self.edges:
                now = self.stalks[v] >= 0
                out.flips[edge] = int(np.count_nonzero(now != (m > 0)))
