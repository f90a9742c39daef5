"""The local engine: every vertex in one process, one block, plain calls.

It is the correctness reference: the Ray engine in sync mode must reproduce its
trajectory to 1e-12, and both run the same :class:`~sheafdist.rules.Block` code.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..model import MLP
from ..pins import apply_hard
from ..problem import Problem
from ..rules import Traffic, add_traffic, direction
from .base import (
    MIN_ROUNDS,
    REPORT_SECONDS,
    Observer,
    RunResult,
    diverged,
    divergence_error,
    divergence_limit,
)

log = logging.getLogger(__name__)


class LocalEngine:
    name = "local"

    def __init__(
        self,
        problem: Problem,
        observer: Observer | None = None,
        record_energy: bool = False,
    ):
        self.problem = problem
        self.block = problem.block(list(problem.graph.vertices))
        self.observer = observer
        # with record_energy, energies[t] is the energy at the start of round t+1
        # over every run() of this engine (the rate check of paper.md 3.3)
        self.energies: list[float] | None = [] if record_energy else None
        self.rounds = 0
        self._limit = None
        self._reported = 0  # the round of the last report to the observer
        self._next_report = 0.0

    def run(
        self, rounds: int, tol: float | None = None, min_rounds: int = MIN_ROUNDS
    ) -> RunResult:
        """Take up to ``rounds`` rounds; stop early once the largest change of a
        free coordinate in one round is below ``tol`` (from ``min_rounds`` on)."""
        start, block = time.perf_counter(), self.block
        stats, converged, taken = None, False, 0
        every = self.energies is not None
        for taken in range(1, rounds + 1):
            # statistics only where they are read: the first round (the
            # divergence limit), reports and the last round; other rounds check
            # divergence on the block's one-dot-product energy estimate
            full = (every or taken == rounds or self._limit is None
                    or (self.observer is not None
                        and time.monotonic() >= self._next_report))
            block.send()
            stats = block.step({}, stats=full, change=full or tol is not None)
            self.rounds += 1
            if self.energies is not None:
                self.energies.append(stats.energy)
            if self._limit is None:
                self._limit = divergence_limit(stats.energy)
            if diverged(stats, self._limit):
                raise divergence_error(self.problem, self.rounds, stats.energy)
            if full and self.observer is not None \
                    and time.monotonic() >= self._next_report:
                self._report(stats)
            if tol is not None and taken >= min_rounds and stats.max_change < tol:
                converged = True
                if not full:
                    block.measure(stats)
                break
        if self.observer is not None and stats is not None:
            self._report(stats)
        log.debug("local run: %d rounds in %.3fs", taken, time.perf_counter() - start)
        return RunResult(
            stalks=self.stalks(),
            model=self.model(),
            rounds=taken,
            converged=converged,
            final_change=stats.max_change if stats else 0.0,
            energy=stats.energy if stats else 0.0,
            discord=dict(stats.discord) if stats else {},
            flips=sum(stats.flips.values()) if stats else 0,
            seconds=time.perf_counter() - start,
        )

    def _report(self, stats) -> None:
        """Every round sends the same messages, so traffic is a per-round table
        times the rounds since the last report."""
        rounds = self.rounds - self._reported
        traffic: Traffic = {}
        for (edge, vertex), value in self.block._sent.items():
            key = (edge, direction(self.block.edges[edge], vertex), "local")
            add_traffic(traffic, key, rounds, rounds * value.nbytes)
        self._reported = self.rounds
        self._next_report = time.monotonic() + REPORT_SECONDS
        self.observer(self.rounds, stats, traffic)

    def stalks(self):
        return {v: s.copy() for v, s in self.block.stalks.items()}

    def set_stalks(self, stalks) -> None:
        for v in self.block.owned:
            self.block.stalks[v] = np.array(stalks[v], dtype=np.float64)
        apply_hard(self.block.stalks, self.block.hard)

    def model(self) -> MLP:
        m = self.problem.model.copy()
        for name, (w, b) in self.block.maps.items():
            layer = int(name[1:])
            m.W[layer - 1], m.b[layer - 1] = w.copy(), b.copy()
        return m

    def close(self) -> None:
        pass
