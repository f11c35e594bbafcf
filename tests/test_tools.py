"""The helm and kubectl that ``make install`` and the chart checks fall back on where none is
on PATH: extracted from the dev extra's PyPI package, and working."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from e2e.tools import TOOLS, ToolUnavailable, runs_layer_binaries, tool

VERSION = {"kubectl": (["version", "--client"], r"Client Version: v1\.\d+"), "helm": (
    ["version", "--short"], r"^v\d+\.\d+")}  # fmt: skip


@pytest.mark.skipif(not runs_layer_binaries(), reason="the shipped binaries are Linux x86-64")
@pytest.mark.parametrize("name", TOOLS)
def test_a_tool_not_on_path_is_extracted_and_runs(name, tmp_path, monkeypatch):
    """Without kubectl on PATH the demo and the closed-loop tests stopped at their first
    apply: ``make install`` now installs the one the PyPI package ships, as the chart checks
    use its helm."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("MARL_TOOLS_CACHE", str(tmp_path / "cache"))
    path = tool(name)
    assert path.startswith(str(tmp_path / "cache"))
    args, pattern = VERSION[name]
    done = subprocess.run([path, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and re.search(pattern, done.stdout), done


def test_no_x86_binary_is_offered_to_another_machine(tmp_path, monkeypatch):
    """On Linux arm64 the layer's x86-64 helm was extracted and reported usable: the first
    command then failed with "Exec format error", after the e2e setup had run."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("HELM", raising=False)
    monkeypatch.setenv("MARL_TOOLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("e2e.tools.platform.machine", lambda: "aarch64")
    with pytest.raises(ToolUnavailable, match=r"Linux x86-64 binary, and this is .* on aarch64"):
        tool("helm")


def test_the_script_names_the_tools_it_finds():
    done = subprocess.run(
        [sys.executable, "tests/e2e/tools.py", "istioctl"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "helm|kubectl" in done.stderr
