"""The queueing prior: the physics it promises, and its use while the learned model waits."""

from __future__ import annotations

import numpy as np

from policies.queueing import prior_table, queueing_prior
from policies.system_model import BACKLOG_S, MEAN_MS, P95_MS, SUCCESS


def test_prior_latency_grows_with_load_and_overload_queues_up():
    predict = queueing_prior(interval_s=10.0)
    util = np.linspace(0.0, 2.0, 21)
    rows = np.stack([util, np.full_like(util, 20.0), np.zeros_like(util)], axis=1)
    out = predict(rows)
    assert np.all(np.diff(out[:, MEAN_MS]) > 0) and np.all(np.diff(out[:, P95_MS]) >= 0)
    assert out[0, MEAN_MS] == 20.0  # an idle node: the service time
    assert np.allclose(out[util <= 1.0, BACKLOG_S], 0.0)  # no queue below capacity
    assert out[-1, BACKLOG_S] == 10.0  # twice the capacity for 10 s queues 10 s of work
    assert np.all(out[:, SUCCESS] == 1.0)
    draining = predict(np.array([[0.5, 20.0, 8.0]]))[0]
    assert draining[BACKLOG_S] == 3.0  # 8 s of work drains at 0.5 s per second


def test_prior_table_covers_the_current_backlog():
    table = prior_table(10.0, np.array([[10.0], [20.0]]), backlog_now=np.array([0.0, 12.0]))
    assert table.backlog[-1] >= 24.0 and table.known.all()
    pred, inside = table.lookup(np.array([[0.5, 1.5]]), np.array([[0.0, 12.0]]))
    assert inside.all() and pred[0, 1, 0, BACKLOG_S] > 12.0
