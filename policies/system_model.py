"""A model of how each node serves requests, learned from telemetry while the system runs.

What it predicts, per serving node and service, is what routing changes: the mean and p95
latency at the node and the share of incoming requests it completes. Flows are not learned:
given weights and arrivals they follow exactly (:mod:`policies.model_env`). The inputs are
two scale-free quantities every node has, the offered utilisation (work arriving per second
over capacity) and the service time of one request (``work / capacity``), so one regressor
pools the rows of all nodes and services, and a node that loses half its capacity lands on
rows other, slower nodes already produced; the third is the work queued at the start.

Queues are not learned from scratch: over an interval, queued work grows or drains as a
fluid (:mod:`policies.fluid_queue`), and the regressor learns only what that arithmetic
misses (the service time, the queueing within the interval, the rejects). Learned from 360
intervals of commissioning and scored on the next 60 (``benchmarks/model_accuracy.py``,
mesh-10x3 and mesh-6x3, seeds 0-2), that lowered the held-out error of the mean latency
from 0.22 to 0.18, of the p95 from 0.24 to 0.22 and of the mesh's mean latency from 0.15 to
0.11: a forest's leaves, each the mean of ten rows with unlike queues, flattened the
intervals after an overload, which carry most of the error. On the live loop's own
intervals the error stayed as it was (0.21-0.22), and rollout, on the four change
scenarios with seeds 0-3, missed a target where the oracle met its own in 3 intervals
after the third cycle instead of 7 (86 misses over all intervals after it instead of 99),
at the same cost. (The queueing prior's M/M/1 term, learned around the same way, was
worse: see below.)

Measured and not kept: which service a row is of, as a fourth input (each service its own
curve, still pooled over the nodes). A node of the simulator serves its services in turn,
so the last waits behind the others, and without that input this model prices the first
service of mesh-10x3 about 40% too slow on a live run's intervals and the others slightly
too fast. With it, the held-out error of the mean latency on the live loop's own intervals
fell from 0.22 to 0.18 (``python -m simulator.adapt`` on the four change scenarios, seeds
0-3, ``model_accuracy.nmae.mean_ms``), but rollout missed a latency target in more intervals
after the changes (104 against 85; 7 against 4 where the oracle met its targets, all in the
surge), for the same cost. Which service waits behind which depends on the mix of work
queued ahead of it, which neither model is told, and the pooled model's error falls on the
safe side.

The regressor is scikit-learn's (a random forest by default: measured to reach a lower
held-out error than histogram gradient boosting on a few hundred intervals). It does not
extrapolate, so the model also answers "is this state inside my data?": a state no training
row is near is left to the base policy. Latencies are learned on their own scale: a log
(or square-root) scale fits calm intervals slightly better, but its leaves predict a
geometric mean, below the mean latency a decision is priced on, and under a surge that
made the held-out error larger, not smaller.

How accurate can it be? Not very, per interval: a 5-second interval of a node and a
service is a few dozen requests, and its mean and p95 latency vary a lot with the exact
arrivals and request sizes even when the features are known exactly. Replicas of the mesh
under one routing estimate that chance (``benchmarks/model_noise_floor.py``): even knowing
each interval's routing, time and node besides its utilisation and backlog, a prediction of
the mean latency errs by about 0.13 (mesh-10x3) and 0.15 (mesh-6x3) of it with 5%
measurement noise, 0.10 and 0.12 with none. This model errs by 0.17 and 0.19 on the same
rows, and a boosted model of the same inputs fitted on five times the data from those
replicas does no better (0.24 and 0.27). Those replicas play commissioning's routings, which
overload some nodes; under the routings rollout decides once running (``--routing rollout``),
chance alone still errs by 0.12 on both meshes.
More rows do not help either: a forest on 360 intervals is as accurate as boosting on 3,000.
Nor did three other ways of using what a mesh can measure (commissioning's held-out rows,
mesh-10x3 and mesh-6x3, seeds 0-2; mean latency, this model 0.16-0.28): a per-(node, service)
correction learned from each row's recent errors (removing each row's median error over
the held-out intervals, in hindsight, gains at most 0.006: the error is not a fixed bias of
some rows); the whole queueing prior, its M/M/1 term with the fluid, as a fourth input, or
the forest fitted to its residual or ratio (0.16-0.26: that term makes the prior 1.6-2.5
times the simulator's latencies, whose arrivals are spread evenly over a step); and the
interval's peak one-second load (0.16-0.25, 0.01-0.03 lower, but a decision would have to
guess it). (These were measured before the model learned around the fluid queue.)

Accuracy is measured the honest way for a stream: each new interval's rows are predicted
before they are learned from, so every score is on held-out, recent samples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.multioutput import MultiOutputRegressor
from sklearn.neighbors import KDTree

from policies.fluid_queue import fluid_wait

FEATURES = ("utilisation", "service_ms", "backlog_s")
UTILISATION, SERVICE_MS, BACKLOG = range(len(FEATURES))
TARGETS = ("mean_ms", "p95_ms", "success", "backlog_s")
Regressor = Literal["forest", "boosting"]
MEAN_MS, P95_MS, SUCCESS, BACKLOG_S = range(len(TARGETS))


MESH_MEAN_MS = "mesh_mean_ms"
"""The accuracy key of each interval's mean latency over the whole mesh (every node and
service, weighted by the requests each served): the latency a decision's cost adds up, and
the quantity the reference work modelled (a system's mean response time). Per row, an
interval's latency at one node is a few dozen requests' worth of chance; over the mesh, most
of that chance averages out, and what is left is the model's own error."""

GATED = ("mean_ms", "p95_ms", "success")

WINDOW = 360
"""Intervals the model keeps by default: 30 minutes of 5-second telemetry."""


@dataclass(frozen=True)
class Accuracy:
    """Held-out accuracy over recent intervals, per target (and, where the rows' requests
    were known, of the mesh's mean latency: ``MESH_MEAN_MS``)."""

    nmae: dict[str, float | None]  # mean absolute error over the mean absolute target
    r2: dict[str, float | None]  # None for a target constant in every row: nothing to explain
    rows: int

    @property
    def worst_nmae(self) -> float:
        """The largest error among the mean and p95 latency and the success ratio, per row.
        Decisions are priced on the mean and the success ratio only, but a model that misses
        the tail is not trusted with the mean either. (The backlog is near zero most of the
        time, so its *normalised* error is large even when its absolute error is a few
        milliseconds; it is reported, not gated on. The mesh's mean latency is reported too:
        it averages the rows' errors, so gating on it would trust a model sooner.)"""
        gated = [self.nmae[k] for k in GATED if self.nmae.get(k) is not None]
        return max(gated) if gated else float("nan")

    def as_dict(self) -> dict:
        return {"nmae": self.nmae, "r2": self.r2, "rows": self.rows}


@dataclass(frozen=True)
class LatencyTable:
    """The model evaluated on a grid of each node's utilisation and backlog, for fast
    lookups in a decision.

    A decision scores hundreds of candidate routings; all they change is how much work
    reaches each node and, later in the lookahead, how much is left queued. So the model is
    evaluated on a (utilisation, backlog) grid per (node, service) and interpolated; the
    remaining input, the service time, is fixed by the node and the service.
    """

    utilisation: np.ndarray  # (G,) evenly spaced from 0
    backlog: np.ndarray  # (H,) seconds, evenly spaced from 0
    values: np.ndarray  # (N, S, G, H, len(TARGETS))
    known: np.ndarray  # (N, S, G, H) grid points inside the model's data

    def lookup(self, utilisation: np.ndarray, backlog: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(..., N)`` utilisation and backlog -> predictions ``(..., N, S, T)`` and in-data
        ``(..., N, S)``. Past the grid's end the edge value holds and the state counts as
        outside the data."""
        n, s = self.known.shape[:2]
        (u0, fu, nu, u_in), (b0, fb, nb, b_in) = (
            _cell(np.asarray(x, dtype=float), grid)
            for x, grid in ((utilisation, self.utilisation), (backlog, self.backlog))
        )
        node, service = np.arange(n)[:, None], np.arange(s)[None, :]

        def at(i, j):
            return self.values[node, service, i[..., :, None], j[..., :, None]]

        fu, fb = fu[..., :, None, None], fb[..., :, None, None]
        low = at(u0, b0) * (1 - fb) + at(u0, b0 + 1) * fb
        high = at(u0 + 1, b0) * (1 - fb) + at(u0 + 1, b0 + 1) * fb
        inside = self.known[node, service, nu[..., :, None], nb[..., :, None]]
        inside &= (u_in & b_in)[..., :, None]
        return low + (high - low) * fu, inside

    def on_grid(self, utilisation: np.ndarray, backlog: np.ndarray) -> LatencyTable:
        """The same table interpolated onto another (utilisation, backlog) grid: what
        :meth:`lookup` answers at every point of it, computed axis by axis."""
        (u0, fu, nu, u_in), (b0, fb, nb, b_in) = (
            _cell(np.asarray(x, dtype=float), grid)
            for x, grid in ((utilisation, self.utilisation), (backlog, self.backlog))
        )

        def at(i, j):  # (N, S, G', H', T)
            return self.values[:, :, i][:, :, :, j]

        fu, fb = fu[:, None, None], fb[None, :, None]
        low = at(u0, b0) * (1 - fb) + at(u0, b0 + 1) * fb
        high = at(u0 + 1, b0) * (1 - fb) + at(u0 + 1, b0 + 1) * fb
        known = self.known[:, :, nu][:, :, :, nb] & (u_in[:, None] & b_in[None, :])
        return LatencyTable(
            np.asarray(utilisation), np.asarray(backlog), low + (high - low) * fu, known
        )

    @classmethod
    def from_function(
        cls, predict, service_ms: np.ndarray, utilisation: np.ndarray, backlog: np.ndarray
    ) -> LatencyTable:
        """Tabulate ``predict(features (R, F)) -> (R, T)`` for every node and service (every
        grid point counts as known: for exact models in tests and benchmarks)."""
        n, s = service_ms.shape
        rows = _feature_grid(service_ms, utilisation, backlog)
        shape = (n, s, len(utilisation), len(backlog))
        values = np.asarray(predict(rows)).reshape(*shape, len(TARGETS))
        return cls(utilisation, backlog, values, np.ones(shape, bool))


def _cell(x: np.ndarray, grid: np.ndarray) -> tuple:
    """On an evenly spaced grid: lower grid index, fraction towards the next, nearest index,
    and whether ``x`` is not past the grid's end (below its start, the start holds)."""
    g = len(grid)
    position = np.clip((x - grid[0]) / (grid[1] - grid[0]), 0.0, g - 1.0)
    low = np.minimum(position.astype(np.int64), g - 2)
    frac = position - low
    nearest = np.where(frac < 0.5, low, low + 1)
    return low, frac, nearest, x <= grid[-1] + 1e-9 * abs(grid[-1])


def feature_rows(
    utilisation: np.ndarray | float, service_ms: np.ndarray | float, backlog: np.ndarray | float
) -> np.ndarray:
    """Rows of :data:`FEATURES` ``(R, F)`` from their columns, broadcast against each other
    (so a node's utilisation and backlog serve each of its services)."""
    columns = (np.asarray(c, dtype=float) for c in (utilisation, service_ms, backlog))
    return np.stack(np.broadcast_arrays(*columns), axis=-1).reshape(-1, len(FEATURES))


def _feature_grid(service_ms: np.ndarray, utilisation: np.ndarray, backlog: np.ndarray):
    """The feature rows of every entry of ``service_ms`` ``(N, S)`` at every point of the
    (utilisation, backlog) grid."""
    u, b = np.meshgrid(utilisation, backlog, indexing="ij")
    return feature_rows(u, service_ms[..., None, None], b)


SERVICE_STEP = 0.05
"""Spacing of the tabulated service times, in log: 5 % apart, about the measurement noise
of a node's capacity."""


@dataclass(frozen=True)
class _ServiceGrid:
    """The fitted model on a grid of (service time, utilisation, backlog), shared by every
    node and service."""

    log_ms: np.ndarray  # (L,) evenly spaced log service times
    utilisation: np.ndarray  # (G,)
    backlog: np.ndarray  # (H,)
    values: np.ndarray  # (L, G, H, len(TARGETS))
    known: np.ndarray  # (L, G, H)


def fluid_part(x: np.ndarray, interval_s: float) -> np.ndarray:
    """``(R, T)``: what the fluid queue alone makes of each target, the part the regressor
    is not asked to learn (the waits and the backlog left; nothing of the success ratio)."""
    mean_s, p95_s, after = fluid_wait(x[:, UTILISATION], x[:, BACKLOG], interval_s)
    out = np.zeros((len(x), len(TARGETS)))
    out[:, MEAN_MS], out[:, P95_MS], out[:, BACKLOG_S] = 1000.0 * mean_s, 1000.0 * p95_s, after
    return out


def _regressor_predict(est, x: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """A fitted regressor's ``(R, T)`` predictions plus ``offset`` (what it was fitted
    around), clipped to what the targets can be."""
    if isinstance(est, RandomForestRegressor):
        # The forest's own predict dispatches its trees through joblib and validates the
        # input once per tree. The trees' mean, input checked once, is the same number.
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        out = sum(tree.predict(x32, check_input=False) for tree in est.estimators_)
        out = out / len(est.estimators_)
    else:
        out = np.asarray(est.predict(x))
    out = out.reshape(len(x), len(TARGETS)) + offset
    out[:, [MEAN_MS, P95_MS, BACKLOG_S]] = np.maximum(out[:, [MEAN_MS, P95_MS, BACKLOG_S]], 0.0)
    out[:, SUCCESS] = np.clip(out[:, SUCCESS], 0.0, 1.0)
    return out


class SystemModel:
    """A sliding window of telemetry rows and the regressor fitted on it.

    Args:
        window: intervals kept (360 is 30 minutes of 5-second telemetry).
        regressor: ``forest`` or ``boosting``.
        refit_share: refit once the rows added since the last fit reach this share of the
            rows it was fitted on, and at least ``min_rows`` (0: every interval). Fitting
            costs time in proportion to the rows (plus about 20 ms for the forest itself),
            so this keeps the cost per interval flat as the window fills: a full window is
            refitted every 36 intervals. A refit also happens on drift, when
            at least ``drift_outside`` of the newest interval's rows lie outside the fitted
            data (the system moved to states a forest cannot extrapolate to). The held-out
            error is no drift signal: per interval it is mostly measurement noise, the same
            before and after a refit.
        min_rows: rows needed before the first fit.
        radius: how near (in standardised features) a training row must be for a state to
            count as inside the data.
        scored_intervals: the newest intervals :meth:`accuracy` is over (12: the last
            minute, recent enough to show a change in the mesh).
        interval_s: length of the intervals the rows describe, over which the fluid queue
            the regressor learns around (:func:`fluid_part`) grows or drains.
        seed: the regressor's random state.
    """

    def __init__(
        self,
        window: int = WINDOW,
        regressor: Regressor = "forest",
        refit_share: float = 0.1,
        drift_outside: float = 0.1,
        min_rows: int = 50,
        radius: float = 0.25,
        grid: tuple[int, int] = (33, 9),
        max_utilisation: float = 1.6,
        scored_intervals: int = 12,
        interval_s: float = 5.0,
        seed: int = 0,
    ):
        if regressor not in ("forest", "boosting"):
            raise ValueError(f"regressor must be 'forest' or 'boosting', got {regressor!r}")
        self.window = window
        self.regressor: Regressor = regressor
        self.refit_share = refit_share
        self.drift_outside = drift_outside
        self.min_rows = min_rows
        self.radius = radius
        self.grid = grid
        self.max_utilisation = max_utilisation
        self.interval_s = interval_s
        self.seed = seed
        self._intervals: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=window)
        # Per scored interval: targets, predictions, and the rows' requests (None: unknown).
        self._scores: deque[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = deque(
            maxlen=scored_intervals
        )
        self._new_rows = 0  # since the last fit
        self._fitted_rows = 0
        self._grid: _ServiceGrid | None = None
        self._tree: KDTree | None = None
        self.fits = 0

    # ---------------------------------------------------------------------------- data
    def observe(
        self, features: np.ndarray, targets: np.ndarray, requests: np.ndarray | None = None
    ) -> bool:
        """Add one interval's rows (``(R, F)`` features, ``(R, T)`` targets, and optionally
        ``(R,)`` the requests each row's latencies are over; rows with a NaN are dropped).
        Scores them first if a fit exists, refits when due; returns whether it refitted."""
        features, targets, requests = self.add(features, targets, requests)
        drifted = False
        if self._grid is not None and len(features):
            self._scores.append((targets, self.predict(features), requests))
            drifted = float(np.mean(~self.in_data(features))) >= self.drift_outside
        enough = self.refit_share * self._fitted_rows
        if self.refit_share > 0:
            enough = max(enough, self.min_rows)
        due = self._grid is None or (self._new_rows > 0 and self._new_rows >= enough)
        if (due or drifted) and self.rows >= self.min_rows:
            self.fit()
            return True
        return False

    def add(
        self, features: np.ndarray, targets: np.ndarray, requests: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Append one interval's rows without scoring or fitting (bulk loading, e.g. a warm
        start from simulator data followed by one :meth:`fit`); returns the rows kept."""
        features = np.asarray(features, dtype=float).reshape(-1, len(FEATURES))
        targets = np.asarray(targets, dtype=float).reshape(-1, len(TARGETS))
        keep = np.isfinite(features).all(axis=1) & np.isfinite(targets).all(axis=1)
        features, targets = features[keep], targets[keep]
        if requests is not None:
            requests = np.asarray(requests, dtype=float).reshape(-1)[keep]
        self._intervals.append((features, targets))
        self._new_rows += len(features)
        return features, targets, requests

    @property
    def rows(self) -> int:
        return sum(len(f) for f, _ in self._intervals)

    @property
    def ready(self) -> bool:
        return self._grid is not None

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._intervals:
            return np.zeros((0, len(FEATURES))), np.zeros((0, len(TARGETS)))
        x = np.concatenate([f for f, _ in self._intervals])
        y = np.concatenate([t for _, t in self._intervals])
        return x, y

    # ---------------------------------------------------------------------------- model
    def fit(self) -> None:
        """Fit the regressor on the window and tabulate it; the regressor itself is not kept
        (see :meth:`predict`)."""
        x, y = self.data()
        if len(x) < self.min_rows:
            raise ValueError(
                f"system model: {len(x)} telemetry rows, at least min_rows={self.min_rows} "
                "are needed; wait for more intervals or warm-start from simulator data"
            )
        if self.regressor == "forest":
            # Leaves of 10 rows average out per-interval noise; 30 trees are as accurate as
            # 60 on these three features at half the fitting time.
            est = RandomForestRegressor(
                n_estimators=30, min_samples_leaf=10, random_state=self.seed, n_jobs=1
            )
        else:
            est = MultiOutputRegressor(
                HistGradientBoostingRegressor(max_iter=150, random_state=self.seed)
            )
        est.fit(x, y - fluid_part(x, self.interval_s))
        self._scale = np.maximum(x.std(axis=0), 1e-9)
        self._tree = KDTree(x / self._scale)
        self._new_rows, self._fitted_rows = 0, len(x)
        self._grid = self._tabulate(est, x)
        self.fits += 1

    def _tabulate(self, est, x: np.ndarray) -> _ServiceGrid:
        """The regressor on a grid over the service times of the data ``x`` (a step beyond
        each end), utilisation up to ``max_utilisation`` and backlog up to the largest in the
        data (at most 30 s). The few intervals with the longest queues are the ones with the
        longest latencies: a grid cut at the 99th percentile answered them with its edge
        value and counted them outside the data, and the held-out error of the mean latency
        was about a sixth larger: 0.26 against 0.22 (``python benchmarks/model_accuracy.py``,
        mesh-10x3 and mesh-6x3, seeds 0-2).

        The table is not forced to be monotone, though latency rises with load and backlog.
        Measured with ``python -m simulator.adapt`` on the four change scenarios, seeds 0-3
        (16 runs): making every line of it along utilisation and backlog non-decreasing (the
        mean of its running maximum and running minimum) gave 10 SLO violations after the
        third cycle against 4 and 115 missed targets over every interval after it against 85;
        its running maximum alone gave 11 and 82. The held-out error of the mean latency
        stayed 0.22 with both."""
        log_ms = np.log(np.maximum(x[:, SERVICE_MS], 1e-9))
        log_lo, log_hi = float(log_ms.min()) - SERVICE_STEP, float(log_ms.max()) + SERVICE_STEP
        top = float(np.clip(x[:, BACKLOG].max(), 0.5, 30.0))
        count = int(np.clip(np.ceil((log_hi - log_lo) / SERVICE_STEP) + 1, 2, 64))
        log_ms = np.linspace(log_lo, log_hi, count)
        util = np.linspace(0.0, self.max_utilisation, self.grid[0])
        backlog = np.linspace(0.0, top, self.grid[1])
        rows = _feature_grid(np.exp(log_ms)[:, None], util, backlog)
        shape = (count, len(util), len(backlog))
        return _ServiceGrid(
            log_ms=log_ms,
            utilisation=util,
            backlog=backlog,
            values=_regressor_predict(est, rows, fluid_part(rows, self.interval_s)).reshape(
                *shape, len(TARGETS)
            ),
            known=self.in_data(rows).reshape(shape),
        )

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(R, F)`` features -> ``(R, T)`` predictions, read off the tabulated model.

        The fitted regressor is tabulated once and dropped: decisions read the table, so the
        held-out scores judge what decisions use, and a policy keeps a table of a few hundred
        kB instead of a forest (about 1 MB at a full window, per policy in the operator)."""
        x = np.asarray(features, dtype=float).reshape(-1, len(FEATURES))
        # Each row as a node of its own: its service time picks the table, then the lookup.
        values, _ = self.table(x[:, SERVICE_MS, None]).lookup(x[:, UTILISATION], x[:, BACKLOG])
        return values[:, 0]

    def in_data(self, features: np.ndarray) -> np.ndarray:
        """``(R,)`` True where a training row lies within ``radius`` (standardised)."""
        if self._tree is None:
            return np.zeros(len(features), bool)
        x = np.asarray(features, dtype=float) / self._scale
        return self._tree.query_radius(x, r=self.radius, count_only=True) > 0

    def table(self, service_ms: np.ndarray) -> LatencyTable:
        """The model tabulated for these nodes' service times ``(N, S)``.

        Interpolated, in log service time, from the grid over every input that is built once
        per fit: a node's service time is measured afresh every interval, and its noise alone
        would otherwise call for a new tabulation of the regressor every cycle. Service times
        beyond the data's range take the edge value and count as outside the data.
        """
        grid = self._fitted_grid()
        log_ms = np.log(np.maximum(np.asarray(service_ms, dtype=float), 1e-9))
        low, frac, nearest, not_past = _cell(log_ms, grid.log_ms)
        frac = frac[..., None, None, None]
        values = grid.values[low] * (1.0 - frac) + grid.values[low + 1] * frac
        inside = not_past & (log_ms >= grid.log_ms[0] - 1e-9 * abs(grid.log_ms[0]))
        known = grid.known[nearest] & inside[..., None, None]
        return LatencyTable(grid.utilisation, grid.backlog, values, known)

    def _fitted_grid(self) -> _ServiceGrid:
        if self._grid is None:
            raise RuntimeError("system model: used before the first fit()")
        return self._grid

    # ---------------------------------------------------------------------------- accuracy
    def accuracy(self) -> Accuracy | None:
        """Held-out accuracy over the last scored intervals (None before any)."""
        return score(*self.held_out()) if self._scores else None

    def held_out(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """The last scored intervals' rows: targets, the predictions made before they were
        learned from, their requests (None unless every interval's were given) and the
        interval each row belongs to."""
        y = np.concatenate([t for t, _, _ in self._scores])
        p = np.concatenate([q for _, q, _ in self._scores])
        interval = np.repeat(np.arange(len(self._scores)), [len(t) for t, _, _ in self._scores])
        if any(r is None for _, _, r in self._scores):
            return y, p, None, interval
        return y, p, np.concatenate([r for _, _, r in self._scores]), interval


def score(
    y: np.ndarray,
    p: np.ndarray,
    requests: np.ndarray | None = None,
    interval: np.ndarray | None = None,
) -> Accuracy:
    """Normalised MAE and R^2 of predictions ``p`` against targets ``y`` (rows, TARGETS);
    the normalised MAE is None for a target that was zero in every row. With each row's
    ``requests`` and the ``interval`` it belongs to, also of each interval's mean latency
    over the mesh (``MESH_MEAN_MS``)."""
    nmae, r2 = {}, {}
    for i, name in enumerate(TARGETS):
        nmae[name], r2[name] = _errors(y[:, i], p[:, i])
    if requests is not None and interval is not None:
        observed, predicted = mesh_means(y[:, MEAN_MS], p[:, MEAN_MS], requests, interval)
        nmae[MESH_MEAN_MS], r2[MESH_MEAN_MS] = _errors(observed, predicted)
    return Accuracy(nmae=nmae, r2=r2, rows=len(y))


def _errors(y: np.ndarray, p: np.ndarray) -> tuple[float | None, float | None]:
    """Normalised MAE and R^2 of one target."""
    # A target that was zero throughout (no queue in any scored interval) has no scale to
    # normalise by: None, not an error divided by nothing.
    scale = float(np.abs(y).mean()) if len(y) else 0.0
    nmae = float(np.abs(y - p).mean() / scale) if scale > 0 else None
    var = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    # Likewise R^2 of a target constant throughout (every request succeeded): a perfect
    # score there would be claimed however far off the predictions were.
    r2 = float(1.0 - ((y - p) ** 2).sum() / var) if var > 0 else None
    return nmae, r2


def mesh_means(
    y: np.ndarray, p: np.ndarray, requests: np.ndarray, interval: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each interval's mean of the row latencies ``y`` and ``p`` weighted by the rows'
    ``requests`` (intervals labelled by ``interval``; those without requests are left out)."""
    _, group = np.unique(interval, return_inverse=True)
    weight = np.bincount(group, requests)
    served = weight > 0
    w = weight[served]
    return (
        np.bincount(group, requests * y)[served] / w,
        np.bincount(group, requests * p)[served] / w,
    )
