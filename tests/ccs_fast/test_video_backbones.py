"""3-D backbones: I3D inflation from local 2-D weights, torchvision video models, flow stems, tokens."""
import pytest
import torch
import torchvision
from torch import nn

from ccs_fast.base.errors import CCSError
from ccs_fast.video_backbones import (VideoBackbone, build_two_stream_video_backbones, build_video_backbone,
                                      inflate_conv)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A randomly initialised torchvision resnet18 (eval mode, non-trivial BN statistics) saved
    as a local 2-D weights file."""
    reference = torchvision.models.resnet18(weights=None, num_classes=5)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    reference.eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    return reference, path




def test_inflated_conv_weight_and_constant_clip():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    conv3d = inflate_conv(conv, temporal_kernel=3)
    assert conv3d.kernel_size == (3, 3, 3) and conv3d.stride == (1, 2, 2) and conv3d.padding == (1, 1, 1)
    torch.testing.assert_close(conv3d.weight.sum(dim=2), conv.weight)
    torch.testing.assert_close(conv3d.weight[:, :, 0], conv.weight / 3)
    image = torch.randn(2, 4, 10, 10)
    clip = image.unsqueeze(2).expand(-1, -1, 5, -1, -1)
    with torch.no_grad():
        out = conv3d(clip)
        expected = conv(image)
    for t in range(1, 4):  # frames whose temporal window lies inside the clip
        torch.testing.assert_close(out[:, :, t], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[:, :, 0], expected, atol=1e-3)  # zero padding at the border


def test_i3d_inflation_preserves_2d_output_on_constant_clip(resnet_features, resnet18_file):
    reference, path = resnet18_file
    backbone, flow = build_two_stream_video_backbones("i3d_resnet18", flow_chans=2, pretrained=str(path))
    backbone.eval()
    # flow stem from the file: the mean of the RGB stem over colour channels, inflated
    expected_flow = reference.conv1.weight.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1)
    torch.testing.assert_close(flow.first_conv.weight.sum(dim=2), expected_flow)
    assert backbone.channels == (64, 128, 256, 512) and backbone.out_channels == 512
    torch.testing.assert_close(backbone.first_conv.weight.sum(dim=2), reference.conv1.weight)
    image = torch.randn(1, 3, 16, 16)
    clip = image.unsqueeze(2).expand(-1, -1, 32, -1, -1).contiguous()
    with torch.no_grad():
        expected = resnet_features(reference, image)  # (1, 512, 1, 1)
        out = backbone(clip)
    assert out.shape == (1, 512, 16, 1, 1)
    # Stem (k_t 5, stride 2) and five inflated 3-tap convolutions: frames 6..9 of 16 never see padding.
    for t in range(6, 10):
        torch.testing.assert_close(out[:, :, t], expected, atol=1e-4, rtol=1e-4)


def test_two_stream_i3d_tiny_clip_and_flow_stem():
    rgb, flow = build_two_stream_video_backbones("i3d_resnet18", flow_chans=2)
    assert flow.in_chans == 2 and flow.first_conv.in_channels == 2
    assert rgb.dims == 3 and rgb.video and rgb.memory_format == torch.channels_last_3d
    torch.testing.assert_close(flow.first_conv.weight,
                               rgb.first_conv.weight.mean(dim=1, keepdim=True).expand_as(flow.first_conv.weight))
    with torch.no_grad():
        y_f = rgb(torch.randn(2, 3, 4, 32, 32))
        y_o = flow(torch.randn(2, 2, 4, 32, 32))
    assert y_f.shape == y_o.shape == (2, 512, 2, 1, 1)
    with pytest.raises(ValueError, match="expected a clip"):
        flow(torch.randn(2, 3, 4, 32, 32))


@pytest.mark.parametrize("name, clip, stage_channels, out_shape", [
    ("r3d_18", (4, 16, 16), (64, 128, 256, 512), (512, 1, 1, 1)),
    ("r2plus1d_18", (4, 16, 16), (64, 128, 256, 512), (512, 1, 1, 1)),
    ("s3d", (8, 32, 32), (64, 192, 480, 832, 1024), (1024, 1, 1, 1)),
])
def test_torchvision_video_models_flow_stream(name, clip, stage_channels, out_shape):
    flow = build_video_backbone(name, in_chans=2).eval()
    assert flow.channels == stage_channels and flow.first_conv.in_channels == 2
    x = torch.randn(1, 2, *clip)
    with torch.no_grad():
        per_stage = [x := stage(x) for stage in flow.stages]
    assert [y.shape[1] for y in per_stage] == list(stage_channels)  # the channels read from the modules
    assert per_stage[-1].shape == (1, *out_shape) and torch.isfinite(per_stage[-1]).all()


def test_tokens_round_trip_and_order():
    x = torch.randn(2, 6, 3, 4, 5)
    tokens = VideoBackbone.to_tokens(x)
    assert tokens.shape == (2, 3 * 4 * 5, 6)
    torch.testing.assert_close(tokens[:, 1 * 20 + 2 * 5 + 3], x[:, :, 1, 2, 3])
    torch.testing.assert_close(VideoBackbone.from_tokens(tokens, x.shape), x)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(CCSError, match="unknown 3-D backbone"):
        build_video_backbone("c3d")
    with pytest.raises(CCSError, match="ResNets"):
        build_video_backbone("i3d_vgg16")
    with pytest.raises(CCSError, match="not found"):
        build_video_backbone("r3d_18", pretrained=str(tmp_path / "missing.pth"))


def test_connection_block_on_video_tokens():
    from ccs_fast.connection import CrossStreamAttention

    x_f = torch.randn(2, 16, 2, 3, 3, requires_grad=True)  # (B, C, T', h, w) of the two streams
    x_o = torch.randn(2, 16, 2, 3, 3, requires_grad=True)
    block = CrossStreamAttention(16, impl="eager", gamma_init=1.0)
    y_f, y_o = block(VideoBackbone.to_tokens(x_f), VideoBackbone.to_tokens(x_o))
    assert y_f.shape == y_o.shape == (2, 2 * 3 * 3, 16)
    out_f, out_o = VideoBackbone.from_tokens(y_f, x_f.shape), VideoBackbone.from_tokens(y_o, x_o.shape)
    assert out_f.shape == x_f.shape and not torch.allclose(out_f, x_f)
    (out_f.square().sum() + out_o.square().sum()).backward()
    assert x_f.grad.abs().sum() > 0 and x_o.grad.abs().sum() > 0
