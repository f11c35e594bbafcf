"""Run a kopf operator in-process against the emulated API server, and talk to that server.

An operator's handlers are only tested for real when kopf itself drives them: watching, the
finalizers it adds, its patches of status, daemons and deletion. These helpers start kopf in the
running event loop, so a test is plain ``asyncio`` (``asyncio.run`` in a sync test) and never
blocks the loop that serves the emulator when both share it, as with
:func:`demo.apiserver.serve`. No ``time.sleep`` and no synchronous client in such a test.

What kopf needs from the emulator, and gets from :class:`demo.apiserver.ApiServer`: a login
handler (a hand-made registry has none), ``v1/namespaces`` discoverable (else kopf waits
silently), ``clusterwide=True`` (or namespaces), ``standalone=True`` unless a peering object
exists, increasing resourceVersions (its finalizer patches test them) and a 422 for a failed
JSON-patch test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import kopf

T = TypeVar("T")

LOGIN_HANDLER_ID = "emulated-apiserver"


@contextlib.asynccontextmanager
async def running_operator(
    registry: kopf.OperatorRegistry,
    url: str,
    *,
    settings: kopf.OperatorSettings | None = None,
    peering: str | None = None,
    memo: object | None = None,
    startup_timeout: float = 20.0,
    shutdown_timeout: float = 20.0,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run kopf cluster-wide with ``registry`` against the API server at ``url`` until exit.

    Adds a login handler for ``url`` to ``registry`` (so use one registry per operator run): a
    registry made by hand has none, and kopf's own fall-back handlers would read a kubeconfig.
    ``peering=None`` runs standalone; a peering name makes kopf require and use that
    ClusterKopfPeering object, which must exist. Yields kopf's task once kopf reports ready.
    """

    @kopf.on.login(registry=registry, id=LOGIN_HANDLER_ID)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, default_namespace="default")

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings if settings is not None else kopf.OperatorSettings(),
            standalone=peering is None,
            peering_name=peering,
            clusterwide=True,
            memo=memo,
            stop_flag=stop,
            ready_flag=ready,
        ),
        name="kopf operator",
    )
    try:
        waiting = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait(
            {waiting, task}, timeout=startup_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        if task in done:
            task.result()  # raises what stopped kopf
            raise RuntimeError("kopf exited before it was ready")
        if not done:
            raise TimeoutError(f"kopf was not ready within {startup_timeout} s")
        yield task
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):  # then wait_for has cancelled it
            await asyncio.wait_for(task, timeout=shutdown_timeout)


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "the condition",
) -> T:
    """The first truthy result of ``probe()``, polled without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout} s (last: {result!r})")
        await asyncio.sleep(interval)


class ApiError(Exception):
    """An API answer other than 2xx, with its status code and Kubernetes ``Status`` body."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


async def kube(
    url: str,
    method: str,
    path: str,
    body: Mapping[str, Any] | list[Any] | None = None,
    *,
    content_type: str | None = None,
) -> Any:
    """One request to the API server (``body`` as JSON); the answer's JSON, or ApiError.

    PATCH defaults to a merge patch for an object and a JSON patch for a list.
    """
    if content_type is None and method.upper() == "PATCH":
        kind = "json-patch" if isinstance(body, list) else "merge-patch"
        content_type = f"application/{kind}+json"
    headers = {"Content-Type": content_type or "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url + path, json=body, headers=headers) as response,
    ):
        answer = await response.json(content_type=None)
        if response.status >= 400:
            raise ApiError(response.status, answer)
        return answer
