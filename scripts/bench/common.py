"""Shared pieces of the benchmarks: timing, the golden cases, small problems.

Every benchmark measures the things it compares side by side in one run,
interleaved, and keeps the best of several repeats (the machine is shared, and
the minimum is the least disturbed measurement).

On a loaded machine run them with ``OPENBLAS_NUM_THREADS=1``: with two BLAS
threads competing with other processes for two cores, small matrix products
(and scipy's Cholesky solves) were measured 10-60x slower than with one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT.parent / "shared" / "golden"
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def per_call(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def side_by_side(fns: dict[str, Callable[[], object]], n: int,
                 repeats: int = 7) -> dict[str, float]:
    """Best seconds per call of each function, the functions taking turns."""
    for fn in fns.values():  # warm up
        per_call(fn, max(n // 10, 1))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], per_call(fn, n))
    return best


def calls_for(fn: Callable[[], object], seconds: float = 0.05) -> int:
    """How many calls of ``fn`` take about ``seconds``."""
    once = per_call(fn, 3)
    return max(int(seconds / max(once, 1e-7)), 1)


def block_round(block, stats: bool = False) -> Callable[[], object]:
    """One round of a block holding every vertex: send, then step."""

    def round_() -> None:
        block.send()
        block.step({}, stats=stats, change=False)

    return round_


def paraboloid_problem(arch=(2, 30, 1), n_train=300, config=None):
    from sheafdist.model import he_init
    from sheafdist.problem import training_problem
    from sheafdist.rules import Config
    from sheafdist.tasks import make_task

    data = make_task("paraboloid", 42, n_train, 100)
    model = he_init(list(arch), 0)
    config = config or Config(1.0, 0.005, 1.0 / n_train)
    return training_problem(model, data.X_train, data.Y_train, config, "random",
                            42), data


def golden_case(name: str):
    from golden_cases import load_case

    return load_case(GOLDEN, name)


def threads_note() -> str:
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    set_ = {k: os.environ[k] for k in keys if k in os.environ}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"cpus {os.cpu_count()}, load average {load:.2f}, "
            f"BLAS threads {set_ or 'default'}")
