"""The model API of both files: sizes and their errors, pooling, dense features and ViTDet window
attention, attention probabilities, fused against readable paths, backward and dtypes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import rope_vit
import swin_rope

from testkit import VIT_TINY, swin_redraw, swin_small_model, tiny_vit


# ---------------------------------------------------------------------------------------
# Pooling: class token (the paper's) or the mean of the patch tokens without a class token
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('pe', ['ape', 'rope_axial', 'rope_mixed_ape'])
def test_vit_avg_pool_has_no_class_token_and_classifies_the_mean_of_patches(pe):
    model = tiny_vit(pe, global_pool='avg', patch_size=8, img_size=32)
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
    assert 'cls_token' in tiny_vit(pe, patch_size=8).state_dict()  # the default keeps the paper's class token


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed'])
def test_vit_rope_without_class_token_depends_on_relative_positions_only(pe):
    """RoPE leaves the class token unrotated at position (0, 0), so its offsets to the patches are
    their absolute positions: moving every patch position by one offset changes the logits of the
    paper's model and leaves those of the avg-pool model (no class token, no APE) unchanged."""
    x = torch.randn(2, 3, 32, 32)
    for global_pool, changes in (('token', True), ('avg', False)):
        model = tiny_vit(pe, global_pool=global_pool, patch_size=8, img_size=32)
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
    model = tiny_vit('rope_mixed', global_pool='avg', patch_size=8, img_size=32).train()
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
# The fused path (the file's last section) against the readable one
# ---------------------------------------------------------------------------------------

_FUSED_TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2, num_classes=10)  # head dim 32


def _fused_vit(pe, seed=0):
    torch.manual_seed(seed)
    return rope_vit.create_model('vit_tiny', pe=pe, **_FUSED_TINY_VIT)


def _complex_table(angles):
    """e^{i phi} as the fused path's complex table."""
    return torch.complex(angles.cos(), angles.sin())


def test_vit_fused_rotation_gradcheck_matches_plain_formula():
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


def test_vit_fused_rotation_in_bf16_is_as_close_to_exact_as_a_rotation_in_fp32():
    """bf16 q, k (autocast) are rotated in place in bf16, without the fp32 copy: q, k, the
    gradient of qkv and the frequencies' gradient against Eq. 11 in fp64 on the same bf16
    numbers, next to the fp32 rotation rounded once (measured: 2.4e-3 vs 1.7e-3 of the norm on
    q, k; bf16 rounds at 2^-9 = 2.0e-3; a wrong sign or pair order errs by ~1)."""
    torch.manual_seed(0)
    B, T, heads, D = 4, 17, 2, 16
    freqs = torch.randn(2, heads * D // 2, dtype=torch.float64) * 3
    positions = torch.randn(T, 2, dtype=torch.float64) * 4
    rot64 = _complex_table((positions @ freqs).view(T, heads, D // 2).transpose(0, 1))
    qkv = torch.randn(B * T, 3 * heads * D).bfloat16()
    grads = [torch.randn(B, heads, T, D).bfloat16() for _ in range(3)]

    def run(dtype, rot):
        x = qkv.to(dtype).clone().requires_grad_()
        f = freqs.to(rot.real.dtype).clone().requires_grad_()
        out = rope_vit.RotateQK.apply(x * 1, rot, heads, B, f, positions.to(f.dtype))[1:]
        torch.autograd.backward(out, [g.to(dtype) for g in grads])
        return [o.double() for o in out] + [x.grad.double(), f.grad.double()]

    exact = run(torch.float64, rot64)
    in_bf16 = run(torch.bfloat16, rot64.to(torch.complex64))
    assert in_bf16[0].dtype == torch.float64   # (cast above) the run itself was bf16 throughout
    split = rope_vit.split_heads(qkv, heads, B)
    once = torch.view_as_real(rope_vit.complex_pairs(split[:2].float()) * rot64.to(torch.complex64))
    once = once.flatten(-2).bfloat16().double()  # the fp32 rotation, rounded once
    error = lambda a, b: ((a - b).norm() / b.norm()).item()
    for i in range(2):
        assert error(in_bf16[i], exact[i]) < 1.6 * error(once[i], exact[i]) < 5e-3
    assert torch.equal(in_bf16[2], exact[2])                      # v untouched
    assert error(in_bf16[3], exact[3]) < 5e-3                     # gradient of qkv
    assert error(in_bf16[4], exact[4]) < 2e-2                     # frequencies' gradient


def test_vit_fused_path_equals_readable_path_and_saves_no_extra_activations():
    x = torch.randn(2, 3, 48, 64)
    model = _fused_vit('rope_mixed').train()
    logits = model(x)
    logits.square().sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.fused = False  # the readable path: apply_rope on cos/sin tables with their autograd graph
    for ref in (model(x), model.forward_with_attention(x)[0]):  # with SDPA, with the explicit softmax
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
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
    ape = saved_bytes(_fused_vit('ape').train())
    mixed = saved_bytes(_fused_vit('rope_mixed').train())
    assert mixed <= ape * 1.02, (mixed, ape)  # q, k rotated in place: only the small tables are extra


@pytest.mark.parametrize('pe', ['rope_axial', 'rope_mixed'])
def test_vit_fused_tables_equal_readable_tables(pe):
    """The fast path's per-axis complex tables equal Eq. 10's cos/sin of Eq. 12 / 14 angles
    (fp32 round-off; angles up to ~40 rad on a 9x23 grid), class token the identity."""
    model = tiny_vit(pe)
    readable = model.block_rotations(9, 23, torch.device('cpu'))
    fused = rope_vit.fused_rotations(model, 9, 23, torch.device('cpu'))
    for (cos, sin), rot in zip(readable, fused):
        assert rot.dtype == torch.complex64 and rot.shape == cos.shape
        assert (rot.real - cos).abs().max() < 2e-6 and (rot.imag - sin).abs().max() < 2e-6
        assert torch.all(rot[..., 0, :] == 1)


def test_vit_fused_rope_cache_follows_frequencies():
    x = torch.randn(2, 3, 32, 48)
    model = _fused_vit('rope_mixed')
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def fresh_output(m):
        twin = _fused_vit('rope_mixed', seed=5).eval()
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

    other = _fused_vit('rope_mixed', seed=3)
    rope_vit.load_checkpoint(model, {'model': other.state_dict()})
    with torch.no_grad():
        loaded = model(x)
        torch.testing.assert_close(loaded, other.eval()(x), atol=0, rtol=0)
    # tables made under inference_mode are not reused where autograd needs them
    axial = _fused_vit('rope_axial').eval()
    with torch.inference_mode():
        axial(x)
    axial(x).sum().backward()
    assert axial.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------------------------------
# Dense prediction: forward_intermediates, ViTDet-style window attention
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [(64, 64), (48, 80)])
def test_vit_forward_intermediates_maps(size):
    model = tiny_vit('rope_mixed', depth=3)
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
    windowed = tiny_vit(pe, depth=3, window_size=3, global_blocks=(-2,))
    assert windowed.block_windows == [3, None, 3]
    plain = rope_vit.create_model('vit_tiny', pe=pe, **{**VIT_TINY, 'depth': 3}).eval()
    assert plain.state_dict().keys() == windowed.state_dict().keys()  # published weights load unchanged
    plain.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        out = windowed(x)
        explicit, attn = windowed.forward_with_attention(x)  # readable RoPE, masked explicit softmax
        torch.testing.assert_close(out, explicit, atol=1e-5, rtol=0)
        assert (out - plain(x)).abs().max() > 0.1  # the windows matter with these weights
        outside = ~rope_vit.window_attention_mask((5, 7), 3)  # (T, T)
        assert attn[0][:, :, outside].abs().max() == 0 and attn[1][:, :, outside].abs().max() > 0  # block 1 is global
        covering = rope_vit.create_model('vit_tiny', pe=pe, **{**VIT_TINY, 'depth': 3}, window_size=7,
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
            rope_vit.create_model('vit_tiny', pe='rope_mixed', **VIT_TINY, **kwargs)


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
    model = tiny_vit('rope_mixed')
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
    model = tiny_vit(pe, patch_size=8, img_size=32)
    x = torch.randn(2, 3, 24, 40)  # 3x5 grid, never built for
    with torch.no_grad():
        logits = model(x)
        logits2, attn = model.forward_with_attention(x)
    assert logits.shape == (2, 10) and model.forward_features(x).shape == (2, 64)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)  # explicit softmax == SDPA
    assert len(attn) == 2 and attn[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(attn[1].sum(-1), torch.ones(2, 2, 16), atol=1e-5, rtol=0)


def test_vit_fp32_backward_reaches_freqs():
    model = tiny_vit('rope_mixed_ape').train()
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
    model = tiny_vit('rope_mixed', num_classes=100)
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
    small = swin_small_model('rope_mixed_rpb')
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
    attn = swin_redraw(swin_small_model('rope_mixed')).layers[0].blocks[0].attn
    qk = torch.randn(2, 3, attn.num_heads, 36, attn.head_dim)  # (q|k, B_, nH, N, d), window 6
    with torch.no_grad():
        torch.testing.assert_close(swin_rope.rotate_fused(qk, attn, 6),
                                   swin_rope.apply_rope(qk, *attn.rope_tables(6)), atol=2e-6, rtol=1e-5)


def test_swin_forward_with_attention_matches_forward():
    model = swin_redraw(swin_small_model('rope_mixed_rpb'))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, attn = model.forward_with_attention(x)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    assert len(attn) == 6 and attn[1]['shift'] == 2 and attn[-1]['shift'] == 0


def test_swin_fused_is_one_switch_and_weights_are_returned_not_stored():
    """model.fused = False runs the readable path (what forward_with_attention runs, bit for bit);
    the probabilities travel as return values and the policy values as arguments: no module keeps
    them between forwards."""
    model = swin_redraw(swin_small_model('rope_mixed_rpb'))
    assert swin_rope.SwinTransformer.fused is True and model.fused is True  # the full file's default
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        fused = model(x)
        model.fused = False
        readable = model(x)
        model.rope_positions = 'yarn'
        assert not torch.equal(model(x), readable)
        model.rope_positions = 'extrapolate'
        logits, weights = model.forward_with_attention(x)
        attn = model.layers[0].blocks[1].attn
        out, probs = attn(torch.randn(2 * 16, 36, 16), 6, need_weights=True)
        assert probs.shape == (2 * 16, attn.num_heads, 36, 36) and attn(out, 6)[1] is None
    assert torch.equal(logits, readable)
    torch.testing.assert_close(fused, readable, atol=1e-5, rtol=1e-5)
    assert [w['attn'].shape for w in weights][:2] == [(2 * 16, 2, 36, 36)] * 2
    assert not {'return_attn', 'last_attn'} & set(vars(model))
    for m in list(model.modules())[1:]:  # the model keeps rope_coord_augment, the config the rest
        assert not {'return_attn', 'last_attn', 'rope_positions', 'rope_coord_augment'} & set(vars(m)), m


def test_swin_fp32_backward_reaches_rope_freqs_and_tables():
    model = swin_small_model('rope_mixed_rpb').train()
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
    model = swin_small_model('rope_mixed_rpb')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x)
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        for name, p in model.named_parameters():
            if name.endswith(('rope_freqs', 'relative_position_bias_table')):
                p.mul_(3.0)  # in place, as load_state_dict or an optimizer step would
        changed = model(x)
        fresh = swin_small_model('rope_mixed_rpb')
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
    small = swin_small_model('rope_mixed')
    with pytest.raises(ValueError, match='multiples of 16'):
        small(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match='rope_mixed_rpb'):
        swin_rope.create_model('swin_tiny', pe='rope')
    with pytest.raises(ValueError, match='swin_rope_axial_tiny_patch4_window7_224'):
        swin_rope.create_model('swin_huge')
    assert len(swin_rope.list_models()) == 3 + 15


@pytest.mark.parametrize('size', [(64, 64), (64, 128), (96, 96)])
def test_swin_forward_intermediates_maps(size):
    model = swin_redraw(swin_small_model('rope_mixed'))  # 3 stages, patch 4, built at 64 with window 4
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
