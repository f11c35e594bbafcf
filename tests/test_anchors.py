"""The DFaaS reference's anchor numbers (original code, 5 nodes, 100 episodes).

Tolerances are the issue's: they are wider than one run's standard error, so a faithful
simulator passes for any seed, and a change in semantics (queue order, rounding, the floor
split, the reward) moves the numbers out of them.
"""

import pytest

from simulator.episodes import run_episodes, summarise
from simulator.scenario import WorkloadSpec

ANCHORS = [
    # policy, workload, processed % (+/-), return per agent (+/-)
    ("apl", "sinusoidal", 62.8, 1.5, 237.0, 5.0),
    ("random", "sinusoidal", 61.1, 1.5, None, None),
    ("fill-local-then-forward", "sinusoidal", 77.8, 2.0, 257.5, 6.0),
    ("global-node", "sinusoidal", 85.6, 2.0, None, None),
    ("apl", "normal", 96.2, 1.0, None, None),
]


@pytest.mark.parametrize(("policy", "workload", "processed", "tol", "ret", "ret_tol"), ANCHORS)
def test_reference_anchor(paise, policy, workload, processed, tol, ret, ret_tol):
    scenario = paise.with_workload(WorkloadSpec(workload, {}))
    s = summarise(run_episodes(scenario, policy, episodes=100, seed=2024))
    assert s["processed_pct"] == pytest.approx(processed, abs=tol)
    if ret is not None:
        assert s["return_per_agent"] == pytest.approx(ret, abs=ret_tol)
