"""Every partition and mode of the Ray engine, side by side (issue 4's report).

For [2,6,4,4,1] inference (the golden case, dt 0.1, within the stable bound
0.184) and [2,30,1] paraboloid training (300 examples), each partition
(vertex, layer, blocks:2, single, a JSON mapping) in sync and async mode and
with local steps, on one embedded Ray:

- rounds per second (rounds over the run's wall time, actors already started);
- messages and bytes per round between actors (remote) and inside one
  (local), from the engine's own accounting;
- inference: rounds to tolerance (largest change per round below --tol) and
  the largest distance to the local engine's result run to the same tolerance,
  and to the forward pass;
- training: the largest difference of the weights from the local engine's after
  the same number of rounds, and both training losses.

``layer+rows`` is the layer partition with hidden layer 1 cut by rows into two
pieces (--row-split 1:2), each on its own actor.

Then, for async inference on the vertex partition (the most edges between
actors), rounds to tolerance as the staleness bound S grows; and, for a wide
network, how a row split spreads the weights over actors (--wide).

    python scripts/bench/partitions.py          # about 25 minutes on 2 cores
    python scripts/bench/partitions.py --quick  # fewer configurations
    python scripts/bench/partitions.py --partitions layer,layer+rows
    python scripts/bench/partitions.py --wide   # only the wide network
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace

import numpy as np
from common import golden_case, paraboloid_problem, threads_note

PARTITIONS = ("vertex", "layer", "blocks:2", "single", "file", "layer+rows")
ROW_SPLIT = "1:2"  # the row split of layer+rows: hidden layer 1 in two pieces
MODES = (("sync", 1, 1), ("async", 1, 1), ("sync", 1, 4), ("async", 2, 4))


def inference(dt: float):
    from sheafdist.problem import inference_problem

    case = golden_case("inference_26441")
    init = {v: s for v, s in case.init.items() if v != "a0"}
    return lambda: inference_problem(case.model, case.x,
                                     replace(case.config, dt=dt), init)


def training():
    return lambda: paraboloid_problem()[0]


def mapping_file(problem, folder: str) -> str:
    """A hand-made mapping: inputs and first layer on one actor, the rest on
    another, the output on a third (the file form of --partition)."""
    names = list(problem.graph.vertices)
    third = max(len(names) // 3, 1)
    blocks = {v: (0 if i < third else 1 if i < len(names) - 1 else 2)
              for i, v in enumerate(names)}
    path = os.path.join(folder, "partition.json")
    with open(path, "w") as f:
        json.dump(blocks, f)
    return path


class Counter:
    """An observer summing the engine's traffic reports."""

    def __init__(self):
        self.messages = {"remote": 0, "local": 0}
        self.bytes = {"remote": 0, "local": 0}
        self.staleness = 0

    def __call__(self, rounds, stats, traffic) -> None:
        for (_edge, _direction, transport), (count, nbytes) in traffic.items():
            self.messages[transport] += count
            self.bytes[transport] += nbytes
        if stats.staleness:
            self.staleness = max(self.staleness, max(stats.staleness.values()))


def run_one(make, partition, mode, staleness, tau, rounds, tol, row_split=None):
    from sheafdist.engines.ray_engine import RayEngine

    counter = Counter()
    engine = RayEngine(make(), observer=counter, partition=partition, mode=mode,
                       max_staleness=staleness, local_steps=tau, row_split=row_split)
    try:
        result = engine.run(rounds, tol=tol)
        actors = engine.n_actors
    finally:
        engine.close()
    n = max(result.rounds, 1)
    return result, actors, counter, n


HEAD = f"{'partition':<10} {'mode':<6} {'S':>2} {'tau':>3} {'actors':>6} "


def lead(partition, mode, s, tau, actors) -> str:
    """The columns both tables start with: what ran, on how many actors."""
    return f"{partition:<10} {mode:<6} {s:>2} {tau:>3} {actors:>6} "


def configurations(partitions, modes, make, folder):
    """Each partition (its name and the spec given to the engine) in each mode."""
    for partition in partitions:
        spec = mapping_file(make(), folder) if partition == "file" else partition
        spec, split = ("layer", ROW_SPLIT) if partition == "layer+rows" \
            else (spec, None)
        for mode, s, tau in modes:
            yield partition, (spec, split), mode, s, tau


def distance(a: dict, b: dict) -> float:
    """The largest difference over the vertices both hold."""
    return max(float(np.max(np.abs(a[v] - b[v]))) for v in a if v in b)


def table_inference(partitions, modes, tol, max_rounds, folder):
    from sheafdist.engines.local import LocalEngine
    from sheafdist.model import forward

    make = inference(0.1)
    ref = LocalEngine(make()).run(max_rounds, tol=tol)
    exact = forward(golden_case("inference_26441").model,
                    golden_case("inference_26441").x)
    print(f"\n# [2,6,4,4,1] inference, dt 0.1, tol {tol:g}: local engine "
          f"{ref.rounds} rounds")
    print(HEAD + f"{'rounds':>7} {'rounds/s':>9} {'msg/rnd':>8} {'B/rnd':>8} "
          f"{'stale':>5} {'|x-local|':>10} {'|x-fwd|':>10}")
    for partition, spec, mode, s, tau in configurations(partitions, modes, make,
                                                        folder):
        result, actors, c, n = run_one(make, spec[0], mode, s, tau, max_rounds, tol,
                                       spec[1])
        print(lead(partition, mode, s, tau, actors)
              + f"{result.rounds:>7} {n / result.seconds:>9.0f} "
              f"{c.messages['remote'] / n:>8.1f} {c.bytes['remote'] / n:>8.0f} "
              f"{c.staleness:>5} {distance(result.stalks, ref.stalks):>10.2e} "
              f"{distance(result.stalks, exact):>10.2e}")


def table_training(partitions, modes, rounds, folder):
    from sheafdist.engines.local import LocalEngine
    from sheafdist.model import forward

    make = training()
    _, data = paraboloid_problem()
    ref = LocalEngine(make()).run(rounds)

    def loss(model) -> float:
        out = forward(model, data.X_train)[f"z{model.depth}"]  # identity output
        return float(np.mean((out - data.Y_train) ** 2))

    print(f"\n# [2,30,1] paraboloid training x300, {rounds} rounds: local engine "
          f"train MSE {loss(ref.model):.5f}")
    print(HEAD + f"{'rounds/s':>9} {'msg/rnd':>8} {'B/rnd':>8} {'stale':>5} "
          f"{'|W-local|':>10} {'train MSE':>10}")
    for partition, spec, mode, s, tau in configurations(partitions, modes, make,
                                                        folder):
        result, actors, c, n = run_one(make, spec[0], mode, s, tau, rounds, None,
                                       spec[1])
        dw = max(float(np.max(np.abs(w - r)))
                 for w, r in zip(result.model.W, ref.model.W, strict=True))
        print(lead(partition, mode, s, tau, actors)
              + f"{n / result.seconds:>9.0f} {c.messages['remote'] / n:>8.1f} "
              f"{c.bytes['remote'] / n:>8.0f} {c.staleness:>5} {dw:>10.2e} "
              f"{loss(result.model):>10.5f}")


def staleness_sweep(bounds, taus, tol, max_rounds):
    make = inference(0.1)
    print(f"\n# async [2,6,4,4,1] inference, vertex partition, tol {tol:g}: "
          "rounds to tolerance against the staleness bound S")
    print(f"{'S':>3} {'tau':>4} {'actors':>6} {'rounds':>7} {'stale used':>10} "
          f"{'rounds/s':>9}")
    for tau in taus:
        for s in bounds:
            result, actors, c, n = run_one(make, "vertex", "async", s, tau,
                                           max_rounds, tol)
            print(f"{s:>3} {tau:>4} {actors:>6} {result.rounds:>7} "
                  f"{c.staleness:>10} {n / result.seconds:>9.0f}")


def table_wide(arch, batch, rounds, splits):
    """A wide network on the layer partition, whole and cut by rows: the weights
    the busiest actor holds, rounds per second, agreement with the local engine."""
    from sheafdist.engines.local import LocalEngine
    from sheafdist.engines.ray_engine import RayEngine
    from sheafdist.model import he_init
    from sheafdist.problem import inference_problem
    from sheafdist.rules import Config

    model = he_init(arch, 0)
    x = np.random.default_rng(1).standard_normal((arch[0], batch))

    def make():
        return inference_problem(model, x, Config(dt=0.01), "random", 0)

    ref = LocalEngine(make()).run(rounds)
    total = sum(w.nbytes + b.nbytes for w, b in zip(model.W, model.b, strict=True))
    print(f"\n# [{','.join(map(str, arch))}] x{batch} inference, layer partition, "
          f"{rounds} sync rounds; weights {total / 2**20:.1f} MiB in all")
    print(f"{'row split':<12} {'actors':>6} {'most MiB':>9} {'share':>6} "
          f"{'rounds/s':>9} {'msg/rnd':>8} {'MiB/rnd':>8} {'|x-local|':>10}")
    for split in splits:
        counter = Counter()
        engine = RayEngine(make(), observer=counter, partition="layer",
                           row_split=split or None)
        try:
            result = engine.run(rounds)
            held = [sum(w.nbytes + b.nbytes for w, b in st["maps"].values())
                    for st in engine._states()]
            actors = engine.n_actors
        finally:
            engine.close()
        n = max(result.rounds, 1)
        print(f"{split or 'none':<12} {actors:>6} {max(held) / 2**20:>9.1f} "
              f"{max(held) / total:>6.2f} {n / result.seconds:>9.1f} "
              f"{counter.messages['remote'] / n:>8.1f} "
              f"{counter.bytes['remote'] / n / 2**20:>8.2f} "
              f"{distance(result.stalks, ref.stalks):>10.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tol", type=float, default=1e-9)
    p.add_argument("--train-rounds", type=int, default=2000)
    p.add_argument("--partitions", default=",".join(PARTITIONS),
                   help="comma-separated, from " + ", ".join(PARTITIONS))
    p.add_argument("--sweep-only", action="store_true",
                   help="only rounds to tolerance against the staleness bound")
    p.add_argument("--wide", action="store_true",
                   help="only the weights per actor of a wide network, whole and "
                   "cut by rows")
    args = p.parse_args()

    from sheafdist.engines.ray_engine import init_ray

    init_ray(None)
    print(threads_note())
    partitions = args.partitions.split(",")
    unknown = sorted(set(partitions) - set(PARTITIONS))
    if unknown:
        p.error(f"--partitions: got {','.join(unknown)}; use some of "
                f"{','.join(PARTITIONS)}")
    if args.quick:
        partitions = [x for x in partitions if x in ("vertex", "layer")]
    modes = MODES[:2] if args.quick else MODES
    if not args.sweep_only and not args.wide and partitions:
        with tempfile.TemporaryDirectory() as folder:
            table_inference(partitions, modes, args.tol, 100_000, folder)
            table_training(partitions, modes, args.train_rounds, folder)
    if "vertex" in partitions and not args.wide:
        bounds = (0, 1, 4) if args.quick else (0, 1, 2, 4, 8)
        staleness_sweep(bounds, (1,), args.tol, 100_000)
    if args.wide:
        table_wide([64, 2048, 2048, 10], 64, 100,
                   ["", "2:2", "1:2,2:2", "1:4,2:4"])


if __name__ == "__main__":
    main()
