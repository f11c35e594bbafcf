"""``python -m marl_operator``: the operator process (kopf handlers + the HTTP API).

Examples:
  python -m marl_operator                          # in a cluster: in-cluster config, peering
  python -m marl_operator --kubeconfig ~/.kube/config --standalone --api-port 8080
  python -m marl_operator --kubeconfig ~/.kube/config --standalone --api-auth none  # no login
  python -m marl_operator --api-tls-cert /tls/tls.crt --api-tls-key /tls/tls.key  # HTTPS
  python -m marl_operator --namespace edge --namespace edge-2 --log-format text
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import threading
from pathlib import Path

import kopf
from kubernetes import client
from threadpoolctl import threadpool_limits

from marl_operator import logs
from marl_operator.access import DEFAULT_AUDIENCE, Access
from marl_operator.api import ApiServer, ApiUnavailable, create_app
from marl_operator.handlers import register
from marl_operator.kube import (
    ClusterUnreachable,
    Kube,
    TimedApiClient,
    client_configuration,
    command_line,
)
from marl_operator.peering import PeeringView, standalone
from marl_operator.prometheus import PrometheusAccess, check_url
from marl_operator.runtime import DEFAULT_PROMETHEUS_URL, Runtime
from marl_operator.tls import CertificateError, ServingCertificate

log = logging.getLogger("marl_operator")


PROMETHEUS_URL_ENV = "MARL_PROMETHEUS_URL"
"""Where ``--prometheus-url`` defaults from: a URL carrying credentials can come from a
Secret this way (the chart's ``prometheus.urlSecret``), kept out of the pod's args."""


def prometheus_url(text: str) -> str:
    """``--prometheus-url``, refused at start as a policy's ``spec.prometheus.url`` is."""
    try:
        check_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = command_line(
        "python -m marl_operator",
        __doc__,
        "Run trained routing policies for edge services and write their weights to the "
        "service mesh.",
        namespaces="watch only this namespace",
    )
    parser.add_argument(
        "--standalone", action="store_true", help="no peering: act even if other replicas run"
    )
    parser.add_argument(
        "--peering", default="marl-operator", help="kopf peering object name (default: %(default)s)"
    )
    parser.add_argument(
        "--priority",
        type=int,
        help="peering priority of this replica; the highest acts, the others stand by "
        "(default: a random one, so that replicas of one Deployment never tie)",
    )
    parser.add_argument(
        "--prometheus-url",
        type=prometheus_url,
        default=os.environ.get(PROMETHEUS_URL_ENV) or DEFAULT_PROMETHEUS_URL,
        help=f"Prometheus of policies that set no spec.prometheus.url (default: "
        f"${PROMETHEUS_URL_ENV} if set, else {DEFAULT_PROMETHEUS_URL}; logged and reported "
        "without its credentials)",
    )
    parser.add_argument(
        "--allow-prometheus-url",
        type=prometheus_url,
        action="append",
        default=[],
        metavar="URL",
        help="a further Prometheus a policy's spec.prometheus.url may name (repeatable); "
        "a policy naming any other is Invalid, so that whoever may create a RoutingPolicy "
        "cannot make the operator fetch arbitrary URLs from inside the cluster",
    )
    parser.add_argument(
        "--checkpoint-root",
        type=Path,
        metavar="DIR",
        help="a policy's spec.checkpoint.path must lie under this directory (the chart passes "
        "its checkpoints.mountPath); by default any absolute path",
    )
    parser.add_argument(
        "--allow-query-overrides",
        action="store_true",
        help="run the PromQL a policy's spec.prometheus.queries gives (refused otherwise: it "
        "runs with the operator's Prometheus credentials, so whoever may create a "
        "RoutingPolicy could read any namespace's metrics through its status)",
    )
    parser.add_argument(
        "--prometheus-bearer-token-file",
        metavar="PATH",
        help="send the token in this file as 'Authorization: Bearer' to Prometheus (every URL "
        "above), read again for each query so that a rotated token is picked up; for a "
        "Prometheus behind an authorising proxy, such as the pod's own service-account token",
    )
    parser.add_argument(
        "--prometheus-token-over-http",
        action="store_true",
        help="send the bearer token to http:// URLs too (refused otherwise): only where the "
        "connection is encrypted below HTTP, as by a service mesh's mutual TLS",
    )
    parser.add_argument(
        "--prometheus-ca-file",
        metavar="PATH",
        help="PEM bundle of the CA that signed Prometheus's certificate, for https URLs that "
        "a private CA serves; it replaces, for every URL, the default trust (certifi's bundle "
        "of public CAs, not the system's store)",
    )
    parser.add_argument(
        "--api-host",
        default="127.0.0.1",
        help="address of the HTTP API: loopback unless asked ('' for every address, IPv4 and "
        "IPv6, as the Helm chart runs it in its pod; default: %(default)s)",
    )
    parser.add_argument(
        "--api-auth",
        choices=("kubernetes", "none"),
        default="kubernetes",
        help="who may read the decisions API (/api/v1/...): kubernetes, a caller whose bearer "
        "token the Kubernetes API server accepts, a policy's report only to one RBAC lets get "
        "the RoutingPolicy (asked by TokenReview and SubjectAccessReview, answers kept a "
        "minute); none, whoever reaches the port (default: %(default)s)",
    )
    parser.add_argument(
        "--api-token-audience",
        default=DEFAULT_AUDIENCE,
        metavar="AUDIENCE",
        help="with --api-auth=kubernetes, accept only tokens made for this audience (kubectl "
        "create token NAME --audience AUDIENCE): one overheard on the way to the API, over "
        "plain HTTP, is useless against the API server; '' accepts the API server's own "
        "tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--api-auth-metrics",
        action="store_true",
        help="with --api-auth=kubernetes, serve /metrics too only to a caller allowed to get "
        "the non-resource URL /metrics (as kube-prometheus-stack's Prometheus is); open "
        "otherwise, for a Prometheus that finds the pod by its annotations and sends no token",
    )
    parser.add_argument(
        "--api-port", type=port, default=8080, help="port of the HTTP API (default: %(default)s)"
    )
    parser.add_argument(
        "--api-tls-cert",
        metavar="PATH",
        help="serve the HTTP API over HTTPS (TLS 1.2 or later) with this PEM certificate (then "
        "any intermediates), re-read every 30 s and served from the next connection once it "
        "changed, as when cert-manager renews the Secret it is mounted from; needs "
        "--api-tls-key",
    )
    parser.add_argument(
        "--api-tls-key", metavar="PATH", help="the unencrypted PEM private key of --api-tls-cert"
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="json: one object per line, for a log pipeline; text: for a terminal "
        "(default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logs")
    return parser


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The operator's settings from ``argv``. Prometheus's token and CA files are checked
    now: a mistake there would otherwise show only as every policy's metrics missing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_auth_metrics and args.api_auth != "kubernetes":
        parser.error(
            "--api-auth-metrics checks callers with the API server: it needs --api-auth=kubernetes"
        )
    args.api_tls = None
    if bool(args.api_tls_cert) != bool(args.api_tls_key):
        parser.error("--api-tls-cert and --api-tls-key go together: give both, or neither")
    if args.api_tls_cert:
        try:
            args.api_tls = ServingCertificate(args.api_tls_cert, args.api_tls_key)
        except CertificateError as error:
            parser.error(f"--api-tls-cert/--api-tls-key: {error}")
    args.prometheus_access = PrometheusAccess(
        bearer_token_file=args.prometheus_bearer_token_file, ca_file=args.prometheus_ca_file
    )
    try:
        args.prometheus_access.check(
            (args.prometheus_url, *args.allow_prometheus_url), args.prometheus_token_over_http
        )
    except ValueError as error:
        parser.error(str(error))
    return args


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """The same connection for kopf, re-read at each login so that a refreshed service
    account token is picked up."""
    if configuration.refresh_api_key_hook is not None:
        configuration.refresh_api_key_hook(configuration)
    scheme, token = None, None
    header = (configuration.api_key or {}).get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme.capitalize() if scheme else None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def standby_priority() -> int:
    """A random peering priority: kopf lets every replica act when priorities tie, and the
    replicas of a Deployment cannot be given distinct ones by hand."""
    return secrets.randbelow(2**31 - 1) + 1


class ProcessReadiness:
    """Whether the process is ready, for the readiness probe: once kopf is, until a signal
    tells it to stop.

    kopf's own signal handlers only stop it, and its ready flag is never cleared, so the
    probe answered ready all through a shutdown. Once kopf is ready, this replaces those
    handlers (kopf installs its own as it starts, over any found) with one that marks the
    process as draining, then stops kopf through ``stop`` (its ``stop_flag``). The probe
    says ready only after that: a signal is never left to kopf's handlers once it has."""

    def __init__(self) -> None:
        self.kopf_ready = threading.Event()  # kopf's ready_flag
        self.stop = asyncio.Event()  # kopf's stop_flag
        self._installed = threading.Event()
        self._draining = threading.Event()
        self._task: asyncio.Task | None = None

    def __call__(self) -> bool:
        return self._installed.is_set() and not self._draining.is_set()

    def watch_signals(self) -> None:
        """Take over SIGTERM and SIGINT once kopf is ready (from the running event loop)."""
        if threading.current_thread() is threading.main_thread():
            self._task = asyncio.get_running_loop().create_task(self._install())
        else:  # signals reach only the main thread's loop: kopf's readiness alone
            self._installed = self.kopf_ready

    async def _install(self) -> None:
        while not self.kopf_ready.is_set():  # polled: a waiting thread could outlive the loop
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._drain, signum)
        self._installed.set()

    def _drain(self, signum: int) -> None:
        if not self._draining.is_set():
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        self._draining.set()
        self.stop.set()


async def run(args: argparse.Namespace, configuration: client.Configuration) -> None:
    kube = Kube(TimedApiClient(configuration))
    runtime = Runtime(
        kube,
        prometheus_url=args.prometheus_url,
        allowed_prometheus_urls=tuple(args.allow_prometheus_url),
        prometheus_access=args.prometheus_access,
        allow_query_overrides=args.allow_query_overrides,
        checkpoint_root=args.checkpoint_root,
    )
    registry = kopf.OperatorRegistry()
    register(registry, runtime, login=lambda: connection_info(configuration))
    ready = ProcessReadiness()
    priority = args.priority if args.priority is not None else standby_priority()
    replica = (
        standalone if args.standalone else PeeringView(kube, args.peering, args.namespace, priority)
    )
    access = Access(kube, args.api_token_audience) if args.api_auth == "kubernetes" else None
    app = create_app(
        runtime.store,
        runtime.instruments,
        ready,
        replica,
        access=access,
        protect_metrics=args.api_auth_metrics,
    )
    if args.api_tls is not None:
        runtime.instruments.track_certificate(lambda: args.api_tls.refused is not None)
    api = ApiServer(app, args.api_host, args.api_port, tls=args.api_tls)
    await api.start()  # before kopf starts: it cancels tasks created after it at shutdown
    ready.watch_signals()
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=args.standalone,
            # Naming a peering makes it mandatory in kopf, even next to standalone=True.
            peering_name=None if args.standalone else args.peering,
            priority=priority,
            ready_flag=ready.kopf_ready,
            stop_flag=ready.stop,
        )
    finally:
        await api.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:  # checked before anything starts, as the other settings are
        configuration = client_configuration(args.kubeconfig)
    except ClusterUnreachable as error:
        build_parser().error(str(error))
    # A decision is many tiny matrix products (the policy's forward passes): BLAS threads only
    # add overhead, several times the time per call on a busy two-core node.
    threadpool_limits(limits=1, user_api="blas")
    logs.setup(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    try:
        asyncio.run(run(args, configuration))
    except ApiUnavailable as error:
        build_parser().error(str(error))


if __name__ == "__main__":
    main()
