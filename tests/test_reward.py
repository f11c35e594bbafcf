"""The reference reward, on the spot checks of the DFaaS notes."""

import numpy as np
import pytest

from simulator.env import dfaas_reward


@pytest.mark.parametrize(
    ("local", "forward", "reject", "local_rejects", "forward_rejects", "queue_end", "expected"),
    [
        (60, 30, 10, 0, 5, 80, 0.75),  # refused forwards: rejects are not blamed
        (60, 30, 10, 0, 0, 80, 0.70),  # nothing refused: the 10 rejects could have been forwarded
        (100, 0, 0, 20, 0, 100, 0.80),  # all local, 20 refused for a full queue
        (50, 0, 50, 0, 0, 100, 0.50),  # full queue, half rejected
        (0, 0, 0, 0, 0, 0, 1.0),  # nothing arrived
    ],
)
def test_spot_checks(local, forward, reject, local_rejects, forward_rejects, queue_end, expected):
    free = np.array(100 - queue_end)
    r = dfaas_reward(
        np.array(local),
        np.array(forward),
        np.array(reject),
        np.array(local_rejects),
        np.array(forward_rejects),
        free,
    )
    assert float(r) == pytest.approx(expected)


def test_reward_stays_in_unit_interval():
    rng = np.random.default_rng(0)
    n = 10_000
    total = rng.integers(0, 150, n)
    split = rng.dirichlet([1, 1, 1], n)
    local = np.floor(split[:, 0] * total).astype(int)
    forward = np.floor(split[:, 1] * total).astype(int)
    reject = total - local - forward
    local_rejects = rng.integers(0, local + 1)
    forward_rejects = rng.integers(0, forward + 1)
    free = rng.integers(0, 101, n)
    r = dfaas_reward(local, forward, reject, local_rejects, forward_rejects, free)
    assert r.min() >= 0.0 and r.max() <= 1.0
