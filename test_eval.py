"""eval_multires.py: attention distance and entropy in closed form, tables, files, the command line,
policies and seeds, published weights on an image folder, frequency statistics.
"""
import csv
import json
import math
import os
import statistics
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from PIL import Image

import cli
import data
import eval_multires
import evaluation
import rope_vit
import swin_rope

from testkit import eval_train_res, train_env


_eval_root = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# Attention distance and entropy of hand-built maps (the paper's section 3.3, Figs. 1-2)
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
    assert evaluation.default_resolutions(vit) == [96, 144, 192, 224, 256, 320, 384, 512]
    assert evaluation.default_resolutions(swin) == [96, 128, 160, 192, 224, 256, 320, 384]
    small = {'model': 'vit_tiny', 'img_size': 64, 'model_kwargs': {'patch_size': 8}}
    # Independent: the multiple of 8 nearest to r * 64 / 224, found by search.
    expected = [min(range(8, 1024, 8), key=lambda s: abs(s - r * 64 / 224))
                for r in (96, 144, 192, 224, 256, 320, 384, 512)]
    assert evaluation.default_resolutions(small) == expected
    assert 64 in expected and len(set(expected)) == len(expected)
    swin_small = {'model': 'swin_tiny', 'img_size': 128, 'model_kwargs': {}}
    out = evaluation.default_resolutions(swin_small)
    assert 128 in out and all(r % 32 == 0 and r > 0 for r in out)


def test_eval_config_labels():
    assert evaluation.config_label({'model': 'vit_small', 'pe': 'rope_mixed'}) == 'ViT-S RoPE-Mixed'
    assert evaluation.config_label({'model': 'rope_axial_ape_deit_base_patch16_LS',
                               'pe': 'rope_axial_ape'}) == 'ViT-B APE + RoPE-Axial'
    assert evaluation.config_label({'model': 'swin_tiny_patch4_window7_224',
                               'pe': 'rpb'}) == 'Swin-T RPB'
    custom = {'model': 'vit_tiny', 'pe': 'ape', 'model_kwargs': dict(patch_size=4, embed_dim=96, depth=4)}
    assert evaluation.config_label(custom) == 'ViT (96 dim, 4 layers, 4 px patches) APE'
    custom['model_kwargs']['global_pool'] = 'avg'
    assert evaluation.config_label(custom) == 'ViT (96 dim, 4 layers, 4 px patches, avg pool) APE'
    assert evaluation.config_label({'model': 'vit_small', 'pe': 'rope_mixed', 'model_kwargs': {'global_pool': 'avg'}}) \
        == 'ViT-S (avg pool) RoPE-Mixed'


def test_eval_format_table_layout():
    results = {
        'ViT-S APE': [{'resolution': r, 'top1': v, 'top5': 99.0, 'n': 10}
                      for r, v in ((96, 35.44), (224, 80.4), (512, 75.36))],
        'ViT-S RoPE-Mixed': [{'resolution': r, 'top1': v, 'top5': 99.0, 'n': 10}
                             for r, v in ((96, 55.7), (224, 80.9))],
    }
    lines = evaluation.format_table(results, 224).splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header == ['model', '96', '224*', '512']
    ape = [c.strip() for c in lines[2].strip('|').split('|')]
    mixed = [c.strip() for c in lines[3].strip('|').split('|')]
    assert ape == ['ViT-S APE', '35.4', '80.4', '75.4']
    assert mixed == ['ViT-S RoPE-Mixed', '55.7', '80.9', '-']
    per_row = evaluation.format_table(results, {'ViT-S APE': 96, 'ViT-S RoPE-Mixed': 224})
    assert '35.4*' in per_row and '80.9*' in per_row and '224*' not in per_row
    # Means over seeds (--mean-over-seeds) show their spread; a group of one run has none.
    means = {'3 seeds': [{'resolution': 224, 'top1': 80.44, 'top1_sd': 0.25, 'runs': 3}],
             'one seed': [{'resolution': 224, 'top1': 79.96, 'top1_sd': 0.0, 'runs': 1}]}
    lines = evaluation.format_table(means, 224).splitlines()
    assert [c.strip() for c in lines[2].strip('|').split('|')] == ['3 seeds', '80.4 ± 0.2']
    assert [c.strip() for c in lines[3].strip('|').split('|')] == ['one seed', '80.0']
    assert lines[-1].endswith('over 3 runs (seeds); a row without ± is one run')
    only_one = evaluation.format_table({'one seed': means['one seed']}, 224)
    assert '±' not in only_one.replace('a row without ±', '') and 'deviation' not in only_one


def _eval_run_cli(argv, cwd):
    return subprocess.Popen([sys.executable, os.path.join(_eval_root, 'eval_multires.py')] + argv,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=train_env())


def test_eval_end_to_end_tables_files_and_train_agreement(eval_tiny_run, capsys):
    base, checkpoint = eval_tiny_run
    out = base / 'eval_out'
    resolutions = [16, eval_train_res, 48]
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
    assert header == ['model', '16', f'{eval_train_res}*', '48']
    assert [line.split('|')[1].strip() for line in table[1:3]] == ['first', 'second']
    assert f'@ {eval_train_res}: 21/21 images' in printed.err  # progress per resolution

    with open(out / 'multires.json') as f:
        report = json.load(f)
    with open(out / 'multires.csv') as f:
        rows = list(csv.DictReader(f))
    assert [c['label'] for c in report['checkpoints']] == ['first', 'second']
    assert len(rows) == 2 * len(resolutions)
    for entry in report['checkpoints']:
        assert [r['resolution'] for r in entry['results']] == resolutions
        assert entry['train_resolution'] == eval_train_res and entry['pe'] == 'rope_mixed'
        mine = [r for r in rows if r['label'] == entry['label']]
        for csv_row, json_row in zip(mine, entry['results']):
            assert int(csv_row['resolution']) == json_row['resolution']
            assert float(csv_row['top1']) == json_row['top1']
            assert float(csv_row['top5']) == json_row['top5']
            assert float(csv_row['loss']) == json_row['loss']
            assert int(csv_row['n']) == json_row['n'] == 21

    # Accuracy at the training resolution equals train.py's own final evaluation exactly.
    ours = {r['resolution']: r for r in report['checkpoints'][0]['results']}[eval_train_res]
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


def test_eval_bad_input_exit_2_one_line_nothing_written(eval_tiny_run, capsys):
    base, checkpoint = eval_tiny_run
    work = base / 'bad_inputs'
    work.mkdir()
    corrupt = work / 'corrupt.pth'
    corrupt.write_bytes(b'this is not a checkpoint' * 100)
    truncated = work / 'truncated.pth'
    content = checkpoint.read_bytes()
    truncated.write_bytes(content[:len(content) // 2])
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
    # ... and every case in this process through cli.cli, the function the main guard runs.
    for name, (argv, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.cli(eval_multires.main, eval_multires.get_args_parser(),
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


@pytest.mark.slow
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
        dataset = data.build_eval_dataset({'dataset': 'folder', 'data_path': str(tmp_path / 'data'),
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
    swin_cfg = eval_multires.published_config('swin_tiny_patch4_window7_224', {}, args)
    assert swin_cfg['eval_crop_ratio'] == 224 / 256 and swin_cfg['num_classes'] == 1000


def test_eval_swin_attention_is_window_local_over_every_block():
    torch.manual_seed(0)
    model = swin_rope.create_model('swin_tiny', pe='rope_mixed', embed_dim=8, depths=(2, 2),
                                   num_heads=(1, 2), img_size=32, window_size=2).eval()
    images = torch.randn(2, 3, 48, 48)  # window 2 * 48 / 32 = 3: stage grids 12x12 and 6x6
    with torch.no_grad():
        layers = eval_multires.attention_layers(model, images)
        _, blocks = model.forward_with_attention(images)
    assert [name for name, _, _ in layers] == ['stage 0 block 0', 'stage 0 block 1',
                                               'stage 1 block 2', 'stage 1 block 3']
    for (_, distance, entropy), block in zip(layers, blocks):
        assert block['window'] == 3
        # Independent: keys of a 3 x 3 window lie within its diagonal, 9 keys at most.
        assert 0 < float(distance) <= math.hypot(2, 2) and 0 < float(entropy) <= math.log(9)
        expected = -(block['attn'] * block['attn'].clamp_min(1e-30).log()).sum(-1).mean()
        torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=1e-5)


def test_eval_mean_over_seeds_groups_runs_by_label(eval_tiny_run, tmp_path, capsys):
    _, checkpoint = eval_tiny_run
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
        '--checkpoint', *paths, '--resolutions', '16', str(eval_train_res), '--rope-positions',
        'extrapolate', 'interpolate', '--mean-over-seeds', '--output-dir', str(out),
        '--num-workers', '0', '--quiet']))
    assert len(results) == 6   # every run is evaluated and kept under its own label
    printed = capsys.readouterr().out
    label = evaluation.config_label(state['args'])
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
        for resolution in (16, eval_train_res):
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


@pytest.mark.slow
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
