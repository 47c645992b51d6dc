"""The suite on a machine with a GPU. Every other test means the CPU and sees no GPU, in this
process and in its subprocesses (conftest.py); the tests marked `cuda` here see it and skip
without CUDA: the fused RoPE under bf16 autocast (also run on the CPU), SDPA's fused kernels on our
q, k, v in bf16, a torchrun run of train.py on CUDA stopped by SIGTERM and resumed, the host syncs
of a training step, and 3-Augment finished on the device without one.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import recipes
import rope_vit
from testkit import (TRAIN_FAULT_ARGS, TRAIN_ROOT, TRAIN_SCRIPT, TRAIN_TIMEOUT, train_env,
    tiny_vit)

# Read when this file is collected, before conftest.py hides the GPUs from the other tests. bf16
# kernels (autocast, and SDPA's fused ones) need compute capability 8.0 (Ampere) or newer, and
# train.py's default on CUDA is bf16 autocast.
needs_bf16 = pytest.mark.skipif(not torch.cuda.is_available()
                                or torch.cuda.get_device_capability() < (8, 0),
                                reason='needs a CUDA GPU with bf16 (compute capability 8.0+)')


def test_cuda_the_other_tests_see_no_gpu_in_process_or_in_subprocesses():
    assert not torch.cuda.is_available()
    probe = [sys.executable, '-c', 'import os, torch; '
             'print(repr(os.environ["CUDA_VISIBLE_DEVICES"]), torch.cuda.is_available())']
    done = subprocess.run(probe, env=train_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout == "'' False\n", done.stderr[-2000:]
    # A subprocess started by a test file with the GPUs visible is refused before it starts.
    for env in (None, dict(os.environ, CUDA_VISIBLE_DEVICES='0')):
        with pytest.raises(AssertionError, match='starts a subprocess that may see a GPU'):
            subprocess.run([sys.executable, '-c', 'pass'], env=env, timeout=60)


def _relative_error(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=[pytest.mark.cuda,
                                                                         needs_bf16])])
def test_cuda_fused_rope_under_bf16_autocast_is_as_close_as_the_readable_path(device):
    """Logits and the RoPE-Mixed frequency gradient of the fused path (complex rotation, SDPA)
    and the readable one (real formula, explicit softmax): equal in fp32; under bf16 autocast
    the fused path is as close to fp32 as the readable one (measured on the CPU: 0.6 % vs 0.7 %
    of the logits' norm, 2.2 % vs 2.2 % of the gradient's; a wrong policy moves them by 48 % and
    216 %)."""
    model = tiny_vit('rope_mixed').to(device)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0)).to(device)

    def run(fused, bf16):
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x) if fused else model.forward_with_attention(x)[0]
        logits.float().square().sum().backward()
        return logits.detach().float(), model.freqs.grad.clone()

    reference = run(fused=False, bf16=False)
    fused_fp32 = run(fused=True, bf16=False)
    torch.testing.assert_close(fused_fp32[0], reference[0], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(fused_fp32[1], reference[1], atol=1e-3, rtol=1e-2)
    fused, readable = run(fused=True, bf16=True), run(fused=False, bf16=True)
    assert fused[0].dtype == torch.float32 and reference[1].abs().max() > 1e-3
    for what, i, bound in (('logits', 0, 0.05), ('frequency gradient', 1, 0.15)):
        err_fused = _relative_error(fused[i], reference[i])
        err_readable = _relative_error(readable[i], reference[i])
        assert err_readable < bound, (what, err_readable)   # bf16 itself
        assert err_fused <= 2 * err_readable + 2e-3, (what, err_fused, err_readable)


@pytest.mark.cuda
@needs_bf16
def test_cuda_sdpa_takes_a_fused_kernel_for_our_q_k_v_in_bf16(monkeypatch):
    """Every attention call of a ViT-S RoPE-Mixed training step under bf16 autocast runs with the
    math fallback switched off: SDPA raises when no fused kernel (flash, memory-efficient,
    cuDNN) accepts the q, k, v the fused RoPE path hands it (dtype, layout, strides)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    kernels += [SDPBackend.CUDNN_ATTENTION] if hasattr(SDPBackend, 'CUDNN_ATTENTION') else []
    real, seen = F.scaled_dot_product_attention, []

    def fused_only(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, tuple(q.shape)))
        with sdpa_kernel(kernels):
            return real(q, k, v, *args, **kwargs)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', fused_only)
    model = rope_vit.create_model('vit_small', pe='rope_mixed').cuda().train()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    assert len(seen) == 12, seen   # one per block
    assert all(s[:3] == (torch.bfloat16,) * 3 and s[3] == (2, 6, 197, 64) for s in seen), seen
    assert model.freqs.grad is not None and torch.isfinite(model.freqs.grad).all()


def _descendants(pid):
    todo, seen = [pid], []
    while todo:
        seen.append(todo.pop())
        try:
            with open(f'/proc/{seen[-1]}/task/{seen[-1]}/children') as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return seen


@pytest.mark.slow
@pytest.mark.cuda
@needs_bf16
def test_cuda_torchrun_run_stopped_by_sigterm_resumes_and_finishes(tmp_path):
    """train.py as a GPU machine runs it (CUDA, bf16; NCCL where two GPUs give two processes,
    one process on one GPU, which makes no process group): SIGTERM to every process of the job
    after its first recovery checkpoint stops it with status 75; --resume auto continues, with
    the rank's own CUDA random state on its device, and finishes."""
    nproc = min(2, torch.cuda.device_count())
    # The GPUs this pytest sees (its own CUDA_VISIBLE_DEVICES, if any), unlike train_env's.
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=TRAIN_ROOT)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    out = tmp_path / 'out'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
               str(nproc), TRAIN_SCRIPT, *TRAIN_FAULT_ARGS, '--output-dir', str(out),
               '--resume', 'auto']
    log = tmp_path / 'stopped.log'
    with open(log, 'w') as f:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + TRAIN_TIMEOUT
        while 'saved recovery_' not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        proc.wait(timeout=TRAIN_TIMEOUT)
    finally:
        if proc.poll() is None:
            for pid in _descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert f'{nproc} process(es) on cuda' in output, output[-3000:]
    stops = re.findall(r'stopped by SIGTERM (at epoch \d/4, step \d+/\d+|after epoch \d/4): saved '
                       r'(\S+); run the same command with --resume auto to continue \(exit '
                       r'status 75\)', output)
    assert len(stops) == 1, output[-3000:]
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed from {stops[0][1]} (--resume auto)' in resumed.stdout, resumed.stdout[-3000:]
    if stops[0][0].startswith('at epoch'):   # mid-epoch: the random states came back
        assert 'and on cuda:0 the CUDA state of entry 1 of 1' in resumed.stdout
    final = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert final['epoch'] == 3 and len(final['rng'][0]['cuda']) == 1
    assert all(torch.isfinite(t).all() for t in final['model'].values())


def _epoch_host_syncs(device, steps, count=True):
    """Host syncs of one train_one_epoch of `steps` steps (ViT-tiny RoPE-Mixed, LAMB, bf16
    autocast, gradient clipping, print interval and agreement past the last step), as
    torch.cuda.set_sync_debug_mode('warn') reports them."""
    import warnings
    import train
    cfg = train.resolve_config(train.get_args_parser().parse_args(
        ['--amp', 'bf16', '--opt', 'lamb', '--print-freq', '100', '--save-every-steps', '0']), 1)
    cfg['num_classes'] = cfg['model_kwargs']['num_classes'] = 10
    torch.manual_seed(0)
    model = recipes.build_model(cfg).to(device)
    optimizer = recipes.build_optimizer(model, cfg)
    scheduler = recipes.build_scheduler(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    pin = device.type == 'cuda'   # what the loader gives a GPU run: pinned batches
    loader = [(torch.randn(4, 3, cfg['img_size'], cfg['img_size']),
               torch.randint(0, 10, (4,))) for _ in range(steps)]
    loader = [(x.pin_memory(), y.pin_memory()) if pin else (x, y) for x, y in loader]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if count:
            torch.cuda.set_sync_debug_mode('warn')
        try:
            train.train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, 0, device,
                                  torch.bfloat16, 10, None)
        finally:
            if count:
                torch.cuda.set_sync_debug_mode(0)
    return sum('synchroniz' in str(w.message) for w in caught)


@pytest.mark.cuda
@needs_bf16
def test_cuda_training_step_syncs_the_host_only_at_the_agreement_and_print_interval():
    """Steps between agreements add no host sync: an epoch of 6 steps syncs as often as one of 3
    (the syncs counted are the last step's agreement and print, and the epoch's closing sums;
    that they are counted at all shows the detector works)."""
    device = torch.device('cuda')
    short, long = _epoch_host_syncs(device, 3), _epoch_host_syncs(device, 6)
    assert short > 0 and long == short, (short, long)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_3_augment_finished_on_the_device_never_waits_for_it():
    """augment.BatchAugment of the DeiT-III recipe on a pinned Planned batch, as the loader
    hands it over: no host sync (torch.cuda.set_sync_debug_mode), and the CPU's result."""
    import warnings
    import numpy as np
    from PIL import Image
    import data
    cfg = dict(recipes.RECIPES['deit3'], img_size=32)
    worker, finish = data.train_transform(cfg), data.build_batch_augment(cfg)
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    batch = torch.utils.data.default_collate([worker(image) for _ in range(64)])
    pinned = type(batch)(*(t.pin_memory() for t in batch))
    device = torch.device('cuda')
    finish(pinned, device)   # warm-up: cuDNN, allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            out = finish(pinned, device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert not [w for w in caught if 'synchroniz' in str(w.message)]
    torch.testing.assert_close(out.cpu(), finish(batch, torch.device('cpu')), atol=1e-4, rtol=0)
