"""The operator's read-only HTTP API: probes, its own metrics, and what each policy decided.

Everything it serves comes from the cycle reports (:mod:`marl_operator.report`) the store and
the instruments were given, so the API can never tell a different story from the resource
status, the events or the metrics. It has no mutating endpoint: the resources are the only way
to change what the operator does. Who may read a report is the cluster's RBAC to say
(:mod:`marl_operator.access`): the report tells what the RoutingPolicy's status tells.

The store, the instruments and the readiness check reach the handlers through FastAPI
dependencies (held in ``app.state``), not module globals, so tests and several apps in one
process stay apart, and a test can swap any of them with ``app.dependency_overrides``.

:class:`ApiServer` runs the app with uvicorn on the event loop kopf runs on, without uvicorn's
signal handlers (kopf owns SIGINT and SIGTERM). Start it before ``kopf.operator()``: kopf
cancels, at shutdown, the tasks created after it started::

    server = ApiServer(create_app(store, instruments, ready, access=Access(kube)), "", 8080)
    await server.start()
    try:
        await kopf.operator(...)
    finally:
        await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, Self

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from marl_operator.access import Access, AccessUnavailable, Caller, Permission
from marl_operator.instruments import Instruments
from marl_operator.peering import ReplicaRole, standalone
from marl_operator.report import CycleReport, Outcome, RouteTable
from marl_operator.store import ReportStore
from marl_operator.tls import ServingCertificate

# --- response models -----------------------------------------------------------------------
# They mirror report.py field for field and are only ever built from a CycleReport, which stays
# the one source of truth. ``extra="forbid"`` on the full report makes a field added there and
# not here fail the tests instead of vanishing from the API.


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    reason: str | None = None


class NodeInputsModel(BaseModel):
    """One edge node's readings for one service, as the decision used them."""

    model_config = ConfigDict(extra="forbid")

    offered_rps: float
    incoming_rps: float
    success: float | None
    mean_ms: float | None
    p95_ms: float | None
    capacity_rps: float  # requests of the services' mean work per second
    cpu_ms_per_request: float | None = None  # this service's, at this node, as measured


class ModelAccuracy(BaseModel):
    """Held-out accuracy of the system model (``Accuracy.as_dict``); open to further keys."""

    model_config = ConfigDict(extra="allow")

    nmae: dict[str, float | None] = Field(default_factory=dict)
    r2: dict[str, float | None] = Field(default_factory=dict)
    rows: int | None = None


class Replica(BaseModel):
    """This replica among the operator's: whether it acts, by kopf's peering rule."""

    peering: str | None = Field(description="the kopf peering object; null when standalone")
    priority: int | None
    acting: bool | None = Field(
        description="false: a live peer of higher priority acts and this replica stands by, "
        "with nothing to report; null: the peering object could not be read"
    )
    outranked_by: list[str] = Field(description="the live peers of higher priority")
    error: str | None


class PolicySummary(BaseModel):
    """One line per policy: how its last cycle ended."""

    policy: str = Field(description="namespace/name of the RoutingPolicy")
    outcome: Outcome
    reason: str
    time: float = Field(description="unix seconds when the cycle ended")
    generation: int
    fallback: str | None
    decision_ms: float


class HistoryEntry(BaseModel):
    """One kept cycle, in brief."""

    outcome: Outcome
    time: float
    reason: str


class CheckpointInUse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description='where it was read: "bundled:<name>", "path:<directory>" or '
        '"configMap:<name>/<key>" (in the policy\'s namespace)'
    )
    sha256: str = Field(description="of its policy.pt, as sha256sum prints it")


class ReportModel(BaseModel):
    """A :class:`~marl_operator.report.CycleReport` in full."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(description="namespace/name of the RoutingPolicy")
    time: float = Field(description="unix seconds when the cycle ended")
    generation: int = Field(description="metadata.generation of the spec the cycle ran")
    outcome: Outcome
    reason: str
    weights: RouteTable = Field(description="service -> source -> destination -> weight")
    proposed: RouteTable | None = Field(description="the decision before the guard")
    fallback: str | None
    changed_agents: list[str] = Field(description='agents ("node/service") moved off the base')
    predicted_p95_ms: dict[str, float]
    observed_p95_ms: dict[str, float]
    model: ModelAccuracy | None
    decision_ms: float
    inputs: dict[str, dict[str, NodeInputsModel]] = Field(
        description="service -> node: what this cycle read (empty when it read no metrics)"
    )
    forbidden: str | None = Field(
        description="a call the API server refused (403 Forbidden) in the cycle, on a mesh "
        "object or on a resource the policy is built from, naming the verb, resource and "
        "namespace (or the cluster scope) the operator needs an RBAC rule for",
    )
    checkpoint: CheckpointInUse | None = Field(
        description="the checkpoint the cycle decided with; read when the policy is built "
        "(created, its spec changed, the operator restarted); a held cycle without a policy "
        "names the last one; null when the spec is invalid or none was ever built",
    )
    mesh_objects: dict[str, list[str]] = Field(
        default_factory=dict,
        description="service -> the mesh objects (Kind/name) its routes are written to, and "
        "those they were moved away from (an EdgeService's mesh names changed) until the first "
        "write to the new ones gives them back",
    )
    written: list[str] = Field(
        default_factory=list, description="services whose mesh objects the cycle changed"
    )
    dry_run: bool = Field(
        default=False,
        description="spec.dryRun was set: the cycle wrote nothing, a fallback included",
    )
    silent: dict[str, list[str]] = Field(
        default_factory=dict,
        description="service -> nodes whose clients reported no request in the cycle, counted "
        "as offering none (no clients there, or their proxies not scraped)",
    )
    unmeasured: dict[str, list[str]] = Field(
        default_factory=dict,
        description="service -> nodes that served requests in the cycle without a latency "
        "reported for them (left out of the system model's data)",
    )
    no_upstream: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="service -> node -> requests/s its clients sent that found no ready "
        "endpoint (503, flag UH): a route's subset without ready pods",
    )
    links_over: dict[str, float] = Field(
        default_factory=dict,
        description='"source/server" edge nodes -> the mean latency in ms the source\'s '
        "clients saw from the server in the cycle, below the one-way latency the EdgeNodes "
        "declare for their link (no latency below zero is taken for the server)",
    )
    metrics_read: bool = Field(
        default=True,
        description="whether the cycle asked for the metrics (false: it ended before, held "
        "with every node down, say, or suspended); silent, unmeasured, no_upstream and "
        "unplaced are empty unless it read them",
    )
    unplaced: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="service -> server workload -> requests/s it served in the cycle whose "
        "name ends in no edge node's pod-label value: left out of every node's load, latency "
        "and CPU (name per-node Deployments <name>-<label>)",
    )
    query_problems: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="service -> query -> what its answer in the cycle did wrong, so that its "
        "series were ignored (labels dropped, negative values, percent for a share, several "
        "series for one key): fix the template in spec.prometheus.queries",
    )
    catch_all: dict[str, dict[str, int]] | None = Field(
        default=None,
        description="service -> weights of the rule for clients on no edge node, as the "
        "mesh carries them after the cycle; null when the cycle did not read the mesh",
    )
    failures: int | None = Field(
        default=None,
        description="cycles in a row without a usable decision; the fallback is written when "
        "it reaches safety.failureThreshold (null: not known to this cycle)",
    )
    down: dict[str, str] | None = Field(
        default=None,
        description="edge node -> why it is down (none of its Kubernetes nodes exists and is "
        "Ready): no route goes to it; null when the cycle did not read the nodes",
    )
    liveness_unknown: str | None = Field(
        default=None,
        description="why the cycle could not read whether the edge nodes are up (every node "
        "was counted up)",
    )
    unserved: dict[str, dict[str, str]] | None = Field(
        default=None,
        description="service -> edge node that is up but has no ready pod of the service -> "
        "why: no route of that service goes to it; null when the cycle did not read the pods",
    )
    pods_unknown: dict[str, str] | None = Field(
        default=None,
        description="service -> why its pods could not be read (what was last read of them "
        "holds; never read, every node that is up was counted serving it)",
    )

    @classmethod
    def of(cls, report: CycleReport, **extra: Any) -> Self:
        """Built from ``report.as_dict()``, the same JSON the status and events use."""
        return cls.model_validate({**report.as_dict(), **extra})


class PolicyDetail(ReportModel):
    """The latest report plus the kept history."""

    history: list[HistoryEntry] = Field(description="kept cycles, oldest first, latest last")


# --- dependencies --------------------------------------------------------------------------


def get_store(request: Request) -> ReportStore:
    return request.app.state.store


def get_instruments(request: Request) -> Instruments:
    return request.app.state.instruments


async def get_ready(request: Request) -> Callable[[], bool]:
    # Async, as the probes are: a sync dependency would wait for a thread of the pool.
    return request.app.state.ready


def token_hint(audience: str) -> str:
    """How to get a token this API takes."""
    made_for = f" --audience {audience}" if audience else ""
    return f"Authorization: Bearer $(kubectl create token NAME -n NAMESPACE{made_for})"


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="marl-operator"'}


def unavailable(error: AccessUnavailable) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=f"the caller cannot be checked now, so nothing is served: {error}",
        headers={"Retry-After": "10"},
    )


def get_caller(request: Request) -> Caller | None:
    """Who sent the request, as the API server says (None: the API is open, see
    :func:`create_app`); 401 without a token it accepts. Sync, as the review may wait on
    the API server: FastAPI runs it in its thread pool, never on the event loop."""
    access: Access | None = request.app.state.access
    if access is None:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        detail = (
            "send a bearer token of a user or service account the Kubernetes API server "
            f"knows: {token_hint(access.audience)}"
        )
        raise HTTPException(status_code=401, detail=detail, headers=CHALLENGE)
    try:
        caller = access.caller(token)
    except AccessUnavailable as error:
        raise unavailable(error) from None
    if caller is None:
        made_for = f"made for the audience {access.audience}, " if access.audience else ""
        detail = (
            f"the Kubernetes API server does not accept this token {made_for}(expired, "
            f"revoked, or for another audience); send a new one: {token_hint(access.audience)}"
        )
        raise HTTPException(status_code=401, detail=detail, headers=CHALLENGE)
    return caller


def allowed(request: Request, caller: Caller | None, permission: Permission) -> bool:
    """Whether ``caller`` may do ``permission`` (always, on an open API)."""
    if caller is None:
        return True
    try:
        return request.app.state.access.allows(caller, permission)
    except AccessUnavailable as error:
        raise unavailable(error) from None


def require(request: Request, caller: Caller | None, permission: Permission) -> None:
    """403, naming the user and what RBAC must grant, unless ``caller`` may ``permission``."""
    if not allowed(request, caller, permission):
        assert caller is not None  # an open API allows everything; for type checkers
        raise HTTPException(
            status_code=403,
            detail=f'user "{caller.user}" may not {permission}: RBAC must grant it '
            "(a Role, or a ClusterRole for every namespace, bound to that user)",
        )


def read_policy(namespace: str, name: str = "") -> Permission:
    """What reading a policy's report amounts to: reading the RoutingPolicy (``list`` in the
    namespace for every policy of it, in every namespace if it is empty)."""
    verb = "get" if name else "list"
    return Permission(verb, "marl.dev", "routingpolicies", namespace, name)


GUARDED: dict[int | str, dict[str, Any]] = {
    401: {"description": "no bearer token, or one the Kubernetes API server does not accept"},
    503: {"description": "the Kubernetes API server could not be asked who the caller is"},
}
"""The answers every ``/api/v1`` endpoint adds where the API has a login."""

READ_METRICS = Permission("get", path="/metrics")
"""What a scrape amounts to where /metrics is protected: the non-resource URL, which the
ClusterRole of kube-prometheus-stack's Prometheus grants."""

StoreDep = Annotated[ReportStore, Depends(get_store)]
InstrumentsDep = Annotated[Instruments, Depends(get_instruments)]
ReadyDep = Annotated[Callable[[], bool], Depends(get_ready)]
CallerDep = Annotated[Caller | None, Depends(get_caller)]

NOT_READY = "the operator has not finished starting, or is shutting down"


def create_app(
    store: ReportStore,
    instruments: Instruments,
    ready: Callable[[], bool],
    replica: Callable[[], ReplicaRole] = standalone,
    access: Access | None = None,
    protect_metrics: bool = False,
) -> FastAPI:
    """The API over ``store`` and ``instruments``; ``ready()`` answers the readiness probe,
    ``replica()`` says whether this replica acts.

    With ``access``, every ``/api/v1`` request needs a bearer token the API server accepts,
    and a policy's report is served only to a caller RBAC lets read the RoutingPolicy; with
    ``protect_metrics`` too, ``/metrics`` only to one allowed :data:`READ_METRICS`. Without
    it the API is open to whoever reaches its port. The probes and ``/openapi.json`` are
    always open. ``/api/v1/replica`` answers any caller the cluster knows: which replica
    acts is no secret, and RBAC has no object it could be read from."""
    if protect_metrics and access is None:
        raise ValueError("protect_metrics checks callers: it needs access")
    app = FastAPI(
        title="marl-operator",
        summary="What the operator's routing policies decided, its probes and its metrics.",
        docs_url=None,  # the pages load scripts from a public CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.store = store
    app.state.instruments = instruments
    app.state.ready = ready
    app.state.access = access

    # Probes are async: they must answer even when the thread pool is busy.
    @app.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
        tags=["probes"],
    )
    async def readyz(ready: ReadyDep, response: Response) -> Readiness:
        if ready():
            return Readiness(status="ready")
        response.status_code = 503
        return Readiness(status="not ready", reason=NOT_READY)

    @app.get("/metrics", response_class=Response, tags=["metrics"])
    def metrics(instruments: InstrumentsDep, request: Request) -> Response:
        if protect_metrics:
            require(request, get_caller(request), READ_METRICS)
        body, content_type = instruments.exposition(request.headers.get("accept"))
        return Response(content=body, media_type=content_type)

    @app.get("/api/v1/replica", response_model=Replica, responses=GUARDED, tags=["replica"])
    def get_replica(_: CallerDep) -> Replica:
        return Replica.model_validate(replica(), from_attributes=True)

    @app.get(
        "/api/v1/policies",
        response_model=list[PolicySummary],
        responses=GUARDED,
        tags=["policies"],
    )
    def list_policies(store: StoreDep, caller: CallerDep, request: Request) -> list[PolicySummary]:
        """The policies of the namespaces whose RoutingPolicies the caller may list: every
        one, asked once, or those of each namespace it may list them in."""
        policies = store.policies()
        namespaces = {policy.split("/", 1)[0] for policy in policies}
        if not allowed(request, caller, read_policy("")):
            namespaces = {ns for ns in namespaces if allowed(request, caller, read_policy(ns))}
        latest = (store.latest(p) for p in policies if p.split("/", 1)[0] in namespaces)
        return [
            PolicySummary.model_validate(report, from_attributes=True)
            for report in latest
            if report is not None  # forgotten between the two reads
        ]

    @app.get(
        "/api/v1/policies/{namespace}/{name}",
        response_model=PolicyDetail,
        responses={
            **GUARDED,
            403: {"description": "RBAC does not let the caller get this RoutingPolicy"},
            404: {"description": "no cycle report for this policy"},
        },
        tags=["policies"],
    )
    def get_policy(
        namespace: str, name: str, store: StoreDep, caller: CallerDep, request: Request
    ) -> PolicyDetail:
        # Checked before the store: a refusal must not tell whether the policy exists.
        require(request, caller, read_policy(namespace, name))
        policy = f"{namespace}/{name}"
        kept = store.history(policy)
        if not kept:
            raise HTTPException(
                status_code=404,
                detail=f"RoutingPolicy {policy} has no cycle report: it does not exist, "
                "or its first cycle has not finished yet",
            )
        history = [HistoryEntry.model_validate(r, from_attributes=True) for r in kept]
        return PolicyDetail.of(kept[-1], history=history)

    return app


# --- serving next to kopf ------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handling: kopf owns the process's signals and stops us itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiUnavailable(RuntimeError):
    """The HTTP API could not listen: the message names the options that move it."""


class ApiServer:
    """uvicorn serving an app as a task on the running event loop (the one kopf runs on), over
    TLS with ``tls`` (its certificate reloaded as it is renewed)."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        *,
        tls: ServingCertificate | None = None,
        access_log: bool = False,
    ) -> None:
        # log_config=None keeps the operator's logging setup; probes make access logs noise.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=access_log,
            ssl_context_factory=(lambda _config, _default: tls.context) if tls else None,
        )
        self._server = _QuietServer(config)
        self._address = f"{host or '*'}:{port}"
        self._tls = tls
        self._task: asyncio.Task[None] | None = None
        self._renewals: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> asyncio.Task[None]:
        """Start serving and return once the socket listens; raise if it cannot."""
        if self._task is not None:
            raise RuntimeError("the HTTP API server was already started")
        self._task = asyncio.create_task(self._serve(), name="marl-operator-http-api")
        async with asyncio.timeout(timeout):
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # raises why it stopped
                    raise RuntimeError(f"the HTTP API on {self._address} stopped while starting")
                await asyncio.sleep(0.01)
        if self._tls is not None:
            self._renewals = asyncio.create_task(
                self._tls.watch(), name="marl-operator-http-api-certificate"
            )
        return self._task

    @property
    def port(self) -> int:
        """The port actually bound (the one asked for, or the one picked for port 0)."""
        if not self._server.started:
            raise RuntimeError("the HTTP API server is not listening")
        return self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let open requests finish for up to ``timeout``, then close them."""
        if self._task is None:
            return
        if self._renewals is not None:
            self._renewals.cancel()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._server.force_exit = True
            await asyncio.wait_for(self._task, timeout)

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit as exc:
            # uvicorn exits the process when it cannot bind; keep that a failure of this
            # task, which start() reports, instead of an exit of the event loop under kopf.
            raise ApiUnavailable(
                f"the HTTP API could not listen on {self._address} (uvicorn's error is logged "
                "above: a port in use, or an address this host does not have); choose another "
                "with --api-port or --api-host"
            ) from exc
