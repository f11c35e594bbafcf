"""Command-line plumbing shared by the ``python -m simulator.*`` entry points and the scripts
built on them (the demo, the benchmarks)."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DocHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout (its examples are meant to be copied as they stand) and
    names each option's default after its help, unless the help already speaks of it: a
    default worth knowing should not depend on every help text remembering to say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        silent = default is None or default is False or default is argparse.SUPPRESS
        empty = isinstance(default, list | tuple | dict | str) and not default
        if silent or empty or "(default" in text or "default:" in text:
            return text
        if isinstance(default, list | tuple):  # as it is typed: --steps 0.1 0.3
            return f"{text} (default: {' '.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


def parser_from_doc(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and whose epilog
    (shown by ``--help``) is the rest, so the examples live in one place."""
    head, _, rest = (doc or "").partition("\n\n")
    return argparse.ArgumentParser(
        prog=prog, description=head, epilog=rest, formatter_class=DocHelpFormatter
    )


def not_a_png(value: str | Path) -> str | None:
    """Why ``value`` cannot name the PNG a ``--plot`` writes, or None: matplotlib picks the
    format by the suffix (and refuses most after the run), and a folder's name gets one
    appended silently."""
    path = Path(value)
    if path.is_dir():
        example = str(path / "plot.png")
        return f"{str(path)!r} is a folder; name the PNG file to write, e.g. {example!r}"
    if path.suffix.lower() != ".png":
        return f"{str(path)!r} does not end in .png; plots are PNG files"
    return None


def png_path(value: str) -> str:
    """An argparse type for ``--plot``: a .png file whose folder exists and takes files before
    the run, not found wanting after minutes of work whose results the failed plot would take
    with it."""
    problem = not_a_png(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    folder = Path(value).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(
            f"folder {str(folder)!r} does not exist; create it or plot elsewhere"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {str(folder)!r} is not writable; plot elsewhere")
    return value


def make_folder(folder: Path, option: str) -> str | None:
    """Create ``folder`` (an output option's) now, or say why it cannot be: None when it
    exists and takes files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"{option}: cannot create folder {str(folder)!r} ({error.strerror or error})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{option}: folder {str(folder)!r} is not writable; choose another"
    return None


def at_least(
    low: float,
    kind: type[int] | type[float] = int,
    inclusive: bool = True,
    at_most: float | None = None,
) -> Callable[[str], Any]:
    """An argparse type for numbers that must be at least ``low`` (more than it, if not
    ``inclusive``), and no more than ``at_most`` if given: below it a count would divide by
    nothing or end a finished run in a traceback, a negative noise or warm-up fail deep
    inside numpy with no word of the option, and a period of 0 spin."""

    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
        if number < low or (number == low and not inclusive):
            bound = "at least" if inclusive else "more than"
            raise argparse.ArgumentTypeError(f"must be {bound} {low}, got {number}")
        if at_most is not None and number > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most}, got {number}")
        return number

    parse.__name__ = f"{kind.__name__} {'>=' if inclusive else '>'} {low}"
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)
non_negative_float = at_least(0, float)
positive_float = at_least(0, float, inclusive=False)


def json_line(obj: object) -> str:
    """``obj`` as one line of strict JSON: a NaN or infinity (a latency over no requests)
    becomes null, which every parser reads; ``json.dumps`` would write ``NaN``, which strict
    ones refuse."""
    return json.dumps(_finite(obj), allow_nan=False)


def _finite(obj: object) -> object:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def known_scenario(text: str) -> str:
    """An argparse type: a bundled scenario's name or a scenario file, loaded once to refuse
    a misspelt one before any work rather than with a traceback minutes into a run."""
    from simulator.scenario import ScenarioError, load_scenario

    try:
        load_scenario(text)
    except ScenarioError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_scenarios_option(parser: argparse.ArgumentParser, default: list[str], help: str) -> None:
    """``--scenarios NAME...``, each checked by :func:`known_scenario` (the benchmarks')."""
    parser.add_argument("--scenarios", type=known_scenario, nargs="+", default=default, help=help)


def refuse_unfit_scenarios(
    parser: argparse.ArgumentParser, names: list[str], interval: int, needs_changes: bool = False
) -> None:
    """End with a usage error naming the first of ``names`` the live loop cannot run in
    cycles of ``interval`` steps (see ``simulator.adapt.check_scenario``): the benchmarks
    that replay it would otherwise fail in a traceback part-way through their runs."""
    from simulator.adapt import check_scenario
    from simulator.scenario import ScenarioError, load_scenario

    for name in names:
        try:
            check_scenario(load_scenario(name), interval, needs_changes)
        except ScenarioError as error:
            parser.error(f"--scenarios: {error}")
