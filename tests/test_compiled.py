"""The Ray engine's ``compiled`` exchange: sync rounds as executions of a Ray
compiled graph. It must give exactly what the actors' own Ray calls give (and so
the local engine's trajectory), stop on a tolerance at the same round, count
the same traffic, and recover from a lost actor like the calls do.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from golden_cases import load_case, make_problem

from sheafdist.cli import main
from sheafdist.engines.local import LocalEngine
from sheafdist.engines.ray_engine import RayEngine
from sheafdist.errors import DivergenceError, InputError

ENGINE_ATOL = 1e-12


@pytest.fixture
def compiled(engines):
    """Ray engines on the compiled exchange, closed when the test ends."""
    return lambda problem, **options: engines(problem, exchange="compiled",
                                              **options)


def assert_same(mine: dict, ref: dict, what: str) -> None:
    assert set(mine) == set(ref), what
    for v in ref:
        err = np.max(np.abs(mine[v] - ref[v]))
        assert err <= ENGINE_ATOL, f"{what}: {v} differs from the local engine by {err}"


@pytest.mark.parametrize(
    "name, partition, tol, min_rounds",
    [
        ("pins_hard", "vertex", 1e-4, 5),  # 233 rounds, rounds in flight rolled back
        ("pins_hard", "layer", 1e-3, 40),  # min_rounds holds it back
        ("inference_241", "single", 1e-5, 5),  # one actor: a graph without calls
    ],
)
def test_runs_to_tol_stop_where_the_local_engine_stops(golden_dir, compiled, name,
                                                       partition, tol, min_rounds):
    case = load_case(golden_dir, name)
    engine = compiled(make_problem(case), partition=partition)
    result = engine.run(100_000, tol=tol, min_rounds=min_rounds)
    ref = LocalEngine(make_problem(case)).run(100_000, tol=tol,
                                              min_rounds=min_rounds)
    assert result.converged and ref.converged
    assert result.rounds == ref.rounds == engine.rounds
    assert result.final_change == ref.final_change < tol
    assert_same(result.stalks, ref.stalks, f"{name} {partition} tol {tol}")
    assert_same(engine.stalks(), ref.stalks, "the actors' own stalks, rolled back")


def test_fixed_rounds_then_tol_then_fixed_again(golden_dir, compiled):
    """The graph is kept across runs: 1000 golden rounds, a tolerance run that
    runs out, one that converges, and fixed rounds from the rolled-back state."""
    case = load_case(golden_dir, "inference_26441")
    engine = compiled(make_problem(case), partition="layer")
    local = LocalEngine(make_problem(case))
    result, ref = engine.run(1000), local.run(1000)
    assert result.rounds == 1000 and not result.converged
    assert_same(result.stalks, ref.stalks, "1000 rounds")
    gold = case.state("step1000")
    for v, g in gold.items():
        np.testing.assert_allclose(result.stalks[v], g, rtol=1e-9, atol=1e-12)
    result, ref = engine.run(300, tol=1e-14), local.run(300, tol=1e-14)
    assert not result.converged and result.rounds == ref.rounds == 300
    result, ref = engine.run(100_000, tol=1e-6), local.run(100_000, tol=1e-6)
    assert result.converged and result.rounds == ref.rounds
    assert result.final_change == ref.final_change
    assert_same(result.stalks, ref.stalks, "to tol 1e-6")
    converged_at = 1000 + 300 + ref.rounds
    assert engine.rounds == converged_at
    result, ref = engine.run(7), local.run(7)
    assert_same(result.stalks, ref.stalks, "7 more fixed rounds")
    assert engine.rounds == converged_at + 7


def test_training_equals_the_local_engine(golden_dir, compiled):
    case = load_case(golden_dir, "train_paraboloid_short")
    ref = LocalEngine(make_problem(case)).run(10)
    engine = compiled(make_problem(case), partition="vertex")
    first, second = engine.run(4), engine.run(6)
    assert first.rounds + second.rounds == 10
    assert_same(second.stalks, ref.stalks, "training, 4 + 6 rounds")
    for w, rw in zip(second.model.W, ref.model.W, strict=True):
        assert np.max(np.abs(w - rw)) <= ENGINE_ATOL
    assert np.max(np.abs(second.model.W[1] - case.model.W[1])) > 1e-6  # it moved


def test_traffic_and_pairs_equal_those_of_the_calls(golden_dir, compiled, engines):
    case = load_case(golden_dir, "inference_26441")
    seen: dict[str, dict] = {"calls": {}, "compiled": {}}

    def observer_for(kind):
        def observe(rounds, stats, traffic):
            for key, (n, b) in traffic.items():
                got = seen[kind].setdefault(key, [0, 0])
                got[0], got[1] = got[0] + n, got[1] + b
        return observe

    graph = compiled(make_problem(case), partition="vertex",
                     observer=observer_for("compiled"))
    calls = engines(make_problem(case), partition="vertex",
                    observer=observer_for("calls"))
    assert_same(graph.run(60).stalks, calls.run(60).stalks, "60 rounds")
    assert graph.pairs == calls.pairs
    assert seen["compiled"] == seen["calls"] != {}
    # 8 actors in a chain: one message each way per round along each link
    assert {p: n for p, (n, _) in graph.pairs.items()} == {
        p: 60 for i in range(7) for p in ((i, i + 1), (i + 1, i))}


def test_divergence_reads_as_the_local_engines(golden_dir, compiled):
    case = load_case(golden_dir, "inference_26441")

    def unstable():  # dt far above the stable bound 2/lambda_max = 0.184
        problem = make_problem(case)
        return replace(problem, config=replace(problem.config, dt=5.0))

    with pytest.raises(DivergenceError) as local:
        LocalEngine(unstable()).run(100)
    engine = compiled(unstable(), partition="single")
    with pytest.raises(DivergenceError) as remote:
        engine.run(100)
    assert str(remote.value) == str(local.value)


def test_a_killed_actor_is_recovered_to_the_uninterrupted_result(golden_dir,
                                                                 compiled):
    import ray

    case = load_case(golden_dir, "inference_26441")
    ref = LocalEngine(make_problem(case)).run(3000)
    engine = compiled(make_problem(case), partition="layer", checkpoint_every=200)
    engine.run(5)
    victim = engine.actors[1]

    def kill():
        time.sleep(1.0)
        ray.kill(victim)

    killer = threading.Thread(target=kill)
    killer.start()
    result = engine.run(2995)
    killer.join()
    assert engine.recoveries == 1
    assert_same(result.stalks, ref.stalks, "after a recovery")


@pytest.mark.parametrize("options, clash", [
    ({"mode": "async"}, "--mode async"),
    ({"local_steps": 2}, "--local-steps 2"),
    ({"row_split": "1:2"}, "--row-split 1:2"),
    ({"trace": "t.bin"}, "--trace t.bin"),
])
def test_what_the_graph_does_not_carry_is_refused_before_ray(golden_dir, options,
                                                             clash):
    case = load_case(golden_dir, "inference_26441")
    with pytest.raises(InputError, match="--exchange") as info:
        RayEngine(make_problem(case), exchange="compiled", **options)
    assert clash in str(info.value) and "--exchange calls" in str(info.value)


def test_cli_infer_gives_the_same_numbers_with_either_exchange(golden_dir,
                                                               ray_session,
                                                               tmp_path, capsys):
    with np.load(golden_dir / "inference_26441.npz", allow_pickle=False) as f:
        g = {k: f[k] for k in f.files}
    model = tmp_path / "m.npz"
    np.savez(model, **{k: g[k] for k in g if k[0] in "Wb"},
             output=np.array("identity"))
    np.save(tmp_path / "x.npy", g["x"])
    reports = {}
    for exchange in ("calls", "compiled"):
        code = main(["infer", "--model", str(model), "--input",
                     str(tmp_path / "x.npy"), "--engine", "ray", "--steps", "50",
                     "--exchange", exchange, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        reports[exchange] = json.loads(out)
    a, b = reports["calls"], reports["compiled"]
    assert a["output"] == b["output"] and a["iterations"] == b["iterations"] == 50
    assert a["actor_pairs"] == b["actor_pairs"]
    code = main(["infer", "--model", str(model), "--input", str(tmp_path / "x.npy"),
                 "--engine", "ray", "--exchange", "compiled", "--mode", "async"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--exchange" in err and "--mode async" in err
