import math

import numpy as np
import pytest

from policies.weights import largest_remainder, mesh_weights, reference_counts


def test_largest_remainder_sums_exactly_and_is_proportional():
    rng = np.random.default_rng(1)
    f = rng.dirichlet(np.ones(5), size=1000)
    total = rng.integers(0, 500, size=1000)
    c = largest_remainder(f, total)
    assert (c.sum(axis=-1) == total).all()
    assert (np.abs(c - f * total[:, None]) < 1.0 + 1e-9).all()
    for row, fractions, n in zip(c[:100], f[:100], total[:100], strict=True):
        assert row.tolist() == hamilton(fractions.tolist(), int(n))


def hamilton(fractions: list[float], total: int) -> list[int]:
    """The largest-remainder (Hamilton) method as a loop, the way it is taught: floor every
    quota, then give one more to each of the largest remainders, the earlier on a tie."""
    quotas = [f / sum(fractions) * total for f in fractions]
    counts = [math.floor(q + 1e-9) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda j: (counts[j] - quotas[j], j))
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    return counts


@pytest.mark.parametrize(
    ("fractions", "total", "expected"),
    [
        ([0.424, 0.376, 0.2], 10, [4, 4, 2]),  # the one leftover to the larger remainder, .76
        ([0.5, 0.5], 3, [2, 1]),  # a tie goes to the earlier
        ([0.3333, 0.3333, 0.3334], 100, [33, 33, 34]),
    ],
)
def test_largest_remainder_by_hand(fractions, total, expected):
    assert largest_remainder(np.array(fractions), total).tolist() == expected


def test_mesh_weights_never_all_zero():
    w = mesh_weights(np.array([[0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.996, 0.002, 0.002]]))
    assert (w.sum(axis=-1) == 100).all()
    assert w[0].tolist() == [100, 0, 0]
    assert w[1].tolist() == [34, 33, 33]


@pytest.mark.parametrize(
    ("fractions", "n", "expected"),
    [
        ([0.5, 0.3, 0.2], 10, [5, 3, 2]),
        ([0.34, 0.33, 0.33], 10, [4, 3, 3]),  # floors 3,3,3; leftover 1 to the largest remainder
        ([0.45, 0.45, 0.1], 11, [6, 4, 1]),  # floors 4,4,1; BOTH leftovers go to the first max
    ],
)
def test_reference_counts_give_all_leftovers_to_one_share(fractions, n, expected):
    assert reference_counts(np.array(fractions), np.array(n)).tolist() == expected


@pytest.mark.parametrize(
    ("fractions", "expected"),
    [([1e308, 1e308], [50, 50]), ([1e308, 3e307, 0.0], [77, 23, 0]), ([np.inf, 1.0], [100, 0])],
)
def test_shares_too_large_to_add_up_still_make_100(fractions, expected):
    """Their sum overflowed to inf, every share became 0 and the leftover went one unit per
    entry: 1 and 1 out of 100 (a static fallback from huge requestsPerSecond hints was then
    refused), and an infinite share gave a weight of -2**63."""
    weights = mesh_weights(np.array(fractions))
    assert weights.tolist() == expected and weights.sum() == 100
