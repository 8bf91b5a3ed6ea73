"""The compiled CPU scoring paths give eager PyTorch's scores; failures fall back to eager."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from page_parts import Page
from test_evaluate import TINY, cache, evaluate_cli, make_run  # noqa: F401 (cache: a fixture)

import fedct.common.model.inference_engine as engine
from fedct.common.cache.dataset import Batch
from fedct.common.model import RUNTIMES
from fedct.common.model.cam import class_activation_maps
from fedct.common.model.classifier import build_model
from fedct.common.model.inference_engine import scoring_model
from fedct.common.training.loop import evaluate

CPU = torch.device("cpu")
INSTALLED = [r for r in RUNTIMES if importlib.util.find_spec(r)]
needs_runtime = pytest.mark.skipif(not INSTALLED, reason="neither OpenVINO nor ONNX Runtime")


@pytest.fixture(autouse=True)
def export_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "exported"
    monkeypatch.setattr(engine, "DEFAULT_CACHE", folder)
    return folder


def scans_of_several_lengths() -> Batch:
    """Three scans of 5, 2 and 7 real slices, padded to 7."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 7, 1, 32, 32, generator=generator)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for scan, length in enumerate((5, 2, 7)):
        mask[scan, :length] = True
    return Batch(x, mask, torch.tensor([0, 1, 2]), ["a", "b", "c"], ["pa", "pb", "pc"])


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.mark.parametrize("runtime", INSTALLED or ["none installed"])
@needs_runtime
def test_a_runtime_scores_as_eager_does(runtime: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model()
    batch = scans_of_several_lengths()
    scorer, used = scoring_model(model, runtime, CPU, 32)
    assert used == runtime and scorer is not model
    assert type(model.backbone).__name__ != "RuntimeBackbone"  # the eager model is untouched

    fast = evaluate(scorer, [batch], CPU)
    eager = evaluate(model, [batch], CPU)
    np.testing.assert_allclose(fast.probs, eager.probs, atol=1e-5)
    assert "exporting" in capsys.readouterr().err

    again, _ = scoring_model(model, runtime, CPU, 32)  # read from the export cache
    assert "exporting" not in capsys.readouterr().err
    np.testing.assert_allclose(evaluate(again, [batch], CPU).probs, fast.probs, atol=1e-6)


@needs_runtime
def test_a_runtime_gives_eagers_class_activation_maps() -> None:
    """The compiled backbone's last feature maps (a second export, compiled on first use) give
    the last-stage maps the eager backbone gives (the gradient maps need the eager model)."""
    model = tiny_model()
    scorer, _ = scoring_model(model, INSTALLED[0], CPU, 32)
    slices = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = class_activation_maps(model, slices, 2, method="cam-contrast")
    found = class_activation_maps(scorer, slices, 2, method="cam-contrast")
    np.testing.assert_allclose(found, expected, atol=1e-4)


def test_auto_is_eager_on_cuda_and_eager_is_eager() -> None:
    model = tiny_model()
    assert scoring_model(model, "auto", torch.device("cuda"), 32) == (model, "eager")
    assert scoring_model(model, "eager", CPU, 32) == (model, "eager")


@needs_runtime
def test_a_failing_export_falls_back_to_eager_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(engine, "_EXPORTERS", dict.fromkeys(RUNTIMES, broken))
    model = tiny_model()
    assert scoring_model(model, "auto", CPU, 32) == (model, "eager")
    lines = capsys.readouterr().err.strip().splitlines()
    assert "unsupported operator" in lines[-1] and "eager PyTorch" in lines[-1]
    assert "Traceback" not in "".join(lines)


def test_no_runtime_installed_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(engine.importlib.util, "find_spec", lambda name: None)
    model = tiny_model()
    assert scoring_model(model, "auto", CPU, 32) == (model, "eager")
    assert "neither OpenVINO nor ONNX Runtime is installed" in capsys.readouterr().err
    assert scoring_model(model, "onnxruntime", CPU, 32) == (model, "eager")
    assert "onnxruntime is not installed" in capsys.readouterr().err


def read_probs(out: Path) -> dict[str, list[float]]:
    with open(out / "predictions.csv", newline="") as handle:
        return {
            row["scan_id"]: [float(v) for k, v in row.items() if k.startswith("p_")]
            for row in csv.DictReader(handle)
        }


def test_evaluate_default_engine_agrees_with_the_eager_fallback(
    tmp_path: Path,
    cache: Path,  # noqa: F811
) -> None:
    card = make_run(tmp_path / "run")
    names = ("default", "eager")
    for name, extra in zip(names, ((), ("--engine", "eager")), strict=True):
        args = ("--model", card, "--data", cache, "--out", tmp_path / name, "--cams", "0")
        assert evaluate_cli(*args, "--tune-data", cache, "--splits", "test", *extra) == 0
    engines = [json.loads((tmp_path / n / "metrics.json").read_text())["engine"] for n in names]
    assert engines == [INSTALLED[0] if INSTALLED else "eager", "eager"]
    for name, used in zip(names, engines, strict=True):
        overview = dict(
            row for row in Page((tmp_path / name / "report.html").read_text()).tables[0]
        )
        assert overview["scored by"] == f"{used} on cpu"
    default, eager = read_probs(tmp_path / "default"), read_probs(tmp_path / "eager")
    assert default.keys() == eager.keys() and len(default) == 12
    for scan_id, probs in eager.items():
        np.testing.assert_allclose(default[scan_id], probs, atol=1e-5)
