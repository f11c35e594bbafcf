"""A scenario seen as fluid models, and the oracle policy built from them.

The scenario's resources are piecewise constant between its timed events; each piece is one
fluid model (:class:`policies.oracle.FluidModel`) fed by the expected arrival rates over that
piece. The ``oracle`` policy plays the best static routing of each piece: it is re-solved
after every change, exactly what a clairvoyant operator with a perfect model would apply.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from policies.oracle import FluidModel, Routing, solve
from simulator.env import Timeline, sample_arrivals, topology_of
from simulator.scenario import Scenario

MAX_UTILISATION = 0.95
"""Highest node load the oracle plans for: queues are bounded, so a fluid plan at 99% would
overflow them in the simulator."""


def expected_arrivals(scenario: Scenario, samples: int = 64, seed: int = 0) -> np.ndarray:
    """``(T, N, S)`` mean requests per step, estimated from ``samples`` sampled episodes.

    Sampling (rather than per-kind formulas) gives every workload kind, clipping and surge
    exactly the expectation the simulator realises."""
    timeline = Timeline.of(scenario)
    rng = np.random.default_rng(seed)
    return sample_arrivals(scenario, timeline, rng, samples).mean(axis=0)


def segments(timeline: Timeline) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` maximal step ranges with constant resources and surges."""
    rows = np.concatenate(
        [timeline.cpu, timeline.active, timeline.surge, timeline.queue], axis=1
    ).astype(float)
    change = np.flatnonzero(np.any(rows[1:] != rows[:-1], axis=1)) + 1
    bounds = [0, *change.tolist(), len(rows)]
    return list(itertools.pairwise(bounds))


def fluid_model(
    scenario: Scenario,
    rates_per_step: np.ndarray,
    cpu_per_step: np.ndarray,
    max_utilisation: float = MAX_UTILISATION,
) -> FluidModel:
    """The fluid model of ``scenario`` with node CPU ``(N,)`` and arrivals ``(N, S)`` per step.

    Needs latency targets on every service: the reject cost is ``reject_penalty`` targets."""
    missing = [s.name for s in scenario.services if s.latency_target_ms is None]
    if missing:
        raise ValueError(
            f"scenario {scenario.name!r}: the fluid model needs latency_target_ms on every "
            f"service (missing on {missing}); the oracle prices rejects in latency targets"
        )
    step = scenario.step_seconds
    target_s = np.array([s.latency_target_ms for s in scenario.services]) / 1000.0
    return FluidModel(
        topology=topology_of(scenario),
        capacity=np.asarray(cpu_per_step, dtype=float) / step,
        arrivals=np.asarray(rates_per_step, dtype=float).reshape(-1) / step,
        work=np.array([s.mean_cpu for s in scenario.services]),
        reject_cost=scenario.reject_penalty * target_s,
        max_utilisation=max_utilisation,
    )


@dataclass(frozen=True)
class OracleSchedule:
    """The oracle's routing for every piece of a scenario, and its weights per step."""

    pieces: tuple[tuple[int, int], ...]
    models: tuple[FluidModel, ...]
    routings: tuple[Routing, ...]

    def weights_at(self, t: int) -> np.ndarray:
        """``(A, K+2)`` routing fractions to apply at step ``t``."""
        for (start, end), routing in zip(self.pieces, self.routings, strict=True):
            if start <= t < end:
                return routing.weights
        return self.routings[-1].weights

    @property
    def cost_per_request_s(self) -> float:
        """Fluid-model cost per request over the whole episode (pieces weighted by traffic)."""
        cost = sum(r.cost * (e - s) for (s, e), r in zip(self.pieces, self.routings, strict=True))
        load = sum(
            m.arrivals.sum() * (e - s) for (s, e), m in zip(self.pieces, self.models, strict=True)
        )
        return float(cost / max(load, 1e-12))


def oracle_schedule(
    scenario: Scenario, samples: int = 64, seed: int = 0, every: int | None = None
) -> OracleSchedule:
    """Solve the best static routing of every piece of ``scenario``; with ``every``, pieces
    are cut further into spans of at most that many steps, each solved for its own
    expected arrivals (a clairvoyant controller that follows slow load drift, such as a
    diurnal cycle, which one routing per piece cannot)."""
    if every is not None and every < 1:
        raise ValueError(f"every must be at least 1 step, got {every}")
    timeline = Timeline.of(scenario)
    rates = expected_arrivals(scenario, samples, seed)
    pieces = segments(timeline)
    if every is not None:
        pieces = [
            (a, min(a + every, end)) for start, end in pieces for a in range(start, end, every)
        ]
    models = tuple(
        fluid_model(scenario, rates[start:end].mean(axis=0), timeline.cpu[start])
        for start, end in pieces
    )
    return OracleSchedule(tuple(pieces), models, tuple(solve(m) for m in models))
