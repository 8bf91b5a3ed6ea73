"""The options of the ``fedct`` commands that common/ provides.

Imported to build the parser of ``fedct``, so it imports nothing heavy; a command's
module is imported only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedct.common.cache.config import PrepareConfig
from fedct.common.cli import Command
from fedct.common.ingest import FORMATS
from fedct.common.synth.sizes import SIZES


def _app(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="app_command", required=True, metavar="SUBCOMMAND")
    summary = "print the sha256, app id and version of the bundle `flwr run APP` would send"
    hashing = sub.add_parser("hash", help=summary, description=summary)
    hashing.add_argument("app", type=Path, nargs="?", default=Path("."), help="app dir or .fab")
    summary = "write a new ed25519 release key pair, NAME.key (mode 600) and NAME.pub"
    keygen = sub.add_parser("keygen", help=summary, description=summary)
    keygen.add_argument("--out", required=True, type=Path, help="folder to write the keys to")
    keygen.add_argument("--name", required=True, help="key name, e.g. fedct-release-2026")
    summary = "sign the bundle of APP; prints the run-config value `app-signature`"
    signing = sub.add_parser("sign", help=summary, description=summary)
    signing.add_argument("app", type=Path, nargs="?", default=Path("."), help="app dir or .fab")
    signing.add_argument("--key", required=True, type=Path, help="release private key NAME.key")


def _certs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder of the key material")
    parser.add_argument(
        "--superlink-san",
        default="",
        metavar="NAMES",
        help="issue superlink.crt for these comma-separated DNS names and IP addresses "
        "(the first is also its common name), e.g. coordinator.example.org,10.0.0.5",
    )
    parser.add_argument(
        "--registry-san",
        default="",
        metavar="NAMES",
        help="issue registry.crt (for `fedct registry serve`) for these names",
    )
    parser.add_argument(
        "--viewer-san",
        default="",
        metavar="NAMES",
        help="issue viewer.crt (for `fedct serve` on a non-loopback address) for these names",
    )
    parser.add_argument(
        "--sites",
        default="",
        metavar="NAMES",
        help="comma-separated hospitals: one SuperNode key pair each, supernodes/NAME.key/.pub",
    )
    parser.add_argument(
        "--operators",
        default="",
        metavar="NAMES",
        help="comma-separated operators: a client certificate each, operators/NAME.crt/.key, "
        "that the Control API proxy requires (deploy/README.md)",
    )
    parser.add_argument(
        "--superexec-secret",
        action="store_true",
        help="write superexec.secret, for --superexec-auth-secret-file on this host",
    )
    parser.add_argument(
        "--days", type=int, default=365, help="validity of issued certificates (default 365)"
    )
    parser.add_argument(
        "--ca-days", type=int, default=3650, help="validity of a new CA (default 3650)"
    )


def _inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="raw folder (DICOM, NIfTI or slice images)")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    parser.add_argument("--format", choices=FORMATS, default="auto")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument(
        "--dump-hu",
        type=Path,
        help="write <series_uid>.npy HU volumes here (default: none written)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="the cache prepared from this folder: adds the ids its qa.json and qa.html show "
        "(default: none, no ids)",
    )


def add_raw_folder_options(parser: argparse.ArgumentParser, only: str = "") -> None:
    """``--labels``, ``--label-map`` and ``--format``: how a raw folder is read (``only``
    starts their help, e.g. "raw folder only: ", where the command also takes a cache)."""
    parser.add_argument(
        "--labels",
        type=Path,
        help=f"{only}labels.csv: a label column and series_uid, study_uid, path or patient_id "
        "(default: none; the labels the folder layout gives, e.g. MosMedData's CT-k folders, "
        "else every scan unlabelled)",
    )
    parser.add_argument(
        "--label-map",
        type=Path,
        help=f"{only}TOML: site label = global class (default: fedct's built-in map)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default=PrepareConfig().format, help=f"{only}the reader"
    )


def _prepare(parser: argparse.ArgumentParser) -> None:
    defaults = PrepareConfig()
    parser.add_argument("--input", required=True, type=Path, help="raw folder of one site")
    parser.add_argument("--out", required=True, type=Path, help="cache folder to create/extend")
    add_raw_folder_options(parser)
    parser.add_argument("--size", type=int, default=defaults.size, help="slice size in pixels")
    parser.add_argument("--fraction", type=float, default=defaults.fraction)
    parser.add_argument("--normalize", default=defaults.normalize)
    parser.add_argument(
        "--lung-crop",
        action="store_true",
        help="crop each slice to the lungs before resizing (the run config's lung-crop)",
    )
    parser.add_argument(
        "--lung-only",
        action="store_true",
        help="air beyond 5 mm of the lungs, so the model sees only them (run config lung-only)",
    )
    parser.add_argument("--min-slices", type=int, default=defaults.min_slices)
    parser.add_argument("--splits", default="0.7,0.15,0.15", help="train,tune,test fractions")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--strict", action="store_true", help="exit 1 on any rejected input")


def _synth(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedct synth``."""
    parser.add_argument("--out", type=Path, required=True, help="new (or empty) output folder")
    parser.add_argument(
        "--profile",
        choices=tuple(SIZES),
        default="demo",
        help="tiny: 64x64 for tests; demo: 128x128 for a CPU demo; full: 512x512 (default demo)",
    )
    parser.add_argument(
        "--sites", type=int, default=3, help="hospitals, profiles cycling (default 3)"
    )
    parser.add_argument(
        "--scans-per-site", type=int, default=None, help="studies per hospital (profile default)"
    )
    parser.add_argument(
        "--mosmed-studies",
        type=int,
        default=None,
        help="studies in the MosMedData-like external set (profile default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument(
        "--no-external", action="store_true", help="skip the MosMed-like and CC-CCII-like sets"
    )


app = Command("fedct.common.trust.app_signing", _app)
certs = Command("fedct.common.trust.certs", _certs)
inspect = Command("fedct.common.cache.inspect", _inspect)
prepare = Command("fedct.common.cache.prepare", _prepare)
synth = Command("fedct.common.synth.cohort", _synth)
