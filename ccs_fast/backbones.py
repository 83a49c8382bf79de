"""Backbones split into sequential stages, so a connection block can sit after any stage.

``build_backbone(name, in_chans=3, pretrained=None) -> StagedBackbone``;
``build_two_stream_backbones(name, flow_chans, pretrained=None) -> (rgb, flow)``.

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

No classifier and no pooling: ``forward(x)`` returns the last stage's (N, C, h, w) map.

Weights are never downloaded (torchvision ``weights=None``, timm ``pretrained=False``).
``pretrained`` is a local state-dict file (``torch.save`` or ``.safetensors``) of the RGB
architecture, loaded with strict key and shape checking except for the classifier.

Flow stream (TSN cross-modality initialisation): the backbone is built with 3 input channels,
weights loaded, then the first convolution is given ``in_chans`` channels whose weight is the
mean of its RGB weight over the 3 input channels, repeated ``in_chans`` times. Built from the
same file, the flow conv1 is therefore the RGB conv1's mean; ``build_two_stream_backbones``
makes that hold without a file too.
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


class StagedBackbone(nn.Module):
    """A feature extractor as ``stages`` (an ``nn.ModuleList`` run one after another).

    Attributes: ``name``, ``in_chans``, ``channels`` (output channels of each stage),
    ``splittable`` (False when the whole network is one stage for lack of structure).
    """

    def __init__(self, name: str, stages: list[nn.Module], in_chans: int, splittable: bool = True):
        super().__init__()
        self.name = name
        self.in_chans = in_chans
        self.splittable = splittable
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(_probe_channels(self))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def first_conv(self) -> nn.Conv2d:
        return _first_conv(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in_chans={self.in_chans}, channels={self.channels}"


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
        cross_modality_init(_first_conv(model), in_chans)
    stages, splittable = _split_stages(name, model)
    return StagedBackbone(name, stages, in_chans, splittable)


def build_two_stream_backbones(
    name: str, flow_chans: int, pretrained: Optional[str] = None
) -> tuple[StagedBackbone, StagedBackbone]:
    """The RGB backbone and the flow backbone (``flow_chans`` inputs) of one architecture.

    Both load ``pretrained`` when given. Without it the streams are initialised independently,
    except that the flow conv1 is still the mean of the RGB stream's conv1, repeated.
    """
    rgb = build_backbone(name, in_chans=3, pretrained=pretrained)
    flow = build_backbone(name, in_chans=flow_chans, pretrained=pretrained)
    if pretrained is None:
        with torch.no_grad():
            flow.first_conv.weight.copy_(rgb.first_conv.weight.mean(dim=1, keepdim=True).expand_as(flow.first_conv.weight))
    return rgb, flow


def cross_modality_init(conv: nn.Conv2d, in_chans: int) -> None:
    """TSN: give ``conv`` ``in_chans`` inputs, each weighted by the mean of its RGB weights."""
    weight = conv.weight.detach().mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1)
    conv.weight = nn.Parameter(weight.contiguous())
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


def _first_conv(model: nn.Module) -> nn.Conv2d:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise CCSError(f"model.backbone: {type(model).__name__} has no convolution to adapt to the flow input")


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
        x = torch.randn(1, _first_conv(model).in_channels, _PROBE_SIZE, _PROBE_SIZE)
        expected = model.forward_features(x)
        y = x
        for stage in stages:
            y = stage(y)
        return y.shape == expected.shape and torch.allclose(y, expected, atol=1e-5, rtol=1e-4)
    except Exception:
        return False
    finally:
        model.train(was_training)


@torch.no_grad()
def _probe_channels(backbone: StagedBackbone) -> list[int]:
    """Output channels of each stage, read from one small eval-mode forward pass."""
    was_training = backbone.training
    backbone.eval()
    try:
        x = torch.zeros(1, backbone.in_chans, _PROBE_SIZE, _PROBE_SIZE)
        channels = []
        for stage in backbone.stages:
            x = stage(x)
            if x.dim() != 4:
                raise CCSError(
                    f"model.backbone: {backbone.name} gives {x.dim()}-d features; ccs_fast needs (N, C, h, w) feature maps"
                )
            channels.append(x.shape[1])
        return channels
    except CCSError:
        raise
    except Exception as exc:
        raise CCSError(f"model.backbone: {backbone.name} does not run on a {_PROBE_SIZE}x{_PROBE_SIZE} probe input ({exc})") from None
    finally:
        backbone.train(was_training)
