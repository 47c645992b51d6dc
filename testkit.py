"""Builders and helpers that several test files share (this file holds no tests).

Tiny models with re-drawn weights (so position mistakes show), an offline torch.hub cache,
and the configurations and command-line helpers of the train.py tests.
"""
import inspect
import json
import math
import os
import sys
import time
import urllib.error

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import cli
import rope_vit
import swin_rope
import train


VIT_TINY = dict(embed_dim=64, depth=2, num_heads=2, num_classes=10)  # head dim 32


def vit_stress_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter so that position mistakes show in the logits.

    With the official init (LayerScale 1e-4, weights std 0.02, zero biases) the logits hardly
    depend on positions: a ViT with no RoPE at all differs by 7e-5, so a 1e-4 tolerance would
    accept it. Re-drawn as below (qkv at 2.5 / fan_in for peaked attention), logits have a std
    of about 1, correct fp32 implementations agree within 1e-5, and a mistake (no RoPE, x and y
    swapped, rotate-half pairing, APE resized with antialias) moves them by 0.06 or more. RoPE-Mixed
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


def tiny_vit(pe, seed=0, **kw):
    torch.manual_seed(seed)
    return vit_stress_init_(rope_vit.create_model('vit_tiny', pe=pe, **{**VIT_TINY, **kw}), seed).eval()


# ---------------------------------------------------------------------------------------
# Published weights: pretrained=True from torch.hub's cache, safetensors
# ---------------------------------------------------------------------------------------

def offline_hub(monkeypatch, tmp_path):
    """An empty torch.hub cache under tmp_path and no network: any download attempt fails."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError('no network in the tests')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)


def published_with_drawn_weights(module, name, seed=0):
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


def place_in_hub_cache(module, name, state_dict):
    path = module.pretrained_cache_path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'model': state_dict}, path)
    return path


def swin_small_model(pe, seed=0, **kwargs):
    """3 stages, head dim 8, built for 64 x 64 with window 4 (stage grids 16, 8, 4)."""
    torch.manual_seed(seed)
    cfg = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8),
               window_size=4, num_classes=7, drop_path_rate=0.0)
    cfg.update(kwargs)
    return swin_rope.create_model('swin_tiny', pe=pe, **cfg).eval()


@torch.no_grad()
def swin_redraw(model, seed=1):
    """Re-draw weights as vit_stress_init_ does (RPB tables N(0, 1)), so position mistakes show.
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


# ==============================================================================================
# train.py: configurations and command-line helpers of its tests
# ==============================================================================================

TRAIN_ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(TRAIN_ROOT, 'train.py')
# A ViT small enough for a CPU test: 16 px images, 4 px patches, 2 blocks of width 32.
TRAIN_TINY = ['--img-size', '16', '--patch-size', '4', '--embed-dim', '32', '--depth', '2',
               '--num-heads', '2', '--eval-resolutions', '16', '--print-freq', '4']


def train_env():
    """The environment of a subprocess of the tests: no GPU (train.py would take CUDA, NCCL and
    bf16, and on a one-GPU machine put two ranks on one device), one thread per process, the
    repository importable, no torchrun variables of an enclosing job."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=TRAIN_ROOT, CUDA_VISIBLE_DEVICES='')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    return env


def train_torchrun(args, nproc=2, launcher=()):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            '--nproc_per_node', str(nproc), *launcher, TRAIN_SCRIPT] + args


def train_cli(argv):
    """Run train.py's command line in this process; returns the exit status (0 when none)."""
    try:
        cli.cli(train.main, train.get_args_parser(), argv)
    except SystemExit as e:
        return e.code
    return 0


def train_state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_run(reference, other):
    """Two finished runs: bit-identical weights and optimizer state, the same log records
    (but for their wall times)."""
    a, b = train_state(reference / 'checkpoint.pth'), train_state(other / 'checkpoint.pth')
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


# Every fault test runs this configuration and compares with one uninterrupted run of it:
# 4 epochs of 12 steps at 2 processes, a recovery checkpoint every 5 steps.
TRAIN_FAULT_ARGS = TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '192',
                                   '--builtin-val', '20', '--epochs', '4', '--lr', '2e-3',
                                   '--save-every-steps', '5']
TRAIN_TIMEOUT = 240   # seconds for one tiny run, far above its ~10 s: a hang fails, never stalls


def write_train_folder(root, corrupt):
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


# One process, 2 epochs of 4 steps, a recovery checkpoint at every step.
TRAIN_SMALL = TRAIN_TINY + ['--batch-size', '8', '--builtin-train', '32', '--builtin-val', '8',
                              '--epochs', '2', '--save-every-steps', '1']


def recording_step_sizes(train_one_epoch, folder, stall_at=None):
    """train_one_epoch wrapped to record every training batch it steps on: one line
    'epoch step height width' per step in folder/sizes_<rank>.txt (for train.train_one_epoch,
    in this process by monkeypatch or in a torchrun worker by a launcher script).

    stall_at=(epoch, step): on reaching that step (0-based) each rank writes
    folder/stalled_<rank> ('pid process-group parent-pid') and waits to be killed, a crash at a
    known step.
    """
    signature = inspect.signature(train_one_epoch)

    def recording(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        loader, epoch, start = (bound.arguments[k] for k in ('loader', 'epoch', 'start_step'))
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

        class Recorded:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for step, (images, targets) in enumerate(loader, start=start):
                    if (epoch, step) == stall_at:
                        marker = os.path.join(folder, f'stalled_{rank}')
                        with open(marker + '.tmp', 'w') as f:
                            f.write(f'{os.getpid()} {os.getpgid(0)} {os.getppid()}')
                        os.replace(marker + '.tmp', marker)
                        time.sleep(TRAIN_TIMEOUT)
                    # a Planned batch of folder crops and plans, or a tensor
                    shape = (images[0] if isinstance(images, tuple) else images).shape
                    with open(os.path.join(folder, f'sizes_{rank}.txt'), 'a') as f:
                        f.write(f'{epoch} {step} {shape[-2]} {shape[-1]}\n')
                    yield images, targets
        bound.arguments['loader'] = Recorded()
        return train_one_epoch(*bound.args, **bound.kwargs)
    return recording


def recorded_step_sizes(folder, rank=0):
    """{(epoch, step): (height, width)} of what recording_step_sizes wrote for `rank`
    (a step done twice, before a crash and after the resume, must have the same size)."""
    sizes = {}
    for line in open(os.path.join(folder, f'sizes_{rank}.txt')).read().splitlines():
        epoch, step, height, width = map(int, line.split())
        assert sizes.setdefault((epoch, step), (height, width)) == (height, width), line
    return sizes


# ----------------------------------------------------------------------------------------------
# eval_multires.py: the training resolution of conftest's tiny run
# ----------------------------------------------------------------------------------------------

eval_train_res = 32
