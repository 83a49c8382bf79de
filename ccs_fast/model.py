"""The two-stream CCS network (SPEC §2, paper Fig. 2 and Table 3).

``build_model(cfg: ModelConfig) -> CCSModel``;
``CCSModel.forward(rgb, flow) -> {"logits_f", "logits_o", "z_f", "z_o"}`` with rgb
(B, K, 3, H, W) and flow (B, K, 2L, H, W). The output keys keep the paper's (and SPEC §2's)
suffixes: ``_f`` is the appearance (RGB) stream, ``_o`` the motion (optical-flow) stream;
inside the model the streams are named ``rgb`` and ``flow``.

Per stream the backbone stages run on the B·K segments; after each stage in ``cb_stages``
(variants ``cb`` and ``all``) both streams' maps (B·K, C, h, w) become (B, K·h·w, C) — a free
permute and view for channels_last tensors — and pass through one ``CrossStreamAttention``.
The backbone says how (``Backbone.from_frames``, ``to_tokens``, ``from_tokens``,
``flow_input_channels``): the model runs 2-D and 3-D backbones alike.
Then per stream: global average pooling over h·w, segment consensus over K (paper Fig. 5a),
and the head:

- ``baseline`` / ``cb``: dropout, then one linear classifier per stream; z = the video feature.
- ``cs`` / ``all``: the shared block — projection P = Linear + BatchNorm1d and one classifier
  (after dropout), both shared by the streams and applied to the two streams stacked along the
  batch, so BatchNorm sees (and its running statistics mix) both modalities; z = P(feature).

3-D base models (``model.backbone`` an I3D inflation or a torchvision video model,
``video_backbones``): the batch carries N clips of T = ``clip_len`` frames on the segment
axis, rgb (B, N·T, 3, H, W) and flow (B, N·T, 2, H, W) (one flow pair per frame, channel 0
horizontal), viewed as B·N clips (C, T, H, W) — free for the loaders' channels_last frames,
which give channels_last_3d clips. A connection block then attends within each clip over its
T'·h·w positions, (B·N, T'·h·w, C) tokens (e.g. 8·7·7 = 392 for 16 frames at 224²); pooling is
over (T', h, w), and the consensus runs over the N clips as over segments.

``consensus: trn``: one ``TemporalRelationConsensus`` per stream (TRN's multi-scale relation
MLPs over the K segment features, ``trn.py``) gives a ``TRN_FEATURES``-dimensional video
feature that the heads above classify (the shared block projects it). Test clips with more
segments than ``num_segments`` are averaged into ``num_segments`` sections first
(``trn.pool_to_segments``), as below.

Consensus with a test clip of K segments when training used K_train = ``num_segments``:
``avg`` and ``max`` reduce any K. ``concat`` and ``mul`` depend on the number of segments, so
the K segments are first averaged within K_train equal temporal sections (segment i goes to
section ⌊i·K_train/K⌋; with K = K_train nothing changes), which keeps the training layout
(slot k = the k-th part of the video) and scale; K < K_train is an error.
"""
from __future__ import annotations



import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ccs_fast.backbones import Backbone, build_two_stream_backbones
from ccs_fast.config import CONSENSUS, Config, ModelConfig
from ccs_fast.connection import CrossStreamAttention
from ccs_fast.base.errors import CCSError
from ccs_fast.trn import TemporalRelationConsensus
from ccs_fast.video_backbones import build_two_stream_video_backbones

TRN_FEATURES = 256  # video feature of the TRN consensus: TRN's bottleneck width

class SegmentConsensus(nn.Module):
    """(B, K, C) segment features -> (B, C) video feature (``concat``: (B, K_train·C))."""

    def __init__(self, mode: str, num_segments: int):
        super().__init__()
        if mode not in CONSENSUS or mode == "trn":
            raise ValueError(f"consensus must be one of {', '.join(CONSENSUS)}, got {mode!r}")
        self.mode, self.num_segments = mode, num_segments

    def out_features(self, channels: int) -> int:
        return channels * self.num_segments if self.mode == "concat" else channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return x.mean(dim=1)
        if self.mode == "max":
            return x.amax(dim=1)
        x = self._to_training_segments(x)
        if self.mode == "mul":
            return x.prod(dim=1)
        return x.flatten(1)

    def _to_training_segments(self, x: torch.Tensor) -> torch.Tensor:
        B, K, C = x.shape
        if K == self.num_segments:
            return x
        if K < self.num_segments:
            raise CCSError(
                f"consensus {self.mode!r} needs at least model.num_segments={self.num_segments} segments per clip, got {K}"
            )
        # Average segment i into section floor(i * K_train / K): a (K_train, K) averaging matrix.
        section = torch.arange(K, device=x.device) * self.num_segments // K
        weights = nn.functional.one_hot(section, self.num_segments).to(x.dtype).t()
        weights = weights / weights.sum(dim=1, keepdim=True)
        return torch.einsum("sk,bkc->bsc", weights, x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_segments={self.num_segments}"


class CCSModel(nn.Module):
    """Two backbones, connection blocks after ``cb_stages``, consensus and the heads."""

    def __init__(self, cfg: ModelConfig, rgb_backbone: Backbone, flow_backbone: Backbone):
        super().__init__()
        self.variant = cfg.variant
        self.num_classes = cfg.num_classes
        self.clip_len = cfg.clip_len  # frames per clip of a 3-D backbone (a 2-D one ignores it)
        self.flow_channels = rgb_backbone.flow_input_channels(cfg.flow_length)
        self.partial_bn = cfg.partial_bn
        if rgb_backbone.in_chans != 3 or flow_backbone.in_chans != self.flow_channels:
            raise ValueError(
                f"backbones take {rgb_backbone.in_chans} and {flow_backbone.in_chans} channels; "
                f"expected 3 (RGB) and {self.flow_channels} (flow, 2 * flow_length)"
            )
        self.backbone_rgb = rgb_backbone
        self.backbone_flow = flow_backbone
        self.num_stages = rgb_backbone.num_stages
        self.cb_stages = tuple(_resolve_stages(cfg, rgb_backbone)) if self.uses_connection else ()
        self.connections = nn.ModuleDict(
            {
                str(stage): CrossStreamAttention(
                    rgb_backbone.channels[stage - 1],
                    reduction=cfg.cb_reduction,
                    heads=cfg.cb_heads,
                    scale=cfg.cb_scale,
                    impl=cfg.impl,
                    gamma_init=cfg.cb_gamma_init,
                )
                for stage in self.cb_stages
            }
        )

        channels = rgb_backbone.channels[-1]
        self.consensus_mode = cfg.consensus
        if cfg.consensus == "trn":
            self.consensus_rgb, self.consensus_flow = (
                TemporalRelationConsensus(cfg.num_segments, channels, TRN_FEATURES) for _ in range(2))
            self.feature_dim = TRN_FEATURES
        else:
            self.consensus = SegmentConsensus(cfg.consensus, cfg.num_segments)
            self.feature_dim = self.consensus.out_features(channels)
        self.dropout = nn.Dropout(cfg.dropout)
        if self.uses_shared_block:
            self.embed_dim = cfg.embed_dim
            self.projection = nn.Sequential(nn.Linear(self.feature_dim, cfg.embed_dim), nn.BatchNorm1d(cfg.embed_dim))
            self.classifier = nn.Linear(cfg.embed_dim, cfg.num_classes)
            classifiers = [self.classifier]
        else:
            self.embed_dim = self.feature_dim
            self.classifier_rgb = nn.Linear(self.feature_dim, cfg.num_classes)
            self.classifier_flow = nn.Linear(self.feature_dim, cfg.num_classes)
            classifiers = [self.classifier_rgb, self.classifier_flow]
        for fc in classifiers:  # TSN: new classifiers start small around zero
            nn.init.normal_(fc.weight, std=0.001)
            nn.init.zeros_(fc.bias)

    @property
    def video(self) -> bool:
        """Whether the backbones are 3-D (inputs are clips of ``clip_len`` frames)."""
        return self.backbone_rgb.video

    @property
    def uses_connection(self) -> bool:
        return self.variant in ("cb", "all")

    @property
    def uses_shared_block(self) -> bool:
        """True for ``cs`` and ``all``: the ranking losses L1 and L2 apply to z_f, z_o."""
        return self.variant in ("cs", "all")

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> dict[str, torch.Tensor]:
        x_rgb, x_flow, B, K = self.feature_maps(rgb, flow)
        return self.head_from_maps(x_rgb, x_flow, B, K)

    def feature_maps(self, rgb: torch.Tensor, flow: torch.Tensor):
        """(last stage's RGB maps, flow maps, B, K): maps (B·K, C, h, w), or (B·K, C, T', h, w)
        for a 3-D model with K clips; connection blocks applied."""
        what = self.backbone_rgb.frame_axis
        if rgb.dim() != 5 or flow.dim() != 5 or rgb.shape[:2] != flow.shape[:2] or rgb.shape[2] != 3 \
                or flow.shape[2] != self.flow_channels:
            raise ValueError(
                f"expected rgb (B, {what}, 3, H, W) and flow (B, {what}, {self.flow_channels}, H, W), "
                f"got {tuple(rgb.shape)} and {tuple(flow.shape)}"
            )
        B = rgb.shape[0]
        x_rgb, K = self.backbone_rgb.from_frames(rgb, self.clip_len)
        x_flow, _ = self.backbone_flow.from_frames(flow, self.clip_len)
        for index in range(self.num_stages):
            x_rgb = self.backbone_rgb.stages[index](x_rgb)
            x_flow = self.backbone_flow.stages[index](x_flow)
            if str(index + 1) in self.connections:
                x_rgb, x_flow = self._connect(self.connections[str(index + 1)], x_rgb, x_flow, B)
        return x_rgb, x_flow, B, K

    def _connect(self, block: CrossStreamAttention, x_rgb: torch.Tensor, x_flow: torch.Tensor, B: int):
        """Run a connection block on both streams' maps as the backbone groups them into tokens
        (a 2-D video's K·h·w positions, a 3-D clip's T'·h·w)."""
        to_tokens, from_tokens = self.backbone_rgb.to_tokens, self.backbone_rgb.from_tokens
        y_rgb, y_flow = block(to_tokens(x_rgb, B), to_tokens(x_flow, B))
        return from_tokens(y_rgb, x_rgb.shape), from_tokens(y_flow, x_flow.shape)

    def head_from_maps(self, x_rgb: torch.Tensor, x_flow: torch.Tensor, B: int, K: int) -> dict[str, torch.Tensor]:
        """Pool the last maps over every position but the segment (clip), consensus, heads."""
        v_rgb = self.segment_consensus("rgb", x_rgb.flatten(2).mean(dim=2).view(B, K, -1))
        v_flow = self.segment_consensus("flow", x_flow.flatten(2).mean(dim=2).view(B, K, -1))
        return self._head(v_rgb, v_flow)

    def segment_consensus(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """(B, K, C) segment features of ``stream`` -> its video feature."""
        if self.consensus_mode == "trn":
            return (self.consensus_rgb if stream == "rgb" else self.consensus_flow)(x)
        return self.consensus(x)

    def _head(self, v_rgb: torch.Tensor, v_flow: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.uses_shared_block:
            logits_f = self.classifier_rgb(self.dropout(v_rgb))
            logits_o = self.classifier_flow(self.dropout(v_flow))
            return {"logits_f": logits_f, "logits_o": logits_o, "z_f": v_rgb, "z_o": v_flow}
        B = v_rgb.shape[0]
        z = self.projection(torch.cat([v_rgb, v_flow]))
        logits = self.classifier(self.dropout(z))
        return {"logits_f": logits[:B], "logits_o": logits[B:], "z_f": z[:B], "z_o": z[B:]}

    def train(self, mode: bool = True) -> "CCSModel":
        super().train(mode)
        if mode and self.partial_bn:
            # TSN partial BN: every backbone BN but the first keeps its running statistics
            # (eval mode); γ and β still train.
            for backbone in (self.backbone_rgb, self.backbone_flow):
                for bn in [m for m in backbone.modules() if isinstance(m, _BatchNorm)][1:]:
                    bn.eval()
        return self


def _resolve_stages(cfg: ModelConfig, backbone: Backbone) -> list[int]:
    """Checked 1-based stage numbers from ``cfg.cb_stages`` (negative counts from the last)."""
    n = backbone.num_stages
    stages = []
    for stage in cfg.cb_stages:
        resolved = stage + n + 1 if stage < 0 else stage
        if not 1 <= resolved <= n:
            if not backbone.splittable:
                raise CCSError(
                    f"model.cb_stages: {backbone.name} exposes no stage structure ccs_fast can split; "
                    f"a connection block can only follow its last stage (cb_stages=[-1]), got {list(cfg.cb_stages)}"
                )
            raise CCSError(f"model.cb_stages: {backbone.name} has stages 1..{n} (or -1 for the last), got {stage}")
        if resolved not in stages:
            stages.append(resolved)
    if not stages:
        raise CCSError(f"model.cb_stages: variant {cfg.variant!r} needs at least one stage for the connection block")
    for stage in stages:
        channels = backbone.channels[stage - 1]
        if channels % cfg.cb_reduction or (channels // cfg.cb_reduction) % cfg.cb_heads:
            raise CCSError(
                f"model.cb_reduction/cb_heads: stage {stage} has {channels} channels, which do not split into "
                f"C/{cfg.cb_reduction} embedding channels over {cfg.cb_heads} heads"
            )
    return sorted(stages)


def build_model(cfg: ModelConfig, *, device=None, channels_last: bool = False, validate: bool = True) -> CCSModel:
    """Both backbones (flow: 2L input channels, or 2 per frame for a 3-D backbone; TSN
    cross-modality init) and the CCS heads,
    on ``device`` (when given) with channels_last strides (when asked). The training run,
    ``eval`` and ``predict`` all build their network here. ``cfg`` is checked by the config's
    own validation (CCSError naming the field); ``validate=False`` where it is the model
    section of a Config validated already (the training run's)."""
    if validate:
        Config(model=cfg).validate(source="model config")
    if cfg.video:
        rgb, flow = build_two_stream_video_backbones(cfg.backbone, 2, cfg.pretrained)
    else:
        rgb, flow = build_two_stream_backbones(cfg.backbone, 2 * cfg.flow_length, cfg.pretrained)
    model = CCSModel(cfg, rgb, flow)
    if device is not None:
        model = model.to(device)
    if channels_last:
        model = model.to(memory_format=rgb.memory_format)
    return model
