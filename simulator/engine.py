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

How it is vectorised:

* First-fit over the queue is a cumulative-sum prefix, then a short "tail" loop over the
  few lanes that still have a fitting request; each tail round processes one request in
  every such lane, so rounds are bounded by the tail length, not by requests.
* The stream is only materialised where it matters: the prefix that may be processed (in
  lanes whose queue emptied) and the requests that enter the queue. Rejected requests are
  counted per segment by interval arithmetic and never sampled. Queued requests' sizes are
  drawn when they enter the queue (their size is not observed before), except the one that
  failed to fit, whose observed size is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from policies.topology import Topology

LATENCY_BINS_MS = np.concatenate([[0.0], np.geomspace(1.0, 3.6e6, 255)])
"""Histogram edges for per-request latency (1 ms .. 1 h, log-spaced)."""


@dataclass(frozen=True)
class RequestTables:
    """Per-service class mixture of request sizes, as ``(S, C)`` arrays."""

    class_cdf: np.ndarray
    cpu: np.ndarray  # (4, S, C): min, mean, max, std
    ram: np.ndarray

    def __post_init__(self) -> None:
        s, c = self.class_cdf.shape
        # One row per (service, class): cpu min/mean/max/std, ram min/mean/max/std.
        table = np.concatenate([self.cpu, self.ram]).reshape(8, s * c).T
        object.__setattr__(self, "table", torch.from_numpy(np.ascontiguousarray(table, np.float32)))
        object.__setattr__(self, "max_ram", float(self.ram[2].max()))
        object.__setattr__(
            self, "thresholds", torch.from_numpy(self.class_cdf[:, :-1].astype(np.float32))
        )

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

    def sample(self, gen: torch.Generator, service: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Draw CPU and RAM of ``len(service)`` requests of the given services.

        Torch's generator is used for speed (normals are ~3x faster than numpy's here); it is
        seeded from the environment's seed, so runs stay reproducible."""
        m = service.shape[0]
        num_classes = self.class_cdf.shape[1]
        svc = torch.from_numpy(np.ascontiguousarray(service, dtype=np.int64))
        u = torch.rand(m, generator=gen)
        if self.thresholds.shape[0] == 1:
            klass = (u[:, None] >= self.thresholds[0][None, :]).sum(dim=1)
        else:
            klass = (u[:, None] >= self.thresholds[svc]).sum(dim=1)
        p = self.table[svc * num_classes + klass]
        z = torch.randn((m, 2), generator=gen)
        cpu = torch.clamp(p[:, 1] + p[:, 3] * z[:, 0], p[:, 0], p[:, 2])
        ram = torch.clamp(p[:, 5] + p[:, 7] * z[:, 1], p[:, 4], p[:, 6])
        return cpu.numpy(), ram.numpy()


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
        chunk: int = 96,
    ):
        self.topo = topology
        self.tables = tables
        self.B, self.N, self.S, self.K = (
            num_envs,
            topology.num_nodes,
            topology.num_services,
            topology.max_degree,
        )
        self.A = self.N * self.S
        self.Q = max(int(queue_slots), 1)
        self.reseed(rng)
        self.step_ms = 1000.0 * step_seconds
        self.track_latency = track_latency
        self.chunk = chunk
        self.slot = np.arange(self.Q)
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
        # Per-request origin, service and birth step matter only with several services or a
        # latency model; the reference scenario needs neither, so it skips that bookkeeping.
        self.needs_metadata = track_latency or self.S > 1
        self.reset()

    def reseed(self, rng: np.random.Generator) -> None:
        """Derive the request-size generator from the environment's numpy generator."""
        self.rng = rng
        self.gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))

    def reset(self) -> None:
        shape = (self.B, self.N, self.Q)
        self.q_cpu = np.zeros(shape, np.float32)
        self.q_ram = np.zeros(shape, np.float32)
        self.q_born = np.zeros(shape, np.int32)
        self.q_agent = np.zeros(shape, np.int32)
        self.q_arrival_ms = np.zeros(shape, np.float32)
        self.q_len = np.zeros((self.B, self.N), np.int64)

    def drop_queues(self, nodes: np.ndarray) -> np.ndarray:
        """Empty the queues of failed nodes (bool ``(N,)``); returns requests lost ``(B, N)``."""
        lost = np.where(nodes[None, :], self.q_len, 0)
        self.q_len = np.where(nodes[None, :], 0, self.q_len)
        return lost

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
        B, N, S, K = self.B, self.N, self.S, self.K
        lat = _LatencyAccumulator(B, self.A) if self.track_latency else None

        # (a) first-fit scan of the old queue.
        processed_q, remaining_cpu, remaining_ram, position = self._scan_queue(cpu_cap, ram_cap)
        if lat is not None:
            finish = position / np.maximum(cpu_cap, 1e-9)[:, None] * self.step_ms
            wait = (t - self.q_born) * self.step_ms + finish - self.q_arrival_ms
            wait = (
                wait + self.topo.link_matrix[self.agent_node[self.q_agent], np.arange(N)[:, None]]
            )
            lat.add(processed_q, self.q_agent, wait)
        processed = processed_q.sum(axis=-1, dtype=np.int16).astype(np.int64)
        self._compact(~processed_q & (self.slot < self.q_len[..., None]))

        # (b)+(c) the new stream: local, then forwarded by neighbour slot.
        incoming = self.topo.other_end(forward)
        seg_n = np.concatenate([local, incoming.reshape(B, N, K * S)], axis=-1).astype(np.int64)
        seg_end = np.cumsum(seg_n, axis=-1)
        seg_start = seg_end - seg_n
        total = seg_end[..., -1]
        empty = (self.q_len == 0) & active[None, :] & (total > 0)
        prefix, prefix_cpu, failed_cpu, failed_ram, has_failed = self._process_prefix(
            empty, total, seg_end, remaining_cpu, remaining_ram, cpu_cap, lat, t
        )
        processed += prefix

        room = np.maximum(queue_cap[None, :] - self.q_len, 0)
        queued = np.clip(total - prefix, 0, room)
        reject_from = prefix + queued
        rejected = np.clip(seg_end - np.maximum(seg_start, reject_from[..., None]), 0, seg_n)
        self._append(t, queued, prefix, total, seg_end, failed_cpu, failed_ram, has_failed)

        out = StepOutcome(
            processed=processed,
            local_rejects=rejected[..., :S],
            forward_rejects=self.topo.other_end(rejected[..., S:].reshape(B, N, K, S)),
            queue_length=self.q_len.copy(),
            cpu_used=np.maximum(cpu_cap[None, :] - remaining_cpu, 0.0) + prefix_cpu,
        )
        if lat is not None:
            out.latency_sum_ms, out.latency_count, out.latency_hist = lat.result()
        return out

    # ------------------------------------------------------------------------------------
    def _scan_queue(self, cpu_cap: np.ndarray, ram_cap: np.ndarray):
        """First-fit over each queue; returns processed mask, remaining capacity, and each
        processed request's completion position (CPU consumed up to and including it)."""
        valid = self.slot < self.q_len[..., None]
        cum_cpu = np.cumsum(self.q_cpu, axis=-1)
        done = valid & (cum_cpu <= cpu_cap[None, :, None])
        # RAM can only bind if a full queue of the largest requests exceeds a node's RAM; when
        # it provably cannot (the reference: 100 x 75 MB <= 8000 MB) the check is skipped.
        ram_binds = self.Q * self.tables.max_ram > ram_cap[ram_cap > 0].min(initial=np.inf)
        cum_ram = np.cumsum(self.q_ram, axis=-1) if ram_binds else cum_cpu
        if ram_binds:
            done &= cum_ram <= ram_cap[None, :, None]
        n_done = done.sum(axis=-1, dtype=np.int16).astype(np.int64)
        last = np.maximum(n_done - 1, 0)[..., None]
        used_cpu = np.where(n_done > 0, np.take_along_axis(cum_cpu, last, -1)[..., 0], 0.0)
        used_ram = (
            np.where(n_done > 0, np.take_along_axis(cum_ram, last, -1)[..., 0], 0.0)
            if ram_binds
            else np.zeros_like(used_cpu)
        )
        rem_cpu = (cpu_cap[None, :] - used_cpu).astype(np.float32)
        rem_ram = (ram_cap[None, :] - used_ram).astype(np.float32)
        position = np.where(done, cum_cpu, 0.0).astype(np.float32) if self.track_latency else None

        candidates = (
            valid & ~done & (self.q_cpu <= rem_cpu[..., None]) & (self.q_ram <= rem_ram[..., None])
        )
        lanes = np.flatnonzero(candidates.any(axis=-1))
        if lanes.size:
            flat = (self.B * self.N, self.Q)
            cand = candidates.reshape(flat)[lanes]
            qc, qr = self.q_cpu.reshape(flat)[lanes], self.q_ram.reshape(flat)[lanes]
            rc, rr = rem_cpu.reshape(-1)[lanes], rem_ram.reshape(-1)[lanes]
            cap = cpu_cap[lanes % self.N]
            extra = np.zeros_like(cand)
            pos = np.zeros(cand.shape, np.float32) if position is not None else None
            while True:
                rows = np.flatnonzero(cand.any(axis=1))
                if not rows.size:
                    break
                first = cand[rows].argmax(axis=1)
                extra[rows, first] = True
                rc[rows] -= qc[rows, first]
                rr[rows] -= qr[rows, first]
                if pos is not None:
                    pos[rows, first] = cap[rows] - rc[rows]
                after = self.slot[None, :] > first[:, None]
                cand[rows] &= after & (qc[rows] <= rc[rows, None]) & (qr[rows] <= rr[rows, None])
            done.reshape(flat)[lanes] |= extra
            if position is not None:
                position.reshape(flat)[lanes] += pos
            rem_cpu.reshape(-1)[lanes] = rc
            rem_ram.reshape(-1)[lanes] = rr
        return done, rem_cpu, rem_ram, position

    def _compact(self, keep: np.ndarray) -> None:
        """Move kept requests to the front of each queue, preserving their order."""
        order = torch.from_numpy(np.argsort(~keep, axis=-1, kind="stable"))
        fields = (
            ("q_cpu", "q_ram", "q_born", "q_agent", "q_arrival_ms")
            if self.needs_metadata
            else ("q_cpu", "q_ram")
        )
        for name in fields:
            setattr(
                self, name, torch.gather(torch.from_numpy(getattr(self, name)), -1, order).numpy()
            )
        self.q_len = keep.sum(axis=-1, dtype=np.int16).astype(np.int64)

    def _arrival_ms(self, position: np.ndarray, total: np.ndarray) -> np.ndarray:
        """Arrival time within the step of stream ``position`` out of ``total``: a step's
        requests arrive evenly spread over it, in stream order."""
        return (position / np.maximum(total, 1) * self.step_ms).astype(np.float32)

    def _stream_segments(
        self, lanes: np.ndarray, index: np.ndarray, seg_end: np.ndarray
    ) -> np.ndarray:
        """Segment of stream position ``index`` (shape ``(m, W)``) in each lane.

        Positions past the end of a lane's stream (padding of the window) map to the last
        segment, so lookups stay in range; they are masked out by the caller."""
        ends = seg_end.reshape(-1, seg_end.shape[-1])[lanes]
        seg = (ends[:, None, :] <= index[:, :, None]).sum(axis=-1)
        return np.minimum(seg, ends.shape[-1] - 1)

    def _process_prefix(self, empty, total, seg_end, rem_cpu, rem_ram, cpu_cap, lat, t):
        """In lanes whose queue emptied, process the stream while requests fit."""
        L = self.B * self.N
        prefix = np.zeros(L, np.int64)
        failed_cpu = np.zeros(L, np.float32)
        failed_ram = np.zeros(L, np.float32)
        has_failed = np.zeros(L, bool)
        prefix_used = np.zeros(L, np.float32)
        idle_carry = np.full(L, -np.inf)
        lanes = np.flatnonzero(empty.reshape(-1))
        tot = total.reshape(-1)
        rc = rem_cpu.reshape(-1)[lanes].astype(np.float32)
        rr = rem_ram.reshape(-1)[lanes].astype(np.float32)
        start = 0
        while lanes.size:
            width = int(min(self.chunk, (tot[lanes] - start).max()))
            index = start + np.arange(width)[None, :]
            need = index < tot[lanes][:, None]
            if self.needs_metadata:
                seg = self._stream_segments(lanes, index, seg_end)
                service = self.seg_service[seg]
            else:
                service = np.zeros(need.shape, np.int64)
            cpu = np.zeros(need.shape, np.float32)
            ram = np.zeros(need.shape, np.float32)
            cpu[need], ram[need] = self.tables.sample(self.gen, service[need])
            cum_cpu, cum_ram = np.cumsum(cpu, axis=1), np.cumsum(ram, axis=1)
            fit = need & (cum_cpu <= rc[:, None]) & (cum_ram <= rr[:, None])
            k = fit.sum(axis=1)
            prefix[lanes] += k
            used_here = np.where(
                k > 0, np.take_along_axis(cum_cpu, np.maximum(k - 1, 0)[:, None], 1)[:, 0], 0.0
            )
            prefix_used[lanes] += used_here
            if lat is not None:
                node = lanes % self.N
                ms_per_cpu = self.step_ms / np.maximum(cpu_cap[node], 1e-9)[:, None]
                busy_until = (cpu_cap[node] - rc)[:, None] + cum_cpu  # CPU consumed, in order
                arrival = self._arrival_ms(index, tot[lanes][:, None])
                # Lindley's recursion as a running maximum: a request finishes when the work
                # before it is done, unless the server idled waiting for a later arrival.
                idle = np.where(need, arrival - (busy_until - cpu) * ms_per_cpu, -np.inf)
                idle = np.maximum.accumulate(np.maximum(idle, idle_carry[lanes][:, None]), axis=1)
                idle_carry[lanes] = idle[:, -1]
                finish = busy_until * ms_per_cpu + np.maximum(idle, 0.0)
                ms = finish - arrival + self.seg_link_ms[node[:, None], seg]
                agent = self.seg_agent[node[:, None], seg]
                lat.add_flat(lanes // self.N, agent, ms, fit)
            stopped = (k < width) & need[np.arange(len(k)), np.minimum(k, width - 1)]
            idx = np.minimum(k, width - 1)
            rows = np.arange(len(k))
            failed_cpu[lanes[stopped]] = cpu[rows[stopped], idx[stopped]]
            failed_ram[lanes[stopped]] = ram[rows[stopped], idx[stopped]]
            has_failed[lanes[stopped]] = True
            go_on = (k == width) & (start + width < tot[lanes])
            rc = (rc - used_here)[go_on]
            rr = (
                rr
                - np.where(
                    k > 0, np.take_along_axis(cum_ram, np.maximum(k - 1, 0)[:, None], 1)[:, 0], 0.0
                )
            )[go_on]
            lanes = lanes[go_on]
            start += width
        shape = (self.B, self.N)
        return (
            prefix.reshape(shape),
            prefix_used.reshape(shape),
            failed_cpu.reshape(shape),
            failed_ram.reshape(shape),
            has_failed.reshape(shape),
        )

    def _append(
        self, t, queued, prefix, total, seg_end, failed_cpu, failed_ram, has_failed
    ) -> None:
        """Write the queued part of the stream behind the kept requests."""
        rel = self.slot - self.q_len[..., None]
        new = (rel >= 0) & (rel < queued[..., None])
        count = int(queued.sum())
        if count:
            if self.needs_metadata:
                b, n, s = np.nonzero(new)
                lane = b * self.N + n
                position = prefix[b, n] + s - self.q_len[b, n]
                seg = self._stream_segments(lane, position[:, None], seg_end)[:, 0]
                service = self.seg_service[seg]
                self.q_born[new] = t
                self.q_arrival_ms[new] = self._arrival_ms(position, total[b, n])
                self.q_agent[new] = self.seg_agent[n, seg]
            else:
                service = np.zeros(count, np.int64)
            cpu, ram = self.tables.sample(self.gen, service)
            self.q_cpu[new], self.q_ram[new] = cpu, ram
            # The request that failed to fit opened the queue: it keeps its observed size.
            first = has_failed & (queued > 0)
            self.q_cpu[..., 0][first] = failed_cpu[first]
            self.q_ram[..., 0][first] = failed_ram[first]
        self.q_len = self.q_len + queued


class _LatencyAccumulator:
    """Per-agent latency sums and a per-environment histogram, filled with bincount."""

    def __init__(self, num_envs: int, num_agents: int):
        self.B, self.A = num_envs, num_agents
        self.sum = np.zeros(num_envs * num_agents)
        self.count = np.zeros(num_envs * num_agents)
        self.hist = np.zeros(num_envs * len(LATENCY_BINS_MS))

    def add(self, mask: np.ndarray, agent: np.ndarray, ms: np.ndarray) -> None:
        env = np.broadcast_to(np.arange(self.B)[:, None, None], mask.shape)
        self.add_flat(env[mask], agent[mask], ms[mask], None)

    def add_flat(self, env, agent, ms, mask) -> None:
        if mask is not None:
            env = np.broadcast_to(env[:, None], mask.shape)[mask]
            agent, ms = agent[mask], ms[mask]
        key = env * self.A + agent
        self.sum += np.bincount(key, weights=ms, minlength=self.sum.size)
        self.count += np.bincount(key, minlength=self.count.size)
        bins = np.clip(
            np.searchsorted(LATENCY_BINS_MS, ms, side="right") - 1, 0, len(LATENCY_BINS_MS) - 1
        )
        self.hist += np.bincount(env * len(LATENCY_BINS_MS) + bins, minlength=self.hist.size)

    def result(self):
        return (
            self.sum.reshape(self.B, self.A),
            self.count.reshape(self.B, self.A),
            self.hist.reshape(self.B, -1),
        )
