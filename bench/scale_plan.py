"""What 100 hospitals would need of the coordinator per round, calculated from the figures of
bench/fl_scale.py (docs/scaling.md explains each step).

Per round the coordinator sends the global model to every site sampled for training and
again to every site for federated evaluation (fraction-evaluate is fixed at 1.0,
server/strategies.py), and receives one model from each trained site: measured as the
payloads per site per round of the largest simulated size.  From that, for a model of M
bytes per weights message, N sites and fraction-train f: N · M · (2f + 1) bytes, and the
seconds those take on the coordinator's link.  Memory: the measured ServerApp peak plus the
models it must hold per site.  CPU is extrapolated linearly from the two largest sizes: the
measured intercept plus N × the per-site slope, once with the slope as measured on the tiny
model (per-site work that does not grow with the model) and once scaled by M / the tiny
model's bytes (per-site work proportional to the bytes: packing, unpacking, averaging); the
truth lies between for work that is linear in N.  The SuperLink's CPU is mostly per message
and per online node (:func:`_superlink`), so it is not scaled by the model's bytes.

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

from bench.harness import RESULTS, fmt

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


def _superlink(
    deployment: list[dict[str, Any]], network: dict[str, Any], sites: int
) -> dict[str, Any] | None:
    """The SuperLink's CPU per round: what it spends per online node per second with no run
    (polling, heartbeats; the largest deployment's idle rate / its nodes) × the round's
    seconds, plus what it spends per site per round beyond that (messages, ClientApp
    processes, its state), measured at each deployed size; the round taken as long as the
    coordinator's 1 Gbit/s link needs for the bytes."""
    if not deployment:
        return None
    largest = deployment[-1]
    per_node_second = largest["idle_cpu_per_second"]["superlink"] / largest["sites"]
    per_site = {
        str(size["sites"]): (
            size["median"]["superlink_cpu_seconds"]
            - size["idle_cpu_per_second"]["superlink"] * size["median"]["seconds"]
        )
        / size["sites"]
        for size in deployment
    }
    low, high = min(per_site.values()), max(per_site.values())
    return {
        "idle_cpu_per_node_second": per_node_second,
        "per_site_per_round_beyond_idle": per_site,
        "planned": {
            fraction: {
                "round_seconds": figures["seconds_at_1_gbit"],
                "cpu_seconds": [
                    sites * (per_node_second * figures["seconds_at_1_gbit"] + beyond)
                    for beyond in (low, high)
                ],
            }
            for fraction, figures in network.items()
        },
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
    peak = max(size["median"]["serverapp_peak_bytes"] for size in simulation)
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
            "superlink_cpu_seconds": _superlink(deployment, network, sites),
            "serverapp_peak_bytes": {
                # The measured peak hardly moves with the tiny model (torch and timm dominate
                # it), so the plan adds what the ServerApp must hold per site on top: every
                # trained site's reply at once before averaging, and with cross-site (the
                # default) each site's last weights until the end of the run.
                "measured_at_largest": peak,
                "replies_held": sites * model_bytes,
                "cross_site_kept": sites * model_bytes,
                "planned": peak + 2 * sites * model_bytes,
                "planned_without_cross_site": peak + sites * model_bytes,
            },
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
        "ServerApp peak GB (cross-site off / on)",
    ):
        table.add_column(column, justify="right")
    for name, model in figures["models"].items():
        for fraction, network in model["network_per_round"].items():
            cells = []
            fit = model["serverapp_cpu_seconds"]
            cells.append(
                "–"
                if fit is None
                else f"{fit['per_site_as_measured']:.1f} – {fit['per_site_scaled_by_bytes']:.1f}"
            )
            superlink = model["superlink_cpu_seconds"]
            low, high = superlink["planned"][fraction]["cpu_seconds"] if superlink else (None,) * 2
            cells.append(f"{fmt(low, '.0f')} – {fmt(high, '.0f')}")
            memory = model["serverapp_peak_bytes"]
            cells.append(
                f"{memory['planned_without_cross_site'] / 1e9:.2f} / {memory['planned'] / 1e9:.2f}"
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
