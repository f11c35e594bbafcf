"""Runs a benchmark script as its users do and reads the JSON object its output ends with."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(name: str, *argv: str, timeout: float = 600) -> dict:
    """``python benchmarks/<name>.py ARGV``; the last line it prints, parsed. A failed run
    fails the test with the end of its stderr, where the reason is."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return strict_json(done.stdout.strip().splitlines()[-1])


def refusal(name: str, *argv: str) -> str:
    """``python benchmarks/<name>.py ARGV``, which must be refused as a usage error (exit
    code 2) before any work; what it says on stderr."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    return done.stderr


def strict_json(line: str) -> dict:
    """``line`` parsed as strict JSON: NaN and Infinity, which ``json.dumps`` writes and
    strict parsers (jq, Go, JavaScript) refuse, fail the test."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON: print the line with simulator.cli.json_line")

    return json.loads(line, parse_constant=refuse)
