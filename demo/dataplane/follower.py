"""Following the operator's routes: each EdgeService's VirtualService, read from the API
server the way the operator reads it, applied to a :class:`~demo.dataplane.plane.DataPlane`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException
from marl_operator.mesh.istio import IstioWriter
from marl_operator.mesh.model import Manifest, MeshError, MeshNode, MeshRoutes, MeshService

from demo.dataplane.plane import DataPlane

logger = logging.getLogger("demo.dataplane")

ISTIO_GROUP, ISTIO_VERSION, VIRTUAL_SERVICES = "networking.istio.io", "v1", "virtualservices"


def routes_from_virtual_service(
    service: MeshService, nodes: Sequence[MeshNode], obj: Manifest
) -> MeshRoutes:
    """The routes a live VirtualService carries, read the way the operator reads them."""
    return IstioWriter().read(service, nodes, [obj])


class CustomObjects(Protocol):
    """The part of ``kubernetes.client.CustomObjectsApi`` the data plane uses."""

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> Manifest: ...

    def list_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str
    ) -> Manifest: ...

    def list_cluster_custom_object(self, group: str, version: str, plural: str) -> Manifest: ...


class RouteFollower:
    """Reads each EdgeService's VirtualService and applies its weights to the data plane: a
    missing VirtualService means static equal weights, a malformed one is logged and the
    routes in force stay, as does an API server that cannot be reached."""

    def __init__(self, dataplane: DataPlane, api: CustomObjects):
        self.dp = dataplane
        self.api = api
        self._last: dict[str, Any] = {}

    def poll(self) -> None:
        """One read of every service's VirtualService."""
        for name, service in self.dp.services.items():
            if service.provider != "istio":
                self._once(
                    name,
                    ("provider",),
                    f"{name}: mesh provider {service.provider!r} "
                    "is not followed (only istio); equal weights stay",
                )
                continue
            self._follow(name, service)

    def run(self, stop: threading.Event, poll_seconds: float) -> None:
        """Poll every ``poll_seconds`` of wall time until ``stop`` is set."""
        while not stop.wait(poll_seconds):
            try:
                self.poll()
            except Exception:  # a bug here must not stop the data plane serving
                logger.exception("route poll failed")

    def _follow(self, name: str, service: MeshService) -> None:
        try:
            obj = self.api.get_namespaced_custom_object(
                ISTIO_GROUP,
                ISTIO_VERSION,
                service.namespace,
                VIRTUAL_SERVICES,
                service.virtual_service_name,
            )
        except ApiException as exc:
            if exc.status == 404:
                if self._last.get(name) != ("missing",):
                    self.dp.reset_routes(name)
                    logger.info(
                        "no VirtualService: equal weights", extra={"fields": {"service": name}}
                    )
                    self._last[name] = ("missing",)
                return
            self._once(
                name,
                ("api", exc.status),
                f"{name}: reading the VirtualService failed "
                f"({exc.status} {exc.reason}); routes in force stay",
            )
            return
        except Exception as exc:  # the API server unreachable, a timeout
            self._once(
                name,
                ("api", type(exc).__name__),
                f"{name}: the API server did not answer ({exc}); routes in force stay",
            )
            return
        try:
            routes = routes_from_virtual_service(service, self.dp.mesh_nodes, obj)
            key = ("routes", _frozen(routes.by_source), _frozen(routes.default))
            if self._last.get(name) != key:
                self.dp.set_routes(name, routes.by_source, default=routes.default)
                self._last[name] = key
        except (MeshError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self._once(
                name,
                ("malformed", str(exc)),
                f"{name}: VirtualService ignored ({exc}); routes in force stay",
            )

    def _once(self, name: str, key: tuple, message: str) -> None:
        """Log a problem when it starts, not at every poll."""
        key = ("problem", *key)
        if self._last.get(name) != key:
            logger.warning(message)
            self._last[name] = key


def _frozen(table: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, _frozen(v) if isinstance(v, Mapping) else v) for k, v in table.items()))
