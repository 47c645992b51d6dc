"""Tests for train.py: distributed run, exact resume, folder data, shapes data, LAMB, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train

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


def _train_torchrun(args, nproc=2):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            '--nproc_per_node', str(nproc), _TRAIN_SCRIPT] + args


def _train_cli(argv):
    """Run train.py's command line in this process; returns the exit status (0 when none)."""
    try:
        train.cli(train.main, train.get_args_parser(), argv)
    except SystemExit as e:
        return e.code
    return 0


def _train_state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_train_torchrun_two_processes_and_resume_after_sigkill_is_bit_identical(tmp_path):
    args = _TRAIN_TINY + ['--batch-size', '8', '--shapes-train', '192', '--shapes-val', '20',
                          '--epochs', '4', '--lr', '2e-3']
    # 1. Uninterrupted 2-process run.
    full = tmp_path / 'full'
    done = subprocess.run(_train_torchrun(args + ['--output-dir', str(full)]),
                          cwd=tmp_path, env=_train_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('epoch 1/4 done') == 1          # only rank 0 prints
    assert 'world_size: 2' in done.stdout and 'top-1 accuracy' in done.stdout
    records = [json.loads(line) for line in (full / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2, 3, 4]
    ckpt = _train_state(full / 'checkpoint.pth')
    assert ckpt['epoch'] == 3 and len(ckpt['rng']) == 2
    for key in ('model', 'pe', 'model_kwargs', 'img_size', 'num_classes', 'dataset', 'data_path',
                'shapes_val', 'shapes_seed', 'eval_crop_ratio', 'recipe', 'lr', 'batch_size'):
        assert key in ckpt['args'], key
    assert ckpt['args']['recipe'] == 'demo' and ckpt['args']['dataset'] == 'shapes'
    assert json.loads((full / 'config.json').read_text()) == ckpt['args']
    assert (full / 'best.pth').is_file() and (full / 'resolutions.json').is_file()
    model = train.build_model(ckpt['args'])
    model.load_state_dict(ckpt['model'])

    # 2. Same run, SIGKILLed (whole process group) soon after its first checkpoint, then resumed.
    cut = tmp_path / 'cut'
    proc = subprocess.Popen(_train_torchrun(args + ['--output-dir', str(cut)]),
                            cwd=tmp_path, env=_train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (cut / 'checkpoint.pth').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)   # land somewhere inside epoch 2 (or in the middle of a save)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode != 0, 'the run finished before it could be killed'
    killed_at = _train_state(cut / 'checkpoint.pth')['epoch']
    assert killed_at < 3
    resumed = subprocess.run(
        _train_torchrun(args + ['--output-dir', str(cut), '--resume', 'auto']),
        cwd=tmp_path, env=_train_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed from {cut / "checkpoint.pth"}' in resumed.stdout
    final = _train_state(cut / 'checkpoint.pth')
    assert final['epoch'] == 3
    for key, value in ckpt['model'].items():
        assert torch.equal(value, final['model'][key]), key
    for a, b in zip(ckpt['optimizer']['state'].values(), final['optimizer']['state'].values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    records = [json.loads(line) for line in (cut / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2, 3, 4]


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
    base = _TRAIN_TINY + ['--batch-size', '8', '--shapes-train', '16', '--shapes-val', '8',
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
    (['--batch-size', '64', '--shapes-train', '32'], 'fewer than one total batch'),
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
