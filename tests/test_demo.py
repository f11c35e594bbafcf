"""``python -m demo``, the README's first command, end to end on a short run: it starts the
stack, degrades a node part-way, and ends with a JSON summary and a plot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import demo.__main__ as demo_main
from demo.__main__ import main, share_to

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_share_to_averages_each_sources_percentage():
    routes = {"a": {"a": 80, "b": 20}, "b": {"b": 50, "c": 50}, "c": {}}
    assert share_to(routes, "b") == pytest.approx((20 + 50) / 2)  # "c" routes nothing
    assert math.isnan(share_to({}, "b"))


def test_a_short_demo_degrades_a_node_and_summarises(tmp_path, capsys):
    plot, logs = tmp_path / "demo.png", tmp_path / "logs"
    argv = ["--duration", "45", "--degrade-at", "15", "--every", "5", "--json"]
    assert main([*argv, "--plot", str(plot), "--logs", str(logs)]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["plot"] == str(plot) and plot.stat().st_size > 10_000
    assert summary["p95_ms_before"] > 0 and summary["p95_ms_end"] > 0
    # The same data plane with static equal weights queues on the halved node for seconds.
    assert summary["p95_ms_static_end"] > 10 * summary["p95_ms_end"], summary
    # The degraded node, also the smallest, ends with less than an equal split's third.
    assert 0 <= summary["share_to_degraded_end"] < 100 / 3, summary
    assert "edge-2 loses 50% capacity" in out.out  # the samples, before the summary
    # where to point curl and kubectl while it runs
    assert "operator API: http://127.0.0.1:" in out.out
    assert f"kubeconfig: {logs / 'kubeconfig'}" in out.out
    assert (logs / "operator.log").stat().st_size > 0
    assert (logs / "prometheus.log").is_file()  # every component's log, Prometheus's too


@pytest.mark.parametrize(
    ("change", "said"),
    [("--fail", "edge-1 fails"), ("--unready", "edge-1's pods of fn stop being ready")],
)
def test_a_short_demo_of_a_node_that_cannot_serve_routes_around_it(tmp_path, capsys, change, said):
    """The node goes (its Kubernetes node stops being Ready), or only its pod of fn does (it
    leaves the endpoints and is marked not ready; the node and its clients stay): the
    operator routes nothing there, so nothing is lost, where static equal weights lose a
    third of the requests."""
    plot, logs = tmp_path / "demo.png", tmp_path / "logs"
    argv = ["--duration", "45", "--degrade-at", "12", "--every", "5", "--json", change]
    assert main([*argv, "--node", "edge-1", "--plot", str(plot), "--logs", str(logs)]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert said in out.out
    assert summary["share_to_degraded_end"] == 0, summary
    assert summary["lost_pct_end"] == 0 and summary["lost_pct_static_end"] > 20, summary
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--node", "edge-9"], "invalid choice: 'edge-9'"),
        (["--factor", "0"], "--factor: must be in (0, 1]"),
        (["--factor", "1.5"], "--factor: must be in (0, 1]"),
        (["--factor", "half"], "--factor: expected a number"),
        (["--every", "0"], "--every: must be at least 1"),
        (["--duration", "0"], "--duration: must be at least 1"),
        (["--degrade-at", "-1"], "--degrade-at: must be at least 0"),
        (["--duration", "60", "--degrade-at", "60"], "the node would never degrade"),
        (["--fail", "--unready"], "not allowed with argument"),
    ],
)
def test_options_that_would_fail_minutes_in_are_refused_at_once(argv, message, capsys):
    """Each used to start the stack and then fail at the degrade time (the data plane's HTTP
    400), busy-loop (``--every 0``) or never degrade; now nothing starts."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


class ClockStack:
    """A stack that answers at once and records when each change was made."""

    operator_url, kubeconfig = "http://127.0.0.1:1", "kubeconfig"

    def __init__(self):
        self.start, self.changes = time.monotonic(), []

    def apply(self, *files):
        pass

    def truth(self, seconds=10):
        services = {"fn": {"p95_ms": 10.0, "lost_fraction": 0.0}}
        return {"seconds": int(time.monotonic() - self.start), "services": services, "routes": {}}

    def decisions(self):
        raise OSError("no operator here")

    def change(self, change):
        self.changes.append((time.monotonic() - self.start, str(change)))


def test_the_change_happens_on_time_between_two_samples(tmp_path, monkeypatch):
    """The change waited for the next sample: up to --every late, and never made when that
    sample fell past --duration, though the options were accepted for promising it."""
    stack = ClockStack()
    monkeypatch.setattr(demo_main, "running_stack", lambda **_: contextlib.nullcontext(stack))
    argv = ["--duration", "4", "--degrade-at", "3", "--every", "2", "--json"]
    assert main([*argv, "--plot", str(tmp_path / "p.png"), "--logs", str(tmp_path)]) == 0
    assert [c for _, c in stack.changes] == ["edge-2 loses 50% capacity"]
    assert 3.0 <= stack.changes[0][0] < 4.0, stack.changes  # before the run's end


def test_a_missing_prometheus_is_said_before_anything_starts(tmp_path, monkeypatch, capsys):
    """It was looked for after the API server and the data plane had started, and ended the
    run in a traceback."""
    import demo.stack
    from demo.prometheus import PrometheusMissing

    def missing():
        raise PrometheusMissing("the Prometheus server binary is not installed (...)")

    def spawn(*_args, **_kwargs):
        raise AssertionError("a component was started")

    monkeypatch.setattr(demo.stack, "find_binary", missing)
    monkeypatch.setattr(demo.stack.Stack, "spawn", spawn)
    assert main(["--plot", str(tmp_path / "p.png"), "--logs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("demo: the Prometheus server binary is not installed"), err


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
def test_sigterm_stops_every_component_and_removes_prometheus_data(tmp_path):
    """Python's default SIGTERM ended the demo at once: the API server, the data plane,
    Prometheus and the operator ran on as orphans, and Prometheus's data stayed in /tmp."""
    argv = ["--duration", "300", "--plot", str(tmp_path / "p.png"), "--logs", str(tmp_path)]
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo", *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO)])},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # printed once every component runs
            if line.startswith("operator API:"):
                break
        children = _children(demo.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children]
        data = [a[len(b"--storage.tsdb.path=") :] for c in commands for a in c]
        data = [Path(os.fsdecode(d)) for d in data if d and b"prometheus-test-" in d]
        assert len(children) == 4 and len(data) == 1, (children, commands)
        assert data[0].is_dir()
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert [pid for pid in children if _alive(pid)] == []
    assert not data[0].parent.exists()


def test_a_component_s_log_is_its_own_run_s_and_its_later_output_is_kept(tmp_path, monkeypatch):
    """A component spawned for its first line (its address) appended to the log of an
    earlier run in the same folder, and its stdout pipe was never read again: one that
    went on printing filled it and blocked."""
    from demo.stack import Stack

    (tmp_path / "chatty.py").write_text(
        "import sys\nprint('http://127.0.0.1:1')\n"
        "for i in range(4000): print('x' * 60)\n"  # 240 kB: well past a pipe's buffer
        "print('done', file=sys.stderr)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    (tmp_path / "chatty.log").write_text("a line of the run before\n")
    stack = Stack(directory=tmp_path, kubeconfig=tmp_path / "kubeconfig")
    assert stack.spawn("chatty", ["chatty"], first_line=True) == "http://127.0.0.1:1"
    assert stack.processes["chatty"].wait(timeout=30) == 0  # not blocked on a full pipe

    def printed() -> str:  # stderr's line may fall between two chunks of drained stdout
        return (tmp_path / "chatty.log").read_text().replace("done\n", "", 1)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and printed().count("x" * 60) < 4000:
        time.sleep(0.05)
    log = (tmp_path / "chatty.log").read_text()
    assert "run before" not in log and "done" in log and printed().count("x" * 60) == 4000


@pytest.mark.parametrize("option", ["--plot", "--logs"])
def test_output_folders_that_cannot_be_made_are_refused_at_once(option, tmp_path, capsys):
    """An unusable --plot used to end the run in a traceback after its whole duration,
    taking the --json summary with it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / ("closed-loop.png" if option == "--plot" else "logs")
    with pytest.raises(SystemExit) as exit_:
        main([option, str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{option}: cannot create folder" in err and "Traceback" not in err, err
