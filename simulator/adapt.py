"""Run the live adaptation loop inside the simulator, through a scenario's timed changes.

Examples::

    python -m simulator.adapt --scenario mesh-10x3-capacity-drop
    python -m simulator.adapt --scenario mesh-10x3-surge --json
    python -m simulator.adapt --scenario mesh-10x3-node-failure --plot adapt.png
    python -m simulator.adapt --list-scenarios --json

Every control interval (``--interval`` simulator steps) the controller reads noisy telemetry,
refits its system model when due, decides the next routing and applies it for the next
interval (the steps after the last full interval make a shorter last cycle). Three
controllers see the same arrivals: the base policy alone (``--policy``, default the bundled
checkpoint; on a mesh of smaller degree than it was trained on, with the extra neighbour
slots masked, as the operator runs it), rollout on top of it, and the oracle (the
fluid-model optimum, recomputed at each change with perfect knowledge). Rollout routes as
the operator must, without a reject route (the base policy's reject share spread over its
routes), unless ``--allow-reject``. The system model starts from ``--warmup`` intervals of
simulator data of the scenario before its changes.

Each cycle is reported as it happened for every controller (a table, or with ``--json`` one
JSON object per line), then the totals (with ``--json``, the last line is one object).
``*_after_3_cycles`` figures cover the cycles from the third after each change to the next
change or the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from policies import checkpoint
from policies.adaptation import Adapter, IntervalTelemetry, Rows, model_rows
from policies.baselines import PolicyError
from policies.model_env import (
    RAMP_FROM_UTILISATION,
    SAFE_UTILISATION,
    ModelEnv,
    without_reject,
)
from policies.observation import MeshTelemetry, mesh_observation
from policies.rollout import Policy, RolloutSettings, SettingError
from policies.system_model import SystemModel
from simulator.cli import (
    json_line,
    non_negative_float,
    non_negative_int,
    parser_from_doc,
    png_path,
    positive_int,
)
from simulator.engine import hist_quantile
from simulator.env import EdgeEnv, Timeline, clearing_time
from simulator.episodes import build_policy, fitted_scenario
from simulator.fluid import OracleSchedule, oracle_schedule, segments
from simulator.scenario import Scenario, ScenarioError, load_scenario

CHANGE_SCENARIOS = (
    "mesh-10x3-capacity-drop",
    "mesh-10x3-surge",
    "mesh-10x3-node-failure",
    "mesh-10x3-node-added",
)
ARMS = ("base", "rollout", "oracle")


@dataclass
class Cycle:
    """What really happened in one control interval (the simulator's truth, not telemetry)."""

    cost: float  # seconds per offered request (latency, plus the penalty for lost ones)
    latency_ms: float
    p95_ms: dict[str, float]  # per service
    lost_pct: float
    slo_violations: list[str]  # services whose p95 exceeded their target
    decision_ms: float = 0.0
    fallback: str | None = None
    weights: list[list[float]] = field(default_factory=list)


class IntervalRecorder:
    """Adds up one interval of simulator steps into true metrics and noisy telemetry."""

    def __init__(self, env: EdgeEnv):
        self.env = env
        n, s = env.topology.num_nodes, env.topology.num_services
        self.steps = 0
        self.cost = self.input = 0.0
        self.offered = np.zeros((n, s))
        self.lost = np.zeros((n, s))
        self.incoming = np.zeros((n, s))
        self.rejected = np.zeros((n, s))
        self.server_sum = np.zeros((n, s))
        self.server_count = np.zeros((n, s))
        self.server_hist = 0.0
        self.service_hist = 0.0
        self.agent_sum = np.zeros(n * s)
        self.agent_count = np.zeros(n * s)
        self.cpu_used = np.zeros(n)
        self.cpu = np.zeros(n)
        self._cost0 = float(env.totals.cost_s[0])
        self.backlog_start = self._backlog(min(env.t, env.steps - 1))

    def _backlog(self, step: int) -> np.ndarray:
        """Seconds each node needs to clear its queue at its capacity of ``step``: the
        coming step's at an interval's start, the last one's at its end (the capacity the
        interval's row carries; the next step's may be a failure's zero)."""
        env = self.env
        cpu = env.timeline.cpu[step] / env.scenario.step_seconds
        return clearing_time(env.model.queued_work()[0], cpu)

    def add(self, info: dict) -> None:
        env, out = self.env, self.env.last_outcome
        t = env.t - 1
        self.steps += 1
        self.offered += info["arrivals"][0]
        self.lost += info["lost"][0]
        server = info["server"]
        self.incoming += server.incoming[0]
        self.rejected += server.rejected[0]
        self.server_sum += server.sum_ms[0]
        self.server_count += server.count[0]
        self.server_hist = self.server_hist + server.hist[0]
        self.service_hist = self.service_hist + server.service_hist[0]
        self.agent_sum += out.latency_sum_ms[0]
        self.agent_count += out.latency_count[0]
        self.cpu_used += info["cpu_used"][0]
        self.cpu += env.timeline.cpu[t]

    def cycle(self) -> Cycle:
        env = self.env
        offered = self.offered.sum()
        cost = (float(env.totals.cost_s[0]) - self._cost0) / max(offered, 1.0)
        p95 = hist_quantile(self.service_hist, 0.95)
        names = env.scenario.service_names
        violations = [
            name
            for name, q, target in zip(names, p95, env.target_ms, strict=True)
            if np.isfinite(q) and q > target
        ]
        return Cycle(
            cost=cost,
            latency_ms=float(self.agent_sum.sum() / max(self.agent_count.sum(), 1.0)),
            p95_ms={name: float(q) for name, q in zip(names, p95, strict=True)},
            lost_pct=float(100.0 * self.lost.sum() / max(offered, 1.0)),
            slo_violations=violations,
        )

    def telemetry(self, rng: np.random.Generator, noise: float) -> IntervalTelemetry:
        """The interval as a mesh would report it: rates per second, with multiplicative
        measurement noise of relative size ``noise``."""
        env = self.env
        seconds = self.steps * env.scenario.step_seconds
        n, s = self.offered.shape

        def noisy(x):
            return np.asarray(x, dtype=float) * rng.lognormal(0.0, noise, np.shape(x))

        t = env.t - 1
        cpu_now = env.timeline.cpu[t]
        capacity = noisy(cpu_now / env.scenario.step_seconds)
        mean_ms = np.where(
            self.server_count > 0, self.server_sum / np.maximum(self.server_count, 1), np.nan
        )
        agent_ms = np.where(
            self.agent_count > 0, self.agent_sum / np.maximum(self.agent_count, 1), np.nan
        )
        step = env.scenario.step_seconds
        mean_work = float(np.mean(env.mean_cost))
        offered = noisy(self.offered / seconds)
        mesh = MeshTelemetry(
            offered=(offered * step)[None],
            latency_ms=noisy(agent_ms.reshape(n, s))[None],
            rejected=noisy(self.lost / self.steps)[None],
            arrived_prev=(offered * step)[None],
            utilisation=np.minimum(self.cpu_used / np.maximum(self.cpu, 1e-9), 1.0)[None],
            backlog=clearing_time(env.model.q_len[0] * mean_work, cpu_now)[None],
            capacity=capacity * step / mean_work,
            active=env.timeline.active[t],
            target_ms=env.target_ms,
        )
        return IntervalTelemetry(
            offered=offered,
            incoming=noisy(self.incoming / seconds),
            rejected=noisy(self.rejected / seconds),
            mean_ms=noisy(mean_ms),
            p95_ms=noisy(hist_quantile(self.server_hist, 0.95)),
            capacity=np.where(env.timeline.active[t], capacity, 0.0),
            backlog_start=noisy(self.backlog_start),
            backlog_end=noisy(self._backlog(t)),
            mesh=mesh,
            busy=noisy(self.cpu_used / np.maximum(self.cpu, 1e-9)),
        )


def priced_work(env: EdgeEnv, uniform: bool = False) -> np.ndarray:
    """``(S,)`` work per request the controller prices flows by: each service's own, or with
    ``uniform`` the services' mean for every one, what a controller that cannot tell the
    services' costs apart decides with (the operator measures them from CPU metrics; with
    ``--uniform-work`` the cost of not doing so can be measured)."""
    work = np.asarray(env.mean_cost, dtype=float)
    return np.full_like(work, work.mean()) if uniform else work


def model_env_for(
    env: EdgeEnv,
    can_reject: bool = False,
    max_utilisation: float | None = SAFE_UTILISATION,
    ramp_from: float | None = RAMP_FROM_UTILISATION,
    uniform_work: bool = False,
) -> ModelEnv:
    """The model environment of a simulated mesh (same topology, work and targets). Rollout
    routes without rejecting unless ``can_reject``: a service mesh cannot reject, so this is
    what the operator decides with; so is the utilisation cap and its ramp."""
    return ModelEnv(
        topology=env.topology,
        work=priced_work(env, uniform_work),
        target_ms=env.target_ms,
        reject_penalty=env.scenario.reject_penalty,
        step_seconds=env.scenario.step_seconds,
        can_reject=can_reject,
        max_utilisation=max_utilisation,
        ramp_from=ramp_from if max_utilisation is not None else None,
    )


def commissioning_routing(
    policy: Policy, obs: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``(A, action_dim)`` routing of one commissioning interval: the base policy's, mixed
    with a random routing by a random share of up to 70%, so the data covers more than the
    base policy's own states."""
    base = policy(obs, mask)[0]
    mix = rng.uniform(0.0, 0.7)
    random_routing = rng.dirichlet(np.ones(mask.shape[1]), size=mask.shape[0]) * mask
    return (1 - mix) * base + mix * random_routing / random_routing.sum(1, keepdims=True)


def commissioning_rows(
    scenario: Scenario,
    policy: Policy,
    intervals: int,
    interval_steps: int,
    seed: int,
    noise: float,
    uniform_work: bool = False,
) -> Iterator[Rows]:
    """The system model's rows of ``intervals`` intervals of the scenario *without its
    changes*, one interval at a time, played by :func:`commissioning_routing` (as a
    commissioning run would); service times from :func:`priced_work`."""
    calm = dataclasses.replace(scenario, events=())
    per_episode = calm.steps // interval_steps
    envs = max(1, -(-intervals // per_episode))
    rng = np.random.default_rng(seed + 7919)
    env = EdgeEnv(calm, num_envs=1, action_mode="neighbours", seed=seed + 1, track_servers=True)
    work = priced_work(env, uniform_work)
    for episode in range(envs):
        obs = env.reset()
        for _ in range(min(per_episode, intervals - episode * per_episode)):
            weights = commissioning_routing(policy, obs, env.action_mask(), rng)
            rec = IntervalRecorder(env)
            for _ in range(interval_steps):
                obs, _, _, info = env.step(weights[None])
                rec.add(info)
            tel = rec.telemetry(rng, noise)
            yield model_rows(tel, work, interval_steps * calm.step_seconds)


def warm_start(model: SystemModel, rows: Iterable[Rows]) -> None:
    """Feed ``model`` every interval's rows (say, :func:`commissioning_rows`), then fit it
    once if they are enough; with fewer (``--warmup 0``) the model starts cold, as the
    operator's does, and is fitted live once the rows come."""
    for interval in rows:
        model.add(*interval)
    if model.rows >= model.min_rows:
        model.fit()


def rollout_settings(args) -> RolloutSettings:
    """The rollout knobs ``args`` set (SettingError naming the field if one is out of range)."""
    return RolloutSettings(
        horizon=args.horizon,
        margin=args.margin,
        samples=args.samples,
        steps=tuple(args.steps),
        rounds=args.rounds,
        screen_horizon=args.screen_horizon,
        tail=args.tail,
        seed=args.seed,
    )


def run_arm(
    arm: str,
    scenario: Scenario,
    policy: Policy,
    args,
    model: SystemModel | None = None,
    schedule: OracleSchedule | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[Cycle]:
    """One controller through the whole scenario; returns its cycles. ``schedule`` is the
    routing an ``oracle`` arm plays (default: re-solved at each change); callers that run
    many seeds solve it once. ``progress(1)`` is called after each cycle (a bar's update)."""
    env = EdgeEnv(
        scenario, num_envs=1, action_mode="neighbours", seed=args.seed, track_servers=True
    )
    obs = env.reset()
    rng = np.random.default_rng(args.seed + 104729)
    if arm != "oracle":
        schedule = None
    elif schedule is None:
        schedule = oracle_schedule(scenario, seed=args.seed)
    adapter = None
    if arm == "rollout":
        adapter = Adapter(
            model_env_for(
                env,
                can_reject=args.allow_reject,
                max_utilisation=args.max_utilisation or None,
                ramp_from=(
                    min(args.ramp_from, args.max_utilisation) if args.max_utilisation else None
                ),
                uniform_work=args.uniform_work,
            ),
            policy,
            model,
            rollout_settings(args),
            interval_seconds=args.interval * scenario.step_seconds,
            max_nmae=args.max_nmae,
            prior=args.prior,
        )
    mask = env.action_mask()
    if arm == "rollout" and not args.allow_reject:
        mask = without_reject(mask)  # the first routing too is one a mesh can carry
    weights = schedule.weights_at(0) if schedule is not None else policy(obs, mask)[0]
    cycles = []
    # The steps after the last full interval are a shorter cycle of their own.
    for start in range(0, scenario.steps, args.interval):
        rec = IntervalRecorder(env)
        for _ in range(min(args.interval, scenario.steps - start)):
            if schedule is not None:
                weights = schedule.weights_at(env.t)
            obs, _, _, info = env.step(weights[None])
            rec.add(info)
        cycle = rec.cycle()
        cycle.weights = np.round(weights, 4).tolist()
        tel = rec.telemetry(rng, args.noise)
        if arm == "base":
            weights = policy(mesh_observation(env.topology, tel.mesh), env.action_mask())[0]
        elif arm == "rollout":
            adapter.observe(tel)
            decision = adapter.decide()
            weights = decision.weights
            cycle.decision_ms = decision.decision_ms
            cycle.fallback = decision.fallback
        cycles.append(cycle)
        if progress is not None:
            progress(1)
    return cycles


def summary_lines(summary: Mapping[str, Any], prefix: str = "") -> str:
    """The totals for a terminal: nested figures under dotted names, numbers rounded to what
    can be read, an absent figure as "-" (``--json`` keeps every digit)."""
    lines = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            lines.append(summary_lines(value, f"{name}."))
            continue
        if value is None:
            shown = "-"
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        elif isinstance(value, list):
            shown = ", ".join(str(v) for v in value) or "-"
        else:
            shown = str(value)
        lines.append(f"{name:45s} {shown}")
    return "\n".join(lines)


def change_cycles(scenario: Scenario, interval: int) -> list[int]:
    """Cycles in which the scenario's resources or loads change."""
    starts = [start for start, _ in segments(Timeline.of(scenario))[1:]]
    return [start // interval for start in starts]


def settled_windows(scenario: Scenario, interval: int, cycles: int) -> list[tuple[int, int]]:
    """``[(first, end), ...]`` cycles from the third after each change to the next change or
    the end: where the ``*_after_3_cycles`` figures are taken (none without changes)."""
    changes = change_cycles(scenario, interval)
    ends = [*changes[1:], cycles]
    return [(c + 3, nxt) for c, nxt in zip(changes, ends, strict=False) if c + 3 < nxt]


def counted_cycles(scenario: Scenario, interval: int, cycles: int) -> list[int]:
    """The cycles the ``*_after_3_cycles`` figures are taken over, in order."""
    return [i for lo, hi in settled_windows(scenario, interval, cycles) for i in range(lo, hi)]


def violations_where_clean(cycles: list[Cycle], reference: list[Cycle], at: Iterable[int]) -> int:
    """Services that missed their target in ``cycles``, counted over the cycles ``at`` in
    which ``reference`` (the oracle) missed none."""
    return sum(len(cycles[i].slo_violations) for i in at if not reference[i].slo_violations)


def summarise(scenario: Scenario, results: dict[str, list[Cycle]], interval: int) -> dict:
    cycles = len(results["oracle"])
    changes = change_cycles(scenario, interval)
    windows = settled_windows(scenario, interval, cycles)
    after = counted_cycles(scenario, interval, cycles)
    out: dict = {"scenario": scenario.name, "cycles": cycles, "change_cycles": changes}
    oracle = np.array([c.cost for c in results["oracle"]])
    for arm in ("base", "rollout"):
        cost = np.array([c.cost for c in results[arm]])
        ratios = [cost[lo:hi].sum() / max(oracle[lo:hi].sum(), 1e-12) for lo, hi in windows]
        out[f"{arm}_cost_over_oracle_after_3_cycles"] = float(np.mean(ratios)) if ratios else None
        out[f"{arm}_cost_after_change"] = float(cost[after].mean()) if after else None
    for arm in ARMS:
        cs = results[arm]
        out[f"{arm}_cost_per_request_s"] = float(np.mean([c.cost for c in cs]))
        out[f"{arm}_latency_ms"] = float(np.mean([c.latency_ms for c in cs]))
        out[f"{arm}_lost_pct"] = float(np.mean([c.lost_pct for c in cs]))
    for arm in ("base", "rollout"):
        out[f"{arm}_slo_violations_after_3_cycles"] = violations_where_clean(
            results[arm], results["oracle"], after
        )
    out["slo_violations_after_3_cycles"] = out["rollout_slo_violations_after_3_cycles"]
    # The same count over every interval after the third cycle, the oracle's own included:
    # at high load its static routing misses targets too, which the figures above leave out.
    out["slo_violations_after_3_cycles_by_arm"] = {
        arm: sum(len(results[arm][i].slo_violations) for i in after) for arm in ARMS
    }
    times = [c.decision_ms for c in results["rollout"]]
    out["decision_ms_p50"] = float(np.percentile(times, 50))
    out["decision_ms_p95"] = float(np.percentile(times, 95))
    out["fallback_cycles"] = sum(c.fallback is not None for c in results["rollout"])
    return out


def cycle_report(scenario: Scenario, results: dict[str, list[Cycle]], interval: int) -> list[dict]:
    """One record per cycle: what each controller's routing cost and missed there, whether the
    cycle saw a change and whether the ``*_after_3_cycles`` figures count it."""
    changes = set(change_cycles(scenario, interval))
    counted = set(counted_cycles(scenario, interval, len(results["oracle"])))
    records = []
    for i in range(len(results["oracle"])):
        record: dict = {"cycle": i, "change": i in changes, "counted": i in counted}
        for arm in ARMS:
            c = results[arm][i]
            record[arm] = {
                "cost": c.cost,
                "latency_ms": c.latency_ms,
                "p95_ms": {k: v if np.isfinite(v) else None for k, v in c.p95_ms.items()},
                "lost_pct": c.lost_pct,
                "slo_violations": c.slo_violations,
            }
        record["rollout"] |= {
            "decision_ms": results["rollout"][i].decision_ms,
            "fallback": results["rollout"][i].fallback,
        }
        records.append(record)
    return records


def cycle_table(records: list[dict]) -> str:
    """The per-cycle records as a table for people: each controller's cost per request in
    milliseconds, rollout's decision time, and the services over their target. ``*`` marks a
    change, ``+`` a cycle the ``*_after_3_cycles`` figures count."""
    head = f"{'cycle':>7} " + " ".join(f"{arm + ' cost ms':>15}" for arm in ARMS)
    lines = [f"{head} {'decide ms':>9}  rollout misses (oracle's)"]
    for r in records:
        mark = ("*" if r["change"] else " ") + ("+" if r["counted"] else " ")
        costs = " ".join(f"{1000 * r[arm]['cost']:15.1f}" for arm in ARMS)
        misses = ",".join(r["rollout"]["slo_violations"]) or "-"
        oracle = ",".join(r["oracle"]["slo_violations"])
        fallback = f" fallback: {r['rollout']['fallback']}" if r["rollout"]["fallback"] else ""
        lines.append(
            f"{mark}{r['cycle']:5d} {costs} {r['rollout']['decision_ms']:9.1f}  {misses}"
            + (f" ({oracle})" if oracle else "")
            + fallback
        )
    return "\n".join(lines)


def plot(scenario: Scenario, results: dict[str, list[Cycle]], interval: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency_ax, cost_ax, weights_ax) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    seconds = interval * scenario.step_seconds
    for ax, label, value in (
        (latency_ax, "mean latency (ms)", lambda c: c.latency_ms),
        (cost_ax, "cost per request (ms)", lambda c: c.cost * 1000),
    ):
        for arm in ARMS:
            t = np.arange(len(results[arm])) * seconds
            ax.plot(t, [value(c) for c in results[arm]], label=arm)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend()
    rollout = np.array([c.weights for c in results["rollout"]])  # (cycles, A, K+2)
    t = np.arange(len(rollout)) * seconds
    weights_ax.plot(t, rollout[:, :, 0].mean(axis=1), label="local")
    weights_ax.plot(t, rollout[:, :, 1:-1].sum(axis=2).mean(axis=1), label="forwarded")
    weights_ax.plot(t, rollout[:, :, -1].mean(axis=1), label="rejected")
    weights_ax.set_ylabel("rollout weights (mean over agents)")
    weights_ax.set_xlabel("time (s)")
    weights_ax.legend()
    for c in change_cycles(scenario, interval):
        for ax in (latency_ax, cost_ax, weights_ax):
            ax.axvline(c * seconds, color="k", ls="--", lw=0.8)
    fig.suptitle(f"{scenario.name}: adaptation after changes (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    """The command line of the loop, also the settings other scripts run it with."""
    parser = parser_from_doc("python -m simulator.adapt", __doc__)
    parser.add_argument(
        "--scenario",
        default="mesh-10x3-capacity-drop",
        help="bundled change scenario (--list-scenarios) or YAML path",
    )
    parser.add_argument("--policy", default="default", help="checkpoint (default: bundled)")
    parser.add_argument(
        "--interval", type=positive_int, default=5, help="simulator steps per cycle"
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=360,
        help="warm-start intervals (0: the model starts cold and learns live)",
    )
    parser.add_argument(
        "--noise", type=non_negative_float, default=0.05, help="relative telemetry noise"
    )
    parser.add_argument(
        "--horizon",
        type=int,
        default=RolloutSettings.horizon,
        help="intervals of base-policy play scored after each candidate's own interval",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=RolloutSettings.margin,
        help="relative predicted gain a move must bring to replace the base action",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=RolloutSettings.samples,
        help="arrival futures each candidate is scored on (1: the forecast itself)",
    )
    parser.add_argument(
        "--steps",
        type=float,
        nargs="+",
        default=list(RolloutSettings.steps),
        help="sizes of the candidate moves (shares of weight shifted)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=RolloutSettings.rounds,
        help="rounds of agent-by-agent moves at most, each from the last round's routing",
    )
    parser.add_argument(
        "--allow-reject",
        action="store_true",
        help="let rollout move weight onto the reject entry, as the simulator's nodes allow "
        "(the operator cannot: a mesh has no reject route)",
    )
    parser.add_argument(
        "--max-utilisation",
        type=non_negative_float,
        default=SAFE_UTILISATION,
        help="price work beyond this share of a node's capacity as rejected (0: no cap)",
    )
    parser.add_argument(
        "--ramp-from",
        type=non_negative_float,
        default=RAMP_FROM_UTILISATION,
        help="below the cap, price work past this share of a node's capacity at a share of "
        "the reject price rising to all of it at the cap (at or above the cap: a step at it)",
    )
    parser.add_argument(
        "--screen-horizon",
        type=int,
        default=RolloutSettings.screen_horizon,
        help="lookahead of the screen that ranks every agent's moves",
    )
    parser.add_argument(
        "--uniform-work",
        action="store_true",
        help="price every request at the services' mean work, as a controller that cannot "
        "tell the services' costs apart would (the operator measures them)",
    )
    parser.add_argument(
        "--tail",
        action="store_true",
        help="end each score with the last lookahead interval's cost taken to last for ever",
    )
    parser.add_argument(
        "--max-nmae",
        type=non_negative_float,
        default=0.3,
        help="model error above which rollout falls back",
    )
    parser.add_argument(
        "--regressor",
        choices=("forest", "boosting"),
        default="forest",
        help="the system model's scikit-learn regressor",
    )
    parser.add_argument(
        "--prior",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decide on the queueing prior while the learned model is not trusted, and price "
        "the states outside its data by it, as the operator does (--no-prior: keep the base "
        "policy's action then, to measure the learned model alone)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="arrivals, telemetry noise and warm start"
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per cycle, then one of the totals"
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        type=png_path,
        help="save latency, cost and weights over time with the changes",
    )
    parser.add_argument(
        "--list-scenarios", action="store_true", help="print the bundled change scenarios' names"
    )
    return parser


def check_scenario(scenario: Scenario, interval: int, needs_changes: bool = False) -> None:
    """Raise ScenarioError if the live loop cannot run ``scenario`` in cycles of
    ``interval`` steps (or, with ``needs_changes``, has no change to measure after)."""
    if not scenario.models_latency:
        raise ScenarioError(
            f"scenario {scenario.name!r} sets no latency_target_ms, and the loop scores "
            f"latency against targets; choose a latency scenario such as {CHANGE_SCENARIOS[0]}"
        )
    if interval > scenario.steps:
        raise ScenarioError(
            f"{interval} steps per cycle (--interval), but {scenario.name} has {scenario.steps}"
        )
    if needs_changes and not scenario.events:
        raise ScenarioError(
            f"scenario {scenario.name!r} has no events, and what is measured follows a change; "
            f"choose a change scenario: {', '.join(CHANGE_SCENARIOS)}"
        )


def load(args) -> tuple[Scenario, Policy]:
    """The scenario and the base policy ``args`` name (ScenarioError, PolicyError or
    CheckpointError saying what is wrong)."""
    scenario = fitted_scenario(load_scenario(args.scenario), args.policy, "neighbours")
    check_scenario(scenario, args.interval)
    env = EdgeEnv(scenario, num_envs=1, action_mode="neighbours")
    return scenario, build_policy(args.policy, env, args.seed)


def warm_model(scenario: Scenario, policy: Policy, args, scored_intervals: int = 12) -> SystemModel:
    """The system model rollout starts from: fitted on ``args.warmup`` commissioning
    intervals of the scenario without its changes."""
    model = SystemModel(
        regressor=args.regressor,
        interval_s=args.interval * scenario.step_seconds,
        seed=args.seed,
        scored_intervals=scored_intervals,
    )
    warm_start(
        model,
        commissioning_rows(
            scenario,
            policy,
            args.warmup,
            args.interval,
            args.seed,
            args.noise,
            uniform_work=args.uniform_work,
        ),
    )
    return model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_scenarios:
        print(json.dumps(list(CHANGE_SCENARIOS)) if args.json else "\n".join(CHANGE_SCENARIOS))
        return 0
    try:
        rollout_settings(args)
    except SettingError as exc:
        print(f"error: --{exc.name.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    try:
        scenario, policy = load(args)
    except (ScenarioError, PolicyError, checkpoint.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = warm_model(scenario, policy, args)
    results = {}
    cycles = -(-scenario.steps // args.interval)
    with tqdm(total=len(ARMS) * cycles, desc=scenario.name, unit="cycle", disable=args.json) as bar:
        for arm in ARMS:
            bar.set_postfix_str(arm)
            model_of_arm = model if arm == "rollout" else None
            results[arm] = run_arm(arm, scenario, policy, args, model_of_arm, progress=bar.update)
    summary = summarise(scenario, results, args.interval)
    accuracy = model.accuracy()
    summary["model_accuracy"] = accuracy.as_dict() if accuracy else None
    records = cycle_report(scenario, results, args.interval)
    if args.json:
        for record in records:
            print(json_line(record))
        print(json_line(summary))
    else:
        print(cycle_table(records))
        print(summary_lines(summary))
    if args.plot:  # after the results: a plot that cannot be saved must not lose them
        sys.stdout.flush()
        plot(scenario, results, args.interval, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
