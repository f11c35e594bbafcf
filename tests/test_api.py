"""The operator's HTTP API, its metrics and the report store: probes, Prometheus exposition
checked value by value, the decisions API against the report it came from, bounded and
thread-safe storage, and uvicorn sharing an event loop without taking the signals."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import math
import re
import signal
import socket
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from marl_operator.__main__ import parse_args
from marl_operator.api import (
    ApiServer,
    NodeInputsModel,
    PolicyDetail,
    ReportModel,
    create_app,
)
from marl_operator.instruments import Instruments
from marl_operator.peering import ReplicaRole, outranking_peers
from marl_operator.report import CycleReport, NodeInputs, Outcome
from marl_operator.store import HISTORY, ReportStore
from prometheus_client.parser import text_string_to_metric_families

POLICY = "edge/balanced"
T0 = 1_750_000_000.0

WEIGHTS = {
    "resize": {
        "edge-a": {"edge-a": 70, "edge-b": 20, "edge-c": 10},
        "edge-b": {"edge-b": 100},
        "edge-c": {"edge-a": 35, "edge-c": 65},
    },
    "classify": {
        "edge-a": {"edge-a": 100},
        "edge-b": {"edge-a": 15, "edge-b": 60, "edge-c": 25},
        "edge-c": {"edge-c": 90, "edge-b": 10},
    },
}
PROPOSED = {
    "resize": {
        "edge-a": {"edge-a": 60, "edge-b": 25, "edge-c": 15},
        "edge-b": {"edge-b": 100},
        "edge-c": {"edge-a": 40, "edge-c": 60},
    },
    "classify": WEIGHTS["classify"],
}
MODEL = {
    "nmae": {
        "mean_ms": 0.081,
        "p95_ms": 0.124,
        "success": 0.006,
        "backlog_s": 0.93,
        "mesh_mean_ms": 0.043,
    },
    "r2": {"mean_ms": 0.91, "p95_ms": 0.84, "success": 0.42, "backlog_s": 0.12},
    "rows": 240,
}


def node(offered: float, incoming: float, capacity: float, p95: float | None) -> NodeInputs:
    return NodeInputs(
        offered_rps=offered,
        incoming_rps=incoming,
        success=None if p95 is None else 0.997,
        mean_ms=None if p95 is None else p95 / 2.6,
        p95_ms=p95,
        capacity_rps=capacity,
    )


def make_report(policy: str = POLICY, **changes) -> CycleReport:
    """An applied cycle of two services over three edge nodes, as a real cycle reports it."""
    report = CycleReport(
        policy=policy,
        time=T0,
        generation=3,
        outcome=Outcome.APPLIED,
        reason="rollout moved 2 agents off the base policy; predicted p95 improves by 14%",
        weights=WEIGHTS,
        proposed=PROPOSED,
        fallback=None,
        changed_agents=("edge-a/resize", "edge-c/resize"),
        written=("resize",),
        predicted_p95_ms={"resize": 182.5, "classify": 96.0},
        observed_p95_ms={"resize": 211.0, "classify": 101.3},
        model=MODEL,
        decision_ms=37.5,
        inputs={
            "resize": {
                "edge-a": node(48.0, 41.2, 40.0, 240.0),
                "edge-b": node(12.0, 18.9, 35.0, 120.0),
                "edge-c": node(20.0, 19.9, 25.0, 175.0),
            },
            "classify": {
                "edge-a": node(30.0, 34.5, 60.0, 80.0),
                "edge-b": node(25.0, 15.0, 30.0, 110.0),
                "edge-c": node(0.0, 5.5, 20.0, None),
            },
        },
    )
    return dataclasses.replace(report, **changes)


@pytest.fixture
def store() -> ReportStore:
    return ReportStore()


@pytest.fixture
def instruments() -> Instruments:
    return Instruments()


@pytest.fixture
def client(store: ReportStore, instruments: Instruments) -> TestClient:
    return TestClient(create_app(store, instruments, ready=lambda: True))


def publish(store: ReportStore, instruments: Instruments, report: CycleReport) -> None:
    store.put(report)
    instruments.record(report)


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    """``(sample name, labels) -> value`` of everything /metrics exposes."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def labels(**kw: str) -> frozenset:
    return frozenset(kw.items())


def policy_series(metrics: dict, policy: str) -> list:
    return [key for key in metrics if ("policy", policy) in key[1]]


# --- probes --------------------------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_follows_the_ready_callable_on_every_request(store, instruments) -> None:
    state = {"ready": False}
    client = TestClient(create_app(store, instruments, ready=lambda: state["ready"]))

    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "not ready"
    assert response.json()["reason"]

    state["ready"] = True
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_probes_answer_while_every_worker_thread_is_busy(store, instruments) -> None:
    """Sync endpoints and dependencies run in a pool of threads. The readiness probe's
    dependency was sync, so replica reads waiting on the API server (up to its timeout)
    could take every thread, and the kubelet then saw a healthy operator as not ready."""
    release = threading.Event()

    def blocked_replica() -> ReplicaRole:
        release.wait(10)  # a peering read waiting on the API server
        return ReplicaRole("marl-operator", 1, True)

    app = create_app(store, instruments, ready=lambda: True, replica=blocked_replica)

    async def main() -> dict[str, int]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = 1  # the pool is full
        server = ApiServer(app, "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
                replica = asyncio.create_task(http.get("/api/v1/replica", timeout=15))
                await asyncio.sleep(0.3)  # the replica request holds the one thread
                codes = {}
                for probe in ("/healthz", "/readyz"):
                    codes[probe] = (await http.get(probe, timeout=2)).status_code
                release.set()
                codes["/api/v1/replica"] = (await replica).status_code
                return codes
        finally:
            release.set()
            await server.stop()

    assert asyncio.run(main()) == {"/healthz": 200, "/readyz": 200, "/api/v1/replica": 200}


def test_a_malformed_peering_status_is_said_not_served_as_500(store, instruments) -> None:
    """``outranking_peers`` raised ValueError on a peer's unparseable lastseen or priority,
    which the view did not catch: the replica endpoint answered 500 instead of saying it
    cannot tell."""
    from marl_operator.peering import PeeringView

    class Kube:
        def __init__(self, peer):
            self.peer = peer

        def peering_statuses(self, name, namespaces):
            return [{"other": self.peer}]

    for peer in (
        {"lastseen": "garbage", "priority": 10},
        {"lastseen": "2026-01-01T11:59:30+00:00", "priority": "high"},
        {"lastseen": "2026-01-01T11:59:30+00:00", "priority": 10, "lifetime": None},
    ):
        view = PeeringView(Kube(peer), "marl-operator", ["edge"], priority=5)
        client = TestClient(create_app(store, instruments, ready=lambda: True, replica=view))
        response = client.get("/api/v1/replica")
        assert response.status_code == 200, peer
        body = response.json()
        assert body["acting"] is None, peer
        assert "other" in body["error"] and "peering" in body["error"], body


def test_replica_says_whether_this_replica_acts(store, instruments) -> None:
    standalone = TestClient(create_app(store, instruments, ready=lambda: True))
    assert standalone.get("/api/v1/replica").json() == {
        "peering": None,
        "priority": None,
        "acting": True,
        "outranked_by": [],
        "error": None,
    }
    role = ReplicaRole("marl-operator", 7, None, error="reading the peering object: 403 x")
    unknown = TestClient(create_app(store, instruments, ready=lambda: True, replica=lambda: role))
    assert unknown.get("/api/v1/replica").json()["acting"] is None


def test_a_live_peer_of_higher_priority_outranks_until_its_lifetime_ends() -> None:
    now = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
    status = {
        "higher": {"priority": 9, "lifetime": 60, "lastseen": "2026-01-01T11:59:30+00:00"},
        "naive": {"priority": 9, "lifetime": 60, "lastseen": "2026-01-01T11:59:30"},
        "dead": {"priority": 9, "lifetime": 60, "lastseen": "2026-01-01T11:58:00+00:00"},
        "equal": {"priority": 5, "lifetime": 60, "lastseen": "2026-01-01T11:59:59+00:00"},
        "lower": {"priority": 1, "lifetime": 60, "lastseen": "2026-01-01T11:59:59+00:00"},
    }
    assert outranking_peers(status, 5, now) == ["higher", "naive"]
    assert outranking_peers(status, 9, now) == []


def test_no_mutating_endpoints(client: TestClient, store, instruments) -> None:
    publish(store, instruments, make_report())
    for path in ("/api/v1/policies", "/api/v1/policies/edge/balanced", "/metrics"):
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            assert client.request(method, path).status_code == 405, (method, path)
    assert store.latest(POLICY) is not None


def test_no_interactive_docs_pages(client: TestClient) -> None:
    """FastAPI's /docs and /redoc pages load scripts from a public CDN, which an edge
    cluster may not reach and a security review flags; the OpenAPI document stays."""
    for path in ("/docs", "/redoc"):
        assert client.get(path).status_code == 404, path
    assert "/api/v1/policies" in client.get("/openapi.json").json()["paths"]


# --- metrics -------------------------------------------------------------------------------


def test_metrics_content_type_and_names(client, store, instruments) -> None:
    publish(store, instruments, make_report())
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(response.text)}
    assert families >= {
        "marl_operator_cycles",
        "marl_operator_decision_seconds",
        "marl_operator_weight",
        "marl_operator_fallback",
        "marl_operator_model_nmae",
        "marl_operator_observed_p95_seconds",
        "marl_operator_predicted_p95_seconds",
        "marl_operator_last_cycle_timestamp_seconds",
    }


def test_metrics_openmetrics_on_request(client, store, instruments) -> None:
    publish(store, instruments, make_report())
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_metric_values_equal_the_report(client, store, instruments) -> None:
    report = make_report()
    publish(store, instruments, report)
    metrics = scrape(client)

    routes = 0
    for service, sources in report.weights.items():
        for source, destinations in sources.items():
            for destination, weight in destinations.items():
                key = labels(policy=POLICY, service=service, source=source, destination=destination)
                assert metrics["marl_operator_weight", key] == weight
                routes += 1
    assert routes == sum(name == "marl_operator_weight" for name, _ in metrics)

    for service, ms in report.observed_p95_ms.items():
        key = labels(policy=POLICY, service=service)
        assert metrics["marl_operator_observed_p95_seconds", key] == pytest.approx(ms / 1000)
        predicted = report.predicted_p95_ms[service] / 1000
        assert metrics["marl_operator_predicted_p95_seconds", key] == pytest.approx(predicted)
    for target, nmae in MODEL["nmae"].items():
        assert metrics["marl_operator_model_nmae", labels(policy=POLICY, target=target)] == nmae

    only_policy = labels(policy=POLICY)
    assert metrics["marl_operator_fallback", only_policy] == 0
    assert metrics["marl_operator_last_cycle_timestamp_seconds", only_policy] == T0
    assert metrics["marl_operator_decision_seconds_count", only_policy] == 1
    assert metrics["marl_operator_decision_seconds_sum", only_policy] == pytest.approx(0.0375)
    in_50ms = labels(policy=POLICY, le="0.05")
    in_25ms = labels(policy=POLICY, le="0.025")
    assert metrics["marl_operator_decision_seconds_bucket", in_50ms] == 1
    assert metrics["marl_operator_decision_seconds_bucket", in_25ms] == 0


def test_cycles_counter_counts_each_record_by_outcome(client, store, instruments) -> None:
    for i, outcome in enumerate(
        (Outcome.APPLIED, Outcome.UNCHANGED, Outcome.UNCHANGED, Outcome.HELD, Outcome.UNCHANGED)
    ):
        publish(store, instruments, make_report(outcome=outcome, time=T0 + 30 * i))
    metrics = scrape(client)

    def cycles(outcome: Outcome) -> float:
        return metrics["marl_operator_cycles_total", labels(policy=POLICY, outcome=outcome.value)]

    assert cycles(Outcome.APPLIED) == 1
    assert cycles(Outcome.UNCHANGED) == 3
    assert cycles(Outcome.HELD) == 1
    # Every outcome exists from the first cycle on, so its first occurrence is an increase.
    assert cycles(Outcome.FALLBACK) == 0
    assert cycles(Outcome.INVALID) == 0
    assert metrics["marl_operator_last_cycle_timestamp_seconds", labels(policy=POLICY)] == T0 + 120
    assert metrics["marl_operator_decision_seconds_count", labels(policy=POLICY)] == 5


def test_fallback_gauge_and_cycles_without_decision(client, store, instruments) -> None:
    publish(store, instruments, make_report())
    publish(
        store,
        instruments,
        make_report(
            outcome=Outcome.FALLBACK,
            reason="metrics missing for 3 cycles in a row",
            fallback="Prometheus returned no samples for 3 cycles",
            proposed=None,
        ),
    )
    metrics = scrape(client)
    assert metrics["marl_operator_fallback", labels(policy=POLICY)] == 1

    publish(store, instruments, make_report(outcome=Outcome.SUSPENDED, decision_ms=0.0))
    metrics = scrape(client)
    assert metrics["marl_operator_fallback", labels(policy=POLICY)] == 0
    # Neither the fallback (no proposal) nor the suspended cycle decided anything: the
    # decision histogram keeps the applied cycle's observation alone.
    assert metrics["marl_operator_decision_seconds_count", labels(policy=POLICY)] == 1


def test_series_of_disappeared_routes_and_services_are_removed(client, store, instruments) -> None:
    publish(store, instruments, make_report())
    without_c = {
        service: {
            source: {d: w for d, w in dests.items() if d != "edge-c"} or {source: 100}
            for source, dests in sources.items()
            if source != "edge-c"
        }
        for service, sources in WEIGHTS.items()
    }
    publish(
        store,
        instruments,
        make_report(weights=without_c, observed_p95_ms={"resize": 205.0}, model=None),
    )
    metrics = scrape(client)

    weights = {key: v for key, v in metrics.items() if key[0] == "marl_operator_weight"}
    assert weights
    for (_, key), value in weights.items():
        lab = dict(key)
        assert "edge-c" not in (lab["source"], lab["destination"])
        assert value == without_c[lab["service"]][lab["source"]][lab["destination"]]
    assert len(weights) == sum(len(d) for s in without_c.values() for d in s.values())

    observed = [k for k in metrics if k[0] == "marl_operator_observed_p95_seconds"]
    assert observed == [
        ("marl_operator_observed_p95_seconds", labels(policy=POLICY, service="resize"))
    ]
    assert not [k for k in metrics if k[0] == "marl_operator_model_nmae"]


def test_forget_removes_only_that_policys_series(client, store, instruments) -> None:
    other = "edge/latency-first"
    publish(store, instruments, make_report())
    publish(store, instruments, make_report(policy=other, outcome=Outcome.DRY_RUN))
    assert policy_series(scrape(client), POLICY)

    store.forget(POLICY)
    instruments.forget(POLICY)
    metrics = scrape(client)
    assert policy_series(metrics, POLICY) == []
    assert (
        metrics[
            "marl_operator_weight",
            labels(policy=other, service="resize", source="edge-a", destination="edge-b"),
        ]
        == 20
    )
    assert client.get("/api/v1/policies/edge/balanced").status_code == 404
    assert [s["policy"] for s in client.get("/api/v1/policies").json()] == [other]

    # A policy created again under the same name starts from fresh series.
    publish(store, instruments, make_report(outcome=Outcome.HELD))
    metrics = scrape(client)
    applied = labels(policy=POLICY, outcome=Outcome.APPLIED.value)
    assert metrics["marl_operator_cycles_total", applied] == 0


def test_durations_are_exposed_in_seconds(client, store, instruments) -> None:
    """Prometheus's naming convention: time in its base unit, seconds (as
    marl_operator_decision_seconds is), so that a latency compares with any other without
    knowing each metric's scale."""
    publish(store, instruments, make_report())
    families = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    scaled = sorted(n for n in families if re.search(r"_(milli|micro|nano)seconds$|_ms$", n))
    assert scaled == [], f"durations not in seconds: {scaled}"


def test_a_scrape_while_a_cycle_is_recorded_sees_one_cycle_or_the_other(
    instruments: Instruments, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape arriving while record() replaces a policy's series must see the routes of
    the previous report or of the new one, never the old routes half removed: each source's
    weights then no longer add up to 100 in Prometheus."""
    before = make_report()
    after = make_report(
        weights={
            "resize": {"edge-a": {"edge-a": 100}, "edge-b": {"edge-b": 100}},
            "classify": {"edge-a": {"edge-a": 100}, "edge-b": {"edge-b": 100}},
        }
    )
    instruments.record(before)

    def weights(text: str) -> dict[tuple[str, str, str], float]:
        return {
            (s.labels["service"], s.labels["source"], s.labels["destination"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "marl_operator_weight"
        }

    def table(report: CycleReport) -> dict[tuple[str, str, str], float]:
        return {
            (service, source, destination): float(weight)
            for service, sources in report.weights.items()
            for source, destinations in sources.items()
            for destination, weight in destinations.items()
        }

    scraped: list[str] = []
    scraper: list[threading.Thread] = []
    labels_of = instruments.weight.labels

    def labels_then_scrape(*values: str):
        if not scraper:  # Prometheus scrapes now, from the API's thread
            scraper.append(
                threading.Thread(
                    target=lambda: scraped.append(instruments.exposition()[0].decode())
                )
            )
            scraper[0].start()
            scraper[0].join(timeout=0.5)
        return labels_of(*values)

    monkeypatch.setattr(instruments.weight, "labels", labels_then_scrape)
    instruments.record(after)
    scraper[0].join(timeout=10)
    (text,) = scraped
    assert weights(text) in (table(before), table(after))


def test_metrics_include_the_process_own(client) -> None:
    """The operator's registry is its own, so prometheus_client's default process metrics are
    not in it unless registered: without process_start_time_seconds a restart loop, and
    without process_resident_memory_bytes and process_open_fds the memory the chart's limit
    is sized from (values.yaml) and leaked sockets, cannot be watched from the operator's
    own /metrics."""
    families = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in (
        "process_start_time_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
    ):
        assert name in families, name


def test_instruments_do_not_share_a_registry() -> None:
    first, second = Instruments(), Instruments()
    first.record(make_report())
    names = {m.name for m in second.registry.collect() for s in m.samples}
    assert not {name for name in names if name.startswith("marl_operator_")}
    assert first.registry is not second.registry


def test_nan_accuracy_is_exposed_as_nan_and_served_as_null(client, store, instruments) -> None:
    model = {**MODEL, "r2": {**MODEL["r2"], "backlog_s": math.nan}}
    model["nmae"] = {**MODEL["nmae"], "backlog_s": math.nan}
    publish(store, instruments, make_report(model=model))
    metrics = scrape(client)
    assert math.isnan(
        metrics["marl_operator_model_nmae", labels(policy=POLICY, target="backlog_s")]
    )
    body = client.get("/api/v1/policies/edge/balanced").json()
    assert body["model"]["nmae"]["backlog_s"] is None
    assert body["model"]["r2"]["p95_ms"] == 0.84


# --- decisions API -------------------------------------------------------------------------


def test_list_policies(client, store, instruments) -> None:
    assert client.get("/api/v1/policies").json() == []
    publish(store, instruments, make_report(time=T0 - 30, outcome=Outcome.HELD))
    publish(store, instruments, make_report())
    publish(
        store,
        instruments,
        make_report(
            policy="shop/cheapest",
            outcome=Outcome.DRY_RUN,
            reason="spec.dryRun is set",
            fallback="model untrusted: p95_ms error 0.31 > 0.25",
            generation=7,
            decision_ms=4.2,
        ),
    )
    body = client.get("/api/v1/policies").json()
    assert body == [
        {
            "policy": POLICY,
            "outcome": "Applied",
            "reason": make_report().reason,
            "time": T0,
            "generation": 3,
            "fallback": None,
            "decision_ms": 37.5,
        },
        {
            "policy": "shop/cheapest",
            "outcome": "DryRun",
            "reason": "spec.dryRun is set",
            "time": T0,
            "generation": 7,
            "fallback": "model untrusted: p95_ms error 0.31 > 0.25",
            "decision_ms": 4.2,
        },
    ]


def test_policy_detail_is_the_latest_report_in_full(client, store, instruments) -> None:
    earlier = make_report(time=T0 - 30, outcome=Outcome.HELD, reason="metrics are 95 s old")
    latest = make_report()
    publish(store, instruments, earlier)
    publish(store, instruments, latest)

    response = client.get("/api/v1/policies/edge/balanced")
    assert response.status_code == 200
    body = response.json()
    history = body.pop("history")
    assert body == json.loads(json.dumps(latest.as_dict()))
    assert body["weights"]["classify"]["edge-b"]["edge-c"] == 25
    assert body["inputs"]["classify"]["edge-c"]["p95_ms"] is None
    assert body["changed_agents"] == ["edge-a/resize", "edge-c/resize"]
    assert body["written"] == ["resize"]
    assert history == [
        {"outcome": "Held", "time": T0 - 30, "reason": "metrics are 95 s old"},
        {"outcome": "Applied", "time": T0, "reason": latest.reason},
    ]


def test_unknown_policy_is_404_with_a_clear_message(client, store, instruments) -> None:
    publish(store, instruments, make_report())
    response = client.get("/api/v1/policies/edge/missing")
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert "edge/missing" in detail
    assert "no cycle report" in detail


def test_response_models_mirror_the_report() -> None:
    """A field added to CycleReport must show up in the API, not vanish from it."""
    report_fields = [f.name for f in dataclasses.fields(CycleReport)]
    assert list(ReportModel.model_fields) == report_fields
    assert list(PolicyDetail.model_fields) == [*report_fields, "history"]
    assert list(NodeInputsModel.model_fields) == [f.name for f in dataclasses.fields(NodeInputs)]
    report = make_report()
    dumped = ReportModel.of(report).model_dump(mode="json")
    assert dumped == json.loads(json.dumps(report.as_dict()))


# --- store ---------------------------------------------------------------------------------


def test_store_basics(store: ReportStore) -> None:
    assert store.latest(POLICY) is None
    assert store.history(POLICY) == []
    store.put(make_report(policy="b/two"))
    store.put(make_report(policy="a/one"))
    assert store.policies() == ["a/one", "b/two"]
    store.forget("a/one")
    store.forget("never/existed")
    assert store.policies() == ["b/two"]
    assert store.latest("a/one") is None


def test_store_history_is_bounded(client, store, instruments) -> None:
    assert HISTORY == 20
    reports = [make_report(time=T0 + 30 * i, generation=i) for i in range(HISTORY + 5)]
    for report in reports:
        store.put(report)
    assert store.history(POLICY) == reports[-HISTORY:]
    assert store.latest(POLICY) is reports[-1]

    history = client.get("/api/v1/policies/edge/balanced").json()["history"]
    assert [h["time"] for h in history] == [r.time for r in reports[-HISTORY:]]


def test_store_history_returns_a_copy(store: ReportStore) -> None:
    store.put(make_report())
    store.history(POLICY).clear()
    assert len(store.history(POLICY)) == 1


def test_concurrent_puts_do_not_corrupt_the_store(store: ReportStore) -> None:
    threads, puts = 8, 60
    busy = [f"busy/p{i}" for i in range(3)]  # every thread writes many reports to these
    fresh = [f"fresh/p{i}" for i in range(5)]  # every thread writes one report to these
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            barrier.wait()
            for i in range(puts):
                for policy in busy:
                    store.put(make_report(policy=policy, generation=t * 1000 + i))
            for policy in fresh:
                store.put(make_report(policy=policy, generation=t))
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            barrier.wait()
            for _ in range(threads * puts):
                for policy in busy:
                    assert len(store.history(policy)) <= HISTORY
                store.policies()
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to provoke races
    try:
        workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
        workers.append(threading.Thread(target=reader))
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)

    assert errors == []
    assert store.policies() == sorted(busy + fresh)
    for policy in fresh:
        assert sorted(r.generation for r in store.history(policy)) == list(range(threads))
    for policy in busy:
        kept = store.history(policy)
        assert len(kept) == HISTORY
        assert store.latest(policy) is kept[-1]
        for t in range(threads):  # each thread's own reports stay in the order it put them
            own = [r.generation for r in kept if r.generation // 1000 == t]
            assert own == sorted(own)


def test_concurrent_records_never_leave_a_mix_of_two_reports(
    instruments: Instruments, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two cycles of one policy finishing at once: the weight series afterwards are exactly
    those of one of the two reports, never a union (stale routes left behind)."""
    nodes = [f"edge-{i}" for i in range(10)]  # a full mesh of ten nodes
    full = {s: {a: {b: 10 for b in nodes} for a in nodes} for s in ("resize", "classify")}
    small = {"resize": {"edge-a": {"edge-a": 100}}, "classify": {"edge-b": {"edge-b": 100}}}
    reports = [make_report(weights=full), make_report(weights=small)]

    def routes(weights: dict) -> set[tuple[str, str, str]]:
        return {(s, a, b) for s, sources in weights.items() for a, d in sources.items() for b in d}

    def exposed() -> set[tuple[str, str, str]]:
        text = instruments.exposition()[0].decode()
        return {
            (s.labels["service"], s.labels["source"], s.labels["destination"])
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "marl_operator_weight"
        }

    # Slow every series update down, so the two records surely overlap: without the lock
    # every round ends with a mix.
    labels_of = instruments.weight.labels

    def slow_labels(*values: str):
        time.sleep(1e-4)
        return labels_of(*values)

    monkeypatch.setattr(instruments.weight, "labels", slow_labels)
    rounds, mixed = 20, 0
    for _ in range(rounds):
        barrier = threading.Barrier(len(reports))

        def writer(report: CycleReport, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            instruments.record(report)

        workers = [threading.Thread(target=writer, args=(r,)) for r in reports]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        mixed += exposed() not in (routes(full), routes(small))

    assert mixed == 0
    text = instruments.exposition()[0].decode()
    cycles = sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "marl_operator_cycles_total"
    )
    assert cycles == rounds * len(reports)
    instruments.forget(POLICY)
    assert POLICY not in instruments.exposition()[0].decode()


# --- serving next to kopf ------------------------------------------------------------------


def test_api_server_serves_on_a_shared_loop_and_stops_cleanly(store, instruments) -> None:
    app = create_app(store, instruments, ready=lambda: True)
    handler_before = signal.getsignal(signal.SIGTERM)

    async def main() -> None:
        server = ApiServer(app, "127.0.0.1", 0)
        task = await server.start()
        # uvicorn must leave the signals to kopf.
        assert signal.getsignal(signal.SIGTERM) is handler_before
        port = server.port
        assert port > 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.get("/healthz")
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}
        await server.stop()
        assert task.done()
        assert task.exception() is None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    asyncio.run(main())
    assert signal.getsignal(signal.SIGTERM) is handler_before


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_command_line_serves_its_api_on_loopback_alone_and_with_a_login() -> None:
    """Every address by default put every policy's decisions on the local network of
    whoever ran the operator from a workstation (the chart asks for every address)."""
    args = parse_args(["--prometheus-url", "http://prometheus:9090"])
    assert args.api_host == "127.0.0.1" and args.api_auth == "kubernetes"
    assert not args.api_auth_metrics


def test_metrics_behind_a_login_need_the_login(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--api-auth", "none", "--api-auth-metrics"])
    assert "--api-auth-metrics" in capsys.readouterr().err


def test_the_charts_address_answers_on_ipv4_and_ipv6(store, instruments) -> None:
    """0.0.0.0 listened on IPv4 alone: on an IPv6-only cluster the kubelet's probes found
    nothing and the pod restarted for ever ("::" is IPv6 alone in asyncio)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    host = parse_args(["--prometheus-url", "http://prometheus:9090", "--api-host="]).api_host
    app = create_app(store, instruments, ready=lambda: True)

    async def main() -> None:
        port = _free_port()
        server = ApiServer(app, host, port)
        await server.start()
        try:
            for base in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
                async with httpx.AsyncClient(base_url=base) as http:
                    assert (await http.get("/healthz")).status_code == 200, base
        finally:
            await server.stop()

    asyncio.run(main())


def test_api_server_reports_a_busy_port_instead_of_exiting(store, instruments) -> None:
    app = create_app(store, instruments, ready=lambda: True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            server = ApiServer(app, "127.0.0.1", port)
            with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
                await server.start()

        asyncio.run(main())
