"""Checkpoints and published weights: published and timm layouts, load errors, parameter counts,
pretrained=True from an offline torch.hub cache, the safetensors reader, hubconf.py.
"""
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rope_vit
import swin_rope

from testkit import (VIT_TINY, offline_hub, place_in_hub_cache, published_with_drawn_weights,
    swin_redraw, swin_small_model, vit_stress_init_, tiny_vit)


# ---------------------------------------------------------------------------------------
# ViT: the published and timm layouts, load errors
# ---------------------------------------------------------------------------------------

_VIT_OFFICIAL_KEY_COUNTS = {'ape': 176, 'rope_axial': 175, 'rope_mixed': 178,
                            'rope_axial_ape': 176, 'rope_mixed_ape': 179}


def _vit_official_state_dict(model):
    """Our ViT-S state dict written in the released layout (the official Mixed ViTs also
    save their 14x14 position buffers, which loading must drop)."""
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
        model.freqs.copy_(torch.stack([rope_vit.init_rope_freqs(6, 64, 10.0, mixed=True) for _ in range(12)], 1).flatten(2))
    vit_stress_init_(model).eval()
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
    model = tiny_vit('rope_mixed_ape', img_size=(64, 96))
    path = tmp_path / 'checkpoint.pth'
    args = {'model': 'vit_tiny', 'pe': 'rope_mixed_ape', 'model_kwargs': {**VIT_TINY, 'img_size': [64, 96]}}
    torch.save({'model': model.state_dict(), 'optimizer': {'state': {}}, 'epoch': 3, 'args': args}, path)
    x = torch.randn(1, 3, 96, 64)
    fresh = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **VIT_TINY, img_size=(64, 96)).eval()
    rope_vit.load_checkpoint(fresh, path)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    # a model built for 48x48 gets the stored 4x6 grid (named by args, 24 is no square) resized to 3x3
    small = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **VIT_TINY, img_size=48).eval()
    rope_vit.load_checkpoint(small, path)
    grid = model.pos_embed.detach().reshape(1, 4, 6, 64).permute(0, 3, 1, 2)  # (1, C, 4, 6)
    ref = F.interpolate(grid, size=(3, 3), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 9, 64)
    torch.testing.assert_close(small.pos_embed.detach(), ref, atol=1e-6, rtol=0)
    # timm layout: rope.freqs (2, L, heads, D/2) plus non-persistent rope buffers
    sd = dict(model.state_dict())
    sd['rope.freqs'] = sd.pop('freqs').unflatten(-1, (2, 16))
    sd['rope.t_x'] = torch.zeros(24)
    other = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **VIT_TINY, img_size=(64, 96)).eval()
    rope_vit.load_checkpoint(other, {'state_dict': sd})
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


def test_vit_load_errors_name_keys(tmp_path):
    model = rope_vit.create_model('vit_tiny', pe='rope_mixed', **VIT_TINY)
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


def test_vit_pretrained_loads_the_cached_file_strictly_without_network(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path)
    name = 'rope_mixed_ape_deit_small_patch16_LS'
    published = published_with_drawn_weights(rope_vit, name)
    path = place_in_hub_cache(rope_vit, name, _vit_official_state_dict(published))  # official layout
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
            module.load_checkpoint(tiny_vit('rope_mixed') if module is rope_vit else swin_small_model('rope_mixed'),
                                   str(bad))


def test_vit_loads_timm_safetensors_like_the_pth(tmp_path):
    st = pytest.importorskip('safetensors.torch')
    model = tiny_vit('rope_mixed_ape')
    sd = dict(model.state_dict())  # timm's layout, as its hub model.safetensors files hold it
    sd['rope.freqs'] = sd.pop('freqs').unflatten(-1, (2, 16)).contiguous()
    st.save_file(sd, str(tmp_path / 'model.safetensors'))
    other = rope_vit.create_model('vit_tiny', pe='rope_mixed_ape', **VIT_TINY).eval()
    assert rope_vit.load_checkpoint(other, tmp_path / 'model.safetensors') == ([], [])
    x = torch.randn(1, 3, 48, 32)
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# Parameter counts of the published architectures
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


# ==============================================================================================
# Swin: the published format, RPB tables of another window, parameter counts
# ==============================================================================================

_SWIN_PUBLISHED_T = {  # Swin-T: (parameters, keys in the published file)
    'swin_tiny_patch4_window7_224': (28_288_354, 190),
    'swin_rope_axial_tiny_patch4_window7_224': (28_265_032, 202),
    'swin_rope_mixed_tiny_patch4_window7_224': (28_269_448, 202),
    'swin_rope_axial_rpb_tiny_patch4_window7_224': (28_288_354, 226),
    'swin_rope_mixed_rpb_tiny_patch4_window7_224': (28_292_770, 226),
}


def _swin_official_layout(model):
    """Our state dict plus the derived tensors a published file carries (relative_position_index,
    RoPE positions, shift masks: buffers the official code saves and loading must drop)."""
    sd = dict(model.state_dict())
    H, W = (model.img_size, model.img_size)
    for s, (window, shift) in enumerate(model.stage_windows(H, W)):
        grid = H // (model.patch_size * 2 ** s)
        for i, blk in enumerate(model.layers[s].blocks):
            prefix = f'layers.{s}.blocks.{i}.'
            if blk.attn.use_rpb:
                sd[prefix + 'attn.relative_position_index'] = swin_rope.relative_position_index(window)
            if blk.attn.rope_kind:
                t_x, t_y = swin_rope.window_positions(window)
                sd[prefix + 'attn.rope_t_x'], sd[prefix + 'attn.rope_t_y'] = t_x, t_y
            if blk.shifted and shift:
                sd[prefix + 'attn_mask'] = swin_rope.shift_window_mask(grid, grid, window, shift)
    return sd


def test_swin_published_format_round_trip(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    for pe in ('rpb', 'rope_axial', 'rope_mixed_rpb'):
        src = swin_redraw(swin_small_model(pe, seed=0))
        path = tmp_path / f'{pe}.pth'
        torch.save({'model': _swin_official_layout(src)}, path)
        dst = swin_small_model(pe, seed=5)
        with torch.no_grad():
            before = dst(x)
            assert swin_rope.load_checkpoint(dst, path) == ([], [])
            torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
            assert not torch.equal(before, dst(x))
    # a training checkpoint {'model', 'optimizer', ...} loads too; a wrong head is an error
    torch.save({'model': src.state_dict(), 'optimizer': {}, 'epoch': 3}, tmp_path / 'train.pth')
    swin_rope.load_checkpoint(swin_small_model('rope_mixed_rpb'), tmp_path / 'train.pth')
    with pytest.raises(ValueError, match=r'head.weight checkpoint \(7, 64\) vs model \(5, 64\)'):
        swin_rope.load_checkpoint(swin_small_model('rope_mixed_rpb', num_classes=5), tmp_path / 'train.pth')
    res = swin_rope.load_checkpoint(swin_small_model('rope_mixed'), tmp_path / 'train.pth', strict=False)
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
    src = swin_redraw(swin_small_model('rope_mixed_rpb'))
    dst = swin_small_model('rope_mixed_rpb', img_size=96, window_size=6)
    swin_rope.load_checkpoint(dst, src.state_dict())
    assert dst.layers[0].blocks[0].attn.relative_position_bias_table.shape == (121, 2)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=1e-5)


def test_swin_parameter_counts():
    for name, (n_params, _) in _SWIN_PUBLISHED_T.items():
        with torch.device('meta'):
            m = swin_rope.create_model(name)
        assert sum(p.numel() for p in m.parameters()) == n_params, name
    for size, ref in (('swin_small', 49.6e6), ('swin_base', 87.8e6)):
        with torch.device('meta'):
            m = swin_rope.create_model(size)
        assert abs(sum(p.numel() for p in m.parameters()) / ref - 1) < 0.005


def test_swin_pretrained_loads_the_cached_file_strictly_without_network(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path)
    name = 'swin_rope_axial_tiny_patch4_window7_224'
    published = published_with_drawn_weights(swin_rope, name)
    sd = _swin_official_layout(published)  # with the derived tensors the official files hold
    place_in_hub_cache(swin_rope, name, sd)
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
    src = swin_redraw(swin_small_model('rope_mixed_rpb'))
    st.save_file(src.state_dict(), str(tmp_path / 'model.safetensors'))
    dst = swin_small_model('rope_mixed_rpb', seed=3)
    assert swin_rope.load_checkpoint(dst, tmp_path / 'model.safetensors') == ([], [])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


# ==============================================================================================
# hubconf.py: torch.hub entry points
# ==============================================================================================

@pytest.mark.slow
def test_hubconf_entry_points_build_and_load_pretrained(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path)
    root = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, root)
    try:
        import hubconf
    finally:
        sys.path.remove(root)
    assert hubconf.dependencies == ['torch']
    entries = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_')]  # torch.hub.list's rule
    assert sorted(entries) == sorted(rope_vit.list_models() + swin_rope.list_models())
    small = torch.hub.load(root, 'vit_tiny', source='local', pe='rope_mixed', **VIT_TINY)
    assert isinstance(small, rope_vit.RopeViT) and small.pe == 'rope_mixed' and small.num_classes == 10
    swin = torch.hub.load(root, 'swin_rope_mixed_rpb_tiny_patch4_window7_224', source='local', num_classes=3)
    assert isinstance(swin, swin_rope.SwinTransformer) and swin.pe == 'rope_mixed_rpb' and swin.num_classes == 3
    name = 'rope_axial_deit_small_patch16_LS'
    published = published_with_drawn_weights(rope_vit, name)
    place_in_hub_cache(rope_vit, name, published.state_dict())
    model = torch.hub.load(root, name, source='local', pretrained=True)
    assert all(torch.equal(v, published.state_dict()[k]) for k, v in model.state_dict().items())
    assert 'pretrained=True loads the released weights' in hubconf.rope_mixed_deit_base_patch16_LS.__doc__
    with pytest.raises(RuntimeError, match='without network, save that file as'):
        torch.hub.load(root, 'swin_rope_mixed_base_patch4_window7_224', source='local', pretrained=True)
