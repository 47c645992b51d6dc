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

Where things live: this file is the training run, top-down: the training loop
(train_one_epoch, the step in the middle of it), main (set-up, the epoch loop, the closing
table), then the configuration (flags, limits, resolve_config) and seeds. The recipes, the model,
optimizer (LAMB, AdamW) and schedule they build are in recipes.py; evaluation and the sweep over
test resolutions in evaluation.py (shared with eval_multires.py); folder data, the samplers and
the dataset contract in data.py, the training augmentation's worker and device halves in
augment.py, the built-in data in builtin_data.py; checkpoints, resume, the output folder's lock
and stop signals in recovery.py; errors, exit statuses and the command-line wrapper in cli.py;
the process group in distributed.py.

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
import functools
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

import recovery
from augment import take_rows, to_model_input
from builtin_data import BUILTIN_DATASETS, GLYPH_WINDOW_MIN_AREA
from cli import (NON_NEGATIVE, POSITIVE, SEED, HelpFormatter, Limit, Stopped, TrainingDiverged,
                 UserError, check_limits, cli)
from data import (EpochSampler, RepeatedAugSampler, SeededSamples, StopSafeLoader,
                  build_batch_augment, build_eval_dataset, build_eval_loader, build_train_dataset,
                  derived_seed)
from distributed import (all_reduce_max, all_reduce_sum, init_distributed, is_main_process,
                         max_over_ranks, print0, rank_and_world)
from evaluation import (amp_autocast, amp_dtype_from_flag, config_label, default_resolutions,
                        evaluate, evaluate_resolutions, format_table)
from recipes import (RECIPE_KEYS, RECIPES, SWIN_SIZES, VIT_SIZES, build_model, build_optimizer,
                     build_scheduler, load_finetune, model_module, size_of)
from recovery import (Checkpointer, StopSignals, TrainingState, choose_resume, hold_output_dir,
                      on_rank0, open_output_dir, recovery_files, resumes_from_output_dir,
                      save_atomic, sweep_stop_message)
import swin_rope


# ----------------------------------------------------------------------------------------------
# The training loop

def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, epoch, device, amp_dtype,
                    num_classes, mix, start_step=0, sums=None, seconds=0.0, stop=None,
                    after_step=None, batch_augment=None):
    """One epoch; returns dict(loss, skipped, images, seconds). Raises TrainingDiverged.

    A resumed epoch starts at `start_step` (the loader yields the rest) with the loss `sums` and
    `seconds` of the steps before. The ranks agree on `stop` (a StopSignals) and on the losses
    being finite (ranks_agree) after the step that ends every agree_every(cfg) steps, after the
    epoch's last step and before every --save-every-steps checkpoint; only there, and at the
    print interval, does the host wait for the device. A signal thus stops the run after at
    most agree_every - 1 further steps; a non-finite loss raises TrainingDiverged at that
    agreement, before anything is saved (the weights in memory may then be non-finite too).
    After each step after_step(steps_done, signum, sums, seconds) may save a checkpoint or end
    the run; signum is None after a step without an agreement, where nothing may be saved.
    batch_augment: the device's half of the folder data's augmentation (data.build_batch_augment).
    """
    model.train()
    rank, _ = rank_and_world()
    steps = start_step + len(loader)
    tally = EpochTally(cfg, epoch, steps, start_step, sums, seconds, device)
    for step, (images, targets) in enumerate(loader, start=start_step):
        images, targets, skipped = drop_undecodable(images, targets)
        images = to_model_input(images, device, batch_augment)   # folder batches: finished here
        targets = None if targets is None else targets.to(device, non_blocking=True)
        images, soft = loss_targets(images, targets, mix, num_classes, device)

        with rope_coordinates_moved(model, rope_coord_augment(cfg, epoch, step, rank)):
            with amp_autocast(device, amp_dtype):
                logits = model(images)
        loss = training_loss(logits, soft, cfg) * (0.0 if targets is None else 1.0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg['clip_grad']:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['clip_grad'])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        tally.add(step, loss, 0 if targets is None else images.shape[0], skipped)
        signum = ranks_agree(tally, stop, step + 1) if tally.agreement_due(step + 1) else None
        if (step + 1) % cfg['print_freq'] == 0 or step + 1 == steps:
            tally.print_window(step + 1, optimizer.param_groups[0]['lr'])
        if after_step is not None:
            after_step(step + 1, signum, tally.sums, tally.seconds())
    return tally.epoch_result()


def drop_undecodable(images, targets):
    """The batch without its undecodable folder images (targets < 0), their count read on the
    CPU, before the copy (no device sync). A batch of nothing else keeps one zero image and no
    targets (None), so that every rank takes the step."""
    good = targets >= 0
    skipped = int((~good).sum())
    if not skipped:
        return images, targets, 0
    if good.any():
        return take_rows(images, good), targets[good], skipped
    return take_rows(images, slice(0, 1)), None, skipped


def loss_targets(images, targets, mix, num_classes, device):
    """One-hot targets, mixed with the images by mixup / cutmix (`mix`) when on; all zero for a
    batch without targets."""
    if targets is None:
        return images, torch.zeros(1, num_classes, device=device)
    if mix is not None:
        return mix(images, targets)
    return images, F.one_hot(targets, num_classes).float()


@contextlib.contextmanager
def rope_coordinates_moved(model, augment):
    """RoPE's coordinate augmentation of one step (rope_coord_augment; None: off) set on the model
    for the forward inside, and never left on for evaluation."""
    model = getattr(model, '_orig_mod', model)   # torch.compile's wrapper
    model = getattr(model, 'module', model)      # DDP's
    if augment is None:
        yield
        return
    model.rope_coord_augment = augment
    try:
        yield
    finally:
        model.rope_coord_augment = None


class EpochTally:
    """The running sums of an epoch on the device (loss x images, images, skipped images), the
    first non-finite loss since the last agreement (its step and value), and the print window."""

    def __init__(self, cfg, epoch, steps, start_step, sums, seconds, device):
        self.cfg, self.epoch, self.steps, self.start_step = cfg, epoch, steps, start_step
        self.every, self.save_every = agree_every(cfg, device), cfg.get('save_every_steps') or 0
        self.sums = (sums.to(device) if sums is not None
                     else torch.zeros(3, dtype=torch.float64, device=device))
        # the first non-finite loss since the last agreement: (step, loss); step 0: none
        self.first_bad = torch.zeros(2, dtype=torch.float64, device=device)
        self.window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.window_n, self.window_start = 0, time.time()
        self.seconds_before, self.epoch_start = seconds, time.time() - seconds
        self.loss = None

    def add(self, step, loss, n, skipped):
        self.loss = loss
        value = loss.detach().double()
        bad = ~torch.isfinite(value) & (self.first_bad[0] == 0)
        # new_full fills on the device: no host-to-device copy per step
        self.first_bad = torch.where(bad, torch.stack([value.new_full((), step + 1), value]),
                                     self.first_bad)
        self.sums += torch.stack([value * n, value.new_full((), n), value.new_full((), skipped)])
        self.window_loss += value * n
        self.window_n += n

    def agreement_due(self, steps_done):
        """After its last step, every --agree-every steps, and before every step's save."""
        save_due = self.save_every and (self.epoch * self.steps + steps_done) % self.save_every == 0
        return steps_done % self.every == 0 or steps_done == self.steps or save_due

    def seconds(self):
        return time.time() - self.epoch_start

    def print_window(self, steps_done, lr):
        elapsed = time.time() - self.window_start
        done = (steps_done - self.start_step) / (self.steps - self.start_step)
        rate = self.window_n * self.cfg['world_size'] / max(elapsed, 1e-9)
        eta = (self.seconds() - self.seconds_before) / done * (1 - done)
        print0(f"epoch {self.epoch + 1}/{self.cfg['epochs']}  step {steps_done}/{self.steps}  "
               f"loss {self.window_loss.item() / max(self.window_n, 1):.4f}  "
               f"lr {lr:.3e}  {rate:.0f} img/s  ETA {datetime.timedelta(seconds=round(eta))}")
        self.window_loss.zero_()
        self.window_n, self.window_start = 0, time.time()

    def epoch_result(self):
        all_reduce_sum(self.sums)
        return dict(loss=(self.sums[0] / self.sums[1].clamp(min=1)).item(),
                    images=int(self.sums[1]), skipped=int(self.sums[2]), seconds=self.seconds())


def ranks_agree(tally, stop, steps_done):
    """Every rank stops together: on a non-finite loss anywhere (TrainingDiverged, naming the
    first one) or on a signal anywhere (returns its number; 0 for none). One collective."""
    cfg, loss = tally.cfg, tally.loss
    flags = torch.stack([tally.first_bad[0].clamp(max=1),
                         loss.detach().double().new_full((), stop.signum if stop else 0)])
    diverged, signum = all_reduce_max(flags).tolist()
    if diverged:
        bad_step, bad_loss = tally.first_bad.tolist()
        raise TrainingDiverged(
            f'loss is {bad_loss if bad_step else loss.item()} at epoch {tally.epoch + 1}, '
            f'step {int(bad_step) or steps_done}/{tally.steps}; stopped. '
            f"The last good checkpoint is {os.path.join(cfg['output_dir'], 'checkpoint.pth')} "
            '(if an epoch finished); try a lower --lr or --amp none')
    return int(signum)


def training_loss(logits, soft_targets, cfg):
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


def mixup_cutmix(cfg, num_classes):
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
    gen = np.random.default_rng(derived_seed(cfg['seed'], 0x60DE, epoch, step, rank))
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
    gen = np.random.default_rng(derived_seed(cfg['seed'], 0x512E, epoch, step))
    return int(sizes[int(gen.integers(len(sizes)))])


def agree_every(cfg, device):
    """Steps between the ranks' stop/divergence agreements (--agree-every; default: every step on
    a CPU, where reading a flag waits for nothing, and the print interval on a GPU, whose queue
    a read would drain). Every rank computes the same value, so all agree at the same steps."""
    if cfg.get('agree_every'):
        return cfg['agree_every']
    return 1 if torch.device(device).type == 'cpu' else cfg['print_freq']


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


# ----------------------------------------------------------------------------------------------
# main: set-up, the epoch loop, the closing table

def main(args):
    with recovery.guarded_run(), deterministic_algorithms(args.deterministic):
        run_training(args)


def run_training(args):
    # 1. Validate everything before touching the disk or the process group.
    cfg, train_set, eval_set, model = configure(args, int(os.environ.get('WORLD_SIZE', '1')))
    # --resume PATH is read now, so that a wrong one writes nothing; the checkpoints that
    # --resume auto (or a torchrun restart) takes from the output folder are read once this run
    # holds the folder, when no other run can be writing them.
    from_folder = resumes_from_output_dir(cfg)
    if not from_folder:
        resume, dropped = resume_or_finetune(cfg, model)

    # 2. Processes, output folder (this run's alone from here on), configuration.
    try:
        info = init_distributed(cfg['dist_timeout'])
    except ValueError as e:   # LOCAL_RANK without a GPU of its own
        raise UserError(str(e)) from None
    device = info.device
    hold_output_dir(cfg['output_dir'], device, cfg['wait_for_output_dir'])
    if from_folder:
        resume, dropped = resume_or_finetune(cfg, model)
    records = open_output_dir(cfg, resume, device)
    announce(cfg, resume, dropped)

    # 3. Model, optimizer, data; the training state resumed.
    model.to(device)
    model_without_ddp = model
    optimizer = build_optimizer(model_without_ddp, cfg)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if cfg['compile']:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg['amp'] == 'fp16')
    train_loader, sampler, loader_generator, steps_per_epoch = build_train_loader(cfg, train_set,
                                                                                  info)
    eval_loader = build_eval_loader(eval_set, cfg['eval_batch_size'], cfg['num_workers'],
                                    pin_memory=device.type == 'cuda', persistent=True)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    mix, batch_augment = mixup_cutmix(cfg, cfg['num_classes']), build_batch_augment(cfg)
    amp_dtype = amp_dtype_from_flag(cfg['amp'])
    print0(f"{cfg['model']} ({model_without_ddp.pe}): "
           f'{sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.2f} M parameters; '
           f"{len(train_set)} training / {len(eval_set)} validation images; "
           f"{info.world_size} process(es) on {device.type}; {steps_per_epoch} steps per epoch")
    # The checkpoint resumed from stays as the second newest until a second save.
    ours = [p for p in recovery_files(cfg['output_dir'])
            if resume.path and os.path.samefile(p, resume.path)]
    checkpointer = Checkpointer(cfg, device, ours[0] if ours else None, records)
    state = TrainingState(cfg, model_without_ddp, optimizer, scheduler, scaler, steps_per_epoch,
                          device, info.rank, info.world_size, checkpointer)
    state.restore(resume, lambda done: build_scheduler(optimizer, cfg, steps_per_epoch, done))

    # 4. Train: an epoch, its evaluation, its checkpoint.
    run_start = time.time()
    with StopSignals() as stop:
        for epoch in range(state.start_epoch, cfg['epochs']):
            _seed_everything(cfg['seed'], epoch, info.rank)
            first_step = state.first_step(epoch)
            loader_generator.manual_seed(derived_seed(cfg['seed'], epoch, info.rank, 2))
            sampler.set_epoch(epoch, first_step * cfg['batch_size'])   # the dataset's epoch too
            sums, seconds = state.epoch_start_sums(epoch)
            train_stats = train_one_epoch(
                model, train_loader, optimizer, state.scheduler, scaler, cfg, epoch, device,
                amp_dtype, cfg['num_classes'], mix, start_step=first_step, sums=sums,
                seconds=seconds, stop=stop, batch_augment=batch_augment,
                after_step=functools.partial(state.save_inside_epoch, epoch))
            val = evaluate(model_without_ddp, eval_loader, device, amp_dtype)
            improved = val['top1'] > state.best_top1
            state.best_top1 = max(state.best_top1, val['top1'])
            skipped = train_stats['skipped'] + val['skipped']
            print0(f"epoch {epoch + 1}/{cfg['epochs']} done in {train_stats['seconds']:.0f}s: "
                   f"train loss {train_stats['loss']:.4f}  val top-1 {val['top1']:.2f}  "
                   f"top-5 {val['top5']:.2f}  loss {val['loss']:.4f}  (best {state.best_top1:.2f})"
                   + (f'  skipped {skipped} undecodable images' if skipped else ''))
            record = dict(epoch=epoch + 1, train_loss=train_stats['loss'],
                          lr=optimizer.param_groups[0]['lr'], val_top1=val['top1'],
                          val_top5=val['top5'], val_loss=val['loss'],
                          seconds=train_stats['seconds'], skipped=skipped)
            state.save_epoch(epoch, val, record, improved,
                             signum=int(max_over_ranks([stop.signum], device)[0]))
        print0(f'training took {datetime.timedelta(seconds=round(time.time() - run_start))}')

        # 5. The paper's experiment: accuracy across test resolutions.
        closing_table(model_without_ddp, cfg, device, amp_dtype, stop, checkpointer)


def configure(args, world_size):
    """The run's configuration, its training and validation sets and its model, every flag
    checked against them: UserError before anything is written."""
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
    return cfg, train_set, eval_set, model


def resume_or_finetune(cfg, model):
    """The checkpoint this run continues from (recovery.choose_resume); without one, the
    --finetune weights loaded into `model`. Returns (Resume, the head keys fine-tuning dropped
    or None)."""
    resume = choose_resume(cfg)
    dropped = load_finetune(model, cfg) if resume.state is None and cfg['finetune'] else None
    return resume, dropped


def announce(cfg, resume, dropped):
    """The configuration and what the run starts from, printed once (rank 0)."""
    print0('configuration:\n' + '\n'.join(f'  {k}: {v}' for k, v in sorted(cfg.items())))
    print0(cfg['lr_rule'])
    if cfg['finetune'] and resume.state is None:
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


def build_train_loader(cfg, train_set, info):
    """This rank's training loader, its sampler (set_epoch(epoch, start) before each epoch), the
    loader's own generator (seeded per epoch) and the steps of an epoch."""
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
    generator = torch.Generator()
    # Its workers leave SIGTERM / SIGUSR1 to this process (data.StopSafeLoader), as do the
    # evaluation loaders' (build_eval_loader).
    loader = StopSafeLoader(SeededSamples(train_set), batch_size=cfg['batch_size'],
                            sampler=sampler, num_workers=cfg['num_workers'], drop_last=True,
                            pin_memory=info.device.type == 'cuda', generator=generator,
                            # workers kept across epochs, not forked again for each one
                            persistent_workers=cfg['num_workers'] > 0)
    return loader, sampler, generator, len(order) // cfg['batch_size']


CLOSING_ROPE_POSITIONS = ('extrapolate', 'interpolate')   # the closing table's RoPE policies


def closing_table(model, cfg, device, amp_dtype, stop, checkpointer):
    """The paper's experiment at the end of a run: accuracy across --eval-resolutions, printed
    as its table and saved as resolutions.json. RoPE models twice on the same weights: positions
    extrapolated (the paper's protocol) and interpolated to the training grid (eval_multires.py
    --rope-positions compares all policies). A signal stops the run after the resolution in
    progress (exit status 75): training is complete and saved, and --resume auto redoes only
    this part."""
    label = config_label(cfg)
    policies = CLOSING_ROPE_POSITIONS if 'rope' in model.pe else (None,)
    by_policy = {}
    for policy in policies:
        if policy is not None:
            model.rope_positions = policy
        by_policy[policy] = []
        for resolution in cfg['eval_resolutions']:
            by_policy[policy] += evaluate_resolutions(
                model, cfg, [resolution], cfg['eval_batch_size'], device, amp_dtype=amp_dtype,
                progress=is_main_process(), num_workers=cfg['num_workers'],
                label=label if policy is None else f'{label} {policy}')
            # Each rank's share of a resolution may differ by a batch: the ranks agree on a
            # signal between resolutions, where they all are.
            signum = int(max_over_ranks([stop.signum], device)[0])
            if signum:
                raise Stopped(sweep_stop_message(signum, cfg))
    if policies[0] is not None:
        model.rope_positions = policies[0]
    print0(format_table({label if policy is None else f'{label} {policy}': rows
                         for policy, rows in by_policy.items()}, cfg['img_size']))
    summary = {'label': label, 'train_resolution': cfg['img_size'],
               'results': by_policy[policies[0]]}
    if policies[0] is not None:
        summary['results_by_rope_positions'] = by_policy
    error = on_rank0(lambda: save_atomic(
        summary, os.path.join(cfg['output_dir'], 'resolutions.json')), device)
    if error:
        checkpointer.failed(error)


# ----------------------------------------------------------------------------------------------
# Configuration: the flags, their valid ranges, the recipe filled in

def _check_resolution(model, r, what):
    try:
        model.check_img_size(r, r)
    except ValueError as e:
        raise UserError(f'{what} {r}: {e}') from None


def get_args_parser():
    p = argparse.ArgumentParser(
        'train.py', description='Train RoPE-ViT / Swin-RoPE (see the module docstring).',
        formatter_class=HelpFormatter)
    R = '(default: the recipe\'s)'
    demo = RECIPES['demo']['vit_overrides']   # the help states the demo model as the recipe sets it
    p.add_argument('--model', default=None,
                   help='size name (vit_tiny|small|base|large, swin_tiny|small|base) or a '
                        'published name (default: vit_small with --data-path, else a small '
                        f"vit_tiny: patch {demo['patch_size']}, width {demo['embed_dim']}, "
                        f"depth {demo['depth']}, {demo['num_heads']} heads)")
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
    for key in RECIPE_KEYS:
        if cfg[key] is None:
            cfg[key] = recipe[key]
    cfg['recipe'] = recipe_name
    size = size_of(model_name)
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
    if model_name in VIT_SIZES or model_name in SWIN_SIZES:
        kwargs['pe'] = cfg['pe'] or 'rope_mixed'
    elif cfg['pe'] is not None:
        raise UserError(f'--pe does not apply to the published model {model_name!r}, which fixes '
                        f'its position embedding; use a size name ({", ".join(VIT_SIZES)}, '
                        f'{", ".join(SWIN_SIZES)}) to choose --pe')
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


if __name__ == '__main__':
    cli(main, get_args_parser())
