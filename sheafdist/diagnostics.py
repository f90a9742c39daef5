"""Diagnostics: where the tension of a sheaf state lives, and how fast it relaxes.

paper.md section 6 and the golden README define them:

- **discord** of an edge is the batch mean of the squared norm of its discrepancy
  ``d_e``: ``W a + b - z`` on an affine edge, ``ReLU(z) - a`` on a ReLU edge and
  ``phi(z) - a_out`` on the output edge. It is summed by operation type
  (``affine``, ``relu``, ``output``) and by layer: layer l holds ``W_l`` and
  ``R_l``, and the output edge belongs to layer K. In a *training* state the
  output edge is the pull towards the labels: ``||z_K - y||^2`` for identity
  output, the cross-entropy of ``phi(z_K)`` against ``y`` otherwise (6.1);
- **output-pinned discord** (section 4): start at the forward pass, pin the output
  to the labels, diffuse, and read where the tension settles. An SGD-trained or
  imported network has zero discord at its forward pass; this is how it is read;
- **spectral diagnostics** (6.2): for each input, ``L[Omega, Omega]`` at its
  forward pattern, its smallest eigenvalue (eigenvalues below 1e-8 count as
  zero), largest eigenvalue and condition number, and the energy per block of
  the Fiedler and top eigenvectors; medians and interquartile ranges over inputs;
- **mask-flip events** during a diffusion: ``(round, vertex, coordinate,
  sample)`` each time a pre-activation changes sign;
- **the rate check** (3.3, check 5): the measured asymptotic decay rate of the
  energy against ``2 alpha lambda_min`` (continuous time) and
  ``-2 ln(1 - alpha dt lambda_min) / dt`` (explicit Euler) at the forward pattern.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .engines import make_engine
from .engines.base import diverged, divergence_error, divergence_limit
from .model import MLP, forward, phi, relu_mask
from .pins import HardPin
from .problem import Problem, inference_problem
from .rules import Config
from .sheaf import block_laplacian, forward_pattern

ZERO_EIGENVALUE = 1e-8  # paper.md 6.2: eigenvalues below this count as zero
CE_CLAMP = 1e-12  # cross-entropy clamps probabilities as model.loss does
KINDS = ("affine", "relu", "output")

# the measured rate: fit log E over the last RATE_FRACTION of the rounds whose
# energy is above RATE_FLOOR (below it round-off flattens the curve), if that
# leaves at least RATE_MIN_POINTS rounds
RATE_FLOOR = 1e-26
RATE_FRACTION = 0.25
RATE_MIN_POINTS = 20


# ---------------------------------------------------------------- discord


def edge_residuals(
    model: MLP, state: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``d_e`` of every edge present in ``state``, each ``(dim, batch)``.

    ``state`` holds ``a0, z1, a1, ..., zK`` (and ``a_out`` for the output edge).
    """
    K, d = model.depth, {}
    for layer in range(1, K + 1):
        w, b = model.W[layer - 1], model.b[layer - 1]
        z = state[f"z{layer}"]
        d[f"W{layer}"] = w @ state[f"a{layer - 1}"] + b - z
        if layer < K:
            d[f"R{layer}"] = relu_mask(z) * z - state[f"a{layer}"]
    if model.output != "identity" and "a_out" in state:
        d["out"] = phi(model.output, state[f"z{K}"]) - state["a_out"]
    return d


def edge_discord_samples(
    model: MLP, state: dict[str, np.ndarray], target: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-sample discord of every edge, each of shape ``(batch,)``.

    Without ``target`` this is an inference state. With ``target`` it is a
    training state: the output edge is the pull towards the labels, the squared
    error for identity output and the cross-entropy (summed over classes) for
    sigmoid or softmax; an ``a_out`` in the state is then ignored.
    """
    inference = {k: v for k, v in state.items() if target is None or k != "a_out"}
    out = {e: np.einsum("ij,ij->j", r, r)
           for e, r in edge_residuals(model, inference).items()}
    if target is not None:
        z = state[f"z{model.depth}"]
        if model.output == "identity":
            out["out"] = np.einsum("ij,ij->j", z - target, z - target)
        else:
            p = np.clip(phi(model.output, z), CE_CLAMP, 1 - CE_CLAMP)
            ce = -target * np.log(p)
            if model.output == "sigmoid":
                ce = ce - (1 - target) * np.log(1 - p)
            out["out"] = ce.sum(axis=0)
    return out


@dataclass
class Discord:
    """Discord by edge, by layer and by operation type (batch means)."""

    by_edge: dict[str, float]
    by_layer: dict[int, float]
    by_kind: dict[str, float]
    total: float  # sum over edges: 2 x the Dirichlet energy (the golden 'total')
    per_sample: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def as_dict(self, samples: bool = False) -> dict:
        out = {
            "by_edge": dict(self.by_edge),
            "by_layer": {str(k): v for k, v in self.by_layer.items()},
            "by_kind": dict(self.by_kind),
            "total": self.total,
        }
        if samples:
            out["per_sample"] = {e: v.tolist() for e, v in self.per_sample.items()}
        return out


def edge_kind(edge: str) -> str:
    return {"W": "affine", "R": "relu"}.get(edge[:1], "output")


def edge_layer(edge: str, depth: int) -> int:
    return depth if edge == "out" else int(edge[1:])


def breakdown(per_sample: dict[str, np.ndarray], depth: int) -> Discord:
    """Sum per-edge batch means by layer and by kind."""
    by_edge = {e: float(np.mean(v)) for e, v in per_sample.items()}
    by_layer = {layer: 0.0 for layer in range(1, depth + 1)}
    by_kind = {k: 0.0 for k in KINDS if k != "output" or "out" in by_edge}
    for e, v in by_edge.items():
        by_layer[edge_layer(e, depth)] += v
        by_kind[edge_kind(e)] += v
    return Discord(by_edge, by_layer, by_kind, float(sum(by_edge.values())),
                   per_sample)


def discord(
    model: MLP, state: dict[str, np.ndarray], target: np.ndarray | None = None
) -> Discord:
    """Discord of an inference state, or of a training state with ``target``."""
    return breakdown(edge_discord_samples(model, state, target), model.depth)


# ---------------------------------------------------------------- pinned


@dataclass
class PinnedResult:
    discord: Discord
    rounds: int
    converged: bool
    final_change: float
    stalks: dict[str, np.ndarray] = field(repr=False)


def pinned_problem(
    model: MLP, x: np.ndarray, y: np.ndarray, alpha: float = 1.0, dt: float = 0.01
) -> Problem:
    """Forward-pass start with the output hard-pinned to ``y``: ``z_K = y`` for
    identity output, ``a_out = y`` with the identity-mode output edge otherwise."""
    y = np.asarray(y, dtype=np.float64)
    vertex = f"z{model.depth}" if model.output == "identity" else "a_out"
    if y.shape != (model.arch[-1], np.shape(x)[1]):
        raise ValueError(f"labels of shape {y.shape} for {model.arch[-1]} outputs "
                         f"and {np.shape(x)[1]} inputs")
    config = Config(alpha=alpha, dt=dt, beta=0.0, output_edge="identity")
    return inference_problem(model, x, config, "forward",
                             hard=[HardPin(vertex, None, y)])


def pinned_discord(
    model: MLP,
    x: np.ndarray,
    y: np.ndarray,
    dt: float = 0.01,
    tol: float = 1e-10,
    max_steps: int = 100_000,
    alpha: float = 1.0,
    engine: str = "local",
    engine_options: dict | None = None,
) -> PinnedResult:
    """Output-pinned discord (paper.md section 4, [CODE] ``compute_pinned_discord``).

    Defaults are the paper's: dt 0.01, tol 1e-10 on the largest change of a round,
    at most 100,000 rounds. ``converged`` says whether the tolerance was reached.
    """
    problem = pinned_problem(model, x, y, alpha, dt)
    eng = make_engine(engine, problem, **(engine_options or {}))
    try:
        result = eng.run(max_steps, tol)
    finally:
        eng.close()
    return PinnedResult(
        discord(model, result.stalks), result.rounds, result.converged,
        result.final_change, result.stalks,
    )


# ---------------------------------------------------------------- spectra


def block_names(arch: list[int]) -> list[str]:
    """The blocks of Omega in order: ``z1, a1, z2, ..., zK``."""
    K = len(arch) - 1
    names = []
    for layer in range(1, K + 1):
        names.append(f"z{layer}")
        if layer < K:
            names.append(f"a{layer}")
    return names


def block_slices(arch: list[int]) -> dict[str, slice]:
    out, start = {}, 0
    for name in block_names(arch):
        n = arch[int(name[1:])]
        out[name] = slice(start, start + n)
        start += n
    return out


def _pattern_key(pattern: list[np.ndarray]) -> bytes:
    return b"".join(np.asarray(p, dtype=np.uint8).tobytes() for p in pattern)


def _eigh_by_pattern(model: MLP, patterns: list[list[np.ndarray]]):
    """``(eigenvalues, eigenvectors)`` of ``L[Omega,Omega]`` for each pattern; inputs
    sharing a pattern share one decomposition."""
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    for pattern in patterns:
        key = _pattern_key(pattern)
        if key not in cache:
            cache[key] = np.linalg.eigh(block_laplacian(model, pattern))
        out.append(cache[key])
    return out


def summary(values) -> dict[str, float]:
    """Median, quartiles, IQR, mean, standard deviation, min and max."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {k: float("nan") for k in
                ("median", "q1", "q3", "iqr", "mean", "std", "min", "max")}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3),
            "iqr": float(q3 - q1), "mean": float(v.mean()), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max())}


@dataclass
class Spectral:
    """Per-input spectral diagnostics of ``L[Omega,Omega]`` at forward patterns."""

    blocks: list[str]
    lambda_1: np.ndarray  # (n_inputs,)
    lambda_max: np.ndarray
    kappa: np.ndarray
    fiedler_energy: np.ndarray  # (n_inputs, n_blocks), rows sum to 1
    top_energy: np.ndarray
    fiedler_stability: float  # mean |cos| between inputs' Fiedler vectors

    def block_energy(self, which: str = "fiedler") -> dict[str, dict[str, float]]:
        energy = self.fiedler_energy if which == "fiedler" else self.top_energy
        return {b: summary(energy[:, i]) for i, b in enumerate(self.blocks)}

    def as_dict(self, per_input: bool = False) -> dict:
        dominant = [self.blocks[i] for i in np.argmax(self.fiedler_energy, axis=1)]
        out = {
            "inputs": int(self.lambda_1.size),
            "blocks": list(self.blocks),
            "lambda_1": summary(self.lambda_1),
            "lambda_max": summary(self.lambda_max),
            "kappa": summary(self.kappa),
            "fiedler_energy": self.block_energy("fiedler"),
            "top_energy": self.block_energy("top"),
            "fiedler_dominant_block": {b: dominant.count(b) for b in set(dominant)},
            "fiedler_stability": self.fiedler_stability,
        }
        if per_input:
            out["per_input"] = {
                "lambda_1": self.lambda_1.tolist(),
                "lambda_max": self.lambda_max.tolist(),
                "kappa": self.kappa.tolist(),
                "fiedler_energy": self.fiedler_energy.tolist(),
                "top_energy": self.top_energy.tolist(),
            }
        return out


def spectral(model: MLP, X: np.ndarray, zero: float = ZERO_EIGENVALUE) -> Spectral:
    """Spectral diagnostics of every column of ``X`` (paper.md 6.2)."""
    X = np.asarray(X, dtype=float).reshape(model.arch[0], -1)
    slices = block_slices(model.arch)
    names = list(slices)
    patterns = [forward_pattern(model, X[:, j]) for j in range(X.shape[1])]
    lam1, lamx, fied, top, vecs = [], [], [], [], []
    for vals, V in _eigh_by_pattern(model, patterns):
        i1 = int(np.argmax(vals >= zero))  # first eigenvalue that is not zero
        v1, vx = V[:, i1], V[:, -1]
        lam1.append(vals[i1])
        lamx.append(vals[-1])
        fied.append([float(v1[s] @ v1[s]) for s in slices.values()])
        top.append([float(vx[s] @ vx[s]) for s in slices.values()])
        vecs.append(v1)
    lam1, lamx = np.array(lam1), np.array(lamx)
    V = np.array(vecs)
    n = len(vecs)
    stability = 1.0
    if n > 1:  # |cos| is blind to the sign of each eigenvector
        G = np.abs(V @ V.T)
        stability = float((G.sum() - np.trace(G)) / (n * (n - 1)))
    return Spectral(names, lam1, lamx, lamx / lam1, np.array(fied), np.array(top),
                    stability)


def worst_gap(model: MLP, max_patterns: int = 1 << 14) -> float:
    """``lambda_* = min over all activation patterns of lambda_min(L[Omega,Omega])``
    (paper.md 3.1); by enumeration, so only for small hidden layers."""
    hidden = model.arch[1:-1]
    count = 1 << sum(hidden)
    if count > max_patterns:
        raise ValueError(f"{count} patterns to enumerate; the limit is {max_patterns}")
    best = np.inf
    for bits in itertools.product((0.0, 1.0), repeat=sum(hidden)):
        pattern, start = [], 0
        for n in hidden:
            pattern.append(np.array(bits[start:start + n]))
            start += n
        best = min(best, np.linalg.eigvalsh(block_laplacian(model, pattern))[0])
    return float(best)


# ---------------------------------------------------------------- rates


def linearised_operator(
    model: MLP, x_col: np.ndarray, output_edge: str = "jacobian"
) -> np.ndarray:
    """``M`` with ``dc/dt = -alpha M (c - c*)`` near the forward pass of one input.

    Identity output: ``L[Omega,Omega]`` at the forward pattern. A nonlinear output
    adds the vertex ``a_out`` and the output edge linearised at ``z_K*`` with
    ``J = J_phi(z_K*)``: the Gauss-Newton block ``[J^T J, -J^T; -J, I]`` in
    ``jacobian`` mode (the energy's Hessian, as the residual is zero there) and
    the non-symmetric ``[J, -I; -J, I]`` in ``identity`` mode.
    """
    x_col = np.reshape(x_col, (-1, 1))
    L = block_laplacian(model, forward_pattern(model, x_col))
    if model.output == "identity":
        return L
    n = model.arch[-1]
    z = forward(model, x_col)[f"z{model.depth}"]
    s = phi(model.output, z)[:, 0]
    J = np.diag(s * (1 - s)) if model.output == "sigmoid" else \
        np.diag(s) - np.outer(s, s)
    m = L.shape[0]
    M = np.zeros((m + n, m + n))
    M[:m, :m] = L
    zk, ao = slice(m - n, m), slice(m, m + n)
    if output_edge == "jacobian":
        M[zk, zk] += J.T @ J
        M[zk, ao] = -J.T
    else:
        M[zk, zk] += J
        M[zk, ao] = -np.eye(n)
    M[ao, zk] = -J
    M[ao, ao] = np.eye(n)
    return M


def predicted_rate(
    model: MLP, x: np.ndarray, alpha: float, dt: float, output_edge: str = "jacobian"
) -> dict[str, float]:
    """Asymptotic decay rate of the energy predicted from the spectrum.

    Per input, with ``mu`` the eigenvalues of :func:`linearised_operator` and
    ``h = alpha dt``: continuous time ``2 alpha min Re mu``; explicit Euler
    ``-2 ln(max |1 - h mu|) / dt``, which is ``-2 ln(1 - h lambda_min) / dt``
    whenever ``h (lambda_min + lambda_max) <= 2``. The energy of a batch is a sum
    over inputs, so the slowest input sets the rate: the minimum is returned.
    """
    x = np.asarray(x, dtype=float).reshape(model.arch[0], -1)
    lam_min, cont, disc = np.inf, np.inf, np.inf
    seen: dict[bytes, np.ndarray] = {}
    for j in range(x.shape[1]):
        if model.output == "identity":  # same pattern, same operator
            key = _pattern_key(forward_pattern(model, x[:, j]))
            if key not in seen:
                seen[key] = np.linalg.eigvalsh(linearised_operator(model, x[:, j]))
            mu = seen[key]
        else:
            M = linearised_operator(model, x[:, j], output_edge)
            mu = np.linalg.eigvalsh(M) if output_edge == "jacobian" else \
                np.linalg.eigvals(M)
        low = float(np.min(mu.real))
        rho = float(np.max(np.abs(1.0 - alpha * dt * mu)))
        lam_min = min(lam_min, low)
        cont = min(cont, 2.0 * alpha * low)
        disc = min(disc, -2.0 * np.log(rho) / dt if rho > 0 else np.inf)
    return {"lambda_min": lam_min, "continuous": cont, "discrete": disc}


def decay_rate(
    energy, dt: float, floor: float = RATE_FLOOR, fraction: float = RATE_FRACTION,
    min_points: int = RATE_MIN_POINTS,
) -> float | None:
    """Measured asymptotic rate ``-d ln E / dt`` of an energy trace.

    ``energy[t]`` is the energy after t rounds. The slope is a least-squares fit
    over the last ``fraction`` of the rounds whose energy is above ``floor``.
    ``None`` when fewer than ``min_points`` rounds qualify (a run that starts at
    the fixed point, or one too short to show its asymptote).
    """
    E = np.asarray(energy, dtype=float)
    above = np.nonzero(np.isfinite(E) & (E > floor))[0]
    if above.size == 0:
        return None
    last = int(above[-1])
    first = max(0, last + 1 - max(min_points, int(fraction * (last + 1))))
    window = np.arange(first, last + 1)
    window = window[E[window] > floor]
    if window.size < min_points:
        return None
    slope = np.polyfit(window * dt, np.log(E[window]), 1)[0]
    return float(-slope)


# ---------------------------------------------------------------- traces


@dataclass
class Trace:
    """A diffusion followed round by round.

    ``energy[t]`` is the energy after t rounds (``energy[0]`` the start);
    ``flips`` has one row ``(round, vertex, coordinate, sample)`` for every
    pre-activation that changed sign during that round (rounds count from 1);
    ``tracked`` holds the tracked vertex's stalk after each round (index 0 the
    start).
    """

    energy: np.ndarray
    flips: list[tuple[int, str, int, int]]
    rounds: int
    converged: bool
    stalks: dict[str, np.ndarray] = field(repr=False)
    tracked: np.ndarray | None = field(default=None, repr=False)

    def flip_rounds(self) -> list[int]:
        return sorted({f[0] for f in self.flips})


def trace(
    problem: Problem,
    rounds: int,
    tol: float | None = None,
    min_rounds: int = 5,
    track: str | None = None,
    stop_energy: float | None = None,
) -> Trace:
    """Run ``problem`` in one process, recording the energy and every mask flip.

    The rounds are the vertex program's own (:class:`~sheafdist.rules.Block`), so
    the trajectory is the local engine's; the stopping rule is the engines'
    (largest change below ``tol`` from ``min_rounds`` on), or ``stop_energy``.
    """
    block = problem.block(list(problem.graph.vertices))
    hidden = [v for v in block.owned if v.startswith("z")
              and f"R{v[1:]}" in problem.graph.edges]
    energy, flips, tracked = [], [], []
    if track is not None:
        tracked.append(block.stalks[track].copy())
    limit, converged, taken = None, False, 0
    for taken in range(1, rounds + 1):
        before = {v: block.stalks[v] >= 0 for v in hidden}
        block.send()
        stats = block.step({})
        energy.append(stats.energy)
        if limit is None:
            limit = divergence_limit(stats.energy)
        if diverged(stats, limit):
            raise divergence_error(problem, taken, stats.energy)
        if any(stats.flips.values()):  # the block counted them; find where
            for v in hidden:
                changed = np.nonzero(before[v] != (block.stalks[v] >= 0))
                for coord, sample in zip(*changed, strict=True):
                    flips.append((taken, v, int(coord), int(sample)))
        if track is not None:
            tracked.append(block.stalks[track].copy())
        if tol is not None and taken >= min_rounds and stats.max_change < tol:
            converged = True
            break
        if stop_energy is not None and stats.energy < stop_energy:
            converged = True
            break
    stalks = {v: s.copy() for v, s in block.stalks.items()}
    final = discord(problem.model, stalks)
    energy.append(0.5 * final.total)
    return Trace(np.array(energy), flips, taken, converged, stalks,
                 np.array(tracked) if track is not None else None)


def flip_events(
    model: MLP,
    x: np.ndarray,
    config: Config,
    init: str | dict[str, np.ndarray] = "random",
    seed: int | None = 0,
    rounds: int = 100_000,
    tol: float | None = 1e-9,
) -> Trace:
    """Inference from ``init`` with every mask flip recorded (see :func:`trace`)."""
    return trace(inference_problem(model, x, config, init, seed), rounds, tol)



RATE_BUDGET = 2e10  # ~ seconds x 1e9 of dense eigensolves the rate check may spend


def rate_check(
    model: MLP,
    x: np.ndarray,
    alpha: float,
    dt: float,
    output_edge: str = "jacobian",
    energies=None,
    pinned: bool = False,
    scheme: str = "euler",
) -> dict[str, float | None]:
    """The keys ``rate_measured``, ``rate_predicted`` (explicit Euler) and
    ``rate_predicted_continuous`` that ``sheafdist infer --json`` reports.

    ``energies`` is the per-round energy trace (``None`` when the engine cannot
    record it: the measured rate is then ``None``). Pins other than ``a0 = x``
    change the operator and leave a nonzero energy at equilibrium, so with
    ``pinned`` every value is ``None``; so is the prediction when its dense
    eigensolves would exceed :data:`RATE_BUDGET`. ``rate_predicted`` is the
    Euler scheme's rate, so it is ``None`` for any other ``scheme`` (its
    measured rate is not comparable to it).
    """
    out: dict[str, float | None] = {"rate_measured": None, "rate_predicted": None,
                                    "rate_predicted_continuous": None}
    if pinned:
        return out
    if energies is not None:
        out["rate_measured"] = decay_rate(energies, dt)
    x = np.asarray(x, dtype=float).reshape(model.arch[0], -1)
    dim = 2 * sum(model.arch[1:-1]) + model.arch[-1] * (
        1 if model.output == "identity" else 2)
    if x.shape[1] * float(dim) ** 3 <= RATE_BUDGET:
        rate = predicted_rate(model, x, alpha, dt, output_edge)
        out["rate_predicted"] = rate["discrete"] if scheme == "euler" else None
        out["rate_predicted_continuous"] = rate["continuous"]
    return out
