"""What patient-level DP costs: external COVID-19 AUC at ε ∈ {1, 3, 8, ∞} on the demo cohort.

The train splits of the demo hospitals are pooled and trained on centrally with patient-level
DP-SGD (common/training/privacy.py; the same code a site runs), the noise chosen by opacus for each
target ε over the whole training (δ = 0.1 / patients).  ε = ∞ is ordinary training
(common/training.train_local) with the same optimizer, learning rate, epochs and batch
size in scans.  Each model is scored on every scan of the external cache (MosMed-like).
Class weighting is off throughout (DP training cannot use it).  Prints a Markdown table and
writes the figures to bench/results/dp_utility.json.

Default model: the demo's ImageNet EfficientNet-Lite0 with its backbone frozen (BatchNorm in
eval mode with its pretrained statistics, so no patient's normalisation depends on another's)
and the head trained, at the demo caches' size.  ``--train all --norm group`` fine-tunes the
whole GroupNorm-converted network instead.  The sites and the external set default to the
caches of ``--config`` (``[prepare] out``).

    python -m bench.dp_utility [--config configs/demo.toml] [--sites DIR ...] [--external DIR]
        [--epsilons 1 3 8 inf] [--epochs 10] [--batch-size 8] [--sample-rate 0]
        [--max-grad-norm 1.0] [--backbone tf_efficientnet_lite0] [--weights imagenet]
        [--train head|all] [--norm batch|group] [--image-size 0] [--lr 0.002] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fedct.common.cache.dataset import CacheDataset, ScanItem, make_loader, pooled, pooled_patients
from fedct.common.cache.store import CacheError
from fedct.common.metrics.classification import summarize
from fedct.common.model.classifier import ModelConfig, SliceClassifier, build_model
from fedct.common.model.weights import weights_spec
from fedct.common.training.accounting import PrivacyLedger
from fedct.common.training.device import DeviceError, pick_device
from fedct.common.training.loop import TrainConfig, evaluate, train_local
from fedct.common.training.privacy import DPSettings, PrivacyError, train_private
from fedct.server.launch.demo import load_config

RESULTS = Path(__file__).parent / "results" / "dp_utility.json"
EXTERNAL = "mosmed"


class Resized(Dataset[ScanItem]):
    """The scans of ``data`` with every slice resized to ``size`` × ``size``."""

    def __init__(self, data: Dataset[ScanItem], size: int) -> None:
        self.data = data
        self.size = size

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> ScanItem:
        item = self.data[index]
        if item.pixels.shape[-1] == self.size:
            return item
        pixels = F.interpolate(item.pixels, size=(self.size, self.size), mode="area")
        return item._replace(pixels=pixels)


def external_auc(
    model: SliceClassifier, external: Dataset[ScanItem], batch: int, device: str
) -> float:
    result = evaluate(model, make_loader(external, batch), device)
    return summarize(result.labels, result.probs)["auc_covid"]


def run_one(
    epsilon: float,
    train: Dataset[ScanItem],
    patients: list[str],
    external: Dataset[ScanItem],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train a fresh model at target ``epsilon`` (``inf``: without DP) and score it."""
    torch.manual_seed(args.seed)
    model = build_model(
        ModelConfig(
            backbone=args.backbone,
            pretrained_weights=weights_spec(args.weights),
            norm=args.norm,
            freeze_backbone=args.train == "head",
        )
    )
    cfg = TrainConfig(
        local_epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        class_weighting="none",
        device=args.device,
        seed=args.seed,
    )
    row: dict[str, Any] = {"target_epsilon": None if math.isinf(epsilon) else epsilon}
    if math.isinf(epsilon):
        loader = make_loader(train, args.batch_size, shuffle=True, seed=args.seed)
        result = train_local(model, loader, cfg)
    else:
        settings = DPSettings(
            enabled=True,
            target_epsilon=epsilon,
            max_grad_norm=args.max_grad_norm,
            sample_rate=args.sample_rate,
            accountant=args.accountant,
        )
        plan = settings.plan(len(set(patients)), args.batch_size, args.epochs)
        result = train_private(model, train, patients, cfg, plan)
        spent = PrivacyLedger(args.accountant).spend(
            plan.noise_multiplier, plan.sample_rate, plan.steps
        )
        row.update(
            epsilon=spent.epsilon(plan.delta),
            delta=plan.delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
        )
    auc = external_auc(model, external, args.batch_size, args.device)
    row.update(external_auc=auc, seconds=result.seconds)
    reached = f"ε {row['epsilon']:.2f}" if "epsilon" in row else "no DP"
    print(f"{reached}: external AUC {auc:.3f}, trained in {result.seconds:.0f} s", file=sys.stderr)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| ε (δ) | σ | steps | external AUC | train s |", "|---|---|---|---|---|"]
    for row in rows:
        if row["target_epsilon"] is None:
            lines.append(
                f"| ∞ (no DP) | – | – | {row['external_auc']:.3f} | {row['seconds']:.0f} |"
            )
        else:
            lines.append(
                f"| {row['epsilon']:.2f} ({row['delta']:.1g}) | {row['noise_multiplier']:.2f} | "
                f"{row['steps']} | {row['external_auc']:.3f} | {row['seconds']:.0f} |"
            )
    return "\n".join(lines)


def demo_caches(config: Path) -> tuple[list[Path], Path, int]:
    """The site caches, the external cache and the slice size that ``config`` prepares."""
    prepared = load_config(config)["prepare"]
    root = Path(prepared["out"])
    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name != EXTERNAL)
    return sites, root / EXTERNAL, int(prepared["size"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--sites", type=Path, nargs="+", help="default: the config's caches")
    parser.add_argument("--external", type=Path, help="default: the config's mosmed cache")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-rate", type=float, default=0.0, help="0: batch-size/patients")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help='"imagenet", a file, or ""')
    parser.add_argument("--train", choices=("head", "all"), default="head")
    parser.add_argument("--norm", choices=("batch", "group"), default="batch")
    parser.add_argument("--image-size", type=int, default=0, help="0: the caches' own size")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if any(eps <= 0 for eps in args.epsilons):
            raise ValueError("every --epsilons value must be positive (inf: without DP)")
        if args.sites is None or args.external is None or args.image_size == 0:
            sites, external, size = demo_caches(args.config)
            args.sites = args.sites or sites
            args.external = args.external or external
            args.image_size = args.image_size or size
        sites = pooled(args.sites, ["train"])
        train, patients = Resized(sites, args.image_size), pooled_patients(sites)
        external = Resized(CacheDataset(args.external), args.image_size)
        if len(train) == 0 or len(external) == 0:
            raise CacheError("no train scans at the sites, or no scans in the external cache")
        device = pick_device(args.device)
        began = time.perf_counter()
        rows = [run_one(eps, train, patients, external, args) for eps in args.epsilons]
    except (CacheError, DeviceError, PrivacyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {
        "sites": [str(site) for site in args.sites],
        "external": str(args.external),
        "train_scans": len(train),
        "train_patients": len(set(patients)),
        "external_scans": len(external),
        "settings": {
            key: getattr(args, key)
            for key in (
                "epochs",
                "batch_size",
                "sample_rate",
                "max_grad_norm",
                "accountant",
                "backbone",
                "weights",
                "train",
                "norm",
                "image_size",
                "optimizer",
                "lr",
                "seed",
            )
        },
        "device": str(device),
        "machine": platform.platform(),
        "seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{len(train)} train scans of {len(set(patients))} patients at {len(args.sites)} sites; "
        f"external {len(external)} scans; {args.backbone} at {args.image_size}²"
    )
    print(markdown(rows))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
