"""The flag rule of report.md and the test-draw spread of the reproduction."""

from __future__ import annotations

import pytest

from sheafdist.model import he_init, loss
from sheafdist.report import flag
from sheafdist.reproduce import TEST_DRAW_SEED, resampled_test_loss
from sheafdist.tasks import make_task


def test_a_number_within_the_spread_across_seeds_is_ok():
    # our range 0.02, the paper's 0.01: a difference of 0.015 is within it
    assert flag([0.07, 0.08, 0.09], [0.095, 0.1]) == "ok"
    assert flag([0.07, 0.071], [0.095, 0.1]) == "**differs**"
    # mean +- sd: twice the sd is the paper's spread
    assert flag([0.2], 0.172, paper_sd=0.026) == "ok"
    assert flag([0.25], 0.172, paper_sd=0.026) == "**differs**"


def test_without_seeds_the_rule_is_ten_percent():
    assert flag(0.0445, 0.0445 * 1.09) == "ok (10%, no seeds)"
    assert flag(0.0445, 0.0445 * 1.2) == "**differs** (10%, no seeds)"
    assert flag(None, 1.0) == "n/a" and flag(1.0, None) == "n/a"


def test_the_test_draw_widens_the_spread_of_a_test_loss():
    ours, paper = [0.0816, 0.0708, 0.0765], [0.0893, 0.1002, 0.0997]
    assert flag(ours, paper) == "**differs**"
    assert flag(ours, paper, draw_sd=0.0144) == "ok"  # 2 sd = 0.029
    assert flag(ours, paper, draw_sd=float("nan")) == "**differs**"


def test_resampled_test_loss_reads_the_loss_on_fresh_test_sets():
    model = he_init([2, 6, 1], 0)
    d = resampled_test_loss(model, "paraboloid", draws=4)
    losses = [loss(model, t.X_test, t.Y_test) for t in
              (make_task("paraboloid", TEST_DRAW_SEED + i) for i in range(4))]
    assert d["mean"] == pytest.approx(sum(losses) / 4)
    assert d["min"] == min(losses) and d["max"] == max(losses) and d["sd"] > 0
    nan = resampled_test_loss(None, "paraboloid")
    assert all(v != v for v in nan.values())
