"""The data plane over HTTP: GET /metrics, GET /truth, POST /degrade, POST /fail, POST /unready
and GET /healthz (what each answers is in ``python -m demo.dataplane --help``)."""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from demo.dataplane.plane import DataPlane

logger = logging.getLogger("demo.dataplane")


def _handler(dp: DataPlane) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "marl-dataplane"

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                self._send(HTTPStatus.OK, dp.metrics_text(), CONTENT_TYPE_LATEST)
            elif path == "/truth":
                try:
                    seconds = int(parse_qs(urlsplit(self.path).query).get("seconds", ["10"])[0])
                    self._json(HTTPStatus.OK, dp.truth(seconds))
                except ValueError as exc:
                    self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain")
            elif path in ("/degrade", "/fail", "/unready"):
                self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST"})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no {path}"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path == "/fail":
                try:
                    node = query["node"][0]
                    dp.fail(node)
                except (KeyError, ValueError) as exc:
                    message = f"{exc}; use POST /fail?node=NODE"
                    self._json(HTTPStatus.BAD_REQUEST, {"error": message})
                    return
                self._json(HTTPStatus.OK, {"node": node, "capacity_rps": dp.capacity()})
                return
            if url.path == "/unready":
                try:
                    node, service = query["node"][0], query["service"][0]
                    dp.unready(node, service)
                except (KeyError, ValueError) as exc:
                    message = f"{exc}; use POST /unready?node=NODE&service=SERVICE"
                    self._json(HTTPStatus.BAD_REQUEST, {"error": message})
                    return
                self._json(HTTPStatus.OK, {"node": node, "service": service})
                return
            if url.path != "/degrade":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no POST {url.path}"})
                return
            try:
                node = query["node"][0]
                factor = float(query["factor"][0])
                dp.degrade(node, factor)
            except (KeyError, ValueError) as exc:
                message = f"{exc}; use POST /degrade?node=NODE&factor=F with 0 < F <= 100"
                self._json(HTTPStatus.BAD_REQUEST, {"error": message})
                return
            self._json(
                HTTPStatus.OK, {"node": node, "factor": factor, "capacity_rps": dp.capacity()}
            )

        def _json(self, status: HTTPStatus, body: Any) -> None:
            self._send(status, (json.dumps(body) + "\n").encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("http " + format % args)

    return Handler


def start_http_server(dp: DataPlane, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve ``dp`` on a daemon thread; ``port`` 0 picks a free port (``server.server_port``).
    Threads, not asyncio: the stepping loop and the route follower block (numpy, the
    kubernetes client), and a scrape must not wait for either."""
    server = ThreadingHTTPServer((host, port), _handler(dp))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
