"""``fedct serve`` in a real browser: Debian's chromium driven by selenium through chromedriver.

The viewer runs as its own process (stopped by its PID), a synthetic study is uploaded as a
zip through the page, and what the page shows is checked against ``fedct diagnose``'s JSON
for the same study; the slice slider, mouse wheel, arrow keys, overlay toggle and opacity are
used as a radiologist would; a broken zip must give a message in the page.  Screenshots go
to the test's tmp folder.  CI installs chromium and chromium-driver (.ci/run); where they are
missing outside CI the test is skipped, in CI it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from study_files import write_study, zip_folder
from test_diagnose import diagnose_cli
from test_evaluate import STORED_OP, make_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FEDCT = Path(sys.executable).with_name("fedct")


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        message = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A running viewer over a tiny model, a zipped study and diagnose's result for it."""
    _browser_or_skip()
    root = tmp_path_factory.mktemp("viewer")
    card = make_run(root / "run", operating_point=STORED_OP)
    study_uid = write_study(root / "study", np.random.default_rng(3), slices=16, opacity=0.7)
    archive = zip_folder(root / "study", root / "study.zip")
    assert diagnose_cli("--model", card, "--input", archive, "--out", root / "diagnosed") == 0
    (expected,) = json.loads((root / "diagnosed" / "diagnoses.json").read_text())["studies"]
    port = _free_port()
    workdir = root / "work"
    command = [str(FEDCT), "serve", "--model", str(card), "--workdir", str(workdir)]
    command += ["--address", f"127.0.0.1:{port}", "--device", "cpu", "--workers", "1"]
    log = (root / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for(url, process, root / "serve.log")
        yield {"url": url, "zip": archive, "expected": expected, "uid": study_uid, "root": root}
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    assert not (workdir / "jobs").exists(), "the viewer left uploads behind"


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"fedct serve exited {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"fedct serve did not answer within 90 s: {log.read_text()}")


@pytest.fixture(scope="module")
def browser(viewer: dict[str, object]) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: object, condition: object, seconds: float = 60) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)


def test_a_radiologist_uploads_a_study_and_reads_its_page(
    viewer: dict[str, object], browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(viewer["url"])
    driver.find_element(By.ID, "zip").send_keys(str(viewer["zip"]))
    driver.find_element(By.ID, "zip-send").click()
    _wait(driver, lambda d: "/results/" in d.current_url and d.find_elements(By.ID, "stage"))
    driver.save_screenshot(str(tmp_path / "study.png"))

    expected = viewer["expected"]
    shown = {
        cell.get_attribute("data-class"): float(cell.get_attribute("data-p"))
        for cell in driver.find_elements(By.CSS_SELECTOR, "td.prob")
    }
    assert shown == pytest.approx(expected["probabilities"], abs=1e-9)
    assert expected["decision"]["label"] in driver.find_element(By.ID, "decision").text
    assert f"{STORED_OP['threshold']:.3f}" in driver.find_element(By.ID, "decision").text
    assert expected["model"]["sha256"] in driver.find_element(By.ID, "provenance").text

    stage = driver.find_element(By.ID, "stage")
    picture = driver.find_element(By.ID, "slice")
    label = driver.find_element(By.ID, "slice-label")
    count = expected["slices"]["count"]
    assert f"of {count}" in label.text

    def index() -> int:
        return int(stage.get_attribute("data-index"))

    slider = driver.find_element(By.ID, "slider")
    slider.send_keys(Keys.HOME)
    assert index() == 0 and picture.get_attribute("src").endswith("slice_000.png")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert index() == 2 and picture.get_attribute("src").endswith("slice_002.png")
    assert label.text.startswith(f"selected slice 3 of {count}")
    ActionChains(driver).scroll_from_origin(_origin(stage), 0, 120).perform()
    _wait(driver, lambda d: index() == 3, 5)
    stage.click()
    ActionChains(driver).send_keys(Keys.ARROW_DOWN).perform()
    assert index() == 2 and slider.get_attribute("value") == "3"

    evidence = driver.find_element(By.ID, "evidence")
    assert evidence.is_displayed() and evidence.get_attribute("src").endswith("evidence_002.png")
    toggle = driver.find_element(By.ID, "overlay-toggle")
    toggle.click()
    assert not evidence.is_displayed()
    driver.save_screenshot(str(tmp_path / "overlay-off.png"))
    toggle.click()
    assert evidence.is_displayed()
    driver.find_element(By.ID, "opacity").send_keys(Keys.END)
    assert float(evidence.value_of_css_property("opacity")) == pytest.approx(1.0)
    assert driver.find_element(By.CSS_SELECTOR, ".bar img").get_attribute("naturalWidth") != "0"
    driver.save_screenshot(str(tmp_path / "overlay-full.png"))

    driver.find_element(By.ID, "viewer-nav").find_element(By.TAG_NAME, "a").click()
    _wait(driver, lambda d: viewer["uid"] in d.find_element(By.ID, "seen").text, 10)


def test_a_broken_zip_gives_a_message_in_the_page(
    viewer: dict[str, object], browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    driver = browser
    driver.get(viewer["url"])
    driver.find_element(By.ID, "zip").send_keys(str(broken))
    driver.find_element(By.ID, "zip-send").click()
    message = driver.find_element(By.ID, "message")
    _wait(driver, lambda d: message.is_displayed() and message.text, 60)
    driver.save_screenshot(str(tmp_path / "broken.png"))
    assert "broken.zip: not a readable zip file" in message.text
    assert "Traceback" not in driver.page_source


def _origin(element: object) -> object:
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    return ScrollOrigin.from_element(element)
