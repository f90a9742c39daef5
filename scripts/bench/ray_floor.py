"""The Ray engine's sync round against Ray's own floor (issue 6, item 2).

For each network, in the same run on the same embedded Ray:

- ``engine``: one sync round of the Ray engine on the layer partition (the
  time of ``RayEngine.run(N)`` over N, after a warm-up run);
- ``bare``: async actors, as many as the engine's, in the same chain, that each
  round send one Ray call per neighbour with the same payload bytes as the
  engine's messages (a ``bytes`` object) and wait only for their neighbours'
  calls of that round, which is the engine's exchange with no arithmetic and no
  message checks;
- ``engine --exchange compiled``: the engine's sync round carried by a compiled
  graph (``RayEngine(exchange="compiled")``), against the bare compiled graph;
- ``compiled``: the same exchange as a Ray compiled graph (``ray.dag``,
  ``experimental_compile``): each actor's ``produce`` feeds its neighbours'
  ``consume``; the driver executes the graph once per round (with several
  executions in flight).

The ratio engine/bare is the issue's target (within 1.5x).

    python scripts/bench/ray_floor.py              # about a minute
    python scripts/bench/ray_floor.py --rounds 3000 --wide 2,512,512,1
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from common import golden_case, paraboloid_problem, threads_note


def exchange_bytes(problem, blocks) -> dict[tuple[int, int], int]:
    """Payload bytes per round from block i to block j (edge values only)."""
    owner = {v: i for i, vs in enumerate(blocks) for v in vs}
    batch = problem.stalks["a0"].shape[1]
    out: dict[tuple[int, int], int] = {}
    for e in problem.graph.edges.values():
        i, j = owner[e.tail], owner[e.head]
        if i != j:
            n = e.dim * batch * 8
            out[(i, j)] = out.get((i, j), 0) + n
            out[(j, i)] = out.get((j, i), 0) + n
    return out


class Bare:
    """One actor of the bare exchange: a round is one call per neighbour."""

    def __init__(self, index: int, sizes: dict[int, int]):
        self.index = index
        self.payload = {j: bytes(n) for j, n in sizes.items()}
        self.inbox: dict[int, set[int]] = {}
        self.cond = None

    async def connect(self, handles: dict[int, object]) -> None:
        self.handles = {j: handles[j] for j in self.payload}
        self.cond = asyncio.Condition()

    async def deliver(self, src: int, round_: int, payload: bytes) -> None:
        self.inbox.setdefault(round_, set()).add(src)
        async with self.cond:
            self.cond.notify_all()

    async def run(self, rounds: int) -> float:
        start = time.perf_counter()
        need = set(self.payload)
        for t in range(rounds):
            for j, h in self.handles.items():
                h.deliver.remote(self.index, t, self.payload[j])
            async with self.cond:
                await self.cond.wait_for(lambda t=t: need <= self.inbox.get(t, set()))
            del self.inbox[t]
            await asyncio.sleep(0)
        return time.perf_counter() - start


class Node:
    """One actor of the compiled-graph exchange."""

    def __init__(self, sizes: dict[int, int]):
        self.payload = {j: bytes(n) for j, n in sizes.items()}

    def produce(self, j: int, _round) -> bytes:
        return self.payload[j]

    def consume(self, *received) -> int:
        return sum(len(r) for r in received)


def engine_round(ray, problem, rounds: int, exchange: str = "calls"
                 ) -> tuple[float, int]:
    from sheafdist.engines.ray_engine import RayEngine

    engine = RayEngine(problem, partition="layer", exchange=exchange)
    try:
        engine.run(max(rounds // 10, 20))  # warm-up
        best = float("inf")
        for _ in range(2):
            result = engine.run(rounds)
            best = min(best, result.seconds / rounds)
        return best, engine.n_actors
    finally:
        engine.close()


def bare_round(ray, sizes_by_actor: list[dict[int, int]], rounds: int) -> float:
    remote = ray.remote(num_cpus=0.01)(Bare)
    actors = [remote.remote(i, s) for i, s in enumerate(sizes_by_actor)]
    try:
        handles = dict(enumerate(actors))
        ray.get([a.connect.remote(handles) for a in actors], timeout=60)
        ray.get([a.run.remote(max(rounds // 10, 20)) for a in actors], timeout=300)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            ray.get([a.run.remote(rounds) for a in actors], timeout=600)
            best = min(best, (time.perf_counter() - start) / rounds)
        return best
    finally:
        for a in actors:
            ray.kill(a)


def compiled_round(ray, sizes_by_actor: list[dict[int, int]], rounds: int):
    from ray.dag import InputNode, MultiOutputNode

    remote = ray.remote(num_cpus=0.01)(Node)
    actors = [remote.remote(s) for s in sizes_by_actor]
    dag = None
    try:
        with InputNode() as inp:
            sent = {(i, j): actors[i].produce.bind(j, inp)
                    for i, s in enumerate(sizes_by_actor) for j in s}
            outs = [actors[j].consume.bind(*[sent[(i, j)] for i in s])
                    for j, s in enumerate(sizes_by_actor)]
            graph = MultiOutputNode(outs)
        dag = graph.experimental_compile(_max_inflight_executions=8)
        inflight = 4

        def go(n: int) -> float:
            start, refs = time.perf_counter(), []
            for t in range(n):
                refs.append(dag.execute(t))
                if len(refs) >= inflight:
                    ray.get(refs.pop(0))
            for r in refs:
                ray.get(r)
            return (time.perf_counter() - start) / n

        go(max(rounds // 10, 20))
        return min(go(rounds) for _ in range(2))
    except Exception as exc:  # an experimental API: report, do not fail
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        if dag is not None:
            dag.teardown()
        for a in actors:
            ray.kill(a)


def cases(wide: list[int], batch: int):
    from golden_cases import make_problem

    from sheafdist.model import he_init
    from sheafdist.problem import inference_problem
    from sheafdist.rules import Config

    train, _ = paraboloid_problem()
    yield "train [2,30,1] x300", train
    yield "infer [2,6,4,4,1] x1", make_problem(golden_case("inference_26441"))
    rng = np.random.default_rng(0)
    model = he_init(wide, 0)
    x = rng.standard_normal((wide[0], batch))
    name = f"infer [{','.join(map(str, wide))}] x{batch}"
    yield name, inference_problem(model, x, Config(1.0, 0.01), "random", 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--wide", default="64,256,256,256,10")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-compiled", action="store_true")
    args = p.parse_args()
    import ray

    from sheafdist.engines.ray_engine import init_ray
    from sheafdist.partition import partition

    init_ray()
    print(f"# Ray engine sync round against a bare Ray exchange ({threads_note()}, "
          f"ray {ray.__version__}, {args.rounds} rounds, best of 2)")
    wide = [int(n) for n in args.wide.split(",")]
    for name, problem in cases(wide, args.batch):
        blocks = partition(problem.graph, "layer")
        sizes = exchange_bytes(problem, blocks)
        by_actor = [{j: n for (i, j), n in sizes.items() if i == k}
                    for k in range(len(blocks))]
        calls = sum(len(s) for s in by_actor)
        eng, n_actors = engine_round(ray, problem, args.rounds)
        bare = bare_round(ray, by_actor, args.rounds)
        comp = eng_comp = None
        if not args.no_compiled:
            comp = compiled_round(ray, by_actor, args.rounds)
            eng_comp, _ = engine_round(ray, problem, args.rounds, "compiled")
        print(f"{name}: {n_actors} actors, {calls} calls and "
              f"{sum(sizes.values())} payload bytes per round")
        print(f"  engine   {eng * 1e3:7.3f} ms/round")
        print(f"  bare     {bare * 1e3:7.3f} ms/round   engine/bare "
              f"{eng / bare:5.2f}x (target 1.5x)")
        if isinstance(comp, float):
            print(f"  compiled {comp * 1e3:7.3f} ms/round   compiled/bare "
                  f"{comp / bare:5.2f}x")
            print(f"  engine --exchange compiled {eng_comp * 1e3:7.3f} ms/round   "
                  f"/compiled {eng_comp / comp:5.2f}x   /engine {eng_comp / eng:5.2f}x")
        elif comp is not None:
            print(f"  compiled {comp}")


if __name__ == "__main__":
    main()
