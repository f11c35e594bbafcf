"""The Prometheus reader without a Prometheus: templates render and are refused with the field's
name, query answers become ServiceReadings (NaN, Inf and unlabelled series dropped, nothing
means "no data"), and failures become MetricsUnavailable without the URL's credentials."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import requests
import urllib3
from marl_operator.__main__ import parse_args
from marl_operator.mesh.model import MeshNode, MeshService
from marl_operator.mesh.naming import destination_names
from marl_operator.prometheus import (
    DEFAULT_TEMPLATES,
    TEMPLATE_NAMES,
    MetricsUnavailable,
    PrometheusReader,
    QueryError,
    ServiceReadings,
    Silence,
    _redact_text,
    _template,
    check_templates,
    check_url,
    label_answers,
    redact_url,
    render,
    split_combined,
)
from operator_fakes import example
from prometheus_api_client.exceptions import PrometheusApiClientException

VALUES = {"namespace": "edge", "service": "fn", "host": "fn.edge.svc.cluster.local", "window": "1m"}


def pair(source: str, dest: str, value: Any) -> dict[str, Any]:
    return {
        "metric": {"source_workload": source, "destination_workload": dest},
        "value": [1700000000.0, str(value)],
    }


def workload(dest: str, value: Any) -> dict[str, Any]:
    return {
        "metric": {"destination_workload": dest, "pod": f"{dest}-abc-xyz"},
        "value": [1700000000.0, str(value)],
    }


class FakePrometheus:
    """Answers each query by which template it came from (found by a metric name in it), and
    the combined query of a read part by part. ``queries`` lists the templates' expressions
    asked, ``requests`` the expressions sent."""

    def __init__(self, answers: Mapping[str, list[Any]]) -> None:
        self.answers = answers
        self.queries: list[str] = []
        self.requests: list[str] = []

    def __call__(self, promql: str) -> Sequence[Mapping[str, Any]]:
        self.requests.append(promql)
        parts = split_combined(promql)
        if parts:
            return label_answers({name: self.one(q) for name, q in parts.items()})
        return self.one(promql)

    def one(self, promql: str) -> Sequence[Mapping[str, Any]]:
        self.queries.append(promql)
        if "timestamp(" in promql:
            return self.answers.get("sampleAge", [])
        if promql.startswith("histogram_quantile"):
            return self.answers.get("latencyP95", [])
        if "container_cpu_usage_seconds_total" in promql:
            return self.answers.get("cpuUsage", [])
        if "duration_milliseconds_sum" in promql:
            return self.answers.get("latencyMean", [])
        if 'response_code!~"5.."' in promql:
            return self.answers.get("successRate", [])
        return self.answers.get("requestRate", [])


def read(fake, **kwargs) -> ServiceReadings:
    reader = PrometheusReader("http://prometheus:9090", query=fake)
    return reader.read(**(VALUES | kwargs))


# --- templates --------------------------------------------------------------------------------


def test_every_name_has_a_default_template():
    assert tuple(DEFAULT_TEMPLATES) == TEMPLATE_NAMES


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_defaults_render_without_placeholders_left(name):
    promql = render(name, DEFAULT_TEMPLATES[name], **VALUES)
    for placeholder in ("$namespace", "$service", "$host", "$window", "${"):
        assert placeholder not in promql
    assert ("[1m]" in promql) == (name != "sampleAge")  # an age is read at the instant
    assert 'namespace="edge"' in promql


@pytest.mark.parametrize("name", TEMPLATE_NAMES[:4])
def test_istio_defaults_take_the_client_side_view_of_the_service(name):
    promql = render(name, DEFAULT_TEMPLATES[name], **VALUES)
    assert 'reporter="source"' in promql
    assert 'destination_service_name=~"fn"' in promql
    assert 'destination_service_namespace="edge"' in promql
    assert "source_workload, destination_workload" in promql
    gateway = render(name, DEFAULT_TEMPLATES[name], **VALUES, destinations="fn-edge-0|fn-edge-1")
    assert 'destination_service_name=~"fn-edge-0|fn-edge-1"' in gateway


def test_the_requests_are_selected_by_the_services_istio_reports_them_under():
    """Istio labels a request with the Service of the cluster it was sent to: the host's
    Service behind a VirtualService, whatever the EdgeService is called; each node's Service
    behind an HTTPRoute, never the EdgeService's own name."""
    nodes = (MeshNode("edge-0"), MeshNode("edge-1", "site-b"))
    istio = MeshService(
        name="checkout", namespace="shop", host="cart.shop.svc.cluster.local", port=80
    )
    assert destination_names(istio, nodes) == ("cart",)
    external = MeshService(name="x", namespace="shop", host="api.example.com", port=80)
    assert destination_names(external, nodes) == ("api",)
    (gateway,) = [MeshService.from_edge_service(s) for s in example("edgeservice-httproute.yaml")]
    assert destination_names(gateway, nodes) == ("fn-gw-edge-0", "fn-gw-edge-1")


def test_render_substitutes_all_five_placeholders_both_spellings():
    template = "$namespace ${service} $host ${window} $window $destinations"
    assert render("requestRate", template, **VALUES) == (
        "edge fn fn.edge.svc.cluster.local 1m 1m fn"  # destinations: the service by default
    )
    assert render("requestRate", "${destinations}", **VALUES, destinations="a|b") == "a|b"


def test_render_keeps_regex_group_references_and_unescapes_dollars():
    promql = render("cpuUsage", DEFAULT_TEMPLATES["cpuUsage"], **VALUES)
    assert '"destination_workload", "$1", "pod"' in promql
    assert 'pod=~"fn-.+"' in promql
    assert (
        render("cpuUsage", 'x{pod=~"$service-.+$$"} "${1}"', **VALUES) == 'x{pod=~"fn-.+$"} "${1}"'
    )


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ('rate(x{a="$cluster"}[$window])', ["unknown placeholder $cluster"]),
        ('rate(x{a="$services"}[1m])', ["unknown placeholder $services"]),
        ('x{pod=~"fn-.+$"}', ["malformed placeholder"]),
        ("x[${window]", ["malformed placeholder"]),
    ],
)
def test_render_refuses_bad_placeholders_naming_the_field(template, words):
    with pytest.raises(QueryError) as info:
        render("latencyP95", template, **VALUES)
    message = str(info.value)
    assert message.startswith("spec.prometheus.queries.latencyP95:")
    assert "$$" in message  # says how to write a literal $
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("window", "1 minute"),
        ("window", ""),
        ("service", 'fn"}'),
        ("namespace", ""),
        ("host", "a\\b"),
        ("host", "fn edge"),
        ("window", "1m] or vector(1"),
        # Prometheus refuses these (zero, units out of order or twice): every query failed,
        # as in an outage, and the fallback moved traffic.
        ("window", "0s"),
        ("window", "00s"),
        ("window", "30m1h"),
        ("window", "1s1s"),
    ],
)
def test_render_refuses_values_that_would_change_the_query(key, value):
    with pytest.raises(ValueError, match=key):
        render("requestRate", DEFAULT_TEMPLATES["requestRate"], **(VALUES | {key: value}))


def test_check_templates_accepts_good_overrides_and_empty_ones():
    check_templates({"requestRate": "sum(rate(x[$window]))", "latencyP95": ""})
    check_templates({})


def test_check_templates_refuses_unknown_names():
    with pytest.raises(QueryError, match=r"spec\.prometheus\.queries\.latency95: unknown query"):
        check_templates({"latency95": "x"})


def test_check_templates_refuses_a_bad_placeholder():
    with pytest.raises(QueryError, match=r"spec\.prometheus\.queries\.cpuUsage: unknown"):
        check_templates({"cpuUsage": 'rate(x{pod=~"$pod"}[$window])'})


def test_read_refuses_bad_overrides_before_querying():
    fake = FakePrometheus({})
    with pytest.raises(QueryError, match="successRate"):
        read(fake, overrides={"successRate": "x{$nope}"})
    assert fake.queries == []


# --- parsing ----------------------------------------------------------------------------------


def full_answers() -> dict[str, list[Any]]:
    return {
        "requestRate": [pair("a", "fn-edge-0", 10), pair("a", "fn-edge-1", 30.5)],
        "successRate": [pair("a", "fn-edge-0", 1), pair("a", "fn-edge-1", 0.9)],
        "latencyMean": [pair("a", "fn-edge-0", 38), pair("a", "fn-edge-1", 12.5)],
        "latencyP95": [pair("a", "fn-edge-0", 175), pair("a", "fn-edge-1", 24)],
        "cpuUsage": [workload("fn-edge-0", 0.25), workload("fn-edge-1", 0.6)],
        "sampleAge": [pair("a", "fn-edge-0", 3), pair("a", "fn-edge-1", 14.5)],
    }


def test_read_runs_six_queries_and_keys_them_by_workload():
    fake = FakePrometheus(full_answers())
    readings = read(fake)
    assert len(fake.queries) == 6
    assert readings.service == "fn"
    assert readings.rate == {("a", "fn-edge-0"): 10.0, ("a", "fn-edge-1"): 30.5}
    assert readings.success == {("a", "fn-edge-0"): 1.0, ("a", "fn-edge-1"): 0.9}
    assert readings.mean_ms == {("a", "fn-edge-0"): 38.0, ("a", "fn-edge-1"): 12.5}
    assert readings.p95_ms == {("a", "fn-edge-0"): 175.0, ("a", "fn-edge-1"): 24.0}
    assert readings.cpu_cores == {"fn-edge-0": 0.25, "fn-edge-1": 0.6}
    assert readings.age_s == {("a", "fn-edge-0"): 3.0, ("a", "fn-edge-1"): 14.5}
    assert not readings.empty and readings.problems == {}


def test_fresh_readings_leave_out_the_pairs_whose_samples_stopped():
    readings = read(FakePrometheus(full_answers()))
    assert readings.fresh(14.5) is readings
    fresh = readings.fresh(10)
    for values in (fresh.rate, fresh.success, fresh.mean_ms, fresh.p95_ms, fresh.age_s):
        assert list(values) == [("a", "fn-edge-0")]
    assert fresh.cpu_cores == readings.cpu_cores  # the server's CPU is not a pair's
    assert readings.fresh(1).empty


def test_overrides_replace_only_their_template():
    fake = FakePrometheus(full_answers())
    read(fake, overrides={"requestRate": 'my_rate{ns="$namespace"}', "latencyP95": ""})
    assert 'my_rate{ns="edge"}' in fake.queries
    assert sum(q.startswith("histogram_quantile") for q in fake.queries) == 1


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf"])
def test_nan_and_infinite_values_are_no_data(bad):
    answers = full_answers()
    answers["successRate"] = [pair("a", "fn-edge-0", bad), pair("a", "fn-edge-1", 0.9)]
    answers["latencyP95"] = [pair("a", "fn-edge-0", bad)]
    answers["cpuUsage"] = [workload("fn-edge-0", bad), workload("fn-edge-1", 0.6)]
    readings = read(FakePrometheus(answers))
    assert readings.success == {("a", "fn-edge-1"): 0.9}
    assert readings.p95_ms == {}
    assert readings.cpu_cores == {"fn-edge-1": 0.6}


def test_negative_values_are_no_data_and_named_in_a_warning(caplog):
    """No query of the five can be negative (rates, a ratio, latencies, CPU): a value below
    zero comes from a template's mistake and must not become a load or a latency."""
    answers = full_answers()
    answers["requestRate"] = [pair("a", "fn-edge-0", -10), pair("a", "fn-edge-1", 30.5)]
    answers["latencyMean"] = [pair("a", "fn-edge-0", "-0.5")]
    answers["cpuUsage"] = [workload("fn-edge-0", 0), workload("fn-edge-1", -0.6)]
    with caplog.at_level(logging.WARNING):
        readings = read(FakePrometheus(answers))
    assert readings.rate == {("a", "fn-edge-1"): 30.5}
    assert readings.mean_ms == {}
    assert readings.cpu_cores == {"fn-edge-0": 0.0}  # zero is a reading: an idle workload
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "spec.prometheus.queries.requestRate returned 1 negative values" in warned
    assert "spec.prometheus.queries.cpuUsage returned 1 negative values" in warned


def test_a_success_rate_in_percent_is_no_data_and_said_so():
    """A success rate is a share of the requests: 50 (percent) read as 50 times every
    request served, and one above 1 in any form is a template's mistake."""
    answers = full_answers()
    answers["successRate"] = [pair("a", "fn-edge-0", 50), pair("a", "fn-edge-1", 0.9)]
    readings = read(FakePrometheus(answers))
    assert readings.success == {("a", "fn-edge-1"): 0.9}
    problem = readings.problems["successRate"]
    assert problem.startswith("spec.prometheus.queries.successRate returned 1 values above 1")


def test_series_without_the_grouping_labels_are_dropped():
    answers = full_answers()
    answers["requestRate"] = [
        pair("a", "fn-edge-0", 10),
        {"metric": {"destination_workload": "fn-edge-1"}, "value": [0, "5"]},
        {"metric": {"source_workload": "", "destination_workload": "fn-edge-1"}, "value": [0, "5"]},
        {"metric": {}, "value": [0, "7"]},
    ]
    answers["cpuUsage"] = [{"metric": {"pod": "fn-edge-0-abc-xyz"}, "value": [0, "0.5"]}]
    readings = read(FakePrometheus(answers))
    assert readings.rate == {("a", "fn-edge-0"): 10.0}
    assert readings.cpu_cores == {}
    # A template none of whose series is usable is named, with the fix, for the cycle to say.
    assert readings.problems == {
        "cpuUsage": "spec.prometheus.queries.cpuUsage returned 1 series without the labels "
        "destination_workload; they are ignored (keep those labels in the template)"
    }


def test_unaggregated_rates_add_up_and_ambiguous_latencies_are_dropped():
    answers = full_answers()
    answers["requestRate"] = [pair("a", "fn-edge-0", 4), pair("a", "fn-edge-0", 6)]
    answers["latencyMean"] = [pair("a", "fn-edge-0", 10), pair("a", "fn-edge-0", 90)]
    answers["cpuUsage"] = [workload("fn-edge-0", 0.25), workload("fn-edge-0", 0.5)]  # 2 pods
    readings = read(FakePrometheus(answers))
    assert readings.rate == {("a", "fn-edge-0"): 10.0}
    assert readings.mean_ms == {}
    assert readings.cpu_cores == {"fn-edge-0": 0.75}
    assert readings.problems == {
        "latencyMean": "spec.prometheus.queries.latencyMean returned several series for 1 "
        "keys; they are ignored (aggregate by source_workload, destination_workload)"
    }


def test_a_blank_override_is_the_built_in_template():
    assert _template("requestRate", {"requestRate": "  \n"}) == DEFAULT_TEMPLATES["requestRate"]


def test_a_stale_pair_goes_whatever_it_reported():
    pair_ = ("a", "fn-edge-0")
    only_rate = ServiceReadings("fn", rate={pair_: 1.0}, age_s={pair_: 1e4})
    assert only_rate.fresh(120).rate == {}


def test_no_series_means_empty_not_zero():
    readings = read(FakePrometheus({}))
    assert readings.empty
    assert readings.rate == readings.success == readings.mean_ms == readings.p95_ms == {}
    assert readings.cpu_cores == {}


def test_one_empty_query_leaves_only_its_dict_empty():
    answers = full_answers()
    answers["latencyP95"] = []
    readings = read(FakePrometheus(answers))
    assert readings.p95_ms == {}
    assert len(readings.mean_ms) == 2
    assert not readings.empty


def test_cpu_alone_does_not_make_readings_non_empty():
    readings = read(FakePrometheus({"cpuUsage": [workload("fn-edge-0", 0.3)]}))
    assert readings.empty
    assert readings.cpu_cores == {"fn-edge-0": 0.3}


# --- failures ---------------------------------------------------------------------------------

SECRET_URL = "http://alice:s3cret@prometheus.example:9090"


def failing(exc: Exception):
    def query(promql: str):
        raise exc

    return query


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (requests.ConnectionError(f"cannot reach {SECRET_URL}/api/v1/query"), "unreachable"),
        (requests.ReadTimeout("read timed out"), "did not answer within 2 s"),
        (PrometheusApiClientException("HTTP Status Code 503 (b'alice:s3cret')"), "503"),
        (ValueError("Expecting value: line 1 column 1"), "unreadable"),
        (RecursionError("maximum recursion depth exceeded"), "unreadable"),  # [[[[...
    ],
)
def test_failures_are_metrics_unavailable_without_credentials(exc, words):
    calls = []

    def query(promql: str):
        calls.append(promql)
        raise exc

    reader = PrometheusReader(SECRET_URL, timeout_s=2, query=query)
    with pytest.raises(MetricsUnavailable) as info:
        reader.read(**VALUES)
    message = str(info.value)
    if not isinstance(exc, PrometheusApiClientException):  # asking each alone would not help
        assert len(calls) == 1 and "combining all six" in message
    assert "http://prometheus.example:9090" in message
    assert words in message
    assert "s3cret" not in message
    assert "alice" not in message
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    ("body", "shown", "withheld"),
    [
        (
            b'{"status":"error","errorType":"bad_data","error":"1:5: parse error: unclosed"}',
            "HTTP 400: bad_data: 1:5: parse error: unclosed",
            None,
        ),
        (b'{"internal":"db-password=hunter2"}', "HTTP 400 (not Prometheus's error", "hunter2"),
        (b'{"error":"db-password=hunter2"}', "HTTP 400 (not Prometheus's error", "hunter2"),
        (b"<html>admin console</html>", "HTTP 400 (not Prometheus's error", "admin console"),
        (b"[" * 100_000, "HTTP 400 (not Prometheus's error", "[["),  # deeper than the stack
    ],
)
def test_an_error_answer_shows_prometheus_s_own_error_and_nothing_else(body, shown, withheld):
    """A policy's URL may point at whatever answers it: of an error answer, the condition,
    events and API show Prometheus's own error (how to fix a query) and otherwise the status
    code alone, never the body of some other service."""
    exc = PrometheusApiClientException(f"HTTP Status Code 400 ({body!r})")
    reader = PrometheusReader("http://prometheus:9090", query=failing(exc))
    with pytest.raises(MetricsUnavailable) as info:
        reader.read(**VALUES)
    assert shown in str(info.value)
    assert withheld is None or withheld not in str(info.value)


def test_a_read_is_one_request_and_a_refused_combination_names_the_template():
    answers = {"requestRate": [pair("fn-a", "fn-b", 2.0)], "cpuUsage": [workload("fn-b", 0.5)]}
    fake = FakePrometheus(answers)
    readings = read(fake)
    assert len(fake.requests) == 1 and len(fake.queries) == len(TEMPLATE_NAMES)
    assert readings.rate == {("fn-a", "fn-b"): 2.0} and readings.cpu_cores == {"fn-b": 0.5}

    def refusing(promql: str) -> Sequence[Mapping[str, Any]]:
        if split_combined(promql) or "bad_metric" in promql:
            raise PrometheusApiClientException("HTTP Status Code 400 (bad_data)")
        return fake(promql)

    reader = PrometheusReader("http://prometheus:9090", query=refusing)
    with pytest.raises(MetricsUnavailable, match=r"400.*query latencyMean"):
        reader.read(**VALUES, overrides={"latencyMean": "bad_metric"})


def refused() -> requests.ConnectionError:
    """What the client raises when nothing listens (as urllib3 wraps it)."""
    reason = urllib3.exceptions.NewConnectionError(None, "Connection refused")
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", reason))


@pytest.mark.parametrize("silent", [requests.ConnectTimeout("connect timed out"), refused()])
def test_a_prometheus_that_does_not_answer_is_not_asked_again_by_anyone_for_a_while(silent):
    """Every policy waited out its own timeout on a Prometheus that swallows connections, on
    a few shared workers: a cycle that should move traffic off a failed node waited minutes.
    The readers of one URL now share that it did not answer, and fail at once for a while."""
    now, calls = [100.0], []
    answers = [silent, [], silent]

    def query(promql: str):
        calls.append(promql)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    silence = Silence(hold_s=10.0, clock=lambda: now[0])
    first = PrometheusReader("http://prometheus:9090", timeout_s=2, query=query, silence=silence)
    other = PrometheusReader("http://prometheus:9090", timeout_s=2, query=query, silence=silence)
    with pytest.raises(MetricsUnavailable):
        first.read(**VALUES)
    now[0] += 4
    with pytest.raises(MetricsUnavailable, match=r"4 s ago; not asked again for 6 s") as info:
        other.read(**VALUES)
    assert len(calls) == 1 and info.value.__cause__ is None
    now[0] += 6
    assert other.read(**VALUES).empty and len(calls) == 2  # asked again, and it answered
    with pytest.raises(MetricsUnavailable):
        first.read(**VALUES)  # not held back by the failure before the answer
    assert len(calls) == 3

    now[0] += 10
    answers.extend([PrometheusApiClientException("HTTP Status Code 503 (b'busy')")] * 2)
    for _ in range(2):  # an answer, even an error, is no silence: asked again at once
        with pytest.raises(MetricsUnavailable, match="503"):
            first.read(**VALUES)  # overloaded: not asked each template alone
    assert len(calls) == 5


def test_a_slow_query_holds_back_no_other_reader():
    """A read timeout (urllib3 wraps it in a ConnectionError when retries are off) tripped
    the shared silence: one policy's heavy query override then held every other policy
    reading the same, answering Prometheus."""
    timed_out = requests.ConnectionError(
        urllib3.exceptions.MaxRetryError(
            None, "/api/v1/query", urllib3.exceptions.ReadTimeoutError(None, "/", "timed out")
        )
    )
    silence = Silence()
    slow = PrometheusReader("http://p:9090", timeout_s=2, query=failing(timed_out), silence=silence)
    with pytest.raises(MetricsUnavailable, match="did not answer within 2 s"):
        slow.read(**VALUES)
    with pytest.raises(MetricsUnavailable, match="did not answer within 2 s"):
        PrometheusReader("http://p:9090", timeout_s=2, query=failing(requests.ReadTimeout()),
                         silence=silence).read(**VALUES)  # fmt: skip
    assert silence.recent() is None
    fine = PrometheusReader("http://p:9090", query=lambda promql: [], silence=silence)
    assert fine.read(**VALUES).empty


def test_a_connection_the_server_dropped_silences_nothing():
    """The server took the connection and closed it (a restart, a proxy's reset): another
    query may well be answered, so no other reader is held back."""
    dropped = requests.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    )
    silence = Silence()
    reader = PrometheusReader("http://p:9090", query=failing(dropped), silence=silence)
    with pytest.raises(MetricsUnavailable, match="is unreachable: ProtocolError"):
        reader.read(**VALUES)
    assert silence.recent() is None


def test_the_operator_s_readers_of_one_url_share_its_silence():
    from marl_operator.runtime import Runtime

    runtime = Runtime(kube=None, prometheus_url="http://prometheus:9090")
    one, two = (runtime.reader_for("http://prometheus:9090/") for _ in range(2))
    other = runtime.reader_for("http://thanos:9090")
    assert one is not two and one.silence is two.silence
    assert other.silence is not one.silence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_closed_port_is_metrics_unavailable_through_the_real_client():
    url = f"http://bob:hunter2@127.0.0.1:{free_port()}/"
    reader = PrometheusReader(url, timeout_s=1)
    with pytest.raises(MetricsUnavailable, match="unreachable") as info:
        reader.read(**VALUES)
    assert reader.silence.recent() is not None  # refused as the real client says it
    assert "hunter2" not in str(info.value)
    assert "bob" not in str(info.value)
    assert "127.0.0.1" in str(info.value) and "Connection refused" in str(info.value)
    assert "query=" not in str(info.value)  # the request's URL holds the whole query


def test_a_password_is_removed_from_an_error_text_and_the_user_name_left_alone():
    """The user name ``u`` was replaced too, wherever it occurred: "***nreachable"."""
    url = "http://u:S3cret%2Fpw@127.0.0.1:1"
    text = _redact_text("unreachable: refused for u:S3cret%2Fpw, or S3cret/pw", url)
    assert text == "unreachable: refused for ***, or ***"
    assert _redact_text("token t0k3n refused", "http://t0k3n@prom:9090") == "token *** refused"


def test_credentials_of_any_url_in_an_error_text_are_removed():
    text = _redact_text("redirected to http://bob:pw@other:9090/ by a proxy", "http://prom:9090")
    assert "pw" not in text and "bob" not in text and "other:9090" in text


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("https://u:p@prom.example:9090/prom", "https://prom.example:9090/prom"),
        ("http://token@prom:9090", "http://prom:9090"),
        ("http://prom:9090", "http://prom:9090"),
        # Unencoded '/', '?' or '#' in a password (base64 makes '/') end urlsplit's netloc.
        ("http://marl:Zm9v/YmFy+cXV4@prom:9090/x", "http://prom:9090/x"),
        ("http://marl:pa?ss@prom:9090", "http://prom:9090"),
        ("http://marl:pa#ss@prom:9090", "http://prom:9090"),
        ("http://marl:p@ss@prom:9090", "http://prom:9090"),
        # No scheme: refused, and the refusal quotes the URL without its credentials.
        ("admin:s3cr3t@prometheus:9090", "prometheus:9090"),
        ("prometheus:9090", "prometheus:9090"),
    ],
)
def test_redact_url(url, safe):
    assert redact_url(url) == safe


def test_a_url_without_a_scheme_is_refused_without_its_credentials(capsys):
    url = "admin:s3cr3t@prometheus.monitoring:9090"
    with pytest.raises(ValueError, match="must be an http") as info:
        check_url(url)
    assert "s3cr3t" not in str(info.value) and "prometheus.monitoring:9090" in str(info.value)
    with pytest.raises(SystemExit):
        parse_args(["--prometheus-url", url])
    assert "s3cr3t" not in capsys.readouterr().err


@pytest.mark.parametrize("password", ["Zm9v/YmFy", "pa?ss", "pa#ss"])
def test_a_password_urlsplit_misreads_never_reaches_a_message(password):
    """Such a URL is refused where a policy or the command line names it; a reader built
    on one anyway still keeps the password out of what it says."""
    url = f"http://marl:{password}@127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="percent-encode"):
        check_url(url)
    with pytest.raises(SystemExit):
        parse_args(["--prometheus-url", url])
    with pytest.raises(MetricsUnavailable) as info:
        PrometheusReader(url, timeout_s=1).read(**VALUES)
    assert password not in str(info.value) and "marl" not in str(info.value)


def test_importing_the_reader_does_not_import_pandas_or_matplotlib():
    code = (
        "import sys, marl_operator.prometheus; "
        "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_a_sample_a_little_ahead_of_prometheus_s_clock_is_current():
    """Federated (honor_timestamps) or remote-written samples carry the clock of the
    Prometheus that scraped them: an edge site's clock a second ahead of the one queried
    gives an age below zero. Dropped as a template's sign mistake, the pair counted as one
    whose targets stopped answering scrapes, and every cycle held on it."""
    answers = full_answers()
    answers["sampleAge"] = [pair("a", "fn-edge-0", -1.5), pair("a", "fn-edge-1", 14.5)]
    readings = read(FakePrometheus(answers))
    assert readings.fresh(120).rate == readings.rate
    assert readings.fresh(10).rate == {("a", "fn-edge-0"): 10.0}
    # A clock an hour ahead is no more current than one an hour behind.
    ahead = ServiceReadings("fn", rate={("a", "fn-edge-0"): 1.0}, age_s={("a", "fn-edge-0"): -3600})
    assert ahead.fresh(120).empty
