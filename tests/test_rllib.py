"""The PettingZoo environment trains under Ray RLlib with one shared policy (the optional
``rllib`` extra, which ``make test`` installs)."""

import json
import subprocess
import sys


def train(seed: int) -> list[dict]:
    p = subprocess.run(
        [sys.executable, "-m", "simulator.rllib_train", "--scenario", "dfaas-2",
         "--iterations", "2", "--batch", "400", "--json", "--seed", str(seed)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["history"]


def test_rllib_trains_a_shared_policy_on_the_pettingzoo_env_reproducibly():
    """``make test`` installs the extra, so this runs (and fails where Ray is missing).
    The same seed gave one of two histories, by the process's string hashing."""
    history = train(0)
    assert [h["iteration"] for h in history] == [1, 2]
    # The reference reward lies in [0, 1]: an episode of dfaas-2 returns at most 2 x 288.
    assert all(0 < h["episode_return_mean"] <= 2 * 288 for h in history), history
    assert train(0) == history


def test_an_unknown_scenario_is_refused_before_ray_starts(capsys):
    """Checked inside Ray's workers, it ended in 75 lines of traceback, the last about
    something else."""
    from simulator.rllib_train import main

    assert main(["--scenario", "no-such-scenario"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-scenario" in err and len(err.splitlines()) == 1
