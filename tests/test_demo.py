"""``python -m demo``, the README's first command, end to end on a short run: it starts the
stack, degrades a node part-way, and ends with a JSON summary and a plot."""

from __future__ import annotations

import json
import math

import pytest

from demo.__main__ import main, share_to

pytestmark = pytest.mark.integration


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
