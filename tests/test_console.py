"""What the console shows: no dependency configures logging, Flower's stream is kept in a file
and only fedct's lines are shown, every option's help shows its default, ``--version``."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from fedct.common.cli import build_parser, main
from fedct.common.console import configure_logging, import_quietly
from fedct.common.run.directory import RunDirectory
from fedct.server.launch.flower_console import failure_excerpt, run_flower, shown_line
from fedct.server.launch.simulate import write_run_config
from fedct.server.progress import failure_lines, round_line
from fedct.server.run_summary import print_run_summary

ROOT = Path(__file__).parents[1]


def test_the_apps_import_neither_opacus_nor_a_root_logger_handler() -> None:
    code = (
        "import logging, sys\n"
        "import fedct.client.app, fedct.server.app, fedct.server.settings\n"
        "import fedct.common.training.privacy\n"
        "print('opacus' in sys.modules, len(logging.getLogger().handlers))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False", "0"]


def test_import_quietly_undoes_a_basic_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "noisy_dependency.py").write_text(
        "import logging\nlogging.basicConfig(level=logging.INFO)\nVALUE = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    assert import_quietly("noisy_dependency").VALUE == 1
    assert (list(root.handlers), root.level) == before


def test_logging_shows_warnings_and_fedct_info_and_everything_when_verbose(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        configure_logging(verbose=False)
        logging.getLogger("fedct.common.training.loop").debug("chatter")
        logging.getLogger("fedct.registry").info("served alpha:1")
        logging.getLogger("ray").warning("a warning")
        quiet = capsys.readouterr()
        configure_logging(verbose=True)
        logging.getLogger("fedct.common.training.loop").debug("detail")
        loud = capsys.readouterr()
    finally:
        configure_logging(verbose=False)
        logging.getLogger().setLevel(logging.WARNING)
    assert quiet.out == ""
    assert [line.split(" ", 2)[2] for line in quiet.err.splitlines()] == [
        "INFO fedct.registry: served alpha:1",
        "WARNING ray: a warning",
    ]
    assert [line.split(" ", 2)[2] for line in loud.err.splitlines()] == [
        "DEBUG fedct.common.training.loop: detail"
    ]
    assert logging.getLogger("flwr").propagate is False


def test_version_names_fedct_and_its_libraries(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("fedct 0.") and all(f"{p} " in line for p in ("torch", "timm", "flwr"))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _parser_imports(argv: list[str]) -> tuple[str, list[str]]:
    """The help text of ``fedct ARGV --help`` as built in a fresh interpreter, and which of
    the commands' running modules and of torch, timm and flwr building it imported."""
    code = (
        "import json, sys; from fedct.common.cli import build_parser, _commands\n"
        "try:\n"
        f"    build_parser({argv!r}).parse_args({[*argv, '--help']!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "running = sorted(c.module for c in _commands().values())\n"
        "print(json.dumps([m for m in [*running, 'torch', 'timm', 'flwr'] if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *help_lines, imported = done.stdout.strip().splitlines()
    return "\n".join(help_lines), json.loads(imported)


def test_the_overview_lists_every_command_without_importing_one() -> None:
    listed, imported = _parser_imports([])
    assert imported == []
    assert all(ep.name in listed for ep in entry_points(group="fedct.commands"))
    assert "Run a federated simulation" in listed


@pytest.mark.parametrize("name", sorted(ep.name for ep in entry_points(group="fedct.commands")))
def test_a_commands_options_are_built_without_importing_what_runs_it(name: str) -> None:
    """``fedct CMD --help`` answers at once: neither the command's module nor torch, timm or
    Flower is imported to show its options."""
    text, imported = _parser_imports([name])
    assert imported == []
    assert f"usage: fedct {name}" in " ".join(text.split())


def test_every_option_help_shows_its_default() -> None:
    names = sorted(_subparsers(build_parser([])))
    missing = []
    for name in names:
        command = _subparsers(build_parser([name]))[name]
        groups = [g for g in command._mutually_exclusive_groups if g.required]
        required_groups = {id(a) for g in groups for a in g._group_actions}
        for action in command._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue
            if id(action) in required_groups:
                continue
            text = command.formatter_class("fedct")._get_help_string(action) or ""
            if "default" not in text.lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"options whose help shows no default: {missing}"
    assert "(default: 1)" in _subparsers(build_parser(["simulate"]))["simulate"].format_help()


SAMPLE_STREAM = textwrap.dedent(
    """\
    Starting local SuperLink on 127.0.0.1:39091...
    Successfully started run 1234567890
    \x1b[92mINFO \x1b[0m:      Starting Flower Simulation
    \x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed
    \x1b[92mINFO \x1b[0m:      round 0/2: initial model, ext AUC 0.500
    \x1b[36m(ClientAppActor pid=5)\x1b[0m \x1b[92mINFO \x1b[0m:      site a round 1: training
    \x1b[92mINFO \x1b[0m:      round 1/2: 1 site replied, 1 failed, 3.0 s
    \x1b[93mWARNING \x1b[0m:   round 1/2: node 7 failed: ValueError('boom')
    \x1b[36m(ClientAppActor pid=5)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating
    \x1b[92mINFO \x1b[0m:      cross-site validation: 2 evaluations written to cross_site.json
    """
)


def _fake_flwr(tmp_path: Path, exit_code: int = 0) -> list[str]:
    stream = tmp_path / "stream.txt"
    stream.write_text(SAMPLE_STREAM)
    script = f"import sys; sys.stdout.write(open({str(stream)!r}).read()); sys.exit({exit_code})"
    return [sys.executable, "-c", script]


def test_flower_stream_goes_to_the_log_and_only_progress_to_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[int] = []
    log = tmp_path / "run" / "flower.log"
    done = run_flower(_fake_flwr(tmp_path), {}, log, on_run_id=seen.append)
    captured = capsys.readouterr()
    assert (done.returncode, done.run_id, seen) == (0, 1234567890, [1234567890])
    assert captured.out.splitlines() == [
        "round 0/2: initial model, ext AUC 0.500",
        "round 1/2: 1 site replied, 1 failed, 3.0 s",
        "cross-site validation: 2 evaluations written to cross_site.json",
    ]
    assert captured.err.splitlines() == ["warning: round 1/2: node 7 failed: ValueError('boom')"]
    kept = log.read_text().splitlines()
    assert len(kept) == len(SAMPLE_STREAM.splitlines()) and "\x1b" not in log.read_text()

    verbose = run_flower(_fake_flwr(tmp_path, 3), {}, log, verbose=True)
    captured = capsys.readouterr()
    assert verbose.returncode == 3
    assert "Manually terminating" in captured.err and len(captured.out.splitlines()) == 3


def test_shown_lines_and_failure_excerpt(tmp_path: Path) -> None:
    assert shown_line("INFO :      round 3/12: 3 sites replied") == (
        "info",
        "round 3/12: 3 sites replied",
    )
    assert shown_line("(ClientAppActor pid=1) INFO :      round 3/12: x") is None
    assert shown_line("INFO :      [ROUND 3/12]") is None
    log = tmp_path / "flower.log"
    lines = ["INFO : fine"] * 40 + [
        "ERROR :     ServerApp raised an exception",
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        "SettingsError: invalid run config: strategy must be one of fedavg",
    ]
    log.write_text("\n".join(lines) + "\n")
    assert failure_excerpt(log) == lines[40:]
    assert failure_excerpt(tmp_path / "missing.log") == []


def test_round_line_names_sites_aucs_and_the_best_round() -> None:
    line = {
        "round": 2,
        "seconds": 12.34,
        "sites": {"a": 5, "b": 4},
        "train": {"train-loss": 0.91234},
        "federated": {"tune-auc_covid": 0.7},
        "central": {"mosmed-auc_covid": 0.66, "mosmed-loss": 1.0, "cc-auc_covid": None},
        "kept_previous_model": None,
    }
    best = {"round": 1, "metric": "tune-auc_covid", "value": 0.75}
    assert round_line(line, 12, best, 1) == (
        "round 2/12: 2 sites replied, 1 failed, 12.3 s, train loss 0.912, tune AUC 0.700, "
        "cc AUC –, mosmed AUC 0.660; best so far: round 1 (tune AUC 0.750)"
    )
    card = {"train": {"failures": [{"node_id": 7, "reason": "ValueError(\n'no scans')"}]}}
    assert failure_lines(2, 12, card) == ["round 2/12: node 7 failed: ValueError( 'no scans')"]


def test_run_summary_marks_the_best_round_or_says_there_is_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = RunDirectory(tmp_path / "run")
    run.write_json(
        "run_config.json",
        {"run_config": {"num-server-rounds": 2, "external-caches": f"ext={tmp_path / 'ext'}"}},
    )
    for server_round in range(3):
        line = {"sites": {"a": 3}, "central": {"ext-auc_covid": 0.5 + 0.1 * server_round}}
        run.save_round(server_round, {"w": np.zeros(1, np.float32)}, {}, line, {})
    assert print_run_summary(run.path)
    none = capsys.readouterr().out
    assert "best round: none, tune AUC (tune-auc_covid) was never defined" in none
    assert "◀ best" not in none and "round_002.safetensors --data" in none
    run.update_best(1, "ext-auc_covid", 0.6)
    assert print_run_summary(run.path, title="local baseline a")
    marked = capsys.readouterr().out
    assert "local baseline a" in marked and "best round: 1 (ext AUC 0.600)" in marked
    assert [line.split()[1] for line in marked.splitlines() if "◀ best" in line] == ["1"]
    assert f"--out {run.path.resolve() / 'eval-round_001'}" in marked


def test_a_local_baseline_prints_its_rounds_under_its_own_title(
    run_config: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    keys = ("backbone", "image-size", "batch-size", "lr", "device", "site-caches")
    overrides = {k: run_config[k] for k in keys} | {"num-server-rounds": 1}
    overrides |= {"external-caches": run_config["external-caches"], "run-dir": str(tmp_path / "b")}
    config = write_run_config(tmp_path / "local.toml", overrides)
    argv = ["train", "--mode", "local", "--site", "site_a", "--config", str(config)]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert "federated rounds" not in out and "local baseline site_a" in out
    assert "central evaluation" not in out + err  # the round lines say it; Flower's would repeat
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round ")] == [
        "round 0/1",
        "round 1/1",
    ]
    assert list((tmp_path / "b").glob("events.out.tfevents.*"))
