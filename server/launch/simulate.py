"""Run a federated simulation: one simulated Flower SuperNode per site cache.

A thin wrapper around ``flwr run APP local --stream``: it writes a private Flower home (its
own config.toml with a ``:local:`` SuperLink connection, free ports), passes the run config
(``--config`` TOML file of ``[tool.flwr.app.config]`` keys, then ``--set KEY=VALUE``) with
every path made absolute, shows a line per round while Flower's own output goes to
RUN_DIR/flower.log (server/launch/flower_console.py; ``--verbose`` shows it too), prints the rounds
table and the next commands (server/run_summary.py), and stops the background SuperLink,
SuperExec and simulation processes that ``flwr run`` leaves behind.  The Flower home is kept
in RUN_DIR/flower, so that ``fedct flwr RUN_DIR ls`` / ``log`` show Flower's record of it.

The run is checked before Flower starts (server/launch/preflight.py).  ``fedct simulate`` exits 0
only when Flower reports the run completed and every round is checkpointed; otherwise its
last line says why.  Ctrl-C, SIGTERM and SIGHUP (common/stop_signals.py) stop every process
the run started — ``flwr run``, the SuperLink, SuperExec, ServerApp and Ray — and end with
one line saying how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fedct.common.cli import DESCRIPTION
from fedct.common.console import err
from fedct.common.model.weights import weights_spec
from fedct.common.stop_signals import exit_status, stopped_by
from fedct.server.launch.flower_console import FlowerRun, failure_excerpt, run_flower
from fedct.server.launch.preflight import PreflightError, check_before_launch, unknown_key
from fedct.server.run_summary import print_run_summary, run_finished
from fedct.server.settings import flower_app_text, parse_external_caches

APP_DIR = "app"  # RUN_DIR/flower/app: the installed fedct as a Flower app, for flwr run
PATH_KEYS = ("run-dir", "resume-from")
FLOWER_CONFIG = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
FLOWER_HOME = "flower"  # RUN_DIR/flower: the simulation's Flower home, kept after the run
FLOWER_LOG = "flower.log"  # RUN_DIR/flower.log: everything flwr run printed

console = err


class SimulateError(RuntimeError):
    """The simulation cannot start: a config problem named in the message."""


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``0.5``, ``true``, ``"x"``) or, failing that, the bare string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _absolute(text: str) -> str:
    return str(Path(text).expanduser().resolve()) if text.strip() else ""


def build_run_config(config: Path | None, assignments: list[str]) -> dict[str, Any]:
    """Run-config overrides from the file and ``KEY=VALUE`` assignments, paths made absolute
    (the ServerApp and ClientApps do not run in this directory).  ``run-dir`` defaults to
    ``runs/<timestamp>`` here."""
    overrides: dict[str, Any] = {}
    if config is not None:
        try:
            with open(config, "rb") as handle:
                overrides.update(tomllib.load(handle))
        except tomllib.TOMLDecodeError as exc:
            raise SimulateError(f"{config}: not valid TOML ({exc})") from None
        for key in overrides:
            if problem := unknown_key(key, str(config)):
                raise SimulateError(problem)
    return resolve_paths(apply_assignments(overrides, assignments))


def apply_assignments(overrides: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``overrides`` with each ``KEY=VALUE`` (a TOML value, or a bare string) applied."""
    overrides = dict(overrides)
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise SimulateError(f"--set {assignment!r}: expected KEY=VALUE")
        if problem := unknown_key(key.strip(), f"--set {assignment}"):
            raise SimulateError(problem)
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def resolve_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Run-config overrides with every path absolute and ``run-dir`` defaulted."""
    overrides = dict(overrides)
    if not str(overrides.get("run-dir", "")).strip():
        overrides["run-dir"] = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    for key in PATH_KEYS:
        if key in overrides:
            overrides[key] = _absolute(str(overrides[key]))
    if "pretrained-weights" in overrides:
        overrides["pretrained-weights"] = weights_spec(str(overrides["pretrained-weights"])) or ""
    sites = [_absolute(p) for p in str(overrides.get("site-caches", "")).split(",") if p.strip()]
    if not sites:
        raise SimulateError("site-caches is empty: list one prepared cache per site")
    overrides["site-caches"] = ",".join(sites)
    external = parse_external_caches(str(overrides.get("external-caches", "")))
    overrides["external-caches"] = ",".join(f"{name}={path}" for name, path in external.items())
    return overrides


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_run_config(path: Path, overrides: dict[str, Any]) -> Path:
    """A flat TOML file of run-config keys, as ``flwr run --run-config FILE.toml`` reads."""
    path.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in overrides.items()))
    return path


def write_flower_app(directory: Path) -> Path:
    """``directory`` as a Flower app of the installed fedct: a pyproject.toml with the
    package's name and version and its ``[tool.flwr.app]`` table, whose components are
    imported from the installed package."""
    directory.mkdir(parents=True, exist_ok=True)
    project = {"name": "fedct", "version": version("fedct"), "description": DESCRIPTION}
    header = "[project]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in project.items())
    (directory / "pyproject.toml").write_text(
        f'{header}license = "Apache-2.0"\n\n{flower_app_text()}'
    )
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for ``flwr run`` with a private Flower home and free local ports.

    Runtime dependency installation is switched off: the app runs in this environment,
    whose packages are already installed (otherwise each run calls ``uv sync``).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(FLOWER_CONFIG)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _process_table(environ_marker: bytes) -> dict[int, tuple[int, int, str, bool]]:
    """pid → (parent pid, session id, command line, whether its environment holds
    ``environ_marker``) of every process we can read (Linux)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            marked = environ_marker in (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            marked = False
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), cmdline, marked)
    return table


def local_flower_processes(flwr_home: Path) -> set[int]:
    """The background SuperLink started for ``flwr_home`` and every process it spawned.

    Its children start sessions of their own and Ray reparents its workers and daemons, so
    the family is what descends from the SuperLink, whatever runs with this Flower home in
    its environment (``flwr run`` and Ray's daemons inherit it), and whatever shares a
    session that one of those started; this process is never in it (nor, therefore, the
    terminal session it runs in).
    """
    home = Path(flwr_home).resolve()
    table = _process_table(f"FLWR_HOME={home}".encode())
    marker = str(home / "local-superlink")
    family = {
        pid
        for pid, (_, _, cmd, marked) in table.items()
        if marked or ("flower-superlink" in cmd and marker in cmd)
    }
    family.discard(os.getpid())
    while True:
        sessions = {table[pid][1] for pid in family if table[pid][1] == pid}
        grown = family | {
            pid for pid, (ppid, sid, _, _) in table.items() if ppid in family or sid in sessions
        }
        grown.discard(os.getpid())
        if grown == family:
            return family
        family = grown


def stop_local_flower(flwr_home: Path, grace: float = 10.0) -> set[int]:
    """Terminate (then kill) :func:`local_flower_processes`, again while new ones appear (a
    process that was starting Ray when stopped); returns the pids signalled."""
    stopped: set[int] = set()
    for _ in range(5):
        pids = local_flower_processes(flwr_home) - stopped
        if not pids:
            break
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
                time.sleep(0.2)
        stopped |= pids
    return stopped


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


@contextmanager
def local_flower(flwr_home: Path | None) -> Iterator[tuple[Path, dict[str, str]]]:
    """(Flower home, environment) for ``flwr run``; on exit its processes are stopped (quietly
    when stopped by Ctrl-C or a stop signal: the caller says so in its one line) and a
    temporary home removed."""
    home = Path(flwr_home or tempfile.mkdtemp(prefix="fedct-flwr-")).resolve()
    interrupted = False
    try:
        yield home, flower_environment(home)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        stopped = stop_local_flower(home)
        if stopped and not interrupted:
            console.print(f"stopped {len(stopped)} background Flower process(es)")
        if flwr_home is None:
            shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class Resources:
    """What each simulated site may use, and how many CPUs Ray hands out in all (``cpus``,
    None for the machine's cores).  Sites train at once as far as ``cpus // client_cpus``
    allows; a site that does not fit waits for one to finish.  On a 2-core machine,
    ``cpus = 3`` lets three one-CPU sites train together (each a little slower) instead of
    two, then the third alone on one core."""

    client_cpus: int = 1
    client_gpus: float = 0.0
    cpus: int | None = None

    def __post_init__(self) -> None:
        if self.client_cpus < 1 or self.client_gpus < 0:
            raise SimulateError("client-cpus must be at least 1 and client-gpus not negative")
        if self.cpus is not None and self.cpus < self.client_cpus:
            raise SimulateError(f"cpus ({self.cpus}) is less than client-cpus ({self.client_cpus})")

    def sites_at_once(self, sites: int) -> int:
        cpus = self.cpus if self.cpus is not None else os.cpu_count() or 1
        return max(1, min(sites, cpus // self.client_cpus))


def flwr_run_command(
    app: Path, run_config_file: Path, num_supernodes: int, resources: Resources
) -> list[str]:
    federation = (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={resources.client_cpus} "
        f"client-resources-num-gpus={resources.client_gpus}"
    )
    if resources.cpus is not None:
        federation += f" init-args-num-cpus={resources.cpus}"
    return [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(app),
        "local",
        "--stream",
        "--run-config",
        str(run_config_file),
        "--federation-config",
        federation,
    ]


def simulate(
    overrides: dict[str, Any],
    *,
    app: Path | None = None,
    flwr_home: Path | None = None,
    resources: Resources = Resources(),
    verbose: bool = False,
    summary: bool = True,
) -> int:
    """Run the federation of ``overrides`` (from :func:`build_run_config`); 0 when Flower
    reports the run completed and every round was checkpointed, 2 when the run cannot start
    (nothing is written), 1 when it failed (the last line says why).  ``flwr_home`` defaults
    to RUN_DIR/flower; ``summary=False`` leaves the closing table and next commands
    (:func:`print_run_summary`) to the caller."""
    run_dir = Path(overrides.get("resume-from") or overrides["run-dir"])
    try:
        warnings = check_before_launch(overrides)
    except PreflightError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    log_path = run_dir / FLOWER_LOG
    try:
        flower, status, details = _run_simulation(
            overrides, run_dir, log_path, app, flwr_home, resources, verbose
        )
    except KeyboardInterrupt:
        resume = f"--set resume-from={run_dir}" if (run_dir / "latest.json").exists() else ""
        console.print(
            f"interrupted ({stopped_by()}): every process of the run is stopped (flwr run, "
            f"SuperLink, SuperExec, ServerApp, Ray); the rounds checkpointed so far are in "
            f"{run_dir}" + (f"; resume with {resume}" if resume else ""),
            highlight=False,
        )
        return exit_status()
    finished = print_run_summary(run_dir) if summary else run_finished(run_dir)
    if flower.returncode != 0 or not finished or status != "finished:completed":
        for line in failure_excerpt(log_path):
            console.print(line, markup=False, highlight=False)
        reason = details or ("not every round was checkpointed" if not finished else "")
        console.print(
            f"[red]error:[/red] the run ended {status}: {reason or 'see the log'}; Flower's "
            f"whole output is in {log_path}",
            highlight=False,
        )
        return 1
    return 0


def _run_simulation(
    overrides: dict[str, Any],
    run_dir: Path,
    log_path: Path,
    app: Path | None,
    flwr_home: Path | None,
    resources: Resources,
    verbose: bool,
) -> tuple[FlowerRun, str, str]:
    """``flwr run`` the simulation, then stop every process it started: (how ``flwr run``
    ended, the run's status and details as ``flwr ls`` reports them)."""
    sites = overrides["site-caches"].split(",")
    with local_flower(flwr_home or run_dir / FLOWER_HOME) as (home, env):
        run_config_file = write_run_config(home / "run-config.toml", overrides)
        app = app or write_flower_app(home / APP_DIR)
        console.print(
            f"simulating {len(sites)} sites, {resources.sites_at_once(len(sites))} at once; "
            f"run directory {run_dir}; Flower's output goes to {log_path}",
            highlight=False,
        )
        command = flwr_run_command(app.resolve(), run_config_file, len(sites), resources)
        flower = run_flower(
            command,
            env,
            log_path,
            verbose=verbose,
            on_run_id=lambda run_id: console.print(
                f"Flower run {run_id} started (the simulated sites take a few seconds to start)",
                highlight=False,
            ),
        )
        status, details = run_status(env)
        shutil.rmtree(home / "apps", ignore_errors=True)  # a copy of the app, not needed after
    return flower, status, details


def run_status(env: dict[str, str]) -> tuple[str, str]:
    """(status, details) of the last run of this Flower home, as ``flwr ls`` reports it
    (``finished:completed``, ``finished:failed`` with the ServerApp's exception, ...)."""
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "ls", "local", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(listed.stdout)["runs"]
    except (ValueError, KeyError):
        return "unknown", f"flwr ls failed: {(listed.stdout + listed.stderr).strip()[-300:]}"
    if not runs:
        return "unknown", "flwr ls lists no run"
    last = max(runs, key=lambda run: run.get("pending-at") or "")
    return str(last["status"]), " ".join(str(last.get("status-details") or "").split())


def run(args: argparse.Namespace) -> int:
    """Simulate one run; 0 when every round was checkpointed."""
    try:
        overrides = build_run_config(args.config, args.set)
        resources = Resources(args.client_cpus, args.client_gpus, args.cpus)
    except (SimulateError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    return simulate(
        overrides,
        app=args.app,
        flwr_home=args.flwr_home,
        resources=resources,
        verbose=args.verbose,
    )
