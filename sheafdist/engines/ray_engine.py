"""The Ray engine: partition blocks as actors that talk only to their neighbours.

Each actor hosts one :class:`~sheafdist.rules.Block` and runs its own round loop.
One Ray call per neighbouring pair per exchange carries every edge value
between the two (a msgpack list, checked on receipt). The driver starts a run,
polls statistics and collects the result; it is never on the per-round path.

Modes:

- ``sync``: an actor starts round t+1 as soon as it holds every neighbour
  message of round t. To stop on a tolerance, which needs the global largest
  change of a round, each actor piggybacks what it knows of recent rounds on its
  messages; the actors form a path of diameter D, so every actor knows round s
  completely when it receives round s+D. All actors then decide about round s
  together and roll back to their snapshot of round s: the result equals the
  local engine's, round count included.
- ``async``: an actor steps on the latest neighbour values it holds, waiting
  only when one is more than ``max_staleness`` rounds old. The staleness used
  is measured per edge. The driver stops the run once every actor's latest
  change is below the tolerance.

With ``local_steps = tau`` a block takes tau rounds per exchange, holding its
neighbours' values fixed in between: tau times fewer messages, more staleness.

A row split (:mod:`sheafdist.rowsplit`) adds a second exchange to a round: the
head of a shared discrepancy first needs the partial sums of its members'
tails, then answers each member. Every block sends its first call of a round
before it waits for anything, and a head answers after receiving only first
calls, so the two exchanges cannot wait on each other in a cycle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import deque

import msgpack
import numpy as np

from ..errors import DivergenceError, InputError, RunError, one_line
from ..messages import EdgeInfo, MessageError, encode_edge, encode_reduce, pack, unpack
from ..model import MLP
from ..partition import partition as make_partition
from ..pins import apply_hard
from ..problem import Problem
from ..rowsplit import join_maps, join_stalks, split_problem, split_stalks
from ..rowsplit import parse as parse_split
from ..rules import Block, RoundStats, Traffic, add_norm, add_traffic, direction
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

MODES = ("sync", "async")
# how the actors of a sync run exchange their calls: Ray calls they make to each
# other, or one execution per round of a Ray compiled graph run by the driver
EXCHANGES = ("calls", "compiled")
# compiled-graph rounds submitted ahead of the one the driver reads: enough to
# hide the driver's turn-around, few enough that a tolerance's rollback stays short
COMPILED_IN_FLIGHT = 4
STALL_SECONDS = 120.0  # an actor that makes no progress this long fails the run
CALL_TIMEOUT = 60.0  # every ray.get in the driver has a timeout
LATENCY_SAMPLES = 256  # per edge and report: enough for quantiles, bounded memory
TRACE_LIMIT = 200_000  # trace records an actor holds between two drains
ADDRESS_SECONDS = 5.0  # to reach a Ray head named by --address
ASYNC_POLL_SECONDS = 0.05  # how often the driver checks an async run's tolerance
CHECKPOINT_EVERY = 1000  # rounds between the in-memory checkpoints of the blocks
# An actor that never waits for a neighbour (one block, or async with fresh
# values) holds the GIL: Ray's thread that hands it the driver's calls got in only
# every 0.5-0.8 s (measured), so an async run overshot its tolerance by thousands
# of rounds. Such an actor pauses BREATHE_SECONDS (epoll's resolution, the least
# a sleep takes) once it has not waited for BREATHE_EVERY seconds: 2% of its time.
BREATHE_EVERY = 0.05
BREATHE_SECONDS = 0.001
# Ray's own bound on the calls one actor has queued on another (max_pending_calls);
# a sender at the bound waits for the receiver instead of queueing more. The
# driver's handle needs room for one more, its long ``run`` call (its short calls
# wait for room like everyone's), so Ray's option is the bound plus DRIVER_CALLS.
MAX_PENDING_CALLS = 64
DRIVER_CALLS = 1
PENDING_BACKOFF_SECONDS = 0.001
MAX_RECOVERIES = 3  # lost actors replaced in one run before it gives up
NEIGHBOUR_FAILED = "a neighbouring block failed"
DRIVER_ABORTS = (NEIGHBOUR_FAILED, "the driver saw no progress")


def merge_stats(parts: list[RoundStats]) -> RoundStats:
    out = RoundStats()
    for p in parts:
        out.max_change = max(out.max_change, p.max_change)
        if not np.isfinite(p.max_change):
            out.max_change = p.max_change
        # a split edge's pieces come from several blocks: they add up
        for edge, value in p.discord.items():
            out.discord[edge] = out.discord.get(edge, 0.0) + value
        for edge, n in p.flips.items():
            out.flips[edge] = out.flips.get(edge, 0) + n
        for edge, value in p.update_norm.items():
            add_norm(out.update_norm, edge, value)
        for edge, age in p.staleness.items():
            out.staleness[edge] = max(out.staleness.get(edge, 0), age)
        for edge, samples in p.latency.items():
            out.latency.setdefault(edge, []).extend(samples)
    return out


class BlockActor:
    """One partition block and its round loop (a Ray async actor)."""

    def __init__(
        self, index: int, block: Block, owner: dict[str, int], n_blocks: int,
        mode: str = "sync", max_staleness: int = 1, local_steps: int = 1,
        trace: bool = False, checkpoint_every: int = 0,
    ):
        self.index, self.block, self.owner = index, block, owner
        self.mode, self.max_staleness, self.tau = mode, max_staleness, local_steps
        self.tracing, self.checkpoint_every = trace, checkpoint_every
        self.generation = 0  # bumped by every recovery; older messages are dropped
        self.running = False
        self.saved: list[tuple[int, tuple]] = []  # checkpoints not yet drained
        # arrays arrive as read-only views of Ray's object store: own them
        block.stalks = {v: s.copy() for v, s in block.stalks.items()}
        block.maps = {e: (w.copy(), b.copy()) for e, (w, b) in block.maps.items()}
        self.lag = max(n_blocks - 1, 1)  # rounds until a round is known everywhere
        self.graph = graph = block.graph
        self.edge_info = {
            e.name: EdgeInfo(e.tail, e.head, e.dim) for e in graph.edges.values()
        }
        # the edge values this block sends away, grouped by receiving block: in
        # a round's first call to every neighbouring block, and, for the head of
        # a shared discrepancy, its answers in a second call (``answers``)
        self.outgoing: dict[int, list[tuple[str, str, str]]] = {}
        self.answers: dict[int, list[tuple[str, str, str]]] = {}
        answering = set()  # the blocks whose answers this block waits for
        expect = set()  # the blocks that send this block values in a first call
        for v in block.owned:
            for e in block.incident[v]:
                other = e.head if v == e.tail else e.tail
                if owner[other] == index:
                    continue
                self.outgoing.setdefault(owner[other], [])
                shared = len(block.groups[e.shared]) > 1
                if shared and v == e.head:
                    self.answers.setdefault(owner[other], []).append(
                        (e.name, v, other))
                else:
                    self.outgoing[owner[other]].append((e.name, v, other))
                if shared and v == e.tail:
                    answering.add(owner[other])
                else:
                    expect.add(owner[other])
        self.answering, self.expect = sorted(answering), sorted(expect)
        # blocks this block only answers: no first call, which would be empty;
        # the convergence entries ride with the answers instead
        self.quiet = {j for j, items in self.outgoing.items() if not items}
        self.neighbours: dict[int, object] = {}
        # received calls by (round, phase) and sending block (sync), or the
        # newest by (sending block, phase) (async); phase 2 holds the answers
        self.inbox: dict[tuple[int, int], dict[int, list[dict]]] = {}
        self.latest: dict[tuple[int, int], tuple[int, list[dict]]] = {}
        self.round = 0
        self.error: str | None = None
        self.stop_requested = False
        self.traffic: Traffic = {}
        self.pairs: dict[tuple[int, int], list[int]] = {}  # see RoundStats.pairs
        self.stats: RoundStats | None = None
        self.latency: dict[str, list[float]] = {}
        # Ray calls to and from each neighbouring block, and how often a send
        # waited at the bound on pending calls (drained as deltas)
        self.calls = {"sent": 0, "received": 0, "backpressure": 0}
        # the oldest neighbour value used since the last drain, per edge (async)
        self.staleness: dict[str, int] = {}
        self.trace: list[list] = []
        self.limit: float | None = None
        self._cond: asyncio.Condition | None = None
        self._breathed = time.monotonic()
        # exchange "compiled": the graph's methods run on a thread of Ray's own,
        # beside the event loop serving drain and state; this lock keeps them
        # apart. The round whose values cg_send has made, and the snapshots of
        # the rounds a tolerance may roll back to
        self.cg_lock = threading.Lock()
        self.cg_round, self.cg_sent = -1, {}
        self.cg_snaps: dict[int, tuple] = {}
        self.cg_keep = 0

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:  # created on the actor's own event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def connect(self, handles: dict[int, object]) -> dict:
        import ray

        self.neighbours = {j: handles[j] for j in self.outgoing}  # answers too
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "expect": self.expect}

    # ------------------------------------------------------------ messages

    async def deliver(
        self, src: int, round_: int, payload: bytes, generation: int = 0,
        phase: int = 1,
    ) -> None:
        received = time.time()
        if generation != self.generation:
            return  # sent before a recovery rolled everyone back
        self.calls["received"] += 1
        try:
            msgs = self._check(src, round_, payload)
        except MessageError as exc:
            await self.abort(f"block {self.index} rejected a message from block "
                             f"{src}: {exc}")
            raise
        self._note_received(src, msgs, received)
        if self.mode == "sync":
            self.inbox.setdefault((round_, phase), {})[src] = msgs
        elif round_ > self.latest.get((src, phase), (-1, None))[0]:
            self.latest[(src, phase)] = (round_, msgs)
        async with self.cond:
            self.cond.notify_all()

    def _check(self, src: int, round_: int, payload: bytes) -> list[dict]:
        """The messages of one call from block ``src``, checked (MessageError)."""
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
        return msgs

    def _note_received(self, src: int, msgs: list[dict], received: float) -> None:
        """Latency samples and trace records of messages received at ``received``."""
        for m in msgs:
            if m["kind"] != "edge" or m["sent"] is None:
                continue
            samples = self.latency.setdefault(self.graph.edges[m["edge"]].whole, [])
            if len(samples) < LATENCY_SAMPLES:
                samples.append(max(received - m["sent"], 0.0))
            if self.tracing and len(self.trace) < TRACE_LIMIT:
                self.trace.append([m["round"], m["edge"], m["src"], m["dst"],
                                   m["nbytes"], m["sent"], received, "remote", src,
                                   self.index])

    async def abort(self, reason: str) -> None:
        self.error = self.error or reason
        async with self.cond:
            self.cond.notify_all()

    async def stop(self) -> int:
        """Finish the current round and return (async runs, driver's tolerance)."""
        self.stop_requested = True
        async with self.cond:
            self.cond.notify_all()
        return self.round

    async def _send(self, round_: int, sent: dict, reduce: list[list] | None,
                    phase: int = 1) -> None:
        now = time.time()
        for j, items in (self.outgoing if phase == 1 else self.answers).items():
            if phase == 1 and j in self.quiet:
                continue
            msgs = [encode_edge(edge, v, other, round_, sent[(edge, v)], now)
                    for edge, v, other in items]
            if reduce is not None and (phase == 1 or j in self.quiet):
                msgs.append(encode_reduce(self.index, round_, reduce))
            await self._call(j, round_, pack(msgs), phase)
            self._count_sent(j, items, msgs)

    def _count_sent(self, j: int, items: list[tuple[str, str, str]],
                    msgs: list[dict]) -> None:
        for (edge, v, _), m in zip(items, msgs, strict=False):
            e = self.graph.edges[edge]
            key = (e.whole, direction(e, v), "remote")
            add_traffic(self.traffic, key, 1, m["data"].nbytes)
            add_traffic(self.pairs, (self.index, j), 1, m["data"].nbytes)

    async def _call(self, j: int, round_: int, payload: bytes, phase: int = 1
                    ) -> None:
        """One fire-and-forget call to block ``j``; at Ray's bound on calls
        queued there, wait (without blocking the event loop) for room."""
        from ray.exceptions import PendingCallsLimitExceeded

        while True:
            try:
                self.neighbours[j].deliver.remote(self.index, round_, payload,
                                                  self.generation, phase)
                break
            except PendingCallsLimitExceeded:
                self.calls["backpressure"] += 1
                if self.error is not None or self.stop_requested:
                    return
                await asyncio.sleep(PENDING_BACKOFF_SECONDS)
        self.calls["sent"] += 1

    def _count_local(self, round_: int, sent: dict) -> None:
        now = time.time() if self.tracing else 0.0
        for (edge, v), value in sent.items():
            e = self.graph.edges[edge]
            other = e.head if v == e.tail else e.tail
            if self.owner[other] == self.index:
                add_traffic(self.traffic, (e.whole, direction(e, v), "local"), 1,
                            value.nbytes)
                add_traffic(self.pairs, (self.index, self.index), 1, value.nbytes)
                if self.tracing and len(self.trace) < TRACE_LIMIT:
                    self.trace.append([round_, edge, v, other, value.nbytes, now, now,
                                       "local", self.index, self.index])

    async def _wait(self, ready) -> None:
        def done() -> bool:
            return self.error is not None or self.stop_requested or ready()

        if not done():
            self._breathed = time.monotonic()  # blocking lets Ray's threads in
            async with self.cond:
                await self.cond.wait_for(done)
        if self.error is not None:
            raise RunError(self.error)

    async def _receive_sync(self, round_: int, phase: int = 1) -> tuple[dict, list]:
        need = set(self.expect if phase == 1 else self.answering)
        key = (round_, phase)
        await self._wait(lambda: need <= set(self.inbox.get(key, {})))
        if self.stop_requested and not need <= set(self.inbox.get(key, {})):
            return {}, []
        values, reduce = {}, []
        for msgs in self.inbox.pop(key, {}).values():
            for m in msgs:
                if m["kind"] == "edge":
                    values[(m["edge"], m["src"])] = m["value"]
                else:
                    reduce.extend(m["entries"])
        return values, reduce

    async def _receive_async(self, round_: int, phase: int = 1
                             ) -> tuple[dict, dict[str, int]] | None:
        """The newest values, waiting only for those too stale to use; None when
        the driver stopped the run first."""
        oldest = round_ - self.max_staleness
        blocks = [(j, phase) for j in (self.expect if phase == 1
                                       else self.answering)]

        def ready() -> bool:
            return all(k in self.latest and self.latest[k][0] >= oldest
                       for k in blocks)

        await self._wait(ready)
        if not ready():
            return None
        values, staleness = {}, {}
        for k in blocks:
            r, msgs = self.latest.get(k, (-1, None))
            for m in msgs or []:
                if m["kind"] == "edge":
                    values[(m["edge"], m["src"])] = m["value"]
                    whole = self.graph.edges[m["edge"]].whole
                    staleness[whole] = max(staleness.get(whole, 0), round_ - r, 0)
        return values, staleness

    async def _answer(self, round_: int, received: dict,
                      staleness: dict[str, int] | None = None,
                      reduce: list[list] | None = None) -> tuple[dict, list] | None:
        """A round's second exchange, under a row split: a head answers the
        partial sums in ``received``; a tail waits for the answers. Returns every
        value of the round and the convergence entries that came with the
        answers (None when the run was stopped meanwhile)."""
        if self.answers:
            await self._send(round_, self.block.reply(received), reduce, phase=2)
        if not self.answering:
            return received, []
        reduce_in: list = []
        if self.mode == "sync":
            more, reduce_in = await self._receive_sync(round_, 2)
            if self.stop_requested and not more:
                return None
        else:
            got = await self._receive_async(round_, 2)
            if got is None:
                return None
            more, ages = got
            for e, age in ages.items():
                staleness[e] = max(staleness.get(e, 0), age)
        return {**received, **more}, reduce_in

    # ------------------------------------------------------------ rounds

    def _snapshot(self, stats: RoundStats | None):
        return self.block.snapshot(), stats

    def _restore(self, snap) -> None:
        self.block.restore(snap[0])
        self.stats = snap[1]

    def _step(self, t: int, received: dict) -> RoundStats:
        stats = self.block.step(received)
        self.round, self.stats = t, stats
        if self.tracing and stats.update_norm and len(self.trace) < TRACE_LIMIT:
            now = time.time()
            for name in self.block.maps:  # the maps this block moved
                self.trace.append({"kind": "update", "round": t, "edge": name,
                                   "block": self.index, "time": now,
                                   "reads": self.block.reads[name]})
        if self.limit is None:
            self.limit = divergence_limit(stats.energy)
        if diverged(stats, self.limit):
            raise DivergenceError("diverged", stats.energy)
        if self.checkpoint_every and t % self.checkpoint_every == 0:
            self.saved.append((t, self._state()))
        return stats

    async def _breathe(self) -> None:
        """Let the driver's calls in between two rounds (see BREATHE_EVERY)."""
        now = time.monotonic()
        if now - self._breathed < BREATHE_EVERY:
            await asyncio.sleep(0)
            return
        await asyncio.sleep(BREATHE_SECONDS)
        self._breathed = time.monotonic()

    async def run(self, end: int, tol: float | None, first_check: int) -> dict:
        """Advance to round ``end``, or until the tolerance rule stops the run
        (checked from round ``first_check`` on). Rounds are absolute, so a run
        resumed from a checkpoint takes the same decisions as the first try."""
        self.error, self.stop_requested = None, False
        self.latest.clear()
        self.running = True
        try:
            if self.mode == "sync" and self.tau == 1:
                return await self._run_sync(end, tol, first_check)
            return await self._run_free(end)
        except DivergenceError as exc:
            await self.abort(str(exc))
            return {"index": self.index, "failed": "diverged", "error": str(exc),
                    "round": self.round, "energy": exc.args[1]}
        except RunError as exc:
            return {"index": self.index, "failed": "aborted", "error": str(exc),
                    "round": self.round}
        finally:
            self.running = False
            async with self.cond:
                self.cond.notify_all()

    async def _run_sync(self, end: int, tol: float | None, first_check: int):
        block, start = self.block, self.round
        known: dict[int, dict[int, tuple[float, float]]] = {}
        snaps = {start: self._snapshot(self.stats)} if tol is not None else {}
        while True:
            t = self.round + 1
            if tol is None and t > end:
                break
            sent = block.send()
            reduce = None
            if tol is not None:
                reduce = [[s, b, mc, en] for s, parts in known.items()
                          for b, (mc, en) in parts.items()]
            await self._send(t, sent, reduce)
            self._count_local(t, sent)
            received, reduce_in = await self._receive_sync(t)
            if self.answers or self.answering:
                got = await self._answer(t, received, reduce=reduce)
                if got is None:
                    break
                received, more = got
                reduce_in = reduce_in + more
            if tol is not None:
                for s, b, mc, en in reduce_in:
                    known.setdefault(s, {})[b] = (mc, en)
                s = t - self.lag  # now known to every actor
                if s >= start + 1:
                    parts = known.pop(s)
                    change = max(mc for mc, _ in parts.values())
                    energy = sum(en for _, en in parts.values())
                    converged = s >= first_check and change < tol
                    if converged or s == end:
                        self._restore(snaps[s])
                        self.round = s
                        return {"index": self.index, "round": s,
                                "converged": converged, "stats": self.stats,
                                "final_change": change, "energy": energy}
                    del snaps[s - 1]
            stats = self._step(t, received)
            if tol is not None:
                known.setdefault(t, {})[self.index] = (stats.max_change, stats.energy)
                snaps[t] = self._snapshot(stats)
            await self._breathe()  # let statistics calls in between rounds
        return {"index": self.index, "round": self.round, "converged": False,
                "stats": self.stats}

    async def _run_free(self, end: int) -> dict:
        """Async mode, or local steps: each exchange, then tau rounds on what is
        held. The driver may stop the run early (its tolerance rule)."""
        block = self.block
        received: dict = {}
        staleness: dict[str, int] = {}
        exchanged_at = self.round + 1
        while self.round < end and not self.stop_requested:
            t = self.round + 1
            sent = block.send()
            self._count_local(t, sent)
            # every tau-th round, counted from 0, so all blocks exchange together
            exchange = (t - 1) % self.tau == 0 or not received
            if exchange:
                await self._send(t, sent, None)
                if self.mode == "sync":
                    fresh, _ = await self._receive_sync(t)
                    if self.stop_requested and not fresh:
                        break
                else:
                    got = await self._receive_async(t)
                    if got is None:
                        break
                    fresh, staleness = got
                if self.answers or self.answering:
                    got = await self._answer(t, fresh, staleness)
                    if got is None:
                        break
                    fresh = got[0]
                if self.mode == "sync":
                    staleness = {self.graph.edges[edge].whole: 0
                                 for edge, _ in fresh}
                received = fresh
                exchanged_at = t
            stats = self._step(t, received)
            # values held since the last exchange age by one round per local step
            stats.staleness = {e: s + t - exchanged_at for e, s in staleness.items()}
            for e, age in stats.staleness.items():
                self.staleness[e] = max(self.staleness.get(e, 0), age)
            await self._breathe()
        return {"index": self.index, "round": self.round, "converged": False,
                "stats": self.stats}

    # ------------------------------------------------- exchange "compiled"
    # The driver runs one Ray compiled graph execution per sync round: block
    # i's cg_send(j) makes its call to block j and feeds j's cg_step, which
    # checks the messages exactly as deliver does and steps the block. The
    # values travel in Ray's shared-memory channels instead of one Ray call
    # each; the messages, their checks and the arithmetic are the same.

    def cg_send(self, j: int, t: int) -> bytes:
        """The call of round ``t`` to block ``j``."""
        with self.cg_lock:
            self._cg_values(t)
            now = time.time()
            items = self.outgoing[j]
            msgs = [encode_edge(edge, v, other, t, self.cg_sent[(edge, v)], now)
                    for edge, v, other in items]
            self._count_sent(j, items, msgs)
            self.calls["sent"] += 1
            return pack(msgs)

    def _cg_values(self, t: int) -> None:
        """The block's edge values of round ``t``, made once: by the first call
        served, or by the step of a block that sends none."""
        if self.cg_round != t:
            self.cg_round, self.cg_sent = t, self.block.send()
            self._count_local(t, self.cg_sent)

    def cg_step(self, t: int, *payloads: bytes) -> tuple[float, float]:
        """Round ``t`` on the calls of the blocks in ``self.expect``, in order;
        returns the round's largest change and energy."""
        received_at = time.time()
        with self.cg_lock:
            self._cg_values(t)
            values = {}
            for src, payload in zip(self.expect, payloads, strict=True):
                try:
                    msgs = self._check(src, t, payload)
                except MessageError as exc:
                    raise RunError(f"block {self.index} rejected a message from "
                                   f"block {src}: {exc}") from None
                self.calls["received"] += 1
                self._note_received(src, msgs, received_at)
                values.update({(m["edge"], m["src"]): m["value"] for m in msgs})
            stats = self._step(t, values)
            if self.cg_keep:
                self.cg_snaps[t] = self._snapshot(stats)
                self.cg_snaps.pop(t - self.cg_keep, None)
            return stats.max_change, stats.energy

    async def cg_begin(self, keep: int) -> None:
        """Before a run: keep snapshots of the last ``keep`` rounds (a
        tolerance may stop at a round the graph has already passed)."""
        with self.cg_lock:
            self.cg_keep, self.cg_snaps = keep, {}
            self.cg_round, self.error = -1, None
            if keep:
                self.cg_snaps[self.round] = self._snapshot(self.stats)

    async def cg_end(self, round_: int) -> dict:
        """After a run: back to round ``round_`` when the graph went past it;
        the block's round and statistics."""
        with self.cg_lock:
            if self.round != round_:
                self._restore(self.cg_snaps[round_])
                self.round = round_
            self.cg_snaps = {}
            return {"index": self.index, "round": self.round, "stats": self.stats}

    # ------------------------------------------------------------ driver calls

    async def drain(self) -> dict:
        with self.cg_lock:  # taken at once unless a compiled round is stepping
            out = {"round": self.round, "stats": self.stats,
                   "traffic": self.traffic, "latency": self.latency,
                   "trace": self.trace, "saved": self.saved, "calls": self.calls,
                   "staleness": self.staleness, "pairs": self.pairs}
            self.traffic, self.latency, self.trace, self.saved = {}, {}, [], []
            self.pairs = {}
            self.calls = dict.fromkeys(self.calls, 0)
            self.staleness = {}
        return out

    def _state(self) -> dict:
        """The block's stalks, maps and scheme memory (a checkpoint)."""
        return self.block.snapshot()

    async def state(self) -> dict:
        return self._state()

    async def ping(self) -> int:
        return self.round

    async def restore(self, round_: int, state: dict, generation: int) -> None:
        """Roll back to a checkpoint, once any interrupted run has returned."""
        async with self.cond:
            await self.cond.wait_for(lambda: not self.running)
        self.block.restore(state)
        self.round, self.generation = round_, generation
        self.inbox.clear()
        self.latest.clear()
        self.saved.clear()
        self.stats, self.error = None, None

    async def set_stalks(self, stalks: dict[str, np.ndarray]) -> None:
        for v in self.block.owned:
            self.block.stalks[v] = np.array(stalks[v], dtype=np.float64)
        apply_hard(self.block.stalks, self.block.hard)

    async def set_round(self, round_: int) -> None:
        self.round = round_
        self.inbox.clear()
        self.latest.clear()


def check_exchange(exchange: str, mode: str, local_steps: int, row_split,
                   trace) -> None:
    """The compiled graph carries the plain sync round: one local step, no row
    split (its second exchange), no trace records of its own."""
    if exchange not in EXCHANGES:
        raise InputError("--exchange", repr(exchange),
                         f"use one of {', '.join(EXCHANGES)}")
    if exchange != "compiled":
        return
    clash = [(flag, value) for flag, value, ok in (
        ("--mode", mode, mode == "sync"),
        ("--local-steps", local_steps, local_steps == 1),
        ("--row-split", row_split, not row_split),
        ("--trace", trace, trace is None)) if not ok]
    if clash:
        flag, value = clash[0]
        raise InputError("--exchange", f"compiled with {flag} {value}",
                         "the compiled graph runs sync rounds with one local step, "
                         "without --row-split or --trace; drop "
                         f"{flag} or use --exchange calls")


def check_address(address: str, arg: str = "--address") -> None:
    """Refuse an address no Ray head could be at, or that nothing answers on,
    in one line and within ADDRESS_SECONDS: ``ray.init`` itself retries an
    unreachable head for minutes."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(arg, repr(address), "give the Ray head as host:port (e.g. "
                         "127.0.0.1:6379), ray://host:port for Ray Client, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_SECONDS).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise InputError(arg, repr(address), f"no Ray cluster answers there "
                         f"({why}); start one with `ray start --head` or drop "
                         f"{arg}") from None


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        check_address(address, "RAY_ADDRESS")
    elif address:
        check_address(address)
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


class TraceWriter:
    """Appends records to a msgpack stream: one map per message, and one per
    weight update with the edge values it read (see :mod:`sheafdist.trace`).

    The stream grows in ``PATH.part`` and becomes ``PATH`` when the engine
    closes, so a file already at ``PATH`` survives a run that never starts or
    records nothing; a run that fails midway leaves the trace of what it did."""

    FIELDS = ("round", "edge", "src", "dst", "bytes", "sent", "received",
              "transport", "src_block", "dst_block")

    def __init__(self, path: str):
        self.path, self.part = path, path + ".part"
        try:
            self.file = open(self.part, "wb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise InputError("--trace", path, f"cannot write it ({exc.strerror})") \
                from None
        self.records = 0

    def write(self, rows: list[list]) -> None:
        packer = msgpack.Packer(use_bin_type=True)
        for row in rows:  # messages as rows; weight updates as maps already
            if not isinstance(row, dict):
                row = {"kind": "message", **dict(zip(self.FIELDS, row, strict=True))}
            self.file.write(packer.pack(row))
        self.records += len(rows)
        self.file.flush()

    def close(self) -> None:
        if self.file.closed:
            return
        os.fsync(self.file.fileno())
        self.file.close()
        if self.records:
            os.replace(self.part, self.path)
        else:
            os.remove(self.part)


class ActorLost(RunError):
    """An actor died; the engine can recover from its last checkpoint."""


class RayEngine:
    name = "ray"

    def __init__(
        self,
        problem: Problem,
        observer: Observer | None = None,
        partition: str = "layer",
        mode: str = "sync",
        address: str | None = None,
        max_staleness: int = 1,
        local_steps: int = 1,
        trace: str | None = None,
        placement: str = "PACK",
        checkpoint_every: int = CHECKPOINT_EVERY,
        max_recoveries: int = MAX_RECOVERIES,
        max_pending_calls: int = MAX_PENDING_CALLS,
        row_split: str | dict[int, int] | None = None,
        exchange: str = "calls",
    ):
        import ray
        from ray.util.placement_group import placement_group

        if mode not in MODES:
            raise InputError("--mode", repr(mode), f"use one of {', '.join(MODES)}")
        check_exchange(exchange, mode, local_steps, row_split, trace)
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise InputError("--max-staleness", max_staleness, "give an integer >= 0")
        if not isinstance(local_steps, int) or local_steps < 1:
            raise InputError("--local-steps", local_steps, "give an integer >= 1")
        if not isinstance(max_pending_calls, int) or max_pending_calls < 1:
            raise InputError("--max-pending-calls", max_pending_calls,
                             "give an integer >= 1")
        self.problem, self.observer, self.mode = problem, observer, mode
        self.exchange = exchange
        self._stopped_at: float | None = None  # see _run_once
        self._dag = None  # the compiled graph of a round (exchange "compiled")
        self.local_steps, self.max_recoveries = local_steps, max_recoveries
        # the sheaf the actors hold: the problem's, or its refinement when a row
        # split spreads a layer over several actors
        splits = parse_split(row_split, problem.model.arch)
        self.work = split_problem(problem, splits) if splits else problem
        self.blocks = make_partition(self.work.graph, partition)
        self.owner = {v: i for i, vs in enumerate(self.blocks) for v in vs}
        self._actor_args = (mode, max_staleness, local_steps, trace is not None,
                            checkpoint_every)
        init_ray(address)
        self.trace = TraceWriter(trace) if trace else None
        # a placement group reserves a slot for every actor before any starts, so
        # a cluster without room fails at once instead of half way through
        self.group = placement_group([{"CPU": 0.01}] * len(self.blocks),
                                     strategy=placement)
        try:
            ray.get(self.group.ready(), timeout=CALL_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.group)
            raise RunError(f"ray: the cluster has no room for {len(self.blocks)} "
                           "actors (placement group not ready)") from None
        self._remote = ray.remote(
            num_cpus=0.01, max_restarts=0,
            max_pending_calls=max_pending_calls + DRIVER_CALLS)(BlockActor)
        self.actors = [self._spawn(i) for i in range(len(self.blocks))]
        self.rounds, self.generation, self.recoveries = 0, 0, 0
        for attempt in range(max_recoveries + 1):
            try:
                self.placement = self._connect()
                break
            except ActorLost as exc:  # lost while starting: start it again
                if attempt == max_recoveries:
                    raise RunError(f"{exc} while starting; gave up after {attempt} "
                                   "new tries") from None
                log.warning("ray: %s while starting; starting it again", exc)
                self._replace_lost("lost while starting")
        # Ray calls between actors since the start: sent, received, and sends
        # that waited at the bound on pending calls
        self.calls = {"sent": 0, "received": 0, "backpressure": 0}
        # edge-value messages and bytes by (sending actor, receiving actor) since
        # the start, [messages, bytes]; (i, i) stayed inside actor i
        self.pairs: dict[tuple[int, int], list[int]] = {}
        self.max_in_flight = 0  # the most calls seen sent but not yet received
        self._reported = 0  # the furthest round handed to the observer
        self.checkpoint: tuple[int, list] | None = None
        self._partial: dict[int, dict[int, tuple]] = {}  # round -> actor -> state
        log.debug("ray engine: %d actors, partition %s, mode %s", len(self.actors),
                  partition, mode)

    def _spawn(self, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=i)
        return self._remote.options(scheduling_strategy=strategy).remote(
            i, self.work.block(self.blocks[i]), self.owner, len(self.blocks),
            *self._actor_args)

    def _connect(self) -> list[dict]:
        handles = dict(enumerate(self.actors))
        return self._get([self._submit(a, "connect", handles) for a in self.actors])

    @property
    def n_actors(self) -> int:
        return len(self.actors)

    def _submit(self, actor, method: str, *args):
        """``actor.method.remote(*args)``, waiting (up to CALL_TIMEOUT) while the
        actor has as many calls queued as Ray allows."""
        from ray.exceptions import PendingCallsLimitExceeded

        deadline = time.monotonic() + CALL_TIMEOUT
        while True:
            try:
                return getattr(actor, method).remote(*args)
            except PendingCallsLimitExceeded:
                if time.monotonic() > deadline:
                    raise RunError(f"ray: an actor kept its queue of calls full for "
                                   f"{CALL_TIMEOUT:.0f}s") from None
                time.sleep(PENDING_BACKOFF_SECONDS)

    def _get(self, refs, timeout: float = CALL_TIMEOUT):
        import ray

        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"ray: no answer from the actors within {timeout:.0f}s") \
                from None
        except ray.exceptions.RayActorError as exc:
            raise ActorLost(f"ray: an actor died ({exc.__class__.__name__})") \
                from None

    def _report(self) -> tuple[int, float]:
        """Hand the actors' statistics to the observer and file their checkpoints;
        return the slowest actor's round and the largest latest change."""
        drained = self._get([self._submit(a, "drain") for a in self.actors])
        parts = [d["stats"] for d in drained if d["stats"] is not None]
        traffic: Traffic = {}
        for i, d in enumerate(drained):
            for key, (count, nbytes) in d["traffic"].items():
                add_traffic(traffic, key, count, nbytes)
            if self.trace is not None and d["trace"]:
                self.trace.write(d["trace"])
            for r, state in d["saved"]:
                self._partial.setdefault(r, {})[i] = state
        complete = [r for r, got in self._partial.items()
                    if len(got) == len(self.actors)]
        if complete:
            r = max(complete)
            got = self._partial[r]
            self.checkpoint = (r, [got[i] for i in range(len(self.actors))])
            self._partial = {k: v for k, v in self._partial.items() if k > r}
        stats = merge_stats(parts)
        stats.latency, stats.staleness = {}, {}
        for d in drained:
            for pair, (count, nbytes) in d["pairs"].items():
                add_traffic(stats.pairs, pair, count, nbytes)
                add_traffic(self.pairs, pair, count, nbytes)
            for edge, samples in d["latency"].items():
                stats.latency.setdefault(edge, []).extend(samples)
            for edge, age in d["staleness"].items():
                stats.staleness[edge] = max(stats.staleness.get(edge, 0), age)
            for key, n in d["calls"].items():
                self.calls[key] += n
        # drained one actor after another, so a call may count as received
        # before its sending was counted: never below zero
        in_flight = max(self.calls["sent"] - self.calls["received"], 0)
        self.max_in_flight = max(self.max_in_flight, in_flight)
        stats.actors_alive = len(drained)
        rounds = min(d["round"] for d in drained)
        if self.observer is not None and parts:
            # a recovery rolls the actors back; the run's progress never does
            self._reported = max(self._reported, rounds)
            self.observer(self._reported, stats, traffic)
        change = stats.max_change if len(parts) == len(drained) else float("inf")
        return rounds, change

    def run(
        self, rounds: int, tol: float | None = None, min_rounds: int = MIN_ROUNDS
    ) -> RunResult:
        """Advance ``rounds`` rounds (or to ``tol``). An actor that dies is
        replaced and every block rolls back to the last complete checkpoint; the
        run then goes on to the result an uninterrupted run would give."""
        start, base = time.perf_counter(), self.rounds
        end, first_check = base + rounds, base + min_rounds
        # a checkpoint at the start: recovery never rolls back past this run
        self.checkpoint, self._partial = (base, self._states()), {}
        lost: ActorLost | None = None
        for attempt in range(self.max_recoveries + 1):
            try:
                # a recovery that loses an actor again counts as one more attempt
                if lost is not None:
                    self._recover(lost)
                results = self._run_once(end, tol, first_check)
                break
            except ActorLost as exc:
                if attempt == self.max_recoveries:
                    raise RunError(f"{exc}; gave up after {attempt} recoveries") \
                        from None
                lost = exc
        stats = merge_stats([r["stats"] for r in results if r["stats"] is not None])
        if self._free_running():
            # async actors end at slightly different rounds: label them alike
            final = max(r["round"] for r in results)
            self._get([self._submit(a, "set_round", final) for a in self.actors])
            # the rule stopped the run on the changes it saw; the rounds the
            # actors took while the stop reached them may end a hair above tol
            stopped = self._stopped_at
            converged = stopped is not None or (tol is not None
                                                and stats.max_change < tol)
            final_change = stats.max_change if stopped is None else stopped
            energy = stats.energy
        else:
            final = results[0]["round"]
            converged = bool(results[0]["converged"])
            final_change = results[0].get("final_change", stats.max_change)
            energy = results[0].get("energy", stats.energy)
        self.rounds = final
        # the final states are also the checkpoint an actor lost before the next
        # run is restored from
        states = self._states()
        self.checkpoint = (final, states)
        return RunResult(
            stalks=self._stalks_of(states), model=self._model_of(states),
            rounds=final - base,
            converged=converged, final_change=final_change, energy=energy,
            discord=dict(stats.discord), flips=sum(stats.flips.values()),
            seconds=time.perf_counter() - start,
        )

    def _run_once(self, end: int, tol: float | None, first_check: int) -> list[dict]:
        import ray

        if self.exchange == "compiled":
            return self._run_compiled(end, tol, first_check)
        refs = [self._submit(a, "run", end, tol, first_check) for a in self.actors]
        free = self._free_running()
        self._stopped_at = None  # the change the tolerance stopped on, if it did
        poll = ASYNC_POLL_SECONDS if (free and tol is not None) else REPORT_SECONDS
        pending, last_round, last_progress = list(refs), -1, time.monotonic()
        next_report, stopped = 0.0, False
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll)
            if pending and any("failed" in r for r in self._get(ready)):
                # a block gave up: the others wait for its messages, so stop them
                for a in self.actors:
                    self._submit(a, "abort", NEIGHBOUR_FAILED)
            now = time.monotonic()
            if now < next_report and pending and not (free and tol is not None):
                continue
            reached, change = self._report()
            next_report = now + REPORT_SECONDS
            if (free and tol is not None and not stopped and reached >= first_check
                    and change < tol):
                self._get([self._submit(a, "stop") for a in self.actors])
                stopped, self._stopped_at = True, change
            if reached > last_round:
                last_round, last_progress = reached, now
            elif pending and now - last_progress > STALL_SECONDS:
                for a in self.actors:
                    self._submit(a, "abort", "the driver saw no progress")
                raise RunError(f"ray: no actor advanced past round {reached} in "
                               f"{STALL_SECONDS:.0f}s")
        results = self._get(refs)
        self._report()
        failed = [r for r in results if "failed" in r]
        if failed:
            # the cause, not the echo: a divergence, else the block that failed
            # first rather than those the driver stopped because of it
            def rank(r: dict) -> int:
                if r["failed"] == "diverged":
                    return 0
                return 2 if r["error"] in DRIVER_ABORTS else 1

            first = min(failed, key=rank)
            if first["failed"] == "diverged":
                # the actor's round is the round whose step diverged
                raise divergence_error(self.problem, first["round"],
                                       first.get("energy", float("nan")))
            raise RunError(first["error"])
        return results

    # ------------------------------------------------- exchange "compiled"

    def _graph(self):
        """The compiled graph of one sync round, built on first use and kept
        across runs: block i's call to block j feeds j's step."""
        if self._dag is None:
            from ray.dag import InputNode, MultiOutputNode

            expect = [p["expect"] for p in self.placement]
            with InputNode() as t:
                calls = {(i, j): self.actors[i].cg_send.bind(j, t)
                         for j, sources in enumerate(expect) for i in sources}
                steps = [a.cg_step.bind(t, *[calls[(i, j)] for i in expect[j]])
                         for j, a in enumerate(self.actors)]
                self._dag = MultiOutputNode(steps).experimental_compile(
                    _submit_timeout=CALL_TIMEOUT,
                    _max_inflight_executions=COMPILED_IN_FLIGHT)
            log.debug("ray engine: compiled the graph of a round, %d calls",
                      len(calls))
        return self._dag

    def _drop_graph(self) -> None:
        if self._dag is not None:
            dag, self._dag = self._dag, None
            # Ray logs a traceback when an actor of the graph is already gone;
            # that loss is reported (and recovered from) by the engine
            ray_log = logging.getLogger("ray.dag.compiled_dag_node")
            level = ray_log.level
            ray_log.setLevel(logging.CRITICAL)
            try:
                dag.teardown()
            except Exception as exc:  # an actor lost with it: nothing to free
                log.debug("ray engine: tearing down the graph: %s", one_line(exc))
            finally:
                ray_log.setLevel(level)

    def _run_compiled(self, end: int, tol: float | None, first_check: int
                      ) -> list[dict]:
        """Sync rounds as executions of the compiled graph, a few in flight.
        The driver reads each round's largest change in order, so it stops on
        the tolerance at the same round as the actors' own loop; the blocks
        then roll back over the rounds already in flight."""
        keep = COMPILED_IN_FLIGHT + 1 if tol is not None else 0
        self._get([self._submit(a, "cg_begin", keep) for a in self.actors])
        t, stop = self.rounds, (self.rounds, False, float("inf"), float("nan"))
        queued: deque = deque()
        next_report = time.monotonic() + REPORT_SECONDS
        try:
            dag = self._graph()
            while t < end or queued:
                while t < end and len(queued) < COMPILED_IN_FLIGHT:
                    t += 1
                    queued.append((t, dag.execute(t)))
                s, ref = queued.popleft()
                parts = self._compiled_get(ref, s)
                change = max(c for c, _ in parts)
                energy = sum(e for _, e in parts)
                stop = (s, False, change, energy)
                if tol is not None and s >= first_check and change < tol:
                    stop = (s, True, change, energy)
                    for r, later in queued:  # in flight: finish, then roll back
                        self._compiled_get(later, r)
                    break
                if time.monotonic() >= next_report:
                    self._report()
                    next_report = time.monotonic() + REPORT_SECONDS
        except BaseException:
            self._drop_graph()  # a failed execution leaves the graph unusable
            raise
        s, converged, change, energy = stop
        ends = self._get([self._submit(a, "cg_end", s) for a in self.actors])
        self._report()
        return [{**e, "converged": converged, "final_change": change,
                 "energy": energy} for e in ends]

    def _compiled_get(self, ref, round_: int) -> list[tuple[float, float]]:
        import ray

        try:
            return ray.get(ref, timeout=CALL_TIMEOUT)
        except (ray.exceptions.RayChannelTimeoutError,
                ray.exceptions.GetTimeoutError):
            raise RunError(f"ray: round {round_} of the compiled graph did not end "
                           f"within {CALL_TIMEOUT:.0f}s") from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DivergenceError):
                raise divergence_error(self.problem, round_, cause.args[1]) \
                    from None
            raise RunError(one_line(cause if cause is not None else exc)) from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as exc:
            raise ActorLost(f"ray: an actor died ({exc.__class__.__name__})") \
                from None

    def _recover(self, cause: Exception) -> None:
        """Replace dead actors and roll every block back to the checkpoint."""
        r, states = self.checkpoint
        self.generation += 1
        self.recoveries += 1
        log.warning("%s; recovering from the checkpoint of round %d", cause, r)
        lost = self._replace_lost("recovering from a lost actor")
        if self.observer is not None:  # the gauge of actors alive shows the loss
            self.observer(self._reported,
                          RoundStats(actors_alive=len(self.actors) - lost), {})
        self._get([self._submit(a, "restore", r, states[i], self.generation)
                   for i, a in enumerate(self.actors)])
        self.placement = self._connect()
        self.rounds, self._partial = r, {}

    def _replace_lost(self, reason: str) -> int:
        """Stop every actor's run with ``reason``; start again, with the problem's
        initial block, those that do not answer. Returns how many were lost."""
        import ray

        lost = []
        for i, a in enumerate(self.actors):
            try:
                ray.get(self._submit(a, "abort", reason), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                lost.append(i)
        for i in lost:
            ray.kill(self.actors[i])
            self.actors[i] = self._spawn(i)
        return len(lost)

    def _free_running(self) -> bool:
        """Whether the actors run without the exact sync protocol."""
        return self.mode == "async" or self.local_steps > 1

    def _states(self) -> list[dict]:
        """Every block's snapshot. Between runs, an actor found dead is replaced
        from the checkpoint, when that holds the current round."""
        try:
            return self._get([self._submit(a, "state") for a in self.actors])
        except ActorLost as exc:
            if self.checkpoint is None or self.checkpoint[0] != self.rounds:
                raise
            self._recover(exc)
            return self._get([self._submit(a, "state") for a in self.actors])

    def stalks(self) -> dict[str, np.ndarray]:
        return self._stalks_of(self._states())

    def set_stalks(self, stalks: dict[str, np.ndarray]) -> None:
        stalks = split_stalks(self.work.graph, stalks)

        def put():
            self._get([self._submit(a, "set_stalks", {v: stalks[v] for v in vs})
                       for a, vs in zip(self.actors, self.blocks, strict=True)])

        try:
            put()
        except ActorLost as exc:
            if self.checkpoint is None or self.checkpoint[0] != self.rounds:
                raise
            self._recover(exc)
            put()
        # new stalks at the same round: what a lost actor is restored to
        self.checkpoint = (self.rounds, self._states())

    def model(self) -> MLP:
        return self._model_of(self._states())

    def _stalks_of(self, states: list[dict]) -> dict[str, np.ndarray]:
        out = {}
        for state in states:
            out.update(state["stalks"])
        return join_stalks(self.work.graph, out)

    def _model_of(self, states: list[dict]) -> MLP:
        maps = {}
        for state in states:
            maps.update(state["maps"])
        return join_maps(self.work.graph, self.problem.model, maps)

    def close(self) -> None:
        import ray

        self._drop_graph()
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if getattr(self, "group", None) is not None:
            ray.util.remove_placement_group(self.group)
            self.group = None
        if self.trace is not None:
            self.trace.close()
