"""The local engine's round against the arithmetic floor (issue 6, item 1).

Big network ([256,1024,1024,10], batch 256 by default): one inference round and
one training round of the local engine (``Block.send`` + ``Block.step``) against,
in the same run, one numpy ``W a`` and one ``W.T r`` per weight edge (plus one
``r a.T`` per weight edge for training), each into a preallocated array. The
target is a ratio within 1.2x (the authors' implementation: 1.9x inference,
2.4x training).

Small networks, where per-round overhead dominates: ms per training round of
[2,30,1] with 300 examples and per inference round of [2,6,4,4,1] (the golden
case), beside a plain numpy loop that does the same training round. The authors'
implementation takes 0.40 ms and 0.41 ms on a 2-core machine, and a plain numpy
loop 0.17 ms for the training round.

    python scripts/bench/local_floor.py            # about a minute
    python scripts/bench/local_floor.py --arch 256,2048,2048,10 --batch 512
"""

from __future__ import annotations

import argparse

import numpy as np
from common import (
    block_round,
    calls_for,
    golden_case,
    paraboloid_problem,
    side_by_side,
    threads_note,
)

from sheafdist.model import he_init
from sheafdist.problem import inference_problem, training_problem
from sheafdist.rules import Config

AUTHORS_MS = {"train [2,30,1] x300": 0.40, "infer [2,6,4,4,1]": 0.41}
AUTHORS_NUMPY_TRAIN_MS = 0.17
AUTHORS_RATIO = {"inference": 1.9, "training": 2.4}


def floor_ops(model, x, training: bool):
    """The arithmetic floor of a round: per weight edge ``W a`` and ``W.T r``
    (and ``r a.T`` for training), into preallocated arrays."""
    rng = np.random.default_rng(1)
    batch = x.shape[1]
    acts = [x] + [rng.standard_normal((w.shape[0], batch)) for w in model.W[:-1]]
    ops = []
    for w, a in zip(model.W, acts, strict=True):
        r = rng.standard_normal((w.shape[0], batch))
        wa, wtr, ra = np.empty_like(r), np.empty_like(a), np.empty_like(w)
        ops.append((w, a, r, wa, wtr, ra))

    def round_() -> None:
        for w, a, r, wa, wtr, ra in ops:
            np.matmul(w, a, out=wa)
            np.matmul(w.T, r, out=wtr)
            if training:
                np.matmul(r, a.T, out=ra)

    return round_


def plain_numpy_training(model, X, Y, alpha=1.0, dt=0.005, beta=1 / 300):
    """The reference's training step written as a plain numpy loop (one hidden
    layer or more, identity output): the comparison of the issue."""
    rng = np.random.default_rng(42)
    W = [w.copy() for w in model.W]
    b = [c.copy() for c in model.b]
    K = len(W)
    z = [rng.standard_normal((w.shape[0], X.shape[1])) for w in W]
    a = [X] + [rng.standard_normal((w.shape[0], X.shape[1])) for w in W[:-1]]

    def step() -> None:
        m = [zl >= 0 for zl in z[:-1]]
        r = [W[i] @ a[i] + b[i] - z[i] for i in range(K)]
        for i in range(K - 1):
            z[i] += alpha * dt * (r[i] - m[i] * (z[i] - a[i + 1]))
            a[i + 1] += alpha * dt * (-(a[i + 1] - m[i] * z[i]) - W[i + 1].T @ r[i + 1])
        z[-1] += alpha * dt * (r[-1] - (z[-1] - Y))
        for i in range(K):
            W[i] -= dt * beta * (r[i] @ a[i].T)
            b[i] -= dt * beta * r[i].sum(axis=1, keepdims=True)

    return step


def big(arch, batch, repeats) -> dict:
    rng = np.random.default_rng(0)
    model = he_init(arch, 0)
    x = rng.standard_normal((arch[0], batch))
    y = rng.standard_normal((arch[-1], batch))
    infer = inference_problem(model, x, Config(1.0, 0.01), "random", 0)
    train = training_problem(model, x, y, Config(1.0, 0.001, 1e-4), "random", 0)
    b_inf = infer.block(list(infer.graph.vertices))
    b_tr = train.block(list(train.graph.vertices))
    fns = {
        "inference round": block_round(b_inf),
        "inference floor": floor_ops(model, x, False),
        "training round": block_round(b_tr),
        "training floor": floor_ops(model, x, True),
    }
    n = max(min(calls_for(fns["training round"], 0.3), 50), 3)
    return side_by_side(fns, n, repeats)


def small(repeats) -> dict:
    problem, data = paraboloid_problem()
    train_block = problem.block(list(problem.graph.vertices))
    case = golden_case("inference_26441")
    from golden_cases import make_problem

    infer = make_problem(case)
    infer_block = infer.block(list(infer.graph.vertices))
    plain = plain_numpy_training(problem.model, data.X_train, data.Y_train)
    fns = {
        "train [2,30,1] x300": block_round(train_block),
        "plain numpy train [2,30,1] x300": plain,
        "infer [2,6,4,4,1]": block_round(infer_block),
    }
    return side_by_side(fns, 2000, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="256,1024,1024,10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    arch = [int(n) for n in args.arch.split(",")]
    print(f"# local engine against the arithmetic floor ({threads_note()})")

    t = big(arch, args.batch, args.repeats)
    print(f"[{args.arch}], batch {args.batch}: ms per round (best of "
          f"{args.repeats})")
    for kind in ("inference", "training"):
        rnd, flo = t[f"{kind} round"], t[f"{kind} floor"]
        print(f"  {kind:9s} round {rnd * 1e3:8.3f} ms   floor {flo * 1e3:8.3f} ms"
              f"   ratio {rnd / flo:5.2f}x   (target 1.2x; authors "
              f"{AUTHORS_RATIO[kind]}x)")

    s = small(args.repeats)
    print("small networks: ms per round")
    for name, sec in s.items():
        ref = AUTHORS_MS.get(name)
        note = ""
        if ref is not None:
            note = f"   authors {ref:.2f} ms, {ref / (sec * 1e3):5.2f}x faster"
        elif name.startswith("plain"):
            note = f"   (the issue: {AUTHORS_NUMPY_TRAIN_MS:.2f} ms elsewhere)"
        print(f"  {name:32s} {sec * 1e3:7.4f} ms{note}")
    ratio = s["train [2,30,1] x300"] / s["plain numpy train [2,30,1] x300"]
    print(f"  engine / plain numpy, training [2,30,1]: {ratio:.2f}x")


if __name__ == "__main__":
    main()
