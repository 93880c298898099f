"""`spattn` command line: one subcommand module each, user errors as one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from spattn import __version__
from spattn.cli import (
    check_cmd,
    compile_cmd,
    inspect_cmd,
    list_cmd,
    plan_cmd,
    run_cmd,
    tune_cmd,
)
from spattn.errors import SpattnError

COMMANDS = (list_cmd, inspect_cmd, compile_cmd, plan_cmd, run_cmd, check_cmd, tune_cmd)


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
        return _fail(str(error))
    except KeyboardInterrupt:
        print("spattn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `spattn inspect ... | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0
    except (OSError, MemoryError, RecursionError, OverflowError) as error:
        # the machine, not the input's form: a full disk, a folder we cannot write, too little
        # memory for the sizes asked for
        return _fail(_describe(error))
    except Exception as error:  # a bug in spattn: still one line, the traceback on request
        if os.environ.get("SPATTN_DEBUG"):
            raise
        return _fail(f"internal error ({_describe(error)}); this is a bug in spattn, please "
                     f"report it (SPATTN_DEBUG=1 shows the traceback)")


MESSAGE_LIMIT = 400  # characters of one error line


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    if isinstance(error, MemoryError):
        return "out of memory for the sizes asked for"
    if isinstance(error, RecursionError):
        return "input nested too deeply"
    return f"{type(error).__name__}: {error}"


def _fail(message: str) -> int:
    """One line on stderr, exit status 2."""
    line = " ".join(message.split())
    if len(line) > MESSAGE_LIMIT:
        line = line[: MESSAGE_LIMIT - 3] + "..."
    print(f"spattn: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
