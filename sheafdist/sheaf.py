"""The neural sheaf as data, and the dense linear-algebra oracle.

The base graph is the path ``a0 - z1 - a1 - ... - zK [- a_out]``; edges are the
affine steps ``W1..WK``, the ReLU steps ``R1..Rk`` and, for a nonlinear output,
``out``. This module is the oracle and the analysis tool: it assembles the
coboundary and the Laplacian as ``scipy.sparse`` matrices (paper.md section 2.4)
and solves for the harmonic extension directly. It is never in the round loop.

Extended stalks carry the bias: ``a_{l-1}`` holds ``[a_{l-1}; 1_{n_l}]`` and the
affine restriction is ``[W_l, diag(b_l)]``. The ones are boundary coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .model import MLP, forward, phi, relu_mask

KINDS = {"W": "affine", "R": "relu", "out": "output"}


@dataclass(frozen=True)
class Vertex:
    """A vertex, or one piece of a vertex whose stalk a row split spread over
    several actors (:mod:`sheafdist.rowsplit`): ``rows`` are then the piece's
    rows in the stalk of ``base``."""

    name: str
    dim: int
    layer: int
    base: str = ""  # the whole vertex's name; "" means the vertex is whole
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Edge:
    """An edge, or one member of an edge a row split cut.

    Members of one ``group`` share the head and one discrepancy: the head's
    stalk is compared with the sum of the members' tail values (an affine edge
    whose tail vertex is split: ``z = sum_k W[:, S_k] a[S_k] + b``). ``rows`` and
    ``cols`` give the member's block of the whole edge's map; ``bias`` says
    whether it carries the bias (one member of a group does).
    """

    name: str
    kind: str  # affine, relu or output
    layer: int
    tail: str
    head: str
    dim: int
    base: str = ""  # the whole edge's name; "" means the edge is whole
    group: str = ""  # the discrepancy it shares; "" means its own
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    bias: bool = True

    @property
    def whole(self) -> str:
        """The edge of the unsplit sheaf this is part of (metrics use it)."""
        return self.base or self.name

    @property
    def shared(self) -> str:
        """The name of the discrepancy this edge forms."""
        return self.group or self.name


@dataclass
class SheafGraph:
    """Vertices and edges of the neural sheaf of one architecture."""

    arch: list[int]
    output: str
    vertices: dict[str, Vertex] = field(default_factory=dict)
    edges: dict[str, Edge] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.arch) - 1

    @property
    def last(self) -> str:
        return f"z{self.depth}"

    def incident(self, vertex: str) -> list[Edge]:
        """Edges at a vertex, in path order (the one from upstream first)."""
        return [e for e in self.edges.values() if vertex in (e.tail, e.head)]

    def members(self, group: str) -> list[Edge]:
        """The edges that share the discrepancy ``group``, in order."""
        return [e for e in self.edges.values() if e.shared == group]

    def neighbours(self, vertex: str) -> list[str]:
        return [e.head if e.tail == vertex else e.tail for e in self.incident(vertex)]


def build_graph(arch: list[int], output: str = "identity") -> SheafGraph:
    g = SheafGraph(list(arch), output)
    K = len(arch) - 1
    g.vertices["a0"] = Vertex("a0", arch[0], 0)
    for layer in range(1, K + 1):
        n = arch[layer]
        tail = f"a{layer - 1}"
        g.vertices[f"z{layer}"] = Vertex(f"z{layer}", n, layer)
        g.edges[f"W{layer}"] = Edge(f"W{layer}", "affine", layer, tail, f"z{layer}", n)
        if layer < K:
            g.vertices[f"a{layer}"] = Vertex(f"a{layer}", n, layer)
            g.edges[f"R{layer}"] = Edge(
                f"R{layer}", "relu", layer, f"z{layer}", f"a{layer}", n
            )
    if output != "identity":
        g.vertices["a_out"] = Vertex("a_out", arch[K], K)
        g.edges["out"] = Edge("out", "output", K, f"z{K}", "a_out", arch[K])
    return g


def graph_of(model: MLP) -> SheafGraph:
    return build_graph(model.arch, model.output)


# ------------------------------------------------------------ assembly


@dataclass
class Coboundary:
    """The linear part of the sheaf at one activation pattern, for one sample.

    ``delta`` acts on the extended cochain space (every vertex stalk with its
    ones-block, the output vertex left out because its edge is nonlinear). Rows
    are the edges ``W1, R1, W2, ..., WK``; ``free`` and ``boundary`` index the
    columns of Omega and U.
    """

    delta: sp.csr_matrix
    free: np.ndarray
    boundary: np.ndarray
    blocks: dict[str, slice]  # each free vertex's slice within Omega

    @property
    def delta_free(self) -> sp.csr_matrix:
        return self.delta[:, self.free]

    @property
    def delta_boundary(self) -> sp.csr_matrix:
        return self.delta[:, self.boundary]

    def laplacian(self) -> sp.csr_matrix:
        return (self.delta.T @ self.delta).tocsr()

    def blocks_of_laplacian(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """``L[Omega, Omega]`` and ``L[Omega, U]``."""
        rows = self.laplacian()[self.free]
        return rows[:, self.free].tocsr(), rows[:, self.boundary].tocsr()


def coboundary(model: MLP, pattern: list[np.ndarray]) -> Coboundary:
    """Assemble delta for the 0/1 ``pattern`` (one vector per hidden layer)."""
    arch, K = model.arch, model.depth
    if len(pattern) != K - 1:
        raise ValueError(f"pattern needs {K - 1} hidden layers, got {len(pattern)}")
    # column offsets of each (extended) vertex stalk
    cols: dict[str, tuple[int, int, int]] = {}  # name -> (start, stalk dim, ones)
    offset = 0
    for layer in range(K):
        ones = arch[layer + 1]
        cols[f"a{layer}"] = (offset, arch[layer], ones)
        offset += arch[layer] + ones
        cols[f"z{layer + 1}"] = (offset, arch[layer + 1], 0)
        offset += arch[layer + 1]
    n_cols = offset
    rows, cs, vals = [], [], []

    def put(r0: int, c0: int, block) -> None:
        block = sp.coo_matrix(block)
        rows.append(block.row + r0)
        cs.append(block.col + c0)
        vals.append(block.data)

    r = 0
    for layer in range(1, K + 1):
        n = arch[layer]
        w, b = model.W[layer - 1], model.b[layer - 1]
        a_start, a_dim, _ = cols[f"a{layer - 1}"]
        put(r, cols[f"z{layer}"][0], sp.identity(n))
        # [W, diag(b)]: the diagonal sparse, never an (n, n) dense array
        put(r, a_start, -sp.hstack([sp.csr_matrix(w), sp.diags(b[:, 0])]))
        r += n
        if layer < K:
            sigma = np.asarray(pattern[layer - 1], dtype=float)
            put(r, cols[f"a{layer}"][0], sp.identity(n))
            put(r, cols[f"z{layer}"][0], -sp.diags(sigma))
            r += n
    delta = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cs))),
        shape=(r, n_cols),
    )
    free, boundary, blocks = [], [], {}
    position = 0
    for name, (start, dim, ones) in cols.items():
        idx = list(range(start, start + dim))
        if name == "a0":
            boundary += idx
        else:
            free += idx
            blocks[name] = slice(position, position + dim)
            position += dim
        boundary += list(range(start + dim, start + dim + ones))
    # order Omega as z1, a1, z2, ... which is already the column order
    return Coboundary(delta, np.array(free), np.array(boundary), blocks)


def boundary_values(model: MLP, x_col: np.ndarray) -> np.ndarray:
    """``c_U = [x; 1_{n1}; 1_{n2}; ...; 1_{nK}]`` in the column order of U."""
    return np.concatenate([np.ravel(x_col)] + [np.ones(n) for n in model.arch[1:]])


def forward_pattern(model: MLP, x_col: np.ndarray) -> list[np.ndarray]:
    state = forward(model, np.reshape(x_col, (-1, 1)))
    return [relu_mask(state[f"z{layer}"])[:, 0] for layer in range(1, model.depth)]


def random_pattern(model: MLP, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, 2, n).astype(float) for n in model.arch[1:-1]]


def block_laplacian(model: MLP, pattern: list[np.ndarray]) -> np.ndarray:
    """``L[Omega, Omega]`` from the block formula of paper.md eq. (A.5), dense."""
    arch, K = model.arch, model.depth
    sizes = []
    for layer in range(1, K + 1):
        sizes.append(arch[layer])
        if layer < K:
            sizes.append(arch[layer])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    L = np.zeros((starts[-1], starts[-1]))

    def blk(i: int, j: int) -> tuple[slice, slice]:
        return slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])

    for layer in range(1, K + 1):
        zi = 2 * (layer - 1)
        if layer < K:
            R = np.diag(pattern[layer - 1])
            w_next = model.W[layer]
            L[blk(zi, zi)] = np.eye(arch[layer]) + R
            L[blk(zi + 1, zi + 1)] = np.eye(arch[layer]) + w_next.T @ w_next
            L[blk(zi, zi + 1)] = -R
            L[blk(zi + 1, zi)] = -R
        else:
            L[blk(zi, zi)] = np.eye(arch[layer])
        if layer >= 2:
            L[blk(zi, zi - 1)] = -model.W[layer - 1]
            L[blk(zi - 1, zi)] = -model.W[layer - 1].T
    return L


# ------------------------------------------------------------ the oracle


def _unpack(model: MLP, cb: Coboundary, c_free: np.ndarray) -> dict[str, np.ndarray]:
    return {name: c_free[sl].reshape(-1, 1) for name, sl in cb.blocks.items()}


def solve_with_pattern(
    model: MLP, x_col: np.ndarray, pattern: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Harmonic extension for one fixed pattern, by a direct sparse solve of
    ``L[Omega,Omega] c = -L[Omega,U] c_U``."""
    cb = coboundary(model, pattern)
    L_oo, L_ou = cb.blocks_of_laplacian()
    c_free = spla.splu(L_oo.tocsc()).solve(-(L_ou @ boundary_values(model, x_col)))
    return _unpack(model, cb, c_free)


def harmonic_extension(model: MLP, x: np.ndarray) -> dict[str, np.ndarray]:
    """The unique section with ``a0 = x``, found without the forward pass.

    The pattern is state dependent, so iterate: solve with a pattern, read the
    pattern off the solution's own ``z``, repeat until it is self-consistent. As
    delta is triangular this settles in at most K solves.
    """
    x = np.asarray(x, dtype=float).reshape(model.arch[0], -1)
    columns = []
    for j in range(x.shape[1]):
        pattern = [np.ones(n) for n in model.arch[1:-1]]
        for _ in range(model.depth + 1):
            sol = solve_with_pattern(model, x[:, j], pattern)
            new = [relu_mask(sol[f"z{layer}"])[:, 0] for layer in range(1, model.depth)]
            if all(np.array_equal(p, q) for p, q in zip(pattern, new, strict=True)):
                break
            pattern = new
        else:  # pragma: no cover - impossible for a triangular system
            raise RuntimeError("pattern iteration did not settle")
        columns.append(sol)
    state = {"a0": x}
    for name in columns[0]:
        state[name] = np.hstack([c[name] for c in columns])
    if model.output != "identity":
        state["a_out"] = phi(model.output, state[f"z{model.depth}"])
    return state


def laplacian_spectrum(model: MLP, x_col: np.ndarray) -> np.ndarray:
    """Eigenvalues of ``L[Omega,Omega]`` at the forward pattern of one input."""
    L_oo, _ = coboundary(model, forward_pattern(model, x_col)).blocks_of_laplacian()
    return scipy.linalg.eigvalsh(L_oo.toarray())


def lambda_max(model: MLP, x_col: np.ndarray, pattern=None) -> float:
    pattern = forward_pattern(model, x_col) if pattern is None else pattern
    cb = coboundary(model, pattern)
    if len(cb.free) <= 400:
        L_oo, _ = cb.blocks_of_laplacian()
        return float(scipy.linalg.eigvalsh(L_oo.toarray())[-1])
    # L[Omega,Omega] = D^T D with D = delta[:, Omega], applied without forming it:
    # its blocks W^T W are dense (n, n), D holds only the weights
    D = cb.delta_free.tocsr()
    DT = D.T.tocsr()
    op = spla.LinearOperator((D.shape[1], D.shape[1]), dtype=np.float64,
                             matvec=lambda v: DT @ (D @ v))
    return float(spla.eigsh(op, k=1, which="LA", return_eigenvectors=False)[0])


def stable_step(model: MLP, x: np.ndarray, alpha: float, samples: int = 16) -> float:
    """``2 / (alpha * lambda_max)`` over the forward patterns of a few inputs.

    The explicit scheme is stable inside a region iff ``alpha*dt < 2/lambda_max``
    (paper.md section 3.5); the output edge adds at most 1 for a nonlinear phi.
    """
    x = np.asarray(x, dtype=float).reshape(model.arch[0], -1)
    cols = np.linspace(0, x.shape[1] - 1, min(samples, x.shape[1])).astype(int)
    lam = max(lambda_max(model, x[:, j]) for j in cols)
    if model.output != "identity":
        lam += 1.0
    return 2.0 / (alpha * lam)
