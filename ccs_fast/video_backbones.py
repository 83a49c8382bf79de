"""3-D base models (the paper's I3D rows, Tables 1 and 3) split into stages, like ``backbones``.

``build_video_backbone(name, in_chans=3, pretrained=None, **inflation) -> VideoBackbone``;
``build_two_stream_video_backbones(name, flow_chans=2, pretrained=None, **inflation) -> (rgb, flow)``.
``VideoBackbone`` is a ``backbones.Backbone`` of rank 3: ``forward(x)`` maps a clip
(B, C_in, T, H, W) to the last stage's map (B, C, T', h, w); ``channels`` holds each stage's
output channels (``channels[-1]`` = C), so a connection block can follow any stage after
``to_tokens`` turns (B, C, T, h, w) into (B, T·h·w, C) (t-major, then row-major positions;
each clip attends within itself) and ``from_tokens`` turns it back.

Names:

- ``i3d_<torchvision resnet>`` (``i3d_resnet18``, ``i3d_resnet50``, …): the 2-D ResNet inflated to
  3-D as I3D does (Carreira & Zisserman 2017): every Conv2d becomes a Conv3d whose weight is the
  2-D kernel repeated k_t times over time and divided by k_t, so on a clip of identical frames
  each inflated convolution gives the 2-D response wherever its temporal window lies inside the
  clip (zero temporal padding changes the border frames). BatchNorm2d → BatchNorm3d with the same
  statistics, max-pool (3×3) → (1×3×3). Which convolutions get k_t > 1 follows MMAction2's
  ``i3d_r50``: the stem conv (k_t = 5, temporal stride 2), and in the residual blocks the first
  convolution (3×3×3 in a BasicBlock, 3×1×1 in a Bottleneck) of every block of layer1, of the
  even blocks of layer2 and layer3, and of the odd blocks of layer4 (for ResNet-50: (1,1,1),
  (1,0,1,0), (1,0,1,0,1,0), (0,1,0)); all other convolutions have k_t = 1. Temporal stride:
  2 in the stem, 1 elsewhere (MMAction2 also strides its first max-pool and adds a pool after
  layer1; ``pool1_temporal_stride`` reproduces the former), so a 16-frame 224² clip gives an
  8 × 7 × 7 map: N = T'·h·w = 392 positions for the connection block.
  ``pretrained``: a local torchvision 2-D state dict (ImageNet) of that ResNet, loaded before
  inflation with the key and shape checks of ``backbones.load_pretrained``.
- ``r3d_18``, ``r2plus1d_18``, ``s3d``: torchvision's video models (no classifier, no pooling).
  Stages: stem + layer1, layer2, layer3, layer4 for the ResNets; for S3D, ``features`` cut after
  each max-pool (5 stages, output strides 4, 8, 16, 32, 32). Temporal stride 8 in all three;
  S3D's pooling needs clips of at least 8 frames and 32 × 32 pixels.
  ``pretrained``: a local state dict of the same video architecture (e.g. torchvision's Kinetics
  weights saved to a file). Nothing is ever downloaded.

Flow stream: 2 channels per time step, input (B, 2, T, H, W) with channel 0 the horizontal and
channel 1 the vertical flow of each frame pair, as MMAction2's 3-D flow models read it
(``RawFrameDecode`` stacks x and y per frame, ``FormatShape('NCTHW')`` puts them on the channel
axis) and as I3D's flow stream is fed (the loaders put one flow pair per frame on the segment
axis and the model views them as (…, 2, T, H, W) clips). The first convolution
gets ``in_chans`` input channels, each weighted by the mean of its RGB weights over the three
colour channels (TSN's cross-modality initialisation, ``backbones.cross_modality_init``), after
the weights are loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ccs_fast.backbones import Backbone, cross_modality_init, first_conv, load_pretrained, split_after, two_streams
from ccs_fast.base.errors import CCSError, bad_file

TORCHVISION_VIDEO_MODELS = ("r3d_18", "r2plus1d_18", "s3d")
I3D_PREFIX = "i3d_"
_EXAMPLES = "i3d_resnet18, i3d_resnet50, r3d_18, r2plus1d_18, s3d"
S3D_STAGE_CHANNELS = (64, 192, 480, 832, 1024)  # torchvision s3d: features cut after each max-pool


def is_video_backbone(name: str) -> bool:
    """Whether ``model.backbone`` names a 3-D base model of this module (not a 2-D one)."""
    return name.startswith(I3D_PREFIX) or name in TORCHVISION_VIDEO_MODELS


class VideoBackbone(Backbone):
    """3-D backbone: clips (N, C_in, T, H, W) → maps (N, C, T', h, w); N = B·N_clips. A
    connection block attends within each clip over its T'·h·w positions."""

    grid = ("T", "H", "W")
    input_name = "a clip"
    frame_axis = "N·T"

    @staticmethod
    def flow_input_channels(flow_length: int) -> int:
        """One (x, y) flow pair per frame, whatever ``flow_length``."""
        return 2

    @staticmethod
    def from_frames(frames: torch.Tensor, clip_len: int) -> tuple[torch.Tensor, int]:
        """(B, N·T, C, H, W) frames → ((B·N, C, T, H, W) clips of ``clip_len`` = T, N)."""
        frame_count = frames.shape[1]
        if frame_count % clip_len:
            raise ValueError(f"{frame_count} frames per video are not whole clips of model.clip_len={clip_len}")
        return frames_to_clips(frames, clip_len), frame_count // clip_len

    @staticmethod
    def to_tokens(maps: torch.Tensor, batch: int = 0) -> torch.Tensor:
        """(N, C, T, h, w) → (N, T·h·w, C), position index t·h·w + i·w + j; ``batch`` is not
        used (each clip is its own token set)."""
        if maps.dim() != 5:
            raise ValueError(f"expected (B, C, T, h, w) features, got {tuple(maps.shape)}")
        return maps.flatten(2).transpose(1, 2)

    @staticmethod
    def from_tokens(tokens: torch.Tensor, shape) -> torch.Tensor:
        """(N, T·h·w, C) → (N, C, T, h, w) of ``shape`` (the inverse of ``to_tokens``)."""
        B, C, T, h, w = shape
        return tokens.transpose(1, 2).reshape(B, C, T, h, w)

    def _stage_channels(self) -> list[int]:
        """Output channels of each stage, read from the modules (a probe forward pass of a 3-D
        network costs about a second on CPU): the last BatchNorm3d of a ResNet stage, S3D's known
        stage widths (torchvision's architecture; checked by a forward pass in the tests)."""
        if self.name == "s3d":
            return list(S3D_STAGE_CHANNELS)
        return [[m for m in stage.modules() if isinstance(m, nn.BatchNorm3d)][-1].num_features for stage in self.stages]


def build_video_backbone(name: str, in_chans: int = 3, pretrained: Optional[str] = None, *,
                         conv1_temporal_kernel: int = 5, conv1_temporal_stride: int = 2,
                         pool1_temporal_stride: int = 1, block_temporal_kernel: int = 3) -> VideoBackbone:
    """Build 3-D backbone ``name`` with ``in_chans`` inputs (cross-modality init when ≠ 3).

    The keyword arguments shape the I3D inflation and are ignored by torchvision's video models."""
    if pretrained is not None and not Path(pretrained).is_file():
        raise bad_file(pretrained, "pretrained weights file not found")
    if name.startswith(I3D_PREFIX):
        model2d = _create_resnet2d(name[len(I3D_PREFIX):])
        if pretrained is not None:
            load_pretrained(model2d, pretrained, ("fc",))
        model = inflate_resnet(model2d, conv1_temporal_kernel=conv1_temporal_kernel,
                               conv1_temporal_stride=conv1_temporal_stride,
                               pool1_temporal_stride=pool1_temporal_stride,
                               block_temporal_kernel=block_temporal_kernel)
        stages = [nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1),
                  model.layer2, model.layer3, model.layer4]
    elif name in TORCHVISION_VIDEO_MODELS:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        if pretrained is not None:
            load_pretrained(model, pretrained, ("classifier",) if name == "s3d" else ("fc",))
        stages = split_after(model.features, nn.MaxPool3d) if name == "s3d" else [
            nn.Sequential(model.stem, model.layer1), model.layer2, model.layer3, model.layer4]
    else:
        raise CCSError(f"model.backbone: unknown 3-D backbone {name!r} (examples: {_EXAMPLES})")
    if in_chans != 3:
        cross_modality_init(first_conv(nn.ModuleList(stages), 3), in_chans)
    return VideoBackbone(name, stages, in_chans)


def build_two_stream_video_backbones(name: str, flow_chans: int = 2, pretrained: Optional[str] = None,
                                     **inflation) -> tuple[VideoBackbone, VideoBackbone]:
    """The RGB and the flow (``flow_chans`` inputs per time step) 3-D backbones of one
    architecture (``backbones.two_streams``)."""
    return two_streams(build_video_backbone, name, flow_chans, pretrained, **inflation)


def inflate_conv(conv: nn.Conv2d, temporal_kernel: int = 1, temporal_stride: int = 1) -> nn.Conv3d:
    """I3D inflation of one convolution: kernel (k_t, k_h, k_w), weight repeated over time and
    divided by k_t, temporal padding k_t // 2, bias copied."""
    conv3d = nn.Conv3d(conv.in_channels, conv.out_channels, (temporal_kernel, *conv.kernel_size),
                       stride=(temporal_stride, *conv.stride), padding=(temporal_kernel // 2, *conv.padding),
                       dilation=(1, *conv.dilation), groups=conv.groups, bias=conv.bias is not None,
                       device="meta")
    # built on the meta device and then given storage: its random initialisation would be overwritten
    conv3d = conv3d.to_empty(device=conv.weight.device).to(conv.weight.dtype)
    with torch.no_grad():
        weight = conv.weight.unsqueeze(2).repeat(1, 1, temporal_kernel, 1, 1) / temporal_kernel
        conv3d.weight.copy_(weight)
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias)
    return conv3d


def inflate_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    """BatchNorm2d → BatchNorm3d with the same affine parameters and running statistics."""
    bn3d = nn.BatchNorm3d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats)
    bn3d.load_state_dict(bn.state_dict())
    return bn3d


def inflate_resnet(model: nn.Module, *, conv1_temporal_kernel: int = 5, conv1_temporal_stride: int = 2,
                   pool1_temporal_stride: int = 1, block_temporal_kernel: int = 3) -> nn.Module:
    """Turn a torchvision ResNet into its I3D inflation in place (see the module docstring) and
    return it. torchvision's blocks call their convolutions by name, so they run on 5-D input
    unchanged once their modules are 3-D."""
    import torchvision

    if not isinstance(model, torchvision.models.ResNet):
        raise TypeError(f"inflate_resnet needs a torchvision ResNet, got {type(model).__name__}")
    model.conv1 = inflate_conv(model.conv1, conv1_temporal_kernel, conv1_temporal_stride)
    model.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(pool1_temporal_stride, 2, 2), padding=(0, 1, 1))
    for layer_index, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
        for block_index, block in enumerate(layer):
            if _inflates(layer_index, block_index):
                block.conv1 = inflate_conv(block.conv1, block_temporal_kernel)
    _convert_remaining_2d(model)
    model.avgpool = nn.AdaptiveAvgPool3d(1)
    return model


def _inflates(layer_index: int, block_index: int) -> bool:
    """MMAction2 i3d_r50's pattern: all of layer1, even blocks of layers 2–3, odd of layer4."""
    if layer_index == 1:
        return True
    if layer_index in (2, 3):
        return block_index % 2 == 0
    return block_index % 2 == 1


def _convert_remaining_2d(module: nn.Module) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, child_name, inflate_conv(child, 1))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(module, child_name, inflate_batchnorm(child))
        else:
            _convert_remaining_2d(child)


def frames_to_clips(x: torch.Tensor, clip_len: int) -> torch.Tensor:
    """(B, N·T, C, H, W) frames -> (B·N, C, T, H, W) clips; no copy when each frame is
    channels_last (the loaders' layout), which makes the clips channels_last_3d."""
    B, P, C, H, W = x.shape
    return x.view(B, P // clip_len, clip_len, C, H, W).permute(0, 1, 3, 2, 4, 5).flatten(0, 1)


def _create_resnet2d(name: str) -> nn.Module:
    import torchvision

    if not name.startswith("resnet") or name not in torchvision.models.list_models(module=torchvision.models):
        raise CCSError(f"model.backbone: I3D inflates torchvision ResNets (i3d_resnet18, i3d_resnet50, …), got {I3D_PREFIX}{name!r}")
    return torchvision.models.get_model(name, weights=None)
