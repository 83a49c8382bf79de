"""CCSModel: variants, connection-block placement, consensus, shared block, partial BN, layouts.

One pair of resnet18 backbones is built per module and copied into every model; inputs are
tiny (B=2, K=2, 32×32) so the file stays quick on a shared CPU.
"""
import copy

import pytest
import torch

from ccs_fast.backbones import StagedBackbone, build_two_stream_backbones
from ccs_fast.config import ModelConfig
from ccs_fast.base.errors import CCSError
from ccs_fast.model import CCSModel, SegmentConsensus, build_model

B, K, L, S, CLASSES = 2, 2, 2, 32, 5


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return build_two_stream_backbones("resnet18", 2 * L)


def make_model(backbones, **overrides):
    fields = dict(backbone="resnet18", num_classes=CLASSES, num_segments=K, flow_length=L, embed_dim=16, dropout=0.0)
    fields.update(overrides)
    rgb, flow = backbones
    return CCSModel(ModelConfig(**fields), copy.deepcopy(rgb), copy.deepcopy(flow))


def clip(segments=K, seed=0):
    """Loader layout: stored (B, K, S, S, C), viewed as (B, K, C, S, S) (channels_last per frame)."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(B, segments, S, S, 3, generator=g).permute(0, 1, 4, 2, 3)
    flow = torch.randn(B, segments, S, S, 2 * L, generator=g).permute(0, 1, 4, 2, 3)
    return rgb, flow


@pytest.mark.parametrize("variant", ["baseline", "cb", "cs", "all"])
def test_output_shapes_per_variant(backbones, variant):
    model = make_model(backbones, variant=variant)
    out = model(*clip())
    z_dim = 16 if variant in ("cs", "all") else 512
    assert set(out) == {"logits_f", "logits_o", "z_f", "z_o"}
    assert out["logits_f"].shape == out["logits_o"].shape == (B, CLASSES)
    assert out["z_f"].shape == out["z_o"].shape == (B, z_dim)
    assert len(model.connections) == (1 if variant in ("cb", "all") else 0)
    assert model.uses_shared_block == (variant in ("cs", "all"))
    assert all(torch.isfinite(t).all() for t in out.values())


@pytest.mark.parametrize("stages, expected", [([3], (3,)), ([3, 4], (3, 4)), ([-1], (4,))])
def test_cb_stages(backbones, stages, expected):
    model = make_model(backbones, variant="cb", cb_stages=stages)
    assert model.cb_stages == expected
    assert [block.channels for block in model.connections.values()] == [model.backbone_rgb.channels[s - 1] for s in expected]
    if stages == [3, 4]:
        assert model(*clip())["logits_f"].shape == (B, CLASSES)


def test_bad_cb_settings(backbones):
    with pytest.raises(CCSError, match="stages 1..4"):
        make_model(backbones, variant="all", cb_stages=[5])
    with pytest.raises(CCSError, match="cb_reduction"):
        make_model(backbones, variant="cb", cb_reduction=3)


@pytest.mark.parametrize("mode", ["max", "concat"])
def test_more_test_segments_than_training(backbones, mode):
    model = make_model(backbones, variant="all", consensus=mode).eval()
    assert model.feature_dim == (K * 512 if mode == "concat" else 512)
    with torch.no_grad():
        out = model(*clip(segments=5))  # K_test = 5 ≠ K_train = 2
    assert out["z_f"].shape == (B, 16) and out["logits_o"].shape == (B, CLASSES)
    assert torch.isfinite(out["logits_o"]).all()


def test_consensus_maps_test_segments_to_training_sections():
    x = torch.randn(3, 6, 4)
    concat = SegmentConsensus("concat", num_segments=3)
    torch.testing.assert_close(concat(x[:, :3]), x[:, :3].flatten(1))
    sections = x.view(3, 3, 2, 4).mean(dim=2)  # segments (0,1), (2,3), (4,5)
    torch.testing.assert_close(concat(x), sections.flatten(1))
    torch.testing.assert_close(SegmentConsensus("mul", 3)(x), sections.prod(dim=1))
    torch.testing.assert_close(SegmentConsensus("avg", 3)(x), x.mean(dim=1))
    torch.testing.assert_close(SegmentConsensus("max", 3)(x), x.amax(dim=1))
    uneven = SegmentConsensus("concat", 3)(x[:, :5])  # sections {0, 1}, {2, 3}, {4}
    torch.testing.assert_close(uneven[:, 8:], x[:, 4])
    with pytest.raises(CCSError, match="num_segments=3"):
        concat(x[:, :2])


def test_connection_block_is_identity_at_init(backbones):
    torch.manual_seed(3)
    shared_only = make_model(backbones, variant="cs")
    ccs = make_model(backbones, variant="all")
    missing, unexpected = ccs.load_state_dict(shared_only.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("connections.") for key in missing)
    rgb, flow = clip()
    out_cs, out_all = shared_only(rgb, flow), ccs(rgb, flow)
    for key in out_cs:
        torch.testing.assert_close(out_all[key], out_cs[key], rtol=0, atol=1e-6)


def test_shared_block_is_one_parameter_set(backbones):
    model = make_model(backbones, variant="cs").eval()
    assert not hasattr(model, "classifier_rgb") and not hasattr(model, "classifier_flow")
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == CLASSES]
    assert heads == [model.classifier]
    with torch.no_grad():
        out = model(*clip())
        torch.testing.assert_close(out["logits_f"], model.classifier(out["z_f"]))
        torch.testing.assert_close(out["logits_o"], model.classifier(out["z_o"]))
    baseline = make_model(backbones, variant="baseline")
    assert baseline.classifier_rgb is not baseline.classifier_flow


def test_gradient_crosses_streams_through_the_connection_block(backbones):
    model = make_model(backbones, variant="cb")
    block = model.connections["4"]
    with torch.no_grad():
        block.bn_f.weight.fill_(1.0)  # at init (γ = 0) only γ learns from the cross-stream path
    model(*clip())["logits_f"].float().pow(2).sum().backward()
    assert model.backbone_flow.first_conv.weight.grad.abs().sum() > 0
    assert model.backbone_rgb.first_conv.weight.grad.abs().sum() > 0
    assert block.kappa.weight.grad.abs().sum() > 0 and block.g_o.weight.grad.abs().sum() > 0


def test_partial_bn_freezes_all_backbone_bn_but_the_first(backbones):
    model = make_model(backbones, variant="all", partial_bn=True).train()
    for backbone in (model.backbone_rgb, model.backbone_flow):
        norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms[0] is backbone.stages[0][1] and norms[0].training
        assert not any(bn.training for bn in norms[1:])
    assert model.projection[1].training and model.connections["4"].bn_f.training
    frozen = model.backbone_rgb.stages[3][1].bn2
    before = frozen.running_mean.clone(), model.backbone_rgb.stages[0][1].running_mean.clone()
    model(*clip())
    assert torch.equal(frozen.running_mean, before[0])
    assert not torch.equal(model.backbone_rgb.stages[0][1].running_mean, before[1])
    assert frozen.weight.requires_grad
    model.eval()
    assert not any(m.training for m in model.modules())
    full = make_model(backbones, variant="baseline", partial_bn=False).train()
    assert all(m.training for m in full.modules())


def test_channels_last_tokens_are_views():
    x = torch.randn(B * K, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    tokens = StagedBackbone.to_tokens(x, B)
    assert tokens.shape == (B, K * 15, 8) and tokens.data_ptr() == x.data_ptr()
    back = StagedBackbone.from_tokens(tokens, x.shape)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_model_matches_contiguous(backbones):
    model = make_model(backbones, variant="all").eval()
    rgb, flow = clip()
    with torch.no_grad():
        expected = model(rgb.contiguous(), flow.contiguous())
        model.to(memory_format=torch.channels_last)
        got = model(rgb, flow)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_on_cpu_matches_fp32(backbones):
    # eval mode: BatchNorm on batch statistics of B = 2 clips would amplify bf16's rounding
    model = make_model(backbones, variant="all").to(memory_format=torch.channels_last).eval()
    inputs = clip()

    def run(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(*inputs)
        (out["logits_f"].float().sum() + out["z_o"].float().pow(2).sum()).backward()
        return {k: v.detach().float() for k, v in out.items()}, model.backbone_flow.first_conv.weight.grad.clone()

    ref, ref_grad = run(False)
    got, grad = run(True)
    for key in ref:  # measured: 0.4-0.9 % relative L2 error
        assert (got[key] - ref[key]).norm() / ref[key].norm() < 0.03, key
    # the first conv's gradient, after the whole backward in bf16: measured 17 %
    assert (grad - ref_grad).norm() / ref_grad.norm() < 0.3


def test_connection_blocks_take_the_configured_impl(backbones):
    model = make_model(backbones, variant="cb", cb_stages=[3, 4], impl="eager")
    assert [block.impl for block in model.connections.values()] == ["eager", "eager"]


def test_bad_inputs(backbones):
    model = make_model(backbones, variant="baseline")
    rgb, flow = clip()
    with pytest.raises(ValueError, match="expected rgb"):
        model(rgb, flow[:, :1])
    with pytest.raises(CCSError, match="model.variant"):  # the config's validation, at build_model
        build_model(ModelConfig(variant="two-stream", num_classes=CLASSES))


def test_build_model_end_to_end():
    cfg = ModelConfig(variant="cb", backbone="resnet18", num_classes=CLASSES, flow_length=L, cb_stages=[4])
    model = build_model(cfg)
    rgb_conv1 = model.backbone_rgb.first_conv.weight
    torch.testing.assert_close(model.backbone_flow.first_conv.weight, rgb_conv1.mean(1, keepdim=True).repeat(1, 2 * L, 1, 1))
    assert model.cb_stages == (4,) and model.backbone_flow.in_chans == 2 * L


def test_unsplittable_backbone_allows_only_the_last_stage():
    # What a timm model without stage structure becomes: its forward_features as one stage.
    rgb = StagedBackbone("timm:flat", [torch.nn.Conv2d(3, 8, 3, stride=4)], in_chans=3, splittable=False)
    flow = StagedBackbone("timm:flat", [torch.nn.Conv2d(2 * L, 8, 3, stride=4)], in_chans=2 * L, splittable=False)
    cfg = dict(variant="all", num_classes=CLASSES, flow_length=L, num_segments=K, embed_dim=4)
    with pytest.raises(CCSError, match=r"only follow its last stage \(cb_stages=\[-1\]\)"):
        CCSModel(ModelConfig(cb_stages=[3], **cfg), rgb, flow)
    model = CCSModel(ModelConfig(cb_stages=[-1], **cfg), rgb, flow)
    assert model.cb_stages == (1,) and model(*clip())["z_f"].shape == (B, 4)


# ---------------------------------------------------------------------------- 3-D base models

T3D = 4


@pytest.fixture(scope="module")
def video_backbones():
    from ccs_fast.video_backbones import build_two_stream_video_backbones

    torch.manual_seed(0)
    return build_two_stream_video_backbones("i3d_resnet18", 2)


def video_clip(clips=1, seed=0):
    """Loader layout of 3-D clips: (B, N·T, C, S, S), channels_last per frame, flow 2 per frame."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(B, clips * T3D, S, S, 3, generator=g).permute(0, 1, 4, 2, 3)
    flow = torch.randn(B, clips * T3D, S, S, 2, generator=g).permute(0, 1, 4, 2, 3)
    return rgb, flow


def make_video_model(video_backbones, **overrides):
    fields = dict(backbone="i3d_resnet18", num_classes=CLASSES, num_segments=1, clip_len=T3D, embed_dim=16,
                  dropout=0.0, cb_gamma_init=1.0, impl="eager")
    fields.update(overrides)
    rgb, flow = video_backbones
    return CCSModel(ModelConfig(**fields), copy.deepcopy(rgb), copy.deepcopy(flow)).eval()


def test_frames_to_clips_is_a_channels_last_3d_view(video_backbones):
    rgb, _ = video_clip(clips=2)
    clips, count = video_backbones[0].from_frames(rgb, T3D)
    assert clips.shape == (B * 2, 3, T3D, S, S) and count == 2 and clips.data_ptr() == rgb.data_ptr()
    assert clips.is_contiguous(memory_format=torch.channels_last_3d)
    for b, n, t in ((0, 0, 0), (1, 1, 3), (1, 0, 2)):
        assert torch.equal(clips[b * 2 + n, :, t], rgb[b, n * T3D + t])


def test_3d_model_matches_its_parts(video_backbones):
    """variant all on (B, T·h·w, C) tokens per clip: the forward equals backbones → block on
    the clip's T'·h·w positions → pooling over (T', h, w) → consensus over clips → shared head."""
    model = make_video_model(video_backbones, num_segments=2)
    to_tokens, from_tokens = model.backbone_rgb.to_tokens, model.backbone_rgb.from_tokens
    rgb, flow = video_clip(clips=2, seed=1)
    seen = {}
    block = model.connections["4"]
    block.register_forward_pre_hook(lambda _m, args: seen.update(n=args[0].shape))
    out = model(rgb, flow)
    # reference: the clips as (B·N, C, T, H, W) through the two 3-D backbones by hand
    x_f = rgb.reshape(B, 2, T3D, 3, S, S).transpose(2, 3).reshape(B * 2, 3, T3D, S, S)
    x_o = flow.reshape(B, 2, T3D, 2, S, S).transpose(2, 3).reshape(B * 2, 2, T3D, S, S)
    with torch.no_grad():
        f, o = model.backbone_rgb(x_f), model.backbone_flow(x_o)
        y_f, y_o = block(to_tokens(f), to_tokens(o))
        f, o = from_tokens(y_f, f.shape), from_tokens(y_o, o.shape)
        v = torch.cat([f.mean(dim=(2, 3, 4)).view(B, 2, -1).mean(1), o.mean(dim=(2, 3, 4)).view(B, 2, -1).mean(1)])
        logits = model.classifier(model.projection(v))
    assert seen["n"] == (B * 2, f.shape[2] * f.shape[3] * f.shape[4], 512)  # T'·h·w tokens per clip
    torch.testing.assert_close(out["logits_f"], logits[:B], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits_o"], logits[B:], rtol=1e-4, atol=1e-5)


def test_3d_build_model_and_bad_clip(video_backbones):
    model = build_model(ModelConfig(backbone="i3d_resnet18", num_classes=CLASSES, num_segments=1, clip_len=T3D,
                                    variant="cb", impl="eager"), channels_last=True)
    assert model.video and model.flow_channels == 2
    out = model(*video_clip())
    assert out["logits_f"].shape == (B, CLASSES) and out["logits_o"].isfinite().all()
    with pytest.raises(ValueError, match="not whole clips of model.clip_len=4"):
        model(*(x[:, :3] for x in video_clip()))


# ---------------------------------------------------------------------------- TRN consensus

def test_trn_consensus_per_stream(backbones):
    """consensus=trn: one TemporalRelationConsensus per stream gives the video feature; the
    output depends on the segments' order (avg does not); more test segments pool to K."""
    from ccs_fast.model import TRN_FEATURES

    model = make_model(backbones, consensus="trn", variant="all", num_segments=3).eval()
    assert model.feature_dim == TRN_FEATURES and model.projection[0].in_features == TRN_FEATURES
    rgb, flow = clip(segments=3, seed=2)
    out = model(rgb, flow)
    reversed_out = model(rgb.flip(1), flow.flip(1))
    assert not torch.allclose(out["logits_f"], reversed_out["logits_f"])
    assert model(*clip(segments=7))["logits_o"].shape == (B, CLASSES)
    baseline = make_model(backbones, consensus="trn", variant="baseline", num_segments=3)
    assert baseline.classifier_rgb.in_features == TRN_FEATURES
