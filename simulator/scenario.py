"""Scenario files: the node graph, resources, services, workloads and timed events.

A scenario is plain YAML so that people can write one without reading code. Every error
names the offending field by its path (``nodes[2].neighbours[0]``) and says how to fix it,
because a typo in a scenario otherwise surfaces as a wrong number hours later.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

RewardKind = Literal["dfaas", "latency"]
ForwardSplit = Literal["floor", "exact"]
Arrivals = Literal["in_order", "interleaved"]
"""Order of a step's new requests at a node: the reference's segments (local by service, then
forwarded by neighbour and service) or all of them evenly mixed."""
EventKind = Literal["capacity", "fail", "add", "surge"]
"""What an event does to its node from step ``at`` (to ``until``, where it has one):
``capacity`` and ``surge`` scale its CPU and RAM, or its clients' arrivals, by ``factor``;
``fail`` takes it down; ``add`` brings it (back) up for good. Events apply in time order, an
``add`` before a ``fail`` of the same step, and a node whose first ``fail`` or ``add`` is an
``add`` joins then: absent before."""


MAX_QUEUE_CAPACITY = 10_000
"""The longest queue a node may have, in requests. The engine preallocates every queue slot
(about 84 bytes over its fields) for every node of every environment it steps at once, so a
queue of a billion asked for 149 GiB with two environments; 10,000 requests are minutes of
work at the bundled scenarios' rates, far past any latency target."""


MAX_STEPS = 1_000_000
"""The longest episode, in steps. Capacities and arrivals are drawn for every step when an
episode starts (about 300 bytes a step on dfaas-paise25, so 10^8 steps asked for 30 GiB);
a million steps is 11 days of 1-second steps."""

MAX_CLIPPED = 0.05
"""The share of a workload's requests the clip to ``max_arrivals`` may cut. The reference's
clip at 150 requests a step is part of its dynamics (it cuts under 1% of dfaas-paise25's
arrivals); a rate written above the clip is a mistake the file's reader would not see."""

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The engine computes in float32: a larger number becomes infinite mid-episode."""


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the field and the fix."""


@dataclass(frozen=True)
class ClippedNormal:
    """``clip(N(mean, std), min, max)``: the reference's per-request resource demand."""

    min: float
    mean: float
    max: float
    std: float


@dataclass(frozen=True)
class RequestClass:
    weight: float
    cpu: ClippedNormal
    ram: ClippedNormal


@dataclass(frozen=True)
class Service:
    name: str
    classes: tuple[RequestClass, ...]
    latency_target_ms: float | None = None

    @property
    def mean_cpu(self) -> float:
        """Mean CPU of one request over the class mix (the work unit of the fluid model)."""
        total = sum(c.weight for c in self.classes)
        return sum(c.weight * c.cpu.mean for c in self.classes) / total


@dataclass(frozen=True)
class Node:
    name: str
    cpu: float
    ram: float
    queue_capacity: int
    neighbours: tuple[str, ...]
    active: bool = True


@dataclass(frozen=True)
class Event:
    at: int
    kind: EventKind
    node: str
    factor: float = 1.0
    until: int | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload generator by name plus its parameters (validated by ``simulator.workloads``)."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[Node, ...]
    services: tuple[Service, ...]
    workloads: Mapping[tuple[str, str], WorkloadSpec]
    steps: int = 288
    step_seconds: float = 300.0
    links_ms: Mapping[frozenset[str], float] = field(default_factory=dict)
    events: tuple[Event, ...] = ()
    reward: RewardKind = "dfaas"
    forward_split: ForwardSplit = "floor"
    arrivals: Arrivals = "in_order"
    reject_penalty: float = 4.0
    description: str = ""
    max_arrivals: int = 150
    neighbour_slots: int = 0
    """Neighbour slots a node's policy sees (0: the mesh's own degree). More than the degree,
    the extra slots are masked: how a policy trained on a mesh of higher degree sees this
    one, as the operator pads a smaller mesh (see :meth:`with_slots`)."""

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def service_names(self) -> list[str]:
        return [s.name for s in self.services]

    @property
    def max_degree(self) -> int:
        return max((len(n.neighbours) for n in self.nodes), default=0)

    @property
    def models_latency(self) -> bool:
        return any(s.latency_target_ms is not None for s in self.services)

    def with_slots(self, slots: int) -> Scenario:
        """The same mesh, each node's policy given ``slots`` neighbour slots (at least the
        mesh's degree), the extra ones masked."""
        if slots < self.max_degree:
            raise ScenarioError(
                f"{self.name}: {slots} neighbour slots cannot hold its nodes' "
                f"{self.max_degree} neighbours"
            )
        return dataclasses.replace(self, neighbour_slots=slots)

    def with_workload(self, spec: WorkloadSpec) -> Scenario:
        """The same system fed by another workload on every (node, service)."""
        return dataclasses.replace(self, workloads={key: spec for key in self.workloads})

    @property
    def is_static(self) -> bool:
        """No timed events and every node up from the start: the system the reference's
        GlobalNode bound pools."""
        return not self.events and all(n.active for n in self.nodes)

    def pooled(self) -> Scenario:
        """One node holding all resources and all arrivals: the reference GlobalNode bound.
        Only of a static system: a node's failure, surge or arrival has no place in one
        node, and pooled without them it would bound a workload no policy saw."""
        if not self.is_static:
            raise ScenarioError(
                f"{self.name}: the global-node bound pools a static system, and this scenario "
                "has timed events or nodes down from the start, which one pooled node cannot "
                "carry; bound a copy of it without them"
            )
        pooled_node = Node(
            name="global",
            cpu=sum(n.cpu for n in self.nodes),
            ram=sum(n.ram for n in self.nodes),
            queue_capacity=sum(n.queue_capacity for n in self.nodes),
            neighbours=(),
        )
        specs = {}
        for svc in self.service_names:
            parts = [self.workloads[(n, svc)] for n in self.node_names]
            specs[("global", svc)] = WorkloadSpec(
                "sum", {"parts": parts, "part_max": self.max_arrivals}
            )
        return dataclasses.replace(
            self,
            name=f"{self.name}:pooled",
            nodes=(pooled_node,),
            workloads=specs,
            links_ms={},
            events=(),
            max_arrivals=self.max_arrivals * len(self.nodes),
            neighbour_slots=0,
        )


# --------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Walks a YAML mapping, remembering the path so errors can name the field."""

    def __init__(self, data: Any, path: str, scenario: str):
        self.path = path
        self.scenario = scenario
        if not isinstance(data, Mapping):
            self.fail(f"expected a mapping, got {type(data).__name__}")
        self.data = data
        self.used: set[str] = set()

    def fail(self, message: str, key: str | None = None) -> None:
        where = f"{self.path}.{key}" if key and self.path else (key or self.path or "<top>")
        raise ScenarioError(f"scenario {self.scenario!r}: field '{where}': {message}")

    def child_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., fix: str = ""):
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                self.fail(f"is required{'; ' + fix if fix else ''}", key)
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                self.fail(f"is too large a number: {str(value)[:20]}...", key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            if kind in (int, float) and isinstance(value, str) and _number_text(value):
                fix = fix or "YAML reads a number such as 1e3 as text: write 1000 or 1.0e+3"
            self.fail(f"expected {names}, got {value!r}{'; ' + fix if fix else ''}", key)
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(f"expected a finite number, got {value!r}", key)
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            self.fail(
                f"expected a number within float32's range (|x| <= {FLOAT32_MAX:.3g}), which "
                f"the simulator computes in, got {value!r}",
                key,
            )
        return value

    def positive(self, key: str, kind: type, default: Any = ..., allow_zero: bool = False):
        value = self.get(key, kind, default)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            self.fail(f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", key)
        return value

    def queue_capacity(self, default: int) -> int:
        """Zero is a node without a queue: what a step cannot serve at once is rejected."""
        value = self.positive("queue_capacity", int, default, allow_zero=True)
        if value > MAX_QUEUE_CAPACITY:
            self.fail(
                f"at most {MAX_QUEUE_CAPACITY} requests, got {value}: the simulator keeps a "
                "slot per queued request in every environment it steps",
                "queue_capacity",
            )
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            self.fail(f"must be one of {list(options)}, got {value!r}", key)
        return value

    def sub(self, key: str) -> _Reader:
        self.used.add(key)
        return _Reader(self.data.get(key), self.child_path(key), self.scenario)

    def items(self, key: str, default: Any = ...) -> list[tuple[str, Any]]:
        value = self.get(key, list, default)
        return [(f"{self.child_path(key)}[{i}]", v) for i, v in enumerate(value or [])]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            self.fail(f"unknown key(s) {unknown}; allowed: {sorted(self.used)}")


def _read_normal(r: _Reader) -> ClippedNormal:
    d = ClippedNormal(
        min=r.get("min", float),
        mean=r.get("mean", float),
        max=r.get("max", float),
        std=r.positive("std", float, allow_zero=True),
    )
    if not d.min <= d.mean <= d.max:
        r.fail(f"needs min <= mean <= max, got {d.min}, {d.mean}, {d.max}")
    if d.min <= 0:
        r.fail(f"min must be > 0 (a request always costs something), got {d.min}", "min")
    r.done()
    return d


def _read_service(r: _Reader) -> Service:
    name = r.get("name", str)
    classes = []
    for path, raw in r.items("request_classes"):
        c = _Reader(raw, path, r.scenario)
        classes.append(
            RequestClass(
                weight=c.positive("weight", float, 1.0),
                cpu=_read_normal(c.sub("cpu")),
                ram=_read_normal(c.sub("ram")),
            )
        )
        c.done()
    if not classes:
        r.fail("needs at least one request class", "request_classes")
    target = r.positive("latency_target_ms", float, None)
    r.done()
    return Service(name=name, classes=tuple(classes), latency_target_ms=target)


def _read_workload(raw: Any, path: str, scenario: str) -> WorkloadSpec:
    from simulator import workloads  # local import: workloads imports this module's types

    r = _Reader(raw, path, scenario)
    kind = r.get("kind", str, fix=f"one of {list(workloads.USER_KINDS)}")
    params = {k: v for k, v in r.data.items() if k != "kind"}
    try:
        workloads.validate_user(kind, params)
    except ValueError as exc:
        r.fail(str(exc))
    return WorkloadSpec(kind=kind, params=params)


def parse_scenario(data: Any, name: str = "<inline>", base_dir: Path | None = None) -> Scenario:
    """Build a validated :class:`Scenario` from parsed YAML."""
    r = _Reader(data, "", name)
    name = r.get("name", str, name)
    r.scenario = name
    defaults = r.sub("defaults") if "defaults" in r.data else None
    default_queue = defaults.queue_capacity(100) if defaults else 100
    default_cpu = defaults.positive("cpu", float, 1000.0) if defaults else 1000.0
    default_ram = defaults.positive("ram", float, 8000.0) if defaults else 8000.0
    if defaults:
        defaults.done()

    nodes: list[Node] = []
    for path, raw in r.items("nodes"):
        n = _Reader(raw, path, name)
        nodes.append(
            Node(
                name=n.get("name", str),
                cpu=n.positive("cpu", float, default_cpu),
                ram=n.positive("ram", float, default_ram),
                queue_capacity=n.queue_capacity(default_queue),
                neighbours=tuple(n.get("neighbours", list, [])),
                active=n.get("active", bool, True),
            )
        )
        n.done()
    if not nodes:
        r.fail("needs at least one node", "nodes")
    names = [n.name for n in nodes]
    if "" in names:
        r.fail("a node needs a name that is not empty", f"nodes[{names.index('')}].name")
    if len(set(names)) != len(names):
        r.fail(f"node names must be unique, got {names}", "nodes")
    for i, node in enumerate(nodes):
        for k, other in enumerate(node.neighbours):
            where = f"nodes[{i}].neighbours[{k}]"
            if other not in names:
                r.fail(f"unknown node {other!r}; known nodes: {names}", where)
            if other == node.name:
                r.fail("a node cannot be its own neighbour", where)
            if node.name not in nodes[names.index(other)].neighbours:
                r.fail(
                    f"links are symmetric: add {node.name!r} to the neighbours of {other!r}", where
                )
        if len(set(node.neighbours)) != len(node.neighbours):
            r.fail("duplicate neighbour", f"nodes[{i}].neighbours")

    services = [_read_service(_Reader(raw, p, name)) for p, raw in r.items("services")]
    if not services:
        r.fail("needs at least one service", "services")
    svc_names = [s.name for s in services]
    if len(set(svc_names)) != len(svc_names):
        r.fail(f"service names must be unique, got {svc_names}", "services")

    links: dict[frozenset[str], float] = {}
    for path, raw in r.items("links", []):
        lr = _Reader(raw, path, name)
        between = lr.get("between", list)
        if len(between) != 2 or any(b not in names for b in between):
            lr.fail(f"must name two known nodes, got {between}; known: {names}", "between")
        if between[1] not in nodes[names.index(between[0])].neighbours:
            lr.fail(f"{between[0]!r} and {between[1]!r} are not neighbours", "between")
        if frozenset(between) in links:
            lr.fail(f"a second link between {between[0]!r} and {between[1]!r}", "between")
        links[frozenset(between)] = lr.positive("latency_ms", float, allow_zero=True)
        lr.done()

    wr = r.sub("workload")
    default_spec = (
        _read_workload(wr.data["default"], f"{wr.path}.default", name)
        if "default" in wr.data
        else None
    )
    wr.used.add("default")
    overrides: dict[tuple[str, str], WorkloadSpec] = {}
    where: dict[tuple[str, str], str] = {}  # (node, service) -> the field its workload is in
    for path, raw in wr.items("overrides", []):
        o = _Reader(raw, path, name)
        node = o.get("node", str)
        if node not in names:
            o.fail(f"unknown node {node!r}; known nodes: {names}", "node")
        svc = o.get("service", str, svc_names[0])
        if svc not in svc_names:
            o.fail(f"unknown service {svc!r}; known services: {svc_names}", "service")
        if (node, svc) in overrides:
            o.fail(f"a second override for node {node!r}, service {svc!r}; the first is at "
                   f"{where[(node, svc)].removesuffix('.workload')}")  # fmt: skip
        overrides[(node, svc)] = _read_workload(o.data.get("workload"), f"{path}.workload", name)
        where[(node, svc)] = f"{path}.workload"
        o.used.add("workload")
        o.done()
    wr.done()
    workload_map = {}
    for node in names:
        for svc in svc_names:
            spec = overrides.get((node, svc), default_spec)
            if spec is None:
                wr.fail(
                    f"no workload for node {node!r}, service {svc!r}: give 'default' or an override"
                )
            workload_map[(node, svc)] = spec
            where.setdefault((node, svc), f"{wr.path}.default")
    if base_dir is not None:
        workload_map = {k: _resolve_paths(v, base_dir) for k, v in workload_map.items()}

    steps = r.positive("steps", int, 288)
    if steps > MAX_STEPS:
        r.fail(
            f"at most {MAX_STEPS} steps, got {steps}: every step's capacities and arrivals "
            "are drawn when an episode starts; run a longer horizon as several episodes",
            "steps",
        )
    events: list[Event] = []
    for path, raw in r.items("events", []):
        e = _Reader(raw, path, name)
        ev = Event(
            at=e.positive("at", int, allow_zero=True),
            kind=e.choice("kind", ("capacity", "fail", "add", "surge"), "capacity"),
            node=e.get("node", str),
            factor=e.positive("factor", float, 1.0, allow_zero=True),
            until=e.positive("until", int, None),
        )
        if ev.node not in names:
            e.fail(f"unknown node {ev.node!r}; known nodes: {names}", "node")
        if ev.at >= steps:
            e.fail(f"must be < steps ({steps}), got {ev.at}", "at")
        if ev.until is not None and ev.until <= ev.at:
            e.fail(f"must be > at ({ev.at}), got {ev.until}", "until")
        if ev.kind == "add" and ev.until is not None:
            e.fail("an add lasts: a node leaves with a fail event at that step", "until")
        if ev.kind in ("fail", "add") and "factor" in e.data:
            e.fail(f"a {ev.kind} event has no factor: remove it", "factor")
        e.done()
        events.append(ev)

    scenario = Scenario(
        name=name,
        description=r.get("description", str, ""),
        nodes=tuple(nodes),
        services=tuple(services),
        workloads=workload_map,
        steps=steps,
        step_seconds=r.positive("step_seconds", float, 300.0),
        links_ms=links,
        events=tuple(sorted(events, key=lambda ev: ev.at)),  # in time order, as they happen
        reward=r.choice("reward", ("dfaas", "latency"), "dfaas"),
        forward_split=r.choice("forward_split", ("floor", "exact"), "floor"),
        arrivals=r.choice("arrivals", ("in_order", "interleaved"), "in_order"),
        reject_penalty=r.positive("reject_penalty", float, 4.0),
        max_arrivals=r.positive("max_arrivals", int, 150),
    )
    r.done()
    if scenario.reward == "latency":
        if not scenario.models_latency:
            r.fail("reward 'latency' needs latency_target_ms on every service", "reward")
        for i, service in enumerate(scenario.services):
            if service.latency_target_ms is None:
                r.fail(
                    "reward 'latency' needs latency_target_ms on every service: give "
                    f"{service.name!r} one",
                    f"services[{i}].latency_target_ms",
                )
    _check_draws(scenario, where, name)
    return scenario


CHECKED_DRAWS = 20_000
"""Steps of arrivals drawn per workload to check a scenario: episodes enough that the clip's
expected cut shows (rare bursts, one function of a trace among many, random phases), and
always one whole episode, up to ``MAX_STEPS``."""


def _check_draws(scenario: Scenario, where: Mapping[tuple[str, str], str], name: str) -> None:
    """Draw every workload's episodes now: a trace file that is missing or lacks its column is
    refused naming the field, not found mid-run; so is a workload that draws numbers too
    large to be counts, or that the clip to ``max_arrivals`` would cut, on average over
    episodes, by more than ``MAX_CLIPPED`` of its requests (traffic other than the one
    written, silently). So are capacity events whose factors together take a node's CPU past
    float32's range."""
    from simulator import workloads
    from simulator.env import Timeline, surged_arrivals

    limit = scenario.max_arrivals
    steps = scenario.steps
    envs = int(np.clip(CHECKED_DRAWS // steps, 1, 256))
    with np.errstate(over="ignore"):  # refused below, by name
        timeline = Timeline.of(scenario)
    for j, node in enumerate(scenario.node_names):
        peak = max(float(timeline.cpu[:, j].max()), float(timeline.ram[:, j].max()))
        if not peak <= FLOAT32_MAX:
            raise ScenarioError(
                f"scenario {name!r}: field 'events': the capacity events of node {node!r} "
                f"multiply its cpu or ram past float32's range ({FLOAT32_MAX:.3g}), which the "
                "simulator computes in: use smaller factors"
            )
    if not timeline.active.any():
        raise ScenarioError(
            f"scenario {name!r}: field 'nodes': no node is ever active, so no request "
            "arrives and every episode is empty: set 'active: true' on a node or add one "
            "with an add event"
        )
    for (node, svc), spec in scenario.workloads.items():
        field = where[(node, svc)]
        rng = np.random.default_rng(0)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                draw = workloads.generate(spec, rng, envs, steps, clip_to=None)
                # what arrives: (B, T) surged by the node's events
                draw = surged_arrivals(draw, timeline.surge[:, scenario.node_names.index(node)])
        except (ValueError, KeyError, OSError, OverflowError) as error:
            raise ScenarioError(f"scenario {name!r}: field '{field}': {error}") from None
        if not np.isfinite(draw).all():
            raise ScenarioError(
                f"scenario {name!r}: field '{field}': node {node!r}, service {svc!r} draws "
                "arrivals that are not finite (its numbers overflow): lower the workload"
            )
        total = float(np.sum(draw))
        cut = (total - float(np.sum(np.minimum(draw, limit)))) / max(total, 1.0)
        if cut > MAX_CLIPPED:
            raise ScenarioError(
                f"scenario {name!r}: field '{field}': node {node!r}, service {svc!r} draws "
                f"{_count(float(np.mean(draw)))} "
                f"requests a step on average (surges included), and max_arrivals ({limit}) "
                f"would cut {cut:.0%} of them: raise max_arrivals or lower the workload"
            )


def _number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _count(x: float) -> str:
    """A count for a message: whole, unless it would take more digits than anyone reads."""
    return f"{x:.0f}" if x < 1e9 else f"{x:.3g}"


def _resolve_paths(spec: WorkloadSpec, base_dir: Path) -> WorkloadSpec:
    path = spec.params.get("path")
    if isinstance(path, str) and not Path(path).is_absolute():
        return WorkloadSpec(spec.kind, {**spec.params, "path": str(base_dir / path)})
    return spec


def bundled_names() -> list[str]:
    """Names of the scenarios shipped with the package."""
    folder = resources.files("simulator") / "scenarios"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a bundled scenario by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.exists():
            raise ScenarioError(f"scenario file {str(path)!r} does not exist")
        text, base = path.read_text(), path.parent
    else:
        resource = resources.files("simulator") / "scenarios" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ScenarioError(
                f"unknown scenario {str(name_or_path)!r}; bundled: {bundled_names()} "
                "(or give a path to a .yaml file)"
            )
        text, base = resource.read_text(), None
    data = _parse_yaml(text, str(name_or_path))
    return parse_scenario(_resolve_extends(data, str(name_or_path)), name=path.stem, base_dir=base)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML in which a key written twice in one mapping is an error: PyYAML keeps the
    last one silently, so the first ``steps:`` of a file would not be the one simulated."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ScenarioError(f"scenario {origin!r} is not valid YAML: {exc}") from exc


def _resolve_extends(data: Any, origin: str, depth: int = 0) -> Any:
    """``extends: NAME`` starts from a bundled scenario and replaces its top-level keys, so a
    change scenario states only what changes."""
    if not isinstance(data, Mapping) or "extends" not in data:
        return data
    if depth > 5:
        raise ScenarioError(f"scenario {origin!r}: field 'extends': chain too deep (a cycle?)")
    base_name = data["extends"]
    resource = resources.files("simulator") / "scenarios" / f"{base_name}.yaml"
    if not isinstance(base_name, str) or not resource.is_file():
        raise ScenarioError(
            f"scenario {origin!r}: field 'extends': unknown bundled scenario {base_name!r}; "
            f"bundled: {bundled_names()}"
        )
    base = _resolve_extends(_parse_yaml(resource.read_text(), base_name), base_name, depth + 1)
    # Not the base's name: a variant called like its base would write over the base's runs
    # (runs/<scenario>__...). Unnamed, it is called after its file.
    own = {k: v for k, v in base.items() if k not in ("name", "description")}
    return {**own, **{k: v for k, v in data.items() if k != "extends"}}
