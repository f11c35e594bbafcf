"""A real Prometheus server for the embedded demo and the tests: started on a free local port
with a throw-away configuration and TSDB, ready when ``/-/ready`` answers, stopped and removed
on exit.

Tests use the real server rather than canned JSON because what the reader must get right
(rate extrapolation, histogram_quantile, label_replace, NaN for 0/0) is Prometheus's own
arithmetic, which a fake would only restate.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

DEBIAN_BINARY = "/usr/bin/prometheus"


class PrometheusError(RuntimeError):
    """Prometheus could not be run: missing, or it failed to start."""


class PrometheusMissing(PrometheusError):
    """No Prometheus binary: the live tests cannot run and must say how to get one."""


def find_binary() -> str:
    """The Prometheus server binary, or PrometheusMissing with the fix."""
    found = shutil.which("prometheus") or (
        DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None
    )
    if found is None:
        raise PrometheusMissing(
            "the Prometheus server binary is not installed (looked for `prometheus` on PATH and "
            f"{DEBIAN_BINARY}); `make test` installs the Debian package `prometheus`, or run "
            "`apt-get install -y prometheus`"
        )
    return found


def free_port() -> int:
    """A port that was free a moment ago (Prometheus must bind it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_yaml(targets: Sequence[str], interval: str = "1s") -> str:
    """One scrape job over ``targets`` (host:port); JSON is YAML, so no YAML writer is needed."""
    quoted = ", ".join(f'"{target}"' for target in targets)
    return (
        f'global: {{scrape_interval: "{interval}", evaluation_interval: "{interval}"}}\n'
        "scrape_configs:\n"
        f'  - {{job_name: "test", scrape_interval: "{interval}", '
        f'scrape_timeout: "{interval}", static_configs: [{{targets: [{quoted}]}}]}}\n'
    )


@dataclass(frozen=True)
class ServerTls:
    """Certificate and key Prometheus serves https with, and the CA bundle that checks them."""

    cert: Path
    key: Path
    ca: Path

    def web_config(self) -> str:
        """Prometheus's ``--web.config.file`` (JSON is YAML)."""
        return json.dumps(
            {"tls_server_config": {"cert_file": str(self.cert), "key_file": str(self.key)}}
        )


@dataclass
class PrometheusServer:
    """A server process on a fixed port and data directory: tests stop it to cause an
    outage and start it again, with its data, to end one."""

    url: str
    command: list[str]
    root: Path
    log: Path
    ready_timeout_s: float = 30.0
    process: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None  # what checks the certificate of an https server

    def start(self) -> None:
        """Start the process and wait until it answers ``/-/ready``."""
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = time.monotonic() + self.ready_timeout_s
        while not _ready(self.url, self.ca_file):
            if self.process.poll() is not None:
                raise PrometheusError(
                    f"Prometheus exited with code {self.process.returncode} before it was "
                    f"ready:\n{_log_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"Prometheus was not ready within {self.ready_timeout_s:g} s:\n"
                    f"{_log_tail(self.log)}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate and reap, killing it if it does not exit within 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _ready(url: str, ca_file: Path | None = None) -> bool:
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def prometheus(
    targets: Sequence[str],
    *,
    interval: str = "1s",
    ready_timeout_s: float = 30.0,
    tls: ServerTls | None = None,
    log: Path | None = None,
) -> Iterator[PrometheusServer]:
    """Run Prometheus scraping ``targets`` for the duration of the ``with`` block; with
    ``tls``, serving https. Its log goes to ``log`` if given (kept beside the other
    components'), else into its scratch folder."""
    binary = find_binary()
    with tempfile.TemporaryDirectory(prefix="prometheus-test-") as tmp:
        root = Path(tmp)
        config = root / "prometheus.yml"
        config.write_text(config_yaml(targets, interval))
        port = free_port()
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        if tls is not None:
            web = root / "web.yml"
            web.write_text(tls.web_config())
            command.append(f"--web.config.file={web}")
        if log is not None:
            log.write_bytes(b"")  # this run's log alone (a restart of the server appends)
        server = PrometheusServer(
            url=f"{'https' if tls else 'http'}://127.0.0.1:{port}",
            command=command,
            root=root,
            log=log or root / "prometheus.log",
            ready_timeout_s=ready_timeout_s,
            ca_file=tls.ca if tls else None,
        )
        try:
            server.start()
            yield server
        finally:
            server.stop()
