"""A policy trained on a mesh of higher degree rehearsed on a smaller one, as the operator
runs it: each node's extra neighbour slots are masked, the mesh itself does not change."""

from __future__ import annotations

import json

import pytest

from policies import checkpoint
from simulator.adapt import main as adapt_main
from simulator.env import EdgeEnv
from simulator.episodes import fitted_scenario, run_episodes, summarise
from simulator.scenario import ScenarioError, load_scenario

RING = """\
name: ring-6
extends: mesh-10x3
description: six nodes on a ring (degree 2), the services of mesh-10x3; site-b slows down.
steps: 120
nodes:
  - {name: site-a, cpu: 1400, neighbours: [site-b, site-f]}
  - {name: site-b, cpu: 700, neighbours: [site-a, site-c]}
  - {name: site-c, cpu: 1000, neighbours: [site-b, site-d]}
  - {name: site-d, cpu: 800, neighbours: [site-c, site-e]}
  - {name: site-e, cpu: 1200, neighbours: [site-d, site-f]}
  - {name: site-f, cpu: 900, neighbours: [site-e, site-a]}
links:
  - {between: [site-a, site-b], latency_ms: 3}
  - {between: [site-b, site-c], latency_ms: 5}
  - {between: [site-c, site-d], latency_ms: 4}
  - {between: [site-d, site-e], latency_ms: 6}
  - {between: [site-e, site-f], latency_ms: 3}
  - {between: [site-f, site-a], latency_ms: 4}
workload:
  default: {kind: poisson, rate: 18}
events:
  - {at: 40, kind: capacity, node: site-b, factor: 0.5}
"""


@pytest.fixture
def ring(tmp_path):
    path = tmp_path / "ring-6.yaml"
    path.write_text(RING)
    return path


def test_masked_slots_change_nothing_in_the_mesh(ring):
    scenario = load_scenario(ring)
    padded = scenario.with_slots(3)
    plain_env = EdgeEnv(scenario, num_envs=2, action_mode="neighbours", seed=4)
    padded_env = EdgeEnv(padded, num_envs=2, action_mode="neighbours", seed=4)
    assert (plain_env.action_dim, padded_env.action_dim) == (4, 5)
    assert not padded_env.action_mask()[:, 3].any()  # the third neighbour slot: nobody's
    for policy in ("least-loaded", "capacity-proportional"):
        plain = summarise(run_episodes(scenario, policy, 2, seed=4, num_envs=2))
        same = summarise(run_episodes(padded, policy, 2, seed=4, num_envs=2))
        assert plain == same, policy
    with pytest.raises(ScenarioError, match="1 neighbour slots cannot hold"):
        scenario.with_slots(1)


def test_a_checkpoint_of_higher_degree_sees_the_mesh_padded_to_it(ring):
    scenario = load_scenario(ring)
    bundled = checkpoint.bundled_for("neighbours", scenario.max_degree, larger=True)
    assert bundled.name == "mesh-10x3"  # none of degree 2: the smallest above
    # Asked for this layout alone (where nothing pads), none fits: said so, not blamed on
    # a checkpoint nobody named.
    with pytest.raises(checkpoint.CheckpointError, match="no bundled checkpoint fits"):
        checkpoint.bundled_for("neighbours", scenario.max_degree)
    assert fitted_scenario(scenario, "default", "neighbours").neighbour_slots == 3
    assert fitted_scenario(scenario, str(bundled), "neighbours").neighbour_slots == 3
    # Heuristics, policies per node, and checkpoints that cannot be read see the mesh as is.
    for policy, mode in (("least-loaded", "neighbours"), ("default", "split3")):
        assert fitted_scenario(scenario, policy, mode) is scenario
    assert fitted_scenario(scenario, "no/such/run", "neighbours") is scenario
    with pytest.raises(checkpoint.CheckpointError, match="max degree 4"):
        checkpoint.bundled_for("neighbours", 4, larger=True)
    # Rehearsed as the operator would run it: the bundled policy routes the ring, better
    # than chance, though it was trained on another mesh (the live loop below does better).
    bundled_run = summarise(run_episodes(scenario, "default", 2, seed=0, num_envs=2))
    random_run = summarise(run_episodes(scenario, "random", 2, seed=0, num_envs=2))
    assert bundled_run["cost_per_request_s"] < random_run["cost_per_request_s"]


def test_the_live_loop_rehearses_the_bundled_policy_on_a_smaller_mesh(ring, capsys):
    """It refused: no bundled checkpoint of degree 2. Rehearsed, the base policy alone is
    far from the oracle on this mesh, and rollout on top of it is not."""
    argv = ["--scenario", str(ring), "--json", "--warmup", "60", "--interval", "5"]
    assert adapt_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["scenario"] == "ring-6"
    rollout = summary["rollout_cost_over_oracle_after_3_cycles"]
    assert rollout < summary["base_cost_over_oracle_after_3_cycles"] and rollout <= 1.1


def test_a_padded_policys_static_weights_come_in_the_meshs_own_layout(ring):
    """The fluid comparison with the oracle prices weights over the mesh's own slots: the
    masked one is dropped, and it carried nothing (every row still sums to one)."""
    import numpy as np

    from simulator.compare import static_weights

    scenario = load_scenario(ring)
    weights = static_weights(scenario, "default", [(0, 40), (40, 120)], num_envs=2)
    assert weights.shape == (2, 6 * 3, scenario.max_degree + 2)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
