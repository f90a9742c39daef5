"""The Ray engine against the golden cases, the local engine and hostile input.

One embedded Ray serves the whole session (the ``ray_session`` fixture). Starting
an engine's actors costs seconds on 2 cores, so the inference engines are made
once per (case, partition) for this module and every test that borrows one first
puts the golden initial stalks back (``set_stalks``: the maps never change in
inference). Engines a test breaks or trains are made fresh and closed after it.
In ``sync`` mode the Ray engine must give the local engine's trajectory to 1e-12,
whatever the partition, and the golden states at the tolerances of
golden/README.md.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from golden_cases import STATE_ATOL, STATE_RTOL, load_case, make_problem

from sheafdist.engines.local import LocalEngine
from sheafdist.engines.ray_engine import RayEngine
from sheafdist.errors import DivergenceError, InputError, RunError
from sheafdist.partition import partition as make_partition
from sheafdist.rules import Config, RoundStats

ENGINE_ATOL = 1e-12  # Ray against local: the same arithmetic, block by block

FIXED_CASES = (
    "inference_241",
    "inference_batch",
    "inference_sigmoid_241",
    "inference_softmax",
    "pins_hard",
)


@pytest.fixture(scope="module")
def shared(ray_session, golden_dir):
    """``shared(name, partition)``: this module's engine for an inference case,
    reset to the golden initial stalks, with no observer."""
    made: dict[tuple[str, str], RayEngine] = {}

    def borrow(name: str, partition: str) -> RayEngine:
        case = load_case(golden_dir, name)
        key = (name, partition)
        if key not in made:
            made[key] = RayEngine(make_problem(case), partition=partition)
        engine = made[key]
        engine.observer = None
        start = {"a0": case.x, **case.init}
        engine.set_stalks(start)
        assert_same(engine.stalks(), start, f"{name} on {partition}, reset", 0.0)
        return engine

    yield borrow
    for engine in made.values():
        engine.close()


def assert_golden(mine: dict, gold: dict, what: str) -> None:
    assert gold, f"{what}: no golden arrays"
    for v, g in gold.items():
        assert mine[v].shape == g.shape, f"{what}: {v}"
        err = np.max(np.abs(mine[v] - g))
        assert np.allclose(mine[v], g, rtol=STATE_RTOL, atol=STATE_ATOL), (
            f"{what}: {v} off the golden array by {err:.3g}")


def assert_same(mine: dict, ref: dict, what: str, atol: float = ENGINE_ATOL) -> None:
    assert set(mine) == set(ref), what
    for v in ref:
        err = np.max(np.abs(mine[v] - ref[v]))
        assert err <= atol, f"{what}: {v} differs from the local engine by {err:.3g}"


def assert_same_model(mine, ref, what: str) -> None:
    for layer, (w, b, rw, rb) in enumerate(zip(mine.W, mine.b, ref.W, ref.b,
                                               strict=True), 1):
        assert np.max(np.abs(w - rw)) <= ENGINE_ATOL, f"{what}: W{layer}"
        assert np.max(np.abs(b - rb)) <= ENGINE_ATOL, f"{what}: b{layer}"


def assert_same_discord(mine: dict, ref: dict, what: str) -> None:
    assert set(mine) == set(ref), f"{what}: edges {sorted(mine)} vs {sorted(ref)}"
    for e in ref:
        assert mine[e] == pytest.approx(ref[e], rel=1e-12, abs=1e-300), f"{what}: {e}"


# ---------------------------------------------------------------- golden, fixed steps


@pytest.mark.parametrize("partition", ["vertex", "layer"])
@pytest.mark.parametrize("name", FIXED_CASES)
def test_fixed_steps_match_golden_and_local(golden_dir, shared, name, partition):
    """Every golden snapshot on ``layer``; on ``vertex`` (4-5 actors, a few times
    slower per round) the first snapshot, and all of them for inference_241."""
    case = load_case(golden_dir, name)
    problem = make_problem(case)
    engine = shared(name, partition)
    expected_actors = len(make_partition(problem.graph, partition))
    assert engine.n_actors == expected_actors
    assert expected_actors == (len(problem.graph.vertices) if partition == "vertex"
                               else case.depth)
    steps = case.meta["fixed_steps"]
    if partition == "vertex" and name != "inference_241":
        steps = steps[:1]
    local = LocalEngine(make_problem(case))
    done, first = 0, engine.rounds
    for n in steps:
        result, ref = engine.run(n - done), local.run(n - done)
        assert result.rounds == n - done and not result.converged
        done = n
        assert engine.rounds == first + n
        what = f"{name} on {partition}, step {n}"
        assert_golden(result.stalks, case.state(f"step{n}"), what)
        assert_same(result.stalks, ref.stalks, what)
        np.testing.assert_array_equal(result.stalks["a0"], case.x)
        assert_same_discord(result.discord, ref.discord, what)
        assert result.flips == ref.flips
        assert result.energy == pytest.approx(ref.energy, rel=1e-12)
        assert result.final_change == pytest.approx(ref.final_change, rel=1e-12)
    # inference never touches the maps
    assert_same_model(engine.model(), case.model, name)


def test_deep_network_first_1000_steps_on_layer(golden_dir, shared):
    case = load_case(golden_dir, "inference_26441")
    engine = shared("inference_26441", "layer")
    assert engine.n_actors == 4  # {a0,z1,a1}, {z2,a2}, {z3,a3}, {z4}
    result = engine.run(1000)
    assert result.rounds == 1000
    assert_golden(result.stalks, case.state("step1000"), "inference_26441 step 1000")
    ref = LocalEngine(make_problem(case)).run(1000)
    assert_same(result.stalks, ref.stalks, "inference_26441 step 1000")
    assert_same_discord(result.discord, ref.discord, "inference_26441")


@pytest.mark.parametrize("partition", ["single", "blocks:2"])
def test_other_partitions_match_local(golden_dir, shared, partition):
    case = load_case(golden_dir, "inference_241")
    engine = shared("inference_241", partition)
    assert engine.n_actors == {"single": 1, "blocks:2": 2}[partition]
    result = engine.run(200)
    ref = LocalEngine(make_problem(case)).run(200)
    assert result.rounds == 200
    assert_same(result.stalks, ref.stalks, partition)
    assert_same_discord(result.discord, ref.discord, partition)
    assert result.energy == pytest.approx(ref.energy, rel=1e-12)


def test_set_stalks_restarts_from_given_state(golden_dir, shared):
    case = load_case(golden_dir, "inference_241")
    engine = shared("inference_241", "vertex")
    engine.run(30)
    first = engine.rounds
    engine.set_stalks({"a0": case.x, **case.init})
    assert_same(engine.stalks(), {"a0": case.x, **case.init}, "after set_stalks", 0.0)
    assert engine.rounds == first
    result = engine.run(100)
    assert result.rounds == 100 and engine.rounds == first + 100  # the count goes on
    assert_golden(result.stalks, case.state("step100"), "set_stalks then 100 steps")


# ---------------------------------------------------------------- run to tolerance


def test_run_to_tol_matches_local_and_golden_iterations(golden_dir, shared):
    case = load_case(golden_dir, "inference_241")
    tol = case.meta["tol"]
    engine = shared("inference_241", "layer")
    first = engine.rounds
    result = engine.run(100_000, tol=tol)
    ref = LocalEngine(make_problem(case)).run(100_000, tol=tol)
    golden = int(case.npz["iterations"])
    assert result.converged and ref.converged
    assert result.rounds == ref.rounds == golden == 8650
    assert engine.rounds == first + golden
    # every actor rolled back to the round where the rule stopped
    assert_same(result.stalks, ref.stalks, "run to tol")
    assert result.final_change == ref.final_change < tol
    assert result.energy == pytest.approx(ref.energy, rel=1e-9, abs=1e-30)
    assert_same_discord(result.discord, ref.discord, "run to tol")
    np.testing.assert_allclose(case.output_of(result.stalks), case.npz["output_tol"],
                               rtol=0, atol=100 * tol)


@pytest.mark.parametrize(
    "name, partition, tol, min_rounds",
    [
        ("pins_hard", "vertex", 1e-4, 5),  # 233 rounds, 3 rounds of lag
        ("pins_hard", "vertex", 1e-3, 5),  # stops at min_rounds
        ("pins_hard", "layer", 1e-3, 40),  # min_rounds holds it back
        ("inference_sigmoid_241", "layer", 1e-3, 5),
        ("inference_241", "single", 1e-5, 5),  # one actor, no neighbours
    ],
)
def test_cheap_runs_to_tol_match_local(golden_dir, shared, name, partition, tol,
                                       min_rounds):
    case = load_case(golden_dir, name)
    engine = shared(name, partition)
    first = engine.rounds
    result = engine.run(100_000, tol=tol, min_rounds=min_rounds)
    ref = LocalEngine(make_problem(case)).run(100_000, tol=tol, min_rounds=min_rounds)
    assert result.converged and ref.converged
    assert result.rounds == ref.rounds >= min_rounds
    assert engine.rounds == first + ref.rounds
    assert_same(result.stalks, ref.stalks, f"{name} {partition} tol {tol}")
    assert result.final_change == ref.final_change < tol


def test_tol_run_that_runs_out_of_rounds_then_continues(golden_dir, shared):
    case = load_case(golden_dir, "inference_241")
    engine = shared("inference_241", "layer")
    first = engine.rounds
    local = LocalEngine(make_problem(case))
    result, ref = engine.run(300, tol=1e-12), local.run(300, tol=1e-12)
    assert not result.converged and not ref.converged
    assert result.rounds == ref.rounds == 300 and engine.rounds == first + 300
    assert_same(result.stalks, ref.stalks, "300 rounds, not converged")
    # a second tolerance run starts where the first stopped
    result, ref = engine.run(10_000, tol=1e-4), local.run(10_000, tol=1e-4)
    assert result.converged and ref.converged
    assert result.rounds == ref.rounds and engine.rounds == first + 300 + ref.rounds
    assert_same(result.stalks, ref.stalks, "continued to tol 1e-4")
    # and a fixed run after a tolerance run goes on from the rolled-back state
    result, ref = engine.run(50), local.run(50)
    assert_same(result.stalks, ref.stalks, "50 more fixed rounds")


# ---------------------------------------------------------------- training


def training_case(golden_dir):
    return load_case(golden_dir, "train_paraboloid_short")


def assert_training_step(case, result, ref, step: int, what: str) -> None:
    m = result.model
    for layer in (1, 2):
        for p, arr in (("W", m.W[layer - 1]), ("b", m.b[layer - 1])):
            gold = case.npz[f"{p}{layer}_step{step}"]
            assert np.allclose(arr, gold, rtol=STATE_RTOL, atol=STATE_ATOL), (
                f"{what}: {p}{layer} vs golden step {step}")
    if step == 10:  # the golden stalks are stored at step 10, not step 1
        assert_golden(result.stalks, case.state("step10"), what)
    assert_same(result.stalks, ref.stalks, what)
    assert_same_model(m, ref.model, what)


def test_training_matches_golden_and_local_in_one_piece_or_two(golden_dir,
                                                               engines):
    """10 joint rounds per vertex in one call, and per layer in two calls of 5:
    both give the golden step-10 weights and stalks, the local engine's (1e-12)
    and each other's."""
    case = training_case(golden_dir)
    ref = LocalEngine(make_problem(case)).run(10)
    whole = engines(make_problem(case), partition="vertex")
    assert whole.n_actors == 4  # a0, z1, a1, z2: no a_out in training
    one = whole.run(10)
    assert one.rounds == 10 and whole.rounds == 10
    assert_training_step(case, one, ref, 10, "vertex, 10 in one piece")
    assert set(one.discord) == {"W1", "R1", "W2", "out"}
    assert_same_discord(one.discord, ref.discord, "vertex")
    # the weights really moved
    assert np.max(np.abs(one.model.W[1] - case.model.W[1])) > 1e-6

    pieces = engines(make_problem(case), partition="layer")
    first = pieces.run(5)
    assert first.rounds == 5 and pieces.rounds == 5
    two = pieces.run(5)
    assert two.rounds == 5 and pieces.rounds == 10  # rounds go on across calls
    assert_training_step(case, two, ref, 10, "layer, 5 + 5")
    assert_same(two.stalks, one.stalks, "5 + 5 vs 10")
    assert_same_model(two.model, one.model, "5 + 5 vs 10")
    assert_same_model(pieces.model(), one.model, "model() after 5 + 5")
    assert_same_discord(two.discord, one.discord, "5 + 5 vs 10")


# ---------------------------------------------------------------- observer, traffic


def crossing(problem, partition: str) -> list[tuple[str, str, int]]:
    """(edge, direction, dim) of every edge message that crosses actors."""
    blocks = make_partition(problem.graph, partition)
    owner = {v: i for i, vs in enumerate(blocks) for v in vs}
    return [
        (e.name, direction, e.dim)
        for e in problem.graph.edges.values() if owner[e.tail] != owner[e.head]
        for direction in ("forward", "backward")
    ]


@pytest.mark.parametrize("partition", ["layer", "vertex"])
def test_observer_reports_exact_traffic_and_every_edge(golden_dir, shared,
                                                       partition):
    case = load_case(golden_dir, "inference_batch")
    problem = make_problem(case)
    batch = problem.batch
    assert batch > 1
    reports: list[tuple[int, RoundStats, dict]] = []
    engine = shared("inference_batch", partition)
    engine.observer = lambda r, s, t: reports.append((r, s, t))
    first, rounds = engine.rounds, 300
    calls = dict(engine.calls)
    result = engine.run(rounds)
    # one Ray call per pair of neighbouring actors (each way) per round, all
    # delivered by the end of a sync run, none held back by the bound on
    # pending calls
    pairs = 2 * (engine.n_actors - 1)
    for key, expected in (("sent", rounds * pairs), ("received", rounds * pairs),
                          ("backpressure", 0)):
        assert engine.calls[key] - calls[key] == expected, key
    assert reports, "the observer was never called"
    seen = [r for r, _, _ in reports]
    assert seen == sorted(seen) and seen[-1] == first + rounds
    total: dict[tuple[str, str, str], list[int]] = {}
    for _, _, traffic in reports:
        for key, (count, nbytes) in traffic.items():
            entry = total.setdefault(key, [0, 0])
            entry[0] += count
            entry[1] += nbytes
    remote = {k: v for k, v in total.items() if k[2] == "remote"}
    expected = {(edge, direction, "remote"): [rounds, rounds * 8 * dim * batch]
                for edge, direction, dim in crossing(problem, partition)}
    assert expected, "this partition has no edge between actors"
    assert remote == expected
    # every message is counted once, remote or local: as many as the local engine's
    local_reports = []
    LocalEngine(make_problem(case), observer=lambda r, s, t: local_reports.append(t)
                ).run(rounds)
    by_edge, local_by_edge = {}, {}
    for table, traffic_list in ((by_edge, [t for _, _, t in reports]),
                                (local_by_edge, local_reports)):
        for traffic in traffic_list:
            for (edge, direction, _), (count, nbytes) in traffic.items():
                entry = table.setdefault((edge, direction), [0, 0])
                entry[0] += count
                entry[1] += nbytes
    assert by_edge == local_by_edge
    # the last report carries every edge's discord, as the result does
    last = reports[-1][1]
    assert set(last.discord) == set(problem.graph.edges) == set(result.discord)
    assert last.discord == result.discord


# ---------------------------------------------------------------- bad input


def test_invalid_partition_names_the_argument(golden_dir, ray_session):
    problem = make_problem(load_case(golden_dir, "inference_241"))
    for spec in ("rows", "blocks:0", "blocks:99", "blocks:x"):
        with pytest.raises(InputError) as info:
            RayEngine(problem, partition=spec)
        assert "--partition" in str(info.value) and spec in str(info.value)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"mode": "eventual"}, ["--mode", "eventual", "sync"]),
        ({"max_staleness": -1}, ["--max-staleness", "-1"]),
        ({"local_steps": 0}, ["--local-steps", "0"]),
    ],
)
def test_bad_engine_options_name_the_argument(golden_dir, ray_session, options,
                                              words):
    problem = make_problem(load_case(golden_dir, "inference_241"))
    with pytest.raises(InputError) as info:
        RayEngine(problem, **options)
    for w in words:
        assert w in str(info.value)


def run_in_thread(engine: RayEngine, rounds: int):
    outcome: dict = {}

    def go():
        try:
            outcome["result"] = engine.run(rounds)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, outcome


def stop_if_hung(engine: RayEngine, thread: threading.Thread, seconds: float) -> None:
    thread.join(seconds)
    if thread.is_alive():
        for actor in engine.actors:
            actor.abort.remote("the test gave up waiting")
        thread.join(30)
        pytest.fail(f"the run did not end within {seconds:.0f}s of the fault")


@pytest.mark.parametrize(
    "target, partition",
    [
        (0, "vertex"),
        (-1, "layer"),
    ],
    ids=["first actor", "last actor"],
)
def test_hostile_message_fails_the_run_without_hanging(golden_dir, engines, target,
                                                       partition):
    case = load_case(golden_dir, "inference_241")
    running = threading.Event()
    engine = engines(make_problem(case), partition=partition,
                     observer=lambda r, s, t: running.set())
    thread, outcome = run_in_thread(engine, 10**7)
    assert running.wait(60), "the run never reported"
    victim = engine.actors[target]
    victim.deliver.remote(1 if target == 0 else 0, 5, b"garbage")
    stop_if_hung(engine, thread, 60)
    error = outcome.get("error")
    assert isinstance(error, RunError), f"expected a RunError, got {outcome}"
    text = str(error)
    assert "rejected a message" in text and "payload" in text, text

    # the failure is contained: a fresh engine works
    fresh = engines(make_problem(case), partition="layer")
    assert_golden(fresh.run(100).stalks, case.state("step100"), "fresh engine")


def diverging_case(golden_dir):
    case = load_case(golden_dir, "inference_241")
    return case._replace(config=Config(1.0, 1.5, 0.0, "jacobian"))  # bound 0.69


def test_divergence_is_reported_and_stops_every_actor(golden_dir, engines):
    case = diverging_case(golden_dir)
    engine = engines(make_problem(case), partition="vertex")
    thread, outcome = run_in_thread(engine, 10**7)
    stop_if_hung(engine, thread, 60)
    error = outcome.get("error")
    assert isinstance(error, DivergenceError), f"got {outcome}"
    assert "--dt" in str(error) and "2/lambda_max" in str(error)


def test_divergence_message_matches_the_local_engine(golden_dir, engines):
    case = diverging_case(golden_dir)
    with pytest.raises(DivergenceError) as local:
        LocalEngine(make_problem(case)).run(1000)
    engine = engines(make_problem(case), partition="single")
    with pytest.raises(DivergenceError) as remote:
        engine.run(1000)
    assert str(remote.value) == str(local.value)
