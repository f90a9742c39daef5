"""paper.md section 9, checks 10 to 14, at reduced sizes.

At full size checks 10, 11 and 13 each train [2,30,1] for 100,000 joint steps
(about 40 s per run on 2 cores, 11 beta values x 3 seeds for check 11), which is
too slow for the test suite; ``sheafdist reproduce`` runs them in full. Here every
training run stops at 10,000 steps, where the paper's own notebook [NB] has
numbers too: sheaf train MSE 0.5293, SGD 0.0294, lambda_1 0.0511 (sheaf) and
0.0934 (SGD), lambda_max 12.75 / 7.80, kappa 249.5 / 83.6 (paper.md 7.3, E.5).
The thresholds bracket those numbers and the spread of our seeds (sheaf train
0.36 to 0.62 over weight seeds 0, 100, 200) and still fail for the likely
mistakes: a weight step averaged over the batch instead of summed (beta/300: the
loss would stay near its initial 8), the wrong sign (divergence), weights that
do not learn at all, or a spectrum taken at the wrong pattern.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sheafdist import diagnostics as diag
from sheafdist.model import forward, he_init
from sheafdist.runs import RunSpec, run, task_data

STEPS = 10_000  # the reduced length of every training run here (see above)


@pytest.fixture(scope="module")
def paraboloid():
    """[2,30,1] on the paraboloid, weight seed 0, beta 1/300, dt 0.005: the sheaf
    and SGD (lr 0.005) for 10,000 steps, weights kept at 0, 1k and 10k steps and
    the sheaf's training stalks at 1k and 10k."""
    spec = RunSpec("paraboloid", (2, 30, 1), 0, 0.005, 1 / 300, STEPS,
                   (1_000, STEPS), (1_000, STEPS), sgd=True, sgd_lr=0.005)
    return run(spec)


def _medians(model, X):
    s = diag.spectral(model, X)
    return (float(np.median(s.lambda_1)), float(np.median(s.lambda_max)),
            float(np.median(s.kappa)))


# ------------------------------------------------------------ check 10


@pytest.mark.slow
def test_check10_training_result_and_sgd_is_far_better(paraboloid):
    sheaf_train, sheaf_test = paraboloid.sheaf.at(STEPS)
    sgd_train, sgd_test = paraboloid.sgd.at(STEPS)
    assert paraboloid.sheaf.at(0)[0] > 5  # from He initialisation, loss ~8
    assert 0.3 < sheaf_train < 0.9  # [NB] 0.5293 at 10k
    assert 0.3 < sheaf_test < 0.9  # it generalises like it fits
    assert sgd_train < 0.1  # [NB] 0.0294 at 10k
    assert sheaf_train > 5 * sgd_train and sheaf_test > 5 * sgd_test
    # the loss falls all along (no stagnation, no blow-up)
    assert paraboloid.sheaf.at(1_000)[0] > 1.5 * sheaf_train


# ------------------------------------------------------------ check 11


def _beta_run(beta_n: float) -> float:
    spec = RunSpec("paraboloid", (2, 30, 1), 0, 0.005, beta_n / 300, STEPS, ())
    rec = run(spec)
    return rec.sheaf.at(STEPS)[1]


@pytest.mark.slow
def test_check11_beta_scaling_is_u_shaped_and_blows_up():
    """At 10,000 steps (quick reproduction, 3 seeds): test MSE 1.36 at beta*n =
    0.03, 0.55 at 1, 1.05 at 9, and every seed diverges at 300 (dt 0.005)."""
    small, best, large = _beta_run(0.03), _beta_run(1.0), _beta_run(9.0)
    assert small > 1.5 * best  # stagnation: the weights barely move
    assert large > 1.3 * best  # degradation above the optimum
    assert math.isnan(_beta_run(300.0))  # the explicit weight step is unstable


# ------------------------------------------------------------ check 12


def test_check12_gap_decreases_with_depth_and_deeper_is_slower():
    """Median lambda_1 at He initialisation (50 paraboloid inputs, 5 seeds):
    [RERUN] 0.172, 0.054, 0.028 for 1H, 2H, 3H. At T = 5 the test MSE is [RERUN]
    2.10, 2.46, 4.05."""
    X = task_data("paraboloid").X_train[:, :50]
    gaps = {}
    for arch in ((2, 30, 1), (2, 10, 8, 1), (2, 8, 6, 4, 1)):
        gaps[len(arch) - 2] = np.mean(
            [_medians(he_init(list(arch), seed), X)[0] for seed in range(5)])
    assert 0.12 < gaps[1] < 0.25
    assert 0.035 < gaps[2] < 0.08
    assert gaps[3] < 0.045
    assert gaps[1] > 2 * gaps[2] > 2 * gaps[3]
    losses = []
    for arch, dt in (((2, 30, 1), 0.005), ((2, 10, 8, 1), 0.01),
                     ((2, 8, 6, 4, 1), 0.01)):
        steps = int(round(5.0 / dt))
        rec = run(RunSpec("paraboloid", arch, 0, dt, 1 / 300, steps, ()))
        losses.append(rec.sheaf.at(steps)[1])
    assert losses[0] < losses[1] < losses[2]


# ------------------------------------------------------------ check 13


@pytest.mark.slow
def test_check13_spectral_evolution(paraboloid):
    X = task_data("paraboloid").X_train[:, :50]
    l1_0, lx_0, k_0 = _medians(paraboloid.sheaf.models[0], X)
    l1, lx, k = _medians(paraboloid.sheaf.models[STEPS], X)
    g1, gx, gk = _medians(paraboloid.sgd.models[STEPS], X)
    assert 0.12 < l1_0 < 0.25  # [NB] 0.19 at initialisation
    # sheaf training: [NB] lambda_1 0.19 -> 0.051, lambda_max 3.6 -> 12.8,
    # kappa 19 -> 250 in 10k steps
    assert l1 < 0.5 * l1_0 and lx > 2 * lx_0 and k > 5 * k_0
    # SGD moves the same way, but less
    assert g1 < l1_0 and gx > lx_0 and gk > k_0
    assert g1 > l1 and gx < lx and gk < k


# ------------------------------------------------------------ check 14


@pytest.mark.slow
def test_check14_discord_ordering_and_fiedler_on_the_output(paraboloid):
    data = task_data("paraboloid")
    for step in (1_000, STEPS):
        state = paraboloid.stalks[step]
        d = diag.discord(paraboloid.sheaf.models[step], state, target=data.Y_train)
        assert d.by_edge["R1"] > d.by_edge["W1"] > d.by_edge["W2"], step
    # SGD's network has no tension at its forward pass: pin its output to the
    # labels (5,000 rounds here; the paper's 200,000 had not converged either)
    sgd = paraboloid.sgd.models[STEPS]
    assert diag.discord(sgd, forward(sgd, data.X_train)).total < 1e-25
    pinned = diag.pinned_discord(sgd, data.X_train, data.Y_train, max_steps=5_000)
    e = pinned.discord.by_edge
    assert e["R1"] > e["W1"] > e["W2"] > 0
    X = np.random.default_rng(99).uniform(-2, 2, (2, 50))  # 7.5's inputs
    for model in (paraboloid.sheaf.models[STEPS], sgd):
        s = diag.spectral(model, X)
        assert s.fiedler_energy[:, s.blocks.index("z2")].mean() > 0.75
