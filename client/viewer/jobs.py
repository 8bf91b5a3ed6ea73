"""The viewer's uploads: saved under the work folder, diagnosed one at a time, then deleted.

An upload is a zip or the files of a folder (their paths relative to it).  It is checked
against the limits while it is saved, diagnosed by the one :class:`Diagnoser` the viewer
holds, and its raw files are deleted as soon as it is scored; its results (pages, pictures)
are deleted ``keep`` seconds later, and everything on :meth:`Jobs.close`.  A job's files live
only in ``WORKDIR/jobs/ID``; its id is random, so URLs and logs name no study.
"""

from __future__ import annotations

import queue
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from fedct.client.evaluator.diagnose import Diagnoser
from fedct.client.evaluator.study_input import ZIP_SUFFIX, InputError, Limits, input_folder
from fedct.common.cache.store import CacheError
from fedct.common.console import err

_COPY_CHUNK = 1 << 20


@dataclass
class Job:
    """One upload and what became of it."""

    id: str
    folder: Path
    name: str
    state: str = "queued"  # queued, running, done, failed, expired
    step: str = "waiting for the scorer"
    share: float = 0.0
    error: str = ""
    studies: list[dict[str, Any]] = field(default_factory=list)
    finished: float | None = None

    @property
    def upload(self) -> Path:
        return self.folder / "upload"

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "step": self.step,
            "share": round(self.share, 3),
            "error": self.error,
            "studies": self.studies,
        }


class Jobs:
    """Saves uploads, runs them through the diagnoser in one worker thread, expires them."""

    def __init__(
        self, diagnoser: Diagnoser, workdir: Path, limits: Limits, keep: float, workers: int = 1
    ) -> None:
        self.diagnoser = diagnoser
        self.root = workdir / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.keep = keep
        self.workers = workers
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="diagnose", daemon=True)
        self._worker.start()

    def save(self, name: str, files: list[tuple[str, BinaryIO]]) -> Job:
        """A new job of the uploaded ``files`` ((relative path, stream) pairs), queued;
        InputError, with nothing left behind, when they break a limit or a path is unsafe."""
        if not files:
            raise InputError("no file was uploaded")
        if len(files) > self.limits.max_files:
            raise InputError(
                f"{len(files)} files uploaded, more than the {self.limits.max_files} allowed"
            )
        job = Job(secrets.token_hex(8), self.root / secrets.token_hex(8), name or "upload")
        try:
            written = 0
            for path, stream in files:
                target = job.upload.joinpath(*_safe_parts(path))
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as sink:
                    while chunk := stream.read(_COPY_CHUNK):
                        written += len(chunk)
                        if written > self.limits.max_bytes:
                            raise InputError(
                                f"the upload is larger than {self.limits.max_bytes >> 20} MiB"
                            )
                        sink.write(chunk)
        except BaseException:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise
        with self._lock:
            self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        self.expire()
        with self._lock:
            return self.jobs.get(job_id)

    def listing(self) -> list[dict[str, Any]]:
        self.expire()
        with self._lock:
            return [job.status() for job in self.jobs.values()]

    def expire(self) -> None:
        """Delete the files of jobs finished more than ``keep`` seconds ago."""
        now = time.monotonic()
        with self._lock:
            old = [
                j
                for j in self.jobs.values()
                if j.finished is not None and j.state != "expired" and now - j.finished > self.keep
            ]
            for job in old:
                job.state, job.step = "expired", "deleted after the keep time"
        for job in old:
            shutil.rmtree(job.folder, ignore_errors=True)

    def close(self) -> None:
        """Stop the worker and delete every job's files."""
        self._queue.put(None)
        self._worker.join(timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            job.state = "running"
            try:
                self._diagnose(job)
            except (InputError, CacheError, OSError, ValueError) as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # a bug: the page says so in one line, the viewer goes on
                job.state, job.error = "failed", f"internal error ({type(exc).__name__})"
                err.print(f"[red]viewer: job {job.id} failed: {type(exc).__name__}[/red]")
            finally:
                shutil.rmtree(job.upload, ignore_errors=True)  # the raw study is not kept
                job.finished = time.monotonic()

    def _diagnose(self, job: Job) -> None:
        entries = list(job.upload.iterdir())
        zipped = len(entries) == 1 and entries[0].suffix.lower() == ZIP_SUFFIX
        source = entries[0] if zipped else job.upload

        def progress(step: str, share: float) -> None:
            job.step, job.share = step, share

        job.out.mkdir(parents=True, exist_ok=True)
        with input_folder(source, job.folder / "unpacked", self.limits) as root:
            outcome = self.diagnoser.diagnose(
                root, job.out, workers=self.workers, progress=progress
            )
        job.studies = [
            {
                "number": s["number"],
                "study": s["study"],
                "status": s["status"],
                "label": (s["decision"] or {}).get("label"),
                "p_covid19": (s["probabilities"] or {}).get("covid19"),
                "reason": s["reason"],
                "page": f"/results/{job.id}/{s['page']}",
            }
            for s in outcome.studies
        ]
        if not outcome.studies:
            raise InputError(
                "no study found in the upload: no DICOM, NIfTI or slice image could be read"
            )
        job.state, job.step, job.share = "done", "done", 1.0


def _safe_parts(path: str) -> tuple[str, ...]:
    """The parts of an uploaded file's relative path; InputError when it could escape."""
    name = PurePosixPath(path.replace("\\", "/"))
    parts = tuple(p for p in name.parts if p not in ("", "."))
    if not parts or name.is_absolute() or ".." in parts or ":" in path:
        raise InputError(f"unsafe file name in the upload: {path!r}")
    return parts
