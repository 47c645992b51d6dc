"""Input pipeline speed per worker core: each recipe's training pipeline and the evaluation one,
from file read to the tensor a loader worker hands over, on generated ImageNet-like JPEGs.

    python benchmark_loader.py --images 200 --reps 5

Pipelines, all timed in this one process, one thread, in interleaved repetitions (every
repetition runs every pipeline once over the same images, in a rotated order):
  * deit3 / swin / eval: data.py's pipelines as train.py builds them (--recipe deit3 / swin).
    The training ones are the loader worker's half (augment.WorkerAugment: decode, crop, flip
    and the draws of the rest, a uint8 crop and a plan); the device finishes the batch
    (augment.BatchAugment), which is not a worker's work. Its CPU time per image is reported
    apart (rows 'deit3 device half' / 'swin device half', batches of 64 on this CPU), for
    scale only: on a GPU it runs on the GPU.
  * deit3 before #30 / swin before #30: the pipelines data.py had before issue #30 (decode,
    the whole image to a uint8 tensor, crop and augment as tensors, float32 normalised output),
    kept here as the baseline of the same run.
  * deit3 official: the official DeiT-III 3-Augment, as its repository writes it: torchvision
    v1 transforms on the PIL image (crop, flip, one of grey / solarise / blur, colour jitter),
    then ToTensor and Normalize. eval official: its evaluation (resize, centre crop, ToTensor,
    Normalize).
Reported: images/s per core from the CPU time of this process (per pipeline: the median over
repetitions), the ratio to the peer per repetition (min-max) and of the medians, and the bytes
one sample and one batch (the recipe's batch size) carry through worker shared memory, pinning
and the host-to-device copy.

The images: --images JPEGs (quality 90) of smooth random colour fields with some noise, the
sizes drawn to resemble ImageNet's training set (most have a longer side of 500 px and a 4:3,
3:2 or 1:1 shape, upright or not; one in five is larger, up to 1200 px on the longer side).
Every pipeline reads the same files.
"""
import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as v1
from torchvision.transforms import v2

import augment
import data
import recipes
from builtin_data import IMAGENET_MEAN, IMAGENET_STD

# (width : height, weight): landscape 4:3 dominates ImageNet, then 3:2, square, upright ones
SHAPES = ((4 / 3, 0.45), (3 / 2, 0.15), (1.0, 0.1), (3 / 4, 0.15), (2 / 3, 0.1), (16 / 9, 0.05))


def make_images(folder, count, seed=0):
    """`count` ImageNet-like JPEGs in `folder`; returns their paths."""
    rng = np.random.default_rng(seed)
    ratios, weights = zip(*SHAPES)
    paths = []
    for i in range(count):
        longer = 500 if rng.random() < 0.8 else int(rng.integers(501, 1201))
        ratio = ratios[rng.choice(len(ratios), p=np.array(weights) / sum(weights))]
        w, h = (longer, round(longer / ratio)) if ratio >= 1 else (round(longer * ratio), longer)
        # a smooth colour field (an 8 x 8 grid upsampled) plus noise: JPEG-compressible like a photo
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f'{i:05d}.jpg')
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def before_30_train_transform(cfg, size):
    """The training pipeline data.py built before issue #30 (the baseline): the whole decoded
    image converted to a tensor, then the crop, flip and colour steps on uint8 tensors, then
    float32 normalised (and random erasing) in the worker."""
    steps = [v2.PILToTensor()]
    if cfg['aug'] == 'three':
        steps += [v2.RandomResizedCrop(size, scale=(0.08, 1.0),
                                       interpolation=v2.InterpolationMode.BICUBIC),
                  v2.RandomHorizontalFlip(),
                  v2.RandomChoice([v2.Grayscale(num_output_channels=3),
                                   v2.RandomSolarize(threshold=128, p=1.0),
                                   v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))])]
        if cfg['color_jitter'] > 0:
            steps.append(v2.ColorJitter(*(3 * [cfg['color_jitter']])))
    elif cfg['aug'] == 'randaug':
        steps += [v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC),
                  v2.RandomHorizontalFlip(),
                  v2.RandAugment(num_ops=2, magnitude=9,
                                 interpolation=v2.InterpolationMode.BILINEAR)]
        if cfg['color_jitter'] > 0:
            steps.append(v2.ColorJitter(*(3 * [cfg['color_jitter']])))
    else:
        raise ValueError(f"no augmentation pipeline for aug={cfg['aug']!r}")
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cfg['reprob'] > 0:
        steps.append(v2.RandomErasing(p=cfg['reprob'], value='random'))
    return v2.Compose(steps)


class _OfficialSolarize:
    def __call__(self, image):
        return ImageOps.solarize(image)


class _OfficialBlur:
    """PIL's Gaussian blur with a radius drawn uniformly in [0.1, 2.0], as DeiT-III's."""

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def official_deit3_transform(size, color_jitter=0.3):
    """The official DeiT-III 3-Augment training pipeline (torchvision v1 on PIL), the peer."""
    return v1.Compose([
        v1.RandomResizedCrop(size, scale=(0.08, 1.0),
                             interpolation=v1.InterpolationMode.BICUBIC),
        v1.RandomHorizontalFlip(),
        v1.RandomChoice([v1.Grayscale(num_output_channels=3), _OfficialSolarize(),
                         _OfficialBlur()]),
        v1.ColorJitter(color_jitter, color_jitter, color_jitter),
        v1.ToTensor(),
        v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def official_eval_transform(size, crop_ratio=1.0):
    return v1.Compose([
        v1.Resize(int(math.floor(size / crop_ratio)), interpolation=v1.InterpolationMode.BICUBIC),
        v1.CenterCrop(size), v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def recipe_cfg(recipe, img_size):
    return dict(recipes.RECIPES[recipe], img_size=img_size)


def pipelines(img_size):
    deit3, swin = recipe_cfg('deit3', img_size), recipe_cfg('swin', img_size)
    return {   # name: (transform, batch size of its recipe, peer name or None)
        'deit3': (data.train_transform(deit3), deit3['batch_size'], 'deit3 official'),
        'deit3 official': (official_deit3_transform(img_size), deit3['batch_size'], None),
        'deit3 before #30': (before_30_train_transform(deit3, img_size), deit3['batch_size'], None),
        'swin': (data.train_transform(swin), swin['batch_size'], 'swin before #30'),
        'swin before #30': (before_30_train_transform(swin, img_size), swin['batch_size'], None),
        'eval': (data.eval_transform(img_size, 1.0), deit3['batch_size'], 'eval official'),
        'eval official': (official_eval_transform(img_size), deit3['batch_size'], None),
    }


def _pass(transform, paths, loader):
    """CPU seconds of one pass over `paths` (file read, decode, transform) and the last output."""
    start = time.process_time()
    for path in paths:
        out = transform(loader(path))
    return time.process_time() - start, out


def _bytes(sample):
    """Bytes a sample carries through the workers' shared memory: a tensor, or a Planned pair."""
    tensors = sample if isinstance(sample, augment.Planned) else (sample,)
    return sum(t.numel() * t.element_size() for t in tensors)


def _device_half_pass(recipe, img_size, samples, batch=64):
    """CPU seconds of augment.BatchAugment over the Planned `samples`, in batches of `batch`."""
    finish = data.build_batch_augment(recipe_cfg(recipe, img_size))
    start = time.process_time()
    for first in range(0, len(samples), batch):
        finish(torch.utils.data.default_collate(samples[first:first + batch]), torch.device('cpu'))
    return time.process_time() - start


def run(paths, img_size, reps, seed=0):
    """{name: dict(rates=[images/s per core per repetition], sample_bytes, batch, peer)}"""
    torch.manual_seed(seed)
    random.seed(seed)
    table = pipelines(img_size)
    loader = torchvision.datasets.folder.pil_loader   # ImageFolder's: open, decode, RGB
    results = {name: dict(rates=[], batch=batch, peer=peer, sample_bytes=None)
               for name, (_, batch, peer) in table.items()}
    for recipe in ('deit3', 'swin'):   # the device's half, per image on this CPU (not a worker's)
        results[f'{recipe} device half'] = dict(rates=[], batch=table[recipe][1], peer=None,
                                                sample_bytes=None)
    names = list(table)
    for name in names:   # warm-up: file cache, lazy imports, allocator
        _pass(table[name][0], paths[:4], loader)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            seconds, out = _pass(table[name][0], paths, loader)
            results[name]['rates'].append(len(paths) / seconds)
            results[name]['sample_bytes'] = _bytes(out)
        for recipe in ('deit3', 'swin'):
            samples = [table[recipe][0](loader(path)) for path in paths]
            half = results[f'{recipe} device half']
            half['rates'].append(len(paths) / _device_half_pass(recipe, img_size, samples))
            half['sample_bytes'] = 4 * 3 * img_size * img_size   # what it hands the model: float32
    return results


def report(results, n_images, reps, out=sys.stdout):
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f'{n_images} images, {reps} interleaved repetitions, one thread; load average '
          f'(1/5/15 min) at the end: {load}', file=out)
    print(f"{'pipeline':18s} {'img/s/core':>10s} {'(min-max)':>15s} {'bytes/sample':>12s} "
          f"{'bytes/batch':>16s}  ratio to peer (per rep min-max; of medians)", file=out)
    for name, r in results.items():
        median = statistics.median(r['rates'])
        spread = f"({min(r['rates']):.0f}-{max(r['rates']):.0f})"
        line = (f"{name:18s} {median:10.1f} {spread:>15s}"
                f" {r['sample_bytes']:12,d} {r['sample_bytes'] * r['batch']:12,d} x{r['batch']:<3d}")
        if r['peer']:
            peer = results[r['peer']]
            per_rep = [a / b for a, b in zip(r['rates'], peer['rates'])]
            line += (f"  vs {r['peer']}: {min(per_rep):.2f}-{max(per_rep):.2f}; "
                     f"{median / statistics.median(peer['rates']):.2f}x")
        print(line, file=out)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=200, help='generated JPEGs')
    p.add_argument('--reps', type=int, default=5, help='interleaved repetitions')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--folder', default=None,
                   help='where to write the images (default: a temporary folder, removed)')
    return p


def main(args):
    if args.images < 1 or args.reps < 1 or args.img_size < 1:
        sys.stderr.write('error: --images, --reps and --img-size must be positive\n')
        sys.exit(2)
    torch.set_num_threads(1)   # per core: a loader worker runs its transforms in one thread
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or tmp
        os.makedirs(folder, exist_ok=True)
        paths = make_images(folder, args.images, args.seed)
        results = run(paths, args.img_size, args.reps, args.seed)
    report(results, args.images, args.reps)
    return results


if __name__ == '__main__':
    main(get_args_parser().parse_args())
