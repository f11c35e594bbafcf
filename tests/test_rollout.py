"""The adaptation pieces on problems small enough to check by hand: the model environment's
flow arithmetic, the agent-by-agent loop, no-worse-than-base under an exact model, and the
fall-back outside the model's data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from policies.adaptation import CAPACITY_CHANGE, Adapter, IntervalTelemetry
from policies.fluid_queue import fluid_wait
from policies.model_env import MeshState, ModelEnv
from policies.observation import MeshTelemetry
from policies.queueing import queueing_prior
from policies.rollout import Rollout, RolloutSettings, SettingError, candidates
from policies.system_model import (
    BACKLOG_S,
    MEAN_MS,
    MESH_MEAN_MS,
    TARGETS,
    LatencyTable,
    SystemModel,
    feature_rows,
    score,
)
from policies.topology import Topology

UTIL = np.linspace(0.0, 1.6, 33)
BACKLOG = np.linspace(0.0, 2.0, 5)


def exact(features: np.ndarray) -> np.ndarray:
    """An M/M/1-like node: latency service / (1 - rho) (capped), everything served below
    rho = 1 and the excess lost above; no backlog carried."""
    rho, service_ms = features[:, 0], features[:, 1]
    mean = service_ms / np.maximum(1.0 - np.minimum(rho, 0.95), 0.05)
    success = np.minimum(1.0, 1.0 / np.maximum(rho, 1e-9))
    out = np.stack([mean, 3 * mean, success, np.zeros_like(rho)], axis=1)
    assert out.shape[1] == len(TARGETS)
    return out


def pair(capacity=(1000.0, 1000.0), arrivals=(60.0, 0.0), link_ms=0.0):
    """Two nodes, one service of 10 work units, linked both ways."""
    topo = Topology.build(
        ["a", "b"], ["fn"], {"a": ["b"], "b": ["a"]}, {frozenset(["a", "b"]): link_ms}
    )
    env = ModelEnv(topo, work=np.array([10.0]), target_ms=np.array([100.0]), reject_penalty=4)
    cap = np.array(capacity)
    table = LatencyTable.from_function(exact, env.service_ms(cap), UTIL, BACKLOG)
    state = MeshState(
        arrivals=np.array(arrivals),
        capacity=cap,
        backlog=np.zeros(2),
        telemetry=telemetry(topo, np.array(arrivals), cap),
    )
    return topo, env, table, state


def telemetry(topo: Topology, arrivals: np.ndarray, capacity: np.ndarray) -> MeshTelemetry:
    n, s = topo.num_nodes, topo.num_services
    return MeshTelemetry(
        offered=arrivals.reshape(1, n, s),
        latency_ms=np.full((1, n, s), 10.0),
        rejected=np.zeros((1, n, s)),
        arrived_prev=arrivals.reshape(1, n, s),
        utilisation=np.zeros((1, n)),
        backlog=np.zeros((1, n)),
        capacity=capacity / 10.0,
        active=capacity > 0,
        target_ms=np.array([100.0] * s),
    )


def always_local(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = np.zeros((*obs.shape[:-1], mask.shape[-1]))
    w[..., 0] = 1.0
    return w


def test_model_env_flows_and_cost_by_hand():
    # a: 60 req/s, half local, 30% to b, 20% rejected. Node a: 30 req/s x 10 = 300 of 1000
    # work/s -> rho 0.3, latency 10 / 0.7 ms; node b: rho 0.18 -> 10 / 0.82 ms plus a 5 ms link.
    _, env, table, state = pair(link_ms=5.0)
    w = np.array([[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]])
    pred = env.step(state, w, table)
    lat_a, lat_b = 10 / 0.7, 10 / 0.82
    cost_s = (30 * lat_a + 18 * (lat_b + 5.0)) / 1000 + 12 * 4 * 0.1
    assert pred.cost[0] == pytest.approx(cost_s / 60, rel=1e-3)
    assert pred.telemetry.utilisation[0] == pytest.approx([0.3, 0.18], rel=1e-9)
    assert pred.telemetry.rejected[0, 0, 0] == pytest.approx(12.0)
    assert pred.telemetry.latency_ms[0, 0, 0] == pytest.approx(
        (30 * lat_a + 18 * (lat_b + 5)) / 48, rel=1e-3
    )
    assert np.isnan(pred.telemetry.latency_ms[0, 1, 0])  # b sent nothing
    assert pred.known.all()


def test_model_env_counts_overflow_as_lost():
    # Everything to a node of capacity 300 work/s: rho 2 -> beyond the grid: outside data,
    # and half the requests lost by the model's success ratio (clamped at the grid's end).
    _, env, table, state = pair(capacity=(300.0, 1000.0))
    pred = env.step(state, np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]), table)
    assert not pred.known[0]
    assert pred.telemetry.rejected[0, 0, 0] == pytest.approx(60 * (1 - 1 / 1.6), rel=1e-6)


def test_model_env_prices_work_past_the_utilisation_cap_as_rejected():
    # All of a's 60 req/s local: 600 of 1000 work/s. Under a cap of 0.5 the 100 work/s
    # (10 requests/s) beyond it cost 4 targets of 100 ms each, spread over the 60 offered.
    topo, env, table, state = pair()
    capped = ModelEnv(topo, env.work, env.target_ms, env.reject_penalty, max_utilisation=0.5)
    local = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    split = np.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])  # 300 work/s on each: under it
    free, paid = env.step(state, local, table), capped.step(state, local, table)
    assert paid.cost[0] - free.cost[0] == pytest.approx(10 * 4 * 0.1 / 60, rel=1e-9)
    assert capped.step(state, split, table).cost[0] == env.step(state, split, table).cost[0]
    assert paid.telemetry.rejected[0, 0, 0] == 0.0  # priced, not carried out


def test_model_env_ramps_the_price_of_load_up_to_the_cap():
    # a's 600 work/s local: 100 past the ramp's start at 0.5, a third of the way to the cap
    # at 0.8, priced as 100^2 / (2 * 300) work/s rejected; split evenly, both under 0.5.
    topo, env, table, state = pair()
    args = (topo, env.work, env.target_ms, env.reject_penalty)
    step = ModelEnv(*args, max_utilisation=0.8)
    ramp = ModelEnv(*args, max_utilisation=0.8, ramp_from=0.5)
    local = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    split = np.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    free, paid = step.step(state, local, table), ramp.step(state, local, table)
    assert paid.cost[0] - free.cost[0] == pytest.approx(100**2 / 600 * 4 * 0.1 / 10 / 60)
    assert ramp.step(state, split, table).cost[0] == step.step(state, split, table).cost[0]
    # Past the cap, each further unit of work costs what the step charges.
    load = np.array([[790.0, 0.0], [810.0, 0.0], [830.0, 0.0]])
    capacity = np.array([1000.0, 1000.0])
    priced = ramp.priced_as_rejected(load, capacity)[:, 0]
    assert priced == pytest.approx([290**2 / 600, 300**2 / 600 + 10, 300**2 / 600 + 30])
    with pytest.raises(ValueError, match="ramp_from"):
        ModelEnv(*args, max_utilisation=0.8, ramp_from=0.9)


def test_candidates_keep_the_action_first_and_stay_on_valid_entries():
    action = np.array([0.6, 0.4, 0.0, 0.0])
    mask = np.array([True, True, False, True])
    c = candidates(action, mask, (0.1, 0.3))
    assert np.array_equal(c[0], action)
    assert np.allclose(c.sum(axis=1), 1.0)
    assert (c[:, 2] == 0).all()  # the masked entry never gets mass
    assert (c >= -1e-12).all()
    assert len({tuple(np.round(r, 6)) for r in c}) == len(c)


def test_agent_by_agent_finds_the_best_joint_action_on_a_tiny_problem():
    # a is swamped (60 req/s on 1000 work/s at 10 per request -> rho 0.6 alone is fine, so
    # use capacity 700: rho 0.86); b idles. The best split equalises marginal costs; with
    # steps 0.1/0.3 on always-local the exhaustive optimum over the candidate grid is known.
    _, env, table, state = pair(capacity=(700.0, 1000.0))
    settings = RolloutSettings(horizon=0, steps=(0.1, 0.3), margin=0, rounds=1)
    decision = Rollout(env, always_local, settings).decide(state, table)
    grid = candidates(np.array([1.0, 0.0, 0.0]), np.ones(3, bool), (0.1, 0.3))
    joint = np.repeat(np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]), len(grid), axis=0)
    joint[:, 0] = grid
    best = joint[int(np.argmin(env.step(state, joint, table).cost))]
    assert np.allclose(decision.weights, best)
    assert decision.changed_agents == (0,)
    assert decision.predicted_cost < decision.base_predicted_cost

    # A second round moves on from the first round's choice, to the best of its grid.
    again = Rollout(env, always_local, replace(settings, rounds=2)).decide(state, table)
    grid = candidates(best[0], np.ones(3, bool), (0.1, 0.3))
    joint = np.repeat(best[None], len(grid), axis=0)
    joint[:, 0] = grid
    assert np.allclose(again.weights, joint[int(np.argmin(env.step(state, joint, table).cost))])
    assert again.predicted_cost < decision.predicted_cost


def fixed(weights: np.ndarray):
    """A base policy that always answers ``weights`` ``(A, K+2)``."""

    def policy(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(weights, (*obs.shape[:-2], *weights.shape)).copy()

    return policy


def test_the_search_starts_from_the_last_decision_where_it_is_predicted_cheaper():
    # Small steps and one round: from always-local, a can shed at most a tenth onto b; the
    # last decision already shed 40%, which the model prices lower. (No lookahead: a fixed
    # base policy then scores a routing exactly as a start is scored.)
    _, env, table, state = pair(capacity=(700.0, 1000.0))
    settings = RolloutSettings(horizon=0, steps=(0.1,), margin=0.01, rounds=1)
    rollout = Rollout(env, always_local, settings)
    last = np.array([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    from_base = rollout.decide(state, table)
    assert from_base.weights[0, 1] == pytest.approx(0.1)
    decision = rollout.decide(state, table, incumbent=last)
    last_cost = Rollout(env, fixed(last), settings).decide(state, table).base_predicted_cost
    assert decision.predicted_cost <= last_cost < from_base.predicted_cost
    assert decision.base_predicted_cost == pytest.approx(from_base.base_predicted_cost)
    assert decision.changed_agents == (0,) and decision.weights[0, 1] >= 0.4 - 1e-9

    # A last decision predicted worse than the base action (a rejecting everything), or
    # one routing onto a node that went down, changes nothing.
    worse = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert np.array_equal(rollout.decide(state, table, incumbent=worse).weights, from_base.weights)
    _, env, table, alone = pair(capacity=(700.0, 0.0))
    rollout = Rollout(env, always_local, settings)
    assert np.array_equal(
        rollout.decide(alone, table, incumbent=last).weights, rollout.decide(alone, table).weights
    )


def test_later_agents_choose_against_earlier_agents_moves():
    # a and c are swamped and share a small idle neighbour b: each alone would shed 30% onto
    # b, both together would swamp it. The screen finds both; scored together, c's move no
    # longer pays, and the second round lets c choose again with a's move in place: the
    # result is the one-at-a-time scheme's.
    names = ["a", "b", "c"]
    topo = Topology.build(
        names,
        ["fn"],
        {"a": ["b"], "b": ["a", "c"], "c": ["b"]},
        {frozenset(["a", "b"]): 1.0, frozenset(["b", "c"]): 1.0},
    )
    env = ModelEnv(topo, work=np.array([10.0]), target_ms=np.array([100.0]), reject_penalty=4)
    cap = np.array([700.0, 400.0, 700.0])
    arrivals = np.array([62.0, 0.0, 60.0])
    table = LatencyTable.from_function(exact, env.service_ms(cap), UTIL, BACKLOG)
    state = MeshState(arrivals, cap, np.zeros(3), telemetry(topo, arrivals, cap))
    settings = RolloutSettings(horizon=0, margin=0, rounds=2)
    decision = Rollout(env, always_local, settings).decide(state, table)

    mask = env.action_mask(state)
    base = always_local(np.zeros((3, 1)), mask)

    def best_move(joint: np.ndarray, agent: int) -> np.ndarray:
        options = candidates(joint[agent], mask[agent], settings.steps)
        tried = np.repeat(joint[None], len(options), axis=0)
        tried[:, agent] = options
        return tried[int(np.argmin(env.step(state, tried, table).cost))]

    one_at_a_time = best_move(best_move(base, 0), 2)  # a is busier, so it goes first
    each_alone = base.copy()
    each_alone[[0, 2]] = best_move(base, 0)[0], best_move(base, 2)[2]
    assert np.allclose(decision.weights, one_at_a_time)
    assert decision.changed_agents == (0, 2)
    assert not np.allclose(decision.weights, each_alone)  # c yields because a moved first
    assert decision.predicted_cost < float(env.step(state, each_alone[None], table).cost[0])


@pytest.mark.parametrize(("screen_horizon", "tail"), [(None, False), (0, False), (0, True)])
@pytest.mark.parametrize("seed", range(8))
def test_rollout_is_never_worse_than_the_base_policy_under_an_exact_model(
    seed, screen_horizon, tail
):
    rng = np.random.default_rng(seed)
    n = 4
    names = [f"n{i}" for i in range(n)]
    ring = {x: [names[(i - 1) % n], names[(i + 1) % n]] for i, x in enumerate(names)}
    links = {frozenset([names[i], names[(i + 1) % n]]): float(rng.uniform(1, 10)) for i in range(n)}
    topo = Topology.build(names, ["s0", "s1"], ring, links)
    env = ModelEnv(topo, np.array([5.0, 15.0]), np.array([100.0, 300.0]), reject_penalty=4)
    cap = rng.uniform(400, 1500, n)
    arrivals = rng.uniform(0, 40, topo.num_agents)
    table = LatencyTable.from_function(exact, env.service_ms(cap), UTIL, BACKLOG)
    state = MeshState(arrivals, cap, np.zeros(n), telemetry(topo, arrivals, cap))

    def random_base(obs, mask):  # deterministic in the observation, arbitrary otherwise
        w = np.abs(np.sin(obs[..., :1] * 7.0 + np.arange(mask.shape[-1]))) * mask
        return w / w.sum(axis=-1, keepdims=True)

    settings = RolloutSettings(horizon=2, margin=0.0, screen_horizon=screen_horizon, tail=tail)
    rollout = Rollout(env, random_base, settings)
    # With or without a last decision to start from (a random routing of the mesh).
    mask = env.action_mask(state)
    last = rng.dirichlet(np.ones(mask.shape[1]), size=mask.shape[0]) * mask
    for incumbent in (None, last / last.sum(axis=1, keepdims=True)):
        decision = rollout.decide(state, table, incumbent=incumbent)
        assert decision.predicted_cost <= decision.base_predicted_cost + 1e-12
        # Checked independently: play both routings forward on the exact model.
        played = _play(env, state, table, decision.weights, random_base, settings)
        assert np.isclose(played, decision.predicted_cost, rtol=1e-9)
        assert (
            played <= _play(env, state, table, decision.base_weights, random_base, settings) + 1e-12
        )


def _play(env, state, table, first, policy, settings) -> float:
    from policies.observation import mesh_observation

    pred = env.step(state, first[None], table)
    total, norm = float(pred.cost[0]), 1.0
    mask = env.action_mask(state)
    for h in range(1, settings.horizon + 1):
        w = policy(mesh_observation(env.topology, pred.telemetry), mask)
        pred = env.step(state, w, table, pred.backlog)
        total += settings.discount**h * float(pred.cost[0])
        norm += settings.discount**h
    if settings.tail:  # the last interval's cost for ever after: sum of discount**h, h > horizon
        weight = settings.discount ** (settings.horizon + 1) / (1.0 - settings.discount)
        total += weight * float(pred.cost[0])
        norm += weight
    return total / norm


def test_lookahead_runs_the_actor_only_where_a_row_sees_something_new():
    _, env, _, _ = pair()
    rng = np.random.default_rng(0)
    obs = np.repeat(rng.normal(size=(1, 6, 4)).astype(np.float32), 5, axis=0)
    obs[2, 1] += 1.0  # rows 1-4 repeat row 0 except for these three agents
    obs[4, [3, 5]] -= 0.5
    mask = rng.random((6, 3)) < 0.7
    mask[:, -1] = True
    seen = []

    def policy(o, m):  # deterministic per agent row, records how many rows it computes
        seen.append(o.reshape(-1, o.shape[-1]).shape[0])
        w = np.abs(np.cos(o[..., :1] + o[..., 1:2] * np.arange(m.shape[-1]))) * m
        return w / w.sum(axis=-1, keepdims=True)

    acted = Rollout(env, policy)._act(obs, mask)
    assert sum(seen) == 6 + 3
    seen.clear()
    assert np.array_equal(acted, policy(obs, mask))


def test_a_mesh_that_cannot_reject_is_decided_on_routes_alone():
    _, env, table, state = pair(capacity=(700.0, 1000.0), arrivals=(60.0, 20.0))
    mesh = ModelEnv(env.topology, env.work, env.target_ms, env.reject_penalty, can_reject=False)

    def even(obs, mask):  # every allowed entry alike: what it does with rejects shows
        return np.broadcast_to(mask, (*obs.shape[:-1], mask.shape[-1])) / mask.sum(
            -1, keepdims=True
        )

    assert np.allclose(Rollout(env, even).base_action(state), 1 / 3)
    decision = Rollout(mesh, even, RolloutSettings(margin=0)).decide(state, table)
    assert np.allclose(decision.base_weights, [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert (decision.weights[:, -1] == 0).all()
    assert decision.changed_agents  # it still moves load between the two nodes
    # Node b down: each agent keeps its one live route. Both down: no route is left, the
    # requests are lost anyway, and the reject entry stays open so the policy has an action.
    down = MeshState(state.arrivals, np.array([700.0, 0.0]), state.backlog, state.telemetry)
    assert mesh.action_mask(down).tolist() == [[True, False, False], [False, True, False]]
    down = MeshState(state.arrivals, np.zeros(2), state.backlog, state.telemetry)
    assert mesh.action_mask(down).tolist() == [[False, False, True]] * 2


def test_states_outside_the_model_data_fall_back_to_the_base_policy():
    _, env, _, state = pair(capacity=(700.0, 1000.0))
    model = SystemModel(min_rows=10, radius=0.2)
    # Data only at low utilisation: the busy node's state lies outside it.
    rng = np.random.default_rng(0)
    for _ in range(20):
        rho = rng.uniform(0.0, 0.3, 4)
        svc = rng.choice([10 / 0.7, 10.0], 4)
        x = feature_rows(rho, svc, np.zeros(4))
        model.observe(x, exact(x))
    assert model.ready
    assert model.in_data(feature_rows(0.1, 10.0, 0.0))[0]
    assert not model.in_data(feature_rows(0.86, 10 / 0.7, 0.0))[0]
    table = model.table(env.service_ms(state.capacity))
    rollout = Rollout(env, always_local, RolloutSettings(horizon=1, margin=0))
    decision = rollout.decide(state, table)
    assert decision.fallback is not None and "outside" in decision.fallback
    assert np.array_equal(decision.weights, decision.base_weights)
    assert decision.changed_agents == ()


def test_an_untrusted_model_returns_the_base_action_with_the_reason():
    _, env, table, state = pair(capacity=(700.0, 1000.0))
    rollout = Rollout(env, always_local)
    decision = rollout.decide(state, table, fallback="model error too high")
    assert decision.fallback == "model error too high"
    assert np.array_equal(decision.weights, always_local(np.zeros((1, 2, 1)), np.ones((2, 3)))[0])


def streamed_model(seed: int) -> SystemModel:
    """A model that saw 40 intervals of 10 random rows of the exact node, refitting each."""
    model = SystemModel(min_rows=20, refit_share=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(40):
        x = feature_rows(rng.uniform(0, 0.9, 10), rng.uniform(5, 40, 10), np.zeros(10))
        model.observe(x, exact(x))
    return model


def test_system_model_scores_new_rows_before_learning_them():
    model = streamed_model(seed=1)
    acc = model.accuracy()
    assert acc is not None and acc.rows > 0
    assert acc.nmae["mean_ms"] < 0.2  # a smooth function, learned from a few hundred rows
    assert acc.r2["mean_ms"] > 0.5
    with pytest.raises(ValueError, match="min_rows"):
        SystemModel(min_rows=10**6).fit()


def test_a_target_zero_in_every_row_has_no_normalised_error():
    """No queue in any scored interval: a millisecond of predicted queue over a mean of
    nothing is no error figure (it was reported as 1e9)."""
    y = np.tile([10.0, 30.0, 1.0, 0.0], (4, 1))
    p = y.copy()
    p[:, BACKLOG_S] = 0.001
    p[:, MEAN_MS] = 11.0
    accuracy = score(y, p)
    assert accuracy.nmae["backlog_s"] is None
    assert accuracy.nmae["mean_ms"] == pytest.approx(0.1) and accuracy.worst_nmae == 0.1
    assert json.loads(json.dumps(accuracy.as_dict()))["nmae"]["backlog_s"] is None


def test_a_target_constant_in_every_row_has_no_r2():
    """Every request succeeded: R^2 has no variance to explain, and was reported as a
    perfect 1.0 however far off the predictions were."""
    y = np.tile([10.0, 30.0, 1.0, 0.0], (4, 1))
    y[:, MEAN_MS] = [10.0, 20.0, 30.0, 40.0]
    p = y.copy()
    p[:, 2] = 0.5  # half the requests predicted to fail
    p[:, BACKLOG_S] = 3.0
    accuracy = score(y, p)
    assert accuracy.r2["success"] is None and accuracy.r2["backlog_s"] is None
    assert accuracy.r2["mean_ms"] == 1.0  # predicted exactly, and it varied


def test_the_mesh_mean_latency_is_each_intervals_rows_weighted_by_their_requests():
    """Two intervals of two rows. In the first, the rows' errors (+10 ms on 30 requests,
    -30 ms on 10) cancel over the mesh; in the second, 20 ms too much on every request."""
    y = np.tile([0.0, 0.0, 1.0, 0.0], (4, 1))
    p = y.copy()
    y[:, MEAN_MS] = [50.0, 90.0, 100.0, 100.0]
    p[:, MEAN_MS] = [60.0, 60.0, 120.0, 120.0]
    requests = np.array([30.0, 10.0, 5.0, 15.0])
    accuracy = score(y, p, requests, interval=np.array([0, 0, 1, 1]))
    observed = [(30 * 50 + 10 * 90) / 40, 100.0]  # 60 and 100 ms
    assert accuracy.nmae[MESH_MEAN_MS] == pytest.approx((0 + 20) / 2 / np.mean(observed))
    assert accuracy.nmae["mean_ms"] == pytest.approx((10 + 30 + 20 + 20) / 4 / 85.0)
    assert accuracy.worst_nmae == accuracy.nmae["mean_ms"]  # the mesh's figure is not gated
    assert MESH_MEAN_MS not in score(y, p).nmae  # without requests there is no mesh figure


def test_the_system_model_scores_the_mesh_mean_latency_when_told_the_requests():
    rng = np.random.default_rng(5)

    def interval() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = feature_rows(rng.uniform(0.1, 0.8, 6), np.full(6, 10.0), np.zeros(6))
        y = exact(x)
        y[:, MEAN_MS] *= rng.lognormal(0.0, 0.2, 6)  # per-row chance
        y[0] = np.nan  # a row too thin to learn from: dropped with its requests
        return x, y, rng.uniform(5.0, 50.0, 6)

    told, blind = SystemModel(min_rows=20), SystemModel(min_rows=20)
    for _ in range(20):
        x, y, requests = interval()
        told.observe(x, y, requests)
        blind.observe(x, y)
    mesh = told.accuracy().nmae[MESH_MEAN_MS]
    assert 0 < mesh < told.accuracy().nmae["mean_ms"]  # chance averages out over the mesh
    assert MESH_MEAN_MS not in blind.accuracy().nmae
    assert blind.accuracy().nmae["mean_ms"] == told.accuracy().nmae["mean_ms"]


def test_system_model_refits_on_a_share_of_new_rows_or_when_the_data_moves():
    model = SystemModel(min_rows=20, refit_share=0.5, drift_outside=2.0)  # no drift first
    rng = np.random.default_rng(2)

    def rows(low: float, high: float) -> np.ndarray:
        return feature_rows(rng.uniform(low, high, 10), np.full(10, 10.0), np.zeros(10))

    fitted = [model.observe(x, exact(x)) for x in (rows(0.0, 0.4) for _ in range(6))]
    # the first fit at 20 rows, the next ones once min_rows (more than half of 20, of 40) more
    assert fitted == [False, True, False, True, False, True]
    assert model.fits == 3
    model.drift_outside = 0.1
    x = rows(0.8, 0.9)  # states the fit never saw: refit at once
    assert model.observe(x, exact(x)) and model.fits == 4


def test_the_longest_queues_seen_are_inside_the_table():
    """One row in a hundred began with 3 s of queued work: rare, and the slowest there are."""
    rng = np.random.default_rng(4)
    util = rng.uniform(0.0, 0.9, 3000)
    backlog = np.where(np.arange(3000) % 100 == 7, 3.0, 0.0)
    x = feature_rows(util, np.full(3000, 10.0), backlog)
    y = exact(x)
    y[:, 0] += 1000.0 * backlog
    model = SystemModel(min_rows=50)
    model.add(x, y)
    model.fit()
    table = model.table(np.array([[10.0]]))
    assert table.backlog[-1] >= 3.0
    queued, known = table.lookup(util[[7]], np.array([3.0]))
    calm, _ = table.lookup(util[[7]], np.array([0.0]))
    assert known.all() and queued[0, 0, 0] > 5 * calm[0, 0, 0]


def test_the_model_learns_only_what_the_fluid_queue_misses():
    """Latencies that are the fluid queue's wait plus the service time, exactly: a forest
    of them alone erred by 6% on fresh rows (its leaves average rows of unlike backlogs,
    and a queue's rows are rare), around the fluid by 1%."""

    def rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        util, svc, backlog = rng.uniform(0, 1.5, n), rng.uniform(10, 40, n), rng.exponential(0.4, n)
        mean_s, p95_s, after = fluid_wait(util, backlog, 5.0)
        y = np.stack([1000 * mean_s + svc, 1000 * p95_s + 3 * svc, np.ones(n), after], axis=1)
        return feature_rows(util, svc, backlog), y

    model = SystemModel(interval_s=5.0)
    model.add(*rows(np.random.default_rng(0), 3600))
    model.fit()
    x, y = rows(np.random.default_rng(1), 2000)
    assert score(y, model.predict(x)).nmae["mean_ms"] < 0.02


def test_system_model_table_interpolates_service_times_within_the_data():
    model = streamed_model(seed=3)
    service_ms = np.array([[6.0], [15.0], [38.0], [80.0]])
    table = model.table(service_ms)
    values, known = table.lookup(np.full(4, 0.5), np.zeros(4))
    features = feature_rows(np.full(4, 0.5), service_ms[:, 0], np.zeros(4))
    assert np.allclose(values[:, 0, 0], model.predict(features)[:, 0])  # one tabulation
    # Learned: close to the truth inside the data (a forest flattens towards its edges), and
    # slower nodes are predicted slower.
    assert values[1, 0, 0] == pytest.approx(exact(features)[1, 0], rel=0.1)
    assert (np.diff(values[:3, 0, 0]) > 0).all()
    assert known[:3, 0].all() and not known[3, 0]  # 80 ms: beyond every row seen
    assert table is not model.table(service_ms) and model.table(service_ms * 1.01) is not None


def test_the_adapter_prices_states_outside_the_data_by_the_prior():
    topo, env, _, _ = pair(capacity=(700.0, 1000.0))
    cap, load = np.array([700.0, 1000.0]), np.array([60.0, 0.0])
    for prior in (False, True):
        model = SystemModel(min_rows=10, radius=0.2)
        rng = np.random.default_rng(0)
        for _ in range(20):  # data only at low utilisation
            x = feature_rows(rng.uniform(0.0, 0.3, 4), np.full(4, 10 / 0.7), np.zeros(4))
            model.observe(x, exact(x))
        model.drift_outside = 2.0  # keep it so: no refit on the next interval's rows
        adapter = Adapter(env, always_local, model, RolloutSettings(horizon=1), prior=prior)
        adapter.observe(_interval(topo, load, cap))
        decision = adapter.decide()
        if prior:
            assert decision.fallback is None and decision.changed_agents == (0,)
            assert adapter.model_source == "learned, queueing prior outside its data"
            # Inside the data the table is the learned model's, outside it the prior's.
            table, cap_ms = adapter.table, env.service_ms(cap)
            learned = model.table(cap_ms)
            got, _ = table.lookup(np.array([0.2, 0.0]), np.zeros(2))
            want, _ = learned.lookup(np.array([0.2, 0.0]), np.zeros(2))
            assert np.allclose(got[0], want[0], rtol=1e-6)
            got, known = table.lookup(np.array([0.9, 0.0]), np.zeros(2))
            prior_value = queueing_prior(adapter.interval_seconds)(
                feature_rows(0.9, cap_ms[0, 0], 0.0)
            )
            assert known.all() and np.allclose(got[0, 0], prior_value[0])
        else:
            assert decision.fallback is not None and "outside" in decision.fallback
            assert np.array_equal(decision.weights, decision.base_weights)


def _interval(topo: Topology, arrivals: np.ndarray, capacity: np.ndarray) -> IntervalTelemetry:
    n, s = topo.num_nodes, topo.num_services
    rates = arrivals.reshape(n, s)
    return IntervalTelemetry(
        offered=rates,
        incoming=rates,
        rejected=np.zeros((n, s)),
        mean_ms=np.full((n, s), 20.0),
        p95_ms=np.full((n, s), 60.0),
        capacity=capacity,
        backlog_start=np.zeros(n),
        backlog_end=np.zeros(n),
        mesh=telemetry(topo, arrivals, capacity),
    )


def test_a_kept_decision_survives_a_refit_that_predicts_the_same():
    topo, env, _, _ = pair(capacity=(700.0, 1000.0))
    model = SystemModel(min_rows=8, refit_share=0.0, radius=1.0)  # refits every interval
    rng = np.random.default_rng(0)
    for _ in range(30):
        x = feature_rows(rng.uniform(0.0, 1.0, 4), rng.choice([10 / 0.7, 10.0], 4), np.zeros(4))
        model.observe(x, exact(x))
    adapter = Adapter(
        env,
        always_local,
        model,
        RolloutSettings(horizon=1),
        max_nmae=10.0,
        prior=True,
        reuse_tolerance=0.05,
    )
    cap, load = np.array([700.0, 1000.0]), np.array([60.0, 0.0])
    adapter.observe(_interval(topo, load, cap))
    first = adapter.decide()
    assert adapter.model_source.startswith("learned") and first.changed_agents == (0,)
    fits = model.fits
    adapter.observe(_interval(topo, load * 1.02, cap * 0.99))
    again = adapter.decide()
    assert model.fits > fits  # the model refitted on the new interval's rows ...
    assert again.reused and np.array_equal(again.weights, first.weights)  # ... same decision


def test_the_adapter_tells_the_model_how_many_requests_each_row_is_over():
    topo, env, _, _ = pair(capacity=(700.0, 1000.0))
    model = SystemModel(min_rows=4, refit_share=0.0)
    adapter = Adapter(env, always_local, model, RolloutSettings(horizon=1), interval_seconds=5.0)
    told = []
    observe = model.observe

    def recording(features, targets, requests=None):
        told.append(requests)
        return observe(features, targets, requests)

    model.observe = recording
    rng = np.random.default_rng(1)
    for _ in range(6):
        tel = _interval(topo, rng.uniform(20.0, 60.0, 2), np.array([700.0, 1000.0]))
        adapter.observe(replace(tel, mean_ms=np.array([[15.0], [40.0]])))
        assert np.allclose(told[-1], tel.incoming.reshape(-1) * 5.0)  # requests per row
    assert model.accuracy().nmae[MESH_MEAN_MS] > 0


def _reusing_pair(tolerance: float):
    """A pair where a's load is worth shedding onto b, decided on the prior with reuse."""
    topo, env, _, _ = pair(capacity=(700.0, 1000.0))
    adapter = Adapter(
        env,
        always_local,
        SystemModel(),
        RolloutSettings(horizon=1),
        prior=True,
        reuse_tolerance=tolerance,
    )
    return topo, env, adapter, np.array([700.0, 1000.0]), np.array([60.0, 0.0])


def test_a_steady_mesh_reuses_the_last_decision_until_its_inputs_move():
    topo, env, adapter, cap, load = _reusing_pair(0.05)
    adapter.observe(_interval(topo, load, cap))
    first = adapter.decide()
    assert not first.reused and first.changed_agents == (0,)  # a sheds load onto b

    adapter.observe(_interval(topo, load * 1.02, cap * 0.99))  # noise
    again = adapter.decide()
    assert again.reused
    assert np.array_equal(again.weights, first.weights)

    adapter.observe(_interval(topo, load, cap * np.array([1.0, 0.3])))  # b slows down
    moved = adapter.decide()
    assert not moved.reused
    assert moved.weights[0, 1] < first.weights[0, 1]  # ... so a sends it less

    def sends(share: float):
        def policy(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
            w = always_local(obs, mask)
            w[..., 0], w[..., 1] = 1.0 - share, share
            return w

        return policy

    # The base policy's observation is not compared, its action is: noisy latencies alone
    # keep the decision, a base routing that moved by more than the tolerance does not.
    slow = cap * np.array([1.0, 0.3])
    adapter.rollout.policy = sends(0.0)  # the same routing as always_local
    tel = _interval(topo, load, slow)
    tel.mesh.latency_ms[...] *= 1.3
    adapter.observe(tel)
    assert adapter.decide().reused
    adapter.rollout.policy = sends(0.1)
    adapter.observe(_interval(topo, load, slow))
    assert not adapter.decide().reused

    # However steady the mesh, a kept decision is computed anew every reuse_intervals.
    kept = []
    for _ in range(2 * adapter.reuse_intervals):
        adapter.observe(_interval(topo, load, slow))
        kept.append(adapter.decide().reused)
    assert kept == ([True] * (adapter.reuse_intervals - 1) + [False]) * 2

    never = Adapter(env, always_local, SystemModel(), RolloutSettings(horizon=1), prior=True)
    for _ in range(2):
        never.observe(_interval(topo, load, cap))
        assert not never.decide().reused


def test_a_capacity_change_is_decided_anew_even_where_the_gain_test_would_keep():
    """With a tolerance so wide that the gain test keeps everything, b's capacity moving by
    more than CAPACITY_CHANGE still calls for a decision of its own."""
    topo, _, adapter, cap, load = _reusing_pair(0.9)
    adapter.observe(_interval(topo, load, cap))
    assert not adapter.decide().reused
    adapter.observe(_interval(topo, load, cap * np.array([1.0, 1.0 - CAPACITY_CHANGE / 2])))
    assert adapter.decide().reused
    adapter.observe(_interval(topo, load, cap * np.array([1.0, 1.0 - 1.5 * CAPACITY_CHANGE])))
    assert not adapter.decide().reused


def starts_offered(adapter: Adapter) -> list:
    """Records, per decision of ``adapter``, the start offered besides the base action."""
    starts = []
    decide = adapter.rollout.decide

    def record(*args, incumbent=None, **kwargs):
        starts.append(incumbent)
        return decide(*args, incumbent=incumbent, **kwargs)

    adapter.rollout.decide = record
    return starts


def test_the_adapter_offers_its_last_decision_for_a_bounded_chain_of_intervals():
    """Each decision's search may start from the previous one, until the chain reaches
    incumbent_intervals or a node's capacity moves past CAPACITY_CHANGE since it began; a
    fallback leaves nothing to build on."""
    topo, _, adapter, cap, load = _reusing_pair(0.0)
    starts = starts_offered(adapter)

    def offered() -> list[bool]:
        return [start is not None for start in starts]

    n = adapter.incumbent_intervals
    for _ in range(n + 2):
        adapter.observe(_interval(topo, load, cap))
        adapter.decide()
    assert offered() == [False] + [True] * n + [False]

    starts.clear()
    drifted = cap * np.array([1.0, 1.0 - CAPACITY_CHANGE / 2])
    for c in (cap, drifted, drifted * np.array([1.0, 1.0 - CAPACITY_CHANGE])):
        adapter.observe(_interval(topo, load, c))
        adapter.decide()
    # Within the bound since the chain began, then past it (though each step is within it).
    assert offered() == [True, True, False]

    adapter.max_nmae, adapter.prior = -1.0, False  # no model to trust: the base action
    adapter.observe(_interval(topo, load, cap))
    assert adapter.decide().fallback is not None
    adapter.prior = True
    starts.clear()
    adapter.observe(_interval(topo, load, cap))
    adapter.decide()
    assert offered() == [False]

    # A new controller (a restart) is offered the routing it finds in place, if told it.
    _, _, fresh, _, _ = _reusing_pair(0.0)
    starts = starts_offered(fresh)
    in_place = np.array([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]])
    fresh.observe(_interval(topo, load, cap))
    fresh.decide(applied=in_place)
    fresh.observe(_interval(topo, load, cap))
    fresh.decide(applied=np.array([[0.85, 0.15, 0.0], [1.0, 0.0, 0.0]]))
    assert np.array_equal(starts[0], in_place)
    assert np.allclose(starts[1][0], [0.85, 0.15, 0.0])  # what is in place, not the decision


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"horizon": -1}, "horizon"),
        ({"steps": (0.1, 1.0)}, "steps"),
        ({"margin": 1.0}, "margin"),
        ({"samples": 0}, "samples"),
        ({"rounds": 0}, "rounds"),
        ({"tail": True, "discount": 1.0}, "discount"),
    ],
)
def test_rollout_settings_refuse_what_cannot_be_scored_naming_the_field(bad, named):
    with pytest.raises(SettingError, match=named) as err:
        RolloutSettings(**bad)
    assert err.value.name == named
    RolloutSettings(discount=1.0)  # undiscounted is fine without a tail to sum for ever


def test_the_arrival_forecast_forgets_a_down_node_and_starts_afresh_when_it_returns():
    """A failed node's forecast decayed over several intervals (0.4, 0.16... of its
    arrivals), traffic no routing could serve, priced as lost for every candidate; a node
    back up was forecast from that decayed figure instead of what it now receives."""
    topo, env, _, _ = pair()
    adapter = Adapter(env, always_local, SystemModel(), RolloutSettings(horizon=1))
    up, b_down = np.array([1000.0, 1000.0]), np.array([1000.0, 0.0])
    adapter.observe(_interval(topo, np.array([60.0, 20.0]), up))
    adapter.observe(_interval(topo, np.array([30.0, 20.0]), up))
    a = adapter.forecast_alpha
    assert adapter.forecast == pytest.approx([a * 30 + (1 - a) * 60, 20.0])
    adapter.observe(_interval(topo, np.array([30.0, 5.0]), b_down))  # b's last requests
    assert adapter.forecast[1] == 0.0
    adapter.observe(_interval(topo, np.array([30.0, 40.0]), up))
    assert adapter.forecast[1] == 40.0  # its first reading, not a blend with the outage
    stalled = replace(_interval(topo, np.array([30.0, 40.0]), b_down), capacity=b_down)
    stalled.mesh.active[:] = True  # no capacity left, but up: its clients still send
    adapter.observe(stalled)
    assert adapter.forecast[1] == 40.0


def test_the_predicted_gain_is_unknown_where_either_routing_leaves_the_data():
    """a's 170 requests/s kept local load it past the table's 1.6; split with b, neither
    node leaves it. A gain against a base that cannot be priced is no gain of 100%."""
    _, env, table, state = pair(arrivals=(170.0, 0.0))
    rollout = Rollout(env, always_local, RolloutSettings(horizon=0))
    local = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    split = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert rollout.leaves_data(state, table, local)
    assert not rollout.leaves_data(state, table, split)
    assert np.isnan(rollout.predicted_gain(state, split, local, table))
    assert np.isnan(rollout.predicted_gain(state, local, split, table))
    assert 0 < rollout.predicted_gain(state, split, split * 0.5 + local * 0.5, table) < 1


@pytest.mark.parametrize("prior", [False, True])
def test_a_model_not_yet_scored_on_rows_it_did_not_learn_is_not_trusted(prior):
    """A cold model (the operator's) is first fitted on the rows of the interval it then
    decides in: its held-out error is unknown until the next interval's rows score it, and
    until then the decision is the prior's, or the base action."""
    topo, env, _, _ = pair(capacity=(700.0, 1000.0))
    cap, load = np.array([700.0, 1000.0]), np.array([60.0, 0.0])
    model = SystemModel(min_rows=6)
    adapter = Adapter(env, always_local, model, RolloutSettings(horizon=1), prior=prior)
    while not model.fits:
        adapter.observe(_interval(topo, load, cap))
    first = adapter.decide()
    assert model.accuracy() is None
    if prior:
        assert first.fallback is None and adapter.model_source.startswith("queueing prior")
        assert "no held-out score" in adapter.model_source
    else:
        assert "no held-out score" in first.fallback
    adapter.observe(_interval(topo, load, cap))
    assert model.accuracy() is not None
    second = adapter.decide()
    assert "held-out" not in (second.fallback or "")
    assert adapter.model_source.startswith("learned")
