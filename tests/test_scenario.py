import pytest

from simulator.scenario import ScenarioError, bundled_names, load_scenario, parse_scenario

BASE = {
    "name": "tiny",
    "nodes": [{"name": "a", "neighbours": ["b"]}, {"name": "b", "neighbours": ["a"]}],
    "services": [
        {
            "name": "f",
            "request_classes": [
                {
                    "cpu": {"min": 1, "mean": 2, "max": 3, "std": 1},
                    "ram": {"min": 1, "mean": 2, "max": 3, "std": 1},
                }
            ],
        }
    ],
    "workload": {"default": {"kind": "poisson", "rate": 5}},
}


def with_changes(**changes):
    return {**BASE, **changes}


def test_every_bundled_scenario_loads():
    names = bundled_names()
    assert {"dfaas-paise25", "dfaas-2", "mesh-10x3", "mesh-10x3-capacity-drop"} <= set(names)
    for name in names:
        assert load_scenario(name).name == name


def test_reference_topology_keeps_adjacency_order(paise):
    assert [n.neighbours for n in paise.nodes][3] == ("node_2", "node_0")
    assert paise.max_degree == 3


def test_extends_replaces_only_given_keys():
    drop = load_scenario("mesh-10x3-capacity-drop")
    base = load_scenario("mesh-10x3")
    assert drop.nodes == base.nodes and len(drop.events) == 1 and drop.events[0].factor == 0.5


def test_an_unnamed_variant_is_called_after_its_file_not_its_base(tmp_path, monkeypatch):
    """Called like its base, a variant's runs would go to (and resume) the base's folder."""
    variant = tmp_path / "my-variant.yaml"
    variant.write_text("extends: mesh-10x3\nsteps: 20\n")
    assert load_scenario(variant).name == "my-variant"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mesh-10x3").mkdir()  # a folder called like a bundled scenario (--out)
    assert load_scenario("mesh-10x3").name == "mesh-10x3"


def test_arrival_order_defaults_to_the_reference():
    assert parse_scenario(BASE, "tiny").arrivals == "in_order"
    assert parse_scenario(with_changes(arrivals="interleaved"), "tiny").arrivals == "interleaved"


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        (
            with_changes(nodes=[{"name": "a", "neighbours": ["c"]}, {"name": "b"}]),
            "nodes[0].neighbours[0]",
            "known nodes",
        ),
        (
            with_changes(nodes=[{"name": "a", "neighbours": ["b"]}, {"name": "b"}]),
            "nodes[0].neighbours[0]",
            "symmetric",
        ),
        (
            with_changes(workload={"default": {"kind": "poisson", "rat": 5}}),
            "workload.default",
            "allowed",
        ),
        (with_changes(workload={"default": {"kind": "sine"}}), "workload.default", "choose one of"),
        (  # the pooled node's own kind, which crashed when a file named it
            with_changes(workload={"default": {"kind": "sum", "parts": [{"kind": "poisson"}]}}),
            "workload.default",
            "unknown workload kind 'sum'",
        ),
        (with_changes(steps=0), "steps", "> 0"),
        (with_changes(reward="latency"), "reward", "latency_target_ms"),
        (  # one service with a target is not every one: the others' rewards were NaN
            with_changes(
                reward="latency",
                services=[
                    {**BASE["services"][0], "latency_target_ms": 100},
                    {**BASE["services"][0], "name": "g"},
                ],
            ),
            "services[1].latency_target_ms",
            "reward 'latency' needs",
        ),
        (
            with_changes(events=[{"at": 5, "kind": "fail", "node": "z"}]),
            "events[0].node",
            "known nodes",
        ),
        (with_changes(colour="blue"), "<top>", "unknown key"),
        (with_changes(arrivals="mixed"), "arrivals", "'in_order', 'interleaved'"),
        # Found by mutating the bundled files field by field: each once got past the reader
        # and failed later (a TypeError, NaN request-class draws, a 149 GiB queue array).
        (
            with_changes(workload={"default": {"kind": "diurnal", "period": "x"}}),
            "workload.default",
            "'period' of workload 'diurnal' must be a whole number",
        ),
        (
            with_changes(workload={"default": {"kind": "poisson", "rate": True}}),
            "workload.default",
            "must be a finite number",
        ),
        (
            with_changes(workload={"default": {"kind": "poisson", "rate": float("inf")}}),
            "workload.default",
            "must be a finite number",
        ),
        (
            with_changes(workload={"default": {"kind": "step", "poisson": "yes"}}),
            "workload.default",
            "true or false",
        ),
        (
            with_changes(workload={"default": {"kind": "step", "levels": [[0, float("nan")]]}}),
            "workload.default",
            "[step, rate] pairs",
        ),
        (
            with_changes(workload={"default": {"kind": "step", "levels": [[0, "x"]]}}),
            "workload.default",
            "[step, rate] pairs",
        ),
        (
            with_changes(
                workload={"default": {"kind": "azure", "path": "a.csv", "mean_range": [1]}}
            ),
            "workload.default",
            "a list of 2 finite numbers",
        ),
        (with_changes(defaults={"cpu": float("nan")}), "defaults.cpu", "finite"),
        (
            with_changes(defaults={"queue_capacity": 10**9}),
            "defaults.queue_capacity",
            "at most 10000",
        ),
        (
            with_changes(
                nodes=[
                    {"name": "a", "neighbours": ["b"], "queue_capacity": 20_000},
                    {"name": "b", "neighbours": ["a"]},
                ]
            ),
            "nodes[0].queue_capacity",
            "a slot per queued request",
        ),
        ({k: v for k, v in BASE.items() if k != "services"}, "services", "required"),
        # Loaded, it trained on empty episodes: no node took a request, every reward was 1.
        (
            with_changes(nodes=[{**n, "active": False} for n in BASE["nodes"]]),
            "nodes",
            "no node is ever active",
        ),
        # Each ran out of memory (tens of GiB) or overflowed float32 to inf mid-episode.
        (with_changes(steps=10**8), "steps", "at most 1000000"),
        (with_changes(defaults={"cpu": 1e39}), "defaults.cpu", "float32"),
        (with_changes(step_seconds=-1e39), "step_seconds", "float32"),
        (
            with_changes(events=[{"at": 2, "kind": "add", "node": "a", "until": 5}]),
            "events[0].until",
            "a fail event",
        ),
    ],
)
def test_bad_scenarios_name_the_field(data, field, hint):
    with pytest.raises(ScenarioError) as err:
        parse_scenario(data, "tiny")
    assert f"field '{field}'" in str(err.value) and hint in str(err.value)


def test_a_node_may_have_no_queue_by_default_or_by_name():
    """Zero was accepted on a node and refused under defaults, for the same meaning."""
    by_default = parse_scenario(with_changes(defaults={"queue_capacity": 0}), "tiny")
    assert [n.queue_capacity for n in by_default.nodes] == [0, 0]


def test_nodes_inactive_at_the_start_are_fine_when_one_is_added():
    data = with_changes(
        nodes=[{**n, "active": False} for n in BASE["nodes"]],
        events=[{"at": 3, "kind": "add", "node": "b"}],
    )
    assert not any(n.active for n in parse_scenario(data, "tiny").nodes)


def test_unknown_bundled_name_lists_the_choices():
    with pytest.raises(ScenarioError, match=r"bundled: .*dfaas-paise25"):
        load_scenario("no-such-scenario")


def test_the_clip_check_counts_the_arrivals_the_simulator_keeps_after_its_zero_floor():
    """A sine that dips below zero draws negative counts, which the simulator floors at 0:
    counted as they were drawn, they shrank the total, so a clip of 3% of what arrives read
    as 10% and the file was refused (and a mostly negative one read as a cut of 22500%)."""
    low = with_changes(
        workload={"default": {"kind": "sinusoidal", "average": 10, "amplitude": 150}}
    )
    assert parse_scenario(low, "tiny").max_arrivals == 150
    deep = with_changes(
        workload={"default": {"kind": "sinusoidal", "average": -16, "amplitude": 300}}
    )
    with pytest.raises(ScenarioError, match=r"draws \d+ requests a step .* would cut \d\d?%"):
        parse_scenario(deep, "tiny")


def test_the_clip_check_counts_a_surge_as_the_simulator_applies_it(tmp_path):
    """A surge multiplies a node's arrivals before the clip: doubling dfaas-2's node_0 cut a
    third of its surged requests, where the file without the event passes."""
    surged, calm = tmp_path / "surged.yaml", tmp_path / "calm.yaml"
    surged.write_text("extends: dfaas-2\nevents: [{at: 0, kind: surge, node: node_0, factor: 2}]\n")
    calm.write_text("extends: dfaas-2\n")
    with pytest.raises(ScenarioError, match=r"surges included.*would cut 3\d%"):
        load_scenario(str(surged))
    assert load_scenario(str(calm)).events == ()


def test_a_workload_the_arrival_clip_would_cut_is_refused_naming_max_arrivals():
    """A rate above ``max_arrivals`` would be flattened to it, silently: the file's traffic
    would not be the one simulated. The reference's own clip (under 1% cut) stays."""
    heavy = with_changes(workload={"default": {"kind": "poisson", "rate": 200}})
    with pytest.raises(
        ScenarioError, match=r"field 'workload\.default': .*max_arrivals \(150\) would"
    ):
        parse_scenario(heavy, "tiny")
    assert parse_scenario({**heavy, "max_arrivals": 400}, "tiny").max_arrivals == 400
    override = with_changes(
        workload={
            "default": {"kind": "poisson", "rate": 5},
            "overrides": [{"node": "b", "workload": {"kind": "poisson", "rate": 300}}],
        }
    )
    with pytest.raises(
        ScenarioError, match=r"field 'workload\.overrides\[0\]\.workload': node 'b'"
    ):
        parse_scenario(override, "tiny")


def test_a_trace_that_cannot_be_read_is_refused_naming_its_field(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("rps\n3\n4\n")
    data = with_changes(
        workload={"default": {"kind": "replay", "path": "trace.csv", "column": "rps"}}
    )
    assert parse_scenario(data, "tiny", base_dir=tmp_path).workloads[("a", "f")].kind == "replay"
    with pytest.raises(ScenarioError, match=r"field 'workload\.default': .*does not exist"):
        parse_scenario(data, "tiny", base_dir=tmp_path / "elsewhere")
    data["workload"]["default"]["column"] = "rpz"
    with pytest.raises(ScenarioError, match=r"field 'workload\.default': .*rpz"):
        parse_scenario(data, "tiny", base_dir=tmp_path)


def test_the_clip_check_sees_traffic_late_in_a_long_episode():
    """The check drew the first 10,000 steps only: a jump at step 10,000 that the clip cuts
    to a trickle loaded silently."""
    late = with_changes(
        steps=30_000, workload={"default": {"kind": "step", "levels": [[0, 10], [10_000, 5000]]}}
    )
    with pytest.raises(ScenarioError, match=r"field 'workload\.default': .*would cut 9\d%"):
        parse_scenario(late, "tiny")


def test_the_clip_check_judges_the_expected_cut_not_one_episode_s_luck():
    """Rare bursts the clip cuts by a quarter of all requests on average: one seeded episode
    of 20 steps happened to have none, and the file loaded."""
    bursty = with_changes(
        steps=20,
        workload={
            "default": {
                "kind": "bursty",
                "calm_rate": 10,
                "burst_rate": 1000,
                "p_burst": 0.002,
                "p_calm": 0.5,
            }
        },
    )
    with pytest.raises(ScenarioError, match=r"field 'workload\.default': .*would cut"):
        parse_scenario(bursty, "tiny")


@pytest.mark.parametrize(
    "workload",
    [
        {"kind": "normal", "mean": 1.0e308, "std": 1.0e308},
        {"kind": "sinusoidal", "amplitude": 1.0e308, "noise_ratio": 10.0},
    ],
)
def test_a_workload_that_overflows_is_refused_not_clipped_silently(workload):
    """Draws past float64's range made the cut inf / inf = NaN, which no limit exceeds: every
    step then arrived clipped to max_arrivals."""
    with pytest.raises(ScenarioError, match=r"field 'workload\.default': .*not finite"):
        parse_scenario(with_changes(workload={"default": workload}), "tiny")


def test_capacity_events_that_multiply_past_float32_are_refused():
    """Each factor is in range, their product is not: the node's CPU became infinite and an
    episode processed 539% of its requests."""
    events = [{"at": 1, "kind": "capacity", "node": "a", "factor": 1.0e30}] * 3
    with pytest.raises(ScenarioError, match=r"field 'events': .*node 'a'.*float32"):
        parse_scenario(with_changes(steps=20, events=events), "tiny")


def test_a_number_too_large_for_a_float_is_refused_by_name():
    with pytest.raises(ScenarioError, match=r"field 'defaults\.cpu': .*too large"):
        parse_scenario(with_changes(defaults={"cpu": 10**400}), "tiny")


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        (
            {"workload": {"default": {"kind": "poisson", "rate": 5}, "overrides": [
                {"node": "a", "workload": {"kind": "poisson", "rate": 1}},
                {"node": "a", "workload": {"kind": "poisson", "rate": 9}},
            ]}},
            "workload.overrides[1]",
            "the first is at workload.overrides[0]",
        ),
        (
            {"links": [{"between": ["a", "b"], "latency_ms": 1},
                       {"between": ["b", "a"], "latency_ms": 50}]},
            "links[1].between",
            "a second link",
        ),
        (
            {"steps": 20, "events": [{"at": 2, "kind": "fail", "node": "a", "factor": 0.5}]},
            "events[0].factor",
            "no factor",
        ),
        (
            {"nodes": [{"name": "", "neighbours": []}]},
            "nodes[0].name",
            "not empty",
        ),
        ({"defaults": {"cpu": "1e3"}}, "defaults.cpu", "write 1000 or 1.0e+3"),
    ],
    ids=["override twice", "link twice", "factor on a fail", "empty name", "1e3 as text"],
)  # fmt: skip
def test_what_would_be_silently_ignored_is_refused_by_name(change, field, hint):
    """The last of two overrides or links won, a fail event's factor did nothing, and YAML's
    1e3 (text to PyYAML) was refused without saying why."""
    with pytest.raises(ScenarioError) as err:
        parse_scenario(with_changes(**change), "tiny")
    assert f"field '{field}'" in str(err.value) and hint in str(err.value)


def test_a_key_written_twice_in_a_scenario_file_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("extends: dfaas-2\nsteps: 100\nsteps: 50\n")
    with pytest.raises(ScenarioError, match=r"not valid YAML: key 'steps' appears twice"):
        load_scenario(str(path))
