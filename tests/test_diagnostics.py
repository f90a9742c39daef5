"""Diagnostics (paper.md section 6) and the rate and monotonicity checks of
paper.md section 9: check 5 (rate) and check 6 (monotone energy, blow-up)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from golden_cases import load_case, make_problem

from sheafdist import diagnostics as diag
from sheafdist import sheaf
from sheafdist.engines.local import LocalEngine
from sheafdist.errors import DivergenceError
from sheafdist.model import MLP, forward, he_init, phi
from sheafdist.problem import inference_problem, training_problem
from sheafdist.rules import Config


def random_model(arch, seed, output="identity") -> MLP:
    rng = np.random.default_rng(seed)
    model = he_init(arch, rng, output)
    model.b = [0.3 * rng.standard_normal(b.shape) for b in model.b]
    return model


def all_patterns(model: MLP):
    hidden = model.arch[1:-1]
    for bits in itertools.product((0.0, 1.0), repeat=sum(hidden)):
        out, start = [], 0
        for n in hidden:
            out.append(np.array(bits[start:start + n]))
            start += n
        yield out


# ------------------------------------------------------------ discord


def test_discord_by_edge_layer_and_kind():
    model = random_model([2, 5, 4, 3], 1, "softmax")
    rng = np.random.default_rng(2)
    state = {"a0": rng.standard_normal((2, 7))}
    for v, n in (("z1", 5), ("a1", 5), ("z2", 4), ("a2", 4), ("z3", 3),
                 ("a_out", 3)):
        state[v] = rng.standard_normal((n, 7))
    d = diag.discord(model, state)
    # the definitions of the golden README, written out
    W, b = model.W, model.b
    relu = lambda z: (z >= 0) * z  # noqa: E731
    expect = {
        "W1": W[0] @ state["a0"] + b[0] - state["z1"],
        "R1": relu(state["z1"]) - state["a1"],
        "W2": W[1] @ state["a1"] + b[1] - state["z2"],
        "R2": relu(state["z2"]) - state["a2"],
        "W3": W[2] @ state["a2"] + b[2] - state["z3"],
        "out": phi("softmax", state["z3"]) - state["a_out"],
    }
    for e, r in expect.items():
        assert d.by_edge[e] == pytest.approx(np.mean(np.sum(r * r, axis=0)), rel=1e-12)
    assert d.by_layer[1] == pytest.approx(d.by_edge["W1"] + d.by_edge["R1"])
    assert d.by_layer[2] == pytest.approx(d.by_edge["W2"] + d.by_edge["R2"])
    assert d.by_layer[3] == pytest.approx(d.by_edge["W3"] + d.by_edge["out"])
    assert d.by_kind["affine"] == pytest.approx(sum(d.by_edge[f"W{i}"]
                                                    for i in (1, 2, 3)))
    assert d.by_kind["relu"] == pytest.approx(d.by_edge["R1"] + d.by_edge["R2"])
    assert d.by_kind["output"] == pytest.approx(d.by_edge["out"])
    assert d.total == pytest.approx(sum(d.by_edge.values()))
    assert d.per_sample["W2"].shape == (7,)


def test_forward_pass_has_zero_discord():
    model = random_model([3, 6, 4, 2], 3, "sigmoid")
    x = np.random.default_rng(0).standard_normal((3, 9))
    assert diag.discord(model, forward(model, x)).total < 1e-28


def test_training_discord_matches_golden(golden_dir):
    """cases.json: compute_training_discord of the 2000-step training state."""
    case = load_case(golden_dir, "train_paraboloid_short")
    npz = case.npz
    model = MLP([npz["W1_step2000"], npz["W2_step2000"]],
                [npz["b1_step2000"], npz["b2_step2000"]])
    state = {"a0": npz["X_train"], "z1": npz["z1_step2000"],
             "a1": npz["a1_step2000"], "z2": npz["z2_step2000"]}
    d = diag.discord(model, state, target=npz["Y_train"])
    assert set(d.by_edge) == {"W1", "R1", "W2", "out"}
    ref = case.meta["reference_values"]["train_discord_total_step2000"]
    assert d.total == pytest.approx(ref, rel=1e-9)


def test_training_discord_of_a_classifier_is_cross_entropy():
    model = random_model([2, 4, 3], 0, "softmax")
    x = np.random.default_rng(1).standard_normal((2, 5))
    y = np.eye(3)[:, [0, 1, 2, 1, 0]]
    state = forward(model, x)
    d = diag.discord(model, state, target=y)
    p = phi("softmax", state["z2"])
    assert d.by_edge["out"] == pytest.approx(-np.mean(np.sum(y * np.log(p), axis=0)))
    assert d.by_edge["W1"] < 1e-28  # the forward pass is consistent elsewhere


# ------------------------------------------------------------ pinned discord


@pytest.mark.parametrize("output, seed", [("identity", 4), ("sigmoid", 1)])
def test_pinned_discord_settles_at_a_stationary_point(output, seed):
    """Labels near the forward output (identity), so that no pre-activation is
    pulled onto z = 0: there the pinned flow slides along the switching surface
    and chatters forever, and the tolerance rule never fires."""
    model = random_model([2, 6, 1], seed, output)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6))
    y = rng.uniform(0.1, 0.9, (1, 6)) if output == "sigmoid" else \
        forward(model, x)["z2"] + rng.uniform(-0.1, 0.1, (1, 6))
    res = diag.pinned_discord(model, x, y, tol=1e-12)
    assert res.converged
    vertex = "z2" if output == "identity" else "a_out"
    np.testing.assert_array_equal(res.stalks[vertex], y)  # the pin held
    assert res.discord.total > 1e-5  # the labels are not the forward output
    # at rest every free vertex feels no force: one more round moves nothing
    problem = diag.pinned_problem(model, x, y)
    block = problem.block(list(problem.graph.vertices))
    for v in block.owned:
        block.stalks[v] = res.stalks[v].copy()
    block.send()
    assert block.step({}).max_change < 1e-11


def test_pinned_discord_is_zero_when_labels_are_the_forward_output():
    model = random_model([2, 5, 3, 1], 6)
    x = np.random.default_rng(7).standard_normal((2, 4))
    res = diag.pinned_discord(model, x, forward(model, x)["z3"], max_steps=50)
    assert res.discord.total < 1e-28


# ------------------------------------------------------------ spectra


def test_spectral_diagnostics_agree_with_the_oracle():
    model = random_model([2, 8, 5, 1], 8)
    X = np.random.default_rng(9).uniform(-2, 2, (2, 12))
    s = diag.spectral(model, X)
    assert s.blocks == ["z1", "a1", "z2", "a2", "z3"]
    for j in range(X.shape[1]):
        vals = sheaf.laplacian_spectrum(model, X[:, j])
        assert s.lambda_1[j] == pytest.approx(vals[0], rel=1e-10)
        assert s.lambda_max[j] == pytest.approx(vals[-1], rel=1e-10)
        assert np.prod(vals) == pytest.approx(1.0, abs=1e-10)  # det L = 1
    np.testing.assert_allclose(s.kappa, s.lambda_max / s.lambda_1)
    np.testing.assert_allclose(s.fiedler_energy.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(s.top_energy.sum(axis=1), 1.0, atol=1e-12)
    summary = s.as_dict()["lambda_1"]
    assert summary["median"] == pytest.approx(np.median(s.lambda_1))
    assert summary["iqr"] == pytest.approx(summary["q3"] - summary["q1"])
    assert 0 < s.fiedler_stability <= 1


def test_eigenvalues_below_the_zero_threshold_are_skipped():
    model = random_model([2, 4, 1], 2)
    X = np.random.default_rng(3).uniform(-2, 2, (2, 3))
    s = diag.spectral(model, X, zero=0.5)  # pretend the small ones are zero
    for j in range(3):
        vals = sheaf.laplacian_spectrum(model, X[:, j])
        assert s.lambda_1[j] == pytest.approx(vals[vals >= 0.5][0])


# ------------------------------------------------------------ mask flips


@pytest.mark.parametrize("name, rounds, flips",
                         [("inference_241", 1000, 2), ("inference_26441", 10_000, 516)])
def test_flip_events_match_the_reference_counts(golden_dir, name, rounds, flips):
    """cases.json: 2 flips in 1000 steps, and 516 (chattering) in 10,000."""
    tr = diag.trace(make_problem(load_case(golden_dir, name)), rounds)
    assert len(tr.flips) == flips
    for rnd, vertex, coord, sample in tr.flips:
        assert 1 <= rnd <= rounds and vertex.startswith("z") and sample == 0
        assert 0 <= coord < load_case(golden_dir, name).model.arch[int(vertex[1:])]


def test_flip_events_name_the_coordinate_that_changed_sign():
    model = random_model([2, 6, 4, 1], 11)
    x = np.random.default_rng(12).standard_normal((2, 3))
    problem = inference_problem(model, x, Config(dt=0.05), "random", 13)
    tr = diag.trace(problem, 400, track="z1")
    assert tr.flips
    for rnd, vertex, coord, sample in tr.flips:
        if vertex == "z1":
            before, after = tr.tracked[rnd - 1], tr.tracked[rnd]
            assert (before[coord, sample] >= 0) != (after[coord, sample] >= 0)
    # and nowhere else: every sign change of z1 is listed
    changes = np.sum((tr.tracked[1:] >= 0) != (tr.tracked[:-1] >= 0))
    assert changes == sum(1 for f in tr.flips if f[1] == "z1")


# ------------------------------------------------------------ check 5: the rate


def test_rate_241_matches_the_paper_and_the_worst_case_bound():
    """paper.md 3.3 [RERUN]: [2,4,1] (numpy He seed 7), x = (0.5, -0.3), dt 0.01,
    random start: slope 0.5643, predicted 0.5642 (discrete) and 0.5634, lambda_*
    = 0.2558; log E stays below log E(0) - 2 lambda_* t."""
    model = he_init([2, 4, 1], 7)
    x = np.array([[0.5], [-0.3]])
    problem = inference_problem(model, x, Config(dt=0.01), "random", 42)
    tr = diag.trace(problem, 20_000, stop_energy=1e-28)
    assert tr.converged and tr.flips
    lam_star = diag.worst_gap(model)
    assert lam_star == pytest.approx(0.2558, abs=1e-4)
    t = np.arange(tr.energy.size) * 0.01
    assert np.all(np.log(tr.energy) <= np.log(tr.energy[0]) - 2 * lam_star * t + 1e-9)
    rate = diag.predicted_rate(model, x, 1.0, 0.01)
    assert rate["continuous"] == pytest.approx(0.5634, abs=1e-4)
    assert rate["discrete"] == pytest.approx(0.5642, abs=1e-4)
    measured = diag.decay_rate(tr.energy, 0.01)
    assert measured == pytest.approx(rate["discrete"], rel=0.01)
    assert measured > 2 * lam_star


@pytest.mark.parametrize("arch, seed", [([2, 6, 4, 1], 21), ([3, 5, 4, 2], 22)])
def test_rate_of_a_batch_is_the_slowest_input(arch, seed):
    model = random_model(arch, seed)
    x = np.random.default_rng(seed).standard_normal((arch[0], 4))
    eng = LocalEngine(inference_problem(model, x, Config(dt=0.05), "random", 0),
                      record_energy=True)
    eng.run(30_000, 1e-12)
    rate = diag.predicted_rate(model, x, 1.0, 0.05)
    lam = min(sheaf.laplacian_spectrum(model, x[:, j])[0] for j in range(4))
    assert rate["lambda_min"] == pytest.approx(lam)
    assert diag.decay_rate(eng.energies, 0.05) == pytest.approx(rate["discrete"],
                                                                rel=0.01)
    # the inputs relax at different rates, so a mean would be wrong
    each = [diag.predicted_rate(model, x[:, j], 1.0, 0.05)["discrete"]
            for j in range(4)]
    assert rate["discrete"] == min(each) and max(each) > 1.2 * min(each)


@pytest.mark.parametrize("output, mode", [("sigmoid", "jacobian"),
                                          ("softmax", "jacobian"),
                                          ("sigmoid", "identity")])
def test_rate_with_a_nonlinear_output_edge(output, mode):
    model = random_model([2, 5, 3], 31, output) if output == "softmax" else \
        random_model([2, 5, 1], 31, output)
    x = np.random.default_rng(32).standard_normal((2, 1))
    config = Config(dt=0.05, output_edge=mode)
    eng = LocalEngine(inference_problem(model, x, config, "random", 1),
                      record_energy=True)
    eng.run(60_000, 1e-13)
    rate = diag.predicted_rate(model, x, 1.0, 0.05, mode)
    assert diag.decay_rate(eng.energies, 0.05) == pytest.approx(rate["discrete"],
                                                                rel=0.01)


def test_decay_rate_of_a_clean_exponential_and_of_no_decay():
    t = np.arange(2000)
    assert diag.decay_rate(3.0 * np.exp(-0.7 * 0.01 * t), 0.01) == pytest.approx(0.7)
    assert diag.decay_rate(np.zeros(100), 0.01) is None  # started at the fixed point
    assert diag.decay_rate(np.exp(-0.01 * np.arange(10)), 0.01) is None  # too short


# ------------------------------------------------------------ check 6: monotone


@pytest.mark.parametrize("arch, seed", [([2, 4, 1], 7), ([2, 6, 4, 1], 3)])
def test_energy_never_increases_when_alpha_dt_is_at_most_one_over_lambda_max(
    arch, seed
):
    model = random_model(arch, seed)
    lam = max(np.linalg.eigvalsh(sheaf.block_laplacian(model, p))[-1]
              for p in all_patterns(model))  # the path visits other patterns too
    x = np.random.default_rng(seed).standard_normal((2, 5))
    problem = inference_problem(model, x, Config(dt=1.0 / lam), "random", 3)
    tr = diag.trace(problem, 3000, tol=1e-12)
    assert len(tr.flips) > 0  # the bound must survive switching
    assert np.all(np.diff(tr.energy) <= 1e-15 * tr.energy[:-1] + 1e-30)


@pytest.mark.parametrize("arch, seed", [([2, 6, 4, 1], 0), ([2, 6, 4, 1], 1),
                                        ([3, 5, 2], 1), ([2, 4, 1], 0)])
def test_beyond_two_over_lambda_max_the_scheme_fails(arch, seed):
    """alpha dt just below 2/lambda_max converges; just above it the energy blows
    up, or (when the growing mode changes the pattern to a region where the step
    is stable) the state is caught in a bounded oscillation that never settles."""
    model = random_model(arch, seed)
    x = np.random.default_rng(seed).standard_normal((arch[0], 1))
    lam = sheaf.lambda_max(model, x[:, 0])
    stable = LocalEngine(inference_problem(model, x, Config(dt=1.9 / lam), "random"))
    assert stable.run(20_000, 1e-10).converged
    unstable = LocalEngine(inference_problem(model, x, Config(dt=2.1 / lam),
                                             "random"))
    try:
        result = unstable.run(20_000, 1e-10)
    except DivergenceError as exc:
        assert "2/lambda_max" in str(exc)
    else:
        # the forward pass is an unstable fixed point: the state stays away
        assert not result.converged and result.energy > 1e-9


# ------------------------------------------------------------ the infer JSON


def test_rate_check_keys_and_nulls():
    model = random_model([2, 4, 1], 5)
    x = np.array([[0.3], [0.1]])
    keys = {"rate_measured", "rate_predicted", "rate_predicted_continuous"}
    out = diag.rate_check(model, x, 1.0, 0.01, energies=None)
    assert set(out) == keys and out["rate_measured"] is None
    assert out["rate_predicted"] > out["rate_predicted_continuous"] > 0
    assert all(v is None for v in diag.rate_check(model, x, 1.0, 0.01,
                                                  pinned=True).values())


def test_training_problem_energy_record_is_off_by_default():
    model = random_model([2, 4, 1], 5)
    x = np.random.default_rng(0).standard_normal((2, 3))
    eng = LocalEngine(training_problem(model, x, x[:1], Config(dt=0.01, beta=0.1)))
    eng.run(10)
    assert eng.energies is None
