"""Mesh writers: generated VirtualService, DestinationRule and HTTPRoute objects are accepted by
the upstream CRD schemas (and their CEL rules), carry integer weights summing to 100 per rule,
read back to the routes they were built from, and the patches correct drift, take over a
user's object and give it back."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
from kube_schema import CRDValidator, load_documents
from marl_operator.mesh import naming, routing
from marl_operator.mesh.factory import PROVIDERS, writer_for
from marl_operator.mesh.gatewayapi import GatewayAPIWriter, http_route
from marl_operator.mesh.istio import IstioWriter, destination_rule, virtual_service
from marl_operator.mesh.model import (
    MeshError,
    MeshNode,
    MeshRoutes,
    MeshService,
    RouteLimitError,
    node_from_edge_node,
)
from marl_operator.mesh.ownership import (
    ADOPT_ANNOTATION,
    MANAGED_BY_LABEL,
    ORIGINAL_SPEC_ANNOTATION,
    is_managed,
)
from marl_operator.mesh.patching import apply_merge_patch, reconcile_patch, restore_patch

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "upstream-crds"
UPSTREAM_FILES = {
    "VirtualService": "istio-virtualservices.yaml",
    "DestinationRule": "istio-destinationrules.yaml",
    "HTTPRoute": "gatewayapi-httproutes.yaml",
}


@pytest.fixture(scope="module")
def upstream() -> dict[str, CRDValidator]:
    """Validators for the upstream mesh CRDs (kept beside the project, not in it)."""
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream mesh CRDs not found at {UPSTREAM} (kept outside the repository)")
    return {
        kind: CRDValidator(load_documents(UPSTREAM / f)[0]) for kind, f in UPSTREAM_FILES.items()
    }


def _examples(name: str) -> list[dict]:
    return load_documents(ROOT / "examples" / name)


ISTIO_SERVICE = MeshService.from_edge_service(_examples("edgeservice.yaml")[0])
GATEWAY_SERVICE = MeshService.from_edge_service(_examples("edgeservice-httproute.yaml")[0])
TRIANGLE = tuple(node_from_edge_node(obj) for obj in _examples("edgenodes.yaml"))
WRITERS = {
    "istio": (IstioWriter(), ISTIO_SERVICE),
    "gateway-api": (GatewayAPIWriter(), GATEWAY_SERVICE),
}


def triangle_routes(min_weight: int = 0):
    fractions = {
        "edge-0": {"edge-0": 0.62, "edge-1": 0.31, "edge-2": 0.07},
        "edge-1": {"edge-1": 1.0, "edge-0": 0.0, "edge-2": 0.0},
        "edge-2": {"edge-2": 1 / 3, "edge-0": 1 / 3, "edge-1": 1 / 3},
    }
    table = routing.weights_from_fractions(fractions, min_weight=min_weight)
    return routing.build_routes(table, TRIANGLE)


def ring_routes(n: int, *, sources: int | None = None, labelled: bool = False):
    """n nodes in a ring, each keeping 60% and sending 20% to either side."""
    nodes = [MeshNode(f"n{i}", f"site-{i}" if labelled else "") for i in range(n)]
    table = {}
    for i in range(n if sources is None else sources):
        row = {f"n{i}": 0.6, f"n{(i + 1) % n}": 0.2, f"n{(i - 1) % n}": 0.2}
        table[f"n{i}"] = routing.integer_weights(row)
    return routing.build_routes(table, nodes)


CASES = {
    "triangle": triangle_routes,
    "triangle-min-weight": lambda: triangle_routes(min_weight=5),
    "ring-10-labelled": lambda: ring_routes(10, labelled=True),
    "ring-15": lambda: ring_routes(15),  # 16 HTTPRoute rules: exactly the limit
    "one-node": lambda: routing.build_routes({"solo": {"solo": 100}}, ["solo"]),
    "no-source-rows": lambda: routing.build_routes({}, ["a", "b", "c"]),
}


def _server_copy(obj: dict) -> dict:
    """``obj`` as the API server returns it: with the fields it adds."""
    live = copy.deepcopy(obj)
    live["metadata"] |= {"uid": "0b8e", "resourceVersion": "41", "generation": 1}
    return live


# --- the validator itself is trustworthy ---------------------------------------------------


def test_upstream_validator_enforces_bounds_and_cel(upstream):
    """The refusals below come from the upstream schemas (bounds, formats, CEL), so a clean
    result for generated objects means something."""
    routes = triangle_routes()
    (route,) = GatewayAPIWriter().desired(GATEWAY_SERVICE, routes)
    assert upstream["HTTPRoute"].errors(route) == []
    ref = "spec.rules[0].backendRefs[0]"

    too_heavy = copy.deepcopy(route)
    too_heavy["spec"]["rules"][0]["backendRefs"][0]["weight"] = 1_000_001
    assert upstream["HTTPRoute"].errors(too_heavy) == [
        f"{ref}.weight: 1000001 is greater than the maximum of 1000000"
    ]
    negative = copy.deepcopy(route)
    negative["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
    assert upstream["HTTPRoute"].errors(negative) == [
        f"{ref}.weight: -1 is less than the minimum of 0"
    ]
    no_port = copy.deepcopy(route)
    del no_port["spec"]["rules"][0]["backendRefs"][0]["port"]
    assert upstream["HTTPRoute"].errors(no_port) == [f"{ref}: Must have port for Service reference"]
    seventeen = copy.deepcopy(route)
    seventeen["spec"]["rules"] = [route["spec"]["rules"][-1]] * 17
    assert any("is too long" in e for e in upstream["HTTPRoute"].errors(seventeen))

    vs = virtual_service(ISTIO_SERVICE, routes)
    assert upstream["VirtualService"].errors(vs) == []
    overflow = copy.deepcopy(vs)
    overflow["spec"]["http"][0]["route"][0]["weight"] = 2**31
    assert upstream["VirtualService"].errors(overflow) == [
        "spec.http[0].route[0].weight: 2147483648 is not a 'int32'"
    ]
    unknown = copy.deepcopy(vs)
    unknown["spec"]["http"][0]["route"][0]["wieght"] = 5
    assert "'wieght' was unexpected" in upstream["VirtualService"].errors(unknown)[0]
    dr = destination_rule(ISTIO_SERVICE, routes.nodes)
    del dr["spec"]["subsets"][0]["name"]
    assert upstream["DestinationRule"].errors(dr) == [
        "spec.subsets[0]: 'name' is a required property"
    ]


# --- generated objects ----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_generated_objects_pass_upstream_schemas(upstream, provider, case):
    writer, service = WRITERS[provider]
    for obj in writer.desired(service, CASES[case]()):
        validator = upstream[obj["kind"]]
        assert validator.errors(obj) == [], obj["kind"]
        # Nothing left for the server to default: a live copy compares equal, no endless patching.
        assert validator.defaulted(obj) == obj, obj["kind"]
        assert obj["metadata"]["namespace"] == service.namespace


def _rules(obj: dict) -> list[tuple[list, list[int]]]:
    """(match, weights) of every rule of a VirtualService or HTTPRoute."""
    if obj["kind"] == "VirtualService":
        return [
            (r.get("match", []), [d["weight"] for d in r["route"]]) for r in obj["spec"]["http"]
        ]
    return [
        (
            [h for m in r["matches"] for h in m.get("headers", [])],
            [b["weight"] for b in r["backendRefs"]],
        )
        for r in obj["spec"]["rules"]
    ]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_every_rule_sums_to_100_and_the_catch_all_is_last(provider, case):
    writer, service = WRITERS[provider]
    routes = CASES[case]()
    (obj,) = [o for o in writer.desired(service, routes) if o["kind"] != "DestinationRule"]
    rules = _rules(obj)
    assert len(rules) == len(routes.by_source) + 1
    for _, weights in rules:
        assert sum(weights) == 100 and min(weights) > 0, weights
    assert rules[-1][0] == []  # catch-all: no source match, last
    assert all(match for match, _ in rules[:-1])


def test_istio_rules_match_the_source_pod_label_and_subsets_select_it():
    nodes = [MeshNode("edge-a", "paris"), MeshNode("edge-b")]
    routes = routing.build_routes({"edge-a": {"edge-a": 70, "edge-b": 30}}, nodes)
    dr, vs = IstioWriter().desired(ISTIO_SERVICE, routes)
    assert vs["spec"]["hosts"] == ["fn.edge.svc.cluster.local"]
    first = vs["spec"]["http"][0]
    assert first["match"] == [{"sourceLabels": {"marl.dev/node": "paris"}}]
    assert [(r["destination"]["subset"], r["weight"]) for r in first["route"]] == [
        ("node-edge-a", 70),
        ("node-edge-b", 30),
    ]
    assert first["route"][0]["destination"]["port"] == {"number": 8080}
    assert dr["spec"]["subsets"] == [
        {"name": "node-edge-a", "labels": {"marl.dev/node": "paris"}},
        {"name": "node-edge-b", "labels": {"marl.dev/node": "edge-b"}},
    ]


def test_httproute_matches_the_source_header_and_targets_per_node_services():
    (route,) = GatewayAPIWriter().desired(GATEWAY_SERVICE, triangle_routes())
    spec = route["spec"]
    assert spec["parentRefs"] == [{"group": "", "kind": "Service", "name": "fn-gw", "port": 8080}]
    first = spec["rules"][0]
    assert first["matches"][0]["headers"] == [
        {"type": "Exact", "name": "x-marl-source-node", "value": "edge-0"}
    ]
    assert [(b["name"], b["weight"]) for b in first["backendRefs"]] == [
        ("fn-gw-edge-0", 62),
        ("fn-gw-edge-1", 31),
        ("fn-gw-edge-2", 7),
    ]
    # Default parent: the Service named by the host, for services that do not set parentRefs.
    bare = MeshService(name="fn", namespace="edge", host="fn.edge.svc.cluster.local", port=80)
    assert http_route(bare, triangle_routes())["spec"]["parentRefs"][0]["name"] == "fn"


def test_zero_weight_routes_are_left_out():
    routes = triangle_routes()
    assert routes.by_source["edge-1"] == {"edge-1": 100}
    vs = virtual_service(ISTIO_SERVICE, routes)
    assert [r["destination"]["subset"] for r in vs["spec"]["http"][1]["route"]] == ["node-edge-1"]


@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_writers_drop_zero_routes_and_refuse_all_zero_rules(provider):
    """Routes read back from an edited object may hold zeros; writers never emit them."""
    writer, service = WRITERS[provider]
    nodes = (MeshNode("a"), MeshNode("b"))
    with_zero = MeshRoutes(nodes, {"a": {"a": 100, "b": 0}}, {"a": 50, "b": 50})
    obj = writer.desired(service, with_zero)[-1]
    assert [len(w) for _, w in _rules(obj)] == [1, 2]
    all_zero = MeshRoutes(nodes, {"a": {"a": 0, "b": 0}}, {"a": 50, "b": 50})
    with pytest.raises(MeshError, match="source node 'a' has no positive weight"):
        writer.desired(service, all_zero)


# --- read back, drift, takeover ------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_round_trip(provider, case):
    writer, service = WRITERS[provider]
    routes = CASES[case]()
    live = [_server_copy(o) for o in writer.desired(service, routes)]
    assert writer.read(service, routes.nodes, live) == routes


@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_out_of_band_edit_is_seen_and_corrected(provider):
    writer, service = WRITERS[provider]
    routes = triangle_routes()
    desired = writer.desired(service, routes)[-1]
    live = _server_copy(desired)
    assert reconcile_patch(live, desired) == {}  # in sync: nothing to send

    rules = live["spec"]["http" if provider == "istio" else "rules"]
    target = rules[0]["route" if provider == "istio" else "backendRefs"]
    target[0]["weight"], target[1]["weight"] = 10, 83
    live["metadata"]["annotations"]["team"] = "payments"
    assert writer.read(service, routes.nodes, [live]).by_source["edge-0"]["edge-0"] == 10

    patch = reconcile_patch(live, desired)
    assert patch["metadata"] == {"resourceVersion": "41"}  # guarded by the version read
    fixed = apply_merge_patch(live, patch)
    assert writer.read(service, routes.nodes, [fixed]) == routes
    assert fixed["spec"] == desired["spec"]
    assert fixed["metadata"]["annotations"]["team"] == "payments"  # not ours: kept
    assert reconcile_patch(fixed, desired) == {}


def _user_virtual_service() -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": "fn",
            "namespace": "edge",
            "resourceVersion": "7",
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"team": "payments", ADOPT_ANNOTATION: "true"},
        },
        "spec": {
            "hosts": ["fn.edge.svc.cluster.local"],
            "gateways": ["mesh"],
            "http": [{"route": [{"destination": {"host": "fn.edge.svc.cluster.local"}}]}],
        },
    }


def test_takeover_saves_the_users_spec_once_and_restores_it():
    user = _user_virtual_service()
    assert restore_patch(user, IstioWriter.owned["VirtualService"]) is None
    desired = virtual_service(ISTIO_SERVICE, triangle_routes())

    taken = apply_merge_patch(user, reconcile_patch(user, desired))
    assert is_managed(taken)
    assert taken["spec"]["http"] == desired["spec"]["http"]
    assert taken["spec"]["gateways"] == ["mesh"]  # fields the writer does not own stay
    assert taken["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert reconcile_patch(taken, desired) == {}

    # Later decisions change the routes; the saved spec stays the user's.
    moved = routing.build_routes({"edge-0": {"edge-0": 50, "edge-1": 50}}, TRIANGLE)
    later = apply_merge_patch(taken, reconcile_patch(taken, virtual_service(ISTIO_SERVICE, moved)))
    assert later["spec"]["http"] != taken["spec"]["http"]
    saved = ORIGINAL_SPEC_ANNOTATION
    assert later["metadata"]["annotations"][saved] == taken["metadata"]["annotations"][saved]

    restored = apply_merge_patch(later, restore_patch(later, IstioWriter.owned["VirtualService"]))
    assert restored == user


def _owners_virtual_service() -> dict:
    """A VirtualService as a team would have it before handing its routes over: two hosts,
    a canary rule ahead of the catch-all, retries on the catch-all, a rule behind it."""
    user = _user_virtual_service()
    host = ISTIO_SERVICE.host
    user["spec"]["hosts"] = ["fn.example.com", host]
    canary = {
        "name": "canary",
        "match": [{"headers": {"x-canary": {"exact": "1"}}}],
        "route": [{"destination": {"host": host, "subset": "v2"}}],
    }
    catch_all = user["spec"]["http"][0] | {"retries": {"attempts": 3}, "timeout": "2s"}
    unreachable = {
        "name": "legacy",
        "match": [{"uri": {"prefix": "/v0"}}],
        "route": canary["route"],
    }
    user["spec"]["http"] = [canary, catch_all, unreachable]
    return user


def _take_over(writer, service, desired: dict, live: dict) -> dict:
    """``live`` after the operator's write, as KubeMesh sends it."""
    return apply_merge_patch(live, reconcile_patch(live, writer.keep(service, desired, live)))


def test_a_taken_over_virtual_service_keeps_what_the_operator_does_not_route(upstream):
    """Taking a VirtualService over replaced its hosts and every rule: a second hostname, a
    canary rule and the retries of the catch-all were gone until the policy was deleted."""
    writer, user, routes = IstioWriter(), _owners_virtual_service(), triangle_routes()
    desired = virtual_service(ISTIO_SERVICE, routes)

    taken = _take_over(writer, ISTIO_SERVICE, desired, user)

    assert upstream["VirtualService"].errors(taken) == []
    assert taken["spec"]["hosts"] == ["fn.example.com", ISTIO_SERVICE.host]
    assert taken["spec"]["gateways"] == ["mesh"]
    rules = taken["spec"]["http"]
    assert [r["name"] for r in rules] == ["canary", *[r["name"] for r in desired["spec"]["http"]],
                                          "legacy"]  # fmt: skip
    for ours in rules[1:-1]:  # the catch-all's options now apply to every rule
        assert (ours["retries"], ours["timeout"]) == ({"attempts": 3}, "2s")
    assert writer.read(ISTIO_SERVICE, routes.nodes, [taken]) == routes
    assert reconcile_patch(taken, writer.keep(ISTIO_SERVICE, desired, taken)) == {}

    # The owner edits other fields while the operator routes: deleting the policy keeps them.
    taken["spec"] |= {"exportTo": ["."], "gateways": ["mesh", "edge-gateway"]}
    restored = apply_merge_patch(taken, restore_patch(taken, writer.owned["VirtualService"]))
    assert restored["spec"] == user["spec"] | {
        "exportTo": ["."],
        "gateways": ["mesh", "edge-gateway"],
    }


def test_an_owners_rule_on_the_whole_path_is_its_catch_all_and_is_replaced(upstream):
    """With no rule free of matches, an owner's rule on every path (uri prefix /) stayed
    ahead of the operator's and took every request: the policy routed nothing, and said it
    applied its weights. Its redirect cannot stand beside a route, and is not copied."""
    writer, routes = IstioWriter(), triangle_routes()
    user = _user_virtual_service()
    host = ISTIO_SERVICE.host
    main = {
        "name": "main",
        "match": [{"uri": {"prefix": "/"}}],
        "route": [{"destination": {"host": host, "subset": "v1"}}],
        "retries": {"attempts": 2},
    }
    admin = {"name": "admin", "match": [{"uri": {"prefix": "/admin"}}], "redirect": {"uri": "/"}}
    user["spec"]["http"] = [admin, main]
    taken = _take_over(writer, ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, routes), user)
    assert upstream["VirtualService"].errors(taken) == []
    rules = taken["spec"]["http"]
    assert rules[0] == admin and "main" not in [r["name"] for r in rules]
    assert all(r["retries"] == {"attempts": 2} for r in rules[1:])
    assert writer.read(ISTIO_SERVICE, routes.nodes, [taken]) == routes

    user["spec"]["http"] = [main | {"match": None, "redirect": {"authority": "x"}}]
    taken = _take_over(writer, ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, routes), user)
    assert not any("redirect" in r for r in taken["spec"]["http"])


@pytest.mark.parametrize(
    "match",
    [
        [{"gateways": ["mesh"]}],  # an object serving an ingress gateway and the mesh alike
        [{"gateways": ["mesh", "istio-system/ingress"], "uri": {"prefix": "/"}}],
        [{"uri": {"regex": ".*"}}],
        [{"uri": {"prefix": ""}}],
        [{"port": ISTIO_SERVICE.port}],
        [{"uri": {"prefix": "/api"}}, {"name": "rest", "gateways": ["mesh"]}],
    ],
)
def test_an_owners_rule_every_mesh_request_passes_is_its_catch_all(upstream, match):
    """Only a rule without a match or on prefix / was taken for the catch-all: one on the
    mesh gateway, any path or the service's port stayed ahead of the operator's rules and
    took every request, while their weights read back as applied."""
    writer, routes = IstioWriter(), triangle_routes()
    user = _user_virtual_service()
    main = {"name": "main", "match": match,
            "route": [{"destination": {"host": ISTIO_SERVICE.host, "subset": "v1"}}]}  # fmt: skip
    user["spec"]["http"] = [main]
    taken = _take_over(writer, ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, routes), user)
    assert upstream["VirtualService"].errors(taken) == []
    assert "main" not in [r["name"] for r in taken["spec"]["http"]]
    assert writer.read(ISTIO_SERVICE, routes.nodes, [taken]) == routes


@pytest.mark.parametrize(
    "match",
    [
        [{"gateways": ["istio-system/ingress"]}],  # the ingress gateway's, not the mesh's
        [{"port": ISTIO_SERVICE.port + 1}],
        [{"uri": {"prefix": "/api"}}],
    ],
)
def test_an_owners_rule_some_mesh_requests_miss_stays_ahead(match):
    writer, routes = IstioWriter(), triangle_routes()
    user = _user_virtual_service()
    owned = {"name": "owned", "match": match,
             "route": [{"destination": {"host": ISTIO_SERVICE.host, "subset": "v1"}}]}  # fmt: skip
    user["spec"]["http"] = [owned, *user["spec"]["http"]]
    taken = _take_over(writer, ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, routes), user)
    assert taken["spec"]["http"][0] == owned


def test_a_virtual_service_for_gateways_only_is_not_taken_over():
    """Its spec.gateways left out mesh: the sidecars never used it, and its ingress traffic
    went through the operator's catch-all."""
    writer, routes = IstioWriter(), triangle_routes()
    user = _user_virtual_service()
    user["spec"]["gateways"] = ["istio-system/ingress"]
    with pytest.raises(MeshError, match=r"spec\.gateways lacks 'mesh'.*add 'mesh'"):
        writer.keep(ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, routes), user)


def test_owners_rules_and_subsets_are_told_from_the_operator_s_by_shape_not_name():
    """An owner's rule named from-frontend (on its own label) or default (on a header), and a
    subset node-pool, were taken for the operator's and dropped: requests the owner routed to
    them fell to the operator's rules, or to a subset that was gone (503)."""
    writer, routes = IstioWriter(), triangle_routes()
    host = ISTIO_SERVICE.host
    to_pool = [{"destination": {"host": host, "subset": "node-pool"}}]
    frontend = {"name": "from-frontend", "match": [{"sourceLabels": {"app": "frontend"}}],
                "route": to_pool}  # fmt: skip
    header = {"name": "default", "match": [{"headers": {"x-pool": {"exact": "1"}}}],
              "route": to_pool}  # fmt: skip
    user = _user_virtual_service()
    user["spec"]["http"] = [frontend, header, *user["spec"]["http"]]
    taken = _take_over(writer, ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, routes), user)
    assert taken["spec"]["http"][:2] == [frontend, header]
    assert writer.read(ISTIO_SERVICE, routes.nodes, [taken]) == routes


def test_hosts_and_parents_the_operator_wrote_go_when_the_edge_service_moves():
    """The hosts and parents a write keeps are the owner's, saved at takeover: those of an
    object the operator created came from an earlier host, and kept, its routes took over
    the old host's traffic too."""
    routes = triangle_routes()
    moved = dataclasses.replace(ISTIO_SERVICE, host="other.edge.svc.cluster.local")
    created = _server_copy(virtual_service(ISTIO_SERVICE, routes))
    kept = IstioWriter().keep(moved, virtual_service(moved, routes), created)
    assert kept["spec"]["hosts"] == ["other.edge.svc.cluster.local"]

    adopted = _take_over(
        IstioWriter(),
        ISTIO_SERVICE,
        virtual_service(ISTIO_SERVICE, routes),
        _owners_virtual_service(),
    )
    kept = IstioWriter().keep(moved, virtual_service(moved, routes), adopted)
    assert kept["spec"]["hosts"] == ["fn.example.com", ISTIO_SERVICE.host, moved.host]

    route = _server_copy(http_route(GATEWAY_SERVICE, routes))
    elsewhere = dataclasses.replace(GATEWAY_SERVICE, parent_refs=({"name": "fn-gw2"},))
    kept = GatewayAPIWriter().keep(elsewhere, http_route(elsewhere, routes), route)
    assert [p["name"] for p in kept["spec"]["parentRefs"]] == ["fn-gw2"]


def test_an_owners_parent_without_a_port_is_not_named_twice(upstream):
    """The usual GAMMA parentRef names no port; adding the operator's ref to the same Service
    with one made two refs to one parent, which the API refuses: every write failed."""
    writer, routes = GatewayAPIWriter(), triangle_routes()
    desired = http_route(GATEWAY_SERVICE, routes)
    parent = {"group": "", "kind": "Service", "name": desired["spec"]["parentRefs"][0]["name"]}
    redirect = {"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}
    user = {
        **desired,
        "metadata": {"name": desired["metadata"]["name"], "namespace": "edge",
                     "annotations": {ADOPT_ANNOTATION: "true"}},
        "spec": {"parentRefs": [parent], "rules": [{"filters": [redirect]}]},
    }  # fmt: skip
    taken = _take_over(writer, GATEWAY_SERVICE, desired, user)
    assert taken["spec"]["parentRefs"] == [parent]
    assert all("filters" not in rule for rule in taken["spec"]["rules"])
    assert upstream["HTTPRoute"].errors(taken) == []


def test_a_virtual_service_without_the_host_gets_it_added():
    user = _user_virtual_service()
    user["spec"]["hosts"] = ["fn.example.com"]
    taken = _take_over(
        IstioWriter(), ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, triangle_routes()), user
    )
    assert taken["spec"]["hosts"] == ["fn.example.com", ISTIO_SERVICE.host]


def test_a_taken_over_destination_rule_keeps_its_other_subsets(upstream):
    writer, routes = IstioWriter(), triangle_routes()
    desired = destination_rule(ISTIO_SERVICE, routes.nodes)
    user = {
        **desired,
        "metadata": {"name": desired["metadata"]["name"], "namespace": "edge",
                     "annotations": {ADOPT_ANNOTATION: "true"}},
        "spec": {
            "host": ISTIO_SERVICE.host,
            "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
            "subsets": [{"name": "v2", "labels": {"version": "v2"}},
                        {"name": "node-pool", "labels": {"pool": "a"}},
                        {"name": "node-edge-9", "labels": {"marl.dev/node": "edge-9"}}],
        },
    }  # fmt: skip

    taken = _take_over(writer, ISTIO_SERVICE, desired, user)

    assert upstream["DestinationRule"].errors(taken) == []
    names = [s["name"] for s in taken["spec"]["subsets"]]
    assert names == ["v2", "node-pool", *[s["name"] for s in desired["spec"]["subsets"]]]
    assert taken["spec"]["trafficPolicy"] == user["spec"]["trafficPolicy"]
    restored = apply_merge_patch(taken, restore_patch(taken, writer.owned["DestinationRule"]))
    assert restored["spec"] == user["spec"]


def test_an_owners_subset_named_as_an_edge_node_s_is_refused_not_doubled():
    """An owner's subset node-edge-0 selecting more than the node label was kept beside the
    operator's node-edge-0: two subsets of one name, which Istio's webhook refuses, so every
    write of the service failed."""
    writer, routes = IstioWriter(), triangle_routes()
    desired = destination_rule(ISTIO_SERVICE, routes.nodes)
    mine = desired["spec"]["subsets"][0]
    user = {
        **desired,
        "metadata": {"name": desired["metadata"]["name"], "namespace": "edge",
                     "annotations": {ADOPT_ANNOTATION: "true"}},
        "spec": {"host": ISTIO_SERVICE.host, "subsets": [
            {"name": mine["name"], "labels": {**mine["labels"], "version": "v1"}}]},
    }  # fmt: skip
    with pytest.raises(MeshError, match=rf"subsets of its own named {mine['name']}.*rename"):
        writer.keep(ISTIO_SERVICE, desired, user)


def test_a_taken_over_httproute_keeps_its_parents_rules_and_options(upstream):
    writer, routes = GatewayAPIWriter(), triangle_routes()
    desired = http_route(GATEWAY_SERVICE, routes)
    gateway = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}
    api = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
        "backendRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80, "weight": 1}],
    }
    catch_all = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [{"group": "", "kind": "Service", "name": "fn", "port": 8080, "weight": 1}],
        "timeouts": {"request": "5s"},
    }
    user = {
        **desired,
        "metadata": {"name": desired["metadata"]["name"], "namespace": "edge",
                     "annotations": {ADOPT_ANNOTATION: "true"}},
        "spec": {"parentRefs": [gateway], "hostnames": ["fn.example.com"],
                 "rules": [api, catch_all]},
    }  # fmt: skip

    taken = _take_over(writer, GATEWAY_SERVICE, desired, user)

    assert upstream["HTTPRoute"].errors(taken) == []
    assert taken["spec"]["parentRefs"] == [gateway, *desired["spec"]["parentRefs"]]
    assert taken["spec"]["hostnames"] == ["fn.example.com"]
    assert taken["spec"]["rules"][0] == api
    assert all(r["timeouts"] == {"request": "5s"} for r in taken["spec"]["rules"][1:])
    assert len(taken["spec"]["rules"]) == 1 + len(desired["spec"]["rules"])
    assert writer.read(GATEWAY_SERVICE, routes.nodes, [taken]) == routes
    assert reconcile_patch(taken, writer.keep(GATEWAY_SERVICE, desired, taken)) == {}
    restored = apply_merge_patch(taken, restore_patch(taken, writer.owned["HTTPRoute"]))
    assert restored["spec"] == user["spec"]

    user["spec"]["rules"] = [api] * 14  # 14 of the owner's and 4 of the operator's: over 16
    with pytest.raises(RouteLimitError, match="own 14 rules and the operator's 4 make 18"):
        writer.keep(GATEWAY_SERVICE, desired, user)


@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_the_owned_fields_are_the_spec_fields_the_writer_generates(provider):
    """What deleting a policy gives back is what taking an object over changed, in the reverse
    of the order the objects are written in."""
    writer, service = WRITERS[provider]
    desired = writer.desired(service, triangle_routes())
    for manifest in desired:
        assert set(writer.owned[manifest["kind"]]) == set(manifest["spec"])
    assert list(writer.owned) == [manifest["kind"] for manifest in desired]


def test_httproute_rules_carry_no_name():
    """Gateway API releases before rule names prune them: a route carrying them never read
    back as written, and was rewritten every interval."""
    route = http_route(GATEWAY_SERVICE, triangle_routes())
    assert all("name" not in rule for rule in route["spec"]["rules"])


@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_routes_to_a_node_the_policy_no_longer_governs_are_read_as_gone(provider):
    """Reading a route to a removed EdgeNode failed, and the cycle stepped from an even split
    instead of the weights in place: its share now leaves the row, as from a node that is
    down, and its clients' own rule is no longer the policy's."""
    writer, service = WRITERS[provider]
    routes = triangle_routes()  # edge-0 sends 62/31/7, edge-2 a third each way
    live = [_server_copy(o) for o in writer.desired(service, routes)]
    remaining = tuple(n for n in TRIANGLE if n.name != "edge-2")

    read = writer.read(service, remaining, live)

    assert read.by_source == {"edge-0": {"edge-0": 62, "edge-1": 31}, "edge-1": {"edge-1": 100}}
    assert routing.as_percentages(read.by_source["edge-0"]) == {"edge-0": 67, "edge-1": 33}
    assert set(read.default) == {"edge-0", "edge-1"}
    gone = tuple(n for n in TRIANGLE if n.name == "edge-0")
    assert writer.read(service, gone, live).by_source == {"edge-0": {"edge-0": 62}}


def _subset_names(destination_rule: dict) -> list[str]:
    return [s["name"] for s in destination_rule["spec"]["subsets"]]


def test_a_subset_goes_one_write_after_the_last_route_to_it(upstream):
    """Dropping a node's subset in the write that moves the routes off it left the data
    plane a moment with routes naming a subset that no longer exists (503 NR): the subset
    stays while a live route names it, the owner's own rules included, and goes with the
    first write after the routes left it."""
    writer, routes = IstioWriter(), triangle_routes()
    live = [_server_copy(o) for o in writer.desired(ISTIO_SERVICE, routes)]
    remaining = tuple(n for n in TRIANGLE if n.name != "edge-2")
    after = routing.build_routes({"edge-0": {"edge-0": 50, "edge-1": 50}}, remaining)
    desired = writer.desired(ISTIO_SERVICE, after)

    dr, vs = writer.make_before_break(ISTIO_SERVICE, desired, live)

    assert _subset_names(dr) == ["node-edge-0", "node-edge-1", "node-edge-2"]
    assert dr["spec"]["subsets"][-1] == live[0]["spec"]["subsets"][-1]
    assert upstream["DestinationRule"].errors(dr) == []
    assert vs == desired[1]
    assert _subset_names(desired[0]) == ["node-edge-0", "node-edge-1"]  # not changed in place

    moved = [_server_copy(o) for o in (dr, vs)]  # the routes have left edge-2
    assert writer.make_before_break(ISTIO_SERVICE, desired, moved) == desired

    canary = {
        "name": "canary",
        "match": [{"headers": {"x-canary": {"exact": "1"}}}],
        "route": [{"destination": {"host": ISTIO_SERVICE.host, "subset": "node-edge-2"}}],
    }
    moved[1]["spec"]["http"].insert(0, canary)  # an owner's rule still names it
    dr, _ = writer.make_before_break(ISTIO_SERVICE, desired, moved)
    assert _subset_names(dr) == ["node-edge-0", "node-edge-1", "node-edge-2"]


@pytest.mark.parametrize("provider", sorted(WRITERS))
def test_a_write_that_leaves_no_node_is_made_as_desired(provider):
    writer, service = WRITERS[provider]
    desired = writer.desired(service, triangle_routes())
    assert writer.make_before_break(service, desired, [None] * len(desired)) == desired
    live = [_server_copy(o) for o in writer.desired(service, triangle_routes(min_weight=5))]
    assert writer.make_before_break(service, desired, live) == desired


def test_an_httproute_keeps_nothing_of_a_node_it_leaves():
    """Its backends are the user's per-node Services, which the operator neither writes nor
    removes: nothing a live route names disappears with the write."""
    writer, routes = GatewayAPIWriter(), triangle_routes()
    live = [_server_copy(o) for o in writer.desired(GATEWAY_SERVICE, routes)]
    remaining = tuple(n for n in TRIANGLE if n.name != "edge-2")
    desired = writer.desired(GATEWAY_SERVICE, routing.build_routes({}, remaining))
    assert writer.make_before_break(GATEWAY_SERVICE, desired, live) == desired


def test_an_existing_object_is_taken_over_only_if_its_owner_says_so():
    """Anyone who may create EdgeServices in a namespace could have the operator rewrite any
    VirtualService there; now its owner opts in with an annotation."""
    user = _user_virtual_service()
    del user["metadata"]["annotations"][ADOPT_ANNOTATION]
    desired = virtual_service(ISTIO_SERVICE, triangle_routes())
    with pytest.raises(
        MeshError, match=f"VirtualService edge/fn exists .* {ADOPT_ANNOTATION}=true"
    ):
        reconcile_patch(user, desired)
    user["metadata"]["annotations"][ADOPT_ANNOTATION] = "yes"  # only "true" opts in
    with pytest.raises(MeshError, match=ADOPT_ANNOTATION):
        reconcile_patch(user, desired)
    stale = {**user["metadata"]["annotations"], ORIGINAL_SPEC_ANNOTATION: "{}"}
    user["metadata"]["annotations"] = stale  # left from an earlier takeover: no consent
    with pytest.raises(MeshError, match=ADOPT_ANNOTATION):
        reconcile_patch(user, desired)
    created = _server_copy(desired)  # the operator's own object needs no such annotation
    assert reconcile_patch(created, desired) == {}


def test_objects_the_operator_created_are_deleted_not_restored():
    created = _server_copy(virtual_service(ISTIO_SERVICE, triangle_routes()))
    assert restore_patch(created, IstioWriter.owned["VirtualService"]) is None


def test_a_spec_too_large_for_an_annotation_is_refused():
    user = _user_virtual_service()
    user["spec"]["http"] = [{"name": "r" * 1000, "route": []}] * 300
    with pytest.raises(MeshError, match=ORIGINAL_SPEC_ANNOTATION):
        reconcile_patch(user, virtual_service(ISTIO_SERVICE, triangle_routes()))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s["http"][0]["route"][0]["destination"].update(subset="v1"),
         "not node-<edge node>"),
        (lambda s: s.update(http=s["http"][:-1]), "no catch-all rule"),
    ],
)  # fmt: skip
def test_reading_a_virtual_service_of_another_shape_fails_clearly(edit, words):
    vs = virtual_service(ISTIO_SERVICE, triangle_routes())
    edit(vs["spec"])
    with pytest.raises(MeshError, match=words):
        IstioWriter().read(ISTIO_SERVICE, TRIANGLE, [vs])


def test_reading_an_httproute_of_another_shape_fails_clearly():
    route = http_route(GATEWAY_SERVICE, triangle_routes())
    route["spec"]["rules"][0]["backendRefs"][0]["name"] = "fn-v2"
    with pytest.raises(MeshError, match="'fn-v2' is not fn-gw-<edge node>"):
        GatewayAPIWriter().read(GATEWAY_SERVICE, TRIANGLE, [route])
    # In the owner's route, a Service named like a node's is the owner's, not a former node.
    route["spec"]["rules"][0]["backendRefs"][0]["name"] = "fn-gw-v2"
    del route["metadata"]["labels"][MANAGED_BY_LABEL]
    with pytest.raises(MeshError, match="'fn-gw-v2' is not fn-gw-<edge node>"):
        GatewayAPIWriter().read(GATEWAY_SERVICE, TRIANGLE, [route])


# --- weights and checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fractions", "expected"),
    [
        ({"a": 0.3333, "b": 0.3333, "c": 0.3334}, {"a": 33, "b": 33, "c": 34}),
        ({"a": 0.125, "b": 0.875}, {"a": 13, "b": 87}),  # a tie of remainders: the first
        ({"a": 0.996, "b": 0.002, "c": 0.002}, {"a": 100, "b": 0, "c": 0}),
    ],
)
def test_integer_weights_round_by_largest_remainder_to_100(fractions, expected):
    """What a mesh is written: the shares in whole percent, the units lost to rounding given
    to the largest remainders, so a route never drifts from its share by a whole point."""
    assert routing.integer_weights(fractions) == expected


def test_all_zero_fractions_keep_traffic_on_the_first_route():
    assert routing.integer_weights({"self": 0.0, "nb": 0.0}) == {"self": 100, "nb": 0}


@pytest.mark.parametrize("min_weight", [1, 5, 20, 33])
def test_min_weight_floor(min_weight):
    row = routing.integer_weights({"a": 0.98, "b": 0.02, "c": 0.0}, min_weight=min_weight)
    assert sum(row.values()) == 100
    assert min(row.values()) == min_weight
    assert row["a"] == max(row.values())


def test_min_weight_that_cannot_fit_is_refused():
    with pytest.raises(MeshError, match="at most 33"):
        routing.integer_weights({"a": 1.0, "b": 0.0, "c": 0.0}, min_weight=34)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"edge-0": {"edge-0": 60, "edge-1": 39}}, "must sum to 100, got 99"),
        ({"edge-0": {"edge-0": 0, "edge-1": 0}}, "must sum to 100, got 0"),
        ({"edge-0": {"edge-0": 110, "edge-1": -10}}, "negative"),
        ({"edge-0": {"edge-0": 60.0, "edge-1": 40}}, "must be an integer"),
        ({"edge-0": {"edge-0": True, "edge-1": 99}}, "must be an integer"),
        ({"edge-0": {"edge-9": 100}}, "'edge-9', which is not one of"),
        ({"edge-9": {"edge-0": 100}}, "source node 'edge-9' is not one of"),
    ],
)
def test_bad_route_tables_are_refused(table, words):
    with pytest.raises(MeshError, match=words):
        routing.build_routes(table, TRIANGLE)


def test_nodes_must_be_distinct():
    with pytest.raises(MeshError, match="repeat"):
        routing.build_routes({}, ["a", "a"])
    with pytest.raises(MeshError, match="share a pod label"):
        routing.build_routes({}, [MeshNode("a", "x"), MeshNode("b", "x")])


def test_catch_all_is_the_mean_of_the_rows():
    routes = routing.build_routes(
        {"edge-0": {"edge-0": 80, "edge-1": 20}, "edge-1": {"edge-1": 100}}, TRIANGLE
    )
    assert routes.default == {"edge-0": 40, "edge-1": 60}


# --- limits and names ----------------------------------------------------------------------


def test_httproute_rule_limit_names_the_limit():
    routes = ring_routes(16)
    with pytest.raises(RouteLimitError, match="at most 16 rules"):
        GatewayAPIWriter().desired(GATEWAY_SERVICE, routes)
    assert len(IstioWriter().desired(ISTIO_SERVICE, routes)[1]["spec"]["http"]) == 17


def test_httproute_backend_limit_names_the_limit():
    nodes = [f"n{i}" for i in range(17)]
    row = routing.integer_weights(dict.fromkeys(nodes, 1.0))
    routes = routing.build_routes({"n0": row}, nodes)
    with pytest.raises(RouteLimitError, match="at most 16 backendRefs"):
        GatewayAPIWriter().desired(GATEWAY_SERVICE, routes)


def test_names_that_the_mesh_would_refuse_raise():
    with pytest.raises(MeshError, match="not a DNS label"):
        naming.subset_name("e" * 59)
    assert naming.subset_name("e" * 58) == "node-" + "e" * 58
    with pytest.raises(MeshError, match="DNS-1035"):
        naming.node_service_name("9fn", "edge-0")
    with pytest.raises(MeshError, match="not a DNS label"):
        IstioWriter().desired(ISTIO_SERVICE, routing.build_routes({}, ["Edge_0"]))


# --- the factory ---------------------------------------------------------------------------


def test_factory_covers_exactly_the_providers_the_crd_allows():
    (crd,) = load_documents(ROOT / "crds" / "edgeservices.marl.dev.yaml")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    mesh = schema["properties"]["spec"]["properties"]["mesh"]["properties"]
    assert sorted(PROVIDERS) == sorted(mesh["provider"]["enum"])
    for provider in PROVIDERS:
        assert writer_for(provider).provider == provider
    with pytest.raises(MeshError, match=r"unknown mesh provider 'linkerd'.*istio"):
        writer_for("linkerd")


def test_edge_service_examples_map_to_writer_settings():
    assert (ISTIO_SERVICE.provider, ISTIO_SERVICE.virtual_service_name) == ("istio", "fn")
    assert ISTIO_SERVICE.node_label == "marl.dev/node"
    assert GATEWAY_SERVICE.provider == "gateway-api"
    assert GATEWAY_SERVICE.source_header == "x-marl-source-node"
    assert GATEWAY_SERVICE.service_prefix == "fn-gw"
    assert [n.name for n in TRIANGLE] == ["edge-0", "edge-1", "edge-2"]


def test_a_new_node_label_replaces_the_operators_own_rules_and_subsets(upstream):
    """The EdgeService's nodeLabel changed (marl.dev/node to a zone label): the rules and
    subsets the operator had written on the old label no longer looked like its own, and
    were kept as an owner's. The old rules stayed ahead of the new ones with their last
    weights for good (clients still carrying the old label never got another decision,
    and the read skipped them), and the DestinationRule held every node-<name> subset
    twice, which Istio's webhook refuses ("duplicate subset names"): no write passed."""
    writer, routes = IstioWriter(), triangle_routes()
    created = [_server_copy(o) for o in writer.desired(ISTIO_SERVICE, routes)]
    relabelled = dataclasses.replace(ISTIO_SERVICE, node_label="topology.kubernetes.io/zone")

    dr, vs = [
        _take_over(writer, relabelled, desired, live)
        for desired, live in zip(writer.desired(relabelled, routes), created, strict=True)
    ]

    names = _subset_names(dr)
    assert len(names) == len(set(names)), names
    assert upstream["DestinationRule"].errors(dr) == []
    labels = {key for rule in vs["spec"]["http"] for m in rule.get("match") or []
              for key in m.get("sourceLabels") or {}}  # fmt: skip
    assert labels == {"topology.kubernetes.io/zone"}
    assert vs["spec"] == writer.desired(relabelled, routes)[1]["spec"]


def test_a_new_node_label_or_source_header_leaves_nothing_of_the_old_in_a_taken_over_object():
    """As above, in objects taken over from their owner: the owner's rules and subsets stay,
    the operator's on the old label or header go."""
    writer, routes = IstioWriter(), triangle_routes()
    user = _owners_virtual_service()
    adopted = _take_over(writer, ISTIO_SERVICE, virtual_service(ISTIO_SERVICE, routes), user)
    relabelled = dataclasses.replace(ISTIO_SERVICE, node_label="topology.kubernetes.io/zone")
    vs = _take_over(writer, relabelled, virtual_service(relabelled, routes), adopted)
    names = [r["name"] for r in vs["spec"]["http"]]
    assert names == ["canary", *[r["name"] for r in virtual_service(relabelled, routes)["spec"]
                                 ["http"]], "legacy"]  # fmt: skip
    assert writer.read(relabelled, routes.nodes, [vs]) == routes

    gateway, route = GatewayAPIWriter(), http_route(GATEWAY_SERVICE, routes)
    owners = {"matches": [{"path": {"type": "PathPrefix", "value": "/", },
                           "headers": [{"type": "Exact", "name": "x-canary", "value": "1"}]}],
              "backendRefs": [{"group": "", "kind": "Service", "name": "fn-v2", "port": 8080,
                               "weight": 1}]}  # fmt: skip
    user = {
        **route,
        "metadata": {"name": route["metadata"]["name"], "namespace": "edge",
                     "annotations": {ADOPT_ANNOTATION: "true"}},
        "spec": {"parentRefs": route["spec"]["parentRefs"], "rules": [owners]},
    }  # fmt: skip
    for live in (_server_copy(route), _take_over(gateway, GATEWAY_SERVICE, route, user)):
        moved = dataclasses.replace(GATEWAY_SERVICE, source_header="x-edge-site")
        desired = http_route(moved, routes)
        taken = _take_over(gateway, moved, desired, live)
        headers = {h["name"] for r in taken["spec"]["rules"] for m in r["matches"]
                   for h in m.get("headers") or []}  # fmt: skip
        assert "x-marl-source-node" not in headers
        assert taken["spec"]["rules"][-len(desired["spec"]["rules"]) :] == desired["spec"]["rules"]


def test_an_owners_rule_added_after_takeover_is_kept_whatever_its_shape():
    """Rules not saved at takeover were taken for the operator's, written under an earlier
    label or header, when of their shape: an owner's header canary to fn-v2 (the per-node
    Services' prefix) or a rule on its own pod label to a node-* subset, added or edited
    after takeover, went at the next cycle, and deleting the policy did not bring it back.
    The object now says which key its rules were written on; only that key's are ours."""
    gateway, route = GatewayAPIWriter(), http_route(GATEWAY_SERVICE, triangle_routes())
    canary = {"matches": [{"path": {"type": "PathPrefix", "value": "/"},
                           "headers": [{"type": "Exact", "name": "x-user", "value": "beta"}]}],
              "backendRefs": [{"group": "", "kind": "Service", "port": 8080, "weight": 1,
                               "name": f"{GATEWAY_SERVICE.service_prefix}-v2"}]}  # fmt: skip
    user = {
        **route,
        "metadata": {"name": route["metadata"]["name"], "namespace": "edge",
                     "annotations": {ADOPT_ANNOTATION: "true"}},
        "spec": {"parentRefs": route["spec"]["parentRefs"], "rules": [
            {"backendRefs": [{"group": "", "kind": "Service", "name": "fn", "port": 8080}]}]},
    }  # fmt: skip
    live = _take_over(gateway, GATEWAY_SERVICE, route, user)
    live["spec"]["rules"].insert(0, canary)  # kubectl edit, after takeover
    assert canary in _take_over(gateway, GATEWAY_SERVICE, route, live)["spec"]["rules"]

    writer, routes = IstioWriter(), triangle_routes()
    desired = virtual_service(ISTIO_SERVICE, routes)
    live = _take_over(writer, ISTIO_SERVICE, desired, _owners_virtual_service())
    to_node = [{"destination": {"host": ISTIO_SERVICE.host, "subset": "node-a"}}]
    pinned = {"name": "pinned", "match": [{"sourceLabels": {"version": "v1"}}], "route": to_node}
    live["spec"]["http"].insert(0, pinned)
    assert pinned in _take_over(writer, ISTIO_SERVICE, desired, live)["spec"]["http"]


def test_a_delegate_virtual_service_is_not_taken_over():
    """A delegate VirtualService (no hosts: a root VirtualService's ``delegate`` names it,
    e.g. an ingress route for /fn) was taken over with the EdgeService's host added: Istio
    takes a VirtualService with hosts for a root, not a delegate, so the root's delegated
    route lost its rules (404 at the gateway) for as long as the policy ran."""
    user = _user_virtual_service()
    user["metadata"]["name"] = "fn-delegate"
    del user["spec"]["hosts"], user["spec"]["gateways"]  # Istio wants neither on a delegate
    user["spec"]["http"] = [
        {"match": [{"uri": {"prefix": "/fn/v2"}}], "route": [
            {"destination": {"host": ISTIO_SERVICE.host, "subset": "v2"}}]},
        {"route": [{"destination": {"host": ISTIO_SERVICE.host, "subset": "v1"}}]},
    ]  # fmt: skip
    service = dataclasses.replace(ISTIO_SERVICE, virtual_service="fn-delegate")
    desired = virtual_service(service, triangle_routes())
    with pytest.raises(MeshError, match="delegate"):
        taken = _take_over(IstioWriter(), service, desired, user)
        assert not taken["spec"].get("hosts"), taken["spec"]["hosts"]


def test_routes_are_exported_no_wider_than_the_subsets_they_name(upstream):
    """A team's DestinationRule taken over with exportTo ["."] (its subsets seen only in its
    namespace) beside the VirtualService the operator created, exported to every namespace:
    a client in any other namespace got the routes to node-<name> subsets it could not see,
    and every request of it failed (503 NC, no cluster for the subset)."""
    writer, routes = IstioWriter(), triangle_routes()
    desired = writer.desired(ISTIO_SERVICE, routes)
    user = {
        **desired[0],
        "metadata": {"name": desired[0]["metadata"]["name"], "namespace": "edge",
                     "annotations": {ADOPT_ANNOTATION: "true"}},
        "spec": {"host": ISTIO_SERVICE.host, "exportTo": ["."],
                 "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
    }  # fmt: skip
    dr, vs = writer.make_before_break(ISTIO_SERVICE, desired, [user, None])
    dr, vs = writer.keep(ISTIO_SERVICE, dr, user), writer.keep(ISTIO_SERVICE, vs, None)
    assert upstream["VirtualService"].errors(vs) == []
    assert vs["spec"].get("exportTo", ["*"]) == ["."]

    # Once the DestinationRule is seen everywhere again, so are the routes.
    live = [_take_over(writer, ISTIO_SERVICE, dr, user), _server_copy(vs)]
    live[0]["spec"].pop("exportTo")
    dr, vs = writer.make_before_break(ISTIO_SERVICE, desired, live)
    written = apply_merge_patch(
        live[1], reconcile_patch(live[1], writer.keep(ISTIO_SERVICE, vs, live[1]))
    )
    assert "exportTo" not in written["spec"]
    assert (
        reconcile_patch(
            written,
            writer.keep(
                ISTIO_SERVICE,
                writer.make_before_break(ISTIO_SERVICE, desired, [live[0], written])[1],
                written,
            ),
        )
        == {}
    )
