"""The ``fedct`` command: subcommands are registered as ``fedct.commands`` entry points.

Each entry point names a module with ``add_arguments(parser)`` and ``run(args) -> int`` and
a module docstring whose first line is the help text.  Only the module of the command being
run is imported, so ``common`` needs no import of ``client`` or ``server``.

Every command exits 0 on success and non-zero otherwise, with the reason as its last line:
commands answer the errors they expect themselves; anything else (a bug, an unexpected
failure) ends here in one line with exit 1, and Ctrl-C with exit 130 (``FEDCT_TRACEBACK=1``
shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import import_module
from importlib.metadata import entry_points

DESCRIPTION = "fedct: federated COVID-19 chest-CT classification across hospitals"
TRACEBACK_ENV = "FEDCT_TRACEBACK"


def _summary(module: object, name: str) -> str:
    """The first docstring line, without a leading ``fedct NAME``: label."""
    first = (getattr(module, "__doc__", None) or name).strip().splitlines()[0]
    first = re.sub(r"^``fedct [^`]*``:\s*", "", first)
    return first[:1].upper() + first[1:]


def _commands() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="fedct.commands")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    parser = argparse.ArgumentParser(prog="fedct", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in commands else None
    for name in sorted(commands):
        if chosen is None or name == chosen:
            module = import_module(commands[name])
            summary = _summary(module, name)
            module.add_arguments(sub.add_parser(name, help=summary, description=summary))
        else:
            sub.add_parser(name)
    args = parser.parse_args(argv)
    try:
        return import_module(commands[args.command]).run(args)
    except KeyboardInterrupt:
        print(f"fedct {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get(TRACEBACK_ENV):
            raise
        reason = " ".join(str(exc).split()) or "no message"
        print(
            f"fedct {args.command}: failed: {type(exc).__name__}: {reason} "
            f"({TRACEBACK_ENV}=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
