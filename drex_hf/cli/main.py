"""`drex <subcommand>`: argparse subparsers, `--help` with defaults, exit code 2 with one line on bad input.

Each subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`; errors a user
caused (`DrexError`, a missing file) are printed as one line, anything else is a real bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Collection

from drex_hf.errors import DrexError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `drex` parser. Only the subcommands in `load` (default: all) have their module imported
    and their options added; the others are listed by name and summary, so `drex --help` and a
    subcommand's argument errors do not wait for the other subcommands' imports (torch among them)."""
    from drex_hf.cli import COMMANDS
    from drex_hf.cli.common import HelpFormatter

    parser = OneLineParser(
        prog="drex",
        description="Dynamic-rebatching early-exit inference for HuggingFace Transformers.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name, summary in COMMANDS.items():
        if load is None or name in load:
            importlib.import_module(f"drex_hf.cli.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in argv: its first word that is not an option (`drex` has only -h)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    from drex_hf.cli.common import quiet_transformers

    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    args.argv = argv  # what the user typed, for files that record it
    quiet_transformers()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("drex_hf").setLevel(logging.INFO)
    try:
        return int(args.run(args) or 0)
    except (DrexError, FileNotFoundError) as err:
        message = " ".join(str(err).split())
        print(f"drex {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
