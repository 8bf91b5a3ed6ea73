"""The ``fedct`` command: subcommands are registered as ``fedct.commands`` entry points.

Each entry point names a :class:`Command` in one of the light ``commands`` modules
(common/commands.py, client/commands.py, server/commands.py): the module that runs it, with
``run(args) -> int`` and a docstring whose first line is the help text, and the function
that adds its options.  Building the parser imports only those light modules (the help text
is read from the running module's source), so ``fedct --help`` and ``fedct CMD --help``
answer without loading torch or Flower, and ``common`` needs no import of ``client`` or
``server``; the running module is imported only when the command runs.  Every command
takes ``--verbose`` (DEBUG logs, and Flower's and Ray's own output), and every option's help
ends with its default.

Every command exits 0 on success and non-zero otherwise, with the reason as its last line:
commands answer the errors they expect themselves; anything else (a bug, an unexpected
failure) ends here in one line with exit 1 (``--verbose`` shows the traceback instead), and
Ctrl-C with exit 130.  SIGTERM and SIGHUP stop a command as Ctrl-C does
(common/stop_signals.py), with exit 143 and 129.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

from fedct.common.console import configure_logging
from fedct.common.provenance import software_versions
from fedct.common.stop_signals import exit_status, stop_signals, stopped_by

DESCRIPTION = "fedct: federated COVID-19 chest-CT classification across hospitals"
_DOCSTRING = re.compile(r'\s*(?:#[^\n]*\n\s*)*[rRuU]?("""|\'\'\')(.*?)\1', re.S)


@dataclass(frozen=True)
class Command:
    """A ``fedct`` subcommand: ``module`` runs it, ``add_arguments`` adds its options."""

    module: str
    add_arguments: Callable[[argparse.ArgumentParser], None]

    def run(self, args: argparse.Namespace) -> int:
        return int(import_module(self.module).run(args))


def _summary(module_name: str, name: str) -> str:
    """The first line of the module's docstring, read from its source without importing it,
    without a leading ``fedct NAME``: label."""
    spec = find_spec(module_name)
    source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
    # The docstring is the module's first statement: parsing it alone halves --help's time.
    docstring = _DOCSTRING.match(source)
    first = (docstring.group(2) if docstring else name).strip().splitlines()[0]
    first = re.sub(r"^``fedct [^`]*``:\s*", "", first)
    return first[:1].upper() + first[1:]


def _commands() -> dict[str, Command]:
    return {ep.name: ep.load() for ep in entry_points(group="fedct.commands")}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends every option's help with its default, unless the help already says it or the
    option has none to show (a flag, a required option, an option without a value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        silent = (
            action.required
            or not action.option_strings
            or action.nargs == 0
            or default is None
            or default is argparse.SUPPRESS
            or default == []
            or "default" in text.lower()
        )
        return text if silent else f"{text} (default: %(default)s)"


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show DEBUG logs and Flower's and Ray's own output",
    )
    return common


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The ``fedct`` parser; only the command named in ``argv`` has its module imported and
    its options added (without one, every command is listed with its summary)."""
    commands = _commands()
    parser = argparse.ArgumentParser(
        prog="fedct", description=DESCRIPTION, formatter_class=DefaultsHelpFormatter
    )
    versions = software_versions()
    parser.add_argument(
        "--version",
        action="version",
        version=f"fedct {versions.pop('fedct')} ("
        + ", ".join(f"{name} {v}" for name, v in versions.items())
        + ")",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in commands else None
    common = _common_options()
    for name in sorted(commands):
        if chosen is not None and name != chosen:
            sub.add_parser(name)
            continue
        summary = _summary(commands[name].module, name)
        command = sub.add_parser(
            name,
            help=summary,
            description=summary,
            parents=[common],
            formatter_class=DefaultsHelpFormatter,
        )
        if name == chosen:
            commands[name].add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    configure_logging(args.verbose)
    with stop_signals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        code = _commands()[args.command].run(args)
    except KeyboardInterrupt:
        _say(f"fedct {args.command}: interrupted ({stopped_by()})")
        return exit_status()
    except Exception as exc:
        if args.verbose:
            raise
        reason = " ".join(str(exc).split()) or "no message"
        _say(
            f"fedct {args.command}: failed: {type(exc).__name__}: {reason} "
            "(--verbose shows the traceback)"
        )
        return 1
    return exit_status() if stopped_by() != "Ctrl-C" else code


def _say(line: str) -> None:
    """The last line, on stderr; a terminal that hung up (SIGHUP) gets none."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
