"""The options of the ``fedct`` commands that client/ provides.

Imported to build the parser of ``fedct``, so it imports nothing heavy; a command's
module is imported only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedct.common.cache.config import PrepareConfig
from fedct.common.cli import Command
from fedct.common.commands import add_raw_folder_options
from fedct.common.ingest import FORMATS
from fedct.common.model import ENGINES


def _evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="round_NNN.safetensors or card")
    parser.add_argument("--data", required=True, type=Path, help="prepared cache or raw folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for the three outputs")
    add_raw_folder_options(parser, only="raw folder only: ")
    parser.add_argument("--splits", help="cache splits to report, e.g. test (default: all)")
    parser.add_argument(
        "--tune-data",
        type=Path,
        help="cache to choose the operating point on (its tune split) when the model card "
        "stores none (default: none; then a fixed 0.5, marked as not tuned)",
    )
    parser.add_argument("--rule", choices=("sens_at_spec", "youden"), default="sens_at_spec")
    parser.add_argument("--min-specificity", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--slice-chunk",
        type=int,
        help="slices per forward pass, a memory knob (default: the model card's)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="how the scans are scored: auto (default) is eager PyTorch on CUDA and, on the "
        "CPU, the backbone compiled by OpenVINO, else ONNX Runtime, when installed; eager "
        "forces plain PyTorch (docs/evaluation.md)",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cams", type=int, default=3, help="CAM overlays of correct/wrong scans")
    parser.add_argument("--workers", type=int, default=PrepareConfig().workers)
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier evaluation in --out"
    )


def _diagnose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="round_NNN.safetensors or card")
    parser.add_argument(
        "--input",
        required=True,
        type=Path,
        help="the studies: a DICOM folder (one or many studies), a zip of one, a NIfTI file "
        "or folder, or a slice-image folder",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for diagnoses.json/.csv and the pages"
    )
    _scoring_options(parser)
    parser.add_argument("--workers", type=int, default=PrepareConfig().workers)
    parser.add_argument("--force", action="store_true", help="replace earlier diagnoses in --out")


def _serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="round_NNN.safetensors or card")
    parser.add_argument(
        "--address",
        default="127.0.0.1:8080",
        help="HOST:PORT to listen on; an address other than loopback needs --token-file, "
        "--tls-cert and --tls-key",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for uploads and results, the only place the viewer writes (default: a "
        "new temporary folder, removed on exit)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="file holding the token a browser must give (mode 600; default: none, loopback only)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        help="certificate (PEM), e.g. fedct certs --viewer-san HOST (default: none, plain HTTP)",
    )
    parser.add_argument("--tls-key", type=Path, help="its private key (PEM; default: none)")
    parser.add_argument(
        "--max-upload-mb", type=int, default=2048, help="largest upload (and unpacked zip)"
    )
    parser.add_argument("--max-files", type=int, default=5000, help="most files in one upload")
    parser.add_argument(
        "--keep-minutes",
        type=float,
        default=60.0,
        help="an upload's files and results are deleted this long after it was scored "
        "(and all of them on exit)",
    )
    _scoring_options(parser)
    parser.add_argument("--workers", type=int, default=1, help="header-reading processes")


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    """How studies are read and scored: what diagnose and serve share."""
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="the input's format (auto detects DICOM, NIfTI or slice images)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--slice-chunk",
        type=int,
        help="slices per forward pass, a memory knob (default: the model card's)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="auto (default): OpenVINO on the CPU when installed, as fedct evaluate scores",
    )


def _pull(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="HOST:PORT of the registry")
    parser.add_argument(
        "--token-file", required=True, type=Path, help="bearer token file (mode 600)"
    )
    parser.add_argument(
        "--ca",
        type=Path,
        help="CA certificate (PEM) to verify the registry by (default: none; plaintext, "
        "allowed to a loopback registry only)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow plaintext to a non-loopback registry"
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="RUN:ROUND, RUN:best, RUN:latest or latest")
    what.add_argument(
        "--list",
        action="store_true",
        help="list every checkpoint: run:round, date, tune and external AUC, best/latest",
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--out",
        type=Path,
        help="file to write the weights to, and its .card.json beside it (default: none; "
        "needed with --model unless --card)",
    )
    how.add_argument("--card", action="store_true", help="print the model card only")


def _site(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="site_command", required=True, metavar="SUBCOMMAND")

    def command(name: str, summary: str, *, audited: bool) -> argparse.ArgumentParser:
        sub_parser = sub.add_parser(name, help=summary, description=summary)
        sub_parser.add_argument(
            "--approvals", required=True, type=Path, help="the site's approvals file (JSON)"
        )
        if audited:
            sub_parser.add_argument(
                "--audit-log",
                required=True,
                type=Path,
                help="the site's audit log (the node config's audit-log)",
            )
            sub_parser.add_argument("--note", default="", help="why, by whom (kept in the file)")
        return sub_parser

    approve = command("approve", "approve one app bundle by its sha256", audited=True)
    what = approve.add_mutually_exclusive_group(required=True)
    what.add_argument("app", type=Path, nargs="?", help="an audited checkout, or a .fab")
    what.add_argument("--sha256", help="the bundle's sha256 (`fedct app hash`)")
    trust = command("trust-key", "run every bundle signed by this release key", audited=True)
    trust.add_argument("public_key", type=Path, help="the release manager's NAME.pub")
    revoke = command(
        "revoke",
        "refuse a bundle from now on, even one a trusted key signed, or withdraw a key's trust",
        audited=True,
    )
    revoke.add_argument("id", help="a bundle's sha256 (any bundle) or a key id (`fedct site list`)")
    policy = command(
        "policy", "run only recent versions of an app, even when approved or signed", audited=True
    )
    rule = policy.add_mutually_exclusive_group(required=True)
    rule.add_argument(
        "--min-version",
        nargs=2,
        metavar=("APP", "VERSION"),
        help="refuse versions of APP (publisher/name, e.g. fedct/fedct) older than VERSION "
        "(PEP 440, e.g. 0.2.0)",
    )
    rule.add_argument(
        "--newest-only",
        metavar="APP",
        help="refuse versions of APP older than the newest one approved here by sha256 or "
        "already run here (the audit log's bundle-accepted lines), so that an old signed "
        "release cannot be replayed",
    )
    rule.add_argument("--clear", metavar="APP", help="remove APP's policy")
    command(
        "list",
        "print the approved bundles, trusted keys, revoked bundles and version policies",
        audited=False,
    )
    supernode = command(
        "supernode",
        "run flower-supernode, refusing every app bundle not approved here",
        audited=False,
    )
    supernode.add_argument(
        "flower_args",
        nargs=argparse.REMAINDER,
        metavar="-- FLOWER_SUPERNODE_ARGS",
        help="flower-supernode's arguments, after --",
    )


evaluate = Command("fedct.client.evaluator.evaluate", _evaluate)
diagnose = Command("fedct.client.evaluator.diagnose", _diagnose)
serve = Command("fedct.client.viewer.server", _serve)
pull = Command("fedct.client.evaluator.pull", _pull)
site = Command("fedct.client.site_command", _site)
