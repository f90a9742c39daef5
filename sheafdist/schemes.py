"""Time-stepping schemes: how one round's forces move the stalks and the maps.

Part of the vertex program (:mod:`sheafdist.rules`): a scheme sees, for each
moving vertex, its own force (built from its own stalk, its own maps and its
neighbours' edge values), its own stalk and what the vertex knows of its own
diagonal block of the Laplacian, ``D_v = sum over incident edges F_v^T F_v``;
for a map, the owner's gradient and the owner's stalk. Nothing else, so every
scheme is as local as plain Euler and runs unchanged on either engine.

``euler``
    The paper's explicit Euler, ``x += alpha*dt*f`` and ``W += beta*dt*g``: the
    default, bit for bit the reference trajectory.
``momentum``
    Heavy ball with Euler's steps: ``v = mu*v + alpha*dt*f; x += v`` (and the
    same for each map). ``momentum=0`` is Euler.
``local``
    A step per vertex from local bounds: ``x_v += omega * P_v^{-1} f_v`` with
    ``P_v >= D_v`` built by the vertex itself (``1 + mask`` on a pre-activation,
    ``1 + ||W||^2`` on the owner of ``W``). Because ``L <= 2 blockdiag(D_v)``
    (each edge joins two vertices), ``omega < 1`` is stable at any weights, with
    no global spectral bound. A map moves by
    ``omega * beta*batch / sum_i ||[a_i; 1]||^2`` times its gradient, the same
    kind of bound from the owner's own stalk. ``alpha`` and ``dt`` are unused.
``local-momentum``
    ``local`` with heavy-ball momentum ``mu``.
``red-black``
    Block relaxation: the path graph is bipartite (pre-activations z against
    a, a_out), so rounds alternate between the two colours and a moving vertex
    takes ``x_v += omega * D_v^{-1} f_v`` with its exact local block (a Cholesky
    solve on the owner of ``W``): block Gauss-Seidel for ``omega = 1``,
    over-relaxation above. A colour moves every other round, so a sweep costs
    two rounds (two message exchanges); ``max_change`` is over the last two.
    Maps move every round with the ``local`` step.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .errors import InputError

SCHEMES = ("euler", "momentum", "local", "local-momentum", "red-black")
# defaults, from scripts/bench/schemes.py over the golden inference cases
DEFAULT_OMEGA = {"local": 0.9, "local-momentum": 0.9, "red-black": 1.8}
DEFAULT_MOMENTUM = {"momentum": 0.9, "local-momentum": 0.8}
GRAM_SLACK = 1.05  # margin on a power-iteration estimate of ||W||^2


def settings(config) -> tuple[str, float, float]:
    """``(scheme, omega, momentum)`` with the scheme's defaults filled in."""
    name = config.scheme
    if name not in SCHEMES:
        raise InputError("--scheme", repr(name), f"use one of {', '.join(SCHEMES)}")
    omega = config.omega if config.omega is not None else DEFAULT_OMEGA.get(name, 1.0)
    mu = config.momentum if config.momentum is not None \
        else DEFAULT_MOMENTUM.get(name, 0.0)
    if config.momentum is not None and name in ("euler", "local", "red-black") \
            and config.momentum != 0.0:
        raise InputError("--momentum", f"{config.momentum:g} with --scheme {name}",
                         "use --scheme momentum or local-momentum")
    if config.omega is not None and name not in DEFAULT_OMEGA:
        raise InputError("--omega", f"{config.omega:g} with --scheme {name}",
                         "it applies to --scheme local, local-momentum or "
                         "red-black; drop --omega or change --scheme")
    if not 0.0 <= mu < 1.0:
        raise InputError("--momentum", f"{mu:g}", "give a value in [0, 1)")
    top = 2.0 if name == "red-black" else 1.0
    if name in DEFAULT_OMEGA and not 0.0 < omega < top:
        raise InputError("--omega", f"{omega:g} with --scheme {name}",
                         f"give a value in (0, {top:g})")
    return name, float(omega), float(mu)


def make_scheme(block):
    name, omega, mu = settings(block.config)
    if name == "euler":
        return Euler(block)
    if name == "red-black":
        return RedBlack(block, omega)
    return HeavyBall(block, mu, local=name.startswith("local"), omega=omega)


# ---------------------------------------------------------------- helpers


def _change(block, change: bool) -> float:
    """``max |x_new - x_old|`` over the free coordinates, from ``block._old``."""
    if not change or block._nfree == 0:
        return 0.0
    d = block._f
    np.subtract(block._x, block._old, out=d)
    np.abs(d, out=d)
    return float(d.max())


class _Gram:
    """A bound on ``||W||^2`` kept by the owner of ``W``: exact while ``W`` is
    fixed, then tracked by one warm-started power-iteration step per round, capped
    by the Frobenius norm (a true upper bound)."""

    def __init__(self, w: np.ndarray):
        self.w = w
        self.value = float(np.linalg.norm(w, 2)) ** 2 if w.size else 0.0
        rng = np.random.default_rng(0)
        self.u = rng.standard_normal(w.shape[1])
        for _ in range(50):
            self._power()

    def _power(self) -> float:
        wu = self.w @ self.u
        est = float(wu @ wu)
        u = self.w.T @ wu
        norm = float(np.sqrt(u @ u))
        if norm > 0:
            self.u = u / norm
        return est

    def update(self) -> float:
        frob = float(np.einsum("ij,ij->", self.w, self.w))
        self.value = min(frob, GRAM_SLACK * self._power())
        return self.value


def _local_rate(block, omega: float, a: np.ndarray) -> float:
    """The map step from the owner's stalk: ``omega * beta*batch / rho`` with
    ``rho = sum_i ||[a_i; 1]||^2 >= lambda_max(sum_i [a_i;1][a_i;1]^T)``."""
    rho = float(np.einsum("ij,ij->", a, a)) + a.shape[1]
    return omega * block.config.beta * block.batch / rho


# ---------------------------------------------------------------- schemes


class Euler:
    name = "euler"

    def __init__(self, block):
        cfg = block.config
        self.block = block
        self.step = cfg.alpha * cfg.dt
        self.rate = cfg.dt * cfg.beta

    def move(self, change: bool) -> float:
        b = self.block
        f, x = b._f, b._x
        np.multiply(f, self.step, out=f)
        if change:
            np.copyto(b._old, x)
        np.add(x, f, out=x)
        b._pin()
        return _change(b, change)

    def move_map(self, name, w, bias, gw, gb, a) -> float:
        rate = self.rate
        np.multiply(gw, rate, out=gw)
        np.add(w, gw, out=w)
        np.multiply(gb, rate, out=gb)
        np.add(bias, gb, out=bias)
        return rate

    def reset(self) -> None:
        pass

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass


class HeavyBall:
    """``v = mu*v + P^{-1} f; x += v`` with Euler's ``P^{-1} = alpha*dt`` or the
    local bounds of the ``local`` schemes."""

    def __init__(self, block, mu: float, local: bool, omega: float):
        cfg = block.config
        self.block, self.mu, self.local, self.omega = block, mu, local, omega
        self.name = ("local" if local else "") + ("-momentum" if mu else "")
        self.step = cfg.alpha * cfg.dt
        self.rate = cfg.dt * cfg.beta
        self.v = np.zeros(block._nfree)
        self.map_v: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.training = bool(cfg.beta)
        # per vertex: the fixed scale omega/P_v, or a buffer for the mask's one
        self.plan = []
        for fv in block._vertices:
            gram = _Gram(block.maps[fv.gram][0]) if fv.gram else None
            scale = omega / (fv.diagonal + (gram.value if gram else 0.0))
            buf = np.empty_like(fv.force) if fv.mask is not None else None
            self.plan.append((fv, gram, scale, buf))
        self.pinned = [(block._stalks[fv.name], fv.start, fv.stalk.shape, r)
                       for fv in block._vertices for r in fv.pinned]

    def _precondition(self) -> None:
        omega = self.omega
        for i, (fv, gram, scale, buf) in enumerate(self.plan):
            f = fv.force
            if buf is not None:
                np.add(fv.mask, fv.diagonal, out=buf)
                np.divide(f, buf, out=f)
                np.multiply(f, omega, out=f)
                continue
            if gram is not None and self.training:
                scale = omega / (fv.diagonal + gram.update())
                self.plan[i] = (fv, gram, scale, buf)
            np.multiply(f, scale, out=f)

    def move(self, change: bool) -> float:
        b = self.block
        f, x, v = b._f, b._x, self.v
        if self.local:
            self._precondition()
        else:
            np.multiply(f, self.step, out=f)
        np.multiply(v, self.mu, out=v)
        np.add(v, f, out=v)
        if change:
            np.copyto(b._old, x)
        np.add(x, v, out=x)
        b._pin()
        for _, start, shape, r in self.pinned:  # a pinned coordinate has no speed
            v[start: start + shape[0] * shape[1]].reshape(shape)[r] = 0.0
        return _change(b, change)

    def move_map(self, name, w, bias, gw, gb, a) -> float:
        rate = _local_rate(self.block, self.omega, a) if self.local else self.rate
        vw, vb = self.map_v.setdefault(name, (np.zeros_like(w), np.zeros_like(bias)))
        for p, g, vel in ((w, gw, vw), (bias, gb, vb)):
            np.multiply(g, rate, out=g)
            np.multiply(vel, self.mu, out=vel)
            np.add(vel, g, out=vel)
            np.add(p, vel, out=p)
        return rate

    def reset(self) -> None:
        self.v[:] = 0.0
        self.map_v.clear()

    def state(self) -> dict:
        return {"v": self.v.copy(),
                "map_v": {k: (w.copy(), b.copy()) for k, (w, b) in self.map_v.items()}}

    def load(self, state: dict) -> None:
        self.v[:] = state["v"]
        self.map_v = {k: (np.array(w), np.array(b))
                      for k, (w, b) in state["map_v"].items()}


class RedBlack:
    """Alternate colours; a moving vertex solves its own block exactly."""

    name = "red-black"

    def __init__(self, block, omega: float):
        self.block, self.omega = block, omega
        self.round = 0
        self.last_change = 0.0
        self.training = bool(block.config.beta)
        self.factors: dict[str, tuple] = {}
        self.colours = ([fv for fv in block._vertices if fv.colour == 0],
                        [fv for fv in block._vertices if fv.colour == 1])
        self.buf = {fv.name: np.empty_like(fv.force) for fv in block._vertices
                    if fv.mask is not None}

    def _factor(self, fv):
        if fv.name not in self.factors or self.training:
            w = self.block.maps[fv.gram][0]
            matrix = w.T @ w
            matrix[np.diag_indices_from(matrix)] += fv.diagonal[:, 0]
            self.factors[fv.name] = scipy.linalg.cho_factor(matrix)
        return self.factors[fv.name]

    def move(self, change: bool) -> float:
        b, omega = self.block, self.omega
        moving = self.colours[self.round % 2]
        self.round += 1
        if change:
            np.copyto(b._old, b._x)
        for fv in moving:
            f = fv.force
            if fv.mask is not None:
                buf = self.buf[fv.name]
                np.add(fv.mask, fv.diagonal, out=buf)
                np.divide(f, buf, out=f)
            elif fv.gram is not None:
                f[...] = scipy.linalg.cho_solve(self._factor(fv), f)
            else:
                np.divide(f, fv.diagonal, out=f)
            np.multiply(f, omega, out=f)
            np.add(fv.stalk, f, out=fv.stalk)
        b._pin()
        now = _change(b, change)
        out = max(now, self.last_change)
        self.last_change = now
        return out

    def move_map(self, name, w, bias, gw, gb, a) -> float:
        rate = _local_rate(self.block, 1.0, a)
        for p, g in ((w, gw), (bias, gb)):
            np.multiply(g, rate, out=g)
            np.add(p, g, out=p)
        return rate

    def reset(self) -> None:
        self.last_change = 0.0

    def state(self) -> dict:
        return {"round": self.round, "last_change": self.last_change}

    def load(self, state: dict) -> None:
        self.round = state["round"]
        self.last_change = state["last_change"]
