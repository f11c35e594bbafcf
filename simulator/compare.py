"""Policies side by side: every baseline, the bound or oracle, and any policy given.

Two views of "how far from optimal":

* simulated: each policy's cost per request in the simulator over the ``oracle`` policy's
  (the fluid optimum played open-loop). A dynamic policy reacts to the queues it sees and may
  beat the best *static* routing; the ratio then drops below 1, and that is reported, not
  hidden.
* fluid: each policy's routing weights, averaged over every piece of the scenario, scored on
  the fluid model against the oracle's. No static weights can beat the oracle there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.baselines import HEURISTICS
from policies.oracle import fluid_cost
from simulator.env import ActionMode, EdgeEnv
from simulator.episodes import BOUNDS, build_policy, fitted_scenario, run_episodes, summarise
from simulator.fluid import OracleSchedule, oracle_schedule
from simulator.scenario import Scenario

NEIGHBOUR_ONLY = ("least-loaded", "least-request", "peak-ewma", "capacity-proportional")


def default_policies(scenario: Scenario, action_mode: ActionMode) -> list[str]:
    """The baselines that fit the action mode, then the scenario's yardstick."""
    chooses = action_mode == "neighbours" and scenario.max_degree > 0
    names = [n for n in HEURISTICS if chooses or n not in NEIGHBOUR_ONLY]
    if action_mode == "neighbours" and scenario.models_latency:
        return [*names, "oracle"]
    return [*names, "global-node"] if scenario.reward == "dfaas" and scenario.is_static else names


def static_weights(
    scenario: Scenario,
    policy: str,
    pieces: Sequence[tuple[int, int]],
    seed: int = 0,
    num_envs: int = 4,
) -> np.ndarray:
    """``(P, A, K+2)`` a policy's mean routing fractions over each piece of the scenario
    (pieces as in :func:`simulator.fluid.segments`): its behaviour as static weights."""
    seen = fitted_scenario(scenario, policy, "neighbours")
    env = EdgeEnv(seen, num_envs=num_envs, action_mode="neighbours", seed=seed)
    act = build_policy(policy, env, seed)
    total = np.zeros((len(pieces), env.num_agents, env.action_dim))
    obs, done = env.reset(), False
    while not done:
        piece = next(i for i, (s, e) in enumerate(pieces) if s <= env.t < e)
        actions = act(obs, env.action_mask())
        total[piece] += actions.mean(axis=0)
        obs, _, done, _ = env.step(actions)
    steps = np.array([e - s for s, e in pieces], dtype=float)
    # Slots past the mesh's degree are masked, so they carry nothing: the mesh's own layout.
    own = [*range(scenario.max_degree + 1), env.action_dim - 1]
    return total[..., own] / steps[:, None, None]


def fluid_cost_over_oracle(
    scenario: Scenario, schedule: OracleSchedule, policy: str, seed: int = 0
) -> float | None:
    """Traffic-weighted fluid cost of ``policy``'s static weights over the oracle's."""
    weights = static_weights(scenario, policy, schedule.pieces, seed)
    spans = [e - s for s, e in schedule.pieces]
    pieces = zip(schedule.models, weights, spans, strict=True)
    cost = sum(float(fluid_cost(model, w)) * n for model, w, n in pieces)
    best = sum(r.cost * n for r, n in zip(schedule.routings, spans, strict=True))
    return ratio(cost, best)


def ratio(cost: float, oracle: float) -> float | None:
    """``cost`` over the oracle's; None where the oracle's is zero (no load to serve)."""
    return cost / oracle if oracle > 0 else None


def compare(
    scenario: Scenario,
    policies: list[str],
    episodes: int,
    seed: int,
    num_envs: int = 100,
    action_mode: ActionMode | None = None,
    progress: bool = False,
) -> list[dict]:
    """One summary row per policy; with an oracle, costs relative to it in both views."""
    rows = []
    for name in policies:
        row = {
            "policy": name,
            **summarise(
                run_episodes(scenario, name, episodes, seed, num_envs, action_mode, progress)
            ),
        }
        rows.append(row)
    oracle = next((r for r in rows if r["policy"] == "oracle"), None)
    if oracle is not None:
        schedule = oracle_schedule(scenario, seed=seed)
        for row in rows:
            row["cost_over_oracle"] = ratio(row["cost_per_request_s"], oracle["cost_per_request_s"])
            if row["policy"] in BOUNDS:
                continue  # a pooled node routes nothing: it has no weights to price
            row["fluid_cost_over_oracle"] = fluid_cost_over_oracle(
                scenario, schedule, row["policy"], seed
            )
    return rows


COLUMNS = (
    ("processed_pct", "processed %", "{:.2f}"),
    ("return_per_agent", "return", "{:.2f}"),
    ("latency_mean_ms", "lat mean ms", "{:.1f}"),
    ("latency_p95_ms", "lat p95 ms", "{:.1f}"),
    ("cost_over_oracle", "cost/oracle", "{:.3f}"),
    ("fluid_cost_over_oracle", "fluid/oracle", "{:.3f}"),
)


def format_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    width = max(len(r["policy"]) for r in rows) + 2
    lines = ["policy".ljust(width) + "".join(f"{title:>14}" for _, title, _ in cols)]
    for r in rows:
        cells = "".join(
            f"{(fmt.format(r[key]) if r.get(key) is not None else '-'):>14}" for key, _, fmt in cols
        )
        lines.append(r["policy"].ljust(width) + cells)
    beaten = [
        r["policy"]
        for r in rows
        if (r.get("cost_over_oracle") or 1.0) < 1.0 and r["policy"] not in BOUNDS
    ]
    if beaten:
        lines.append(
            f"note: {', '.join(beaten)} beat the best static routing in the simulator "
            "(dynamic policies react to the queues they observe; the oracle is static)."
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """A bar chart of the headline metric per policy (cost over the oracle, or processed %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "cost_over_oracle" if "cost_over_oracle" in rows[0] else "processed_pct"
    label = "cost / oracle (lower is better)" if key == "cost_over_oracle" else "processed %"
    names = [r["policy"] for r in rows]
    values = [r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    ax.bar(
        names,
        values,
        color=["#4c72b0" if n not in ("oracle", "global-node") else "#55a868" for n in names],
    )
    if key == "cost_over_oracle":
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
