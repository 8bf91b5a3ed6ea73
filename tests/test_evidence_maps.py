"""Evidence maps (common/model/cam.py): one absolute scale, where the evidence is, max pooling's
winning slices, the overlay and its colour bar."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedct.common.model.cam import (
    METHODS,
    class_activation_maps,
    colour_bar,
    evidence_slice,
    inside_share,
    logit_maps,
    overlay,
)
from fedct.common.model.classifier import ModelConfig, SliceClassifier, build_model


def tiny_model(**options: object) -> SliceClassifier:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="test_efficientnet", **options)).eval()


def _scan(slices: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(slices, 1, size, size, generator=torch.Generator().manual_seed(1))


def test_every_method_gives_nonnegative_maps_of_the_slices() -> None:
    model = tiny_model().train()
    for method in METHODS:
        maps = class_activation_maps(model, _scan(2), 2, method=method)
        assert maps.shape == (2, 32, 32) and maps.dtype == np.float32, method
        assert maps.min() >= 0 and maps.max() > 0, method
        assert model.training  # restored
    with pytest.raises(ValueError, match="unknown evidence map"):
        class_activation_maps(model, _scan(), 2, method="lime")


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_the_scale_is_absolute_the_maps_add_up_to_the_logit_difference(pool: str) -> None:
    model = tiny_model(pool=pool)
    x = _scan(4)
    logits = model(x[None], torch.ones(1, 4, dtype=torch.bool))[0].double()
    bias = model.head.bias.double()
    margin = (logits[2] - logits[:2].mean()) - (bias[2] - bias[:2].mean())
    signed = logit_maps(model, x, 2, method="cam-contrast").double()
    assert signed.mean().item() == pytest.approx(margin.item(), rel=1e-4, abs=1e-6)
    halved = logit_maps(model, x, 2, method="cam-contrast", temperature=2.0)
    torch.testing.assert_close(halved, signed.float() / 2)


def test_max_pooling_puts_the_evidence_on_the_slices_that_won() -> None:
    model = tiny_model(pool="max")
    x = _scan(1).repeat(2, 1, 1, 1)  # two equal slices: the first wins every feature
    for method in ("cam-contrast", "gradxact-16"):
        maps = class_activation_maps(model, x, 2, method=method)
        assert maps[0].max() > 0 and maps[1].max() == 0
        assert evidence_slice(maps) == 0


def test_the_map_peaks_where_the_class_evidence_is() -> None:
    """A head whose COVID-19 class scores the features of a planted patch: the map must peak on
    the patch, and the other classes' maps stay off it."""
    model = tiny_model()
    size = 64
    x = torch.full((1, 1, size, size), 0.45)
    x[..., 4:24, 4:24] = 1.0  # a bright patch in the top-left feature cell
    with torch.no_grad():
        maps = model.backbone.forward_features(model.backbone_input(x))[0]  # (D, 2, 2)
        evidence = maps[:, 0, 0] - maps[:, 1, 1]
        model.head.weight.zero_()
        model.head.weight[2] = evidence
    for method in ("cam", "cam-contrast", "gradxact-16"):
        covid = class_activation_maps(model, x, 2, method=method)[0]
        row, col = np.unravel_index(covid.argmax(), covid.shape)
        assert row < size // 2 and col < size // 2, method
        assert covid[:32, :32].sum() > covid[32:, 32:].sum()
    patch = np.zeros((1, size, size), bool)
    patch[0, :32, :32] = True
    assert inside_share(class_activation_maps(model, x, 2, method="cam-contrast"), patch) > 0.5
    assert np.isnan(inside_share(np.zeros((1, 4, 4)), patch[:, :4, :4]))


def test_the_overlay_is_on_one_fixed_scale() -> None:
    grey = np.full((4, 6), 100, dtype=np.uint8)
    evidence = np.zeros((4, 6), dtype=np.float32)
    evidence[:, 3:] = 20.0
    picture = overlay(grey, evidence, scale=40.0)
    assert picture.shape == (4, 6, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[:, :3], np.repeat(grey[:, :3, None], 3, axis=2))
    hot = picture[0, 5].astype(int)
    assert hot[0] > hot[2]  # evidence is warm
    weaker = overlay(grey, evidence, scale=400.0)[0, 5].astype(int)
    assert abs(weaker - 100).sum() < abs(hot - 100).sum()  # the same evidence on a larger scale
    border = np.zeros((4, 6), bool)
    border[0, 0] = True
    assert tuple(overlay(grey, evidence, outline=border, outline_rgb=(1, 2, 3))[0, 0]) == (1, 2, 3)
    with pytest.raises(ValueError):
        overlay(grey, evidence[:2])


def test_the_colour_bar_carries_its_values() -> None:
    bar = colour_bar(40.0, width=200, ticks=5, label="evidence")
    assert bar.ndim == 3 and bar.shape[2] == 3 and bar.dtype == np.uint8
    strip = bar[5, 18:218].astype(int)
    assert strip[-1].sum() > strip[0].sum()  # dark at 0, bright at the top
    labels = bar[18:, :]
    assert (labels < 128).any()  # tick values and the label are written under the colours
