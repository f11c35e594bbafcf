"""The latest cycle reports of every RoutingPolicy, kept in memory for the HTTP API.

Cycles run in kopf's worker threads while the API answers from the event loop, so every read
and write takes one lock. Reads hand out copies of the containers (the reports themselves are
frozen), so a caller never sees a history change under it.

Only a short history is kept: it answers "what did the last few cycles do?" for a person at
the API; the durable record is the resource's status, its events and the metrics.
"""

from __future__ import annotations

import threading
from collections import deque

from marl_operator.report import CycleReport

HISTORY = 20
"""Cycles kept per policy, the latest included."""


class ReportStore:
    """Thread-safe map ``namespace/name -> the last HISTORY cycle reports``, oldest first."""

    def __init__(self, history: int = HISTORY) -> None:
        if history < 1:
            raise ValueError(f"history must keep at least one report, got {history}")
        self._history = history
        self._lock = threading.Lock()
        self._reports: dict[str, deque[CycleReport]] = {}

    def put(self, report: CycleReport) -> None:
        """Record a finished cycle; the oldest one of its policy drops out past the bound."""
        with self._lock:
            kept = self._reports.get(report.policy)
            if kept is None:
                kept = self._reports[report.policy] = deque(maxlen=self._history)
            kept.append(report)

    def forget(self, policy: str) -> None:
        """Drop everything about a deleted policy (unknown policies are ignored)."""
        with self._lock:
            self._reports.pop(policy, None)

    def latest(self, policy: str) -> CycleReport | None:
        """The policy's last cycle, or None when it has not reported one."""
        with self._lock:
            kept = self._reports.get(policy)
            return kept[-1] if kept else None

    def history(self, policy: str) -> list[CycleReport]:
        """The kept cycles, oldest first (the last one is :meth:`latest`); empty if unknown."""
        with self._lock:
            return list(self._reports.get(policy, ()))

    def policies(self) -> list[str]:
        """The policies with at least one report, sorted."""
        with self._lock:
            return sorted(self._reports)
