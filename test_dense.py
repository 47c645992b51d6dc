"""Swin with window_rule='dense' (any image size: a fixed window, padding and masks) and both
model families as backbones of torchvision's detectors and of a segmentation head.

The padding checks compare exactly (torch.equal): a padded key has weight exp(-inf) = 0, so what
the padding holds cannot move a valid output by a single bit. Each is paired with the same run
with the padding mask switched off, which must change the outputs, so the check can fail.
"""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rope_vit
import swin_rope

from testkit import published_with_drawn_weights, swin_redraw

torchvision = pytest.importorskip('torchvision')
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.segmentation.fcn import FCNHead  # noqa: E402
from torchvision.ops import FeaturePyramidNetwork  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # noqa: E402

SWIN_PE = ('rpb', 'rope_axial', 'rope_mixed', 'rope_axial_rpb', 'rope_mixed_rpb', 'none')


def _tiny_swin(pe, img_size=64, window_size=4, seed=0, **kwargs):
    """4 stages, embed_dim 16, head dim 8. Built at 64 with window 4: stage windows 4, 4, 4, 2."""
    torch.manual_seed(seed)
    cfg = dict(img_size=img_size, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16),
               window_size=window_size, num_classes=5, drop_path_rate=0.0)
    cfg.update(kwargs)
    return swin_redraw(swin_rope.create_model('swin_tiny', pe=pe, **cfg)).eval()


def _valid_keys(rows, cols, window, shift):
    """(nW, w*w) bool: which tokens of each window are on the rows x cols grid, written apart from
    the model: the grid padded at the bottom and right, rolled by -shift, cut row-major."""
    Hp, Wp = math.ceil(rows / window) * window, math.ceil(cols / window) * window
    r = torch.arange(Hp)[:, None].expand(Hp, Wp)
    c = torch.arange(Wp)[None, :].expand(Hp, Wp)
    valid = (r < rows) & (c < cols)
    valid = torch.roll(valid, (-shift, -shift), (0, 1))
    out = []
    for i in range(0, Hp, window):
        for j in range(0, Wp, window):
            out.append(valid[i:i + window, j:j + window].reshape(-1))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# The mode: config, switching, validation, plans

def test_dense_rule_is_a_config_field_and_switches_between_forwards():
    model = _tiny_swin('rope_mixed')
    assert model.window_rule == 'classification' and model.dense_window is None
    x = torch.randn(1, 3, 50, 70)  # not even a multiple of the patch
    with pytest.raises(ValueError, match="not allowed.*Any size runs with window_rule='dense'"):
        model(x)
    with torch.no_grad():
        model.window_rule = 'dense'
        assert model.stage_windows(50, 70) == [(4, 2), (4, 2), (4, 2), (2, 1)]  # grids 13x18, 7x9, 4x5, 2x3
        with pytest.raises(ValueError, match='multiples of 32'):
            model.stage_windows(50, 70, rule='classification')
        assert model(x).shape == (1, 5)
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(m.shape) for m in maps] == [(1, 16, 13, 18), (1, 32, 7, 9), (1, 64, 4, 5), (1, 128, 2, 3)]
        final, _ = model.forward_intermediates(x)
        assert final.shape == (1, 2, 3, 128)
        model.window_rule = 'classification'
        with pytest.raises(ValueError, match='not allowed'):
            model(x)
    built = swin_rope.create_model('swin_tiny', pe='rope_mixed', window_rule='dense', dense_window=7,
                                   embed_dim=16, depths=(1, 1), num_heads=(2, 2))
    assert built.window_rule == 'dense' and built.dense_window == 7
    assert built.stage_windows(30, 100) == [(7, 3), (7, 3)]  # grids 8x25 and 4x13
    assert built.stage_windows(20, 20) == [(7, 0), (7, 0)]  # 5x5 and 3x3: one window each, no shift
    for bad in (dict(window_rule='fixed'), dict(dense_window=0), dict(dense_window=2.5), dict(dense_window=True)):
        with pytest.raises(ValueError, match='window_rule|dense_window'):
            swin_rope.create_model('swin_tiny', pe='rope_mixed', **bad)
    with pytest.raises(ValueError, match='window_rule'):
        built.window_rule = 'Dense'
    with pytest.raises(ValueError, match='dense_window'):
        built.dense_window = -1
    assert built.window_rule == 'dense' and built.dense_window == 7  # a refused value changes nothing
    with pytest.raises(ValueError, match='at least 1 pixel'):
        built(torch.randn(1, 3, 0, 64))


def test_dense_rule_keeps_the_published_state_dict():
    name = 'swin_rope_mixed_tiny_patch4_window7_224'
    published = published_with_drawn_weights(swin_rope, name)
    with torch.device('meta'):
        dense = swin_rope.create_model(name, window_rule='dense')
    dense.to_empty(device='cpu')
    assert {k: v.shape for k, v in dense.state_dict().items()} == \
        {k: v.shape for k, v in published.state_dict().items()}
    assert swin_rope.load_checkpoint(dense, {'model': published.state_dict()}) == ([], [])
    assert dense.built_windows == (7, 7, 7, 7)
    # the case: FasterRCNN's 128 x 192 batch, refused by the classification rule
    with pytest.raises(ValueError, match='stage 3 grid 4x6 does not tile into 4x4 windows'):
        published.check_img_size(128, 192)
    dense.check_img_size(128, 192)
    assert dense.stage_windows(800, 1344) == [(7, 3)] * 4


# ----------------------------------------------------------------------------------------------
# Padding: no attention weight, no influence

@pytest.mark.parametrize('pe', SWIN_PE)
def test_dense_padded_keys_get_no_attention_weight(pe):
    model = _tiny_swin(pe, window_rule='dense')
    H, W = 50, 70  # stage grids 13x18, 7x9, 4x5, 2x3: padding in every stage
    logits, blocks = model.forward_with_attention(torch.randn(2, 3, H, W))
    assert torch.isfinite(logits).all()
    padded_blocks = 0
    for b in blocks:
        s, window, shift = b['stage'], b['window'], b['shift']
        rows, cols = math.ceil(H / (4 * 2 ** s)), math.ceil(W / (4 * 2 ** s))
        valid = _valid_keys(rows, cols, window, shift)  # (nW, N)
        attn = b['attn'].unflatten(0, (2, valid.shape[0]))  # (B, nW, nH, N, N)
        assert torch.isfinite(attn).all()
        query_ok = valid[None, :, None, :, None]
        key_pad = ~valid[None, :, None, None, :]
        assert (attn * (query_ok & key_pad)).abs().max() == 0, (s, shift)  # exactly no weight
        on_valid = (attn * ~key_pad).sum(-1)  # (B, nW, nH, N): a valid query's weights sum to 1
        torch.testing.assert_close(on_valid[query_ok[..., 0].expand_as(on_valid)],
                                   torch.ones(()).expand(int(query_ok.sum()) * 2 * attn.shape[2]))
        padded_blocks += bool((~valid).any())
    assert padded_blocks == len(blocks)  # every block saw padding
    assert {(b['stage'], b['shift']) for b in blocks} >= {(0, 2), (0, 0), (1, 2)}  # shifted and not


def _noisy_padding(monkeypatch, seed=0):
    """pad_to_windows filling its padding with large random values instead of zeros."""
    plain = swin_rope.pad_to_windows
    gen = torch.Generator().manual_seed(seed)

    def noisy(x, window):
        y = plain(x, window)
        if y.shape == x.shape:
            return y
        keep = torch.zeros(y.shape[1:3], dtype=torch.bool)
        keep[:x.shape[1], :x.shape[2]] = True
        noise = torch.randn(y.shape, generator=gen).to(y.dtype) * 50
        return torch.where(keep[None, :, :, None], y, noise)
    monkeypatch.setattr(swin_rope, 'pad_to_windows', noisy)


def _outputs(model, x):
    with torch.no_grad():
        fused = model.forward_intermediates(x)  # eager: the fused path
        readable = model.forward_with_attention(x)[0]  # the explicit-softmax path
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    model.eval()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return fused, readable, grads


@pytest.mark.parametrize('pe', SWIN_PE)
def test_dense_padding_contents_change_no_valid_output(pe, monkeypatch):
    """Every stage map, the logits of both attention paths and every parameter's gradient are the
    same bit for bit whether the padding holds zeros or large noise; without the padding mask
    the noise changes them (so this test can fail)."""
    model = _tiny_swin(pe, window_rule='dense')
    x = torch.randn(2, 3, 50, 70)
    zeros = _outputs(model, x)
    with monkeypatch.context() as m:
        _noisy_padding(m)
        model.clear_caches()
        noisy = _outputs(model, x)
        assert all(torch.equal(a, b) for a, b in zip(zeros[0][1], noisy[0][1])), 'stage maps'
        assert torch.equal(zeros[0][0], noisy[0][0]) and torch.equal(zeros[1], noisy[1]), 'features / logits'
        assert all(torch.equal(zeros[2][k], noisy[2][k]) for k in zeros[2]), 'gradients'
        m.setattr(swin_rope, 'PAD_MASK_VALUE', 0.0)  # padded keys attended to: the noise must show
        model.clear_caches()
        unmasked = _outputs(model, x)
        assert not torch.allclose(zeros[0][1][0], unmasked[0][1][0])
        assert not torch.allclose(zeros[1], unmasked[1])
    model.clear_caches()
    if 'rope_mixed' in pe:
        assert all(g.abs().sum() > 0 for n, g in zeros[2].items() if n.endswith('rope_freqs'))


def test_dense_fused_path_equals_readable_path_and_bf16_stays_finite():
    for pe in ('rope_mixed_rpb', 'rope_axial', 'rpb'):
        model = _tiny_swin(pe, window_rule='dense')
        x = torch.randn(2, 3, 50, 70)
        with torch.no_grad():
            fused = model(x)
            readable, _ = model.forward_with_attention(x)
        torch.testing.assert_close(fused, readable, atol=1e-5, rtol=1e-5)
        model.train()
        with torch.autocast('cpu', dtype=torch.bfloat16):  # the -inf mask in bf16: no all-masked row
            out = model(x)
        out.float().square().sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------
# Equal to the classification rule where both give the same windows

@pytest.mark.parametrize('pe', SWIN_PE)
def test_dense_equals_classification_where_the_windows_agree(pe):
    """Logits (both attention paths), stage maps and gradients equal bit for bit wherever both rules
    give the same windows: the built size (64 at window 4; 224 at window 7, as the published models)."""
    at_64 = _tiny_swin(pe)
    at_224 = _tiny_swin(pe, img_size=224, window_size=7, depths=(2, 2, 2, 1))
    checked = []
    for model, (H, W) in [(at_64, (64, 64)), (at_64, (128, 128)), (at_64, (64, 128)), (at_64, (32, 32)),
                          (at_224, (224, 224)), (at_224, (224, 448))]:
        plan = model.stage_windows(H, W, rule='classification')
        model.window_rule = 'dense'
        same = model.stage_windows(H, W) == plan
        model.window_rule = 'classification'
        if not same:  # another classification window (128, 32), or no shift where the window covers a side
            continue
        checked.append((H, W))
        x = torch.randn(2, 3, H, W)
        reference = _outputs(model, x)
        model.window_rule = 'dense'
        dense = _outputs(model, x)
        model.window_rule = 'classification'
        assert all(torch.equal(a, b) for a, b in zip(reference[0][1], dense[0][1]))
        assert torch.equal(reference[0][0], dense[0][0]) and torch.equal(reference[1], dense[1])
        assert all(torch.equal(reference[2][k], dense[2][k]) for k in reference[2])
    assert checked == [(64, 64), (224, 224)]


def test_dense_equals_classification_for_published_swin_t_at_224():
    model = published_with_drawn_weights(swin_rope, 'swin_rope_mixed_tiny_patch4_window7_224').eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = model.forward_intermediates(x)
        model.window_rule = 'dense'
        assert model.stage_windows(224, 224) == model.stage_windows(224, 224, rule='classification') \
            == [(7, 3), (7, 3), (7, 3), (7, 0)]
        dense = model.forward_intermediates(x)
    assert torch.equal(reference[0], dense[0])
    assert all(torch.equal(a, b) for a, b in zip(reference[1], dense[1]))


def test_dense_window_of_choice_uses_the_position_policies_and_resized_rpb():
    model = _tiny_swin('rope_mixed_rpb', window_rule='dense')
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        at_built = {p: model(x) for p in swin_rope.ROPE_POSITIONS if not setattr(model, 'rope_positions', p)}
        assert all(torch.equal(at_built['extrapolate'], v) for v in at_built.values())  # identity there
        model.dense_window = 6
        assert model.stage_windows(50, 70) == [(6, 3), (6, 3), (6, 0), (6, 0)]
        other = {p: model(x) for p in swin_rope.ROPE_POSITIONS if not setattr(model, 'rope_positions', p)}
        assert not torch.allclose(other['extrapolate'], other['interpolate'])
        assert not torch.allclose(other['extrapolate'], at_built['extrapolate'])
        model.rope_positions = 'extrapolate'
        _, blocks = model.forward_with_attention(x)
        assert all(b['attn'].shape[-1] == 36 for b in blocks)


# ----------------------------------------------------------------------------------------------
# Inside torchvision's detectors and a segmentation head

class SwinFPN(nn.Module):
    """Swin's four stage maps (strides 4, 8, 16, 32) through torchvision's feature pyramid."""

    def __init__(self, swin, out_channels=32):
        super().__init__()
        self.body, self.out_channels = swin, out_channels
        self.fpn = FeaturePyramidNetwork([swin.embed_dim * 2 ** s for s in range(swin.num_stages)],
                                         out_channels, extra_blocks=LastLevelMaxPool())

    def forward(self, x):
        maps = self.body.forward_intermediates(x, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class ViTDetFPN(nn.Module):
    """The ViTDet-style ViT's last map (stride 16) made into strides 4, 8, 16, 32 (ViTDet's simple
    pyramid with fixed resampling), then torchvision's feature pyramid."""

    def __init__(self, vit, out_channels=32):
        super().__init__()
        self.body, self.out_channels = vit, out_channels
        self.fpn = FeaturePyramidNetwork([vit.embed_dim] * 4, out_channels, extra_blocks=LastLevelMaxPool())

    def forward(self, x):
        (c4,) = self.body.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        maps = [F.interpolate(c4, scale_factor=4.0, mode='bilinear'), F.interpolate(c4, scale_factor=2.0, mode='bilinear'),
                c4, F.max_pool2d(c4, 2)]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def _tiny_vitdet():
    torch.manual_seed(0)
    return rope_vit.create_model('vit_small', pe='rope_mixed', embed_dim=64, depth=4, num_heads=2,
                                 window_size=4, global_blocks=(1, 3), num_classes=5)


def _detection_batch():
    """Two non-square images of different sizes, with boxes (x1, y1, x2, y2) and labels."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 120, 170, generator=gen), torch.rand(3, 100, 140, generator=gen)]
    targets = [{'boxes': torch.tensor([[10., 20., 80., 90.], [100., 30., 160., 110.]]), 'labels': torch.tensor([1, 2])},
               {'boxes': torch.tensor([[5., 5., 60., 70.]]), 'labels': torch.tensor([2])}]
    return images, targets


def _train_and_detect(backbone, freqs, **transform):
    """One SGD step of FasterRCNN on _detection_batch, then one evaluation: finite losses, a
    gradient on the RoPE-Mixed frequencies, boxes inside each image."""
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=192, box_score_thresh=0.0,
                          rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                          rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64,
                          **transform)
    images, targets = _detection_batch()
    seen = []
    hook = backbone.body.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    optimizer = torch.optim.SGD(detector.parameters(), lr=1e-3)
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in freqs)
    optimizer.step()
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    hook.remove()
    for image, det in zip(images, detections):
        boxes = det['boxes']
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
        assert torch.isfinite(boxes).all() and len(det['scores']) == len(det['labels']) == len(boxes)
        assert (boxes[:, 2] <= image.shape[-1]).all() and (boxes[:, 3] <= image.shape[-2]).all()
    return seen


def test_fasterrcnn_trains_and_detects_with_swin_rope_mixed_dense():
    swin = _tiny_swin('rope_mixed', img_size=224, window_size=7, window_rule='dense')
    backbone = SwinFPN(swin)
    freqs = [blk.attn.rope_freqs for stage in swin.layers for blk in stage.blocks]
    seen = _train_and_detect(backbone, freqs)
    assert seen == [(128, 192), (128, 192)]  # the batch: refused by the classification rule
    swin.window_rule = 'classification'
    with pytest.raises(ValueError, match='does not tile'):
        _train_and_detect(backbone, freqs)


def test_fasterrcnn_with_swin_dense_at_sizes_off_the_patch_grid():
    """size_divisible=1: the detector's batch is 128 x 181 itself (not a multiple of the patch)."""
    swin = _tiny_swin('rope_mixed', img_size=224, window_size=7, window_rule='dense')
    freqs = [blk.attn.rope_freqs for stage in swin.layers for blk in stage.blocks]
    seen = _train_and_detect(SwinFPN(swin), freqs, size_divisible=1)
    assert seen == [(128, 181), (128, 181)]


def test_fasterrcnn_trains_and_detects_with_vitdet_rope_mixed():
    vit = _tiny_vitdet()
    seen = _train_and_detect(ViTDetFPN(vit), [vit.freqs])
    assert seen == [(128, 192), (128, 192)]


def test_segmentation_head_on_swin_dense_stage_maps_at_a_non_square_size():
    """torchvision's FCN head on the four stage maps brought to stride 4, at 97 x 141: logits at
    the image size, a finite loss, gradients into the backbone's RoPE frequencies."""
    swin = _tiny_swin('rope_mixed', window_rule='dense').train()
    head = FCNHead(sum(swin.embed_dim * 2 ** s for s in range(swin.num_stages)), 4)
    x = torch.randn(2, 3, 97, 141)
    target = torch.randint(0, 4, (2, 97, 141))
    maps = swin.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 36), (13, 18), (7, 9), (4, 5)]
    size = maps[0].shape[-2:]
    fused = torch.cat([maps[0]] + [F.interpolate(m, size=size, mode='bilinear') for m in maps[1:]], dim=1)
    logits = F.interpolate(head(fused), size=x.shape[-2:], mode='bilinear')  # (2, 4, 97, 141)
    assert logits.shape == (2, 4, 97, 141)
    loss = F.cross_entropy(logits, target)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(blk.attn.rope_freqs.grad.abs().sum() > 0 for stage in swin.layers for blk in stage.blocks)
