"""Make docs/viewer.png: the viewer's page for a synthetic study, in Debian's chromium.

A synthetic COVID-19 study (``fedct synth``'s phantom, 48 slices at 256²) is written as DICOM
and zipped; the model is ``--model`` (docs/viewer.png: the demo's picked round, e.g.
``demo/runs/RUN/round_002.card.json`` after ``make demo``), else a card made for the demo's
Lite0 at 128² (ImageNet weights, untrained head: the picture then shows the page, not a
diagnosis); ``fedct serve`` runs on a free loopback port, the zip is uploaded through the
page, the overlay is set to 70 % and the page captured.

    .venv/bin/python docs/viewer_screenshot.py [--model CARD] [--out docs/viewer.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from fedct.common.model.classifier import ModelConfig, build_model
from fedct.common.run.directory import RunDirectory
from fedct.common.synth.cohort import render_scan
from fedct.common.synth.dicom_writer import ScannerProfile, SeriesSpec, make_uid, write_ct_series


def study_zip(folder: Path) -> Path:
    rng = np.random.default_rng(7)
    hu = render_scan("covid", 3, rng, (48, 256, 256), (5.0, 1.4, 1.4))
    spec = SeriesSpec("Synthetic^Patient", "SYN-7", make_uid(rng), make_uid(rng))
    paths = write_ct_series(folder / "series", hu, spec, ScannerProfile(), rng=rng)
    archive = folder / "study.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in paths:
            zipped.write(path, f"series/{path.name}")
    return archive


def model_card(folder: Path) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(backbone="tf_efficientnet_lite0", pretrained_weights="imagenet")
    state = {k: v.detach().numpy() for k, v in build_model(config).state_dict().items()}
    card = {
        "model_config": dataclasses.asdict(config),
        "run_config": {"image-size": 128, "slice-fraction": 0.5, "normalize": "lung-window"},
        "operating_point": {
            "threshold": 0.35,
            "rule": "sens_at_spec",
            "chosen_on": "the sites' pooled tune splits (illustration)",
            "sensitivity": 0.8,
            "specificity": 0.95,
            "min_specificity": 0.95,
        },
    }
    RunDirectory(folder).save_round(1, state, card, {}, {})
    return RunDirectory(folder).card_path(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("viewer.png"))
    parser.add_argument("--model", type=Path, help="a trained checkpoint or its card")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = study_zip(work / "study")
        card = args.model.resolve() if args.model else model_card(work / "run")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        fedct = Path(sys.executable).with_name("fedct")
        command = [str(fedct), "serve", "--model", str(card), "--workdir", str(work / "viewer")]
        server = subprocess.Popen([*command, "--address", f"127.0.0.1:{port}"])
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--window-size=1240,860"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            url = f"http://127.0.0.1:{port}/"
            for _ in range(300):
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.5)
            driver.get(url)
            driver.find_element(By.ID, "zip").send_keys(str(archive))
            driver.find_element(By.ID, "zip-send").click()
            WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.ID, "stage"))
            opacity = driver.find_element(By.ID, "opacity")
            opacity.send_keys(*[Keys.ARROW_LEFT] * 30)  # 100 % → 70 %
            driver.execute_script("window.scrollTo(0, 0)")
            time.sleep(0.5)
            shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        finally:
            driver.quit()
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    shot = shot.resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.Resampling.LANCZOS)
    shot.quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
