"""The live loop in the simulator: per-node telemetry from the engine, and the adapt CLI end
to end on a short scenario with one change."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from policies.adaptation import IntervalTelemetry, model_rows
from policies.model_env import RAMP_FROM_UTILISATION, SAFE_UTILISATION
from policies.system_model import BACKLOG, MEAN_MS, SERVICE_MS, UTILISATION
from simulator import adapt
from simulator.env import EdgeEnv
from simulator.scenario import load_scenario


def test_server_stats_add_up_to_the_routing_agents_view():
    scenario = load_scenario("mesh-10x3")
    env = EdgeEnv(scenario, num_envs=2, action_mode="neighbours", seed=3, track_servers=True)
    env.reset()
    rng = np.random.default_rng(0)
    mask = env.action_mask()
    link_ms = 0.0  # client-side latency beyond the server's: the links of forwarded requests
    for _ in range(20):
        w = rng.dirichlet(np.ones(mask.shape[1]), size=(2, mask.shape[0])) * mask
        _, _, _, info = env.step(w)
        server, out = info["server"], env.last_outcome
        # Every request arriving at a node was sent there by some agent.
        sent = info["local"] + np.einsum("bnks->bns", env.topology.other_end(info["forward"]))
        assert np.array_equal(server.incoming, sent)
        # Same served requests, counted by server or by sender; latency differs by the link.
        assert server.count.sum() == out.latency_count.sum()
        assert server.hist.sum() == server.count.sum() == server.service_hist.sum()
        link_ms += out.latency_sum_ms.sum() - server.sum_ms.sum()
        assert link_ms >= -1e-6
        rejected = info["lost"].sum() - info["reject"].sum()
        assert server.rejected.sum() == rejected
    assert link_ms > 20 * 2  # half the requests are forwarded, over links of 1 ms or more


def test_model_rows_average_the_rate_and_cpu_measurements_of_utilisation():
    incoming = np.array([[40.0], [10.0], [30.0]])  # requests/s of work 10, capacity 1000
    tel = IntervalTelemetry(
        offered=incoming,
        incoming=incoming,
        rejected=np.zeros((3, 1)),
        mean_ms=np.full((3, 1), 20.0),
        p95_ms=np.full((3, 1), 60.0),
        capacity=np.array([1000.0, 1000.0, 0.0]),
        backlog_start=np.array([0.0, 1.0, 0.0]),
        backlog_end=np.array([0.5, 0.0, 0.0]),
        mesh=None,
        busy=np.array([0.3, np.nan, 0.0]),
    )
    features = model_rows(tel, np.array([10.0]), seconds=5.0).features
    # node 0: 0.4 by rate, 0.3 busy + 0.1 of queue growth by CPU; node 1: CPU not measured;
    # node 2: down
    assert np.allclose(features[:2, 0], [0.4, 0.1]) and np.isnan(features[2, 0])
    features = model_rows(dataclasses.replace(tel, busy=None), np.array([10.0]), 5.0).features
    assert np.allclose(features[:2, 0], [0.4, 0.1])
    tel = dataclasses.replace(tel, busy=np.array([0.5, 0.3, 0.0]))
    features = model_rows(tel, np.array([10.0]), seconds=5.0).features
    assert np.allclose(features[:2, 0], [(0.4 + 0.6) / 2, (0.1 + 0.1) / 2])


def test_model_rows_are_node_major_one_per_node_and_service():
    """A node's utilisation and backlog serve each of its services' rows; each row's service
    time is its service's work over its node's capacity."""
    incoming = np.array([[40.0, 10.0], [20.0, 5.0]])
    tel = IntervalTelemetry(
        offered=incoming,
        incoming=incoming,
        rejected=np.zeros((2, 2)),
        mean_ms=np.array([[10.0, 30.0], [12.0, 40.0]]),
        p95_ms=np.full((2, 2), 60.0),
        capacity=np.array([1000.0, 500.0]),
        backlog_start=np.array([0.0, 0.5]),
        backlog_end=np.zeros(2),
        mesh=None,
    )
    rows = model_rows(tel, np.array([10.0, 20.0]), seconds=5.0)
    assert rows.features[:, SERVICE_MS].tolist() == [10.0, 20.0, 20.0, 40.0]
    assert rows.features[:, BACKLOG].tolist() == [0.0, 0.0, 0.5, 0.5]
    assert np.allclose(rows.features[:, UTILISATION], [0.6, 0.6, 0.6, 0.6])
    assert rows.targets[:, MEAN_MS].tolist() == [10.0, 30.0, 12.0, 40.0]
    assert rows.requests.tolist() == [200.0, 50.0, 100.0, 25.0]  # each row's latency is over


def test_list_scenarios_prints_loadable_names(capsys):
    assert adapt.main(["--list-scenarios", "--json"]) == 0
    names = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(names) == set(adapt.CHANGE_SCENARIOS) and len(names) == 4
    for name in names:
        assert load_scenario(name).events


def test_adapt_runs_the_three_controllers_through_a_change(tmp_path, capsys):
    path = tmp_path / "short.yaml"
    path.write_text(
        "name: short-drop\nextends: mesh-10x3\nsteps: 60\n"
        "events:\n  - {at: 20, kind: capacity, node: edge-5, factor: 0.5}\n"
    )
    argv = ["--scenario", str(path), "--warmup", "24", "--horizon", "2", "--json"]
    assert adapt.main([*argv, "--plot", str(tmp_path / "adapt.png")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cycles"] == 12 and summary["change_cycles"] == [4]
    for key in (
        "rollout_cost_over_oracle_after_3_cycles",
        "base_cost_over_oracle_after_3_cycles",
        "slo_violations_after_3_cycles",
        "decision_ms_p95",
    ):
        assert summary[key] is not None
    # The base policy keeps the halved node's share; the oracle, re-solved, does not.
    assert summary["base_cost_over_oracle_after_3_cycles"] > 2
    assert summary["model_accuracy"]["rows"] > 0
    assert (tmp_path / "adapt.png").stat().st_size > 10_000
    # Same seed, same numbers.
    assert adapt.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["rollout_cost_per_request_s"] == summary["rollout_cost_per_request_s"]


def test_the_oracle_arm_plays_the_routing_re_solved_at_each_change(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(
        "name: short-drop\nextends: mesh-10x3\nsteps: 60\n"
        "events:\n  - {at: 20, kind: capacity, node: edge-5, factor: 0.5}\n"
    )
    args = adapt.build_parser().parse_args(["--scenario", str(path)])
    scenario, policy = adapt.load(args)
    schedule = adapt.oracle_schedule(scenario, seed=args.seed)
    before, after = schedule.weights_at(0), schedule.weights_at(20)
    assert np.abs(before - after).max() > 0.1  # the change moves the optimum
    cycles = adapt.run_arm("oracle", scenario, policy, args)
    for start, cycle in zip(range(0, 60, args.interval), cycles, strict=True):
        last_step = start + args.interval - 1  # a cycle reports the weights it ended with
        assert cycle.weights == np.round(schedule.weights_at(last_step), 4).tolist()


def test_slo_violations_are_counted_after_the_third_cycle_where_the_oracle_met_its_targets(
    tmp_path,
):
    path = tmp_path / "short.yaml"
    path.write_text(
        "name: short-drop\nextends: mesh-10x3\nsteps: 60\n"
        "events:\n  - {at: 20, kind: capacity, node: edge-5, factor: 0.5}\n"
    )
    missed = {"oracle": {8: ["auth"]}, "rollout": {8: ["auth"], 9: ["auth", "infer"]}}
    missed["base"] = {2: ["auth"], 10: ["resize"]}  # cycle 2: before the change
    results = {
        arm: [
            adapt.Cycle(1.0, 10.0, {}, 0.0, missed[arm].get(i, []), decision_ms=1.0)
            for i in range(12)
        ]
        for arm in adapt.ARMS
    }
    summary = adapt.summarise(load_scenario(str(path)), results, interval=5)
    assert summary["change_cycles"] == [4]  # so cycles 7..11 count
    assert summary["rollout_slo_violations_after_3_cycles"] == 2  # cycle 8 is the oracle's too
    assert summary["base_slo_violations_after_3_cycles"] == 1
    assert summary["slo_violations_after_3_cycles_by_arm"] == {
        "base": 1,
        "rollout": 3,
        "oracle": 1,
    }
    # A service without requests in a cycle has no p95: null in the per-cycle records.
    results["rollout"][9].p95_ms = {"auth": float("nan"), "infer": 250.0}
    records = adapt.cycle_report(load_scenario(str(path)), results, interval=5)
    assert records[9]["rollout"]["p95_ms"] == {"auth": None, "infer": 250.0}
    assert [r["counted"] for r in records] == [i >= 7 for i in range(12)]


def test_adapt_reports_a_scenario_without_changes(tmp_path, capsys):
    """A steady scenario has no post-change window: those figures are null, the rest stand."""
    path = tmp_path / "steady.yaml"
    path.write_text("name: steady\nextends: mesh-10x3\nsteps: 20\n")
    argv = ["--scenario", str(path), "--warmup", "16", "--horizon", "1", "--json"]
    assert adapt.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["change_cycles"] == [] and summary["cycles"] == 4
    assert summary["rollout_cost_over_oracle_after_3_cycles"] is None
    assert summary["slo_violations_after_3_cycles"] == 0
    assert summary["rollout_cost_per_request_s"] > 0


def short_surge(tmp_path) -> list[str]:
    """``simulator.adapt`` arguments for a 40-step surge (decided on the prior by default)."""
    path = tmp_path / "short.yaml"
    path.write_text(
        "name: short-surge\nextends: mesh-10x3\nsteps: 40\n"
        "events:\n  - {at: 10, kind: surge, node: edge-2, factor: 2.0}\n"
    )
    return ["--scenario", str(path), "--warmup", "16", "--horizon", "1", "--json"]


def test_rollout_decides_under_the_utilisation_cap_unless_it_is_off(tmp_path, monkeypatch):
    caps = []
    real = adapt.model_env_for

    def recording(*args, **kwargs):
        model_env = real(*args, **kwargs)  # what rollout decides on, not what it was asked
        caps.append((model_env.max_utilisation, model_env.ramp_from))
        return model_env

    monkeypatch.setattr(adapt, "model_env_for", recording)
    argv = short_surge(tmp_path)
    assert adapt.main(argv) == 0 and adapt.main([*argv, "--max-utilisation", "0"]) == 0
    assert adapt.main([*argv, "--ramp-from", "0.9"]) == 0  # past the cap: a step at it
    assert caps == [
        (SAFE_UTILISATION, RAMP_FROM_UTILISATION),
        (None, None),
        (SAFE_UTILISATION, SAFE_UTILISATION),
    ]


def test_the_rollout_and_model_options_reach_what_decides(tmp_path, monkeypatch, capsys):
    """Each knob of the command line is what the adapter and its model run with; one out of
    range is refused naming its option, before anything runs."""
    built = []
    real = adapt.Adapter

    def recording(env, policy, model, settings, **kwargs):
        built.append((model, settings, kwargs))
        return real(env, policy, model, settings, **kwargs)

    monkeypatch.setattr(adapt, "Adapter", recording)
    options = ["--rounds", "2", "--margin", "0.07", "--samples", "3", "--steps", "0.2", "0.4"]
    options += ["--screen-horizon", "2", "--regressor", "boosting", "--max-nmae", "0.25"]
    assert adapt.main([*short_surge(tmp_path), *options]) == 0
    ((model, settings, kwargs),) = built
    assert (settings.rounds, settings.margin, settings.samples) == (2, 0.07, 3)
    assert (settings.steps, settings.screen_horizon, settings.horizon) == ((0.2, 0.4), 2, 1)
    assert model.regressor == "boosting" and kwargs["max_nmae"] == 0.25
    capsys.readouterr()
    assert adapt.main([*short_surge(tmp_path), "--rounds", "0"]) == 2
    assert "--rounds: rollout rounds must be >= 1" in capsys.readouterr().err
    assert len(built) == 1


def test_rollout_routes_without_rejecting_unless_allowed(tmp_path, monkeypatch, capsys):
    arms: dict[str, list] = {}
    run_arm = adapt.run_arm

    def recording(arm, *args, **kwargs):
        arms[arm] = run_arm(arm, *args, **kwargs)
        return arms[arm]

    monkeypatch.setattr(adapt, "run_arm", recording)
    argv = short_surge(tmp_path)

    def reject_share(arm: str) -> np.ndarray:
        return np.array([cycle.weights for cycle in arms[arm]])[..., -1]

    assert adapt.main(argv) == 0
    assert (reject_share("base") > 0).all()  # the trained policy always keeps a reject share
    # Every interval is routed as a mesh would: the reject share spread over the routes, the
    # first one's too (nothing is observed yet: the base policy's routing, as the operator
    # writes it).
    assert (reject_share("rollout") == 0).all()
    assert adapt.main([*argv, "--allow-reject"]) == 0
    assert (reject_share("rollout")[1:] > 0).any()
    capsys.readouterr()


def test_each_cycle_is_reported_before_the_totals(tmp_path, capsys):
    """With ``--json`` every cycle is one object per line, then the summary; the table shows
    the same cycles, marking the change and the cycles the ``*_after_3_cycles`` figures count."""
    path = tmp_path / "short.yaml"
    path.write_text(
        "name: short-drop\nextends: mesh-10x3\nsteps: 40\n"
        "events:\n  - {at: 10, kind: capacity, node: edge-5, factor: 0.5}\n"
    )
    argv = ["--scenario", str(path), "--warmup", "16", "--horizon", "1"]
    assert adapt.main([*argv, "--json"]) == 0

    def strict(constant):  # NaN or Infinity: not JSON other tools can read
        raise ValueError(f"{constant} in the JSON output")

    out = capsys.readouterr().out.strip().splitlines()
    lines = [json.loads(line, parse_constant=strict) for line in out]
    *records, summary = lines
    assert [r["cycle"] for r in records] == list(range(summary["cycles"])) == list(range(8))
    assert [r["change"] for r in records] == [i == 2 for i in range(8)]
    assert [r["counted"] for r in records] == [i >= 5 for i in range(8)]
    rollout = [r["rollout"] for r in records]
    assert np.isclose(np.mean([r["cost"] for r in rollout]), summary["rollout_cost_per_request_s"])
    assert np.isclose(
        np.percentile([r["decision_ms"] for r in rollout], 95), summary["decision_ms_p95"]
    )
    by_arm = {
        arm: sum(len(r[arm]["slo_violations"]) for r in records if r["counted"])
        for arm in adapt.ARMS
    }
    assert by_arm == summary["slo_violations_after_3_cycles_by_arm"]
    # A violation is a service whose p95 crossed its target in that cycle.
    scenario = load_scenario(str(path))
    targets = dict(zip(scenario.service_names, EdgeEnv(scenario).target_ms, strict=True))
    assert any(r[arm]["slo_violations"] for r in records for arm in adapt.ARMS)
    for r in records:
        for arm in adapt.ARMS:
            over = [s for s, ms in r[arm]["p95_ms"].items() if ms is not None and ms > targets[s]]
            assert sorted(over) == sorted(r[arm]["slo_violations"])
    assert adapt.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["cycle", "base", "cost", "ms"]
    # The totals below it: dotted names for nested figures, not Python's dicts and None.
    totals = dict(line.split(maxsplit=1) for line in table if line.startswith(("model_", "slo_")))
    assert not any("{" in value or "None" in value for value in totals.values())
    assert float(totals["model_accuracy.nmae.mean_ms"]) == pytest.approx(
        summary["model_accuracy"]["nmae"]["mean_ms"], rel=1e-3
    )
    assert totals["model_accuracy.r2.success"] in (
        "-",
        f"{summary['model_accuracy']['r2']['success']:.4g}",
    )
    assert table[3].startswith("*") and table[6].startswith(" +") and table[8].startswith(" +")
    assert f"{1000 * rollout[7]['cost']:.1f}" in table[8]


def test_rollout_decides_on_the_prior_unless_told_not_to(tmp_path, capsys):
    """From too little data to trust the learned model, rollout decides on the queueing prior
    as the operator does; ``--no-prior`` keeps the base policy's action instead."""
    argv = [*short_surge(tmp_path), "--warmup", "2"]
    summaries = {}
    for flag in ("--prior", "--no-prior"):
        assert adapt.main([*argv, flag]) == 0
        *records, summaries[flag] = map(json.loads, capsys.readouterr().out.strip().splitlines())
        fallbacks = [r["rollout"]["fallback"] for r in records]
        assert summaries[flag]["fallback_cycles"] == sum(f is not None for f in fallbacks)
    assert summaries["--prior"]["fallback_cycles"] == 0
    assert summaries["--no-prior"]["fallback_cycles"] >= 4
    # Each for want of a usable model: not trusted yet, or a state outside its data.
    reasons = ("the system model", "the base routing leads outside the model's data")
    assert all(f.startswith(reasons) for f in fallbacks if f is not None)


def test_without_warm_up_the_model_starts_cold_and_is_fitted_live(tmp_path, capsys):
    """``--warmup 0`` is the operator's start: no simulator data, decisions on the prior
    until the live rows are enough to fit the model (it used to end in a ValueError)."""
    assert adapt.main([*short_surge(tmp_path), "--warmup", "0"]) == 0
    *records, summary = map(json.loads, capsys.readouterr().out.strip().splitlines())
    assert summary["fallback_cycles"] == 0  # the prior decided while the model could not
    # 30 rows an interval: the first fit needs min_rows=50, so two intervals; every later
    # interval is scored before it is learned from.
    assert summary["model_accuracy"]["rows"] == 30 * (len(records) - 2)


def test_uniform_work_prices_every_request_at_the_services_mean(tmp_path, monkeypatch):
    """``--uniform-work`` decides as a controller that cannot tell the services' costs
    apart: the model environment and the model's rows price every request alike."""
    works, rows = [], []
    real_env, real_rows = adapt.model_env_for, adapt.model_rows

    def recording_env(*args, **kwargs):
        env = real_env(*args, **kwargs)
        works.append(env.work)
        return env

    def recording_rows(tel, work, seconds):
        rows.append(np.asarray(work))
        return real_rows(tel, work, seconds)

    monkeypatch.setattr(adapt, "model_env_for", recording_env)
    monkeypatch.setattr(adapt, "model_rows", recording_rows)
    argv = short_surge(tmp_path)
    assert adapt.main(argv) == 0 and adapt.main([*argv, "--uniform-work"]) == 0
    own = load_scenario(argv[1])
    own_work = EdgeEnv(own, num_envs=1).mean_cost
    assert np.ptp(own_work) > 0  # the services' costs differ
    assert np.allclose(works[0], own_work) and np.allclose(works[1], own_work.mean())
    commissioning = len(rows) // 2
    assert all(np.allclose(w, own_work) for w in rows[:commissioning])
    assert all(np.allclose(w, own_work.mean()) for w in rows[commissioning:])


def test_the_steps_after_the_last_full_interval_are_played_as_a_short_cycle(tmp_path, capsys):
    """22 steps in cycles of 5: the last 2 steps are a cycle of their own, so a change that
    falls in them is run, not only listed."""
    path = tmp_path / "tail.yaml"
    path.write_text(
        "name: tail-drop\nextends: mesh-10x3\nsteps: 22\n"
        "events:\n  - {at: 21, kind: capacity, node: edge-5, factor: 0.1}\n"
    )
    argv = ["--scenario", str(path), "--warmup", "16", "--horizon", "1", "--json"]
    assert adapt.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["cycles"] == 5 and summary["change_cycles"] == [4]
    records = [json.loads(line) for line in lines[:-1]]
    assert len(records) == 5 and all(r["oracle"]["cost"] > 0 for r in records)


def served_locally(scenario_yaml: str, tmp_path, cycles: int, interval: int = 5):
    """The telemetry of ``cycles`` intervals of a scenario whose nodes serve all their own
    requests, and the environment after them."""
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario_yaml)
    env = EdgeEnv(load_scenario(str(path)), 1, action_mode="neighbours", seed=0, track_servers=True)
    env.reset()
    weights = np.zeros((1, env.num_agents, env.action_dim))
    weights[..., 0] = 1.0
    rng, out = np.random.default_rng(0), []
    for _ in range(cycles):
        recorder = adapt.IntervalRecorder(env)
        for _ in range(interval):
            _, _, _, info = env.step(weights)
            recorder.add(info)
        out.append(recorder.telemetry(rng, 0.0))
    return out, env


def test_a_node_failing_right_after_an_interval_leaves_its_backlog_finite(tmp_path):
    """The interval before a failure priced its queue at the next step's capacity, zero: a
    backlog of about 1e12 s, which became a utilisation of 1e11 in the model's rows."""
    tels, env = served_locally(
        "name: fail\nextends: mesh-10x3\nsteps: 30\nevents:\n"
        "  - {at: 5, until: 30, kind: surge, node: edge-3, factor: 2}\n"
        "  - {at: 20, kind: fail, node: edge-3}\n",
        tmp_path,
        cycles=4,
    )
    before = tels[3]  # steps 15-19; edge-3 fails at step 20
    queued = before.backlog_end[3] * before.capacity[3]  # seconds x work per second
    assert before.capacity[3] > 0 and queued > 0  # a queue to price, at a live capacity
    assert 0 < before.backlog_end[3] < 30
    rows = model_rows(before, adapt.priced_work(env), 5 * env.scenario.step_seconds)
    assert np.nanmax(rows.features[:, UTILISATION]) < 10


def test_a_node_without_capacity_has_no_backlog_to_clear(tmp_path):
    """A capacity event of factor 0 is allowed; its queue, at no capacity, was 1e12 s."""
    tels, _ = served_locally(
        "name: stall\nextends: mesh-10x3\nsteps: 30\nevents:\n"
        "  - {at: 5, until: 30, kind: surge, node: edge-3, factor: 2}\n"
        "  - {at: 10, until: 30, kind: capacity, node: edge-3, factor: 0}\n",
        tmp_path,
        cycles=4,
    )
    for tel in tels[2:]:
        assert tel.capacity[3] == 0
        assert tel.backlog_start[3] == tel.backlog_end[3] == 0
        assert tel.mesh.backlog[0, 3] == 0


def test_requests_lost_with_a_failing_node_s_queue_cost_a_rejection_each(tmp_path):
    """They were counted in lost_on_failure only: no cost, no loss in the cycle's figures,
    so queueing work on a node about to fail was free."""
    _, env = served_locally(
        "name: fail\nextends: mesh-10x3\nsteps: 30\nevents:\n"
        "  - {at: 5, until: 30, kind: surge, node: edge-3, factor: 2}\n"
        "  - {at: 20, kind: fail, node: edge-3}\n",
        tmp_path,
        cycles=4,
    )
    queued = env.model.queued_by_agent(np.arange(10) == 3)[0]  # what the failure will drop
    assert queued.sum() == env.model.q_len[0, 3] > 0
    cost_before = env.totals.cost_s[0]
    weights = np.zeros((1, env.num_agents, env.action_dim))
    weights[..., 0] = 1.0
    _, _, _, info = env.step(weights)
    assert env.totals.lost_on_failure[0] == queued.sum()
    rejected_now = info["reject"][0].sum() + info["server"].rejected[0].sum()
    assert info["lost"][0].sum() - rejected_now == queued.sum()
    # What the next observation's reject ratio reads, as the live loop's telemetry does.
    assert env.prev["rejected"][0].sum() == info["lost"][0].sum()
    penalty_s = env.scenario.reject_penalty * np.tile(env.target_ms, 10) / 1000.0
    assert env.totals.cost_s[0] - cost_before >= float(penalty_s @ queued)


def test_the_results_are_printed_before_a_plot_that_cannot_be_saved(tmp_path, monkeypatch, capsys):
    """As ``simulator.evaluate``'s: a plot that failed to save lost the run's results."""

    def failing(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(adapt, "plot", failing)
    argv = [*short_surge(tmp_path), "--warmup", "2", "--plot", str(tmp_path / "adapt.png")]
    with pytest.raises(OSError, match="No space"):
        adapt.main(argv)
    assert "rollout_cost_over_oracle_after_3_cycles" in capsys.readouterr().out.splitlines()[-1]


def test_the_progress_bar_moves_once_per_cycle_of_each_controller(tmp_path):
    """It moved once per controller: a minute or more without a tick in the rollout arm."""
    args = adapt.build_parser().parse_args([*short_surge(tmp_path), "--warmup", "2"])
    scenario, policy = adapt.load(args)
    ticks: list[int] = []
    cycles = adapt.run_arm("base", scenario, policy, args, progress=ticks.append)
    assert ticks == [1] * len(cycles) and len(cycles) == -(-scenario.steps // args.interval)
