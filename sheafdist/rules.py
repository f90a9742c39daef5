"""The vertex program: what a vertex sends, how it moves, how its maps learn.

This is the only place the dynamics are written (with :mod:`sheafdist.schemes`,
the time-stepping rules); both engines call it. A :class:`Block` owns some
vertices of the sheaf (all of them in the local engine, one partition block in a
Ray actor). A round is

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
Other schemes (``Config.scheme``) change only how the forces move the stalks.

Speed. A block plans its round once, at construction: every stalk is a view
into one flat buffer, every edge value, discrepancy and force has its own
preallocated buffer, and a round is a fixed list of numpy calls writing into
them. The arithmetic, and so every floating-point result, is that of the plain
expressions above. The arrays in :attr:`Block.stalks`, :attr:`Block.maps` and the
dict returned by :meth:`Block.send` are the block's own buffers, updated in place
by the next :meth:`Block.step`: copy what you keep. Assigning to ``stalks`` or
``maps`` (the dicts or their items) copies the values in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .model import phi, phi_pullback, relu_mask
from .pins import HardPin, SoftPin, apply_hard, fully_pinned, rows
from .sheaf import Edge, SheafGraph

OUTPUT_EDGE_MODES = ("jacobian", "identity")


@dataclass
class Config:
    """Rates and the time-stepping scheme.

    ``scheme`` is one of :data:`sheafdist.schemes.SCHEMES` (``euler``, the paper's
    explicit Euler, is the default); ``momentum`` and ``omega`` tune the other
    schemes and ``None`` takes the scheme's default.
    """

    alpha: float = 1.0
    dt: float = 0.01
    beta: float = 0.0  # 0 means inference: the maps stay fixed
    output_edge: str = "jacobian"
    scheme: str = "euler"
    momentum: float | None = None
    omega: float | None = None


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
    # on rounds without statistics: 1/2 the batch mean of ||d||^2 over every
    # discrepancy the block formed, from one dot product (a divergence signal;
    # it counts an edge shared with another block on both sides)
    energy_estimate: float | None = None
    # the Ray engine's count of actors that answered its latest report
    actors_alive: int | None = None
    # filled by the Ray engine: edge-value messages and their bytes from actor
    # to actor since the last report, [messages, bytes] by (sender, receiver);
    # a pair (i, i) counts the values that stayed inside actor i
    pairs: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """Whether the report carries a round's statistics (a report of a
        recovery carries only ``actors_alive``)."""
        return bool(self.discord) or self.energy_estimate is not None

    @property
    def energy(self) -> float:
        """``1/2 sum_e discord_e``: the Dirichlet energy per sample."""
        if not self.discord and self.energy_estimate is not None:
            return self.energy_estimate
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


class _Into(dict):
    """A dict whose item assignment copies into the block's buffers."""

    def __init__(self, data: dict, store: Callable[[str, object], None]):
        super().__init__(data)
        self._store = store

    def __setitem__(self, key, value) -> None:
        self._store(key, value)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self._store(key, value)

    def __reduce__(self):  # pickles as a plain dict of copies
        return (dict, ({k: _copy(v) for k, v in self.items()},))


def _copy(value):
    if isinstance(value, tuple):
        return tuple(np.array(v) for v in value)
    return np.array(value)


@dataclass
class FreeVertex:
    """What a moving vertex knows of its own diagonal block of the Laplacian,
    ``D_v = sum over incident edges F_v^T F_v`` (plus soft-pin stiffness): the
    local bounds and solves of :mod:`sheafdist.schemes` are built from it."""

    name: str
    stalk: np.ndarray  # view of the flat stalk buffer
    force: np.ndarray  # view of the flat force buffer
    start: int  # offset in the flat buffers
    colour: int  # 0 for a pre-activation z, 1 for a, a_out (the path is bipartite)
    diagonal: np.ndarray  # (dim, 1): the fixed diagonal part of D_v
    mask: np.ndarray | None  # its ReLU mask: adds diag(mask) (tail of an R edge)
    gram: str | None  # the affine map it owns as tail: adds W^T W
    pinned: list[tuple[int, ...] | slice] = field(default_factory=list)


# bounds on the curvature an output edge (or the label pull) adds at z_K:
# identity 1, sigmoid sup phi' = 1/4, softmax ||J|| <= 1/2
OUTPUT_BOUND = {"identity": 1.0, "sigmoid": 0.25, "softmax": 0.5}


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
        self.hard = [p for p in hard if p.vertex in self.owned]
        self.soft = [p for p in soft if p.vertex in self.owned]
        self.target = target if graph.last in self.owned else None
        self.batch = np.shape(stalks[self.owned[0]])[1]
        # vertices that move, with their incident edges in path order
        self.free = [
            v for v in owned
            if not fully_pinned(v, graph.vertices[v].dim, self.hard)
        ]
        self.incident = {v: graph.incident(v) for v in owned}
        self.edges = {e.name: e for v in owned for e in self.incident[v]}
        # the edges sharing each discrepancy this block meets (one edge each,
        # unless a row split cut a vertex: see sheafdist.rowsplit)
        self.groups = {e.shared: graph.members(e.shared) for e in self.edges.values()}
        # a discrepancy's discord is recorded once, by the block owning its head,
        # under the name of the whole edge: (discrepancy, whole edge)
        self.recorded = list({e.shared: e.whole for e in self.edges.values()
                              if e.head in self.owned}.items())
        self._build(
            {v: np.asarray(stalks[v], dtype=np.float64) for v in owned},
            {e: (np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64))
             for e, (w, b) in maps.items()},
        )

    # ---------------------------------------------------------------- state

    @property
    def stalks(self) -> dict[str, np.ndarray]:
        return self._stalks

    @stalks.setter
    def stalks(self, values: dict[str, np.ndarray]) -> None:
        for v, s in values.items():
            self._set_stalk(v, s)

    @property
    def maps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self._maps

    @maps.setter
    def maps(self, values: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        for e, wb in values.items():
            self._set_map(e, wb)

    def _set_stalk(self, vertex: str, value) -> None:
        view = self._stalks.get(vertex)
        if view is None:
            raise KeyError(f"{vertex} is not a vertex of this block")
        np.copyto(view, value)
        self.scheme.reset()

    def _set_map(self, name: str, value) -> None:
        if name not in self._maps:
            raise KeyError(f"{name} is not a map of this block")
        w, b = self._maps[name]
        np.copyto(w, value[0])
        np.copyto(b, value[1])
        self.scheme.reset()

    def snapshot(self) -> dict:
        """Copies of the stalks, the maps and the scheme's memory (momentum,
        round parity): :meth:`restore` returns the block exactly to this point."""
        return {
            "stalks": {v: s.copy() for v, s in self._stalks.items()},
            "maps": {e: (w.copy(), b.copy()) for e, (w, b) in self._maps.items()},
            "scheme": self.scheme.state(),
        }

    def restore(self, snap: dict) -> None:
        self.stalks = snap["stalks"]
        self.maps = snap["maps"]
        self.scheme.load(snap["scheme"])

    def __getstate__(self) -> dict:
        """Pickle the description and the values, never the buffers: the plan
        holds views, and an unpickled array may be read-only (Ray)."""
        keep = ("graph", "owned", "config", "hard", "soft", "target", "batch",
                "free", "incident", "edges", "groups", "recorded")
        state = {k: self.__dict__[k] for k in keep}
        state["snapshot"] = self.snapshot()
        return state

    def __setstate__(self, state: dict) -> None:
        snap = state.pop("snapshot")
        self.__dict__.update(state)
        maps = {e: (np.array(w), np.array(b)) for e, (w, b) in snap["maps"].items()}
        self._build({v: np.array(s) for v, s in snap["stalks"].items()}, maps)
        self.scheme.load(snap["scheme"])

    # ---------------------------------------------------------------- plan

    def _build(self, stalks: dict, maps: dict) -> None:
        """Allocate every buffer and write the round as a list of numpy calls."""
        from .schemes import make_scheme

        graph, batch, cfg = self.graph, self.batch, self.config
        fixed = [v for v in self.owned if v not in self.free]
        size = {v: graph.vertices[v].dim * batch for v in self.owned}
        self._nfree = sum(size[v] for v in self.free)
        flat = np.empty(self._nfree + sum(size[v] for v in fixed))
        self._flat = flat
        self._x = flat[: self._nfree]  # the free stalks, contiguous
        self._f = np.empty(self._nfree)  # forces, then steps
        self._old = np.empty(self._nfree)
        views, offset, start = {}, 0, {}
        for v in self.free + fixed:
            dim = graph.vertices[v].dim
            views[v] = flat[offset: offset + size[v]].reshape(dim, batch)
            start[v] = offset
            np.copyto(views[v], stalks[v])
            offset += size[v]
        self._stalks = _Into({v: views[v] for v in self.owned}, self._set_stalk)
        apply_hard(self._stalks, self.hard)
        self._maps = _Into(
            {e: (np.array(w), np.array(b)) for e, (w, b) in maps.items()},
            self._set_map)
        forces = {v: self._f[start[v]: start[v] + size[v]].reshape(views[v].shape)
                  for v in self.free}

        # masks and edge values (send)
        self._masks = {
            v: np.empty_like(views[v]) for v in self.owned
            if v.startswith("z") and f"R{v[1:]}" in self.edges
        }
        sent: dict[tuple[str, str], np.ndarray] = {}
        send_ops: list[Callable[[], object]] = [
            partial(np.greater_equal, views[v], 0.0, out=m)
            for v, m in self._masks.items()
        ]
        for v in self.owned:
            x = views[v]
            for e in self.incident[v]:
                if v == e.head:
                    # a shared discrepancy's head answers after the partial sums
                    # arrive (reply), not with its stalk
                    if len(self.groups[e.shared]) == 1:
                        sent[(e.name, v)] = x
                    continue
                buf = np.empty((e.dim, batch))
                sent[(e.name, v)] = buf
                if e.kind == "affine":
                    w, b = self._maps[e.name]
                    send_ops += [partial(np.matmul, w, x, out=buf),
                                 partial(np.add, buf, b, out=buf)]
                elif e.kind == "relu":
                    send_ops.append(partial(np.multiply, self._masks[v], x, out=buf))
                else:
                    send_ops.append(partial(_put_phi, graph.output, x, buf))
        self._sent = sent
        self._send_ops = send_ops

        # discrepancies, all in one flat buffer (one dot product is the energy):
        # one per shared discrepancy whose head this block owns, else one per
        # edge it meets as a tail
        def key(e: Edge) -> str:
            return e.shared if e.head in self.owned else e.name

        names = list(dict.fromkeys(key(e) for e in self.edges.values()))
        dims = {key(e): e.dim for e in self.edges.values()}
        pull = self.target is not None
        n_d = sum(dims[n] * batch for n in names)
        if pull:
            n_d += graph.vertices[graph.last].dim * batch
        self._dflat = np.empty(n_d)
        disc, offset = {}, 0
        for n in names:
            disc[n] = self._dflat[offset: offset + dims[n] * batch].reshape(dims[n],
                                                                           batch)
            offset += dims[n] * batch
        for e in self.edges.values():
            disc[e.name] = disc[key(e)]
        local_ops, remote = [], []
        # which edge values form each discrepancy: a trace shows them for the
        # weight updates (an update reads its own edge only)
        self.reads: dict[str, list[tuple[str, str]]] = {}
        formed = {}
        for e in self.edges.values():
            members = self.groups[e.shared] if e.head in self.owned else [e]
            reads = [(e.name, e.head)] + [(m.name, m.tail) for m in members]
            self.reads[e.name] = reads
            if key(e) in formed:
                continue
            head = sent.get(reads[0], views.get(e.head, reads[0]))
            tails = [sent.get(r, r) for r in reads[1:]]
            formed[key(e)] = (disc[key(e)], head, tails)
            if any(type(x) is tuple for x in (head, *tails)):
                remote.append(formed[key(e)])
            else:
                local_ops.append(
                    partial(np.subtract, head, tails[0], out=disc[key(e)])
                    if len(tails) == 1 else
                    partial(_form, disc[key(e)], head, tails, {}))
        step_ops = list(local_ops)
        if pull:
            n = graph.vertices[graph.last].dim
            d_out = self._dflat[offset:].reshape(n, batch)
            disc["out"] = d_out
            step_ops.append(partial(_label_pull, graph.output, self.target,
                                    views[graph.last], d_out))
        self._disc, self._remote = disc, remote

        # the answers of a shared discrepancy's head to the members whose tails
        # are elsewhere: d + P_k, what member k's partial sum should have been
        self._replies: dict[tuple[str, str], np.ndarray] = {}
        self._reply_forms, self._reply_ops = [], []
        for g, members in self.groups.items():
            far = [m for m in members
                   if m.head in self.owned and m.tail not in self.owned]
            if len(members) == 1 or not far:
                continue
            self._reply_forms.append(formed[g])
            for m in far:
                r = np.empty((m.dim, batch))
                self._replies[(m.name, m.head)] = r
                self._reply_ops.append((r, disc[g], (m.name, m.tail)))

        # forces: the sum over incident edges in path order, then soft pins
        self._tmp = {}
        for v in self.free:
            terms, heads = [], set()
            for e in self.incident[v]:
                d = disc[e.name]
                if v == e.head:
                    if e.shared not in heads:  # once per shared discrepancy
                        heads.add(e.shared)
                        terms.append(("neg", d))
                elif e.kind == "affine":
                    terms.append(("mat", self._maps[e.name][0].T, d))
                elif e.kind == "relu":
                    terms.append(("mul", self._masks[v], d))
                elif cfg.output_edge == "identity":
                    terms.append(("pos", d))
                else:
                    terms.append(("pull", graph.output, views[v], d))
            if v == graph.last and pull:
                terms.append(("pos", disc["out"]))
            step_ops += self._force_ops(v, terms, forces[v])
            for pin in self.soft:
                if pin.vertex == v:
                    step_ops.append(partial(_soft_force, forces[v], views[v],
                                            rows(pin.coords), pin.gamma, pin.target))
        self._step_ops = step_ops

        # learning: each owned map's gradient buffers; the update of a map reads
        # its edge's discrepancy and its owner's stalk, the edge's tail
        self._learn_plan = []
        if cfg.beta:
            for name, (w, b) in self._maps.items():
                tail = views[self.edges[name].tail]
                self.reads[name] = [*self.reads[name], ("stalk", self.edges[name].tail)]
                # a member without the bias keeps zeros there: its gradient is 0
                self._learn_plan.append(
                    (name, w, b, disc[name], tail, np.empty_like(w), np.zeros_like(b),
                     self.edges[name].bias, self.edges[name].whole)
                )

        # hard pins on moving vertices (the others never move)
        self._pins = [
            (views[p.vertex], rows(p.coords), p.values, p.vertex) for p in self.hard
            if p.vertex in self.free
        ]
        self._vertices = [self._free_vertex(v, views, forces, start)
                          for v in self.free]
        self.scheme = make_scheme(self)

    def _free_vertex(self, v, views, forces, start) -> FreeVertex:
        graph, dim = self.graph, self.graph.vertices[v].dim
        diagonal = np.zeros((dim, 1))
        gram = None
        heads = set()
        for e in self.incident[v]:
            if v == e.head:
                if e.shared not in heads:
                    heads.add(e.shared)
                    diagonal += 1.0
            elif e.kind == "affine":
                gram = e.name
            elif e.kind == "output":
                diagonal += OUTPUT_BOUND[graph.output]
        if v == graph.last and self.target is not None:
            diagonal += OUTPUT_BOUND[graph.output]
        for pin in self.soft:
            if pin.vertex == v:
                diagonal[rows(pin.coords)] += pin.gamma
        pinned = [r for view, r, _, name in self._pins if name == v]
        colour = 0 if v.startswith("z") else 1
        return FreeVertex(v, views[v], forces[v], start[v], colour, diagonal,
                          self._masks.get(v), gram, pinned)

    def _force_ops(self, v: str, terms: list, out: np.ndarray) -> list:
        """Numpy calls that leave ``sum(terms)`` in ``out``, with the sum's own
        rounding: two terms in either order (a + b = b + a and a + (-b) = a - b
        exactly), more terms left to right."""
        if len(terms) == 2 and terms[0][0] == "neg" and terms[1][0] != "neg":
            terms = [terms[1], terms[0]]
        ops = [_term_op(terms[0], out)]
        for term in terms[1:]:
            if term[0] == "neg":
                ops.append(partial(np.subtract, out, term[1], out=out))
            else:
                tmp = self._tmp.setdefault(v, np.empty_like(out))
                ops += [_term_op(term, tmp), partial(np.add, out, tmp, out=out)]
        return ops

    def _pin(self) -> None:
        for view, r, values, _ in self._pins:
            view[r] = values

    # ---------------------------------------------------------------- send

    def edge_value(self, edge: Edge, vertex: str) -> np.ndarray:
        """``F_v(x_v)``: the image of the vertex's stalk in the edge stalk (a new
        array, from the current stalk; :meth:`send` computes all of them)."""
        x = self._stalks[vertex]
        if vertex == edge.head:
            return x.copy()
        if edge.kind == "affine":
            w, b = self._maps[edge.name]
            return w @ x + b
        if edge.kind == "relu":
            return relu_mask(x) * x
        return phi(self.graph.output, x)

    def send(self) -> dict[tuple[str, str], np.ndarray]:
        """Edge values of every owned vertex, keyed by ``(edge, vertex)``.

        The dict and its arrays are the block's own: valid until the next
        :meth:`step`, which moves the stalks (the head-side values) in place."""
        for op in self._send_ops:
            op()
        return self._sent

    def reply(self, received: dict[tuple[str, str], np.ndarray]
              ) -> dict[tuple[str, str], np.ndarray]:
        """The head's answers to the members of a shared discrepancy whose
        tails are in other blocks, from their partial sums in ``received``:
        ``d + P_k`` for member ``k``, keyed by ``(member, head)``. Empty unless a
        row split cut a vertex of this block's neighbour (see
        :mod:`sheafdist.rowsplit`); the arrays are the block's own, like
        :meth:`send`'s."""
        for d, head, tails in self._reply_forms:
            _form(d, head, tails, received)
        for r, d, partial_sum in self._reply_ops:
            np.add(d, received[partial_sum], out=r)
        return self._replies

    # ---------------------------------------------------------------- step

    def step(
        self,
        received: dict[tuple[str, str], np.ndarray],
        stats: bool = True,
        change: bool = True,
    ) -> RoundStats:
        """One round from the values of :meth:`send` and the neighbours' values
        in ``received``.

        ``stats`` measures discord, mask flips and weight-update norms;
        without it the round sets ``energy_estimate`` instead (a cheap divergence
        signal). ``change=False`` also skips the largest change of a coordinate
        (``max_change`` is then 0): for runs with no tolerance rule.
        """
        for d, head, tails in self._remote:
            _form(d, head, tails, received)
        for op in self._step_ops:
            op()
        out = RoundStats()
        if self._learn_plan:  # from the old stalks, before they move
            self._learn(out if stats else None)
        out.max_change = self.scheme.move(change)
        if stats:
            self.measure(out)
        else:
            dflat = self._dflat
            out.energy_estimate = 0.5 * float(np.dot(dflat, dflat)) / self.batch
        return out

    def measure(self, out: RoundStats) -> RoundStats:
        """Discord and mask flips of the latest round, into ``out``: what
        ``step(stats=True)`` records, for a round stepped without statistics
        (valid until the next :meth:`send`)."""
        batch = self.batch
        for name, whole in self.recorded:  # the pieces of a split edge add up
            d = self._disc[name]
            value = float(np.einsum("ij,ij->", d, d)) / batch
            out.discord[whole] = out.discord.get(whole, 0.0) + value
        if self.target is not None:
            d = self._disc["out"]
            out.discord["out"] = float(np.einsum("ij,ij->", d, d)) / batch
        for v, m in self._masks.items():
            now = self._stalks[v] >= 0
            whole = self.edges["R" + v[1:]].whole
            out.flips[whole] = out.flips.get(whole, 0) + int(
                np.count_nonzero(now != (m > 0)))
        return out

    def _learn(self, out: RoundStats | None) -> None:
        """Each owned affine map descends its own edge energy, summed over the
        batch: the gradient ``-d_e [a;1]^T``, moved by the scheme."""
        scheme = self.scheme
        for name, w, b, d, a, gw, gb, bias, whole in self._learn_plan:
            np.matmul(d, a.T, out=gw)
            if bias:
                np.sum(d, axis=1, keepdims=True, out=gb)
            norm = 0.0
            if out is not None:
                norm = float(np.sqrt(
                    np.einsum("ij,ij->", gw, gw) + np.einsum("ij,ij->", gb, gb)))
            rate = scheme.move_map(name, w, b, gw, gb, a)
            if not bias:
                gb.fill(0.0)  # the scheme scaled it in place; keep it zero
            if out is not None:
                add_norm(out.update_norm, whole, norm * rate)


def add_norm(norms: dict[str, float], name: str, value: float) -> None:
    """Combine the norms of a split map's pieces (the norm of the whole)."""
    if name in norms:
        value = float(np.hypot(norms[name], value))
    norms[name] = value


def _form(d: np.ndarray, head, tails: list, received: dict) -> None:
    """``d = head - tail_0 - tail_1 - ...``: a discrepancy from the head's value
    and the tails' (their partial sums, for a shared one); a tuple is the key
    of a value in ``received``."""
    np.subtract(received[head] if type(head) is tuple else head,
                received[tails[0]] if type(tails[0]) is tuple else tails[0], out=d)
    for t in tails[1:]:
        np.subtract(d, received[t] if type(t) is tuple else t, out=d)


def _put_phi(output: str, z: np.ndarray, out: np.ndarray) -> None:
    out[...] = phi(output, z)


def _label_pull(output: str, y: np.ndarray, z: np.ndarray, out: np.ndarray) -> None:
    """``y - phi(z)``: the cross-entropy pull of the label on the last vertex."""
    if output == "identity":
        np.subtract(y, z, out=out)
    else:
        np.subtract(y, phi(output, z), out=out)


def _soft_force(f, x, r, gamma, target) -> None:
    f[r] = f[r] - gamma * (x[r] - target)


def _pullback(output: str, z: np.ndarray, d: np.ndarray, out: np.ndarray) -> None:
    out[...] = phi_pullback(output, z, d)


def _term_op(term: tuple, out: np.ndarray):
    kind = term[0]
    if kind == "neg":
        return partial(np.negative, term[1], out=out)
    if kind == "mat":
        return partial(np.matmul, term[1], term[2], out=out)
    if kind == "mul":
        return partial(np.multiply, term[1], term[2], out=out)
    if kind == "pos":
        return partial(np.copyto, out, term[1])
    return partial(_pullback, term[1], term[2], term[3], out)
