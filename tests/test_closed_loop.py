"""The closed loop with every real component: the emulated API server, the simulated data
plane, a real Prometheus (the Debian binary) and the operator process, with the user's own
``kubectl apply -f examples/policy.yaml``.

After edge-2 loses half its capacity, the operator must cut the data plane's true p95
latency by at least 30% against static equal weights within 5 control intervals. The static
baseline is the same data plane (same resources, load and seed) stepped in-process without
an operator, degraded at the same simulated second.
"""

from __future__ import annotations

import time
import urllib.error

import pytest
import yaml

from demo.__main__ import share_to
from demo.stack import DEFAULT_LOAD, EXAMPLES, NodeChange, running_stack, static_truths

pytestmark = pytest.mark.integration

DEGRADED_NODE = "edge-2"
INTERVAL_S = 10  # examples/policy.yaml's intervalSeconds
INTERVALS = 5


def wait_for(probe, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def share_to_node(stack, node: str) -> float:
    """Mean share (percent) of the edge nodes' ``fn`` traffic the data plane sends to
    ``node``: the routes it obeys, the VirtualService's rules for its clients (its catch-all
    rule, for clients on no edge node, carries none of this stack's traffic)."""
    return share_to(stack.truth()["routes"]["fn"]["by_source"], node)


def test_closed_loop_cuts_p95_after_a_capacity_drop(tmp_path):
    with running_stack(directory=tmp_path / "stack") as stack:
        stack.apply(EXAMPLES / "policy.yaml")

        def applied():
            status = stack.policy().get("status", {})
            ready = [c for c in status.get("conditions", []) if c["type"] == "WeightsApplied"]
            return ready and ready[0]["status"] == "True"

        wait_for(applied, 90, "the first weights to be applied")
        time.sleep(INTERVAL_S)  # one more interval of healthy operation
        before = share_to_node(stack, DEGRADED_NODE)

        halved = NodeChange(DEGRADED_NODE, 0.5)
        stack.change(halved)
        degrade_at = stack.truth()["seconds"]
        shares = []  # after each interval: a loop may hand some back once the queue drains
        for _ in range(INTERVALS):
            time.sleep(INTERVAL_S)
            shares.append(share_to_node(stack, DEGRADED_NODE))
        truth = stack.truth(10)
        operated = truth["services"]["fn"]["p95_ms"]
        ((baseline, _),) = static_truths([truth["seconds"]], degrade_at, halved)

        after = min(shares)
        policy = stack.policy()
        decisions = stack.decisions()

    print(f"closed loop: p95 {operated:.0f} ms with the operator, {baseline:.0f} ms static")
    print(
        f"closed loop: {before:.1f}% of the traffic to {DEGRADED_NODE} before, after each "
        f"interval {', '.join(f'{share:.1f}%' for share in shares)}"
    )
    assert operated <= 0.7 * baseline, (operated, baseline, decisions["reason"])
    # The base policy alone moves little traffic (about half the static p95 at this point);
    # rollout on the queueing prior is what brings p95 back near the target.
    assert operated <= 0.1 * baseline, (operated, baseline, decisions["reason"])
    assert after < before, (before, shares)  # traffic moved off the degraded node
    assert policy["status"]["phase"] == "Active"
    assert decisions["observed_p95_ms"]["fn"] > 0


def condition(policy: dict, kind: str) -> str | None:
    for cond in policy.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return cond["status"]
    return None


def test_closed_loop_holds_then_falls_back_when_prometheus_stops(tmp_path):
    """The real Prometheus goes away: the weights are held (MetricsAvailable=False), the
    example's ``hold`` fallback is declared after ``failureThreshold`` (3) intervals, and
    the policy is Active again once Prometheus is back."""
    with running_stack(directory=tmp_path / "stack") as stack:
        stack.apply(EXAMPLES / "policy.yaml")
        wait_for(lambda: condition(stack.policy(), "WeightsApplied") == "True", 90, "weights")
        vs = lambda: yaml.safe_load(  # noqa: E731
            stack.kubectl("get", "virtualservice", "fn", "-n", "edge", "-o", "yaml")
        )
        stack.prometheus.stop()
        wait_for(lambda: stack.policy()["status"]["phase"] == "Holding", 30, "Holding")
        assert condition(stack.policy(), "MetricsAvailable") == "False"
        held = vs()["spec"]  # read once holding: no cycle may write from here on
        wait_for(lambda: stack.policy()["status"]["phase"] == "Fallback", 45, "Fallback")
        policy = stack.policy()
        assert condition(policy, "Fallback") == "True"
        assert "metrics" in policy["status"]["lastDecision"]["message"]
        assert vs()["spec"] == held  # hold: the weights in place stay

        stack.prometheus.start()
        wait_for(lambda: stack.policy()["status"]["phase"] == "Active", 60, "recovery")
        assert condition(stack.policy(), "MetricsAvailable") == "True"
        assert condition(stack.policy(), "Fallback") == "False"


def test_the_operator_measures_what_each_services_requests_cost(tmp_path):
    """A second service, ``heavy``, whose requests take five times the CPU of ``fn``'s: the
    operator reads each one's CPU per request through the real Prometheus (cAdvisor-style
    pod series) and the decisions' inputs report it."""
    fn = yaml.safe_load((EXAMPLES / "edgeservice.yaml").read_text())
    heavy = {**fn, "metadata": {**fn["metadata"], "name": "heavy"}}
    heavy["spec"] = {
        **fn["spec"],
        "host": "heavy.edge.svc.cluster.local",
        "mesh": {**fn["spec"]["mesh"], "virtualService": "heavy", "destinationRule": "heavy"},
    }
    policy = yaml.safe_load((EXAMPLES / "policy.yaml").read_text())
    policy["spec"]["services"] = ["fn", "heavy"]
    (tmp_path / "heavy.yaml").write_text(yaml.safe_dump(heavy))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    load = {"fn": {n: 20.0 for n in DEFAULT_LOAD}, "heavy": {n: 4.0 for n in DEFAULT_LOAD}}
    with running_stack(
        load=load,
        directory=tmp_path / "stack",
        services=[tmp_path / "heavy.yaml"],
        work={"heavy": 5.0},
    ) as stack:
        stack.apply(tmp_path / "policy.yaml")

        def measured():
            try:
                inputs = stack.decisions().get("inputs") or {}
            except urllib.error.HTTPError:  # 404 until the policy's first cycle
                return False
            cost = {
                svc: [n.get("cpu_ms_per_request") for n in inputs.get(svc, {}).values()]
                for svc in ("fn", "heavy")
            }
            known = all(cost[svc] and None not in cost[svc] for svc in cost)
            return known and cost

        # Two control intervals past the first: Prometheus' rate() wants two scrapes.
        cost = wait_for(measured, 90, "CPU per request of both services", every=INTERVAL_S)
        time.sleep(2 * INTERVAL_S)
        cost = measured() or cost

        # Taken out of the policy, heavy's routes are given back: the operator created
        # them, so they go; fn's stay the operator's.
        def without_heavy() -> list[str] | None:
            listed = stack.kubectl(
                "get", "virtualservices,destinationrules", "-n", "edge", "-o", "name"
            ).split()
            return None if any(o.endswith("/heavy") for o in listed) else sorted(listed)

        assert without_heavy() is None
        policy["spec"]["services"] = ["fn"]
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
        stack.apply(tmp_path / "policy.yaml")
        left = wait_for(without_heavy, 4 * INTERVAL_S, "heavy's mesh objects to go")
        assert [o.rsplit("/", 1)[1] for o in left] == ["fn", "fn"]
    print(f"CPU per request (ms), by node: {cost}")
    for fn_ms, heavy_ms in zip(cost["fn"], cost["heavy"], strict=True):
        assert heavy_ms / fn_ms == pytest.approx(5.0, rel=0.2), cost
