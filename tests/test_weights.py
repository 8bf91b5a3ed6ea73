"""Pretrained weights: the packaged ImageNet EfficientNet-Lite0 is right (it classifies real
photos), efficientnet_pytorch checkpoints map into timm by rule, and every failure is one line
naming the file or the backbone."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from fedct.common.model.classifier import ModelConfig, build_model
from fedct.common.model.weights import (
    IMAGENET,
    PACKAGED,
    WeightsError,
    check_weights_available,
    create_backbone,
    input_normalisation,
    load_weights,
    packaged_weights_file,
    read_weights_file,
    weights_spec,
)

LITE0 = "tf_efficientnet_lite0"
# ImageNet class indices.
TEMPLE_CLASSES = {442: "bell cote", 663: "monastery", 698: "palace"}
DAISY = 985


def photos() -> dict[str, torch.Tensor]:
    """scikit-learn's two sample photos, centre-cropped and resized to 224² (bicubic), [0, 1]."""
    out = {}
    for name, image in zip(("temple", "flower"), load_sample_images().images, strict=True):
        h, w, _ = image.shape
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(image[top : top + side, left : left + side])
        pixels = np.asarray(crop.resize((224, 224), Image.BICUBIC), np.float32) / 255.0
        out[name] = torch.from_numpy(pixels).permute(2, 0, 1)
    return out


def top_classes(model: torch.nn.Module, k: int = 3) -> dict[str, list[int]]:
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in input_normalisation(model))
    batch = torch.stack([(x - mean) / std for x in photos().values()])
    with torch.no_grad():
        logits = model.eval()(batch)
    return dict(zip(("temple", "flower"), logits.topk(k).indices.tolist(), strict=True))


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    """The packaged weights in timm's tf_efficientnet_lite0, with the package's classifier."""
    return create_backbone(LITE0, IMAGENET)


def test_packaged_lite0_classifies_real_photos(lite0: torch.nn.Module) -> None:
    top = top_classes(lite0)
    assert top["temple"][0] in TEMPLE_CLASSES, top
    assert top["flower"][0] == DAISY, top
    assert input_normalisation(lite0) == ((0.5,) * 3, (0.5,) * 3)


def test_the_photo_check_catches_wrong_padding_and_statistics(lite0: torch.nn.Module) -> None:
    """The same tensors in timm's efficientnet_lite0 (symmetric padding, BatchNorm eps 1e-5)
    or with one layer's BatchNorm statistics swapped do not find the daisy: the check above
    would fail for either mistake."""
    symmetric = timm.create_model("efficientnet_lite0")
    symmetric.load_state_dict(lite0.state_dict())
    assert top_classes(symmetric)["flower"][0] != DAISY

    swapped = create_backbone(LITE0, IMAGENET)
    bn = swapped.blocks[1][0].bn2  # a depthwise convolution's BatchNorm: 96 channels
    with torch.no_grad():
        bn.running_mean.copy_(bn.running_mean.flip(0))
        bn.running_var.copy_(bn.running_var.flip(0))
    assert top_classes(swapped)["flower"][0] != DAISY


def test_imagenet_in_the_run_config_builds_the_packaged_backbone() -> None:
    model = build_model(ModelConfig(backbone=LITE0, pretrained_weights=IMAGENET))
    source = read_weights_file(packaged_weights_file(LITE0))
    torch.testing.assert_close(model.backbone.conv_stem.weight, source["_conv_stem.weight"])
    last = model.backbone.blocks[6][0].bn3
    torch.testing.assert_close(last.running_var, source["_blocks.15._bn2.running_var"])
    grey = torch.full((1, 1, 8, 8), 0.75)
    torch.testing.assert_close(model.backbone_input(grey), torch.full((1, 3, 8, 8), 0.5))
    assert weights_spec(" ImageNet ") == IMAGENET and weights_spec("") is None


def efficientnet_pytorch_names(model: torch.nn.Module) -> dict[str, str]:
    """timm name -> efficientnet_pytorch name for a timm EfficientNet, written from the
    efficientnet_pytorch layout (flat block numbers, BatchNorms numbered per block)."""
    names = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
    flat = 0
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            prefix = f"_blocks.{flat}"
            if hasattr(block, "conv_pwl"):  # expands: expand, depthwise, SE, project
                parts = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv"}
                parts |= {"bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"}
            else:
                parts = {"conv_dw": "_depthwise_conv", "bn1": "_bn1"}
                parts |= {"conv_pw": "_project_conv", "bn2": "_bn2"}
            parts |= {"se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"}
            names |= {f"blocks.{s}.{i}.{k}": f"{prefix}.{v}" for k, v in parts.items()}
            flat += 1
    out = {}
    for key in model.state_dict():
        module, _, tensor = key.rpartition(".")
        out[key] = f"{names[module]}.{tensor}"
    return out


def test_an_efficientnet_pytorch_b3_checkpoint_loads_by_name(tmp_path: Path) -> None:
    """A B3 checkpoint in efficientnet_pytorch names (SE blocks, 26 blocks over 7 stages),
    its entries shuffled: every tensor lands where it belongs, whatever the file's order."""
    torch.manual_seed(0)
    source = timm.create_model("tf_efficientnet_b3", num_classes=0)
    state = source.state_dict()
    renamed = efficientnet_pytorch_names(source)
    entries = [(renamed[key], value) for key, value in state.items()]
    random.Random(0).shuffle(entries)
    path = tmp_path / "efficientnet-b3.pth"
    torch.save({"state_dict": dict(entries)}, path)
    target = create_backbone("tf_efficientnet_b3", str(path), num_classes=0)
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)
    assert renamed["blocks.3.1.conv_pw.weight"] == "_blocks.9._expand_conv.weight"


def test_efficientnet_pytorch_errors_list_what_does_not_map(tmp_path: Path) -> None:
    entries = read_weights_file(packaged_weights_file(LITE0))
    odd = tmp_path / "odd.pth"
    torch.save({**entries, "_blocks.3._swish.alpha": torch.zeros(1)}, odd)
    with pytest.raises(WeightsError, match=r"odd\.pth.*unmapped: _blocks\.3\._swish\.alpha"):
        create_backbone(LITE0, str(odd))
    # Lite0's 16 blocks do not fill B3's 26.
    with pytest.raises(WeightsError, match=r"missing: blocks\.\d\.\d"):
        create_backbone("tf_efficientnet_b3", str(packaged_weights_file(LITE0)), num_classes=0)
    with pytest.raises(WeightsError, match=r"need TF 'same' padding.*tf_ variant"):
        create_backbone("efficientnet_lite0", str(packaged_weights_file(LITE0)))


def test_imagenet_for_a_backbone_without_a_package_needs_the_hub(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", offline)
    assert "efficientnet_b3" not in PACKAGED
    for attempt in (
        lambda: check_weights_available("efficientnet_b3", IMAGENET),
        lambda: create_backbone("efficientnet_b3", IMAGENET, num_classes=0),
    ):
        with pytest.raises(WeightsError, match=r"efficientnet_b3: .*unreachable.*pretrained-w"):
            attempt()


def test_weights_files_are_checked_before_a_run(tmp_path: Path) -> None:
    check_weights_available(LITE0, IMAGENET)
    check_weights_available(LITE0, None)
    with pytest.raises(WeightsError, match=r"absent\.pth: no such weights file"):
        check_weights_available(LITE0, str(tmp_path / "absent.pth"))
    with pytest.raises(WeightsError, match=r"w\.bin: unsupported weights format"):
        check_weights_available(LITE0, str(tmp_path / "w.bin"))


def test_an_altered_packaged_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    altered = tmp_path / "models" / "efficientnet-lite0-57934424.pth"
    altered.parent.mkdir()
    data = bytearray(packaged_weights_file(LITE0).read_bytes())
    data[-1] ^= 1
    altered.write_bytes(bytes(data))
    monkeypatch.setattr(type(PACKAGED[LITE0]), "path", lambda self: altered)
    with pytest.raises(WeightsError, match=r"sha256 .* reinstall the package"):
        packaged_weights_file(LITE0)


def test_load_weights_into_a_whole_imagenet_model_keeps_its_classifier(tmp_path: Path) -> None:
    model = timm.create_model(LITE0)
    load_weights(model, packaged_weights_file(LITE0))
    source = read_weights_file(packaged_weights_file(LITE0))
    torch.testing.assert_close(model.classifier.weight, source["_fc.weight"])
