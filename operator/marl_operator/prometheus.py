"""Reading the Istio metrics the policies need from Prometheus.

One read of one service asks six named templates (``TEMPLATE_NAMES``) in one instant query:
each template's expression is labelled with its name (``marl_query``) and the six are joined
with ``or`` (:func:`combined`), which halves the operator's CPU per read against six requests
and spares Prometheus five. Should Prometheus refuse the combined expression (an override
that is not an instant vector, say), each template is asked alone, so that the error names the
one at fault.
Each built-in template takes the client-side view (``reporter="source"``), because the latency a
client sees, network and queueing included, is what routing should optimise.

Templates and placeholders
    A RoutingPolicy may override any template by name in ``spec.prometheus.queries``. Only five
    placeholders are substituted: ``$namespace`` (of the Services below and their pods: the
    one the host names, by default the EdgeService's), ``$service`` (the EdgeService's name),
    ``$destinations`` (the Service names Istio reports its requests under, as a regular
    expression: the host's Service for Istio, ``fn-gw-edge-0|fn-gw-edge-1|...`` for the
    Gateway API's per-node Services), ``$host`` and ``$window`` (also written ``${namespace}``
    and so on). ``$$`` is a literal
    ``$``. A ``$`` followed by digits (``$1``, ``${1}``) is left as it is, so that the
    replacement of ``label_replace`` can refer to its regular expression's groups without
    escaping. Any other ``$`` (an unknown name, or a ``$`` ending a regular expression such as
    ``=~"fn-.+$"``) is refused before a query is sent: write ``$$`` there.

What an override must return
    An instant vector. ``requestRate``, ``successRate``, ``latencyMean`` and ``latencyP95``:
    one series per client and server, labelled ``source_workload`` and ``destination_workload``
    (aggregate with ``sum by (source_workload, destination_workload)``). ``cpuUsage``: one series
    per server, labelled ``destination_workload``. ``sampleAge``: one series per client and
    server, the seconds since the newest sample of its counters (what ``staleAfterSeconds`` is
    held against; a pair without one counts as stale, so it must answer for every pair the
    other four do). Series without those labels are
    dropped, as are NaN and infinite values: NaN is what Prometheus answers for 0/0 when a pair
    saw no traffic, so it means "no data", never zero. Negative values are dropped too (none of
    the six can be negative; a warning names the template), but for ``sampleAge``: a sample
    scraped by a Prometheus whose clock is ahead of the one asked (federated with
    ``honor_timestamps``, or remote-written) is younger than zero, and current.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
import urllib3

# The submodule, not the package: prometheus-api-client before 0.7 imported pandas and
# matplotlib (about 50 MB and a second of start-up) in its package __init__ for the DataFrame
# and plotting helpers the operator never uses. From 0.7 the package loads them lazily, and
# naming the submodule keeps this import light whatever the package's __init__ does next.
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

logger = logging.getLogger(__name__)

TEMPLATE_NAMES = (
    "requestRate",
    "successRate",
    "latencyMean",
    "latencyP95",
    "cpuUsage",
    "sampleAge",
)
"""The query templates a read runs, by their names in ``spec.prometheus.queries``."""

PLACEHOLDERS = ("namespace", "service", "destinations", "host", "window")
"""The names a template may use after ``$``."""

PAIR_LABELS = ("source_workload", "destination_workload")
"""Labels that key a per-pair series (client workload, server workload)."""

WORKLOAD_LABELS = ("destination_workload",)
"""Label that keys a per-server series (``cpuUsage``)."""

_ISTIO_SELECTOR = (
    'reporter="source", destination_service_name=~"$destinations", '
    'destination_service_namespace="$namespace"'
)
_BY_PAIR = "sum by (source_workload, destination_workload)"

DEFAULT_TEMPLATES: dict[str, str] = {
    "requestRate": f"{_BY_PAIR} (rate(istio_requests_total{{{_ISTIO_SELECTOR}}}[$window]))",
    # A pair whose every answer was a 5xx has no non-5xx series at all, and dividing nothing
    # gives nothing: "or 0 * total" gives it a zero numerator, so it reads 0, not "no data".
    "successRate": (
        f"({_BY_PAIR} (rate(istio_requests_total{{{_ISTIO_SELECTOR}, "
        'response_code!~"5.."}[$window]))'
        f" or 0 * {_BY_PAIR} (rate(istio_requests_total{{{_ISTIO_SELECTOR}}}[$window])))"
        f" / {_BY_PAIR} (rate(istio_requests_total{{{_ISTIO_SELECTOR}}}[$window]))"
    ),
    "latencyMean": (
        f"{_BY_PAIR} (rate(istio_request_duration_milliseconds_sum{{{_ISTIO_SELECTOR}}}"
        "[$window]))"
        f" / {_BY_PAIR} (rate(istio_request_duration_milliseconds_count{{{_ISTIO_SELECTOR}}}"
        "[$window]))"
    ),
    "latencyP95": (
        "histogram_quantile(0.95, sum by (le, source_workload, destination_workload) "
        f"(rate(istio_request_duration_milliseconds_bucket{{{_ISTIO_SELECTOR}}}[$window])))"
    ),
    # cAdvisor sees pods, not workloads: the per-node server Deployments' pods
    # (fn-edge-1-7d4b9c8f6-x2kq9) are mapped to their workload (fn-edge-1) by dropping the
    # ReplicaSet hash and the pod suffix. The anchored regex drops the pod-level cgroup total
    # (container "") and the pause container ("POD"), which would otherwise count twice, and
    # the Istio sidecar: an EdgeNode's capacity.cpu is what its function uses at capacity,
    # and the sidecar, with CPU of its own, is not what saturates the node.
    "cpuUsage": (
        "label_replace(sum by (pod) (rate(container_cpu_usage_seconds_total{"
        'namespace="$namespace", container!~"|POD|istio-proxy", pod=~"$service-.+"}'
        "[$window])), "
        '"destination_workload", "$1", "pod", "(.+)-[a-z0-9]+-[a-z0-9]+")'
    ),
    # A rate over the window is still answered for a while after its scrapes stopped (a
    # sidecar gone, Prometheus behind): the age of the newest counter sample tells.
    "sampleAge": (
        "time() - max by (source_workload, destination_workload) "
        f"(timestamp(istio_requests_total{{{_ISTIO_SELECTOR}}}))"
    ),
}
"""The built-in PromQL templates (Istio's standard metrics and cAdvisor), one per name."""

QUERY_LABEL = "marl_query"
"""The label that names, in the combined query's answer, the template a series answers."""

_PART = re.compile(
    r'label_replace\((?P<promql>.*?), "' + QUERY_LABEL + r'", "(?P<name>\w+)", "__name__", "\.\*"\)'
    r"(?: or |$)",
    re.S,
)


def combined(queries: Mapping[str, str]) -> str:
    """Every query as one expression, each series labelled with its query's name. The names
    differ, so ``or`` (which drops right-hand series whose labels match a left-hand one) keeps
    every series of every query."""
    return " or ".join(
        f'label_replace({promql}, "{QUERY_LABEL}", "{name}", "__name__", ".*")'
        for name, promql in queries.items()
    )


def split_combined(promql: str) -> dict[str, str]:
    """The queries :func:`combined` joined, by name (empty for any other expression): for
    stand-ins of Prometheus that answer one template at a time."""
    parts = {m.group("name"): m.group("promql") for m in _PART.finditer(promql)}
    return parts if combined(parts) == promql else {}


def label_answers(answers: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """What Prometheus answers to :func:`combined`, given each query's answer by name."""
    return [
        {**item, "metric": {**item.get("metric", {}), QUERY_LABEL: name}}
        for name, items in answers.items()
        for item in items
    ]


def _by_query(result: Any) -> dict[str, list[Any]]:
    """The combined answer's series, by the query they answer (the label removed)."""
    out: dict[str, list[Any]] = {}
    for item in result if isinstance(result, list) else []:
        metric = item.get("metric") if isinstance(item, Mapping) else None
        if not isinstance(metric, Mapping) or QUERY_LABEL not in metric:
            continue
        rest = {k: v for k, v in metric.items() if k != QUERY_LABEL}
        out.setdefault(metric[QUERY_LABEL], []).append({**item, "metric": rest})
    return out


_KEY_LABELS: dict[str, tuple[str, ...]] = {
    "requestRate": PAIR_LABELS,
    "successRate": PAIR_LABELS,
    "latencyMean": PAIR_LABELS,
    "latencyP95": PAIR_LABELS,
    "cpuUsage": WORKLOAD_LABELS,
    "sampleAge": PAIR_LABELS,
}

# Series of these queries add up when a template returns several per key (it forgot to
# aggregate); ratios and latencies do not, so duplicates of those are dropped as ambiguous.
_ADDITIVE = frozenset({"requestRate", "cpuUsage"})

_PLACEHOLDER = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|(?P<group>[0-9]+|\{[0-9]+\})"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}"
    r"|(?P<invalid>))"
)
# Prometheus's own duration: units from the largest down, each at most once.
_DURATION = re.compile(r"^([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$")
# Values land inside PromQL string literals; these characters would end or escape them.
_UNSAFE_VALUE = re.compile(r"[\"'`\\\s]")
# Up to the last '@' of the URL, not the first '/': a password may hold an unencoded '/'
# or '@'.
_USERINFO = re.compile(r"(?<=://)\S*@")


class QueryError(ValueError):
    """A query template the operator cannot use. Permanent: the message names the field,
    ``spec.prometheus.queries.<name>``, and says what to change."""


class MetricsUnavailable(RuntimeError):
    """Prometheus could not be asked or did not answer. Transient as far as the operator knows:
    it keeps the current weights and tries again next interval."""


def _field(name: str) -> str:
    return f"spec.prometheus.queries.{name}"


def _placeholder_help() -> str:
    names = ", ".join(f"${p}" for p in PLACEHOLDERS)
    return f"the placeholders are {names}; write $$ for a literal $"


def _substitute(name: str, template: str, values: Mapping[str, str]) -> str:
    """Substitute, or raise QueryError for the first unusable ``$``. With empty ``values`` it
    only checks, which is how ``check_templates`` validates a template without a service."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped") is not None:
            return "$"
        if match.group("group") is not None:
            return match.group(0)
        key = match.group("named") or match.group("braced")
        if key is None:
            snippet = template[match.start() : match.start() + 12]
            raise QueryError(
                f"{_field(name)}: malformed placeholder at character {match.start()} "
                f"({snippet!r}); {_placeholder_help()}"
            )
        if key not in PLACEHOLDERS:
            raise QueryError(
                f"{_field(name)}: unknown placeholder ${key} at character {match.start()}; "
                f"{_placeholder_help()}"
            )
        return values.get(key, match.group(0))

    return _PLACEHOLDER.sub(replace, template)


def render(
    name: str,
    template: str,
    *,
    namespace: str,
    service: str,
    host: str,
    window: str,
    destinations: str = "",
) -> str:
    """The PromQL for one template and one service.

    The values are checked too, because they are pasted into PromQL string literals and a
    range selector: a quote or backslash would change the query rather than select a series.
    """
    check_window(window)
    values = {
        "namespace": namespace,
        "service": service,
        "destinations": destinations or service,
        "host": host,
        "window": window,
    }
    for key in ("namespace", "service", "destinations", "host"):
        if not values[key] or _UNSAFE_VALUE.search(values[key]):
            raise ValueError(
                f"{key} {values[key]!r} cannot be placed in a PromQL query: it must be non-empty"
                " and free of quotes, backslashes and spaces"
            )
    return _substitute(name, template, values)


def check_templates(overrides: Mapping[str, str]) -> None:
    """Refuse overrides that could never run, before the first read, so that the policy's
    status can point at the field instead of the operator failing every interval."""
    for name, template in overrides.items():
        if name not in TEMPLATE_NAMES:
            known = ", ".join(TEMPLATE_NAMES)
            raise QueryError(f"{_field(name)}: unknown query name; the names are {known}")
        if not isinstance(template, str):
            raise QueryError(f"{_field(name)}: must be a string of PromQL")
        _substitute(name, template, {})


def _template(name: str, overrides: Mapping[str, str] | None) -> str:
    """An empty override means the built-in template, as the CRD documents."""
    override = (overrides or {}).get(name) or ""
    return override if override.strip() else DEFAULT_TEMPLATES[name]


@dataclass(frozen=True)
class ServiceReadings:
    """One service's metrics over one window, keyed by Istio workload names.

    Pairs are (source_workload, destination_workload). A pair missing from a dict had no
    usable series: the caller must treat it as unknown, not as zero.
    """

    service: str
    rate: dict[tuple[str, str], float] = field(default_factory=dict)
    success: dict[tuple[str, str], float] = field(default_factory=dict)
    mean_ms: dict[tuple[str, str], float] = field(default_factory=dict)
    p95_ms: dict[tuple[str, str], float] = field(default_factory=dict)
    cpu_cores: dict[str, float] = field(default_factory=dict)
    age_s: dict[tuple[str, str], float] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    """Template name -> why some of its series were ignored (its field and the fix)."""

    @property
    def empty(self) -> bool:
        """No request-rate series at all. That is "insufficient data" (no traffic in the
        window, or the selectors match nothing), which must never be read as zero load."""
        return not self.rate

    def fresh(self, stale_after_s: float) -> ServiceReadings:
        """These readings without the pairs whose newest sample is older than
        ``stale_after_s``, or has no age: a rate over the window still answers for them, but
        of a past. A pair without an age had its series marked stale (its target stopped
        answering scrapes, so the instant selector of ``sampleAge`` finds nothing). An age
        below zero (a clock ahead of Prometheus's) is current within ``stale_after_s`` too."""
        pairs = set(self.rate) | set(self.success) | set(self.mean_ms) | set(self.p95_ms)
        stale = {pair for pair in pairs if not abs(self.age_s.get(pair, math.inf)) <= stale_after_s}
        if not stale:
            return self

        def kept(values: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
            return {pair: value for pair, value in values.items() if pair not in stale}

        return dataclasses.replace(
            self,
            rate=kept(self.rate),
            success=kept(self.success),
            mean_ms=kept(self.mean_ms),
            p95_ms=kept(self.p95_ms),
            age_s=kept(self.age_s),
        )


def redact_url(url: str) -> str:
    """The URL without ``user:password@``, for messages, logs and conditions. Everything up
    to the last '@' goes, not just what ``urlsplit`` calls the userinfo: an unencoded '/',
    '?' or '#' in a password (base64 makes '/') would end its netloc early and leave the
    password in place. Without a scheme (a URL mistyped, which is refused, naming it) the
    same goes from its start."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def _redact_text(text: str, url: str) -> str:
    """Exception texts may quote the URL or its credentials; remove both forms. The secret
    is the password, or a userinfo without one (a token), as written and percent-decoded;
    a user name is not secret, and replacing it (``u``) wherever it occurred garbled the
    message ("***nreachable")."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    text = _USERINFO.sub("", text)
    secret = userinfo.partition(":")[2] if ":" in userinfo else userinfo
    for form in (userinfo, secret, unquote(secret)):
        if form:
            text = text.replace(form, "***")
    return text


_STATUS_ANSWER = re.compile(r"^HTTP Status Code (?P<code>\d+) \((?P<body>.*)\)$", re.S)


def error_answer(text: str) -> str:
    """What to report of an error answer (the client's ``HTTP Status Code N (b'body')``):
    Prometheus's own error, which says what is wrong with a query, and otherwise the status
    code alone. The body of whatever else answered a policy's URL is never repeated into
    conditions, events and the API."""
    match = _STATUS_ANSWER.match(text)
    if match is None:
        return "an answer that is not HTTP's (body withheld)"
    code, body = match["code"], match["body"]
    try:
        answer = json.loads(ast.literal_eval(body))
    except (ValueError, SyntaxError, TypeError, RecursionError):  # nested past Python's stack
        answer = None
    if (
        isinstance(answer, dict)
        and answer.get("status") == "error"
        and isinstance(answer.get("error"), str)
    ):
        kind = answer.get("errorType")
        return f"HTTP {code}: {f'{kind}: ' if isinstance(kind, str) else ''}{answer['error']}"[:500]
    return f"HTTP {code} (not Prometheus's error format; body withheld)"


def check_window(window: str) -> None:
    """Refuse a rate window that is not a PromQL duration: it is pasted into every range
    selector, where anything else fails every query as an outage would."""
    if not window or not _DURATION.match(window):
        raise ValueError(
            f"spec.prometheus.window: {window!r} is not a PromQL duration such as 30s or 1m "
            "(units from the largest down, each once: 1h30m, not 30m1h)"
        )
    if not re.search("[1-9]", window):
        raise ValueError(f"spec.prometheus.window: {window!r} must be longer than zero")


def check_url(url: str) -> None:
    """Refuse a URL whose credentials ``urlsplit`` (and so the client) would misread: one
    with an unencoded '/', '?' or '#' in its password sends the password as part of the
    path, to the wrong host part."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"must be an http(s) URL, got {redact_url(url)!r}")
    rest = url.partition("://")[2]
    if "@" in rest and rest.rpartition("@")[0] != urlsplit(url).netloc.rpartition("@")[0]:
        raise ValueError(
            "it has an '@' after a '/', '?' or '#': percent-encode those characters in "
            "credentials (%2F, %3F, %23) and any '@' in the path (%40)"
        )


class TokenUnreadable(RuntimeError):
    """The bearer token file could not be read when a query was about to be sent."""


def read_token(path: str) -> str:
    """The token in ``path``, read fresh: a projected service-account token, or a Secret
    updated in place, rotates under a running operator. Messages name the file, never its
    content."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not text"
        raise TokenUnreadable(f"bearer token file {path} cannot be read: {reason}") from None
    if not token:
        raise TokenUnreadable(f"bearer token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise TokenUnreadable(
            f"bearer token file {path} holds more than one token (whitespace or control "
            "characters inside it)"
        )
    if not token.isascii():
        raise TokenUnreadable(f"bearer token file {path} holds characters outside ASCII")
    return token


class BearerTokenFile(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on every request, from a file read each time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {read_token(self.path)}"
        return request


@dataclass(frozen=True)
class PrometheusAccess:
    """How the operator proves itself to Prometheus and checks Prometheus's certificate: one
    setting for every URL it reads (its own and those ``--allow-prometheus-url`` names). Files,
    not values, so that no secret is in the pod's args and a rotated token needs no restart."""

    bearer_token_file: str | None = None
    # PEM bundle of the CA that signed Prometheus's certificate; it replaces, for every URL,
    # the default trust (certifi's bundle, which requests uses, not the system's store).
    ca_file: str | None = None

    def check(self, urls: Sequence[str] = (), token_over_http: bool = False) -> None:
        """Refuse, at start, files that could never work, and a token that ``urls`` (every
        URL the operator may read) would leak or override. ValueError names the setting."""
        if self.bearer_token_file is not None:
            try:
                read_token(self.bearer_token_file)
            except TokenUnreadable as error:
                raise ValueError(f"--prometheus-bearer-token-file: {error}") from None
        self.check_urls(urls, token_over_http)
        if self.ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(
                    f"--prometheus-ca-file: {self.ca_file} is not a readable PEM bundle of CA "
                    f"certificates: {error.strerror or error}"
                ) from None

    def check_urls(self, urls: Sequence[str], token_over_http: bool = False) -> None:
        """The part of :meth:`check` that reads no file (the chart's tests run it on the
        flags it renders)."""
        if self.bearer_token_file is not None:
            for url in urls:
                if urlsplit(url).username is not None:
                    raise ValueError(
                        f"--prometheus-bearer-token-file: {redact_url(url)} carries credentials "
                        "of its own, which the token would replace: use one or the other"
                    )
                if url.startswith("http://") and not token_over_http:
                    raise ValueError(
                        f"--prometheus-bearer-token-file: the token would travel unencrypted to "
                        f"{redact_url(url)}: use an https URL, or --prometheus-token-over-http "
                        "where the connection is encrypted otherwise (a mesh's mutual TLS)"
                    )

    def authorise(self, session: requests.Session) -> requests.Session:
        """``session``, sending the token and trusting the CA this access names."""
        session.verify = self.ca_file or True
        if self.bearer_token_file is not None:
            session.auth = BearerTokenFile(self.bearer_token_file)
        return session


MAX_ANSWER_BYTES = 32 << 20
"""The most of one answer a reader takes in (decompressed). A policy's own query answers a few
hundred bytes per pair of nodes (about 10 MiB for 100 nodes); a query matching every series
of Prometheus (an override without its ``sum by``) would fill the memory every policy
shares."""


class AnswerTooLarge(requests.RequestException):
    """An answer longer than the reader takes in."""


class BoundedSession(requests.Session):
    """A session that takes in an answer whole only up to ``max_bytes`` and within
    ``deadline_s`` of asking. requests' own timeout bounds each wait for the next bytes, not
    the answer: a server, or a proxy, sending a byte now and then held a read, and a worker the
    policies share, for as long as it pleased."""

    def __init__(self, max_bytes: int, deadline_s: float) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.deadline_s = deadline_s

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        response = super().request(method, url, *args, **{**kwargs, "stream": True})
        body = bytearray()
        with response:
            try:
                # read1, not requests' iter_content: that waits for a whole chunk to arrive.
                while chunk := response.raw.read1(64 << 10, decode_content=True):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise AnswerTooLarge(f"more than {self.max_bytes} bytes")
                    if time.monotonic() - start > self.deadline_s:
                        raise requests.ReadTimeout("the answer came too slowly")
            except urllib3.exceptions.HTTPError as error:  # as requests' own reading wraps it
                raise requests.ConnectionError(error) from error
        # Where requests keeps an answer read at once, for .json() and .content.
        response._content = bytes(body)
        return response


def _parse_series(
    name: str, result: Any, labels: tuple[str, ...]
) -> tuple[dict[tuple[str, ...], float], str | None]:
    """Key each usable series by its label values; drop the rest (see the module docstring).
    Also returns what a template did wrong to have series dropped, naming the field and the
    fix (logged too), or None: the cycle that then lacks those values says why."""
    values: dict[tuple[str, ...], float] = {}
    ambiguous: set[tuple[str, ...]] = set()
    unlabelled = negative = over_one = 0
    items = result if isinstance(result, list) else []
    for item in items:
        if not isinstance(item, Mapping):
            unlabelled += 1
            continue
        metric = item.get("metric")
        sample = item.get("value")
        metric = metric if isinstance(metric, Mapping) else {}
        key = tuple(metric.get(label) or "" for label in labels)
        if not all(key):
            unlabelled += 1
            continue
        try:
            value = float(sample[1])
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if not math.isfinite(value):
            continue
        if value < 0:  # rates, ratios, latencies, CPU and ages never are: a template's mistake
            negative += 1
            if name != "sampleAge":  # but an age is, by a clock ahead of Prometheus's
                continue
        if name == "successRate" and value > 1.0 + 1e-9:  # a share: percent, or not divided
            over_one += 1
            continue
        if key in values:
            if name in _ADDITIVE:
                value += values[key]
            else:
                ambiguous.add(key)
        values[key] = value
    for key in ambiguous:
        del values[key]
    problems = []
    if unlabelled and not values and not ambiguous:
        problems.append(
            f"{_field(name)} returned {unlabelled} series without the labels "
            f"{', '.join(labels)}; they are ignored (keep those labels in the template)"
        )
    if negative and name == "sampleAge":
        logger.warning(
            "%s returned %d ages below zero: samples newer than Prometheus's clock (the clock "
            "of the Prometheus that scraped them is ahead, or the template's sign is wrong)",
            _field(name),
            negative,
        )
    elif negative:
        problems.append(
            f"{_field(name)} returned {negative} negative values; they are ignored (check "
            "the template's sign)"
        )
    if over_one:
        problems.append(
            f"{_field(name)} returned {over_one} values above 1; they are ignored (a success "
            "rate is the share of requests served: not in percent, divided by the request rate)"
        )
    if ambiguous:
        problems.append(
            f"{_field(name)} returned several series for {len(ambiguous)} keys; they are "
            f"ignored (aggregate by {', '.join(labels)})"
        )
    for problem in problems:
        logger.warning("%s", problem)
    return values, "; ".join(problems) or None


def _causes(error: requests.RequestException) -> list[Any]:
    """The errors under requests' and urllib3's wrappers (a MaxRetryError's reason...),
    outermost first."""
    chain: list[Any] = []
    reason: Any = error.args[0] if error.args else error
    while reason is not None and len(chain) < 20:
        chain.append(reason)
        inner = getattr(reason, "reason", None)  # urllib3's MaxRetryError and kin
        if not isinstance(inner, BaseException):  # ssl's reason is a string
            inner = None
        if inner is None and isinstance(reason, Exception) and reason.args:
            inner = reason.args[0] if isinstance(reason.args[0], BaseException) else None
        reason = inner
    return chain


def _innermost(error: requests.RequestException) -> Any:
    return _causes(error)[-1]


def _no_connection(error: requests.RequestException) -> bool:
    """Whether no connection was made at all (refused, no route, a name that does not
    resolve), as opposed to one the server took and then dropped or left unanswered."""
    return any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in _causes(error))


def _query_refused(error: BaseException | None) -> bool:
    """Whether Prometheus refused the query itself (400 bad_data, 422 execution), which
    asking each template alone can pin on one; not an overload or its own timeout (503)."""
    if not isinstance(error, PrometheusApiClientException):
        return False
    match = _STATUS_ANSWER.match(str(error))
    return match is not None and match["code"] in ("400", "422")


def _connection_reason(error: requests.RequestException) -> str:
    """The innermost reason a request failed. The outer errors quote the request's URL,
    which holds the whole combined query: kilobytes that say nothing of the failure."""
    reason = _innermost(error)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {reason.verify_message}"
    return f"{type(reason).__name__}: {reason}"


PROMETHEUS_DEADLINE = 0.8
"""The evaluation deadline sent with each query, as a share of the reader's timeout."""


class Silence:
    """That a Prometheus took no connection (refused, unresolved, or none within the
    timeout), shared by every reader of its URL: for ``hold_s`` after, the others fail at once
    instead of each waiting out its timeout (a query that was only slow says nothing of the
    others'). Policies share a few cycle workers, so without it a Prometheus that swallows
    connections holds all of them, and a cycle that should move traffic off a failed node
    waits minutes behind the reads of the others."""

    def __init__(self, hold_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.hold_s = hold_s
        self.clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, str] | None = None  # when, and what happened

    def recent(self) -> str | None:
        """What the last unanswered query met, if within ``hold_s``; else None."""
        with self._lock:
            if self._last is None:
                return None
            ago = self.clock() - self._last[0]
            if ago >= self.hold_s:
                return None
            return f"{self._last[1]} {ago:.0f} s ago; not asked again for {self.hold_s - ago:.0f} s"

    def unanswered(self, reason: str) -> None:
        with self._lock:
            self._last = (self.clock(), reason)

    def answered(self) -> None:
        with self._lock:
            self._last = None


QueryFunction = Callable[[str], Sequence[Mapping[str, Any]]]
"""PromQL in, the ``data.result`` list of an instant query out (PrometheusConnect's shape)."""


class PrometheusReader:
    """Reads one service's metrics with one instant query (six when Prometheus refuses it).

    ``query`` replaces the HTTP client (tests inject a fake); by default it is
    PrometheusConnect.custom_query with the timeout (sent to Prometheus as well, as the query's
    evaluation deadline) and at most one immediate retry of a failed connection, so that a read
    is bounded by about twice the timeout rather than by the library's default of three
    retries with backoff on every 5xx.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        *,
        query: QueryFunction | None = None,
        access: PrometheusAccess | None = None,
        silence: Silence | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.silence = silence or Silence()
        access = access or PrometheusAccess()
        self.ca_file = access.ca_file
        self.max_answer_bytes = max_answer_bytes
        self._query = query or self._connect(url, timeout_s, access, max_answer_bytes)

    @staticmethod
    def _connect(
        url: str, timeout_s: float, access: PrometheusAccess, max_answer_bytes: int
    ) -> QueryFunction:
        retry = Retry(total=1, connect=1, read=0, status=0, other=0, backoff_factor=0)
        session = access.authorise(BoundedSession(max_answer_bytes, timeout_s))
        client = PrometheusConnect(
            url=url.rstrip("/"), timeout=timeout_s, retry=retry, session=session
        )
        # Prometheus goes on evaluating a query its client gave up on unless told its own
        # deadline: a slow server would otherwise pile up every abandoned read. A little
        # shorter than the client's, so that a slow query comes back as Prometheus's error.
        # Prometheus durations are whole numbers of a unit: "1.6s" is refused, "1600ms" not.
        params = {"timeout": f"{round(PROMETHEUS_DEADLINE * timeout_s * 1000)}ms"}
        return lambda promql: client.custom_query(promql, params=params)

    def _fail(self, name: str, reason: str) -> MetricsUnavailable:
        return MetricsUnavailable(
            f"Prometheus at {redact_url(self.url)} {_redact_text(reason, self.url)} (query {name})"
        )

    def _unanswered(self, name: str, reason: str) -> MetricsUnavailable:
        self.silence.unanswered(reason)
        return self._fail(name, reason)

    def _run(self, name: str, promql: str) -> Any:
        if (recent := self.silence.recent()) is not None:
            raise self._fail(name, recent)
        try:
            answer = self._query(promql)
        except TokenUnreadable as exc:
            raise self._fail(name, f"was not asked: the {exc}") from exc
        except requests.ConnectTimeout as exc:
            reason = f"took no connection within {self.timeout_s:g} s"
            raise self._unanswered(name, reason) from exc
        except AnswerTooLarge as exc:
            raise self._fail(
                name,
                f"answered more than {self.max_answer_bytes / (1 << 20):g} MiB: narrow the "
                "policy's spec.prometheus.queries (sum by the labels they name), or split its "
                "nodes between policies",
            ) from exc
        except requests.Timeout as exc:  # this query was slow: another may not be
            raise self._fail(name, f"did not answer within {self.timeout_s:g} s") from exc
        except requests.exceptions.SSLError as exc:
            hint = "--prometheus-ca-file's CA" if self.ca_file else "a CA of certifi's bundle"
            raise self._fail(
                name,
                f"failed the TLS handshake (is its certificate signed by {hint}?): "
                f"{_connection_reason(exc)}",
            ) from exc
        except requests.ConnectionError as exc:
            if isinstance(_innermost(exc), urllib3.exceptions.ReadTimeoutError):
                raise self._fail(name, f"did not answer within {self.timeout_s:g} s") from exc
            reason = f"is unreachable: {_connection_reason(exc)}"
            raise (self._unanswered if _no_connection(exc) else self._fail)(name, reason) from exc
        except PrometheusApiClientException as exc:
            raise self._fail(name, f"answered an error: {error_answer(str(exc))}") from exc
        except (requests.RequestException, ValueError, KeyError, TypeError, RecursionError) as exc:
            # A 200 answer that is not Prometheus's JSON (a proxy's login page, say, or JSON
            # nested deeper than Python's stack).
            raise self._fail(name, f"gave an unreadable answer: {type(exc).__name__}") from exc
        self.silence.answered()
        return answer

    def read(
        self,
        *,
        namespace: str,
        service: str,
        host: str,
        window: str,
        overrides: Mapping[str, str] | None = None,
        destinations: str = "",
    ) -> ServiceReadings:
        """All six templates for one service; QueryError before any is sent if a template is
        unusable, MetricsUnavailable when Prometheus cannot answer (naming the template at
        fault when it refuses one). ``destinations`` is ``$destinations`` (by default
        ``service``)."""
        if overrides:
            check_templates(overrides)
        queries = {
            name: render(
                name,
                _template(name, overrides),
                namespace=namespace,
                service=service,
                host=host,
                window=window,
                destinations=destinations,
            )
            for name in TEMPLATE_NAMES
        }
        try:
            answers = _by_query(self._run("combining all six", combined(queries)))
        except MetricsUnavailable as error:
            if not _query_refused(error.__cause__):
                raise  # unreachable, overloaded, unreadable: asking six times would not help
            answers = {name: self._run(name, promql) for name, promql in queries.items()}
        parsed, problems = {}, {}
        for name in TEMPLATE_NAMES:
            parsed[name], problem = _parse_series(name, answers.get(name, []), _KEY_LABELS[name])
            if problem is not None:
                problems[name] = problem
        pairs = {
            name: {(key[0], key[1]): value for key, value in parsed[name].items()}
            for name in TEMPLATE_NAMES
            if _KEY_LABELS[name] == PAIR_LABELS
        }
        return ServiceReadings(
            service=service,
            rate=pairs["requestRate"],
            success=pairs["successRate"],
            mean_ms=pairs["latencyMean"],
            p95_ms=pairs["latencyP95"],
            cpu_cores={key[0]: value for key, value in parsed["cpuUsage"].items()},
            age_s=pairs["sampleAge"],
            problems=problems,
        )
