"""Row splits: one layer's stalks spread by rows over several actors.

The refined sheaf must give the unsplit run's trajectory to rounding, whatever
the partition of its pieces: checked in one process by stepping the blocks
through both exchanges of a round by hand (fast, every golden case), then on
Ray in sync and async mode, with a trace that proves the run local.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from golden_cases import INFERENCE_CASES, TRAINING_CASES, load_case, make_problem

from sheafdist.cli import main
from sheafdist.engines.local import LocalEngine
from sheafdist.errors import InputError
from sheafdist.model import forward, save_model
from sheafdist.partition import partition
from sheafdist.pins import HardPin, SoftPin
from sheafdist.problem import inference_problem
from sheafdist.rowsplit import (
    infer,
    join_maps,
    join_stalks,
    parse,
    refine,
    split_problem,
    split_stalks,
)
from sheafdist.sheaf import build_graph
from sheafdist.trace import locality_violations, read_trace

SPLIT_ATOL = 1e-12  # the partial sums add in another order: rounding, no more


def step_blocks(problem, spec: str, rounds: int):
    """The Ray engine's sync protocol in one process: every block sends, every
    head answers the partial sums it received, every block steps."""
    blocks = [problem.block(vs) for vs in partition(problem.graph, spec)]
    for _ in range(rounds):
        sent = {}
        for b in blocks:
            sent.update({k: v.copy() for k, v in b.send().items()})
        answers = {}
        for b in blocks:
            answers.update({k: v.copy() for k, v in b.reply(sent).items()})
        stats = [b.step({**sent, **answers}) for b in blocks]
    stalks, maps = {}, {}
    for b in blocks:
        stalks.update(b.stalks)
        maps.update(b.maps)
    return (join_stalks(problem.graph, stalks),
            join_maps(problem.graph, problem.model, maps), stats)


def biggest_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[v] - b[v]))) for v in a)


def model_gap(m1, m2) -> float:
    return max(float(np.max(np.abs(x - y)))
               for x, y in zip(m1.W + m1.b, m2.W + m2.b, strict=True))


def every_hidden_layer(arch, pieces=3) -> dict[int, int]:
    return {layer: min(pieces, arch[layer]) for layer in range(1, len(arch) - 1)}


# ---------------------------------------------------------------- the sheaf


def test_refined_sheaf_has_the_pieces_members_and_one_bias_per_group():
    g = refine(build_graph([2, 6, 4, 4, 1]), {1: 2, 2: 3})
    assert list(g.vertices) == [
        "a0", "z1[0]", "a1[0]", "z1[1]", "a1[1]", "z2[0]", "a2[0]", "z2[1]",
        "a2[1]", "z2[2]", "a2[2]", "z3", "a3", "z4"]
    assert [g.vertices[f"z2[{k}]"].rows for k in range(3)] == [(0, 2), (2, 3), (3, 4)]
    # W2 runs from a split layer into a split layer: a 3 x 2 grid of blocks,
    # one shared discrepancy per row block of z2, the bias on column block 0
    w2 = [e for e in g.edges.values() if e.whole == "W2"]
    assert [e.name for e in w2] == [f"W2[{j},{k}]" for j in range(3) for k in range(2)]
    for e in w2:
        j, k = (int(i) for i in e.name[3:-1].split(","))
        assert (e.tail, e.head, e.shared) == (f"a1[{k}]", f"z2[{j}]", f"W2[{j},:]")
        assert e.bias == (k == 0) and e.dim == g.vertices[e.head].dim
    assert [m.name for m in g.members("W3")] == ["W3[:,0]", "W3[:,1]", "W3[:,2]"]
    assert [e.name for e in g.edges.values() if e.whole == "W1"] == \
        ["W1[0,:]", "W1[1,:]"]
    assert [e.name for e in g.edges.values() if e.kind == "relu"] == \
        ["R1[0]", "R1[1]", "R2[0]", "R2[1]", "R2[2]", "R3"]
    assert infer(build_graph([2, 6, 4, 4, 1]), g.vertices) == {1: 2, 2: 3}


def test_layer_partition_gives_each_piece_its_own_actor():
    g = refine(build_graph([2, 6, 4, 1]), {1: 2, 2: 2})
    assert partition(g, "layer") == [
        ["a0", "z1[0]", "a1[0]"], ["z1[1]", "a1[1]"], ["z2[0]", "a2[0]"],
        ["z2[1]", "a2[1]"], ["z3"]]


def test_stalks_and_maps_go_to_pieces_and_back_unchanged(golden_dir):
    problem = make_problem(load_case(golden_dir, "inference_26441"))
    problem.model.b[1] = np.arange(1.0, 5.0).reshape(4, 1)  # golden biases are 0
    split = split_problem(problem, {1: 4, 3: 2})
    assert biggest_gap(join_stalks(split.graph, split.stalks), problem.stalks) == 0
    assert biggest_gap(split_stalks(split.graph, problem.stalks), split.stalks) == 0
    maps = split.maps_of(list(split.graph.vertices))
    assert model_gap(join_maps(split.graph, problem.model, maps), problem.model) == 0
    # the members without the bias hold zeros there
    assert not maps["W2[:,1]"][1].any() and maps["W2[:,0]"][1].any()


@pytest.mark.parametrize("spec, words", [
    ("2", "write LAYER:PIECES"),
    ("a:b", "write LAYER:PIECES"),
    ("0:2", "layer 0 is not hidden"),
    ("4:2", "layer 4 is not hidden"),
    ("1:1", "give 2..6 pieces"),
    ("1:7", "give 2..6 pieces"),
    ("1:2,1:3", "layer 1 is split twice"),
])
def test_bad_row_splits_are_one_line_naming_the_option(spec, words):
    with pytest.raises(InputError) as err:
        parse(spec, [2, 6, 4, 4, 1])
    text = str(err.value)
    assert "--row-split" in text and words in text and "\n" not in text


def test_schemes_that_use_whole_vertices_are_refused(golden_dir):
    problem = make_problem(load_case(golden_dir, "inference_26441"))
    problem = replace(problem, config=replace(problem.config, scheme="red-black"))
    with pytest.raises(InputError, match="--row-split.*red-black.*euler or momentum"):
        split_problem(problem, {1: 2})


# ---------------------------------------------------------------- the dynamics


@pytest.mark.parametrize("name", [*INFERENCE_CASES, *TRAINING_CASES])
@pytest.mark.parametrize("spec", ["single", "layer", "vertex", "blocks:3"])
def test_every_partition_of_the_pieces_gives_the_unsplit_run(golden_dir, name, spec):
    case = load_case(golden_dir, name)
    reference = LocalEngine(make_problem(case))
    reference.run(300)
    split = split_problem(make_problem(case), every_hidden_layer(case.model.arch))
    stalks, model, _ = step_blocks(split, spec, 300)
    assert biggest_gap(stalks, reference.stalks()) <= SPLIT_ATOL
    assert model_gap(model, reference.model()) <= SPLIT_ATOL


def test_momentum_and_pins_on_a_split_layer_give_the_unsplit_run(golden_dir):
    case = load_case(golden_dir, "inference_26441")
    x = case.x
    hard = [HardPin("z2", (0, 3), np.array([[0.5], [-0.25]]))]
    soft = [SoftPin("a1", None, np.zeros((6, 1)), 2.0)]
    config = replace(case.config, scheme="momentum", momentum=0.5)

    def problem():
        return inference_problem(case.model, x, config, case.init, 0, hard, soft)

    reference = LocalEngine(problem())
    reference.run(400)
    stalks, _, _ = step_blocks(split_problem(problem(), {1: 4, 2: 3}), "layer", 400)
    assert biggest_gap(stalks, reference.stalks()) <= SPLIT_ATOL
    assert np.array_equal(stalks["z2"][[0, 3]], np.array([[0.5] * x.shape[1],
                                                           [-0.25] * x.shape[1]]))


def test_statistics_of_a_split_edge_add_up_to_the_whole_edges(golden_dir):
    case = load_case(golden_dir, "train_paraboloid_short")
    reference = LocalEngine(make_problem(case))
    reference.run(50)
    whole = reference.block.step(reference.block.send())  # round 51, measured
    split = split_problem(make_problem(case), {1: 3})
    *_, parts = step_blocks(split, "layer", 51)
    from sheafdist.engines.ray_engine import merge_stats

    merged = merge_stats(parts)
    assert merged.discord.keys() == whole.discord.keys() == {"W1", "R1", "W2", "out"}
    for edge, value in whole.discord.items():
        assert merged.discord[edge] == pytest.approx(value, rel=1e-10)
    for edge, value in whole.update_norm.items():
        assert merged.update_norm[edge] == pytest.approx(value, rel=1e-10)
    assert merged.flips == whole.flips


# ---------------------------------------------------------------- on Ray


def test_ray_sync_with_split_layers_gives_the_local_engines_run(golden_dir,
                                                                engines):
    case = load_case(golden_dir, "inference_26441")
    reference = LocalEngine(make_problem(case))
    want = reference.run(200)
    engine = engines(make_problem(case), partition="layer", row_split="1:2,2:2")
    assert engine.n_actors == 6
    got = engine.run(200)
    assert got.rounds == want.rounds
    assert biggest_gap(got.stalks, want.stalks) <= SPLIT_ATOL
    assert got.discord.keys() == want.discord.keys()
    for edge, value in want.discord.items():
        assert got.discord[edge] == pytest.approx(value, rel=1e-9, abs=1e-300)
    # actors {a0,z1[0],a1[0]} 0, {z1[1],a1[1]} 1, {z2[k],a2[k]} 2+k, {z3,a3} 4,
    # {z4} 5: one message each way per round along every edge between actors
    # (partial sums one way, the heads' answers the other)
    remote = {pair: n for pair, (n, _) in engine.pairs.items() if pair[0] != pair[1]}
    joined = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 4), (3, 4), (4, 5)]
    assert remote == {p: 200 for a, b in joined for p in ((a, b), (b, a))}


def test_ray_training_with_a_split_layer_learns_the_same_weights(golden_dir,
                                                                 engines, tmp_path):
    case = load_case(golden_dir, "train_paraboloid_short")
    reference = LocalEngine(make_problem(case))
    want = reference.run(100)
    path = tmp_path / "split.trace"
    engine = engines(make_problem(case), partition="layer", row_split={1: 3},
                     trace=str(path))
    got = engine.run(100)
    engine.close()
    assert model_gap(got.model, want.model) <= SPLIT_ATOL
    assert biggest_gap(got.stalks, want.stalks) <= SPLIT_ATOL
    # the trace: every message joins two ends of one edge of the refined sheaf,
    # every update reads its own edge; the head answers each piece of W2
    records = list(read_trace(str(path)))
    graph = refine(make_problem(case).graph, {1: 3})
    assert locality_violations(records, graph) == []
    answers = {(r["edge"], r["src"], r["dst"]) for r in records
               if r["kind"] == "message" and r["src"] == "z2"}
    assert answers == {(f"W2[:,{k}]", "z2", f"a1[{k}]") for k in range(3)}
    updates = [r for r in records if r["kind"] == "update"]
    assert {r["edge"] for r in updates} == {
        "W1[0,:]", "W1[1,:]", "W1[2,:]", "W2[:,0]", "W2[:,1]", "W2[:,2]"}
    forged = dict(updates[0], reads=[*updates[0]["reads"], ["R1[1]", "a1[1]"]])
    assert locality_violations([forged], graph) == [forged]


@pytest.mark.parametrize("mode, tau", [("async", 1), ("sync", 3)])
def test_split_runs_in_async_mode_and_with_local_steps_reach_the_forward_pass(
        golden_dir, engines, mode, tau):
    case = load_case(golden_dir, "inference_241")
    init = {v: s for v, s in case.init.items() if v != "a0"}
    problem = inference_problem(case.model, case.x, replace(case.config, dt=0.05),
                                init)
    engine = engines(problem, partition="layer", row_split="1:2", mode=mode,
                     local_steps=tau)
    result = engine.run(100_000, tol=1e-11)
    assert result.converged
    fwd = forward(problem.model, case.x)
    assert max(float(np.max(np.abs(result.stalks[v] - fwd[v]))) for v in fwd) <= 1e-8


def test_cli_infer_with_a_row_split_and_its_trace(golden_dir, ray_session, tmp_path,
                                                  capsys):
    case = load_case(golden_dir, "inference_26441")
    model_path, x_path = tmp_path / "model.npz", tmp_path / "x.npy"
    save_model(case.model, str(model_path))
    np.save(x_path, case.x)
    common = ["infer", "--model", str(model_path), "--input", str(x_path),
              "--steps", "40", "--json"]
    assert main(common) == 0
    local = json.loads(capsys.readouterr().out)
    trace = tmp_path / "run.trace"
    assert main([*common, "--engine", "ray", "--row-split", "2:2",
                 "--trace", str(trace)]) == 0
    split = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(split["output"], local["output"], rtol=0,
                               atol=SPLIT_ATOL)
    assert main(["trace", str(trace), "--model", str(model_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["locality_violations"] == 0 and summary["rounds"] == 40
    # the run's own count of messages by pair of actors (those kept inside an
    # actor as i->i) agrees with its trace
    assert split["actor_pairs"] == summary["actor_pairs"]
    assert any(p.split("->")[0] == p.split("->")[1] for p in summary["actor_pairs"])


@pytest.mark.parametrize("extra, words", [
    (["--row-split", "1:2"], "--row-split"),  # without --engine ray
    (["--engine", "ray", "--row-split", "4:2"], "layer 4 is not hidden"),
    (["--engine", "ray", "--row-split", "1:2", "--scheme", "red-black"],
     "euler or momentum"),
    (["--engine", "ray", "--row-split", "1:2", "--partition", "blocks:99"],
     "--partition"),
])
def test_cli_refuses_a_bad_row_split_in_one_line(golden_dir, tmp_path, capsys,
                                                 extra, words):
    case = load_case(golden_dir, "inference_26441")
    model_path, x_path = tmp_path / "model.npz", tmp_path / "x.npy"
    save_model(case.model, str(model_path))
    np.save(x_path, case.x)
    code = main(["infer", "--model", str(model_path), "--input", str(x_path),
                 "--steps", "5", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
