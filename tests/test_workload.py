"""The demo workload (workload/): the edge function's own logic (service time, capacity, slow
mode, metrics), the load generator, and the manifests that deploy them per edge node on the
kind cluster (kind-config.yaml) in the shape the operator and examples/ expect. Also the demo
Prometheus of deploy/.

The timing checks use generous bounds: CI machines are small and shared."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from marl_operator.liveness import members

from demo.cluster import kind_nodes

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ROOT / "workload"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"workload_{name}", WORKLOAD / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


edgefn = _load("edgefn")
loadgen = _load("loadgen")


def settings(**overrides):
    base = {"node": "edge-x", "service_time_ms": 50.0, "cpu_ms": 5.0, "distribution": "fixed"}
    return edgefn.Settings(**(base | overrides))


def timed_get(client, path="/"):
    start = time.perf_counter()
    response = client.get(path)
    return response, (time.perf_counter() - start) * 1000


# --- the edge function -------------------------------------------------------------------


def test_settings_from_env():
    s = edgefn.Settings.from_env(
        {"NODE_NAME": "edge-2", "SERVICE_TIME_MS": "16", "CONCURRENCY": "1", "SLOWDOWN": "3"}
    )
    assert (s.node, s.service_time_ms, s.concurrency, s.slowdown) == ("edge-2", 16.0, 1, 3.0)
    assert s.capacity_rps == pytest.approx(1000 / 48)
    assert edgefn.Settings.from_env({}).node == "local"
    for bad in ({"CONCURRENCY": "0"}, {"SLOWDOWN": "0.5"}, {"DISTRIBUTION": "normal"}):
        with pytest.raises(ValueError):
            edgefn.Settings.from_env(bad)


def test_service_time_is_respected():
    with TestClient(edgefn.create_app(settings())) as client:
        client.get("/")  # warm-up: the first request starts the thread pool
        times = []
        for _ in range(5):
            response, ms = timed_get(client)
            assert response.status_code == 200
            assert response.json()["node"] == "edge-x"
            times.append(ms)
    assert 45 <= statistics.median(times) <= 150, times


def test_exponential_service_time_has_the_configured_mean():
    fn = edgefn.EdgeFunction(settings(distribution="exponential", seed=1))
    draws = [sum(fn.service_seconds()) for _ in range(4000)]
    assert statistics.mean(draws) == pytest.approx(0.050, rel=0.08)
    cpu, wait = fn.service_seconds()
    assert cpu == pytest.approx((cpu + wait) * 0.1)


def fastest_of_three(client) -> tuple[object, float]:
    """The quickest of three requests: a busy machine only ever adds time to one."""
    return min((timed_get(client) for _ in range(3)), key=lambda answer: answer[1])


def test_slow_mode_slows_and_recovers_at_run_time():
    with TestClient(edgefn.create_app(settings())) as client:
        client.get("/")
        _, normal = fastest_of_three(client)
        state = client.put("/admin/slowdown", params={"factor": 4}).json()
        assert state["slowdown"] == 4.0
        assert state["capacity_rps"] == pytest.approx(4 * 1000 / 200)
        response, slow = fastest_of_three(client)
        assert response.json()["slowdown"] == 4.0
        assert slow >= 4 * 50 * 0.9
        assert slow > 2.5 * normal
        assert client.put("/admin/slowdown", params={"factor": 0.5}).status_code == 422
        assert client.delete("/admin/slowdown").json()["slowdown"] == 1.0
        _, back = fastest_of_three(client)
        assert back < slow / 2


def test_slow_mode_from_the_environment():
    with TestClient(edgefn.create_app(settings(slowdown=3.0))) as client:
        client.get("/")
        _, ms = timed_get(client)
        assert ms >= 3 * 50 * 0.9
        assert client.get("/admin/state").json()["slowdown"] == 3.0


async def _burst(app, n: int) -> tuple[list[int], float]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fn") as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.get("/") for _ in range(n)))
        return [r.status_code for r in responses], time.perf_counter() - start


def test_concurrency_bounds_the_capacity():
    """Four requests on two slots of 100 ms take two rounds; with one slot and room for one
    waiter, the rest are refused with 503."""
    app = edgefn.create_app(settings(service_time_ms=100.0, cpu_ms=0.0, concurrency=2))
    codes, elapsed = asyncio.run(_burst(app, 4))
    assert codes == [200] * 4
    assert 0.18 <= elapsed <= 0.6, elapsed
    app = edgefn.create_app(settings(service_time_ms=100.0, concurrency=1, queue_limit=1))
    codes, _ = asyncio.run(_burst(app, 4))
    assert codes.count(200) == 2 and codes.count(503) == 2, codes


def test_metrics_are_exposed():
    with TestClient(edgefn.create_app(settings(service_time_ms=5.0, cpu_ms=1.0))) as client:
        for _ in range(3):
            client.get("/")
        client.put("/admin/slowdown", params={"factor": 2})
        text = client.get("/metrics").text
    assert 'edgefn_requests_total{code="200",node="edge-x"} 3.0' in text
    assert 'edgefn_request_duration_seconds_count{node="edge-x"} 3.0' in text
    assert 'edgefn_slowdown{node="edge-x"} 2.0' in text
    assert re.search(r'edgefn_capacity_requests_per_second\{node="edge-x"\} 400\.0', text)
    assert "edgefn_in_flight" in text and "edgefn_waiting" in text


@contextlib.contextmanager
def serving(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        # log_config=None: uvicorn would bind its handlers to the stream pytest captures now
        # and closes after the test, and later records would then fail at exit.
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the edge function did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_command_line_degrades_a_running_node(capsys):
    """`python -m edgefn slow 5` (what `kubectl exec` runs in the pod) and `normal`."""
    with serving(edgefn.create_app(settings())) as url:
        edgefn.main(["--url", url, "slow", "5"])
        assert '"slowdown": 5.0' in capsys.readouterr().out
        assert httpx.get(f"{url}/admin/state").json()["slowdown"] == 5.0
        edgefn.main(["--url", url, "normal"])
        assert httpx.get(f"{url}/admin/state").json()["slowdown"] == 1.0


# --- the load generator ------------------------------------------------------------------


def test_arrivals_are_poisson_at_the_rate():
    gaps = loadgen.arrival_gaps(50.0, random.Random(0))
    sample = [next(gaps) for _ in range(5000)]
    assert statistics.mean(sample) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.stdev(sample) == pytest.approx(1 / 50, rel=0.1)  # exponential


async def _load(rate, seconds, handler, **overrides):
    s = loadgen.Settings(rate=rate, report_s=0, seed=3, **overrides)
    transport = httpx.MockTransport(handler)
    async with httpx.AsyncClient(transport=transport, base_url="http://fn") as client:
        return await loadgen.run(s, client, duration_s=seconds)


def test_load_generator_sends_at_the_rate_and_counts_outcomes():
    def handler(request):
        return httpx.Response(200, json={"node": "edge-1"})

    stats = asyncio.run(_load(100.0, 1.0, handler))
    assert 60 <= stats.sent <= 140, stats.sent
    assert stats.ok == stats.sent and stats.failed == 0
    assert stats.by_node == {"edge-1": stats.ok}
    assert stats.summary()["p95_ms"] is not None

    stats = asyncio.run(_load(100.0, 0.5, lambda request: httpx.Response(503)))
    assert stats.failed == stats.sent > 0 and stats.ok == 0


def test_load_generator_against_a_degraded_edge_function():
    """Open loop: a slow node does not slow the arrivals; the latencies show it."""

    async def run(slowdown):
        # One app per event loop, as in a pod: its slots' semaphore binds to the loop that
        # first waits on it, which a busy machine makes the first run already do.
        app = edgefn.create_app(settings(service_time_ms=10.0, cpu_ms=0.0, concurrency=4))
        app.state.fn.set_slowdown(slowdown)
        s = loadgen.Settings(rate=60.0, report_s=0, seed=1, target_url="http://fn/")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
            return await loadgen.run(s, client, duration_s=1.0)

    fast = asyncio.run(run(1.0))
    slow = asyncio.run(run(10.0))
    assert abs(fast.sent - slow.sent) < 40
    assert fast.ok == fast.sent and slow.ok == slow.sent
    assert statistics.median(slow.latencies_ms) > 4 * statistics.median(fast.latencies_ms)


# --- manifests ---------------------------------------------------------------------------


def documents(*paths: Path) -> list[dict]:
    return [doc for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return documents(*sorted((WORKLOAD / "k8s").glob("*.yaml")))


@pytest.fixture(scope="module")
def edge_nodes() -> list[str]:
    return [d["metadata"]["name"] for d in documents(ROOT / "examples" / "edgenodes.yaml")]


def test_manifests_are_valid_kubernetes(manifests):
    for doc in [*manifests, *documents(ROOT / "deploy" / "prometheus.yaml")]:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_manifests_apply_in_order(manifests):
    """kubectl apply -f workload/k8s/ goes by file name: the namespace comes first."""
    first = documents(sorted((WORKLOAD / "k8s").glob("*.yaml"))[0])
    assert [d["kind"] for d in first] == ["Namespace"]
    assert first[0]["metadata"]["labels"]["istio-injection"] == "enabled"
    namespace = first[0]["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in manifests[1:]} == {namespace}


def test_one_function_and_one_load_generator_per_edge_node(manifests, edge_nodes):
    deployments = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "Deployment"}
    expected = {f"{app}-{node}" for app in ("fn", "loadgen") for node in edge_nodes}
    assert set(deployments) == expected
    for name, deployment in deployments.items():
        node = re.search(r"edge-\d+$", name)[0]  # the operator maps workloads by -<node>
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["labels"]["marl.dev/node"] == node
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            pod["metadata"]["labels"].items()
        )
        assert pod["spec"]["nodeSelector"] == {"marl.dev/edge-node": node}


def test_function_matches_the_example_edge_service(manifests):
    (service_spec,) = [
        d["spec"]
        for d in documents(ROOT / "examples" / "edgeservice.yaml")
        if d["kind"] == "EdgeService"
    ]
    (service,) = [d for d in manifests if d["kind"] == "Service"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert service_spec["host"] == f"{name}.{namespace}.svc.cluster.local"
    assert service["spec"]["ports"][0]["port"] == service_spec["port"]
    fn_pods = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in manifests
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("fn-")
    ]
    for labels in fn_pods:
        assert service["spec"]["selector"].items() <= labels.items()
        assert service_spec["nodeLabel"] in labels
    loadgens = [d for d in manifests if d["metadata"]["name"].startswith("loadgen-")]
    for deployment in loadgens:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["TARGET_URL"].startswith(f"http://{service_spec['host']}:{service_spec['port']}")


def test_function_capacities_follow_the_example_edge_nodes(manifests):
    hints = {
        d["metadata"]["name"]: d["spec"]["capacity"]["requestsPerSecond"]
        for d in documents(ROOT / "examples" / "edgenodes.yaml")
    }
    for deployment in manifests:
        if deployment["kind"] != "Deployment" or not deployment["metadata"]["name"].startswith(
            "fn-"
        ):
            continue
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        s = edgefn.Settings.from_env(env)
        assert s.capacity_rps == pytest.approx(hints[s.node], rel=0.1), s.node


def test_kind_cluster_has_the_example_edge_nodes(edge_nodes):
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    roles = [n["role"] for n in config["nodes"]]
    assert roles == ["control-plane"] + ["worker"] * len(edge_nodes)
    workers = [n for n in config["nodes"] if n["role"] == "worker"]
    assert [w["labels"]["marl.dev/edge-node"] for w in workers] == edge_nodes
    # each EdgeNode finds its one worker as the operator does, whatever the cluster's name
    # (the README's is kind, the e2e test's another)
    for cluster in ("kind", "marl-e2e"):
        workers = {n["metadata"]["name"]: n for n in kind_nodes(cluster=cluster)}
        for node in documents(ROOT / "examples" / "edgenodes.yaml"):
            (name,) = [n["metadata"]["name"] for n in members(node, list(workers.values()))]
            labels = workers[name]["metadata"]["labels"]
            assert labels["marl.dev/edge-node"] == node["metadata"]["name"], (cluster, name)


def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str]:
    """Prometheus' ``replace`` relabelling (the only action the demo's config uses), then its
    default ``instance``: the address."""
    out = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace", rule
        value = rule.get("separator", ";").join(
            out.get(k, "") for k in rule.get("source_labels", [])
        )
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            out[rule["target_label"]] = match.expand(
                rule.get("replacement", "$1").replace("$", "\\")
            )
    out.setdefault("instance", out["__address__"])
    return out


def test_each_node_is_its_own_cadvisor_target():
    """All nodes are scraped through the API server's address: their targets must still
    differ (the node's name as instance) and each ask its own node's metrics."""
    (config_map,) = [
        d for d in documents(ROOT / "deploy" / "prometheus.yaml") if d["kind"] == "ConfigMap"
    ]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kubernetes-cadvisor"]
    nodes = ["marl-e2e-worker", "marl-e2e-worker2", "marl-e2e-worker3"]
    targets = [
        relabel(
            {"__address__": f"10.0.0.{i}:10250", "__meta_kubernetes_node_name": n},
            job["relabel_configs"],
        )
        for i, n in enumerate(nodes)
    ]
    assert [t["instance"] for t in targets] == nodes
    assert {t["__address__"] for t in targets} == {"kubernetes.default.svc:443"}
    assert [t["__metrics_path__"] for t in targets] == [
        f"/api/v1/nodes/{n}/proxy/metrics/cadvisor" for n in nodes
    ]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) not installed")
def test_demo_prometheus_config_is_valid(tmp_path):
    """promtool checks the scrape configuration; Kubernetes service discovery is swapped for
    static targets, which Debian's Prometheus build lacks, and the token path for a file."""
    (config_map,) = [
        d for d in documents(ROOT / "deploy" / "prometheus.yaml") if d["kind"] == "ConfigMap"
    ]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    token = tmp_path / "token"
    token.write_text("x")
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"kubernetes-pods", "kubernetes-cadvisor"}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
        del job["kubernetes_sd_configs"]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token)
            job["tls_config"]["ca_file"] = str(token)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
