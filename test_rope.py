"""The project's tests: the paper's equations, equivalence with independent peers, the scripts end to end.

Plain pytest on CPU with tiny configurations and explicit tolerances. Each section checks one
file against an independent formulation: rotation matrices, relative-position invariance, timm's
RoPE-ViT models, torchvision's Swin-T, hand-computed optimizer steps, closed-form attention maps.
Run: python -m pytest -q test_rope.py
"""
import copy
import csv
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import warnings

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import rope_vit
import swin_rope
import train
import eval_multires
import benchmark


# ==============================================================================================
# rope_vit.py: the paper's equations (Eq. 8-15), timm equivalence, checkpoints, sizes, dtypes
# ==============================================================================================

_VIT_TIMM_NAMES = {
    'rope_axial': 'vit_small_patch16_rope_224',
    'rope_mixed': 'vit_small_patch16_rope_mixed_224',
    'rope_axial_ape': 'vit_small_patch16_rope_ape_224',
    'rope_mixed_ape': 'vit_small_patch16_rope_mixed_ape_224',
}
# The timm models at ViT-S width and heads with 2 blocks instead of 12 (and 100 classes): the blocks
# are identical, position mistakes show in each (OFFICIAL_NOTES section 7), and 12 blocks at 4 sizes
# cost ~6x the time on 2 cores. The 12-block layout is checked by key and parameter counts.
_VIT_TIMM_DEPTH = 2
# 112x448 has the token count of 224x224 (196) on another grid
_VIT_SIZES = [(224, 224), (160, 160), (320, 320), (112, 448)]
_VIT_TINY = dict(embed_dim=64, depth=2, num_heads=2, num_classes=10)  # head dim 32


def _vit_stress_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter as OFFICIAL_NOTES section 7 says, so position mistakes show.

    With the official init (LayerScale 1e-4) the logits hardly depend on positions. RoPE-Mixed
    frequencies keep their initial values; buffers are untouched.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(t, std):
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    def uniform_(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                uniform_(module.weight, 0.5, 1.5)
                normal_(module.bias, 0.2)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                gain = 2.5 if name.endswith('qkv') else 1.0  # peaked attention
                normal_(module.weight, math.sqrt(gain / fan_in))
                if module.bias is not None:
                    normal_(module.bias, 0.1)
        for name, p in model.named_parameters():
            if name.endswith(('gamma_1', 'gamma_2')):
                uniform_(p, 0.2, 1.0)
            elif name == 'cls_token':
                normal_(p, 1.0)
            elif name == 'pos_embed':
                normal_(p, 0.5)
    return model


def _vit_tiny(pe, seed=0, **kw):
    torch.manual_seed(seed)
    return _vit_stress_init_(rope_vit.create_model('vit_tiny', pe=pe, **{**_VIT_TINY, **kw}), seed).eval()


def _vit_on_meta_then_load(state_dict, **kw):
    """Our ViT-S with the given weights, skipping the random init (built on meta)."""
    with torch.device('meta'):
        model = rope_vit.create_model('vit_small', **kw)
    model.to_empty(device='cpu')
    rope_vit.load_checkpoint(model, state_dict)
    return model.eval()


# ---------------------------------------------------------------------------------------
# Equations
# ---------------------------------------------------------------------------------------

def test_vit_eq11_rotation_equals_2x2_rotation_matrices_and_the_complex_product():
    torch.manual_seed(0)
    T, D = 7, 16
    angles = torch.randn(3, T, D // 2) * 5  # (heads, T, D/2)
    x = torch.randn(2, 2, 3, T, D)  # (q|k, B, heads, T, D)
    out = rope_vit.apply_rope(x, *rope_vit.rope_cos_sin(angles))
    c, s = angles.cos(), angles.sin()
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (heads, T, D/2, 2, 2)
    ref = torch.einsum('htjuv,qbhtjv->qbhtju', rot, x.unflatten(-1, (D // 2, 2))).flatten(-2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # the complex form of Eq. 7 / 11: (x_2j + i x_2j+1) e^{i phi_j}, in float64
    complex_form = torch.view_as_real(torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
                                      * torch.polar(torch.ones_like(angles).double(), angles.double())).flatten(-2)
    assert (out.double() - complex_form).abs().max() < 1e-5  # fp32 round-off (|x'| <= 5 here)
    # bf16 input: rotation in fp32, result cast back
    assert rope_vit.apply_rope(x.bfloat16(), *rope_vit.rope_cos_sin(angles)).dtype == torch.bfloat16


def _vit_angles(kind, t_x, t_y, head_dim, freqs=None, heads=None):
    if kind == 'axial':
        return rope_vit.axial_angles(t_x, t_y, head_dim, 100.0)
    return rope_vit.mixed_angles(t_x, t_y, freqs, heads)[0]  # layer 0: (heads, N, D/2)


@pytest.mark.parametrize('kind', ['axial', 'mixed'])
def test_vit_eq8_eq15_logits_depend_only_on_relative_position(kind):
    torch.manual_seed(0)
    heads, D = 2, 32
    freqs = rope_vit.init_mixed_freqs(D, 1, heads, 10.0)
    t_x, t_y = rope_vit.patch_grid_positions(5, 6)
    q, k = torch.randn(2, heads, t_x.numel(), D).unbind(0)

    def logits(dx, dy):
        cos, sin = rope_vit.rope_cos_sin(_vit_angles(kind, t_x + dx, t_y + dy, D, freqs, heads))
        return rope_vit.apply_rope(q, cos, sin) @ rope_vit.apply_rope(k, cos, sin).transpose(-1, -2)

    base = logits(0, 0)
    torch.testing.assert_close(logits(3, 11), base, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits(-4, 2), base, atol=1e-4, rtol=1e-5)
    assert (base - q @ k.transpose(-1, -2)).abs().max() > 1.0  # the rotation does act


def test_vit_eq15_mixed_with_axis_aligned_freqs_equals_axial():
    axial = _vit_tiny('rope_axial')
    mixed = rope_vit.create_model('vit_tiny', pe='rope_mixed', **_VIT_TINY).eval()
    mixed.load_state_dict(axial.state_dict(), strict=False)
    D, heads = 32, 2
    mag = rope_vit.rope_magnitudes(D, 100.0)
    zero = torch.zeros_like(mag)
    with torch.no_grad():  # theta^y = 0 on the first half of the pairs, theta^x = 0 on the second
        mixed.freqs.copy_(torch.stack([torch.cat([mag, zero]), torch.cat([zero, mag])])[:, None, None, :]
                          .expand(2, 2, heads, D // 2).flatten(2))
    x = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(mixed(x), axial(x), atol=1e-5, rtol=1e-5)


def test_vit_positions_come_from_the_grid_not_the_token_count():
    t_x, t_y = rope_vit.patch_grid_positions(7, 28)  # 112x448 at patch 16: 196 tokens, like 14x14
    assert [(int(a), int(b)) for a, b in zip(t_x, t_y)] == [(n % 28, n // 28) for n in range(196)]
    model = _vit_tiny('rope_axial', patch_size=16)
    cos, sin = model.block_rotations(7, 28, torch.device('cpu'))[0]  # (T, D/2) each
    mag = [100.0 ** (-t / 8) for t in range(8)]
    for n in (1, 30, 196):  # token n (row 0 is the class token)
        x, y = (n - 1) % 28, (n - 1) // 28
        phi = torch.tensor([x * m for m in mag] + [y * m for m in mag])
        torch.testing.assert_close(cos[n], phi.cos(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[n], phi.sin(), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[0], torch.ones(16))  # class token: identity
    torch.testing.assert_close(sin[0], torch.zeros(16))
    # and the APE is resized to the 7x28 grid, not reused as 14x14
    ape = _vit_tiny('ape', img_size=224)
    ref = rope_vit.create_model('vit_tiny', pe='ape', img_size=(112, 448), **_VIT_TINY).eval()
    sd = dict(ape.state_dict())
    grid = sd['pos_embed'].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    sd['pos_embed'] = F.interpolate(grid, size=(7, 28), mode='bicubic', align_corners=False) \
        .permute(0, 2, 3, 1).reshape(1, 196, 64)
    ref.load_state_dict(sd)
    x = torch.randn(1, 3, 112, 448)
    torch.testing.assert_close(ape(x), ref(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Equivalence with timm's RoPE-ViT (an independent implementation)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('pe', list(_VIT_TIMM_NAMES))
def test_vit_matches_timm(pe):
    timm = pytest.importorskip('timm')
    torch.manual_seed(1)
    ape = pe.endswith('_ape')
    # timm resizes APE with antialias, so APE models are compared at their native grid: timm's
    # model is moved to each size (set_input_size) and gets a freshly drawn APE for that grid
    peer = timm.create_model(_VIT_TIMM_NAMES[pe], dynamic_img_size=not ape, depth=_VIT_TIMM_DEPTH,
                             num_classes=100)
    _vit_stress_init_(peer, seed=1).eval()
    ours = None
    worst = {}
    for i, size in enumerate(_VIT_SIZES):
        if ape:
            peer.set_input_size(img_size=size)
            with torch.no_grad():
                peer.pos_embed.copy_(torch.randn(peer.pos_embed.shape, generator=torch.Generator().manual_seed(i)) * .5)
        if ours is None or ape:
            ours = _vit_on_meta_then_load(peer.state_dict(), pe=pe, depth=_VIT_TIMM_DEPTH, num_classes=100,
                                          **(dict(img_size=size) if ape else {}))
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            a, b = ours(x), peer(x)
        assert b.std() > 0.5  # stressed weights: logits of order 1, position mistakes show
        worst[size] = (a - b).abs().max().item()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    print(pe, 'max |dlogit| vs timm:', {f'{h}x{w}': f'{d:.1e}' for (h, w), d in worst.items()})


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

_VIT_OFFICIAL_KEY_COUNTS = {'ape': 176, 'rope_axial': 175, 'rope_mixed': 178,
                            'rope_axial_ape': 176, 'rope_mixed_ape': 179}


def _vit_official_state_dict(model):
    """Our ViT-S state dict written in the released layout (OFFICIAL_NOTES section 2)."""
    sd = dict(model.state_dict())
    if 'freqs' in sd:  # the official Mixed models also save their 14x14 position buffers
        sd['freqs_t_x'] = torch.arange(196, dtype=torch.float32) % 14
        sd['freqs_t_y'] = torch.div(torch.arange(196), 14, rounding_mode='floor').float()
    return sd


def test_vit_published_checkpoint_round_trip(tmp_path):
    with torch.device('meta'):  # ViT-S in the released layout; init skipped, weights drawn below
        model, fresh, at64 = (rope_vit.create_model('rope_mixed_ape_deit_small_patch16_LS', img_size=s)
                              for s in (224, 224, 64))
    model.to_empty(device='cpu')
    torch.manual_seed(0)
    with torch.no_grad():
        model.freqs.copy_(rope_vit.init_mixed_freqs(64, 12, 6, 10.0))
    _vit_stress_init_(model).eval()
    sd = _vit_official_state_dict(model)
    assert len(sd) == _VIT_OFFICIAL_KEY_COUNTS['rope_mixed_ape']
    assert sd['freqs'].shape == (2, 12, 192) and sd['pos_embed'].shape == (1, 196, 384)
    path = tmp_path / 'rope_mixed_ape_deit_small_patch16_LS.pth'
    torch.save({'model': sd}, path)
    x = torch.randn(1, 3, 64, 64)  # small input: keeps this ViT-S test fast
    with torch.no_grad():
        ref = model(x)  # built at 224, run at 64: APE resized on the fly
        assert ref.std() > 0.5
        fresh.to_empty(device='cpu').eval()
        assert rope_vit.load_checkpoint(fresh, path) == ([], [])
        torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
        # the official recipe: build for the new size, load the 224 file (APE resized when loading)
        at64.to_empty(device='cpu').eval()
        rope_vit.load_checkpoint(at64, str(path))
        torch.testing.assert_close(at64(x), ref, atol=1e-5, rtol=0)


def test_vit_state_dict_layout_and_key_counts():
    for pe, count in _VIT_OFFICIAL_KEY_COUNTS.items():
        with torch.device('meta'):
            model = rope_vit.create_model('vit_small', pe=pe)
        sd = _vit_official_state_dict(model)
        assert len(sd) == count, pe
        assert all(v.dtype == torch.float32 for v in sd.values())
        assert sd['blocks.0.attn.qkv.weight'].shape == (1152, 384)
        assert sd['blocks.11.gamma_2'].shape == (384,) and sd['cls_token'].shape == (1, 1, 384)
        assert ('freqs' in sd) == ('mixed' in pe) and ('pos_embed' in sd) == pe.endswith('ape')
        assert not [k for k, _ in model.named_buffers()]  # no position state: built per forward
        nwd = model.no_weight_decay()
        assert nwd <= dict(model.named_parameters()).keys() and 'cls_token' in nwd
        assert ('freqs' in nwd) == ('mixed' in pe) and ('pos_embed' in nwd) == pe.endswith('ape')


def test_vit_training_checkpoint_and_timm_layout_load(tmp_path):
    model = _vit_tiny('rope_mixed_ape', img_size=(64, 96))
    path = tmp_path / 'checkpoint.pth'
    args = {'model': 'vit_tiny', 'pe': 'rope_mixed_ape', 'model_kwargs': {**_VIT_TINY, 'img_size': [64, 96]}}
    torch.save({'model': model.state_dict(), 'optimizer': {'state': {}}, 'epoch': 3, 'args': args}, path)
    x = torch.randn(1, 3, 96, 64)
    fresh = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **_VIT_TINY, img_size=(64, 96)).eval()
    rope_vit.load_checkpoint(fresh, path)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    # a model built for 48x48 gets the stored 4x6 grid (named by args, 24 is no square) resized to 3x3
    small = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **_VIT_TINY, img_size=48).eval()
    rope_vit.load_checkpoint(small, path)
    grid = model.pos_embed.detach().reshape(1, 4, 6, 64).permute(0, 3, 1, 2)  # (1, C, 4, 6)
    ref = F.interpolate(grid, size=(3, 3), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 9, 64)
    torch.testing.assert_close(small.pos_embed.detach(), ref, atol=1e-6, rtol=0)
    # timm layout: rope.freqs (2, L, heads, D/2) plus non-persistent rope buffers
    sd = dict(model.state_dict())
    sd['rope.freqs'] = sd.pop('freqs').unflatten(-1, (2, 16))
    sd['rope.t_x'] = torch.zeros(24)
    other = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **_VIT_TINY, img_size=(64, 96)).eval()
    rope_vit.load_checkpoint(other, {'state_dict': sd})
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


def test_vit_load_errors_name_keys(tmp_path):
    model = rope_vit.create_model('vit_tiny', pe='rope_mixed', **_VIT_TINY)
    sd = dict(model.state_dict())
    sd.pop('blocks.1.mlp.fc2.bias')
    sd['extra.weight'] = torch.zeros(3)
    sd['head.weight'] = torch.zeros(7, 64)
    with pytest.raises(ValueError) as err:
        rope_vit.load_checkpoint(model, {'model': sd})
    msg = str(err.value)
    assert 'blocks.1.mlp.fc2.bias' in msg and 'extra.weight' in msg
    assert 'head.weight' in msg and '(7, 64)' in msg and '(10, 64)' in msg
    with pytest.raises(ValueError, match='head.weight'):  # a wrong shape is never tolerated
        rope_vit.load_checkpoint(model, sd, strict=False)
    sd['head.weight'] = model.head.weight.detach().clone()
    assert rope_vit.load_checkpoint(model, sd, strict=False) == (['blocks.1.mlp.fc2.bias'], ['extra.weight'])
    with pytest.raises(ValueError, match='missing keys'):  # long lists are cut with a count
        rope_vit.load_checkpoint(model, {'cls_token': model.cls_token})
    with pytest.raises(FileNotFoundError):
        rope_vit.load_checkpoint(model, tmp_path / 'absent.pth')
    bad = tmp_path / 'truncated.pth'
    torch.save({'model': model.state_dict()}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        rope_vit.load_checkpoint(model, bad)


# ---------------------------------------------------------------------------------------
# Published weights: pretrained=True from torch.hub's cache, safetensors
# ---------------------------------------------------------------------------------------

def _offline_hub(monkeypatch, tmp_path):
    """An empty torch.hub cache under tmp_path and no network: any download attempt fails."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError('no network in the tests')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)


def _published_with_drawn_weights(module, name, seed=0):
    """The published architecture `name` with every parameter and buffer drawn N(0, 0.05)
    (built on meta first, so the slow initialisation is skipped)."""
    with torch.device('meta'):
        model = module.create_model(name)
    model.to_empty(device='cpu')
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():  # Swin-Axial's rope_freqs is a persistent buffer
            t.normal_(0, 0.05)
    return model


def _place_in_hub_cache(module, name, state_dict):
    path = module.pretrained_cache_path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'model': state_dict}, path)
    return path


def test_vit_pretrained_loads_the_cached_file_strictly_without_network(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    name = 'rope_mixed_ape_deit_small_patch16_LS'
    published = _published_with_drawn_weights(rope_vit, name)
    path = _place_in_hub_cache(rope_vit, name, _vit_official_state_dict(published))  # official layout
    assert path == str(tmp_path / 'torch_home' / 'hub' / 'checkpoints' / f'{name}.pth')
    assert rope_vit.PRETRAINED_URLS[name] == f'https://huggingface.co/naver-ai/{name}/resolve/main/pytorch_model.bin'
    assert len(rope_vit.PRETRAINED_URLS) == 15 and set(rope_vit.PRETRAINED_URLS) == set(rope_vit.PUBLISHED)
    expected = published.state_dict()
    model = rope_vit.create_model(name, pretrained=True)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    # another class count: all but the new head loaded; its init kept
    ten = rope_vit.create_model(name, pretrained=True, num_classes=10)
    assert ten.head.weight.shape == (10, 384) and torch.equal(ten.freqs, expected['freqs'])
    assert torch.equal(ten.blocks[3].attn.qkv.weight, expected['blocks.3.attn.qkv.weight'])
    # not in the cache and no network: one error naming the URL and where to put the file
    other = 'rope_axial_deit_small_patch16_LS'
    with pytest.raises(RuntimeError) as err:
        rope_vit.create_model(other, pretrained=True)
    assert rope_vit.PRETRAINED_URLS[other] in str(err.value)
    assert rope_vit.pretrained_cache_path(other) in str(err.value)
    with pytest.raises(ValueError, match='needs a published name'):
        rope_vit.create_model('vit_small', pretrained=True)
    with open(path, 'r+b') as f:  # a damaged cached file is named, with what to do
        f.truncate(1000)
    with pytest.raises(ValueError, match='delete the file to download it again'):
        rope_vit.create_model(name, pretrained=True)


def _safetensors_sample():
    torch.manual_seed(0)
    return {
        'f32': torch.randn(3, 5), 'f64': torch.randn(2, 2, dtype=torch.float64),
        'f16': torch.randn(4).half(), 'bf16': torch.randn(2, 3).bfloat16(),
        'i64': torch.arange(-3, 3), 'i32': torch.arange(6, dtype=torch.int32).reshape(2, 3),
        'i16': torch.tensor([-7, 8], dtype=torch.int16), 'i8': torch.tensor([-1, 2], dtype=torch.int8),
        'u8': torch.tensor([0, 255], dtype=torch.uint8), 'bool': torch.tensor([True, False, True]),
        'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 4),
    }


@pytest.mark.parametrize('module', [rope_vit, swin_rope], ids=['rope_vit', 'swin_rope'])
def test_safetensors_reader_matches_the_safetensors_package(tmp_path, module):
    st = pytest.importorskip('safetensors.torch')
    tensors = _safetensors_sample()
    path = str(tmp_path / 'sample.safetensors')
    st.save_file(tensors, path, metadata={'format': 'pt'})
    read = module.read_safetensors(path)
    assert list(read) == list(st.load_file(path))
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
        assert torch.equal(read[key], value), key
    # recognised by content too (a hub file saved under another name)
    renamed = tmp_path / 'model.bin'
    renamed.write_bytes(open(path, 'rb').read())
    assert module.is_safetensors(str(renamed)) and torch.equal(module.read_checkpoint_file(renamed)['f32'], tensors['f32'])
    # truncated, not safetensors at all, malformed header, unknown dtype: one ValueError naming the file
    data = open(path, 'rb').read()
    bad = tmp_path / 'bad.safetensors'
    header = json.loads(data[8:8 + int.from_bytes(data[:8], 'little')])
    cases = {
        'truncated': data[:-7],
        'random bytes': np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        'no JSON': (12).to_bytes(8, 'little') + b'not json !!!',
        'unknown dtype': (lambda h: len(h).to_bytes(8, 'little') + h)(
            json.dumps({**header, 'f32': {**header['f32'], 'dtype': 'C64'}}).encode()) + data[8 + len(json.dumps(header)):],
        'offsets that lie': (lambda h: len(h).to_bytes(8, 'little') + h)(
            json.dumps({**header, 'f32': {**header['f32'], 'data_offsets': [0, 4]}}).encode()),
    }
    for case, content in cases.items():
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            module.read_safetensors(str(bad))
        with pytest.raises(ValueError):
            module.load_checkpoint(_vit_tiny('rope_mixed') if module is rope_vit else _swin_small_model('rope_mixed'),
                                   str(bad))


def test_vit_loads_timm_safetensors_like_the_pth(tmp_path):
    st = pytest.importorskip('safetensors.torch')
    model = _vit_tiny('rope_mixed_ape')
    sd = dict(model.state_dict())  # timm's layout, as its hub model.safetensors files hold it
    sd['rope.freqs'] = sd.pop('freqs').unflatten(-1, (2, 16)).contiguous()
    st.save_file(sd, str(tmp_path / 'model.safetensors'))
    other = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **_VIT_TINY).eval()
    assert rope_vit.load_checkpoint(other, tmp_path / 'model.safetensors') == ([], [])
    x = torch.randn(1, 3, 48, 32)
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# Pooling: class token (the paper's) or the mean of the patch tokens without a class token
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('pe', ['ape', 'rope_axial', 'rope_mixed_ape'])
def test_vit_avg_pool_has_no_class_token_and_classifies_the_mean_of_patches(pe):
    model = _vit_tiny(pe, global_pool='avg', patch_size=8, img_size=32)
    assert 'cls_token' not in model.state_dict() and model.num_prefix_tokens == 0
    x = torch.randn(2, 3, 32, 48)  # 4 x 6 patches
    with torch.no_grad():
        logits = model(x)
        readable, attns = model.forward_with_attention(x)
        # independent of _tokens: the blocks one by one on the embedded patches, as Block.forward
        tokens = model.patch_embed(x)  # (B, N, C)
        if model.use_ape:
            tokens = tokens + rope_vit.resize_pos_embed(model.pos_embed, model.grid_size, (4, 6))
        rope = model.block_rotations(4, 6, x.device)
        for i, block in enumerate(model.blocks):
            tokens = block(tokens, None if rope is None else rope[i])[0]
        want = model.head(model.norm(tokens).mean(dim=1))
        maps = model.forward_intermediates(x, indices=[-1], intermediates_only=True, return_prefix_tokens=True)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(readable, want, atol=1e-5, rtol=1e-5)
    assert [a.shape for a in attns] == [(2, 2, 24, 24)] * model.depth  # patches only
    assert maps[0][0].shape == (2, model.embed_dim, 4, 6) and maps[0][1].shape == (2, 0, model.embed_dim)
    assert 'cls_token' in _vit_tiny(pe, patch_size=8).state_dict()  # the default keeps the paper's class token


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed'])
def test_vit_rope_without_class_token_depends_on_relative_positions_only(pe):
    """RoPE leaves the class token unrotated at position (0, 0), so its offsets to the patches are
    their absolute positions: moving every patch position by one offset changes the logits of the
    paper's model and leaves those of the avg-pool model (no class token, no APE) unchanged."""
    x = torch.randn(2, 3, 32, 32)
    for global_pool, changes in (('token', True), ('avg', False)):
        model = _vit_tiny(pe, global_pool=global_pool, patch_size=8, img_size=32)
        with torch.no_grad():
            base = model(x)
            model.rope_coord_augment = (0.7, -0.45, 1.0, 1.0)  # + 1.4 and - 0.9 patches on the 4 x 4 grid
            moved = model(x)
            readable = model.forward_with_attention(x)[0]
        torch.testing.assert_close(moved, readable, atol=1e-5, rtol=1e-5)  # fused = readable, shifted
        if changes:
            assert (moved - base).abs().max() > 1e-2
        else:
            torch.testing.assert_close(moved, base, atol=2e-5, rtol=1e-5)


def test_vit_avg_pool_trains_fused_equal_readable_and_checks_its_options():
    model = _vit_tiny('rope_mixed', global_pool='avg', patch_size=8, img_size=32).train()
    x = torch.randn(2, 3, 32, 48)
    model(x).square().sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.forward_with_attention(x)[0].square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
    assert 'cls_token' not in model.no_weight_decay()
    with pytest.raises(ValueError, match="global_pool must be 'token' or 'avg'"):
        rope_vit.create_model('vit_tiny', global_pool='mean')
    with pytest.raises(ValueError, match='window_size needs the class token'):
        rope_vit.create_model('vit_tiny', global_pool='avg', window_size=2)


# ---------------------------------------------------------------------------------------
# Dense prediction: forward_intermediates, ViTDet-style window attention
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [(64, 64), (48, 80)])
def test_vit_forward_intermediates_maps(size):
    model = _vit_tiny('rope_mixed', depth=3)
    x = torch.randn(2, 3, *size)
    grid = (size[0] // 16, size[1] // 16)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert final.shape == (2, 1 + grid[0] * grid[1], 64)
        assert [m.shape for m in maps] == [(2, 64, *grid)] * 3
        torch.testing.assert_close(final[:, 0], model.forward_features(x), atol=1e-6, rtol=0)
        # NCHW is the NLC token sequence laid on the grid: token 1 + y * Wp + x at [:, :, y, x]
        tokens = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt='NLC', intermediates_only=True)[0]
        torch.testing.assert_close(tokens, final[:, 1:], atol=0, rtol=0)
        y, x_ = grid[0] - 1, 1
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed[:, :, y, x_], final[:, 1 + y * grid[1] + x_], atol=0, rtol=0)
        # indices: the last n, a list with negatives; stop_early skips later blocks; prefix tokens
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(first[0], maps[0], atol=0, rtol=0)
        pairs = model.forward_intermediates(x, indices=[0, -1], return_prefix_tokens=True, intermediates_only=True)
        assert pairs[1][1].shape == (2, 1, 64)
    for bad in (dict(indices=4), dict(indices=[3]), dict(indices=0), dict(output_fmt='NHWC'),
                dict(indices=[0], stop_early=True)):
        with pytest.raises(ValueError):
            model.forward_intermediates(x, **bad)


def test_vit_window_attention_covering_the_grid_is_global_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 1 + 5 * 7, 16).unbind(0)  # (B, heads, T, D), grid 5 x 7
    full = F.scaled_dot_product_attention(q, k, v)
    for window in (7, 9):  # one window, padded to 7x7 / 9x9
        torch.testing.assert_close(rope_vit.window_attention(q, k, v, (5, 7), window), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize('grid,window', [((5, 7), 3), ((6, 4), 2), ((4, 9), 4)])
def test_vit_window_attention_equals_masked_full_attention(grid, window):
    """Partitioned (padded where the grid does not tile) vs softmax over full attention with the
    window mask: patches see their window and the class token, the class token sees all."""
    torch.manual_seed(0)
    T = 1 + grid[0] * grid[1]
    q, k, v = torch.randn(3, 2, 3, T, 8, dtype=torch.float64).unbind(0)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    allowed[0, :] = allowed[:, 0] = True
    for i in range(grid[0] * grid[1]):
        for j in range(grid[0] * grid[1]):
            (yi, xi), (yj, xj) = divmod(i, grid[1]), divmod(j, grid[1])
            allowed[1 + i, 1 + j] = (yi // window, xi // window) == (yj // window, xj // window)
    assert torch.equal(rope_vit.window_attention_mask(grid, window), allowed)
    logits = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~allowed, float('-inf'))
    ref = logits.softmax(-1) @ v
    torch.testing.assert_close(rope_vit.window_attention(q, k, v, grid, window), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize('pe', ['rope_mixed', 'rope_axial_ape'])
def test_vit_windowed_backbone(pe):
    x = torch.randn(2, 3, 80, 112)  # grid 5 x 7: 3x3 windows need padding
    windowed = _vit_tiny(pe, depth=3, window_size=3, global_blocks=(-2,))
    assert windowed.block_windows == [3, None, 3]
    plain = rope_vit.create_model('vit_tiny', pe=pe, **{**_VIT_TINY, 'depth': 3}).eval()
    assert plain.state_dict().keys() == windowed.state_dict().keys()  # published weights load unchanged
    plain.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        out = windowed(x)
        explicit, attn = windowed.forward_with_attention(x)  # readable RoPE, masked explicit softmax
        torch.testing.assert_close(out, explicit, atol=1e-5, rtol=0)
        assert (out - plain(x)).abs().max() > 0.1  # the windows matter with these weights
        outside = ~rope_vit.window_attention_mask((5, 7), 3)  # (T, T)
        assert attn[0][:, :, outside].abs().max() == 0 and attn[1][:, :, outside].abs().max() > 0  # block 1 is global
        covering = rope_vit.create_model('vit_tiny', pe=pe, **{**_VIT_TINY, 'depth': 3}, window_size=7,
                                         global_blocks=(1,)).eval()
        covering.load_state_dict(windowed.state_dict())
        torch.testing.assert_close(covering(x), plain(x), atol=0, rtol=0)
        maps = windowed.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert [m.shape for m in maps] == [(2, 64, 5, 7)] * 2
    # training through the fast path: the RoPE-Mixed frequencies get a finite gradient
    windowed.train()
    windowed(x).square().mean().backward()
    if pe == 'rope_mixed':
        assert torch.isfinite(windowed.freqs.grad).all() and windowed.freqs.grad.abs().sum() > 0
    with torch.device('meta'):  # the published ViT-B loads into the ViTDet layout
        vitdet = rope_vit.create_model('rope_mixed_deit_base_patch16_LS', window_size=14, global_blocks=(2, 5, 8, 11))
        published = rope_vit.create_model('rope_mixed_deit_base_patch16_LS')
    assert {k: v.shape for k, v in vitdet.state_dict().items()} == {k: v.shape for k, v in published.state_dict().items()}


def test_vit_window_config_errors():
    for kwargs, message in ((dict(window_size=0), 'window_size must be a positive'),
                            (dict(window_size=2.5), 'window_size must be a positive'),
                            (dict(window_size=3, global_blocks=(2,)), 'not a block index of a depth-2'),
                            (dict(window_size=3, global_blocks=(-3,)), 'not a block index'),
                            (dict(global_blocks=(0,)), 'global_blocks needs window_size')):
        with pytest.raises(ValueError, match=message):
            rope_vit.create_model('vit_tiny', pe='rope_mixed', **_VIT_TINY, **kwargs)


# ---------------------------------------------------------------------------------------
# Deploy: torch.compile, torch.export, ONNX (they trace the readable, real-valued formula)
# ---------------------------------------------------------------------------------------

def _recording_backend(complex_nodes):
    """A torch.compile backend: notes every node of the captured graph that makes a complex
    tensor, then runs that graph as it is (dynamo's capture only: no AOT tracing, no code generation)."""
    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get('example_value', node.meta.get('val'))
            values = value if isinstance(value, (tuple, list)) else [value]
            complex_nodes.extend(node.format_node() for v in values if isinstance(v, torch.Tensor) and v.is_complex())
        return gm.forward
    return backend


def _compiled_matches_eager(model, compiled, eval_sizes, train_size, tol):
    """Logits at eval_sizes and a training step's gradients of the compiled model equal eager's."""
    model.eval()
    with torch.no_grad():
        for size in eval_sizes:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), atol=tol, rtol=tol)
    model.train()
    x = torch.randn(2, 3, *train_size)
    compiled(x).square().mean().backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=tol, rtol=tol, msg=name)
    model.eval()


@pytest.mark.parametrize('pe', rope_vit.PE_VARIANTS)
def test_vit_compile_fullgraph_dynamic_every_pe(pe):
    """torch.compile(fullgraph=True, dynamic=True) of every PE variant with a recording backend:
    dynamo captures the whole forward (fullgraph raises on any graph break) and the graph runs
    as captured. Inductor would add tens of seconds of code generation per compile on CPU, so it
    runs once, in test_vit_compile_inductor_warns_nothing. Checks: no complex tensor in the
    captured graphs (inductor cannot generate code for them), logits at two sizes and the
    gradients of a training step equal eager."""
    torch._dynamo.reset()
    model = _vit_tiny(pe, patch_size=8, img_size=32)
    complex_nodes = []
    compiled = torch.compile(model, backend=_recording_backend(complex_nodes), fullgraph=True, dynamic=True)
    _compiled_matches_eager(model, compiled, [(32, 48), (64, 40)], (48, 32), tol=1e-4)
    assert complex_nodes == []


def _inductor_run(model, eval_sizes, train_size):
    """Compile with inductor (fullgraph, dynamic) and return the warnings raised while it ran."""
    import torch._inductor.lowering as lowering
    torch._dynamo.reset()
    if hasattr(lowering, '_warn_complex_not_supported'):  # it warns once per process
        lowering._warn_complex_not_supported.cache_clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _compiled_matches_eager(model, compiled, eval_sizes, train_size, tol=1e-4)
    return [str(w.message) for w in caught]


def test_vit_compile_inductor_warns_nothing():
    """Inductor, fullgraph, dynamic (main warned 'does not support code generation for complex
    operators'): RoPE-Mixed + APE with one block (each block compiles to the same kernels),
    eval and a training step, equal to eager. The costliest test (about a minute on 2 cores)."""
    messages = _inductor_run(_vit_tiny('rope_mixed_ape', patch_size=8, img_size=32, depth=1), [(32, 48)], (48, 32))
    assert not [m for m in messages if 'complex' in m.lower()], messages


@pytest.mark.parametrize('pe', rope_vit.PE_VARIANTS)
def test_vit_export_dynamic_size_and_onnxruntime(pe, tmp_path):
    """torch.export with dynamic height and width (multiples of the patch size), traced at 32x48
    and run at two other sizes; then that one program to ONNX (dynamo exporter) and run with
    onnxruntime on CPU at the same two sizes: max |logit difference| to eager <= 1e-4."""
    model = _vit_tiny(pe, patch_size=8, img_size=32)
    height, width = torch.export.Dim('height', min=1, max=64), torch.export.Dim('width', min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 48),),
                                  dynamic_shapes={'x': {2: 8 * height, 3: 8 * width}})
    inputs = [torch.randn(2, 3, 56, 24), torch.randn(2, 3, 40, 72)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    for x, want in zip(inputs, expected):
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)
    _check_onnxruntime(program, inputs, expected, tmp_path / f'vit_{pe}.onnx')


def _check_onnxruntime(program, inputs, expected, path):
    """Export a torch.export program to ONNX and compare onnxruntime's outputs (max |diff| <= 1e-4)."""
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    torch.onnx.export(program, dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for x, want in zip(inputs, expected):
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4, (tuple(x.shape), np.abs(got - want.numpy()).max())


# ---------------------------------------------------------------------------------------
# Model API, sizes, training, dtypes
# ---------------------------------------------------------------------------------------

def test_vit_parameter_counts():
    expected_small = {'ape': 22_059_496, 'rope_axial': 21_984_232, 'rope_mixed': 21_988_840,
                      'rope_axial_ape': 22_059_496, 'rope_mixed_ape': 22_064_104, 'none': 21_984_232}
    with torch.device('meta'):  # no init cost
        for pe, count in expected_small.items():
            assert sum(p.numel() for p in rope_vit.create_model('vit_small', pe=pe).parameters()) == count
        for name, target in [('deit_base_patch16_LS', 86.6e6), ('rope_mixed_deit_base_patch16_LS', 86.6e6),
                             ('deit_large_patch16_LS', 304e6), ('rope_mixed_ape_deit_large_patch16_LS', 304e6)]:
            count = sum(p.numel() for p in rope_vit.create_model(name).parameters())
            assert abs(count / target - 1) < 0.005, (name, count)


def test_vit_create_model_names_and_errors():
    names = rope_vit.list_models()
    assert len(names) == 4 + 15 and 'vit_small' in names and 'rope_axial_ape_deit_large_patch16_LS' in names
    with torch.device('meta'):
        for name in names[4:]:  # e.g. rope_mixed_ape_deit_base_patch16_LS
            prefix, size = name.split('_patch16_LS')[0].rsplit('_', 1)
            m = rope_vit.create_model(name, depth=1)  # depth: only to keep this test fast
            assert m.pe == ('ape' if prefix == 'deit' else prefix[:-len('_deit')])
            assert m.num_features == {'small': 384, 'base': 768, 'large': 1024}[size]
            assert m.rope_theta == (100.0 if 'axial' in name else 10.0 if 'mixed' in name else None)
        m = rope_vit.create_model('rope_axial_deit_small_patch16_LS')
        assert (m.pe, m.rope_theta, m.patch_size, m.img_size, m.num_features, m.num_classes) == \
            ('rope_axial', 100.0, 16, 224, 384, 1000)
        assert rope_vit.create_model('rope_mixed_ape_deit_base_patch16_LS').pe == 'rope_mixed_ape'
        assert rope_vit.create_model('deit_small_patch16_LS').pe == 'ape'
    with pytest.raises(ValueError, match='vit_small'):
        rope_vit.create_model('vit_huge')
    with pytest.raises(ValueError, match='rope_mixed_ape'):
        rope_vit.create_model('vit_tiny', pe='rope')
    with pytest.raises(ValueError, match='contradicts'):
        rope_vit.create_model('deit_small_patch16_LS', pe='rope_mixed')


def test_vit_invalid_size_error_names_patch_size_and_nearest_sizes():
    model = _vit_tiny('rope_mixed')
    with pytest.raises(ValueError) as err:
        model(torch.randn(1, 3, 100, 224))
    assert 'patch size 16' in str(err.value) and '96x224' in str(err.value) and '112x224' in str(err.value)
    with pytest.raises(ValueError, match='16x16'):
        model.check_img_size(0, 8)
    model.check_img_size(16, 1024)
    with pytest.raises(ValueError, match='patch size'):
        rope_vit.create_model('vit_tiny', img_size=100)


@pytest.mark.parametrize('pe', rope_vit.PE_VARIANTS)
def test_vit_any_grid_and_attention_probabilities(pe):
    model = _vit_tiny(pe, patch_size=8, img_size=32)
    x = torch.randn(2, 3, 24, 40)  # 3x5 grid, never built for
    with torch.no_grad():
        logits = model(x)
        logits2, attn = model.forward_with_attention(x)
    assert logits.shape == (2, 10) and model.forward_features(x).shape == (2, 64)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)  # explicit softmax == SDPA
    assert len(attn) == 2 and attn[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(attn[1].sum(-1), torch.ones(2, 2, 16), atol=1e-5, rtol=0)


def test_vit_fp32_backward_reaches_freqs():
    model = _vit_tiny('rope_mixed_ape').train()
    model.blocks[0].drop_path.p = 0.1
    loss = F.cross_entropy(model(torch.randn(2, 3, 48, 64)), torch.tensor([1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.freqs.grad.abs().min() > 0  # every layer, head and pair gets a gradient
    # the gradient of Eq. 14's frequencies matches a finite difference along a random direction
    model.eval().double()
    x = torch.randn(1, 3, 48, 64, dtype=torch.float64)
    direction = torch.randn_like(model.freqs)
    model.zero_grad()
    model(x).square().sum().backward()
    with torch.no_grad():
        eps = 1e-6
        model.freqs += eps * direction
        up = model(x).square().sum()
        model.freqs -= 2 * eps * direction
        down = model(x).square().sum()
    torch.testing.assert_close((up - down) / (2 * eps), (model.freqs.grad * direction).sum(), rtol=1e-5, atol=1e-6)


def test_vit_bf16_autocast_close_to_fp32_at_512():
    model = _vit_tiny('rope_mixed', num_classes=100)
    x = torch.randn(1, 3, 512, 512)  # 32x32 grid: angles up to ~30 rad
    with torch.autocast('cpu', dtype=torch.bfloat16):
        tables = model.block_rotations(32, 32, x.device)
        low = model(x)
    assert tables[0][0].dtype == torch.float32  # angles and cos/sin stay fp32 under autocast
    for got, want in zip(tables[1], model.block_rotations(32, 32, x.device)[1]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.no_grad():
        ref = model(x)
    # bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding); over two stressed blocks the
    # logits (std 1.2) drift by ~0.02 (measured), so 10 % of the logit std leaves a 7x margin for
    # other BLAS kernels. Angles rounded to bf16 add only ~0.03 here: the fp32 check of the
    # tables above is what guards them.
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max().item()
    assert err < 0.1 * ref.std().item(), err
    # a bf16 training step works and reaches the frequencies
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = F.cross_entropy(model(torch.randn(2, 3, 64, 48)), torch.tensor([0, 1]))
    loss.backward()
    assert model.freqs.grad.dtype == torch.float32 and model.freqs.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ==============================================================================================
# swin_rope.py: Eq. 15 in windows, torchvision equivalence, masks, resolutions, checkpoints
# ==============================================================================================

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
    cos, sin = swin_rope.rope_cos_sin(swin_rope.rope_angles(freqs, t_x, t_y))  # (nH, N, d/2) each
    q, k = torch.randn(2, heads, w * w, d).unbind(0)
    logits = swin_rope.apply_rope(q, cos, sin) @ swin_rope.apply_rope(k, cos, sin).transpose(-1, -2)
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
    qr, kr = swin_rope.apply_rope(qkv[:2], *attn.rope_tables(w)).unbind(0)
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


def test_swin_fused_rotation_equals_readable():
    """Eager forward (one complex multiply, cached factors) equals the readable real formula."""
    attn = _swin_redraw(_swin_small_model('rope_mixed')).layers[0].blocks[0].attn
    qk = torch.randn(2, 3, attn.num_heads, 36, attn.head_dim)  # (q|k, B_, nH, N, d), window 6
    with torch.no_grad():
        torch.testing.assert_close(swin_rope.rotate_fused(qk, attn, 6),
                                   swin_rope.apply_rope(qk, *attn.rope_tables(6)), atol=2e-6, rtol=1e-5)


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


# ----------------------------------------------------------------------------------------------
# Deploy: torch.compile, torch.export, ONNX (they trace the readable, real-valued formula)
# ----------------------------------------------------------------------------------------------
# Swin's window follows the input size (r / 32 for the published models), so a graph with a
# symbolic size carries symbolic window shapes through every partition, shift and mask. Tracing
# that is slow on 2 CPU cores (about 30 s for dynamo's capture, 40-60 s for torch.export, one
# stage), so the per-variant tests trace per size (dynamic=False, one export per resolution),
# and two tests trace one stage (a plain and a shifted block) of the richest variant,
# RoPE-Mixed + RPB, with a symbolic square size. ONNX stays per resolution: its Roll has no
# symbolic shift.

def _swin_one_stage():
    """RoPE-Mixed + RPB, one stage of a plain and a shifted block, built for 64 x 64 with window 4:
    (window, shift) (4, 2) at 64, (6, 3) at 96, (8, 4) at 128."""
    return _swin_redraw(_swin_small_model('rope_mixed_rpb', depths=(2,), num_heads=(2,)))


@pytest.mark.parametrize('pe', swin_rope.PE_VARIANTS)
def test_swin_compile_fullgraph_every_pe(pe):
    """torch.compile(fullgraph=True, dynamic=False) of every PE variant with the recording backend
    of the ViT tests (dynamo's capture, no code generation): no graph break, no complex tensor in
    the graphs, logits at two sizes and a training step's gradients equal eager."""
    torch._dynamo.reset()
    model = _swin_redraw(_swin_small_model(pe))
    complex_nodes = []
    compiled = torch.compile(model, backend=_recording_backend(complex_nodes), fullgraph=True, dynamic=False)
    _compiled_matches_eager(model, compiled, [(64, 64), (96, 96)], (64, 64), tol=1e-4)
    assert complex_nodes == []


def test_swin_compile_inductor_warns_nothing():
    """Inductor, fullgraph (static sizes, see above): RoPE-Mixed + RPB, one stage of a plain and a
    shifted block (the others compile to the same kernels), eval and a training step equal to
    eager, and no 'complex operators' warning. About a minute on 2 cores."""
    model = _swin_one_stage()
    torch._dynamo.reset()
    import torch._inductor.lowering as lowering
    if hasattr(lowering, '_warn_complex_not_supported'):  # it warns once per process
        lowering._warn_complex_not_supported.cache_clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _compiled_matches_eager(model, compiled, [(64, 64)], (64, 64), tol=1e-4)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if 'complex' in m.lower()], messages


def test_swin_compile_fullgraph_dynamic_one_graph_for_every_size():
    """torch.compile(fullgraph=True, dynamic=True), recording backend: one captured graph serves
    64, 96 and 128 (windows 4, 6, 8 with their shifts) with logits equal to eager, no complex
    tensor in it, and a training step's gradients equal eager. About 40-80 s on 2 cores."""
    torch._dynamo.reset()
    model = _swin_one_stage()
    complex_nodes, graphs = [], []
    record = _recording_backend(complex_nodes)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return record(gm, example_inputs)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for size in (64, 96, 128):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1, 'a new size recompiled'
    _compiled_matches_eager(model, compiled, [], (96, 96), tol=1e-4)
    assert complex_nodes == []


def test_swin_export_dynamic_square_size():
    """torch.export with one symbolic side r = 16 k (H = W; the window 4 r / 64 must be an integer),
    traced at 64 and run at 96 and 128: logits equal eager (<= 1e-5). About 40-60 s on 2 cores."""
    model = _swin_one_stage()
    side = torch.export.Dim('side', min=2, max=32)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                  dynamic_shapes={'x': {2: 16 * side, 3: 16 * side}})
    for size in (96, 128):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('pe', swin_rope.PE_VARIANTS)
def test_swin_export_and_onnxruntime_per_resolution(pe, tmp_path):
    """torch.export at 64 and at 96 (windows 4 and 6, the run-time rule), each program to ONNX
    (dynamo exporter) and run with onnxruntime on CPU: max |logit difference| to eager <= 1e-4."""
    model = _swin_redraw(_swin_small_model(pe, depths=(2, 2), num_heads=(2, 4)))
    for size in (64, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = model(x)
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)
        _check_onnxruntime(program, [x], [want], tmp_path / f'swin_{pe}_{size}.onnx')


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


def test_swin_pretrained_loads_the_cached_file_strictly_without_network(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    name = 'swin_rope_axial_tiny_patch4_window7_224'
    published = _published_with_drawn_weights(swin_rope, name)
    sd = _swin_official_layout(published)  # with the derived tensors the official files hold
    _place_in_hub_cache(swin_rope, name, sd)
    expected = published.state_dict()
    model = swin_rope.create_model(name, pretrained=True)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert swin_rope.create_model(name, pretrained=True, num_classes=5).head.weight.shape == (5, 768)
    assert swin_rope.PRETRAINED_URLS[name].startswith('https://huggingface.co/naver-ai/')
    assert swin_rope.PRETRAINED_URLS['swin_tiny_patch4_window7_224'].endswith(
        '/v1.0.0/swin_tiny_patch4_window7_224.pth')  # RPB: the original Swin release
    assert len(swin_rope.PRETRAINED_URLS) == 9
    with pytest.raises(RuntimeError, match=re.escape(swin_rope.pretrained_cache_path('swin_small_patch4_window7_224'))):
        swin_rope.create_model('swin_small_patch4_window7_224', pretrained=True)
    with pytest.raises(ValueError, match='needs a name with released weights'):
        swin_rope.create_model('swin_rope_mixed_rpb_tiny_patch4_window7_224', pretrained=True)


def test_swin_loads_safetensors(tmp_path):
    st = pytest.importorskip('safetensors.torch')
    src = _swin_redraw(_swin_small_model('rope_mixed_rpb'))
    st.save_file(src.state_dict(), str(tmp_path / 'model.safetensors'))
    dst = _swin_small_model('rope_mixed_rpb', seed=3)
    assert swin_rope.load_checkpoint(dst, tmp_path / 'model.safetensors') == ([], [])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


@pytest.mark.parametrize('size', [(64, 64), (64, 128), (96, 96)])
def test_swin_forward_intermediates_maps(size):
    model = _swin_redraw(_swin_small_model('rope_mixed'))  # 3 stages, patch 4, built at 64 with window 4
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, 16 * 2 ** s, size[0] // (4 * 2 ** s), size[1] // (4 * 2 ** s))
                                           for s in range(3)]
        assert final.shape == (2, size[0] // 16, size[1] // 16, 64)
        torch.testing.assert_close(model.head(final.mean(dim=(1, 2))), model(x), atol=1e-5, rtol=0)
        # channels last is the same map; norm reaches the last stage only (the only one of its width)
        nhwc = model.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(nhwc[0].permute(0, 3, 1, 2), maps[0], atol=0, rtol=0)
        torch.testing.assert_close(nhwc[1], final, atol=0, rtol=0)
        early = model.forward_intermediates(x, indices=1, intermediates_only=True)
        torch.testing.assert_close(early[0], maps[2], atol=0, rtol=0)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(first[0], maps[0], atol=0, rtol=0)
    for bad in (dict(indices=[3]), dict(indices=4), dict(output_fmt='NLC'), dict(indices=[1], stop_early=True)):
        with pytest.raises(ValueError):
            model.forward_intermediates(x, **bad)
    with pytest.raises(ValueError, match='not allowed'):
        model.forward_intermediates(torch.randn(1, 3, 72, 72))


def test_swin_published_mixed_tiny_runs_at_96_224_384():
    torch.manual_seed(0)
    model = swin_rope.create_model('swin_rope_mixed_tiny_patch4_window7_224').eval()
    assert (model.pe, model.num_classes, model.patch_size, model.img_size, model.num_features) == \
        ('rope_mixed', 1000, 4, 224, 768)
    with torch.no_grad():
        for r in (96, 224, 384):
            out = model(torch.randn(1, 3, r, r))
            assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ==============================================================================================
# train.py: torchrun, exact resume, folder and built-in data, LAMB, bad input
# ==============================================================================================

_TRAIN_ROOT = os.path.dirname(os.path.abspath(__file__))
_TRAIN_SCRIPT = os.path.join(_TRAIN_ROOT, 'train.py')
# A ViT small enough for a CPU test: 16 px images, 4 px patches, 2 blocks of width 32.
_TRAIN_TINY = ['--img-size', '16', '--patch-size', '4', '--embed-dim', '32', '--depth', '2',
               '--num-heads', '2', '--eval-resolutions', '16', '--print-freq', '4']


def _train_env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=_TRAIN_ROOT)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    return env


def _train_torchrun(args, nproc=2, launcher=()):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            '--nproc_per_node', str(nproc), *launcher, _TRAIN_SCRIPT] + args


def _train_cli(argv):
    """Run train.py's command line in this process; returns the exit status (0 when none)."""
    try:
        train.cli(train.main, train.get_args_parser(), argv)
    except SystemExit as e:
        return e.code
    return 0


def _train_state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# Every fault test runs this configuration and compares with one uninterrupted run of it:
# 4 epochs of 12 steps at 2 processes, a recovery checkpoint every 5 steps.
_TRAIN_FAULT_ARGS = _TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '192',
                                   '--builtin-val', '20', '--epochs', '4', '--lr', '2e-3',
                                   '--save-every-steps', '5']
_TRAIN_TIMEOUT = 240   # seconds for one tiny run, far above its ~10 s: a hang fails, never stalls


def _train_children(pid):
    """The pids of the children of `pid` (Linux /proc)."""
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _train_kill_tree(pid, sig=signal.SIGKILL):
    """Send `sig` to pid and all its descendants: torchrun starts each worker in a session of
    its own, so killing torchrun's group leaves the workers running."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _train_children(p)
    for p in seen:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class _TrainProcesses:
    """Subprocesses of a test, every one of them (and its workers) killed at the end."""

    def __init__(self):
        self.procs, self.files = [], []

    def __enter__(self):
        return self

    def start(self, cmd, cwd, env=None, log=None):
        out = subprocess.DEVNULL
        if log:
            out = open(log, 'w')
            self.files.append(out)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or _train_env(), text=True, stdout=out,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc_info):
        for proc in self.procs:
            if proc.poll() is None:
                _train_kill_tree(proc.pid)
                proc.wait()
        for f in self.files:
            f.close()


def _train_after_saves(logs, procs, count):
    """Wait until the runs writing `logs` have reported `count` mid-epoch saves (of the 9 that
    _TRAIN_FAULT_ARGS makes, the 8th in the last epoch): a moment chosen by progress rather than
    by time, so that it falls inside training on a fast machine as on a loaded one."""
    deadline = time.time() + _TRAIN_TIMEOUT
    while sum(p.read_text().count('saved recovery_') for p in logs if p.exists()) < count:
        assert time.time() < deadline, f'fewer than {count} saves in {_TRAIN_TIMEOUT} s'
        assert all(p.poll() is None for p in procs), f'a run ended before {count} saves'
        time.sleep(0.005)


def _train_random_moment():
    """After 1-7 saves, then up to 0.1 s (inside a step, a save or an evaluation)."""
    return random.randint(1, 7), random.uniform(0.0, 0.1)


def _train_assert_same_run(reference, other):
    """Two finished runs: bit-identical weights and optimizer state, the same log records
    (but for their wall times)."""
    a, b = _train_state(reference / 'checkpoint.pth'), _train_state(other / 'checkpoint.pth')
    assert a['epoch'] == b['epoch']
    assert a['model'].keys() == b['model'].keys()
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    for s, t in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        for key in s:
            assert torch.equal(torch.as_tensor(s[key]), torch.as_tensor(t[key])), key
    assert a['lr_scheduler']['last_epoch'] == b['lr_scheduler']['last_epoch']

    def records(run):
        lines = (run / 'log.jsonl').read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != 'seconds'} for line in lines]
    assert records(reference) == records(other)


@pytest.fixture(scope='session')
def _train_reference_run(tmp_path_factory):
    """The uninterrupted 2-process run of _TRAIN_FAULT_ARGS: (folder, completed process)."""
    out = tmp_path_factory.mktemp('train_reference') / 'full'
    done = subprocess.run(_train_torchrun(_TRAIN_FAULT_ARGS + ['--output-dir', str(out)]),
                          cwd=out.parent, env=_train_env(), capture_output=True, text=True,
                          timeout=_TRAIN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_train_torchrun_two_processes_outputs_and_recovery_rotation(_train_reference_run):
    full, done = _train_reference_run
    assert done.stdout.count('epoch 1/4 done') == 1          # only rank 0 prints
    assert 'world_size: 2' in done.stdout and 'top-1 accuracy' in done.stdout
    records = [json.loads(line) for line in (full / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2, 3, 4]
    ckpt = _train_state(full / 'checkpoint.pth')
    assert ckpt['epoch'] == 3 and len(ckpt['rng']) == 2 and ckpt['steps_per_epoch'] == 12
    for key in ('model', 'pe', 'model_kwargs', 'img_size', 'num_classes', 'dataset', 'data_path',
                'builtin_val', 'builtin_seed', 'eval_crop_ratio', 'recipe', 'lr', 'batch_size',
                'run_id'):
        assert key in ckpt['args'], key
    assert ckpt['args']['recipe'] == 'demo' and ckpt['args']['dataset'] == 'glyphs'
    assert json.loads((full / 'config.json').read_text()) == ckpt['args']
    assert (full / 'best.pth').is_file() and (full / 'resolutions.json').is_file()
    model = train.build_model(ckpt['args'])
    model.load_state_dict(ckpt['model'])
    # Saves every 5 steps (global steps 5, 10, ..., 45) and at every epoch end; the newest two
    # are kept: the last mid-epoch one (step 45 = epoch 4, step 9: 9 x 16 images) and the end.
    assert [os.path.basename(p) for p in train.recovery_files(str(full))] == [
        'recovery_e0004_i000000000.pth', 'recovery_e0003_i000000144.pth']
    assert os.path.samefile(full / 'checkpoint.pth', full / 'recovery_e0004_i000000000.pth')
    assert done.stdout.count('saved recovery_') == 9   # the epoch ends say 'epoch N done'
    assert not list(full.glob('*.tmp'))
    # A mid-epoch checkpoint holds where the epoch was, per rank.
    mid = _train_state(full / 'recovery_e0003_i000000144.pth')
    assert (mid['epoch'], mid['images'], len(mid['epoch_sums'])) == (2, 144, 2)
    assert train._digest_matches(mid) and train._digest_matches(ckpt)


def test_train_sigkill_at_a_random_moment_then_resume_auto_is_bit_identical(
        _train_reference_run, tmp_path):
    full, _ = _train_reference_run
    cut = tmp_path / 'cut'
    saves, delay = moment = _train_random_moment()
    with _TrainProcesses() as procs:
        log = tmp_path / 'killed.log'
        proc = procs.start(_train_torchrun(_TRAIN_FAULT_ARGS + ['--output-dir', str(cut)]),
                           tmp_path, log=log)
        _train_after_saves([log], [proc], saves)
        time.sleep(delay)
        _train_kill_tree(proc.pid)   # the whole job, workers included, as a node crash
        proc.wait()
    assert proc.returncode != 0, f'the run finished before the kill {moment}'
    resumed = subprocess.run(
        _train_torchrun(_TRAIN_FAULT_ARGS + ['--output-dir', str(cut), '--resume', 'auto']),
        cwd=tmp_path, env=_train_env(), capture_output=True, text=True, timeout=_TRAIN_TIMEOUT)
    assert resumed.returncode == 0, (moment, resumed.stderr[-3000:])
    assert f'resumed from {cut}{os.sep}recovery_e' in resumed.stdout, moment
    _train_assert_same_run(full, cut)
    assert not list(cut.glob('*.tmp'))


def _train_free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _train_wait_gone(pids, timeout=_TRAIN_TIMEOUT):
    deadline = time.time() + timeout
    while any(os.path.exists(f'/proc/{p}') and _train_proc_state(p) != 'Z' for p in pids):
        assert time.time() < deadline, f'processes {pids} did not exit'
        time.sleep(0.01)


def _train_proc_state(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return 'gone'


def _train_stop_message(output):
    stops = re.findall(r'stopped by (SIG\w+) (?:at epoch \d/4, step \d+/12|after epoch \d/4): '
                       r'saved (\S+); run the same command with --resume auto to continue '
                       r'\(exit status 75\)', output)
    assert len(stops) == 1, output[-3000:]   # rank 0 only
    return stops[0]


def test_train_sigterm_stops_every_rank_at_one_step_saves_once_and_resumes_bit_identical(
        _train_reference_run, tmp_path):
    full, _ = _train_reference_run
    cut = tmp_path / 'cut'
    saves, delay = moment = _train_random_moment()
    with _TrainProcesses() as procs:
        log = tmp_path / 'stopped.log'
        proc = procs.start(_train_torchrun(_TRAIN_FAULT_ARGS + ['--output-dir', str(cut)]),
                           tmp_path, log=log)
        _train_after_saves([log], [proc], saves)
        time.sleep(delay)
        workers = _train_children(proc.pid)
        # As a scheduler does: SIGTERM to every process, then again while the state is saved.
        signalled = time.time()
        _train_kill_tree(proc.pid, signal.SIGTERM)
        time.sleep(0.05)
        _train_kill_tree(proc.pid, signal.SIGTERM)
        proc.wait(timeout=_TRAIN_TIMEOUT)
        _train_wait_gone(workers)
        stop_seconds = time.time() - signalled
    output = (tmp_path / 'stopped.log').read_text()
    name, saved = _train_stop_message(output)
    assert name == 'SIGTERM', output[-3000:]
    assert 'train.py", line' not in output, output[-3000:]   # torchrun's own traceback only
    # Bounded: well inside torchrun's 30 s before it sends SIGKILL (measured: about 0.3 s).
    assert stop_seconds < 20, stop_seconds
    assert train.recovery_files(str(cut))[0] == saved and not list(cut.glob('*.tmp'))
    state = _train_state(saved)
    assert train._digest_matches(state) and len(state['rng']) == 2
    resumed = subprocess.run(
        _train_torchrun(_TRAIN_FAULT_ARGS + ['--output-dir', str(cut), '--resume', 'auto']),
        cwd=tmp_path, env=_train_env(), capture_output=True, text=True, timeout=_TRAIN_TIMEOUT)
    assert resumed.returncode == 0, (moment, resumed.stderr[-3000:])
    assert f'resumed from {saved} (--resume auto)' in resumed.stdout
    _train_assert_same_run(full, cut)


def test_train_lost_worker_torchrun_restart_resumes_by_itself_bit_identical(
        _train_reference_run, tmp_path):
    full, _ = _train_reference_run
    cut = tmp_path / 'cut'
    restarting = ['--max-restarts', '1']
    with _TrainProcesses() as procs:
        # No --resume: the restarted workers continue from their own checkpoints all the same.
        log = tmp_path / 'run.log'
        proc = procs.start(_train_torchrun(_TRAIN_FAULT_ARGS + ['--output-dir', str(cut)],
                                           launcher=restarting), tmp_path, log=log)
        saves, delay = _train_random_moment()
        _train_after_saves([log], [proc], saves)
        time.sleep(delay)
        os.kill(_train_children(proc.pid)[-1], signal.SIGKILL)
        assert proc.wait(timeout=_TRAIN_TIMEOUT) == 0, (tmp_path / 'run.log').read_text()[-3000:]
    output = (tmp_path / 'run.log').read_text()
    assert re.search(r'resumed from \S+recovery_e\d+_i\d+\.pth after a torchrun restart',
                     output), output[-3000:]
    _train_assert_same_run(full, cut)


def _train_two_nodes(procs, port, out, cwd, tag, extra=()):
    """Two torchrun agents of one process each, meeting at a c10d rendezvous on localhost: the
    README's several-node command on one machine, with its environment."""
    env = dict(_train_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    agents = []
    for node in range(2):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2',
               '--nproc_per_node', '1', '--rdzv-backend', 'c10d',
               '--rdzv-endpoint', f'localhost:{port}', '--rdzv-id', f'test-{port}',
               '--max-restarts', '1', _TRAIN_SCRIPT] + _TRAIN_FAULT_ARGS + [
               '--output-dir', str(out), '--resume', 'auto', *extra]
        agents.append(procs.start(cmd, cwd, env=env, log=cwd / f'{tag}_node{node}.log'))
    return agents


def test_train_two_nodes_c10d_preempt_resume_and_lost_node_are_bit_identical(
        _train_reference_run, tmp_path):
    full, _ = _train_reference_run
    # 1. Both nodes preempted after a checkpoint, then the same command again on both.
    out = tmp_path / 'preempted'
    with _TrainProcesses() as procs:
        agents = _train_two_nodes(procs, _train_free_port(), out, tmp_path, 'first')
        saves, delay = _train_random_moment()
        _train_after_saves([tmp_path / f'first_node{n}.log' for n in range(2)], agents, saves)
        time.sleep(delay)
        workers = [w for a in agents for w in _train_children(a.pid)]
        for agent in agents:
            _train_kill_tree(agent.pid, signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=_TRAIN_TIMEOUT)
        _train_wait_gone(workers)
    logs = ''.join((tmp_path / f'first_node{n}.log').read_text() for n in range(2))
    _, saved = _train_stop_message(logs)
    with _TrainProcesses() as procs:
        agents = _train_two_nodes(procs, _train_free_port(), out, tmp_path, 'second')
        for agent in agents:
            assert agent.wait(timeout=_TRAIN_TIMEOUT) == 0, logs
    logs = ''.join((tmp_path / f'second_node{n}.log').read_text() for n in range(2))
    assert f'resumed from {saved} (--resume auto)' in logs, logs[-3000:]
    _train_assert_same_run(full, out)

    # 2. A node's worker lost mid-run: both agents restart their workers, which resume.
    out = tmp_path / 'lost'
    with _TrainProcesses() as procs:
        agents = _train_two_nodes(procs, _train_free_port(), out, tmp_path, 'lost')
        saves, delay = _train_random_moment()
        _train_after_saves([tmp_path / f'lost_node{n}.log' for n in range(2)], agents, saves)
        time.sleep(delay)
        os.kill(_train_children(agents[1].pid)[0], signal.SIGKILL)
        for agent in agents:
            assert agent.wait(timeout=_TRAIN_TIMEOUT) == 0
    logs = ''.join((tmp_path / f'lost_node{n}.log').read_text() for n in range(2))
    assert 'resumed from' in logs, logs[-3000:]
    _train_assert_same_run(full, out)


def _train_write_folder(root, corrupt):
    """DIR/{train,val}/{left,right}/*.png: a bright square on the left or the right half."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 6), ('val', 3)):
        for label, name in enumerate(('left', 'right')):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (rng.uniform(0, 60, size=(20, 24, 3))).astype(np.uint8)
                x0 = 2 + 12 * label
                pixels[6:14, x0:x0 + 8] = 230
                Image.fromarray(pixels).save(folder / f'{i}.png')
    if corrupt:
        (root / 'train' / 'left' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
        (root / 'val' / 'right' / 'broken.png').write_bytes(b'garbage')


def test_train_image_folder_deit3_recipe_skips_corrupt_images(tmp_path, capsys):
    data = tmp_path / 'data'
    _train_write_folder(data, corrupt=True)
    # Fine-tune from weights of another class count (8) and resolution (32 px: APE grid 4x4).
    source = train.build_model({'model': 'vit_tiny', 'model_kwargs': dict(
        pe='rope_mixed_ape', num_classes=8, img_size=32, patch_size=8, embed_dim=32, depth=1,
        num_heads=2)})
    torch.save({'model': source.state_dict()}, tmp_path / 'source.pth')
    out = tmp_path / 'out'
    status = _train_cli(['--model', 'vit_tiny', '--pe', 'rope_mixed_ape', '--data-path', str(data),
                         '--finetune', str(tmp_path / 'source.pth'),
                         '--output-dir', str(out), '--epochs', '1', '--batch-size', '4',
                         '--num-workers', '0', '--img-size', '16', '--patch-size', '8',
                         '--embed-dim', '32', '--depth', '1', '--num-heads', '2',
                         '--eval-resolutions', '16', '24'])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    args = _train_state(out / 'checkpoint.pth')['args']
    # The DeiT-III recipe for a ViT on folders.
    assert (args['recipe'], args['opt'], args['loss'], args['aug'], args['repeated_aug']) == \
        ('deit3', 'lamb', 'bce', 'three', 3)
    assert args['num_classes'] == 2 and args['dataset'] == 'folder'
    assert 'lr = 0.004 x total batch 4 / 2048' in captured.out
    assert 'dropped head.weight, head.bias' in captured.out
    record = json.loads((out / 'log.jsonl').read_text())
    assert record['skipped'] >= 1           # the corrupt val image, plus train copies if drawn
    assert 'skipping undecodable image' in captured.err
    assert 'skipped' in captured.out
    val = train.build_eval_dataset(args, 16)
    stats = train.evaluate(train.build_model(args), train.build_eval_loader(val, 4),
                           torch.device('cpu'))
    assert (stats['n'], stats['skipped']) == (6, 1)


def test_train_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    base = _TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '16', '--builtin-val', '8',
                          '--output-dir', str(out)]
    assert _train_cli(base + ['--epochs', '1']) == 0
    before = (out / 'checkpoint.pth').read_bytes()
    capsys.readouterr()
    finite_loss = train._loss
    monkeypatch.setattr(train, '_loss', lambda *a: finite_loss(*a) * float('nan'))
    status = _train_cli(base + ['--epochs', '2', '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith('error: loss is nan at epoch 2') and err.count('\n') == 1, err
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert len((out / 'log.jsonl').read_text().splitlines()) == 1


def test_train_shapes_deterministic_and_resolution_independent():
    a = train.ShapesDataset('val', 50, 24, seed=3)
    b = train.ShapesDataset('val', 50, 24, seed=3)
    other = train.ShapesDataset('val', 50, 24, seed=4)
    for i in (0, 17, 49):
        torch.testing.assert_close(a[i][0], b[i][0], atol=0, rtol=0)
        assert a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], other[0][0])
    assert not torch.equal(a[0][0], train.ShapesDataset('train', 50, 24, seed=3)[0][0])
    labels = [train.make_scene('val', i, 0)['label'] for i in range(400)]
    assert set(labels) == set(range(8)) and min(np.bincount(labels)) > 25   # balanced enough

    for i in range(20):
        scene = train.make_scene('val', i, 0)
        # The label is the compass direction of the square seen from the disk (y points down).
        dx = scene['square'][0] - scene['disk'][0]
        dy = scene['disk'][1] - scene['square'][1]
        direction = round(math.atan2(dy, dx) / (math.pi / 4)) % 8
        assert direction == scene['label']
        # A rendering at 24 px agrees with a 4x larger one averaged down to 24 px.
        small = torch.from_numpy(train.render_scene(scene, 24))
        large = torch.from_numpy(train.render_scene(scene, 96))
        down = F.avg_pool2d(large[None], 4)[0]
        assert (down - small).abs().mean() < 0.01
        assert (down - small).abs().max() < 0.2
        # The disk's colour sits at its centre at both resolutions (same scene, same place).
        for image, r in ((small, 24), (large, 96)):
            x, y = (int(scene['disk'][k] * r) for k in (0, 1))
            torch.testing.assert_close(image[:, y, x], torch.tensor(scene['disk_colour']).float()
                                       .clamp(0, 1), atol=1e-5, rtol=0)
    # Same index, two resolutions: same label, same normalisation.
    hi = train.ShapesDataset('val', 50, 64, seed=3)
    assert [hi[i][1] for i in range(10)] == [a[i][1] for i in range(10)]


def test_train_glyphs_deterministic_per_split_index_seed():
    a = train.GlyphsDataset('val', 40, 24, seed=3)
    first = {i: a[i] for i in (0, 17, 39)}
    train.VAL_RENDER_CACHE.clear()   # b renders its images again instead of reusing a's
    b = train.GlyphsDataset('val', 40, 24, seed=3)
    for i in (0, 17, 39):
        torch.testing.assert_close(first[i][0], b[i][0], atol=0, rtol=0)
        assert first[i][0] is not b[i][0]
        assert a[i][1] == b[i][1]
        assert train.make_glyph_scene('val', i, 3) == train.make_glyph_scene('val', i, 3)
    assert not torch.equal(a[0][0], train.GlyphsDataset('val', 40, 24, seed=4)[0][0])
    assert not torch.equal(a[0][0], train.GlyphsDataset('train', 40, 24, seed=3)[0][0])
    # A training set shows fresh scenes every epoch: epoch 2 starts at scene 2 x 40.
    fresh = train.GlyphsDataset('train', 40, 24, seed=3)
    fresh.set_epoch(2)
    scene = train.make_glyph_scene('train', 80, 3)
    image = (torch.from_numpy(train.render_glyph_scene(scene, 24)) - fresh.mean) / fresh.std
    torch.testing.assert_close(fresh[0][0], image, atol=0, rtol=0)
    assert fresh[0][1] == scene['label']
    # Validation scenes show the whole unit square; every class is drawn about equally often.
    assert all(train.make_glyph_scene('val', i, 0)['window'] == [0.0, 0.0, 1.0] for i in range(20))
    labels = [train.make_glyph_scene('val', i, 0)['label'] for i in range(500)]
    assert set(labels) == set(range(10)) and min(np.bincount(labels)) > 30


def test_train_builtin_validation_images_rendered_once(monkeypatch):
    cache = train._RenderCache(limit_bytes=2 ** 20)
    monkeypatch.setattr(train, 'VAL_RENDER_CACHE', cache)
    rendered = []

    def counting_render(scene, resolution):
        rendered.append(resolution)
        return train.render_glyph_scene(scene, resolution)
    monkeypatch.setattr(train.GlyphsDataset, 'render', staticmethod(counting_render))

    def fresh(split, index, resolution, seed):   # the image without any dataset object
        image = torch.from_numpy(train.render_glyph_scene(
            train.make_glyph_scene(split, index, seed), resolution))
        return (image - torch.tensor(train.IMAGENET_MEAN).view(3, 1, 1)) \
            / torch.tensor(train.IMAGENET_STD).view(3, 1, 1)

    # A second dataset object (eval_multires builds one per checkpoint and policy) reuses them.
    for _ in range(2):
        val = train.GlyphsDataset('val', 6, 20, seed=5)
        for i in range(6):
            image, label = val[i]
            torch.testing.assert_close(image, fresh('val', i, 20, 5), atol=0, rtol=0)
            assert label == train.make_glyph_scene('val', i, 5)['label']
    assert rendered == [20] * 6
    # Another resolution or seed is another image.
    train.GlyphsDataset('val', 6, 28, seed=5)[0]
    other_seed = train.GlyphsDataset('val', 6, 20, seed=6)[0][0]
    assert rendered == [20] * 6 + [28, 20]
    torch.testing.assert_close(other_seed, fresh('val', 0, 20, 6), atol=0, rtol=0)
    # Training scenes are never kept (fresh every epoch; and a window per scene).
    rendered.clear()
    train_set = train.GlyphsDataset('train', 6, 20, seed=5)
    train_set[0], train_set[0]
    assert rendered == [20, 20]
    # Past the limit nothing more is kept; the images stay correct.
    one = 3 * 20 * 20 * 4
    small = train._RenderCache(limit_bytes=2 * one)
    monkeypatch.setattr(train, 'VAL_RENDER_CACHE', small)
    rendered.clear()
    val = train.GlyphsDataset('val', 6, 20, seed=5)
    for _ in range(2):
        for i in range(4):
            torch.testing.assert_close(val[i][0], fresh('val', i, 20, 5), atol=0, rtol=0)
    assert small.used_bytes == 2 * one and len(small.images) == 2
    assert rendered == [20] * 4 + [20] * 2


def test_train_glyphs_resolution_independent():
    # The coverage ramp clip(0.5 - d / pixel, 0, 1) is a pixel's area inside a straight edge; it
    # errs where a pixel holds a round stroke end or a stroke or ring thinner than a pixel: there
    # by up to about a quarter of the contrast (measured <= 0.22 over 80 scenes at 24 px), over
    # a few pixels (99th percentile <= 0.065), and by < 0.004 on average over an image.
    for split in ('val', 'train'):
        for i in range(12):
            scene = train.make_glyph_scene(split, i, 0)
            small = torch.from_numpy(train.render_glyph_scene(scene, 24))
            down = F.avg_pool2d(torch.from_numpy(train.render_glyph_scene(scene, 96))[None], 4)[0]
            error = (down - small).abs()
            assert error.mean() < 0.01 and error.max() < 0.3, (split, i)
            assert torch.quantile(error.flatten(), 0.99) < 0.1, (split, i)
    # The same validation scenes at two resolutions: same labels (the sweep's premise).
    lo, hi = train.GlyphsDataset('val', 10, 16, seed=1), train.GlyphsDataset('val', 10, 72, seed=1)
    assert [lo[i][1] for i in range(10)] == [hi[i][1] for i in range(10)]


def test_train_glyphs_training_windows_hold_the_glyph():
    sides = []
    for i in range(300):
        scene = train.make_glyph_scene('train', i, 0)
        x0, y0, side = scene['window']
        box = train.glyph_box(scene['glyph'])
        assert 0 <= x0 and 0 <= y0 and x0 + side <= 1 and y0 + side <= 1   # inside the scene
        assert side ** 2 >= 0.08                                            # RandomResizedCrop
        assert x0 < box[0] and y0 < box[1] and box[2] < x0 + side and box[3] < y0 + side
        sides.append(side)
    # Zoomed-in and whole-scene views both occur (area fractions from about 0.25 to 1).
    assert min(sides) < 0.55 and max(sides) > 0.97
    # A window is rendered from the scene, not resampled: the window (8, 16, 32) / 64 at 32 px
    # is the crop [16:48, 8:40] of the whole scene at 64 px, pixel for pixel.
    scene = dict(train.make_glyph_scene('val', 5, 0), window=[8 / 64, 16 / 64, 0.5])
    whole = dict(scene, window=[0.0, 0.0, 1.0])
    torch.testing.assert_close(torch.from_numpy(train.render_glyph_scene(scene, 32)),
                               torch.from_numpy(train.render_glyph_scene(whole, 64))[:, 16:48, 8:40],
                               atol=1e-6, rtol=0)


def test_train_glyph_window_min_area(tmp_path, capsys):
    # The default is RandomResizedCrop's 0.08, and the same scenes as before the option existed.
    assert train.make_glyph_scene('train', 7, 0) == train.make_glyph_scene('train', 7, 0, 0.08)
    for i in range(100):
        half = train.make_glyph_scene('train', i, 0, window_min_area=0.5)
        x0, y0, side = half['window']
        box = train.glyph_box(half['glyph'])
        assert side ** 2 >= 0.5 and x0 < box[0] and box[2] < x0 + side
        # 1: every training view is the whole scene, as a validation view (the ablation's
        # "no random window"); the scene itself is unchanged.
        whole = train.make_glyph_scene('train', i, 0, window_min_area=1.0)
        assert whole['window'] == [0.0, 0.0, 1.0]
        assert {k: v for k, v in whole.items() if k != 'window'} == \
            {k: v for k, v in half.items() if k != 'window'}
    # train.py: stored in the configuration and used by the training set.
    run = tmp_path / 'w'
    assert _train_cli(_TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '8', '--builtin-val',
                                     '8', '--epochs', '1', '--glyph-window-min-area', '1',
                                     '--output-dir', str(run)]) == 0
    cfg = _train_state(run / 'checkpoint.pth')['args']
    assert cfg['glyph_window_min_area'] == 1.0
    assert train.build_train_dataset(cfg).scene_options == {'window_min_area': 1.0}
    capsys.readouterr()
    # It means nothing for the direction task or folders, and must lie in (0, 1].
    for bad in (['--data', 'shapes', '--glyph-window-min-area', '0.5'],
                ['--glyph-window-min-area', '0'], ['--glyph-window-min-area', '1.5']):
        assert _train_cli(_TRAIN_TINY + bad + ['--output-dir', str(tmp_path / 'bad')]) == 2
        assert 'glyph-window-min-area' in capsys.readouterr().err.replace('_', '-')
    assert not (tmp_path / 'bad').exists()


def test_train_global_pool_avg_is_stored_and_evaluates_without_flags(tmp_path, capsys):
    run = tmp_path / 'avg'
    assert _train_cli(_TRAIN_TINY + ['--pe', 'rope_mixed', '--batch-size', '8', '--builtin-train', '8',
                                     '--builtin-val', '8', '--epochs', '1', '--global-pool', 'avg',
                                     '--output-dir', str(run)]) == 0
    state = _train_state(run / 'checkpoint.pth')
    assert state['args']['model_kwargs']['global_pool'] == 'avg' and 'cls_token' not in state['model']
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(run / 'checkpoint.pth'), '--resolutions', '16', '--quiet',
        '--output-dir', str(tmp_path / 'eval')]))
    (label, rows), = results.items()
    assert 'avg pool' in label
    last = json.loads((run / 'log.jsonl').read_text().splitlines()[-1])
    assert rows[0]['top1'] == last['val_top1']  # the same model rebuilt from the checkpoint
    capsys.readouterr()
    assert _train_cli(['--model', 'swin_tiny', '--global-pool', 'avg', '--output-dir', str(tmp_path / 'bad')]) == 2
    assert 'apply to ViT models only' in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


def test_train_several_resolutions_render_each_step_at_its_drawn_size(tmp_path, capsys):
    cfg = {'seed': 3, 'train_resolutions': [12, 16, 20]}
    draws = [train.train_step_resolution(cfg, e, s) for e in range(2) for s in range(30)]
    assert set(draws) == {12, 16, 20}  # every size is drawn
    assert draws == [train.train_step_resolution(cfg, e, s) for e in range(2) for s in range(30)]
    assert train.train_step_resolution({**cfg, 'seed': 4}, 0, 0) is not None
    assert train.train_step_resolution({'seed': 3, 'train_resolutions': None}, 0, 0) is None
    # The loader, resumed at step 2 of epoch 1: each batch at its step's size, each image the
    # scene of its index rendered at that size (the sampler's order, the seeds, the scenes).
    data = train.GlyphsDataset('train', 16, 16)
    order = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0,
                                                drop_last=True)
    sampler = train.EpochSampler(order, 0, 0, 4, lambda e, s: train.train_step_resolution(cfg, e, s))
    sampler.set_epoch(1, start=8)
    data.set_epoch(1)
    indices = list(order)
    loader = torch.utils.data.DataLoader(train.SeededSamples(data), batch_size=4, sampler=sampler,
                                         drop_last=True)
    sizes = []
    for step, (images, labels) in enumerate(loader, start=2):
        size = train.train_step_resolution(cfg, 1, step)
        sizes.append(size)
        assert images.shape == (4, 3, size, size)
        image, label = data.at_resolution(indices[4 * step + 1], size)
        assert torch.equal(images[1], image) and labels[1] == label
    assert len(sizes) == 2 and set(sizes) <= {12, 16, 20}
    # train.py: stored, used, and checked against the patch size and the data.
    run = tmp_path / 'multi'
    assert _train_cli(_TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '16', '--builtin-val', '8',
                                     '--epochs', '1', '--train-resolutions', '12', '16', '20',
                                     '--output-dir', str(run)]) == 0
    assert _train_state(run / 'checkpoint.pth')['args']['train_resolutions'] == [12, 16, 20]
    capsys.readouterr()
    for bad, message in ((['--train-resolutions', '16', '14'], 'train-resolutions'),
                         (['--data-path', str(tmp_path), '--train-resolutions', '16'], 'built-in data only')):
        assert _train_cli(_TRAIN_TINY + bad + ['--output-dir', str(tmp_path / 'bad')]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


def test_train_glyph_classes_differ_only_in_arrangement():
    """Every class is the same seven strokes, some lit: with the scene's style, colours,
    background and distractors fixed, only where ink lies changes between classes."""
    scene = train.make_glyph_scene('val', 3, 0)
    scene['glyph'].update(slant=0.2, rotation=0.1)   # an italic, turned glyph: no symmetry helps
    scene['window'] = [0.25, 0.2, 0.6]                # the glyph large in a 96 px view
    r, (x0, y0, side) = 96, scene['window']
    centres = (np.arange(r) + 0.5) * side / r
    x, y = x0 + centres[None, :], y0 + centres[:, None]

    def coverage(label, segments=None):
        return train.glyph_coverage(dict(scene, label=label), x, y, side / r, segments)

    strokes = {name: coverage(0, name) for name in train.GLYPH_SEGMENTS}
    assert len(strokes) == 7 and len(train.GLYPH_DIGITS) == len(train.GLYPH_CLASSES) == 10
    ink, images = {}, {}
    for digit, lit in enumerate(train.GLYPH_DIGITS):
        assert set(lit) <= set(train.GLYPH_SEGMENTS) and lit not in train.GLYPH_DIGITS[:digit]
        # A class's ink is the union of its lit strokes, each exactly the shared primitive.
        np.testing.assert_array_equal(coverage(digit),
                                      np.max([strokes[name] for name in lit], axis=0))
        ink[digit] = coverage(digit)
        images[digit] = train.render_glyph_scene(dict(scene, label=digit), r)
        # Background and distractors are the same for every class: pixels no stroke touches
        # are equal.
        untouched = (ink[digit] == 0) & (ink[0] == 0)
        np.testing.assert_array_equal(images[digit][:, untouched], images[0][:, untouched])
    # 2 / 5 are mirror images and 6 / 9 half-turns of each other: the same number of strokes and
    # the same ink area (equal in the plane; measured within 0.03 % on the 96 px grid), but in
    # other places.
    for p, q in ((2, 5), (6, 9)):
        assert len(train.GLYPH_DIGITS[p]) == len(train.GLYPH_DIGITS[q])
        assert abs(ink[p].sum() - ink[q].sum()) < 0.005 * ink[p].sum(), (p, q)
        # Ink moved: at least a stroke's worth (6 and 9 differ in one stroke each: 24 %).
        assert np.abs(ink[p] - ink[q]).sum() > 0.15 * ink[p].sum(), (p, q)
        assert np.abs(images[p] - images[q]).max() > 0.3


def test_train_data_flag_and_builtin_checkpoints_evaluate_without_flags(tmp_path, capsys):
    base = _TRAIN_TINY + ['--batch-size', '8', '--builtin-val', '12', '--epochs', '1']
    # glyphs is the default; shapes, the counter-example, is chosen by name (its old flag
    # names still work).
    assert _train_cli(base + ['--builtin-train', '16', '--output-dir', str(tmp_path / 'g')]) == 0
    assert _train_cli(base + ['--data', 'shapes', '--shapes-train', '16',
                              '--output-dir', str(tmp_path / 's')]) == 0
    glyphs = _train_state(tmp_path / 'g' / 'checkpoint.pth')
    shapes = _train_state(tmp_path / 's' / 'checkpoint.pth')
    assert (glyphs['args']['dataset'], glyphs['args']['num_classes']) == ('glyphs', 10)
    assert (shapes['args']['dataset'], shapes['args']['num_classes']) == ('shapes', 8)
    assert shapes['args']['builtin_train'] == 16 and glyphs['args']['builtin_val'] == 12
    # A checkpoint written before glyphs existed: shapes_* settings, no --data.
    legacy = dict(shapes, args={re.sub('^builtin_', 'shapes_', k): v
                                for k, v in shapes['args'].items() if k != 'data'})
    torch.save(legacy, tmp_path / 'legacy.pth')
    capsys.readouterr()
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(tmp_path / 'g' / 'checkpoint.pth'), str(tmp_path / 'legacy.pth'),
        '--labels', 'glyphs', 'legacy shapes', '--resolutions', '16', '24', '--quiet',
        '--output-dir', str(tmp_path / 'eval')]))
    # Each is scored on the validation scenes it was trained with, train.py's own numbers at 16.
    for label, run in (('glyphs', 'g'), ('legacy shapes', 's')):
        last = json.loads((tmp_path / run / 'log.jsonl').read_text().splitlines()[-1])
        at_16 = results[label][0]
        assert at_16['n'] == 12 and at_16['top1'] == last['val_top1'], label
        assert math.isclose(at_16['loss'], last['val_loss'], rel_tol=1e-9)


def test_train_lamb_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))          # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = train.Lamb([{'params': [w], 'weight_decay': 0.1}, {'params': [b], 'weight_decay': 0.0}],
                     lr=0.1, eps=0.0)
    w.grad = torch.tensor([1.0, 2.0])
    b.grad = torch.tensor([-0.5, 0.25])
    opt.step()
    # First step: m_hat = g, v_hat = g^2, so the Adam direction is sign(g).
    u = [1.0 + 0.1 * 3.0, 1.0 + 0.1 * 4.0]                     # sign(g) + wd * w
    ratio = 5.0 / math.sqrt(u[0] ** 2 + u[1] ** 2)             # trust ratio ||w|| / ||u||
    expected_w = torch.tensor([3.0 - 0.1 * ratio * u[0], 4.0 - 0.1 * ratio * u[1]])
    torch.testing.assert_close(w.detach(), expected_w, atol=1e-6, rtol=0)
    # No weight decay: a plain Adam step, no trust ratio.
    torch.testing.assert_close(b.detach(), torch.tensor([1.1, -1.1]), atol=1e-6, rtol=0)
    # Second step on w: moments by hand.
    w.grad = torch.tensor([-1.0, 0.5])
    w0 = w.detach().clone()
    opt.step()
    m = 0.9 * 0.1 * torch.tensor([1.0, 2.0]) + 0.1 * torch.tensor([-1.0, 0.5])
    v = 0.999 * 0.001 * torch.tensor([1.0, 4.0]) + 0.001 * torch.tensor([1.0, 0.25])
    update = (m / (1 - 0.9 ** 2)) / (v / (1 - 0.999 ** 2)).sqrt() + 0.1 * w0
    expected = w0 - 0.1 * (w0.norm() / update.norm()) * update
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)


def test_train_repeated_aug_sampler_spreads_copies_over_ranks():
    data = list(range(12))
    samplers = [train.RepeatedAugSampler(data, 3, rank, repeats=3, seed=1) for rank in range(3)]
    for s in samplers:
        s.set_epoch(5)
    lists = [list(s) for s in samplers]
    assert all(len(x) == 4 for x in lists)
    assert lists[0] == lists[1] == lists[2]            # each rank gets its own copy of an image
    assert len(set(lists[0])) == 4
    samplers[0].set_epoch(6)
    assert list(samplers[0]) != lists[0]


def test_train_weight_decay_groups():
    model = train.build_model({'model': 'vit_tiny', 'model_kwargs': dict(
        pe='rope_mixed_ape', num_classes=3, img_size=16, patch_size=4, embed_dim=32, depth=1,
        num_heads=2)})
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay['params']}
    assert {'cls_token', 'pos_embed', 'freqs'} <= skipped
    assert all(names[id(p)].endswith('weight') and p.ndim > 1 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and decay['weight_decay'] == 0.05


@pytest.mark.parametrize('argv, message', [
    (['--model', 'vit_huge'], 'unknown model'),
    (['--pe', 'sinusoid'], 'sinusoid'),
    (['--data-path', '{tmp}/nowhere'], 'does not exist'),
    (['--data-path', '{tmp}'], 'has no train/ folder'),
    (['--data-path', '{tmp}/empty'], 'no images'),
    (['--epochs', '0'], '--epochs must be positive'),
    (['--batch-size', '-1'], '--batch-size must be positive'),
    (['--batch-size', '64', '--builtin-train', '32'], 'fewer than one total batch'),
    (['--data', 'shapes', '--data-path', '{tmp}'], 'give one of them'),
    (['--data', 'imagenet'], 'invalid choice'),
    (['--aug', 'three'], 'a flip would turn 2 into 5'),
    (['--data', 'shapes', '--aug', 'randaug'], 'would change the directions'),
    (['--img-size', '18'], 'multiples of the patch size 4'),
    (['--eval-resolutions', '16', '30'], '--eval-resolutions 30'),
    (['--resume', '{tmp}/missing.pth'], 'does not exist'),
    (['--resume', '{tmp}/corrupt.pth'], 'cannot read checkpoint'),
    (['--finetune', '{tmp}/corrupt.pth'], 'cannot read checkpoint'),
    (['--finetune', '{tmp}/other.pth'], 'does not fit vit_tiny: missing cls_token'),
    (['--amp', 'fp8'], 'invalid choice'),
])
def test_train_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, argv, message):
    (tmp_path / 'empty' / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'empty' / 'val' / 'a').mkdir(parents=True)
    (tmp_path / 'corrupt.pth').write_bytes(b'PK\x03\x04 truncated')
    torch.save({'model': {'other.weight': torch.zeros(2)}}, tmp_path / 'other.pth')
    out = tmp_path / 'out'
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    status = _train_cli(_TRAIN_TINY + ['--output-dir', str(out)] + argv)
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
    assert not out.exists()


def test_train_bad_input_from_the_shell_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, _TRAIN_SCRIPT, '--pe', 'bogus', '--output-dir',
                           str(tmp_path / 'out')], cwd=tmp_path, env=_train_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith('error: ') and done.stderr.count('\n') == 1
    assert 'rope_mixed' in done.stderr and 'Traceback' not in done.stderr
    assert not (tmp_path / 'out').exists()


def test_train_resume_mid_epoch_on_another_batch_size_continues_at_the_same_point(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    _train_send_at_step(monkeypatch, {3: signal.SIGTERM})
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out)]) == 75   # 24 images seen
    _train_send_at_step(monkeypatch, {})
    capsys.readouterr()
    # Batch 4 instead of 8: 8 steps per epoch, the same 24 images are 6 of them; the schedule
    # (16 steps now) goes on from step 6 with the learning rate of the new batch.
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out), '--batch-size', '4',
                                      '--resume', 'auto']) == 0
    printed = capsys.readouterr().out
    assert (f"resumed from {out / 'recovery_e0000_i000000024.pth'} (--resume auto): epoch 1/2, "
            'step 6/8') in printed
    assert ('the checkpoint was written by 1 process(es) x batch 8, this run has 1 x 4: the '
            'schedule goes on from step 6 of 16 at lr 6.25e-05') in printed
    final = _train_state(out / 'checkpoint.pth')
    assert final['lr_scheduler']['last_epoch'] == 16 and final['steps_per_epoch'] == 8
    assert [json.loads(line)['epoch'] for line in (out / 'log.jsonl').read_text().splitlines()] \
        == [1, 2]
    assert final['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-5)   # min_lr at the end


def _train_values_outside(limit, kind):
    """Command-line strings just outside `limit` for a flag parsed by `kind` (int or float)."""
    values = []
    if limit.low is not None:
        values.append(kind(limit.low if limit.low_open else limit.low - 1))
    if limit.high is not None:
        values.append(kind(limit.high if limit.high_open else limit.high + 1))
    if kind is float:
        values += [math.nan, math.inf]
    return [str(v) for v in values]


def test_train_and_eval_every_numeric_flag_is_range_checked_before_anything_is_written(
        tmp_path, capsys):
    scripts = [(train.get_args_parser(), train.TRAIN_LIMITS, train.main,
                _TRAIN_TINY, [('--lr', '-1'), ('--drop-path', '1.5'), ('--patch-size', '0')]),
               (eval_multires.get_args_parser(), eval_multires.EVAL_LIMITS, eval_multires.main,
                ['--checkpoint', str(tmp_path / 'x.pth')], [('--resolutions', '-224')])]
    for parser, limits, main, base, extra in scripts:
        kinds = {a.dest: a.type for a in parser._actions if a.type in (int, float)}
        assert set(kinds) == set(limits), 'every int / float flag needs its range'
        cases = [('--' + dest.replace('_', '-'), value) for dest, limit in limits.items()
                 for value in _train_values_outside(limit, kinds[dest])] + extra
        for flag, value in cases:
            dest = flag[2:].replace('-', '_')
            limit, shown = limits[dest], kinds[dest](value)   # the message shows it parsed
            out = tmp_path / 'out'
            try:
                train.cli(main, parser, base + ['--output-dir', str(out), flag, value])
                status = 0
            except SystemExit as e:
                status = e.code
            err = capsys.readouterr().err
            assert status == 2, (flag, value, err)
            assert err == f'error: {flag} must be {limit}, got {shown}\n', (flag, value, err)
            assert not out.exists(), (flag, value)
    # The ends that are inside pass.
    assert train.Limit(0, 1).admits(0) and train.Limit(0, 1).admits(1.0)
    assert train.SEED.admits(2 ** 32 - 1) and not train.POSITIVE.admits(0)


def _train_send_at_step(monkeypatch, schedule):
    """train._loss sends this process the signal schedule[n] while computing training step n
    (counted from 1 in this run): a preemption at a chosen step."""
    real_loss, calls = train._loss, [0]

    def loss(*args):
        calls[0] += 1
        if calls[0] in schedule:
            os.kill(os.getpid(), schedule[calls[0]])
        return real_loss(*args)
    monkeypatch.setattr(train, '_loss', loss)


def _train_folder_run_args(data):
    """The DeiT-III recipe on a tiny folder: 3-Augment, mixup / cutmix, repeated augmentation
    x3, drop path, LAMB, BCE. One process, 3 steps per epoch, 2 epochs."""
    return ['--model', 'vit_tiny', '--pe', 'rope_mixed_ape', '--data-path', str(data),
            '--epochs', '2', '--batch-size', '4', '--img-size', '16', '--patch-size', '8',
            '--embed-dim', '32', '--depth', '2', '--num-heads', '2', '--eval-resolutions', '16',
            '--drop-path', '0.1', '--save-every-steps', '2', '--print-freq', '1']


def test_train_mid_epoch_stop_by_signal_resumes_bit_identical_with_augmentation_and_workers(
        tmp_path, capsys, monkeypatch):
    data = tmp_path / 'data'
    _train_write_folder(data, corrupt=False)
    args = _train_folder_run_args(data)
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    assert _train_cli(args + ['--output-dir', str(full), '--num-workers', '0']) == 0
    assert _train_state(full / 'checkpoint.pth')['args']['recipe'] == 'deit3'
    capsys.readouterr()

    # Stopped by SIGUSR1 in step 2 of epoch 1, with loader workers that also get signals; a
    # second signal (SIGTERM) arrives while the checkpoint is written.
    real_save, saves = torch.save, []

    def save_under_fire(obj, f, *a, **kw):
        saves.append(obj.get('images'))
        os.kill(os.getpid(), signal.SIGTERM)
        for worker in _train_children(os.getpid()):   # the loader's forked workers
            os.kill(worker, signal.SIGTERM)
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, 'save', save_under_fire)
    _train_send_at_step(monkeypatch, {2: signal.SIGUSR1})
    status = _train_cli(args + ['--output-dir', str(cut), '--num-workers', '2'])
    err = capsys.readouterr().err
    saved = cut / 'recovery_e0000_i000000008.pth'
    assert status == train.EXIT_STOPPED == 75
    assert err == (f'stopped by SIGUSR1 at epoch 1/2, step 2/3: saved {saved}; run the same '
                   'command with --resume auto to continue (exit status 75)\n'), err
    assert saves == [8]   # one save, at the step the signal came in
    assert train._digest_matches(_train_state(saved)) and not list(cut.glob('*.tmp'))
    monkeypatch.setattr(torch, 'save', real_save)

    # Resumed, stopped again in the epoch's last step (so after its evaluation and save), and
    # resumed again with another worker count.
    _train_send_at_step(monkeypatch, {1: signal.SIGTERM})
    assert _train_cli(args + ['--output-dir', str(cut), '--num-workers', '2',
                              '--resume', 'auto']) == 75
    out, err = capsys.readouterr()
    assert f'resumed from {saved} (--resume auto): epoch 1/2, step 2/3' in out
    assert err.startswith('stopped by SIGTERM after epoch 1/2: saved ') and err.count('\n') == 1
    _train_send_at_step(monkeypatch, {})
    assert _train_cli(args + ['--output-dir', str(cut), '--num-workers', '1',
                              '--resume', 'auto']) == 0
    assert 'resumed from' in capsys.readouterr().out
    _train_assert_same_run(full, cut)


# One process, 2 epochs of 4 steps, a recovery checkpoint at every step.
_TRAIN_SMALL = _TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '32', '--builtin-val', '8',
                              '--epochs', '2', '--save-every-steps', '1']


@pytest.fixture(scope='session')
def _train_small_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp('train_small') / 'full'
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out)]) == 0
    return out


def _train_snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == '.pth'}


def test_train_failed_checkpoint_write_stops_with_one_line_and_keeps_previous_files(
        _train_small_reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    shutil.copytree(_train_small_reference, out)
    before = _train_snapshot(out)
    log_before = (out / 'log.jsonl').read_bytes()
    capsys.readouterr()

    # A full disk: torch.save gets part of the file out, then ENOSPC.
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', disk_full)
    status = _train_cli(_TRAIN_SMALL + ['--output-dir', str(out), '--epochs', '3',
                                        '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == train.EXIT_SAVE_FAILED == 74
    assert err.startswith(f'error: cannot write {out / "recovery_e0002_i000000008.pth"}: No space '
                          'left on device; the files written before are kept') \
        and err.count('\n') == 1, err
    assert _train_snapshot(out) == before and (out / 'log.jsonl').read_bytes() == log_before
    assert not list(out.glob('*.tmp'))
    monkeypatch.setattr(torch, 'save', real_save)

    # A read-only folder (tests run as root, for whom chmod does not block writes).
    real_open = open

    def read_only(path, mode='r', *a, **kw):
        if str(path).startswith(str(out)) and any(c in mode for c in 'wax+'):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(train, 'open', read_only, raising=False)
    status = _train_cli(_TRAIN_SMALL + ['--output-dir', str(out), '--epochs', '3',
                                        '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == 74
    assert err == f'error: cannot write {out / "config.json"}: Read-only file system\n', err
    assert _train_snapshot(out) == before and not list(out.glob('*.tmp'))
    monkeypatch.undo()

    # The kernel's own refusal: a file size limit (EFBIG) in a real process, which leaves a
    # partly written file behind for train.py to remove.
    import resource
    fresh = tmp_path / 'limited'
    limit = 64 * 1024   # above config.json, below one checkpoint
    done = subprocess.run(
        [sys.executable, _TRAIN_SCRIPT] + _TRAIN_SMALL + ['--output-dir', str(fresh)],
        cwd=tmp_path, env=_train_env(), capture_output=True, text=True, timeout=_TRAIN_TIMEOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 74, done.stderr[-2000:]
    assert done.stderr == (f'error: cannot write {fresh / "recovery_e0000_i000000008.pth"}: File '
                           'too large; the files written before are kept (--on-save-error warn '
                           'reports such a failure and trains on)\n'), done.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ['config.json']


def test_train_save_error_warn_trains_on_and_removes_nothing_until_a_save_succeeds(
        _train_small_reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    real_save, calls, seen = torch.save, [0], {}

    def flaky_disk(obj, f, *a, **kw):   # saves 3 and 4 (step 3, epoch 1's end) fail
        calls[0] += 1
        seen[calls[0]] = sorted(p.name for p in out.glob('recovery_*.pth'))
        if calls[0] in (3, 4):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, 'save', flaky_disk)
    status = _train_cli(_TRAIN_SMALL + ['--output-dir', str(out), '--on-save-error', 'warn'])
    err = capsys.readouterr().err
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith('warning: ')]
    assert warnings == [f'warning: cannot write {out / name}: No space left on device; training '
                        'goes on (--on-save-error warn)' for name in
                        ('recovery_e0000_i000000024.pth', 'recovery_e0001_i000000000.pth')], err
    kept = ['recovery_e0000_i000000008.pth', 'recovery_e0000_i000000016.pth']
    assert seen[3] == seen[4] == seen[5] == kept   # nothing removed while saves failed
    # The first save that worked removed the oldest; the newest two remain.
    assert seen[6] == ['recovery_e0000_i000000016.pth', 'recovery_e0001_i000000008.pth']
    _train_assert_same_run(_train_small_reference, out)   # the record of epoch 1 came later


def test_train_resume_auto_falls_back_past_damaged_checkpoints_naming_both(
        _train_small_reference, tmp_path, capsys):
    newest, previous = 'recovery_e0002_i000000000.pth', 'recovery_e0001_i000000024.pth'
    assert [os.path.basename(p) for p in train.recovery_files(str(_train_small_reference))] \
        == [newest, previous]
    for damage in ('truncated', 'random bytes inside', 'random bytes'):
        out = tmp_path / damage.replace(' ', '_')
        shutil.copytree(_train_small_reference, out)
        data = (out / newest).read_bytes()
        if damage == 'truncated':
            data = data[:len(data) // 2]
        elif damage == 'random bytes inside':   # torch.load reads this without complaint
            middle = len(data) // 2
            data = data[:middle] + os.urandom(64) + data[middle + 64:]
        else:
            data = os.urandom(len(data))
        (out / newest).write_bytes(data)
        capsys.readouterr()
        assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out), '--resume', 'auto']) == 0
        printed = capsys.readouterr()
        warning = [line for line in printed.err.splitlines() if line.startswith('warning:')]
        assert len(warning) == 1 and warning[0].startswith(
            f'warning: {out / newest} is damaged (') and warning[0].endswith(
            f'); resuming from {out / previous} instead (the damaged file is kept as '
            f'{newest}.damaged)'), (damage, printed.err)
        assert f'resumed from {out / previous} (--resume auto): epoch 2/2, step 3/4' \
            in printed.out
        assert (out / f'{newest}.damaged').read_bytes() == data
        _train_assert_same_run(_train_small_reference, out)

    # Nothing sound left: one line, exit 2, nothing written.
    out = tmp_path / 'all_damaged'
    shutil.copytree(_train_small_reference, out)
    for path in list(out.glob('recovery_*.pth')) + [out / 'checkpoint.pth']:
        path.write_bytes(path.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status = _train_cli(_TRAIN_SMALL + ['--output-dir', str(out), '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith('error: --resume auto: no sound checkpoint in ') \
        and err.count('\n') == 1 and newest in err and 'checkpoint.pth' in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_resume_auto_continues_only_its_own_run_and_a_torchrun_restart_implies_it(
        _train_small_reference, tmp_path, capsys, monkeypatch):
    # A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) of a run without --resume continues
    # from what that torchrun's run saved.
    out = tmp_path / 'out'
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'first-torchrun')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    _train_send_at_step(monkeypatch, {6: signal.SIGTERM})
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out)]) == 75
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    _train_send_at_step(monkeypatch, {})
    capsys.readouterr()
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out)]) == 0
    assert (f"resumed from {out / 'recovery_e0001_i000000016.pth'} after a torchrun restart "
            '(auto implied): epoch 2/2, step 2/4') in capsys.readouterr().out
    _train_assert_same_run(_train_small_reference, out)

    # Another torchrun, restarted, without --resume: a fresh start, as its command says.
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'second-torchrun')
    _train_send_at_step(monkeypatch, {1: signal.SIGTERM})
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(out), '--seed', '1']) == 75
    printed = capsys.readouterr().out
    assert 'resumed from' not in printed
    assert (f'note: 2 checkpoint(s) of an earlier run in {out} are not continued, and this '
            "run's saves replace them (recovery_e0002_i000000000.pth, "
            'recovery_e0001_i000000024.pth)') in printed
    # Its first save removed the first run's recovery checkpoints; --resume auto continues it.
    assert [os.path.basename(p) for p in train.recovery_files(str(out))] == [
        'recovery_e0000_i000000008.pth']
    monkeypatch.delenv('TORCHELASTIC_RUN_ID')
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT')

    # A fresh start that failed before its first save leaves the folder's checkpoints to the
    # run before it: --resume auto starts afresh instead of continuing that other run.
    other = tmp_path / 'other'
    shutil.copytree(_train_small_reference, other)
    finite_loss = train._loss
    monkeypatch.setattr(train, '_loss', lambda *a: finite_loss(*a) * float('nan'))
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(other), '--seed', '1']) == 1
    monkeypatch.setattr(train, '_loss', finite_loss)
    _train_send_at_step(monkeypatch, {1: signal.SIGTERM})
    capsys.readouterr()
    assert _train_cli(_TRAIN_SMALL + ['--output-dir', str(other), '--seed', '1',
                                      '--resume', 'auto']) == 75
    printed = capsys.readouterr().out
    assert 'note: 3 checkpoint(s) of an earlier run' in printed and 'starting from scratch' in printed
    assert [os.path.basename(p) for p in train.recovery_files(str(other))] == [
        'recovery_e0000_i000000008.pth']


def test_train_eval_transform_equals_the_official_pil_pipeline():
    # The DeiT-III / Swin evaluation: PIL bicubic resize of the shorter side to int(r / crop),
    # centre crop, ToTensor, ImageNet normalisation (torchvision's classic transforms on PIL).
    from torchvision import transforms as classic
    image = Image.fromarray(np.random.default_rng(0).uniform(0, 255, (300, 410, 3)).astype(np.uint8))
    for resolution, crop_ratio in ((224, 1.0), (160, 224 / 256), (96, 224 / 256)):
        official = classic.Compose([
            classic.Resize(int(resolution / crop_ratio), interpolation=classic.InterpolationMode.BICUBIC),
            classic.CenterCrop(resolution), classic.ToTensor(),
            classic.Normalize(train.IMAGENET_MEAN, train.IMAGENET_STD)])(image)
        ours = train._eval_transform(resolution, crop_ratio)(image)
        torch.testing.assert_close(ours, official, atol=1e-6, rtol=0)


# ==============================================================================================
# eval_multires.py: attention metrics in closed form, tables, files, command line
# ==============================================================================================

_eval_root = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# Attention distance and entropy of hand-built maps (PAPER.md 3.3)
# ----------------------------------------------------------------------------------------------

def _eval_grid_xy(n, grid_w):
    """Row-major token n -> (x, y), written independently of the module under test."""
    return n % grid_w, n // grid_w


def _eval_pair_distance(n, m, grid_w):
    (xn, yn), (xm, ym) = _eval_grid_xy(n, grid_w), _eval_grid_xy(m, grid_w)
    return math.hypot(xn - xm, yn - ym)


def _eval_offset_target(n, grid_h, grid_w, dx, dy):
    """The key at offset (+-dx, +-dy): + where it stays on the grid, - otherwise."""
    x, y = _eval_grid_xy(n, grid_w)
    x = x + dx if x + dx < grid_w else x - dx
    y = y + dy if y + dy < grid_h else y - dy
    assert 0 <= x < grid_w and 0 <= y < grid_h
    return y * grid_w + x


def test_eval_uniform_attention_closed_form():
    grid_h, grid_w = 3, 4
    n = grid_h * grid_w
    attn = torch.full((2, 3, n, n), 1.0 / n, dtype=torch.float64)
    distance, entropy = eval_multires.attention_metrics(attn, (grid_h, grid_w), has_cls_token=False)
    expected = sum(_eval_pair_distance(q, k, grid_w) for q in range(n) for k in range(n)) / n ** 2
    torch.testing.assert_close(distance, torch.tensor(expected, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor(math.log(n), dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_eval_uniform_with_class_token_excludes_its_query_and_distance():
    grid_h, grid_w = 2, 3
    n = grid_h * grid_w
    attn = torch.full((1, 2, n + 1, n + 1), 1.0 / (n + 1), dtype=torch.float64)
    # The class token's own query row is not averaged: make it one-hot so it would show.
    attn[:, :, 0] = 0.0
    attn[:, :, 0, 0] = 1.0
    distance, entropy = eval_multires.attention_metrics(attn, (grid_h, grid_w))
    # The class-token key is at distance 0; it still holds 1/(n+1) of the probability.
    expected = sum(_eval_pair_distance(q, k, grid_w)
                   for q in range(n) for k in range(n)) / (n * (n + 1))
    torch.testing.assert_close(distance, torch.tensor(expected, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor(math.log(n + 1), dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_eval_identity_attention_is_zero():
    grid_h, grid_w = 4, 5
    attn = torch.eye(grid_h * grid_w + 1).expand(2, 3, -1, -1)
    distance, entropy = eval_multires.attention_metrics(attn, (grid_h, grid_w))
    torch.testing.assert_close(distance, torch.tensor(0.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor(0.0), atol=1e-7, rtol=0)


def _eval_offset_map(grid_h, grid_w, dx, dy, self_weight=0.0, cls_weight=0.0, has_cls=True):
    """Each patch query puts 1 - self_weight - cls_weight on the key at offset (+-dx, +-dy)."""
    n = grid_h * grid_w
    first = 1 if has_cls else 0
    attn = torch.zeros(1, 2, n + first, n + first, dtype=torch.float64)
    if has_cls:
        attn[:, :, 0, :] = 1.0 / (n + 1)  # class-token query: ignored by the metric
    for q in range(n):
        attn[:, :, first + q, first + _eval_offset_target(q, grid_h, grid_w, dx, dy)] += (
            1.0 - self_weight - cls_weight)
        attn[:, :, first + q, first + q] += self_weight
        if has_cls:
            attn[:, :, first + q, 0] += cls_weight
    return attn


def test_eval_one_hot_at_known_offset():
    # Offset (3, 4) on an 8 x 6 (H x W) grid: every query attends 5 patches away, entropy 0.
    attn = _eval_offset_map(8, 6, 3, 4)
    distance, entropy = eval_multires.attention_metrics(attn, (8, 6))
    torch.testing.assert_close(distance, torch.tensor(5.0, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    # Reading the same map as a 6 x 8 grid puts the keys elsewhere: the metric knows the layout.
    wrong, _ = eval_multires.attention_metrics(attn, (6, 8))
    assert abs(float(wrong) - 5.0) > 0.1


def test_eval_half_offset_half_self_or_class_token():
    for kwargs in ({'self_weight': 0.5}, {'cls_weight': 0.5}):
        attn = _eval_offset_map(8, 6, 3, 4, **kwargs)
        distance, entropy = eval_multires.attention_metrics(attn, (8, 6))
        torch.testing.assert_close(distance, torch.tensor(2.5, dtype=torch.float64),
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(entropy, torch.tensor(math.log(2), dtype=torch.float64),
                                   atol=1e-12, rtol=0)
    attn = _eval_offset_map(8, 6, 3, 4, self_weight=0.25, has_cls=False)
    distance, entropy = eval_multires.attention_metrics(attn, (8, 6), has_cls_token=False)
    torch.testing.assert_close(distance, torch.tensor(3.75, dtype=torch.float64), atol=1e-12, rtol=0)
    expected_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy, torch.tensor(expected_entropy, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_eval_metrics_per_layer_list_and_bad_shape():
    layers = [_eval_offset_map(8, 6, 3, 4), _eval_offset_map(8, 6, 3, 4, self_weight=0.5)]
    distance, entropy = eval_multires.attention_metrics(layers, (8, 6))
    torch.testing.assert_close(distance, torch.tensor([5.0, 2.5], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor([0.0, math.log(2)], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match='tokens'):
        eval_multires.attention_metrics(layers[0], (8, 6), has_cls_token=False)


# ----------------------------------------------------------------------------------------------
# Default resolutions, labels and the table
# ----------------------------------------------------------------------------------------------

def test_eval_default_resolutions_paper_lists_and_scaling():
    vit = {'model': 'vit_small', 'img_size': 224, 'model_kwargs': {}}
    swin = {'model': 'swin_tiny', 'img_size': 224, 'model_kwargs': {}}
    assert train.default_resolutions(vit) == [96, 144, 192, 224, 256, 320, 384, 512]
    assert train.default_resolutions(swin) == [96, 128, 160, 192, 224, 256, 320, 384]
    small = {'model': 'vit_tiny', 'img_size': 64, 'model_kwargs': {'patch_size': 8}}
    # Independent: the multiple of 8 nearest to r * 64 / 224, found by search.
    expected = [min(range(8, 1024, 8), key=lambda s: abs(s - r * 64 / 224))
                for r in (96, 144, 192, 224, 256, 320, 384, 512)]
    assert train.default_resolutions(small) == expected
    assert 64 in expected and len(set(expected)) == len(expected)
    swin_small = {'model': 'swin_tiny', 'img_size': 128, 'model_kwargs': {}}
    out = train.default_resolutions(swin_small)
    assert 128 in out and all(r % 32 == 0 and r > 0 for r in out)


def test_eval_config_labels():
    assert train.config_label({'model': 'vit_small', 'pe': 'rope_mixed'}) == 'ViT-S RoPE-Mixed'
    assert train.config_label({'model': 'rope_axial_ape_deit_base_patch16_LS',
                               'pe': 'rope_axial_ape'}) == 'ViT-B APE + RoPE-Axial'
    assert train.config_label({'model': 'swin_tiny_patch4_window7_224',
                               'pe': 'rpb'}) == 'Swin-T RPB'
    custom = {'model': 'vit_tiny', 'pe': 'ape', 'model_kwargs': dict(patch_size=4, embed_dim=96, depth=4)}
    assert train.config_label(custom) == 'ViT (96 dim, 4 layers, 4 px patches) APE'
    custom['model_kwargs']['global_pool'] = 'avg'
    assert train.config_label(custom) == 'ViT (96 dim, 4 layers, 4 px patches, avg pool) APE'
    assert train.config_label({'model': 'vit_small', 'pe': 'rope_mixed', 'model_kwargs': {'global_pool': 'avg'}}) \
        == 'ViT-S (avg pool) RoPE-Mixed'


def test_eval_format_table_layout():
    results = {
        'ViT-S APE': [{'resolution': r, 'top1': v, 'top5': 99.0, 'n': 10}
                      for r, v in ((96, 35.44), (224, 80.4), (512, 75.36))],
        'ViT-S RoPE-Mixed': [{'resolution': r, 'top1': v, 'top5': 99.0, 'n': 10}
                             for r, v in ((96, 55.7), (224, 80.9))],
    }
    lines = train.format_table(results, 224).splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header == ['model', '96', '224*', '512']
    ape = [c.strip() for c in lines[2].strip('|').split('|')]
    mixed = [c.strip() for c in lines[3].strip('|').split('|')]
    assert ape == ['ViT-S APE', '35.4', '80.4', '75.4']
    assert mixed == ['ViT-S RoPE-Mixed', '55.7', '80.9', '-']
    per_row = train.format_table(results, {'ViT-S APE': 96, 'ViT-S RoPE-Mixed': 224})
    assert '35.4*' in per_row and '80.9*' in per_row and '224*' not in per_row
    # Means over seeds (--mean-over-seeds) show their spread; a group of one run has none.
    means = {'3 seeds': [{'resolution': 224, 'top1': 80.44, 'top1_sd': 0.25, 'runs': 3}],
             'one seed': [{'resolution': 224, 'top1': 79.96, 'top1_sd': 0.0, 'runs': 1}]}
    lines = train.format_table(means, 224).splitlines()
    assert [c.strip() for c in lines[2].strip('|').split('|')] == ['3 seeds', '80.4 ± 0.2']
    assert [c.strip() for c in lines[3].strip('|').split('|')] == ['one seed', '80.0']
    assert lines[-1].endswith('over 3 runs (seeds); a row without ± is one run')
    only_one = train.format_table({'one seed': means['one seed']}, 224)
    assert '±' not in only_one.replace('a row without ±', '') and 'deviation' not in only_one


# ----------------------------------------------------------------------------------------------
# End to end on a tiny checkpoint trained here
# ----------------------------------------------------------------------------------------------

_eval_train_res = 32


@pytest.fixture(scope='session')
def _eval_tiny_run(tmp_path_factory):
    """One epoch of train.py on a few built-in `glyphs` images: (output folder, checkpoint)."""
    out = tmp_path_factory.mktemp('eval_tiny_run')
    args = train.get_args_parser().parse_args([
        '--model', 'vit_tiny', '--pe', 'rope_mixed', '--epochs', '1', '--builtin-train', '32',
        '--builtin-val', '21', '--batch-size', '16', '--embed-dim', '48', '--depth', '3',
        '--num-heads', '2', '--img-size', str(_eval_train_res), '--output-dir', str(out / 'run'),
        '--eval-resolutions', str(_eval_train_res), '16', '--seed', '0'])
    torch.manual_seed(0)
    train.main(args)
    return out, out / 'run' / 'checkpoint.pth'


def _eval_run_cli(argv, cwd):
    return subprocess.Popen([sys.executable, os.path.join(_eval_root, 'eval_multires.py')] + argv,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_eval_end_to_end_tables_files_and_train_agreement(_eval_tiny_run, capsys):
    base, checkpoint = _eval_tiny_run
    out = base / 'eval_out'
    resolutions = [16, _eval_train_res, 48]
    args = eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(checkpoint), str(checkpoint), '--labels', 'first', 'second',
        '--resolutions'] + [str(r) for r in reversed(resolutions)] + [
        '--output-dir', str(out), '--num-workers', '0', '--analyze-attention',
        '--attention-images', '3', '--attention-resolutions', '16', '48'])
    eval_multires.main(args)
    printed = capsys.readouterr()
    # The table: one row per checkpoint, one column per requested resolution, training one marked.
    table = [line for line in printed.out.splitlines() if line.startswith('| ')]
    header = [c.strip() for c in table[0].strip('|').split('|')]
    assert header == ['model', '16', f'{_eval_train_res}*', '48']
    assert [line.split('|')[1].strip() for line in table[1:3]] == ['first', 'second']
    assert f'@ {_eval_train_res}: 21/21 images' in printed.err  # progress per resolution

    with open(out / 'multires.json') as f:
        report = json.load(f)
    with open(out / 'multires.csv') as f:
        rows = list(csv.DictReader(f))
    assert [c['label'] for c in report['checkpoints']] == ['first', 'second']
    assert len(rows) == 2 * len(resolutions)
    for entry in report['checkpoints']:
        assert [r['resolution'] for r in entry['results']] == resolutions
        assert entry['train_resolution'] == _eval_train_res and entry['pe'] == 'rope_mixed'
        mine = [r for r in rows if r['label'] == entry['label']]
        for csv_row, json_row in zip(mine, entry['results']):
            assert int(csv_row['resolution']) == json_row['resolution']
            assert float(csv_row['top1']) == json_row['top1']
            assert float(csv_row['top5']) == json_row['top5']
            assert float(csv_row['loss']) == json_row['loss']
            assert int(csv_row['n']) == json_row['n'] == 21

    # Accuracy at the training resolution equals train.py's own final evaluation exactly.
    ours = {r['resolution']: r for r in report['checkpoints'][0]['results']}[_eval_train_res]
    with open(checkpoint.parent / 'log.jsonl') as f:
        last_epoch = [json.loads(line) for line in f][-1]
    assert ours['top1'] == last_epoch['val_top1'] and ours['top5'] == last_epoch['val_top5']
    # The loss depends on every logit, so the same images and weights are seen, not only the
    # same argmax (a barely trained model predicts almost one class).
    assert math.isclose(ours['loss'], last_epoch['val_loss'], rel_tol=1e-9, abs_tol=0)

    with open(out / 'attention.json') as f:
        attention = json.load(f)
    with open(out / 'attention.csv') as f:
        attention_rows = list(csv.DictReader(f))
    assert set(attention) == {'first', 'second'} and set(attention['first']) == {'16', '48'}
    stats = attention['first']['48']
    assert len(stats['distance']) == len(stats['entropy']) == 2  # depth 3, all but the last
    assert stats['n'] == 3
    # Entropy is at most log(number of keys): 1 + (48 / 4)^2 tokens at 48 px.
    assert all(0 <= e <= math.log(1 + 12 ** 2) + 1e-6 for e in stats['entropy'])
    assert len(attention_rows) == 2 * 2 * 2
    for row in attention_rows:
        ref = attention[row['label']][row['resolution']]
        assert float(row['distance']) == ref['distance'][int(row['layer']) - 1]
    for name in ('multires.png', 'attention_distance.png', 'attention_entropy.png'):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not [p for p in os.listdir(out) if p.startswith('.')]  # no temporary leftovers


def test_eval_bad_input_exit_2_one_line_nothing_written(_eval_tiny_run, capsys):
    base, checkpoint = _eval_tiny_run
    work = base / 'bad_inputs'
    work.mkdir()
    corrupt = work / 'corrupt.pth'
    corrupt.write_bytes(b'this is not a checkpoint' * 100)
    truncated = work / 'truncated.pth'
    data = checkpoint.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    other = work / 'other_arch.pth'
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    state['args'] = dict(state['args'], pe='ape',
                         model_kwargs=dict(state['args']['model_kwargs'], pe='ape'))
    torch.save(state, other)
    cases = {
        'missing': (['--checkpoint', str(work / 'nope.pth')], 'does not exist'),
        'corrupt': (['--checkpoint', str(corrupt)], 'cannot read checkpoint'),
        'truncated': (['--checkpoint', str(truncated)], 'cannot read checkpoint'),
        'architecture': (['--checkpoint', str(other)], 'pos_embed'),
        'resolution': (['--checkpoint', str(checkpoint), '--resolutions', '32', '30'],
                       'nearest valid sizes: 28x28, 28x32'),
        'data': (['--checkpoint', str(checkpoint), '--data-path', str(work / 'no_data')],
                 'no val/ folder'),
        'published without data': (['--checkpoint', str(checkpoint), '--model',
                                    'rope_mixed_deit_small_patch16_LS'], 'needs --data-path'),
    }
    # One case through a real process (the script's entry point and its exit status) ...
    arch_out = work / 'out_architecture_subprocess'
    process = _eval_run_cli(cases['architecture'][0] + ['--output-dir', str(arch_out)], work)
    # ... and every case in this process through train.cli, the function the main guard runs.
    for name, (argv, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            train.cli(eval_multires.main, eval_multires.get_args_parser(),
                      argv + ['--output-dir', str(work / f'out_{name.replace(" ", "_")}')])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1 and 'Traceback' not in stderr, (name, stderr)
        assert stderr.startswith('error: ') and expected in stderr, (name, stderr)
        assert not (work / f'out_{name.replace(" ", "_")}').exists(), name
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert stderr.startswith('error: ') and len(stderr.strip().splitlines()) == 1, stderr
    # The mismatched keys are named: the APE model misses pos_embed, freqs is unexpected.
    assert 'pos_embed' in stderr and 'freqs' in stderr, stderr
    assert not arch_out.exists()


def test_eval_published_weights_on_an_image_folder(tmp_path):
    """--model NAME with a {'model': state_dict} file and ImageFolder data (the paper's protocol)."""
    torch.manual_seed(0)
    name = 'rope_mixed_deit_small_patch16_LS'
    with torch.device('meta'):  # skip the slow initialisation: the weights are drawn below
        model = rope_vit.create_model(name, num_classes=3)
    model = model.to_empty(device='cpu').eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    torch.save({'model': model.state_dict()}, tmp_path / 'published.bin')
    generator = torch.Generator().manual_seed(0)
    for c in range(3):
        os.makedirs(tmp_path / 'data' / 'val' / f'class{c}')
        for i in range(2):  # non-square images: shorter side resized, then centre crop
            pixels = torch.randint(0, 256, (40 + 8 * i, 56, 3), generator=generator,
                                   dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / 'data' / 'val' / f'class{c}' / f'{i}.png')
    out = tmp_path / 'out'
    args = eval_multires.get_args_parser().parse_args([
        '--model', name, '--checkpoint', str(tmp_path / 'published.bin'),
        '--data-path', str(tmp_path / 'data'), '--resolutions', '32', '16',
        '--output-dir', str(out), '--num-workers', '0', '--quiet'])
    results, _ = eval_multires.main(args)
    assert list(results) == ['ViT-S RoPE-Mixed']
    with open(out / 'multires.json') as f:
        entry = json.load(f)['checkpoints'][0]
    assert entry['crop_ratio'] == 1.0 and entry['pe'] == 'rope_mixed' and entry['model'] == name

    def top1_of_model(resolution):  # independent of the sweep: the original model on the images
        dataset = train.build_eval_dataset({'dataset': 'folder', 'data_path': str(tmp_path / 'data'),
                                            'eval_crop_ratio': 1.0}, resolution)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        assert images.shape[-2:] == (resolution, resolution) and len(dataset) == 6
        with torch.no_grad():
            return 100.0 * (model(images).argmax(-1) == targets).sum().item() / 6
    for row in entry['results']:
        assert row['n'] == 6 and row['top1'] == top1_of_model(row['resolution'])
    # The same weights as a .safetensors file (timm's hub format) give the same table.
    st = pytest.importorskip('safetensors.torch')
    st.save_file(model.state_dict(), str(tmp_path / 'model.safetensors'))
    args_st = eval_multires.get_args_parser().parse_args([
        '--model', name, '--checkpoint', str(tmp_path / 'model.safetensors'),
        '--data-path', str(tmp_path / 'data'), '--resolutions', '32', '16',
        '--output-dir', str(tmp_path / 'out_st'), '--num-workers', '0', '--quiet'])
    eval_multires.main(args_st)
    with open(tmp_path / 'out_st' / 'multires.json') as f:
        assert json.load(f)['checkpoints'][0]['results'] == entry['results']
    # Every position policy on the published weights: one row each, scored as the model with
    # that policy set scores the images.
    args_policies = eval_multires.get_args_parser().parse_args([
        '--model', name, '--checkpoint', str(tmp_path / 'published.bin'),
        '--data-path', str(tmp_path / 'data'), '--resolutions', '32', '16', '--rope-positions',
        'extrapolate', 'interpolate', 'ntk', 'yarn', '--output-dir', str(tmp_path / 'out_policies'),
        '--num-workers', '0', '--quiet'])
    by_policy, _ = eval_multires.main(args_policies)
    assert list(by_policy) == [f'ViT-S RoPE-Mixed {p}' for p in rope_vit.ROPE_POSITIONS]
    assert by_policy['ViT-S RoPE-Mixed extrapolate'] == results['ViT-S RoPE-Mixed']
    for policy in rope_vit.ROPE_POSITIONS:
        model.rope_positions = policy
        for row in by_policy[f'ViT-S RoPE-Mixed {policy}']:
            assert row['top1'] == top1_of_model(row['resolution'])
    model.rope_positions = 'extrapolate'
    # Swin weights are evaluated with the Swin code's crop ratio.
    swin_cfg = eval_multires._published_config('swin_tiny_patch4_window7_224', {}, args)
    assert swin_cfg['eval_crop_ratio'] == 224 / 256 and swin_cfg['num_classes'] == 1000


def test_eval_swin_attention_is_window_local_over_every_block():
    torch.manual_seed(0)
    model = swin_rope.create_model('swin_tiny', pe='rope_mixed', embed_dim=8, depths=(2, 2),
                                   num_heads=(1, 2), img_size=32, window_size=2).eval()
    images = torch.randn(2, 3, 48, 48)  # window 2 * 48 / 32 = 3: stage grids 12x12 and 6x6
    with torch.no_grad():
        layers = eval_multires._attention_layers(model, images)
        _, blocks = model.forward_with_attention(images)
    assert [name for name, _, _ in layers] == ['stage 0 block 0', 'stage 0 block 1',
                                               'stage 1 block 2', 'stage 1 block 3']
    for (_, distance, entropy), block in zip(layers, blocks):
        assert block['window'] == 3
        # Independent: keys of a 3 x 3 window lie within its diagonal, 9 keys at most.
        assert 0 < float(distance) <= math.hypot(2, 2) and 0 < float(entropy) <= math.log(9)
        expected = -(block['attn'] * block['attn'].clamp_min(1e-30).log()).sum(-1).mean()
        torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=1e-5)


# ==============================================================================================
# hubconf.py: torch.hub entry points
# ==============================================================================================

def test_hubconf_entry_points_build_and_load_pretrained(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    root = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, root)
    try:
        import hubconf
    finally:
        sys.path.remove(root)
    assert hubconf.dependencies == ['torch']
    entries = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_')]  # torch.hub.list's rule
    assert sorted(entries) == sorted(rope_vit.list_models() + swin_rope.list_models())
    small = torch.hub.load(root, 'vit_tiny', source='local', pe='rope_mixed', **_VIT_TINY)
    assert isinstance(small, rope_vit.RopeViT) and small.pe == 'rope_mixed' and small.num_classes == 10
    swin = torch.hub.load(root, 'swin_rope_mixed_rpb_tiny_patch4_window7_224', source='local', num_classes=3)
    assert isinstance(swin, swin_rope.SwinTransformer) and swin.pe == 'rope_mixed_rpb' and swin.num_classes == 3
    name = 'rope_axial_deit_small_patch16_LS'
    published = _published_with_drawn_weights(rope_vit, name)
    _place_in_hub_cache(rope_vit, name, published.state_dict())
    model = torch.hub.load(root, name, source='local', pretrained=True)
    assert all(torch.equal(v, published.state_dict()[k]) for k, v in model.state_dict().items())
    assert 'pretrained=True loads the released weights' in hubconf.rope_mixed_deit_base_patch16_LS.__doc__
    with pytest.raises(RuntimeError, match='without network, save that file as'):
        torch.hub.load(root, 'swin_rope_mixed_base_patch4_window7_224', source='local', pretrained=True)


# ==============================================================================================
# README.md: the example runs as written
# ==============================================================================================

_README_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'README.md')


def _readme_example(heading='## Use the model in your code'):
    """The first python block under `heading` in README.md."""
    text = open(_README_PATH).read()
    section = text.split(heading + '\n', 1)[1]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    code = _readme_example()
    path = re.search(r"load_checkpoint\(model, '([^']+)'\)", code).group(1)
    # A file in the published layout (OFFICIAL_NOTES section 2): {'model': sd} with the
    # official grid buffers, which load_checkpoint must drop.
    torch.manual_seed(0)
    published = rope_vit.create_model('rope_mixed_deit_small_patch16_LS').state_dict()
    grid = torch.arange(196, dtype=torch.float32)
    published['freqs_t_x'], published['freqs_t_y'] = grid % 14, torch.div(grid, 14, rounding_mode='floor')
    torch.save({'model': published}, tmp_path / path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, 'README.md', 'exec'), {})
    printed = capsys.readouterr().out
    assert printed.split() == ['torch.Size([1,', '1000])', '12', 'torch.Size([1,', '6,', '197,', '197])']


def test_readme_published_weights_example_runs_offline(tmp_path, monkeypatch, capsys):
    """The example as written, with the two released files already in torch.hub's cache (no
    network) and timm's model.safetensors in the working directory."""
    st = pytest.importorskip('safetensors.torch')
    _offline_hub(monkeypatch, tmp_path)
    for module, name in ((rope_vit, 'rope_mixed_deit_small_patch16_LS'),
                         (swin_rope, 'swin_rope_mixed_tiny_patch4_window7_224')):
        model = _published_with_drawn_weights(module, name)
        _place_in_hub_cache(module, name, model.state_dict())
        if module is rope_vit:  # timm's layout of the same weights
            timm_sd = dict(model.state_dict())
            timm_sd['rope.freqs'] = timm_sd.pop('freqs').unflatten(-1, (6, 32)).contiguous()
            st.save_file(timm_sd, str(tmp_path / 'model.safetensors'))
            vit_sd = model.state_dict()
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_readme_example('## Use the published weights'), 'README.md', 'exec'), namespace)
    assert capsys.readouterr().out.strip() == rope_vit.pretrained_cache_path('rope_mixed_deit_small_patch16_LS')
    for key in ('vit', 'timm_copy'):
        assert all(torch.equal(v, vit_sd[k]) for k, v in namespace[key].state_dict().items()), key
    assert namespace['head10'].num_classes == 10 and namespace['swin'].pe == 'rope_mixed'


def test_readme_dense_backbone_example_runs_as_written(capsys):
    exec(compile(_readme_example('## Backbone for detection and segmentation'), 'README.md', 'exec'), {})
    assert capsys.readouterr().out.strip() == '[(256, 256), (128, 128), (64, 64), (32, 32)]'


# ==============================================================================================
# benchmark.py and the RoPE fast path: caches, custom autograd, the benchmark table
# ==============================================================================================

_BENCH_TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2, num_classes=10)  # head dim 32


def _bench_vit(pe, seed=0):
    torch.manual_seed(seed)
    return rope_vit.create_model('vit_tiny', pe=pe, **_BENCH_TINY_VIT)


def test_bench_end_to_end_prints_the_table(capsys):
    args = benchmark.get_args_parser().parse_args(
        ['--family', 'vit', '--vit-model', 'vit_tiny', '--vit-pe', 'ape', 'rope_mixed',
         '--resolutions', '32', '--batch-size', '2', '--reps', '2', '--warmup', '1', '--threads', '2'])
    tables = benchmark.main(args)
    out = capsys.readouterr().out
    assert len(tables) == 2  # infer, train
    for table in tables:
        assert table in out
        lines = [line for line in table.splitlines() if line.startswith('|')]
        header = [c.strip() for c in lines[0].strip('|').split('|')]
        assert header[:4] == ['model', 'ms/step median', 'ms/step min', 'spread']
        assert {'img/s', 'peak MiB', 'RoPE share', 'time / ape', 'memory / ape', 'speed-up vs timm'} <= set(header)
        rows = {cells[0]: dict(zip(header, cells)) for cells in
                ([c.strip() for c in line.strip('|').split('|')] for line in lines[2:])}
        assert list(rows) == ['ape', 'rope_mixed']
        assert rows['ape']['time / ape'] == '1.000' and rows['ape']['RoPE share'] == '0.00 %'
        share = float(rows['rope_mixed']['RoPE share'].rstrip(' %'))
        assert 0 < share < 100  # the labelled RoPE code is found by the profiler
        assert float(rows['rope_mixed']['peak MiB']) > 0 and float(rows['rope_mixed']['img/s']) > 0
        assert 'other processes used' in table


def test_bench_format_table_ratios():
    args = benchmark.get_args_parser().parse_args(['--batch-size', '4'])

    def row(t_min, peak):
        return dict(times=[t_min], median=t_min * 1.1, min=t_min, spread=0.1, share=0.005, peak=peak * 2 ** 20)
    rows = {'ape': row(1.0, 100), 'rope_mixed': row(1.02, 104), 'timm:rope_mixed': row(1.2, 130)}
    table = benchmark.format_table('vit', 384, 'train', rows, args, 0.05, None)
    mixed = next(line for line in table.splitlines() if line.startswith('| rope_mixed'))
    cells = [c.strip() for c in mixed.strip('|').split('|')]
    assert cells[4] == f'{4 / 1.02:.1f}'  # img/s from the minimum
    assert cells[6] == '0.50 %' and cells[7] == '1.020' and cells[8] == '1.040'
    assert cells[9] == f'{1.2 / 1.02:.2f}x'  # timm time / ours
    assert '0.05 cores' in table


def test_bench_bad_resolution_is_one_line_error():
    proc = subprocess.run([sys.executable, 'benchmark.py', '--family', 'vit', '--resolutions', '30'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith('error: --resolutions 30') and proc.stderr.count('\n') == 1
    assert 'Traceback' not in proc.stderr


def test_bench_load_meter_and_bounded_wait():
    meter = benchmark.LoadMeter().start()
    sum(i * i for i in range(100000))  # some work of our own, which must not count as load
    load = meter.stop()
    assert math.isnan(load) or 0 <= load <= (torch.get_num_threads() + 64)
    budget = [0.0]
    benchmark.wait_quiet(budget, threshold=1e9, window=0.05)  # quiet at once: returns after one window
    assert budget[0] <= 0


def _complex_table(angles):
    """e^{i phi} as the fused path's complex table."""
    return torch.complex(angles.cos(), angles.sin())


def test_bench_rotation_gradcheck_matches_plain_formula():
    torch.manual_seed(0)
    B, T, heads, D = 2, 5, 2, 8
    qkv = torch.randn(B * T, 3 * heads * D, dtype=torch.float64, requires_grad=True)

    def plain(qkv, angles):  # autograd of Eq. 11 as written (real form)
        split = qkv.view(B, T, 3, heads, D).permute(2, 0, 3, 1, 4)  # (3, B, heads, T, D)
        q, k = rope_vit.apply_rope(split[:2], *rope_vit.rope_cos_sin(angles)).unbind(0)
        return q, k, split[2]

    for rot_shape in ((heads, T, D // 2), (T, D // 2), (1, T, D // 2)):  # Mixed, Axial, shared
        angles = torch.randn(rot_shape, dtype=torch.float64, requires_grad=True)

        def fast(qkv, angles):
            return rope_vit.RotateQK.apply(qkv * 1, _complex_table(angles), heads, B)[1:]
        assert torch.autograd.gradcheck(fast, (qkv, angles))
        grad = [torch.randn(B, heads, T, D, dtype=torch.float64) for _ in range(3)]
        got = torch.autograd.grad(fast(qkv, angles), (qkv, angles), grad)
        want = torch.autograd.grad(plain(qkv, angles), (qkv, angles), grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)

    # RoPE-Mixed training path: R built without autograd, the gradient reaches theta in closed form
    freqs = torch.randn(2, heads * D // 2, dtype=torch.float64, requires_grad=True)
    positions = torch.randn(T, 2, dtype=torch.float64)

    def angles_of(freqs):  # Eq. 14: phi = p^x theta^x + p^y theta^y, (heads, T, D/2)
        return (positions @ freqs).view(T, heads, D // 2).transpose(0, 1)

    def fast_freqs(qkv, freqs):
        with torch.no_grad():
            rot = _complex_table(angles_of(freqs))
        return rope_vit.RotateQK.apply(qkv * 1, rot, heads, B, freqs, positions)[1:]
    assert torch.autograd.gradcheck(fast_freqs, (qkv, freqs))
    grad = [torch.randn(B, heads, T, D, dtype=torch.float64) for _ in range(3)]
    got = torch.autograd.grad(fast_freqs(qkv, freqs), (qkv, freqs), grad)
    want = torch.autograd.grad(plain(qkv, angles_of(freqs)), (qkv, freqs), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_bench_fast_path_equals_readable_path_and_saves_no_extra_activations():
    x = torch.randn(2, 3, 48, 64)
    model = _bench_vit('rope_mixed').train()
    logits = model(x)
    ref, _ = model.forward_with_attention(x)  # readable apply_rope on cos/sin tables with their autograd graph
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    logits.square().sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref.square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)

    def saved_bytes(m):  # bytes of distinct storages autograd keeps for backward
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(m(x), torch.tensor([1, 2])).backward()
        return sum(storages.values())
    ape = saved_bytes(_bench_vit('ape').train())
    mixed = saved_bytes(_bench_vit('rope_mixed').train())
    assert mixed <= ape * 1.02, (mixed, ape)  # q, k rotated in place: only the small tables are extra


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed'])
def test_vit_fused_tables_equal_readable_tables(pe):
    """The fast path's per-axis complex tables equal Eq. 10's cos/sin of Eq. 12 / 14 angles
    (fp32 round-off; angles up to ~40 rad on a 9x23 grid), class token the identity."""
    model = _vit_tiny(pe)
    readable = model.block_rotations(9, 23, torch.device('cpu'))
    fused = rope_vit.fused_rotations(model, 9, 23, torch.device('cpu'))
    for (cos, sin), rot in zip(readable, fused):
        assert rot.dtype == torch.complex64 and rot.shape == cos.shape
        assert (rot.real - cos).abs().max() < 2e-6 and (rot.imag - sin).abs().max() < 2e-6
        assert torch.all(rot[..., 0, :] == 1)


def test_bench_rope_cache_follows_frequencies():
    x = torch.randn(2, 3, 32, 48)
    model = _bench_vit('rope_mixed')
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def fresh_output(m):
        twin = _bench_vit('rope_mixed', seed=5).eval()
        twin.load_state_dict(m.state_dict())
        with torch.no_grad():
            return twin(x)
    model.eval()
    with torch.no_grad():
        before = model(x)  # fills the cache
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    model.train()
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert model.freqs.grad.abs().sum() > 0
    optimizer.step()  # in place: bumps the frequencies' version
    model.eval()
    with torch.no_grad():
        after_step = model(x)
    assert not torch.equal(after_step, before)
    torch.testing.assert_close(after_step, fresh_output(model), atol=0, rtol=0)

    other = _bench_vit('rope_mixed', seed=3)
    rope_vit.load_checkpoint(model, {'model': other.state_dict()})
    with torch.no_grad():
        loaded = model(x)
        torch.testing.assert_close(loaded, other.eval()(x), atol=0, rtol=0)
    # tables made under inference_mode are not reused where autograd needs them
    axial = _bench_vit('rope_axial').eval()
    with torch.inference_mode():
        axial(x)
    axial(x).sum().backward()
    assert axial.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------------------------------
# Resolution change: RoPE position policies (rope_positions), both model files
# ---------------------------------------------------------------------------------------

def _vit_policy_model(pe, **kw):
    """Tiny ViT built for 64 x 64 at patch 16: training grid 4 x 4, head dim 32."""
    return _vit_tiny(pe, img_size=64, patch_size=16, **kw)


def _swin_policy_model(pe, **kw):
    """_swin_small_model with its redrawn weights: every block built for window 4."""
    return _swin_redraw(_swin_small_model(pe, **kw))


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed', 'rope_mixed_ape'])
def test_vit_policies_identity_at_training_grid_and_set_back_restores_bit_for_bit(pe):
    model = _vit_policy_model(pe)
    assert model.rope_positions == 'extrapolate' and model.cfg.rope_train_grid == (4, 4)
    at_train, off_train = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 160)  # grids 4x4, 6x10
    with torch.no_grad():
        base_train, base_off = model(at_train), model(off_train)
        readable_train = model.forward_with_attention(at_train)[0]
        for policy in rope_vit.ROPE_POSITIONS[1:]:
            model.rope_positions = policy
            assert torch.equal(model(at_train), base_train), policy
            assert torch.equal(model.forward_with_attention(at_train)[0], readable_train), policy
            changed = model(off_train)
            assert (changed - base_off).abs().max() > 1e-2, policy  # the policy acts off the grid
            # the fused path and its cache stay exact under every policy
            torch.testing.assert_close(changed, model.forward_with_attention(off_train)[0], atol=2e-5, rtol=1e-5)
        model.rope_positions = 'extrapolate'
        assert torch.equal(model(off_train), base_off)
    with pytest.raises(ValueError, match='valid values: extrapolate, interpolate, ntk, yarn'):
        model.rope_positions = 'stretch'
    with pytest.raises(ValueError, match='yarn_alpha < yarn_beta'):
        rope_vit.create_model('vit_tiny', pe='rope_mixed', yarn_alpha=1.0, yarn_beta=0.5)
    assert rope_vit.create_model('vit_tiny', pe='rope_axial', rope_positions='ntk').rope_positions == 'ntk'


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed', 'rope_mixed_rpb'])
def test_swin_policies_identity_at_training_window_and_set_back_restores_bit_for_bit(pe):
    model = _swin_policy_model(pe)
    at_train, off_train = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 96)  # windows 4, 6
    with torch.no_grad():
        base_train, base_off = model(at_train), model(off_train)
        for policy in swin_rope.ROPE_POSITIONS[1:]:
            model.rope_positions = policy
            assert all(a.rope_positions[0] == policy for a in model.modules()
                       if isinstance(a, swin_rope.WindowAttention))
            assert torch.equal(model(at_train), base_train), policy
            changed = model(off_train)
            assert (changed - base_off).abs().max() > 1e-2, policy
            torch.testing.assert_close(changed, model.forward_with_attention(off_train)[0], atol=2e-5, rtol=1e-5)
        model.rope_positions = 'extrapolate'
        assert torch.equal(model(off_train), base_off)
    with pytest.raises(ValueError, match='valid values'):
        swin_rope.create_model('swin_tiny', pe='rope_mixed', rope_positions='stretch')


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed'])
def test_vit_interpolate_equals_extrapolation_on_scaled_positions(pe, monkeypatch):
    """Independent formulation: the positions p * train / grid instead of scaled frequencies."""
    model = _vit_policy_model(pe)
    x = torch.randn(2, 3, 96, 160)  # grid 6 x 10 against 4 x 4
    model.rope_positions = 'interpolate'
    with torch.no_grad():
        got = model(x)
    model.rope_positions = 'extrapolate'
    integer_positions = rope_vit.patch_grid_positions
    monkeypatch.setattr(rope_vit, 'patch_grid_positions', lambda h, w, device=None: tuple(
        t * 4 / side for t, side in zip(integer_positions(h, w, device), (w, h))))
    with torch.no_grad():
        want = model.forward_with_attention(x)[0]  # the readable path reads the positions
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (want - model(x)).abs().max() > 1e-2


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed'])
def test_swin_interpolate_equals_extrapolation_on_scaled_positions(pe, monkeypatch):
    model = _swin_policy_model(pe)
    twin = copy.deepcopy(model)  # no cached tables yet
    x = torch.randn(2, 3, 128, 128)  # window 8 against the built 4
    model.rope_positions = 'interpolate'
    with torch.no_grad():
        got = model(x)
    integer_positions = swin_rope.window_positions
    monkeypatch.setattr(swin_rope, 'window_positions', lambda w, device=None: tuple(
        t * 4 / w for t in integer_positions(w, device)))
    with torch.no_grad():
        want = twin(x)  # extrapolate on the scaled positions
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    monkeypatch.undo()
    with torch.no_grad():
        assert (want - copy.deepcopy(twin)(x)).abs().max() > 1e-2


def test_axial_ntk_equals_a_model_built_with_the_scaled_base():
    # ViT: head dim 32, d = 16 rotary dims per axis; grid 8 x 8 against 4 x 4: s = 2
    model = _vit_policy_model('rope_axial')
    model.rope_positions = 'ntk'
    scaled = rope_vit.create_model('vit_tiny', pe='rope_axial', img_size=64, patch_size=16, **_VIT_TINY,
                                   rope_theta=100.0 * 2 ** (16 / 14)).eval()
    scaled.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), scaled(x), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_with_attention(x)[0], scaled(x), atol=2e-5, rtol=1e-5)
    # Swin: head dim 8, d = 4 per axis; window 8 against 4: s = 2, theta' = 50 * 2^(4/2)
    swin = _swin_policy_model('rope_axial')
    swin.rope_positions = 'ntk'
    swin_scaled = _swin_small_model('rope_axial', rope_theta=50.0 * 2 ** 2)
    swin_scaled.load_state_dict({k: v for k, v in swin.state_dict().items() if 'rope_freqs' not in k}, strict=False)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(swin(x), swin_scaled(x), atol=2e-5, rtol=1e-5)


def _logits_by_offset(tables, t_x, t_y, head_dim, heads):
    """Logits of one repeated q and k under the rotation tables, grouped by the offset (dx, dy)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, heads, 1, head_dim).unbind(0)
    cos, sin = tables  # (heads | 1, N, D/2)
    logits = rope_vit.apply_rope(q.expand(-1, t_x.numel(), -1), cos, sin) \
        @ rope_vit.apply_rope(k.expand(-1, t_x.numel(), -1), cos, sin).transpose(-1, -2)  # (heads, N, N)
    groups = {}
    for n in range(t_x.numel()):
        for m in range(t_x.numel()):
            groups.setdefault((int(t_x[n] - t_x[m]), int(t_y[n] - t_y[m])), []).append(logits[:, n, m])
    return [torch.stack(v, -1) for v in groups.values()]


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed'])
def test_logits_stay_relative_position_invariant_under_every_policy(pe):
    vit = _vit_policy_model(pe)
    swin = _swin_policy_model(pe)
    attn = swin.layers[0].blocks[0].attn
    t_x, t_y = rope_vit.patch_grid_positions(6, 10)
    w_x, w_y = swin_rope.window_positions(6)
    for policy in rope_vit.ROPE_POSITIONS:
        vit.rope_positions = swin.rope_positions = policy
        cos, sin = vit.block_rotations(6, 10, torch.device('cpu'))[-1]  # (heads, T, D/2)
        spread = [g.max(-1).values - g.min(-1).values
                  for g in _logits_by_offset((cos[..., 1:, :], sin[..., 1:, :]), t_x, t_y, 32, 2)]
        assert max(s.max() for s in spread) < 1e-4, policy
        cos, sin = attn.rope_tables(6)  # (2, 1, nH, N, d/2): [1] rotates k, unscaled
        spread = [g.max(-1).values - g.min(-1).values
                  for g in _logits_by_offset((cos[1, 0], sin[1, 0]), w_x, w_y, attn.head_dim, attn.num_heads)]
        assert max(s.max() for s in spread) < 1e-4, policy


@pytest.mark.parametrize('family', ['vit', 'swin'])
def test_policy_frequency_gradient_fused_equals_readable(family):
    model = _vit_policy_model('rope_mixed') if family == 'vit' else _swin_policy_model('rope_mixed')
    x = torch.randn(2, 3, 96, 96)  # off the training grid / window
    freqs = model.freqs if family == 'vit' else model.layers[0].blocks[0].attn.rope_freqs
    model.train()
    for policy in ('interpolate', 'ntk', 'yarn'):
        model.rope_positions = policy
        model.zero_grad()
        model(x).square().sum().backward()
        fused = freqs.grad.clone()
        model.zero_grad()
        model.forward_with_attention(x)[0].square().sum().backward()
        assert fused.abs().max() > 1e-3
        torch.testing.assert_close(fused, freqs.grad, atol=1e-4, rtol=1e-3)


def test_policy_formulas():
    mag = rope_vit.rope_magnitudes(32, 100.0)  # 8 pairs per axis
    assert rope_vit.rope_position_scale('extrapolate', mag, 4, 8, 100.0, 8, 0.25, 1.0) is None
    for policy in rope_vit.ROPE_POSITIONS:  # the identity at the training grid
        assert rope_vit.rope_position_scale(policy, mag, 4, 4, 100.0, 8, 0.25, 1.0) is None
    torch.testing.assert_close(rope_vit.rope_position_scale('interpolate', mag, 4, 10, 100.0, 8, 0.25, 1.0),
                               torch.full((8,), 0.4))
    ntk = rope_vit.rope_position_scale('ntk', mag, 4, 8, 100.0, 8, 0.25, 1.0)
    torch.testing.assert_close(ntk, 2.0 ** (-torch.arange(8) / 7.0))  # s^(-j/(pairs-1))
    yarn = rope_vit.rope_position_scale('yarn', mag, 14, 28, 100.0, 8, 0.25, 1.0)
    turns = 14 * mag / (2 * math.pi)
    assert torch.all(yarn[turns >= 1] == 1) and torch.all(yarn[turns <= 0.25] == 0.5)
    assert torch.all((yarn[1:] <= yarn[:-1]))  # lower frequencies interpolate more
    assert rope_vit.yarn_attention_scale('yarn', 2.0) == pytest.approx(1 + 0.1 * math.log(2))
    assert rope_vit.yarn_attention_scale('yarn', 0.5) == 1 and rope_vit.yarn_attention_scale('ntk', 2.0) == 1
    for name in ('ROPE_POSITIONS', 'rope_position_scale', 'yarn_attention_scale'):  # two copies, one behaviour
        assert getattr(swin_rope, name) is not getattr(rope_vit, name)
    for policy in rope_vit.ROPE_POSITIONS:
        a = rope_vit.rope_position_scale(policy, mag, 7, 12, 100.0, 8, 0.25, 1.0)
        b = swin_rope.rope_position_scale(policy, mag, 7, 12, 100.0, 8, 0.25, 1.0)
        assert (a is None and b is None) or torch.equal(a, b)


def test_coordinate_augmentation_matches_dinov3_normalised_coordinates():
    p = torch.arange(7, dtype=torch.float64)
    for shift, scale in ((0.3, 1.0), (-0.2, 1.7), (0.0, 0.6)):
        u = (2 * p + 1 - 7) / 7  # DINOv3: patch centres in (-1, 1)
        u = (u + shift) * scale
        want = (u * 7 + 7 - 1) / 2  # back to patch units
        for module in (rope_vit, swin_rope):
            torch.testing.assert_close(module.augment_positions(p, 7, shift, scale), want)
    assert torch.equal(rope_vit.augment_positions(p.float(), 7, 0.0, 1.0), p.float())  # identity is exact


@pytest.mark.parametrize('family', ['vit', 'swin'])
def test_coordinate_augmentation_moves_rope_positions_only_and_fused_equals_readable(family):
    model = _vit_policy_model('rope_mixed') if family == 'vit' else _swin_policy_model('rope_mixed')
    freqs = model.freqs if family == 'vit' else model.layers[0].blocks[0].attn.rope_freqs
    x = torch.randn(2, 3, 64, 64)
    assert model.rope_coord_augment is None  # off unless a training loop sets it
    model.train()
    base = model(x)
    model.rope_coord_augment = (0.0, 0.0, 1.0, 1.0)
    assert torch.equal(model(x), base)
    model.rope_coord_augment = (0.2, -0.1, 1.3, 0.8)
    model.zero_grad()
    moved = model(x)
    moved.square().sum().backward()
    fused = freqs.grad.clone()
    assert (moved - base).abs().max() > 1e-2
    model.zero_grad()
    readable = model.forward_with_attention(x)[0]
    readable.square().sum().backward()
    torch.testing.assert_close(moved, readable, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fused, freqs.grad, atol=1e-4, rtol=1e-3)
    model.rope_coord_augment = None
    model.eval()
    with torch.no_grad():  # the eval cache never hands out augmented tables
        evaluated = model(x)
        model.rope_coord_augment = (0.2, -0.1, 1.3, 0.8)
        assert not torch.equal(model(x), evaluated)
        model.rope_coord_augment = None
        assert torch.equal(model(x), evaluated)


def test_train_coordinate_augmentation_off_by_default_and_seeded():
    cfg = vars(train.get_args_parser().parse_args([]))
    assert train.rope_coord_augment(cfg, 0, 0, 0) is None  # off by default
    cfg.update(rope_coord_shift=0.1, rope_coord_jitter=1.1, rope_coord_rescale=2.0)
    draws = [train.rope_coord_augment(cfg, epoch, step, rank) for epoch in (0, 1) for step in range(20)
             for rank in (0, 1)]
    assert draws[0] == train.rope_coord_augment(cfg, 0, 0, 0)  # a pure function of seed, epoch, step, rank
    assert len(set(draws)) == len(draws)
    shifts = np.array([d[:2] for d in draws])
    scales = np.array([d[2:] for d in draws])
    assert np.abs(shifts).max() <= 0.1 and 1 / 2.2 <= scales.min() and scales.max() <= 2.2
    assert scales.min() < 0.8 and scales.max() > 1.25  # the rescale acts
    cfg['seed'] = 1
    assert train.rope_coord_augment(cfg, 0, 0, 0) != draws[0]


def test_eval_rope_positions_rows_per_policy_and_frequency_analysis(_eval_tiny_run, tmp_path, capsys):
    _, checkpoint = _eval_tiny_run
    # An APE twin of the same run: appears once whatever the policies
    state = torch.load(checkpoint, weights_only=True)
    args = dict(state['args'], pe='ape', model_kwargs=dict(state['args']['model_kwargs'], pe='ape'))
    ape = rope_vit.create_model(args['model'], **args['model_kwargs'])
    torch.save({'model': ape.state_dict(), 'args': args}, tmp_path / 'ape.pth')
    out = tmp_path / 'out'
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(checkpoint), str(tmp_path / 'ape.pth'), '--labels', 'mixed', 'ape',
        '--resolutions', '16', str(_eval_train_res), '--rope-positions', 'extrapolate', 'interpolate', 'ntk', 'yarn',
        '--analyze-frequencies', '--output-dir', str(out), '--num-workers', '0', '--quiet']))
    assert list(results) == ['mixed extrapolate', 'mixed interpolate', 'mixed ntk', 'mixed yarn', 'ape']
    at_train = {label: [r['top1'] for r in rows if r['resolution'] == _eval_train_res][0]
                for label, rows in results.items()}
    assert len({at_train[f'mixed {p}'] for p in rope_vit.ROPE_POSITIONS}) == 1  # identity at the training grid
    with open(out / 'multires.json') as f:
        report = json.load(f)['checkpoints']
    assert [e['rope_positions'] for e in report] == list(rope_vit.ROPE_POSITIONS) + [None]
    with open(out / 'multires.csv') as f:
        assert {row['rope_positions'] for row in csv.DictReader(f)} == set(rope_vit.ROPE_POSITIONS) | {''}
    printed = capsys.readouterr().out
    assert 'mixed / block 3' in printed and 'ape / block' not in printed  # the frequency table
    with open(out / 'frequencies.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['label'] for r in rows] == ['mixed'] * 3  # one row per layer, the APE model has none
    assert all(abs(float(r['xy_energy_ratio']) - 1) < 0.5 for r in rows)
    assert (out / 'frequencies.png').stat().st_size > 0


def test_train_closing_table_shows_rope_extrapolated_and_interpolated(_eval_tiny_run, tmp_path):
    base, checkpoint = _eval_tiny_run
    with open(base / 'run' / 'resolutions.json') as f:
        summary = json.load(f)
    by_policy = summary['results_by_rope_positions']
    assert list(by_policy) == ['extrapolate', 'interpolate']
    assert summary['results'] == by_policy['extrapolate']   # the paper's protocol first
    # The same numbers as eval_multires.py on a freshly loaded copy, policy by policy.
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(checkpoint), '--labels', 'run', '--resolutions', '16',
        str(_eval_train_res), '--rope-positions', 'extrapolate', 'interpolate',
        '--output-dir', str(tmp_path / 'out'), '--num-workers', '0', '--quiet']))
    for policy, rows in by_policy.items():
        ours = {r['resolution']: r['top1'] for r in results[f'run {policy}']}
        assert {r['resolution']: r['top1'] for r in rows} == ours, policy
    # At the training grid both policies are the same model.
    at_train = [[r['top1'] for r in rows if r['resolution'] == _eval_train_res] for rows in by_policy.values()]
    assert at_train[0] == at_train[1]


def test_eval_mean_over_seeds_groups_runs_by_label(_eval_tiny_run, tmp_path, capsys):
    _, checkpoint = _eval_tiny_run
    # Two more "seeds": the same run with other head weights (so the accuracies differ).
    state = torch.load(checkpoint, weights_only=True)
    paths = [str(checkpoint)]
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = {k: v + 0.5 * torch.randn_like(v) if k.startswith('head.') else v
                 for k, v in state['model'].items()}
        paths.append(str(tmp_path / f'seed{seed}.pth'))
        torch.save({'model': model, 'args': state['args']}, paths[-1])
    out = tmp_path / 'out'
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', *paths, '--resolutions', '16', str(_eval_train_res), '--rope-positions',
        'extrapolate', 'interpolate', '--mean-over-seeds', '--output-dir', str(out),
        '--num-workers', '0', '--quiet']))
    assert len(results) == 6   # every run is evaluated and kept under its own label
    printed = capsys.readouterr().out
    label = train.config_label(state['args'])
    with open(out / 'multires.json') as f:
        report = json.load(f)
    assert [m['label'] for m in report['means']] == [f'{label} extrapolate', f'{label} interpolate']
    with open(out / 'multires_mean.csv') as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 4 and {row['runs'] for row in summary} == {'3'}
    for policy in ('extrapolate', 'interpolate'):
        runs = [e for e in report['checkpoints'] if e['rope_positions'] == policy]
        assert [e['checkpoint'] for e in runs] == paths
        assert {e['group'] for e in runs} == {f'{label} {policy}'}
        for resolution in (16, _eval_train_res):
            top1 = [r['top1'] for e in runs for r in e['results'] if r['resolution'] == resolution]
            row = next(r for r in summary if r['label'] == f'{label} {policy}'
                       and int(r['resolution']) == resolution)
            assert float(row['top1_mean']) == pytest.approx(statistics.mean(top1), abs=1e-9)
            assert float(row['top1_sd']) == pytest.approx(statistics.stdev(top1), abs=1e-9)
            assert (float(row['top1_min']), float(row['top1_max'])) == (min(top1), max(top1))
            # The table shows the mean and the spread, one row per configuration and policy.
            assert f'{statistics.mean(top1):.1f} ± {statistics.stdev(top1):.1f}' in printed
    assert any(float(row['top1_sd']) > 0 for row in summary)   # the runs do differ
    assert sum(line.startswith(f'| {label}') for line in printed.splitlines()) == 2
    assert 'over 3 runs (seeds)' in printed
    assert (out / 'multires.png').stat().st_size > 0


def test_frequency_statistics_on_published_architectures():
    # The paper's init: every head's pairs t and D/4 + t at a and a + 90 degrees: isotropic.
    vit = rope_vit.create_model('rope_mixed_deit_small_patch16_LS')
    layers = eval_multires.analyze_frequencies(vit)
    assert len(layers) == 12 and all(row['count'] == 6 * 32 for row in layers)
    for row in layers:
        assert row['xy_energy_ratio'] == pytest.approx(1, abs=1e-5)
        assert row['angle_spread'] == pytest.approx(1, abs=1e-5) and row['principal_direction'] is None
        assert row['magnitude_max'] == pytest.approx(1) and row['magnitude_min'] == pytest.approx(10 ** (-15 / 16))
    swin = swin_rope.create_model('swin_rope_mixed_tiny_patch4_window7_224')
    assert [row['name'] for row in eval_multires.analyze_frequencies(swin)][:3] == [
        'stage 1 block 1', 'stage 1 block 2', 'stage 2 block 1']
    assert eval_multires.analyze_frequencies(rope_vit.create_model('rope_axial_deit_small_patch16_LS')) == []
    # Anisotropy: every frequency along x
    stats = eval_multires.frequency_statistics(torch.tensor([[1.0, 0.5, 0.2], [0.0, 0.0, 0.0]]))
    assert stats['xy_energy_ratio'] == math.inf and stats['angle_spread'] == pytest.approx(0)
    assert stats['principal_direction'] == pytest.approx(0)
    stats = eval_multires.frequency_statistics(torch.tensor([[0.1, 0.1], [1.0, -1.0]]))
    assert stats['xy_energy_ratio'] == pytest.approx(0.01)
