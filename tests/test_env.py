import dataclasses

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from simulator.env import EdgeEnv, Timeline
from simulator.pettingzoo_env import EdgeParallelEnv
from simulator.scenario import Event, load_scenario


def rollout(scenario, seed, num_envs=4):
    env = EdgeEnv(scenario, num_envs=num_envs, seed=seed)
    _obs, done, rewards = env.reset(), False, []
    a = np.full((num_envs, env.num_agents, env.action_dim), 1.0 / env.action_dim)
    while not done:
        _obs, r, done, _ = env.step(a)
        rewards.append(r)
    return np.array(rewards), env.episode_metrics()


def test_same_seed_same_numbers_different_seed_different_trace(paise):
    r1, m1 = rollout(paise, seed=11)
    r2, m2 = rollout(paise, seed=11)
    r3, _ = rollout(paise, seed=12)
    assert np.array_equal(r1, r2)
    assert all(np.array_equal(m1[k], m2[k]) for k in m1)
    assert not np.array_equal(r1, r3)


def test_reference_observation_layout(paise):
    env = EdgeEnv(paise, num_envs=1, seed=0)
    obs = env.reset()
    assert obs.shape == (1, 5, 6)
    assert (obs[0, :, 1:] == 0).all()  # nothing happened before the first step
    assert np.array_equal(obs[0, :, 0], env.arrivals[0, 0, :, 0])
    obs, *_ = env.step(np.tile([1.0, 0.0, 0.0], (1, 5, 1)))
    assert np.array_equal(obs[0, :, 4], env.arrivals[0, 0, :, 0])  # prev_local_requests
    assert np.array_equal(obs[0, :, 5], env.model.q_len[0])  # queue_size


def test_neighbour_mode_masks_failed_nodes():
    from simulator.scenario import load_scenario

    env = EdgeEnv(load_scenario("mesh-10x3-node-failure"), num_envs=2, seed=0)
    env.reset()
    a = np.full((2, env.num_agents, env.action_dim), 1.0)
    for _ in range(101):
        env.step(a)
    mask = env.action_mask()
    edge1_first_service = 1 * 3
    assert not mask[edge1_first_service, 1]  # edge-1's first neighbour is edge-0, now failed
    assert not mask[0].any() or not mask[0, 0]  # edge-0 itself cannot serve locally
    assert env.arrivals[:, 101, 0].sum() == 0


def test_latency_is_reported_on_mesh_scenarios(mesh):
    _, metrics = rollout(mesh, seed=0, num_envs=2)
    assert (metrics["latency_mean_ms"] > 0).all()
    assert (metrics["latency_p95_ms"] >= metrics["latency_mean_ms"]).all()


def test_pettingzoo_api_and_seed_tests():
    parallel_api_test(EdgeParallelEnv("dfaas-2"), num_cycles=300)
    parallel_seed_test(lambda: EdgeParallelEnv("dfaas-2"))
    parallel_api_test(EdgeParallelEnv("mesh-10x3"), num_cycles=20)


@pytest.mark.parametrize("name", ["dfaas-2", "mesh-10x3"])
def test_an_episode_ends_by_a_time_limit_on_a_state_an_agent_could_meet(name):
    """The final observation is what a trainer values the cut-off future by: it shows the
    last step's arrivals (none arrived in no step of a busy scenario), and PettingZoo says
    truncation, which RLlib bootstraps past, not termination, which it values at nothing."""
    scenario = dataclasses.replace(load_scenario(name), steps=4)
    env = EdgeEnv(scenario, num_envs=1, seed=0)
    env.reset()
    keep = np.zeros((1, env.num_agents, env.action_dim))
    keep[..., 0] = 1.0
    for _ in range(scenario.steps):
        final, _, done, _ = env.step(keep)
    assert done and env.arrivals[:, -1].sum() > 0
    env.t = scenario.steps - 1  # the same queues and readings, the last step's arrivals
    np.testing.assert_array_equal(final, env._observe())

    view = EdgeParallelEnv(scenario, seed=0)
    view.reset(seed=0)
    ends = []
    for _ in range(scenario.steps):
        _, _, terminations, truncations, _ = view.step(
            {a: np.eye(view.action_space(a).shape[0])[0] for a in view.possible_agents}
        )
        ends.append((any(terminations.values()), all(truncations.values())))
    assert ends == [(False, False)] * (scenario.steps - 1) + [(False, True)]


def test_actions_that_are_not_shares_are_scaled_or_refused(paise):
    """A Box action space lets a learner emit ``[1, 1, 1]``: routed as is, it would send
    more requests than arrived. It is routed as the shares it stands for; NaN or a negative
    share is refused."""
    env = EdgeEnv(paise, num_envs=1, seed=0)
    env.reset()
    scaled = env.counts(np.ones((1, 5, 3)))
    shares = env.counts(np.full((1, 5, 3), 1.0 / 3.0))
    assert all(np.array_equal(a, b) for a, b in zip(scaled, shares, strict=True))
    local, forward, reject, dropped = scaled
    arrived = env.arrivals[0, 0, :, 0]
    assert np.array_equal(
        local[0, :, 0] + forward[0].sum(1)[:, 0] + reject[0, :, 0] + dropped[0, :, 0], arrived
    )
    idle = np.zeros((1, 5, 3))
    assert env.counts(idle)[0][0, :, 0].tolist() == arrived.tolist()  # all to the first route
    for bad in (np.nan, -0.5):
        action = np.full((1, 5, 3), 1.0 / 3.0)
        action[0, 2, 1] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            env.step(action)


def test_fill_local_sizes_each_node_by_its_own_capacity(mesh):
    """Nodes differ (mesh-10x3: 600 to 1500 CPU): sized by the first node, the heuristic
    would overfill the small ones and underuse the large ones, and its score would depend
    on the order the nodes are listed in."""
    from simulator.episodes import build_policy, policy_context

    env = EdgeEnv(mesh, num_envs=1, seed=0, action_mode="split3")
    s = env.topology.num_services
    capacity = policy_context(env).local_capacity
    work = float(np.mean(env.mean_cost))
    assert [capacity[i * s] for i in range(len(mesh.nodes))] == [
        int(n.cpu // work) for n in mesh.nodes
    ]
    obs = np.zeros((1, env.num_agents, env.obs_dim))
    obs[..., 0] = 500.0  # the same arrivals everywhere, empty queues
    local = build_policy("fill-local-then-forward", env, seed=0)(obs, env.action_mask())[0, :, 0]
    cpus = [n.cpu for n in mesh.nodes]
    small, large = int(np.argmin(cpus)), int(np.argmax(cpus))
    assert local[small * s] < local[large * s]


def test_a_capacity_set_while_running_ends_with_its_episode(mesh):
    """Set mid-episode, a node's CPU used to outlive ``reset``: every later episode, training
    ones included, ran on the degraded node."""
    env = EdgeEnv(mesh, num_envs=1, seed=0)
    scenario_cpu = env.timeline.cpu.copy()
    env.reset()
    env.set_node_cpu("edge-3", 10.0)
    assert env.timeline.cpu[0, 3] == 10.0
    env.reset()
    assert np.array_equal(env.timeline.cpu, scenario_cpu)


def node_b_up(events: list[dict]) -> list[bool]:
    """Whether node ``b`` of a two-node, 30-step scenario is up at each step."""
    from simulator.scenario import parse_scenario

    size = {"min": 1, "mean": 2, "max": 3, "std": 1}
    data = {
        "name": "order",
        "steps": 30,
        "nodes": [{"name": "a", "neighbours": ["b"]}, {"name": "b", "neighbours": ["a"]}],
        "services": [{"name": "f", "request_classes": [{"cpu": size, "ram": size}]}],
        "workload": {"default": {"kind": "poisson", "rate": 5}},
        "events": events,
    }
    return Timeline.of(parse_scenario(data)).active[:, 1].tolist()


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # Absent before 10, up from 10, failed from 20: listed first, the failure was undone.
        ([("fail", 20, None), ("add", 10, None)], [False] * 10 + [True] * 10 + [False] * 10),
        # A failure at the very step of the arrival is not cut short by it.
        ([("fail", 10, None), ("add", 10, None)], [False] * 30),
        # A node that was there fails, then rejoins: the later event holds from its step.
        ([("fail", 5, None), ("add", 12, None)], [True] * 5 + [False] * 7 + [True] * 18),
        ([("fail", 5, 15), ("add", 10, None)], [True] * 5 + [False] * 5 + [True] * 20),
        (
            [("fail", 5, None), ("add", 12, None), ("fail", 20, 25)],
            [True] * 5 + [False] * 7 + [True] * 8 + [False] * 5 + [True] * 5,
        ),
    ],
)
def test_events_mean_the_same_in_any_order_of_the_file(events, expected):
    raw = [{"at": at, "kind": kind, "node": "b", "until": until} for kind, at, until in events]
    for listed in (raw, raw[::-1]):
        spec = [{k: v for k, v in e.items() if v is not None} for e in listed]
        assert node_b_up(spec) == expected, listed


@pytest.mark.parametrize("mode", ["neighbours", "split3"])
def test_fill_local_keeps_what_the_node_can_serve_over_all_its_services(mesh, mode):
    """Each service kept up to the whole node's spare capacity: three services, each
    offering half of what the node can serve, were all kept, 1.5 times its capacity."""
    from policies.observation import MESH_LOCAL_FEATURES
    from simulator.episodes import build_policy, policy_context

    env = EdgeEnv(mesh, num_envs=1, seed=0, action_mode=mode)
    s = env.topology.num_services
    assert s == 3
    obs = np.zeros((1, env.num_agents, env.obs_dim))
    if mode == "neighbours":  # offered load in units of the node's capacity, empty queue
        obs[..., MESH_LOCAL_FEATURES.index("offered_load")] = 0.5
        obs[..., len(MESH_LOCAL_FEATURES)] = 1.0  # a neighbour to forward to
    else:  # arrivals: half the node's capacity (requests per step) for each service
        obs[0, :, 0] = policy_context(env).local_capacity / 2
        obs[0, :, 5] = policy_context(env).queue_capacity  # a full queue
    local = build_policy("fill-local-then-forward", env, seed=0)(obs, env.action_mask())[0, :, 0]
    kept = local.reshape(-1, s).sum(axis=1) * 0.5  # of the node's capacity
    assert kept == pytest.approx(np.ones(len(mesh.nodes)), abs=0.01)


def test_a_failing_node_s_queue_is_lost_in_the_reference_layout_too(tmp_path):
    """One service and no latency model: requests carried no sender, so those lost with a
    failing node's queue were missing from ``info["lost"]``, whatever its comment said."""
    path = tmp_path / "fail.yaml"
    path.write_text(
        "name: dfaas-fail\nextends: dfaas-2\nsteps: 20\n"
        "events:\n  - {at: 10, kind: fail, node: node_1}\n"
    )
    env = EdgeEnv(load_scenario(str(path)), num_envs=1, seed=0)
    env.reset()
    keep = np.zeros((1, env.num_agents, env.action_dim))
    keep[..., 0] = 1.0  # everything local: queues fill
    for _ in range(10):
        env.step(keep)
    queued = int(env.model.q_len[0, 1])
    assert queued > 0
    _, _, _, info = env.step(keep)
    assert env.totals.lost_on_failure[0] == queued
    assert info["lost"][0, 1].sum() - info["reject"][0, 1].sum() >= queued


def all_local(env: EdgeEnv) -> np.ndarray:
    keep = np.zeros((env.num_envs, env.num_agents, env.action_dim))
    keep[..., 0] = 1.0  # everything local: the slower nodes' queues fill
    return keep


def test_a_continued_episode_times_queued_requests_from_their_arrival(mesh):
    """The clock restarts at 0 and the queues stay: their requests' birth steps used to stay
    the old episode's, so their waits came out negative (minus an hour's worth in the live
    demo, which continues every 3,600 steps) and the latency reward turned positive."""
    env = EdgeEnv(dataclasses.replace(mesh, steps=20), num_envs=1, seed=0)
    env.reset()
    for _ in range(20):
        env.step(all_local(env))
    assert env.model.q_len.sum() > 0
    env.continue_episode()
    _, reward, _, _ = env.step(all_local(env))
    out = env.last_outcome
    assert out.latency_count.sum() > 0
    assert out.latency_sum_ms.min() >= 0.0
    assert reward.max() <= 0.0  # a latency cost, never a gain


def test_a_node_absent_when_an_episode_continues_loses_its_queue(mesh):
    """Up at the old episode's end, down at the new one's start (a node added part-way):
    failures were detected only from step 1, so its queue sat there unserved and uncounted
    until the node joined again."""
    scenario = dataclasses.replace(
        mesh, steps=20, events=(Event(at=10, kind="add", node="edge-3"),)
    )
    env = EdgeEnv(scenario, num_envs=1, seed=0)
    env.reset()
    for _ in range(20):
        env.step(all_local(env))
    queued = int(env.model.q_len[0, 3])
    assert queued > 0
    env.continue_episode()
    env.step(all_local(env))
    assert env.model.q_len[0, 3] == 0
    assert env.totals.lost_on_failure[0] == queued


def test_a_request_the_floor_split_drops_costs_what_a_rejected_one_does():
    """With the reference's floor split, one request forwarded to two neighbours is lost.
    Under the latency reward it cost nothing: forwarding it scored better than serving it
    (0 against -0.1) and far better than rejecting it (-4), a gap a learner exploits."""
    from simulator.scenario import parse_scenario

    size = {"min": 10, "mean": 10, "max": 10, "std": 0}
    scenario = parse_scenario(
        {
            "name": "split",
            "steps": 5,
            "reward": "latency",
            "nodes": [
                {"name": "a", "neighbours": ["b", "c"]},
                {"name": "b", "neighbours": ["a"]},
                {"name": "c", "neighbours": ["a"]},
            ],
            "services": [
                {
                    "name": "s",
                    "latency_target_ms": 100.0,
                    "request_classes": [{"weight": 1, "cpu": size, "ram": size}],
                }
            ],
            "workload": {"default": {"kind": "step", "levels": [[0, 1]], "poisson": False}},
        }
    )
    env = EdgeEnv(scenario, num_envs=1, seed=0, action_mode="split3")
    env.reset()
    rewards = {}
    for name, share in (("forward", [0, 1, 0]), ("reject", [0, 0, 1])):
        action = np.zeros((1, 3, 3))
        action[0, :] = [1, 0, 0]
        action[0, 0] = share
        _, reward, _, info = env.step(action)
        assert info["lost"][0, 0, 0] == 1, name
        rewards[name] = reward[0, 0]
    assert env.totals.split_dropped[0] == 1
    assert rewards["forward"] == pytest.approx(rewards["reject"])


@pytest.mark.parametrize(
    ("split", "per_neighbour", "dropped"), [("floor", [2, 2], 1), ("exact", [3, 2], 0)]
)
def test_forward_split_floor_drops_the_remainder_and_exact_deals_it_out(
    split, per_neighbour, dropped
):
    """Five requests forwarded to two neighbours: the reference's floor division sends two to
    each and loses one; ``forward_split: exact`` gives the remainder to the first slots."""
    from simulator.scenario import parse_scenario

    size = {"min": 10, "mean": 10, "max": 10, "std": 0}
    scenario = parse_scenario(
        {
            "name": "split",
            "steps": 2,
            "forward_split": split,
            "nodes": [
                {"name": "a", "neighbours": ["b", "c"]},
                {"name": "b", "neighbours": ["a"]},
                {"name": "c", "neighbours": ["a"]},
            ],
            "services": [
                {"name": "s", "request_classes": [{"weight": 1, "cpu": size, "ram": size}]}
            ],
            "workload": {"default": {"kind": "step", "levels": [[0, 5]], "poisson": False}},
        }
    )
    env = EdgeEnv(scenario, num_envs=1, seed=0, action_mode="split3")
    env.reset()
    action = np.zeros((1, 3, 3))
    action[0, :] = [1, 0, 0]
    action[0, 0] = [0, 1, 0]  # node a forwards everything
    local, forward, reject, lost = env.counts(action)
    assert forward[0, 0, :2, 0].tolist() == per_neighbour
    assert lost[0, 0, 0] == dropped
    assert local[0, 0, 0] + forward[0, 0, :, 0].sum() + reject[0, 0, 0] + lost[0, 0, 0] == 5


def test_a_node_up_without_cpu_is_observed_as_overloaded_not_as_1e10(mesh):
    """A capacity event of factor 0 is allowed; the offered load over that capacity divided
    by 1e-9 and put about 1e10 into the observations of every agent of the node."""
    event = Event(at=3, kind="capacity", node="edge-5", factor=0.0)
    env = EdgeEnv(dataclasses.replace(mesh, steps=10, events=(event,)), num_envs=1, seed=0)
    obs = env.reset()
    for _ in range(6):
        obs, _, _, _ = env.step(all_local(env))
    assert env.timeline.active[5, 5] and env.timeline.cpu[5, 5] == 0
    assert np.isfinite(obs).all() and np.abs(obs).max() <= 10.0
    node5 = obs[0, 5 * env.topology.num_services : 6 * env.topology.num_services]
    assert node5[:, 0].max() == 10.0  # its offered share, at the cap: overloaded
