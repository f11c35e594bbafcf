"""``python -m marl_operator.drain``: delete every RoutingPolicy and wait until the operator has
let each one go. The chart runs it before an uninstall that takes the CRDs away.

Deleting a policy is what gives the mesh back: the operator restores the user's routes and
removes the objects it made, then drops the policy's finalizer. Deleted with the operator
gone, the CRDs would leave every policy (and so themselves) Terminating for ever, and the
mesh with the last weights written. So this runs while the operator still does.

Examples:
  python -m marl_operator.drain --kubeconfig ~/.kube/config
  python -m marl_operator.drain --namespace edge --namespace edge-2 --timeout 600
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence

import urllib3
from kubernetes.client.rest import ApiException

from marl_operator import logs
from marl_operator.kube import (
    ClusterUnreachable,
    Kube,
    TimedApiClient,
    client_configuration,
    command_line,
)

log = logging.getLogger("marl_operator.drain")

STUCK_HINT = (
    "is the operator running? Its finalizer restores the routes before a policy goes. If the "
    "operator is gone for good, restore the routes by hand and remove the finalizer with "
    "kubectl patch routingpolicy NAME -n NAMESPACE --type merge -p "
    '\'{"metadata":{"finalizers":null}}\''
)
REFUSED_HINT = (
    "this account may not list or delete RoutingPolicies: grant it list and delete on "
    "routingpolicies.marl.dev (the chart does, with rbac.create=true)"
)


class DrainError(RuntimeError):
    """The drain could not do its work at all (refused, or the API never answered)."""


def _transient(error: ApiException) -> bool:
    """Worth another try before the deadline: the API server busy, restarting or slow."""
    status = error.status or 0
    return status in (0, 429) or status >= 500


def drain(
    kube: Kube,
    namespaces: Sequence[str] = (),
    timeout_s: float = 240.0,
    poll_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Delete the RoutingPolicies of ``namespaces`` (none: all) and wait for them to go;
    returns ``namespace/name`` of those still there after ``timeout_s``.

    Every poll deletes what is not being deleted yet (a policy created meanwhile, by a
    GitOps controller say), and an API error worth retrying waits for the next poll: a
    failed drain fails the uninstall. DrainError if the policies could never be listed."""
    deadline = clock() + timeout_s
    left: list[str] | None = None
    last_error: Exception | None = None
    while True:
        try:
            policies = kube.routing_policies(namespaces)
            for key in sorted(key for key, deleting in policies.items() if not deleting):
                log.info("deleting RoutingPolicy %s", key, extra={"fields": {"policy": key}})
                kube.delete_policy(key)
            if sorted(policies) != left:
                log.info("%d RoutingPolicies left", len(policies))
            left = sorted(policies)
        except ApiException as error:
            if error.status in (401, 403):
                raise DrainError(f"{error.status} {error.reason}: {REFUSED_HINT}") from None
            if not _transient(error):
                raise
            last_error = error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            last_error = error
        if last_error is not None:
            log.warning("the API server failed (%s); trying again", last_error)
        if left == [] or clock() >= deadline:
            break
        last_error = None
        sleep(poll_s)
    if left is None:
        raise DrainError(f"could not list the RoutingPolicies before the timeout: {last_error}")
    return left


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = command_line(
        "python -m marl_operator.drain",
        __doc__,
        "Delete every RoutingPolicy and wait until the operator has restored its routes; "
        "exit 1 naming the policies still there at the timeout.",
        namespaces="only this namespace's policies",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=240.0,
        help="seconds to wait for the policies to go (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="(default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_format)
    try:
        configuration = client_configuration(args.kubeconfig)
    except ClusterUnreachable as error:
        build_parser().error(str(error))
    kube = Kube(TimedApiClient(configuration))
    try:
        left = drain(kube, args.namespace, args.timeout)
    except DrainError as error:
        log.error("%s", error)
        return 1
    if left:
        log.error(
            "%d RoutingPolicies still there after %.0f s: %s; %s",
            len(left),
            args.timeout,
            ", ".join(left),
            STUCK_HINT,
            extra={"fields": {"policies": left}},
        )
        return 1
    log.info("every RoutingPolicy is gone and its routes restored")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
