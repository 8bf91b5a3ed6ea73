"""Class activation maps (CAM) as ai-corona draws them, and their overlay on a CT slice.

The map of a class is the backbone's last feature maps (before global pooling) weighted by the
head's weights for that class.  With mean pooling over slices (the default), the scan's logit
is the bias plus the mean of these maps over all pixels of all slices, so a map shows where the
evidence for the class lies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedct.common.model.classifier import SliceClassifier


def class_activation_maps(model: SliceClassifier, x: Tensor, class_index: int) -> np.ndarray:
    """The CAM of one scan's grey slices ``x`` (S, 1, H, W) for ``class_index``: (S, H, W) in
    [0, 1].

    Negative evidence is cut (ReLU), the maps are upsampled bilinearly to the slice size and
    divided by the scan's maximum, so slices of one scan compare; a scan without positive
    evidence gives zeros.
    """
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected one scan's grey slices (S, 1, H, W), got {tuple(x.shape)}")
    if not 0 <= class_index < model.head.out_features:
        raise ValueError(f"class_index {class_index} outside 0..{model.head.out_features - 1}")
    device = model.head.weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            maps = model.run_chunked(model.backbone.forward_features, x.to(device)).float()
            if maps.dim() != 4:
                raise ValueError(
                    f"backbone {model.cfg.backbone} gives no spatial feature maps "
                    f"(shape {tuple(maps.shape)}); CAM needs a convolutional backbone"
                )
            weights = model.head.weight[class_index].float()
            cam = torch.einsum("sdhw,d->shw", maps, weights).relu()
            cam = F.interpolate(cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear")
            cam = cam.squeeze(1)
            peak = cam.max()
            if peak > 0:
                cam = cam / peak
    finally:
        model.train(was_training)
    return cam.cpu().numpy()


def _jet(values: np.ndarray) -> np.ndarray:
    """Jet colours (..., 3) in [0, 1] of values in [0, 1]: blue through green to red."""
    v = values[..., None] * 4.0
    centres = np.array([3.0, 2.0, 1.0])  # where red, green and blue peak
    return np.clip(1.5 - np.abs(v - centres), 0.0, 1.0)


def colour_bar(width: int = 256, height: int = 12) -> np.ndarray:
    """The overlay's colour scale as an RGB uint8 (height, width, 3) picture: CAM value 0
    (no evidence) on the left to 1 (the scan's strongest evidence) on the right."""
    row = _jet(np.linspace(0.0, 1.0, width)) * 255.0
    return np.repeat(np.rint(row)[None].astype(np.uint8), height, axis=0)


def overlay(slice_gray_uint8: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """An RGB uint8 (H, W, 3) picture: the grey slice blended with the jet-coloured CAM."""
    if slice_gray_uint8.ndim != 2 or slice_gray_uint8.shape != cam.shape:
        raise ValueError(
            f"expected a grey slice and a CAM of one (H, W) shape, got "
            f"{slice_gray_uint8.shape} and {cam.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    grey = np.repeat(slice_gray_uint8.astype(np.float64)[..., None], 3, axis=2)
    colour = _jet(np.clip(cam, 0.0, 1.0)) * 255.0
    blended = (1.0 - alpha) * grey + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
