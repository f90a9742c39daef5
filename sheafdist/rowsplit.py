"""Row splits: one wide layer's stalks spread over several actors.

Splitting hidden layer ``l`` into ``m`` pieces cuts ``z_l`` and ``a_l`` by rows
into contiguous ranges ``S_0 .. S_{m-1}`` (sizes as ``numpy.array_split``). The
refined sheaf has

- vertices ``z_l[k]`` and ``a_l[k]``, rows ``S_k`` of the whole stalks;
- ReLU edges ``R_l[k]`` from ``z_l[k]`` to ``a_l[k]`` (the mask is diagonal, so the
  ReLU step splits exactly);
- row blocks ``W_l[k,:]`` of the affine edge into the layer, ordinary edges from
  ``a_{l-1}`` to ``z_l[k]``;
- for the affine edge out of the layer, ``z_{l+1} = sum_k W_{l+1}[:, S_k] a_l[k]
  + b``: members ``W_{l+1}[:,k]`` from ``a_l[k]`` to ``z_{l+1}`` that share one
  discrepancy. Each member's tail sends its partial sum ``W[:, S_k] a_l[k]`` (the
  bias rides with member 0); the head sums them into the discrepancy ``d`` and
  answers each member with ``d + P_k``, the value its partial sum should have
  had, from which the member forms ``d`` again. Every message still joins the two
  ends of one edge of the whole sheaf, and every map ``W[:, S_k]`` learns from its
  own edge's discrepancy and its own stalk.

With both ``l`` and ``l+1`` split the members are the blocks ``W_{l+1}[j,k]`` and
each row block ``j`` of ``z_{l+1}`` has its own group. The owner of a map is the
tail of its member, so a split layer also spreads the next layer's weights by
columns: ``m`` actors hold ``n_{l+1} x n_l / m`` each. The sums run in a different
order than the whole edge's ``W a``, so a split run agrees with an unsplit one
to rounding (1e-12), not bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from .errors import InputError
from .model import MLP
from .pins import HardPin, SoftPin
from .sheaf import Edge, SheafGraph, Vertex

# schemes whose step at a coordinate does not depend on how its vertex is cut:
# the others use a vertex's own block of the Laplacian, which a split changes
SPLIT_SCHEMES = ("euler", "momentum")


def parse(specs: str | dict | None, arch: list[int], arg: str = "--row-split"
          ) -> dict[int, int]:
    """``"2:4"`` -> ``{2: 4}``: hidden layer 2 in 4 pieces; ``"1:2,2:4"`` splits
    two layers. A dict is checked and returned as it is."""
    if isinstance(specs, dict):
        specs = ",".join(f"{layer}:{m}" for layer, m in specs.items())
    out: dict[int, int] = {}
    hidden = range(1, len(arch) - 1)
    for spec in (specs or "").split(",") if specs else []:
        # ASCII digits only: str.isdigit would let "²" through to int()
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec), re.ASCII)
        if match is None:  # an empty piece (a stray comma) shows the whole value
            got = repr(spec) if str(spec).strip() else repr(specs)
            raise InputError(arg, got, "write LAYER:PIECES, e.g. 1:2 cuts "
                             "hidden layer 1 into 2 pieces by rows")
        layer_i, pieces_i = int(match[1]), int(match[2])
        if layer_i not in hidden:
            raise InputError(arg, repr(spec), f"layer {layer_i} is not hidden; "
                             f"split one of layers {hidden.start}.."
                             f"{hidden.stop - 1}" if len(hidden) else
                             "this network has no hidden layer to split")
        if not 2 <= pieces_i <= arch[layer_i]:
            raise InputError(arg, repr(spec), f"layer {layer_i} has "
                             f"{arch[layer_i]} rows: give 2..{arch[layer_i]} "
                             "pieces")
        if layer_i in out:
            raise InputError(arg, repr(spec), f"layer {layer_i} is split twice; "
                             "give each layer once")
        out[layer_i] = pieces_i
    return out


def ranges(n: int, pieces: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of ``n`` rows in ``pieces`` near-equal parts."""
    bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(n), pieces)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def piece(name: str, k: int) -> str:
    return f"{name}[{k}]"


def refine(graph: SheafGraph, splits: dict[int, int]) -> SheafGraph:
    """The sheaf with the layers in ``splits`` cut into pieces (see the module
    docstring); vertices and edges keep the path order, pieces in row order."""
    cuts = {layer: ranges(graph.arch[layer], m) for layer, m in splits.items()}
    out = SheafGraph(list(graph.arch), graph.output)
    for v in graph.vertices.values():
        if v.layer in cuts and v.name[0] in "za" and v.name != "a_out":
            if v.name.startswith("a"):
                continue  # a_l's pieces go in beside z_l's
            for k, rows in enumerate(cuts[v.layer]):
                for name in (v.name, f"a{v.layer}"):
                    out.vertices[piece(name, k)] = Vertex(
                        piece(name, k), rows[1] - rows[0], v.layer, name, rows)
        else:
            out.vertices[v.name] = v
    for e in graph.edges.values():
        for member in _members(e, cuts):
            out.edges[member.name] = member
    return out


def _members(e: Edge, cuts: dict[int, list]) -> list[Edge]:
    if e.kind == "relu":
        if e.layer not in cuts:
            return [e]
        return [Edge(piece(e.name, k), "relu", e.layer, piece(e.tail, k),
                     piece(e.head, k), b - a, e.name, "", (a, b))
                for k, (a, b) in enumerate(cuts[e.layer])]
    if e.kind != "affine" or (e.layer not in cuts and e.layer - 1 not in cuts):
        return [e]
    row_blocks = list(enumerate(cuts[e.layer])) if e.layer in cuts else [(None, None)]
    col_blocks = list(enumerate(cuts[e.layer - 1])) if e.layer - 1 in cuts \
        else [(None, None)]
    out = []
    for j, rows in row_blocks:
        head = e.head if j is None else piece(e.head, j)
        group = e.name if j is None else f"{e.name}[{j},:]"
        for k, cols in col_blocks:
            tail = e.tail if k is None else piece(e.tail, k)
            name = f"{e.name}[{':' if j is None else j},{':' if k is None else k}]"
            dim = e.dim if rows is None else rows[1] - rows[0]
            out.append(Edge(name, "affine", e.layer, tail, head, dim, e.name,
                            "" if name == group else group, rows, cols,
                            k is None or k == 0))
    return out


def infer(graph: SheafGraph, names) -> dict[int, int]:
    """The split that produced piece names like ``z2[3]`` (a trace's vertices):
    the number of pieces of each layer is one more than the largest index seen."""
    splits: dict[int, int] = {}
    for name in names:
        base, sep, rest = name.partition("[")
        if sep and base in graph.vertices and rest[:-1].isdigit():
            layer = graph.vertices[base].layer
            splits[layer] = max(splits.get(layer, 0), int(rest[:-1]) + 1)
    # only what --row-split could have given; other names stay unknown
    return {layer: m for layer, m in splits.items()
            if 0 < layer < graph.depth and 2 <= m <= graph.arch[layer]}


# ------------------------------------------------------------ values


def split_stalks(graph: SheafGraph, stalks: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """Whole stalks -> the refined graph's stalks (row views)."""
    out = {}
    for v in graph.vertices.values():
        if v.base:
            out[v.name] = stalks[v.base][v.rows[0]: v.rows[1]]
        elif v.name in stalks:
            out[v.name] = stalks[v.name]
    return out


def join_stalks(graph: SheafGraph, stalks: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """The refined graph's stalks -> whole stalks (pieces stacked by rows)."""
    out, parts = {}, {}
    for v in graph.vertices.values():
        if v.name not in stalks:
            continue
        if v.base:
            parts.setdefault(v.base, []).append(stalks[v.name])
        else:
            out[v.name] = stalks[v.name]
    for base, pieces in parts.items():
        out[base] = np.concatenate(pieces, axis=0)
    return out


def map_of(edge: Edge, model: MLP) -> tuple[np.ndarray, np.ndarray]:
    """The member's block of its layer's ``(W, b)`` (views; a member without the
    bias gets zeros that never move)."""
    w, b = model.W[edge.layer - 1], model.b[edge.layer - 1]
    rows = slice(*edge.rows) if edge.rows else slice(None)
    cols = slice(*edge.cols) if edge.cols else slice(None)
    if edge.rows is None and edge.cols is None:
        return w, b
    return w[rows, cols], (b[rows] if edge.bias else np.zeros_like(b[rows]))


def join_maps(graph: SheafGraph, model: MLP,
              maps: dict[str, tuple[np.ndarray, np.ndarray]]) -> MLP:
    """A copy of ``model`` with the members' maps written into their blocks."""
    m = model.copy()
    for name, (w, b) in maps.items():
        e = graph.edges[name]
        rows = slice(*e.rows) if e.rows else slice(None)
        cols = slice(*e.cols) if e.cols else slice(None)
        if e.rows is None and e.cols is None:
            m.W[e.layer - 1], m.b[e.layer - 1] = np.array(w), np.array(b)
            continue
        m.W[e.layer - 1] = np.array(m.W[e.layer - 1])
        m.W[e.layer - 1][rows, cols] = w
        if e.bias:
            m.b[e.layer - 1] = np.array(m.b[e.layer - 1])
            m.b[e.layer - 1][rows] = b
    return m


def split_pins(graph: SheafGraph, pins: list, batch: int) -> list:
    """Pins on a split vertex become pins on the pieces holding their rows."""
    out = []
    for pin in pins:
        pieces = [v for v in graph.vertices.values() if v.base == pin.vertex]
        if not pieces:
            out.append(pin)
            continue
        dim = sum(v.dim for v in pieces)
        coords = list(range(dim)) if pin.coords is None else list(pin.coords)
        value = pin.values if isinstance(pin, HardPin) else pin.target
        value = np.broadcast_to(np.asarray(value, dtype=float), (len(coords), batch))
        for v in pieces:
            a, b = v.rows
            mine = [i for i, c in enumerate(coords) if a <= c < b]
            if not mine:
                continue
            local = tuple(coords[i] - a for i in mine)
            if isinstance(pin, HardPin):
                out.append(HardPin(v.name, local, value[mine].copy()))
            else:
                out.append(SoftPin(v.name, local, value[mine].copy(), pin.gamma))
    return out


def check_scheme(splits: dict[int, int], scheme: str) -> None:
    """Refuse a scheme whose step depends on how its vertex is cut."""
    if splits and scheme not in SPLIT_SCHEMES:
        raise InputError("--row-split", f"{_spec(splits)} with --scheme {scheme}",
                         f"a row split runs --scheme {' or '.join(SPLIT_SCHEMES)} "
                         "(the others use whole vertices' own blocks); change "
                         "--scheme or drop --row-split")


def split_problem(problem, splits: dict[int, int]):
    """The same run on the refined sheaf: piece stalks, split pins, and maps cut
    by :meth:`~sheafdist.problem.Problem.maps_of` from the edges' blocks."""
    check_scheme(splits, problem.config.scheme)
    graph = refine(problem.graph, splits)
    batch = problem.batch
    return replace(
        problem, graph=graph, stalks=split_stalks(graph, problem.stalks),
        hard=split_pins(graph, problem.hard, batch),
        soft=split_pins(graph, problem.soft, batch),
    )


def _spec(splits: dict[int, int]) -> str:
    return ",".join(f"{layer}:{m}" for layer, m in sorted(splits.items()))
