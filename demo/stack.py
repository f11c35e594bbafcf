"""The whole closed loop on one machine: emulated API server, simulated data plane, a real
Prometheus and the real operator process, each started the way a user would start it.

The embedded demo and the closed-loop integration test both run this stack, so what the demo
shows is what the test proves. Every component is a separate process (Prometheus is the
Debian binary), talking over loopback only; logs go to files in the stack's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from demo.cluster import (
    KIND_CONFIG,
    WORKLOAD,
    kubernetes_node,
    kubernetes_nodes_of,
    kubernetes_pod,
    workload_pods,
)
from demo.prometheus import PrometheusServer, find_binary, free_port, prometheus

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DEFAULT_LOAD = {"edge-0": 40.0, "edge-1": 40.0, "edge-2": 40.0}
"""Requests per second at each example edge node: comfortable for the example's capacities
(150, 100, 60) under equal weights, until edge-2 loses half its capacity."""


class StackError(RuntimeError):
    """A component did not start; the message carries the end of its log."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post(url: str, timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@dataclass
class Stack:
    """Handles on the running components."""

    directory: Path
    kubeconfig: Path
    api_url: str = ""
    dataplane_url: str = ""
    operator_url: str = ""
    prometheus: PrometheusServer | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- starting -------------------------------------------------------------------------

    def spawn(self, name: str, args: Sequence[str], first_line: bool = False) -> str:
        """Start ``python -m ...`` as component ``name``; with ``first_line``, wait for and
        return the first line it prints (its address)."""
        log = self.directory / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KUBECONFIG", None)  # every component gets the stack's kubeconfig explicitly
        log.write_bytes(b"")  # this run's log alone
        # Appending: the component and the drain of its stdout below both write to it.
        with log.open("ab") as log_file:  # the child keeps its own copy
            process = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=subprocess.PIPE if first_line else log_file,
                stderr=log_file if first_line else subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.processes[name] = process
        if not first_line or process.stdout is None:
            return ""
        line = process.stdout.readline().decode().strip()
        if not line:
            raise StackError(f"{name} exited before printing its address:\n{_tail(log)}")
        # What it prints later goes to its log: a pipe nobody reads fills and blocks it.
        threading.Thread(target=_drain, args=(process.stdout, log), daemon=True).start()
        return line

    def wait_http(self, name: str, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise StackError(
                    f"{name} exited with code {process.returncode}:\n"
                    f"{_tail(self.directory / f'{name}.log')}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise StackError(f"{name} did not answer {url} in {timeout:g} s")

    def kubectl(self, *args: str) -> str:
        """Run the real kubectl against the emulated API server."""
        binary = shutil.which("kubectl")
        if binary is None:
            raise StackError("kubectl is not installed (the stack applies resources with it)")
        done = subprocess.run(
            [binary, "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise StackError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def apply(self, *files: Path) -> None:
        for path in files:
            self.kubectl("apply", "--server-side", "-f", str(path))

    # -- observing and acting ----------------------------------------------------------------

    def truth(self, seconds: int = 10) -> dict[str, Any]:
        """The data plane's ground truth over the last ``seconds`` (latency, routes)."""
        return get_json(f"{self.dataplane_url}/truth?seconds={seconds}")

    def change(self, change: NodeChange) -> None:
        """Make ``change`` happen: a slowdown in the data plane; a failure there and in the
        cluster, where the node's Kubernetes nodes stop being Ready (as the node controller
        marks a node whose kubelet went silent), or where its pods of the service do (as the
        kubelet marks pods failing their readiness probe)."""
        if change.unready is not None:
            post(f"{self.dataplane_url}/unready?node={change.node}&service={change.unready}")
            not_ready = kubernetes_pod("", "", {}, "False")["status"]
            for name in workload_pods(change.unready, change.node):
                self.kubectl(
                    "patch", "pod", name, "-n", "edge", "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": not_ready}),
                )  # fmt: skip
            return
        if change.factor is not None:
            post(f"{self.dataplane_url}/degrade?node={change.node}&factor={change.factor}")
            return
        post(f"{self.dataplane_url}/fail?node={change.node}")
        not_ready = kubernetes_node("", {}, "Unknown")["status"]
        for name in kubernetes_nodes_of(example_edge_node(change.node)):
            self.kubectl(
                "patch", "node", name, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": not_ready}),
            )  # fmt: skip

    def policy(self, namespace: str = "edge", name: str = "edge-routing") -> dict[str, Any]:
        return json.loads(self.kubectl("get", "routingpolicy", name, "-n", namespace, "-o", "json"))

    def decisions(self, namespace: str = "edge", name: str = "edge-routing") -> dict[str, Any]:
        return get_json(f"{self.operator_url}/api/v1/policies/{namespace}/{name}")

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)


def _drain(stream: IO[bytes], log: Path) -> None:
    """Append what ``stream`` yields to ``log`` until it closes, then close it."""
    with stream, log.open("ab") as out:
        shutil.copyfileobj(stream, out, 4096)


def start_operator(
    stack: Stack, prometheus_url: str, name: str = "operator", options: Sequence[str] = ()
) -> str:
    """Start an operator process (standalone unless ``options`` set up peering); returns
    its HTTP API's URL once ready."""
    port = free_port()
    stack.spawn(
        name,
        [
            "marl_operator",
            "--kubeconfig",
            str(stack.kubeconfig),
            "--prometheus-url",
            prometheus_url,
            "--api-host",
            "127.0.0.1",
            "--api-port",
            str(port),
            # Loopback alone, on this machine: the emulated API server knows no users whose
            # tokens the operator could check (tests/test_chart.py checks the login).
            "--api-auth",
            "none",
            *(options or ["--standalone"]),
        ],
    )
    url = f"http://127.0.0.1:{port}"
    stack.wait_http(name, f"{url}/readyz")
    return url


def load_flag(load: Mapping[str, float] | Mapping[str, Mapping[str, float]]) -> str:
    """The data plane's ``--load`` for ``node -> rps`` (every service) or
    ``service -> node -> rps``."""
    entries = []
    for key, value in load.items():
        if isinstance(value, Mapping):
            entries += [f"{key}/{node}={rps:g}" for node, rps in value.items()]
        else:
            entries.append(f"{key}={value:g}")
    return ",".join(entries)


@dataclass(frozen=True)
class NodeChange:
    """What happens to one edge node part-way through a run: it keeps ``factor`` of its
    capacity; or (``factor`` None) it fails, or only its pods of ``unready`` stop being
    ready."""

    node: str
    factor: float | None = None
    unready: str | None = None  # a service

    def __str__(self) -> str:
        if self.unready is not None:
            return f"{self.node}'s pods of {self.unready} stop being ready"
        if self.factor is None:
            return f"{self.node} fails"
        return f"{self.node} loses {1 - self.factor:.0%} capacity"

    def apply(self, plane: Any) -> None:
        """Make it happen in a data plane (``demo.dataplane.DataPlane``)."""
        if self.unready is not None:
            plane.unready(self.node, self.unready)
        elif self.factor is None:
            plane.fail(self.node)
        else:
            plane.degrade(self.node, self.factor)


def example(file: str) -> list[dict[str, Any]]:
    """The documents of ``examples/<file>``."""
    import yaml

    return [d for d in yaml.safe_load_all((EXAMPLES / file).read_text()) if d]


def example_edge_node(name: str) -> dict[str, Any]:
    """The EdgeNode ``name`` of ``examples/edgenodes.yaml``."""
    return next(d for d in example("edgenodes.yaml") if d["metadata"]["name"] == name)


def static_truths(
    seconds: Sequence[int], change_at: int, change: NodeChange, seed: int = 0
) -> list[tuple[float, float]]:
    """The true p95 of ``fn`` and the share of its requests lost over the 10 s before each of
    the data plane's ``seconds``, had the mesh kept static equal weights: the data plane of
    :func:`running_stack` (resources, load and seed) stepped in-process without an operator,
    ``change`` happening at second ``change_at``. The yardstick the demo and the closed-loop
    test hold the operator against."""
    from demo.dataplane import DataPlane

    plane = DataPlane(
        example("edgenodes.yaml"), example("edgeservice.yaml"), DEFAULT_LOAD, seed=seed
    )
    out, changed = [], False
    for second in sorted(seconds):
        if not changed and change_at <= second:
            plane.run(change_at - plane.seconds)
            change.apply(plane)
            changed = True
        plane.run(second - plane.seconds)
        out.append((plane.p95_ms("fn", 10), plane.lost_fraction("fn", 10)))
    return out


@contextlib.contextmanager
def running_stack(
    load: Mapping[str, float] | Mapping[str, Mapping[str, float]] = DEFAULT_LOAD,
    seed: int = 0,
    directory: Path | None = None,
    operator: bool = True,
    services: Sequence[Path] = (),
    work: Mapping[str, float] | None = None,
) -> Iterator[Stack]:
    """Start everything (the operator unless ``operator`` is False), yield, stop everything.

    The EdgeNodes and the EdgeService of ``examples/`` are applied, and the EdgeServices in
    ``services`` besides (the data plane serves the services it finds when it starts, each
    request of one costing ``work[service]``, default 1); the RoutingPolicy is left to the
    caller (``stack.apply(EXAMPLES / "policy.yaml")``), as a user would apply it."""
    find_binary()  # before anything starts: nothing to stop if Prometheus is missing
    with contextlib.ExitStack() as cleanup:
        if directory is None:
            directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="marl-")))
        directory.mkdir(parents=True, exist_ok=True)
        stack = Stack(directory=directory, kubeconfig=directory / "kubeconfig")
        cleanup.callback(stack.stop_all)
        # kind's workers, Ready, and the workload's pods on them, ready
        nodes = ["--nodes-of", str(KIND_CONFIG), "--workload", str(WORKLOAD)]
        stack.api_url = stack.spawn(
            "apiserver", ["demo.apiserver", "--kubeconfig", str(stack.kubeconfig), *nodes], True
        )
        stack.apply(EXAMPLES / "edgenodes.yaml", EXAMPLES / "edgeservice.yaml", *services)
        costs = ",".join(f"{svc}={units:g}" for svc, units in (work or {}).items())
        line = stack.spawn(
            "dataplane",
            [
                "demo.dataplane",
                "--kubeconfig",
                str(stack.kubeconfig),
                "--namespace",
                "edge",
                "--port",
                "0",
                "--load",
                load_flag(load),
                "--seed",
                str(seed),
                *(["--work", costs] if costs else []),
            ],
            first_line=True,
        )
        port = line.rsplit("port=", 1)[-1]
        stack.dataplane_url = f"http://127.0.0.1:{port}"
        stack.prometheus = cleanup.enter_context(
            prometheus([f"127.0.0.1:{port}"], log=directory / "prometheus.log")
        )
        if operator:
            stack.operator_url = start_operator(stack, stack.prometheus.url)
        yield stack
