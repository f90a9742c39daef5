"""The paper's numbers that ``sheafdist reproduce`` sets its own beside.

Every value is copied from ``paper.md`` (the specification of Bosca and Ghrist,
"Neural Networks as Local-to-Global Computations"), with its tag there:

- ``NB``: outputs saved in the authors' notebooks (torch, float64, torch seeds);
- ``RERUN``: an independent NumPy re-implementation (numpy seeds, so a different
  network and data draw from the authors').

A value is a number, or a list of numbers over seeds (the spread across seeds is
then known), or a ``(mean, sd)`` pair where paper.md gives one.
"""

from __future__ import annotations

# 3.3 and check 5: [2,4,1], x = (0.5, -0.3), dt 0.01 (RERUN)
RATE = {
    "measured": 0.5643,
    "predicted_continuous": 0.5634,
    "predicted_discrete": 0.5642,
    "worst_gap_bound": 0.5116,  # 2 lambda_*, lambda_* = 0.2558
    "worst_gap": 0.2558,
    "steps_to_1e-28": 11_019,
    "flips": 152,  # "152 flip events in one [2,4,1] run" (3.6), not said to be this one
}

# 7.3: paraboloid [2,30,1], sheaf train MSE against step
SHEAF_CURVE_NB = {10_000: 0.5293, 20_000: 0.2310, 30_000: 0.1341, 50_000: 0.0841,
                  100_000: 0.0631}
SHEAF_CURVE_RERUN = {10_000: 0.620, 20_000: 0.297, 30_000: 0.177, 50_000: 0.099,
                     100_000: 0.065}
SGD_CURVE_NB = {10_000: 0.0294, 20_000: 0.0087, 100_000: 0.00329}

# 7.3 and check 10: after 100k steps (sheaf) and 100k epochs (SGD)
PARABOLOID_1H = {
    "sheaf_train": {"NB": 0.0631, "RERUN": [0.0647, 0.0729, 0.0680]},
    "sheaf_test": {"NB": 0.0865, "RERUN": [0.0893, 0.1002, 0.0997]},
    "sgd_train": {"NB": 0.00329, "RERUN": [0.0071, 0.0039]},
    "sgd_test": {"RERUN": [0.0081, 0.0117]},
}
PARABOLOID_2H = {  # [2,10,8,1], dt 0.01, 200k steps (RERUN, one seed)
    "sheaf_train": {"RERUN": 0.0445},
    "sheaf_test": {"RERUN": 0.1063},
    "sgd_train": {"RERUN": 0.0035},
    "sgd_test": {"RERUN": 0.0130},
}
# Table E.1: the paraboloid (1H) test ratio sheaf/SGD is "roughly 8-25x"
PARABOLOID_RATIO = (8.0, 25.0)

# 7.4: final test MSE against beta * n_train (RERUN, one seed, 100k steps);
# None marks a run that diverged (NaN)
BETA_SWEEP_RERUN = {0.003: 1.147, 0.03: 0.500, 0.09: 0.242, 0.3: 0.138, 1.0: 0.089,
                    3.0: 0.091, 9.0: 0.098, 30.0: 0.124, 90.0: 0.147, 300.0: None,
                    900.0: None}
BETA_REGIMES = {"stagnation": (0.0, 0.3), "optimal": (0.3, 10.0),
                "divergence": (10.0, float("inf"))}

# E.4: lambda_1, lambda_max and kappa at He initialisation (median over 50
# paraboloid inputs; lambda_1 as mean +- sd over 5 seeds; RERUN)
SPECTRAL_GAP_BY_ARCH = {
    (2, 30, 1): {"lambda_1": (0.172, 0.026), "lambda_max": 4.06, "kappa": 24},
    (2, 10, 8, 1): {"lambda_1": (0.054, 0.006), "lambda_max": 7.25, "kappa": 136},
    (2, 8, 6, 4, 1): {"lambda_1": (0.028, 0.016), "lambda_max": 7.63, "kappa": 350},
    (2, 12, 8, 6, 1): {"lambda_1": (0.021, 0.006), "lambda_max": 7.86, "kappa": 396},
    (2, 6, 4, 4, 1): {"lambda_1": (0.031, 0.007), "lambda_max": 8.24, "kappa": 295},
}
# E.4: test MSE at integration time T for 1H / 2H / 3H (RERUN)
DEPTH_TIME_RERUN = {5.0: (2.10, 2.46, 4.05), 25.0: (0.89, 1.80, 2.56),
                    50.0: (0.58, 1.37, 2.20)}

# E.5: [2,30,1] paraboloid, statistics over 50 training inputs (NB, one seed)
SPECTRAL_EVOLUTION_NB = {
    "sheaf": {0: (12.0996, 0.1911, 3.58, 18.7), 10_000: (0.5293, 0.0511, 12.75, 249.5),
              20_000: (0.2310, 0.0415, 15.64, 376.8),
              50_000: (0.0841, 0.0346, 18.84, 543.9),
              100_000: (0.0631, 0.0324, 20.47, 631.8)},
    "sgd": {0: (12.0996, 0.1911, 3.58, 18.7), 10_000: (0.0294, 0.0934, 7.80, 83.6),
            20_000: (0.0087, 0.0731, 10.43, 142.8),
            50_000: (0.0042, 0.0635, 12.21, 192.4),
            100_000: (0.0033, 0.0610, 12.79, 209.5)},
}  # step -> (loss, lambda_1, lambda_max, kappa)

# 7.5: fraction of the Fiedler vector's energy on the output block z2 (NB)
FIEDLER_Z2_NB = {"sheaf": {1_000: 0.776, 20_000: 0.916, 100_000: 0.936},
                 "sgd": {1_000: 0.742, 20_000: 0.880, 100_000: 0.904}}

# E.2 context (NB): paraboloid [2,30,1], training set, per-edge mean squared
# discord of the sheaf training state and of SGD output-pinned diffusion
TRAINING_DISCORD_NB = {
    1_000: {"R1": 0.1587, "W1": 0.1176, "W2": 0.0296},
    20_000: {"R1": 6.08e-3, "W1": 3.18e-3, "W2": 4.37e-4},
    100_000: {"R1": 1.42e-3, "W1": 6.26e-4, "W2": 7.66e-5},
}
SGD_PINNED_DISCORD_NB = {
    1_000: {"R1": 1.37e-2, "W1": 6.20e-3, "W2": 4.22e-3},
    20_000: {"R1": 5.09e-4, "W1": 1.46e-4, "W2": 5.99e-5},
    100_000: {"R1": 1.59e-4, "W1": 4.49e-5, "W2": 1.46e-5},
}
