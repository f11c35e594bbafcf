"""The batched multi-agent environment: ``num_envs`` copies of a scenario stepped together.

An agent is one (node, service) pair. Two action modes exist:

* ``split3`` (the DFaaS reference): fractions (local, forward, reject) of this step's
  arrivals; forwarded requests are split evenly over the node's neighbours. With the
  reference's ``forward_split: floor`` the floor division drops ``forward % degree`` requests
  (the known flaw, kept as the faithful default); ``exact`` hands them out one each.
* ``neighbours``: fractions over [local, neighbour_1..K, reject], masked to the neighbours
  that exist and are up. This is what maps onto mesh weights.

Episodes have a fixed length, so all environments finish together: ``step`` returns
``done=True`` on the last step and the caller resets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from policies.observation import (
    DFAAS_FEATURES,
    MeshTelemetry,
    mesh_feature_dim,
    mesh_observation,
    neighbour_action_mask,
)
from policies.topology import Topology
from policies.weights import largest_remainder, reference_counts
from simulator import workloads
from simulator.engine import LATENCY_BINS_MS, NodeModel, RequestTables, hist_quantile
from simulator.scenario import Scenario

ActionMode = Literal["split3", "neighbours"]


def default_action_mode(scenario: Scenario) -> ActionMode:
    """The reference scenarios keep the reference's 3-way split; meshes route per neighbour."""
    return "split3" if scenario.reward == "dfaas" else "neighbours"


def topology_of(scenario: Scenario) -> Topology:
    return Topology.build(
        nodes=scenario.node_names,
        services=scenario.service_names,
        neighbours={n.name: n.neighbours for n in scenario.nodes},
        link_ms=scenario.links_ms,
        max_degree=scenario.neighbour_slots or None,
    )


@dataclass
class Timeline:
    """Per-step node resources after the scenario's events, ``(T, N)`` each."""

    cpu: np.ndarray
    ram: np.ndarray
    queue: np.ndarray
    active: np.ndarray
    surge: np.ndarray

    @classmethod
    def of(cls, scenario: Scenario) -> Timeline:
        t, names = scenario.steps, scenario.node_names
        cpu = np.tile([n.cpu for n in scenario.nodes], (t, 1)).astype(np.float32)
        ram = np.tile([n.ram for n in scenario.nodes], (t, 1)).astype(np.float32)
        queue = np.tile([n.queue_capacity for n in scenario.nodes], (t, 1))
        active = np.tile([n.active for n in scenario.nodes], (t, 1))
        surge = np.ones((t, len(names)))
        # In time order, an arrival before a failure at the same step (so the failure
        # holds): each "fail" or "add" sets the node's state from its step, and a node
        # whose first such event is an "add" is absent until then (it joins later).
        ordered = sorted(scenario.events, key=lambda ev: (ev.at, ev.kind != "add"))
        seen: set[str] = set()
        for ev in ordered:
            j, span = names.index(ev.node), slice(ev.at, ev.until)
            if ev.kind in ("fail", "add") and ev.node not in seen:
                seen.add(ev.node)
                if ev.kind == "add":
                    active[: ev.at, j] = False
            if ev.kind == "capacity":
                cpu[span, j] *= ev.factor
                ram[span, j] *= ev.factor
            elif ev.kind == "fail":
                active[span, j] = False
            elif ev.kind == "add":
                active[ev.at :, j] = True
            elif ev.kind == "surge":
                surge[span, j] *= ev.factor
        cpu = np.where(active, cpu, 0.0)
        ram = np.where(active, ram, 0.0)
        queue = np.where(active, queue, 0)
        return cls(cpu=cpu, ram=ram, queue=queue, active=active, surge=surge)


def sample_arrivals(
    scenario: Scenario, timeline: Timeline, rng: np.random.Generator, num_envs: int
) -> np.ndarray:
    """``(B, T, N, S)`` request counts per step: each (node, service) workload, times the
    surges, clipped to ``max_arrivals``, zero while a node is down."""
    b, t = num_envs, scenario.steps
    drawn = np.zeros((b, t, len(scenario.nodes), len(scenario.services)))
    for j, node in enumerate(scenario.node_names):
        for i, svc in enumerate(scenario.service_names):
            spec = scenario.workloads[(node, svc)]
            drawn[:, :, j, i] = workloads.generate(spec, rng, b, t, clip_to=None)
    arrivals = surged_arrivals(drawn, timeline.surge[None, :, :, None])
    arrivals = np.minimum(arrivals, scenario.max_arrivals).astype(np.int64)
    return np.where(timeline.active[None, :, :, None], arrivals, 0)


def surged_arrivals(drawn: np.ndarray, surge: np.ndarray) -> np.ndarray:
    """Whole requests from a workload's draws times the surge factors in effect, before the
    clip to ``max_arrivals``: whole, surged, whole again, and never below zero."""
    return np.maximum(np.trunc(np.trunc(drawn) * surge), 0)


@dataclass
class EpisodeTotals:
    """Running sums over the current episode, per environment."""

    num_envs: int
    num_nodes: int
    num_agents: int
    input: np.ndarray = field(init=False)
    processed: np.ndarray = field(init=False)
    forwarded: np.ndarray = field(init=False)
    action_rejects: np.ndarray = field(init=False)
    queue_full_rejects: np.ndarray = field(init=False)
    forward_rejects: np.ndarray = field(init=False)
    split_dropped: np.ndarray = field(init=False)
    lost_on_failure: np.ndarray = field(init=False)
    agent_return: np.ndarray = field(init=False)
    cpu_used: np.ndarray = field(init=False)
    cpu_capacity: np.ndarray = field(init=False)
    latency_sum_ms: np.ndarray = field(init=False)
    latency_count: np.ndarray = field(init=False)
    latency_hist: np.ndarray = field(init=False)
    cost_s: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        b = self.num_envs
        for name in (
            "input",
            "processed",
            "forwarded",
            "action_rejects",
            "queue_full_rejects",
            "forward_rejects",
            "split_dropped",
            "lost_on_failure",
            "latency_sum_ms",
            "latency_count",
            "cost_s",
        ):
            setattr(self, name, np.zeros(b))
        self.agent_return = np.zeros((b, self.num_agents))
        self.cpu_used = np.zeros((b, self.num_nodes))
        self.cpu_capacity = np.zeros((b, self.num_nodes))
        self.latency_hist = np.zeros((b, len(LATENCY_BINS_MS)))


def valid_fractions(actions: np.ndarray) -> np.ndarray:
    """Actions as shares of each agent's arrivals: finite, non-negative, each agent's summing
    to 1. A row off by more than rounding is scaled to sum to 1 (a Box action space lets a
    learner emit ``[1, 1, 1]``); unscaled, it would route more or fewer requests than arrived.
    An all-zero row is left to the rounding, which gives it the first route (a data plane
    sends one for a node without routes)."""
    if not np.isfinite(actions).all() or (actions < 0).any():
        raise ValueError("actions must be finite and non-negative shares of each agent's arrivals")
    total = actions.sum(axis=-1, keepdims=True)
    off = (np.abs(total - 1.0) > 1e-6) & (total > 0)  # all zero: the first route, as before
    return np.where(off, actions / np.where(off, total, 1.0), actions) if off.any() else actions


def clearing_time(work: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Time to serve the queued ``work`` at ``capacity`` (work per unit of time), and zero
    on a node without capacity: a failed node's queue is dropped, and a stalled one's has no
    finite time to clear, which as a huge number swamps every scale it enters (the system
    model's features, the tabulation grid); the zero capacity says the rest."""
    capacity = np.asarray(capacity, dtype=float)
    return np.where(capacity > 0, work / np.maximum(capacity, 1e-12), 0.0)


class EdgeEnv:
    """Vectorised multi-agent edge-routing environment (see module docstring)."""

    def __init__(
        self,
        scenario: Scenario,
        num_envs: int = 1,
        action_mode: ActionMode | None = None,
        seed: int | None = None,
        track_servers: bool = False,
    ):
        """``track_servers`` adds per-node latency detail to ``info["server"]`` (see
        :class:`simulator.engine.ServerStats`), the telemetry a live controller reads."""
        self.scenario = scenario
        self.num_envs = num_envs
        self.action_mode: ActionMode = action_mode or default_action_mode(scenario)
        if self.action_mode not in ("split3", "neighbours"):
            raise ValueError(
                f"action_mode must be 'split3' or 'neighbours', got {self.action_mode!r}"
            )
        self.topology = topology_of(scenario)
        self.timeline = Timeline.of(scenario)
        self.tables = RequestTables.from_services(scenario.services)
        self.num_agents = self.topology.num_agents
        self.agents = self.topology.agent_names()
        k = self.topology.max_degree
        self.action_dim = 3 if self.action_mode == "split3" else k + 2
        self.obs_dim = len(DFAAS_FEATURES) if self.action_mode == "split3" else mesh_feature_dim(k)
        self.steps = scenario.steps
        self._seed_rng(seed)
        self.model = NodeModel(
            self.topology,
            self.tables,
            num_envs,
            int(self.timeline.queue.max()),
            self.rng,
            scenario.step_seconds,
            track_latency=scenario.models_latency,
            track_servers=track_servers and scenario.models_latency,
            interleaved=scenario.arrivals == "interleaved",
            track_origins=bool((self.timeline.active[:-1] & ~self.timeline.active[1:]).any()),
            ram_floor=float(self.timeline.ram[self.timeline.ram > 0].min(initial=np.inf)),
        )
        self.mean_cost = np.array([s.mean_cpu for s in scenario.services])
        self.target_ms = np.array(
            [s.latency_target_ms or np.nan for s in scenario.services], dtype=float
        )
        self.t = 0
        self.totals = EpisodeTotals(num_envs, self.topology.num_nodes, self.num_agents)
        self._failing = np.zeros(self.topology.num_nodes, bool)  # set_node_down, not yet dropped

    def _seed_rng(self, seed: int | Sequence[int] | None) -> None:
        self.rng = np.random.default_rng(seed)
        if hasattr(self, "model"):
            self.model.reseed(self.rng)

    # ------------------------------------------------------------------------------------
    def action_mask(self) -> np.ndarray:
        """``(A, action_dim)`` valid action entries at the current step."""
        if self.action_mode == "split3":
            return np.ones((self.num_agents, 3), bool)
        return neighbour_action_mask(
            self.topology, self.timeline.active[min(self.t, self.steps - 1)]
        )

    def reset(self, seed: int | Sequence[int] | None = None) -> np.ndarray:
        """Start new episodes in every environment; returns ``(B, A, obs_dim)`` observations."""
        if seed is not None:
            self._seed_rng(seed)
        b, n, s = self.num_envs, self.topology.num_nodes, self.topology.num_services
        self._new_episode()
        self.model.reset()
        zeros = np.zeros((b, n, s), np.int64)
        self.prev = {
            "local": zeros,
            "forward": zeros,
            "local_rejects": zeros,
            "forward_rejects": zeros,
            "rejected": zeros.astype(float),
            "latency_ms": np.full((b, n, s), np.nan),
            "utilisation": np.zeros((b, n)),
            "arrived": zeros,
        }
        return self._observe()

    def continue_episode(self) -> None:
        """Start the next episode where this one ended: fresh arrivals, the scenario's
        timeline from its first step, zeroed totals, but the queues kept. A run longer than
        one episode (a live demo stepping in real time) goes on this way without the jump
        that emptying every queue in :meth:`reset` would be. Resources set with
        :meth:`set_node_cpu` belong to the episode that set them: set them again.

        The clock restarts at step 0, so the queued requests' birth steps are counted back
        from it (or they would wait a negative time), and a node up at the old episode's end
        but down at the new one's start fails there, its queue lost as at any failure."""
        played = self.t
        up_at_end = self.timeline.active[played - 1] if played > 0 else None
        self._new_episode()
        self.model.restart_clock(played)
        if up_at_end is not None:
            self._failing |= up_at_end & ~self.timeline.active[0]

    def _new_episode(self) -> None:
        """The scenario's own timeline (dropping what :meth:`set_node_cpu` changed), fresh
        arrivals, step 0 and zeroed totals."""
        self.timeline = Timeline.of(self.scenario)
        self.arrivals = sample_arrivals(self.scenario, self.timeline, self.rng, self.num_envs)
        self.t = 0
        self.totals = EpisodeTotals(self.num_envs, self.topology.num_nodes, self.num_agents)

    def set_node_cpu(self, node: str, cpu: float) -> None:
        """Give ``node`` ``cpu`` per step from the current step to the end of the episode
        (zero while it is down; the next episode starts from the scenario again). Scenario
        events are fixed before an episode starts; this is a change decided while it runs,
        such as a degradation injected into a live demo."""
        if cpu < 0 or not np.isfinite(cpu):
            raise ValueError(f"cpu must be finite and >= 0, got {cpu!r}")
        j = self.scenario.node_names.index(node)
        rest = slice(self.t, None)
        self.timeline.cpu[rest, j] = np.where(self.timeline.active[rest, j], cpu, 0.0)

    def set_node_down(self, node: str) -> None:
        """Take ``node`` down from the current step to the end of the episode, as a failure
        event does: no resources (its queue is dropped at this step, its requests lost) and
        no arrivals from its clients, who were on it. Like :meth:`set_node_cpu`, a change
        decided while the episode runs; the next episode starts from the scenario again.
        Where queued requests carry no sender (the reference's layout: one service, no
        latency model, no failure among the scenario's events), those lost count in
        ``totals.lost_on_failure`` but in no agent's ``info["lost"]``."""
        j = self.scenario.node_names.index(node)
        rest, tl = slice(self.t, None), self.timeline
        self._failing[j] = True  # its queue goes at the next step, an episode's first too
        tl.active[rest, j] = False
        for resource in (tl.cpu, tl.ram, tl.queue):
            resource[rest, j] = 0
        self.arrivals[:, rest, j, :] = 0

    # ------------------------------------------------------------------------------------
    def counts(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Fractions ``(B, A, action_dim)`` -> (local ``(B,N,S)``, forward ``(B,N,K,S)``,
        reject ``(B,N,S)``, dropped by the floor split ``(B,N,S)``)."""
        b, n, s, k = (
            self.num_envs,
            self.topology.num_nodes,
            self.topology.num_services,
            self.topology.max_degree,
        )
        arrivals = self.arrivals[:, self.t].reshape(b, n * s)
        actions = valid_fractions(
            np.asarray(actions, dtype=np.float64).reshape(b, n * s, self.action_dim)
        )
        if self.action_mode == "split3":
            c = reference_counts(actions, arrivals).reshape(b, n, s, 3)
            local, fwd, reject = c[..., 0], c[..., 1], c[..., 2]
            degree = self.topology.degree[None, :, None]
            if self.scenario.forward_split == "floor":
                share = fwd // np.maximum(degree, 1)
                per_slot = share[:, :, None, :]
                sent = share * degree
            else:
                share, left = np.divmod(fwd, np.maximum(degree, 1))
                extra = np.arange(k)[None, None, :, None] < left[:, :, None, :]
                per_slot = share[:, :, None, :] + extra
                sent = share * degree + left
            # A node without neighbours forwards nothing: its share counts as rejected.
            forward = np.where(self.topology.neighbour_mask[None, :, :, None], per_slot, 0)
            reject = np.where(degree == 0, reject + fwd, reject)
            dropped = np.where(degree == 0, 0, fwd - sent)
            return local, forward, reject, dropped
        mask = self.action_mask()[None]
        c = largest_remainder(np.where(mask, actions, 0.0), arrivals).reshape(b, n, s, k + 2)
        forward = c[..., 1 : k + 1].transpose(0, 1, 3, 2)
        return c[..., 0], forward, c[..., k + 1], np.zeros((b, n, s), np.int64)

    def step(self, actions: np.ndarray):
        """Apply ``(B, A, action_dim)`` fractions; returns ``(obs, rewards (B, A), done, info)``."""
        if self.t >= self.steps:
            raise RuntimeError("episode is over: call reset()")
        tl, t = self.timeline, self.t
        failed_queues = self._drop_failed_queues()
        local, forward, reject, dropped = self.counts(actions)
        out = self.model.step(t, local, forward, tl.cpu[t], tl.ram[t], tl.queue[t], tl.active[t])
        fwd_total = np.einsum("bnks->bns", forward)
        fwd_rejects = np.einsum("bnks->bns", out.forward_rejects)
        arrivals = self.arrivals[:, t]
        rejected = reject + out.local_rejects + fwd_rejects
        # Every request that arrived and was not served, whatever lost it: the floor split's
        # remainder too, which cost nothing and so paid better than serving it.
        lost = rejected + dropped + failed_queues

        if self.scenario.reward == "dfaas":
            rewards = dfaas_reward(
                local,
                fwd_total + dropped,
                reject,
                out.local_rejects,
                fwd_rejects,
                tl.queue[t][None, :, None] - out.queue_length[..., None],
            )
        else:
            # Cost per arriving request in units of the mean latency target, negated.
            cost_s = self._latency_cost_s(out, lost)
            self.totals.cost_s += cost_s.sum(axis=1)
            per_request = cost_s / np.maximum(arrivals.reshape(self.num_envs, -1), 1)
            rewards = -per_request / (np.mean(self.target_ms) / 1000.0)
        rewards = rewards.reshape(self.num_envs, -1)

        tot = self.totals
        per_env = _per_env_sum  # einsum: see there
        tot.input += per_env(arrivals)
        tot.processed += per_env(out.processed)
        tot.forwarded += per_env(fwd_total + dropped)
        tot.action_rejects += per_env(reject)
        tot.queue_full_rejects += per_env(out.local_rejects)
        tot.forward_rejects += per_env(fwd_rejects)
        tot.split_dropped += per_env(dropped)
        tot.agent_return += rewards
        tot.cpu_used += out.cpu_used
        tot.cpu_capacity += tl.cpu[t][None, :]
        if out.latency_sum_ms is not None:
            tot.latency_sum_ms += out.latency_sum_ms.sum(axis=1)
            tot.latency_count += out.latency_count.sum(axis=1)
            tot.latency_hist += out.latency_hist

        self.last_outcome = out
        b, n, s = arrivals.shape
        served_ms = np.full((b, n, s), np.nan)
        if out.latency_sum_ms is not None:
            cnt = out.latency_count.reshape(b, n, s)
            served_ms = np.where(
                cnt > 0, out.latency_sum_ms.reshape(b, n, s) / np.maximum(cnt, 1), np.nan
            )
        self.prev = {
            "local": local,
            "forward": fwd_total,
            "local_rejects": out.local_rejects,
            "forward_rejects": fwd_rejects,
            "rejected": lost.astype(float),  # as info["lost"] counts
            "latency_ms": served_ms,
            "utilisation": out.cpu_used / np.maximum(tl.cpu[t], 1e-9),
            "arrived": arrivals,
            "queue": out.queue_length,
        }
        self.t += 1
        done = self.t >= self.steps
        obs = self._observe()
        info = {
            "arrivals": arrivals,
            "local": local,
            "forward": forward,
            "reject": reject,
            # (B, N, S) by the agent that routed them, all causes
            "lost": lost,
            "lost_on_failure": failed_queues,  # of those, queued on a node that failed
            "processed": out.processed,
            "queue_length": out.queue_length,
            "cpu_used": out.cpu_used,
            "server": out.server,
        }
        return obs, rewards, done, info

    # ------------------------------------------------------------------------------------
    def _observe(self) -> np.ndarray:
        b = self.num_envs
        t = min(self.t, self.steps - 1)
        # After the last step there are no arrivals to come in this episode, but the final
        # observation is what a trainer bootstraps the cut-off future from: its arrivals are
        # the last step's (what follows most likely looks like what came last), not none, a
        # state no agent ever meets and the critic never learned the value of.
        now = self.arrivals[:, t]
        queue = self.model.q_len
        if self.action_mode == "split3":
            feats = [
                now,
                self.prev["forward_rejects"],
                self.prev["forward"],
                self.prev["local_rejects"],
                self.prev["local"],
                queue[..., None],
            ]
            obs = np.empty((*now.shape, len(feats)), np.float32)
            for i, feat in enumerate(feats):  # written in place: no stacked int64 copy
                obs[..., i] = feat
            return obs.reshape(b, self.num_agents, -1)
        return mesh_observation(self.topology, self.telemetry(now, queue, t))

    def telemetry(self, offered: np.ndarray, queue: np.ndarray, t: int) -> MeshTelemetry:
        """The simulator's state expressed as what a mesh would report for one interval."""
        tl = self.timeline
        per_step = tl.cpu[t] / float(np.mean(self.mean_cost))
        backlog = clearing_time(queue * float(np.mean(self.mean_cost)), tl.cpu[t])
        return MeshTelemetry(
            offered=offered.astype(float),
            latency_ms=self.prev["latency_ms"],
            rejected=self.prev["rejected"],
            arrived_prev=self.prev["arrived"].astype(float),
            utilisation=self.prev["utilisation"],
            backlog=np.where(tl.active[t], backlog, 0.0),
            capacity=per_step,
            active=tl.active[t],
            target_ms=np.nan_to_num(self.target_ms, nan=1000.0),
        )

    def state(self) -> np.ndarray:
        """Global state for a centralised critic: all agents' observations, ``(B, A * obs_dim)``."""
        return self._observe().reshape(self.num_envs, -1)

    def _drop_failed_queues(self) -> np.ndarray:
        """Empty the queues of the nodes failing at this step; ``(B, N, S)`` the requests
        lost, by the agent that sent them (zeros where requests carry no origin). They cost
        what a rejection does: a policy must not gain by queueing work on a node that fails."""
        tl, t = self.timeline, self.t
        shape = (self.num_envs, self.topology.num_nodes, self.topology.num_services)
        lost = np.zeros(shape, np.int64)
        failed = tl.active[t - 1] & ~tl.active[t] if t > 0 else np.zeros_like(tl.active[t])
        failed, self._failing = failed | self._failing, np.zeros_like(self._failing)
        if failed.any():
            by_agent = self.model.queued_by_agent(failed)
            self.totals.lost_on_failure += self.model.drop_queues(failed).sum(axis=1)
            if by_agent is not None:
                lost = by_agent.reshape(shape)
        return lost

    def _latency_cost_s(self, out, rejected: np.ndarray) -> np.ndarray:
        """``(B, A)`` this step's cost in seconds: every served request's latency plus, for
        every rejected one, ``reject_penalty`` times its service's latency target. This is the
        fluid-model oracle's objective, so simulated costs and the oracle's are comparable."""
        b = rejected.shape[0]
        n = self.topology.num_nodes
        penalty_ms = self.scenario.reject_penalty * np.tile(self.target_ms, n)
        return (out.latency_sum_ms + penalty_ms[None, :] * rejected.reshape(b, -1)) / 1000.0

    # ------------------------------------------------------------------------------------
    def episode_metrics(self) -> dict[str, np.ndarray]:
        """Per-environment metrics of the episode so far (percentages of input requests)."""
        tot = self.totals
        inp = np.maximum(tot.input, 1.0)
        util = tot.cpu_used / np.maximum(tot.cpu_capacity, 1e-9)
        jain = util.sum(1) ** 2 / np.maximum(util.shape[1] * (util**2).sum(1), 1e-12)
        rejected = tot.action_rejects + tot.queue_full_rejects + tot.forward_rejects
        m = {
            "input": tot.input,
            "processed_pct": 100 * tot.processed / inp,
            "rejected_pct": 100 * rejected / inp,
            "rejected_action_pct": 100 * tot.action_rejects / inp,
            "rejected_queue_full_pct": 100 * tot.queue_full_rejects / inp,
            "rejected_forward_pct": 100 * tot.forward_rejects / inp,
            "dropped_split_pct": 100 * tot.split_dropped / inp,
            "lost_on_failure_pct": 100 * tot.lost_on_failure / inp,
            "forwarded_pct": 100 * tot.forwarded / inp,
            "return_per_agent": tot.agent_return.mean(axis=1),
            "jain_utilisation": jain,
        }
        if self.scenario.models_latency:
            m["latency_mean_ms"] = tot.latency_sum_ms / np.maximum(tot.latency_count, 1)
            m["latency_p95_ms"] = hist_quantile(tot.latency_hist, 0.95)
            m["cost_per_request_s"] = tot.cost_s / inp
        return m


def _per_env_sum(x: np.ndarray) -> np.ndarray:
    """Sum over all axes but the first (environments), as an einsum: numpy's sum over short
    axes pays a per-row overhead that makes it several times slower."""
    return np.einsum("bi->b", x.reshape(len(x), -1))


def dfaas_reward(local, forward, reject, local_rejects, forward_rejects, free) -> np.ndarray:
    """The reference reward in [0, 1], vectorised (see the module's reference notes).

    Penalises local queue-full rejects, forwards refused by neighbours, forwards that could
    have been queued locally, and rejects that could have been queued or forwarded.
    """
    total = local + forward + reject
    forward_ok = forward - forward_rejects
    forward_excess = np.minimum(forward_ok, free)
    reject_excess = np.minimum(reject, free - forward_excess)
    valid_reject = reject - reject_excess
    reject_excess = np.where((forward_rejects == 0) & (valid_reject > 0), reject, reject_excess)
    wrong = local_rejects + forward_rejects + forward_excess + reject_excess
    return np.where(total == 0, 1.0, 1.0 - wrong / np.maximum(total, 1))
