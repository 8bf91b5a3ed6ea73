"""The coordinator under faults, on an in-process grid: one writer per run directory, resume
after a crash at any point of a round's bookkeeping, failures named by site, the straggler
deadline, a lost SuperLink, and run-config values of the wrong type."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from flwr.app import Context, Message, RecordDict

from fedct.common.federation.site_error import fixed_reason
from fedct.common.run.directory import CheckpointError, RunDirectory
from fedct.server.app import main
from fedct.server.replies import collect
from fedct.server.roster import Roster
from fedct.server.run_lock import LOCK_FILE, Holder, RunLock, RunLockedError, RunLockLost
from fedct.server.settings import ServerSettings, SettingsError
from fedct.server.superlink_outage import SuperLinkLost, superlink_outage


def _run(grid: Any, config: dict[str, Any], run_id: int = 1) -> None:
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config
    )
    main(grid, context)


def _nodes(site_caches: dict[str, Path], *names: str) -> list[dict[str, Any]]:
    return [{"data-path": str(site_caches[n]), "site": n} for n in names]


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").open()]


def _assert_whole(run_dir: Path, rounds: int) -> None:
    """One metrics line per round, latest.json on the last, every card's sha256 right."""
    assert _rounds(run_dir) == list(range(rounds + 1))
    assert json.loads((run_dir / "latest.json").read_text())["round"] == rounds
    for r in range(rounds + 1):
        card = json.loads((run_dir / f"round_{r:03d}.card.json").read_text())
        weights = (run_dir / card["checkpoint"]).read_bytes()
        assert hashlib.sha256(weights).hexdigest() == card["sha256"]
    assert json.loads((run_dir / "best.json").read_text())["round"] <= rounds
    assert not (run_dir / LOCK_FILE).exists()
    assert not list(run_dir.glob(".*.tmp"))


# --- one writer per run directory ------------------------------------------------------------


def test_a_second_coordinator_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with RunLock(tmp_path, "111") as first:
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (holder["run_id"], holder["pid"]) == ("111", os.getpid())
        assert holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path, "222").acquire()
        message = str(refused.value)
        assert f"Flower run 111 (pid {os.getpid()} on {socket.gethostname()}" in message
        assert "flwr stop 111" in message and "\n" not in message
        first.check()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_with_a_warning_and_its_holder_stops(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    gone = Holder("7", int(dead.stdout), socket.gethostname(), "then", 0.0, "t1")
    (tmp_path / LOCK_FILE).write_text(json.dumps(gone.__dict__))
    with RunLock(tmp_path, "8") as lock:
        assert lock.took_over and "Flower run 7" in lock.took_over
        assert "no longer exists" in lock.took_over

    far = Holder("9", 1, "another-host", "then", 1000.0, "t2")
    (tmp_path / LOCK_FILE).write_text(json.dumps(far.__dict__))
    with pytest.raises(RunLockedError, match="another-host"):
        RunLock(tmp_path, "10", clock=lambda: 1060.0).acquire()
    late = RunLock(tmp_path, "10", clock=lambda: 1200.0)
    late.acquire()
    assert late.took_over and "no heartbeat for 200 s" in late.took_over

    # The holder that was thought gone finds out before its next write.
    (tmp_path / LOCK_FILE).write_text(json.dumps(far.__dict__))
    with pytest.raises(RunLockLost, match="lost its lock to Flower run 9"):
        late.check()
    late.release()
    assert (tmp_path / LOCK_FILE).exists()  # not ours any more: left alone


def test_the_heartbeat_renews_the_lock(tmp_path: Path) -> None:
    ticks = iter(range(100, 10_000))
    renewed = threading.Event()
    lock = RunLock(tmp_path, "1", interval=0.01, clock=lambda: float(next(ticks)))
    with lock:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        for _ in range(500):
            if json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first:
                renewed.set()
                break
            renewed.wait(0.01)
    assert renewed.is_set()


def test_a_coordinator_on_a_locked_run_directory_writes_nothing(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    task_identity: None,
    make_grid: Any,
) -> None:
    config = {**run_config, "num-server-rounds": 1, "cross-site": False}
    run_dir = Path(config["run-dir"])
    with RunLock(run_dir, "41"), pytest.raises(RunLockedError, match="Flower run 41"):
        _run(make_grid(_nodes(site_caches, "site_a", "site_b"), config), config, run_id=42)
    assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock.guard"]


# --- crash-safe run files --------------------------------------------------------------------


class Crash(Exception):
    """The coordinator dies before a write."""


def test_resume_completes_after_a_crash_at_any_point_of_a_round(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    task_identity: None,
    make_grid: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Round 1's bookkeeping writes the weights, the card, the metrics line, best.json (when
    the round is the best) and latest.json.  The coordinator dies before the first of them,
    the resumed one before the second, and so on; the last resume completes."""
    nodes = _nodes(site_caches, "site_a", "site_b")
    config = {**run_config, "num-server-rounds": 1, "cross-site": False, "best-metric": "ext-loss"}
    run_dir = Path(config["run-dir"])
    state = {"round": 0, "writes": 0, "crash_before": 0}
    check, save_round = RunLock.check, RunDirectory.save_round

    def counting(lock: RunLock) -> None:
        state["writes"] += 1
        if state["round"] == 1 and state["writes"] == state["crash_before"]:
            raise Crash
        check(lock)

    def marking(self: RunDirectory, server_round: int, *args: Any, **kwargs: Any) -> str:
        state.update(round=server_round, writes=0)
        return save_round(self, server_round, *args, **kwargs)

    monkeypatch.setattr(RunLock, "check", counting)
    monkeypatch.setattr(RunDirectory, "save_round", marking)
    crashed = []
    for crash_before in (1, 2, 3, 4, 5, 0):
        state.update(round=0, writes=0, crash_before=crash_before)
        try:
            _run(make_grid(nodes, config), config)
        except Crash:
            crashed.append(crash_before)
        config = {**config, "resume-from": str(run_dir)}
    assert crashed[:4] == [1, 2, 3, 4]  # 5: best.json, written when round 1 was the best
    _assert_whole(run_dir, 1)


def test_a_torn_metrics_line_is_repaired_on_resume_with_a_warning(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    task_identity: None,
    make_grid: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nodes = _nodes(site_caches, "site_a", "site_b")
    config = {**run_config, "num-server-rounds": 1, "cross-site": False}
    _run(make_grid(nodes, config), config)
    run_dir = Path(config["run-dir"])
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + whole.splitlines()[-1][:40].replace('"round": 1', '"round": 2'))
    assert _rounds_tolerant(run_dir) == [0, 1]  # readers skip the torn line

    resumed = {**config, "num-server-rounds": 2, "resume-from": str(run_dir)}
    _run(make_grid(nodes, resumed), resumed)
    assert "its last line was cut short" in caplog.text and str(metrics) in caplog.text
    _assert_whole(run_dir, 2)

    # The torn line is the latest round's own: that round is trained again.
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]) + lines[-1][:30])
    resumed = {**resumed, "num-server-rounds": 2}
    _run(make_grid(nodes, resumed), resumed)
    assert "round 2 has no metrics line; resuming after round 1" in caplog.text
    _assert_whole(run_dir, 2)

    metrics.write_text("".join(lines[:1]) + "not json\n" + "".join(lines[1:]))
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: line 2 is not JSON"):
        RunDirectory(run_dir).metrics()


def _rounds_tolerant(run_dir: Path) -> list[int]:
    return [line["round"] for line in RunDirectory(run_dir).metrics()]


# --- named failures and the straggler deadline -----------------------------------------------


def test_every_round_names_who_trained_and_who_failed_with_the_reason(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    tmp_path: Path,
    task_identity: None,
    make_grid: Any,
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    nodes = [
        *_nodes(site_caches, "site_a", "site_b"),
        {"data-path": str(broken), "site": "broken"},
        {"data-path": str(site_caches["site_a"]), "site": "dead"},
    ]
    config = {**run_config, "num-server-rounds": 1, "cross-site": False, "round-timeout": 3600.0}
    grid = make_grid(nodes, config)
    grid.silent = {13}  # the "dead" site: online, never answers
    _run(grid, config)  # ends by the straggler deadline, not after 2 × 3600 s
    card = json.loads((Path(config["run-dir"]) / "round_001.card.json").read_text())
    sites = card["train"]["sites"]
    assert sites["trained"] == ["site_a", "site_b"] and sites["not_sampled"] == []
    failed = {(f["site"], f["phase"]): (f["node_id"], f["reason"]) for f in sites["failed"]}
    assert set(failed) == {(s, p) for s in ("broken", "node-13") for p in ("train", "evaluate")}
    # A fixed reason: the site's path and its problem stay in the site's own log.
    assert all(failed["broken", p] == (12, "site 'broken': " + fixed_reason("site"))
               for p in ("train", "evaluate"))  # fmt: skip
    # It never replied, so only its node id is known (its registered name where there is one).
    assert "straggler deadline" in failed["node-13", "train"][1]
    assert [(f["site"], f["node_id"]) for f in card["train"]["failures"]] == [
        ("broken", 12),
        ("node-13", 13),
    ]
    line = json.loads((Path(config["run-dir"]) / "metrics.jsonl").read_text().splitlines()[1])
    assert line["failed_sites"] == ["broken", "node-13"] and line["failures"] == 2


def test_the_card_lists_sites_not_sampled_and_not_connected() -> None:
    roster = Roster({10: "a", 11: "b", 12: "c"})
    roster.registered = {14: "d-registered"}
    sites = roster.round_sites([10, 11, 14], [10, 11], ["a", "b"], {"train": []})
    assert sites["not_sampled"] == [
        {"site": "d-registered", "node_id": 14, "reason": "connected, not sampled"},
        {"site": "c", "node_id": None, "reason": "not connected"},
    ]


class ScriptedGrid:
    """Replies arrive at scripted times of a fake clock; node 3 never replies."""

    def __init__(self, at: dict[int, float], clock: list[float]) -> None:
        self.at, self.clock, self.sent = at, clock, {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            ids.append(f"m{i}")
            self.sent[f"m{i}"] = message.metadata.dst_node_id
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [FakeReply(i) for i in ids if self.at.get(self.sent[i], 1e9) <= self.clock[0]]


class FakeReply:
    def __init__(self, message_id: str) -> None:
        self.metadata = type("M", (), {"reply_to_message_id": message_id, "src_node_id": 1})()

    def has_error(self) -> bool:
        return False


class Dest:
    def __init__(self, node: int) -> None:
        self.metadata = type("M", (), {"dst_node_id": node})()


def test_the_straggler_deadline_is_a_multiple_of_the_median_reply_time() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    grid = ScriptedGrid({1: 10.0, 2: 14.0}, clock)
    out = collect(grid, [Dest(n) for n in (1, 2, 3)], timeout=3600, minimum=2, factor=2.0,
                  clock=lambda: clock[0], sleep=sleep)  # fmt: skip
    assert out.seconds == {1: 10.0, 2: 14.0}
    # Replies are matched to the node they answer, whatever their source says.
    assert sorted(out.node(r) for r in out.replies) == [1, 2]
    assert clock[0] == pytest.approx(24.0)  # 2 × median(10, 14)
    assert "straggler deadline (2 × the median reply time 12.0 s = 24.0 s)" in out.missing[3]

    clock[0] = 0.0
    grid = ScriptedGrid({1: 10.0, 2: 14.0}, clock)
    off = collect(grid, [Dest(n) for n in (1, 2, 3)], timeout=100, minimum=2, factor=0,
                  clock=lambda: clock[0], sleep=sleep)  # fmt: skip
    assert clock[0] == pytest.approx(100.0) and "round-timeout (100 s)" in off.missing[3]


# --- the SuperLink lost, run-config values of the wrong type ---------------------------------


class UnreachableGrid:
    def __init__(self) -> None:
        self._retry_invoker = type("Invoker", (), {"max_time": None})()

    def get_node_ids(self) -> list[int]:
        raise httpx.ConnectError("All connection attempts failed")


def test_a_coordinator_that_loses_its_superlink_stops_and_releases_its_lock(
    tmp_path: Path,
) -> None:
    grid = UnreachableGrid()
    with pytest.raises(SuperLinkLost) as lost:  # noqa: SIM117 (the raises wraps both)
        with superlink_outage(grid, 5.0, tmp_path), RunLock(tmp_path, "3"):
            assert grid._retry_invoker.max_time == 5.0
            grid.get_node_ids()
    assert "superlink-grace = 5 s" in str(lost.value)
    assert f"resume-from = {tmp_path}" in str(lost.value)
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", "abc", "lr = 'abc' must be a number (default 0.001)"),
        ("num-server-rounds", 2.5, "num-server-rounds = 2.5 must be a whole number"),
        ("cross-site", "yes", "cross-site = 'yes' must be true or false"),
        ("strategy", 3, "strategy = 3 must be a string"),
        ("straggler-factor", 0.5, "straggler-factor must be 0 (off) or at least 1"),
        ("slice-chunk", 0, "slice-chunk must be at least 1"),
    ],
)
def test_a_run_config_value_of_the_wrong_type_names_the_key(
    run_config: dict[str, Any], key: str, value: Any, message: str
) -> None:
    with pytest.raises(SettingsError) as error:
        ServerSettings.from_run_config({**run_config, key: value})
    assert message in str(error.value)


def test_an_external_cache_is_verified_before_the_run(
    site_caches: dict[str, Path], run_config: dict[str, Any], tmp_path: Path
) -> None:
    external = tmp_path / "external"
    shutil.copytree(site_caches["external"], external)
    next((external / "scans").glob("*.npy")).write_bytes(b"")
    with pytest.raises(SettingsError, match="external cache: .*damaged cached scan"):
        ServerSettings.from_run_config({**run_config, "external-caches": f"x={external}"})
