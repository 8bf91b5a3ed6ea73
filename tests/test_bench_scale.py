"""The scaling benchmark's figures (bench/fl_scale.py), read from small hand-written run
directories and process samples, and the /proc sampler on this test's own process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench.fl_scale import growth, role_of, size_figures
from bench.proc_sampler import ProcessSampler, Watched
from bench.scale_plan import MODELS, plan
from fedct.common.run.directory import RunDirectory

START = 1_000_000.0  # time.time() of round 0's card in the hand-written runs


def write_run(path: Path, sites: int, rounds: int = 3) -> RunDirectory:
    """Rounds 0..rounds of ``sites`` sites: site i trains (i + 1) × 0.1 s, every round takes
    sites × 0.5 s (train phase 0.3 × sites, evaluation 0.1 × sites, central 0.05 s) and moves
    1000 bytes per site each way; round r's card is written at START + 10 r."""
    run_dir = RunDirectory(path)
    path.mkdir()
    for r in range(rounds + 1):
        participants = [
            {"site": f"s{i}", "upload-bytes": 1000, "metrics": {"train-seconds": (i + 1) * 0.1}}
            for i in range(sites)
        ]
        line = {
            "seconds": 0.5 * sites,
            "train-phase-seconds": 0.3 * sites,
            "evaluate-phase-seconds": 0.1 * sites,
            "central-seconds": 0.05,
            "failures": 0,
            "upload-bytes": 1000 * sites,
            "download-bytes": 1000 * sites,
            "evaluate-download-bytes": 1000 * sites,
        }
        replies = {f"s{i}": 0.1 * (i + 1) for i in range(sites)}
        card = {"train": {"participants": participants, "reply-seconds": replies}} if r else {}
        run_dir.save_round(r, {"w": np.zeros(1, np.float32)}, card, line, {})
        os.utime(run_dir.card_path(r), (START + 10 * r, START + 10 * r))
    return run_dir


def sampler_of(sites: int) -> ProcessSampler:
    """A ServerApp that spends 0.1 × sites CPU seconds per 10 s and peaks at 100 MB + 1 MB per
    site, and a SuperLink that spends 0.2 s per 10 s."""
    sampler = ProcessSampler(dict)
    times = [START + 10 * r for r in range(4)]
    sampler.watched[1] = Watched(
        "serverapp", "flwr-serverapp", times, [0.1 * sites * r for r in range(4)],
        [0] * 4, [0] * 4, (100 + sites) * 10**6,
    )  # fmt: skip
    sampler.watched[2] = Watched(
        "superlink", "flower-superlink", times, [0.2 * r for r in range(4)],
        [0, 10, 30, 60], [0, 5, 10, 15], 50 * 10**6,
    )  # fmt: skip
    return sampler


def test_a_size_is_the_median_of_its_steady_rounds(tmp_path: Path) -> None:
    figures = size_figures(write_run(tmp_path / "run", 2), sampler_of(2), 2, 1, 2, 30.0)
    assert figures["measured_rounds"] == [2, 3]
    m = figures["median"]
    assert m["seconds"] == pytest.approx(1.0)
    assert m["other_seconds"] == pytest.approx(1.0 - 0.6 - 0.2 - 0.05)
    assert m["slowest_train_seconds"] == pytest.approx(0.2)
    assert m["last_train_reply_seconds"] == pytest.approx(0.2)
    assert m["after_last_reply_seconds"] == pytest.approx(0.6 - 0.2)
    assert m["median_reply_beyond_train_seconds"] == pytest.approx(0.0)
    assert m["sum_train_seconds"] == pytest.approx(0.3)
    assert m["ideal_train_seconds"] == pytest.approx(0.3)  # one site at a time
    assert m["coordinator_bytes"] == 6000  # train down, evaluate down, train up
    assert m["coordinator_cpu_seconds"] == pytest.approx(0.2 + 0.2)
    assert (m["serverapp_cpu_seconds"], m["superlink_cpu_seconds"]) == pytest.approx((0.2, 0.2))
    # Rounds 2 and 3 of the SuperLink: 20 + 5 and 30 + 5 bytes read and written.
    assert m["superlink_io_bytes"] == pytest.approx(30)
    assert m["serverapp_peak_bytes"] == 102 * 10**6


def test_growth_exponents(tmp_path: Path) -> None:
    sizes = [
        size_figures(write_run(tmp_path / str(n), n), sampler_of(n), n, n, 2, 30.0) for n in (2, 8)
    ]
    (step,) = growth(sizes)
    assert (step["from"], step["to"]) == (2, 8)
    assert step["figures"]["seconds"]["ratio"] == pytest.approx(4.0)
    assert step["figures"]["seconds"]["exponent"] == pytest.approx(1.0)  # linear
    assert step["figures"]["central_seconds"]["exponent"] == pytest.approx(0.0)
    # Σ train seconds: 0.1 · n(n + 1)/2 grows faster than the sites.
    assert step["figures"]["sum_train_seconds"]["exponent"] > 1.5


def test_the_plan_for_100_sites(tmp_path: Path) -> None:
    sizes = [
        size_figures(write_run(tmp_path / str(n), n), sampler_of(n), n, n, 2, 30.0) for n in (2, 8)
    ]
    figures = plan({"simulation": {"sizes": sizes}, "deployment": {"sizes": []}})
    assert figures["payloads_per_site_per_round"] == pytest.approx(3.0)
    b3 = figures["models"]["b3"]
    assert b3["scale_from_tiny"] == pytest.approx(MODELS["b3"] / 1000)
    full = b3["network_per_round"]["fraction-train=1"]
    assert full["bytes"] == pytest.approx(100 * MODELS["b3"] * 3)
    assert full["seconds_at_1_gbit"] == pytest.approx(100 * MODELS["b3"] * 3 * 8 / 1e9)
    assert b3["network_per_round"]["fraction-train=0.2"]["bytes"] == pytest.approx(
        100 * MODELS["b3"] * 1.4
    )
    # The ServerApp spends 0.1 CPU s per site per round in the hand-written samples.
    cpu = b3["serverapp_cpu_seconds"]
    assert cpu["slope_per_site"] == pytest.approx(0.1)
    assert cpu["intercept"] == pytest.approx(0.0, abs=1e-9)
    assert cpu["per_site_as_measured"] == pytest.approx(10.0)
    assert cpu["per_site_scaled_by_bytes"] == pytest.approx(0.1 * 100 * MODELS["b3"] / 1000)
    assert b3["superlink_cpu_seconds"] is None  # no deployed sizes


def test_a_round_a_site_missed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not every site trained"):
        size_figures(write_run(tmp_path / "run", 2), sampler_of(2), 3, 1, 2, 30.0)


def test_the_sampler_reads_this_process() -> None:
    with ProcessSampler(lambda: {os.getpid(): "me"}, interval=0.05) as sampler:
        sampler.sample()  # two samples whenever the thread gets to run, on a loaded machine
        sum(i * i for i in range(200_000))
        sampler.sample()
    (watched,) = sampler.watched.values()
    assert watched.role == "me" and "python" in watched.command
    assert len(watched.times) >= 2 and watched.cpu[-1] >= watched.cpu[0]
    assert sampler.peak_bytes("me") > 0
    assert sampler.roles() == {"me": 1}


def test_roles_of_flower_processes() -> None:
    assert role_of("/venv/bin/python /venv/bin/flwr-simulation --runtime-api-address x") == (
        "serverapp"
    )
    assert role_of("python flower-superlink --insecure") == "superlink"
    assert role_of("python flwr-clientapp --token t") == "clientapp"
    assert role_of("ray::ClientAppActor") == "ray"
