"""The built-in data of train.py: generated tasks that need no download (`--data glyphs`, the
default, and `--data shapes`).

Each scene is a continuous description (a dict of floats in unit-square coordinates) drawn from
its own random generator, seeded by (seed, split, index): a pure function of its arguments, so
any scene can be made again on any rank, in any process. Every image is rendered directly from
that description at the resolution asked for, anti-aliased, so the same scene can be shown at
every test resolution, as ImageNet validation images are resized for the multi-resolution
protocol. Images are ImageNet-normalised like the folder data.

    make_scene / render_scene              `shapes`: the direction of a square from a disk
    make_glyph_scene / render_glyph_scene  `glyphs`: seven-segment digits, a miniature ImageNet
    VAL_RENDER_CACHE                       validation images kept once rendered
    ShapesDataset, GlyphsDataset           the torch datasets; BUILTIN_DATASETS names them

Imports numpy and torch only.
"""
import math

import numpy as np
import torch
from torch.utils.data import Dataset

# ImageNet's per-channel mean and standard deviation, which every image is normalised with
# (train.py's folder data too).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Built-in data: `shapes`. A scene is a continuous description (unit-square coordinates); the
# label is the direction of a small square from a large disk, in 8 compass directions (north =
# up in the image), so it depends on where things are relative to each other, not on colours.

SHAPES_CLASSES = ('east', 'north-east', 'north', 'north-west',
                  'west', 'south-west', 'south', 'south-east')
_SHAPES_SPLITS = {'train': 0, 'val': 1}


def make_scene(split, index, seed):
    """The scene (a dict of floats) number `index` of `split`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SHAPES_SPLITS[split], index])
    label = int(rng.integers(len(SHAPES_CLASSES)))
    # Keep 15 degrees between a scene's direction and the edge of its 45-degree bin, so that no
    # label is ambiguous at any resolution.
    angle = label * math.pi / 4 + rng.uniform(-math.pi / 12, math.pi / 12)
    distance = rng.uniform(0.32, 0.55)
    disk_radius = rng.uniform(0.11, 0.15)
    square_half = rng.uniform(0.05, 0.075)
    dx, dy = distance * math.cos(angle), -distance * math.sin(angle)   # image y points down
    margin = 0.17   # > disk radius and > half the square's diagonal: both stay inside the image
    disk_xy = [rng.uniform(max(margin, margin - d), min(1 - margin, 1 - margin - d))
               for d in (dx, dy)]
    # A dark background and bright objects of random colours: colour says "object here", never
    # which direction.
    background = rng.uniform(0.0, 0.2, size=3)
    colours = []
    while len(colours) < 2:
        c = rng.uniform(0.0, 1.0, size=3)
        if np.abs(c - background).max() >= 0.5:
            colours.append(c)
    return dict(label=label, background=background.tolist(),
                gradient=rng.uniform(-0.1, 0.1, size=2).tolist(),
                disk=(disk_xy[0], disk_xy[1], disk_radius), disk_colour=colours[0].tolist(),
                square=(disk_xy[0] + dx, disk_xy[1] + dy, square_half,
                        rng.uniform(0.0, math.pi / 2)),
                square_colour=colours[1].tolist())


def render_scene(scene, resolution):
    """Render a scene at `resolution` x `resolution`: float32 (3, r, r) in [0, 1].

    Each shape has a signed distance d (in image units) to its outline; its coverage of a pixel
    is clip(0.5 - d * r, 0, 1), a one-pixel linear ramp that approximates the pixel's area inside
    the shape, so small renderings are anti-aliased and agree with downsampled large ones.
    """
    centres = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
    x, y = centres[None, :], centres[:, None]                          # (1, r), (r, 1)
    gx, gy = scene['gradient']
    shade = gx * (x - 0.5) + gy * (y - 0.5)                            # (r, r)
    image = np.asarray(scene['background'])[:, None, None] + shade[None]   # (3, r, r)

    cx, cy, radius = scene['disk']
    disk_distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - radius
    sx, sy, half, rot = scene['square']
    lx = (x - sx) * math.cos(rot) + (y - sy) * math.sin(rot)           # square's own frame
    ly = -(x - sx) * math.sin(rot) + (y - sy) * math.cos(rot)
    square_distance = np.maximum(np.abs(lx), np.abs(ly)) - half
    for distance, colour in ((disk_distance, scene['disk_colour']),
                             (square_distance, scene['square_colour'])):
        coverage = np.clip(0.5 - distance * resolution, 0.0, 1.0)[None]   # (1, r, r)
        image = image * (1 - coverage) + np.asarray(colour)[:, None, None] * coverage
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Built-in data: `glyphs` (the default), a miniature ImageNet. A scene is a seven-segment digit
# 0-9 (the label) drawn over a shaded, textured background among small blobs and rings; the
# class is the arrangement of strokes only (2 and 5, 6 and 9 are made of the same parts in
# other places), never their colour, size or position. Validation shows the whole scene, the
# glyph at a moderate scale near the centre; training shows a random square window of it, like
# ImageNet's RandomResizedCrop (area 8-100 %, aspect 1) but always holding the whole glyph.
# Every view is rendered directly from the continuous description, so the same scene can be
# drawn at any resolution.

GLYPH_CLASSES = tuple(str(d) for d in range(10))
# The seven segments as line segments in the glyph's own frame: u in [-1, 1] left to right, v in
# [-1, 1] top to bottom (a = top, b / c = upper / lower right, d = bottom, e / f = lower / upper
# left, g = middle).
GLYPH_SEGMENTS = {'a': (-1, -1, 1, -1), 'b': (1, -1, 1, 0), 'c': (1, 0, 1, 1),
                  'd': (-1, 1, 1, 1), 'e': (-1, 0, -1, 1), 'f': (-1, -1, -1, 0),
                  'g': (-1, 0, 1, 0)}
GLYPH_DIGITS = ('abcdef', 'bc', 'abdeg', 'abcdg', 'bcfg', 'acdfg', 'acdefg', 'abc', 'abcdefg',
                'abcdfg')
_GLYPH_SPLITS = {'train': 0, 'val': 1}
GLYPH_WINDOW_MIN_AREA = 0.08   # RandomResizedCrop's smallest area fraction


def _contrasting_colour(rng, against, contrast=0.3):
    """A random RGB colour whose mean (brightness) differs from `against`'s by at least about
    `contrast`: lighter or darker, whichever leaves room (either, at random, when both do)."""
    level = float(np.mean(against))
    lighter = (rng.uniform() < 0.5 if 0.02 + contrast <= level <= 0.98 - contrast
               else level < 0.5)
    target = (rng.uniform(level + contrast, 0.98) if lighter
              else rng.uniform(0.02, level - contrast))
    tint = rng.uniform(-0.2, 0.2, size=3)
    return np.clip(target + tint - tint.mean(), 0.0, 1.0)


def glyph_outline(glyph):
    """The seven segments of `glyph` (a scene's 'glyph' entry) in scene coordinates: (7, 4) rows
    x0, y0, x1, y1 in the order of GLYPH_SEGMENTS. Width, height, slant (x shifts by -slant * v,
    an italic), then rotation, then the centre."""
    ends = np.array(list(GLYPH_SEGMENTS.values()), dtype=np.float64).reshape(7, 2, 2)
    u, v = ends[..., 0] * glyph['half_width'], ends[..., 1] * glyph['half_height']
    u = u - glyph['slant'] * v
    cos, sin = math.cos(glyph['rotation']), math.sin(glyph['rotation'])
    x = glyph['centre'][0] + cos * u - sin * v
    y = glyph['centre'][1] + sin * u + cos * v
    return np.stack([x, y], axis=-1).reshape(7, 4)


def glyph_box(glyph):
    """(x0, y0, x1, y1): the box around all seven segments with their stroke, whatever the digit
    (so that a window drawn around it says nothing about the class)."""
    ends = glyph_outline(glyph).reshape(14, 2)
    pad = glyph['stroke']
    return (*(ends.min(axis=0) - pad), *(ends.max(axis=0) + pad))


def make_glyph_scene(split, index, seed, window_min_area=GLYPH_WINDOW_MIN_AREA):
    """The glyphs scene number `index` of `split` (a dict of floats); a pure function of its
    arguments. Training scenes also hold their window (x0, y0, side), of area at least
    `window_min_area` (1: the whole scene); validation ones view the whole unit square."""
    rng = np.random.default_rng([seed, _GLYPH_SPLITS[split], index])
    label = int(rng.integers(len(GLYPH_CLASSES)))
    background = rng.uniform(0.15, 0.85, size=3)
    height = rng.uniform(0.34, 0.48)
    glyph = dict(centre=rng.uniform(0.42, 0.58, size=2).tolist(), half_height=height / 2,
                 half_width=height / 2 * rng.uniform(0.45, 0.62),
                 slant=rng.uniform(-0.1, 0.25), rotation=rng.uniform(-0.17, 0.17),   # +-10 deg
                 stroke=height * rng.uniform(0.05, 0.085),                            # half width
                 colour=_contrasting_colour(rng, background).tolist())
    box = glyph_box(glyph)
    distractors = []
    for _ in range(rng.integers(3, 8)):
        kind = 'ring' if rng.uniform() < 0.5 else 'blob'
        radius = rng.uniform(0.025, 0.07)
        x, y = rng.uniform(0.0, 1.0, size=2)
        # Outside the glyph's box (with a gap): a distractor never touches or completes the digit.
        gap = radius + 0.03
        if box[0] - gap < x < box[2] + gap and box[1] - gap < y < box[3] + gap:
            continue
        distractors.append(dict(kind=kind, centre=[float(x), float(y)], radius=float(radius),
                                width=float(rng.uniform(0.25, 0.45) * radius),
                                colour=_contrasting_colour(rng, background).tolist()))
    scene = dict(label=label, background=background.tolist(),
                 gradient=rng.uniform(-0.15, 0.15, size=2).tolist(),
                 # Low-frequency texture: a few plane waves of 0.5-2 cycles per scene.
                 waves=[dict(frequency=(rng.uniform(0.5, 2.0) * np.array(
                                 [math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)])).tolist(),
                             phase=float(rng.uniform(0, 2 * math.pi)),
                             amplitude=rng.uniform(-0.07, 0.07, size=3).tolist())
                        for _ in range(3)],
                 distractors=distractors, glyph=glyph, window=[0.0, 0.0, 1.0])
    if split == 'train':
        # RandomResizedCrop with aspect 1 and area U(0.08, 1), conditioned on holding the glyph
        # (with a margin of 0.02): the area is drawn from the part of that range that can.
        need = max(box[2] - box[0], box[3] - box[1]) + 0.04
        side = math.sqrt(rng.uniform(max(window_min_area, need ** 2), 1.0))
        x0 = rng.uniform(max(0.0, box[2] + 0.02 - side), min(1.0 - side, box[0] - 0.02))
        y0 = rng.uniform(max(0.0, box[3] + 0.02 - side), min(1.0 - side, box[1] - 0.02))
        scene['window'] = [float(x0), float(y0), float(side)]
    return scene


def _capsule_distance(x, y, segments, half_width):
    """Signed distance to strokes of half width `half_width` along `segments` (k, 4): (k, r, r)."""
    ax, ay, bx, by = (segments[:, i, None, None] for i in range(4))
    dx, dy = bx - ax, by - ay
    px, py = x - ax, y - ay
    t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2) - half_width


def glyph_coverage(scene, x, y, pixel, segments=None):
    """Coverage in [0, 1] of the glyph's lit segments (or the named `segments`) at points x, y."""
    glyph = scene['glyph']
    lit = GLYPH_DIGITS[scene['label']] if segments is None else segments
    rows = [i for i, name in enumerate(GLYPH_SEGMENTS) if name in lit]
    distance = _capsule_distance(x, y, glyph_outline(glyph)[rows], glyph['stroke']).min(axis=0)
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def render_glyph_scene(scene, resolution, segments=None):
    """Render a glyphs scene's window at `resolution` x `resolution`: float32 (3, r, r) in [0, 1].

    Output pixel centres map into the window (x0, y0, side) of the unit square; each shape's
    coverage is the one-pixel ramp clip(0.5 - d / pixel, 0, 1) of its signed distance d, as in
    render_scene, with pixel = side / r. `segments` (e.g. 'abg') draws those segments instead of
    the digit's.
    """
    x0, y0, side = scene['window']
    pixel = side / resolution
    centres = (np.arange(resolution, dtype=np.float64) + 0.5) * pixel
    x, y = x0 + centres[None, :], y0 + centres[:, None]                 # (1, r), (r, 1)
    gx, gy = scene['gradient']
    image = (np.asarray(scene['background'])[:, None, None]
             + (gx * (x - 0.5) + gy * (y - 0.5))[None])
    waves = scene['waves']
    fx = np.array([w['frequency'][0] for w in waves])[:, None, None]
    fy = np.array([w['frequency'][1] for w in waves])[:, None, None]
    phase = np.array([w['phase'] for w in waves])[:, None, None]
    texture = np.sin(2 * math.pi * (fx * x + fy * y) + phase)           # (n, r, r)
    image = image + np.tensordot(np.array([w['amplitude'] for w in waves]).T, texture, axes=1)
    if scene['distractors']:
        things = scene['distractors']
        cx = np.array([d['centre'][0] for d in things])[:, None, None]
        cy = np.array([d['centre'][1] for d in things])[:, None, None]
        radius = np.array([d['radius'] for d in things])[:, None, None]
        ring = np.array([d['kind'] == 'ring' for d in things])[:, None, None]
        width = np.array([d['width'] for d in things])[:, None, None]
        centre_distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        distance = np.where(ring, np.abs(centre_distance - radius) - width,
                            centre_distance - radius)
        coverage = np.clip(0.5 - distance / pixel, 0.0, 1.0)            # (k, r, r)
        for k, thing in enumerate(things):
            c = coverage[k][None]
            image = image * (1 - c) + np.asarray(thing['colour'])[:, None, None] * c
    c = glyph_coverage(scene, x, y, pixel, segments)[None]
    image = image * (1 - c) + np.asarray(scene['glyph']['colour'])[:, None, None] * c
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The datasets, and the validation images kept once rendered

class RenderCache:
    """Validation images of the built-in data, kept per process once rendered.

    Validation scenes never change, yet training scores them after every epoch and
    eval_multires.py once per checkpoint and position policy; rendering (1-2 ms an image on
    one CPU core) then costs as much as the tiny demo model's forward pass. Images are kept
    until `limit_bytes` is reached (then new ones are rendered every time, as without a cache).
    """

    def __init__(self, limit_bytes):
        self.limit_bytes, self.used_bytes, self.images = limit_bytes, 0, {}

    def get(self, key, render):
        """The (image, label) stored under `key`, or render() stored if it still fits."""
        found = self.images.get(key)
        if found is None:
            found = render()
            size = found[0].numel() * found[0].element_size()
            if self.used_bytes + size <= self.limit_bytes:
                self.images[key] = found
                self.used_bytes += size
        return found

    def clear(self):
        self.images.clear()
        self.used_bytes = 0


# 512 MiB: the glyph validation set (1000 scenes) at all 8 demo test resolutions takes 167 MB.
VAL_RENDER_CACHE = RenderCache(512 * 2 ** 20)


class BuiltinDataset(Dataset):
    """`num_scenes` scenes of one split of a built-in task rendered at `resolution`,
    ImageNet-normalised; a subclass names the task's CLASSES and its make / render functions.

    set_epoch(e) makes a training set show scenes e * num_scenes ... (e + 1) * num_scenes - 1,
    fresh ones every epoch; the validation split never calls it and stays fixed, so its images
    are rendered once per process (VAL_RENDER_CACHE; callers must not change them in place).
    """
    CLASSES = ()

    def __init__(self, split, num_scenes, resolution, seed=0, **scene_options):
        self.split, self.num_scenes, self.seed = split, num_scenes, seed
        self.scene_options = scene_options   # keyword arguments of make (e.g. window_min_area)
        self.resolution = resolution
        self.offset = 0
        self.classes = list(self.CLASSES)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def set_epoch(self, epoch):
        self.offset = epoch * self.num_scenes

    def __len__(self):
        return self.num_scenes

    def __getitem__(self, index):
        return self.at_resolution(index, self.resolution)

    def at_resolution(self, index, resolution):
        """Scene `index` rendered at `resolution` (the same scene at every resolution)."""
        scene_index = self.offset + index
        if self.split != 'val':   # training scenes are fresh every epoch: nothing to keep
            return self._render(scene_index, resolution)
        key = (type(self).__name__, self.seed, tuple(sorted(self.scene_options.items())),
               scene_index, int(resolution))
        return VAL_RENDER_CACHE.get(key, lambda: self._render(scene_index, resolution))

    def _render(self, scene_index, resolution):
        scene = self.make(self.split, scene_index, self.seed, **self.scene_options)
        image = torch.from_numpy(self.render(scene, resolution))
        return (image - self.mean) / self.std, scene['label']


class ShapesDataset(BuiltinDataset):
    """The `shapes` task: the direction of a square from a disk (make_scene, render_scene)."""
    CLASSES = SHAPES_CLASSES
    make, render = staticmethod(make_scene), staticmethod(render_scene)


class GlyphsDataset(BuiltinDataset):
    """The `glyphs` task: seven-segment digits (make_glyph_scene, render_glyph_scene)."""
    CLASSES = GLYPH_CLASSES
    make, render = staticmethod(make_glyph_scene), staticmethod(render_glyph_scene)


# --data NAME: the built-in tasks, the default first.
BUILTIN_DATASETS = {'glyphs': GlyphsDataset, 'shapes': ShapesDataset}


def builtin_setting(cfg, key):
    """cfg's builtin_<key> (train, val, seed) of the built-in data; configurations written
    before glyphs existed call it shapes_<key>."""
    return cfg[f'builtin_{key}'] if f'builtin_{key}' in cfg else cfg[f'shapes_{key}']
