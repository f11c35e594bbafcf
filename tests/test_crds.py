"""The CustomResourceDefinitions in crds/ and the examples in examples/: the files are well-formed
CRDs, every example is accepted, defaults are what the docs say, and invalid objects are refused
with a message naming the field (schema checks with jsonschema, CEL rules with celpy)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
from kube_schema import CRDValidator, cel_program, load_documents, to_json_schema
from marl_operator.problem import cpu_quantity
from marl_operator.prometheus import check_window

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"
EXAMPLES = ROOT / "examples"

EXPECTED = {
    "EdgeNode": ("edgenodes", "Cluster", ["en"]),
    "EdgeService": ("edgeservices", "Namespaced", ["es"]),
    "RoutingPolicy": ("routingpolicies", "Namespaced", ["rp"]),
}


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    found = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        (crd,) = load_documents(path)
        found[crd["spec"]["names"]["kind"]] = crd | {"_file": path.name}
    return found


@pytest.fixture(scope="module")
def validators(crds) -> dict[str, CRDValidator]:
    return {kind: CRDValidator(crd) for kind, crd in crds.items()}


def example_objects() -> list[dict]:
    """The examples' objects of the operator's kinds (not the API reader's RBAC)."""
    docs = (doc for path in sorted(EXAMPLES.glob("*.yaml")) for doc in load_documents(path))
    return [doc for doc in docs if doc["apiVersion"].startswith("marl.dev/")]


def example(kind: str, name: str | None = None) -> dict:
    for obj in example_objects():
        if obj["kind"] == kind and name in (None, obj["metadata"]["name"]):
            return copy.deepcopy(obj)
    raise LookupError(f"no example {kind} {name}")


# --- the CRD files ----------------------------------------------------------------------------


def test_one_crd_per_kind(crds):
    assert sorted(crds) == sorted(EXPECTED)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_crd_is_well_formed(crds, kind):
    crd = crds[kind]
    plural, scope, short = EXPECTED[kind]
    names = crd["spec"]["names"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "marl.dev"
    assert crd["metadata"]["name"] == f"{names['plural']}.marl.dev" == f"{plural}.marl.dev"
    assert crd["_file"] == f"{crd['metadata']['name']}.yaml"
    assert names["singular"] == kind.lower()
    assert names["listKind"] == f"{kind}List"
    assert names["shortNames"] == short
    assert "marl" in names["categories"]
    assert crd["spec"]["scope"] == scope
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    assert {"spec", "status", "metadata"} <= set(schema["properties"])


def _resolve(schema: dict, json_path: str) -> dict:
    """The subschema a printer column's JSONPath points at (filters and [*] step into items)."""
    node = schema
    for step in re.sub(r"\[[^\]]*\]", ".[]", json_path).strip(".").split("."):
        if step == "[]":
            node = node["items"]
        elif step:
            if node.get("type") == "object" and "properties" not in node:
                return {"type": "object"}  # metadata: the server's ObjectMeta
            node = node["properties"][step]
    return node


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_printer_columns_name_schema_fields(crds, kind):
    version = crds[kind]["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    schema = schema | {"properties": schema["properties"] | {"metadata": {"type": "object"}}}
    for column in version["additionalPrinterColumns"]:
        target = _resolve(schema, column["jsonPath"])
        assert "type" in target or target.get("x-kubernetes-int-or-string"), column
        if column["type"] in ("integer", "number", "boolean"):
            assert target["type"] == column["type"], column


def test_routing_policy_columns(crds):
    columns = crds["RoutingPolicy"]["spec"]["versions"][0]["additionalPrinterColumns"]
    main = [c["name"] for c in columns if c.get("priority", 0) == 0]
    assert main == ["Ready", "Phase", "Services", "Last Decision", "Age"]
    paths = {c["name"]: c["jsonPath"] for c in columns}
    assert paths["Ready"] == '.status.conditions[?(@.type=="Ready")].status'


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_schema_rules_the_api_server_enforces(crds, kind):
    """Structural schema: every node typed; map-list keys required; defaults valid against
    their own schema; every CEL rule compiles."""
    schema = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = 0
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []) or "default" in item["properties"][key]
        if "default" in node:
            jsonschema.Draft4Validator(to_json_schema(node)).validate(node["default"])
        for rule in node.get("x-kubernetes-validations", []):
            cel_program(rule["rule"])
            assert rule.get("message"), f"{path}: a CEL rule needs a message for users"
            rules += 1
    assert rules >= 2


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_conditions_are_metav1_conditions(crds, kind):
    status = crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert sorted(item["required"]) == ["lastTransitionTime", "message", "reason", "status", "type"]
    assert set(item["properties"]) == set(item["required"]) | {"observedGeneration"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert "observedGeneration" in status["properties"]


# --- examples and defaults --------------------------------------------------------------------


def test_examples_exist():
    kinds = sorted(obj["kind"] for obj in example_objects())
    assert kinds == ["EdgeNode"] * 3 + ["EdgeService"] * 2 + ["RoutingPolicy"]


@pytest.mark.parametrize(
    "obj", example_objects(), ids=lambda o: f"{o['kind']}-{o['metadata']['name']}"
)
def test_example_validates(validators, obj):
    assert obj["apiVersion"] == "marl.dev/v1alpha1"
    assert validators[obj["kind"]].errors(obj) == []


def test_example_nodes_form_a_symmetric_triangle():
    nodes = {o["metadata"]["name"]: o["spec"] for o in example_objects() if o["kind"] == "EdgeNode"}
    assert sorted(nodes) == ["edge-0", "edge-1", "edge-2"]
    for name, spec in nodes.items():
        for link in spec["neighbours"]:
            back = {n["name"]: n["latencyMs"] for n in nodes[link["name"]]["neighbours"]}
            assert back[name] == link["latencyMs"], (name, link)
        assert len(spec["neighbours"]) == 2


def test_example_policy_names_example_services():
    services = {o["metadata"]["name"] for o in example_objects() if o["kind"] == "EdgeService"}
    policy = example("RoutingPolicy")
    assert set(policy["spec"]["services"]) <= services


def test_routing_policy_defaults(validators):
    minimal = {
        "apiVersion": "marl.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "p", "namespace": "edge"},
        "spec": {"services": ["fn"], "checkpoint": {"configMap": {"name": "cm"}}},
    }
    assert validators["RoutingPolicy"].errors(minimal) == []
    spec = validators["RoutingPolicy"].defaulted(minimal)["spec"]
    assert spec == {
        "services": ["fn"],
        "checkpoint": {"configMap": {"name": "cm", "key": "policy"}},
        "nodes": {},
        "intervalSeconds": 30,
        "prometheus": {"window": "1m"},
        "rollout": {
            "enabled": True,
            "horizon": 5,
            "candidateSteps": [0.1, 0.3],
            "margin": 0.01,
            "reuseTolerance": 0.05,
        },
        "safety": {
            "maxWeightChange": 20,
            "minWeightChange": 2,
            "minWeight": 0,
            "failureThreshold": 3,
            "fallback": "hold",
            "staleAfterSeconds": 120,
        },
        "suspend": False,
        "dryRun": False,
    }


def _leaves(obj: dict, path: tuple[str, ...] = ()):
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def test_the_example_policy_marks_each_value_that_is_not_the_default(validators):
    """Its header promised the defaults in comments, and two of its values were not them:
    a reader copying it could not tell what omitting a field would give."""
    text = (EXAMPLES / "policy.yaml").read_text()
    body = example("RoutingPolicy")
    needed = {key: body["spec"][key] for key in ("services", "checkpoint")}
    defaults = validators["RoutingPolicy"].defaulted({**body, "spec": needed})["spec"]
    marked = []
    for path, value in _leaves(body["spec"]):
        default = defaults
        for key in path:
            default = default.get(key) if isinstance(default, dict) else None
        if default is None or value == default:
            continue
        (line,) = [line for line in text.splitlines() if re.match(rf"\s*{path[-1]}:", line)]
        assert f"# default {default}" in line, (path, line)
        marked.append(path)
    assert marked  # it does set some values of its own


def test_edge_service_defaults(validators):
    obj = example("EdgeService", "fn")
    del obj["spec"]["mesh"], obj["spec"]["nodeLabel"]
    spec = validators["EdgeService"].defaulted(obj)["spec"]
    assert spec["mesh"] == {"provider": "istio"}
    assert spec["nodeLabel"] == "marl.dev/node"


# --- refusals ---------------------------------------------------------------------------------


def _set(path: str, value):
    def mutate(obj):
        *parents, last = path.split(".")
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()

INVALID = [
    # (id, kind, example name, mutation, field path, words of the message)
    ("bad-fallback", "RoutingPolicy", None, _set("spec.safety.fallback", "panic"),
     "spec.safety.fallback", "is not one of"),
    ("interval-2", "RoutingPolicy", None, _set("spec.intervalSeconds", 2),
     "spec.intervalSeconds", "less than the minimum of 5"),
    ("two-checkpoints", "RoutingPolicy", None, _set("spec.checkpoint.path", "/policies/x"),
     "spec.checkpoint", "exactly one checkpoint source"),
    ("no-checkpoint-source", "RoutingPolicy", None, _set("spec.checkpoint", {}),
     "spec.checkpoint", "exactly one checkpoint source"),
    ("max-change-0", "RoutingPolicy", None, _set("spec.safety.maxWeightChange", 0),
     "spec.safety.maxWeightChange", "less than the minimum of 1"),
    ("min-change-above-max", "RoutingPolicy", None,
     _set("spec.safety", {"maxWeightChange": 5, "minWeightChange": 10}),
     "spec.safety", "minWeightChange must not exceed safety.maxWeightChange"),
    ("min-weight-100", "RoutingPolicy", None, _set("spec.safety.minWeight", 100),
     "spec.safety.minWeight", "greater than the maximum of 99"),
    ("failure-threshold-0", "RoutingPolicy", None, _set("spec.safety.failureThreshold", 0),
     "spec.safety.failureThreshold", "less than the minimum of 1"),
    ("step-0", "RoutingPolicy", None, _set("spec.rollout.candidateSteps", [0.0]),
     "spec.rollout.candidateSteps[0]", "less than or equal to the minimum of 0"),
    ("step-1", "RoutingPolicy", None, _set("spec.rollout.candidateSteps", [0.5, 1]),
     "spec.rollout.candidateSteps[1]", "greater than or equal to the maximum of 1"),
    ("nodes-names-and-selector", "RoutingPolicy", None,
     _set("spec.nodes", {"names": ["edge-0"], "selector": {"matchLabels": {"a": "b"}}}),
     "spec.nodes", "not both"),
    ("no-services", "RoutingPolicy", None, _set("spec.services", []),
     "spec.services", "should be non-empty"),
    ("typo-field", "RoutingPolicy", None, _set("spec.intervalSecond", 30),
     "spec", "'intervalSecond' was unexpected"),
    ("window-not-duration", "RoutingPolicy", None, _set("spec.prometheus.window", "1 minute"),
     "spec.prometheus.window", "does not match"),
    ("window-out-of-order", "RoutingPolicy", None, _set("spec.prometheus.window", "30m1h"),
     "spec.prometheus.window", "does not match"),
    ("window-zero", "RoutingPolicy", None, _set("spec.prometheus.window", "0s"),
     "spec.prometheus.window", "longer than zero"),
    ("provider-unknown", "EdgeService", "fn", _set("spec.mesh.provider", "linkerd"),
     "spec.mesh.provider", "is not one of"),
    # With the default group "", the Service's, the route attached to no Gateway, unsaid.
    ("gateway-parent-core-group", "EdgeService", "fn-gw",
     _set("spec.mesh.parentRefs", [{"kind": "Gateway", "name": "edge-gw"}]),
     "spec.mesh.parentRefs[0]", "a Gateway parent needs group gateway.networking.k8s.io"),
    ("istio-with-httproute", "EdgeService", "fn", _set("spec.mesh.httpRoute", "fn"),
     "spec.mesh", "apply only to provider gateway-api"),
    ("gateway-with-virtualservice", "EdgeService", "fn-gw", _set("spec.mesh.virtualService", "x"),
     "spec.mesh", "apply only to provider istio"),
    ("port-0", "EdgeService", "fn", _set("spec.port", 0), "spec.port", "less than the minimum"),
    ("no-latency-target", "EdgeService", "fn", _set("spec.latencyTargetMs", _DELETE),
     "spec", "'latencyTargetMs' is a required property"),
    ("self-neighbour", "EdgeNode", "edge-0",
     _set("spec.neighbours", [{"name": "edge-0", "latencyMs": 1}]),
     "<root>", "must not list the edge node itself"),
    ("no-kubernetes-nodes", "EdgeNode", "edge-0", _set("spec.nodeSelector", _DELETE),
     "spec", "set nodeNames, nodeSelector or both"),
    ("name-too-long-for-subset", "EdgeNode", "edge-0", _set("metadata.name", "e" * 59),
     "<root>", "DNS label of at most 58 characters"),
    ("negative-latency", "EdgeNode", "edge-1",
     _set("spec.neighbours", [{"name": "edge-0", "latencyMs": -1}]),
     "spec.neighbours[0].latencyMs", "less than the minimum of 0"),
    ("bad-cpu-quantity", "EdgeNode", "edge-1", _set("spec.capacity.cpu", "lots"),
     "spec.capacity.cpu", "does not match"),
    # Specs that passed and could never run: a checkpoint that is not bundled, or one a
    # mesh cannot carry, and selectors the operator then found to select nothing.
    ("bundled-unknown", "RoutingPolicy", None, _set("spec.checkpoint", {"bundled": "nope"}),
     "spec.checkpoint.bundled", "is not one of"),
    ("bundled-not-a-mesh-policy", "RoutingPolicy", None,
     _set("spec.checkpoint", {"bundled": "dfaas-paise25"}),
     "spec.checkpoint.bundled", "is not one of"),
    ("in-without-values", "RoutingPolicy", None,
     _set("spec.nodes", {"selector": {"matchExpressions": [{"key": "zone", "operator": "In"}]}}),
     "spec.nodes.selector.matchExpressions[0]", "In and NotIn need values"),
    ("exists-with-values", "EdgeNode", "edge-1",
     _set("spec.nodeSelector", {"matchExpressions": [
         {"key": "zone", "operator": "Exists", "values": ["a"]}]}),
     "spec.nodeSelector.matchExpressions[0]", "Exists and DoesNotExist take none"),
    # Kubernetes quantities the operator does not read: refused at apply, not later as
    # every policy across the node going Invalid.
    ("cpu-negative", "EdgeNode", "edge-1", _set("spec.capacity.cpu", "-300m"),
     "spec.capacity.cpu", "does not match"),
    ("cpu-zero", "EdgeNode", "edge-1", _set("spec.capacity.cpu", "0"),
     "spec.capacity.cpu", "does not match"),
    ("cpu-zero-millicores", "EdgeNode", "edge-1", _set("spec.capacity.cpu", "0.0m"),
     "spec.capacity.cpu", "does not match"),
    ("cpu-zero-integer", "EdgeNode", "edge-1", _set("spec.capacity.cpu", 0),
     "spec.capacity.cpu", "less than or equal to the minimum"),
    ("cpu-exponent", "EdgeNode", "edge-1", _set("spec.capacity.cpu", "1e3"),
     "spec.capacity.cpu", "does not match"),
    ("cpu-binary-suffix", "EdgeNode", "edge-1", _set("spec.capacity.cpu", "1Ki"),
     "spec.capacity.cpu", "does not match"),
    # No workload's name ends in it, and a node's metrics are found by that ending.
    ("label-no-workload-ends-in", "EdgeNode", "edge-1", _set("spec.podLabelValue", "Site_2"),
     "spec.podLabelValue", "does not match"),
]  # fmt: skip


@pytest.mark.parametrize("cpu", ["4", "2.5", ".5", "0.25", "3500m", "10", 2])
def test_cpu_quantities_the_operator_reads_are_accepted(validators, cpu):
    obj = example("EdgeNode", "edge-1")
    obj["spec"]["capacity"]["cpu"] = cpu
    assert validators["EdgeNode"].errors(obj) == []
    assert cpu_quantity(cpu, "spec.capacity.cpu") > 0


@pytest.mark.parametrize("window", ["1m", "90s", "500ms", "1h30m", "1d2h3m4s5ms", "0m30s"])
def test_windows_prometheus_reads_are_accepted(validators, window):
    obj = example("RoutingPolicy")
    obj["spec"].setdefault("prometheus", {})["window"] = window
    assert validators["RoutingPolicy"].errors(obj) == []
    check_window(window)


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "field", "words"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_object_is_refused_naming_the_field(validators, kind, name, mutate, field, words):
    obj = example(kind, name)
    assert validators[kind].errors(obj) == []  # the base is valid: the mutation is refused
    mutate(obj)
    errors = validators[kind].errors(obj)
    assert any(e.startswith(f"{field}: ") and words in e for e in errors), errors


STATUS = {
    "phase": "Active",
    "observedGeneration": 3,
    "consecutiveFailures": 0,
    "checkpoint": {"source": "bundled:mesh-10x3", "sha256": "a" * 64},
    "services": [
        {
            "name": "fn",
            "meshObjects": ["DestinationRule/fn", "VirtualService/fn"],
            "lastAppliedTime": "2026-01-02T03:04:05Z",
            "routes": [{"sourceNode": "edge-0", "weights": {"edge-0": 70, "edge-1": 30}}],
            "defaultWeights": {"edge-0": 50, "edge-1": 50},
        }
    ],
    "lastDecision": {
        "time": "2026-01-02T03:04:05Z",
        "action": "candidate",
        "predictedLatencyMs": 41.5,
        "observedLatencyMs": 44.0,
        "modelAccuracy": 0.93,
        "decisionMs": 12.5,
    },
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "WeightsApplied",
            "message": "weights applied to 1 service",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 3,
        }
    ],
}


def test_status_validates(validators):
    obj = example("RoutingPolicy") | {"status": STATUS}
    assert validators["RoutingPolicy"].errors(obj) == []


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("conditions", [{**STATUS["conditions"][0], "status": "Yes"}],
         "status.conditions[0].status"),
        ("conditions", [{**STATUS["conditions"][0], "lastTransitionTime": "yesterday"}],
         "status.conditions[0].lastTransitionTime"),
        ("conditions", [{**STATUS["conditions"][0], "reason": "weights applied"}],
         "status.conditions[0].reason"),
        ("services",
         [{"name": "fn", "routes": [{"sourceNode": "edge-0", "weights": {"edge-0": 101}}]}],
         "status.services[0].routes[0].weights.edge-0"),
        ("phase", "Running", "status.phase"),
        ("lastDecision", {"modelAccuracy": 1.5}, "status.lastDecision.modelAccuracy"),
    ],
)  # fmt: skip
def test_invalid_status_is_refused(validators, path, value, field):
    obj = example("RoutingPolicy") | {"status": STATUS | {path: value}}
    errors = validators["RoutingPolicy"].errors(obj)
    assert any(e.startswith(f"{field}: ") for e in errors), errors


def test_operator_defaults_equal_the_crd_defaults(validators):
    """The operator fills in defaults itself (not every server applies them): the values must
    be the CRD's, or a policy would behave differently depending on who defaulted it."""
    from marl_operator.spec import parse_policy_spec

    minimal = {
        "apiVersion": "marl.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "p", "namespace": "edge"},
        "spec": {"services": ["fn"], "checkpoint": {"bundled": "mesh-10x3"}},
    }
    defaulted = validators["RoutingPolicy"].defaulted(minimal)["spec"]
    assert parse_policy_spec(minimal["spec"]) == parse_policy_spec(defaulted)


def test_rollout_defaults_are_the_ones_the_simulator_measured():
    """A RoutingPolicy left at its defaults decides with the rollout settings every number of
    ``python -m simulator.adapt`` was measured with, not with a second set of its own."""
    from marl_operator.spec import RolloutSpec

    from policies.rollout import RolloutSettings

    measured, operator = RolloutSettings(), RolloutSpec()
    assert (operator.horizon, operator.steps, operator.margin) == (
        measured.horizon,
        measured.steps,
        measured.margin,
    )


def test_the_bundled_names_the_crd_accepts_are_the_mesh_checkpoints_shipped():
    """The CRD lists the bundled checkpoints a RoutingPolicy can use; a checkpoint bundled
    or dropped without updating it would be refused, or accepted and fail at build."""
    from policies import checkpoint

    (crd,) = load_documents(CRD_DIR / "routingpolicies.marl.dev.yaml")
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    listed = spec["properties"]["checkpoint"]["properties"]["bundled"]["enum"]
    shipped = [
        d.name
        for d in sorted(checkpoint.BUNDLED.iterdir())
        if (d / checkpoint.META_FILE).is_file()
        and checkpoint.read_meta(d)["action"]["mode"] == "neighbours"
    ]
    assert listed == shipped
