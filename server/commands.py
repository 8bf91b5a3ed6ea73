"""The options of the ``fedct`` commands that server/ provides.

Imported to build the parser of ``fedct``, so it imports nothing heavy; a command's
module is imported only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedct.common.cli import Command


def _demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("configs/demo.toml"),
        help="the demo's TOML: [synth], [prepare], [simulation], [run], [baselines] "
        "(default: configs/demo.toml)",
    )


def _flwr(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory of fedct simulate")
    parser.add_argument(
        "flwr_args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="flwr's command and its arguments, e.g. ls, log, log RUN_ID (default: ls)",
    )


def _registry(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")
    summary = "serve the checkpoints under --runs read-only until interrupted"
    serve = sub.add_parser("serve", help=summary, description=summary)
    serve.add_argument("--runs", required=True, type=Path, help="folder of run directories")
    serve.add_argument("--address", required=True, help="HOST:PORT to listen on")
    serve.add_argument(
        "--token-file", required=True, type=Path, help="bearer token file (mode 600)"
    )
    serve.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument(
        "--insecure", action="store_true", help="allow plaintext on a non-loopback address"
    )
    serve.add_argument(
        "--max-downloads-per-client",
        type=int,
        help="downloads one client address may have open at once (default: 4)",
    )
    serve.add_argument(
        "--max-downloads", type=int, help="downloads open at once in all (default: 64)"
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        help="seconds a download waits for its client to take data before it is ended "
        "(default: 30)",
    )


def _report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the coordinator's run directory")
    parser.add_argument("--out", type=Path, help="HTML file (default: RUN_DIR/report.html)")


def _simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file of run-config keys, as in [tool.flwr.app.config] (site-caches, "
        "external-caches, num-server-rounds, strategy, ...); relative paths are taken from "
        "the current directory (default: none, the app's defaults)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key (repeatable), e.g. --set strategy=fedbn (default: none)",
    )
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per simulated site")
    parser.add_argument(
        "--client-gpus",
        type=float,
        default=0.0,
        help="GPU share per simulated site (0.5 lets two sites share one GPU; default 0)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        help="CPUs the simulation hands out (default: the machine's cores); more than the "
        "cores lets more sites train at once, sharing them",
    )
    parser.add_argument(
        "--app",
        type=Path,
        help="the Flower app directory (default: the installed fedct's app, written into "
        "the Flower home)",
    )
    parser.add_argument(
        "--flwr-home",
        type=Path,
        help="keep Flower's state and logs here (default: RUN_DIR/flower, kept so that "
        "fedct flwr RUN_DIR ls / log work on the finished run)",
    )


def _train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("centralized", "local"), required=True)
    parser.add_argument(
        "--site",
        help="with --mode local: the site cache's folder name or index (default: none; "
        "needed with --mode local)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML of run-config keys, as for fedct simulate (default: none, the app's defaults)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key (repeatable; default: none)",
    )


demo = Command("fedct.server.launch.demo", _demo)
flwr = Command("fedct.server.launch.flower_record", _flwr)
registry = Command("fedct.server.registry", _registry)
report = Command("fedct.server.report", _report)
simulate = Command("fedct.server.launch.simulate", _simulate)
train = Command("fedct.server.launch.baselines", _train)
