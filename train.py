"""Train RoPE-ViT / Swin-RoPE with the paper's recipes (single process or torchrun / DDP).

Built-in demo, no data needed (the `glyphs` data, a small ViT, 10-11 minutes on 2 CPU cores):
    torchrun --nproc_per_node=2 train.py --pe rope_mixed
    python train.py --pe ape                      # one process, no torchrun
ImageNet-style folders (DIR/train/<class>/*, DIR/val/<class>/*), DeiT-III recipe for ViT:
    torchrun --nproc_per_node=8 train.py --model vit_small --pe rope_mixed --data-path /imagenet
Swin recipe:
    torchrun --nproc_per_node=8 train.py --model swin_tiny --pe rope_mixed --data-path /imagenet
Several nodes (the same command on every node; a c10d rendezvous on the first one):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 \\
        --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id=$JOB_ID \\
        --max-restarts=3 train.py --model vit_base --data-path /imagenet --resume auto
Continue an interrupted run / fine-tune at another resolution / at several (one per step):
    torchrun ... train.py ... --output-dir out/run1 --resume auto
    torchrun ... train.py --model vit_base --data-path /imagenet --finetune out/b192/best.pth \\
        --img-size 224 --epochs 20
    torchrun ... train.py --model vit_small --data-path /imagenet --finetune PATH \\
        --img-size 224 --train-resolutions 160 224 288 --epochs 10

Where things live: the built-in data (glyphs, shapes: scene generation, rendering, the cache of
validation images) in builtin_data.py; folder data, the recipes' transforms and the samplers in
data.py; the fault handling (errors and exit statuses, atomic writes, checkpoints and their
digests, the random states they hold, recovery checkpoints, --resume auto, stop signals, the
save-error policy) in recovery.py; the process group and its collectives in distributed.py. This
file, top-down: the recipes; model, optimizer (LAMB, AdamW) and schedule; the training loop
(train_one_epoch, evaluate); main, whose epoch loop drives it; then what main builds on: the
configuration (flags, limits, resolve_config), seeds, the evaluation across test resolutions.

Recipes (`--recipe`, chosen from --model and --data-path when absent; every flag overrides them):
  deit3  vit_* on folders: LAMB, BCE loss, 3-Augment, repeated augmentation x3 (DeiT-III, as
         the paper trained its ViTs).
  swin   swin_* on folders: AdamW, RandAugment, mixup/cutmix, label smoothing, random erasing.
  demo   no --data-path: built-in data (`--data glyphs`, the default: seven-segment digits
         whose class is the arrangement of their strokes, seen through random windows in
         training; `--data shapes`: the direction of one object from another) and a small ViT,
         32 epochs (the length its APE baseline needs on glyphs).
The peak learning rate of a recipe scales linearly with the total batch (printed at start);
`--lr` sets it directly. The run ends with the accuracy table over `--eval-resolutions`.

Outputs in --output-dir: config.json, checkpoint.pth (every epoch), best.pth, log.jsonl,
resolutions.json, the newest two recovery checkpoints recovery_e{E}_i{I}.pth (after E epochs
and I images of the next; --save-every-steps N adds one every N steps), and run.lock, held by
the run that uses the folder (a second run there ends with exit status 2). Checkpoints are
`{'model', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'args', ...}` and load with
torch.load(..., weights_only=True); every file is written to a temporary name and renamed.

Long runs (README, "Long runs on a cluster"): --resume auto continues from the newest sound
checkpoint (a damaged one is skipped with a warning), bit-identical on the same world size (on
CPU; on CUDA with --deterministic), and is implied after a torchrun restart (--max-restarts).
SIGTERM or SIGUSR1, to torchrun or to every process of the job (loader workers ignore them),
stops every rank after the same step, saves, and exits; so does a torchrun worker whose torchrun
has died. Exit status: 0
done, 1 diverged (or a crash), 2 bad input or an output folder another run holds, 74 a
checkpoint or log could not be written (--on-save-error warn trains on instead), 75 stopped by a
signal (or torchrun gone) with the state saved: run the same command with --resume auto.
"""
import argparse
import contextlib
import datetime
import math
import os
import random
import sys
import time
import uuid
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

import rope_vit
import swin_rope
from builtin_data import BUILTIN_DATASETS, GLYPH_WINDOW_MIN_AREA
from augment import take_rows, to_model_input
from data import (EpochSampler, RepeatedAugSampler, SeededSamples, StopSafeLoader, _derived_seed,
                  build_batch_augment, build_eval_dataset, build_eval_loader, build_train_dataset)
from distributed import (all_reduce_max, all_reduce_sum, gather, init_distributed,
                         is_main_process, max_over_ranks, print0, rank_and_world)
from recovery import (Checkpointer, SaveFailed, StopSignals, Stopped, TrainingDiverged, UserError,
                      _log_records, _on_rank0, _prepare_output_dir, _save_atomic, _stop_message,
                      _sweep_stop_message, cli, cuda_rng_entry, find_resume, hold_output_dir,
                      read_checkpoint, recovery_files, resumes_from_output_dir, rng_state,
                      set_rng_state, unwrap_state_dict)


# ----------------------------------------------------------------------------------------------
# Recipes: the values the paper's runs used. None in the parser means "take the recipe's".

_VIT_SIZES = ('vit_tiny', 'vit_small', 'vit_base', 'vit_large')
_SWIN_SIZES = ('swin_tiny', 'swin_small', 'swin_base')

# save_every_steps, recovery checkpoints inside an epoch: 500 steps are 5-10 minutes of an 8-GPU
# ImageNet run at 0.6-1.2 s per step (an epoch is 625 steps for deit3, 1251 for swin), for one
# checkpoint write of seconds (< 1 % of the time); the demo's 20-second epochs need none.
RECIPES = {
    # DeiT-III (official ViT-S command of the paper; Touvron et al. 2022 for the rest).
    'deit3': dict(
        opt='lamb', lr=4e-3, lr_ref_batch=2048, weight_decay=0.03, epochs=400, warmup_epochs=5,
        warmup_lr=1e-6, min_lr=1e-5, loss='bce', smoothing=0.0, aug='three', color_jitter=0.3,
        repeated_aug=3, reprob=0.0, mixup=0.8, cutmix=1.0,
        # DeiT-III ran timm's Lamb, which clips the global gradient norm at 1.0 inside the step.
        clip_grad=1.0, eval_crop_ratio=1.0, batch_size=256, img_size=224, num_workers=8,
        drop_path={'tiny': 0.0, 'small': 0.0, 'base': 0.1, 'large': 0.4},
        # B and L pretrain at 192, then fine-tune 20 epochs at 224 (--finetune ... --img-size 224).
        img_size_by_size={'base': 192, 'large': 192}, save_every_steps=500),
    # Swin Transformer (Liu et al. 2021), as the paper trained its Swin models.
    'swin': dict(
        opt='adamw', lr=1e-3, lr_ref_batch=1024, weight_decay=0.05, epochs=300, warmup_epochs=20,
        warmup_lr=1e-6, min_lr=1e-5, loss='ce', smoothing=0.1, aug='randaug', color_jitter=0.0,
        repeated_aug=1, reprob=0.25, mixup=0.8, cutmix=1.0, clip_grad=5.0,
        eval_crop_ratio=224 / 256, batch_size=128, img_size=224, num_workers=8,
        drop_path={'tiny': 0.2, 'small': 0.3, 'base': 0.5}, img_size_by_size={},
        save_every_steps=500),
    # Built-in data on a laptop: a small ViT (8 x 8 patches at 32 px, head dim 32), no image
    # augmentation (glyphs bring their own random windows; a flip would turn 2 into 5, or change
    # the shapes' directions). Length from APE's validation curve on glyphs (seed 0, total batch
    # 128): 20 epochs end at 68.7 % top-1; 32 epochs end at 86.9 %, flat over the last 6 epochs
    # (85.3-87.3), so 32, for the baseline's sake (seed 0's RoPE runs pass 88 % by epoch 16).
    'demo': dict(
        opt='adamw', lr=2e-3, lr_ref_batch=128, weight_decay=0.05, epochs=32, warmup_epochs=1,
        warmup_lr=1e-6, min_lr=1e-5, loss='ce', smoothing=0.0, aug='none', color_jitter=0.0,
        repeated_aug=1, reprob=0.0, mixup=0.0, cutmix=0.0, clip_grad=1.0,
        eval_crop_ratio=1.0, batch_size=64, img_size=32, num_workers=0,
        drop_path={}, img_size_by_size={}, save_every_steps=0,
        vit_overrides=dict(patch_size=4, embed_dim=64, depth=4, num_heads=2, init_scale=0.1),
        builtin_train=8000, builtin_val=1000),
}
_RECIPE_KEYS = ('opt', 'weight_decay', 'epochs', 'warmup_epochs', 'warmup_lr', 'min_lr', 'loss',
                'smoothing', 'aug', 'color_jitter', 'repeated_aug', 'reprob', 'mixup', 'cutmix',
                'clip_grad', 'eval_crop_ratio', 'batch_size', 'num_workers', 'save_every_steps')


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def build_model(cfg):
    """The model of a resolved configuration (a checkpoint's `args`): create_model(name, **kw)."""
    module = model_module(cfg['model'])
    try:
        return module.create_model(cfg['model'], **cfg['model_kwargs'])
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build {cfg['model']}: {e}") from None


def param_groups(model, weight_decay):
    """Two groups: decay, and no decay for model.no_weight_decay() and every ndim <= 1 param."""
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, arXiv 1904.00962) as DeiT-III trains with it (timm's variant).

    Adam moments with bias correction give the update u = m_hat / (sqrt(v_hat) + eps), plus the
    decoupled weight decay wd * p. For a group with weight decay the update is rescaled per
    tensor by the trust ratio ||p|| / ||u|| (1 when either norm is 0); groups without weight
    decay (norms, biases, embeddings) take the plain Adam step.  p <- p - lr * ratio * u.
    """

    # Tensors per multi-tensor call, in elements: the two temporaries of a call (the update and
    # its denominator) then span at most ~2 x 64 MB in fp32 and are reused call after call. All
    # of ViT-B at once would allocate 2 x 344 MB per step, which a CPU allocator hands back to
    # the system and page-faults in again (measured: slower than the loop); ViT-B takes ~7 calls.
    CHUNK_ELEMENTS = 1 << 24

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One multi-tensor step per group (torch._foreach_*): the same arithmetic as a loop over
        the tensors, in the same order per element, but a few dozen operator calls per group
        instead of about fifteen per tensor; on a GPU each call is one fused kernel launch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state['step'] = torch.tensor(0.0)
                    state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not params:
                continue
            steps = [self.state[p]['step'] for p in params]
            torch._foreach_add_(steps, 1)
            # The counts live on the CPU (no device sync). They differ only where a tensor had no
            # gradient at some step: one batch per distinct count keeps each bias correction exact.
            by_step = {}
            for p, n in zip(params, torch.stack(steps).tolist()):
                by_step.setdefault(n, []).append(p)
            for step, ps in by_step.items():
                chunk, size = [], 0
                for p in ps:
                    chunk.append(p)
                    size += p.numel()
                    if size >= self.CHUNK_ELEMENTS:
                        self._update(chunk, group, step)
                        chunk, size = [], 0
                if chunk:
                    self._update(chunk, group, step)
        return loss

    def _update(self, params, group, step):
        beta1, beta2 = group['betas']
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]['exp_avg'] for p in params]
        exp_avg_sqs = [self.state[p]['exp_avg_sq'] for p in params]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, 1 - beta2 ** step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group['eps'])
        update = torch._foreach_div(exp_avgs, 1 - beta1 ** step)
        torch._foreach_div_(update, denom)
        del denom
        if group['weight_decay'] != 0:
            torch._foreach_add_(update, params, alpha=group['weight_decay'])
            w_norm = torch.stack(torch._foreach_norm(params))
            u_norm = torch.stack(torch._foreach_norm(update))
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                torch.ones_like(w_norm))
            torch._foreach_mul_(update, list(ratio.unbind()))
        torch._foreach_add_(params, update, alpha=-group['lr'])


def build_optimizer(model, cfg):
    groups = param_groups(model, cfg['weight_decay'])
    if cfg['opt'] == 'lamb':
        return Lamb(groups, lr=cfg['lr'], eps=cfg['opt_eps'])
    return torch.optim.AdamW(groups, lr=cfg['lr'], eps=cfg['opt_eps'])


def build_scheduler(optimizer, cfg, steps_per_epoch, done_steps=0):
    """Per step: linear warm-up from warmup_lr to lr, then cosine down to min_lr.

    done_steps > 0 starts the schedule there, from cfg['lr'] (a resume on another total batch,
    where the checkpoint's step count and learning rate do not apply)."""
    total = cfg['epochs'] * steps_per_epoch
    warmup = min(cfg['warmup_epochs'] * steps_per_epoch, total)
    lr, warmup_lr, min_lr = cfg['lr'], cfg['warmup_lr'], cfg['min_lr']

    def factor(step):
        if step < warmup:
            return (warmup_lr + (lr - warmup_lr) * step / warmup) / lr
        progress = (step - warmup) / max(1, total - warmup)
        return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / lr
    if done_steps:
        for group in optimizer.param_groups:
            group['initial_lr'] = lr
    # LambdaLR counts its own construction as a step: last_epoch = done_steps - 1 lands on it.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done_steps - 1)


# ----------------------------------------------------------------------------------------------
# Training and evaluation

def _amp_dtype(name):
    return {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[name]


def _autocast(device, amp_dtype):
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _loss(logits, soft_targets, cfg):
    """Soft-target cross-entropy (label smoothing folded in) or DeiT-III's binary cross-entropy."""
    num_classes = logits.shape[-1]
    logits = logits.float()
    if cfg['loss'] == 'bce':
        # DeiT-III: mixed targets are binarised (every class present in the mix counts as 1).
        targets = soft_targets.gt(0.0).float()
        if cfg['smoothing'] > 0:
            targets = targets * (1 - cfg['smoothing']) + cfg['smoothing'] / num_classes
        return F.binary_cross_entropy_with_logits(logits, targets)
    targets = soft_targets * (1 - cfg['smoothing']) + cfg['smoothing'] / num_classes
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def _mixup_cutmix(cfg, num_classes):
    choices = []
    if cfg['mixup'] > 0:
        choices.append(v2.MixUp(alpha=cfg['mixup'], num_classes=num_classes))
    if cfg['cutmix'] > 0:
        choices.append(v2.CutMix(alpha=cfg['cutmix'], num_classes=num_classes))
    return v2.RandomChoice(choices) if choices else None   # one of them per batch, p = 1/2 each


def rope_coord_augment(cfg, epoch, step, rank):
    """The RoPE coordinate augmentation of one training step, or None when it is off.

    (shift_x, shift_y, scale_x, scale_y) for the model's rope_coord_augment (augment_positions):
    shift ~ U(-a, a) per axis, scale = jitter per axis x one shared rescale, each log-uniform in
    [1/f, f] (DINOv3's RoPE shift / jitter / rescale). A pure function of (seed, epoch, step,
    rank): a resumed run draws the same values.
    """
    shift, jitter, rescale = cfg['rope_coord_shift'], cfg['rope_coord_jitter'], cfg['rope_coord_rescale']
    if shift == 0 and jitter == 1 and rescale == 1:
        return None
    gen = np.random.default_rng(_derived_seed(cfg['seed'], 0x60DE, epoch, step, rank))
    shifts = gen.uniform(-shift, shift, size=2)
    scales = np.exp(gen.uniform(-math.log(jitter), math.log(jitter), size=2)
                    + gen.uniform(-math.log(rescale), math.log(rescale)))
    return (float(shifts[0]), float(shifts[1]), float(scales[0]), float(scales[1]))


def train_step_resolution(cfg, epoch, step):
    """The resolution of one training step's batch under --train-resolutions, or None (all at
    --img-size). Drawn uniformly from the list; a pure function of (seed, epoch, step), so every
    rank renders (built-in data) or crops (folders) the step at one size, whatever its loader
    workers, and a resumed run draws the same sizes."""
    sizes = cfg.get('train_resolutions')
    if not sizes:
        return None
    gen = np.random.default_rng(_derived_seed(cfg['seed'], 0x512E, epoch, step))
    return int(sizes[int(gen.integers(len(sizes)))])


def agree_every(cfg, device):
    """Steps between the ranks' stop/divergence agreements (--agree-every; default: every step on
    a CPU, where reading a flag waits for nothing, and the print interval on a GPU, whose queue
    a read would drain). Every rank computes the same value, so all agree at the same steps."""
    if cfg.get('agree_every'):
        return cfg['agree_every']
    return 1 if torch.device(device).type == 'cpu' else cfg['print_freq']


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, epoch, device, amp_dtype,
                    num_classes, mix, start_step=0, sums=None, seconds=0.0, stop=None,
                    after_step=None, batch_augment=None):
    """One epoch; returns dict(loss, skipped, images, seconds). Raises TrainingDiverged.

    batch_augment: the device's half of the folder data's augmentation (data.build_batch_augment).

    A resumed epoch starts at `start_step` (the loader yields the rest) with the loss `sums` and
    `seconds` of the steps before. The ranks agree on `stop` (a StopSignals) and on the losses
    being finite in one collective after the step that ends every agree_every(cfg) steps, after
    the epoch's last step and before every --save-every-steps checkpoint; only there, and at
    the print interval, does the host wait for the device. A signal thus stops the run after
    at most agree_every - 1 further steps; a non-finite loss raises TrainingDiverged at that
    agreement, before anything is saved (the weights in memory may then be non-finite too).
    After each step after_step(steps_done, signum, sums, seconds) may save a checkpoint or end
    the run; signum is None after a step without an agreement, where nothing may be saved.
    """
    model.train()
    model_without_ddp = getattr(model, '_orig_mod', model)   # torch.compile's wrapper
    model_without_ddp = getattr(model_without_ddp, 'module', model_without_ddp)   # DDP's
    rank, _ = rank_and_world()
    steps = start_step + len(loader)
    every, save_every = agree_every(cfg, device), cfg.get('save_every_steps') or 0
    # loss * n, n, skipped: this rank's sums over the epoch
    loss_sum = (sums.to(device) if sums is not None
                else torch.zeros(3, dtype=torch.float64, device=device))
    # the first non-finite loss since the last agreement on this rank: (step, loss); step 0: none
    first_bad = torch.zeros(2, dtype=torch.float64, device=device)
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_n, window_start = 0, time.time()
    epoch_start = time.time() - seconds
    for step, (images, targets) in enumerate(loader, start=start_step):
        # The skip count from the targets as the loader gives them (on the CPU: no device sync).
        good = targets >= 0
        skipped = int((~good).sum())
        if skipped:   # undecodable files: drop them; keep one zero image so every rank steps
            images, targets = ((take_rows(images, good), targets[good]) if good.any()
                               else (take_rows(images, slice(0, 1)), None))
        # folder batches: their augmentation finished, converted and normalised on the device
        images = to_model_input(images, device, batch_augment)
        targets = None if targets is None else targets.to(device, non_blocking=True)
        soft = (F.one_hot(targets, num_classes).float() if targets is not None
                else torch.zeros(1, num_classes, device=device))
        if mix is not None and targets is not None:
            images, soft = mix(images, targets)
        augment = rope_coord_augment(cfg, epoch, step, rank)
        if augment is not None:
            model_without_ddp.rope_coord_augment = augment
        try:
            with _autocast(device, amp_dtype):
                logits = model(images)
        finally:
            if augment is not None:   # never left on for evaluation
                model_without_ddp.rope_coord_augment = None
        loss = _loss(logits, soft, cfg) * (0.0 if targets is None else 1.0)
        value = loss.detach().double()
        bad = ~torch.isfinite(value) & (first_bad[0] == 0)
        # new_full fills on the device: no host-to-device copy per step
        first_bad = torch.where(bad, torch.stack([value.new_full((), step + 1), value]), first_bad)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg['clip_grad']:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['clip_grad'])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        n = images.shape[0] if targets is not None else 0
        loss_sum += torch.stack([value * n, value.new_full((), n), value.new_full((), skipped)])
        window_loss += value * n
        window_n += n
        done_steps = step + 1
        signum = None
        # Every rank stops together: on a non-finite loss anywhere, or on a signal anywhere.
        if (done_steps % every == 0 or done_steps == steps
                or (save_every and (epoch * steps + done_steps) % save_every == 0)):
            flags = torch.stack([first_bad[0].clamp(max=1),
                                 value.new_full((), stop.signum if stop else 0)])
            diverged, signum = all_reduce_max(flags).tolist()
            if diverged:
                bad_step, bad_loss = first_bad.tolist()
                raise TrainingDiverged(
                    f'loss is {bad_loss if bad_step else loss.item()} at epoch {epoch + 1}, '
                    f'step {int(bad_step) or done_steps}/{steps}; stopped. '
                    f"The last good checkpoint is {os.path.join(cfg['output_dir'], 'checkpoint.pth')} "
                    '(if an epoch finished); try a lower --lr or --amp none')
            signum = int(signum)
        if done_steps % cfg['print_freq'] == 0 or done_steps == steps:
            elapsed = time.time() - window_start
            done = (done_steps - start_step) / (steps - start_step)
            rate = window_n * cfg['world_size'] / max(elapsed, 1e-9)
            eta = (time.time() - epoch_start - seconds) / done * (1 - done)
            print0(f"epoch {epoch + 1}/{cfg['epochs']}  step {done_steps}/{steps}  "
                   f"loss {window_loss.item() / max(window_n, 1):.4f}  "
                   f"lr {optimizer.param_groups[0]['lr']:.3e}  {rate:.0f} img/s  "
                   f"ETA {datetime.timedelta(seconds=round(eta))}")
            window_loss.zero_()
            window_n, window_start = 0, time.time()
        if after_step is not None:
            after_step(done_steps, signum, loss_sum, time.time() - epoch_start)
    all_reduce_sum(loss_sum)
    return dict(loss=(loss_sum[0] / loss_sum[1].clamp(min=1)).item(), images=int(loss_sum[1]),
                skipped=int(loss_sum[2]), seconds=time.time() - epoch_start)


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None):
    """Top-1 / top-5 (%), mean cross-entropy and count over the whole split, summed over ranks.

    The loader must give each rank a disjoint share (build_eval_loader does), so that no sample
    is counted twice or dropped. Targets < 0 (undecodable folder images) are skipped and
    counted in `skipped`.
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)   # top1, top5, loss, n, skipped
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        good = targets >= 0
        sums[4] += (~good).sum()
        if not good.all():
            images, targets = images[good], targets[good]
            if targets.numel() == 0:
                continue
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices                                  # (B, k)
        hits = top == targets[:, None]
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=-1).sum()
        sums[2] += F.cross_entropy(logits, targets, reduction='sum')
        sums[3] += targets.numel()
    all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return dict(top1=100.0 * sums[0].item() / n, top5=100.0 * sums[1].item() / n,
                loss=sums[2].item() / n, n=int(sums[3].item()), skipped=int(sums[4].item()))


# ----------------------------------------------------------------------------------------------
# The run: set-up, the epoch loop, the closing table across test resolutions

@contextlib.contextmanager
def deterministic_algorithms(enabled):
    """--deterministic: deterministic kernels only, for the duration of a run (the settings
    before are restored, for a caller that goes on in the same process).

    On CUDA, SDPA's backward and the bicubic resize's use atomics whose order varies from run to
    run; cuBLAS needs a fixed workspace to repeat its sums. With this, torch picks deterministic
    kernels or stops at the first operation that has none (its error names it). On CPU every
    kernel train.py uses is deterministic already."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    # Read when cuBLAS makes its handle: before this process's first matrix product on a GPU.
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2:]


def main(args):
    with deterministic_algorithms(args.deterministic):
        _main(args)


def _main(args):
    # 1. Validate everything before touching the disk or the process group.
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    cfg = resolve_config(args, world_size)
    if cfg['dataset'] in BUILTIN_DATASETS:
        cfg['num_classes'] = len(BUILTIN_DATASETS[cfg['dataset']].CLASSES)
    train_set = build_train_dataset(cfg)
    eval_set = build_eval_dataset(cfg, cfg['img_size'])
    if cfg['dataset'] == 'folder':
        if train_set.classes != eval_set.classes:
            raise UserError(f"train/ and val/ of {cfg['data_path']} have different class folders")
        cfg['num_classes'] = len(train_set.classes)
    if len(train_set) < cfg['total_batch']:
        raise UserError(f"the training set has {len(train_set)} images, fewer than one total "
                        f"batch ({cfg['batch_size']} per process x {world_size} processes)")
    cfg['model_kwargs']['num_classes'] = cfg['num_classes']
    _seed_everything(cfg['seed'], -1, 0)   # the same initial weights on every rank, every run
    model = build_model(cfg)
    cfg['pe'] = model.pe
    _check_resolution(model, cfg['img_size'], '--img-size')
    if rope_coord_augment(cfg, 0, 0, 0) is not None and 'rope' not in model.pe:
        raise UserError(f"--rope-coord-shift / -jitter / -rescale move RoPE positions; the {model.pe} "
                        'model has none')
    if cfg['eval_resolutions'] is None:
        cfg['eval_resolutions'] = list(default_resolutions(cfg))
    for r in cfg['eval_resolutions']:
        _check_resolution(model, r, '--eval-resolutions')
    for r in cfg['train_resolutions'] or ():
        _check_resolution(model, r, '--train-resolutions')
    if cfg['eval_batch_size'] is None:
        cfg['eval_batch_size'] = 2 * cfg['batch_size']
    if cfg['amp'] is None:
        cfg['amp'] = 'bf16' if torch.cuda.is_available() else 'none'

    def choose_resume():
        """The checkpoint this run continues from, checked against it; or the fine-tuning
        weights loaded: (Resume, the head keys dropped by fine-tuning or None)."""
        resume = find_resume(cfg)
        if resume.state is None:
            return resume, _load_finetune(model, cfg) if cfg['finetune'] else None
        stored = resume.state.get('args', {})
        for key in ('model', 'model_kwargs', 'dataset'):
            if stored.get(key) != cfg[key]:
                raise UserError(f'--resume {resume.path}: its {key} {stored.get(key)!r} differs '
                                f'from this run\'s {cfg[key]!r}')
        return resume, None
    # --resume PATH is read now, so that a wrong one writes nothing; the checkpoints that
    # --resume auto (or a torchrun restart) takes from the output folder are read once this run
    # holds the folder, when no other run can be writing them.
    from_folder = resumes_from_output_dir(cfg)
    if not from_folder:
        resume, dropped = choose_resume()

    # 2. Processes, output folder (this run's alone from here on), configuration.
    try:
        info = init_distributed(cfg['dist_timeout'])
    except ValueError as e:   # LOCAL_RANK without a GPU of its own
        raise UserError(str(e)) from None
    device = info.device
    hold_output_dir(cfg['output_dir'], device, cfg['wait_for_output_dir'])
    if from_folder:
        resume, dropped = choose_resume()
    state = resume.state
    amp_dtype = _amp_dtype(cfg['amp'])
    position = (state['epoch'], state.get('images', 0)) if state is not None else None
    chosen = gather((resume.path, position))
    if any(c != chosen[0] for c in chosen):
        raise UserError('the processes would resume from different checkpoints ('
                        + ', '.join(f'rank {r}: {c[0] or "none"}' for r, c in enumerate(chosen))
                        + '); every node must see the same --output-dir')
    new_run_id = gather(uuid.uuid4().hex)[0]
    cfg['run_id'] = resume.run_id if resume.continues else new_run_id
    cfg['torchrun_id'] = os.environ.get('TORCHELASTIC_RUN_ID')
    records = _log_records(cfg['output_dir'], state['epoch'] + 1) if state is not None else []
    error = _on_rank0(lambda: _prepare_output_dir(cfg, resume, records), device)
    if error:
        raise SaveFailed(error)
    print0('configuration:\n' + '\n'.join(f'  {k}: {v}' for k, v in sorted(cfg.items())))
    print0(cfg['lr_rule'])
    if cfg['finetune'] and state is None:
        print0(f"fine-tuning from {cfg['finetune']}"
               + (f" (dropped {', '.join(dropped)}: class count differs)" if dropped else ''))
    if is_main_process():
        for path, reason in resume.damaged:
            sys.stderr.write(f'warning: {path} is damaged ({reason}); resuming from '
                             f'{resume.path} instead (the damaged file is kept as '
                             f'{os.path.basename(path)}.damaged)\n')
    if resume.others:
        print0(f"note: {len(resume.others)} checkpoint(s) of an earlier run in "
               f"{cfg['output_dir']} are not continued, and this run's saves replace them "
               f"({', '.join(map(os.path.basename, resume.others))}); --resume PATH continues "
               'from one of them')

    # 3. Model, optimizer, data.
    model.to(device)
    model_without_ddp = model
    optimizer = build_optimizer(model_without_ddp, cfg)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if cfg['compile']:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg['amp'] == 'fp16')
    if cfg['repeated_aug'] > 1:
        order = RepeatedAugSampler(train_set, info.world_size, info.rank, cfg['repeated_aug'],
                                   seed=cfg['seed'])
    else:
        order = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                   shuffle=True, seed=cfg['seed'], drop_last=True)
    step_resolution = (None if not cfg.get('train_resolutions') else
                       lambda epoch, step: train_step_resolution(cfg, epoch, step))
    sampler = EpochSampler(order, cfg['seed'], info.rank, cfg['batch_size'], step_resolution)
    # Its own generator: creating the loader's iterator then draws nothing from torch's global
    # RNG, which a mid-epoch checkpoint restores as the interrupted run left it.
    loader_generator = torch.Generator()
    # Its workers leave SIGTERM / SIGUSR1 to this process (data.StopSafeLoader), as do the
    # evaluation loaders' (build_eval_loader).
    train_loader = StopSafeLoader(SeededSamples(train_set), batch_size=cfg['batch_size'],
                                  sampler=sampler, num_workers=cfg['num_workers'], drop_last=True,
                                  pin_memory=device.type == 'cuda', generator=loader_generator,
                                  # workers kept across epochs, not forked again for each one
                                  persistent_workers=cfg['num_workers'] > 0)
    steps_per_epoch = len(order) // cfg['batch_size']
    eval_loader = build_eval_loader(eval_set, cfg['eval_batch_size'], cfg['num_workers'],
                                    pin_memory=device.type == 'cuda', persistent=True)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    mix = _mixup_cutmix(cfg, cfg['num_classes'])
    batch_augment = build_batch_augment(cfg)
    print0(f"{cfg['model']} ({model_without_ddp.pe}): "
           f'{sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.2f} M parameters; '
           f"{len(train_set)} training / {len(eval_set)} validation images; "
           f"{info.world_size} process(es) on {device.type}; {steps_per_epoch} steps per epoch")

    start_epoch, start_step, best_top1 = 0, 0, -1.0
    sums, seconds, rng = None, 0.0, None
    if state is not None:
        model_without_ddp.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        start_epoch, best_top1 = state['epoch'] + 1, state.get('best_top1', -1.0)
        stored = state['args']
        same_layout = (stored.get('world_size') == info.world_size
                       and stored.get('batch_size') == cfg['batch_size']
                       and state.get('steps_per_epoch', steps_per_epoch) == steps_per_epoch)
        # `images` counts all ranks' samples, so another world size resumes at the same point.
        start_step = min(state.get('images', 0) // cfg['total_batch'], steps_per_epoch - 1)
        if same_layout:
            scheduler.load_state_dict(state['lr_scheduler'])
            rng = state['rng'][info.rank]
            # A CUDA random state that does not map onto this rank's device: every rank stops
            # alike, before training, rather than one alone while the others wait for it.
            problem = None
            if rng.get('cuda') and device.type == 'cuda':
                try:
                    cuda_rng_entry(rng['cuda'], device)
                except UserError as e:
                    problem = f'--resume {resume.path}: rank {info.rank}: {e}'
            problems = [p for p in gather(problem) if p]
            if problems:
                raise UserError(problems[0])
            if start_step:
                sums = state['epoch_sums'][info.rank]
                seconds = state.get('epoch_seconds', 0.0)
        else:
            done = start_epoch * steps_per_epoch + start_step
            scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, done_steps=done)
            print0(f"note: the checkpoint was written by {stored.get('world_size')} process(es) x "
                   f"batch {stored.get('batch_size')}, this run has {info.world_size} x "
                   f"{cfg['batch_size']}: the schedule goes on from step {done} of "
                   f"{cfg['epochs'] * steps_per_epoch} at lr {cfg['lr']:.4g}; random states are "
                   'drawn afresh (the result differs from an uninterrupted run)')
        how = ('after a torchrun restart (auto implied)' if resume.restart
               else f"(--resume {cfg['resume']})")
        print0(f'resumed from {resume.path} {how}: epoch {start_epoch + 1}/{cfg["epochs"]}, '
               f'step {start_step}/{steps_per_epoch}')
    elif cfg['resume'] == 'auto' or resume.restart:
        print0(f"--resume auto: no checkpoint of this run in {cfg['output_dir']}, starting from "
               'scratch')
    # The checkpoint resumed from stays as the second newest until a second save.
    ours = [p for p in recovery_files(cfg['output_dir'])
            if resume.path and os.path.samefile(p, resume.path)]
    checkpointer = Checkpointer(cfg, device, ours[0] if ours else None, records)

    def state_at(epoch, steps_done, sums=None, seconds=0.0, val=None):
        """The training state after `steps_done` steps of `epoch` (all of them: its end)."""
        complete = steps_done == steps_per_epoch
        per_rank = gather({'rng': rng_state(),
                           'sums': None if sums is None else sums.detach().cpu().clone()})
        state = {'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                 'lr_scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(),
                 'epoch': epoch if complete else epoch - 1,   # the last complete epoch
                 'images': 0 if complete else steps_done * cfg['total_batch'],
                 'steps_per_epoch': steps_per_epoch, 'args': cfg, 'best_top1': best_top1,
                 'rng': [r['rng'] for r in per_rank]}
        if complete:
            state['val'] = val
        else:
            state['epoch_sums'] = [r['sums'] for r in per_rank]
            state['epoch_seconds'] = seconds
        return state

    # 4. Train.
    run_start = time.time()
    with StopSignals() as stop:
        for epoch in range(start_epoch, cfg['epochs']):
            first_step = start_step if epoch == start_epoch else 0
            _seed_everything(cfg['seed'], epoch, info.rank)
            if first_step and rng is not None:
                # where the interrupted run was inside this epoch
                print0(f'random states restored (rank 0): {set_rng_state(rng, device)}')
            loader_generator.manual_seed(_derived_seed(cfg['seed'], epoch, info.rank, 2))
            sampler.set_epoch(epoch, first_step * cfg['batch_size'])   # the dataset's epoch too

            def after_step(steps_done, signum, sums, seconds, epoch=epoch):
                if steps_done == steps_per_epoch:
                    return   # the epoch's own checkpoint follows its evaluation
                every = cfg['save_every_steps']
                due = every and (epoch * steps_per_epoch + steps_done) % every == 0
                if signum is None:   # no agreement after this step: no decision, no save
                    assert not due, 'train_one_epoch agrees before every save'
                    return
                if signum or due:
                    start = time.time()
                    path = checkpointer.save(state_at(epoch, steps_done, sums, seconds))
                    if path:
                        print0(f'saved {os.path.basename(path)} ({time.time() - start:.1f} s)')
                    if signum:
                        raise Stopped(_stop_message(signum, epoch, steps_done, steps_per_epoch,
                                                    cfg, path))

            train_stats = train_one_epoch(
                model, train_loader, optimizer, scheduler, scaler, cfg, epoch, device, amp_dtype,
                cfg['num_classes'], mix, start_step=first_step, sums=sums, seconds=seconds,
                stop=stop, after_step=after_step, batch_augment=batch_augment)
            sums, seconds = None, 0.0
            val = evaluate(model_without_ddp, eval_loader, device, amp_dtype)
            improved = val['top1'] > best_top1
            best_top1 = max(best_top1, val['top1'])
            skipped = train_stats['skipped'] + val['skipped']
            print0(f"epoch {epoch + 1}/{cfg['epochs']} done in {train_stats['seconds']:.0f}s: "
                   f"train loss {train_stats['loss']:.4f}  val top-1 {val['top1']:.2f}  "
                   f"top-5 {val['top5']:.2f}  loss {val['loss']:.4f}  (best {best_top1:.2f})"
                   + (f'  skipped {skipped} undecodable images' if skipped else ''))
            record = dict(epoch=epoch + 1, train_loss=train_stats['loss'],
                          lr=optimizer.param_groups[0]['lr'], val_top1=val['top1'],
                          val_top5=val['top5'], val_loss=val['loss'],
                          seconds=train_stats['seconds'], skipped=skipped)
            signum = int(max_over_ranks([stop.signum], device)[0])
            path = checkpointer.save(state_at(epoch, steps_per_epoch, val=val), epoch_end=True,
                                     improved=improved, record=record)
            if signum:
                raise Stopped(_stop_message(signum, epoch, steps_per_epoch, steps_per_epoch,
                                            cfg, path))
        print0(f'training took {datetime.timedelta(seconds=round(time.time() - run_start))}')

        # 5. The paper's experiment: accuracy across test resolutions. A signal stops the run
        # after the resolution in progress (exit status 75); training is complete and saved,
        # and --resume auto redoes only this part.
        # RoPE models twice on the same weights: positions extrapolated (the paper's protocol)
        # and interpolated to the training grid (eval_multires.py --rope-positions compares all
        # policies).
        label = config_label(cfg)
        policies = CLOSING_ROPE_POSITIONS if 'rope' in model_without_ddp.pe else (None,)
        by_policy = {}
        for policy in policies:
            if policy is not None:
                model_without_ddp.rope_positions = policy
            by_policy[policy] = []
            for resolution in cfg['eval_resolutions']:
                by_policy[policy] += evaluate_resolutions(
                    model_without_ddp, cfg, [resolution], cfg['eval_batch_size'], device,
                    amp_dtype=amp_dtype, progress=is_main_process(),
                    num_workers=cfg['num_workers'],
                    label=label if policy is None else f'{label} {policy}')
                # Each rank's share of a resolution may differ by a batch: the ranks agree on
                # a signal between resolutions, where they all are.
                signum = int(max_over_ranks([stop.signum], device)[0])
                if signum:
                    raise Stopped(_sweep_stop_message(signum, cfg))
        if policies[0] is not None:
            model_without_ddp.rope_positions = policies[0]
        print0(format_table({label if policy is None else f'{label} {policy}': rows
                             for policy, rows in by_policy.items()}, cfg['img_size']))
        summary = {'label': label, 'train_resolution': cfg['img_size'],
                   'results': by_policy[policies[0]]}
        if policies[0] is not None:
            summary['results_by_rope_positions'] = by_policy
        error = _on_rank0(lambda: _save_atomic(
            summary, os.path.join(cfg['output_dir'], 'resolutions.json')), device)
        if error:
            checkpointer.failed(error)


def _check_resolution(model, r, what):
    try:
        model.check_img_size(r, r)
    except ValueError as e:
        raise UserError(f'{what} {r}: {e}') from None


def _first_names(keys, limit=10):
    if not keys:
        return 'none'
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _load_finetune(model, cfg):
    """Weights from --finetune: the head is dropped when its shape differs (new class count);
    the model file's load_checkpoint resizes APE / RPB; any other mismatch is an error."""
    state = unwrap_state_dict(read_checkpoint(cfg['finetune']))
    own = model.state_dict()
    dropped = [k for k in list(state) if k.startswith('head.') and k in own
               and state[k].shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in dropped}
    try:
        result = model_module(cfg['model']).load_checkpoint(model, state, strict=False)
    except ValueError as e:
        raise UserError(f"--finetune {cfg['finetune']}: {e}") from None
    missing = [k for k in result.missing_keys if not k.startswith('head.')]
    if missing or result.unexpected_keys:
        raise UserError(f"--finetune {cfg['finetune']} does not fit {cfg['model']}: "
                        f'missing {_first_names(missing)}; '
                        f'unexpected {_first_names(result.unexpected_keys)}')
    return dropped


# ----------------------------------------------------------------------------------------------
# Configuration: the flags, their valid ranges, the recipe filled in

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults; a None default means "the recipe's" and its help says so."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser():
    p = argparse.ArgumentParser(
        'train.py', description='Train RoPE-ViT / Swin-RoPE (see the module docstring).',
        formatter_class=HelpFormatter)
    R = '(default: the recipe\'s)'
    p.add_argument('--model', default=None,
                   help='size name (vit_tiny|small|base|large, swin_tiny|small|base) or a '
                        'published name (default: vit_small with --data-path, else a small '
                        'vit_tiny: patch 4, width 96, depth 4)')
    p.add_argument('--pe', default=None, help='position embedding; ViT: ape, rope_axial, '
                   'rope_mixed, rope_axial_ape, rope_mixed_ape, none; Swin: rpb, rope_axial, '
                   'rope_mixed, rope_axial_rpb, rope_mixed_rpb, none (default: rope_mixed)')
    p.add_argument('--data-path', default=None,
                   help='DIR with train/<class>/* and val/<class>/*; absent: built-in data '
                        '(--data)')
    p.add_argument('--data', default=None, choices=tuple(BUILTIN_DATASETS),
                   help='built-in data when there is no --data-path: glyphs (default; '
                        'seven-segment digits on textured backgrounds, a miniature ImageNet) or '
                        'shapes (the direction of a square from a disk: the counter-example, '
                        'whose label is an offset that grows with the image)')
    p.add_argument('--recipe', default=None, choices=sorted(RECIPES),
                   help='default: demo without --data-path, swin for swin_*, deit3 otherwise')
    p.add_argument('--output-dir', default=None, help='default: output/<model>_<pe>')
    p.add_argument('--epochs', type=int, default=None, help=R)
    p.add_argument('--batch-size', type=int, default=None, help=f'per process {R}')
    p.add_argument('--lr', type=float, default=None,
                   help='peak learning rate, used as given (default: the recipe\'s, scaled '
                        'linearly with the total batch)')
    p.add_argument('--min-lr', type=float, default=None, help=R)
    p.add_argument('--warmup-lr', type=float, default=None, help=R)
    p.add_argument('--warmup-epochs', type=int, default=None, help=R)
    p.add_argument('--opt', default=None, choices=('lamb', 'adamw'), help=R)
    p.add_argument('--opt-eps', type=float, default=1e-8, help='optimizer epsilon')
    p.add_argument('--weight-decay', type=float, default=None, help=R)
    p.add_argument('--clip-grad', type=float, default=None, help=f'max grad norm, 0 = off {R}')
    p.add_argument('--loss', default=None, choices=('ce', 'bce'), help=R)
    p.add_argument('--smoothing', type=float, default=None, help=f'label smoothing {R}')
    p.add_argument('--aug', default=None, choices=('three', 'randaug', 'none'),
                   help=f'three = DeiT-III 3-Augment, randaug = RandAugment m9 {R}')
    p.add_argument('--color-jitter', type=float, default=None, help=R)
    p.add_argument('--repeated-aug', type=int, default=None,
                   help=f'copies of each image per epoch, 1 = off {R}')
    p.add_argument('--reprob', type=float, default=None, help=f'random erasing prob. {R}')
    p.add_argument('--mixup', type=float, default=None, help=f'mixup alpha, 0 = off {R}')
    p.add_argument('--cutmix', type=float, default=None, help=f'cutmix alpha, 0 = off {R}')
    p.add_argument('--drop-path', type=float, default=None, help=R)
    p.add_argument('--img-size', type=int, default=None, help=f'training resolution {R}')
    p.add_argument('--patch-size', type=int, default=None, help='ViT only (model default)')
    p.add_argument('--embed-dim', type=int, default=None, help='ViT only (model default)')
    p.add_argument('--depth', type=int, default=None, help='ViT only (model default)')
    p.add_argument('--num-heads', type=int, default=None, help='ViT only (model default)')
    p.add_argument('--global-pool', choices=('token', 'avg'), default=None,
                   help="ViT only: classify the class token (token, the model default) or the mean "
                        "of the patch tokens with no class token (avg)")
    p.add_argument('--eval-crop-ratio', type=float, default=None,
                   help='test-time crop ratio (1.0 ViT, 224/256 Swin)')
    p.add_argument('--eval-resolutions', type=int, nargs='+', default=None,
                   help='final sweep (default: the paper\'s list scaled to --img-size)')
    p.add_argument('--eval-batch-size', type=int, default=None, help='default: 2 x batch size')
    p.add_argument('--builtin-train', '--shapes-train', type=int, default=None,
                   help=f"built-in data: fresh training scenes per epoch (default "
                        f"{RECIPES['demo']['builtin_train']})")
    p.add_argument('--builtin-val', '--shapes-val', type=int, default=None,
                   help=f"built-in data: fixed validation scenes (default "
                        f"{RECIPES['demo']['builtin_val']})")
    p.add_argument('--builtin-seed', '--shapes-seed', type=int, default=0,
                   help='built-in data: scene seed')
    p.add_argument('--glyph-window-min-area', type=float, default=None,
                   help='glyphs data: smallest area fraction of the random square window a '
                        f'training view shows, 1 = the whole scene (default {GLYPH_WINDOW_MIN_AREA}, '
                        "RandomResizedCrop's)")
    p.add_argument('--train-resolutions', type=int, nargs='+', default=None,
                   help='train each step\'s batch at one of these resolutions, drawn per step '
                        '(the same on every rank): built-in scenes rendered at that size, folder '
                        'images through the recipe\'s crop to r x r; positions and APE follow the '
                        'grid as at test time. Default: every step at --img-size, which still '
                        'sets the model (its APE grid, RoPE training grid, Swin window)')
    p.add_argument('--resume', default=None,
                   help='auto: the newest sound checkpoint of this run in --output-dir (mid-epoch '
                        'or epoch end; damaged files are skipped with a warning; nothing there: '
                        'a fresh start), or a checkpoint path. After a torchrun restart auto '
                        'is implied')
    p.add_argument('--save-every-steps', type=int, default=None,
                   help='a recovery checkpoint every N training steps, 0 = at epoch ends only '
                        '(default: the recipe\'s; 500 for deit3 and swin, 0 for demo)')
    p.add_argument('--wait-for-output-dir', type=float, default=0.0, metavar='SECONDS',
                   help='another run holds --output-dir: wait up to SECONDS for it to end (a '
                        'requeued job whose predecessor is still saving), then take it; 0 = stop '
                        'at once with exit status 2')
    p.add_argument('--dist-timeout', type=float, default=1800.0, metavar='SECONDS',
                   help='how long a collective waits for the other ranks before the run fails '
                        '(the process group\'s timeout, NCCL and gloo alike). The longest waits '
                        'train.py allows: rank 0 waiting --wait-for-output-dir for the folder, and '
                        'a rank-0 checkpoint write (minutes for a large model on a slow file '
                        'system); it must exceed --wait-for-output-dir')
    p.add_argument('--on-save-error', default='stop', choices=('stop', 'warn'),
                   help='a checkpoint or log that cannot be written (disk full, read-only '
                        'folder): stop (exit status 74) or warn and train on')
    p.add_argument('--finetune', default=None,
                   help='start from these weights (published or ours); the head is dropped '
                        'when the class count differs, APE / RPB are resized')
    p.add_argument('--amp', default=None, choices=('none', 'bf16', 'fp16'),
                   help='autocast dtype (default: bf16 on CUDA, none on CPU)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--deterministic', action='store_true',
                   help='deterministic kernels only (torch.use_deterministic_algorithms; on '
                        'CUDA, what a bit-identical resume needs: docs/long-runs.md), slower on '
                        'GPUs; a kernel without a deterministic version stops the run. CPU runs '
                        'are deterministic without it')
    p.add_argument('--rope-coord-shift', type=float, default=0.0,
                   help='RoPE coordinate augmentation (DINOv3), per batch in training: shift '
                        'positions by U(-a, a) per axis, in units of half the grid; 0 = off')
    p.add_argument('--rope-coord-jitter', type=float, default=1.0,
                   help='... scale each axis by its own log-uniform factor in [1/f, f]; 1 = off')
    p.add_argument('--rope-coord-rescale', type=float, default=1.0,
                   help='... scale both axes by one log-uniform factor in [1/f, f] (DINOv3 '
                        'ViT-7B: 2); 1 = off')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--num-workers', type=int, default=None, help=f'loader workers {R}')
    p.add_argument('--print-freq', type=int, default=20, help='log a line every N steps')
    p.add_argument('--agree-every', type=int, default=None, metavar='K',
                   help='the ranks agree on a stop signal and on a finite loss every K steps (and '
                        'before each save); a signal stops the run within K steps (default: every '
                        'step on a CPU, --print-freq on a GPU)')
    return p


# Valid ranges of the numeric flags, checked in one place before anything is written

class Limit(NamedTuple):
    """The interval a numeric flag must lie in (None: unbounded; an open end is excluded).
    NaN and infinities never pass."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open
                                                            and value == self.high)

    def __str__(self):
        def number(x):
            return str(int(x)) if float(x).is_integer() else f'{x:g}'
        if self.high is None:
            if self.low == 0 and self.low_open:
                return 'positive'
            return f"{'>' if self.low_open else '>='} {number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{number(self.low)}, {number(self.high)}"
                f"{')' if self.high_open else ']'}")


POSITIVE = Limit(0, low_open=True)
NON_NEGATIVE = Limit(0)
# Seeds feed torch.Generator.manual_seed(seed + epoch), which takes at most a signed 64-bit value;
# 32 bits are the range every seeding API accepts.
SEED = Limit(0, 2 ** 32 - 1)

# Every int / float flag of train.py (a test checks that none is missing).
TRAIN_LIMITS = {
    'rope_coord_shift': NON_NEGATIVE, 'rope_coord_jitter': Limit(1), 'rope_coord_rescale': Limit(1),
    'epochs': POSITIVE, 'batch_size': POSITIVE, 'lr': POSITIVE, 'min_lr': NON_NEGATIVE,
    'warmup_lr': NON_NEGATIVE, 'warmup_epochs': NON_NEGATIVE, 'opt_eps': POSITIVE,
    'weight_decay': NON_NEGATIVE, 'clip_grad': NON_NEGATIVE,
    'smoothing': Limit(0, 1, high_open=True),        # 1 would leave no signal in the targets
    'color_jitter': NON_NEGATIVE, 'repeated_aug': Limit(1), 'reprob': Limit(0, 1),
    'mixup': NON_NEGATIVE, 'cutmix': NON_NEGATIVE,
    'drop_path': Limit(0, 1, high_open=True),        # 1 would drop every residual branch
    'img_size': POSITIVE, 'patch_size': POSITIVE, 'embed_dim': POSITIVE, 'depth': POSITIVE,
    'num_heads': POSITIVE, 'eval_crop_ratio': Limit(0, 1, low_open=True),
    'eval_resolutions': POSITIVE, 'eval_batch_size': POSITIVE, 'builtin_train': POSITIVE,
    'builtin_val': POSITIVE, 'builtin_seed': SEED, 'seed': SEED, 'num_workers': NON_NEGATIVE,
    'glyph_window_min_area': Limit(0, 1, low_open=True), 'train_resolutions': POSITIVE,
    'print_freq': POSITIVE, 'save_every_steps': NON_NEGATIVE, 'agree_every': POSITIVE,
    # The other ranks wait meanwhile in a collective: --dist-timeout must exceed it.
    'wait_for_output_dir': Limit(0, 1200), 'dist_timeout': POSITIVE,
}


def check_limits(values, limits):
    """UserError naming the first flag whose value lies outside its Limit. `values` maps argparse
    destinations to values (vars(args) or a resolved configuration); None means "not given" and
    passes; a list is checked item by item."""
    for key, limit in limits.items():
        value = values.get(key)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and not limit.admits(item):
                raise UserError(f'--{key.replace("_", "-")} must be {limit}, got {item}')


# The recipe filled in: one plain dict of every setting (a checkpoint's `args`)

def _size_of(model_name):
    for size in ('tiny', 'small', 'base', 'large'):
        if size in model_name:
            return size
    return None


def model_module(model_name):
    """rope_vit or swin_rope, whichever knows the name; UserError listing both otherwise."""
    if model_name in swin_rope.list_models():
        return swin_rope
    if model_name in rope_vit.list_models():
        return rope_vit
    raise UserError(f'unknown model {model_name!r}; valid: '
                    + ', '.join(rope_vit.list_models() + swin_rope.list_models()))


def resolve_config(args, world_size):
    """Fill every None flag from the recipe; returns the plain-dict configuration (`args`)."""
    model_name = args.model or ('vit_tiny' if args.data_path is None else 'vit_small')
    module = model_module(model_name)
    is_swin = module is swin_rope
    recipe_name = args.recipe or ('demo' if args.data_path is None else
                                  'swin' if is_swin else 'deit3')
    if recipe_name not in RECIPES:
        raise UserError(f'unknown recipe {recipe_name!r}; valid: {", ".join(RECIPES)}')
    recipe = RECIPES[recipe_name]
    cfg = {k: v for k, v in vars(args).items()}
    cfg['model'] = model_name
    for key in _RECIPE_KEYS:
        if cfg[key] is None:
            cfg[key] = recipe[key]
    cfg['recipe'] = recipe_name
    size = _size_of(model_name)
    if cfg['drop_path'] is None:
        cfg['drop_path'] = recipe['drop_path'].get(size, 0.0)
    if cfg['img_size'] is None:
        cfg['img_size'] = recipe['img_size_by_size'].get(size, recipe['img_size'])
    if args.data_path is None:
        cfg['dataset'] = args.data or next(iter(BUILTIN_DATASETS))
    elif args.data is not None:
        raise UserError(f'--data {args.data} names built-in data and --data-path '
                        f'{args.data_path} a folder: give one of them')
    else:
        cfg['dataset'] = 'folder'
    if cfg['dataset'] == 'glyphs':
        if cfg['glyph_window_min_area'] is None:
            cfg['glyph_window_min_area'] = GLYPH_WINDOW_MIN_AREA
    elif cfg['glyph_window_min_area'] is not None:
        raise UserError(f"--glyph-window-min-area applies to the glyphs data only, not to "
                        f"{cfg['dataset']}")
    if cfg['dataset'] in BUILTIN_DATASETS:
        for key in ('builtin_train', 'builtin_val'):
            if cfg[key] is None:
                cfg[key] = RECIPES['demo'][key]
        if cfg['aug'] != 'none':
            why = ('would change the directions the shapes labels describe' if
                   cfg['dataset'] == 'shapes' else 'does not apply to glyphs, whose training '
                   'views are random windows rendered with each scene (a flip would turn 2 into '
                   '5)')
            raise UserError(f"--aug {cfg['aug']} {why}; use --aug none with the built-in data")

    check_limits(cfg, TRAIN_LIMITS)   # the user's values and the recipe's alike
    if cfg['dist_timeout'] <= cfg['wait_for_output_dir']:
        raise UserError(f"--dist-timeout {cfg['dist_timeout']:g} must exceed --wait-for-output-dir "
                        f"{cfg['wait_for_output_dir']:g}: the other ranks wait in a collective "
                        'while rank 0 waits for the folder, and a rank-0 checkpoint write follows')

    total_batch = cfg['batch_size'] * world_size
    cfg['world_size'] = world_size
    cfg['total_batch'] = total_batch
    if cfg['lr'] is None:
        cfg['lr'] = recipe['lr'] * total_batch / recipe['lr_ref_batch']
        cfg['lr_rule'] = (f"lr = {recipe['lr']:g} x total batch {total_batch} / "
                          f"{recipe['lr_ref_batch']} = {cfg['lr']:.4g} (linear scaling; "
                          "--lr sets it directly)")
    else:
        cfg['lr_rule'] = f"lr = {cfg['lr']:g} from --lr (no scaling)"

    # The keyword arguments create_model gets besides the name (stored for eval_multires.py).
    kwargs = {}
    if model_name in _VIT_SIZES or model_name in _SWIN_SIZES:
        kwargs['pe'] = cfg['pe'] or 'rope_mixed'
    elif cfg['pe'] is not None:
        raise UserError(f'--pe does not apply to the published model {model_name!r}, which fixes '
                        f'its position embedding; use a size name ({", ".join(_VIT_SIZES)}, '
                        f'{", ".join(_SWIN_SIZES)}) to choose --pe')
    vit_flags = {k: cfg[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'global_pool')
                 if cfg[k] is not None}
    if is_swin:
        if vit_flags:
            raise UserError('--' + ', --'.join(k.replace('_', '-') for k in vit_flags)
                            + ' apply to ViT models only')
        # The official Swin convention: window = resolution / 32 (7 at 224, 6 at 192, ...).
        kwargs['window_size'] = max(1, cfg['img_size'] // 32)
    else:
        if recipe_name == 'demo' and model_name == 'vit_tiny':
            kwargs.update(recipe['vit_overrides'])
        kwargs.update(vit_flags)
    kwargs.update(num_classes=None, img_size=cfg['img_size'], drop_path_rate=cfg['drop_path'])
    cfg['model_kwargs'] = kwargs
    cfg['data_path'] = os.path.abspath(args.data_path) if args.data_path else None
    if cfg['output_dir'] is None:
        cfg['output_dir'] = os.path.join('output', f"{model_name}_{kwargs.get('pe', 'published')}")
    if os.path.exists(cfg['output_dir']) and not os.path.isdir(cfg['output_dir']):
        raise UserError(f"--output-dir {cfg['output_dir']} exists and is not a folder")
    return cfg


# ----------------------------------------------------------------------------------------------
# Seeds

def _seed_everything(seed, epoch, rank):
    """Every random draw of an epoch (augmentation, mixup, drop path, loader workers) is a function
    of (seed, epoch, rank): what makes a resumed run equal to an uninterrupted one. Epoch -1 seeds
    the initial weights."""
    s = int(np.random.SeedSequence([seed, epoch + 1, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# ----------------------------------------------------------------------------------------------
# Evaluation across test resolutions (the paper's experiment; eval_multires.py builds on it)

# The paper's test resolutions (Tables 0.A.1-0.A.3 for ViT, 0.A.4-0.A.6 for Swin), trained at 224.
PAPER_RESOLUTIONS = {
    'vit': (96, 144, 192, 224, 256, 320, 384, 512),
    'swin': (96, 128, 160, 192, 224, 256, 320, 384),
}
PAPER_TRAIN_RESOLUTION = 224

_SIZE_LABELS = {'tiny': 'Ti', 'small': 'S', 'base': 'B', 'large': 'L'}
_SWIN_SIZE_LABELS = {'tiny': 'T', 'small': 'S', 'base': 'B'}
_PE_LABELS = {
    'ape': 'APE', 'rpb': 'RPB', 'none': 'no PE',
    'rope_axial': 'RoPE-Axial', 'rope_mixed': 'RoPE-Mixed',
    'rope_axial_ape': 'APE + RoPE-Axial', 'rope_mixed_ape': 'APE + RoPE-Mixed',
    'rope_axial_rpb': 'RPB + RoPE-Axial', 'rope_mixed_rpb': 'RPB + RoPE-Mixed',
}


def model_family(name):
    """'swin' or 'vit' for a size name or a published name."""
    return 'swin' if 'swin' in name.lower() else 'vit'


def _train_resolution(cfg):
    """Training resolution as one int (the height for a non-square (H, W))."""
    size = cfg['img_size']
    return int(size[0]) if isinstance(size, (list, tuple)) else int(size)


def _size_step(cfg):
    """Granularity of allowed sizes: the patch size (ViT) or patch * 2^(stages-1) (Swin: 32)."""
    kwargs = cfg.get('model_kwargs') or {}
    if model_family(cfg['model']) == 'swin':
        patch = int(kwargs.get('patch_size', 4))
        stages = len(kwargs.get('depths', (2, 2, 6, 2)))
        return patch * 2 ** (stages - 1)
    patch = kwargs.get('patch_size', 16)
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def _scaled(cfg, paper_resolutions):
    """paper_resolutions x train_res / 224, each rounded to the nearest multiple of the size step
    (at least one step), duplicates dropped, in order."""
    train_res = _train_resolution(cfg)
    step = _size_step(cfg)
    out = []
    for r in paper_resolutions:
        s = max(step, int(round(r * train_res / PAPER_TRAIN_RESOLUTION / step)) * step)
        if s not in out:
            out.append(s)
    return out


def default_resolutions(cfg):
    """The paper's test resolutions for the model family, scaled to the training resolution.

    At a training resolution of 224 this is exactly the paper's list. Otherwise every entry is
    multiplied by train_res / 224 and rounded to the nearest multiple of the size step (patch size
    for ViT, 32 for Swin), at least one step; duplicates are dropped. The training resolution
    itself is always in the list (224 maps onto it).
    """
    out = _scaled(cfg, PAPER_RESOLUTIONS[model_family(cfg['model'])])
    return sorted(set(out) | {_train_resolution(cfg)})


def config_label(cfg):
    """Human label from a configuration, e.g. 'ViT-S RoPE-Mixed' or 'Swin-T RPB'."""
    name = cfg['model'].lower()
    family = model_family(name)
    sizes = _SWIN_SIZE_LABELS if family == 'swin' else _SIZE_LABELS
    size = next((short for word, short in sizes.items() if word in name), None)
    arch = ('Swin' if family == 'swin' else 'ViT') + (f'-{size}' if size else f' ({cfg["model"]})')
    kwargs = cfg.get('model_kwargs') or {}
    if family != 'swin' and any(k in kwargs for k in ('embed_dim', 'depth', 'num_heads')):
        # A size name with its architecture overridden (e.g. the demo model) is not that size.
        shape = [f'{kwargs[k]} {word}' for k, word in (('embed_dim', 'dim'), ('depth', 'layers'),
                                                        ('patch_size', 'px patches')) if k in kwargs]
        if kwargs.get('global_pool') == 'avg':
            shape.append('avg pool')
        arch = f"ViT ({', '.join(shape)})"
    elif kwargs.get('global_pool') == 'avg':
        arch += ' (avg pool)'
    pe = cfg.get('pe')
    return f'{arch} {_PE_LABELS.get(pe, pe)}' if pe else arch


class _Progress:
    """Iterates a loader and reports images done / total and ETA on stderr (main process only).

    Counts are this process's batches times the world size (every rank holds an equal shard, to
    within one image), capped at the total.
    """

    def __init__(self, loader, total, desc, world_size=1, enabled=True, interval_s=5.0):
        self.loader, self.total, self.desc = loader, total, desc
        self.world_size, self.enabled, self.interval_s = world_size, enabled, interval_s
        self.dataset = getattr(loader, 'dataset', None)
        self.batch_size = getattr(loader, 'batch_size', None)

    def __len__(self):
        return len(self.loader)

    def _report(self, done, start):
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (self.total - done) if done else float('nan')
        print(f'{self.desc}: {done}/{self.total} images ({100.0 * done / max(self.total, 1):.0f}%), '
              f'{elapsed:.1f}s elapsed, ETA {eta:.1f}s', file=sys.stderr, flush=True)

    def __iter__(self):
        start = last = time.perf_counter()
        done = 0
        for batch in self.loader:
            yield batch  # the consumer processes the batch before asking for the next one
            done = min(self.total, done + len(batch[0]) * self.world_size)
            now = time.perf_counter()
            if self.enabled and now - last >= self.interval_s and done < self.total:
                self._report(done, start)
                last = now
        if self.enabled:
            self._report(self.total, start)


CLOSING_ROPE_POSITIONS = ('extrapolate', 'interpolate')   # the closing table's RoPE policies


def evaluate_resolutions(model, cfg, resolutions, batch_size, device, amp_dtype=None,
                         data_path=None, crop_ratio=None, progress=True, num_workers=0,
                         label=None):
    """Top-1 / top-5 of `model` at each test resolution (the paper's multi-resolution test).

    The validation split of `cfg`'s data (or the folder `data_path`) is rendered / resized at
    each resolution by build_eval_dataset and scored by evaluate (exact under torchrun: sums are
    all-reduced, every image counted once). The model is not rebuilt.
    Returns [dict(resolution, top1, top5, loss, n)] in the order of `resolutions` (top-1/top-5 in
    %, loss = mean cross-entropy).
    """
    _, world_size = rank_and_world()
    rows = []
    model.eval()
    desc_base = label or config_label(cfg)
    for resolution in resolutions:
        model.check_img_size(resolution, resolution)
        dataset = build_eval_dataset(cfg, resolution, data_path=data_path, crop_ratio=crop_ratio)
        loader = _Progress(build_eval_loader(dataset, batch_size, num_workers,
                                             pin_memory=device.type == 'cuda'), len(dataset),
                           f'{desc_base} @ {resolution}', world_size,
                           enabled=progress and is_main_process())
        stats = evaluate(model, loader, device, amp_dtype=amp_dtype)
        rows.append({'resolution': int(resolution), 'top1': float(stats['top1']),
                     'top5': float(stats['top5']), 'loss': float(stats['loss']),
                     'n': int(stats['n'])})
    return rows


def format_table(results, train_res):
    """The paper's layout: rows = checkpoints, columns = test resolutions, top-1 (%).

    results: {label: [dict(resolution, top1, ...)]}. train_res: the training resolution (int,
    its column header is marked with '*'), or {label: int} when checkpoints differ (then that
    row's cell is marked), or None. A resolution missing from a row prints as '-'.
    """
    columns = sorted({row['resolution'] for rows in results.values() for row in rows})
    per_label = isinstance(train_res, dict)
    header = ['model'] + [f'{r}*' if (not per_label and r == train_res) else str(r)
                          for r in columns]
    lines = [header]
    runs = set()
    for label, rows in results.items():
        by_res = {row['resolution']: row for row in rows}
        own = train_res.get(label) if per_label else None
        cells = [label]
        for r in columns:
            row = by_res.get(r)
            if row is None:
                cells.append('-')
                continue
            cell = f"{row['top1']:.1f}"
            if 'top1_sd' in row:   # a mean over seeds (eval_multires.py --mean-over-seeds)
                runs.add(row['runs'])
                if row['runs'] > 1:   # one run has no spread to show
                    cell += f" ± {row['top1_sd']:.1f}"
            cells.append(cell + ('*' if r == own else ''))
        lines.append(cells)
    caption = 'top-1 accuracy (%); * = training resolution'
    several = sorted(n for n in runs if n > 1)
    if several:
        caption += ('; mean ± sample standard deviation over '
                    + '/'.join(str(n) for n in several) + ' runs (seeds)')
    if 1 in runs:
        caption += '; a row without ± is one run'
    return _markdown_table(lines, caption)


def _markdown_table(lines, caption):
    """Rows of cells (the first row is the header) -> an aligned Markdown table and a caption."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ['| ' + ' | '.join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                              for i, cell in enumerate(line)) + ' |' for line in lines]
    text.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    text.append(caption)
    return '\n'.join(text)


if __name__ == '__main__':
    cli(main, get_args_parser())
