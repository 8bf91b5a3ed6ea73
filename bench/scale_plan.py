"""What 100 hospitals would need of the coordinator per round, calculated from the figures of
bench/fl_scale.py (docs/scaling.md explains each step).

Per round the coordinator sends the global model to every site sampled for training and
again to every site for federated evaluation (fraction-evaluate is fixed at 1.0,
server/strategies.py), and receives one model from each trained site: measured as the
payloads per site per round of the largest simulated size.  From that, for a model of M
bytes per weights message, N sites and fraction-train f: N · M · (2f + 1) bytes, and the
seconds those take on the coordinator's link.  CPU and memory are extrapolated linearly
from the two largest measured sizes: the measured intercept plus N × the per-site slope,
once with the slope as measured on the tiny model (per-site work that does not grow with
the model) and once scaled by M / the tiny model's bytes (per-site work proportional to the
bytes: packing, unpacking, averaging); the truth lies between for work that is linear in N.

bench/fl_scale.py adds the plan to its JSON (``plan``); this command recomputes it from a
JSON already written, prints it and writes it back.

    python -m bench.scale_plan [--json bench/results/fl_scale.json] [--sites 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.fl_overhead import RESULTS, fmt

SITES = 100
# Bytes of one weights message: Lite0 as its checkpoint (README: 13.7 MB pulled from the
# registry), B3 as 10.7 M float32 parameters (~43 MB); float16 transport halves both.
MODELS = {"lite0": 13.7e6, "b3": 43e6}
FRACTIONS = (1.0, 0.5, 0.2)
LINKS_GBIT = (1.0, 10.0)


def _slope(sizes: list[dict[str, Any]], value: Any) -> tuple[float, float] | None:
    """(intercept, per-site slope) of ``value(size)`` through the two largest sizes."""
    if len(sizes) < 2:
        return None
    small, large = sizes[-2], sizes[-1]
    a, b = value(small), value(large)
    if a is None or b is None:
        return None
    slope = (b - a) / (large["sites"] - small["sites"])
    return a - slope * small["sites"], slope


def _extrapolate(
    fit: tuple[float, float] | None, scale: float, sites: int
) -> dict[str, float] | None:
    if fit is None:
        return None
    intercept, slope = fit
    return {
        "per_site_as_measured": intercept + sites * slope,
        "per_site_scaled_by_bytes": intercept + sites * slope * scale,
        "intercept": intercept,
        "slope_per_site": slope,
    }


def plan(result: dict[str, Any], sites: int = SITES) -> dict[str, Any]:
    """The coordinator's needs per round for ``sites`` sites and each of :data:`MODELS`."""
    simulation = result["simulation"]["sizes"]
    deployment = result["deployment"]["sizes"]
    if not simulation:
        raise ValueError("the benchmark's JSON has no simulated sizes")
    largest = simulation[-1]["median"]
    tiny = largest["upload_bytes_per_client"]
    payloads = largest["coordinator_bytes"] / (simulation[-1]["sites"] * tiny)
    models = {}
    for name, model_bytes in MODELS.items():
        scale = model_bytes / tiny
        network = {}
        for fraction in FRACTIONS:
            total = sites * model_bytes * (2 * fraction + 1)
            network[f"fraction-train={fraction:g}"] = {
                "bytes": total,
                **{f"seconds_at_{link:g}_gbit": total / (link * 1e9 / 8) for link in LINKS_GBIT},
            }
        models[name] = {
            "model_bytes": model_bytes,
            "scale_from_tiny": scale,
            "network_per_round": network,
            "serverapp_cpu_seconds": _extrapolate(
                _slope(simulation, lambda s: s["median"]["serverapp_cpu_seconds"]), scale, sites
            ),
            "superlink_cpu_seconds": _extrapolate(
                _slope(deployment, lambda s: s["median"]["superlink_cpu_seconds"]), scale, sites
            ),
            "serverapp_peak_bytes": _extrapolate(
                _slope(simulation, lambda s: s["median"]["serverapp_peak_bytes"]), scale, sites
            ),
            # Before averaging, every trained site's reply is in the ServerApp at once.
            "replies_held_bytes": sites * model_bytes,
        }
    return {
        "sites": sites,
        "tiny_model_bytes": tiny,
        "payloads_per_site_per_round": payloads,
        "models": models,
    }


def plan_table(figures: dict[str, Any]) -> Table:
    table = Table(title=f"{figures['sites']} sites, per round (docs/scaling.md)")
    for column in (
        "model",
        "fraction-train",
        "GB through the coordinator",
        "s at 1 / 10 Gbit/s",
        "ServerApp CPU s",
        "SuperLink CPU s",
        "ServerApp peak GB",
    ):
        table.add_column(column, justify="right")
    for name, model in figures["models"].items():
        for fraction, network in model["network_per_round"].items():
            cells = []
            for key in ("serverapp_cpu_seconds", "superlink_cpu_seconds", "serverapp_peak_bytes"):
                fit = model[key]
                unit = 1e9 if key.endswith("bytes") else 1.0
                cells.append(
                    "–"
                    if fit is None
                    else f"{fmt(fit['per_site_as_measured'] / unit, '.2f')} – "
                    f"{fmt(fit['per_site_scaled_by_bytes'] / unit, '.2f')}"
                )
            table.add_row(
                name,
                fraction.removeprefix("fraction-train="),
                fmt(network["bytes"] / 1e9, ".2f"),
                f"{network['seconds_at_1_gbit']:.1f} / {network['seconds_at_10_gbit']:.1f}",
                *cells,
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "fl_scale.json")
    parser.add_argument("--sites", type=int, default=SITES)
    args = parser.parse_args()
    try:
        result = json.loads(args.json.read_text())
        result["plan"] = plan(result, args.sites)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"error: {args.json}: {exc}")
    Console(width=160).print(plan_table(result["plan"]))
    print(f"wrote the plan into {args.json}")


if __name__ == "__main__":
    main()
