"""Seconds per study of ``fedct diagnose``, from the raw DICOM files to the written result.

One synthetic chest CT of ``--slices`` slices at 512 × 512 (``fedct synth``'s phantom, a
COVID-19 case) is written as a DICOM series once, then diagnosed by each model with the engine
``fedct evaluate`` uses on a CPU (``auto``: OpenVINO), as the viewer does: the model loaded and
compiled once, its feature-map export too (reported apart, as ``load_seconds``), then
``--repeats`` studies timed whole.
Targets: ≤ 5 s for the demo model (tf_efficientnet_lite0 at 128², configs/demo.toml), ≤ 30 s
for B3 at 512² (configs/ai-corona.toml).  Weights are random: speed does not depend on them.

Where the time goes: diagnose's own phases (``read``: the headers and the series choice;
``prepare``: fedct prepare's reading, middle-slice selection, decoding and normalising into the
temporary cache; ``score``; ``cam``: the evidence maps; ``write``: pictures and pages), and
prepare's work timed apart on the same study (``read_headers``, ``decode_selected``,
``normalise_resize``).

    python -m bench.diagnose [--slices 300] [--models demo,b3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import RESULTS, machine
from fedct.client.evaluator.diagnose import Diagnoser
from fedct.common.cache.normalize import parse_normalization, to_cache_pixels
from fedct.common.cache.selection import middle_slices
from fedct.common.ingest.base import Scan
from fedct.common.ingest.discover import read_input
from fedct.common.model.classifier import ModelConfig, build_model
from fedct.common.run.directory import RunDirectory
from fedct.common.synth.cohort import render_scan
from fedct.common.synth.dicom_writer import ScannerProfile, SeriesSpec, make_uid, write_ct_series

MODELS = {
    "demo": {
        "backbone": "tf_efficientnet_lite0",
        "run_config": {"image-size": 128, "slice-fraction": 0.5, "normalize": "lung-window"},
        "target_seconds": 5.0,
    },
    "b3": {
        "backbone": "efficientnet_b3",
        "run_config": {"image-size": 512, "slice-fraction": 0.5, "normalize": "ai-corona"},
        "target_seconds": 30.0,
    },
}


def write_study(folder: Path, slices: int) -> Path:
    """A COVID-19 phantom of ``slices`` 1-mm slices at 512², as one DICOM series."""
    rng = np.random.default_rng(0)
    hu = render_scan("covid", 2, rng, (slices, 512, 512), (1.0, 0.7, 0.7))
    spec = SeriesSpec(
        patient_name="Bench^Study",
        patient_id="BENCH",
        study_uid=make_uid(rng),
        series_uid=make_uid(rng),
        spacing_mm=(1.0, 0.7, 0.7),
        thickness_mm=1.0,
    )
    write_ct_series(folder / "series", hu, spec, ScannerProfile(), rng=rng)
    return folder


def make_card(folder: Path, name: str) -> Path:
    torch.manual_seed(0)
    spec = MODELS[name]
    config = ModelConfig(backbone=spec["backbone"])
    state = {k: v.detach().numpy() for k, v in build_model(config).state_dict().items()}
    card = {"model_config": dataclasses.asdict(config), "run_config": spec["run_config"]}
    RunDirectory(folder).save_round(1, state, card, {}, {})
    return RunDirectory(folder).card_path(1)


def prepare_parts(study: Path, settings: dict[str, Any]) -> dict[str, float]:
    """fedct prepare's work on the study, timed step by step."""
    began = time.perf_counter()
    (scan,) = [item for item in read_input(study) if isinstance(item, Scan)]
    headers = time.perf_counter()
    start, stop = middle_slices(scan.n_slices, settings["fraction"])
    hu = scan.load(start, stop)
    decoded = time.perf_counter()
    norm = parse_normalization(settings["normalize"])
    to_cache_pixels(hu, norm, scan.intensity, settings["size"])
    done = time.perf_counter()
    return {
        "read_headers": headers - began,
        "decode_selected": decoded - headers,
        "normalise_resize": done - decoded,
        "selected_slices": stop - start,
    }


def bench_model(name: str, study: Path, work: Path, repeats: int) -> dict[str, Any]:
    began = time.perf_counter()
    diagnoser = Diagnoser(make_card(work / f"run-{name}", name), export_cache=work / "exported")
    load = time.perf_counter() - began
    runs = []
    for i in range(repeats):
        out = work / f"out-{name}-{i}"
        began = time.perf_counter()
        outcome = diagnoser.diagnose(study, out)
        seconds = time.perf_counter() - began
        (entry,) = outcome.studies
        assert entry["status"] == "diagnosed", entry["reason"]
        runs.append({"seconds": seconds, "phases": outcome.seconds})
        shutil.rmtree(out)
    median = statistics.median(r["seconds"] for r in runs)
    target = MODELS[name]["target_seconds"]
    return {
        "backbone": MODELS[name]["backbone"],
        "image_size": diagnoser.settings["size"],
        "engine": diagnoser.engine,
        "load_seconds": load,
        "seconds_per_study": median,
        "target_seconds": target,
        "met": median <= target,
        "runs": runs,
        "prepare_parts": prepare_parts(study, diagnoser.settings),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--models", default="demo,b3", help="demo, b3 or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS / "diagnose.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if unknown := set(names) - set(MODELS):
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
    result: dict[str, Any] = {
        "machine": {**machine(), "threads": args.threads},
        "slices": args.slices,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="fedct-bench-diagnose-") as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        study = write_study(work / "study", args.slices)
        print(
            f"wrote a {args.slices}-slice 512² DICOM study in {time.perf_counter() - began:.0f} s"
        )
        for name in names:
            figures = bench_model(name, study, work, args.repeats)
            result["models"][name] = figures
            phases = figures["runs"][len(figures["runs"]) // 2]["phases"]
            print(
                f"{name}: {figures['seconds_per_study']:.1f} s per study (target "
                f"≤ {figures['target_seconds']:g} s: {'met' if figures['met'] else 'NOT met'}), "
                f"engine {figures['engine']}, load {figures['load_seconds']:.1f} s; "
                + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
                + " s; prepare's parts: "
                + ", ".join(
                    f"{k} {v:.2f}"
                    for k, v in figures["prepare_parts"].items()
                    if k != "selected_slices"
                )
                + " s"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"on {result['machine']['cpu']}, {result['machine']['cores']} cores → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
