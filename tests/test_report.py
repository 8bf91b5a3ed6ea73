"""``fedct report`` on a tiny run directory written the way the coordinator writes one."""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from page_parts import Page

from fedct.common.run.directory import RunDirectory
from fedct.server import commands
from fedct.server.report import run
from fedct.server.tensorboard_log import round_scalars

EXTERNAL_LINK = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", re.IGNORECASE)
CROSS_SITE = {
    "sites": ["hospital-a", "hospital-b"],
    "models": ["global", "hospital-a", "hospital-b"],
    "auc_covid": [[0.91, 0.88, None], [0.86, None, 0.9]],
    "accuracy": [[0.8, 0.79, 0.7], [0.75, None, 0.81]],
}


def make_run(run_dir: Path) -> None:
    """Rounds 0..3; hospital-b misses round 2, the central AUC of round 1 is missing."""
    store = RunDirectory(run_dir)
    for r in range(4):
        sites = {"hospital-a": 10} if r == 2 else {"hospital-a": 10, "hospital-b": 8}
        participants = [
            {"site": site, "num-examples": n, "metrics": {"loss": 1.0 / (r + 1), "accuracy": 0.5}}
            for site, n in sites.items()
        ]
        central = {"mosmed-auc_covid": 0.6 + 0.1 * r, "mosmed-loss": 1.0 - 0.1 * r}
        if r == 1:
            del central["mosmed-auc_covid"]
        threshold = 0.4 + 0.01 * r
        if r >= 2:  # round 2's central evaluation at a fixed 0.5, round 3's at its threshold
            central.update({"mosmed-sens_covid": 0.7, "mosmed-spec_covid": 0.9})
            central["mosmed-threshold"] = threshold if r == 3 else 0.5
        train = {"participants": participants if r else []}
        sites_evaluated = [
            {
                "site": site,
                "metrics": {
                    "tune-auc_covid": 0.55 + 0.05 * r,
                    "tune-auc_covid_low": 0.4,
                    "tune-auc_covid_high": 0.8,
                    "test-auc_covid": 0.6,
                },
            }
            for site in sites
        ]
        card = {
            "model_config": {"backbone": "test_efficientnet"},
            "run_config": {"seed": 0, "dp": False, "dp-delta": 0.0, "lr": 0.0012345678901},
            "federated_evaluation": {"sites": sites_evaluated if r else []},
            "central_evaluation": central,
            "software": {"fedct": "0.1.0", "torch": "2.14.1"},
            "run": {"run_key": "k", "flower_run_id": 77},
            "operating_point": {
                "threshold": threshold,
                "rule": "sens_at_spec",
                "chosen_on": "pooled tune splits of 2 sites, 30 scans",
                "sensitivity": 0.8,
                "specificity": 0.95,
                "min_specificity": 0.95,
            }
            if r
            else None,
        }
        line = {
            "sites": sites if r else {},
            "failures": 0,
            "train": {"loss": 1.0 / (r + 1)} if r else {},
            "federated": {"tune-auc_covid": 0.5 + 0.1 * r, "tune-loss": 0.9} if r else {},
            "central": central,
        }
        store.save_round(r, {"w": np.full(2, r, np.float32)}, {**card, "train": train}, line, {})
        store.update_best(r, "mosmed-auc_covid", central.get("mosmed-auc_covid"))


def report_cli(*argv: object) -> int:
    parser = argparse.ArgumentParser()
    commands.report.add_arguments(parser)
    return run(parser.parse_args([str(a) for a in argv]))


def test_report_renders_curves_card_and_absent_cross_site_cells(tmp_path: Path) -> None:
    make_run(tmp_path)
    (tmp_path / "cross_site.json").write_text(json.dumps(CROSS_SITE))
    assert report_cli(tmp_path) == 0
    page = (tmp_path / "report.html").read_text()

    assert not EXTERNAL_LINK.search(page)
    assert page.count("<svg") == 6  # AUC, loss, sites' tune and test AUC, loss and accuracy
    for name in ("mosmed (external)", "tune (sites pooled)", "hospital-b", "train"):
        assert name in page
    best = RunDirectory(tmp_path).read_json("round_003.card.json")
    assert "Model card of round 3" in page and best["sha256"] in page
    nulls = sum(
        v is None for key in ("auc_covid", "accuracy") for row in CROSS_SITE[key] for v in row
    )
    assert page.count('title="absent"') == nulls
    assert "0.910" in page


def test_report_marks_the_best_round_and_shows_sites_rounds_and_cross_site_detail(
    tmp_path: Path,
) -> None:
    make_run(tmp_path)
    cross = {
        **CROSS_SITE,
        "global_round": 3,
        "n": [[12, 12, None], [9, None, 9]],
        "auc_covid_ci": [[[0.8, 0.97], [0.7, 0.95], None], [[0.7, 0.95], None, [1.0, 1.0]]],
    }
    (tmp_path / "cross_site.json").write_text(json.dumps(cross))
    assert report_cli(tmp_path) == 0
    text = (tmp_path / "report.html").read_text()
    page = Page(text)
    assert page.sections == [
        "Per round",
        "Operating point per round",
        "Tune and test AUC per site",
        "Participation per round",
        "Train metrics per site",
        "Model card of round 3",
        "Cross-site evaluation",
    ]
    rounds = page.table_with("tune AUC")
    assert rounds[0][:6] == ["round", "sites", "failures", "train loss", "tune AUC", "test AUC"]
    assert [row[0] for row in rounds[1:]] == ["0", "1", "2", "3"]
    assert rounds[4][-1] == "◀ best" and text.count('<tr class="best">') == 1
    assert "0.8" in rounds[4] and "0.9" in rounds[4]  # rounded, not 0.8000000000000002
    assert text.count(">chance</text>") == 3  # the AUC charts
    assert text.count(">best: round 3</text>") == 6
    assert "tune AUC per site (band: 95% CI)" in text and "test AUC per site" in text
    overview = dict(page.tables[0])
    assert overview["best round"].startswith("round 3: mosmed AUC 0.900")
    assert overview["Flower run id"] == "77"
    assert "dp-delta" not in text.split("the whole card")[0] and "0.001235" in text
    header = page.table_with("test data of ↓ / model →")[0]
    assert header[1:] == ["global (round 3)", "hospital-a's own", "hospital-b's own"]
    assert "The global model scored here is round 3's, the card's above." in html.unescape(text)
    points = page.table_with("threshold")
    assert points[0][-2:] == ["mosmed sensitivity", "mosmed specificity"]
    assert [row[0] for row in points[1:]] == ["1", "2", "3"]
    # Round 2's central evaluation was at 0.5, not at its threshold: not shown as if it were.
    assert points[2][1] == "0.42" and points[2][-2:] == ["—", "—"]
    assert points[3][1] == "0.43" and points[3][-2:] == ["0.7", "0.9"]
    assert ["mosmed-sens_covid (at 0.43)", "0.7"] in [row for t in page.tables for row in t]
    assert "n = 12, CI 0.80–0.97" in text and "n = 9, no CI: every resample equal" in text


def test_report_without_cross_site_file_says_so(tmp_path: Path) -> None:
    make_run(tmp_path)
    out = tmp_path / "elsewhere" / "run.html"
    assert report_cli(tmp_path, "--out", out) == 0
    assert "This run has no cross_site.json." in out.read_text()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "unreadable"),
        (json.dumps({**CROSS_SITE, "auc_covid": [[0.9, 0.8]]}), "auc_covid must be 2 rows"),
        (json.dumps({**CROSS_SITE, "sites": "hospital-a"}), "sites must be a non-empty list"),
    ],
)
def test_malformed_cross_site_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, reason: str
) -> None:
    make_run(tmp_path)
    (tmp_path / "cross_site.json").write_text(content)
    assert report_cli(tmp_path) == 2
    err = capsys.readouterr().err
    assert "cross_site.json" in err and reason in err and "Traceback" not in err


def test_a_folder_without_metrics_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_cli(tmp_path) == 2
    assert "metrics.jsonl: missing" in capsys.readouterr().err


def test_tensorboard_logs_the_operating_point_and_names_other_thresholds() -> None:
    line = {
        "round": 2,
        "central": {"ext-sens_covid": 0.8, "ext-threshold": 0.41, "ext-auc_covid": 0.9},
        "federated": {"tune-sens_covid_at_0.5": 0.6},
    }
    card = {"operating_point": {"threshold": 0.41, "sensitivity": 0.85, "specificity": 0.95}}
    tags = round_scalars(line, card, None)
    assert tags["central/ext/sens_covid"] == 0.8 and tags["central/ext/threshold"] == 0.41
    assert tags["federated/tune-sens_covid_at_0.5"] == 0.6
    assert tags["operating_point/threshold"] == 0.41
    assert tags["operating_point/tune_sensitivity"] == 0.85
