"""Backbones split into sequential stages, so a connection block can sit after any stage.

``build_backbone(name, in_chans=3, pretrained=None) -> StagedBackbone``;
``build_two_stream_backbones(name, flow_chans, pretrained=None) -> (rgb, flow)``.

``Backbone`` is what the 2-D ``StagedBackbone`` (here) and the 3-D ``VideoBackbone``
(``video_backbones``) share: the stages, their ``channels``, ``in_chans``, the first
convolution, the rank of the maps. Each kind answers the CCS model's questions about its
layout (flow channels per input, frames to inputs, maps to the connection block's tokens), so
the model itself never asks which kind it holds.

- torchvision ResNets (``resnet18/34/50/101/152``, ``resnext*``, ``wide_resnet*``): stage 1 is
  the stem (conv1, bn1, relu, maxpool) followed by layer1; stages 2–4 are layer2–layer4.
- torchvision VGGs (``vgg16_bn``, ``vgg16``, …): ``features`` split after each max-pool, five
  stages. The fully connected fc6/fc7 belong to the classifier and are not part of the backbone.
- ``timm:<name>`` when timm is installed: the stages that the model's own ``feature_info``
  names (the modules whose features have stride ≥ 4: ``layer1..layer4``, ``stages.i``,
  ``s1..s4``, or the ``blocks.i`` that end a stride), with everything before the first folded
  into stage 1 and the non-head modules after the last (e.g. a final 1×1 conv) folded into the
  last stage. The split is checked against the model's ``forward_features`` on a probe input;
  a model whose features are not laid out along its children (or whose check fails) becomes a
  single stage running ``forward_features``, so a connection block can only follow its last
  stage.

No classifier and no pooling: ``forward(x)`` returns the last stage's (N, C, h, w) map. The
connection block sees a video's K segments at once: ``to_tokens`` turns (B·K, C, h, w) into
(B, K·h·w, C) (segment-major, then row-major positions; a view for channels_last maps) and
``from_tokens`` turns it back.

Weights are never downloaded (torchvision ``weights=None``, timm ``pretrained=False``).
``pretrained`` is a local state-dict file (``torch.save`` or ``.safetensors``) of the RGB
architecture, loaded with strict key and shape checking except for the classifier.

Flow stream (TSN cross-modality initialisation, ``cross_modality_weight``, 2-D and 3-D alike):
the backbone is built with 3 input channels, weights loaded, then the first convolution is
given ``in_chans`` channels whose weight is the mean of its RGB weight over the 3 input
channels, repeated ``in_chans`` times. Built from the same file, the flow conv1 is therefore
the RGB conv1's mean; ``two_streams`` makes that hold without a file too.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ccs_fast.base.errors import CCSError, bad_file

_TORCHVISION_PREFIXES = ("resnet", "resnext", "wide_resnet", "vgg")
_TIMM_HEAD_MODULES = ("global_pool", "head_drop", "fc_norm", "head", "fc", "classifier")
_PROBE_SIZE = 64  # spatial size of the probe input used to read channels and check timm splits
_EXAMPLES = "resnet18, resnet50, resnet101, vgg16_bn, timm:resnet50, timm:convnext_tiny"


class _ForwardFeatures(nn.Module):
    """A timm model's whole ``forward_features`` as one stage (no stage structure to split)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


class Backbone(nn.Module):
    """A feature extractor as ``stages`` (an ``nn.ModuleList`` run one after another) on maps
    (N, C, *grid): the part the 2-D (``StagedBackbone``) and the 3-D
    (``video_backbones.VideoBackbone``) backbones share.

    Attributes: ``name``, ``in_chans``, ``channels`` (output channels of each stage),
    ``splittable`` (False when the whole network is one stage for lack of structure).
    A subclass names its layout (``grid``: the axes after the channels, ``(H, W)`` or
    ``(T, H, W)``; ``input_name``; ``frame_axis``) and says what the CCS model asks of it:
    ``flow_input_channels``, ``from_frames`` (the model's frames to its inputs),
    ``to_tokens``/``from_tokens`` (its maps to the connection block's tokens and back) and
    ``_stage_channels``.
    """

    grid: tuple[str, ...] = ()
    input_name = ""  # what one input is, for error messages
    frame_axis = ""  # how the model's input names its frame axis, for error messages

    def __init__(self, name: str, stages: list[nn.Module], in_chans: int, splittable: bool = True):
        super().__init__()
        self.name = name
        self.in_chans = in_chans
        self.splittable = splittable
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(self._stage_channels())

    @property
    def dims(self) -> int:
        """2 for image maps (N, C, h, w), 3 for clip maps (N, C, t, h, w)."""
        return len(self.grid)

    @property
    def video(self) -> bool:
        return self.dims == 3

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last of the maps' rank: the layout the loaders' frames give for free."""
        return torch.channels_last_3d if self.video else torch.channels_last

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    @property
    def first_conv(self) -> nn.Module:
        return first_conv(self, self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 + self.dims or x.shape[1] != self.in_chans:
            raise ValueError(f"{self.name}: expected {self.input_name} (N, {self.in_chans}, {', '.join(self.grid)}), "
                             f"got {tuple(x.shape)}")
        for stage in self.stages:
            x = stage(x)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in_chans={self.in_chans}, channels={self.channels}"

    def _stage_channels(self) -> list[int]:
        raise NotImplementedError


class StagedBackbone(Backbone):
    """2-D backbone: images (N, C_in, H, W) → maps (N, C, h, w); N = B·K, the K segments of
    B videos. A connection block attends over a video's K·h·w positions."""

    grid = ("H", "W")
    input_name = "images"
    frame_axis = "K"

    @staticmethod
    def flow_input_channels(flow_length: int) -> int:
        """TSN: a segment's flow is a stack of ``flow_length`` (x, y) pairs."""
        return 2 * flow_length

    @staticmethod
    def from_frames(frames: torch.Tensor, clip_len: int) -> tuple[torch.Tensor, int]:
        """(B, K, C, H, W) segments → ((B·K, C, H, W) inputs, K); ``clip_len`` is not used."""
        return frames.flatten(0, 1), frames.shape[1]

    @staticmethod
    def to_tokens(maps: torch.Tensor, batch: int) -> torch.Tensor:
        """(B·K, C, h, w) -> (B, K·h·w, C) for ``batch`` = B; a view (no copy) when ``maps``
        is channels_last."""
        return maps.permute(0, 2, 3, 1).reshape(batch, -1, maps.shape[1])

    @staticmethod
    def from_tokens(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B, K·h·w, C) -> (B·K, C, h, w) of ``shape``, with channels_last strides."""
        n, c, h, w = shape
        return tokens.reshape(n, h, w, c).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _stage_channels(self) -> list[int]:
        """Output channels of each stage, read from one small eval-mode forward pass."""
        was_training = self.training
        self.eval()
        try:
            x = torch.zeros(1, self.in_chans, _PROBE_SIZE, _PROBE_SIZE)
            channels = []
            for stage in self.stages:
                x = stage(x)
                if x.dim() != 4:
                    raise CCSError(
                        f"model.backbone: {self.name} gives {x.dim()}-d features; ccs_fast needs (N, C, h, w) feature maps"
                    )
                channels.append(x.shape[1])
            return channels
        except CCSError:
            raise
        except Exception as exc:
            raise CCSError(f"model.backbone: {self.name} does not run on a {_PROBE_SIZE}x{_PROBE_SIZE} probe input ({exc})") from None
        finally:
            self.train(was_training)


def build_backbone(name: str, in_chans: int = 3, pretrained: Optional[str] = None) -> StagedBackbone:
    """Build backbone ``name`` with ``in_chans`` input channels (cross-modality init when ≠ 3)."""
    if pretrained is not None and not Path(pretrained).is_file():
        raise bad_file(pretrained, "pretrained weights file not found")
    if name.startswith("timm:"):
        model, classifier = _create_timm(name[len("timm:"):])
    elif name.startswith(_TORCHVISION_PREFIXES):
        model, classifier = _create_torchvision(name)
    else:
        raise CCSError(f"model.backbone: unknown backbone {name!r} (examples: {_EXAMPLES})")
    if pretrained is not None:
        load_pretrained(model, pretrained, classifier)
    if in_chans != 3:
        cross_modality_init(first_conv(model), in_chans)
    stages, splittable = _split_stages(name, model)
    return StagedBackbone(name, stages, in_chans, splittable)


def build_two_stream_backbones(
    name: str, flow_chans: int, pretrained: Optional[str] = None
) -> tuple[StagedBackbone, StagedBackbone]:
    """The RGB backbone and the flow backbone (``flow_chans`` inputs) of one architecture
    (``two_streams``)."""
    return two_streams(build_backbone, name, flow_chans, pretrained)


def two_streams(build, name: str, flow_chans: int, pretrained: Optional[str], **options):
    """``build(name, in_chans, pretrained, **options)`` for the RGB stream (3 inputs) and the
    flow stream (``flow_chans``). Both load ``pretrained`` when given. Without it the streams
    are initialised independently, except that the flow stream's first convolution is still
    the cross-modality weight of the RGB stream's."""
    rgb = build(name, 3, pretrained, **options)
    flow = build(name, flow_chans, pretrained, **options)
    if pretrained is None:
        with torch.no_grad():
            flow.first_conv.weight.copy_(cross_modality_weight(rgb.first_conv.weight, flow_chans))
    return rgb, flow


def cross_modality_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """TSN's cross-modality initialisation of a convolution weight (C_out, 3, *kernel) of any
    rank: the mean over the RGB input channels, repeated for ``in_chans`` inputs."""
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_chans, *[1] * (weight.dim() - 2))


def cross_modality_init(conv: nn.Module, in_chans: int) -> None:
    """Give ``conv`` (an ``nn.Conv2d`` or ``nn.Conv3d``) ``in_chans`` inputs with
    ``cross_modality_weight`` of its RGB weight."""
    conv.weight = nn.Parameter(cross_modality_weight(conv.weight.detach(), in_chans).contiguous())
    conv.in_channels = in_chans


def load_pretrained(model: nn.Module, path: str, classifier: tuple[str, ...] = ()) -> None:
    """Load a local state dict into ``model``: every key and shape must match, except the
    classifier's (``classifier`` names its module prefixes), which are ignored."""
    file = Path(path)
    if not file.is_file():
        raise bad_file(path, "pretrained weights file not found")
    state = _read_state_dict(file)

    def is_classifier(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in classifier)

    own = {k: v for k, v in model.state_dict().items() if not is_classifier(k)}
    given = {k: v for k, v in state.items() if not is_classifier(k)}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise bad_file(path, f"weights do not fit this backbone: {'; '.join(parts)}")
    for key, value in given.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise bad_file(
                path, f"weights do not fit this backbone: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(given, strict=False)


def _read_state_dict(file: Path) -> dict:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to fix
        raise bad_file(file, f"not a readable state dict ({type(exc).__name__})") from None
    # Training checkpoints often wrap the weights; DataParallel/DDP prefix them with "module.".
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise bad_file(file, "not a state dict (expected a mapping of parameter names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _create_torchvision(name: str) -> tuple[nn.Module, tuple[str, ...]]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise CCSError(f"model.backbone: unknown torchvision backbone {name!r} (examples: {_EXAMPLES})")
    model = torchvision.models.get_model(name, weights=None)
    classifier = ("fc",) if isinstance(model, torchvision.models.ResNet) else ("classifier",)
    return model, classifier


def _create_timm(name: str) -> tuple[nn.Module, tuple[str, ...]]:
    if importlib.util.find_spec("timm") is None:
        raise CCSError(f"model.backbone: timm:{name} needs the timm package (pip install timm)")
    import timm

    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:
        raise CCSError(f"model.backbone: timm has no model {name!r} ({exc})") from None
    classifier = model.pretrained_cfg.get("classifier") or "fc"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return model, classifier


def first_conv(model: nn.Module, dims: int = 2) -> nn.Module:
    """The first ``nn.Conv2d`` (``dims`` 2) or ``nn.Conv3d`` (3) of ``model``: the one that
    reads the input, so the one the flow stream adapts."""
    kind = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    for module in model.modules():
        if isinstance(module, kind):
            return module
    raise CCSError(f"model.backbone: {type(model).__name__} has no {dims}-D convolution to adapt to the flow input")


def split_after(layers, kind) -> list[nn.Module]:
    """``layers`` cut into stages, each ending after a layer of type ``kind`` (a pooling
    layer: VGG's and S3D's stage boundaries); what follows the last one is a stage too."""
    stages, current = [], []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, kind):
            stages.append(nn.Sequential(*current))
            current = []
    if current:
        stages.append(nn.Sequential(*current))
    return stages


def _split_stages(name: str, model: nn.Module) -> tuple[list[nn.Module], bool]:
    import torchvision

    if isinstance(model, torchvision.models.ResNet):
        stem = [model.conv1, model.bn1, model.relu, model.maxpool]
        return [nn.Sequential(*stem, model.layer1), model.layer2, model.layer3, model.layer4], True
    if isinstance(model, torchvision.models.VGG):
        return split_after(model.features, nn.MaxPool2d), True
    return _split_timm(name, model)


def _split_timm(name: str, model: nn.Module) -> tuple[list[nn.Module], bool]:
    model.reset_classifier(0)
    stages = _timm_feature_stages(model)
    if stages is not None and _matches_forward_features(model, stages):
        return stages, True
    # No usable stage structure: the whole feature extractor is one stage.
    return [_ForwardFeatures(model)], False


def _timm_feature_stages(model: nn.Module) -> Optional[list[nn.Module]]:
    """Stages ending at the modules that timm's ``feature_info`` names (stride ≥ 4; features of
    the stem fold into stage 1), built from the model's children in order, one container level
    deep (``blocks.4``, ``stages.2``); the non-head modules after the last feature fold into the
    last stage. None when the features are not laid out that way."""
    info = [f["module"] for f in getattr(model, "feature_info", []) if f.get("reduction", 0) >= 4]
    containers = {m.split(".")[0] for m in info if "." in m}
    if len(info) < 2 or len(containers) > 1 or any(m.count(".") > 1 for m in info):
        return None
    flat = []
    for child_name, child in model.named_children():
        if child_name in containers:
            flat += [(f"{child_name}.{n}", m) for n, m in child.named_children()]
        elif child_name not in _TIMM_HEAD_MODULES:
            flat.append((child_name, child))
    names = [n for n, _ in flat]
    if any(m not in names for m in info):
        return None
    cuts = [names.index(m) + 1 for m in info]
    if cuts != sorted(set(cuts)):
        return None
    cuts[-1] = len(flat)
    starts = [0] + cuts[:-1]
    return [nn.Sequential(*[m for _, m in flat[a:b]]) for a, b in zip(starts, cuts)]


@torch.no_grad()
def _matches_forward_features(model: nn.Module, stages: list[nn.Module]) -> bool:
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(1, first_conv(model).in_channels, _PROBE_SIZE, _PROBE_SIZE)
        expected = model.forward_features(x)
        y = x
        for stage in stages:
            y = stage(y)
        return y.shape == expected.shape and torch.allclose(y, expected, atol=1e-5, rtol=1e-4)
    except Exception:
        return False
    finally:
        model.train(was_training)
