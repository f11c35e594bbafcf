"""An emulated Kubernetes API server, for the operator's tests and the embedded demo.

kmock's ``KubernetesEmulator`` is a database over HTTP with the Kubernetes URL layout. The
operator (through kopf and the ``kubernetes`` client) relies on more of a real API server than
that, so :class:`ApiServer` adds, where the operator depends on it:

- resources: kmock's bundled built-ins, every CRD in the repository's ``crds/`` (and any CRD
  created later through the API), Istio's VirtualService and DestinationRule, the Gateway API's
  HTTPRoute (``v1`` only) and kopf's peering resources;
- ``metadata``: ``uid``, ``creationTimestamp``, ``generation`` (1 on create, +1 when anything
  outside metadata and status changes) and an increasing ``resourceVersion`` on every write; a
  write that changes nothing is a no-op (no new version, no watch event), as on a real server;
- patches: merge patch (RFC 7386; strategic merge is treated as a merge patch), JSON patch (a
  failed ``test`` answers 422), server-side apply (as a merge patch that creates a missing object;
  no field managers) and PUT; ``metadata.resourceVersion`` in the resulting object is a
  precondition (409 Conflict when stale), the system fields of ``metadata`` cannot be patched;
- the status subresource: ``.../status`` changes only ``status``; writes to the main resource
  (and creates) ignore ``status``;
- lists carry ``kind``, ``apiVersion`` and the current ``resourceVersion`` (``kubectl get``
  needs ``kind``); lists and watches honour ``labelSelector`` and simple ``fieldSelector``;
  a watch from a ``resourceVersion`` replays only newer objects (ADDED), and it does not lose
  events written while it replays (kmock's does);
- deletion with finalizers: ``deletionTimestamp`` first, gone when the last finalizer goes;
- ``dryRun=All`` on creates, patches, PUTs and deletes: every check runs and the answer is the
  object as it would be stored, but nothing is stored and no watch event is sent;
- RBAC refusals, for tests: :meth:`ApiServer.deny` makes a verb on a resource (in one namespace
  or all) answer 403 Forbidden with a real server's message, until :meth:`ApiServer.allow`;
- TokenReviews and SubjectAccessReviews, what the operator's HTTP API asks of its callers: a
  token is known once :meth:`ApiServer.add_token` names its user, and a review allows what
  :meth:`ApiServer.permit` granted that user or one of its groups, nothing else.

Not emulated: schema validation, defaulting and CEL rules, admission, namespace existence,
field managers, ``deletecollection``, pagination, watch bookmarks and ``410 Gone``, DELETED
events for objects that stop matching a watch's selector, garbage collection of owned objects,
authentication of the emulator's own callers (every request is one user's, allowed everything
not denied) and TLS. Several
API versions of one resource are separate stores (so only one version of HTTPRoute is
served).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import queue
import re
import secrets
import signal
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from marl_operator.mesh.patching import apply_merge_patch

from demo.cluster import kind_nodes, workload_objects
from simulator.cli import DocHelpFormatter

REPO_CRD_DIR = Path(__file__).resolve().parent.parent / "crds"
CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

# Third-party resources the operator reads or writes, as their CRDs declare them:
# (apiVersion, plural, kind, namespaced, shortNames, subresources).
EXTRA_RESOURCES: tuple[tuple[str, str, str, bool, tuple[str, ...], tuple[str, ...]], ...] = (
    ("networking.istio.io/v1", "virtualservices", "VirtualService", True, ("vs",), ("status",)),
    ("networking.istio.io/v1", "destinationrules", "DestinationRule", True, ("dr",), ("status",)),
    ("gateway.networking.k8s.io/v1", "httproutes", "HTTPRoute", True, (), ("status",)),
    ("kopf.dev/v1", "clusterkopfpeerings", "ClusterKopfPeering", False, (), ()),
    ("kopf.dev/v1", "kopfpeerings", "KopfPeering", True, (), ()),
)
# kmock keeps each API version of a resource in its own store and its discovery prefers one
# version at random, so a kubectl user could miss the objects the operator wrote: serve one.
DROPPED_GROUP_VERSIONS = frozenset({"gateway.networking.k8s.io/v1beta1"})

# Fields of metadata that only the server sets: a patch or PUT cannot change them.
SYSTEM_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
)
# Go's omitempty: a real server stores an empty list or map here as an absent field.
OMITEMPTY_METADATA = ("finalizers", "labels", "annotations", "ownerReferences")

API_SERVER_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
"""The audience of the tokens the emulated API server takes for itself."""

REVIEWS = {
    ("authentication.k8s.io", "tokenreviews"): "TokenReview",
    ("authorization.k8s.io", "subjectaccessreviews"): "SubjectAccessReview",
}

NAMESPACES = kmock.resource("", "v1", "namespaces")
# kmock parses /api/v1/namespaces/NAME as the prefix of a namespaced path (and fails on the bare
# /api/v1/namespaces), so those paths are parsed under an alias plural and mapped back.
_NAMESPACES_PATH = re.compile(r"/api/v1/namespaces(?P<rest>/[^/]+(?:/status|/finalize)?)?/?")
_NAMESPACES_ALIAS = "namespaces~"

JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
REQUEST_LOG = 20  # requests (and errors) kmock keeps for assertions; it scans them all on
# every request, so a long log makes every call slow (about 50 ms each at 1000)
OBJECT_HISTORY = 20  # versions kept per object


def api_error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """A Kubernetes ``Status`` failure, which kmock renders as the response."""
    return kmock.KubernetesError(status, reason, message, details or {"causes": []})


_SELECTOR_TERMS = re.compile(r",(?![^(]*\))")  # commas outside "in (a,b)"
_LABEL_TERM = re.compile(
    r"^(?P<absent>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)"
    r"|\s(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?$"
)
_FIELD_TERM = re.compile(r"^(?P<path>[A-Za-z0-9_.]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*)$")


def matches_labels(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy a label selector (equality, set and existence terms)."""
    for term in filter(None, (t.strip() for t in _SELECTOR_TERMS.split(selector))):
        found = _LABEL_TERM.match(term)
        if found is None or (found["absent"] and (found["op"] or found["set"])):
            raise api_error(400, "BadRequest", f"unable to parse requirement: {term!r}")
        value = labels.get(found["key"])
        if found["op"]:
            ok = (value == found["value"]) == (found["op"] != "!=")
        elif found["set"]:
            values = {v.strip() for v in found["values"].split(",")}
            ok = (value in values) == (found["set"] == "in")
        else:
            ok = (value is None) == bool(found["absent"])
        if not ok:
            return False
    return True


def matches_fields(selector: str, obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` satisfies a field selector of ``path=value`` and ``path!=value`` terms."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        found = _FIELD_TERM.match(term)
        if found is None:
            raise api_error(400, "BadRequest", f"invalid field selector: {term!r}")
        value: Any = obj
        for part in found["path"].split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        text = "" if value is None else str(value)
        text = text.lower() if isinstance(value, bool) else text
        if (text == found["value"]) != (found["op"] != "!="):
            return False
    return True


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _content_type(request: kmock.Request) -> str:
    found = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
    return found.split(";")[0].strip().lower()


def _revision_of(obj: Mapping[str, Any]) -> int:
    revision = str(obj.get("metadata", {}).get("resourceVersion", ""))
    return int(revision) if revision.isdigit() else 0


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics the operator relies on (module docstring).

    A subclass, not a monkeypatch: kmock's write logic lives in ``KubernetesEmulator._handle``,
    which this class replaces (it dispatches straight to kmock's reactions), and the list and
    watch answers are kmock's fallbacks, bound to this class's methods at construction.
    """

    crd_dir: Path | None = REPO_CRD_DIR
    _revision: int = attrs.field(default=0, init=False)
    _denied: set[tuple[str, str, str | None]] = attrs.field(factory=set, init=False)
    _tokens: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = attrs.field(
        factory=dict, init=False
    )
    _granted: set[tuple[str, str, str, str | None, str | None]] = attrs.field(
        factory=set, init=False
    )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_update
        self.fallback["get /openapi/v3"] << self._serve_openapi_index
        self.fallback["get", re.compile(r"/openapi/v3/.+")] << self._serve_openapi_group_version
        with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated call
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        for resource in list(self.resources):
            if _api_version(resource) in DROPPED_GROUP_VERSIONS:
                del self.resources[resource]
        for api_version, plural, kind, namespaced, short, subresources in EXTRA_RESOURCES:
            self.declare(
                api_version,
                plural,
                kind=kind,
                namespaced=namespaced,
                short_names=short,
                subresources=subresources,
            )
        if self.crd_dir is not None:
            self.load_crds(self.crd_dir)

    def register(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Store core objects (Nodes, Pods, Services), status included, as kubelets and
        controllers make them; call it before serving (no watch event is sent)."""
        for obj in objects:
            resource = kmock.resource("", "v1", f"{obj['kind'].lower()}s")
            namespace = (
                obj["metadata"].get("namespace") if self._info(resource).namespaced else None
            )
            status = copy.deepcopy(obj.get("status") or {})
            body = self._stamp_new(resource, namespace, copy.deepcopy(dict(obj)))
            body["status"] = status
            self._objects[resource, namespace, body["metadata"]["name"]] = body

    # --- resources ------------------------------------------------------------------------

    def declare(
        self,
        api_version: str,
        plural: str,
        *,
        kind: str,
        namespaced: bool,
        singular: str | None = None,
        short_names: tuple[str, ...] = (),
        categories: tuple[str, ...] = (),
        subresources: tuple[str, ...] = (),
    ) -> None:
        """Serve a resource: discoverable, and its objects can be created, patched, watched."""
        group, _, version = api_version.rpartition("/")
        self.resources[kmock.resource(group, version, plural)] = kmock.ResourceInfo(
            kind=kind,
            singular=singular or kind.lower(),
            namespaced=namespaced,
            verbs=set(ALL_VERBS),
            shortnames=set(short_names),
            categories=set(categories),
            subresources=set(subresources),
        )

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve every served version of a CustomResourceDefinition, as a real server does."""
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                self.declare(
                    f"{spec['group']}/{version['name']}",
                    names["plural"],
                    kind=names["kind"],
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    singular=names.get("singular"),
                    short_names=tuple(names.get("shortNames", ())),
                    categories=tuple(names.get("categories", ())),
                    subresources=tuple(version.get("subresources") or ()),
                )

    def load_crds(self, directory: Path) -> None:
        """Serve the CRDs of ``directory/*.yaml`` and store them, so ``kubectl get crd`` lists
        them; a missing directory is an error, not an emulator without the operator's kinds."""
        if not directory.is_dir():
            raise FileNotFoundError(f"no CRD directory {directory}: pass crd_dir explicitly")
        for path in sorted(directory.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    body = self._stamp_new(CRD_RESOURCE, None, copy.deepcopy(doc))
                    self._objects[CRD_RESOURCE, None, body["metadata"]["name"]] = body
                    self.register_crd(body)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource.plural is None or resource not in self.resources:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return self.resources[resource]

    @staticmethod
    def _not_found(resource: kmock.resource, name: str | None) -> kmock.KubernetesError:
        qualified = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        return api_error(
            404,
            "NotFound",
            f'{qualified} "{name}" not found',
            name=name,
            group=resource.group,
            kind=resource.plural,
        )

    # --- authorization --------------------------------------------------------------------

    def deny(self, verb: str, resource: str, namespace: str | None = None) -> None:
        """Refuse ``verb`` (``get``, ``list``, ``watch``, ``create``, ``patch``, ``update``,
        ``delete``) on ``resource`` (``plural.group``, ``plural`` for the core group, with
        ``/subresource`` for one) in ``namespace`` (every namespace by default) with 403
        Forbidden, as a real server does for a service account that no RBAC rule covers."""
        self._denied.add((verb, resource, namespace))

    def allow(self, verb: str, resource: str, namespace: str | None = None) -> None:
        """Undo :meth:`deny` (the rule was granted)."""
        self._denied.discard((verb, resource, namespace))

    def add_token(
        self,
        token: str,
        user: str,
        groups: tuple[str, ...] = (),
        audiences: tuple[str, ...] = (API_SERVER_AUDIENCE,),
    ) -> None:
        """Make TokenReviews of ``token`` answer that it is ``user``'s, of ``groups``, when
        they ask for one of ``audiences`` (by default the API server's own, what a review
        that names none asks for)."""
        self._tokens[token] = (user, ("system:authenticated", *groups), audiences)

    def permit(
        self,
        subject: str,
        verb: str,
        what: str,
        namespace: str | None = None,
        name: str | None = None,
    ) -> None:
        """Make SubjectAccessReviews allow ``subject`` (a user or a group) to ``verb``
        ``what`` (``plural.group``, ``plural`` for the core group, or a non-resource URL such
        as ``/metrics``) in ``namespace`` (every namespace by default), of the object
        ``name`` (every one by default). What RBAC would grant the users of
        :meth:`add_token`; the emulator's own callers are not held to it."""
        self._granted.add((subject, verb, what, namespace, name))

    def _review(self, request: kmock.Request) -> dict[str, Any]:
        assert request.resource is not None  # checked by the caller; for type checkers
        kind = REVIEWS[request.resource.group, request.resource.plural]
        data = request.data if isinstance(request.data, Mapping) else {}
        spec = data.get("spec") or {}
        if kind == "TokenReview":
            found = self._tokens.get(str(spec.get("token") or ""))
            asked = spec.get("audiences") or [API_SERVER_AUDIENCE]
            audiences = [a for a in asked if found is not None and a in found[2]]
            status: dict[str, Any] = {"authenticated": bool(audiences)}
            if audiences:
                assert found is not None  # for type checkers
                status["user"] = {"username": found[0], "uid": found[0], "groups": list(found[1])}
                status["audiences"] = audiences
            else:
                status["error"] = "invalid bearer token"
        else:
            subjects = {spec.get("user"), *(spec.get("groups") or ())}
            if "nonResourceAttributes" in spec:
                asked = spec["nonResourceAttributes"]
                what, namespace = asked.get("path"), None
            else:
                asked = spec.get("resourceAttributes") or {}
                group, plural = asked.get("group", ""), asked.get("resource", "")
                what, namespace = f"{plural}.{group}" if group else plural, asked.get("namespace")
            names = {None, asked.get("name") or None}
            status = {
                "allowed": any(
                    (subject, asked.get("verb"), what, scope, name) in self._granted
                    for subject in subjects
                    for scope in {None, namespace or None}
                    for name in names
                )
            }
        return {
            "apiVersion": _api_version(request.resource),
            "kind": kind,
            "spec": spec,
            "status": status,
        }

    @staticmethod
    def _verb(request: kmock.Request) -> str:
        if request.method == kmock.method.PUT:
            return "update"
        if request.action == kmock.action.DELETE and request.name is None:
            return "deletecollection"
        verbs = {
            kmock.action.LIST: "list",
            kmock.action.WATCH: "watch",
            kmock.action.FETCH: "get",
            kmock.action.CREATE: "create",
            kmock.action.UPDATE: "patch",
            kmock.action.DELETE: "delete",
        }
        return verbs.get(request.action, str(request.method).lower())

    def _authorize(self, request: kmock.Request) -> None:
        assert request.resource is not None  # checked by the caller; for type checkers
        resource = request.resource
        verb = self._verb(request)
        plural = resource.plural + (f"/{request.subresource}" if request.subresource else "")
        qualified = f"{plural}.{resource.group}" if resource.group else plural
        if not any(
            rule in self._denied
            for rule in ((verb, qualified, request.namespace), (verb, qualified, None))
        ):
            return
        name = request.name
        if name is None and isinstance(request.data, Mapping):
            name = (request.data.get("metadata") or {}).get("name")
        subject = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        named = f' "{name}"' if name else ""
        where = f' in the namespace "{request.namespace}"' if request.namespace else ""
        scope = "" if request.namespace else " at the cluster scope"
        raise api_error(
            403,
            "Forbidden",
            f"{subject}{named} is forbidden: "
            f'User "system:serviceaccount:default:default" cannot {verb} resource "{plural}" '
            f'in API group "{resource.group}"{where}{scope}',
            name=name,
            group=resource.group,
            kind=resource.plural,
        )

    # --- writes ---------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Every request: namespaces' own paths go in under their alias (``_NAMESPACES_PATH``)."""
        found = _NAMESPACES_PATH.fullmatch(raw_request.path)
        if found is not None:
            path = f"/api/v1/{_NAMESPACES_ALIAS}{found['rest'] or ''}"
            url = raw_request.rel_url.with_path(path).with_query(raw_request.rel_url.query)
            raw_request = raw_request.clone(rel_url=url)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Apply a write with API-server semantics, then let kmock's reactions answer it."""
        if request.resource is not None and request.resource.plural == _NAMESPACES_ALIAS:
            namespaces_request = attrs.evolve(request, resource=NAMESPACES)
            # kmock's reactions match the logged requests by identity: log the mapped one.
            self._requests[self._requests.index(request)] = namespaces_request
            request = namespaces_request
        resource = request.resource
        if resource is not None and (resource.group, resource.plural) in REVIEWS:
            self._trim_logs()
            if request.method != kmock.method.POST:
                raise api_error(405, "MethodNotAllowed", "reviews can only be created")
            self._authorize(request)  # the operator's own rights to ask
            return aiohttp.web.json_response(self._review(request), status=201)
        if request.resource is not None and request.resource.plural is not None:
            self._authorize(request)
            dry_run = bool(request.params.get("dryRun"))
            async with self._lock:
                result = await self._write(request, dry_run=dry_run)
            if dry_run and request.method != kmock.method.GET:
                status = 201 if request.action == kmock.action.CREATE else 200
                self._trim_logs()
                return aiohttp.web.json_response(result, status=status)
        try:
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        finally:
            self._trim_logs()

    async def _write(self, request: kmock.Request, *, dry_run: bool = False) -> Any:
        """Store what a write request changes; with ``dry_run``, only return the object as it
        would be stored."""
        assert request.resource is not None  # checked by the caller; for type checkers
        if "protobuf" in _content_type(request):
            raise api_error(415, "UnsupportedMediaType", "the emulator speaks JSON, not protobuf")
        if request.action == kmock.action.CREATE:
            return await self._create(request, request.data, dry_run=dry_run)
        elif request.name is None:
            if request.method == kmock.method.DELETE:
                raise api_error(405, "MethodNotAllowed", "deletecollection is not emulated")
        elif request.action == kmock.action.UPDATE or request.method == kmock.method.PUT:
            return await self._update(request, dry_run=dry_run)
        elif request.action == kmock.action.DELETE:
            return await self._delete(request, dry_run=dry_run)
        return None

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _stamp_new(
        self, resource: kmock.resource, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        """A new object as a real server stores it: identity, versions, no status if isolated."""
        info = self._info(resource)
        if "status" in info.subresources:
            body.pop("status", None)
        body["apiVersion"], body["kind"] = _api_version(resource), info.kind
        meta = body["metadata"]
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        for field in OMITEMPTY_METADATA:
            if meta.get(field) in ([], {}):
                del meta[field]
        if namespace is None:
            meta.pop("namespace", None)
        else:
            meta["namespace"] = namespace
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
            resourceVersion=self._next_revision(),
        )
        return body

    async def _create(
        self, request: kmock.Request, data: Any, *, dry_run: bool = False
    ) -> dict[str, Any]:
        assert request.resource is not None  # for type checkers
        info = self._info(request.resource)
        if request.subresource is not None:
            raise api_error(405, "MethodNotAllowed", "creating subresources is not emulated")
        if not isinstance(data, Mapping) or not isinstance(data.get("metadata", {}), Mapping):
            raise api_error(400, "BadRequest", "the body must be an object with metadata")
        body = copy.deepcopy(dict(data))
        meta = body.setdefault("metadata", {})
        namespace = None
        if info.namespaced:
            namespace = request.namespace or meta.get("namespace")
            if not namespace:
                raise api_error(400, "BadRequest", "a namespaced object needs a namespace")
            if meta.get("namespace", namespace) != namespace:
                raise api_error(
                    400, "BadRequest", "the namespace of the object does not match the request's"
                )
        if request.name is not None:  # server-side apply to a missing object's own URL
            if meta.get("name", request.name) != request.name:
                raise api_error(400, "BadRequest", "the name of the object does not match the URL")
            meta["name"] = request.name
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta.get("name")
        if not name:
            raise api_error(422, "Invalid", "metadata.name: Required value", kind=info.kind)
        key = (request.resource, namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            raise api_error(
                409, "AlreadyExists", f'{request.resource.plural} "{name}" already exists'
            )
        body = self._stamp_new(request.resource, namespace, body)
        if dry_run:
            return body
        if key in self._objects:
            self._objects[key].create(body)
        else:
            self._objects[key] = body
        await self._buses[request.resource].put({"type": "ADDED", "object": copy.deepcopy(body)})
        if request.resource == CRD_RESOURCE:
            self.register_crd(body)
        if request.action == kmock.action.CREATE:
            # kmock answers a create from the request's body (the very request object: it
            # matches requests by identity), so the stored name and namespace go into it.
            request.data.clear()
            request.data.update(copy.deepcopy(body))
        return body

    async def _update(self, request: kmock.Request, *, dry_run: bool = False) -> dict[str, Any]:
        assert request.resource is not None and request.name is not None  # for type checkers
        info = self._info(request.resource)
        if request.subresource not in (None, "status") or (
            request.subresource and request.subresource not in info.subresources
        ):
            raise api_error(404, "NotFound", f"no emulated subresource {request.subresource!r}")
        content_type = _content_type(request)
        data = request.data
        if data is None and request.text and content_type == APPLY_PATCH:
            data = yaml.safe_load(request.text)
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            if content_type == APPLY_PATCH and request.subresource is None:
                return await self._create(request, data, dry_run=dry_run)  # apply creates
            raise self._not_found(request.resource, request.name)
        stored = self._objects[key]
        old = copy.deepcopy(stored.raw)
        old_meta = old.setdefault("metadata", {})
        new = self._patched(old, data, content_type, put=request.method == kmock.method.PUT)
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise api_error(422, "Invalid", "the result is not an object with metadata")
        precondition = new.get("metadata", {}).get("resourceVersion")
        if precondition is not None and precondition != old_meta.get("resourceVersion"):
            raise api_error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": '
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
                name=request.name,
                kind=request.resource.plural,
            )
        new = self._isolate_status(old, new, request.subresource, info)
        meta = new.setdefault("metadata", {})
        for field in SYSTEM_METADATA:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        for field in OMITEMPTY_METADATA:
            if meta.get(field) in ([], {}):
                del meta[field]
        new["apiVersion"], new["kind"] = _api_version(request.resource), info.kind
        if new == old:
            return old  # a no-op write: no new version, no event
        if dry_run:
            return new
        if self._generation_part(new, info) != self._generation_part(old, info):
            meta["generation"] = old_meta.get("generation", 0) + 1
        meta["resourceVersion"] = self._next_revision()
        self._record(stored, new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            stored.delete()
            await self._buses[request.resource].put({"type": "DELETED", "object": new})
        else:
            await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
        return new

    @staticmethod
    def _patched(old: dict[str, Any], data: Any, content_type: str, *, put: bool) -> Any:
        """The object a PUT, JSON patch, merge patch or (approximately) an apply would store."""
        if put:
            return copy.deepcopy(data)
        if content_type == JSON_PATCH:
            if not isinstance(data, list):
                raise api_error(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                return jsonpatch.apply_patch(old, data)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise api_error(422, "Invalid", f"the test operation failed: {exc}") from exc
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise api_error(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from exc
        if not isinstance(data, Mapping):
            # What a real server answers to a list sent as a merge patch (a common client bug).
            raise api_error(
                422,
                "Invalid",
                "couldn't get version/kind; json parse error: cannot unmarshal array into an "
                f"object (Content-Type {content_type or 'none'}; a JSON patch needs {JSON_PATCH})",
            )
        return apply_merge_patch(old, data)

    @staticmethod
    def _isolate_status(
        old: dict[str, Any], new: dict[str, Any], subresource: str | None, info: kmock.ResourceInfo
    ) -> dict[str, Any]:
        """The status subresource writes only ``status``; the main resource never does."""
        if "status" not in info.subresources:
            return new
        source, result = (new, copy.deepcopy(old)) if subresource == "status" else (old, new)
        if "status" in source:
            result["status"] = copy.deepcopy(source["status"])
        else:
            result.pop("status", None)
        return result

    @staticmethod
    def _generation_part(obj: Mapping[str, Any], info: kmock.ResourceInfo) -> dict[str, Any]:
        """What ``metadata.generation`` counts changes of."""
        skipped = {"metadata", "status"} if "status" in info.subresources else {"metadata"}
        return {key: value for key, value in obj.items() if key not in skipped}

    async def _delete(self, request: kmock.Request, *, dry_run: bool = False) -> dict[str, Any]:
        assert request.resource is not None  # for type checkers
        self._info(request.resource)
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise self._not_found(request.resource, request.name)
        stored = self._objects[key]
        obj = copy.deepcopy(stored.raw)
        meta = obj.setdefault("metadata", {})
        if dry_run or meta.get("deletionTimestamp"):
            return obj  # already being deleted: waiting for its finalizers
        meta["resourceVersion"] = self._next_revision()
        if meta.get("finalizers"):
            meta.update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            meta["generation"] = meta.get("generation", 0) + 1
            self._record(stored, obj)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj})
        else:
            self._record(stored, obj)
            stored.delete()
            await self._buses[request.resource].put({"type": "DELETED", "object": obj})
        return obj

    @staticmethod
    def _record(stored: kmock.Object, obj: dict[str, Any]) -> None:
        stored.history.append(copy.deepcopy(obj))
        del stored.history[:-OBJECT_HISTORY]

    def _trim_logs(self) -> None:
        """kmock keeps every request and error for test assertions; a demo that runs for hours
        must not grow without bound, so only the latest ones stay."""
        del self._requests[:-REQUEST_LOG]
        for payload in self._payloads:
            del payload._requests[:-REQUEST_LOG]
        if self._errors:
            del self._errors[-1][:-REQUEST_LOG]

    # --- reads ----------------------------------------------------------------------------

    async def _serve_version(self, request: kmock.Request) -> dict[str, Any]:
        """kmock's discovery, with subresources listed as a real server lists them (kubectl
        warns about ambiguous short names otherwise)."""
        assert request.resource is not None  # for type checkers
        answer: dict[str, Any] = await super()._serve_version(request)
        answer["groupVersion"] = _api_version(request.resource)  # kmock says "/v1" for "v1"
        for entry in answer["resources"]:
            if "/" in entry["name"]:
                entry.update(singularName="", shortNames=[], categories=[])
                entry["verbs"] = ["get", "patch", "update"]
        return answer

    def _openapi_prefixes(self) -> dict[str, list[kmock.resource]]:
        prefixes: dict[str, list[kmock.resource]] = {}
        for resource in self.resources:
            prefix = f"apis/{resource.group}" if resource.group else "api"
            prefixes.setdefault(f"{prefix}/{resource.version}", []).append(resource)
        return prefixes

    async def _serve_openapi_index(self) -> dict[str, Any]:
        """kubectl validates what it applies unless the server's OpenAPI (v3) says the server
        validates fields itself. The emulator says so (and validates nothing: see the module
        docstring), so plain ``kubectl apply`` works without ``--validate=false``."""
        paths = {p: {"serverRelativeURL": f"/openapi/v3/{p}"} for p in self._openapi_prefixes()}
        return {"paths": paths}

    async def _serve_openapi_group_version(self, request: kmock.Request) -> dict[str, Any]:
        prefix = request.url.path.removeprefix("/openapi/v3/")
        resources = self._openapi_prefixes().get(prefix)
        if not resources:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        paths = {}
        for resource in resources:
            info = self.resources[resource]
            scope = "/namespaces/{namespace}" if info.namespaced else ""
            paths[f"/{prefix}{scope}/{resource.plural}/{{name}}"] = {
                "patch": {
                    "x-kubernetes-group-version-kind": {
                        "group": resource.group,
                        "version": resource.version,
                        "kind": info.kind,
                    },
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                    ],
                    "responses": {},
                }
            }
        info_block = {"title": "Kubernetes (emulated)", "version": "unversioned"}
        return {"openapi": "3.0.0", "info": info_block, "paths": paths}

    async def _serve_fetch(self, request: kmock.Request) -> dict[str, Any]:
        assert request.resource is not None  # for type checkers
        self._info(request.resource)
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key in self._objects and not self._objects[key].deleted:
                return self._objects[key].raw
        raise self._not_found(request.resource, request.name)

    async def _serve_create(self, request: kmock.Request) -> kmock.Response:
        return kmock.Response(status=201, payload=await super()._serve_create(request))

    def _selected(self, request: kmock.Request, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return (
            (request.namespace is None or meta.get("namespace") == request.namespace)
            and (request.name is None or meta.get("name") == request.name)
            and matches_labels(request.params.get("labelSelector", ""), meta.get("labels") or {})
            and matches_fields(request.params.get("fieldSelector", ""), obj)
        )

    def _current(self, request: kmock.Request) -> list[dict[str, Any]]:
        return [
            obj.raw
            for (resource, _, _), obj in self._objects.items()
            if resource == request.resource and not obj.deleted and self._selected(request, obj)
        ]

    def _deleted_since(self, request: kmock.Request, revision: int) -> list[dict[str, Any]]:
        """The last state of each selected object deleted after ``revision`` (its deletion
        is recorded with the revision it took)."""
        last = [
            obj.last.raw
            for (resource, _, _), obj in self._objects.items()
            if resource == request.resource and obj.deleted and not obj.empty
        ]
        return [o for o in last if _revision_of(o) > revision and self._selected(request, o)]

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        assert request.resource is not None  # for type checkers
        info = self._info(request.resource)
        async with self._lock:
            items = self._current(request)
            revision = str(self._revision)
        return {
            "apiVersion": _api_version(request.resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": revision},
            "items": items,
        }

    async def _serve_watch(self, request: kmock.Request) -> kmock.Response:
        """A stream of JSON lines; kubectl refuses kmock's default application/octet-stream."""
        assert request.resource is not None  # for type checkers
        self._info(request.resource)
        headers = {"Content-Type": "application/json"}
        return kmock.Response(headers=headers, payload=self._watch_events(request))

    async def _watch_events(self, request: kmock.Request) -> AsyncIterator[Any]:
        assert request.resource is not None  # for type checkers
        yield b""  # send the headers now: a quiet watch is still a started watch
        since = request.params.get("resourceVersion", "")
        since_revision = int(since) if since.isdigit() else 0
        bus = self._buses[request.resource]
        async with self._lock:  # no write can slip between the snapshot and the mark
            replay = [
                {"type": "ADDED", "object": obj}
                for obj in self._current(request)
                if not since_revision or _revision_of(obj) > since_revision
            ]
            if since_revision:  # and what was deleted since: a lister must forget it
                replay += [
                    {"type": "DELETED", "object": last}
                    for last in self._deleted_since(request, since_revision)
                ]
            replay.sort(key=lambda event: _revision_of(event["object"]))
            mark = await bus.mark()
        try:
            for event in replay:
                yield event
            async for event in bus.stream(since=mark):
                if self._selected(request, event["object"]):
                    yield event
        finally:
            await bus.unmark(mark)


# --- running it -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(
    api: ApiServer | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``api`` (a new :class:`ApiServer` by default) on ``host:port`` (0: a free port) in
    the running event loop; yields the base URL, e.g. ``http://127.0.0.1:43121``."""
    api = ApiServer() if api is None else api
    async with api:  # kmock turns errors into Status answers only while entered
        # handler_cancellation: a watch whose client went away must stop, not wait for events;
        # and watches never end by themselves, so a short grace period at shutdown, then cut.
        server = aiohttp.web.Server(api, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=0.25)
        await runner.setup()
        try:
            site = aiohttp.web.TCPSite(runner, host, port)
            await site.start()
            shown = f"[{host}]" if ":" in host else host  # an IPv6 address, bracketed
            yield f"http://{shown}:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


@contextlib.contextmanager
def serve_in_thread(
    api: ApiServer | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """:func:`serve` in a thread with its own event loop, for synchronous callers (kubectl, the
    ``kubernetes`` client) that would otherwise block the loop serving them; yields the URL."""
    handoff: queue.Queue[Any] = queue.Queue()

    async def run() -> None:
        stop = asyncio.Event()
        try:
            async with serve(api, host=host, port=port) as url:
                handoff.put((url, asyncio.get_running_loop(), stop))
                await stop.wait()
        except Exception as exc:  # reported to the caller, at start or at stop
            handoff.put(exc)

    thread = threading.Thread(target=asyncio.run, args=(run(),), name="apiserver", daemon=True)
    thread.start()
    started = handoff.get(timeout=60)
    if isinstance(started, Exception):
        thread.join()
        raise started
    url, loop, stop = started
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=60)
        if not handoff.empty():
            raise handoff.get()


def write_kubeconfig(url: str, path: Path) -> Path:
    """Write a minimal kubeconfig for ``url`` (no credentials: the emulator has none) that
    kubectl, the ``kubernetes`` client and kopf accept; returns ``path``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "marl-demo", "cluster": {"server": url}}],
        "users": [{"name": "marl-demo", "user": {}}],
        "contexts": [
            {
                "name": "marl-demo",
                "context": {"cluster": "marl-demo", "user": "marl-demo", "namespace": "default"},
            }
        ],
        "current-context": "marl-demo",
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    api = ApiServer(crd_dir=args.crds)
    if args.nodes_of is not None:
        api.register(kind_nodes(args.nodes_of))
    if args.workload is not None:
        api.register(workload_objects(args.workload))
    async with serve(api, host=args.host, port=args.port) as url:
        if args.kubeconfig is not None:
            write_kubeconfig(url, args.kubeconfig)
        print(url, flush=True)  # the first line of stdout: the kubeconfig is already written
        await stop.wait()


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = argparse.ArgumentParser(
        prog="python -m demo.apiserver",
        description="An emulated Kubernetes API server. Prints its URL as the first line.",
        epilog="Examples:\n"
        "  python -m demo.apiserver --kubeconfig emulated.kubeconfig &\n"
        "  kubectl --kubeconfig emulated.kubeconfig apply -f examples/",
        formatter_class=DocHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): a free port")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for it here")
    parser.add_argument(
        "--crds",
        type=Path,
        default=REPO_CRD_DIR,
        help="the CRD directory (default: the repository's crds/)",
    )
    parser.add_argument(
        "--nodes-of",
        type=Path,
        metavar="KIND_CONFIG",
        help="register the worker Nodes kind creates from this cluster config, Ready (the "
        "operator reads whether an EdgeNode's Kubernetes nodes are Ready)",
    )
    parser.add_argument(
        "--workload",
        type=Path,
        metavar="MANIFEST",
        help="register the Services of this workload manifest and one ready Pod per replica "
        "of its Deployments (the operator routes a service to an edge node while it has a "
        "ready pod there)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m demo.apiserver``: serve until SIGTERM or SIGINT."""
    asyncio.run(_serve_until_signalled(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
