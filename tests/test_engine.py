"""The node model's order of operations, on queues and streams built by hand."""

import numpy as np
import pytest

from policies.topology import Topology
from simulator.engine import NodeModel, RequestTables, _Interleaved
from simulator.env import EdgeEnv


class FixedSizes(RequestTables):
    """Request tables whose draws come from a list, to build exact cases."""

    def __init__(self, cpu_sizes):
        object.__setattr__(self, "sizes", list(cpu_sizes))
        object.__setattr__(self, "max_ram", 1.0)

    def sample(self, gen, service):
        out = np.array([self.sizes.pop(0) for _ in range(len(service))], np.float32)
        return out, np.ones_like(out)


def model(n_nodes=1, sizes=(), queue=10, services=("f",), **options):
    names = [f"n{i}" for i in range(n_nodes)]
    nbrs = {a: [b for b in names if b != a] for a in names}
    topo = Topology.build(names, list(services), nbrs)
    return NodeModel(topo, FixedSizes(sizes), 1, queue, np.random.default_rng(0), **options)


def put_queue(m, node, sizes):
    m.q_cpu[0, node, : len(sizes)] = sizes
    m.q_ram[0, node, : len(sizes)] = 1.0
    m.q_len[0, node] = len(sizes)


def step(m, local, forward=None, cpu=10.0, queue_cap=10):
    n, k, s = m.N, m.K, m.S
    forward = np.zeros((1, n, k, s), np.int64) if forward is None else forward
    return m.step(
        0,
        np.array(local).reshape(1, n, s),
        forward,
        np.full(n, cpu, np.float32),
        np.full(n, 1e6, np.float32),
        np.full(n, queue_cap),
        np.ones(n, bool),
    )


def test_queue_scan_is_first_fit_and_keeps_order():
    m = model()
    put_queue(m, 0, [6, 5, 3, 1, 4])
    out = step(m, [0])
    # 6 fits (4 left), 5 does not, 3 overtakes it (1 left), 1 fits (0 left), 4 does not.
    assert out.processed[0, 0] == 3
    assert m.q_cpu[0, 0, : m.q_len[0, 0]].tolist() == [5, 4]


def test_new_requests_wait_behind_a_non_empty_queue():
    m = model(sizes=[1, 1, 1])
    put_queue(m, 0, [9, 9])
    out = step(m, [3])
    # 9 is processed, the second 9 stays; new requests are queued even though 1 would fit.
    assert out.processed[0, 0] == 1 and m.q_len[0, 0] == 4
    assert m.q_cpu[0, 0, :4].tolist() == [9, 1, 1, 1]


def test_stream_prefix_stops_at_first_misfit_and_keeps_its_size():
    # Draws: the stream window (4, 4, 3, 2, 2), then fresh sizes for the 3 queued requests,
    # whose first (99) must be replaced by the observed size of the misfit (3).
    m = model(sizes=[4, 4, 3, 2, 2, 99, 2, 2])
    out = step(m, [5])
    # 4+4 fit, 3 does not (2 left) and opens the queue; the later requests queue behind it.
    assert out.processed[0, 0] == 2
    assert m.q_cpu[0, 0, : m.q_len[0, 0]].tolist() == [3, 2, 2]


def test_full_queue_rejects_and_blames_the_sender():
    m = model(n_nodes=2, sizes=[20] * 9, queue=4)
    forward = np.zeros((1, 2, 1, 1), np.int64)
    forward[0, 0, 0, 0] = 3  # n0 forwards 3 requests to n1
    out = step(m, [0, 2], forward, cpu=10.0, queue_cap=4)
    # n1: its 2 local requests and 3 forwarded ones, none fits (20 > 10): 4 queue, 1 refused.
    assert m.q_len[0, 1] == 4
    assert out.local_rejects[0, 1, 0] == 0
    assert out.forward_rejects[0, 0, 0, 0] == 1  # refused request counted for the sender n0


def test_interleaved_stream_mixes_segments_evenly():
    # Fractions (j + 1/2) / n: segment 0 at 1/4, 3/4; segment 1 at 1/2; segment 3 at 1/6, 1/2,
    # 5/6 (the tie at 1/2 goes to the earlier segment). A second lane holds one segment.
    seg_n = np.array([[2, 1, 0, 3], [0, 0, 2, 0]])
    stream = _Interleaved(seg_n, np.cumsum(seg_n, axis=1))
    lanes = np.array([[0], [1]])
    assert stream.segment(lanes, np.arange(6)[None, :])[0].tolist() == [3, 0, 1, 3, 0, 3]
    assert stream.segment(lanes, np.arange(2)[None, :])[1].tolist() == [2, 2]
    counts = stream.from_position(np.array([3, 1]))
    assert counts.tolist() == [[1, 0, 0, 2], [0, 0, 1, 0]]


@pytest.mark.parametrize(("interleaved", "rejects"), [(False, [0, 2]), (True, [1, 1])])
def test_full_queue_rejects_the_tail_of_the_arrival_order(interleaved, rejects):
    # Nothing fits (20 > 10); 4 of the 6 new requests queue. In segment order the second
    # service arrives last and loses both; mixed, each service loses one.
    m = model(sizes=[20] * 6, queue=4, services=("a", "b"), interleaved=interleaved)
    out = step(m, [3, 3], queue_cap=4)
    assert m.q_len[0, 0] == 4
    assert out.local_rejects[0, 0].tolist() == rejects


@pytest.mark.parametrize(("interleaved", "served"), [(False, [3, 0]), (True, [2, 1])])
def test_the_step_serves_the_head_of_the_arrival_order(interleaved, served):
    # Three requests of 30 fit 100 CPU. In segment order they are all a's and b waits a
    # whole step; mixed, a, b, a are served.
    m = model(sizes=[30] * 6, services=("a", "b"), track_latency=True, interleaved=interleaved)
    out = step(m, [3, 3], cpu=100.0)
    assert out.latency_count[0].tolist() == served
    assert m.q_len[0, 0] == 3


@pytest.mark.parametrize("arrivals", ["in_order", "interleaved"])
def test_each_agent_s_requests_are_served_rejected_or_queued(mesh, arrivals):
    """Per sender, every step: what it sent is what was served for it, refused to it, and
    added to the queues under its name. Counting rejects in the wrong order keeps the totals
    right and breaks this."""
    import dataclasses

    env = EdgeEnv(dataclasses.replace(mesh, arrivals=arrivals), num_envs=4, seed=5)
    m, rng = env.model, np.random.default_rng(0)
    B, A = m.B, m.A

    def queued_by_agent():
        slots = np.arange(m.Q) < m.q_len[..., None]
        agent = m.q_agent.astype(int)
        return np.stack([np.bincount(agent[b][slots[b]], minlength=A) for b in range(B)])

    env.reset()
    before = queued_by_agent()
    for _ in range(60):
        mask = env.action_mask()
        a = rng.dirichlet(np.full(env.action_dim, 0.3), size=(B, env.num_agents)) * mask
        _, _, _, info = env.step(a)
        out, queued = env.last_outcome, queued_by_agent()
        sent = info["local"].reshape(B, A) + info["forward"].sum(axis=2).reshape(B, A)
        refused = out.local_rejects.reshape(B, A) + out.forward_rejects.sum(axis=2).reshape(B, A)
        assert np.array_equal(sent, out.latency_count + refused + queued - before)
        before = queued


@pytest.mark.parametrize(
    ("scenario", "arrivals"),
    [
        ("dfaas-paise25", "in_order"),
        ("dfaas-paise25", "interleaved"),
        ("mesh-10x3-node-failure", "in_order"),
        ("mesh-10x3-node-failure", "interleaved"),
    ],
)
def test_every_request_is_accounted_for(scenario, arrivals):
    import dataclasses

    from simulator.scenario import load_scenario

    spec = dataclasses.replace(load_scenario(scenario), arrivals=arrivals)
    env = EdgeEnv(spec, num_envs=8, seed=5)
    rng = np.random.default_rng(0)
    _obs, done = env.reset(), False
    while not done:
        mask = env.action_mask()
        a = rng.dirichlet(np.ones(env.action_dim), size=(8, env.num_agents)) * mask
        _obs, _, done, _ = env.step(a)
    t = env.totals
    in_queue = env.model.q_len.sum(axis=1)
    accounted = (
        t.processed
        + t.action_rejects
        + t.queue_full_rejects
        + t.forward_rejects
        + t.split_dropped
        + t.lost_on_failure
        + in_queue
    )
    assert np.array_equal(accounted, t.input)


@pytest.mark.parametrize(
    ("sizes", "expected_ms"),
    [
        # Arrivals at 0 and 500 ms; 10 CPU at 100 CPU/s takes 100 ms: nobody waits.
        ([10, 10], [100, 100]),
        # 60 CPU takes 600 ms: the second request arrives at 500 ms and waits 100 ms.
        ([60, 30], [600, 400]),
    ],
)
def test_latency_spreads_arrivals_over_the_step_and_queues_behind_work(sizes, expected_ms):
    names = ["n0"]
    topo = Topology.build(names, ["f"], {"n0": []})
    m = NodeModel(
        topo,
        FixedSizes(sizes),
        1,
        10,
        np.random.default_rng(0),
        step_seconds=1.0,
        track_latency=True,
    )
    out = m.step(
        0,
        np.array([[[2]]]),
        np.zeros((1, 1, 0, 1), np.int64),
        np.array([100.0], np.float32),
        np.array([1e6], np.float32),
        np.array([10]),
        np.ones(1, bool),
    )
    assert out.latency_count[0, 0] == 2
    assert out.latency_sum_ms[0, 0] == pytest.approx(sum(expected_ms), rel=1e-5)


def test_queued_request_latency_counts_from_its_arrival():
    topo = Topology.build(["n0"], ["f"], {"n0": []})
    # 80 fits; 40 arrives at 500 ms, does not fit (20 CPU left) and waits for the next step.
    m = NodeModel(
        topo,
        FixedSizes([80, 40, 0]),
        1,
        10,
        np.random.default_rng(0),
        step_seconds=1.0,
        track_latency=True,
    )
    args = (
        np.zeros((1, 1, 0, 1), np.int64),
        np.array([100.0], np.float32),
        np.array([1e6], np.float32),
        np.array([10]),
        np.ones(1, bool),
    )
    m.step(0, np.array([[[2]]]), *args)
    out = m.step(1, np.array([[[0]]]), *args)
    # It starts the next step at 1000 ms and takes 400 ms: 900 ms after it arrived.
    assert out.latency_sum_ms[0, 0] == pytest.approx(900.0, rel=1e-5)
