"""The PettingZoo environment trains under Ray RLlib with one shared policy (optional)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("ray.rllib", reason="Ray RLlib is an optional extra: pip install -e '.[rllib]'")


def test_rllib_trains_a_shared_policy_on_the_pettingzoo_env():
    p = subprocess.run(
        [sys.executable, "-m", "simulator.rllib_train", "--scenario", "dfaas-2",
         "--iterations", "2", "--batch", "400", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    history = json.loads(p.stdout.strip().splitlines()[-1])["history"]
    assert len(history) == 2
    assert all(h["episode_return_mean"] is not None for h in history)
