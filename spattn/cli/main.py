"""`spattn` command line: one subcommand module each, user errors as one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from spattn import __version__
from spattn.cli import compile_cmd, inspect_cmd, list_cmd, plan_cmd, run_cmd
from spattn.errors import SpattnError

COMMANDS = (list_cmd, inspect_cmd, compile_cmd, plan_cmd, run_cmd)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        self.exit(2, f"spattn: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spattn", description="Compile and inspect sparse attention patterns.")
    parser.add_argument("--version", action="version", version=f"spattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except SpattnError as error:
        print(f"spattn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
