"""benchmark.py and the RoPE fast path: caches, the custom autograd rotation, the benchmark table."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rope_vit
import benchmark

from testkit import _train_env, _vit_tiny


_BENCH_TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2, num_classes=10)  # head dim 32


def _bench_vit(pe, seed=0):
    torch.manual_seed(seed)
    return rope_vit.create_model('vit_tiny', pe=pe, **_BENCH_TINY_VIT)


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_bad_resolution_is_one_line_error():
    proc = subprocess.run([sys.executable, 'benchmark.py', '--family', 'vit', '--resolutions', '30'],
                          capture_output=True, text=True, timeout=120, env=_train_env())
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
