"""End to end on a kind cluster: the image, the chart, Istio, Prometheus, the demo workload and
the examples, as the README's "Quick start on kind" does them; then a node degrades and the
operator must move traffic away from it until latency recovers; then a node's kubelet stops
and the operator must route nothing to it until it is back; then deleting the policy must
give the mesh its routes back; then the API must serve HTTPS from a Secret, and a renewed
Secret without a restart; and uninstalling the chart must leave the routes as they were.

Needs a Docker engine, kind, kubectl, helm and istioctl (see conftest.py for when it runs).
Settings: ``MARL_E2E_CLUSTER`` (cluster name, default marl-e2e; it must not exist yet unless
``MARL_E2E_REUSE=1``), ``MARL_E2E_KEEP=1`` (leave the cluster for inspection),
``MARL_E2E_SKIP_BUILD=1`` (images already built and tagged).
The tests run in file order and build on each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.tools import helm, tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "marl-operator"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
OPERATOR_IMAGE = f"marl-operator:{APP_VERSION}"  # the chart's default image
WORKLOAD_IMAGE = "marl-edge-fn:0.1.0"  # workload/k8s/
CLUSTER = os.environ.get("MARL_E2E_CLUSTER", "marl-e2e")
RELEASE, OPERATOR_NS, EDGE_NS = "marl-operator", "marl-system", "edge"
POLICY = "edge-routing"
READER = "marl-reader"  # examples/api-reader.yaml: may read the policies of EDGE_NS
AUDIENCE = "marl-operator"  # the chart's api.tokenAudience
DEGRADED, SLOWDOWN = "edge-2", 8
LATENCY_TARGET_MS = 200.0  # examples/edgeservice.yaml
NODES = ("edge-0", "edge-1", "edge-2")  # examples/edgenodes.yaml
API_TLS_SECRET = "marl-api-tls"
API_TLS_DIR = "/etc/marl-operator/api-tls"  # where the chart mounts api.tls's Secret


class Cluster:
    """Commands against the e2e cluster, with its own kubeconfig."""

    def __init__(self, kubeconfig: Path):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.helm = helm()
        self.kubectl_bin = tool("kubectl")  # the one conftest found usable, not PATH's
        self.api_tls = False  # whether the operator's API serves HTTPS (api.tls)

    def run(
        self, *cmd: str, timeout: float = 600, check: bool = True, input: str | None = None
    ) -> str:
        print("$", " ".join(cmd), flush=True)
        done = subprocess.run(
            cmd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            input=input,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def kubectl(self, *args: str, **kw: Any) -> str:
        return self.run(self.kubectl_bin, *args, **kw)

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def operator_api(self, path: str) -> Any:
        """The operator's HTTP API as the reader of examples/api-reader.yaml sees it, asked
        from inside the operator's pod (the API server's service proxy drops the caller's
        token); the token goes in on stdin, not on a command line."""
        token = self.kubectl("-n", EDGE_NS, "create", "token", READER, "--audience", AUDIENCE)
        # Over HTTPS once the chart serves it, verified against the mounted Secret's CA.
        ca = f"{API_TLS_DIR}/ca.crt" if self.api_tls else None
        fetch = (
            "import ssl, sys, urllib.request as u; "
            f"ca = {ca!r}; c = ssl.create_default_context(cafile=ca) if ca else None; "
            f"r = u.Request({'https' if ca else 'http'!r} + '://127.0.0.1:8080' + sys.argv[1], "
            "headers={'Authorization': 'Bearer ' + sys.stdin.read().strip()}); "
            "print(u.urlopen(r, timeout=30, context=c).read().decode())"
        )
        exec_ = ("-n", OPERATOR_NS, "exec", "-i", f"deploy/{RELEASE}", "--")
        return json.loads(self.kubectl(*exec_, "python", "-c", fetch, path, input=token))

    def move_off(self, node: str, namespaces: tuple[str, ...]) -> None:
        """Restart the Deployments of ``namespaces`` with a pod on ``node`` (cordoned first),
        so that their pods run elsewhere."""
        for namespace in namespaces:
            pods = self.json(
                "get", "pods", "-n", namespace, "--field-selector", f"spec.nodeName={node}"
            )["items"]
            owners = {
                ref["name"].rsplit("-", 1)[0]  # ReplicaSet <deployment>-<hash>
                for pod in pods
                for ref in pod["metadata"].get("ownerReferences", [])
                if ref["kind"] == "ReplicaSet"
            }
            for deployment in sorted(owners):
                self.kubectl("-n", namespace, "rollout", "restart", f"deploy/{deployment}")
                self.kubectl(
                    "-n", namespace, "rollout", "status", f"deploy/{deployment}", "--timeout=5m"
                )

    def routes(self) -> dict[str, Any]:
        """The Istio objects of the demo namespace, by kind/name, their specs only."""
        out = {}
        for kind in ("virtualservices", "destinationrules"):
            for item in self.json("get", kind, "-n", EDGE_NS)["items"]:
                out[f"{kind}/{item['metadata']['name']}"] = item["spec"]
        return out

    def weights_to(self, node: str) -> dict[str, int]:
        """Per source node, the weight the VirtualService fn sends to ``node``."""
        vs = self.json("get", "virtualservice", "fn", "-n", EDGE_NS)
        out = {}
        for rule in vs["spec"]["http"]:
            match = rule.get("match") or []
            if not match:
                continue
            (source,) = match[0]["sourceLabels"].values()
            out[source] = sum(
                r.get("weight", 100)
                for r in rule["route"]
                if r["destination"]["subset"] == f"node-{node}"
            )
        return out


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (
            AssertionError, KeyError, ValueError, TypeError, AttributeError,
            subprocess.SubprocessError,
        ) as error:  # fmt: skip
            last_error, result = error, None
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {last_error}")


DIAGNOSTICS = (
    ("-n", OPERATOR_NS, "logs", f"deployment/{RELEASE}", "--tail=200"),
    ("-n", OPERATOR_NS, "describe", f"deployment/{RELEASE}"),
    ("-n", EDGE_NS, "describe", "routingpolicies"),
    ("-n", EDGE_NS, "get", "virtualservices,destinationrules", "-o", "yaml"),
    ("get", "pods", "-A", "-o", "wide"),
    ("get", "events", "-A", "--sort-by=.lastTimestamp"),
)


def dump_diagnostics(c: Cluster, why: str, config: pytest.Config) -> None:
    """What a failed run needs to be understood, written with pytest's capture off (a
    fixture's printed output is dropped when its teardown passes, and a setup's failure is
    not counted yet when its ``finally`` runs). Each command on its own: one that fails or
    hangs must not hide the others, nor keep the cluster from being deleted."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n==== e2e diagnostics ({why}) ====", flush=True)
        for cmd in DIAGNOSTICS:
            print(f"---- kubectl {' '.join(cmd)}", flush=True)
            try:
                print(c.kubectl(*cmd, check=False, timeout=60), flush=True)
            except (subprocess.SubprocessError, OSError) as error:
                print(f"(failed: {error})", flush=True)


def load_image(c: Cluster, image: str, directory: Path) -> None:
    """``kind load image-archive`` of a ``docker save`` of this platform alone: ``kind load
    docker-image`` fails on Docker's containerd image store (the default from Docker 29),
    which exports content such as build attestations that the node cannot import."""
    archive = directory / (image.replace(":", "_").replace("/", "_") + ".tar")
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    saved = c.run(
        "docker", "save", "--platform", f"linux/{arch}", "-o", str(archive), image,
        check=False, timeout=1200,
    )  # fmt: skip
    if not archive.exists():  # a Docker from before `save --platform`
        print(saved, flush=True)
        c.run("docker", "save", "-o", str(archive), image, timeout=1200)
    c.run("kind", "load", "image-archive", str(archive), "--name", CLUSTER, timeout=1200)


MIN_ISTIO = (1, 22)
"""The operator writes networking.istio.io/v1, which Istio serves from 1.22."""


def check_istioctl(c: Cluster) -> None:
    version = c.run("istioctl", "version", "--remote=false", "--short", check=False).strip()
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if len(found) == 2 and found < MIN_ISTIO:
        pytest.fail(f"istioctl {version}: the e2e suite needs Istio 1.22 or later")


@pytest.fixture(scope="module")
def cluster(e2e_allowed, request, tmp_path_factory) -> Cluster:
    """The cluster with everything of the quick start but the examples; deleted afterwards
    (after printing diagnostics if its setup or a test failed)."""
    directory = tmp_path_factory.mktemp("kind")
    kubeconfig = directory / "kubeconfig"
    c = Cluster(kubeconfig)
    created = False
    failed_before = request.session.testsfailed
    try:
        try:
            check_istioctl(c)
            if CLUSTER in c.run("kind", "get", "clusters").split():
                if os.environ.get("MARL_E2E_REUSE") != "1":
                    pytest.fail(f"kind cluster {CLUSTER} exists: delete it or set MARL_E2E_REUSE=1")
                c.run(
                    "kind", "export", "kubeconfig", "--name", CLUSTER,
                    "--kubeconfig", str(kubeconfig),
                )  # fmt: skip
            else:
                created = True
                c.run(
                    "kind", "create", "cluster", "--name", CLUSTER, "--config", "kind-config.yaml",
                    "--kubeconfig", str(kubeconfig), "--wait", "180s", timeout=900,
                )  # fmt: skip
            if os.environ.get("MARL_E2E_SKIP_BUILD") != "1":
                c.run("docker", "build", "-t", OPERATOR_IMAGE, ".", timeout=3600)
                c.run("docker", "build", "-t", WORKLOAD_IMAGE, "workload", timeout=1200)
            for image in (OPERATOR_IMAGE, WORKLOAD_IMAGE):
                load_image(c, image, directory)
            c.run("istioctl", "install", "--set", "profile=minimal", "-y", timeout=900)
            c.kubectl("apply", "-f", "deploy/prometheus.yaml")
            c.kubectl(
                "-n", "istio-system", "rollout", "status", "deploy/prometheus", "--timeout=5m"
            )  # fmt: skip
            c.kubectl("apply", "-f", "workload/k8s/")
            for deployment in ("fn", "loadgen"):
                for node in NODES:
                    c.kubectl(
                        "-n", EDGE_NS, "rollout", "status", f"deploy/{deployment}-{node}",
                        "--timeout=5m",
                    )  # fmt: skip
            # upgrade --install: a cluster kept from an earlier run (MARL_E2E_REUSE) has it
            c.run(
                c.helm, "upgrade", "--install", RELEASE, str(CHART), "--namespace", OPERATOR_NS,
                "--create-namespace", "--wait", "--timeout", "10m", timeout=900,
            )  # fmt: skip
            c.kubectl("apply", "-f", "examples/api-reader.yaml")
        except BaseException as error:
            if kubeconfig.exists():  # a cluster to look at
                dump_diagnostics(c, f"setup failed: {type(error).__name__}", request.config)
            raise
        yield c
        if request.session.testsfailed > failed_before:
            dump_diagnostics(c, "a test failed", request.config)
    finally:
        if created and os.environ.get("MARL_E2E_KEEP") != "1":
            c.run("kind", "delete", "cluster", "--name", CLUSTER, check=False, timeout=300)


class State(dict):
    """What one test leaves for the next (they run in file order): a test whose predecessor
    failed before leaving its part is skipped, saying so, instead of failing on a KeyError."""

    def __missing__(self, key: str) -> Any:
        pytest.skip(f"needs {key!r}, which an earlier test of this file leaves, and it failed")


@pytest.fixture(scope="module")
def state() -> State:
    return State()


def test_operator_is_ready(cluster):
    deployment = cluster.json("get", "deployment", RELEASE, "-n", OPERATOR_NS)
    assert deployment["status"].get("readyReplicas") == 1
    assert cluster.operator_api("/readyz")["status"] == "ready"
    crds = cluster.kubectl("get", "crds", "-o", "name")
    for name in ("routingpolicies.marl.dev", "edgenodes.marl.dev", "edgeservices.marl.dev"):
        assert name in crds


def test_policy_takes_over_the_routes(cluster, state):
    # A cluster kept from an earlier run may still carry its policy: gone, the routes are back.
    cluster.kubectl(
        "delete", "-f", "examples/policy.yaml", "--ignore-not-found", "--wait", "--timeout=180s"
    )
    state["routes_before"] = cluster.routes()
    cluster.kubectl(
        "apply", "-f", "examples/edgenodes.yaml", "-f", "examples/edgeservice.yaml",
        "-f", "examples/policy.yaml",
    )  # fmt: skip

    def ready():
        policy = cluster.json("get", "routingpolicy", POLICY, "-n", EDGE_NS)
        conditions = {
            c["type"]: c["status"] for c in policy.get("status", {}).get("conditions", [])
        }
        return conditions.get("Ready") == "True" and conditions.get("WeightsApplied") == "True"

    wait_for("the RoutingPolicy to be Ready with its weights applied", ready, timeout=600)
    print(cluster.kubectl("get", "routingpolicies", "-n", EDGE_NS))
    assert set(cluster.weights_to(DEGRADED)) == set(NODES)
    # every edge node is up on the kind worker it selects (by marl.dev/edge-node, or by zone)
    edge_nodes = cluster.json("get", "edgenodes")["items"]
    print(cluster.kubectl("get", "edgenodes"))
    for node in edge_nodes:
        (ready,) = node["status"]["conditions"]
        assert ready["status"] == "True", node["status"]
        assert len(node["status"]["kubernetesNodes"]) == 1, node["status"]

    # a baseline of the latency the clients see, once metrics flow
    def observed():
        report = cluster.operator_api(f"/api/v1/policies/{EDGE_NS}/{POLICY}")
        return report["observed_p95_ms"].get("fn")

    samples = []
    for _ in range(3):
        samples.append(wait_for("an observed p95 of fn", observed, timeout=300))
        time.sleep(10)
    state["baseline_p95"] = statistics.median(samples)
    print(f"baseline p95 {state['baseline_p95']:.0f} ms")


def test_degraded_node_loses_traffic_and_latency_recovers(cluster, state):
    before = cluster.weights_to(DEGRADED)
    exec_fn = ("-n", EDGE_NS, "exec", f"deploy/fn-{DEGRADED}", "-c", "fn", "--")
    cluster.kubectl(*exec_fn, "python", "-m", "edgefn", "slow", str(SLOWDOWN))
    try:
        trace = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(10)
            report = cluster.operator_api(f"/api/v1/policies/{EDGE_NS}/{POLICY}")
            weights = cluster.weights_to(DEGRADED)
            p95 = report["observed_p95_ms"].get("fn")
            trace.append((weights, p95))
            print(f"weights to {DEGRADED}: {weights}  p95: {p95}  outcome: {report['outcome']}")
            moved = statistics.mean(weights.values()) <= max(
                statistics.mean(before.values()) - 15, 10
            )
            recovered = p95 is not None and p95 <= max(2 * state["baseline_p95"], LATENCY_TARGET_MS)
            if moved and recovered and len(trace) >= 3:
                break
        weights, p95 = trace[-1]
        assert statistics.mean(weights.values()) < statistics.mean(before.values()), (
            f"traffic did not move away from {DEGRADED}: before {before}, trace {trace}"
        )
        assert moved, f"too little traffic moved away from {DEGRADED}: {before} -> {weights}"
        assert recovered, f"latency did not recover: baseline {state['baseline_p95']}, {trace}"
        peak = max((p for _, p in trace if p is not None), default=None)
        print(f"p95: baseline {state['baseline_p95']:.0f} ms, peak {peak} ms, end {p95:.0f} ms")
    finally:
        cluster.kubectl(*exec_fn, "python", "-m", "edgefn", "normal", check=False)


def test_a_node_whose_kubelet_stops_gets_no_traffic_until_it_is_back(cluster, state):
    """edge-1's worker goes NotReady once its kubelet stops posting (its pods keep running,
    but their endpoints go): the operator routes nothing to edge-1 and says why; back, it
    routes to it again. What the test needs elsewhere (istiod, whose webhook must admit the
    operator's writes, Prometheus, CoreDNS, the operator) is first moved off that worker."""
    worker = f"{CLUSTER}-worker2"  # edge-1's, as kind-config.yaml orders and labels them
    cluster.kubectl("cordon", worker)
    try:
        # CoreDNS too: the operator's every query to Prometheus resolves a name.
        cluster.move_off(worker, ("kube-system", "istio-system", OPERATOR_NS))
        cluster.run("docker", "exec", worker, "systemctl", "stop", "kubelet")
        try:

            def routed_around() -> bool:
                policy = cluster.json("get", "routingpolicy", POLICY, "-n", EDGE_NS)
                conditions = {c["type"]: c for c in policy.get("status", {}).get("conditions", [])}
                down = conditions.get("NodesReady", {}).get("status") == "False"
                return down and not any(cluster.weights_to("edge-1").values())

            # within the 300 s the pods tolerate an unreachable node, so none is evicted
            wait_for("no route to edge-1", routed_around, timeout=200)
            (ready,) = cluster.json("get", "edgenode", "edge-1")["status"]["conditions"]
            assert ready["status"] == "False" and worker in ready["message"], ready
            print(cluster.kubectl("get", "edgenodes"))
        finally:
            cluster.run("docker", "exec", worker, "systemctl", "start", "kubelet", check=False)
            cluster.kubectl(
                "wait", "--for=condition=Ready", f"node/{worker}", "--timeout=180s", check=False
            )
    finally:
        cluster.kubectl("uncordon", worker, check=False)
    for deployment in ("fn-edge-1", "loadgen-edge-1"):
        cluster.kubectl("-n", EDGE_NS, "rollout", "status", f"deploy/{deployment}", "--timeout=5m")
    wait_for(
        "traffic to edge-1 again",
        lambda: any(cluster.weights_to("edge-1").values()),
        timeout=420,
    )


def test_a_node_without_a_pod_of_fn_gets_no_fn_traffic_until_one_is_back(cluster, state):
    """fn-edge-1 scaled to nothing: edge-1 is still up, but its subset has no endpoint, so
    the operator routes no fn request there and PodsReady says why; scaled back, it routes
    to it again."""
    cluster.kubectl("-n", EDGE_NS, "scale", "deploy/fn-edge-1", "--replicas=0")
    try:

        def routed_around() -> bool:
            policy = cluster.json("get", "routingpolicy", POLICY, "-n", EDGE_NS)
            conditions = {c["type"]: c for c in policy.get("status", {}).get("conditions", [])}
            unserved = conditions.get("PodsReady", {})
            up = conditions.get("NodesReady", {}).get("status") == "True"
            no_pod = unserved.get("status") == "False" and "fn on edge-1" in unserved["message"]
            return up and no_pod and not any(cluster.weights_to("edge-1").values())

        wait_for("no fn route to edge-1", routed_around, timeout=120)
    finally:
        cluster.kubectl("-n", EDGE_NS, "scale", "deploy/fn-edge-1", "--replicas=1", check=False)
    cluster.kubectl("-n", EDGE_NS, "rollout", "status", "deploy/fn-edge-1", "--timeout=5m")
    wait_for(
        "fn traffic to edge-1 again",
        lambda: any(cluster.weights_to("edge-1").values()),
        timeout=300,
    )


def test_deleting_the_policy_restores_the_routes(cluster, state):
    cluster.kubectl("delete", "-f", "examples/policy.yaml", "--wait", "--timeout=180s")
    wait_for(
        "the routes of before the policy",
        lambda: cluster.routes() == state["routes_before"],
        timeout=120,
    )


def api_tls_secret(host: str) -> tuple[str, str]:
    """A kubernetes.io/tls Secret for the operator's API, from a CA of its own (ca.crt too,
    as cert-manager's CA issuer writes it), as YAML for kubectl's stdin; and its certificate."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert(host, f"{host}.{OPERATOR_NS}.svc", "127.0.0.1")
    files = {
        "tls.crt": b"".join(blob.bytes() for blob in issued.cert_chain_pems),
        "tls.key": issued.private_key_pem.bytes(),
        "ca.crt": ca.cert_pem.bytes(),
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": API_TLS_SECRET, "namespace": OPERATOR_NS},
        "stringData": {name: data.decode() for name, data in files.items()},
    }
    return yaml.safe_dump(secret), issued.cert_chain_pems[0].bytes().decode()


def test_the_api_serves_https_and_a_renewed_certificate_without_a_restart(cluster, state):
    """api.tls from a Secret: the probes and a reader's request over HTTPS; then the Secret is
    renewed (another CA, as a new issuer would) and the same pod serves the new certificate."""
    secret, _ = api_tls_secret(RELEASE)
    cluster.kubectl("apply", "-f", "-", input=secret)
    cluster.run(
        cluster.helm, "upgrade", RELEASE, str(CHART), "--namespace", OPERATOR_NS,
        "--reuse-values", "--set", f"api.tls.enabled=true,api.tls.secretName={API_TLS_SECRET}",
        "--set", "scrapeAnnotations=false", "--wait", "--timeout", "5m", timeout=600,
    )  # fmt: skip
    cluster.api_tls = True
    assert cluster.operator_api("/readyz")["status"] == "ready"  # over HTTPS, verified
    assert "acting" in cluster.operator_api("/api/v1/replica")  # the reader's token, too
    pod = operator_pod(cluster)
    secret, renewed = api_tls_secret(RELEASE)
    cluster.kubectl("apply", "-f", "-", input=secret)
    # The kubelet swaps the files within about a minute, the operator re-reads them within 30 s.
    wait_for("the renewed certificate served", lambda: served(cluster) == pem(renewed), 300)
    assert cluster.operator_api("/readyz")["status"] == "ready"  # against the new ca.crt
    same = operator_pod(cluster)
    assert same["metadata"]["uid"] == pod["metadata"]["uid"]
    restarts = [p["status"]["containerStatuses"][0]["restartCount"] for p in (pod, same)]
    assert restarts[0] == restarts[1], "the operator restarted to serve the renewed certificate"


def served(cluster: Cluster) -> str:
    """The certificate the operator's API presents, as its own pod connects to it."""
    show = "import ssl; print(ssl.get_server_certificate(('127.0.0.1', 8080)))"
    exec_ = ("-n", OPERATOR_NS, "exec", f"deploy/{RELEASE}", "--")
    return pem(cluster.kubectl(*exec_, "python", "-c", show))


def pem(text: str) -> str:
    return "".join(text.split())


def operator_pod(cluster: Cluster) -> dict:
    selector = f"app.kubernetes.io/name=marl-operator,app.kubernetes.io/instance={RELEASE}"
    (pod,) = cluster.json("get", "pods", "-n", OPERATOR_NS, "-l", selector)["items"]
    return pod


def test_uninstall_removes_the_operator_and_keeps_the_crds(cluster, state):
    cluster.run(cluster.helm, "uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait")
    gone = cluster.kubectl(
        "get", "deployment", RELEASE, "-n", OPERATOR_NS, "--ignore-not-found", "-o", "name"
    )  # fmt: skip
    assert gone.strip() == ""
    assert "routingpolicies.marl.dev" in cluster.kubectl("get", "crds", "-o", "name")
    assert cluster.routes() == state["routes_before"]
