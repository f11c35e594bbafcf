"""The queueing prior: the physics it promises, and its use while the learned model waits."""

from __future__ import annotations

import numpy as np
import pytest

from policies.queueing import prior_table, queueing_prior, with_prior
from policies.system_model import (
    BACKLOG_S,
    MEAN_MS,
    P95_MS,
    SUCCESS,
    LatencyTable,
    feature_rows,
)


def test_prior_latency_grows_with_load_and_overload_queues_up():
    predict = queueing_prior(interval_s=10.0)
    util = np.linspace(0.0, 2.0, 21)
    rows = feature_rows(util, 20.0, 0.0)
    out = predict(rows)
    assert np.all(np.diff(out[:, MEAN_MS]) > 0) and np.all(np.diff(out[:, P95_MS]) >= 0)
    assert out[0, MEAN_MS] == 20.0  # an idle node: the service time
    assert np.allclose(out[util <= 1.0, BACKLOG_S], 0.0)  # no queue below capacity
    assert out[-1, BACKLOG_S] == 10.0  # twice the capacity for 10 s queues 10 s of work
    assert np.all(out[:, SUCCESS] == 1.0)
    draining = predict(feature_rows(0.5, 20.0, 8.0))[0]
    assert draining[BACKLOG_S] == 3.0  # 8 s of work drains at 0.5 s per second


def test_a_queue_that_empties_within_the_interval_is_waited_on_only_until_then():
    """0.26 s of work at half load drains in 0.52 s of a 5 s interval: requests wait that
    backlog's time average, 0.26 x 0.52 / 2 / 5 s, not half of it as if it lasted the whole
    interval; a queue still there at the end is waited on half its start and end. The p95
    likewise: not the start's backlog, which only the first arrivals find."""
    predict = queueing_prior(interval_s=5.0)
    sojourn_ms = 10.0 / (1.0 - 0.5)
    emptied = predict(feature_rows(0.5, 10.0, 0.26))[0]
    assert emptied[MEAN_MS] == pytest.approx(1000.0 * 0.26 * 0.52 / 2 / 5 + sojourn_ms)
    assert emptied[BACKLOG_S] == 0.0
    lasting = predict(feature_rows(0.5, 10.0, 4.0))[0]
    assert lasting[MEAN_MS] == pytest.approx(1000.0 * (4.0 + 1.5) / 2 + sojourn_ms)
    growing = predict(feature_rows(1.5, 10.0, 1.0))[0]
    assert growing[MEAN_MS] == pytest.approx(1000.0 * (1.0 + 3.5) / 2 + 10.0 / 0.05)
    # The p95: the wait 5% of the way through a draining interval, 95% through a growing one.
    assert emptied[P95_MS] == pytest.approx(1000.0 * (0.26 - 0.5 * 0.25) + 3 * sojourn_ms)
    assert lasting[P95_MS] == pytest.approx(1000.0 * (4.0 - 0.5 * 0.25) + 3 * sojourn_ms)
    assert growing[P95_MS] == pytest.approx(1000.0 * (1.0 + 0.5 * 4.75) + 3 * 10.0 / 0.05)


def test_the_learned_table_answers_inside_its_data_and_the_prior_elsewhere():
    service_ms = np.array([[10.0], [20.0]])
    prior = prior_table(10.0, service_ms, backlog_now=np.zeros(2))

    def learned_fn(x):  # a different function, so that who answered shows
        return queueing_prior(10.0)(x) * 0.5

    learned = LatencyTable.from_function(
        learned_fn, service_ms, np.linspace(0.0, 1.2, 7), np.linspace(0.0, 2.0, 3)
    )
    known = learned.known.copy()
    known[1, 0, 4:] = False  # node 1 only seen up to utilisation 0.6
    learned = LatencyTable(learned.utilisation, learned.backlog, learned.values, known)
    # Resampling onto another grid answers what a lookup answers at each of its points.
    moved = learned.on_grid(prior.utilisation, prior.backlog)
    u, b = np.meshgrid(prior.utilisation, prior.backlog, indexing="ij")
    values, inside = learned.lookup(
        np.repeat(u[..., None], 2, axis=-1), np.repeat(b[..., None], 2, axis=-1)
    )
    assert np.allclose(moved.values, values.transpose(2, 3, 0, 1, 4))
    assert np.array_equal(moved.known, inside.transpose(2, 3, 0, 1))

    both = with_prior(learned, prior)
    assert both.known.all() and both.utilisation[-1] == prior.utilisation[-1]
    got, _ = both.lookup(np.array([0.4, 0.4]), np.zeros(2))  # inside both nodes' data
    assert np.allclose(got[:, 0], learned_fn(feature_rows(0.4, [10.0, 20.0], 0.0)))
    got, _ = both.lookup(np.array([1.0, 1.0]), np.zeros(2))  # node 1: past its data
    want = feature_rows(1.0, [10.0, 20.0], 0.0)
    assert np.allclose(got[0, 0], learned_fn(want)[0])
    assert np.allclose(got[1, 0], queueing_prior(10.0)(want)[1])
    got, _ = both.lookup(np.array([2.5, 2.5]), np.zeros(2))  # past the learned grid: prior
    assert np.allclose(got[:, 0], queueing_prior(10.0)(feature_rows(2.5, [10.0, 20.0], 0.0)))


def test_prior_table_covers_the_current_backlog():
    table = prior_table(10.0, np.array([[10.0], [20.0]]), backlog_now=np.array([0.0, 12.0]))
    assert table.backlog[-1] >= 24.0 and table.known.all()
    pred, inside = table.lookup(np.array([[0.5, 1.5]]), np.array([[0.0, 12.0]]))
    assert inside.all() and pred[0, 1, 0, BACKLOG_S] > 12.0


def _overloaded_adapter(prior: bool):
    from policies.adaptation import Adapter, IntervalTelemetry
    from policies.model_env import ModelEnv
    from policies.observation import MeshTelemetry
    from policies.system_model import SystemModel
    from policies.topology import Topology

    topo = Topology.build(["a", "b"], ["fn"], {"a": ["b"], "b": ["a"]}, max_degree=1)
    env = ModelEnv(topo, work=np.ones(1), target_ms=np.array([100.0]), reject_penalty=4)

    def always_local(obs, mask):
        w = np.zeros((*obs.shape[:-1], mask.shape[-1]))
        w[..., 0] = 1.0
        return w

    offered, capacity = np.array([[90.0], [10.0]]), np.array([60.0, 100.0])
    mesh = MeshTelemetry(
        offered=offered[None],
        latency_ms=np.full((1, 2, 1), 50.0),
        rejected=np.zeros((1, 2, 1)),
        arrived_prev=offered[None],
        utilisation=np.array([[1.0, 0.1]]),
        backlog=np.zeros((1, 2)),
        capacity=capacity,
        active=np.ones(2, bool),
        target_ms=np.array([100.0]),
    )
    tel = IntervalTelemetry(
        offered=offered,
        incoming=offered,
        rejected=np.zeros((2, 1)),
        mean_ms=np.array([[500.0], [11.0]]),
        p95_ms=np.array([[1500.0], [30.0]]),
        capacity=capacity,
        backlog_start=np.zeros(2),
        backlog_end=np.array([2.0, 0.0]),
        mesh=mesh,
    )
    adapter = Adapter(env, always_local, SystemModel(), interval_seconds=10.0, prior=prior)
    adapter.observe(tel)
    return adapter


def test_an_untrusted_model_hands_the_decision_to_the_prior_when_asked():
    """Node a gets 90 req/s for a capacity of 60: with the prior, rollout moves part of a's
    traffic to idle b at once; without it, the base policy's all-local action stays."""
    decision = _overloaded_adapter(prior=True).decide()
    assert decision.fallback is None and decision.weights[0, 1] > 0.2
    assert decision.predicted_cost < decision.base_predicted_cost
    kept = _overloaded_adapter(prior=False)
    decision = kept.decide()
    assert "too little data" in decision.fallback and decision.weights[0, 0] == 1.0
    assert kept.model_source == "none"
