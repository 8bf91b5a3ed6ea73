"""Evidence maps: where in a scan's slices the model finds evidence for a class, on one
absolute scale, and how they are drawn (the overlay, its colour bar with values).

``fedct evaluate``'s report and the radiologist's viewer both draw their maps with
:func:`class_activation_maps`, :func:`overlay` and :func:`colour_bar`.

**The scale.**  A map is the class's evidence *against the mean of the other classes* (the
logit of the class less the mean of the others' logits, so evidence shared by every class —
the body's outline, say — cancels), divided by the model's temperature (its calibration), in
logit units per pixel: averaged over every pixel of every selected slice it is that logit
difference, less the head's biases.  Only positive evidence is kept.  So one value means the
same on every scan and weak evidence looks weak: a slice of a scan that scores p ≈ 0.05
stays nearly plain.

**The methods** (docs/model.md measures them):

* ``cam``: ai-corona's class activation map, the last feature maps weighted by the head,
  for the class alone (what fedct drew before the evidence issue);
* ``cam-contrast``: the same feature maps, the class against the mean of the others;
* ``gradxact-16`` / ``gradxact-8``: gradient × activation at the backbone's stage of stride 16
  or 8 (an 8 × 8 or 16 × 16 map on a 128² slice where the last stage gives 4 × 4), the class
  against the others: each location's first-order share of the logit difference;
* ``gradcam-16``: Grad-CAM (COVNet's map) at the stride-16 stage: the activations weighted
  by their gradients averaged over the slice.

The gradient of the logit difference with respect to each slice's pooled features says how
each slice counts: 1 / S of the head's weights for every slice with mean pooling, the
weights only on the slice that won each feature with max pooling — so for a max-pooled model
the evidence lies on the slices that won.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from fedct.common.model.classifier import SliceClassifier

METHODS = ("cam", "cam-contrast", "gradxact-16", "gradxact-8", "gradcam-16")
DEFAULT_METHOD = "gradxact-16"
# The colour scale's top, in logit units per pixel: evidence at or above it is drawn
# saturated.  Fixed, so that one colour means the same evidence on every scan: a region of
# 1 % of a scan's pixels (over all its selected slices) at 100 adds 1 to the logit.
EVIDENCE_SCALE = 100.0
_SHOWN_FROM = 0.05  # below this share of the scale a pixel is drawn plain
_MAX_ALPHA = 0.7


def _stage(model: SliceClassifier, stride: int) -> torch.nn.Module:
    """The backbone module whose output has ``stride`` (timm's ``feature_info``)."""
    info = getattr(model.backbone, "feature_info", None)
    named = dict(model.backbone.named_modules())
    for entry in info or []:
        if entry.get("reduction") == stride and entry.get("module") in named:
            return named[entry["module"]]
    raise ValueError(
        f"backbone {model.cfg.backbone} names no stage of stride {stride}; use method 'cam'"
    )


def _target_weights(model: SliceClassifier, class_index: int, contrast: bool) -> Tensor:
    """The head's weights of the class (less the mean of the other classes' with
    ``contrast``): the logit (difference) is these weights times the pooled features."""
    weights = model.head.weight.detach().float()
    target = weights[class_index]
    if contrast:
        others = torch.cat([weights[:class_index], weights[class_index + 1 :]])
        target = target - others.mean(dim=0)
    return target


def _slice_weights(model: SliceClassifier, features: Tensor, target: Tensor) -> Tensor:
    """(S, D): the gradient of the target logit with respect to each slice's pooled features,
    times S (so that each map averages, over the slices, to the logit)."""
    count = len(features)
    if model.cfg.pool == "max":
        won = features.argmax(dim=0)  # the slice that won each feature
        weights = torch.zeros_like(features)
        weights[won, torch.arange(features.shape[1])] = target * count
        return weights
    return target.expand_as(features).clone()


def _chunks(model: SliceClassifier, x: Tensor) -> list[tuple[slice, Tensor]]:
    step = model.cfg.slice_chunk
    return [(slice(i, i + step), x[i : i + step]) for i in range(0, len(x), step)]


def _backbone_input(model: SliceClassifier, chunk: Tensor) -> Tensor:
    layout = torch.channels_last if model.cfg.channels_last else torch.contiguous_format
    return model.backbone_input(chunk).contiguous(memory_format=layout)


def _last_stage(model: SliceClassifier, x: Tensor, weights: Tensor) -> Tensor:
    """(S, h, w): the last feature maps weighted per slice, with no gradient needed."""
    maps = []
    with torch.no_grad():
        for part, chunk in _chunks(model, x):
            features = model.backbone.forward_features(_backbone_input(model, chunk)).float()
            if features.dim() != 4:
                raise ValueError(
                    f"backbone {model.cfg.backbone} gives no spatial feature maps "
                    f"(shape {tuple(features.shape)}); evidence maps need a convolutional one"
                )
            maps.append(torch.einsum("sdhw,sd->shw", features, weights[part]))
    return torch.cat(maps)


def _stage_maps(
    model: SliceClassifier, x: Tensor, weights: Tensor, stride: int, gradcam: bool
) -> Tensor:
    """(S, h, w) at the stage of ``stride``: gradient × activation summed over channels (or
    Grad-CAM's channel weights), scaled by the map's pixels so that it averages to the logit
    as the last stage's does."""
    stage = _stage(model, stride)
    captured: list[Tensor] = []
    hook = stage.register_forward_hook(lambda _m, _i, out: captured.append(out))
    maps = []
    try:
        for part, chunk in _chunks(model, x):
            captured.clear()
            with torch.enable_grad():
                # The input asks for gradients, so that a frozen backbone gives them too.
                pooled = model.backbone(_backbone_input(model, chunk).requires_grad_()).float()
                objective = (pooled * weights[part]).sum()
                (grad,) = torch.autograd.grad(objective, captured[0])
            activation = captured[0].detach().float()
            grad = grad.float()
            if gradcam:
                grad = grad.mean(dim=(2, 3), keepdim=True)
            pixels = activation.shape[2] * activation.shape[3]
            maps.append((grad * activation).sum(dim=1) * pixels)
    finally:
        hook.remove()
    return torch.cat(maps)


def logit_maps(
    model: SliceClassifier,
    x: Tensor,
    class_index: int,
    *,
    method: str = DEFAULT_METHOD,
    temperature: float = 1.0,
) -> Tensor:
    """The signed evidence of ``method`` for ``class_index`` in one scan's grey slices ``x``
    (S, 1, H, W), at the map's own resolution (S, h, w): divided by ``temperature``, in logit
    units per pixel.  For ``cam-contrast`` its mean over every pixel of every slice is the
    class's logit less the mean of the others', biases left out (exactly; the gradient
    methods to first order)."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected one scan's grey slices (S, 1, H, W), got {tuple(x.shape)}")
    if not 0 <= class_index < model.head.out_features:
        raise ValueError(f"class_index {class_index} outside 0..{model.head.out_features - 1}")
    if method not in METHODS:
        raise ValueError(f"unknown evidence map {method!r}; expected one of {METHODS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    x = x.to(model.head.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.run_chunked(model.backbone, x).float()
        target = _target_weights(model, class_index, contrast=method != "cam") / temperature
        weights = _slice_weights(model, features, target)
        if method in ("cam", "cam-contrast"):
            return _last_stage(model, x, weights)
        stride = 8 if method.endswith("-8") else 16
        return _stage_maps(model, x, weights, stride, gradcam=method.startswith("gradcam"))
    finally:
        model.train(was_training)


def class_activation_maps(
    model: SliceClassifier,
    x: Tensor,
    class_index: int,
    *,
    method: str = DEFAULT_METHOD,
    temperature: float = 1.0,
) -> np.ndarray:
    """The evidence for ``class_index`` in one scan's grey slices ``x`` (S, 1, H, W): float32
    (S, H, W) ≥ 0 in logit units per pixel, divided by ``temperature`` (the model card's
    calibration), upsampled bilinearly to the slice size (see the module docstring)."""
    maps = logit_maps(model, x, class_index, method=method, temperature=temperature)
    maps = F.interpolate(maps.unsqueeze(1), size=x.shape[-2:], mode="bilinear")
    return maps.squeeze(1).relu().cpu().numpy().astype(np.float32)


def evidence_slice(maps: np.ndarray) -> int:
    """The slice holding the most evidence (for a max-pooled model, the one that won most)."""
    return int(maps.reshape(len(maps), -1).sum(axis=1).argmax())


def inside_share(maps: np.ndarray, mask: np.ndarray) -> float:
    """The share of a scan's positive evidence that lies inside ``mask`` (its lungs); NaN for
    a scan without positive evidence."""
    total = float(maps.sum())
    return float((maps * mask).sum() / total) if total > 0 else float("nan")


def _heat(values: np.ndarray) -> np.ndarray:
    """Colours (..., 3) in [0, 1] of values in [0, 1]: dark red, red, orange, yellow, white."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.clip(np.concatenate([0.45 + 1.6 * v, 2.2 * v - 0.6, 3.0 * v - 2.0], -1), 0, 1)


def colour_bar(
    scale: float = EVIDENCE_SCALE, *, width: int = 320, ticks: int = 5, label: str = ""
) -> np.ndarray:
    """The overlay's colour scale as an RGB uint8 picture with its values: the colours from 0
    to ``scale`` (logit units per pixel), a tick and its value under each of ``ticks``
    positions, and ``label`` under them."""
    font = ImageFont.load_default(size=12)
    margin, bar = 18, 14
    height = bar + 34 + (16 if label else 0)
    image = Image.new("RGB", (width + 2 * margin, height), "white")
    row = (_heat(np.linspace(0.0, 1.0, width)) * 255).round().astype(np.uint8)
    image.paste(Image.fromarray(np.repeat(row[None], bar, axis=0)), (margin, 2))
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin - 1, 1, margin + width, bar + 2), outline="black")
    for i in range(ticks):
        x = margin + round(i * (width - 1) / (ticks - 1))
        value = scale * i / (ticks - 1)
        text = f"{value:g}" + ("+" if i == ticks - 1 else "")
        draw.line((x, bar + 2, x, bar + 7), fill="black")
        draw.text((x, bar + 9), text, fill="black", font=font, anchor="ma")
    if label:
        draw.text((margin, bar + 28), label, fill="black", font=font)
    return np.asarray(image)


def overlay(
    slice_gray_uint8: np.ndarray,
    evidence: np.ndarray,
    *,
    scale: float = EVIDENCE_SCALE,
    outline: np.ndarray | None = None,
    outline_rgb: tuple[int, int, int] = (80, 200, 255),
) -> np.ndarray:
    """An RGB uint8 (H, W, 3) picture: the grey slice, the evidence (logit units per pixel)
    coloured on the fixed scale ``scale`` and blended in as strongly as it is (below
    :data:`_SHOWN_FROM` of the scale the slice stays plain), and ``outline`` (a bool (H, W)
    of pixels, e.g. the lungs' border) drawn on top."""
    if slice_gray_uint8.ndim != 2 or slice_gray_uint8.shape != evidence.shape:
        raise ValueError(
            f"expected a grey slice and a map of one (H, W) shape, got "
            f"{slice_gray_uint8.shape} and {evidence.shape}"
        )
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    level = np.clip(evidence / scale, 0.0, 1.0)
    alpha = np.where(level >= _SHOWN_FROM, 0.25 + (_MAX_ALPHA - 0.25) * level, 0.0)[..., None]
    grey = np.repeat(slice_gray_uint8.astype(np.float64)[..., None], 3, axis=2)
    blended = (1.0 - alpha) * grey + alpha * _heat(level) * 255.0
    picture = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outline is not None:
        if outline.shape != evidence.shape:
            raise ValueError(f"outline {outline.shape} and map {evidence.shape} differ in shape")
        picture[outline] = outline_rgb
    return picture
