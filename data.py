"""The data a training run sees: ImageNet-style folders with the recipes' transforms, the
built-in tasks behind the same two builders, and the samplers that make every rank's order and
every sample's augmentation a function of (seed, epoch, position), so a run resumed mid-epoch
sees exactly the images an uninterrupted one would.

The built-in tasks themselves (scene generation, rendering, the validation cache) are in
builtin_data.py; train.py builds its loaders from the functions here.

Adding a dataset: register its class under a name in builtin_data.BUILTIN_DATASETS, and
`train.py --data NAME` trains on it (eval_multires.py evaluates the checkpoints). The builders
here make it as cls(split, size, resolution, seed): split 'train' or 'val', size from
--builtin-train / --builtin-val, resolution the side of its square images, seed --builtin-seed.
What they read of it:
  CLASSES                 the class names; their count sizes the model's head
  dataset[i]              (image, label): image float (3, r, r), normalised with builtin_data's
                          IMAGENET_MEAN / IMAGENET_STD; label an int, < 0 for "skip this
                          sample" (counted and reported, not trained on)
  at_resolution(i, r)     sample i at side r (--train-resolutions, the test resolutions)
  set_epoch(e), optional  the training split's samples of epoch e, set in whichever process
                          draws them (a persistent loader worker included)
test_train.py's test_train_a_dataset_added_in_one_place_trains_and_evaluates does exactly this.
ImageNet-style folders need nothing: --data-path DIR (DIR/train/<class>/*, DIR/val/<class>/*).
"""
import itertools
import math
import os
import signal
import sys
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
import torchvision
from torchvision.transforms import v2

from augment import BatchAugment, WorkerAugment
from builtin_data import BUILTIN_DATASETS, IMAGENET_MEAN, IMAGENET_STD, builtin_setting
from distributed import rank_and_world
from recovery import UserError


# ----------------------------------------------------------------------------------------------
# Loaders whose workers leave the stop signals to the main process

# SIGTERM and SIGUSR1 stop a run (recovery.StopSignals), SIGINT interrupts it. A scheduler
# (SLURM's scancel, a preemption) sends them to every process of the job, and torchrun forwards
# them to each worker's whole process group: the loader workers get them too.
WORKER_IGNORED_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT')
                               if hasattr(signal, name))


class IgnoreStopSignals:
    """A loader's worker_init_fn: the worker leaves WORKER_IGNORED_SIGNALS to its main process,
    but for a SIGTERM from that main process itself; then it runs `chained` (the caller's own
    worker_init_fn, if any). A class, not a closure, so that it pickles into spawned workers.

    PyTorch's worker installs a SIGTERM handler of its own that ends the worker when the signal
    comes from anyone but its parent; the main process then fails at its next batch ("DataLoader
    worker (pid N) is killed by signal: Terminated") instead of stopping at a step boundary with
    a checkpoint. So the signals stay blocked in the worker (StopSafeLoader blocked them before
    the fork), and a thread takes them one by one with sigwaitinfo, which names the sender: a
    SIGTERM from the main process ends the worker at once, as torch's handler does (a main
    process that exits with a loader still open, after a crash, has its multiprocessing send
    its workers SIGTERM and wait for them: ignored, it would wait forever); the others are
    dropped. The worker still ends when its main process shuts the loader down, and
    torch's watchdog ends one whose main process has gone. Without sigwaitinfo (macOS) only
    SIGUSR1 and SIGINT are ignored and SIGTERM keeps torch's handler."""

    def __init__(self, chained=None):
        self.chained = chained

    def __call__(self, worker_id):
        if hasattr(signal, 'sigwaitinfo'):
            signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
            threading.Thread(target=_take_stop_signals, args=(os.getppid(),), daemon=True,
                             name='loader_worker_signals').start()
        else:
            ignored = tuple(s for s in WORKER_IGNORED_SIGNALS if s != signal.SIGTERM)
            for sig in ignored:
                signal.signal(sig, signal.SIG_IGN)
            if hasattr(signal, 'pthread_sigmask'):   # blocked by StopSafeLoader while forking
                signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)
        if self.chained is not None:
            self.chained(worker_id)


def _take_stop_signals(parent):
    """A loader worker's signal thread (IgnoreStopSignals): the end on its parent's SIGTERM."""
    while True:
        info = signal.sigwaitinfo(WORKER_IGNORED_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers leave the stop signals to the main process (IgnoreStopSignals,
    chained with any worker_init_fn given).

    The signals are blocked in the main thread while the workers are started: a forked worker
    inherits the blocked mask, so a signal that arrives between the fork and its worker_init_fn
    (where torch's own handler would end the worker) stays pending there until the worker's
    signal thread takes it; the main process gets its copy when the mask is restored."""

    def __init__(self, *args, worker_init_fn=None, **kwargs):
        super().__init__(*args, worker_init_fn=IgnoreStopSignals(worker_init_fn), **kwargs)

    def _get_iterator(self):
        if (self.num_workers == 0 or not hasattr(signal, 'pthread_sigmask')
                or threading.current_thread() is not threading.main_thread()):
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ----------------------------------------------------------------------------------------------
# Folder data (ImageNet layout)

class SkippingImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose undecodable images come back as (zeros, -1): skipped and counted later.

    Returning a placeholder instead of raising keeps the default collate and the step count of
    every rank intact; train_one_epoch and evaluate drop targets < 0 and report how many.
    """

    def __init__(self, root, transform, out_size, transforms_by_size=None):
        super().__init__(root, transform=transform)
        self.out_size = out_size
        # {r: the same pipeline producing r x r} for --train-resolutions; a plain dict, so the
        # dataset pickles into spawned loader workers as it is
        self.transforms_by_size = dict(transforms_by_size or {})

    def __getitem__(self, index):
        return self._load(index, self.transform, self.out_size)

    def at_resolution(self, index, resolution):
        """Image `index` through the pipeline made for `resolution` (one of --train-resolutions).

        The sampler hands each sample its step's resolution with its index (EpochSampler), so a
        loader worker needs no state of its own to know the size of the batch it fills."""
        if resolution not in self.transforms_by_size:
            raise KeyError(f'no training transform at {resolution} px (this dataset has '
                           f'{sorted(self.transforms_by_size) or "none"})')
        return self._load(index, self.transforms_by_size[resolution], resolution)

    def _load(self, index, transform, out_size):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for corrupt/truncated files
            sys.stderr.write(f'warning: skipping undecodable image {path}: {e}\n')
            # a placeholder that collates with the real samples (a transform's own, if it has one)
            placeholder = getattr(transform, 'placeholder', None)
            return (placeholder(out_size) if placeholder else torch.zeros(3, out_size, out_size)), -1
        return transform(image), target


def eval_transform(resolution, crop_ratio):
    """Test-time preprocessing at resolution r: shorter side to r / crop_ratio (bicubic), centre
    crop r, ImageNet mean / std (crop_ratio 1.0 for ViT as DeiT-III evaluates, 224 / 256 for Swin).

    Resize and crop act on the PIL image (PIL's bicubic filter), as the official DeiT-III and
    Swin evaluation code does, so published checkpoints see the same pixels as in the paper.
    """
    return v2.Compose([
        v2.Resize(int(math.floor(resolution / crop_ratio)),
                  interpolation=v2.InterpolationMode.BICUBIC),
        v2.CenterCrop(resolution),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(cfg, size=None):
    """The recipe's training pipeline (cfg['aug']) producing size x size (default --img-size):
    at every size the same random crop, flip and colour steps, only the crop's output differs.

    3-Augment and RandAugment: the loader worker's half (augment.WorkerAugment: decode, crop,
    flip, and the draws of the rest), whose Planned batches augment.BatchAugment finishes on the
    device. 'none': the evaluation pipeline at this size (normalised float32)."""
    size = cfg['img_size'] if size is None else size
    if cfg['aug'] not in ('three', 'randaug'):
        return eval_transform(size, cfg['eval_crop_ratio'])
    return WorkerAugment(cfg, size)


def build_batch_augment(cfg):
    """The device's half of the training augmentation (augment.BatchAugment), or None where the
    training set's batches come finished (built-in data, aug 'none')."""
    if cfg.get('dataset') in BUILTIN_DATASETS or cfg['aug'] not in ('three', 'randaug'):
        return None
    return BatchAugment(cfg)


def _image_folder(cfg, split, transform, out_size, transforms_by_size=None):
    root = os.path.join(cfg['data_path'], split)
    if not os.path.isdir(root):
        raise UserError(f"{cfg['data_path']} has no {split}/ folder (expected "
                        f"{split}/<class>/<images>)")
    try:
        return SkippingImageFolder(root, transform, out_size, transforms_by_size)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f'no images in {root}: {e}') from None


def build_train_dataset(cfg):
    if cfg['dataset'] in BUILTIN_DATASETS:
        options = ({'window_min_area': cfg['glyph_window_min_area']}
                   if cfg.get('glyph_window_min_area') is not None else {})
        return BUILTIN_DATASETS[cfg['dataset']]('train', builtin_setting(cfg, 'train'),
                                                cfg['img_size'], builtin_setting(cfg, 'seed'),
                                                **options)
    if not os.path.isdir(cfg['data_path']):
        raise UserError(f"data folder {cfg['data_path']} does not exist")
    # --train-resolutions: one pipeline per size, each sample drawn through its step's
    by_size = {int(r): train_transform(cfg, int(r)) for r in cfg.get('train_resolutions') or ()}
    return _image_folder(cfg, 'train', train_transform(cfg), cfg['img_size'], by_size)


def build_eval_dataset(cfg, resolution, data_path=None, crop_ratio=None):
    """The validation split at test resolution `resolution`.

    Folder data: shorter side resized to r / crop_ratio (bicubic), centre crop r, ImageNet
    mean/std; built-in data (`glyphs`, `shapes`): the same validation scenes rendered directly
    at r. `data_path` and `crop_ratio` default to the ones in `cfg`.
    """
    if cfg['dataset'] in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[cfg['dataset']]('val', builtin_setting(cfg, 'val'), resolution,
                                                builtin_setting(cfg, 'seed'))
    path = data_path or cfg['data_path']
    if path is None or not os.path.isdir(path):
        raise UserError(f'data folder {path} does not exist (pass --data-path)')
    crop_ratio = crop_ratio or cfg['eval_crop_ratio']
    return _image_folder(dict(cfg, data_path=path), 'val', eval_transform(resolution, crop_ratio),
                         resolution)


def build_eval_loader(dataset, batch_size, num_workers=0, pin_memory=False, persistent=False):
    """A loader over this rank's share (indices rank, rank + world, ...): no sample twice.

    pin_memory for a CUDA device (the copy then runs asynchronously); persistent keeps the
    workers between passes (the evaluation after every epoch would otherwise fork them anew)."""
    rank, world = rank_and_world()
    shard = Subset(dataset, range(rank, len(dataset), world))
    return StopSafeLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          pin_memory=pin_memory, persistent_workers=persistent and num_workers > 0)


# ----------------------------------------------------------------------------------------------
# Samplers: each rank's training order, resumable inside an epoch, and a seed for every sample

class RepeatedAugSampler(torch.utils.data.Sampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT): every image appears `repeats` times per
    epoch, each copy on another rank with its own augmentation; each rank still yields
    len(dataset) // world_size samples, so an epoch costs as much as without repetition.

    The order is a function of (seed, epoch) only: call set_epoch(epoch) before each epoch.
    """

    def __init__(self, dataset, num_replicas, rank, repeats=3, seed=0):
        self.dataset_len = len(dataset)
        self.num_replicas, self.rank, self.repeats, self.seed = num_replicas, rank, repeats, seed
        self.epoch = 0
        self.per_rank_total = math.ceil(self.dataset_len * repeats / num_replicas)
        self.num_selected = self.dataset_len // num_replicas

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_selected

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_len, generator=generator)
        repeated = order.repeat_interleave(self.repeats).tolist()   # a a a b b b ...
        total = self.per_rank_total * self.num_replicas
        repeated += repeated[:total - len(repeated)]                # pad to a multiple of world
        mine = repeated[self.rank:total:self.num_replicas]          # copies land on other ranks
        return iter(mine[:self.num_selected])


def derived_seed(*keys):
    """A 64-bit seed that is a pure function of the integers `keys` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


class SampleKey(NamedTuple):
    """What the training sampler hands SeededSamples for one sample: the dataset index, the seed
    of its augmentation, the epoch (for datasets with set_epoch, whose samples change with it)
    and, under --train-resolutions, its step's resolution (None: the dataset's own)."""
    index: int
    seed: int
    epoch: int
    resolution: Optional[int] = None


class EpochSampler(torch.utils.data.Sampler):
    """One rank's training order, resumable inside an epoch, with a seed for every sample.

    Wraps a DistributedSampler or RepeatedAugSampler. set_epoch(epoch, start) makes the next
    pass begin at position `start` of the epoch's order: the samples before it are neither loaded
    nor drawn. It yields a SampleKey per sample for SeededSamples; the seed is a function of
    (seed, epoch, rank, position), so a sample's augmentation does not depend on which loader
    worker draws it, how many workers there are, or where a run was resumed. The epoch travels
    in the key because persistent loader workers hold their own copy of the dataset, made when
    they started: a set_epoch called on the main process's copy would never reach them.
    """

    def __init__(self, sampler, seed, rank, batch_size=1, step_resolution=None):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.start = 0, 0
        # step_resolution(epoch, step): the resolution of that step's batch (several-resolution
        # training)
        self.batch_size, self.step_resolution = batch_size, step_resolution

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(self.sampler) - self.start

    def __iter__(self):
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank, 1]).generate_state(
            len(self.sampler), np.uint64) >> 1   # >> 1: torch.manual_seed takes int64
        keys = (SampleKey(index, seed, self.epoch,
                          None if self.step_resolution is None
                          else self.step_resolution(self.epoch, position // self.batch_size))
                for position, (index, seed) in enumerate(zip(iter(self.sampler), seeds.tolist())))
        return itertools.islice(keys, self.start, None)


class SeededSamples(Dataset):
    """dataset[(index, seed)] = dataset[index] drawn with torch's RNG seeded by `seed`; the
    caller's RNG is left as it was (in the main process it also drives drop path and mixup).
    torchvision's v2 transforms draw from torch's CPU RNG only, so only that one is seeded:
    torch.manual_seed would also seed every accelerator's generator, which on a CPU-only torch
    records a stack trace per call (about 1.7 ms a sample, as long as rendering a glyph scene)
    and on a GPU would leave the CUDA generator changed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed, epoch, resolution = SampleKey(*key)
        if hasattr(self.dataset, 'set_epoch'):   # here, in whichever process draws the sample
            self.dataset.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            if resolution is None:
                return self.dataset[index]
            return self.dataset.at_resolution(index, resolution)   # built-in data and folders alike
