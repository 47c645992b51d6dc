"""Resolution change: the RoPE position policies (rope_positions) and coordinate augmentation,
both model files.
"""
import copy
import csv
import json
import math

import pytest
import torch

import rope_vit
import swin_rope
import eval_multires

from testkit import VIT_TINY, eval_train_res, swin_redraw, swin_small_model, tiny_vit


# ---------------------------------------------------------------------------------------
# Resolution change: RoPE position policies (rope_positions), both model files
# ---------------------------------------------------------------------------------------

def _vit_policy_model(pe, **kw):
    """Tiny ViT built for 64 x 64 at patch 16: training grid 4 x 4, head dim 32."""
    return tiny_vit(pe, img_size=64, patch_size=16, **kw)


def _swin_policy_model(pe, **kw):
    """swin_small_model with its redrawn weights: every block built for window 4."""
    return swin_redraw(swin_small_model(pe, **kw))


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
            assert model.cfg.rope_positions == policy and model.rope_setting()[0] == policy
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
    scaled = rope_vit.create_model('vit_tiny', pe='rope_axial', img_size=64, patch_size=16, **VIT_TINY,
                                   rope_theta=100.0 * 2 ** (16 / 14)).eval()
    scaled.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), scaled(x), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_with_attention(x)[0], scaled(x), atol=2e-5, rtol=1e-5)
    # Swin: head dim 8, d = 4 per axis; window 8 against 4: s = 2, theta' = 50 * 2^(4/2)
    swin = _swin_policy_model('rope_axial')
    swin.rope_positions = 'ntk'
    swin_scaled = swin_small_model('rope_axial', rope_theta=50.0 * 2 ** 2)
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


@pytest.mark.slow
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
        cos, sin = attn.rope_tables(6, swin.rope_setting())  # (2, 1, nH, N, d/2): [1] rotates k, unscaled
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


@pytest.mark.slow
def test_eval_rope_positions_rows_per_policy_and_frequency_analysis(eval_tiny_run, tmp_path, capsys):
    _, checkpoint = eval_tiny_run
    # An APE twin of the same run: appears once whatever the policies
    state = torch.load(checkpoint, weights_only=True)
    args = dict(state['args'], pe='ape', model_kwargs=dict(state['args']['model_kwargs'], pe='ape'))
    ape = rope_vit.create_model(args['model'], **args['model_kwargs'])
    torch.save({'model': ape.state_dict(), 'args': args}, tmp_path / 'ape.pth')
    out = tmp_path / 'out'
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(checkpoint), str(tmp_path / 'ape.pth'), '--labels', 'mixed', 'ape',
        '--resolutions', '16', str(eval_train_res), '--rope-positions', 'extrapolate', 'interpolate', 'ntk', 'yarn',
        '--analyze-frequencies', '--output-dir', str(out), '--num-workers', '0', '--quiet']))
    assert list(results) == ['mixed extrapolate', 'mixed interpolate', 'mixed ntk', 'mixed yarn', 'ape']
    at_train = {label: [r['top1'] for r in rows if r['resolution'] == eval_train_res][0]
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
