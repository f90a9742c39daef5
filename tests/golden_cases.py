"""Load the golden reference cases of ``shared/golden`` for any engine's tests.

Import it as a plain module (``tests/`` is on ``sys.path`` via ``conftest.py``)::

    from golden_cases import INFERENCE_CASES, load_case, make_problem

    case = load_case(golden_dir, "inference_241")
    model, x, init, hard, config, npz, meta = case  # a NamedTuple
    problem = make_problem(case)  # a fresh sheafdist Problem from the _init state

Conventions (golden/README.md): arrays are ``(dim, batch)``; ``_init`` is the start,
``_step<N>`` the state after exactly N Euler steps, ``_tol`` where the reference
``run()`` stopped. The golden discord names map to sheafdist edges as
``weight_l -> W{l}``, ``activation_l -> R{l}``, ``output -> out``.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sheafdist.model import MLP
from sheafdist.pins import HardPin
from sheafdist.problem import Problem, inference_problem, training_problem
from sheafdist.rules import Config, RoundStats

# fixed-step / run-to-tol cases, driven by ``inference_problem``
INFERENCE_CASES = (
    "inference_241",
    "inference_26441",
    "inference_batch",
    "inference_sigmoid_241",
    "inference_softmax",
    "pins_hard",
)
# joint stalk and weight flow, driven by ``training_problem``
TRAINING_CASES = ("train_paraboloid_short",)
# the backprop baseline: weights and data only (no stalks, no Config)
SGD_CASES = ("sgd_paraboloid_short",)
ALL_CASES = INFERENCE_CASES + TRAINING_CASES + SGD_CASES

# tolerances from golden/README.md
STATE_RTOL, STATE_ATOL = 1e-10, 1e-12
SCALAR_RTOL = 1e-9


class GoldenCase(NamedTuple):
    """One golden case, unpackable as ``(model, x, init, hard, config, npz, meta)``.

    ``model`` carries the stored W, b (``W*_step0`` for the training cases);
    ``x`` is the input (``X_train`` for training); ``init`` maps every free vertex
    to its ``_init`` array (empty for SGD); ``hard`` holds the user hard pins (the
    engine adds ``a0 = x`` itself); ``config`` is ``None`` for SGD; ``npz`` is every
    stored array as a plain dict; ``meta`` is the case's entry of ``cases.json``
    with ``name`` added.
    """

    model: MLP
    x: np.ndarray
    init: dict[str, np.ndarray]
    hard: list[HardPin]
    config: Config | None
    npz: dict[str, np.ndarray]
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def is_training(self) -> bool:
        return self.name in TRAINING_CASES

    @property
    def y(self) -> np.ndarray | None:
        return self.npz.get("Y_train")

    @property
    def depth(self) -> int:
        return len(self.meta["architecture"]) - 1

    def state(self, suffix: str) -> dict[str, np.ndarray]:
        """Every stored stalk with this suffix, e.g. ``state("step100")``."""
        return _with_suffix(self.npz, suffix)

    def output_of(self, stalks: dict[str, np.ndarray]) -> np.ndarray:
        """The dynamics' output: ``a_out`` if there is one, else ``z_{K}``."""
        return stalks.get("a_out", stalks[f"z{self.depth}"])


def cases_json(golden_dir: Path) -> dict:
    return _cases_json(str(golden_dir))


@cache
def _cases_json(golden_dir: str) -> dict:
    with open(Path(golden_dir) / "cases.json") as f:
        return json.load(f)


@cache
def _npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


_STALK = re.compile(r"^(z\d+|a\d+|a_out)_(.+)$")


def _with_suffix(npz: dict[str, np.ndarray], suffix: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in npz.items():
        m = _STALK.match(key)
        if m and m[2] == suffix:
            out[m[1]] = value
    return out


def load_case(golden_dir: Path, name: str) -> GoldenCase:
    """Read one case from ``golden_dir``. Arrays are copies: mutate freely."""
    meta = dict(cases_json(golden_dir)["cases"][name])
    meta["name"] = name
    npz = {k: v.copy() for k, v in _npz(str(Path(golden_dir) / meta["file"])).items()}
    K = len(meta["architecture"]) - 1
    output = meta["output_activation"]
    if name in INFERENCE_CASES:
        W = [npz[f"W{layer}"] for layer in range(1, K + 1)]
        b = [npz[f"b{layer}"] for layer in range(1, K + 1)]
        x = npz["x"]
        config = Config(float(npz["alpha"]), float(npz["dt"]), 0.0, "jacobian")
    else:
        W = [npz[f"W{layer}_step0"] for layer in range(1, K + 1)]
        b = [npz[f"b{layer}_step0"] for layer in range(1, K + 1)]
        x = npz["X_train"]
        config = None
        if "beta" in npz:
            config = Config(float(npz["alpha"]), float(npz["dt"]), float(npz["beta"]))
    hard = []
    if "pin_layer_index" in npz:  # reference layer index is 0-based: 0 is z_1
        hard.append(
            HardPin(
                f"z{int(npz['pin_layer_index']) + 1}",
                tuple(int(i) for i in npz["pin_coords"]),
                npz["pin_values"].reshape(-1, 1),
            )
        )
    model = MLP(W, b, output)
    return GoldenCase(model, x, _with_suffix(npz, "init"), hard, config, npz, meta)


def make_problem(
    case: GoldenCase,
    stalks: dict[str, np.ndarray] | None = None,
    model: MLP | None = None,
) -> Problem:
    """A fresh Problem for the case, from ``_init`` unless ``stalks`` is given
    (``model`` replaces the stored weights, e.g. trained ones)."""
    init = case.init if stalks is None else stalks
    init = {v: s for v, s in init.items() if v != "a0"}
    model = case.model if model is None else model
    if case.config is None:
        raise ValueError(f"{case.name} has no sheaf dynamics")
    if case.is_training:
        return training_problem(model, case.x, case.y, case.config, init)
    return inference_problem(model, case.x, case.config, init, hard=case.hard)


def golden_discord_key(key: str) -> str:
    """``weight_2 -> W2``, ``activation_1 -> R1``, ``output -> out``."""
    if key == "output":
        return "out"
    kind, layer = key.rsplit("_", 1)
    return {"weight": "W", "activation": "R"}[kind] + layer


def edge_discord(problem: Problem) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per-edge discord of the problem's current stalks, by the package's own
    vertex program: one ``Block.send``/``Block.step`` with statistics.

    Returns ``({edge: batch mean of ||d_e||^2}, {edge: F_tail(x_tail) -
    F_head(x_head)})``; the vector sign is the reference's (``W a + b - z``,
    ``1[z>=0] z - a``, ``phi(z) - a_out``). The block is thrown away afterwards.
    """
    block = problem.block(list(problem.graph.vertices))
    sent = block.send()
    vectors = {
        e.name: sent[(e.name, e.tail)] - sent[(e.name, e.head)]
        for e in problem.graph.edges.values()
    }
    stats: RoundStats = block.step({}, stats=True)
    return dict(stats.discord), vectors
