"""Arrival generators: how many requests reach each (node, service) in each step.

Every generator draws a whole episode for a batch of environments at once, shape
``(num_envs, steps)``, at reset time, so stepping never pays for workload generation. The
``sinusoidal`` and ``normal`` generators follow the DFaaS reference formulas exactly,
including truncation toward zero before clipping; the others cover the shapes edge traffic
takes in practice (diurnal cycles, bursts, step changes, recorded traces).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

Generator = Callable[[np.random.Generator, int, int, Any], np.ndarray]


def bounded(
    default: Any, low: float | None = None, high: float | None = None, above: float | None = None
) -> Any:
    """A parameter with its valid range (``low <= x <= high``, ``x > above``), which
    :func:`validate` enforces: out of range, generators fail far from the file (a negative
    Poisson rate in numpy, zero blocks as a division) or quietly produce nonsense."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


@dataclass(frozen=True)
class Sinusoidal:
    """``int(average + amplitude*sin(2*pi*t/P) + noise_ratio*N(0, amplitude))``, P ~ U per block."""

    average: float = 50.0
    amplitude: float = bounded(100.0, low=0)
    noise_ratio: float = bounded(0.1, low=0)
    blocks: int = bounded(3, low=1)
    period_min: float = bounded(15.0, above=0)
    period_max: float = bounded(100.0, above=0)

    def problem(self) -> str | None:
        if self.period_min > self.period_max:
            return (
                f"'period_min' ({self.period_min}) must not exceed 'period_max' ({self.period_max})"
            )
        return None


@dataclass(frozen=True)
class Normal:
    """``int(N(mean, std))`` per step, independent."""

    mean: float = 61.0
    std: float = bounded(32.0, low=0)


@dataclass(frozen=True)
class Poisson:
    rate: float = bounded(50.0, low=0)


@dataclass(frozen=True)
class Diurnal:
    """Poisson arrivals around a daily cycle; ``period`` in steps (0 means one episode)."""

    mean: float = bounded(60.0, low=0)
    amplitude: float = bounded(40.0, low=0)
    period: int = bounded(0, low=0)
    phase: float = 0.0
    random_phase: bool = False


@dataclass(frozen=True)
class Bursty:
    """Markov-modulated Poisson: a calm and a burst state with per-step switch probabilities."""

    calm_rate: float = bounded(30.0, low=0)
    burst_rate: float = bounded(120.0, low=0)
    p_burst: float = bounded(0.05, low=0, high=1)
    p_calm: float = bounded(0.25, low=0, high=1)

    def problem(self) -> str | None:
        if self.p_burst + self.p_calm == 0:
            return "'p_burst' and 'p_calm' cannot both be 0: the chain would never start"
        return None


@dataclass(frozen=True)
class Step:
    """Piecewise-constant rate: ``levels`` is a list of ``[from_step, rate]``."""

    levels: tuple[tuple[int, float], ...] = ((0, 50.0),)
    poisson: bool = True

    def problem(self) -> str | None:
        if any(start < 0 or rate < 0 for start, rate in self.levels):
            return f"'levels' needs steps and rates >= 0, got {[list(x) for x in self.levels]}"
        return None


@dataclass(frozen=True)
class Replay:
    """A recorded series: one column of a CSV file, one row per step, repeated if short."""

    path: str = ""
    column: str = ""
    scale: float = bounded(1.0, low=0)
    random_offset: bool = False


@dataclass(frozen=True)
class Azure:
    """Azure Functions 2019 per-minute invocations.

    Columns ``HashOwner,HashApp,HashFunction,Trigger,1..1440``.

    Preprocessed as in the DFaaS reference: one trigger kind, per-minute counts summed into
    ``bins`` bins per day, min-max scaled per function to ``[0, scale_max]``, and kept only if
    the scaled mean and standard deviation fall inside the given ranges. Each environment
    replays a random kept function.
    """

    path: str = ""
    trigger: str = "http"
    bins: int = bounded(288, low=1, high=1440)
    scale_max: float = bounded(150.0, above=0)
    mean_range: tuple[float, float] = (30.0, 130.0)
    std_range: tuple[float, float] = (10.0, 60.0)

    def problem(self) -> str | None:
        if 1440 % self.bins:
            return f"'bins' must divide 1440 (minutes per day), got {self.bins}"
        for name in ("mean_range", "std_range"):
            low, high = getattr(self, name)
            if low > high:
                return f"{name!r} must be [low, high] with low <= high, got {[low, high]}"
        return None


@dataclass(frozen=True)
class Sum:
    """The sum of several workloads: the arrivals of a pooled node."""

    parts: tuple[Any, ...] = field(default_factory=tuple)
    part_max: int = 150


def _sinusoidal(rng: np.random.Generator, b: int, t: int, p: Sinusoidal) -> np.ndarray:
    if p.blocks > t:
        raise ValueError(f"workload 'sinusoidal': 'blocks' ({p.blocks}) exceeds the {t} steps")
    periods = rng.uniform(p.period_min, p.period_max, size=(b, p.blocks))
    per_step = np.repeat(periods, t // p.blocks, axis=1)
    if per_step.shape[1] < t:  # steps not a multiple of blocks: wrap around, as np.resize does
        per_step = np.concatenate([per_step, per_step[:, : t - per_step.shape[1]]], axis=1)
    steps = np.arange(t)
    base = p.average + p.amplitude * np.sin(2 * np.pi * steps / per_step)
    noise = p.noise_ratio * rng.normal(0.0, p.amplitude, size=(b, t))
    return np.trunc(base + noise)


def _normal(rng: np.random.Generator, b: int, t: int, p: Normal) -> np.ndarray:
    return np.trunc(rng.normal(p.mean, p.std, size=(b, t)))


def _poisson(rng: np.random.Generator, b: int, t: int, p: Poisson) -> np.ndarray:
    return rng.poisson(p.rate, size=(b, t)).astype(np.float64)


def _diurnal(rng: np.random.Generator, b: int, t: int, p: Diurnal) -> np.ndarray:
    period = p.period or t
    phase = rng.uniform(0, 2 * np.pi, size=(b, 1)) if p.random_phase else p.phase
    rate = p.mean + p.amplitude * np.sin(2 * np.pi * np.arange(t) / period + phase)
    return rng.poisson(np.maximum(rate, 0.0) * np.ones((b, 1))).astype(np.float64)


def _bursty(rng: np.random.Generator, b: int, t: int, p: Bursty) -> np.ndarray:
    switches = rng.random((b, t))
    stationary_burst = p.p_burst / (p.p_burst + p.p_calm)
    state = rng.random(b) < stationary_burst
    states = np.empty((b, t), dtype=bool)
    for step in range(t):  # the chain is sequential in time; done once per episode
        states[:, step] = state
        state = np.where(state, switches[:, step] >= p.p_calm, switches[:, step] < p.p_burst)
    return rng.poisson(np.where(states, p.burst_rate, p.calm_rate)).astype(np.float64)


def _step(rng: np.random.Generator, b: int, t: int, p: Step) -> np.ndarray:
    rate = np.zeros(t)
    for start, level in sorted(p.levels):
        rate[int(start) :] = level
    rates = np.broadcast_to(rate, (b, t))
    return rng.poisson(rates).astype(np.float64) if p.poisson else np.floor(rates).copy()


def cached_by_file(read: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``read(path, *args)`` cached by its arguments and by the file's modification time and
    size: a trace edited during a session is read again, not replayed as it first was (an
    OSError, as opening it would, when it is missing)."""

    @cache
    def cached(path: str, _state: tuple[int, int], *args: Any) -> np.ndarray:
        return read(path, *args)

    @functools.wraps(read)
    def wrapper(path: str, *args: Any) -> np.ndarray:
        stat = os.stat(path)
        return cached(path, (stat.st_mtime_ns, stat.st_size), *args)

    return wrapper


@cached_by_file
def _read_column(path: str, column: str) -> np.ndarray:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"column {column!r} not in {path} (columns: {reader.fieldnames})")
        texts = [row[column] for row in reader]
    if not texts:
        raise ValueError(f"{path}: column {column!r} has no rows to replay")
    return _non_negative(texts, lambda i: f"{path}, line {i + 2}: column {column!r}", "a rate")


def _replay(rng: np.random.Generator, b: int, t: int, p: Replay) -> np.ndarray:
    series = _read_column(p.path, p.column) * p.scale
    offsets = rng.integers(0, len(series), size=b) if p.random_offset else np.zeros(b, int)
    idx = (offsets[:, None] + np.arange(t)[None, :]) % len(series)
    return np.floor(series[idx])


AZURE_COLUMNS = ["HashOwner", "HashApp", "HashFunction", "Trigger"]


@cached_by_file
def azure_functions(
    path: str,
    trigger: str,
    bins: int,
    scale_max: float,
    mean_range: tuple[float, float],
    std_range: tuple[float, float],
) -> np.ndarray:
    """The reference preprocessing of one Azure day file: returns ``(functions, bins)``."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: an empty file, not the Azure Functions 2019 format")
        if header[:4] != AZURE_COLUMNS or len(header) != 4 + 1440:
            raise ValueError(
                f"{path}: not the Azure Functions 2019 per-minute format "
                f"(expected columns {AZURE_COLUMNS} + '1'..'1440')"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {line}: {len(row)} columns, where the header has {len(header)}"
                )
            if row[3] == trigger:
                rows.append(_minutes(path, line, row))
    if not rows:
        raise ValueError(f"{path}: no function with trigger {trigger!r}")
    minutes = np.array(rows)
    binned = minutes.reshape(len(rows), bins, 1440 // bins).sum(axis=2)
    lo, hi = binned.min(axis=1, keepdims=True), binned.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = np.trunc((binned - lo) / span * scale_max)
    mean, std = scaled.mean(axis=1), scaled.std(axis=1)
    keep = (mean >= mean_range[0]) & (mean <= mean_range[1])
    keep &= (std >= std_range[0]) & (std <= std_range[1])
    if not keep.any():
        raise ValueError(f"{path}: no {trigger} function passes the mean/std filters")
    return scaled[keep]


def _minutes(path: str, line: int, row: list[str]) -> np.ndarray:
    """A row's 1,440 per-minute counts."""
    return _non_negative(row[4:], lambda i: f"{path}, line {line}: minute {i + 1}", "a count")


def _non_negative(texts: list[str | None], where: Callable[[int], str], what: str) -> np.ndarray:
    """A trace's cells as finite numbers >= 0, or a ValueError saying, by ``where(index)``,
    which cell is not."""
    values = np.array([_float_or_nan(text) for text in texts])
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{where(i)} holds {texts[i]!r}, not {what} (a finite number >= 0)")
    return values


def _float_or_nan(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _azure(rng: np.random.Generator, b: int, t: int, p: Azure) -> np.ndarray:
    funcs = azure_functions(
        p.path, p.trigger, p.bins, p.scale_max, tuple(p.mean_range), tuple(p.std_range)
    )
    chosen = funcs[rng.integers(0, len(funcs), size=b)]
    return chosen[:, np.arange(t) % chosen.shape[1]]  # each its own, from its start, wrapped


def _sum(rng: np.random.Generator, b: int, t: int, p: Sum) -> np.ndarray:
    return sum(generate(part, rng, b, t, clip_to=p.part_max) for part in p.parts).astype(np.float64)


GENERATORS: dict[str, tuple[type, Generator]] = {
    "sinusoidal": (Sinusoidal, _sinusoidal),
    "normal": (Normal, _normal),
    "poisson": (Poisson, _poisson),
    "diurnal": (Diurnal, _diurnal),
    "bursty": (Bursty, _bursty),
    "step": (Step, _step),
    "replay": (Replay, _replay),
    "azure": (Azure, _azure),
    "sum": (Sum, _sum),
}


USER_KINDS = tuple(sorted(kind for kind in GENERATORS if kind != "sum"))
"""The kinds a scenario file or ``--workload`` may name: ``sum`` is the scenario's own, built
from other workloads for a pooled node (:meth:`Scenario.pooled`)."""


def validate_user(kind: str, params: Mapping[str, Any]) -> Any:
    """:func:`validate` for a workload a user wrote, which may not be an internal kind."""
    if kind not in USER_KINDS:
        raise ValueError(f"unknown workload kind {kind!r}; choose one of {list(USER_KINDS)}")
    return validate(kind, params)


def _expected_type(default: Any, value: Any) -> str | None:
    """What ``value`` should have been, judged by the parameter's default; None if it is."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return None if number and isinstance(value, int) else "a whole number"
    if isinstance(default, float):
        return None if number and math.isfinite(value) else "a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple) and default and not isinstance(default[0], tuple):  # a range
        same = isinstance(value, list | tuple) and len(value) == len(default)
        if same and all(_expected_type(0.0, v) is None for v in value):
            return None
        return f"a list of {len(default)} finite numbers"
    if isinstance(default, tuple) and default:  # levels: [[from_step, rate], ...]
        rows = isinstance(value, list | tuple) and all(
            isinstance(row, list | tuple)
            and len(row) == 2
            and _expected_type(0, row[0]) is None
            and _expected_type(0.0, row[1]) is None
            for row in value
        )
        return None if rows and value else "a list of [step, rate] pairs of numbers"
    return None  # parts: each one a workload, checked on its own


def _out_of_range(name: str, value: Any, limits: Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` against :func:`bounded` limits, if anything."""
    low, high, above = limits.get("low"), limits.get("high"), limits.get("above")
    if low is not None and value < low:
        return f"{name!r} must be >= {low}, got {value!r}"
    if high is not None and value > high:
        return f"{name!r} must be <= {high}, got {value!r}"
    if above is not None and value <= above:
        return f"{name!r} must be > {above}, got {value!r}"
    return None


def validate(kind: str, params: Mapping[str, Any]) -> Any:
    """Turn raw parameters into the generator's dataclass, naming any bad key."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown workload kind {kind!r}; choose one of {sorted(GENERATORS)}")
    cls, _ = GENERATORS[kind]
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(
                f"unknown parameter {key!r} for workload {kind!r}; allowed: {sorted(allowed)}"
            )
        expected = _expected_type(allowed[key].default, value)
        if expected:
            raise ValueError(
                f"parameter {key!r} of workload {kind!r} must be {expected}, got {value!r}"
            )
    values = {k: tuple(map(tuple, v)) if k == "levels" else v for k, v in params.items()}
    if kind == "sum":
        values["parts"] = tuple(params.get("parts", ()))
    for key in ("mean_range", "std_range"):
        if key in values:
            values[key] = tuple(values[key])
    spec = cls(**values)
    for name, f in allowed.items():
        problem = _out_of_range(name, getattr(spec, name), f.metadata)
        if problem:
            raise ValueError(f"parameter {problem} in workload {kind!r}")
    problem = getattr(spec, "problem", lambda: None)()
    if problem:
        raise ValueError(f"workload {kind!r}: {problem}")
    if kind in ("replay", "azure") and not spec.path:
        raise ValueError(f"workload {kind!r} needs 'path' (a CSV file)")
    if kind == "replay" and not spec.column:
        raise ValueError("workload 'replay' needs 'column' (the CSV column to replay)")
    return spec


def generate(
    spec: Any, rng: np.random.Generator, num_envs: int, steps: int, clip_to: int | None = 150
) -> np.ndarray:
    """Draw ``(num_envs, steps)`` arrivals for one (node, service); integers in ``[0, clip_to]``."""
    kind, params = spec.kind, spec.params
    values = validate(kind, params)
    _, fn = GENERATORS[kind]
    if kind in ("replay", "azure") and not Path(values.path).exists():
        raise ValueError(f"workload {kind!r}: file {values.path!r} does not exist")
    out = fn(rng, num_envs, steps, values)
    if clip_to is None:
        return out
    return np.clip(out, 0, clip_to).astype(np.int32)
