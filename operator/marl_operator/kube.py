"""Every Kubernetes API call the operator makes (besides kopf's own), in one module.

Keeping them here has two uses: the handlers and the cycle stay free of client plumbing, and
the chart's RBAC rules can be checked against :data:`API_CALLS`, the list of
(group, resource, verb) this module uses, so a new call without a rule fails a test.

The ``kubernetes`` client is synchronous; the operator calls it from worker threads.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from marl_operator.access import AccessUnavailable, Caller, Permission
from marl_operator.mesh.factory import (
    GIVE_BACK_ORDER,
    OWNED_FIELDS,
    managed_objects,
    writer_for,
    writer_of_kind,
)
from marl_operator.mesh.model import (
    Manifest,
    MeshError,
    MeshNode,
    MeshRoutes,
    MeshService,
    RestoreIncomplete,
)
from marl_operator.mesh.ownership import SERVICE_ANNOTATION, is_managed
from marl_operator.mesh.patching import reconcile_patch, restore_patch

log = logging.getLogger(__name__)

MARL = ("marl.dev", "v1alpha1")
KINDS: dict[str, tuple[str, str, str]] = {
    # kind -> (group, version, plural) of the objects the mesh writers generate
    "VirtualService": ("networking.istio.io", "v1", "virtualservices"),
    "DestinationRule": ("networking.istio.io", "v1", "destinationrules"),
    "HTTPRoute": ("gateway.networking.k8s.io", "v1", "httproutes"),
}

API_CALLS: tuple[tuple[str, str, str], ...] = (
    ("marl.dev", "edgenodes", "list"),
    ("marl.dev", "edgenodes/status", "patch"),
    ("", "nodes", "list"),
    ("", "services", "get"),
    ("", "pods", "list"),
    ("marl.dev", "edgeservices", "get"),
    ("marl.dev", "routingpolicies/status", "patch"),
    ("", "configmaps", "get"),
    # the HTTP API asks who a caller is and what it may read (marl_operator.access)
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
    *(
        (group, plural, verb)
        for group, _, plural in KINDS.values()
        for verb in ("get", "create", "patch", "delete")
    ),
)
"""(API group, resource, verb) of every call below; the chart's RBAC must grant each."""

DRAIN_API_CALLS: tuple[tuple[str, str, str], ...] = (
    ("marl.dev", "routingpolicies", "list"),
    ("marl.dev", "routingpolicies", "delete"),
)
"""What ``python -m marl_operator.drain`` calls (the chart's uninstall hook, with its own
service account: the operator itself never deletes a policy)."""

KOPF_API_CALLS: tuple[tuple[str, str, str], ...] = (
    # the RoutingPolicies it serves: watch-streams, finalizer and annotation patches
    ("marl.dev", "routingpolicies", "list"),
    ("marl.dev", "routingpolicies", "watch"),
    ("marl.dev", "routingpolicies", "patch"),
    # kopf.event() and kopf's own events
    ("", "events", "create"),
    # runtime observation of custom resources appearing or going
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
)
"""What kopf itself calls for this operator in every mode (measured against the emulated API
server; the chart's RBAC test checks both lists)."""

KOPF_NAMESPACED_MODE_CALLS: tuple[tuple[str, str, str], ...] = (
    # with --namespace: notices watched namespaces created or deleted
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
)
# Kopf's peering calls; Kube.peering_statuses lists the same objects, for /api/v1/replica.
KOPF_CLUSTER_PEERING_CALLS: tuple[tuple[str, str, str], ...] = tuple(
    ("kopf.dev", "clusterkopfpeerings", verb) for verb in ("list", "watch", "patch")
)
KOPF_NAMESPACED_PEERING_CALLS: tuple[tuple[str, str, str], ...] = tuple(
    ("kopf.dev", "kopfpeerings", verb) for verb in ("list", "watch", "patch")
)

CONFLICT_RETRIES = 3
"""Attempts after a 409 (the object changed since it was read): each on a fresh read. Other
refusals are not retried within a cycle: a 422 or 400 is the object itself refused."""

READ_KINDS: dict[str, tuple[str, str, bool]] = {
    # kind -> (group, plural, namespaced) of what the operator reads to build a policy, and
    # of the status it writes besides the policy's own
    "EdgeNode": (MARL[0], "edgenodes", False),
    "EdgeNodeStatus": (MARL[0], "edgenodes/status", False),
    "Node": ("", "nodes", False),
    "Service": ("", "services", True),
    "Pod": ("", "pods", True),
    "EdgeService": (MARL[0], "edgeservices", True),
    "ConfigMap": ("", "configmaps", True),
}

CHART_MESH_PROVIDER = {"networking.istio.io": "istio", "gateway.networking.k8s.io": "gateway-api"}
"""API group of the mesh objects -> the chart's ``meshProvider`` value whose rules grant them."""


class PodsUnreadable(Exception):
    """Which pods serve a service cannot be read from its Kubernetes Service (it does not
    exist, or selects no pods by label); the message says which and why."""


class Forbidden(MeshError):
    """The API server refused a call with 403 Forbidden: the operator's service account has no
    RBAC rule for ``verb`` on ``resource`` (of API ``group``, "" for the core group) in
    ``namespace`` ("" for a cluster-scoped resource).

    ``kind`` is a mesh object's (:data:`KINDS`), or one of the resources the operator reads to
    build a policy (:data:`READ_KINDS`); the message says what to grant, and how the Helm
    chart grants it. A :class:`MeshError`, so the cycle reports it (weights held) instead of
    failing: :meth:`KubeMesh.write` raises it before writing anything of a service whose
    objects it cannot all write, :class:`~marl_operator.runtime.Runtime` turns one raised while
    building a policy into a held cycle. The RoutingPolicy's WeightsApplied condition and its
    event then carry the reason ``Forbidden``."""

    def __init__(self, verb: str, kind: str, namespace: str, name: str, detail: str = ""):
        if kind in KINDS:
            group, _, plural = KINDS[kind]
            namespaced = True
        else:
            group, plural, namespaced = READ_KINDS[kind]
        self.verb, self.group, self.resource = verb, group, plural
        self.kind, self.namespace, self.name, self.detail = kind, namespace, name, detail
        qualified = f"{plural}.{group}" if group else plural
        where = f"in namespace {namespace}" if namespaced else "at the cluster scope"
        self.call = f"{verb} {qualified} {where}" + (f" ({kind} {name})" if name else "")
        """What was refused: ``get edgeservices.marl.dev in namespace edge (EdgeService fn)``."""
        groups = group or '""'  # the core group, as RBAC rules spell it
        rule = f"apiGroups [{groups}], resources [{plural}], verbs [{verb}]"
        super().__init__(
            f"forbidden: the operator may not {self.call}; grant its service account that RBAC "
            f"rule ({rule}){self._chart(namespaced)}"
        )

    def _chart(self, namespaced: bool) -> str:
        """How the Helm chart grants the rule (templates/rbac.yaml): the mesh objects with its
        namespaced rules when meshProvider covers their group; edgeservices and configmaps with
        those rules too, whatever the other values; edgenodes in its ClusterRole. The
        namespaced rules are a ClusterRole bound cluster-wide, or a Role in each of
        watchNamespaces. Nothing without rbac.create."""
        if self.kind in KINDS:
            provider = CHART_MESH_PROVIDER.get(self.group, "all")
            return (
                f", e.g. through the Helm chart's ClusterRole: rbac.create=true with "
                f"meshProvider={provider} or all (and {self.namespace} among watchNamespaces if "
                "those are set)"
            )
        if namespaced:
            return (
                ", e.g. through the Helm chart: rbac.create=true grants it in every namespace (a "
                "ClusterRole) or, with watchNamespaces set, in a Role of each watched namespace "
                f"({self.namespace} must be among them)"
                + (", with checkpoints.fromConfigMaps=true" if self.kind == "ConfigMap" else "")
            )
        return (
            f" in a ClusterRole ({self.resource} are cluster-scoped), e.g. through the Helm "
            "chart: rbac.create=true grants it in the chart's ClusterRole, whatever "
            "watchNamespaces says"
        )


@contextlib.contextmanager
def _refusal(verb: str, kind: str, namespace: str, name: str) -> Iterator[None]:
    """A 403 from the call in the block as :class:`Forbidden` (``kind`` as it takes them:
    a mesh kind, or one of :data:`READ_KINDS`); other errors unchanged."""
    try:
        yield
    except ApiException as error:
        if error.status == 403:
            raise Forbidden(verb, kind, namespace, name, str(error.body or "")) from error
        raise


REVIEW_TIMEOUT_S = (2.0, 5.0)
"""Seconds to connect and to wait for a review's answer: a caller of the HTTP API waits on
it, and so does one of the API's worker threads."""

API_TIMEOUT_S = (5.0, 30.0)
"""Seconds to connect to the API server and to wait for its answer, for every call that sets
no timeout of its own. The client waits for ever by default: one connection the server
accepts and never answers would hold a cycle's worker, and a deletion waiting for that cycle,
for good."""


def _version() -> str:
    try:
        return package_version("marl-operator")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


USER_AGENT = f"marl-operator/{_version()}"
"""Who the API server sees calling: it names the field manager of every write after it (what
``kubectl get -o yaml --show-managed-fields`` and the audit log show), so whoever finds a
route rewritten can tell the operator did it."""


class TimedApiClient(client.ApiClient):
    """An ApiClient whose calls give up after ``timeout`` (:data:`API_TIMEOUT_S`) and
    introduce themselves as :data:`USER_AGENT`."""

    def __init__(self, configuration: client.Configuration, timeout=API_TIMEOUT_S):
        super().__init__(configuration)
        self.timeout = timeout
        self.user_agent = USER_AGENT

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.timeout
        return super().call_api(*args, **kwargs)


def command_line(prog: str, doc: str, description: str, namespaces: str) -> argparse.ArgumentParser:
    """The parser every operator command starts from: its examples from ``doc``, and the
    options that say which cluster and namespaces it works on (``namespaces``: their help)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="examples:" + doc.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kubeconfig", type=kubeconfig_file, help="kubeconfig file (default: in-cluster)"
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help=f"{namespaces} (repeatable; default: every namespace)",
    )
    return parser


def kubeconfig_file(text: str) -> Path:
    """``--kubeconfig``: a file that exists, checked before anything starts."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{text}: no such file (a kubeconfig such as ~/.kube/config; inside a pod, leave "
            "--kubeconfig out to use the pod's service account)"
        )
    return path


class ClusterUnreachable(ValueError):
    """No connection settings could be made: the message names the option and the fix."""


def client_configuration(kubeconfig: Path | None) -> client.Configuration:
    """The Kubernetes connection, from an explicit file or the pod's service account."""
    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as error:
        if kubeconfig is not None:
            raise ClusterUnreachable(f"--kubeconfig {kubeconfig}: {error}") from None
        raise ClusterUnreachable(
            f"not inside a pod ({error}): pass --kubeconfig PATH to run outside the cluster"
        ) from None
    except OSError as error:  # e.g. a 0600 file of another user, mounted into the container
        raise ClusterUnreachable(
            f"--kubeconfig {kubeconfig}: cannot be read ({error.strerror or error}); make it "
            "readable by the user the operator runs as (the image runs as uid 10001)"
        ) from None
    except (yaml.YAMLError, TypeError, AttributeError, ValueError) as error:
        # the client assumes a mapping of the kubeconfig layout; anything else fails inside it
        raise ClusterUnreachable(
            f"--kubeconfig {kubeconfig}: not a kubeconfig ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); pass a file such "
            "as kubectl writes to ~/.kube/config"
        ) from None
    return configuration


class Kube:
    """The operator's view of the cluster: custom resources, mesh objects, checkpoints."""

    def __init__(self, api: client.ApiClient):
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.authentication = client.AuthenticationV1Api(api)
        self.authorization = client.AuthorizationV1Api(api)

    # -- the HTTP API's callers (a marl_operator.access.Reviewer) --------------------------

    def review_token(self, token: str, audience: str) -> Caller | None:
        """Whose ``token`` is (a TokenReview); None where the API server does not accept it
        for ``audience`` (empty: for the API server itself)."""
        spec: dict[str, Any] = {"token": token}
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        status = _review(self.authentication.create_token_review, body)
        user = status.get("user") or {}
        if not status.get("authenticated") or not user.get("username"):
            return None
        # An authenticator blind to audiences answers none: the token is one for the API
        # server itself, which a caller of this API was not to send.
        if audience and audience not in (status.get("audiences") or ()):
            return None
        extra = tuple(sorted((k, tuple(v)) for k, v in (user.get("extra") or {}).items()))
        groups = tuple(user.get("groups") or ())
        return Caller(user["username"], groups, user.get("uid") or "", extra)

    def review_access(self, caller: Caller, permission: Permission) -> bool:
        """Whether ``caller`` may do ``permission`` (a SubjectAccessReview)."""
        spec: dict[str, Any] = {
            "user": caller.user,
            "groups": list(caller.groups),
            "uid": caller.uid,
            "extra": {key: list(values) for key, values in caller.extra},
        }
        if permission.path:
            spec["nonResourceAttributes"] = {"path": permission.path, "verb": permission.verb}
        else:
            attributes = {
                "verb": permission.verb,
                "group": permission.group,
                "resource": permission.resource,
                "namespace": permission.namespace,
                "name": permission.name,
            }
            spec["resourceAttributes"] = {k: v for k, v in attributes.items() if v}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview"}
        status = _review(self.authorization.create_subject_access_review, body | {"spec": spec})
        if not status.get("allowed") and status.get("evaluationError"):
            # An authorizer failed: not a refusal to keep for a minute.
            error = str(status["evaluationError"])[:200]
            raise AccessUnavailable(f"the SubjectAccessReview could not be decided: {error}")
        return bool(status.get("allowed"))

    # -- marl.dev resources --------------------------------------------------------------

    # A 403 on any of these reads raises Forbidden, as on the mesh objects below.

    def edge_nodes(self) -> list[dict[str, Any]]:
        with _refusal("list", "EdgeNode", "", ""):
            return self.custom.list_cluster_custom_object(*MARL, "edgenodes").get("items", [])

    def kubernetes_nodes(self) -> list[dict[str, Any]]:
        """Every Kubernetes Node, as the API's JSON (what :mod:`liveness` reads)."""
        with _refusal("list", "Node", "", ""):
            # The watch cache will do. Read as JSON, not through the client's models: for
            # thousands of nodes, building and flattening those took seconds of CPU.
            listed = self.core.list_node(resource_version="0", _preload_content=False)
        return _items(listed)

    def service_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The pods the Kubernetes Service ``namespace/name`` selects, as the API's JSON (what
        :func:`marl_operator.liveness.unserved` reads); :class:`PodsUnreadable` when it does
        not exist or selects none by label."""
        try:
            with _refusal("get", "Service", namespace, name):
                service = self.core.read_namespaced_service(name, namespace)
        except ApiException as error:
            if error.status == 404:
                raise PodsUnreadable(f"the Service {namespace}/{name} does not exist") from None
            raise
        selector = service.spec.selector
        if not selector:
            raise PodsUnreadable(
                f"the Service {namespace}/{name} has no selector (its endpoints are not "
                "pods it selects)"
            )
        labels = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        with _refusal("list", "Pod", namespace, ""):
            listed = self.core.list_namespaced_pod(
                namespace, label_selector=labels, resource_version="0", _preload_content=False
            )
        return _items(listed)

    def edge_services(self, namespace: str, names: tuple[str, ...]) -> dict[str, dict]:
        """The named EdgeServices that exist (absent ones are left out for the caller to
        report)."""
        out = {}
        for name in names:
            try:
                with _refusal("get", "EdgeService", namespace, name):
                    out[name] = self.custom.get_namespaced_custom_object(
                        *MARL, namespace, "edgeservices", name
                    )
            except ApiException as error:
                if error.status != 404:
                    raise
        return out

    def _items(
        self,
        group: str,
        version: str,
        plural: str,
        namespaces: Sequence[str],
        cluster_plural: str | None = None,
    ) -> list[dict[str, Any]]:
        """The objects of ``plural`` in each of ``namespaces``, or cluster-wide when there are
        none (under ``cluster_plural`` if another kind holds them there, as for kopf's
        peerings)."""
        if not namespaces:
            plural = cluster_plural or plural
            listed = [self.custom.list_cluster_custom_object(group, version, plural)]
        else:
            listed = [
                self.custom.list_namespaced_custom_object(group, version, ns, plural)
                for ns in namespaces
            ]
        return [item for answer in listed for item in answer.get("items", [])]

    def routing_policies(self, namespaces: Sequence[str] = ()) -> dict[str, bool]:
        """Every RoutingPolicy in ``namespaces`` (none: every one), as ``namespace/name`` ->
        whether its deletion is under way already."""
        items = self._items(*MARL, "routingpolicies", namespaces)
        return {
            f"{meta['namespace']}/{meta['name']}": bool(meta.get("deletionTimestamp"))
            for meta in (item["metadata"] for item in items)
        }

    def delete_policy(self, key: str) -> None:
        """Ask for the deletion of ``namespace/name``; one already gone is fine."""
        namespace, name = key.split("/", 1)
        try:
            self.custom.delete_namespaced_custom_object(*MARL, namespace, "routingpolicies", name)
        except ApiException as error:
            if error.status != 404:
                raise

    def peering_statuses(self, name: str, namespaces: Sequence[str] = ()) -> list[dict]:
        """The status (peer -> priority, lifetime, lastseen) of kopf's peering object ``name``:
        the ClusterKopfPeering, or the KopfPeering of each of ``namespaces``. Listed, not
        read by name: kopf's rules grant list, and there are a handful of such objects."""
        items = self._items("kopf.dev", "v1", "kopfpeerings", namespaces, "clusterkopfpeerings")
        return [item.get("status") or {} for item in items if item["metadata"]["name"] == name]

    def patch_edge_node_status(self, name: str, status: Mapping[str, Any]) -> None:
        with _refusal("patch", "EdgeNodeStatus", "", name):
            self.custom.patch_cluster_custom_object_status(
                *MARL, "edgenodes", name, {"status": dict(status)}
            )

    def patch_policy_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            *MARL, namespace, "routingpolicies", name, {"status": dict(status)}
        )

    def checkpoint_from_configmap(self, namespace: str, name: str, key: str, into: Path) -> None:
        """Write a ConfigMap-held checkpoint (``<key>.pt`` in binaryData, ``<key>.json`` in
        data) into the directory ``into`` as a checkpoint directory; the caller loads it
        tensors-only (and owns the directory)."""
        try:
            with _refusal("get", "ConfigMap", namespace, name):
                cm = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            raise FileNotFoundError(
                f"no ConfigMap {namespace}/{name}; create it with the checkpoint (binaryData "
                f"{key}.pt, data {key}.json) or point spec.checkpoint elsewhere"
            ) from None
        weights = (cm.binary_data or {}).get(f"{key}.pt")
        meta = (cm.data or {}).get(f"{key}.json")
        if weights is None or meta is None:
            raise FileNotFoundError(
                f"ConfigMap {namespace}/{name} needs binaryData {key}.pt and data {key}.json"
            )
        (into / "policy.pt").write_bytes(base64.b64decode(weights))
        (into / "policy.json").write_text(meta)

    # -- mesh objects ------------------------------------------------------------------------

    # A 403 on any of these raises Forbidden (naming the verb, the resource, the namespace).
    # ``dry_run``: the API server checks the call (RBAC, admission, validation, conflicts) and
    # answers as if it were made, but changes nothing.

    def get(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        group, version, plural = KINDS[kind]
        try:
            with _refusal("get", kind, namespace, name):
                return self.custom.get_namespaced_custom_object(
                    group, version, namespace, plural, name
                )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def create(self, manifest: Manifest, *, dry_run: bool = False) -> None:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        group, version, plural = KINDS[kind]
        namespace = manifest["metadata"]["namespace"]
        with _refusal("create", kind, namespace, name):
            self.custom.create_namespaced_custom_object(
                group, version, namespace, plural, manifest, dry_run="All" if dry_run else None
            )

    def patch(
        self,
        namespace: str,
        kind: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        dry_run: bool = False,
    ) -> None:
        group, version, plural = KINDS[kind]
        with _refusal("patch", kind, namespace, name):
            self.custom.patch_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                name,
                dict(patch),
                dry_run="All" if dry_run else None,
            )

    def delete(self, namespace: str, kind: str, name: str) -> None:
        group, version, plural = KINDS[kind]
        try:
            with _refusal("delete", kind, namespace, name):
                self.custom.delete_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as error:
            if error.status != 404:
                raise


Keep = Callable[[Manifest, "Mapping[str, Any] | None"], Manifest]
"""A writer's ``keep`` for one service: the desired object with what the live one keeps."""


def _where(manifest: Manifest) -> str:
    return f"{manifest['kind']} {manifest['metadata']['namespace']}/{manifest['metadata']['name']}"


REFUSED_FOR_GOOD = (400, 422)
"""API answers no retry changes: the request itself is refused (an invalid object, an
admission webhook's denial)."""


def _review(create: Callable[..., Any], body: dict[str, Any]) -> dict[str, Any]:
    """The ``status`` of a review created with ``create``; :class:`AccessUnavailable` when
    the API server cannot be asked, or refuses the operator the question."""
    kind = body["kind"]
    try:
        response = create(body, _preload_content=False, _request_timeout=REVIEW_TIMEOUT_S)
    except ApiException as error:
        hint = (
            f": the operator's service account needs create on {kind.lower()}s (the chart "
            "grants it with api.auth=kubernetes)"
            if error.status == 403
            else ""
        )
        raise AccessUnavailable(f"the {kind} was refused: {refusal_text(error)}{hint}") from None
    except (urllib3.exceptions.HTTPError, OSError) as error:  # unreachable, timed out
        raise AccessUnavailable(f"the {kind} could not be sent: {type(error).__name__}") from None
    try:
        status = json.loads(response.data).get("status") or {}
    except (ValueError, AttributeError):
        raise AccessUnavailable(f"the {kind}'s answer is not a review: unreadable") from None
    finally:
        response.release_conn()
    if not isinstance(status, dict):
        raise AccessUnavailable(f"the {kind}'s answer is not a review: no status object")
    return status


def _items(response: Any) -> list[dict[str, Any]]:
    """The items of a list call made with ``_preload_content=False``, as the API's JSON."""
    try:
        return json.loads(response.data).get("items") or []
    finally:
        response.release_conn()


def refusal_text(error: ApiException) -> str:
    """``status reason``, and what the API server said of it: a webhook's or a validator's
    message is what the user must fix (the Status body's ``message``, which carries no
    credentials; cut short)."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    said = f"{error.status} {error.reason}"
    return f"{said}: {str(message)[:300]}" if message else said


def _failure(manifest: Manifest, error: ApiException) -> MeshError:
    return MeshError(f"{_where(manifest)}: {refusal_text(error)}")


def _check_owner(manifest: Manifest, live: Mapping[str, Any] | None, service: MeshService) -> None:
    """MeshError if ``live`` carries another EdgeService's routes: two services written into
    one object would overwrite each other every cycle (policies each check their own
    services; this catches two policies whose EdgeServices name the same object)."""
    if live is None or not is_managed(live):
        return
    owner = (live.get("metadata", {}).get("annotations") or {}).get(SERVICE_ANNOTATION)
    if owner not in (None, service.ref):
        raise MeshError(
            f"{_where(manifest)} carries the routes of EdgeService {owner}, not "
            f"{service.ref}: give each EdgeService its own spec.mesh object names"
        )


def _held(
    live: Mapping[str, Any], patch: Mapping[str, Any] | None, in_place: Mapping[str, set[str]]
) -> str:
    """What keeps ``live`` from being given back (``patch``, or deleted for None): the
    routes left in place that name a target the give-back removes (an Istio sidecar would
    meet a route to a subset that no longer exists: 503); "" if none do."""
    gone = writer_of_kind(live["kind"]).targets_given_up(live, patch)
    return "; ".join(
        f"{where} still routes to {', '.join(sorted(subsets & gone))}"
        for where, subsets in in_place.items()
        if subsets & gone
    )


class KubeMesh:
    """:class:`marl_operator.controller.MeshClient` over the Kubernetes API."""

    def __init__(self, kube: Kube):
        self.kube = kube

    def read(self, service: MeshService, nodes: tuple[MeshNode, ...]) -> MeshRoutes | None:
        writer = writer_for(service.provider)
        objects = [
            obj
            for kind, name in managed_objects(service, nodes)
            if (obj := self.kube.get(service.namespace, kind, name)) is not None
        ]
        if not objects:
            return None
        try:
            return writer.read(service, nodes, objects)
        except MeshError:
            if not any(is_managed(obj) for obj in objects):
                return None  # the user's own object, not taken over yet
            raise

    def write(self, service: MeshService, routes: MeshRoutes) -> bool:
        """Create or patch each object; a 409 (someone changed it since it was read) is
        retried on a fresh read, since the desired state does not depend on the old one.

        All or nothing: when more than one object must change, every change is first sent as
        a server-side dry run, so a refusal (403 :class:`Forbidden`, or an invalid object)
        leaves the service's objects as they were instead of a DestinationRule without its
        VirtualService. One change alone needs no rehearsal."""
        writer = writer_for(service.provider)
        manifests = writer.desired(service, routes)

        def keep(manifest: Manifest, live: Mapping[str, Any] | None) -> Manifest:
            # Checked on every live copy a change is made from, re-read ones too: another
            # policy's object created between a read and a retry must not be taken over.
            _check_owner(manifest, live, service)
            return writer.keep(service, manifest, live)

        lives = [self._read(manifest) for manifest in manifests]
        manifests = writer.make_before_break(service, manifests, lives)
        pending = sum(
            self._pending(keep(m, live), live) for m, live in zip(manifests, lives, strict=True)
        )
        if pending > 1:
            lives = self._rehearse(manifests, lives, keep)
        changed = False
        for manifest, live in zip(manifests, lives, strict=True):
            changed |= self._apply(manifest, live, keep)
        return changed

    def _read(self, manifest: Manifest) -> dict[str, Any] | None:
        meta = manifest["metadata"]
        return self.kube.get(meta["namespace"], manifest["kind"], meta["name"])

    @staticmethod
    def _pending(manifest: Manifest, live: Mapping[str, Any] | None) -> bool:
        return live is None or bool(reconcile_patch(live, manifest))

    def _send(
        self, manifest: Manifest, live: Mapping[str, Any] | None, keep: Keep, dry_run: bool
    ) -> bool:
        """Create or patch one object from its live copy, keeping what the writer's ``keep``
        keeps of it; False when nothing differs."""
        options = {"dry_run": True} if dry_run else {}
        manifest = keep(manifest, live)
        if live is None:
            self.kube.create(manifest, **options)
            return True
        patch = reconcile_patch(live, manifest)
        if not patch:
            return False
        meta = manifest["metadata"]
        self.kube.patch(meta["namespace"], manifest["kind"], meta["name"], patch, **options)
        return True

    def _rehearse(
        self, manifests: list[Manifest], lives: list[dict[str, Any] | None], keep: Keep
    ) -> list[dict[str, Any] | None]:
        """Dry-run every change; returns the live copies they were checked against (read
        again after a conflict). Raises :class:`Forbidden` or :class:`MeshError`."""
        for attempt in range(CONFLICT_RETRIES + 1):
            for manifest, live in zip(manifests, lives, strict=True):
                try:
                    self._send(manifest, live, keep, dry_run=True)
                except ApiException as error:
                    if error.status != 409 or attempt == CONFLICT_RETRIES:
                        raise _failure(manifest, error) from error
                    break
            else:
                return lives
            log.info("conflict rehearsing the writes of %s, retrying", _where(manifests[0]))
            lives = [self._read(manifest) for manifest in manifests]
        return lives  # unreachable: the loop returns or raises

    def _apply(self, manifest: Manifest, live: Mapping[str, Any] | None, keep: Keep) -> bool:
        for attempt in range(CONFLICT_RETRIES + 1):
            if attempt:
                live = self._read(manifest)
            try:
                return self._send(manifest, live, keep, dry_run=False)
            except ApiException as error:
                if error.status != 409 or attempt == CONFLICT_RETRIES:
                    raise _failure(manifest, error) from error
                log.info("conflict on %s, retrying", _where(manifest))
        return False  # unreachable: the loop returns or raises

    def restore(self, service: MeshService, nodes: tuple[MeshNode, ...]) -> list[str]:
        """Give back the user's objects as they were and delete the ones the operator
        created; returns what was done, one entry per object."""
        return self.restore_objects(service.namespace, service.ref, managed_objects(service, nodes))

    def restore_objects(
        self, namespace: str, service_ref: str, objects: list[tuple[str, str]]
    ) -> list[str]:
        """:meth:`restore` of the ``(kind, name)`` objects of the EdgeService ``service_ref``
        (``namespace/name``), routes first; objects the operator does not manage for it are
        left alone."""
        done, failed = [], []
        # Routes left as they are (not given back): the subsets they name stay defined.
        in_place: dict[str, set[str]] = {}
        for kind, name in sorted(objects, key=lambda obj: GIVE_BACK_ORDER.index(obj[0])):
            live = self.kube.get(namespace, kind, name)
            if live is None or not is_managed(live):
                continue
            annotations = live.get("metadata", {}).get("annotations") or {}
            if annotations.get(SERVICE_ANNOTATION) != service_ref:
                continue
            try:
                patch = restore_patch(live, OWNED_FIELDS.get(kind, ()))
            except MeshError as error:  # the others are given back all the same
                failed.append(f"{kind}/{name}: {error}")
                in_place[f"{kind}/{name}"] = writer_of_kind(kind).routed_targets(live)
                continue
            if held := _held(live, patch, in_place):
                failed.append(f"{kind}/{name}: kept, since {held}: give it back after them")
                continue
            try:
                if patch is None:
                    self.kube.delete(namespace, kind, name)
                    done.append(f"deleted {kind}/{name}")
                else:
                    self.kube.patch(namespace, kind, name, patch)
                    done.append(f"restored {kind}/{name}")
            except Forbidden as error:
                # Not retried: a webhook's denial stays one, and a missing rule would hold
                # the policy's deletion, silently, until someone granted it.
                failed.append(f"{kind}/{name}: {error}")
                in_place[f"{kind}/{name}"] = writer_of_kind(kind).routed_targets(live)
            except ApiException as error:
                if error.status not in REFUSED_FOR_GOOD:
                    raise  # unreachable or conflicting: the next attempt may pass
                failed.append(f"{kind}/{name}: the API server refused it: {refusal_text(error)}")
                in_place[f"{kind}/{name}"] = writer_of_kind(kind).routed_targets(live)
        if failed:
            raise RestoreIncomplete(done, failed)
        return done
