"""``fedct serve``: a local web viewer that diagnoses uploaded studies and shows their evidence.

A radiologist uploads a study (a zip, or a folder through the browser's folder picker),
follows its progress, and reads the page ``fedct diagnose`` writes for it, served with a
slice viewer and the evidence overlay (client/evaluator/diagnosis_page.py).  The web app is
Starlette on uvicorn (client/viewer/app.py): an ASGI toolkit and server kept up by the
encode project, small enough to review, with multipart uploads, trusted-host checks and TLS
and nothing the viewer does not use (FastAPI adds request models and OpenAPI on top of the
same Starlette; the viewer has none to declare).

It listens on loopback by default.  Any other address needs ``--token-file`` and TLS
(``--tls-cert``/``--tls-key``, e.g. ``fedct certs --viewer-san HOST``).  Everything it writes —
uploads, the temporary caches, the pages, the exported backbone — lies under ``--workdir``
(its ``tmp`` is the process's temporary folder); uploads are deleted once scored, results
after ``--keep-minutes``, and all of it when the viewer stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
from pathlib import Path

from rich.markup import escape

from fedct.client.evaluator.diagnose import Diagnoser
from fedct.client.evaluator.study_input import Limits
from fedct.client.viewer.app import create_app
from fedct.client.viewer.jobs import Jobs
from fedct.common.console import err, out
from fedct.common.registry_proto import BadInput, is_loopback, read_token
from fedct.common.run.directory import CheckpointLoadError
from fedct.common.training.device import DeviceError


class ServeError(ValueError):
    """A refused setting of ``fedct serve`` (one line)."""


def listen_address(address: str, token_file: Path | None, cert: Path | None, key: Path | None):
    """(host, port) of ``address``; ServeError when a non-loopback address lacks the token
    or TLS, or when only one of certificate and key is given."""
    loopback = is_loopback(address)
    host, _, port = address.rpartition(":")
    if (cert is None) != (key is None):
        raise ServeError("give both --tls-cert and --tls-key, or neither")
    if not loopback and (token_file is None or cert is None):
        raise ServeError(
            f"address {address}: not loopback, so the viewer would show patient images to the "
            "network; it needs --token-file and --tls-cert/--tls-key (fedct certs --viewer-san)"
        )
    return host.removeprefix("[").removesuffix("]"), int(port)


def allowed_hosts(host: str, port: int) -> list[str]:
    """The Host header values the viewer answers to (with and without the port)."""
    names = {host, f"{host}:{port}"}
    if is_loopback(f"{host}:{port}"):
        for name in ("localhost", "127.0.0.1", "[::1]"):
            names |= {name, f"{name}:{port}"}
    if ":" in host:
        names |= {f"[{host}]", f"[{host}]:{port}"}
    return sorted(names)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        host, port = listen_address(args.address, args.token_file, args.tls_cert, args.tls_key)
        token = read_token(args.token_file) if args.token_file else None
        if args.max_upload_mb < 1 or args.max_files < 1 or args.keep_minutes <= 0:
            raise ServeError("--max-upload-mb, --max-files and --keep-minutes must be positive")
    except (BadInput, ServeError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fedct-serve-")) if own_workdir else args.workdir
    scratch = workdir / "tmp"
    jobs = None
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        # Spooled uploads and every temporary file of this process land in the work folder.
        tempfile.tempdir = str(scratch)
        os.environ["TMPDIR"] = str(scratch)
        diagnoser = Diagnoser(
            args.model,
            engine=args.engine,
            device=args.device,
            slice_chunk=args.slice_chunk,
            export_cache=workdir / "exported",
        )
        limits = Limits(max_bytes=args.max_upload_mb << 20, max_files=args.max_files)
        jobs = Jobs(diagnoser, workdir, limits, args.keep_minutes * 60, workers=args.workers)
        app = create_app(
            jobs, hosts=allowed_hosts(host, port), token=token, secure=args.tls_cert is not None
        )
        scheme = "https" if args.tls_cert else "http"
        out.print(f"fedct viewer on {scheme}://{args.address}/ (Ctrl-C stops it)", highlight=False)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=args.tls_cert,
            ssl_keyfile=args.tls_key,
            log_level="warning",
            access_log=False,  # URLs hold only random job ids, but the viewer keeps no log
        )
        server = uvicorn.Server(config)
        # uvicorn stops on SIGTERM, then raises it again: it must end here, not kill the
        # process before the uploads are deleted.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        server.run()
        return 0 if server.started else 2
    except (CheckpointLoadError, DeviceError, OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    finally:
        if jobs is not None:
            jobs.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        out.print("viewer stopped; its uploads and results were deleted", highlight=False)
