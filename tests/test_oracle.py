"""The fluid-model oracle: the closed form it must reproduce, optimality conditions, and the
claim that no static weights of any baseline beat it on the bundled generic scenarios."""

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import yaml

from policies.baselines import HEURISTICS, PolicyError
from policies.oracle import FluidModel, fluid_cost, solve
from policies.topology import Topology
from simulator.compare import default_policies, static_weights
from simulator.env import EdgeEnv, Timeline
from simulator.episodes import build_policy
from simulator.evaluate import main
from simulator.fluid import oracle_schedule, segments
from simulator.scenario import (
    ScenarioError,
    bundled_names,
    load_scenario,
    parse_scenario,
)

MU = np.array([10.0, 4.0, 1.0, 0.3])


def star(capacity, arrival, delay_ms=0.0, reject_cost=1e3):
    """One source ``a`` whose neighbours are the other servers (the parallel-server case)."""
    names = ["a", "b", "c", "d"][: len(capacity)]
    topo = Topology.build(
        names,
        ["f"],
        {"a": names[1:], **{n: ["a"] for n in names[1:]}},
        {frozenset(("a", n)): delay_ms for n in names[1:]},
    )
    arrivals = np.zeros(len(capacity))
    arrivals[0] = arrival
    return FluidModel(
        topo,
        capacity=np.asarray(capacity, float),
        arrivals=arrivals,
        work=np.array([1.0]),
        reject_cost=np.array([reject_cost]),
        max_utilisation=0.999,
    )


def square_root_rule(mu, total):
    """lambda_j = mu_j - sqrt(mu_j)(sum mu - total)/sum sqrt(mu), slowest servers dropped."""
    used = np.ones(len(mu), bool)
    while True:
        flows = np.zeros(len(mu))
        root = np.sqrt(mu[used])
        flows[used] = mu[used] - root * (mu[used].sum() - total) / root.sum()
        if (flows[used] >= 0).all():
            return flows
        used[np.flatnonzero(used)[np.argmin(mu[used])]] = False


@pytest.mark.parametrize("total", [1.0, 6.0, 12.0, 15.0])
def test_oracle_matches_the_square_root_rule(total):
    routing = solve(star(MU, total))
    flows = routing.weights[0, :4] * total
    expected = square_root_rule(MU, total)
    assert flows == pytest.approx(expected, abs=2e-3 * total)
    assert routing.weights[0, -1] == pytest.approx(0.0, abs=1e-6)
    assert routing.cost == pytest.approx((expected / (MU - expected)).sum(), rel=1e-6)


def test_used_routes_have_equal_marginal_cost_including_link_delay():
    model = star(MU[:3], 8.0, delay_ms=50.0)
    routing = solve(model)
    flows = routing.weights[0, :3] * 8.0
    marginal = MU[:3] / (MU[:3] - flows) ** 2 + np.array([0.0, 0.05, 0.05])
    used = flows > 1e-3
    assert used.sum() >= 2
    assert np.ptp(marginal[used]) < 1e-2 * marginal[used].mean()
    assert (marginal[~used] >= marginal[used].max() - 1e-6).all()


def test_overload_is_rejected_only_when_the_marginal_cost_reaches_the_penalty():
    cheap_rejects = solve(star(MU[:2], 13.0, reject_cost=0.5))
    assert cheap_rejects.weights[0, -1] > 0.05
    costly_rejects = solve(star(MU[:2], 13.0, reject_cost=1e3))
    assert costly_rejects.weights[0, -1] < 1e-3


def test_no_random_static_weights_beat_the_oracle(mesh):
    schedule = oracle_schedule(mesh)
    model, best = schedule.models[0], schedule.routings[0]
    rng = np.random.default_rng(0)
    samples = rng.dirichlet(np.ones(model.action_dim), size=(2000, model.topology.num_agents))
    # Also perturb the optimum itself: local moves must not improve it either.
    nudged = np.abs(best.weights + rng.normal(0, 0.02, (500, *best.weights.shape)))
    costs = np.concatenate([fluid_cost(model, samples), fluid_cost(model, nudged)])
    assert costs.min() >= best.cost * (1 - 1e-6)


GENERIC = [n for n in bundled_names() if load_scenario(n).models_latency]


@pytest.mark.parametrize("name", GENERIC)
def test_no_baseline_static_weights_beat_the_oracle_on_the_fluid_model(name):
    scenario = load_scenario(name)
    schedule = oracle_schedule(scenario)
    for policy in HEURISTICS:
        weights = static_weights(scenario, policy, schedule.pieces, num_envs=1)
        for model, routing, w in zip(schedule.models, schedule.routings, weights, strict=True):
            assert fluid_cost(model, w) >= routing.cost * (1 - 1e-6), (policy, name)


def test_scenario_pieces_follow_its_events():
    surge = load_scenario("mesh-10x3-surge")
    assert segments(Timeline.of(surge)) == [(0, 100), (100, 200), (200, 300)]
    schedule = oracle_schedule(surge)
    # While two nodes carry double load, the best routing costs more.
    costs = [r.cost_per_request for r in schedule.routings]
    assert costs[1] > costs[0] and costs[1] > costs[2]


def test_oracle_re_solved_every_interval_follows_drift_within_a_piece():
    surge = load_scenario("mesh-10x3-surge")  # edge-6's infer load is diurnal
    schedule = oracle_schedule(surge, every=40)
    # Spans of at most 40 steps, cut at the changes too.
    assert schedule.pieces[:4] == ((0, 40), (40, 80), (80, 100), (100, 140))
    assert schedule.pieces[-1] == (280, 300) and len(schedule.pieces) == 9
    # The diurnal load rises between two spans of one piece, and the routing follows it.
    edge6_infer = surge.node_names.index("edge-6") * len(surge.services) + 1
    arrivals = [m.arrivals[edge6_infer] for m in schedule.models]
    assert arrivals[2] < 0.6 * arrivals[1]  # steps 80-100 against 40-80
    assert not np.allclose(schedule.weights_at(80), schedule.weights_at(40), atol=1e-3)
    with pytest.raises(ValueError, match="every"):
        oracle_schedule(surge, every=0)


def test_oracle_policy_routes_around_a_failed_node():
    scenario = load_scenario("mesh-10x3-node-failure")
    env = EdgeEnv(scenario, num_envs=1, seed=0)
    act = build_policy("oracle", env, seed=0)
    obs = env.reset()
    failed = scenario.node_names.index("edge-0")
    for _ in range(scenario.steps):
        actions = act(obs, env.action_mask())
        assert (actions[0][~env.action_mask()] == 0).all()
        obs, _, done, _ = env.step(actions)
        if done:
            break
    # After the failure nobody sends anything to edge-0.
    routes = oracle_schedule(scenario).models[1].routes
    assert not (routes == failed).any()


def test_oracle_needs_latency_targets_and_the_neighbour_mode(paise):
    with pytest.raises(PolicyError, match="neighbours"):
        build_policy("oracle", EdgeEnv(paise, num_envs=1), seed=0)
    with pytest.raises(PolicyError, match="latency_target_ms"):
        build_policy("oracle", EdgeEnv(paise, num_envs=1, action_mode="neighbours"), seed=0)


TINY = {
    "name": "tiny-mesh",
    "steps": 40,
    "step_seconds": 1,
    "reward": "latency",
    "defaults": {"cpu": 200, "ram": 4000, "queue_capacity": 50},
    "nodes": [
        {"name": "a", "cpu": 300, "neighbours": ["b", "c"]},
        {"name": "b", "cpu": 100, "neighbours": ["a", "c"]},
        {"name": "c", "neighbours": ["a", "b"]},
    ],
    "links": [{"between": ["a", "b"], "latency_ms": 5}],
    "services": [
        {
            "name": "f",
            "latency_target_ms": 300,
            "request_classes": [
                {
                    "cpu": {"min": 5, "mean": 10, "max": 15, "std": 2},
                    "ram": {"min": 1, "mean": 2, "max": 3, "std": 1},
                }
            ],
        }
    ],
    "workload": {
        "default": {"kind": "poisson", "rate": 5},
        "overrides": [{"node": "b", "service": "f", "workload": {"kind": "poisson", "rate": 12}}],
    },
}


def test_compare_reports_costs_over_the_oracle(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    parse_scenario(TINY)  # the test's own scenario is valid
    png = tmp_path / "cmp.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["--scenario", str(path), "--compare", "--episodes", "2", "--json", "--plot", str(png)]
        )
    assert code == 0
    rows = {r["policy"]: r for r in json.loads(out.getvalue())["policies"]}
    assert rows["oracle"]["cost_over_oracle"] == pytest.approx(1.0)
    assert rows["oracle"]["fluid_cost_over_oracle"] == pytest.approx(1.0, abs=1e-6)
    # b is overloaded alone (12 x 10 CPU > 100): serving all locally is far worse.
    assert rows["apl"]["cost_over_oracle"] > 2.0
    assert min(r["fluid_cost_over_oracle"] for r in rows.values()) >= 1.0 - 1e-6
    assert png.stat().st_size > 1000


def test_compare_takes_the_pooled_bound_on_a_latency_scenario(tmp_path):
    """``--policy global-node`` used to end the comparison in "unknown policy": the pooled
    node has no routing for the fluid view to price, so that column is left empty for it."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    argv = ["--scenario", str(path), "--compare", "--policy", "global-node", "--episodes", "2"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    rows = {r["policy"]: r for r in json.loads(out.getvalue())["policies"]}
    assert rows["global-node"]["cost_over_oracle"] > 0
    assert "fluid_cost_over_oracle" not in rows["global-node"]
    assert rows["apl"]["fluid_cost_over_oracle"] > 1.0
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        assert main(argv) == 0
    note = [line for line in table.getvalue().splitlines() if line.startswith("note:")]
    assert all("global-node" not in line for line in note)  # a bound, not a dynamic policy


def test_the_pooled_bound_is_refused_where_the_system_changes(tmp_path, capsys):
    """The pooled node has no place for a node's failure, surge or arrival: pooled anyway,
    it ran a workload the policies it bounds never saw. So ``global-node`` is refused on a
    scenario with events or nodes down from the start, and ``--compare`` leaves it out."""
    first = load_scenario("dfaas-2").node_names[0]
    event = {"at": 0, "kind": "surge", "node": first, "factor": 3}
    surged = {"name": "surged", "extends": "dfaas-2", "steps": 30, "events": [event]}
    surged["max_arrivals"] = 1000  # room for the surge: the clip would cut half of it
    path = tmp_path / "surged.yaml"
    path.write_text(yaml.safe_dump(surged))
    assert main(["--scenario", str(path), "--policy", "global-node", "--episodes", "1"]) == 2
    assert "global-node" in capsys.readouterr().err
    assert "global-node" in default_policies(load_scenario("dfaas-2"), "split3")
    assert "global-node" not in default_policies(load_scenario(str(path)), "split3")
    down = load_scenario("dfaas-2")
    down = dataclasses.replace(
        down, nodes=(dataclasses.replace(down.nodes[0], active=False), *down.nodes[1:])
    )
    with pytest.raises(ScenarioError, match="down from the start"):
        down.pooled()


def test_compare_on_a_mesh_without_load_or_without_neighbours(tmp_path, capsys):
    """No load: every cost is zero, so none is a ratio of the oracle's (null, '-' in the
    table) instead of a division by zero. One node: nothing to choose among, so the
    neighbour-choosing heuristics are left out, and refused by name when asked for."""
    idle = {**TINY, "name": "idle", "workload": {"default": {"kind": "poisson", "rate": 0}}}
    path = tmp_path / "idle.yaml"
    path.write_text(yaml.safe_dump(idle))
    argv = ["--scenario", str(path), "--compare", "--episodes", "1", "--envs", "1"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["policies"]
    assert {r["cost_over_oracle"] for r in rows} == {None}
    assert main(argv) == 0
    assert "cost/oracle" in capsys.readouterr().out
    solo = {
        **TINY,
        "name": "solo",
        "nodes": [{"name": "a", "cpu": 300}],
        "links": [],
        "workload": {"default": {"kind": "poisson", "rate": 5}},
    }
    path = tmp_path / "solo.yaml"
    path.write_text(yaml.safe_dump(solo))
    argv = ["--scenario", str(path), "--episodes", "1", "--envs", "1"]
    assert main([*argv, "--compare", "--json"]) == 0
    names = [r["policy"] for r in json.loads(capsys.readouterr().out)["policies"]]
    assert "least-loaded" not in names and "oracle" in names
    assert main([*argv, "--policy", "least-loaded", "--action-mode", "neighbours"]) == 2
    assert "no node of this scenario has a neighbour" in capsys.readouterr().err
