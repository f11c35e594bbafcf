"""The emulated API server behaves like a real one where the operator depends on it.

kubectl, the ``kubernetes`` client and kopf each talk to it the way they talk to a cluster:
server-side apply and reads, optimistic concurrency, the status subresource, and kopf's
watching, finalizers, daemons and peering.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml
from kopf_harness import ApiError, eventually, kube, running_operator
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from marl_operator.mesh.patching import apply_merge_patch as merge_patch

from demo.apiserver import ApiServer, matches_labels, serve, write_kubeconfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")

RP = "/apis/marl.dev/v1alpha1/namespaces/edge/routingpolicies"
VS_GROUP, VS_VERSION, VS_PLURAL = "networking.istio.io", "v1", "virtualservices"


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    cache = kubeconfig.parent / "kubectl-cache"  # discovery caches stay out of $HOME
    done = subprocess.run(
        [KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": "/nonexistent"},  # only the explicit kubeconfig
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done


def example_policy() -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / "policy.yaml").read_text())


# --- pure helpers -------------------------------------------------------------------------------


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    patched = merge_patch(target, {"a": {"b": None, "c": [3]}, "e": {"f": 1}, "d": {"x": 1}})
    assert patched == {"a": {"c": [3]}, "d": {"x": 1}, "e": {"f": 1}}
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not mutated


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("app=fn", True),
        ("app==fn,tier!=db", True),
        ("app=gw", False),
        ("tier", False),
        ("!tier", True),
        ("app in (fn, gw)", True),
        ("app notin (fn)", False),
        ("app in (b,fn),zone", True),
        ("app in (a,b),zone", False),
    ],
)
def test_label_selectors(selector: str, expected: bool) -> None:
    assert matches_labels(selector, {"app": "fn", "zone": "a"}) is expected


# --- kubectl ------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_kubectl_applies_and_reads_back_each_example(apiserver: Any, example: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(example.read_text()) if doc]
    out = kubectl(apiserver.kubeconfig, "apply", "--server-side", "-f", str(example)).stdout
    assert out.count("serverside-applied") == len(docs)
    for doc in docs:
        group, _, _ = doc["apiVersion"].rpartition("/")  # "" for the core group
        namespace = doc["metadata"].get("namespace")
        where = ["-n", namespace] if namespace else []
        kind = f"{doc['kind'].lower()}.{group}" if group else doc["kind"].lower()
        ref = f"{kind}/{doc['metadata']['name']}"
        got = json.loads(kubectl(apiserver.kubeconfig, "get", ref, *where, "-o", "json").stdout)
        content = set(doc) - {"apiVersion", "kind", "metadata"}  # spec; an RBAC object's rules
        assert content and {key: got[key] for key in content} == {key: doc[key] for key in content}
        assert (got["apiVersion"], got["kind"]) == (doc["apiVersion"], doc["kind"])
        meta = got["metadata"]
        assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
        assert int(meta["resourceVersion"]) > 0
        # A list (what `kubectl get routingpolicies` reads) carries its kind.
        listed = kubectl(apiserver.kubeconfig, "get", ref.split("/")[0], *where, "-o", "json")
        assert json.loads(listed.stdout)["kind"] == "List"
        names = kubectl(apiserver.kubeconfig, "get", ref.split("/")[0], *where).stdout
        assert doc["metadata"]["name"] in names


@needs_kubectl
def test_kubectl_get_lists_by_plural_and_applies_again_without_changes(apiserver: Any) -> None:
    policy = str(REPO / "examples" / "policy.yaml")
    kubectl(apiserver.kubeconfig, "apply", "--server-side", "-f", policy)
    before = apiserver.api.objects["marl.dev/v1alpha1/routingpolicies", "edge", "edge-routing"]
    version = before["metadata"]["resourceVersion"]
    out = kubectl(apiserver.kubeconfig, "get", "routingpolicies", "-n", "edge").stdout
    assert out.split()[:3] == ["NAME", "AGE", "edge-routing"]
    kubectl(apiserver.kubeconfig, "apply", "--server-side", "-f", policy)
    after = apiserver.api.objects["marl.dev/v1alpha1/routingpolicies", "edge", "edge-routing"]
    assert after["metadata"]["resourceVersion"] == version  # a no-op write is no new version


# --- the kubernetes client ----------------------------------------------------------------------


def virtual_service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "edge"},
        "spec": {"hosts": ["fn"], "http": [{"route": [{"destination": {"host": "fn"}}]}]},
        "status": {"ignored": "on create"},
    }


def test_kubernetes_client_create_get_patch_with_optimistic_concurrency(apiserver: Any) -> None:
    api_client = k8s_config.new_client_from_config(config_file=str(apiserver.kubeconfig))
    api = k8s.CustomObjectsApi(api_client)
    where = (VS_GROUP, VS_VERSION, "edge", VS_PLURAL)

    created = api.create_namespaced_custom_object(*where, virtual_service("fn"))
    meta = created["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
    assert "status" not in created  # the status subresource: a create sets no status
    assert api.get_namespaced_custom_object(*where, "fn") == created

    spec_change = {"spec": {"hosts": ["fn", "fn.edge"]}}
    patched = api.patch_namespaced_custom_object(*where, "fn", spec_change)
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert patched["metadata"]["generation"] == 2
    assert patched["spec"]["http"] == created["spec"]["http"]  # merged, not replaced

    labelled = api.patch_namespaced_custom_object(
        *where, "fn", {"metadata": {"labels": {"a": "b"}}}
    )
    assert int(labelled["metadata"]["resourceVersion"]) > int(
        patched["metadata"]["resourceVersion"]
    )
    assert labelled["metadata"]["generation"] == 2  # metadata is not the spec

    stale = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "spec": {"hosts": []}}
    with pytest.raises(ApiException) as conflict:
        api.patch_namespaced_custom_object(*where, "fn", stale)
    assert conflict.value.status == 409
    assert json.loads(conflict.value.body)["reason"] == "Conflict"
    fresh = {"metadata": {"resourceVersion": labelled["metadata"]["resourceVersion"]}}
    fresh["spec"] = {"hosts": ["fn"]}
    assert api.patch_namespaced_custom_object(*where, "fn", fresh)["metadata"]["generation"] == 3

    # The generated client sends a list as a merge patch (refused, as a real server does);
    # a client whose Content-Type says JSON patch is the known way round.
    with pytest.raises(ApiException) as as_merge:
        api.patch_namespaced_custom_object(*where, "fn", [{"op": "add", "path": "/x", "value": 1}])
    assert as_merge.value.status == 422
    json_client = k8s_config.new_client_from_config(config_file=str(apiserver.kubeconfig))
    json_client.set_default_header("Content-Type", "application/json-patch+json")
    json_api = k8s.CustomObjectsApi(json_client)
    ops = [
        {"op": "test", "path": "/spec/hosts/0", "value": "fn"},
        {"op": "add", "path": "/spec/gateways", "value": ["mesh"]},
    ]
    json_patched = json_api.patch_namespaced_custom_object(*where, "fn", ops)
    assert json_patched["spec"]["gateways"] == ["mesh"]
    assert json_patched["metadata"]["generation"] == 4
    failing = [{"op": "test", "path": "/spec/hosts/0", "value": "other"}, ops[1]]
    with pytest.raises(ApiException) as failed_test:
        json_api.patch_namespaced_custom_object(*where, "fn", failing)
    assert failed_test.value.status == 422
    unchanged = api.get_namespaced_custom_object(*where, "fn")
    assert unchanged["metadata"]["resourceVersion"] == json_patched["metadata"]["resourceVersion"]


def test_dry_run_checks_everything_and_stores_nothing(apiserver: Any) -> None:
    api = k8s.CustomObjectsApi(k8s_config.new_client_from_config(str(apiserver.kubeconfig)))
    where = (VS_GROUP, VS_VERSION, "edge", VS_PLURAL)

    would = api.create_namespaced_custom_object(*where, virtual_service("fn"), dry_run="All")
    assert would["metadata"]["name"] == "fn" and would["metadata"]["namespace"] == "edge"
    with pytest.raises(ApiException) as missing:
        api.get_namespaced_custom_object(*where, "fn")
    assert missing.value.status == 404  # nothing was stored

    created = api.create_namespaced_custom_object(*where, virtual_service("fn"))
    version = created["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as exists:
        api.create_namespaced_custom_object(*where, virtual_service("fn"), dry_run="All")
    assert exists.value.status == 409
    change = {"metadata": {"resourceVersion": version}, "spec": {"hosts": ["other"]}}
    would = api.patch_namespaced_custom_object(*where, "fn", change, dry_run="All")
    assert would["spec"]["hosts"] == ["other"]
    stale = {"metadata": {"resourceVersion": "1"}, "spec": {"hosts": ["other"]}}
    with pytest.raises(ApiException) as conflict:
        api.patch_namespaced_custom_object(*where, "fn", stale, dry_run="All")
    assert conflict.value.status == 409
    api.delete_namespaced_custom_object(*where, "fn", dry_run="All")
    assert api.get_namespaced_custom_object(*where, "fn") == created  # untouched


def test_denied_verbs_answer_403_until_allowed(apiserver: Any) -> None:
    api = k8s.CustomObjectsApi(k8s_config.new_client_from_config(str(apiserver.kubeconfig)))
    where = (VS_GROUP, VS_VERSION, "edge", VS_PLURAL)
    apiserver.api.deny("create", "virtualservices.networking.istio.io", "edge")
    with pytest.raises(ApiException) as refused:
        api.create_namespaced_custom_object(*where, virtual_service("fn"))
    assert refused.value.status == 403
    status = json.loads(refused.value.body)
    assert status["reason"] == "Forbidden"
    assert status["message"] == (
        'virtualservices.networking.istio.io "fn" is forbidden: User '
        '"system:serviceaccount:default:default" cannot create resource "virtualservices" '
        'in API group "networking.istio.io" in the namespace "edge"'
    )
    with pytest.raises(ApiException) as dry:
        api.create_namespaced_custom_object(*where, virtual_service("fn"), dry_run="All")
    assert dry.value.status == 403  # a dry run is authorized as the real call
    # Another namespace, and other verbs, are not denied; nothing was stored by the refusal.
    other = {**virtual_service("b"), "metadata": {"name": "b", "namespace": "edge-b"}}
    api.create_namespaced_custom_object(VS_GROUP, VS_VERSION, "edge-b", VS_PLURAL, other)
    with pytest.raises(ApiException) as missing:
        api.get_namespaced_custom_object(*where, "fn")
    assert missing.value.status == 404

    apiserver.api.deny("patch", "virtualservices.networking.istio.io")  # every namespace
    apiserver.api.allow("create", "virtualservices.networking.istio.io", "edge")
    api.create_namespaced_custom_object(*where, virtual_service("fn"))
    for namespace in ("edge", "edge-b"):
        name = "fn" if namespace == "edge" else "b"
        with pytest.raises(ApiException) as refused:
            api.patch_namespaced_custom_object(
                VS_GROUP, VS_VERSION, namespace, VS_PLURAL, name, {"spec": {"hosts": ["x"]}}
            )
        assert refused.value.status == 403
    assert api.get_namespaced_custom_object(*where, "fn")["spec"]["hosts"] == ["fn"]


def test_status_subresource_is_isolated(apiserver: Any) -> None:
    api = k8s.CustomObjectsApi(k8s_config.new_client_from_config(str(apiserver.kubeconfig)))
    where = (VS_GROUP, VS_VERSION, "edge", VS_PLURAL)
    created = api.create_namespaced_custom_object(*where, virtual_service("st"))
    both = {"spec": {"hosts": ["changed"]}, "status": {"observed": 1}}
    via_status = api.patch_namespaced_custom_object_status(*where, "st", both)
    assert via_status["status"] == {"observed": 1}
    assert via_status["spec"] == created["spec"]
    assert via_status["metadata"]["generation"] == 1
    via_main = api.patch_namespaced_custom_object(*where, "st", {**both, "status": {"observed": 2}})
    assert via_main["status"] == {"observed": 1}
    assert via_main["spec"]["hosts"] == ["changed"]
    assert via_main["metadata"]["generation"] == 2


def test_lists_carry_kind_and_honour_label_selectors(apiserver: Any) -> None:
    api = k8s.CustomObjectsApi(k8s_config.new_client_from_config(str(apiserver.kubeconfig)))
    where = (VS_GROUP, VS_VERSION, "edge", VS_PLURAL)
    for name, app in (("a", "fn"), ("b", "gw")):
        body = virtual_service(name)
        body["metadata"]["labels"] = {"app": app}
        api.create_namespaced_custom_object(*where, body)
    listed = api.list_namespaced_custom_object(*where)
    assert listed["kind"] == "VirtualServiceList"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["a", "b"]
    selected = api.list_namespaced_custom_object(*where, label_selector="app=gw")
    assert [item["metadata"]["name"] for item in selected["items"]] == ["b"]
    assert (
        api.list_namespaced_custom_object(VS_GROUP, VS_VERSION, "other", VS_PLURAL)["items"] == []
    )


# --- kopf in-process ----------------------------------------------------------------------------


def test_kopf_create_handler_patches_status() -> None:
    async def scenario() -> None:
        registry = kopf.OperatorRegistry()
        seen: list[str] = []

        @kopf.on.create("marl.dev", "v1alpha1", "routingpolicies", registry=registry)
        def created(name: str, patch: kopf.Patch, **_: Any) -> None:
            seen.append(name)
            patch.status["phase"] = "Seen"

        async with serve() as url, running_operator(registry, url):
            await kube(url, "POST", RP, example_policy())

            async def phase() -> Any:
                return (await kube(url, "GET", f"{RP}/edge-routing")).get("status", {}).get("phase")

            assert await eventually(phase, what="status.phase") == "Seen"
            await asyncio.sleep(0.5)  # time for a wrongly repeated handler call
        assert seen == ["edge-routing"]

    asyncio.run(scenario())


def test_kopf_daemon_and_delete_handler_with_finalizer() -> None:
    async def scenario() -> None:
        registry = kopf.OperatorRegistry()
        started, exited, deleted = asyncio.Event(), asyncio.Event(), asyncio.Event()

        @kopf.daemon("marl.dev", "v1alpha1", "routingpolicies", registry=registry)
        async def watch_policy(stopped: kopf.DaemonStopped, **_: Any) -> None:
            started.set()
            await stopped.wait()
            exited.set()

        @kopf.on.delete("marl.dev", "v1alpha1", "routingpolicies", registry=registry)
        def gone(**_: Any) -> None:
            deleted.set()

        async with serve() as url, running_operator(registry, url):
            await kube(url, "POST", RP, example_policy())
            await asyncio.wait_for(started.wait(), 10)

            async def finalized() -> Any:
                return (await kube(url, "GET", f"{RP}/edge-routing"))["metadata"].get("finalizers")

            assert await eventually(finalized, what="kopf's finalizer")
            await kube(url, "DELETE", f"{RP}/edge-routing")
            await asyncio.wait_for(deleted.wait(), 10)
            await asyncio.wait_for(exited.wait(), 10)

            async def absent() -> bool:
                try:
                    await kube(url, "GET", f"{RP}/edge-routing")
                except ApiError as error:
                    return error.status == 404
                return False

            assert await eventually(absent, what="the object's deletion")

    asyncio.run(scenario())


def test_kopf_peering_keeps_its_peering_object_alive() -> None:
    async def scenario() -> None:
        registry = kopf.OperatorRegistry()

        @kopf.on.create("marl.dev", "v1alpha1", "routingpolicies", registry=registry)
        def created(**_: Any) -> None:
            pass

        peering = {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "marl-operator"},
        }
        path = "/apis/kopf.dev/v1/clusterkopfpeerings"
        async with serve() as url:
            await kube(url, "POST", path, peering)
            async with running_operator(registry, url, peering="marl-operator"):

                async def peers() -> Any:
                    return (await kube(url, "GET", f"{path}/marl-operator")).get("status")

                assert await eventually(peers, what="kopf's peer entry")

    asyncio.run(scenario())


# --- the emulator's own semantics through HTTP --------------------------------------------------


def test_watch_from_a_resource_version_sends_only_newer_changes() -> None:
    async def scenario() -> None:
        api = ApiServer()
        async with serve(api) as url:
            first = await kube(url, "POST", RP, example_policy())
            second_body = copy.deepcopy(example_policy())
            second_body["metadata"]["name"] = "second"
            await kube(url, "POST", RP, second_body)
            listed = await kube(url, "GET", RP)
            assert listed["kind"] == "RoutingPolicyList"
            since = first["metadata"]["resourceVersion"]
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{url}{RP}?watch=true&resourceVersion={since}") as response,
            ):
                assert response.headers["Content-Type"].startswith("application/json")
                line = await asyncio.wait_for(response.content.readline(), 5)
                event = json.loads(line)
                assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "second")
                await kube(url, "PATCH", f"{RP}/edge-routing", {"spec": {"suspend": True}})
                event = json.loads(await asyncio.wait_for(response.content.readline(), 5))
                assert event["type"] == "MODIFIED"
                assert event["object"]["spec"]["suspend"] is True

    asyncio.run(scenario())


def test_a_watch_from_a_list_s_version_sends_the_deletions_since() -> None:
    """kopf lists, then watches from the list's version. An object deleted in between was
    never sent as DELETED, so the watcher kept it as a ghost."""

    async def scenario() -> None:
        async with serve() as url:
            await kube(url, "POST", RP, example_policy())
            second = copy.deepcopy(example_policy())
            second["metadata"]["name"] = "second"
            await kube(url, "POST", RP, second)
            since = (await kube(url, "GET", RP))["metadata"]["resourceVersion"]
            await kube(url, "DELETE", f"{RP}/edge-routing")
            await kube(url, "PATCH", f"{RP}/second", {"spec": {"suspend": True}})
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{url}{RP}?watch=true&resourceVersion={since}") as response,
            ):
                events = [
                    json.loads(await asyncio.wait_for(response.content.readline(), 5))
                    for _ in range(2)
                ]
            seen = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
            assert seen == [("DELETED", "edge-routing"), ("ADDED", "second")]

    asyncio.run(scenario())


def test_generate_name_and_unknown_resources() -> None:
    async def scenario() -> None:
        async with serve() as url:
            event = {"metadata": {"generateName": "kopf-event-"}, "reason": "Test"}
            created = await kube(url, "POST", "/api/v1/namespaces/edge/events", event)
            assert created["metadata"]["name"].startswith("kopf-event-")
            assert created["metadata"]["namespace"] == "edge"
            namespace = await kube(url, "POST", "/api/v1/namespaces", {"metadata": {"name": "x"}})
            assert namespace["kind"] == "Namespace"
            assert (await kube(url, "GET", "/api/v1/namespaces/x"))["metadata"]["name"] == "x"
            with pytest.raises(ApiError) as unknown:
                await kube(url, "POST", "/apis/marl.dev/v1alpha1/namespaces/edge/nothings", event)
            assert unknown.value.status == 404
            with pytest.raises(ApiError) as duplicate:
                await kube(url, "POST", "/api/v1/namespaces", {"metadata": {"name": "x"}})
            assert duplicate.value.status == 409

    asyncio.run(scenario())


def test_an_ipv6_address_is_served_at_a_bracketed_url() -> None:
    """``--host ::1`` printed and wrote http://::1:PORT, which no client parses as a host
    and a port: kubectl failed against the kubeconfig."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")

    async def scenario() -> None:
        async with serve(host="::1") as url:
            assert url.startswith("http://[::1]:"), url
            namespace = await kube(url, "POST", "/api/v1/namespaces", {"metadata": {"name": "x"}})
            assert namespace["metadata"]["name"] == "x"

    asyncio.run(scenario())


# --- as a process -------------------------------------------------------------------------------


@needs_kubectl
def test_module_serves_until_sigterm(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    process = subprocess.Popen(
        [sys.executable, "-m", "demo.apiserver", "--port", "0", "--kubeconfig", str(kubeconfig)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"] == url
        crds = kubectl(kubeconfig, "get", "crd", "-o", "name").stdout.split()
        assert "customresourcedefinition.apiextensions.k8s.io/routingpolicies.marl.dev" in crds
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in process.stderr.read()


def test_write_kubeconfig_is_read_by_the_kubernetes_client(tmp_path: Path) -> None:
    path = write_kubeconfig("http://127.0.0.1:1234", tmp_path / "sub" / "config")
    api_client = k8s_config.new_client_from_config(config_file=str(path))
    assert api_client.configuration.host == "http://127.0.0.1:1234"
