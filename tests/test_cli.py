import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_runner import refusal


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300
    )


def test_evaluate_json_contract():
    p = run(
        "simulator.evaluate",
        "--scenario",
        "dfaas-2",
        "--policy",
        "apl",
        "--episodes",
        "3",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for key in (
        "processed_pct",
        "rejected_pct",
        "return_per_agent",
        "episodes",
        "forwarded_pct",
        "jain_utilisation",
    ):
        assert key in out
    assert out["episodes"] == 3
    # Both choose the episodes drawn; of the 100 envs asked for, the 3 episodes needed ran.
    assert (out["seed"], out["envs"]) == (0, 3)


def test_evaluate_table_and_errors():
    p = run(
        "simulator.evaluate",
        "--scenario",
        "dfaas-2",
        "--policy",
        "fixed:0.6,0.4,0",
        "--episodes",
        "2",
    )
    assert p.returncode == 0 and "processed_pct" in p.stdout
    p = run(
        "simulator.evaluate", "--scenario", "dfaas-2", "--policy", "least-loaded", "--episodes", "1"
    )
    assert p.returncode == 2 and "neighbours" in p.stderr
    p = run("simulator.evaluate", "--scenario", "nope", "--episodes", "1")
    assert p.returncode == 2 and "bundled" in p.stderr


def test_decision_benchmark_needs_two_agents_and_evaluate_a_comparison_to_plot(capsys):
    """One agent is a mesh with no neighbour (it crashed building the topology); a --plot
    without --compare was silently ignored."""
    with pytest.raises(SystemExit):
        parser_of(ROOT / "benchmarks" / "decision.py").parse_args(["--agents", "1"])
    assert "argument --agents: must be at least 2, got 1" in capsys.readouterr().err
    p = run("simulator.evaluate", "--scenario", "dfaas-2", "--plot", "x.png", "--episodes", "1")
    assert p.returncode == 2 and "add --compare" in p.stderr


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        # A mistyped checkpoint directory is a missing checkpoint, not an unknown heuristic.
        ("runs/no-such-run", "checkpoint runs/no-such-run: no such file or directory"),
        # A per-neighbour checkpoint on a scenario evaluated per node: the flag that fits.
        (
            "policies/checkpoints/mesh-10x3",
            "simulator.evaluate runs it with --action-mode neighbours",
        ),
        ("no-such-heuristic", "or a checkpoint directory, 'default' or 'oracle'"),
    ],
)
def test_evaluate_says_what_is_wrong_with_a_policy(policy, words):
    p = run("simulator.evaluate", "--scenario", "dfaas-2", "--policy", policy, "--episodes", "1")
    assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_adapt_says_which_checkpoint_it_needs_for_a_split3_one(tmp_path):
    """A checkpoint trained per node (split3) cannot route per neighbour: adapt has no
    --action-mode to take, so the message says what to train instead."""
    run_dir = tmp_path / "split3"
    shutil.copytree(ROOT / "policies" / "checkpoints" / "mesh-10x3", run_dir)
    meta = json.loads((run_dir / "policy.json").read_text())
    meta["action"]["mode"] = "split3"
    (run_dir / "policy.json").write_text(json.dumps(meta))
    p = run("simulator.adapt", "--scenario", "mesh-10x3-surge", "--policy", str(run_dir))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "simulator.adapt and the operator route per neighbour" in p.stderr
    assert "trained with --action-mode neighbours" in p.stderr


def test_bench_json_contract():
    p = run(
        "simulator.bench",
        "--scenario",
        "dfaas-2",
        "--envs",
        "64",
        "--steps",
        "5",
        "--warmup",
        "2",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["env_steps_per_s"] > 0 and out["agent_steps_per_s"] == 2 * out["env_steps_per_s"]


ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -m simulator.train": "simulator.train",
    "python -m simulator.evaluate": "simulator.evaluate",
    "python -m simulator.adapt": "simulator.adapt",
    "python -m simulator.bench": "simulator.bench",
    "python -m simulator.rllib_train": "simulator.rllib_train",
    "python -m demo": "demo.__main__",
    "python -m demo.apiserver": "demo.apiserver",
    "python -m demo.dataplane": "demo.dataplane.cli",
    "python -m marl_operator": "marl_operator.__main__",
    "python -m marl_operator.drain": "marl_operator.drain",
    "python -m edgefn": ROOT / "workload" / "edgefn.py",
    **{
        f"python benchmarks/{path.name}": path
        for path in sorted((ROOT / "benchmarks").glob("*.py"))
    },
}
"""Every command a user runs, as the README and the examples write it, and where its parser is
built. A new entry point belongs here; the test below fails for one that is missing."""


def parser_of(where: str | Path) -> argparse.ArgumentParser:
    if isinstance(where, Path):
        spec = importlib.util.spec_from_file_location(f"cli_{where.stem}", where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return module.build_parser()


def unexplained(parser: argparse.ArgumentParser) -> list[str]:
    """Options, positionals and subcommands of ``parser`` (and its subcommands') without help."""
    missing = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            missing += [f"{name} {c}" for c in action.choices if c not in helped]
            for sub in action.choices.values():
                missing += unexplained(sub)
        elif not (action.help or "").strip():
            missing.append(name)
    return missing


def entry_file(command: str) -> Path:
    """The file ``command`` runs: ``python -m X`` runs X, or X's ``__main__`` for a package."""
    where = COMMANDS[command]
    if isinstance(where, Path):
        return where
    spec = importlib.util.find_spec(command.removeprefix("python -m "))
    if spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0]) / "__main__.py"
    return Path(spec.origin)


def test_every_command_line_is_listed():
    """Every ``__main__`` of the project that parses arguments is one of COMMANDS (the load
    generator is configured by its environment, as its container is)."""
    mains = {
        path
        for folder in ("simulator", "demo", "operator", "workload", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if '__name__ == "__main__"' in (text := path.read_text())
        and (
            re.search(r"argparse|parser_from_doc|build_parser", text) or path.name == "__main__.py"
        )
    }
    listed = {entry_file(command) for command in COMMANDS}
    assert mains - listed == set(), "add these entry points to COMMANDS"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_explains_every_option_and_shows_examples(command):
    parser = parser_of(COMMANDS[command])
    assert unexplained(parser) == [], f"{command}: give these a help text"
    examples = [
        line.strip()
        for line in (parser.epilog or "").splitlines()
        if line.strip().startswith(command)
    ]
    assert examples, f"{command} --help shows no example that starts with {command!r}"
    assert parser.description, f"{command}: no description"


def test_help_names_defaults_the_text_does_not():
    parser = parser_of("simulator.adapt")
    text = parser.format_help()
    assert "(default: 0.05)" in text  # --noise: said by the formatter
    assert "(default: bundled)" in text  # --policy: said by its own text, once
    assert "(default: bundled) (default:" not in text
    assert "--json" in text and "(default: False)" not in text
    assert "(default: 0.1 0.3)" in " ".join(text.split())  # --steps, as it would be typed


def test_the_results_are_printed_before_a_plot_that_cannot_be_saved(monkeypatch, capsys, tmp_path):
    """The plot was saved first: a disk full, or a folder the checks at the start passed
    (root may write anywhere), lost the whole comparison's table and JSON to a traceback."""
    from simulator import evaluate

    def failing(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(evaluate, "plot", failing)
    argv = ["--scenario", "dfaas-2", "--compare", "--episodes", "1", "--json"]
    with pytest.raises(OSError, match="No space"):
        evaluate.main([*argv, "--plot", str(tmp_path / "compare.png")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policies"]


@pytest.mark.parametrize(
    "command",
    [
        "simulator.evaluate",
        "simulator.adapt",
        "model_accuracy.py",
        "model_noise_floor.py",
        "slo_chance.py",
    ],
)
def test_a_plot_into_a_missing_folder_is_refused_before_the_run(command, tmp_path):
    """Found missing after the run, the folder would take the run's printed results with it."""
    parser = parser_of(ROOT / "benchmarks" / command if command.endswith(".py") else command)
    with pytest.raises(SystemExit):
        parser.parse_args(["--plot", str(tmp_path / "missing" / "plot.png")])
    assert parser.parse_args(["--plot", str(tmp_path / "plot.png")]).plot.endswith("plot.png")


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("simulator.evaluate", "--episodes"),
        ("simulator.evaluate", "--envs"),
        ("simulator.bench", "--steps"),
        ("simulator.bench", "--envs"),
        ("simulator.adapt", "--interval"),
        ("simulator.train", "--eval-episodes"),
        ("simulator.train", "--env-steps"),  # wrote an untrained checkpoint and exited 0
    ],
)
def test_counts_below_one_are_refused_naming_the_option(command, option, capsys):
    """Zero episodes or steps used to end in a ZeroDivisionError or StopIteration, after a
    whole training run in the case of --eval-episodes."""
    with pytest.raises(SystemExit):
        parser_of(command).parse_args([option, "0"])
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def option_pairs(*options: str) -> list[tuple[str, str]]:
    """Every (command, option) of the listed commands that has one of ``options``."""
    return [
        (command, option)
        for command, where in sorted(COMMANDS.items())
        for option in options
        if option in parser_of(where)._option_string_actions
    ]


SEEDS = option_pairs("--seed", "--seeds", "--threads")


def test_seeded_commands_are_found():
    commands = {command for command, _ in SEEDS}
    assert {"python -m simulator.train", "python benchmarks/model_accuracy.py"} <= commands


@pytest.mark.parametrize(("command", "option"), SEEDS)
def test_seeds_and_threads_below_zero_are_refused_naming_the_option(command, option, capsys):
    """A negative seed ended in numpy's "expected non-negative integer" traceback, or its
    message without the option's name."""
    with pytest.raises(SystemExit):
        parser_of(COMMANDS[command]).parse_args([option, "-1"])
    assert f"argument {option}: must be at least" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("decision.py", "--trials"),
        ("train.py", "--env-steps"),
        ("model_accuracy.py", "--test"),
        ("model_accuracy.py", "--train"),
        ("model_noise_floor.py", "--interval"),
        ("slo_chance.py", "--interval"),
    ],
)
def test_benchmark_counts_below_one_are_refused_naming_the_option(command, option, capsys):
    with pytest.raises(SystemExit):
        parser_of(ROOT / "benchmarks" / command).parse_args([option, "0"])
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["model_accuracy.py", "model_noise_floor.py", "slo_chance.py"])
def test_benchmarks_refuse_an_unknown_scenario_before_any_work(command, capsys):
    with pytest.raises(SystemExit):
        parser_of(ROOT / "benchmarks" / command).parse_args(["--scenarios", "mesh-10x3", "nope"])
    assert "argument --scenarios: unknown scenario 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "eval_every=0"], "hyperparameter eval_every: must be > 0, got 0"),
        (["--set", "num_minibatches=0"], "hyperparameter num_minibatches: must be > 0"),
        (["--set", "gamma=1.5"], "hyperparameter gamma: must lie in [0, 1]"),
        (["--set", "algo=foo"], "hyperparameter algo: must be one of ['mappo', 'ippo']"),
        (["--set", "num_envs=[1"], "--set num_envs=[1: not valid YAML"),
    ],
)
def test_train_refuses_hyperparameters_out_of_range_before_any_work(argv, message, capsys):
    """eval_every 0 divided by zero after the first rollout; num_envs 0 before it."""
    from simulator import train

    assert train.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bogus", "unknown workload kind 'bogus'"),
        ("sum", "unknown workload kind 'sum'"),  # internal: it crashed on no parts
        ("replay", "needs 'path' (a CSV file) (--workload takes no parameters"),
    ],
)
def test_a_workload_kind_that_cannot_run_is_refused_by_name(kind, message, capsys):
    from simulator import evaluate

    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--workload", kind, "--episodes", "1", "--envs", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "'sum'" not in err.split("choose one of", 1)[-1]  # never offered


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("simulator.adapt", "--noise", "-0.1"),
        ("simulator.adapt", "--warmup", "-1"),
        ("simulator.adapt", "--max-nmae", "-0.5"),
        ("simulator.adapt", "--max-utilisation", "-1"),
        ("simulator.bench", "--warmup", "-3"),
    ],
)
def test_negative_amounts_are_refused_naming_the_option(command, option, value, capsys):
    """A negative noise failed deep in numpy ("sigma < 0"), a negative bench warm-up divided
    by zero, a negative error bound silently turned rollout off."""
    with pytest.raises(SystemExit):
        parser_of(command).parse_args([option, value])
    assert f"argument {option}: must be at least 0, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_amounts_must_be_finite(value, capsys):
    with pytest.raises(SystemExit):
        parser_of("simulator.adapt").parse_args(["--noise", value])
    assert "expected a finite number" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "0"], "error: --samples: rollout samples must be >= 1"),
        (["--steps", "0.2", "1"], "error: --steps: rollout steps must lie in (0, 1)"),
        (["--screen-horizon", "-1"], "error: --screen-horizon: rollout screen_horizon"),
        (["--scenario", "dfaas-paise25"], "sets no latency_target_ms"),
        (["--interval", "400"], "400 steps per cycle (--interval), but mesh-10x3-capacity-drop"),
    ],
)
def test_adapt_refuses_bad_settings_before_any_work(argv, message, capsys):
    from simulator import adapt

    assert adapt.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--scenario", "nope"], "unknown scenario 'nope'"), (["--policy", "x"], "unknown policy")],
)
def test_bench_refuses_unknown_names_without_a_traceback(argv, message, capsys):
    from simulator import bench

    assert bench.main([*argv, "--envs", "2", "--steps", "1"]) == 2
    assert message in capsys.readouterr().err


def test_bench_offers_only_what_it_has(capsys):
    """It hinted at an --action-mode it did not take, and listed checkpoints and the oracle
    among the policies it would time; it times heuristics only."""
    from simulator import bench

    argv = ["--scenario", "dfaas-2", "--envs", "2", "--steps", "1"]
    assert bench.main([*argv, "--policy", "least-loaded"]) == 2
    assert "use --action-mode neighbours" in capsys.readouterr().err
    assert bench.main([*argv, "--policy", "least-loaded", "--action-mode", "neighbours"]) == 0
    assert "neighbours" in capsys.readouterr().out
    assert bench.main([*argv, "--policy", "oracle"]) == 2
    assert "'oracle')" not in capsys.readouterr().err


def test_json_lines_are_strict_json():
    """A latency over no requests is NaN; printed as such, strict parsers refuse the line."""
    from simulator.cli import json_line

    line = json_line({"p95": float("nan"), "rows": [1.5, float("inf"), {"x": (2, float("-inf"))}]})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "p95": None,
        "rows": [1.5, None, {"x": [2, None]}],
    }


@pytest.mark.parametrize("command", ["marl_operator.__main__", "marl_operator.drain"])
def test_operator_commands_without_a_usable_cluster_connection_say_which_option(
    command, tmp_path, monkeypatch, capsys
):
    """No traceback from the Kubernetes client: a missing kubeconfig file, one that is no
    kubeconfig, and no --kubeconfig outside a pod are refused naming --kubeconfig."""
    main = importlib.import_module(command).main
    empty = tmp_path / "config"
    empty.write_text("")
    broken, listed = tmp_path / "broken", tmp_path / "listed"
    broken.write_text("garbage: [")
    listed.write_text("[1, 2]")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for argv, words in (
        (["--kubeconfig", str(tmp_path / "absent")], "no such file"),
        (["--kubeconfig", str(empty)], f"--kubeconfig {empty}"),
        (["--kubeconfig", str(broken)], f"--kubeconfig {broken}: not a kubeconfig"),
        (["--kubeconfig", str(listed)], f"--kubeconfig {listed}: not a kubeconfig"),
        ([], "pass --kubeconfig PATH"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    # one another user owns with mode 0600 (the test runs as root, who could read it anyway)
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(empty):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    empty.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(SystemExit) as exit_:
        main(["--kubeconfig", str(empty)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"--kubeconfig {empty}: cannot be read (Permission denied)" in err, err
    assert "Traceback" not in err


def test_an_api_port_in_use_is_refused_naming_the_option(apiserver, capsys):
    """It used to end in three tracebacks and a message naming no option."""
    import socket

    from marl_operator.__main__ import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--kubeconfig", str(apiserver.kubeconfig), "--standalone"]
        argv += ["--api-host", "127.0.0.1", "--api-port", str(port)]
        argv += ["--prometheus-url", "http://127.0.0.1:9"]
        with pytest.raises(SystemExit) as exit_:
            main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"could not listen on 127.0.0.1:{port}" in err and "--api-port" in err, err
    assert "Traceback" not in err, err


def test_the_operator_refuses_a_port_that_is_not_one(capsys):
    from marl_operator.__main__ import parse_args

    for port in ("99999", "0", "http"):
        with pytest.raises(SystemExit):
            parse_args(["--api-port", port])
        assert "--api-port" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["model_accuracy", "model_noise_floor", "slo_chance"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenarios", "dfaas-paise25"], "'dfaas-paise25' sets no latency_target_ms"),
        (["--interval", "100000"], "100000 steps per cycle (--interval), but mesh-"),
    ],
)
def test_benchmarks_of_the_live_loop_refuse_what_it_cannot_run(script, argv, message):
    """Each ended in a traceback part-way through its runs (no bundled policy for a DFaaS
    layout; a division by zero intervals)."""
    assert message in refusal(script, *argv)


def test_output_folders_must_take_files(tmp_path, monkeypatch):
    """A folder that exists but is not writable (as a user other than root finds one) is
    refused before the run, for --plot and the demo's folders alike."""
    import argparse
    import os

    from simulator.cli import make_folder, png_path

    assert png_path(str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    assert make_folder(tmp_path / "new" / "logs", "--logs") is None
    assert (tmp_path / "new" / "logs").is_dir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
        png_path(str(tmp_path / "a.png"))
    assert "--logs: folder" in make_folder(tmp_path, "--logs")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["simulator.adapt", "--scenario", "mesh-10x3-surge"], "does not end in .png"),
        (["simulator.evaluate", "--compare"], "does not end in .png"),
        (["demo"], "does not end in .png"),
    ],
)
def test_a_plot_that_is_no_png_is_refused_before_the_run(argv, words, tmp_path):
    """matplotlib picks the format by the suffix and refused .txt only after the whole run;
    a folder's name got .png appended silently."""
    p = run(*argv, "--plot", str(tmp_path / "a.txt"))
    assert p.returncode == 2 and "--plot" in p.stderr and words in p.stderr, p.stderr
    p = run(*argv, "--plot", str(tmp_path))
    assert p.returncode == 2 and "is a folder; name the PNG file to write" in p.stderr


def test_a_policy_file_that_is_not_the_checkpoints_own_is_refused(tmp_path):
    """A snapshot kept beside the checkpoint (cp policy.pt policy-100k.pt) and evaluated by
    its path was silently swapped for the directory's policy.pt: the numbers reported were
    another policy's. Only policy.pt and policy.json stand for their directory."""
    run_dir = tmp_path / "run"
    shutil.copytree(ROOT / "policies" / "checkpoints" / "dfaas-paise25", run_dir)
    shutil.copy(run_dir / "policy.pt", run_dir / "policy-100k.pt")
    (run_dir / "train_state.pt").write_bytes(b"")
    for name in ("policy-100k.pt", "train_state.pt"):
        p = run(
            "simulator.evaluate", "--scenario", "dfaas-2", "--policy", str(run_dir / name),
            "--episodes", "1",
        )  # fmt: skip
        assert p.returncode == 2 and "Traceback" not in p.stderr, (name, p.stdout, p.stderr)
        assert f"{run_dir / name}" in p.stderr and "policy.pt" in p.stderr, p.stderr
    for name in ("policy.pt", "policy.json"):  # these still name their directory
        p = run(
            "simulator.evaluate", "--scenario", "dfaas-2", "--policy", str(run_dir / name),
            "--episodes", "1",
        )  # fmt: skip
        assert p.returncode == 0, p.stderr


def test_train_refuses_an_out_or_config_it_cannot_use_naming_the_option(tmp_path, capsys):
    """--out naming a file (or a folder under one) ended in a FileExistsError or
    NotADirectoryError traceback, and a missing --config in "[Errno 2] No such file or
    directory" without a word of the option."""
    from simulator.train import main as train_main

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    tiny = ["--scenario", "dfaas-2", "--env-steps", "100", "--eval-episodes", "1"]
    for out in (a_file, a_file / "run"):
        assert train_main([*tiny, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and str(out) in err, err
    assert train_main([*tiny, "--out", str(tmp_path / "run"), "--config", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "nope.yaml" in err, err
