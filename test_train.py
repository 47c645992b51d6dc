"""train.py in one process: folder and built-in data, recipes, LAMB, samplers, several training
resolutions, pooling, bad input and range checks, the closing table; and one 2-process run
(slow) of several resolutions on folders, killed and resumed.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark_step
import builtin_data
import cli
import data
import eval_multires
import evaluation
import recipes
import recovery
import train

from testkit import (TRAIN_SCRIPT, TRAIN_SMALL, TRAIN_TIMEOUT, TRAIN_TINY, eval_train_res,
    assert_same_run, train_cli, train_env, recorded_step_sizes,
    recording_step_sizes, train_state, write_train_folder)


def test_train_image_folder_deit3_recipe_skips_corrupt_images(tmp_path, capsys):
    folder = tmp_path / 'data'
    write_train_folder(folder, corrupt=True)
    # Fine-tune from weights of another class count (8) and resolution (32 px: APE grid 4x4).
    source = recipes.build_model({'model': 'vit_tiny', 'model_kwargs': dict(
        pe='rope_mixed_ape', num_classes=8, img_size=32, patch_size=8, embed_dim=32, depth=1,
        num_heads=2)})
    torch.save({'model': source.state_dict()}, tmp_path / 'source.pth')
    out = tmp_path / 'out'
    status = train_cli(['--model', 'vit_tiny', '--pe', 'rope_mixed_ape', '--data-path', str(folder),
                         '--finetune', str(tmp_path / 'source.pth'),
                         '--output-dir', str(out), '--epochs', '1', '--batch-size', '4',
                         '--num-workers', '0', '--img-size', '16', '--patch-size', '8',
                         '--embed-dim', '32', '--depth', '1', '--num-heads', '2',
                         '--eval-resolutions', '16', '24'])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    args = train_state(out / 'checkpoint.pth')['args']
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
    val = data.build_eval_dataset(args, 16)
    stats = evaluation.evaluate(recipes.build_model(args), data.build_eval_loader(val, 4),
                           torch.device('cpu'))
    assert (stats['n'], stats['skipped']) == (6, 1)


def test_train_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    base = TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '16', '--builtin-val', '8',
                          '--output-dir', str(out)]
    assert train_cli(base + ['--epochs', '1']) == 0
    before = (out / 'checkpoint.pth').read_bytes()
    capsys.readouterr()
    finite_loss = train.training_loss
    monkeypatch.setattr(train, 'training_loss', lambda *a: finite_loss(*a) * float('nan'))
    status = train_cli(base + ['--epochs', '2', '--resume', 'auto'])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith('error: loss is nan at epoch 2') and err.count('\n') == 1, err
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert len((out / 'log.jsonl').read_text().splitlines()) == 1


def test_train_glyph_window_min_area(tmp_path, capsys):
    # The default is RandomResizedCrop's 0.08, and the same scenes as before the option existed.
    assert builtin_data.make_glyph_scene('train', 7, 0) == builtin_data.make_glyph_scene('train', 7, 0, 0.08)
    for i in range(100):
        half = builtin_data.make_glyph_scene('train', i, 0, window_min_area=0.5)
        x0, y0, side = half['window']
        box = builtin_data.glyph_box(half['glyph'])
        assert side ** 2 >= 0.5 and x0 < box[0] and box[2] < x0 + side
        # 1: every training view is the whole scene, as a validation view (the ablation's
        # "no random window"); the scene itself is unchanged.
        whole = builtin_data.make_glyph_scene('train', i, 0, window_min_area=1.0)
        assert whole['window'] == [0.0, 0.0, 1.0]
        assert {k: v for k, v in whole.items() if k != 'window'} == \
            {k: v for k, v in half.items() if k != 'window'}
    # train.py: stored in the configuration and used by the training set.
    run = tmp_path / 'w'
    assert train_cli(TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '8', '--builtin-val',
                                     '8', '--epochs', '1', '--glyph-window-min-area', '1',
                                     '--output-dir', str(run)]) == 0
    cfg = train_state(run / 'checkpoint.pth')['args']
    assert cfg['glyph_window_min_area'] == 1.0
    assert data.build_train_dataset(cfg).scene_options == {'window_min_area': 1.0}
    capsys.readouterr()
    # It means nothing for the direction task or folders, and must lie in (0, 1].
    for bad in (['--data', 'shapes', '--glyph-window-min-area', '0.5'],
                ['--glyph-window-min-area', '0'], ['--glyph-window-min-area', '1.5']):
        assert train_cli(TRAIN_TINY + bad + ['--output-dir', str(tmp_path / 'bad')]) == 2
        assert 'glyph-window-min-area' in capsys.readouterr().err.replace('_', '-')
    assert not (tmp_path / 'bad').exists()


def test_train_global_pool_avg_is_stored_and_evaluates_without_flags(tmp_path, capsys):
    run = tmp_path / 'avg'
    assert train_cli(TRAIN_TINY + ['--pe', 'rope_mixed', '--batch-size', '8', '--builtin-train', '8',
                                     '--builtin-val', '8', '--epochs', '1', '--global-pool', 'avg',
                                     '--output-dir', str(run)]) == 0
    state = train_state(run / 'checkpoint.pth')
    assert state['args']['model_kwargs']['global_pool'] == 'avg' and 'cls_token' not in state['model']
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(run / 'checkpoint.pth'), '--resolutions', '16', '--quiet',
        '--output-dir', str(tmp_path / 'eval')]))
    (label, rows), = results.items()
    assert 'avg pool' in label
    last = json.loads((run / 'log.jsonl').read_text().splitlines()[-1])
    assert rows[0]['top1'] == last['val_top1']  # the same model rebuilt from the checkpoint
    capsys.readouterr()
    assert train_cli(['--model', 'swin_tiny', '--global-pool', 'avg', '--output-dir', str(tmp_path / 'bad')]) == 2
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
    glyphs = builtin_data.GlyphsDataset('train', 16, 16)
    order = torch.utils.data.DistributedSampler(glyphs, num_replicas=1, rank=0, shuffle=True, seed=0,
                                                drop_last=True)
    sampler = data.EpochSampler(order, 0, 0, 4, lambda e, s: train.train_step_resolution(cfg, e, s))
    sampler.set_epoch(1, start=8)
    glyphs.set_epoch(1)
    indices = list(order)
    loader = torch.utils.data.DataLoader(data.SeededSamples(glyphs), batch_size=4, sampler=sampler,
                                         drop_last=True)
    sizes = []
    for step, (images, labels) in enumerate(loader, start=2):
        size = train.train_step_resolution(cfg, 1, step)
        sizes.append(size)
        assert images.shape == (4, 3, size, size)
        image, label = glyphs.at_resolution(indices[4 * step + 1], size)
        assert torch.equal(images[1], image) and labels[1] == label
    assert len(sizes) == 2 and set(sizes) <= {12, 16, 20}
    # train.py: stored, used, and checked against the patch size and the data.
    run = tmp_path / 'multi'
    assert train_cli(TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '16', '--builtin-val', '8',
                                     '--epochs', '1', '--train-resolutions', '12', '16', '20',
                                     '--output-dir', str(run)]) == 0
    assert train_state(run / 'checkpoint.pth')['args']['train_resolutions'] == [12, 16, 20]
    capsys.readouterr()
    assert train_cli(TRAIN_TINY + ['--train-resolutions', '16', '14',
                                     '--output-dir', str(tmp_path / 'bad')]) == 2
    assert '--train-resolutions 14' in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()   # folder data: test_train_folder_several_resolutions_*


def test_train_persistent_workers_see_every_epoch_of_the_builtin_data():
    # The built-in training set shows fresh scenes every epoch (set_epoch). With persistent
    # workers (train.py keeps them across epochs) each worker holds its own copy of the dataset:
    # the epoch must reach it through the sampler's keys, so that epoch 1 with 2 persistent
    # workers gives the batches of 0 workers, and not epoch 0's scenes again.
    glyphs = builtin_data.GlyphsDataset('train', 8, 16)
    order = torch.utils.data.DistributedSampler(glyphs, num_replicas=1, rank=0, shuffle=False,
                                                drop_last=True)
    batches = {}
    for workers in (0, 2):
        sampler = data.EpochSampler(order, 0, 0, 4)
        loader = torch.utils.data.DataLoader(data.SeededSamples(glyphs), batch_size=4, sampler=sampler,
                                             num_workers=workers, persistent_workers=workers > 0)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            batches[workers, epoch] = [images for images, _ in loader]
    for epoch in range(2):
        assert all(torch.equal(a, b) for a, b in zip(batches[0, epoch], batches[2, epoch], strict=True))
    assert not torch.equal(batches[2, 0][0], batches[2, 1][0])   # new scenes in epoch 1
    fresh = builtin_data.GlyphsDataset('train', 8, 16)
    fresh.set_epoch(1)
    assert torch.equal(batches[2, 1][0][0], fresh.at_resolution(0, 16)[0])


class _Stripes(torch.utils.data.Dataset):
    """A dataset written to data.py's contract: horizontal or vertical stripes, one class each,
    their period and phase drawn per sample; one sample in eight is "skip this" (label -1)."""
    CLASSES = ('horizontal', 'vertical')

    def __init__(self, split, size, resolution, seed):
        self.split, self.size, self.resolution, self.seed = split, size, resolution, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.at_resolution(index, self.resolution)

    def at_resolution(self, index, resolution):
        epoch = self.epoch if self.split == 'train' else 0
        rng = np.random.default_rng([self.seed, self.split == 'val', epoch, index])
        label = index % 2
        coords = torch.arange(resolution, dtype=torch.float32) / resolution
        wave = torch.sin(2 * math.pi * (rng.uniform(2, 4) * coords + rng.uniform()))
        image = (wave[:, None] if label == 0 else wave[None, :]).expand(3, resolution, resolution)
        return image.clone(), (-1 if index % 8 == 7 else label)


def test_train_a_dataset_added_in_one_place_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    # data.py's contract: a class registered in builtin_data.BUILTIN_DATASETS is --data NAME for
    # train.py (one epoch here) and evaluates with eval_multires.py, with nothing else changed.
    monkeypatch.setitem(builtin_data.BUILTIN_DATASETS, 'stripes', _Stripes)
    out = tmp_path / 'stripes'
    assert train_cli(TRAIN_TINY + ['--data', 'stripes', '--builtin-train', '32', '--builtin-val', '8',
                                    '--batch-size', '8', '--epochs', '1', '--output-dir', str(out)]) == 0
    state = train_state(out / 'checkpoint.pth')
    assert (state['args']['dataset'], state['args']['num_classes']) == ('stripes', 2)
    record = json.loads((out / 'log.jsonl').read_text())
    assert record['epoch'] == 1 and record['skipped'] == 4 + 1   # 32 / 8 training, 8 / 8 val
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(out / 'checkpoint.pth'), '--resolutions', '16', '24', '--quiet',
        '--output-dir', str(tmp_path / 'eval')]))
    (rows,) = results.values()
    assert [row['resolution'] for row in rows] == [16, 24] and rows[0]['n'] == 7
    assert rows[0]['top1'] == record['val_top1']


def test_train_data_flag_and_builtin_checkpoints_evaluate_without_flags(tmp_path, capsys):
    base = TRAIN_TINY + ['--batch-size', '8', '--builtin-val', '12', '--epochs', '1']
    # glyphs is the default; shapes, the counter-example, is chosen by name (its old flag
    # names still work).
    assert train_cli(base + ['--builtin-train', '16', '--output-dir', str(tmp_path / 'g')]) == 0
    assert train_cli(base + ['--data', 'shapes', '--shapes-train', '16',
                              '--output-dir', str(tmp_path / 's')]) == 0
    glyphs = train_state(tmp_path / 'g' / 'checkpoint.pth')
    shapes = train_state(tmp_path / 's' / 'checkpoint.pth')
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
    opt = recipes.Lamb([{'params': [w], 'weight_decay': 0.1}, {'params': [b], 'weight_decay': 0.0}],
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


@pytest.mark.parametrize('chunk', [None, 500])   # 500: many multi-tensor calls per group
def test_train_multi_tensor_lamb_equals_the_loop_and_resumes_bit_identical(chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(recipes.Lamb, 'CHUNK_ELEMENTS', chunk)

    def model():
        torch.manual_seed(0)
        return recipes.build_model({'model': 'vit_tiny', 'model_kwargs': dict(
            pe='rope_mixed', num_classes=5, img_size=16, patch_size=8, embed_dim=32, depth=2,
            num_heads=2)})

    def run(opt_class, net, steps, opt=None, first=0):
        opt = opt or opt_class(recipes.param_groups(net, 0.05), lr=2e-3, eps=1e-6)
        for i in range(first, steps):
            g = torch.Generator().manual_seed(100 + i)
            for j, p in enumerate(net.parameters()):
                # one tensor without a gradient at step 2: its step count falls behind the rest
                p.grad = None if (i == 2 and j == 3) else torch.randn(p.shape, generator=g)
            if i == 4:   # a zero weight: the trust ratio's "1 when a norm is 0"
                next(net.parameters()).data.zero_()
            opt.step()
        return opt

    fused, loop = model(), model()
    run(recipes.Lamb, fused, 6)
    run(benchmark_step.LoopLamb, loop, 6)   # the loop recipes.Lamb was before
    for (name, a), b in zip(fused.named_parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # Resume: a fresh optimizer loaded from a state_dict after 3 steps goes on bit-identically.
    whole, half = model(), model()
    run(recipes.Lamb, whole, 6)
    opt = run(recipes.Lamb, half, 3)
    saved = opt.state_dict()
    again = recipes.Lamb(recipes.param_groups(half, 0.05), lr=2e-3, eps=1e-6)
    again.load_state_dict(saved)
    run(recipes.Lamb, half, 6, opt=again, first=3)
    for a, b in zip(whole.parameters(), half.parameters()):
        assert torch.equal(a, b)


def test_train_repeated_aug_sampler_spreads_copies_over_ranks():
    items = list(range(12))
    samplers = [data.RepeatedAugSampler(items, 3, rank, repeats=3, seed=1) for rank in range(3)]
    for s in samplers:
        s.set_epoch(5)
    lists = [list(s) for s in samplers]
    assert all(len(x) == 4 for x in lists)
    assert lists[0] == lists[1] == lists[2]            # each rank gets its own copy of an image
    assert len(set(lists[0])) == 4
    samplers[0].set_epoch(6)
    assert list(samplers[0]) != lists[0]


def test_train_weight_decay_groups():
    model = recipes.build_model({'model': 'vit_tiny', 'model_kwargs': dict(
        pe='rope_mixed_ape', num_classes=3, img_size=16, patch_size=4, embed_dim=32, depth=1,
        num_heads=2)})
    decay, no_decay = recipes.param_groups(model, 0.05)
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
    (['--dist-timeout', '600', '--wait-for-output-dir', '1200'],
     '--dist-timeout 600 must exceed --wait-for-output-dir 1200: the other ranks wait'),
])
def test_train_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, argv, message):
    (tmp_path / 'empty' / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'empty' / 'val' / 'a').mkdir(parents=True)
    (tmp_path / 'corrupt.pth').write_bytes(b'PK\x03\x04 truncated')
    torch.save({'model': {'other.weight': torch.zeros(2)}}, tmp_path / 'other.pth')
    out = tmp_path / 'out'
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    status = train_cli(TRAIN_TINY + ['--output-dir', str(out)] + argv)
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
    assert not out.exists()


def test_train_bad_input_from_the_shell_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, TRAIN_SCRIPT, '--pe', 'bogus', '--output-dir',
                           str(tmp_path / 'out')], cwd=tmp_path, env=train_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith('error: ') and done.stderr.count('\n') == 1
    assert 'rope_mixed' in done.stderr and 'Traceback' not in done.stderr
    assert not (tmp_path / 'out').exists()


def test_train_cuda_random_states_restore_onto_this_ranks_device_on_any_layout(monkeypatch):
    """Resume with the same world size on another device layout: a rank restores only the CUDA
    state that maps onto its own device (checkpoints of 8 and of 1 entries), says what it
    restored, and a state it cannot place is one line (UserError: exit 2)."""
    saved = recovery.rng_state()
    ahead = torch.rand(4)
    states = lambda n: [torch.full((8,), i, dtype=torch.uint8) for i in range(n)]
    calls = []

    def record(state, device):
        calls.append((int(state[0]), device))

    # 8 entries, as earlier versions saved every GPU a process saw (1 node x 8): each rank
    # takes its own device's entry, which is the one it drew from on that layout.
    eight = dict(saved, cuda=states(8))
    said = recovery.set_rng_state(eight, torch.device('cuda', 3), record)
    assert calls == [(3, torch.device('cuda', 3))]
    assert said == 'torch (CPU), numpy and python, and on cuda:3 the CUDA state of entry 4 of 8'
    assert torch.equal(torch.rand(4), ahead)   # the CPU states came back as well
    # 1 entry, as this version saves (the saving rank's own device): placed on whichever device
    # this rank has: 2 nodes x 4, or srun with one visible GPU per task.
    for index in (0, 1, 7):
        calls.clear()
        said = recovery.set_rng_state(dict(saved, cuda=states(1)), torch.device('cuda', index),
                                      record)
        assert calls == [(0, torch.device('cuda', index))]
        assert said.endswith(f'and on cuda:{index} the CUDA state of entry 1 of 1')
    # 8 entries, none for this rank's cuda:8: one line, nothing restored on a GPU.
    calls.clear()
    with pytest.raises(cli.UserError) as error:
        recovery.set_rng_state(eight, torch.device('cuda', 8), record)
    assert str(error.value) == ("the checkpoint holds the CUDA random states of 8 devices, none "
                                "for this rank's cuda:8: resume on the device layout it was saved "
                                'on, or on one with at least as many GPUs per node')
    assert calls == []
    # A process without a GPU keeps the CUDA states aside and says so.
    said = recovery.set_rng_state(eight, torch.device('cpu'), record)
    assert calls == [] and said == ('torch (CPU), numpy and python; not the 8 CUDA state(s): '
                                    'this process has no GPU')
    assert torch.equal(torch.rand(4), ahead)
    # A rank with a GPU saves the state of its own device only: one entry, whatever it sees.
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': torch.arange(3))
    assert [t.tolist() for t in recovery.rng_state()['cuda']] == [[0, 1, 2]]


def test_train_local_rank_without_a_gpu_of_its_own_is_one_line_and_exit_2(
        tmp_path, capsys, monkeypatch):
    from distributed import cuda_index
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert [cuda_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    assert cuda_index(5, 1) == 0   # srun --gpus-per-task=1: the one GPU this task sees
    # Under torchrun (LOCAL_WORLD_SIZE set), a second rank on a one-GPU machine would share it.
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    out = tmp_path / 'out'
    assert train_cli(TRAIN_TINY + ['--output-dir', str(out), '--amp', 'none']) == 2
    assert capsys.readouterr().err == (
        'error: LOCAL_RANK 1, but this process sees 1 GPU(s) (CUDA_VISIBLE_DEVICES=0): start at '
        'most 1 process(es) per node, or give each process a GPU of its own\n')
    assert not out.exists()


def test_train_process_group_gets_the_dist_timeout(monkeypatch):
    import datetime
    import distributed
    seen = {}
    monkeypatch.setattr(distributed.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(distributed.dist, 'init_process_group', lambda **kw: seen.update(kw))
    monkeypatch.delenv('TORCHELASTIC_USE_AGENT_STORE', raising=False)
    for key, value in dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='1').items():
        monkeypatch.setenv(key, value)
    info = distributed.init_distributed(train.get_args_parser().parse_args([]).dist_timeout)
    assert (info.rank, info.world_size, info.distributed) == (1, 2, True)
    assert seen['timeout'] == datetime.timedelta(minutes=30) and seen['backend'] == 'gloo'
    assert '--dist-timeout SECONDS' in train.get_args_parser().format_help()


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
                TRAIN_TINY, [('--lr', '-1'), ('--drop-path', '1.5'), ('--patch-size', '0')]),
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
                cli.cli(main, parser, base + ['--output-dir', str(out), flag, value])
                status = 0
            except SystemExit as e:
                status = e.code
            err = capsys.readouterr().err
            assert status == 2, (flag, value, err)
            assert err == f'error: {flag} must be {limit}, got {shown}\n', (flag, value, err)
            assert not out.exists(), (flag, value)
    # The ends that are inside pass.
    assert cli.Limit(0, 1).admits(0) and cli.Limit(0, 1).admits(1.0)
    assert cli.SEED.admits(2 ** 32 - 1) and not cli.POSITIVE.admits(0)


def test_train_eval_transform_equals_the_official_pil_pipeline():
    # The DeiT-III / Swin evaluation: PIL bicubic resize of the shorter side to int(r / crop),
    # centre crop, ToTensor, ImageNet normalisation (torchvision's classic transforms on PIL).
    from torchvision import transforms as classic
    image = Image.fromarray(np.random.default_rng(0).uniform(0, 255, (300, 410, 3)).astype(np.uint8))
    for resolution, crop_ratio in ((224, 1.0), (160, 224 / 256), (96, 224 / 256)):
        official = classic.Compose([
            classic.Resize(int(resolution / crop_ratio), interpolation=classic.InterpolationMode.BICUBIC),
            classic.CenterCrop(resolution), classic.ToTensor(),
            classic.Normalize(builtin_data.IMAGENET_MEAN, builtin_data.IMAGENET_STD)])(image)
        ours = data.eval_transform(resolution, crop_ratio)(image)
        torch.testing.assert_close(ours, official, atol=1e-6, rtol=0)


def _spy_draws(transforms, log):
    """Make each v2 transform of `transforms` (RandomChoice's candidates too) append (its class
    name, the parameters it drew) to `log` whenever it draws them (make_params; a random-apply
    transform draws nothing when it is not applied, so a flip counts only when done)."""
    from torchvision.transforms import v2
    for t in transforms:
        for inner in getattr(t, 'transforms', [t]):
            if isinstance(inner, (v2.PILToTensor, v2.ToDtype, v2.Normalize)):   # no draws
                continue

            def recording(flat_inputs, make_params=inner.make_params, name=type(inner).__name__):
                params = make_params(flat_inputs)
                log.append((name, {k: v.tolist() if torch.is_tensor(v) else v
                                   for k, v in params.items() if not callable(v)}))
                return params
            inner.make_params = recording


def _seeded(transform, image, seed):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(image)


def _per_sample_pipeline(recipe, size):
    """The recipe's augmentation as one per-sample v2 pipeline on the worker (no plan, no
    device): the reference the worker's and the device's halves together must reproduce."""
    from torchvision.transforms import v2
    import benchmark_loader
    cfg = dict(recipes.RECIPES[recipe], img_size=size)
    if recipe == 'swin':   # RandAugment on uint8, then float, normalised, randomly erased
        return benchmark_loader.before_30_train_transform(cfg, size)
    jitter = cfg['color_jitter']
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),   # 3-Augment's colour steps on [0, 1] floats
        v2.RandomChoice([v2.Grayscale(num_output_channels=3),
                         v2.RandomSolarize(threshold=127.5 / 255, p=1.0),
                         v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))]),
        v2.ColorJitter(jitter, jitter, jitter),
        v2.Normalize(builtin_data.IMAGENET_MEAN, builtin_data.IMAGENET_STD)])


@pytest.mark.parametrize('recipe', ['deit3', 'swin'])
def test_train_folder_augmentation_split_between_worker_and_device_is_the_per_sample_pipeline(recipe):
    # Issue #30: the loader worker crops, flips and draws the rest of the augmentation (a plan
    # per sample); the device applies the plans to the batch. On a fixed seed, each sample must
    # come out as the per-sample v2 pipeline of the recipe makes it from that seed (the same
    # draws in the same order): 3-Augment up to float rounding (the blur as two 1-D passes, the
    # jitter's factors per row); Swin's RandAugment on uint8 bit for bit, and random erasing
    # the same box (the noise in it is the device's own draw).
    import augment
    import benchmark_loader
    from torchvision.transforms import v2
    threads = torch.get_num_threads()
    # One thread, as in a loader worker (torch gives each one thread): on a busy machine two
    # threads spin against each other on these tiny images, 10x slower
    torch.set_num_threads(1)
    try:
        cfg = dict(recipes.RECIPES[recipe], img_size=32)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
        seeds = range(300)
        worker = data.train_transform(cfg)
        assert isinstance(worker, augment.WorkerAugment)
        crops = []
        _spy_draws(worker.crop.transforms, crops)
        samples = []
        for seed in seeds:
            crops.append(('sample', seed))
            samples.append(_seeded(worker, image, seed))
        batch = torch.utils.data.default_collate(samples)
        assert batch.image.dtype == torch.uint8 and batch.image.shape == (300, 3, 32, 32)
        ours = data.build_batch_augment(cfg)(batch, torch.device('cpu'))
        reference, drawn = _per_sample_pipeline(recipe, 32), []
        _spy_draws(reference.transforms, drawn)
        expected = []
        for seed in seeds:
            drawn.clear()
            expected.append(_seeded(reference, image, seed))
            if recipe == 'swin':   # outside the erased box, bit for bit; the same box erased
                box = [p for name, p in drawn if name == 'RandomErasing']
                erased, top, left, height, width = batch.plan[seed, -5:].long().tolist()
                assert bool(erased) == bool(box and box[0]['v'] is not None)
                if erased:
                    assert (top, left, height, width) == tuple(box[0][k] for k in 'ijhw')
                    # every pixel of the box is noise: none kept its value before erasing
                    unerased = _seeded(v2.Compose(reference.transforms[:-1]), image, seed)
                    inside = (slice(None), slice(top, top + height), slice(left, left + width))
                    assert (ours[seed][inside] != unerased[inside]).all()
                    for x in (ours[seed], expected[-1]):
                        x[:, top:top + height, left:left + width] = 0
        expected = torch.stack(expected)
        if recipe == 'swin':
            assert torch.equal(ours, expected)
        else:
            torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)
            # and the uint8 pipeline before #30, which truncated after every colour step (up
            # to a level each, compounded by the jitter's factors): the same up to rounding
            before = torch.stack([_seeded(benchmark_loader.before_30_train_transform(cfg, 32), image, s)
                                  for s in seeds])
            levels = (ours - before).abs() * torch.tensor(builtin_data.IMAGENET_STD).view(3, 1, 1) * 255
            assert levels.max() <= 6, levels.max()
    finally:
        torch.set_num_threads(threads)
    # The distribution: the crop box torchvision's v1 RandomResizedCrop (the official DeiT-III
    # code's) draws from the same seed, scale (0.08, 1), ratio (3/4, 4/3); flip 1/2; each of
    # grey / solarise / blur 1/3.
    from torchvision import transforms as classic
    boxes = [(p['top'], p['left'], p['height'], p['width'])
             for name, p in crops if name == 'RandomResizedCrop']
    official = [_seeded(lambda im: classic.RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3]),
                        image, seed) for seed in seeds]
    assert boxes == official
    areas = np.array([h * w / (60 * 80) for _, _, h, w in boxes])
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and np.ptp(areas) > 0.8
    flips = sum(name == 'RandomHorizontalFlip' for name, _ in crops) / len(seeds)
    assert abs(flips - 0.5) < 0.09   # 300 draws: 3 standard deviations are 0.087
    if recipe == 'deit3':
        for choice in range(3):
            share = (batch.plan[:, 0] == choice).double().mean().item()
            assert abs(share - 1 / 3) < 0.09, (choice, share)   # 3 sd: 0.082


def test_train_batch_augment_steps_and_rows():
    # The device's pieces against torchvision per row: the blur with each row's sigma, and a
    # batch with an undecodable image's placeholder (an all-zero plan) runs like the others.
    import augment
    from torchvision.transforms import v2
    images = torch.rand(3, 3, 40, 30)
    sigmas = torch.tensor([0.1, 0.7, 2.0], dtype=torch.float64)
    blurred = augment.gaussian_blur_rows(images, sigmas)
    for image, sigma, ours in zip(images, sigmas.tolist(), blurred):
        torch.testing.assert_close(ours, v2.functional.gaussian_blur(image, [9, 9], [sigma, sigma]),
                                   atol=1e-6, rtol=0)
    for recipe in ('deit3', 'swin'):
        cfg = dict(recipes.RECIPES[recipe], img_size=16)
        worker = data.train_transform(cfg)
        image = Image.fromarray(np.full((20, 24, 3), 100, dtype=np.uint8))
        batch = torch.utils.data.default_collate([worker(image), worker.placeholder(16)])
        out = augment.to_model_input(batch, torch.device('cpu'), data.build_batch_augment(cfg))
        assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32 and out.isfinite().all()
        kept = augment.take_rows(batch, torch.tensor([True, False]))
        assert torch.equal(kept.image, batch.image[:1]) and torch.equal(kept.plan, batch.plan[:1])
    floats = torch.randn(2, 3, 8, 8)
    assert torch.equal(augment.to_model_input(floats, torch.device('cpu')), floats)


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


def test_train_closing_table_shows_rope_extrapolated_and_interpolated(eval_tiny_run, tmp_path):
    base, checkpoint = eval_tiny_run
    with open(base / 'run' / 'resolutions.json') as f:
        summary = json.load(f)
    by_policy = summary['results_by_rope_positions']
    assert list(by_policy) == ['extrapolate', 'interpolate']
    assert summary['results'] == by_policy['extrapolate']   # the paper's protocol first
    # The same numbers as eval_multires.py on a freshly loaded copy, policy by policy.
    results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
        '--checkpoint', str(checkpoint), '--labels', 'run', '--resolutions', '16',
        str(eval_train_res), '--rope-positions', 'extrapolate', 'interpolate',
        '--output-dir', str(tmp_path / 'out'), '--num-workers', '0', '--quiet']))
    for policy, rows in by_policy.items():
        ours = {r['resolution']: r['top1'] for r in results[f'run {policy}']}
        assert {r['resolution']: r['top1'] for r in rows} == ours, policy
    # At the training grid both policies are the same model.
    at_train = [[r['top1'] for r in rows if r['resolution'] == eval_train_res] for rows in by_policy.values()]
    assert at_train[0] == at_train[1]


# ----------------------------------------------------------------------------------------------
# Several training resolutions on folder data (--train-resolutions with --data-path)

_FOLDER_SIZES = ((20, 28), (30, 18), (24, 24), (36, 26))   # H x W: wide, tall, square, wide


def _train_write_sized_folder(root, corrupt=False):
    """DIR/{train,val}/{left,right}/*.png, 12 + 3 images a class in the four _FOLDER_SIZES: a
    bright block in the left or the right half (a corrupt training image if `corrupt`)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 12), ('val', 3)):
        for label, name in enumerate(('left', 'right')):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = _FOLDER_SIZES[i % len(_FOLDER_SIZES)]
                pixels = rng.uniform(0, 60, size=(h, w, 3)).astype(np.uint8)
                x0 = w // 8 + label * (w // 2)
                pixels[h // 4:h // 4 + h // 2, x0:x0 + w // 3] = 230
                Image.fromarray(pixels).save(folder / f'{i}.png')
    if corrupt:
        (root / 'train' / 'left' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')


# The tiny ViT on folders (DeiT-III recipe: 3-Augment, mixup / cutmix, repeated augmentation x3).
_TRAIN_FOLDER_MULTIRES = TRAIN_TINY + ['--model', 'vit_tiny', '--pe', 'rope_mixed_ape',
                                        '--train-resolutions', '12', '16', '20', '--batch-size', '4']


@pytest.mark.parametrize('recipe', ['deit3', 'swin', 'demo'])   # 3-Augment, RandAugment, none
def test_train_folder_several_resolutions_crop_each_step_at_its_size_any_workers(tmp_path, recipe):
    root = tmp_path / 'data'
    _train_write_sized_folder(root, corrupt=True)
    cfg = train.resolve_config(train.get_args_parser().parse_args([
        '--data-path', str(root), '--recipe', recipe, '--img-size', '16', '--seed', '1',
        '--train-resolutions', '12', '16', '20']), 2)
    plain = data.build_train_dataset(dict(cfg, train_resolutions=None))   # as without the flag
    train_set = data.build_train_dataset(cfg)
    batch, epoch, start = 3, 1, 1   # 25 images: 12 a rank, 4 steps; resumed at step 1
    sizes = [train.train_step_resolution(cfg, epoch, step) for step in range(start, 4)]
    assert len(set(sizes)) >= 2
    for rank in range(2):
        if cfg['repeated_aug'] > 1:
            order = data.RepeatedAugSampler(train_set, 2, rank, cfg['repeated_aug'], seed=cfg['seed'])
        else:
            order = torch.utils.data.DistributedSampler(train_set, num_replicas=2, rank=rank,
                                                        shuffle=True, seed=cfg['seed'], drop_last=True)
        sampler = data.EpochSampler(order, cfg['seed'], rank, batch,
                                    lambda e, s: train.train_step_resolution(cfg, e, s))
        sampler.set_epoch(epoch, start * batch)
        keys = list(sampler)
        assert [key.resolution for key in keys] == [r for r in sizes for _ in range(batch)]
        runs = [list(torch.utils.data.DataLoader(data.SeededSamples(train_set), batch_size=batch,
                                                 sampler=sampler, num_workers=workers))
                for workers in (0, 2)]
        for (images, labels), (again, labels_again), size in zip(*runs, sizes, strict=True):
            # 3-Augment and RandAugment: the workers' Planned crops and plans; 'none': images
            assert _fields(images)[0].shape == (batch, 3, size, size)   # every rank: the step's size
            assert _same(images, again) and torch.equal(labels, labels_again)
        # Each image: the recipe's pipeline made for its step's size, drawn from its own seed;
        # at --img-size the very pipeline (and draws) of a run without the flag.
        for i, (index, seed, _, size) in enumerate(keys):
            images, labels = runs[0][i // batch]
            image = type(images)(*(t[i % batch] for t in _fields(images))) if recipe != 'demo' \
                else images[i % batch]
            label = labels[i % batch]
            path, target = train_set.samples[index]
            if path.endswith('broken.png'):
                placeholder = getattr(data.train_transform(cfg, size), 'placeholder', None)
                assert label == -1 and _same(image, placeholder(size) if placeholder
                                             else torch.zeros(3, size, size))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                expected = data.train_transform(cfg, size)(train_set.loader(path))
            assert _same(image, expected) and label == target
            if size == cfg['img_size']:
                assert _same(image, data.SeededSamples(plain)[(index, seed, epoch)][0])


def _fields(images):
    """A loader's images as a tuple of tensors: (crops, plans) of a Planned batch, or (images,)."""
    return tuple(images) if isinstance(images, tuple) else (images,)


def _same(a, b):
    return len(_fields(a)) == len(_fields(b)) and all(
        torch.equal(x, y) for x, y in zip(_fields(a), _fields(b)))


def test_train_folder_several_resolutions_vit_and_swin_stored_evaluated_bad_sizes_refused(
        tmp_path, capsys, monkeypatch):
    root = tmp_path / 'data'
    _train_write_sized_folder(root)
    swin = ['--model', 'swin_tiny', '--pe', 'rope_mixed', '--img-size', '64', '--eval-resolutions',
            '64', '--batch-size', '4']
    real_epoch = train.train_one_epoch
    for name, argv, trained, several in (
            ('vit', _TRAIN_FOLDER_MULTIRES, 16, [12, 16, 20]),
            ('swin', swin + ['--train-resolutions', '32', '64', '96'], 64, [32, 64, 96])):  # windows 1-3
        out, record = tmp_path / name, tmp_path / f'{name}_sizes'
        record.mkdir()
        monkeypatch.setattr(train, 'train_one_epoch', recording_step_sizes(real_epoch, record))
        assert train_cli(argv + ['--data-path', str(root), '--epochs', '1', '--num-workers', '0',
                                  '--output-dir', str(out)]) == 0, name
        state = train_state(out / 'checkpoint.pth')
        cfg = state['args']
        assert cfg['train_resolutions'] == several
        sizes = recorded_step_sizes(record)
        assert list(sizes) == [(0, step) for step in range(state['steps_per_epoch'])]
        assert all(hw == 2 * (train.train_step_resolution(cfg, *key),) for key, hw in sizes.items())
        assert len(set(sizes.values())) >= 2, name
        # eval_multires.py rebuilds it from the checkpoint alone: train.py's own validation score.
        results, _ = eval_multires.main(eval_multires.get_args_parser().parse_args([
            '--checkpoint', str(out / 'checkpoint.pth'), '--resolutions', str(trained), '--quiet',
            '--output-dir', str(tmp_path / f'{name}_eval')]))
        (rows,) = results.values()
        last = json.loads((out / 'log.jsonl').read_text().splitlines()[-1])
        assert (rows[0]['n'], rows[0]['top1']) == (6, last['val_top1']), name
    capsys.readouterr()
    # A size the architecture refuses: one line naming the valid neighbours, exit 2, nothing written.
    for argv, start, neighbours in (
            (_TRAIN_FOLDER_MULTIRES + ['--train-resolutions', '16', '18'],
             '--train-resolutions 18: input size 18x18 (HxW) is not allowed', 'sizes: 16x16, '),
            (swin + ['--train-resolutions', '64', '80'],
             '--train-resolutions 80: input size 80x80 is not allowed',
             'Nearest valid square sizes: [32, 64, 96, 128]')):
        assert train_cli(argv + ['--data-path', str(root), '--output-dir', str(tmp_path / 'bad')]) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ' + start) and neighbours in err and err.count('\n') == 1, err
    assert not (tmp_path / 'bad').exists()


_TRAIN_STEP_SIZES_LAUNCHER = '''import os, sys
import cli, train
from testkit import recording_step_sizes
stall = tuple(map(int, os.environ['STALL_AT'].split(','))) if os.environ.get('STALL_AT') else None
train.train_one_epoch = recording_step_sizes(train.train_one_epoch, os.environ['RECORD'], stall)
cli.cli(train.main, train.get_args_parser())
'''


@pytest.mark.slow
def test_train_folder_several_resolutions_two_processes_sigkill_resume_bit_identical(tmp_path):
    """2 processes, 3 steps an epoch, 2 epochs: every step on both ranks at its drawn size; the job
    SIGKILLed at step 3 of epoch 2 (the last save after step 1), resumed with --resume auto and
    another worker count, ends bit-identical to the uninterrupted run."""
    root = tmp_path / 'data'
    _train_write_sized_folder(root)
    launcher = tmp_path / 'launch.py'
    launcher.write_text(_TRAIN_STEP_SIZES_LAUNCHER)
    args = _TRAIN_FOLDER_MULTIRES + ['--data-path', str(root), '--epochs', '2',
                                     '--save-every-steps', '2', '--print-freq', '1']

    def torchrun(name, workers, stall=None, extra=()):
        record = tmp_path / f'{name}_sizes'
        record.mkdir(exist_ok=True)
        env = dict(train_env(), RECORD=str(record), STALL_AT=','.join(map(str, stall or ())))
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
               '2', str(launcher), *args, '--output-dir', str(tmp_path / name),
               '--num-workers', str(workers), *extra]
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT), record

    full, full_sizes = torchrun('full', 0)
    output = full.communicate(timeout=TRAIN_TIMEOUT)[0]
    assert full.returncode == 0, output[-3000:]
    cfg = train_state(tmp_path / 'full' / 'checkpoint.pth')['args']
    assert cfg['train_resolutions'] == [12, 16, 20] and cfg['world_size'] == 2
    steps = [(epoch, step) for epoch in range(2) for step in range(3)]
    drawn = {key: 2 * (train.train_step_resolution(cfg, *key),) for key in steps}
    assert len(set(drawn.values())) >= 2
    for rank in range(2):
        assert recorded_step_sizes(full_sizes, rank) == drawn, rank

    # Both ranks wait at step 3 of epoch 2, where the job is SIGKILLed: the torchrun agent, then
    # each worker with its loader workers (torchrun starts a worker in a session of its own).
    cut, cut_sizes = torchrun('cut', 2, stall=(1, 2))
    markers = [cut_sizes / f'stalled_{rank}' for rank in range(2)]
    try:
        deadline = time.time() + TRAIN_TIMEOUT
        while not all(m.exists() for m in markers):
            assert cut.poll() is None and time.time() < deadline, 'the run did not reach the step'
            time.sleep(0.05)
    finally:
        cut.kill()
        for marker in filter(os.path.exists, markers):
            pid, group, _ = map(int, marker.read_text().split())
            try:
                os.killpg(group, signal.SIGKILL) if group == pid else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cut.communicate(timeout=TRAIN_TIMEOUT)   # the workers held its output open
    saved = sorted(p.name for p in (tmp_path / 'cut').glob('recovery_*.pth'))
    assert saved == ['recovery_e0001_i000000000.pth', 'recovery_e0001_i000000008.pth'], saved

    resumed, _ = torchrun('cut', 1, extra=['--resume', 'auto'])   # records where `cut` did
    output = resumed.communicate(timeout=TRAIN_TIMEOUT)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert 'recovery_e0001_i000000008.pth (--resume auto): epoch 2/2, step 1/3' in output
    for rank in range(2):   # steps 1-2 of epoch 2 done twice, before the kill and after, alike
        assert recorded_step_sizes(cut_sizes, rank) == drawn, rank
    assert_same_run(tmp_path / 'full', tmp_path / 'cut')


@pytest.mark.slow
def test_train_deterministic_changes_no_number_on_cpu_and_is_undone_after_the_run(
        train_small_reference, tmp_path):
    out = tmp_path / 'out'
    assert not torch.are_deterministic_algorithms_enabled()
    seen = []
    real = train.run_training

    def observed(args):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     os.environ.get('CUBLAS_WORKSPACE_CONFIG')))
        return real(args)
    train.run_training = observed
    try:
        assert train_cli(TRAIN_SMALL + ['--output-dir', str(out), '--deterministic']) == 0
    finally:
        train.run_training = real
    assert seen == [(True, os.environ['CUBLAS_WORKSPACE_CONFIG'])]   # set before the run
    assert not torch.are_deterministic_algorithms_enabled()   # the process goes on as before
    assert train_state(out / 'checkpoint.pth')['args']['deterministic'] is True
    assert_same_run(train_small_reference, out)
