"""Backbones: stage splits equal the original forward, cross-modality init, local weights only."""
import importlib.util

import pytest
import torch
import torchvision
from torch import nn

from ccs_fast.backbones import build_backbone, build_two_stream_backbones, cross_modality_init, load_pretrained
from ccs_fast.base.errors import CCSError

has_timm = importlib.util.find_spec("timm") is not None


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 (eval mode) and its state dict saved as a local weights file."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return reference, path




def test_resnet_stages_equal_torchvision_forward(resnet_features, resnet18_file):
    reference, path = resnet18_file
    backbone = build_backbone("resnet18", pretrained=str(path)).eval()
    assert backbone.num_stages == 4 and backbone.channels == (64, 128, 256, 512)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = resnet_features(reference, x)
        got = backbone(x)
        stage_by_stage = x
        for stage in backbone.stages:
            stage_by_stage = stage(stage_by_stage)
    assert got.shape == (2, 512, 2, 2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(stage_by_stage, expected)
    assert not any(isinstance(m, (nn.Linear, nn.AdaptiveAvgPool2d)) for m in backbone.modules())


def test_flow_backbone_cross_modality_init_from_file(resnet18_file):
    reference, path = resnet18_file
    flow = build_backbone("resnet18", in_chans=10, pretrained=str(path)).eval()
    rgb_conv1 = reference.conv1.weight
    assert flow.in_chans == 10 and flow.first_conv.in_channels == 10
    torch.testing.assert_close(flow.first_conv.weight, rgb_conv1.mean(dim=1, keepdim=True).repeat(1, 10, 1, 1))
    torch.testing.assert_close(flow.stages[3][1].conv2.weight, reference.layer4[1].conv2.weight)
    with torch.no_grad():
        assert flow(torch.randn(1, 10, 32, 32)).shape == (1, 512, 1, 1)


def test_two_stream_init_without_weights_shares_conv1_mean():
    torch.manual_seed(1)
    rgb, flow = build_two_stream_backbones("resnet18", 4)
    expected = rgb.first_conv.weight.mean(dim=1, keepdim=True).repeat(1, 4, 1, 1)
    torch.testing.assert_close(flow.first_conv.weight, expected)
    # Apart from conv1 the streams are initialised independently.
    assert not torch.equal(rgb.stages[1][0].conv1.weight, flow.stages[1][0].conv1.weight)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 6, 3), nn.Conv3d(3, 6, (3, 5, 5))], ids=["2d", "3d"])
def test_cross_modality_init_over_the_convolutions_rank(conv):
    rgb_weight = conv.weight.detach().clone()
    cross_modality_init(conv, 4)
    assert conv.in_channels == 4 and conv.weight.shape == (6, 4, *rgb_weight.shape[2:])
    for c in range(4):
        torch.testing.assert_close(conv.weight[:, c], rgb_weight.mean(dim=1))
    x = torch.randn(1, 4, *[7] * (rgb_weight.dim() - 2))
    assert conv(x).shape[1] == 6


def test_backbone_checks_its_input():
    backbone = build_backbone("resnet18", in_chans=4)
    assert backbone.dims == 2 and not backbone.video and backbone.out_channels == 512
    with pytest.raises(ValueError, match=r"expected images \(N, 4, H, W\)"):
        backbone(torch.randn(1, 3, 32, 32))


class _Tiny(nn.Module):
    def __init__(self, classes=3, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3)
        self.fc = nn.Linear(width, classes)


def test_pretrained_ignores_only_the_classifier(tmp_path):
    path = tmp_path / "tiny.pth"
    source = _Tiny(classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = _Tiny(classes=3)
    load_pretrained(target, str(path), classifier=("fc",))
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("missing", "not found"),
        ("garbage", "not a readable state dict"),
        ("extra_key", "unexpected keys"),
        ("missing_key", "missing keys"),
        ("wrong_shape", "has shape"),
        ("not_tensors", "not a state dict"),
    ],
)
def test_bad_pretrained_file_names_the_file(tmp_path, content, problem):
    path = tmp_path / "weights.pth"
    state = _Tiny().state_dict()
    if content == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif content == "extra_key":
        torch.save({**state, "conv2.weight": torch.zeros(1)}, path)
    elif content == "missing_key":
        torch.save({k: v for k, v in state.items() if k != "conv1.bias"}, path)
    elif content == "wrong_shape":
        torch.save({**state, "conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    elif content == "not_tensors":
        torch.save({"conv1.weight": [1, 2]}, path)
    with pytest.raises(CCSError, match=problem) as info:
        load_pretrained(_Tiny(), str(path), classifier=("fc",))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_pretrained_file_fails_before_building(tmp_path):
    with pytest.raises(CCSError, match="nope.pth: pretrained weights file not found"):
        build_backbone("resnet50", pretrained=str(tmp_path / "nope.pth"))


def test_unknown_backbone_lists_examples():
    with pytest.raises(CCSError, match="unknown backbone 'alexnet2'.*resnet50.*timm:"):
        build_backbone("alexnet2")
    with pytest.raises(CCSError, match="unknown torchvision backbone 'resnet7'"):
        build_backbone("resnet7")


def test_vgg16_bn_splits_at_max_pools():
    backbone = build_backbone("vgg16_bn", in_chans=4).eval()
    assert backbone.num_stages == 5 and backbone.channels == (64, 128, 256, 512, 512)
    assert all(isinstance(stage[-1], nn.MaxPool2d) for stage in backbone.stages)
    with torch.no_grad():
        assert backbone(torch.randn(1, 4, 32, 32)).shape == (1, 512, 1, 1)


@pytest.mark.skipif(not has_timm, reason="timm not installed")
def test_timm_resnet18_uses_its_own_stages():
    backbone = build_backbone("timm:resnet18", in_chans=4).eval()
    assert backbone.splittable and backbone.num_stages == 4 and backbone.channels == (64, 128, 256, 512)
    conv1 = backbone.stages[0][0]
    assert conv1 is backbone.first_conv and conv1.in_channels == 4
    with torch.no_grad():
        assert backbone(torch.randn(1, 4, 64, 64)).shape == (1, 512, 2, 2)
    with pytest.raises(CCSError, match="timm has no model 'resnet_nonexistent'"):
        build_backbone("timm:resnet_nonexistent")


@pytest.mark.skipif(not has_timm, reason="timm not installed")
def test_timm_stages_follow_feature_info():
    # efficientnet_b0's features end at blocks.1, .2, .4 and .6 (stride 4 to 32); its 1×1
    # conv_head and bn2 fold into the last stage
    # (build_backbone keeps a split only if the stages reproduce forward_features)
    backbone = build_backbone("timm:efficientnet_b0", in_chans=4).eval()
    assert backbone.splittable and backbone.num_stages == 4 and backbone.channels == (24, 40, 112, 1280)
    with torch.no_grad():
        assert backbone(torch.randn(1, 4, 64, 64)).shape == (1, 1280, 2, 2)


@pytest.mark.skipif(not has_timm, reason="timm not installed")
def test_timm_without_stage_structure_is_one_stage(monkeypatch):
    from ccs_fast import backbones

    monkeypatch.setattr(backbones, "_timm_feature_stages", lambda model: None)
    backbone = build_backbone("timm:efficientnet_b0")
    assert not backbone.splittable and backbone.num_stages == 1 and backbone.channels == (1280,)
