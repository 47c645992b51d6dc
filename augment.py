"""Training augmentation of folder images, split where each half runs best.

A loader worker decodes the image, crops and flips it (RandomResizedCrop, bicubic, on uint8),
and draws every other random choice of the recipe's augmentation: a plan, a few numbers per
sample. The device applies the plans to the whole batch, converts it to float and normalises
it. The worker's share of the time is what bounds a GPU run's input rate (a node has a few
cores per GPU), and decoding plus cropping alone is about half of what the whole per-sample
pipeline cost: docs/performance.md, "The input pipeline per worker core".

The draws are torchvision v2's own, in the order the per-sample v2 pipeline of the recipe
makes them, from the sample's seed: RandomResizedCrop, RandomHorizontalFlip, then
  deit3 (3-Augment): RandomChoice of grey / solarise / Gaussian blur, then ColorJitter;
  swin: RandAugment (2 operations, magnitude 9), ColorJitter if --color-jitter > 0, then
        RandomErasing (its box; the noise that fills it is drawn on the device).
So a sample gets the augmentation the per-sample pipeline would give it, up to float rounding
(test_train.py compares them pixel for pixel) and the erased noise's values.

Only the rows' membership in each operation is read on the host, from the plans as the loader
hands them over (CPU tensors), and the per-row tables are copied without blocking: 3-Augment's
half never makes the host wait for the device. RandAugment's operations are torchvision's
kernels, whose shear, translate, rotate and sharpness copy a small table with a blocking copy
(one wait per group of rows that drew one of them).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as TF
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from builtin_data import IMAGENET_MEAN, IMAGENET_STD


class Planned(NamedTuple):
    """A worker's sample: the uint8 crop (3, H, W) and its plan (float64, (width,)). The
    default collate batches it field by field: images (B, 3, H, W), plans (B, width)."""
    image: torch.Tensor
    plan: torch.Tensor


def _to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """CPU `values` in the dtype of `like`, on its device, without making the host wait (a
    blocking host-to-device copy would wait for every kernel queued before it)."""
    return values.to(like.dtype).to(like.device, non_blocking=True)


def _rows(where: torch.Tensor, device) -> torch.Tensor:
    """Indices of the rows where the CPU bool tensor `where` holds, on `device`."""
    return where.nonzero()[:, 0].to(device, non_blocking=True)


def _blend(image, other, ratio):
    """torchvision's blend of float images, with a ratio per row: ratio (n,) float64 on the CPU."""
    ratio = ratio.view(-1, 1, 1, 1)   # 1 - ratio in float64, as torchvision computes it
    return image.mul(_to(ratio, image)).add_(other.mul(_to(1 - ratio, image))).clamp_(0, 1)


# ----------------------------------------------------------------------------------------------
# The steps. Each: stage ('uint8', 'float' in [0, 1], or 'normalised', the images it takes),
# width (numbers in its plan), draw(crop) in the worker, apply(images, plans) on the device.

class ThreeAugmentChoice:
    """DeiT-III's 3-Augment: one of grey, solarise, Gaussian blur (9 x 9, sigma U(0.1, 2.0)),
    each with probability 1/3. Plan: (choice, sigma)."""
    stage, width = 'float', 2
    GREY, SOLARISE, BLUR = 0, 1, 2

    def __init__(self):
        # torchvision's transforms make the draws (RandomChoice, then the chosen one's)
        self.choice = v2.RandomChoice([v2.Grayscale(num_output_channels=3),
                                       v2.RandomSolarize(threshold=127.5 / 255, p=1.0),
                                       v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))])

    def draw(self, crop):
        # RandomChoice.forward's draw, then the chosen transform's: a RandomSolarize draws its
        # apply-coin even at p = 1, a GaussianBlur its sigma (make_params), grey nothing
        choice = int(torch.multinomial(torch.tensor(self.choice.p), 1))
        sigma = 0.0
        if choice == self.SOLARISE:
            torch.rand(1)
        elif choice == self.BLUR:
            sigma = self.choice.transforms[self.BLUR].make_params([crop])['sigma'][0]
        return torch.tensor([choice, sigma], dtype=torch.float64)

    def apply(self, images, plans):
        choice = plans[:, 0]
        for which, op in ((self.GREY, lambda x, _: F.rgb_to_grayscale(x, num_output_channels=3)),
                          # on [0, 1] floats: inverts the levels >= 128 of 255, as on uint8
                          (self.SOLARISE, lambda x, _: F.solarize(x, threshold=127.5 / 255)),
                          (self.BLUR, lambda x, rows: gaussian_blur_rows(x, plans[rows, 1]))):
            rows = choice == which
            if rows.any():
                at = _rows(rows, images.device)
                images.index_copy_(0, at, op(images.index_select(0, at), rows))
        return images


def gaussian_blur_rows(images, sigmas, kernel_size=9):
    """torchvision's Gaussian blur (reflect padding, its kernel) of each row with its own sigma:
    images (n, C, H, W) float, sigmas (n,) float64 on the CPU. As two 1-D passes, row then
    column: the 2-D kernel is their outer product, at 2k instead of k^2 multiplies a pixel."""
    n, channels, height, width = images.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=images.dtype)
    kernels = torch.softmax(x.div(sigmas.to(images.dtype)[:, None]).pow(2).neg(), dim=1)   # (n, k)
    kernels = _to(kernels.repeat_interleave(channels, dim=0), images)   # (n * C, k)
    pad = kernel_size // 2
    # (n, C, H, W) -> (1, n * C, H + 2p, W + 2p): each row's channels a group of the convolutions
    out = TF.pad(images.reshape(1, n * channels, height, width), (pad, pad, pad, pad),
                 mode='reflect')
    out = TF.conv2d(out, kernels.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    out = TF.conv2d(out, kernels.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    return out.view(n, channels, height, width)


class ColorJitterStep:
    """ColorJitter(brightness, contrast, saturation), each factor U(1 - s, 1 + s), applied in
    a random order. Plan: the order (torchvision's permutation of 4, hue's 3 skipped), then the
    three factors."""
    stage, width = 'float', 7

    def __init__(self, strength):
        self.jitter = v2.ColorJitter(strength, strength, strength)

    def draw(self, crop):
        params = self.jitter.make_params([crop])
        return torch.tensor([*params['fn_idx'].tolist(), params['brightness_factor'],
                             params['contrast_factor'], params['saturation_factor']],
                            dtype=torch.float64)

    def apply(self, images, plans):
        def grey(x):
            return F.rgb_to_grayscale(x, num_output_channels=1)
        # torchvision's order of the permutation: brightness, contrast, saturation
        adjust = (lambda x, f: _blend(x, torch.zeros_like(x), f),
                  lambda x, f: _blend(x, grey(x).mean(dim=(-3, -2, -1), keepdim=True), f),
                  lambda x, f: _blend(x, grey(x), f))
        for position in range(4):
            for fn, op in enumerate(adjust):
                rows = plans[:, position] == fn
                if rows.any():
                    at = _rows(rows, images.device)
                    images.index_copy_(0, at, op(images.index_select(0, at), plans[rows, 4 + fn]))
        return images


class _DrawnRandAugment(v2.RandAugment):
    """v2.RandAugment whose forward() makes its draws and records each operation, unapplied."""

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        self.drawn.append((transform_id, magnitude))
        return image


class RandAugmentStep:
    """RandAugment (2 operations, magnitude 9 of 31 bins, bilinear: the tensor kernels of
    rotate and affine have no bicubic mode), on uint8 images. Plan: (operation, magnitude) per
    operation, the operation as its index in torchvision's table."""
    stage = 'uint8'

    def __init__(self, num_ops=2, magnitude=9):
        settings = dict(num_ops=num_ops, magnitude=magnitude,
                        interpolation=v2.InterpolationMode.BILINEAR)
        self.draws, self.randaugment = _DrawnRandAugment(**settings), v2.RandAugment(**settings)
        self.ops = tuple(self.randaugment._AUGMENTATION_SPACE)
        self.width = 2 * num_ops

    def draw(self, crop):
        self.draws.drawn = []
        self.draws(crop)
        return torch.tensor([x for op, magnitude in self.draws.drawn
                             for x in (self.ops.index(op), magnitude)], dtype=torch.float64)

    def apply(self, images, plans):
        for turn in range(self.width // 2):
            drawn = plans[:, 2 * turn:2 * turn + 2]
            for op, magnitude in sorted(set(map(tuple, drawn.tolist()))):
                at = _rows((drawn[:, 0] == op) & (drawn[:, 1] == magnitude), images.device)
                # each row's operation and magnitude as v2.RandAugment applies them, to the
                # rows that drew the same pair at once
                done = self.randaugment._apply_image_or_video_transform(
                    images.index_select(0, at), self.ops[int(op)], magnitude,
                    interpolation=self.randaugment.interpolation, fill=self.randaugment._fill)
                images.index_copy_(0, at, done)
        return images


class RandomErasingStep:
    """Random erasing (p, area 2-33 %, aspect 0.3-3.3) with normal noise, on normalised images.
    Plan: (erased, top, left, height, width)."""
    stage, width = 'normalised', 5

    def __init__(self, p):
        self.erasing = v2.RandomErasing(p=p, value='random')

    def draw(self, crop):
        # _RandomApplyTransform.forward's coin, then make_params: the box, as torchvision draws
        # it (its noise too, which is dropped: the device draws the noise that fills the box)
        if torch.rand(1) >= self.erasing.p:
            return torch.zeros(5, dtype=torch.float64)
        params = self.erasing.make_params([crop])
        erased = params['v'] is not None   # no box fitted in 10 tries: nothing erased
        return torch.tensor([erased, params['i'], params['j'], params['h'], params['w']],
                            dtype=torch.float64)

    def apply(self, images, plans):
        for row, (erased, top, left, height, width) in enumerate(plans.long().tolist()):
            if erased:   # normal_ draws from the device's generator (saved with the checkpoints)
                images[row, :, top:top + height, left:left + width].normal_()
        return images


def batch_steps(cfg):
    """The steps of the recipe's augmentation (cfg['aug'] 'three' or 'randaug') after the crop."""
    steps = [ThreeAugmentChoice()] if cfg['aug'] == 'three' else [RandAugmentStep()]
    if cfg['color_jitter'] > 0:
        steps.append(ColorJitterStep(cfg['color_jitter']))
    if cfg['reprob'] > 0:
        steps.append(RandomErasingStep(cfg['reprob']))
    return steps


# ----------------------------------------------------------------------------------------------
# The two halves

class WorkerAugment:
    """The loader worker's half: a PIL image -> Planned(uint8 crop (3, size, size), plan)."""

    def __init__(self, cfg, size):
        self.crop = v2.Compose([
            v2.PILToTensor(),
            # scale (0.08, 1): DeiT-III's 3-Augment, and torchvision's default for Swin
            v2.RandomResizedCrop(size, scale=(0.08, 1.0),
                                 interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip()])
        self.steps = batch_steps(cfg)
        self.plan_width = sum(step.width for step in self.steps)

    def __call__(self, image):
        crop = self.crop(image)
        return Planned(crop, torch.cat([step.draw(crop) for step in self.steps]))

    def placeholder(self, size):
        """What an undecodable image becomes (dropped before the model): it collates with the
        others. An all-zero plan is a valid one."""
        return Planned(torch.zeros(3, size, size, dtype=torch.uint8),
                       torch.zeros(self.plan_width, dtype=torch.float64))


class BatchAugment:
    """The device's half: a Planned batch -> the model's input, float32 normalised on `device`."""

    def __init__(self, cfg):
        self.steps = batch_steps(cfg)

    def __call__(self, batch: Planned, device) -> torch.Tensor:
        # (B, 3, H, W) uint8, a copy even on the CPU: the steps work in place
        images = batch.image.to(device, non_blocking=True, copy=True)
        plans = batch.plan.cpu()                              # (B, width): read on the host
        stage, offset = 'uint8', 0
        for step in self.steps:
            images, stage = _advance(images, stage, step.stage)
            images = step.apply(images, plans[:, offset:offset + step.width])
            offset += step.width
        return _advance(images, stage, 'normalised')[0]


STAGES = ('uint8', 'float', 'normalised')


def _advance(images, stage, to):
    """images at `stage` brought to the later stage `to`: uint8 -> float in [0, 1] -> normalised
    with the ImageNet mean and std (torchvision's functions, as the per-sample pipeline)."""
    if STAGES.index(stage) < 1 <= STAGES.index(to):
        images = F.to_dtype(images, torch.float32, scale=True)
    if STAGES.index(stage) < 2 <= STAGES.index(to):
        images = F.normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    return images, max(stage, to, key=STAGES.index)


# ----------------------------------------------------------------------------------------------
# In the training loop

def to_model_input(images, device, batch_augment=None) -> torch.Tensor:
    """A loader's images as the model takes them, on `device`: a Planned batch (folder
    training) finished by batch_augment; a float batch (built-in data, evaluation, aug 'none')
    comes normalised and is moved."""
    if isinstance(images, Planned):
        return batch_augment(images, device)
    return images.to(device, non_blocking=True)


def take_rows(images, rows):
    """Rows of a loader's images (a tensor or a Planned batch); rows: a bool mask or a slice."""
    if isinstance(images, Planned):
        return Planned(images.image[rows], images.plan[rows])
    return images[rows]
