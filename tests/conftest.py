"""Shared fixtures: where the golden reference data lives.

The repository and ``shared/`` sit side by side (``/work/main`` and
``/work/shared`` here; in CI the repo is cloned with ``../shared`` beside it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # so that ``import golden_cases`` works anywhere
    sys.path.insert(0, str(TESTS))

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``<repo>/../shared/golden``; fails (never skips) when it is missing."""
    if not (GOLDEN_DIR / "cases.json").is_file():
        pytest.fail(
            f"golden reference data not found: expected {GOLDEN_DIR}/cases.json. "
            "Check out the shared/ folder beside the repository "
            "(<repo>/../shared/golden).",
            pytrace=False,
        )
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (it takes 5-10 s to start).

    Tests that use Ray take this fixture; ``RayEngine`` and the CLI then find Ray
    initialised and reuse it. It is shut down once, at the end of the session.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def engines(ray_session):
    """``engines(problem, **options)`` makes a Ray engine on the session's Ray;
    every engine made is closed when the test ends."""
    from sheafdist.engines.ray_engine import RayEngine

    made: list[RayEngine] = []

    def make(problem, **options) -> RayEngine:
        engine = RayEngine(problem, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()
