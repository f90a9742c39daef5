"""How a round's time and memory grow (issue 6, item 4).

Sweeps width, depth and batch (local engine, an inference round and a training
round) and, briefly, the number of Ray actors (``blocks:N`` partitions of one
deep network), and fits growth exponents ``y ~ x^p`` by least squares in log-log
space: of the time per round and of the peak memory a block allocates (its
buffers, by tracemalloc, which numpy reports to), against the swept quantity and
against ``edges x batch`` (the weights' entries times the batch, where the
target is linear). Writes a PNG plot.

    python scripts/bench/scaling.py                    # about two minutes
    python scripts/bench/scaling.py --big --out scaling.png
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from common import block_round, side_by_side, threads_note

from sheafdist.model import he_init
from sheafdist.problem import inference_problem, training_problem
from sheafdist.rules import Config


def weights(arch) -> int:
    return sum(a * b for a, b in zip(arch[:-1], arch[1:], strict=True))


def measure(arch, batch, training: bool) -> tuple[float, float]:
    """(seconds per round, peak bytes allocated building the block and taking
    one round)."""
    rng = np.random.default_rng(0)
    model = he_init(arch, 0)
    x = rng.standard_normal((arch[0], batch))
    tracemalloc.start()
    tracemalloc.reset_peak()
    if training:
        y = rng.standard_normal((arch[-1], batch))
        problem = training_problem(model, x, y, Config(1.0, 1e-3, 1e-4), "random", 0)
    else:
        problem = inference_problem(model, x, Config(1.0, 0.01), "random", 0)
    block = problem.block(list(problem.graph.vertices))
    round_ = block_round(block)
    round_()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    once = time.perf_counter()
    round_()
    once = time.perf_counter() - once
    n = max(min(int(0.05 / max(once, 1e-6)), 200), 2)
    return side_by_side({"r": round_}, n, repeats=3)["r"], float(peak)


def fit(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def ray_actors(arch, batch, counts, rounds) -> list[float]:
    from sheafdist.engines.ray_engine import RayEngine, init_ray

    init_ray()
    rng = np.random.default_rng(0)
    model = he_init(arch, 0)
    x = rng.standard_normal((arch[0], batch))
    out = []
    for n in counts:
        problem = inference_problem(model, x, Config(1.0, 0.01), "random", 0)
        engine = RayEngine(problem, partition=f"blocks:{n}")
        try:
            engine.run(20)
            out.append(engine.run(rounds).seconds / rounds)
        finally:
            engine.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--big", action="store_true", help="larger sizes (slow)")
    p.add_argument("--out", default="scaling.png")
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    w0, b0 = (256, 128) if args.big else (128, 64)
    scale = 2 if args.big else 1
    sweeps = {
        "width": [([16, w, w, 1], b0, w) for w in
                  [64 * scale, 128 * scale, 256 * scale, 512 * scale]],
        "depth": [([16] + [w0] * d + [1], b0, d) for d in (1, 2, 4, 8)],
        "batch": [([16, w0, w0, 1], b, b) for b in
                  (32 * scale, 128 * scale, 512 * scale, 2048 * scale)],
    }
    print(f"# scaling of a local round ({threads_note()})")
    results = {}
    for kind in ("inference", "training"):
        for name, points in sweeps.items():
            rows = []
            for arch, batch, value in points:
                sec, peak = measure(arch, batch, kind == "training")
                rows.append((value, weights(arch) * batch, sec, peak))
            v, eb, sec, peak = np.array(rows, dtype=float).T
            results[(kind, name)] = (v, eb, sec, peak)
            print(f"{kind} {name}: " + ", ".join(
                f"{int(a)}: {s * 1e3:.3f} ms {m / 2**20:.1f} MiB"
                for a, s, m in zip(v, sec, peak, strict=True)))
            print(f"  exponents: time ~ {name}^{fit(v, sec):.2f}, memory ~ "
                  f"{name}^{fit(v, peak):.2f}; time ~ (edges x batch)^"
                  f"{fit(eb, sec):.2f}, memory ~ (edges x batch)^"
                  f"{fit(eb, peak):.2f}")
    actors = None
    if not args.no_ray:
        counts = (1, 2, 4)
        arch = [16] + [64] * 7 + [1]
        actors = (counts, ray_actors(arch, 32, counts, 200))
        print(f"ray, [{','.join(map(str, arch))}] x32, blocks:N: " + ", ".join(
            f"{n} actors {s * 1e3:.2f} ms" for n, s in zip(*actors, strict=True)))
        print(f"  exponent: time ~ actors^{fit(*actors):.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 + (actors is not None), figsize=(16, 4))
    for ax, name in zip(axes, sweeps, strict=False):
        for kind, style in (("inference", "o-"), ("training", "s--")):
            v, eb, sec, peak = results[(kind, name)]
            ax.loglog(v, sec * 1e3, style, label=f"{kind} ms/round")
            ax.loglog(v, peak / 2**20, style, alpha=0.5, label=f"{kind} peak MiB")
        ax.set_xlabel(name)
        ax.legend(fontsize=7)
    if actors is not None:
        axes[-1].plot(actors[0], np.array(actors[1]) * 1e3, "o-")
        axes[-1].set_xlabel("Ray actors")
        axes[-1].set_ylabel("ms per round")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
