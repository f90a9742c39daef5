"""The Ray engine: partition blocks as actors that talk only to their neighbours.

Each actor hosts one :class:`~sheafdist.rules.Block` and runs its own round loop.
In ``sync`` mode an actor starts round t+1 as soon as it holds every neighbour
message of round t; the driver starts the run, polls statistics and collects the
result, but is not on the per-round path. One Ray call per neighbouring pair per
round carries every edge value between the two (a msgpack list, checked on
receipt).

Stopping on a tolerance needs the global largest change of a round, which no
actor sees. Each actor piggybacks what it knows of recent rounds on its edge
messages; since the actors form a path of diameter D, every actor knows round
s completely when it receives round s+D. All actors therefore decide about
round s at the same round, stop together and roll back to their snapshot of
round s: the result equals the local engine's, round count included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from ..errors import DivergenceError, InputError, RunError, one_line
from ..messages import EdgeInfo, MessageError, encode_edge, encode_reduce, pack, unpack
from ..model import MLP
from ..partition import partition as make_partition
from ..pins import apply_hard
from ..problem import Problem
from ..rules import Block, RoundStats, Traffic, add_traffic, direction
from .base import (
    MIN_ROUNDS,
    REPORT_SECONDS,
    Observer,
    RunResult,
    diverged,
    divergence_error,
    divergence_limit,
)

log = logging.getLogger(__name__)

MODES = ("sync",)
STALL_SECONDS = 120.0  # an actor that makes no progress this long fails the run
CALL_TIMEOUT = 60.0  # every ray.get in the driver has a timeout


def merge_stats(parts: list[RoundStats]) -> RoundStats:
    out = RoundStats()
    for p in parts:
        out.max_change = max(out.max_change, p.max_change)
        if not np.isfinite(p.max_change):
            out.max_change = p.max_change
        out.discord.update(p.discord)
        out.flips.update(p.flips)
        out.update_norm.update(p.update_norm)
    return out


class BlockActor:
    """One partition block and its round loop (a Ray async actor)."""

    def __init__(self, index: int, block: Block, owner: dict[str, int], n_blocks: int):
        self.index, self.block, self.owner = index, block, owner
        # arrays arrive as read-only views of Ray's object store: own them
        block.stalks = {v: s.copy() for v, s in block.stalks.items()}
        block.maps = {e: (w.copy(), b.copy()) for e, (w, b) in block.maps.items()}
        self.lag = max(n_blocks - 1, 1)  # rounds until a round is known everywhere
        self.graph = graph = block.graph
        self.edge_info = {
            e.name: EdgeInfo(e.tail, e.head, e.dim) for e in graph.edges.values()
        }
        # the edge values this block sends away, grouped by receiving block
        self.outgoing: dict[int, list[tuple[str, str, str]]] = {}
        for (edge, vertex) in ((e.name, v) for v in block.owned
                               for e in block.incident[v]):
            e = graph.edges[edge]
            other = e.head if vertex == e.tail else e.tail
            if owner[other] != index:
                self.outgoing.setdefault(owner[other], []).append((edge, vertex, other))
        self.neighbours: dict[int, object] = {}
        self.inbox: dict[int, dict[int, list[dict]]] = {}
        self.round = 0
        self.error: str | None = None
        self.traffic: Traffic = {}
        self.latest: RoundStats | None = None
        self.limit: float | None = None
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:  # created on the actor's own event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def connect(self, handles: dict[int, object]) -> int:
        self.neighbours = {j: handles[j] for j in self.outgoing}
        return os.getpid()

    # ------------------------------------------------------------ messages

    async def deliver(self, src: int, round_: int, payload: bytes) -> None:
        try:
            msgs = unpack(payload, self.edge_info, self.block.batch)
            for m in msgs:
                if m["round"] != round_:
                    raise MessageError(f"round: call for {round_} holds {m['round']}")
                if m["kind"] == "edge" and (
                    self.owner.get(m["dst"]) != self.index
                    or self.owner.get(m["src"]) != src
                ):
                    raise MessageError(
                        f"route: {m['src']}->{m['dst']} does not run from block "
                        f"{src} to block {self.index}"
                    )
        except MessageError as exc:
            await self.abort(f"block {self.index} rejected a message from block "
                             f"{src}: {exc}")
            raise
        self.inbox.setdefault(round_, {})[src] = msgs
        async with self.cond:
            self.cond.notify_all()

    async def abort(self, reason: str) -> None:
        self.error = self.error or reason
        async with self.cond:
            self.cond.notify_all()

    def _send(self, round_: int, sent: dict, reduce: list[list] | None) -> None:
        for j, items in self.outgoing.items():
            msgs = [encode_edge(edge, v, other, round_, sent[(edge, v)])
                    for edge, v, other in items]
            if reduce is not None:
                msgs.append(encode_reduce(self.index, round_, reduce))
            payload = pack(msgs)
            self.neighbours[j].deliver.remote(self.index, round_, payload)
            for (edge, v, _), m in zip(items, msgs, strict=False):
                key = (edge, direction(self.graph.edges[edge], v), "remote")
                add_traffic(self.traffic, key, 1, len(m["data"]))

    def _count_local(self, sent: dict) -> None:
        for (edge, v), value in sent.items():
            e = self.graph.edges[edge]
            if self.owner[e.head if v == e.tail else e.tail] == self.index:
                add_traffic(self.traffic, (edge, direction(e, v), "local"), 1,
                            value.nbytes)

    async def _receive(self, round_: int) -> dict[tuple[str, str], np.ndarray]:
        need = set(self.outgoing)
        async with self.cond:
            await self.cond.wait_for(
                lambda: self.error is not None
                or need <= set(self.inbox.get(round_, {}))
            )
        if self.error is not None:
            raise RunError(self.error)
        got = self.inbox.pop(round_, {})
        values, self._reduce_in = {}, []
        for msgs in got.values():
            for m in msgs:
                if m["kind"] == "edge":
                    values[(m["edge"], m["src"])] = m["value"]
                else:
                    self._reduce_in.extend(m["entries"])
        return values

    # ------------------------------------------------------------ rounds

    def _snapshot(self, stats: RoundStats):
        b = self.block
        return ({v: s.copy() for v, s in b.stalks.items()},
                {e: (w.copy(), c.copy()) for e, (w, c) in b.maps.items()}, stats)

    def _restore(self, snap) -> None:
        stalks, maps, stats = snap
        self.block.stalks = {v: s.copy() for v, s in stalks.items()}
        self.block.maps = {e: (w.copy(), c.copy()) for e, (w, c) in maps.items()}
        self.latest = stats

    async def run(self, rounds: int, tol: float | None, min_rounds: int) -> dict:
        """Advance ``rounds`` rounds, or until the global tolerance rule stops."""
        try:
            return await self._run(rounds, tol, min_rounds)
        except DivergenceError as exc:
            await self.abort(str(exc))
            return {"index": self.index, "failed": "diverged", "error": str(exc),
                    "round": self.round, "energy": exc.args[1] if len(exc.args) > 1
                    else float("nan")}
        except RunError as exc:
            return {"index": self.index, "failed": "aborted", "error": str(exc),
                    "round": self.round}

    async def _run(self, rounds: int, tol: float | None, min_rounds: int) -> dict:
        block, start = self.block, self.round
        self.error = None
        known: dict[int, dict[int, tuple[float, float]]] = {}
        snaps = {start: self._snapshot(self.latest or RoundStats())}
        end = start + rounds
        while True:
            t = self.round + 1
            if tol is None and t > end:
                break
            sent = block.send()
            reduce = None
            if tol is not None:
                reduce = [[s, b, mc, en] for s, parts in known.items()
                          for b, (mc, en) in parts.items() if s >= t - 1 - self.lag]
            self._send(t, sent, reduce)
            self._count_local(sent)
            received = await self._receive(t)
            if tol is not None:
                for s, b, mc, en in self._reduce_in:
                    known.setdefault(s, {})[b] = (mc, en)
                s = t - self.lag
                if s >= start + 1:
                    parts = known.get(s, {})
                    global_change = max(mc for mc, _ in parts.values())
                    global_energy = sum(en for _, en in parts.values())
                    stop = (s - start >= min_rounds and global_change < tol)
                    if stop or s == end:
                        self._restore(snaps[s])
                        self.round = s
                        return {"index": self.index, "round": s, "converged": stop,
                                "stats": self.latest, "final_change": global_change,
                                "energy": global_energy}
                    for old in [r for r in snaps if r <= s]:
                        del snaps[old]
                    known.pop(s, None)
            stats = block.step(received)
            self.round = t
            self.latest = stats
            if self.limit is None:
                self.limit = divergence_limit(stats.energy)
            if diverged(stats, self.limit):
                raise DivergenceError("diverged", stats.energy)
            if tol is not None:
                known.setdefault(t, {})[self.index] = (stats.max_change, stats.energy)
                snaps[t] = self._snapshot(stats)
            await asyncio.sleep(0)  # let statistics calls in between rounds
        return {"index": self.index, "round": self.round, "converged": False,
                "stats": self.latest}

    # ------------------------------------------------------------ driver calls

    async def drain(self) -> tuple[int, RoundStats | None, Traffic]:
        traffic, self.traffic = self.traffic, {}
        return self.round, self.latest, traffic

    async def state(self) -> tuple[dict, dict]:
        return ({v: s.copy() for v, s in self.block.stalks.items()},
                {e: (w.copy(), c.copy()) for e, (w, c) in self.block.maps.items()})

    async def set_stalks(self, stalks: dict[str, np.ndarray]) -> None:
        for v in self.block.owned:
            self.block.stalks[v] = np.array(stalks[v], dtype=np.float64)
        apply_hard(self.block.stalks, self.block.hard)


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING,
                  log_to_driver=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**kwargs)
    except ConnectionError as exc:
        if address:
            raise InputError("--address", repr(address), "no Ray cluster answers "
                             f"there ({one_line(exc)}); start one with `ray start "
                             "--head` or drop --address") from None
        raise RunError(f"ray: the embedded local Ray did not start ({one_line(exc)})")\
            from None
    except Exception as exc:  # ray raises many types while starting
        raise RunError(f"ray: could not start or join Ray ({one_line(exc)})") \
            from None


class RayEngine:
    name = "ray"

    def __init__(
        self,
        problem: Problem,
        observer: Observer | None = None,
        partition: str = "layer",
        mode: str = "sync",
        address: str | None = None,
        on_report: Callable[[int], None] | None = None,
    ):
        import ray

        if mode not in MODES:
            raise InputError("--mode", repr(mode), f"use one of {MODES}")
        self.problem, self.observer = problem, observer
        self.blocks = make_partition(problem.graph, partition)
        owner = {v: i for i, vs in enumerate(self.blocks) for v in vs}
        init_ray(address)
        remote = ray.remote(num_cpus=0, max_restarts=0)(BlockActor)
        self.actors = [
            remote.remote(i, problem.block(vs), owner, len(self.blocks))
            for i, vs in enumerate(self.blocks)
        ]
        handles = dict(enumerate(self.actors))
        self._get([a.connect.remote(handles) for a in self.actors])
        self.rounds = 0
        log.debug("ray engine: %d actors, partition %s", len(self.actors), partition)

    @property
    def n_actors(self) -> int:
        return len(self.actors)

    def _get(self, refs, timeout: float = CALL_TIMEOUT):
        import ray

        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"ray: no answer from the actors within {timeout:.0f}s") \
                from None
        except ray.exceptions.RayActorError as exc:
            raise RunError(f"ray: an actor died ({exc.__class__.__name__}); the run "
                           "cannot continue") from None

    def _report(self) -> int:
        drained = self._get([a.drain.remote() for a in self.actors])
        rounds = min(r for r, _, _ in drained)
        parts = [s for _, s, _ in drained if s is not None]
        traffic: Traffic = {}
        for _, _, t in drained:
            for key, (count, nbytes) in t.items():
                add_traffic(traffic, key, count, nbytes)
        if self.observer is not None and parts:
            self.observer(rounds, merge_stats(parts), traffic)
        return rounds

    def run(
        self, rounds: int, tol: float | None = None, min_rounds: int = MIN_ROUNDS
    ) -> RunResult:
        import ray

        start = time.perf_counter()
        refs = [a.run.remote(rounds, tol, min_rounds) for a in self.actors]
        pending, last_round, last_progress = list(refs), -1, time.monotonic()
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending),
                                      timeout=REPORT_SECONDS)
            if pending and any("failed" in r for r in self._get(ready)):
                # a block gave up: the others wait for its messages, so stop them
                for a in self.actors:
                    a.abort.remote("a neighbouring block failed")
            reached = self._report()
            if reached > last_round:
                last_round, last_progress = reached, time.monotonic()
            elif pending and time.monotonic() - last_progress > STALL_SECONDS:
                for a in self.actors:
                    a.abort.remote("the driver saw no progress")
                raise RunError(f"ray: no actor advanced past round {reached} in "
                               f"{STALL_SECONDS:.0f}s")
        results = self._get(refs)
        failed = [r for r in results if "failed" in r]
        if failed:
            first = next((r for r in failed if r["failed"] == "diverged"), failed[0])
            if first["failed"] == "diverged":
                raise divergence_error(self.problem, first["round"] + 1,
                                       first.get("energy", float("nan")))
            raise RunError(first["error"])
        stats = merge_stats([r["stats"] for r in results if r["stats"] is not None])
        taken = results[0]["round"] - self.rounds
        self.rounds = results[0]["round"]
        converged = bool(results[0]["converged"])
        final_change = results[0].get("final_change", stats.max_change)
        energy = results[0].get("energy", stats.energy)
        return RunResult(
            stalks=self.stalks(), model=self.model(), rounds=taken,
            converged=converged, final_change=final_change, energy=energy,
            discord=dict(stats.discord), flips=sum(stats.flips.values()),
            seconds=time.perf_counter() - start,
        )

    def _states(self):
        return self._get([a.state.remote() for a in self.actors])

    def stalks(self) -> dict[str, np.ndarray]:
        out = {}
        for stalks, _ in self._states():
            out.update(stalks)
        return out

    def set_stalks(self, stalks: dict[str, np.ndarray]) -> None:
        self._get([a.set_stalks.remote({v: stalks[v] for v in vs})
                   for a, vs in zip(self.actors, self.blocks, strict=True)])

    def model(self) -> MLP:
        m = self.problem.model.copy()
        for _, maps in self._states():
            for name, (w, b) in maps.items():
                layer = int(name[1:])
                m.W[layer - 1], m.b[layer - 1] = w, b
        return m

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
