"""Faster CPU scoring for ``fedct evaluate``: the backbone compiled by OpenVINO or ONNX Runtime.

Only the per-slice backbone is exported, with a free number of slices: the classifier still
normalises the slices, runs them in chunks, pools their features over each scan's real slices
and applies its head in PyTorch (:class:`fedct.common.model.classifier.SliceClassifier`), so
a scan of any length is scored as the eager model scores it.  Exported models are cached by
the backbone's weights, input size and runtime version (default: ``<tmp>/fedct-inference``).
Both runtimes are told to compute in float32, so scores move by rounding only
(bench/inference.py measures
by how much).

``auto`` is eager PyTorch on CUDA and the fastest installed runtime on the CPU.  A runtime
that is missing or fails to export or to reproduce the eager features on a probe slice is
reported in one line and the eager model is used instead.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from torch import Tensor, nn

from fedct.common.console import err
from fedct.common.model import ENGINES, RUNTIMES
from fedct.common.model.classifier import SliceClassifier

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "fedct-inference"
PROBE_TOLERANCE = 1e-2  # max |Δ feature| / max |feature| on the probe slices
ONNX_OPSET = 17

SliceRunner = Callable[[np.ndarray], np.ndarray]


class RuntimeBackbone(nn.Module):
    """Stands in for a timm backbone: (N, 3, H, W) float32 → (N, D) pooled features, computed
    by a compiled runtime on the CPU.

    ``forward_features`` (the last feature maps, what class activation maps read) runs a
    second export of the backbone, compiled on first use by ``maps``; without one, or when it
    fails (one note line), the eager ``fallback`` backbone computes them.
    """

    def __init__(
        self,
        runner: SliceRunner,
        engine: str,
        *,
        maps: Callable[[], SliceRunner] | None = None,
        fallback: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.runner = runner
        self.engine = engine
        self._maps_factory = maps
        self._maps: SliceRunner | None = None
        self._fallback = [fallback]  # in a list: not a submodule, so not in the state dict

    def forward(self, x: Tensor) -> Tensor:
        return _run(self.runner, x)

    def forward_features(self, x: Tensor) -> Tensor:
        if self._maps is None and self._maps_factory is not None:
            try:
                self._maps = self._maps_factory()
            except Exception as exc:  # any runtime failure: eager still computes the maps
                first_line = next(iter(str(exc).strip().splitlines()), "")
                err.print(
                    f"[yellow]note:[/yellow] feature maps with {self.engine} failed "
                    f"({escape(type(exc).__name__)}: {escape(first_line)}); computing them "
                    "with eager PyTorch"
                )
            self._maps_factory = None
        if self._maps is not None:
            return _run(self._maps, x)
        (fallback,) = self._fallback
        if fallback is None:
            raise ValueError(f"the {self.engine} backbone has no feature maps")
        return fallback.forward_features(x)


def _run(runner: SliceRunner, x: Tensor) -> Tensor:
    result = runner(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
    return torch.from_numpy(np.array(result, dtype=np.float32))


class _FeatureMaps(nn.Module):
    """A timm backbone's ``forward_features`` as a module's forward, for export."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)


def scoring_model(
    model: SliceClassifier,
    engine: str,
    device: torch.device,
    image_size: int,
    *,
    cache_dir: Path | None = None,
) -> tuple[SliceClassifier, str]:
    """The model ``evaluate`` should run for ``engine``, and the engine it runs with.

    ``model`` itself for eager PyTorch (and always on CUDA under ``auto``); otherwise a copy
    whose backbone is a :class:`RuntimeBackbone` sharing every other module with ``model``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "eager" or (engine == "auto" and device.type != "cpu"):
        return model, "eager"
    if device.type != "cpu":
        raise ValueError(f"--engine {engine} runs on the CPU; use --device cpu or --engine auto")
    installed = [r for r in RUNTIMES if importlib.util.find_spec(r)]
    if engine == "auto" and not installed:
        _fallback("neither OpenVINO nor ONNX Runtime is installed")
        return model, "eager"
    if engine != "auto" and engine not in installed:
        _fallback(f"{engine} is not installed (pip install {engine})")
        return model, "eager"
    chosen = installed[0] if engine == "auto" else engine
    try:
        runner = compile_backbone(model, chosen, image_size, cache_dir=cache_dir or DEFAULT_CACHE)
    except Exception as exc:  # any runtime failure: eager still scores correctly
        first_line = next(iter(str(exc).strip().splitlines()), "")
        _fallback(f"{chosen} failed ({type(exc).__name__}: {first_line})")
        return model, "eager"
    cache = cache_dir or DEFAULT_CACHE

    def maps() -> SliceRunner:
        return compile_backbone(model, chosen, image_size, cache_dir=cache, feature_maps=True)

    backbone = RuntimeBackbone(runner, chosen, maps=maps, fallback=model.backbone)
    return with_backbone(model, backbone), chosen


def compile_backbone(
    model: SliceClassifier,
    runtime: str,
    image_size: int,
    *,
    cache_dir: Path,
    feature_maps: bool = False,
) -> SliceRunner:
    """``model``'s backbone exported (or read from ``cache_dir``) and compiled by ``runtime``
    for (N, 3, image_size, image_size) inputs, giving pooled features or, with
    ``feature_maps``, the last feature maps; raises if its output on two probe slices is not
    the eager one within :data:`PROBE_TOLERANCE`."""
    backbone = model.backbone.eval()
    if feature_maps:
        backbone = _FeatureMaps(backbone).eval()
    kind = f"{runtime}-maps" if feature_maps else runtime
    path = cache_dir / f"{_model_key(backbone, kind, image_size)}.{_SUFFIX[runtime]}"
    if not path.exists():
        what = "feature maps of the" if feature_maps else "the"
        err.print(
            f"exporting {what} {model.cfg.backbone} backbone for {runtime} (once per "
            f"checkpoint, cached in {escape(str(cache_dir))})…"
        )
        cache_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        _EXPORTERS[runtime](backbone, image_size, path)
        err.print(f"exported in {time.perf_counter() - start:.0f} s")
    runner = load_runner(path, runtime)
    _check_probe(backbone, runner, image_size)
    return runner


def with_backbone(model: SliceClassifier, backbone: nn.Module) -> SliceClassifier:
    """A shallow copy of ``model`` with another backbone; its head, buffers and config are
    ``model``'s own.  The submodule table is copied so that ``model`` keeps its backbone."""
    clone = copy.copy(model)
    clone._modules = {**model._modules, "backbone": backbone}
    return clone


def _fallback(reason: str) -> None:
    err.print(f"[yellow]note:[/yellow] {escape(reason)}; scoring with eager PyTorch")


def _model_key(backbone: nn.Module, kind: str, image_size: int) -> str:
    runtime = kind.removesuffix("-maps")
    digest = hashlib.sha256(f"{kind} {_version(runtime)} {image_size}".encode())
    for name, value in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _version(runtime: str) -> str:
    module = importlib.import_module(runtime)
    return str(getattr(module, "__version__", "?"))


def _example(image_size: int, n: int = 2) -> Tensor:
    return torch.rand(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def _check_probe(backbone: nn.Module, runner: SliceRunner, image_size: int) -> None:
    probe = _example(image_size)
    with torch.inference_mode():
        expected = backbone(probe).float().numpy()
    got = runner(probe.numpy())
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(np.asarray(got) - expected).max()) / scale
    if got.shape != expected.shape or not error <= PROBE_TOLERANCE:
        raise RuntimeError(
            f"its features differ from eager PyTorch's by {error:.2g} (relative) on a probe"
        )


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary sibling of ``path``, then renamed: a cache entry is whole."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _export_openvino(backbone: nn.Module, image_size: int, path: Path) -> None:
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(
            backbone, example_input=_example(image_size), input=[(-1, 3, image_size, image_size)]
        )

    # The .xml names the entry: it is renamed into place last, after its weights (.bin).
    staged = path.with_name(f".{path.stem}-{os.getpid()}")
    try:
        # save_model would otherwise halve the weights to float16, moving the scores.
        ov.save_model(converted, staged.with_suffix(".xml"), compress_to_fp16=False)
        staged.with_suffix(".bin").replace(path.with_suffix(".bin"))
        staged.with_suffix(".xml").replace(path)
    finally:
        for suffix in (".xml", ".bin"):
            staged.with_suffix(suffix).unlink(missing_ok=True)


def load_runner(path: Path, runtime: str) -> SliceRunner:
    """A float32 runner of the exported model ``path`` (OpenVINO reads its own files and ONNX)."""
    return _COMPILERS[runtime](path)


def _compile_openvino(path: Path) -> SliceRunner:
    import openvino as ov

    compiled = ov.Core().compile_model(
        ov.Core().read_model(path),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
            # bf16 or f16 on CPUs that have them would move the scores: stay in float32.
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: x})[0])  # a copy: the request reuses its buffer

    return run


def export_onnx(backbone: nn.Module, image_size: int, path: Path) -> None:
    """``backbone`` as an ONNX file for (N, 3, image_size, image_size) inputs named ``x``."""

    def write(target: Path) -> None:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                backbone,
                (_example(image_size),),
                buffer,
                input_names=["x"],
                output_names=["features"],
                dynamic_axes={"x": {0: "slices"}, "features": {0: "slices"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        target.write_bytes(buffer.getvalue())

    _atomic_write(path, write)


def _compile_onnxruntime(path: Path) -> SliceRunner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"x": x})[0]

    return run


_SUFFIX = {"openvino": "xml", "onnxruntime": "onnx"}
_EXPORTERS = {"openvino": _export_openvino, "onnxruntime": export_onnx}
_COMPILERS = {"openvino": _compile_openvino, "onnxruntime": _compile_onnxruntime}
