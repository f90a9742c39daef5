"""What every engine returns, and the rules every engine stops by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import DivergenceError
from ..model import MLP
from ..problem import Problem
from ..rules import RoundStats, Traffic
from ..sheaf import stable_step

MIN_ROUNDS = 5  # the tolerance rule is checked from this round on
ENERGY_GROWTH = 1e8  # energy above (E0 + 1) times this counts as divergence

REPORT_SECONDS = 0.5  # how often an engine hands statistics to its observer

# called with the round count, the latest round's statistics and the traffic since
# the previous call; engines call it at most every REPORT_SECONDS and at the end
Observer = Callable[[int, RoundStats, Traffic], None]


@dataclass
class RunResult:
    stalks: dict[str, np.ndarray]
    model: MLP
    rounds: int
    converged: bool
    final_change: float
    energy: float
    discord: dict[str, float] = field(default_factory=dict)
    flips: int = 0
    seconds: float = 0.0


def divergence_limit(energy0: float) -> float:
    return ENERGY_GROWTH * (energy0 + 1.0)


def diverged(stats: RoundStats, limit: float) -> bool:
    return not np.isfinite(stats.max_change) or not stats.energy <= limit


def divergence_error(problem: Problem, rounds: int, energy: float) -> DivergenceError:
    """The error of a run that blew up at round ``rounds``, with the stable bound
    ``2/lambda_max`` at the forward pattern of the problem's inputs and weights
    (those of the current pattern in inference; training retells it with the
    current weights, :func:`sheafdist.training.training_divergence`)."""
    cfg = problem.config
    try:
        bound = stable_step(problem.model, problem.stalks["a0"], 1.0)
        hint = (
            f"the stable bound is alpha*dt < 2/lambda_max = {bound:.4g}; "
            f"lower --dt below {bound / cfg.alpha:.4g}"
        )
    except Exception:  # the bound is advice; never hide the divergence behind it
        hint = "lower --dt"
    error = DivergenceError(
        f"--dt: the scheme diverged at round {rounds} with alpha={cfg.alpha:g}, "
        f"dt={cfg.dt:g} (energy {energy:.3g}); {hint}"
    )
    # for callers that retell it (training counts rounds across engines)
    error.round, error.energy = rounds, energy
    return error


def make_engine(name: str, problem: Problem, **options):
    if name == "local":
        from .local import LocalEngine

        return LocalEngine(problem, **options)
    if name == "ray":
        from .ray_engine import RayEngine

        return RayEngine(problem, **options)
    from ..errors import InputError

    raise InputError("--engine", repr(name), "use local or ray")
