"""The vectorised node model: per-request queues of a batch of edge meshes, stepped at once.

Each request is sampled individually (class, then clipped-normal CPU and RAM), exactly as in
the DFaaS reference, yet no Python loop runs over environments, nodes or requests. The
order of a step, per node, is the reference's:

(a) scan the old queue first-fit: every request that still fits this step's remaining CPU
    and RAM is processed, the rest keep their place (small requests may overtake);
(b)+(c) the new *stream* (local requests per service, then forwarded ones by neighbour slot
    and service): while the queue is empty, requests are processed as long as they fit; the
    first that does not fit opens the queue, later ones are queued while there is room, and
    the rest are rejected (local queue-full rejects, or forward rejects of the sender).
    Scenarios with ``arrivals: interleaved`` mix the stream's segments evenly instead.

How it is vectorised:

* A node's queue (a *lane*) is one row of a ``(fields, B*N, 2Q)`` float32 array: ``Q`` slots,
  then ``Q`` slots of padding. Slots past the end of a queue hold +inf sizes, so cumulative
  sums and "fits" tests need no validity mask (an empty slot never fits), and a row read
  from any start within its queue is a window of the flat buffer that ends in +inf.
* First-fit over the queue is a cumulative-sum prefix (found by binary search), then a short
  "tail" loop over the few lanes that still have a fitting request; each tail round
  processes one request in every such lane, so rounds are bounded by the tail length, not by
  requests. The served prefix is dropped by gathering each row's window from its first
  unserved slot; only tail lanes are compacted.
* The stream is only materialised where it matters: the prefix that may be processed (in
  lanes whose queue emptied) and the requests that enter the queue. Rejected requests are
  counted per segment by interval arithmetic and never sampled. The window's draws past the
  first misfit were never observed, so they become the sizes of the requests queued there
  (the misfit keeps its observed size); only queued requests outside any window are drawn
  when they enter the queue.
* Request sizes do not depend on the state, so they are drawn ahead of need on a worker
  thread (:class:`DrawAhead`) while this thread steps the queues.
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from policies.topology import Topology

LATENCY_BINS_MS = np.concatenate([[0.0], np.geomspace(1.0, 3.6e6, 255)])
"""Histogram edges for per-request latency (1 ms .. 1 h, log-spaced)."""


def hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """Quantile ``q`` of latency histograms over LATENCY_BINS_MS (last axis), read as the
    upper edge of the bin it falls in (conservative); NaN where a histogram is empty."""
    cdf = np.cumsum(hist, axis=-1)
    total = cdf[..., -1:]
    idx = (cdf < q * np.maximum(total, 1)).sum(axis=-1)
    upper = np.concatenate([LATENCY_BINS_MS[1:], [LATENCY_BINS_MS[-1]]])
    return np.where(total[..., 0] > 0, upper[np.minimum(idx, len(upper) - 1)], np.nan)


Sizes = tuple[np.ndarray, ...]
"""CPU, then (unless not wanted) RAM of a batch of requests."""
Draw = Callable[[np.random.Generator, int], Sizes]
"""``draw(rng, n)``: the sizes of ``n`` fresh requests."""

_worker: ThreadPoolExecutor | None = None


def _draw_worker() -> ThreadPoolExecutor:
    """One shared worker thread: draws are cheap to queue, and one thread per environment
    batch would oversubscribe a small machine."""
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-sizes")
    return _worker


def _settle_before_fork() -> None:
    """Finish every block being drawn before a fork: the child must not inherit a generator
    the worker is in the middle of using, nor wait for blocks no thread of its will draw."""
    for stream in list(_live_streams):
        stream.settle()


def _forget_worker() -> None:
    """A forked child has no worker thread, only its parent's handle: start afresh."""
    global _worker
    _worker = None


_live_streams: weakref.WeakSet[_Stream] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_settle_before_fork, after_in_child=_forget_worker)


@contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Run torch ops on this thread only. The second core draws request sizes; an OpenMP
    team fighting that worker for it costs far more than it gains (a 2M-element cumsum
    takes ~5x longer on two busy cores than on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DrawAhead:
    """Seeded streams of request sizes, one per service, drawn ahead on a worker thread.

    Drawing about a million clipped normals a step is a large share of a step, and the
    numbers depend on nothing but the seed, so a second core can produce them while the
    first one steps the queues. Each stream's blocks are drawn by one generator in order and
    handed out in order, so a seed fixes every number whatever the thread timing.
    """

    BLOCK = 1 << 20

    def __init__(self, seed: int):
        self.seed = seed
        self._streams: dict[tuple[int, ...], _Stream] = {}

    def take(self, key: tuple[int, ...], n: int, draw: Draw) -> Sizes:
        """The next ``n`` draws of stream ``key``; ``draw(rng, n)`` produces new ones."""
        stream = self._streams.get(key)
        if stream is None:
            seeds = np.random.SeedSequence(self.seed, spawn_key=key)
            rng = np.random.Generator(np.random.SFC64(seeds))  # fast, with good statistics
            stream = self._streams[key] = _Stream(rng, draw)
        return stream.take(n)


class _Stream:
    """Ready blocks plus blocks being drawn, topped up to twice the largest request seen."""

    def __init__(self, rng: np.random.Generator, draw: Draw):
        self.rng, self.draw = rng, draw
        self.ready: deque[Sizes] = deque()
        self.ready_n = 0
        self.pending: deque[tuple[int, Future]] = deque()
        self.pending_n = 0
        self.ahead = 0
        _live_streams.add(self)

    def take(self, n: int) -> Sizes:
        """The next ``n >= 1`` draws."""
        self.ahead = max(self.ahead, 2 * n)
        self._top_up(n)
        while self.ready_n < n:
            self._collect()
        parts: list[Sizes] = []
        left = n
        while left:
            block = self.ready[0]
            if len(block[0]) <= left:
                parts.append(self.ready.popleft())
                left -= len(block[0])
            else:
                parts.append(tuple(x[:left] for x in block))
                self.ready[0] = tuple(x[left:] for x in block)
                left = 0
        self.ready_n -= n
        self._top_up(0)
        if len(parts) == 1:  # within one block: views, no copy
            return parts[0]
        return tuple(np.concatenate(x) for x in zip(*parts, strict=True))

    def settle(self) -> None:
        """Wait for every block being drawn."""
        while self.pending:
            self._collect()

    def _collect(self) -> None:
        count, future = self.pending.popleft()
        self.pending_n -= count
        self.ready.append(future.result())
        self.ready_n += count

    def _top_up(self, need: int) -> None:
        """Queue blocks until ``need`` and the look-ahead are covered. Only the worker touches
        the generator, one block after the other, so the order of draws is fixed."""
        missing = max(need, self.ahead) - self.ready_n - self.pending_n
        while missing > 0:
            count = min(DrawAhead.BLOCK, max(missing, DrawAhead.BLOCK // 4))
            self.pending.append((count, _draw_worker().submit(self.draw, self.rng, count)))
            self.pending_n += count
            missing -= count


@dataclass(frozen=True)
class RequestTables:
    """Per-service class mixture of request sizes, as ``(S, C)`` arrays."""

    class_cdf: np.ndarray
    cpu: np.ndarray  # (4, S, C): min, mean, max, std
    ram: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_ram", float(self.ram[2].max()))
        object.__setattr__(self, "spread", [self._shared_spread(t) for t in (self.cpu, self.ram)])

    def _shared_spread(self, table: np.ndarray) -> list[tuple[np.float32, ...] | None]:
        """Per service: ``(std, low, high)`` in standard units if its classes differ only by
        their mean (as the reference's do), else None. Then a size is ``mean[class] + std *
        clip(z, low, high)``: one gather per request instead of four."""
        out: list[tuple[np.float32, ...] | None] = []
        weights = np.diff(self.class_cdf, axis=1, prepend=0.0) > 0  # padded classes: 0
        for service, real in enumerate(weights):
            low, mean, high, std = table[:, service, real]
            scale = np.where(std > 0, std, 1)
            shape = np.stack([std, (low - mean) / scale, (high - mean) / scale])
            shared = (std > 0).all() and (shape == shape[:, :1]).all()
            out.append(tuple(shape[:, 0]) if shared else None)
        return out

    @classmethod
    def from_services(cls, services) -> RequestTables:
        c = max(len(s.classes) for s in services)
        cdf = np.ones((len(services), c))
        cpu = np.zeros((4, len(services), c), dtype=np.float32)
        ram = np.zeros_like(cpu)
        for i, svc in enumerate(services):
            w = np.array([k.weight for k in svc.classes], dtype=float)
            cdf[i, : len(w)] = np.cumsum(w) / w.sum()
            for j, k in enumerate(svc.classes):
                cpu[:, i, j] = (k.cpu.min, k.cpu.mean, k.cpu.max, k.cpu.std)
                ram[:, i, j] = (k.ram.min, k.ram.mean, k.ram.max, k.ram.std)
        return cls(class_cdf=cdf, cpu=cpu, ram=ram)

    def sample(
        self, gen: DrawAhead, service: np.ndarray, ram: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """CPU and RAM of ``len(service)`` requests of the given services, in order; with
        ``ram=False`` only CPU (RAM None), for requests whose RAM can never matter.

        Each service (and kind) has its own seeded stream of draws, handed out in order."""
        num_services = self.class_cdf.shape[0]
        if num_services == 1 and len(service):
            sizes = gen.take((0, ram), len(service), self._drawer(0, ram))
        else:
            sizes = tuple(np.empty(len(service), np.float32) for _ in range(1 + ram))
            for s in range(num_services):
                mine = service == s
                count = int(np.count_nonzero(mine))
                if count:
                    drawn = gen.take((s, ram), count, self._drawer(s, ram))
                    for out, values in zip(sizes, drawn, strict=True):
                        out[mine] = values
        return sizes[0], sizes[1] if ram else None

    def _drawer(self, service: int, ram: bool) -> Draw:
        return lambda rng, n: self.draw(rng, service, n, ram)

    def draw(self, rng: np.random.Generator, service: int, n: int, ram: bool = True) -> Sizes:
        """``n`` fresh requests of one service: class by inverse CDF, then clipped normals.

        The normals come from Box-Muller pairs (exactly two independent standard normals
        each: CPU and RAM of one request, or the CPU of two), cheaper than numpy's float32
        ziggurat."""
        pairs = n if ram else (n + 1) // 2
        u = rng.random(n + 2 * pairs, dtype=np.float32)
        klass = np.zeros(n, np.intp)
        for threshold in self.class_cdf[service, :-1].astype(np.float32):
            klass += u[:n] >= threshold
        radius = np.sqrt(np.log1p(-u[n : n + pairs]) * np.float32(-2.0))
        angle = u[n + pairs :] * np.float32(2.0 * np.pi)
        normals = (radius * np.cos(angle), radius * np.sin(angle))
        if not ram:
            normals = (np.concatenate(normals)[:n],)
        sizes = []
        for table, spread, z in zip((self.cpu, self.ram), self.spread, normals, strict=False):
            if spread[service] is not None:
                std, low, high = spread[service]
                np.clip(z, low, high, out=z)
                z *= std
                z += table[1, service].take(klass)
                sizes.append(z)
                continue
            low, mean, high, std = (table[i, service].take(klass) for i in range(4))
            z *= std
            z += mean
            np.maximum(z, low, out=z)  # not np.clip: with array bounds it is much slower
            sizes.append(np.minimum(z, high, out=z))
        return tuple(sizes)


@dataclass
class StepOutcome:
    """What happened in one step, per environment (leading axis B)."""

    processed: np.ndarray  # (B, N) requests completed at each node
    local_rejects: np.ndarray  # (B, N, S) local requests refused for a full queue
    forward_rejects: np.ndarray  # (B, N, K, S) own forwards refused by the neighbour in slot k
    queue_length: np.ndarray  # (B, N) at the end of the step
    cpu_used: np.ndarray  # (B, N)
    latency_sum_ms: np.ndarray | None = None  # (B, A) by the agent that routed the request
    latency_count: np.ndarray | None = None  # (B, A)
    latency_hist: np.ndarray | None = None  # (B, bins)
    server: ServerStats | None = None  # by serving node, with ``track_servers``


@dataclass
class ServerStats:
    """What each serving node saw, by service: requests arriving (local and forwarded),
    refused for a full queue, and latency at the node (queueing and service, no link). This
    is what a mesh's destination-side metrics report, and what a model of each node's
    behaviour is fitted to."""

    incoming: np.ndarray  # (B, N, S)
    rejected: np.ndarray  # (B, N, S)

    sum_ms: np.ndarray  # (B, N, S)
    count: np.ndarray  # (B, N, S)
    hist: np.ndarray  # (B, N, S, bins) over LATENCY_BINS_MS
    service_hist: np.ndarray  # (B, S, bins) client-perceived (with the link), per service


def ragged_index(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Flat indices ``start[i] + 0 .. start[i] + count[i] - 1`` for every ``i``, in order:
    the positions of a ragged batch of runs, without a mask over the padded array."""
    total = int(count.sum())
    first = np.cumsum(count) - count
    return np.repeat(start - first, count) + np.arange(total)


class NodeModel:
    """Queues and resources of ``num_envs`` copies of a mesh; :meth:`step` advances all of them."""

    def __init__(
        self,
        topology: Topology,
        tables: RequestTables,
        num_envs: int,
        queue_slots: int,
        rng: np.random.Generator,
        step_seconds: float = 300.0,
        track_latency: bool = False,
        chunk: int = 32,
        ram_floor: float | None = None,
        track_servers: bool = False,
        interleaved: bool = False,
        track_origins: bool = False,
    ):
        """``ram_floor``, the least RAM any active node will have, lets the model drop
        queued requests' RAM altogether when a full queue of the largest requests fits in
        it: RAM can then never bind in a queue (``None``: always keep it). The new requests
        of a step are then checked against the node's whole RAM, not what the queue left of
        it, so a queue and new requests together can use up to twice a node's RAM in one
        step. In the reference, as measured, RAM never binds (CPU does, at 64.5 requests a
        step, against 8,000 MB of RAM for requests of at most 75 MB), and checking it
        exactly would draw every request's RAM and so change the reference's random streams.
        ``track_servers`` adds per-node latency histograms (:class:`ServerLatency`): cheap
        for a few environments, too much for training batches, hence optional.
        ``interleaved`` mixes the stream's segments evenly (:class:`_Interleaved`) instead
        of the reference's segment order. ``track_origins`` keeps each queued request's
        sender even without a latency model, so that a failing node's queue is charged to
        the agents that filled it."""
        self.topo = topology
        self.tables = tables
        self.B, self.N, self.S, self.K = (
            num_envs,
            topology.num_nodes,
            topology.num_services,
            topology.max_degree,
        )
        self.L = self.B * self.N
        self.A = self.N * self.S
        self.Q = max(int(queue_slots), 1)
        self.reseed(rng)
        self.step_ms = 1000.0 * step_seconds
        self.track_latency = track_latency or track_servers
        self.track_servers = track_servers
        self.chunk = chunk
        g = self.S * (1 + self.K)
        seg = np.arange(g)
        self.seg_service = seg % self.S
        # Segment g = (slot, service) with slot 0 the node itself, then its neighbour slots.
        self_and_neighbours = np.concatenate(
            [np.arange(self.N)[:, None], topology.neighbour_safe], axis=1
        )
        origin_node = self_and_neighbours[:, seg // self.S]
        self.seg_agent = origin_node * self.S + self.seg_service[None, :]  # (N, G)
        self.seg_link_ms = topology.link_matrix[origin_node, np.arange(self.N)[:, None]]
        self.agent_node = np.arange(self.A) // self.S
        # Per-request origin, service and birth step matter only with several services, a
        # latency model or nodes that fail; the reference scenario has none of them, so it
        # skips that bookkeeping.
        self.interleaved = interleaved
        self.needs_metadata = self.track_latency or self.S > 1 or interleaved or track_origins
        self.keeps_ram = ram_floor is None or self.Q * tables.max_ram > ram_floor
        self.fields = ("cpu",) + ("ram",) * self.keeps_ram
        self.size_fields = len(self.fields)  # +inf past a queue's end; metadata stays finite
        if self.needs_metadata:
            self.fields += ("born", "agent", "arrival_ms")
        self.reset()

    def reseed(self, rng: np.random.Generator) -> None:
        """Derive the request-size streams from the environment's numpy generator."""
        self.rng = rng
        self.gen = DrawAhead(int(rng.integers(0, 2**63 - 1)))

    def reset(self) -> None:
        # Each queue row has Q slots plus Q slots of padding (+inf sizes, forever), so any
        # row read from any start within its queue runs into +inf, never into the next row.
        shape = (len(self.fields), self.L, 2 * self.Q)
        self._queue = np.zeros(shape, np.float32)
        self._queue[: self.size_fields] = np.inf
        self._spare = self._queue.copy()
        self._cum = torch.empty((self.L, self.Q))
        self.q_len = np.zeros((self.B, self.N), np.int64)

    # Views of the queues as (B, N, Q), for tests and readers.
    def _field(self, name: str) -> np.ndarray:
        return self._queue[self.fields.index(name), :, : self.Q].reshape(self.B, self.N, self.Q)

    q_cpu = property(lambda self: self._field("cpu"))

    def queued_work(self) -> np.ndarray:
        """``(B, N)`` CPU work waiting in each queue (the padding past a queue's end is +inf)."""
        cpu = self.q_cpu
        return np.where(np.isfinite(cpu), cpu, 0.0).sum(axis=-1)

    q_ram = property(lambda self: self._field("ram") if self.keeps_ram else None)
    q_born = property(lambda self: self._field("born"))
    q_agent = property(lambda self: self._field("agent"))
    q_arrival_ms = property(lambda self: self._field("arrival_ms"))

    def queued_by_agent(self, nodes: np.ndarray) -> np.ndarray | None:
        """``(B, A)`` requests queued at ``nodes`` (bool ``(N,)``) by the agent that sent
        them; None where requests carry no origin (see ``track_origins``)."""
        if not self.needs_metadata:
            return None
        queued = np.isfinite(self.q_cpu) & nodes[None, :, None]
        env = np.broadcast_to(np.arange(self.B)[:, None, None], queued.shape)[queued]
        agent = self.q_agent[queued].astype(np.int64)
        return np.bincount(env * self.A + agent, minlength=self.B * self.A).reshape(self.B, -1)

    def restart_clock(self, steps: int) -> None:
        """Step numbers restart from 0 ``steps`` after the last start: a queued request's
        birth step moves back by as much, so its wait stays the time it has queued."""
        if self.needs_metadata:
            self._queue[self.fields.index("born")] -= steps

    def drop_queues(self, nodes: np.ndarray) -> np.ndarray:
        """Empty the queues of failed nodes (bool ``(N,)``); returns requests lost ``(B, N)``."""
        lost = np.where(nodes[None, :], self.q_len, 0)
        self.q_len = np.where(nodes[None, :], 0, self.q_len)
        self._queue[: self.size_fields, np.tile(nodes, self.B)] = np.inf
        return lost

    def _sample(self, service: np.ndarray, ram: bool = True):
        """Sizes of requests at these services; RAM only if asked (which happens only when
        ``ram_floor`` shows that queues never need it)."""
        if ram:
            return self.tables.sample(self.gen, service)
        return self.tables.sample(self.gen, service, ram=False)

    # ------------------------------------------------------------------------------------
    def step(
        self,
        t: int,
        local: np.ndarray,
        forward: np.ndarray,
        cpu_cap: np.ndarray,
        ram_cap: np.ndarray,
        queue_cap: np.ndarray,
        active: np.ndarray,
    ) -> StepOutcome:
        """Advance one step.

        ``local`` ``(B, N, S)`` and ``forward`` ``(B, N, K, S)`` are request counts decided by
        the agents; ``cpu_cap``, ``ram_cap``, ``queue_cap``, ``active`` are ``(N,)`` for this step.
        """
        with _single_threaded_torch():
            return self._step(t, local, forward, cpu_cap, ram_cap, queue_cap, active)

    def _step(self, t, local, forward, cpu_cap, ram_cap, queue_cap, active) -> StepOutcome:
        B, N, S, K = self.B, self.N, self.S, self.K
        lane_cpu = np.tile(np.asarray(cpu_cap, np.float32), B)
        lane_ram = np.tile(np.asarray(ram_cap, np.float32), B)
        # The new stream per lane: local, then forwarded by neighbour slot, as segments.
        incoming = self.topo.other_end(forward)
        seg_n = np.concatenate([local, incoming.reshape(B, N, K * S)], axis=-1)
        seg_n = seg_n.reshape(self.L, -1)
        seg_end = np.cumsum(seg_n, axis=-1)
        total = seg_end[:, -1]
        order = _Interleaved if self.interleaved else _Segments
        stream = order(seg_n, seg_end) if self.needs_metadata else None
        lat = (
            _LatencyAccumulator(B, N, S, stream, self.track_servers) if self.track_latency else None
        )

        # (a) first-fit scan of the old queue, which then keeps only what was not served.
        processed, rem_cpu, rem_ram = self._serve_queue(lane_cpu, lane_ram, lat, t)
        q_len = self.q_len.reshape(-1) - processed

        # (b)+(c) the stream is served while it fits where the queue emptied, then queued.
        room = np.maximum(np.tile(queue_cap, B) - q_len, 0)
        empty = (q_len == 0) & np.tile(active, B) & (total > 0)
        prefix, prefix_cpu, reused = self._serve_stream(
            np.flatnonzero(empty), total, stream, rem_cpu, rem_ram, room, lane_cpu, lat
        )
        processed += prefix

        queued = np.clip(total - prefix, 0, room)
        reject_from = prefix + queued
        if stream is not None:
            rejected = stream.from_position(reject_from)
        else:
            rejected = _Segments.count_from(seg_n, seg_end, reject_from)
        self._append(t, q_len, queued, prefix, stream, reused)
        self.q_len = (q_len + queued).reshape(B, N)

        out = StepOutcome(
            processed=processed.reshape(B, N),
            local_rejects=rejected[:, :S].reshape(B, N, S),
            forward_rejects=self.topo.other_end(rejected[:, S:].reshape(B, N, K, S)),
            queue_length=self.q_len,
            cpu_used=(np.maximum(lane_cpu - rem_cpu, 0.0) + prefix_cpu).reshape(B, N),
        )
        if lat is not None:
            out.latency_sum_ms, out.latency_count, out.latency_hist = lat.result()
            if self.track_servers:
                out.server = lat.server_result(
                    seg_n.reshape(B, N, 1 + K, S).sum(axis=2),
                    rejected.reshape(B, N, 1 + K, S).sum(axis=2),
                )
        return out

    # ------------------------------------------------------------------------------------
    def _serve_queue(self, cap_cpu: np.ndarray, cap_ram: np.ndarray, lat, t: int):
        """First-fit over each queue, then drop the served requests keeping the order.

        Returns requests served per lane and the CPU and RAM left for the new stream."""
        Q = self.Q
        queue = torch.from_numpy(self._queue)
        cum_cpu = torch.cumsum(queue[0, :, :Q], 1, out=self._cum)  # +inf past each end
        served = torch.searchsorted(cum_cpu, torch.from_numpy(cap_cpu)[:, None], right=True)
        # RAM can only bind if a full queue of the largest requests exceeds a node's RAM; when
        # it provably cannot (the reference: 100 x 75 MB <= 8000 MB) the check is skipped.
        ram_binds = Q * self.tables.max_ram > cap_ram[cap_ram > 0].min(initial=np.inf)
        if ram_binds and not self.keeps_ram:
            raise ValueError("RAM fell below the model's ram_floor")
        if ram_binds:
            cum_ram = torch.cumsum(queue[1, :, :Q], 1)
            served_ram = torch.searchsorted(cum_ram, torch.from_numpy(cap_ram)[:, None], right=True)
            served = torch.minimum(served, served_ram)
        last = (served - 1).clamp_(min=0)
        served = served[:, 0].numpy()
        rem_cpu = cap_cpu - np.where(served > 0, cum_cpu.gather(1, last)[:, 0].numpy(), 0)
        rem_ram = cap_ram.copy()
        if ram_binds:
            rem_ram -= np.where(served > 0, cum_ram.gather(1, last)[:, 0].numpy(), 0)

        # Drop the served prefix: the new row l is old row l read from slot served[l]. Rows
        # are windows of the flat buffer, so this is one row gather (no per-slot index), and
        # only as wide as the longest remaining queue; past it the new rows are +inf.
        width = int((self.q_len.reshape(-1) - served).max(initial=0))
        start = torch.from_numpy(np.arange(self.L) * (2 * Q) + served)
        spare = torch.from_numpy(self._spare)
        for field in range(len(self.fields) if width else 0):
            rows = queue[field].view(-1).unfold(0, width, 1)
            torch.index_select(rows, 0, start, out=spare[field, :, :width])
        spare[: self.size_fields, :, width:Q] = np.inf
        self._queue, self._spare = self._spare, self._queue

        # The tail: later requests that fit what the prefix left, taken one per round.
        tail_served, tail_log = self._serve_tail(
            width, rem_cpu, rem_ram if ram_binds else None, cap_cpu, lat
        )
        if lat is not None:  # the old queue and its sums stay untouched until the next step
            self._queue_latency(lat, t, self._spare, served, cum_cpu.numpy(), cap_cpu, tail_log)
        if tail_served is not None:
            served = served + tail_served
        return served, rem_cpu, rem_ram

    def _serve_tail(self, width, rem_cpu, rem_ram, cap_cpu, lat):
        """First-fit past the prefix's misfit (slot 0 of the shifted queue, which by definition
        does not fit): each round serves the first fitting request in every lane that has
        one. Updates ``rem_cpu``/``rem_ram`` in place and compacts the affected lanes.

        Returns requests served per lane (None if no lane has a tail) and, with latency,
        ``(lane, shifted slot, CPU position)`` of each."""
        if width < 2:
            return None, None
        part = slice(1, width)
        fit = self._fit(self._queue[: self.size_fields, :, part], rem_cpu, rem_ram)
        first = fit.argmax(axis=1)
        lanes = np.flatnonzero(fit[np.arange(self.L), first])
        if not lanes.size:
            return None, None
        # Served requests become +inf in this copy of the tail lanes: they never fit again,
        # and compacting a lane is keeping its finite sizes in order.
        sizes = self._queue[: self.size_fields, lanes, part]
        rc = rem_cpu[lanes]
        rr = rem_ram[lanes] if rem_ram is not None else None
        served = np.zeros(lanes.size, np.int64)
        log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        rows, first, active = np.arange(lanes.size), first[lanes], sizes.copy()
        while rows.size:
            each = np.arange(rows.size)
            rc[rows] -= active[0, each, first]
            if rr is not None:
                rr[rows] -= active[1, each, first]
            active[:, each, first] = np.inf
            sizes[:, rows, first] = np.inf
            served[rows] += 1
            if lat is not None:
                log.append((rows, first, cap_cpu[lanes[rows]] - rc[rows]))
            # What is left only shrinks, so nothing before a served request fits any more.
            fit = self._fit(active, rc[rows], rr[rows] if rr is not None else None)
            first = fit.argmax(axis=1)
            found = fit[each, first]
            rows, first, active = rows[found], first[found], active[:, found]
        rem_cpu[lanes] = rc
        if rr is not None:
            rem_ram[lanes] = rr

        kept = sizes[0] < np.inf
        dest = np.arange(width - 1) < np.count_nonzero(kept, axis=1)[:, None]
        for field in range(len(self.fields)):
            values = sizes[field] if field < self.size_fields else self._queue[field, lanes, part]
            block = np.full(dest.shape, np.inf if field < self.size_fields else 0, np.float32)
            block[dest] = values[kept]
            self._queue[field, lanes, part] = block

        per_lane = np.zeros(self.L, np.int64)
        per_lane[lanes] = served
        if not log:
            return per_lane, None
        rows, slot, position = (np.concatenate(x) for x in zip(*log, strict=True))
        return per_lane, (lanes[rows], slot + 1, position)

    @staticmethod
    def _fit(sizes: np.ndarray, rem_cpu: np.ndarray, rem_ram: np.ndarray | None) -> np.ndarray:
        """Which requests (``sizes``: CPU, then RAM if it binds) fit what is left per row."""
        fit = sizes[0] <= rem_cpu[:, None]
        if rem_ram is not None:
            fit &= sizes[1] <= rem_ram[:, None]
        return fit

    def _queue_latency(self, lat, t, old_queue, served, cum_cpu, cap_cpu, tail_log) -> None:
        """Latency of every request served from the queue, read from its unshifted copy."""
        Q = self.Q
        old = old_queue[..., :Q].reshape(len(self.fields), self.B, self.N, Q)
        done = np.arange(Q) < served[:, None]
        position = np.where(done, cum_cpu, 0.0)
        if tail_log is not None:
            lane, slot, cpu_position = tail_log
            done[lane, served[lane] + slot] = True
            position[lane, served[lane] + slot] = cpu_position
        shape = (self.B, self.N, Q)
        done, position = done.reshape(shape), position.reshape(shape)
        agent = old[self.fields.index("agent")].astype(np.int64)
        born = old[self.fields.index("born")]
        finish = position / np.maximum(cap_cpu[: self.N], 1e-9)[:, None] * self.step_ms
        wait = (t - born) * self.step_ms + finish - old[self.fields.index("arrival_ms")]
        link = self.topo.link_matrix[self.agent_node[agent], np.arange(self.N)[:, None]]
        lat.add(done, agent, wait, link)

    def _arrival_ms(self, position: np.ndarray, total: np.ndarray) -> np.ndarray:
        """Arrival time within the step of stream ``position`` out of ``total``: a step's
        requests arrive evenly spread over it, in stream order."""
        return (position / np.maximum(total, 1) * self.step_ms).astype(np.float32)

    def _services(self, lanes: np.ndarray, position: np.ndarray, stream) -> np.ndarray:
        """Service of the request at stream ``position`` of each lane (flat arrays)."""
        if stream is None:
            return np.broadcast_to(0, position.shape)  # one service: nothing to look up
        return self.seg_service[stream.segment(lanes, position)]

    def _serve_stream(self, lanes, total, stream, rem_cpu, rem_ram, room, cap_cpu, lat):
        """In lanes whose queue emptied, process the stream while requests fit.

        The window's draws from the misfit on were never observed, so they go straight into
        the (empty) queue as the first queued requests. Returns requests served, CPU used and
        requests queued this way, per lane."""
        prefix = np.zeros(self.L, np.int64)
        prefix_used = np.zeros(self.L, np.float32)
        reused = np.zeros(self.L, np.int64)
        idle = np.full(self.L, -np.inf)
        rc, rr = rem_cpu[lanes], rem_ram[lanes]
        start = 0
        while lanes.size:
            count = np.minimum(total[lanes] - start, self.chunk)
            width = int(count.max())
            need = self._below(np.arange(width), count)
            if self.needs_metadata:
                row, col = np.nonzero(need)
                service = self._services(lanes[row], start + col, stream)
            else:
                service = np.broadcast_to(0, int(count.sum()))
            cpu, ram = self._sample(service)
            # RAM is only looked at where this window could exhaust it; queued requests keep
            # it only if RAM can bind in queues at all.
            ram_binds = width * self.tables.max_ram > rr.min()
            drawn = (cpu, ram) if ram_binds or self.keeps_ram else (cpu,)
            window = np.full((len(drawn), lanes.size, width), np.inf, np.float32)
            for field, values in enumerate(drawn):
                window[field][need] = values
            cum = torch.from_numpy(np.empty(window.shape, np.float32))
            torch.cumsum(torch.from_numpy(window), 2, out=cum)
            fit = torch.searchsorted(cum[0], torch.from_numpy(rc)[:, None], right=True)
            if ram_binds:
                fit = torch.minimum(
                    fit, torch.searchsorted(cum[1], torch.from_numpy(rr)[:, None], right=True)
                )
            k = fit[:, 0].numpy()
            last = (fit - 1).clamp_(min=0)
            used = np.where(k > 0, cum[0].gather(1, last)[:, 0].numpy(), 0)
            prefix[lanes] += k
            prefix_used[lanes] += used
            if lat is not None:
                self._stream_latency(lat, lanes, start, window[0], count, k, rc, cap_cpu, idle)

            stopped = np.flatnonzero(k < count)
            n = np.minimum(count[stopped] - k[stopped], room[lanes[stopped]])
            source = ragged_index(stopped * width + k[stopped], n)
            target = ragged_index(lanes[stopped] * (2 * self.Q), n)
            for field in range(self.size_fields):
                self._queue[field].reshape(-1)[target] = window[field].reshape(-1)[source]
            reused[lanes[stopped]] = n

            go_on = (k == width) & (start + width < total[lanes])
            if go_on.any():
                # Lanes that go on served their whole window, so used all of its RAM.
                window_ram = np.add.reduceat(ram, np.cumsum(count) - count)
                rc, rr = (rc - used)[go_on], (rr - window_ram)[go_on]
            lanes = lanes[go_on]
            start += width
        return prefix, prefix_used, reused

    def _stream_latency(self, lat, lanes, start, window, count, k, rc, cap_cpu, idle) -> None:
        """Latency of the stream requests served in this window (CPU sizes ``window``);
        ``idle`` carries each lane's running maximum of Lindley's recursion over windows."""
        width = window.shape[1]
        index = start + np.arange(width)[None, :]
        need = index - start < count[:, None]
        cpu = np.where(need, window, 0.0)
        cum_cpu = np.cumsum(cpu, axis=1)
        node = lanes % self.N
        seg = lat.stream.segment(lanes[:, None], index)
        ms_per_cpu = self.step_ms / np.maximum(cap_cpu[node], 1e-9)[:, None]
        busy_until = (cap_cpu[node] - rc)[:, None] + cum_cpu  # CPU consumed, in order
        arrival = self._arrival_ms(index, lat.stream.total[lanes][:, None])
        # Lindley's recursion as a running maximum: a request finishes when the work before
        # it is done, unless the server idled waiting for a later arrival.
        wait = np.where(need, arrival - (busy_until - cpu) * ms_per_cpu, -np.inf)
        wait = np.maximum.accumulate(np.maximum(wait, idle[lanes][:, None]), axis=1)
        idle[lanes] = wait[:, -1]
        finish = busy_until * ms_per_cpu + np.maximum(wait, 0.0)
        agent = self.seg_agent[node[:, None], seg]
        link = self.seg_link_ms[node[:, None], seg]
        lat.add_flat(lanes, agent, finish - arrival, link, index - start < k[:, None])

    def _append(self, t, q_len, queued, prefix, stream, reused) -> None:
        """Write the queued part of the stream behind the kept requests: past the ``reused``
        window draws already in place, fresh draws where no window reached."""
        fresh = self._slots(q_len + reused, q_len + queued)
        if fresh.any():
            if self.needs_metadata:
                lane, slot = np.nonzero(fresh)
                position = prefix[lane] + slot - q_len[lane]
                service = self._services(lane, position, stream)
            else:
                service = np.broadcast_to(0, int((queued - reused).sum()))
            sizes = self._sample(service, ram=self.keeps_ram)
            for field in range(self.size_fields):
                self._queue[field, :, : self.Q][fresh] = sizes[field]
        if self.needs_metadata:
            new = self._slots(q_len, q_len + queued)
            lane, slot = np.nonzero(new)
            position = prefix[lane] + slot - q_len[lane]
            seg = stream.segment(lane, position)
            field = self.fields.index
            self._queue[field("born"), :, : self.Q][new] = t
            self._queue[field("arrival_ms"), :, : self.Q][new] = self._arrival_ms(
                position, stream.total[lane]
            )
            self._queue[field("agent"), :, : self.Q][new] = self.seg_agent[lane % self.N, seg]

    def _slots(self, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
        """``(L, Q)`` mask of the queue slots ``begin <= slot < end`` of every lane."""
        slot = np.arange(self.Q)
        return ~self._below(slot, begin) & self._below(slot, end)

    def _below(self, index: np.ndarray, bound: np.ndarray) -> np.ndarray:
        """``index[None, :] < bound[:, None]``, compared in int16 when the values allow: these
        masks span every lane and slot, and narrow compares are several times faster."""
        narrow = np.int16 if self.Q < 2**15 and self.chunk < 2**15 else np.int32
        return index.astype(narrow) < bound.astype(narrow)[:, None]


class _Segments:
    """The step's stream of each lane as segments (local requests, then forwarded ones by
    neighbour slot, by service), in that order, as the reference serves them: where a stream
    position falls says who sent the request, for which service, and (with ``total``) when it
    arrived."""

    def __init__(self, seg_n: np.ndarray, seg_end: np.ndarray):
        self.n, self.end, self.total = seg_n, seg_end, seg_end[:, -1]
        self._index()

    def _index(self) -> None:
        # All lanes' ends in one sorted array: lane l's live in [l * span, l * span + total],
        # so one binary search finds a position's segment in any lane.
        self.span = int(self.total.max(initial=0)) + 1
        self.flat = (self.end + np.arange(len(self.end))[:, None] * self.span).reshape(-1)

    def segment(self, lanes: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Segment of stream ``position`` in lane ``lanes`` (broadcast together). Positions
        past a lane's stream (padding of a window) map to its last segment, so lookups stay
        in range; callers mask them out."""
        count = self.end.shape[1]
        key = lanes * self.span + np.minimum(position, self.span - 1)
        seg = np.searchsorted(self.flat, key, side="right") - lanes * count
        return np.minimum(seg, count - 1)

    def from_position(self, start: np.ndarray) -> np.ndarray:
        """``(L, G)`` requests of each segment at stream positions ``>= start`` (per lane)."""
        return self.count_from(self.n, self.end, start)

    @staticmethod
    def count_from(seg_n: np.ndarray, seg_end: np.ndarray, start: np.ndarray) -> np.ndarray:
        """:meth:`from_position` by interval arithmetic, for callers without a stream."""
        return np.clip(seg_end - np.maximum(seg_end - seg_n, start[:, None]), 0, seg_n)


class _Interleaved(_Segments):
    """The same segments, their requests arriving evenly mixed: ordered by the fraction
    ``(j + 1/2) / n`` of the step for request ``j`` of a segment of ``n`` (ties in segment
    order), then timed by their rank in that order, evenly over the step, as in order.

    Real senders do not take turns; served in segment order, the last service of a node
    would always wait behind the others' whole step and only its latency would suffer."""

    def _index(self) -> None:
        L, G = self.n.shape
        counts = self.n.reshape(-1)
        pair = np.repeat(np.arange(L * G), counts)  # lane * G + segment, in segment order
        j = np.arange(pair.size) - np.repeat(np.cumsum(counts) - counts, counts)
        # Stable: equal fractions keep segment order; the lane keeps lanes apart.
        order = np.argsort(pair // G + (j + 0.5) / counts[pair], kind="stable")
        self.merged = (pair[order] % G).astype(np.int64)
        self.lane = pair // G  # lane of each merged position (the sort keeps lanes in place)
        self.lane_start = np.cumsum(self.total) - self.total

    def segment(self, lanes: np.ndarray, position: np.ndarray) -> np.ndarray:
        if not self.merged.size:
            return np.zeros(np.broadcast(lanes, position).shape, np.int64)
        last = np.maximum(self.total[lanes] - 1, 0)
        index = self.lane_start[lanes] + np.minimum(position, last)
        return self.merged[np.minimum(index, self.merged.size - 1)]

    def from_position(self, start: np.ndarray) -> np.ndarray:
        L, G = self.n.shape
        lane = self.lane
        position = np.arange(self.merged.size) - self.lane_start[lane]
        late = position >= start[lane]
        counts = np.bincount(lane[late] * G + self.merged[late], minlength=L * G)
        return counts.reshape(L, G).astype(self.n.dtype)


class _LatencyAccumulator:
    """Per-agent latency sums and a per-environment histogram, filled with bincount; with
    ``by_server``, the same by serving node and service without the link (ServerLatency).

    It also holds the step's stream, from which a request's origin and arrival time follow."""

    def __init__(self, B: int, N: int, S: int, stream: _Segments, by_server: bool = False):
        self.B, self.N, self.S, self.A = B, N, S, N * S
        self.stream = stream
        self.sum = np.zeros(B * self.A)
        self.count = np.zeros(B * self.A)
        self.hist = np.zeros(B * len(LATENCY_BINS_MS))
        self.by_server = by_server
        if by_server:
            self.server_sum = np.zeros(B * self.A)
            self.server_count = np.zeros(B * self.A)
            self.server_hist = np.zeros(B * self.A * len(LATENCY_BINS_MS))
            self.service_hist = np.zeros(B * S * len(LATENCY_BINS_MS))

    def add(self, mask: np.ndarray, agent: np.ndarray, server_ms: np.ndarray, link_ms) -> None:
        """Requests served from the queues: arrays ``(B, N, Q)``, lanes along the first two."""
        lane = np.broadcast_to(np.arange(self.B * self.N).reshape(self.B, self.N, 1), mask.shape)
        link = np.broadcast_to(link_ms, mask.shape)
        self.add_flat(lane[mask], agent[mask], server_ms[mask], link[mask], None)

    def add_flat(self, lane, agent, server_ms, link_ms, mask) -> None:
        """Requests of ``lane`` (env * N + serving node); ``mask`` selects along a 2nd axis."""
        if mask is not None:
            lane = np.broadcast_to(lane[:, None], mask.shape)[mask]
            agent, server_ms, link_ms = agent[mask], server_ms[mask], link_ms[mask]
        env = lane // self.N
        ms = server_ms + link_ms
        key = env * self.A + agent
        self.sum += np.bincount(key, weights=ms, minlength=self.sum.size)
        self.count += np.bincount(key, minlength=self.count.size)
        bins = _bin(ms)
        self.hist += np.bincount(env * len(LATENCY_BINS_MS) + bins, minlength=self.hist.size)
        if self.by_server:
            service = agent % self.S
            self.service_hist += np.bincount(
                (env * self.S + service) * len(LATENCY_BINS_MS) + bins,
                minlength=self.service_hist.size,
            )
            server = lane * self.S + service
            self.server_sum += np.bincount(server, weights=server_ms, minlength=self.sum.size)
            self.server_count += np.bincount(server, minlength=self.count.size)
            self.server_hist += np.bincount(
                server * len(LATENCY_BINS_MS) + _bin(server_ms), minlength=self.server_hist.size
            )

    def result(self):
        return (
            self.sum.reshape(self.B, self.A),
            self.count.reshape(self.B, self.A),
            self.hist.reshape(self.B, -1),
        )

    def server_result(self, incoming: np.ndarray, rejected: np.ndarray) -> ServerStats:
        shape = (self.B, self.N, self.S)
        return ServerStats(
            incoming=incoming,
            rejected=rejected,
            sum_ms=self.server_sum.reshape(shape),
            count=self.server_count.reshape(shape),
            hist=self.server_hist.reshape(*shape, -1),
            service_hist=self.service_hist.reshape(self.B, self.S, -1),
        )


def _bin(ms: np.ndarray) -> np.ndarray:
    """Histogram bin of each latency over LATENCY_BINS_MS."""
    return np.clip(
        np.searchsorted(LATENCY_BINS_MS, ms, side="right") - 1, 0, len(LATENCY_BINS_MS) - 1
    )
