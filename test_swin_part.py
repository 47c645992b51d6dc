"""Tests of swin_rope.py (prefix test_swin_ / _swin_; CPU, seeded, small configs)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import swin_rope

_SWIN_PUBLISHED_T = {  # OFFICIAL_NOTES section 2, Swin-T: (parameters, keys in the published file)
    'swin_tiny_patch4_window7_224': (28_288_354, 190),
    'swin_rope_axial_tiny_patch4_window7_224': (28_265_032, 202),
    'swin_rope_mixed_tiny_patch4_window7_224': (28_269_448, 202),
    'swin_rope_axial_rpb_tiny_patch4_window7_224': (28_288_354, 226),
    'swin_rope_mixed_rpb_tiny_patch4_window7_224': (28_292_770, 226),
}


def _swin_small_model(pe, seed=0, **kwargs):
    """3 stages, head dim 8, built for 64 x 64 with window 4 (stage grids 16, 8, 4)."""
    torch.manual_seed(seed)
    cfg = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8),
               window_size=4, num_classes=7, drop_path_rate=0.0)
    cfg.update(kwargs)
    return swin_rope.create_model('swin_tiny', pe=pe, **cfg).eval()


@torch.no_grad()
def _swin_redraw(model, seed=1):
    """Re-draw weights as OFFICIAL_NOTES section 7 says, so position mistakes show in the logits.
    RoPE frequencies and buffers keep their values."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            var = (2.5 if name.endswith('qkv') else 1.0) / fan_in
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(var))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    for name, p in model.named_parameters():
        if name.endswith('relative_position_bias_table'):
            p.copy_(torch.randn(p.shape, generator=g))
    model.clear_caches()
    return model


def _swin_pairs_complex(x):
    """Interleaved channels (2j, 2j+1) -> complex number j (the paper's Eq. 7 reading)."""
    return torch.complex(x[..., 0::2].double(), x[..., 1::2].double())


def test_swin_eq15_logits_depend_on_relative_offsets_only():
    torch.manual_seed(0)
    heads, d, w = 3, 8, 5
    freqs = swin_rope.init_rope_freqs(heads, d, 10.0, mixed=True)  # (2, nH, d/2)
    t_x, t_y = swin_rope.window_positions(w)
    assert t_x.tolist() == [float(n % w) for n in range(w * w)]  # column: x = n mod w
    assert t_y.tolist() == [float(n // w) for n in range(w * w)]  # row: y = n div w
    cis = swin_rope.rope_cis(freqs, t_x, t_y)  # (nH, N, d/2)
    q, k = torch.randn(2, heads, w * w, d).unbind(0)
    logits = swin_rope.apply_rope(q, cis) @ swin_rope.apply_rope(k, cis).transpose(-1, -2)
    # Independent Eq. 15: Re[sum_j q_nj conj(k_mj) exp(i (fx_j dx + fy_j dy))] in float64.
    dx = (t_x[:, None] - t_x[None, :]).double()  # (N, N)
    dy = (t_y[:, None] - t_y[None, :]).double()
    phase = dx[None, :, :, None] * freqs[0].double()[:, None, None, :] \
        + dy[None, :, :, None] * freqs[1].double()[:, None, None, :]  # (nH, N, N, d/2)
    qc, kc = _swin_pairs_complex(q), _swin_pairs_complex(k)  # (nH, N, d/2)
    expected = (qc[:, :, None] * kc[:, None].conj() * torch.exp(1j * phase)).real.sum(-1)
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)

    # Inside a window of one repeated token, the logit is a function of (dx, dy) only.
    attn = _swin_small_model('rope_mixed').layers[0].blocks[0].attn
    x = torch.randn(1, 1, 16).expand(1, w * w, 16)
    qkv = attn.qkv(x).reshape(1, w * w, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    qr, kr = swin_rope.apply_rope(qkv[:2], attn.rope_factors(w)).unbind(0)
    a = (qr @ kr.transpose(-1, -2))[0]  # (nH, N, N)
    for off in {(int(i), int(j)) for i, j in zip(dx.flatten(), dy.flatten())}:
        sel = (dx == off[0]) & (dy == off[1])
        vals = a[:, sel]  # (nH, count)
        torch.testing.assert_close(vals, vals[:, :1].expand_as(vals), atol=1e-5, rtol=0)


def test_swin_axial_init_is_mixed_formula_at_angle_zero():
    freqs = swin_rope.init_rope_freqs(2, 32, 50.0, mixed=False)  # (2, nH, 16)
    mag = 50.0 ** (-torch.arange(8) * 4 / 32.0)
    torch.testing.assert_close(freqs[0, :, :8], mag.expand(2, 8), atol=0, rtol=1e-6)
    torch.testing.assert_close(freqs[1, :, 8:], mag.expand(2, 8), atol=0, rtol=1e-6)
    assert (freqs[1, :, :8] == 0).all()
    # the official fp32 cos(pi/2) = -4.37e-8, kept so the buffer equals the published one
    torch.testing.assert_close(freqs[0, :, 8:], -4.371139e-08 * mag.expand(2, 8), atol=1e-12, rtol=1e-4)
    m = _swin_small_model('rope_axial')
    assert 'layers.0.blocks.0.attn.rope_freqs' in m.state_dict()
    assert not any('rope_freqs' in n for n, _ in m.named_parameters())


def _swin_tv_state_dict(model, tv):
    """Our Swin keys -> torchvision.models.swin_t keys."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split('.')
        if parts[0] == 'patch_embed':
            k2 = {'proj': 'features.0.0', 'norm': 'features.0.2'}[parts[1]] + '.' + '.'.join(parts[2:])
        elif parts[0] == 'layers':
            s = int(parts[1])
            if parts[2] == 'blocks':
                rest = '.'.join(parts[4:]).replace('mlp.fc1', 'mlp.0').replace('mlp.fc2', 'mlp.3')
                k2 = f'features.{2 * s + 1}.{parts[3]}.{rest}'
            else:  # downsample
                k2 = f'features.{2 * s + 2}.' + '.'.join(parts[3:])
        else:
            k2 = k
        out[k2] = v
    tv_sd = tv.state_dict()
    assert set(out) <= set(tv_sd), set(out) - set(tv_sd)
    assert {k for k in tv_sd if k not in out} == {k for k in tv_sd if 'relative_position_index' in k}
    tv_sd.update(out)
    return tv_sd


def test_swin_rpb_baseline_matches_torchvision_swin_t():
    torch.manual_seed(0)
    with torch.device('meta'):  # skip the init: _swin_redraw sets every parameter
        ours = swin_rope.create_model('swin_tiny_patch4_window7_224').eval()
    ours = _swin_redraw(ours.to_empty(device='cpu'))
    tv = torchvision.models.swin_t(weights=None).eval()
    tv.load_state_dict(_swin_tv_state_dict(ours, tv))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), tv(x)
    assert a.std() > 0.5  # re-drawn weights: logits are position-sensitive
    print(f'swin_t vs torchvision max |dlogit| = {(a - b).abs().max().item():.3g}')
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def _swin_explicit_attention(attn, x, window, shift_mask):
    """softmax(RoPE(q * scale) . RoPE(k) + B + mask) v written out: RPB index by loops, RoPE as
    complex numbers of interleaved pairs (Eq. 14), float64."""
    B_, N, C = x.shape
    nH, d = attn.num_heads, C // attn.num_heads
    x = x.double()
    qkv = x @ attn.qkv.weight.double().t() + attn.qkv.bias.double()  # (B_, N, 3C): [q | k | v]
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B_, N, nH, d).transpose(1, 2) for i in range(3))
    q = q * d ** -0.5
    if attn.rope is not None:
        pos = torch.tensor([[n % window, n // window] for n in range(N)], dtype=torch.float64)  # (N, 2)
        f = attn.rope_freqs.double()  # (2, nH, d/2)
        phase = pos[:, 0, None, None] * f[0] + pos[:, 1, None, None] * f[1]  # (N, nH, d/2)
        rot = torch.exp(1j * phase).transpose(0, 1)  # (nH, N, d/2)
        qc, kc = _swin_pairs_complex(q) * rot, _swin_pairs_complex(k) * rot  # (B_, nH, N, d/2)
        logits = (qc[..., :, None, :] * kc[..., None, :, :].conj()).real.sum(-1)  # (B_, nH, N, N)
    else:
        logits = q @ k.transpose(-1, -2)
    if attn.use_rpb:
        bias = torch.empty(nH, N, N, dtype=torch.float64)
        table = attn.relative_position_bias_table.double()
        for n in range(N):
            for m in range(N):
                dy, dx = n // window - m // window, n % window - m % window
                bias[:, n, m] = table[(dy + window - 1) * (2 * window - 1) + dx + window - 1]
        logits = logits + bias
    nW = shift_mask.shape[0]
    logits = (logits.view(B_ // nW, nW, nH, N, N) + shift_mask[None, :, None]).view(B_, nH, N, N)
    out = logits.softmax(-1) @ v  # (B_, nH, N, d)
    out = out.transpose(1, 2).reshape(B_, N, C) @ attn.proj.weight.double().t() + attn.proj.bias
    return out.float()


def test_swin_windowed_sdpa_equals_explicit_softmax():
    H = W = 16
    window, shift = 4, 2
    mask = swin_rope.shift_window_mask(H, W, window, shift)  # (nW, N, N)
    assert mask.shape == (16, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    x = torch.randn(2 * 16, window * window, 16)
    for pe in ('rpb', 'rope_mixed_rpb', 'rope_axial'):
        model = _swin_redraw(_swin_small_model(pe))
        attn = model.layers[0].blocks[1].attn
        with torch.no_grad():
            sdpa = attn(x, window, mask)
            torch.testing.assert_close(sdpa, _swin_explicit_attention(attn, x, window, mask),
                                       atol=1e-5, rtol=1e-5)
            # the explicit probability path of forward_with_attention gives the same output
            attn.return_attn = True
            explicit = attn(x, window, mask)
            attn.return_attn = False
        torch.testing.assert_close(sdpa, explicit, atol=1e-5, rtol=1e-5)


def _swin_official_layout(model):
    """Our state dict plus the derived tensors a published file carries (OFFICIAL_NOTES 2)."""
    sd = dict(model.state_dict())
    H, W = (model.img_size, model.img_size)
    for s, (window, shift) in enumerate(model.stage_windows(H, W)):
        grid = H // (model.patch_size * 2 ** s)
        for i, blk in enumerate(model.layers[s].blocks):
            prefix = f'layers.{s}.blocks.{i}.'
            if blk.attn.use_rpb:
                sd[prefix + 'attn.relative_position_index'] = swin_rope.relative_position_index(window)
            if blk.attn.rope:
                t_x, t_y = swin_rope.window_positions(window)
                sd[prefix + 'attn.rope_t_x'], sd[prefix + 'attn.rope_t_y'] = t_x, t_y
            if blk.shifted and shift:
                sd[prefix + 'attn_mask'] = swin_rope.shift_window_mask(grid, grid, window, shift)
    return sd


def test_swin_published_format_round_trip(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    for pe in ('rpb', 'rope_axial', 'rope_mixed_rpb'):
        src = _swin_redraw(_swin_small_model(pe, seed=0))
        path = tmp_path / f'{pe}.pth'
        torch.save({'model': _swin_official_layout(src)}, path)
        dst = _swin_small_model(pe, seed=5)
        with torch.no_grad():
            before = dst(x)
            assert swin_rope.load_checkpoint(dst, path) == ([], [])
            torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
            assert not torch.equal(before, dst(x))
    # a training checkpoint {'model', 'optimizer', ...} loads too; a wrong head is an error
    torch.save({'model': src.state_dict(), 'optimizer': {}, 'epoch': 3}, tmp_path / 'train.pth')
    swin_rope.load_checkpoint(_swin_small_model('rope_mixed_rpb'), tmp_path / 'train.pth')
    with pytest.raises(ValueError, match=r'head.weight checkpoint \(7, 64\) vs model \(5, 64\)'):
        swin_rope.load_checkpoint(_swin_small_model('rope_mixed_rpb', num_classes=5), tmp_path / 'train.pth')
    res = swin_rope.load_checkpoint(_swin_small_model('rope_mixed'), tmp_path / 'train.pth', strict=False)
    assert len(res.unexpected_keys) == 6 and res.missing_keys == []
    with pytest.raises(FileNotFoundError):
        swin_rope.load_checkpoint(src, tmp_path / 'absent.pth')
    (tmp_path / 'bad.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        swin_rope.load_checkpoint(src, tmp_path / 'bad.pth')
    # The published Swin-T layouts have the official key counts and load strictly.
    for name, (_, n_keys) in _SWIN_PUBLISHED_T.items():
        with torch.device('meta'):
            m = swin_rope.create_model(name)
        sd = _swin_official_layout(m)
        assert len(sd) == n_keys, name
        m.load_state_dict({k: v for k, v in sd.items() if k in m.state_dict()}, strict=True, assign=True)


def test_swin_rpb_table_of_other_window_is_resized_on_load_and_at_run_time():
    # A model built at 64 (window 4, table 7x7) run at 96 equals a model built at 96 (window 6,
    # table 11x11) that loads the first one's checkpoint: both resize bicubically, as official.
    src = _swin_redraw(_swin_small_model('rope_mixed_rpb'))
    dst = _swin_small_model('rope_mixed_rpb', img_size=96, window_size=6)
    swin_rope.load_checkpoint(dst, src.state_dict())
    assert dst.layers[0].blocks[0].attn.relative_position_bias_table.shape == (121, 2)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=1e-5)


def test_swin_rpb_resize_matches_independent_interpolate():
    torch.manual_seed(0)
    table = torch.randn(169, 3)  # window 7
    for w in (3, 5, 12):
        img = table.t().reshape(1, 3, 13, 13)  # (1, nH, dy, dx)
        want = F.interpolate(img, size=(2 * w - 1,) * 2, mode='bicubic', align_corners=False)
        got = swin_rope.resize_rpb_table(table, w, 'bicubic')
        torch.testing.assert_close(got.t().reshape(1, 3, 2 * w - 1, 2 * w - 1), want, atol=1e-6, rtol=0)
    padded = swin_rope.resize_rpb_table(table, 12, 'zero_pad').t().reshape(3, 23, 23)
    assert torch.equal(padded[:, 5:18, 5:18], table.t().reshape(3, 13, 13))
    padded[:, 5:18, 5:18] = 0
    assert (padded == 0).all()  # no bias for offsets the table never saw
    cropped = swin_rope.resize_rpb_table(table, 5, 'zero_pad').t().reshape(3, 9, 9)
    assert torch.equal(cropped, table.t().reshape(3, 13, 13)[:, 2:11, 2:11])
    with pytest.raises(ValueError, match='zero_pad'):
        _swin_small_model('rpb', rpb_resize='nearest')
    # the model's bias at window 12 = the resized table at the offsets of Eq. 5
    model = _swin_small_model('rpb', img_size=224, window_size=7, embed_dim=8, depths=(2,), num_heads=(2,),
                              patch_size=4, rpb_resize='zero_pad')
    assert model.layers[0].blocks[0].attn.rpb_resize == 'zero_pad'
    attn = model.layers[0].blocks[0].attn
    for mode in ('bicubic', 'zero_pad'):
        attn.rpb_resize = mode
        with torch.no_grad():
            bias = attn.position_bias(12)  # (nH, N, N)
        big = swin_rope.resize_rpb_table(attn.relative_position_bias_table, 12, mode)  # (23^2, nH)
        n, m = 5 * 12 + 9, 7  # query (x=9, y=5), key (x=7, y=0)
        dy, dx = n // 12 - m // 12, n % 12 - m % 12
        torch.testing.assert_close(bias[:, n, m], big[(dy + 11) * 23 + dx + 11], atol=0, rtol=0)


def test_swin_parameter_counts():
    for name, (n_params, _) in _SWIN_PUBLISHED_T.items():
        with torch.device('meta'):
            m = swin_rope.create_model(name)
        assert sum(p.numel() for p in m.parameters()) == n_params, name
    for size, ref in (('swin_small', 49.6e6), ('swin_base', 87.8e6)):
        with torch.device('meta'):
            m = swin_rope.create_model(size)
        assert abs(sum(p.numel() for p in m.parameters()) / ref - 1) < 0.005


def test_swin_window_and_shift_per_stage():
    with torch.device('meta'):
        m = swin_rope.create_model('swin_rope_mixed_tiny_patch4_window7_224')
    table = {(96, 96): [(3, 1), (3, 1), (3, 1), (3, 0)],
             (160, 160): [(5, 2), (5, 2), (5, 2), (5, 0)],
             (224, 224): [(7, 3), (7, 3), (7, 3), (7, 0)],
             (384, 384): [(12, 6), (12, 6), (12, 6), (12, 0)],
             (160, 320): [(5, 2), (5, 2), (5, 2), (5, 0)]}
    for (h, w), plan in table.items():
        assert m.stage_windows(h, w) == plan, (h, w)
    # The blocks use that plan (small model: stage grids 12/6/3 at 48; clipped last stage).
    small = _swin_small_model('rope_mixed_rpb')
    assert small.stage_windows(48, 96) == [(3, 1), (3, 1), (3, 0)]
    with torch.no_grad():
        logits, attn = small.forward_with_attention(torch.randn(2, 3, 48, 96))
    assert logits.shape == (2, 7)
    assert [(a['stage'], a['window'], a['shift']) for a in attn] == \
        [(0, 3, 0), (0, 3, 1), (1, 3, 0), (1, 3, 1), (2, 3, 0), (2, 3, 0)]
    assert attn[0]['attn'].shape == (2 * 4 * 8, 2, 9, 9)
    torch.testing.assert_close(attn[3]['attn'].sum(-1), torch.ones(2 * 2 * 4, 4, 9))


def test_swin_forward_with_attention_matches_forward():
    model = _swin_redraw(_swin_small_model('rope_mixed_rpb'))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, attn = model.forward_with_attention(x)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    assert len(attn) == 6 and attn[1]['shift'] == 2 and attn[-1]['shift'] == 0


def test_swin_fp32_backward_reaches_rope_freqs_and_tables():
    model = _swin_small_model('rope_mixed_rpb').train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name.endswith('rope_freqs') or name.endswith('relative_position_bias_table'):
            assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters()
                                       if n.endswith(('rope_freqs', 'relative_position_bias_table'))}
    # at another size the resized table still gets gradients (bicubic resize is differentiable)
    model.zero_grad()
    model(torch.randn(1, 3, 96, 96)).sum().backward()
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_swin_eval_cache_follows_weights_and_autocast_runs():
    model = _swin_small_model('rope_mixed_rpb')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x)
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        for name, p in model.named_parameters():
            if name.endswith(('rope_freqs', 'relative_position_bias_table')):
                p.mul_(3.0)  # in place, as load_state_dict or an optimizer step would
        changed = model(x)
        fresh = _swin_small_model('rope_mixed_rpb')
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(changed, fresh(x), atol=0, rtol=0)
        assert not torch.equal(changed, first)
        with torch.inference_mode():
            model(x)
    model(x).sum().backward()  # caches made under inference_mode are not reused with autograd
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), changed, atol=0.1, rtol=0.1)


def test_swin_invalid_sizes_and_names():
    with torch.device('meta'):
        m = swin_rope.create_model('swin_tiny')
    for h, w in ((200, 224), (224, 256), (16, 16), (160, 288)):
        with pytest.raises(ValueError, match=r'not allowed.*Nearest valid square sizes'):
            m.check_img_size(h, w)
    with pytest.raises(ValueError, match=r'\[160, 192, 224, 256\]'):
        m.check_img_size(200, 224)
    small = _swin_small_model('rope_mixed')
    with pytest.raises(ValueError, match='multiples of 16'):
        small(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match='rope_mixed_rpb'):
        swin_rope.create_model('swin_tiny', pe='rope')
    with pytest.raises(ValueError, match='swin_rope_axial_tiny_patch4_window7_224'):
        swin_rope.create_model('swin_huge')
    assert len(swin_rope.list_models()) == 3 + 15


def test_swin_published_mixed_tiny_runs_at_96_224_384():
    torch.manual_seed(0)
    model = swin_rope.create_model('swin_rope_mixed_tiny_patch4_window7_224').eval()
    assert (model.pe, model.num_classes, model.patch_size, model.img_size, model.num_features) == \
        ('rope_mixed', 1000, 4, 224, 768)
    with torch.no_grad():
        for r in (96, 224, 384):
            out = model(torch.randn(1, 3, r, r))
            assert out.shape == (1, 1000) and torch.isfinite(out).all()
