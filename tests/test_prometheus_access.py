"""How the operator reaches a Prometheus that asks who it is, or that a private CA signs.

The bearer token is checked against a loopback server that demands it (Prometheus itself
takes no bearer tokens; an authorising proxy in front of it does): it is sent, re-read when
the file changes, and never repeated into a message. The CA bundle is checked against a real
Prometheus serving https with a certificate from a throw-away CA made by ``openssl``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from marl_operator.__main__ import parse_args
from marl_operator.prometheus import MetricsUnavailable, PrometheusAccess, PrometheusReader

from demo.prometheus import ServerTls, prometheus

READ = {"namespace": "edge", "service": "fn", "host": "fn.edge.svc", "window": "1m"}
HTTPS = ["--prometheus-url", "https://prometheus.monitoring.svc:9091"]
EMPTY_ANSWER = {"status": "success", "data": {"resultType": "vector", "result": []}}


class TokenGate(ThreadingHTTPServer):
    """Answers Prometheus's empty result to requests that carry ``token``, 401 otherwise,
    and keeps the Authorization headers it saw."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: list[str | None] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), GateHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class GateHandler(BaseHTTPRequestHandler):
    server: TokenGate

    def do_GET(self) -> None:
        header = self.headers.get("Authorization")
        self.server.seen.append(header)
        self.server.paths.append(self.path)
        allowed = header == f"Bearer {self.server.token}"
        body = json.dumps(EMPTY_ANSWER).encode() if allowed else b"Unauthorized"
        self.send_response(200 if allowed else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def gate() -> Iterator[TokenGate]:
    server = TokenGate("first-token")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def reader(url: str, **access) -> PrometheusReader:
    return PrometheusReader(url, timeout_s=2, access=PrometheusAccess(**access))


def test_the_token_in_the_file_is_sent_and_a_rotated_one_picked_up(gate, tmp_path):
    token = tmp_path / "token"
    token.write_text("first-token\n")
    running = reader(gate.url, bearer_token_file=str(token))
    assert running.read(**READ).empty
    assert gate.seen[-1] == "Bearer first-token"
    # Rotated under the running reader (the server first): the next query carries the new
    # token, with no new reader, session or restart.
    gate.token = "second-token"
    with pytest.raises(MetricsUnavailable, match="HTTP 401"):
        running.read(**READ)
    token.write_text("second-token")
    assert running.read(**READ).empty and gate.seen[-1] == "Bearer second-token"


def test_every_query_tells_prometheus_the_reader_s_deadline(gate, tmp_path):
    """A query the reader gave up on after its timeout went on being evaluated: Prometheus
    is now told a deadline a little shorter, so a slow query comes back as its error."""
    token = tmp_path / "token"
    token.write_text("first-token")
    assert reader(gate.url, bearer_token_file=str(token)).read(**READ).empty
    queries = [parse_qs(urlsplit(path).query) for path in gate.paths]
    assert queries and all(q["timeout"] == ["1600ms"] for q in queries)  # 0.8 of the reader's


def test_a_url_with_a_trailing_slash_asks_the_api_s_own_path(gate, tmp_path):
    token = tmp_path / "token"
    token.write_text("first-token")
    assert reader(gate.url + "/", bearer_token_file=str(token)).read(**READ).empty
    assert gate.paths and all(path.startswith("/api/v1/query?") for path in gate.paths)


def test_a_query_that_gets_no_answer_is_sent_once():
    """A read timeout is the query's own slowness: sending it again doubles the wait of the
    cycle (and of the workers the policies share) and the load on a Prometheus already slow."""
    accepted: list[socket.socket] = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)

        def accept() -> None:
            while True:
                try:
                    accepted.append(silent.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        start = time.monotonic()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(MetricsUnavailable, match=r"did not answer within 0\.5 s"):
            PrometheusReader(url, timeout_s=0.5).read(**READ)
        took = time.monotonic() - start
    for connection in accepted:
        connection.close()
    assert len(accepted) == 1 and took < 1.0


class AnswerServer(ThreadingHTTPServer):
    """Answers every query with ``body``, ``chunk`` bytes at a time ``pause_s`` apart."""

    def __init__(self, body: bytes, chunk: int, pause_s: float, handler: type) -> None:
        self.body, self.chunk, self.pause_s = body, chunk, pause_s
        self.requests, self.clients = 0, set()
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class AnswerHandler(BaseHTTPRequestHandler):
    server: AnswerServer

    def do_GET(self) -> None:
        self.server.requests += 1
        self.server.clients.add(self.client_address)
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), self.server.chunk):
                self.wfile.write(body[start : start + self.server.chunk])
                self.wfile.flush()
                time.sleep(self.server.pause_s)
        except OSError:
            pass  # the reader hung up

    def log_message(self, *args) -> None:
        pass


class KeepAliveHandler(AnswerHandler):
    protocol_version = "HTTP/1.1"  # as Prometheus answers


@contextlib.contextmanager
def answering(
    body: bytes, chunk: int, pause_s: float = 0.0, handler: type = AnswerHandler
) -> Iterator[AnswerServer]:
    server = AnswerServer(body, chunk, pause_s, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_larger_than_the_bound_is_refused_naming_the_fix():
    """A query matching far more series than a policy needs (an override of
    spec.prometheus.queries without its sum, say) was read whole into the operator's memory,
    which the policies all share."""
    series = [{"metric": {"source_workload": f"fn-{i}"}, "value": [0, "1"]} for i in range(20000)]
    answer = {"status": "success", "data": {"resultType": "vector", "result": series}}
    body = json.dumps(answer).encode()
    assert len(body) > 1 << 20
    with answering(body, chunk=64 << 10) as server:
        bounded = PrometheusReader(server.url, timeout_s=2, max_answer_bytes=1 << 20)
        with pytest.raises(MetricsUnavailable, match=r"answered more than 1 MiB.*queries"):
            bounded.read(**READ)
        roomy = PrometheusReader(server.url, timeout_s=2, max_answer_bytes=2 << 20)
        assert roomy.read(**READ).service == "fn"  # read whole under a higher bound


def test_an_answer_trickling_in_is_given_up_at_the_timeout():
    """requests' timeout bounds each wait for the next bytes, not the answer: a server (or a
    proxy) sending a byte now and then held the read, and a worker the policies share, for as
    long as it pleased."""
    with answering(json.dumps(EMPTY_ANSWER).encode(), chunk=1, pause_s=0.05) as server:
        start = time.monotonic()
        with pytest.raises(MetricsUnavailable, match=r"did not answer within 0\.5 s"):
            PrometheusReader(server.url, timeout_s=0.5).read(**READ)
        took = time.monotonic() - start
    assert took < 1.5


def test_answers_read_under_the_bound_keep_their_connection():
    """Taking the answer in piece by piece must not cost a new connection (a TLS handshake,
    behind an https URL) per query."""
    body = json.dumps(EMPTY_ANSWER).encode()
    with answering(body, chunk=len(body), handler=KeepAliveHandler) as server:
        running = PrometheusReader(server.url, timeout_s=2)
        for _ in range(3):
            running.read(**READ)
    assert server.requests == 3 and len(server.clients) == 1


def test_the_operator_reads_every_policy_s_prometheus_with_its_access(gate, tmp_path):
    from marl_operator.runtime import Runtime

    token = tmp_path / "token"
    token.write_text("first-token")
    access = PrometheusAccess(bearer_token_file=str(token))
    runtime = Runtime(kube=None, prometheus_url=gate.url, prometheus_access=access)
    assert runtime.reader_for(gate.url).read(**READ).empty
    assert gate.seen == ["Bearer first-token"]


def test_without_the_token_the_refusal_is_metrics_unavailable(gate):
    with pytest.raises(MetricsUnavailable, match="HTTP 401") as info:
        reader(gate.url).read(**READ)
    assert gate.seen[-1] is None
    assert "Unauthorized" not in str(info.value)  # the body of a non-Prometheus answer


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "No such file"),
        ("", "is empty"),
        ("two tokens", "more than one token"),
        ("t\u2603ken", "outside ASCII"),  # http.client cannot encode it in a header
    ],
)
def test_an_unusable_token_file_is_named_and_nothing_is_sent(gate, tmp_path, content, words):
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    with pytest.raises(MetricsUnavailable, match=words) as info:
        reader(gate.url, bearer_token_file=str(token)).read(**READ)
    assert str(token) in str(info.value)
    assert not content or content not in str(info.value)
    assert gate.seen == []
    # At start the operator refuses it, naming the option.
    with pytest.raises(SystemExit):
        parse_args([*HTTPS, "--prometheus-bearer-token-file", str(token)])


def test_the_token_file_is_checked_at_start(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--prometheus-bearer-token-file", str(tmp_path / "absent")])
    assert "--prometheus-bearer-token-file" in capsys.readouterr().err
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(SystemExit):
        parse_args(["--prometheus-ca-file", str(tmp_path / "ca.pem")])
    assert "--prometheus-ca-file" in capsys.readouterr().err
    token = str(tmp_path / "token")
    (tmp_path / "token").write_text("secret-value")
    args = parse_args([*HTTPS, "--prometheus-bearer-token-file", token])
    assert args.prometheus_access == PrometheusAccess(bearer_token_file=token)


@pytest.mark.parametrize(
    ("urls", "words"),
    [
        ([], "travel unencrypted to http://prometheus.istio-system.svc:9090"),
        ([*HTTPS, "--allow-prometheus-url", "http://other:9090"], "unencrypted to http://other"),
        (["--prometheus-url", "https://reader:pw@prom:9090"], "carries credentials of its own"),
    ],
)
def test_a_token_that_would_leak_or_be_overridden_is_refused_at_start(
    tmp_path, capsys, urls, words
):
    (tmp_path / "token").write_text("secret-value")
    with pytest.raises(SystemExit):
        parse_args([*urls, "--prometheus-bearer-token-file", str(tmp_path / "token")])
    error = capsys.readouterr().err
    assert "--prometheus-bearer-token-file" in error and words in error
    assert "pw" not in error and "secret-value" not in error


def test_the_token_goes_to_http_only_when_told_to(tmp_path):
    (tmp_path / "token").write_text("secret-value")
    flags = ["--prometheus-bearer-token-file", str(tmp_path / "token")]
    args = parse_args([*flags, "--prometheus-token-over-http"])
    assert args.prometheus_url.startswith("http://") and args.prometheus_access.bearer_token_file


# --- https with a private CA, against a real Prometheus ------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def issue_tls(root: Path, name: str = "test") -> ServerTls:
    """A throw-away CA and a certificate it signs for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: `apt-get install -y openssl`")
    root.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", f"/CN={name}-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign", cwd=root)  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=root)  # fmt: skip
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
            cwd=root)  # fmt: skip
    return ServerTls(cert=root / "server.pem", key=root / "server.key", ca=root / "ca.pem")


@pytest.mark.integration
def test_https_with_a_private_ca_needs_its_bundle(tmp_path):
    tls = issue_tls(tmp_path / "ours")
    stranger = issue_tls(tmp_path / "stranger", name="stranger")
    with prometheus([], tls=tls) as server:
        assert server.url.startswith("https://")
        assert reader(server.url, ca_file=str(tls.ca)).read(**READ).empty
        # The hint names the trust in force: the flag's bundle, or certifi's without it.
        for access, trusted in (({}, "certifi"), ({"ca_file": str(stranger.ca)}, "--prometheus")):
            with pytest.raises(MetricsUnavailable, match="TLS handshake") as info:
                reader(server.url, **access).read(**READ)
            message = str(info.value)
            assert trusted in message and "certificate verify failed" in message
            assert "query=" not in message  # the request's URL holds the whole query
