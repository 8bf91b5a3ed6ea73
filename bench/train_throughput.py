"""Training throughput of one hospital's local epoch: slices/s and peak memory.

Runs the real local training path (``fedct.common.training.loop.train_local`` over a
``fedct.common.cache.dataset.CacheDataset`` loader, the ``SliceClassifier`` of
common/model/classifier.py) on a synthetic cache, for the demo model (EfficientNet-Lite0 at
128², batch 8, 4 slices a scan) and for the ai-corona B3 at 512², in three modes side by side:

* ``eager``: NCHW tensors (``channels_last`` off);
* ``channels_last``: NHWC, the default of ``ModelConfig``;
* ``compile``: NHWC with the backbone under ``torch.compile``.

Then the slice chunking with activation checkpointing (``ModelConfig.slice_chunk``, see
docs/model.md): chunk sizes down to a few slices and ``off`` (one chunk, nothing
recomputed), in the default mode.  Every configuration runs in its own subprocess (its peak RSS
from ``getrusage``, and ``torch.cuda.max_memory_allocated`` on CUDA), configurations
interleaved round by round; each figure is the median over the rounds.  Evaluation slices/s
(``fedct.common.training.loop.evaluate``, every slice of a scan) is measured in the same
subprocesses.

On CUDA, ``--amp bf16`` is the issue's GPU check: B3 at 512², bf16 autocast and channels_last,
against the ai-corona anchor of 430 training slices/s on one RTX 2080 Ti.

    python -m bench.train_throughput [--device cpu|cuda] [--amp auto|off|bf16|fp16]
        [--models demo,b3] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.harness import RESULTS, fmt, machine, ratio

OUT = RESULTS / "train_throughput.json"
MODES = ("eager", "channels_last", "compile")
OFF = 0  # slice_chunk "off": every slice of a step in one chunk, nothing recomputed
ANCHOR_SLICES_PER_S = 430.0  # ai-corona, B3 at 512² training on one RTX 2080 Ti (the issue)
ANCHOR_TARGET = 5.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Workload:
    """One model's benchmark: what a step holds, how many steps, which chunk sizes, and how
    many rounds by default."""

    name: str
    backbone: str
    size: int
    batch: int
    max_slices: int  # slices of a scan in a training step (train-max-slices)
    scan_slices: int  # slices of each synthetic scan, all of them evaluated
    warmup: int
    steps: int
    eval_batches: int
    chunks: tuple[int, ...]
    rounds: int

    @property
    def slices_per_step(self) -> int:
        return self.batch * self.max_slices


# CPU: the demo as configs/demo.toml trains it; B3 at 512² with a handful of steps, one round
# (a B3 step of 8 slices takes tens of seconds on two cores).
CPU_WORKLOADS = {
    "demo": Workload("demo", "tf_efficientnet_lite0", 128, 8, 4, 12, 2, 6, 1, (4, 8, OFF), 3),
    "b3": Workload("b3", "efficientnet_b3", 512, 2, 4, 4, 1, 2, 1, (2, 4, OFF), 1),
}
# CUDA: B3 as configs/ai-corona.toml trains it (batch 4), 16 slices of a scan per step.
CUDA_WORKLOADS = {
    "demo": Workload("demo", "tf_efficientnet_lite0", 128, 8, 4, 24, 5, 30, 4, (4, 8, OFF), 3),
    "b3": Workload("b3", "efficientnet_b3", 512, 4, 16, 32, 3, 10, 4, (8, 32, OFF), 3),
}


@dataclass(frozen=True)
class Job:
    """One subprocess: a workload in one mode with one chunk size."""

    workload: Workload
    mode: str
    chunk: int  # as ModelConfig.slice_chunk; OFF for one chunk per step
    device: str
    amp: str
    threads: int
    evaluate: bool

    @property
    def slice_chunk(self) -> int:
        return self.chunk or self.workload.slices_per_step

    @property
    def key(self) -> str:
        return f"{self.workload.name}/{self.mode}/chunk={self.chunk or 'off'}"


def write_cache(root: Path, scans: int, slices: int, size: int, seed: int) -> Path:
    """A cache of ``scans`` labelled training scans of random slices, classes in turn."""
    from fedct.common.cache.store import write_manifest, write_scan, write_settings

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(scans):
        scan_id = f"scan-{i:04d}"
        write_scan(root, scan_id, rng.integers(0, 256, (slices, size, size), np.uint8))
        rows.append({"scan_id": scan_id, "patient_id": f"p{i}", "class_index": i % 3})
    for row in rows:
        row["split"] = "train"
    write_manifest(root, rows)
    write_settings(root, {"size": size, "fraction": 0.5, "normalize": "ai-corona"})
    return root


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def run_job(job: Job) -> dict[str, Any]:
    """Build the model, train ``warmup`` then ``steps`` batches, evaluate; the figures."""
    import torch

    from fedct.common.cache.dataset import CacheDataset, make_loader
    from fedct.common.model.classifier import ModelConfig, build_model
    from fedct.common.training.device import pick_device
    from fedct.common.training.loop import TrainConfig, evaluate, train_local

    torch.set_num_threads(job.threads)
    w = job.workload
    device = pick_device(job.device)
    cfg = ModelConfig(
        backbone=w.backbone,
        slice_chunk=job.slice_chunk,
        channels_last=job.mode != "eager",
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    if job.mode == "compile":
        model.backbone.compile()
    train_cfg = TrainConfig(batch_size=w.batch, device=job.device, amp=job.amp)
    with tempfile.TemporaryDirectory(prefix="fedct-train-bench-") as tmp:
        scans = w.batch * max(w.warmup, w.steps, w.eval_batches)
        cache = write_cache(Path(tmp), scans, w.scan_slices, w.size, seed=0)
        data = CacheDataset(cache, ["train"], max_slices=w.max_slices, seed=0)
        counts = data.class_counts()
        loader = make_loader(data, w.batch, shuffle=True, seed=0)
        began = time.perf_counter()
        train_local(model, islice(loader, w.warmup), train_cfg, class_counts=counts)
        warmup_s = time.perf_counter() - began
        rss_before = _peak_rss_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trained = train_local(model, islice(loader, w.steps), train_cfg, class_counts=counts)
        figures: dict[str, Any] = {
            "train_slices": trained.num_examples * w.max_slices,
            "train_seconds": trained.seconds,
            "train_slices_per_s": trained.num_examples * w.max_slices / trained.seconds,
            "warmup_seconds": warmup_s,
            "peak_rss_mib": _peak_rss_mib(),
            "peak_rss_before_timed_mib": rss_before,
        }
        if device.type == "cuda":
            figures["cuda_peak_train_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        if job.evaluate:
            every = CacheDataset(cache, ["train"])
            batches = list(islice(make_loader(every, w.batch), w.eval_batches))
            evaluate(model, batches[:1], job.device, amp=job.amp)  # warm-up (and compile)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            scored = evaluate(model, batches, job.device, amp=job.amp)
            figures["eval_slices_per_s"] = scored.num_examples * w.scan_slices / scored.seconds
            if device.type == "cuda":
                figures["cuda_peak_eval_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return figures


def jobs_for(
    workloads: list[Workload], device: str, amp: str, threads: int, modes: tuple[str, ...]
) -> list[Job]:
    """The modes at the default chunk (with evaluation), then the other chunk sizes in the
    default mode; a chunk size giving the same chunks as one already listed is left out."""
    default_chunk = 16  # ModelConfig.slice_chunk's default
    jobs = []
    for w in workloads:
        base = Job(w, "channels_last", default_chunk, device, amp, threads, evaluate=True)
        jobs += [replace(base, mode=mode) for mode in modes]
        seen = {_chunks_of(w, default_chunk)}
        for chunk in w.chunks:
            if _chunks_of(w, chunk) not in seen:
                seen.add(_chunks_of(w, chunk))
                jobs.append(replace(base, chunk=chunk, evaluate=False))
    return jobs


def _chunks_of(w: Workload, chunk: int) -> int:
    return -(-w.slices_per_step // (chunk or w.slices_per_step))


def run_in_subprocess(job: Job, timeout: float) -> dict[str, Any]:
    """``run_job`` in a fresh interpreter (its own peak RSS); ``{"error": ...}`` if it fails
    or takes longer than ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job.threads)}
    spec = json.dumps({**asdict(job), "workload": asdict(job.workload)})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.train_throughput", "--job", spec],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def _job_from_json(text: str) -> Job:
    raw = json.loads(text)
    raw["workload"] = Workload(**{**raw["workload"], "chunks": tuple(raw["workload"]["chunks"])})
    return Job(**raw)


def summarise(job: Job, repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds (failed rounds left out) of one job's figures."""
    ok = [r for r in repeats if "error" not in r]
    entry: dict[str, Any] = {
        "workload": job.workload.name,
        "backbone": job.workload.backbone,
        "size": job.workload.size,
        "slices_per_step": job.workload.slices_per_step,
        "mode": job.mode,
        "slice_chunk": job.chunk or "off",
        "chunks_per_step": _chunks_of(job.workload, job.chunk),
        "rounds": repeats,
    }
    if not ok:
        entry["error"] = repeats[-1]["error"]
        return entry
    for key in ok[0]:
        entry[key] = statistics.median(r[key] for r in ok)
    return entry


def mode_table(entries: list[dict[str, Any]], workload: str, cuda: bool) -> Table:
    table = Table(title=f"{workload}: training modes (default slice_chunk 16)")
    columns = ["mode", "train slices/s", "× eager", "peak RSS MiB"]
    columns += ["CUDA peak MiB"] if cuda else []
    columns += ["eval slices/s", "× eager", "compile/warm-up s"]
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right")
    eager = next((e for e in entries if e["mode"] == "eager"), {})
    for e in entries:
        cells = [e["mode"]]
        if "error" in e:
            table.add_row(*cells, f"failed: {e['error']}")
            continue
        cells += [
            fmt(e["train_slices_per_s"], ".2f"),
            fmt(ratio(e["train_slices_per_s"], eager.get("train_slices_per_s")), ".2f"),
            fmt(e["peak_rss_mib"], ".0f"),
        ]
        cells += [fmt(e.get("cuda_peak_train_mib"), ".0f")] if cuda else []
        cells += [
            fmt(e.get("eval_slices_per_s"), ".2f"),
            fmt(ratio(e.get("eval_slices_per_s"), eager.get("eval_slices_per_s")), ".2f"),
            fmt(e["warmup_seconds"], ".1f"),
        ]
        table.add_row(*cells)
    return table


def chunk_table(entries: list[dict[str, Any]], workload: str, cuda: bool) -> Table:
    memory = "cuda_peak_train_mib" if cuda else "peak_rss_mib"
    table = Table(title=f"{workload}: activation checkpointing by slice_chunk (channels_last)")
    for column in (
        "slice_chunk",
        "chunks/step",
        "train slices/s",
        "× off",
        "CUDA peak MiB" if cuda else "peak RSS MiB",
        "× off",
    ):
        table.add_column(column, justify="right")
    off = next((e for e in entries if e["chunks_per_step"] == 1), {})
    for e in sorted(entries, key=lambda e: -e["chunks_per_step"]):
        one = e["chunks_per_step"] == 1 and e["slice_chunk"] != "off"
        label = f"{e['slice_chunk']}" + (" (= off)" if one else "")
        if "error" in e:
            table.add_row(label, str(e["chunks_per_step"]), f"failed: {e['error']}")
            continue
        table.add_row(
            label,
            str(e["chunks_per_step"]),
            fmt(e["train_slices_per_s"], ".2f"),
            fmt(ratio(e["train_slices_per_s"], off.get("train_slices_per_s")), ".2f"),
            fmt(e[memory], ".0f"),
            fmt(ratio(e[memory], off.get(memory)), ".2f"),
        )
    return table


def anchor(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best B3 training slices/s against ai-corona's 430 on a 2080 Ti (CUDA runs only)."""
    b3 = [e for e in entries if e["workload"] == "b3" and "train_slices_per_s" in e]
    if not b3:
        return None
    best = max(b3, key=lambda e: e["train_slices_per_s"])
    times = best["train_slices_per_s"] / ANCHOR_SLICES_PER_S
    return {
        "anchor_slices_per_s": ANCHOR_SLICES_PER_S,
        "best": f"{best['mode']}/chunk={best['slice_chunk']}",
        "train_slices_per_s": best["train_slices_per_s"],
        "eval_slices_per_s": best.get("eval_slices_per_s"),
        "times_anchor": times,
        "target": ANCHOR_TARGET,
        "met": times >= ANCHOR_TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--amp", default="auto", help="auto (bf16 on CUDA only), off, bf16, fp16")
    parser.add_argument("--models", default="demo,b3", help="comma-separated: demo, b3")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES)
    )
    parser.add_argument(
        "--repeats", type=int, help="rounds of every configuration (default: demo 3, B3 1 on CPU)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: the workload's)")
    parser.add_argument("--steps", type=int, help="timed steps (default: the workload's)")
    parser.add_argument(
        "--chunks",
        help="slice_chunk sizes to compare, comma-separated, 0 = off, none for none "
        "(default: the workload's)",
    )
    parser.add_argument(
        "--job-timeout", type=float, default=1800, help="seconds one configuration may take"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_job(_job_from_json(args.job))))
        return

    import torch

    from fedct.common.training.device import AMP_MODES, DeviceError, amp_dtype, pick_device

    try:
        device = pick_device(args.device)
        if args.amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {args.amp!r}")
        catalogue = CUDA_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        unknown = sorted(set(names) - set(catalogue)) + sorted(set(modes) - set(MODES))
        if unknown or not names or not modes:
            raise ValueError(f"unknown or no models/modes: {', '.join(unknown) or 'none given'}")
        if min(args.repeats or 1, args.threads, args.steps or 1, args.warmup or 1) < 1:
            raise ValueError("--repeats, --threads, --warmup and --steps must be at least 1")
        sizes: dict[str, Any] = {"warmup": args.warmup, "steps": args.steps}
        if args.chunks is not None:
            listed = args.chunks.strip().lower()
            sizes["chunks"] = () if listed == "none" else tuple(int(c) for c in listed.split(","))
        catalogue = {
            n: replace(w, **{k: v for k, v in sizes.items() if v is not None})
            for n, w in catalogue.items()
        }
    except (DeviceError, ValueError) as exc:
        sys.exit(f"error: {exc}")

    precision = amp_dtype(device, args.amp)
    jobs = jobs_for([catalogue[n] for n in names], args.device, args.amp, args.threads, modes)
    console = Console()
    planned = {n: args.repeats or catalogue[n].rounds for n in names}
    console.print(
        f"{len(jobs)} configurations, rounds {planned} on {device} "
        f"(autocast {precision or 'off'}, OMP_NUM_THREADS={args.threads}, random weights)"
    )
    cuda = device.type == "cuda"
    rounds: dict[str, list[dict[str, Any]]] = {job.key: [] for job in jobs}

    def write_result() -> dict[str, Any]:
        """The figures so far, written (after every configuration, so a stopped run keeps
        what it measured)."""
        done = [job for job in jobs if rounds[job.key]]
        entries = [summarise(job, rounds[job.key]) for job in done]
        result = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "amp": args.amp,
            "autocast_dtype": str(precision).removeprefix("torch.") if precision else None,
            "omp_num_threads": args.threads,
            "rounds": planned,
            "complete": len(done) == len(jobs)
            and all(len(rounds[j.key]) == planned[j.workload.name] for j in jobs),
            "torch": torch.__version__,
            "machine": machine(),
            "workloads": {n: asdict(catalogue[n]) for n in names},
            "entries": entries,
            "anchor": anchor(entries) if cuda else None,
        }
        result["summary"] = summary_line(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    for r in range(max(planned.values())):
        for job in (j for j in jobs if planned[j.workload.name] > r):
            began = time.perf_counter()
            figures = run_in_subprocess(job, args.job_timeout)
            rounds[job.key].append(figures)
            write_result()
            shown = figures.get("error") or f"{figures['train_slices_per_s']:.2f} slices/s"
            console.print(
                f"  round {r + 1}/{planned[job.workload.name]} {job.key}: {shown} "
                f"({time.perf_counter() - began:.0f} s)",
                highlight=False,
            )
    result = write_result()
    for name in names:
        mine = [e for e in result["entries"] if e["workload"] == name]
        console.print(mode_table([e for e in mine if e["slice_chunk"] == 16], name, cuda))
        console.print(chunk_table([e for e in mine if e["mode"] == "channels_last"], name, cuda))
    console.print(f"wrote {args.out}")
    console.print(result["summary"], highlight=False)


def summary_line(result: dict[str, Any]) -> str:
    """One line: each workload's best mode against eager, and the anchor on CUDA."""
    parts = []
    for name in result["workloads"]:
        mine = [e for e in result["entries"] if e["workload"] == name and "error" not in e]
        eager = next((e for e in mine if e["mode"] == "eager"), None)
        if not mine or eager is None:
            parts.append(f"{name}: no eager figure")
            continue
        best = max(mine, key=lambda e: e["train_slices_per_s"])
        parts.append(
            f"{name}: best {best['mode']}/chunk={best['slice_chunk']} "
            f"{best['train_slices_per_s']:.2f} slices/s = "
            f"{best['train_slices_per_s'] / eager['train_slices_per_s']:.2f}× eager "
            f"({eager['train_slices_per_s']:.2f})"
        )
    found = result["anchor"]
    if found:
        verdict = "met" if found["met"] else "NOT met"
        parts.append(
            f"B3 {found['train_slices_per_s']:.0f} slices/s = {found['times_anchor']:.2f}× "
            f"ai-corona's 430 on a 2080 Ti (target ≥ {ANCHOR_TARGET:g}×: {verdict})"
        )
    return f"train throughput on {result['device']} ({result['autocast_dtype'] or 'fp32'}): " + (
        "; ".join(parts)
    )


if __name__ == "__main__":
    main()
