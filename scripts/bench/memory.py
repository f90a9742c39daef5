"""Peak memory of a Ray run against the same local run (issue 6, item 5).

One inference problem (default [64,1024,1024,10], batch 256), N rounds on each
engine in the same run:

- local: the peak the run allocates (tracemalloc, which numpy reports to) and
  the growth of this process's peak RSS (``VmHWM``);
- Ray (layer partition, sync): each actor's peak RSS (``VmHWM`` of its process)
  against an idle actor's, i.e. what the block and its messages add to a Ray
  worker, summed over actors;
- the data itself: the stalks and maps, and the bytes of one round's messages
  between actors, for scale (each message carries one copy of an edge value, the
  one the wire needs; a receiver reads it in place, read-only).

    python scripts/bench/memory.py                   # under a minute
    python scripts/bench/memory.py --arch 64,2048,2048,10 --batch 512
"""

from __future__ import annotations

import argparse
import os
import tracemalloc

import numpy as np
from common import threads_note

from sheafdist.model import he_init
from sheafdist.problem import inference_problem
from sheafdist.rules import Config

MiB = 2**20


def peak_rss(pid: int | None = None) -> int:
    """Peak resident set of a process in bytes (Linux ``VmHWM``)."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Idle:
    def pid(self) -> int:
        import numpy  # noqa: F401 - a worker that has numpy loaded, like a block

        return os.getpid()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="64,1024,1024,10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args()
    arch = [int(n) for n in args.arch.split(",")]
    rng = np.random.default_rng(0)
    model = he_init(arch, 0)
    x = rng.standard_normal((arch[0], args.batch))

    def problem():
        return inference_problem(model, x, Config(1.0, 0.01), "random", 0)

    prob = problem()
    stalk_bytes = sum(s.nbytes for s in prob.stalks.values())
    map_bytes = sum(w.nbytes + b.nbytes for w, b in zip(model.W, model.b,
                                                        strict=True))
    print(f"# peak memory, [{args.arch}] x{args.batch}, {args.rounds} rounds "
          f"({threads_note()})")
    print(f"data: stalks {stalk_bytes / MiB:.1f} MiB, maps {map_bytes / MiB:.1f} "
          "MiB")

    from sheafdist.engines.local import LocalEngine

    rss0 = peak_rss()
    tracemalloc.start()
    engine = LocalEngine(problem())
    engine.run(args.rounds)
    local_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    local_rss = peak_rss() - rss0
    print(f"local: allocated peak {local_peak / MiB:.1f} MiB "
          f"({local_peak / (stalk_bytes + map_bytes):.2f}x the data), process "
          f"peak RSS grew {local_rss / MiB:.1f} MiB")
    del engine

    import ray

    from sheafdist.engines.ray_engine import RayEngine, init_ray
    from sheafdist.partition import partition

    init_ray()
    idle = ray.remote(num_cpus=0.01)(Idle).remote()
    idle_rss = peak_rss(ray.get(idle.pid.remote(), timeout=60))
    blocks = partition(prob.graph, "layer")
    owner = {v: i for i, vs in enumerate(blocks) for v in vs}
    wire = sum(e.dim * args.batch * 8 * 2 for e in prob.graph.edges.values()
               if owner[e.tail] != owner[e.head])
    engine = RayEngine(problem(), partition="layer")
    try:
        engine.run(args.rounds)
        pids = [info["pid"] for info in engine.placement]
        rss = [peak_rss(pid) for pid in pids]
    finally:
        engine.close()
        ray.kill(idle)
    extra = [r - idle_rss for r in rss]
    print(f"ray: {len(pids)} actors, idle actor peak RSS {idle_rss / MiB:.0f} MiB; "
          "actor peak RSS above idle: " +
          ", ".join(f"{e / MiB:.1f}" for e in extra) + " MiB")
    ratio = sum(extra) / local_peak
    print(f"  sum above idle {sum(extra) / MiB:.1f} MiB = {ratio:.2f}x "
          f"the local allocated peak; total with the workers "
          f"{sum(rss) / MiB:.0f} MiB")
    print(f"  one round's messages between actors: {wire / MiB:.2f} MiB")


if __name__ == "__main__":
    main()
