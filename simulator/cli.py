"""Command-line plumbing shared by the ``python -m simulator.*`` entry points."""

from __future__ import annotations

import argparse


def parser_from_doc(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and whose epilog
    (shown by ``--help``) is the rest, so the examples live in one place."""
    head, _, rest = (doc or "").partition("\n\n")
    return argparse.ArgumentParser(
        prog=prog,
        description=head,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
