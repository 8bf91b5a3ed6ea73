"""``fedct flwr RUN_DIR [ARGS]``: Flower's own record of a finished ``fedct simulate`` run.

``fedct simulate`` keeps the simulation's Flower home in RUN_DIR/flower (its SuperLink
database holds the run, its status and its logs) and the Flower run id in
RUN_DIR/run_config.json.  This command runs ``flwr ARGS`` against that home: ``ls`` (the
default) lists the runs, ``log`` prints the run's log (the run id is filled in), any other
``flwr`` command is passed as it is.  Flower starts a local SuperLink for it; this command
stops that SuperLink again, so nothing is left running.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fedct.common.console import err
from fedct.common.run.directory import CheckpointError, RunDirectory
from fedct.server.launch.simulate import FLOWER_HOME, local_flower


def flwr_arguments(run_dir: Path, arguments: list[str]) -> list[str]:
    """``arguments`` for ``flwr``: ``ls`` when empty, ``log`` completed with the run id."""
    arguments = [a for a in arguments if a != "--"] or ["ls"]
    if arguments == ["log"]:
        recorded = RunDirectory(run_dir).read_json("run_config.json") or {}
        run_id = recorded.get("flower_run_id")
        if run_id is None:
            raise CheckpointError(f"{run_dir}/run_config.json records no Flower run id")
        arguments.append(str(run_id))
    return arguments


def run(args: argparse.Namespace) -> int:
    home = args.run_dir / FLOWER_HOME
    try:
        if not (home / "local-superlink").is_dir():
            raise CheckpointError(
                f"{home}: no Flower home with a SuperLink database; is {args.run_dir} a run "
                "directory of fedct simulate?"
            )
        arguments = flwr_arguments(args.run_dir, args.flwr_args)
    except CheckpointError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    flwr = str(Path(sys.executable).parent / "flwr")
    with local_flower(home) as (_, env):
        return subprocess.run([flwr, *arguments], env=env, check=False).returncode
