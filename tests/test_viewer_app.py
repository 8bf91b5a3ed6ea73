"""The viewer's app in process: folder uploads, limits, the token, the host check, addresses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient
from study_files import write_study
from test_evaluate import STORED_OP, make_run

from fedct.client.evaluator.diagnose import Diagnoser
from fedct.client.evaluator.study_input import Limits
from fedct.client.viewer.app import create_app
from fedct.client.viewer.jobs import Jobs
from fedct.client.viewer.server import ServeError, listen_address

HOSTS = ["testserver"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    root = tmp_path_factory.mktemp("viewer-app")
    diagnoser = Diagnoser(make_run(root / "run", operating_point=STORED_OP), engine="eager")
    queue = Jobs(diagnoser, root / "work", Limits(max_bytes=1 << 20, max_files=40), keep=3600)
    yield queue
    queue.close()
    assert not (root / "work" / "jobs").exists()


def _finished(client: TestClient, job: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job}").json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not finish")


def test_a_folder_upload_keeps_its_paths_and_its_files_are_deleted_once_scored(
    jobs: Jobs, tmp_path: Path
) -> None:
    uid = write_study(tmp_path / "export" / "patient", np.random.default_rng(1))
    files = sorted(p for p in (tmp_path / "export").rglob("*") if p.is_file())
    parts = [
        ("files", (p.relative_to(tmp_path / "export").as_posix(), p.read_bytes())) for p in files
    ]
    client = TestClient(create_app(jobs, hosts=HOSTS))
    answer = client.post("/upload", data={"name": "export"}, files=parts)
    assert answer.status_code == 200, answer.text
    status = _finished(client, answer.json()["job"])
    assert status["state"] == "done", status
    (study,) = status["studies"]
    assert study["study"] == uid and study["status"] == "diagnosed"
    page = client.get(study["page"])
    assert page.status_code == 200 and 'id="viewer-nav"' in page.text
    assert page.headers["cache-control"] == "no-store"
    job = jobs.get(answer.json()["job"])
    assert job is not None and not job.upload.exists()  # the raw study is gone
    assert client.get(f"/results/{job.id}/../../../etc/passwd").status_code == 404
    assert client.get(f"/results/{job.id}/.work").status_code == 404


def test_bad_uploads_are_one_line_in_the_page(jobs: Jobs) -> None:
    client = TestClient(create_app(jobs, hosts=HOSTS))
    too_many = [("files", (f"f{i}.dcm", b"x")) for i in range(41)]
    answer = client.post("/upload", files=too_many)
    assert answer.status_code == 400 and "Maximum number of files is 40" in answer.json()["error"]
    unsafe = client.post("/upload", files=[("files", ("../escape.dcm", b"x"))])
    assert unsafe.status_code == 400 and "unsafe file name" in unsafe.json()["error"]
    large = client.post("/upload", files=[("files", ("big.zip", b"0" * (3 << 20)))])
    assert large.status_code == 413 and "larger than 1 MiB" in large.json()["error"]
    foreign = client.post("/upload", files=[("files", ("a.dcm", b"x"))], headers={"Origin": "x"})
    assert foreign.status_code == 403
    junk = client.post("/upload", files=[("files", ("notes.txt", b"hello"))])
    assert _finished(client, junk.json()["job"])["error"].startswith("no study found")
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400


def test_a_token_is_asked_for_and_kept_in_a_cookie(jobs: Jobs) -> None:
    token = "s3cret-token-of-the-viewer"
    client = TestClient(create_app(jobs, hosts=HOSTS, token=token))
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    assert client.get("/studies").status_code == 401
    assert client.post("/login", data={"token": "wrong-token-0000000"}).status_code == 401
    assert client.post("/login", data={"token": token}).status_code == 200
    assert client.get("/studies").status_code == 200


def test_only_loopback_goes_without_token_and_tls(tmp_path: Path) -> None:
    assert listen_address("127.0.0.1:8080", None, None, None) == ("127.0.0.1", 8080)
    with pytest.raises(ServeError, match="not loopback"):
        listen_address("0.0.0.0:8080", None, None, None)
    with pytest.raises(ServeError, match="not loopback"):
        listen_address("10.1.2.3:8080", tmp_path / "token", None, None)
    with pytest.raises(ServeError, match="both --tls-cert and --tls-key"):
        listen_address("127.0.0.1:8080", None, tmp_path / "c.crt", None)
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    assert listen_address("10.1.2.3:8443", tmp_path / "t", cert, key) == ("10.1.2.3", 8443)
