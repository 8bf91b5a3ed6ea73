"""The ai-corona scan classifier: one 2D timm backbone per slice, slices pooled, a dense head.

Besides the model, this module decides what travels between a hospital and the coordinator
(:func:`travelling_state`, :func:`load_travelling_state`) and which entries are BatchNorm state
(:func:`bn_state_keys`, for FedBN).  See docs/model.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from timm.layers import BatchNormAct2d, GroupNormAct
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.config_keys import read_keys, write_keys
from fedct.common.model.weights import create_backbone, input_normalisation, preview_keys

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
MAX_GROUPS = 32
MIN_GROUP_SIZE = 8
HEAD_PREFIX = "head."
# The run-config key of each ModelConfig field a run sets, as train and evaluate messages carry
# them.  The starting weights (``pretrained-weights``) are not among them: they are the
# coordinator's own setting, and a site builds only from weights its own policy names.
CONFIG_KEYS = {
    "backbone": "backbone",
    "pool": "pool",
    "norm": "norm",
    "freeze_backbone": "freeze-backbone",
    "freeze_bn": "freeze-bn",
    "dropout": "dropout",
    "slice_chunk": "slice-chunk",
}


@dataclass(frozen=True)
class ModelConfig:
    """How the classifier is built.  The defaults are the ai-corona model."""

    backbone: str = "efficientnet_b3"
    num_classes: int = len(GLOBAL_CLASSES)
    pool: Literal["mean", "max"] = "mean"
    freeze_backbone: bool = False
    freeze_bn: bool = False
    pretrained_weights: str | None = None  # None, "imagenet" or a file (common/model/weights.py)
    norm: Literal["batch", "group"] = "batch"
    slice_chunk: int = 16
    channels_last: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {self.pool!r}")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {self.norm!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.slice_chunk < 1:
            raise ValueError(f"slice_chunk must be at least 1, got {self.slice_chunk}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.freeze_bn and self.norm != "batch":
            raise ValueError("freeze_bn applies to BatchNorm; it needs norm 'batch'")

    @property
    def batchnorm_frozen_or_absent(self) -> bool:
        """Whether no BatchNorm normalises by batch statistics in training (GroupNorm, frozen
        BatchNorm or a frozen backbone): what patient-level DP needs."""
        return self.norm == "group" or self.freeze_bn or self.freeze_backbone

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **fields: Any) -> ModelConfig:
        """The keys of :data:`CONFIG_KEYS` read from a run config or a message's ConfigRecord,
        with ``fields`` (``pretrained_weights``, which never travels) on top; ValueError for a
        missing or unfit key."""
        return cls(**read_keys(cls(), CONFIG_KEYS, config, "model"), **fields)

    def to_config(self) -> dict[str, Any]:
        """The keys a train or evaluate message carries."""
        return write_keys(self, CONFIG_KEYS)

    def without_weights(self) -> ModelConfig:
        """The same model with nothing to load: for rebuilding a model whose every weight is
        about to be filled from a checkpoint or the coordinator."""
        return dataclasses.replace(self, pretrained_weights=None)


class SliceClassifier(nn.Module):
    """Scores a batch of scans ``x`` (B, S, 1, H, W) of grey values in [0, 1] whose real
    slices are marked by ``mask``.

    The grey slice becomes the three channels the backbone expects, normalised by the mean and
    standard deviation its pretrained weights were trained with (ImageNet's for most timm
    models, 0.5 and 0.5 for the TF EfficientNet-Lite ports): the model, not the data, knows them.
    """

    def __init__(self, backbone: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        mean, std = input_normalisation(backbone)
        # Not persistent: fixed by the backbone, so neither checkpointed nor sent.
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(backbone.num_features, cfg.num_classes)
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
        for norm in self._frozen_norms():
            norm.requires_grad_(False)

    def _frozen_norms(self) -> list[nn.Module]:
        """The backbone's BatchNorms when ``freeze_bn``: each a fixed per-channel affine map
        (pretrained statistics, scale and shift), so no scan's normalisation depends on the
        others in its batch — what small hospital batches and patient-level DP need."""
        if not self.cfg.freeze_bn:
            return []
        return [m for m in self.backbone.modules() if isinstance(m, BATCH_NORMS)]

    def train(self, mode: bool = True) -> SliceClassifier:
        super().train(mode)
        if self.cfg.freeze_backbone:
            # A frozen backbone keeps its BatchNorm statistics, which train mode would update.
            self.backbone.eval()
        for norm in self._frozen_norms():
            norm.eval()
        return self

    def backbone_input(self, slices: Tensor) -> Tensor:
        """(N, 1, H, W) grey slices in [0, 1] → the (N, 3, H, W) input of the backbone."""
        return (slices - self.input_mean) / self.input_std

    def run_chunked(self, fn: Callable[[Tensor], Tensor], slices: Tensor) -> Tensor:
        """``fn`` applied to the backbone input of (N, 1, H, W) grey slices, at most
        ``slice_chunk`` slices at a time, concatenated.

        Chunks are of near-equal size, so BatchNorm in training never sees a lone remainder
        slice.  When gradients flow through several chunks, each chunk is checkpointed: only one
        chunk's activations are alive at a time, at the cost of recomputing them in backward.
        """
        layout = torch.channels_last if self.cfg.channels_last else torch.contiguous_format

        def step(chunk: Tensor) -> Tensor:
            return fn(self.backbone_input(chunk).contiguous(memory_format=layout))

        n_chunks = max(1, math.ceil(len(slices) / self.cfg.slice_chunk))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_backbone):
            chunks = slices.tensor_split(n_chunks)
            if not (torch.is_grad_enabled() and n_chunks > 1):
                return torch.cat([step(chunk) for chunk in chunks])
            return torch.cat(
                [
                    checkpoint(step, c, use_reentrant=False, context_fn=self._checkpoint_contexts)
                    for c in chunks
                ]
            )

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager[None], ...]:
        """Contexts of a checkpointed chunk's forward and of its recomputation in backward."""
        return contextlib.nullcontext(), _running_stats_kept(self.backbone)

    def slice_features(self, x: Tensor, mask: Tensor) -> Tensor:
        """Pooled backbone features (N, D) of the real slices only, in (scan, slice) order."""
        _check_batch(x, mask)
        return self.run_chunked(self.backbone, x[mask])

    def features(self, x: Tensor, mask: Tensor) -> Tensor:
        """One (B, D) vector per scan: slice features pooled over the real slices."""
        # Pooled in float32: a bf16 sum over tens of slices would lose precision under autocast.
        per_slice = self.slice_features(x, mask).float()
        fill = 0.0 if self.cfg.pool == "mean" else float("-inf")
        grid = per_slice.new_full((*mask.shape, per_slice.shape[-1]), fill)
        grid[mask] = per_slice
        if self.cfg.pool == "max":
            return grid.amax(dim=1)
        return grid.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(grid.dtype)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x, mask)))


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorms still normalise by batch statistics but leave their running statistics and
    batch counts alone, so a checkpoint's recomputation does not count a chunk twice.

    Momentum 0 keeps the running statistics exactly while the saved tensors stay those of the
    original forward, which checkpointing verifies."""
    norms = [m for m in module.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def _check_batch(x: Tensor, mask: Tensor) -> None:
    if x.dim() != 5 or x.shape[2] != 1 or mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"expected x (B, S, 1, H, W) and a bool mask (B, S); got x {tuple(x.shape)} "
            f"and mask {tuple(mask.shape)} {mask.dtype}"
        )
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every scan in the batch needs at least one real slice")


def build_model(cfg: ModelConfig) -> SliceClassifier:
    """The classifier of ``cfg``, its backbone starting from ``cfg.pretrained_weights``
    (common/model/weights.py; :class:`WeightsError` if they cannot be had)."""
    backbone = create_backbone(cfg.backbone, cfg.pretrained_weights, num_classes=0)
    if cfg.norm == "group":
        backbone = _to_group_norm(backbone)
    model = SliceClassifier(backbone, cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_group_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a GroupNorm (BatchNormAct by GroupNormAct).

    The BatchNorm scale and shift initialise the GroupNorm ones; running statistics are dropped.
    Groups: as many as divide the channels evenly, at most 32, with at least 8 channels each.
    """
    if isinstance(module, BATCH_NORMS):
        return _group_norm_like(module)
    for name, child in module.named_children():
        setattr(module, name, _to_group_norm(child))
    return module


def _group_norm_like(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    channels = bn.num_features
    groups = max(
        g
        for g in range(1, min(MAX_GROUPS, channels) + 1)
        if channels % g == 0 and channels // g >= min(MIN_GROUP_SIZE, channels)
    )
    if isinstance(bn, BatchNormAct2d):
        norm: nn.GroupNorm = GroupNormAct(channels, groups, eps=bn.eps, affine=bn.affine)
        norm.act, norm.drop = bn.act, bn.drop
    else:
        norm = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            norm.weight.copy_(bn.weight)
            norm.bias.copy_(bn.bias)
    return norm


def bn_state_keys(model: nn.Module) -> set[str]:
    """State-dict names of every BatchNorm's weight, bias, running statistics and batch count."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, BATCH_NORMS):
            local = dict(module.named_parameters(recurse=False))
            local.update(module.named_buffers(recurse=False))
            keys.update(f"{prefix}.{name}" if prefix else name for name in local)
    return keys


def _travelling_keys(model: nn.Module, cfg: ModelConfig) -> list[str]:
    keys = list(model.state_dict())
    if cfg.freeze_backbone:
        return [key for key in keys if key.startswith(HEAD_PREFIX)]
    return keys


def travelling_state(model: nn.Module, cfg: ModelConfig) -> dict[str, Tensor]:
    """What a site sends: the whole state dict (BatchNorm buffers included), or only the head
    when the backbone is frozen.  Detached CPU copies, in state-dict order."""
    state = model.state_dict()
    return {key: state[key].detach().to("cpu", copy=True) for key in _travelling_keys(model, cfg)}


def cast_to(value: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """``value`` in ``dtype``, rounded first when ``dtype`` is an integer type: averaging
    turns BatchNorm's ``num_batches_tracked`` into floats, which must come back as integers."""
    dtype = np.dtype(dtype)
    if value.dtype == dtype:
        return value
    if not np.issubdtype(dtype, np.floating):
        value = np.rint(value)
    return np.asarray(value, dtype=dtype)


def load_travelling_state(
    model: nn.Module, state: Mapping[str, Tensor | np.ndarray], cfg: ModelConfig
) -> None:
    """Copy a travelling state into ``model``: exactly the travelling keys, each of its shape.

    Values are cast back to the model's dtypes (integers rounded, so an averaged
    ``num_batches_tracked`` that came back as float64 is stored as int64 again).
    """
    target = model.state_dict()
    expected = _travelling_keys(model, cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            "travelling state does not match the model: "
            f"missing {preview_keys(missing) or 'none'}; "
            f"unexpected {preview_keys(unexpected) or 'none'}"
        )
    with torch.no_grad():
        for key in expected:
            value = state[key]
            array = value.detach().cpu().numpy() if isinstance(value, Tensor) else value
            if tuple(array.shape) != tuple(target[key].shape):
                raise ValueError(
                    f"{key}: shape {tuple(array.shape)} does not fit {tuple(target[key].shape)}"
                )
            dtype = str(target[key].dtype).removeprefix("torch.")
            target[key].copy_(torch.from_numpy(np.array(cast_to(array, dtype))))
