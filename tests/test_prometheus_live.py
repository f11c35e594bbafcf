"""The Prometheus reader against a real Prometheus server scraping an in-process exporter of
Istio-style and cAdvisor-style metrics that grow at known rates: the default templates select
the client-side series of the one service, and rates, success ratio, mean and p95 latency and
CPU come back as the exporter's figures.

Never skipped: without the Prometheus binary these tests fail and say how to install it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from marl_operator.prometheus import MetricsUnavailable, PrometheusReader, ServiceReadings

from demo.prometheus import PrometheusServer, find_binary, prometheus

pytestmark = pytest.mark.integration

WINDOW_S = 10
WINDOW = f"{WINDOW_S}s"
READ = {"namespace": "edge", "service": "fn", "host": "fn.edge.svc.cluster.local"}

# (source_workload, destination_workload) -> (requests/s, fraction answered 503)
PAIRS = {
    ("client-a", "fn-edge-0"): (10.0, 0.0),
    ("client-a", "fn-edge-1"): (30.0, 0.1),
    ("client-b", "fn-edge-0"): (5.0, 0.0),
    ("client-b", "fn-edge-1"): (20.0, 0.0),
    ("client-c", "fn-edge-1"): (2.0, 1.0),  # every answer a 503: success 0, not "no data"
}
# destination_workload -> [(latency ms, fraction of requests)], each latency inside one bucket
LATENCIES = {"fn-edge-0": [(20.0, 0.9), (200.0, 0.1)], "fn-edge-1": [(7.0, 1.0)]}
BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000)
# Mean is exact; p95 is histogram_quantile's linear interpolation inside the bucket holding it:
# fn-edge-0: 95% lies halfway into (100, 250] -> 175; fn-edge-1: 95% of (5, 10] -> 9.75.
EXPECTED_MEAN = {"fn-edge-0": 38.0, "fn-edge-1": 7.0}
EXPECTED_P95 = {"fn-edge-0": 175.0, "fn-edge-1": 9.75}

# (namespace, pod, container) -> CPU cores; only edge's fn-* pods' real containers count.
CPU = {
    ("edge", "fn-edge-0-abc123-x1y2z", "server"): 0.25,
    ("edge", "fn-edge-0-abc123-x1y2z", "istio-proxy"): 0.05,  # the sidecar: excluded
    ("edge", "fn-edge-0-abc123-x1y2z", ""): 0.31,  # the pod's cgroup total: excluded
    ("edge", "fn-edge-0-abc123-x1y2z", "POD"): 0.01,  # the pause container: excluded
    ("edge", "fn-edge-1-def456-a1b2c", "server"): 0.5,
    ("edge", "other-abc123-x1y2z", "server"): 1.0,  # another service: excluded
    ("staging", "fn-edge-1-def456-q9w8e", "server"): 2.0,  # another namespace: excluded
}
EXPECTED_CPU = {"fn-edge-0": 0.25, "fn-edge-1": 0.5}

Labels = dict[str, str]


def labels_text(labels: Labels) -> str:
    return "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


@dataclass
class Family:
    """One metric family: its type and (suffix, labels, growth per second) samples."""

    name: str
    kind: str
    samples: list[tuple[str, Labels, float]]


def istio_labels(source: str, dest: str, code: str, reporter: str, service: str) -> Labels:
    return {
        "reporter": reporter,
        "source_workload": source,
        "source_workload_namespace": "edge",
        "destination_workload": dest,
        "destination_workload_namespace": "edge",
        "destination_service_name": service,
        "destination_service_namespace": "edge",
        "response_code": code,
    }


def families() -> list[Family]:
    """Every series as a rate of growth. Besides the client-side series of fn, the exporter
    serves server-side (reporter="destination") copies at other figures and another service,
    which the default templates must not select."""
    requests_total = Family("istio_requests_total", "counter", [])
    duration = Family("istio_request_duration_milliseconds", "histogram", [])
    traffic = [(pair, rate, errors, "source", "fn") for pair, (rate, errors) in PAIRS.items()]
    traffic += [(pair, 3 * rate, 0.5, "destination", "fn") for pair, (rate, _) in PAIRS.items()]
    traffic += [(("client-a", "other-edge-0"), 100.0, 0.0, "source", "other")]
    for (source, dest), rate, errors, reporter, service in traffic:
        latencies = LATENCIES.get(dest, [(900.0, 1.0)])
        if reporter == "destination":
            latencies = [(400.0, 1.0)]
        for code, share in (("200", 1 - errors), ("503", errors)):
            if share == 0:
                continue
            labels = istio_labels(source, dest, code, reporter, service)
            code_rate = rate * share
            requests_total.samples.append(("", labels, code_rate))
            for le in (*BUCKETS, "+Inf"):
                below = sum(f for ms, f in latencies if le == "+Inf" or ms <= le)
                duration.samples.append(("_bucket", labels | {"le": str(le)}, code_rate * below))
            mean = sum(ms * f for ms, f in latencies)
            duration.samples.append(("_sum", labels, code_rate * mean))
            duration.samples.append(("_count", labels, code_rate))
    cpu = Family("container_cpu_usage_seconds_total", "counter", [])
    for (namespace, pod, container), cores in CPU.items():
        labels = {"namespace": namespace, "pod": pod, "container": container}
        cpu.samples.append(("", labels, cores))
    return [requests_total, duration, cpu]


class Exporter:
    """Serves every series as growth x seconds since start, so that rate() over any window
    is the growth exactly (linear counters are what rate()'s extrapolation reproduces)."""

    def __init__(self) -> None:
        self.families = families()
        self.started = time.monotonic()
        self.first_scrape: float | None = None
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.exposition().encode()
                if exporter.first_scrape is None:
                    exporter.first_scrape = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def target(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def exposition(self) -> str:
        elapsed = time.monotonic() - self.started
        lines = []
        for family in self.families:
            lines.append(f"# TYPE {family.name} {family.kind}")
            for suffix, labels, growth in family.samples:
                lines.append(f"{family.name}{suffix}{labels_text(labels)} {growth * elapsed!r}")
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Exporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering scrapes (again: a no-op)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[PrometheusServer, Exporter]]:
    with Exporter() as exporter, prometheus([exporter.target], interval="1s") as prom:
        yield prom, exporter


def complete(readings: ServiceReadings) -> bool:
    return (
        set(readings.rate) == set(PAIRS)
        and set(readings.success) == set(PAIRS)
        and set(readings.mean_ms) == set(PAIRS)
        and set(readings.p95_ms) == set(PAIRS)
        and set(readings.cpu_cores) == set(EXPECTED_CPU)
    )


@pytest.fixture(scope="module")
def readings(server) -> ServiceReadings:
    """Poll until every pair has every reading and the exporter has been scraped for a whole
    window (before that, rate() covers only part of it and under-reads), then read once more."""
    prom, exporter = server
    reader = PrometheusReader(prom.url, timeout_s=5)
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        last = reader.read(**READ, window=WINDOW)
        scraped_for = time.monotonic() - (exporter.first_scrape or time.monotonic())
        if complete(last) and scraped_for > WINDOW_S + 2:
            return reader.read(**READ, window=WINDOW)
        time.sleep(0.5)
    pytest.fail(f"Prometheus did not have every reading within 30 s; last read: {last}")


def test_prometheus_binary_is_installed():
    find_binary()


def test_request_rates_per_pair(readings):
    assert set(readings.rate) == set(PAIRS)
    for pair, (rate, _) in PAIRS.items():
        assert readings.rate[pair] == pytest.approx(rate, rel=0.05), pair
    assert not readings.empty


def test_success_ratio_counts_5xx_as_failures(readings):
    for pair, (_, errors) in PAIRS.items():
        assert readings.success[pair] == pytest.approx(1 - errors, abs=0.01), pair


def test_client_side_mean_and_p95_latency(readings):
    for (source, dest), _ in PAIRS.items():
        assert readings.mean_ms[source, dest] == pytest.approx(EXPECTED_MEAN[dest], rel=0.02)
        assert readings.p95_ms[source, dest] == pytest.approx(EXPECTED_P95[dest], rel=0.02)


def test_cpu_of_the_service_pods_by_workload(readings):
    assert set(readings.cpu_cores) == set(EXPECTED_CPU)
    for workload, cores in EXPECTED_CPU.items():
        assert readings.cpu_cores[workload] == pytest.approx(cores, rel=0.05), workload


def test_every_pair_has_the_age_of_its_newest_sample(readings):
    assert set(readings.age_s) == set(PAIRS)
    for pair, age in readings.age_s.items():
        assert 0 <= age < 3, pair  # scraped every second
    assert readings.fresh(3) is readings


def test_rates_of_a_target_that_stopped_answering_are_stale():
    """Prometheus marks a target's series stale when its scrape fails, yet rate() over the
    window still answers for them; the reader's ages tell those apart."""
    with Exporter() as exporter, prometheus([exporter.target], interval="1s") as prom:
        reader = PrometheusReader(prom.url, timeout_s=5)
        deadline = time.monotonic() + 30
        while not complete(reader.read(**READ, window=WINDOW)) or not exporter.first_scrape:
            assert time.monotonic() < deadline, "Prometheus never had every reading"
            time.sleep(0.5)
        exporter.stop()
        while True:
            after = reader.read(**READ, window=WINDOW)
            assert after.rate, "the window passed before the series were marked stale"
            if not after.age_s:
                break
            time.sleep(0.5)
    assert set(after.rate) == set(PAIRS) and after.fresh(120).empty


def test_a_service_without_traffic_is_empty(server, readings):
    prom, _ = server
    quiet = PrometheusReader(prom.url).read(
        namespace="edge", service="quiet", host="quiet.edge", window=WINDOW
    )
    assert quiet.empty
    assert quiet.success == quiet.p95_ms == {}
    assert quiet.cpu_cores == {}


def test_an_override_prometheus_refuses_is_metrics_unavailable(server):
    prom, _ = server
    reader = PrometheusReader(prom.url)
    with pytest.raises(MetricsUnavailable, match=r"answered an error.*400.*\(query latencyP95\)"):
        reader.read(**READ, window=WINDOW, overrides={"latencyP95": "sum(rate(x[$window])"})


def test_a_stopped_prometheus_is_metrics_unavailable():
    with prometheus([]) as prom:
        port = prom.url.rsplit(":", 1)[1]
        url = f"http://reader:pa55word@127.0.0.1:{port}"
        assert PrometheusReader(url).read(**READ, window=WINDOW).empty
        prom.stop()
        started = time.monotonic()
        with pytest.raises(MetricsUnavailable, match="unreachable") as info:
            PrometheusReader(url, timeout_s=2).read(**READ, window=WINDOW)
        assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message
    assert "pa55word" not in message
    assert "reader:" not in message
