"""``python -m demo``: the operator at work, on this machine, without a cluster.

It starts the emulated API server, the simulated data plane (three edge nodes from
``examples/``), a real Prometheus and the operator; applies ``examples/policy.yaml`` with
kubectl; halves one node's capacity part-way (or, with ``--fail``, takes the node away; with
``--unready``, only its pods of the function, which stop being ready); and
shows, every few seconds, the true p95 latency, the requests lost and the weights the operator
writes. At the end it saves a plot and prints a summary, both beside what the same data plane
does with static equal weights.

Examples:
  python -m demo                                  # 3 minutes, edge-2 loses half at 60 s
  python -m demo --duration 120 --degrade-at 40 --node edge-1 --factor 0.3
  python -m demo --fail --node edge-1             # edge-1 and its Kubernetes node go at 60 s
  python -m demo --unready --node edge-1          # edge-1's pod of fn stops being ready
  python -m demo --json --plot demo.png           # machine-readable summary as the last line
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from demo.prometheus import PrometheusError
from demo.stack import EXAMPLES, NodeChange, StackError, example, running_stack, static_truths
from simulator.cli import (
    json_line,
    make_folder,
    non_negative_int,
    not_a_png,
    parser_from_doc,
    positive_int,
)


def example_nodes() -> list[str]:
    """The EdgeNodes the demo's data plane serves (``examples/edgenodes.yaml``)."""
    return [d["metadata"]["name"] for d in example("edgenodes.yaml") if d["kind"] == "EdgeNode"]


def capacity_left(value: str) -> float:
    """An argparse type for ``--factor``: a share of the node's capacity, refused here rather
    than by the data plane at the degrade time, minutes into the run."""
    try:
        factor = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < factor <= 1:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1], the share of capacity the node keeps; got {value}"
        )
    return factor


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from ``main`` so that its help can be checked without running it."""
    parser = parser_from_doc("python -m demo", __doc__)
    parser.add_argument("--duration", type=positive_int, default=180, help="seconds to run")
    parser.add_argument(
        "--degrade-at",
        type=non_negative_int,
        default=60,
        help="second of the capacity drop, or of the failure (before --duration)",
    )
    parser.add_argument(
        "--node", choices=example_nodes(), default="edge-2", help="edge node that degrades"
    )
    parser.add_argument(
        "--factor", type=capacity_left, default=0.5, help="share of capacity left after it"
    )
    change = parser.add_mutually_exclusive_group()
    change.add_argument(
        "--fail",
        action="store_true",
        help="the node fails instead (--factor unused): its requests are refused, its clients "
        "stop and its Kubernetes node stops being Ready",
    )
    change.add_argument(
        "--unready",
        action="store_true",
        help="only the node's pod of fn stops being ready instead (--factor unused): fn's "
        "requests routed there are refused, the node and its clients go on",
    )
    parser.add_argument("--every", type=positive_int, default=5, help="seconds between two samples")
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("runs/demo/closed-loop.png"),
        help="PNG of the p95 and the weights over time",
    )
    parser.add_argument(
        "--logs", type=Path, default=Path("runs/demo/logs"), help="every component's log"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    return parser


def sample(stack, t: float) -> dict:
    truth = stack.truth(10)
    routes = truth.get("routes", {}).get("fn", {}).get("by_source", {})
    try:
        decision = stack.decisions()
        outcome, reason = decision["outcome"], decision["reason"]
    except OSError:
        outcome, reason = "-", "no decision yet"
    return {
        "t": round(t, 1),
        "second": truth["seconds"],  # the data plane's clock
        "p95_ms": truth["services"]["fn"]["p95_ms"],
        "lost_pct": 100.0 * truth["services"]["fn"]["lost_fraction"],
        "routes": routes,
        "outcome": outcome,
        "reason": reason,
    }


def share_to(routes: dict, node: str) -> float:
    """Mean share (percent) of the sources' traffic routed to ``node``."""
    rows = [row for row in routes.values() if sum(row.values()) > 0]
    if not rows:
        return float("nan")
    return 100.0 * sum(row.get(node, 0.0) / sum(row.values()) for row in rows) / len(rows)


def plot(samples: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    top.semilogy(t, [max(s["p95_ms"], 1e-3) for s in samples], color="tab:red", label="operator")
    top.semilogy(
        t,
        [max(s["static_p95_ms"], 1e-3) for s in samples],
        color="tab:red",
        linestyle="--",
        alpha=0.6,
        label="static equal weights",
    )
    top.axhline(200, color="grey", linestyle=":", label="latency target")
    top.set_ylabel("true p95 (ms)")
    top.legend(loc="upper left")
    for node in example_nodes():
        bottom.plot(t, [share_to(s["routes"], node) for s in samples], label=node)
    bottom.plot(t, [s["lost_pct"] for s in samples], color="black", label="lost, operator")
    bottom.plot(
        t,
        [s["static_lost_pct"] for s in samples],
        color="black",
        linestyle="--",
        alpha=0.6,
        label="lost, static",
    )
    bottom.set_ylabel("traffic share, requests lost (%)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left")
    for axis in (top, bottom):
        axis.axvline(args.degrade_at, color="black", linestyle="--")
    top.set_title(f"{change_of(args)} at {args.degrade_at} s")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


def change_of(args: argparse.Namespace) -> NodeChange:
    if args.unready:
        return NodeChange(args.node, unready="fn")
    return NodeChange(args.node, None if args.fail else args.factor)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.degrade_at >= args.duration:
        parser.error(
            f"--degrade-at {args.degrade_at} is not before --duration {args.duration}: "
            "the node would never degrade; degrade earlier or run longer"
        )
    # Checked now, not found wanting at the end of the run, the summary lost with the plot.
    png = not_a_png(args.plot)
    if png is not None:
        parser.error(f"--plot: {png}")
    for problem in (make_folder(args.plot.parent, "--plot"), make_folder(args.logs, "--logs")):
        if problem is not None:
            parser.error(problem)
    return args


def stop_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM (``timeout``, a CI job cancelled, ``kill``) ends the run as Ctrl-C does: the
    stack's ``with`` blocks stop every process and remove Prometheus's data. Python's own
    default ended at once and left them running."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    samples: list[dict] = []
    change = change_of(args)
    degraded_at = None  # the data plane's second of the change
    try:
        with running_stack(directory=args.logs) as stack:
            stack.apply(EXAMPLES / "policy.yaml")
            tqdm.write(f"operator API: {stack.operator_url}  kubeconfig: {stack.kubeconfig}")
            start = time.monotonic()
            with tqdm(total=args.duration, unit="s", file=sys.stderr) as bar:
                while (t := time.monotonic() - start) < args.duration:
                    if degraded_at is None and t >= args.degrade_at:
                        stack.change(change)
                        degraded_at = stack.truth(1)["seconds"]
                        tqdm.write(f"{t:6.1f}s  {change}")
                    s = sample(stack, t)
                    samples.append(s)
                    tqdm.write(
                        f"{t:6.1f}s  p95 {s['p95_ms']:8.0f} ms  lost {s['lost_pct']:5.1f}%  "
                        f"to {args.node} {share_to(s['routes'], args.node):5.1f}%  "
                        f"{s['outcome']}: {s['reason']}"
                    )
                    bar.update(round(time.monotonic() - start - bar.n))
                    # Wake for the change when it falls between two samples: waiting for the
                    # next sample made it late, or skipped it if that sample was past the end.
                    wake = time.monotonic() + args.every
                    if degraded_at is None:
                        wake = min(wake, start + args.degrade_at)
                    time.sleep(max(wake - time.monotonic(), 0.0))
    except (StackError, PrometheusError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    # The same data plane without the operator, degraded at the same second: the contrast.
    never = max((s["second"] for s in samples), default=0) + 1
    at = never if degraded_at is None else degraded_at
    static = static_truths([s["second"] for s in samples], at, change)
    for s, (p95, lost) in zip(sorted(samples, key=lambda s: s["second"]), static, strict=True):
        s["static_p95_ms"], s["static_lost_pct"] = p95, 100.0 * lost
    plot(samples, args)
    before = [s["p95_ms"] for s in samples if s["t"] < args.degrade_at]
    after = [s for s in samples if s["t"] >= args.duration - 30]
    summary = {
        "p95_ms_before": before[-1] if before else None,
        "p95_ms_end": after[-1]["p95_ms"] if after else None,
        "p95_ms_static_end": after[-1]["static_p95_ms"] if after else None,
        "lost_pct_end": after[-1]["lost_pct"] if after else None,
        "lost_pct_static_end": after[-1]["static_lost_pct"] if after else None,
        "share_to_degraded_end": share_to(samples[-1]["routes"], args.node) if samples else None,
        "plot": str(args.plot),
        "logs": str(args.logs),
    }
    print(json_line(summary) if args.json else f"plot: {args.plot}  logs: {args.logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
