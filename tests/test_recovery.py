"""An actor lost in the middle of a Ray run: the run recovers and ends as if
nothing happened.

The observer (called by the driver every half second) kills one actor once the
run has passed a chosen round, either with ``ray.kill`` or with SIGKILL to the
actor's worker process (a crash Ray did not ask for). The engine must notice,
replace the actor, roll every block back to the last complete checkpoint and
finish: in sync mode with the uninterrupted local engine's result (1e-12), in
async mode converged to the tolerance.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from golden_cases import load_case, make_problem

from sheafdist.engines.local import LocalEngine
from sheafdist.engines.ray_engine import RayEngine
from sheafdist.model import forward

CHECKPOINT_EVERY = 200
KILL_AFTER = 400  # rounds: past at least one complete checkpoint
DETECTION_SECONDS = 15.0  # kill to recovery; generous on a loaded 2-core machine


def kill_and_wait(actor, timeout: float = 30.0) -> None:
    """``ray.kill`` only asks for the kill: wait until the actor really is gone,
    so the engine's next call finds it dead rather than still answering."""
    import ray

    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.state.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"actor still alive {timeout:.0f}s after ray.kill")


class Killer:
    """An observer that kills actor ``victim`` once, past round ``after``."""

    def __init__(self, how: str, victim: int, after: int = KILL_AFTER):
        self.how, self.victim, self.after = how, victim, after
        self.engine: RayEngine | None = None
        self.killed_at: float | None = None
        self.killed_round: int | None = None
        self.alive: list[int] = []  # the actors alive, as each report said

    def __call__(self, rounds, stats, traffic) -> None:
        if stats.actors_alive is not None:
            self.alive.append(stats.actors_alive)
        if self.killed_at is not None or rounds < self.after:
            return
        import ray

        engine = self.engine
        if self.how == "ray.kill":
            ray.kill(engine.actors[self.victim], no_restart=True)
        else:
            os.kill(engine.placement[self.victim]["pid"], signal.SIGKILL)
        self.killed_at, self.killed_round = time.monotonic(), rounds


@pytest.fixture
def killed(ray_session, monkeypatch):
    """``killed(problem, how, victim, **options)``: a Ray engine whose observer
    kills an actor; records when the engine began to recover."""
    made: list[RayEngine] = []
    recovered: list[float] = []
    original = RayEngine._recover

    def timed(self, cause):
        recovered.append(time.monotonic())
        return original(self, cause)

    monkeypatch.setattr(RayEngine, "_recover", timed)

    def make(problem, how: str, victim: int, **options):
        killer = Killer(how, victim)
        engine = RayEngine(problem, observer=killer,
                           checkpoint_every=CHECKPOINT_EVERY, **options)
        killer.engine = engine
        made.append(engine)
        return engine, killer, recovered

    yield make
    for engine in made:
        engine.close()


def assert_recovered_once(engine, killer, recovered) -> None:
    assert killer.killed_at is not None, "the run ended before the kill"
    assert engine.recoveries == 1
    assert len(recovered) == 1
    took = recovered[0] - killer.killed_at
    assert 0 <= took < DETECTION_SECONDS, f"the loss was noticed after {took:.1f}s"


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[v] - b[v]))) for v in a)


@pytest.mark.parametrize(
    "how, victim, partition",
    [("ray.kill", 1, "layer"), ("SIGKILL", 0, "vertex")],
)
def test_sync_inference_ends_as_if_uninterrupted(golden_dir, killed, how, victim,
                                                 partition):
    case = load_case(golden_dir, "inference_241")
    steps = 2000
    ref = LocalEngine(make_problem(case)).run(steps)
    engine, killer, recovered = killed(make_problem(case), how, victim,
                                       partition=partition)
    result = engine.run(steps)
    assert_recovered_once(engine, killer, recovered)
    assert result.rounds == steps
    assert max_diff(result.stalks, ref.stalks) <= 1e-12
    # the loss was reported (the gauge of actors alive dips), then the repair
    n = engine.n_actors
    assert n - 1 in killer.alive
    assert killer.alive[-1] == n and killer.alive.index(n - 1) > 0


def test_an_actor_lost_while_starting_is_started_again(golden_dir, ray_session,
                                                      monkeypatch):
    import ray

    case = load_case(golden_dir, "inference_241")
    ref = LocalEngine(make_problem(case)).run(300)
    original, calls = RayEngine._connect, []

    def connect(self):
        calls.append(len(calls))
        if len(calls) == 1:  # the first time only: an actor dies as it starts
            ray.kill(self.actors[1], no_restart=True)
        return original(self)

    monkeypatch.setattr(RayEngine, "_connect", connect)
    engine = RayEngine(make_problem(case), partition="vertex")
    try:
        result = engine.run(300)
    finally:
        engine.close()
    assert len(calls) == 2
    assert max_diff(result.stalks, ref.stalks) <= 1e-12


def test_an_actor_lost_between_runs_is_restored_from_the_last_result(
        golden_dir, ray_session):
    """Killed while the driver does something else (an epoch boundary): the next
    call finds it dead, replaces it with the state the last run ended in, and
    the runs go on as one uninterrupted run."""
    case = load_case(golden_dir, "train_paraboloid_short")
    ref = LocalEngine(make_problem(case)).run(600)
    engine = RayEngine(make_problem(case), partition="layer")
    try:
        engine.run(300)
        kill_and_wait(engine.actors[1])
        engine.model()  # between runs, as training reads the weights
        assert engine.recoveries == 1
        kill_and_wait(engine.actors[0])
        result = engine.run(300)
        assert engine.recoveries == 2
    finally:
        engine.close()
    assert engine.rounds == 600
    assert max_diff(result.stalks, ref.stalks) <= 1e-12
    for w, rw in zip(result.model.W, ref.model.W, strict=True):
        assert np.max(np.abs(w - rw)) <= 1e-12


def test_sync_run_to_tolerance_keeps_the_round_count(golden_dir, killed):
    case = load_case(golden_dir, "inference_241")
    tol = 1e-6
    ref = LocalEngine(make_problem(case)).run(10**6, tol=tol)
    engine, killer, recovered = killed(make_problem(case), "ray.kill", 0,
                                       partition="layer")
    result = engine.run(10**6, tol=tol)
    assert_recovered_once(engine, killer, recovered)
    assert result.converged and ref.converged
    assert result.rounds == ref.rounds
    assert max_diff(result.stalks, ref.stalks) <= 1e-12


def test_async_inference_still_converges_to_the_forward_pass(golden_dir, killed):
    case = load_case(golden_dir, "inference_241")
    problem = make_problem(case)
    engine, killer, recovered = killed(problem, "ray.kill", 1, partition="layer",
                                       mode="async", max_staleness=2)
    result = engine.run(10**6, tol=1e-11)
    assert_recovered_once(engine, killer, recovered)
    assert result.converged
    fwd = forward(problem.model, case.x)
    assert max_diff({v: result.stalks[v] for v in fwd}, fwd) <= 1e-8


def test_training_ends_with_the_uninterrupted_weights(golden_dir, killed):
    case = load_case(golden_dir, "train_paraboloid_short")
    steps = 2000
    ref = LocalEngine(make_problem(case)).run(steps)
    engine, killer, recovered = killed(make_problem(case), "SIGKILL", 1,
                                       partition="layer")
    result = engine.run(steps)
    assert_recovered_once(engine, killer, recovered)
    for layer, (w, rw) in enumerate(zip(result.model.W, ref.model.W,
                                        strict=True), 1):
        assert np.max(np.abs(w - rw)) <= 1e-12, f"W{layer}"
    for b, rb in zip(result.model.b, ref.model.b, strict=True):
        assert np.max(np.abs(b - rb)) <= 1e-12
    assert max_diff(result.stalks, ref.stalks) <= 1e-12


def test_an_actor_lost_every_time_gives_up_with_a_clear_error(golden_dir,
                                                              ray_session):
    """A cluster that keeps losing actors: the run stops after the allowed
    recoveries with an error that says so, and does not hang."""
    from sheafdist.errors import RunError

    case = load_case(golden_dir, "inference_241")

    class Always(Killer):
        def __call__(self, rounds, stats, traffic):
            import ray

            ray.kill(self.engine.actors[self.victim], no_restart=True)

    killer = Always("ray.kill", 0, after=0)
    engine = RayEngine(make_problem(case), observer=killer, partition="layer",
                       checkpoint_every=CHECKPOINT_EVERY, max_recoveries=2)
    killer.engine = engine
    try:
        with pytest.raises(RunError, match="gave up after 2 recoveries"):
            engine.run(10**7)
        assert engine.recoveries == 2
    finally:
        engine.close()
