"""Decision latency of multi-agent rollout with the bundled mesh policy, as JSON.

    python benchmarks/decision.py                       # 10 and 100 agent instances
    python benchmarks/decision.py --agents 30 --horizon 5 --trials 50

Each trial draws new arrivals on a ring-with-chords mesh (maximum degree 3, one service per
node, so agent instances = nodes), and times one full decision as the operator's adapter
makes it (``policies.adaptation.Adapter.decide``): the latency table of the nodes' service
times, from the system model with the queueing prior outside its data; the base action; and
the search. Every agent's candidate moves are screened in one batch on one interval of the
model, then the promising moves, joined agent by agent, are scored by one interval plus
``horizon`` base-policy intervals. Decided as the operator decides: routes only, under the
utilisation cap, the routing in place offered as a second start (here the last trial's
decision). The system model is fitted on synthetic rows once (refits happen between
decisions, not inside them).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from threadpoolctl import threadpool_limits

from policies import checkpoint
from policies.model_env import RAMP_FROM_UTILISATION, SAFE_UTILISATION, MeshState, ModelEnv
from policies.observation import MeshTelemetry
from policies.queueing import prior_table, with_prior
from policies.rollout import Rollout, RolloutSettings
from policies.system_model import SystemModel
from policies.topology import Topology
from simulator.cli import at_least, json_line, non_negative_int, parser_from_doc, positive_int

INTERVAL_S = 10.0  # the example policy's intervalSeconds: what the queueing prior spans


def ring_with_chords(n: int, rng: np.random.Generator) -> Topology:
    names = [f"edge-{i}" for i in range(n)]
    nbrs: dict[str, list[str]] = {x: [] for x in names}
    links = {}
    for i in range(n):
        a, b = names[i], names[(i + 1) % n]
        nbrs[a].append(b)
        nbrs[b].append(a)
        links[frozenset([a, b])] = float(rng.uniform(2, 8))
    for i in range(0, n - n % 2, 4):  # chords across the ring keep the degree at most 3
        a, b = names[i], names[(i + n // 2) % n]
        if len(nbrs[a]) < 3 and len(nbrs[b]) < 3 and b not in nbrs[a]:
            nbrs[a].append(b)
            nbrs[b].append(a)
            links[frozenset([a, b])] = float(rng.uniform(8, 15))
    return Topology.build(names, ["fn"], nbrs, links, max_degree=3)


def synthetic_model(seed: int) -> SystemModel:
    """A forest fitted on rows of a queue-like latency curve with noise, covering overload
    and queues of a few seconds (so that decisions are timed, not fallbacks)."""
    rng = np.random.default_rng(seed)
    model = SystemModel(interval_s=INTERVAL_S, seed=seed)
    for _ in range(360):
        rho = rng.uniform(0.0, 2.0, 10)
        svc = rng.uniform(5.0, 40.0, 10)
        backlog = rng.exponential(1.0, 10)
        mean = svc / np.maximum(1 - np.minimum(rho, 0.95), 0.05) + 1000 * backlog
        success = np.minimum(1.0, 1.0 / np.maximum(rho, 1e-9))
        after = np.maximum(rho - 1.0, 0.0) * 5.0
        y = np.stack([mean, 2.5 * mean, success, after], axis=1) * rng.lognormal(0, 0.05, (10, 4))
        model.add(np.stack([rho, svc, backlog], axis=1), y)
    model.fit()
    return model


def measure(agents: int, horizon: int, trials: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    topo = ring_with_chords(agents, rng)
    env = ModelEnv(  # as the operator decides: routes only, under the utilisation cap
        topo,
        work=np.array([10.0]),
        target_ms=np.array([200.0]),
        reject_penalty=4,
        can_reject=False,
        max_utilisation=SAFE_UTILISATION,
        ramp_from=RAMP_FROM_UTILISATION,
    )
    policy = checkpoint.load(checkpoint.bundled_for("neighbours", 3))
    model = synthetic_model(seed)
    rollout = Rollout(env, policy, RolloutSettings(horizon=horizon, seed=seed))
    times, changed, fallbacks = [], [], 0
    in_place = None  # the routing the operator finds written: the last decision
    for trial in range(trials + 1):
        cap = rng.uniform(600, 1500, agents)
        arrivals = cap / 10.0 * rng.uniform(0.3, 0.95, agents)
        n = topo.num_nodes
        tel = MeshTelemetry(
            offered=arrivals.reshape(1, n, 1),
            latency_ms=np.full((1, n, 1), 50.0),
            rejected=np.zeros((1, n, 1)),
            arrived_prev=arrivals.reshape(1, n, 1),
            utilisation=np.minimum(arrivals * 10 / cap, 1.0)[None],
            backlog=np.zeros((1, n)),
            capacity=cap / 10.0,
            active=np.ones(n, bool),
            target_ms=np.array([200.0]),
        )
        state = MeshState(arrivals, cap, np.zeros(n), tel)
        start = time.perf_counter()
        service_ms = env.service_ms(cap)
        prior = prior_table(INTERVAL_S, service_ms, state.backlog)
        table = with_prior(model.table(service_ms), prior)
        base = rollout.base_action(state)
        decision = rollout.decide(state, table, base=base, incumbent=in_place)
        elapsed = 1000.0 * (time.perf_counter() - start)
        in_place = decision.weights
        if not trial:  # the first call warms caches
            continue
        if decision.fallback is not None:  # no lookahead ran: not a decision's latency
            fallbacks += 1
            continue
        times.append(elapsed)
        changed.append(len(decision.changed_agents))
    return {
        "agents": agents,
        "horizon": horizon,
        "trials": trials,
        "timed": len(times),
        "decision_ms_p50": float(np.percentile(times, 50)),
        "decision_ms_p95": float(np.percentile(times, 95)),
        "decision_ms_max": float(np.max(times)),
        "agents_changed_mean": float(np.mean(changed)),
        "fallbacks_not_timed": fallbacks,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("decision.py", __doc__)
    parser.add_argument(
        "--agents",
        type=at_least(2),  # a mesh of one node has no neighbour to route to
        nargs="+",
        default=[10, 100],
        help="agent instances, one run each",
    )
    parser.add_argument(
        "--horizon",
        type=positive_int,
        default=5,
        help="base-policy intervals after each candidate's",
    )
    parser.add_argument("--trials", type=positive_int, default=30, help="decisions timed per run")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds the meshes and arrivals"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="BLAS threads (as the operator)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        results = [measure(a, args.horizon, args.trials, args.seed) for a in args.agents]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json_line({"results": results, "peak_rss_mb": round(peak_mb, 1)}))


if __name__ == "__main__":
    main()
