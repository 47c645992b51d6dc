"""The built-in generated tasks (glyphs, shapes): deterministic per split, index and seed, the same
scenes at every resolution, the validation render cache, labels that depend on layout only.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import builtin_data


def test_train_shapes_deterministic_and_resolution_independent():
    a = builtin_data.ShapesDataset('val', 50, 24, seed=3)
    b = builtin_data.ShapesDataset('val', 50, 24, seed=3)
    other = builtin_data.ShapesDataset('val', 50, 24, seed=4)
    for i in (0, 17, 49):
        torch.testing.assert_close(a[i][0], b[i][0], atol=0, rtol=0)
        assert a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], other[0][0])
    assert not torch.equal(a[0][0], builtin_data.ShapesDataset('train', 50, 24, seed=3)[0][0])
    labels = [builtin_data.make_scene('val', i, 0)['label'] for i in range(400)]
    assert set(labels) == set(range(8)) and min(np.bincount(labels)) > 25   # balanced enough

    for i in range(20):
        scene = builtin_data.make_scene('val', i, 0)
        # The label is the compass direction of the square seen from the disk (y points down).
        dx = scene['square'][0] - scene['disk'][0]
        dy = scene['disk'][1] - scene['square'][1]
        direction = round(math.atan2(dy, dx) / (math.pi / 4)) % 8
        assert direction == scene['label']
        # A rendering at 24 px agrees with a 4x larger one averaged down to 24 px.
        small = torch.from_numpy(builtin_data.render_scene(scene, 24))
        large = torch.from_numpy(builtin_data.render_scene(scene, 96))
        down = F.avg_pool2d(large[None], 4)[0]
        assert (down - small).abs().mean() < 0.01
        assert (down - small).abs().max() < 0.2
        # The disk's colour sits at its centre at both resolutions (same scene, same place).
        for image, r in ((small, 24), (large, 96)):
            x, y = (int(scene['disk'][k] * r) for k in (0, 1))
            torch.testing.assert_close(image[:, y, x], torch.tensor(scene['disk_colour']).float()
                                       .clamp(0, 1), atol=1e-5, rtol=0)
    # Same index, two resolutions: same label, same normalisation.
    hi = builtin_data.ShapesDataset('val', 50, 64, seed=3)
    assert [hi[i][1] for i in range(10)] == [a[i][1] for i in range(10)]


def test_train_glyphs_deterministic_per_split_index_seed():
    a = builtin_data.GlyphsDataset('val', 40, 24, seed=3)
    first = {i: a[i] for i in (0, 17, 39)}
    builtin_data.VAL_RENDER_CACHE.clear()   # b renders its images again instead of reusing a's
    b = builtin_data.GlyphsDataset('val', 40, 24, seed=3)
    for i in (0, 17, 39):
        torch.testing.assert_close(first[i][0], b[i][0], atol=0, rtol=0)
        assert first[i][0] is not b[i][0]
        assert a[i][1] == b[i][1]
        assert builtin_data.make_glyph_scene('val', i, 3) == builtin_data.make_glyph_scene('val', i, 3)
    assert not torch.equal(a[0][0], builtin_data.GlyphsDataset('val', 40, 24, seed=4)[0][0])
    assert not torch.equal(a[0][0], builtin_data.GlyphsDataset('train', 40, 24, seed=3)[0][0])
    # A training set shows fresh scenes every epoch: epoch 2 starts at scene 2 x 40.
    fresh = builtin_data.GlyphsDataset('train', 40, 24, seed=3)
    fresh.set_epoch(2)
    scene = builtin_data.make_glyph_scene('train', 80, 3)
    image = (torch.from_numpy(builtin_data.render_glyph_scene(scene, 24)) - fresh.mean) / fresh.std
    torch.testing.assert_close(fresh[0][0], image, atol=0, rtol=0)
    assert fresh[0][1] == scene['label']
    # Validation scenes show the whole unit square; every class is drawn about equally often.
    assert all(builtin_data.make_glyph_scene('val', i, 0)['window'] == [0.0, 0.0, 1.0] for i in range(20))
    labels = [builtin_data.make_glyph_scene('val', i, 0)['label'] for i in range(500)]
    assert set(labels) == set(range(10)) and min(np.bincount(labels)) > 30


def test_train_builtin_validation_images_rendered_once(monkeypatch):
    cache = builtin_data.RenderCache(limit_bytes=2 ** 20)
    monkeypatch.setattr(builtin_data, 'VAL_RENDER_CACHE', cache)
    rendered = []

    def counting_render(scene, resolution):
        rendered.append(resolution)
        return builtin_data.render_glyph_scene(scene, resolution)
    monkeypatch.setattr(builtin_data.GlyphsDataset, 'render', staticmethod(counting_render))

    def fresh(split, index, resolution, seed):   # the image without any dataset object
        image = torch.from_numpy(builtin_data.render_glyph_scene(
            builtin_data.make_glyph_scene(split, index, seed), resolution))
        return (image - torch.tensor(builtin_data.IMAGENET_MEAN).view(3, 1, 1)) \
            / torch.tensor(builtin_data.IMAGENET_STD).view(3, 1, 1)

    # A second dataset object (eval_multires builds one per checkpoint and policy) reuses them.
    for _ in range(2):
        val = builtin_data.GlyphsDataset('val', 6, 20, seed=5)
        for i in range(6):
            image, label = val[i]
            torch.testing.assert_close(image, fresh('val', i, 20, 5), atol=0, rtol=0)
            assert label == builtin_data.make_glyph_scene('val', i, 5)['label']
    assert rendered == [20] * 6
    # Another resolution or seed is another image.
    builtin_data.GlyphsDataset('val', 6, 28, seed=5)[0]
    other_seed = builtin_data.GlyphsDataset('val', 6, 20, seed=6)[0][0]
    assert rendered == [20] * 6 + [28, 20]
    torch.testing.assert_close(other_seed, fresh('val', 0, 20, 6), atol=0, rtol=0)
    # Training scenes are never kept (fresh every epoch; and a window per scene).
    rendered.clear()
    train_set = builtin_data.GlyphsDataset('train', 6, 20, seed=5)
    train_set[0], train_set[0]
    assert rendered == [20, 20]
    # Past the limit nothing more is kept; the images stay correct.
    one = 3 * 20 * 20 * 4
    small = builtin_data.RenderCache(limit_bytes=2 * one)
    monkeypatch.setattr(builtin_data, 'VAL_RENDER_CACHE', small)
    rendered.clear()
    val = builtin_data.GlyphsDataset('val', 6, 20, seed=5)
    for _ in range(2):
        for i in range(4):
            torch.testing.assert_close(val[i][0], fresh('val', i, 20, 5), atol=0, rtol=0)
    assert small.used_bytes == 2 * one and len(small.images) == 2
    assert rendered == [20] * 4 + [20] * 2


def test_train_glyphs_resolution_independent():
    # The coverage ramp clip(0.5 - d / pixel, 0, 1) is a pixel's area inside a straight edge; it
    # errs where a pixel holds a round stroke end or a stroke or ring thinner than a pixel: there
    # by up to about a quarter of the contrast (measured <= 0.22 over 80 scenes at 24 px), over
    # a few pixels (99th percentile <= 0.065), and by < 0.004 on average over an image.
    for split in ('val', 'train'):
        for i in range(12):
            scene = builtin_data.make_glyph_scene(split, i, 0)
            small = torch.from_numpy(builtin_data.render_glyph_scene(scene, 24))
            down = F.avg_pool2d(torch.from_numpy(builtin_data.render_glyph_scene(scene, 96))[None], 4)[0]
            error = (down - small).abs()
            assert error.mean() < 0.01 and error.max() < 0.3, (split, i)
            assert torch.quantile(error.flatten(), 0.99) < 0.1, (split, i)
    # The same validation scenes at two resolutions: same labels (the sweep's premise).
    lo, hi = builtin_data.GlyphsDataset('val', 10, 16, seed=1), builtin_data.GlyphsDataset('val', 10, 72, seed=1)
    assert [lo[i][1] for i in range(10)] == [hi[i][1] for i in range(10)]


def test_train_glyphs_training_windows_hold_the_glyph():
    sides = []
    for i in range(300):
        scene = builtin_data.make_glyph_scene('train', i, 0)
        x0, y0, side = scene['window']
        box = builtin_data.glyph_box(scene['glyph'])
        assert 0 <= x0 and 0 <= y0 and x0 + side <= 1 and y0 + side <= 1   # inside the scene
        assert side ** 2 >= 0.08                                            # RandomResizedCrop
        assert x0 < box[0] and y0 < box[1] and box[2] < x0 + side and box[3] < y0 + side
        sides.append(side)
    # Zoomed-in and whole-scene views both occur (area fractions from about 0.25 to 1).
    assert min(sides) < 0.55 and max(sides) > 0.97
    # A window is rendered from the scene, not resampled: the window (8, 16, 32) / 64 at 32 px
    # is the crop [16:48, 8:40] of the whole scene at 64 px, pixel for pixel.
    scene = dict(builtin_data.make_glyph_scene('val', 5, 0), window=[8 / 64, 16 / 64, 0.5])
    whole = dict(scene, window=[0.0, 0.0, 1.0])
    torch.testing.assert_close(torch.from_numpy(builtin_data.render_glyph_scene(scene, 32)),
                               torch.from_numpy(builtin_data.render_glyph_scene(whole, 64))[:, 16:48, 8:40],
                               atol=1e-6, rtol=0)


def test_train_glyph_classes_differ_only_in_arrangement():
    """Every class is the same seven strokes, some lit: with the scene's style, colours,
    background and distractors fixed, only where ink lies changes between classes."""
    scene = builtin_data.make_glyph_scene('val', 3, 0)
    scene['glyph'].update(slant=0.2, rotation=0.1)   # an italic, turned glyph: no symmetry helps
    scene['window'] = [0.25, 0.2, 0.6]                # the glyph large in a 96 px view
    r, (x0, y0, side) = 96, scene['window']
    centres = (np.arange(r) + 0.5) * side / r
    x, y = x0 + centres[None, :], y0 + centres[:, None]

    def coverage(label, segments=None):
        return builtin_data.glyph_coverage(dict(scene, label=label), x, y, side / r, segments)

    strokes = {name: coverage(0, name) for name in builtin_data.GLYPH_SEGMENTS}
    assert len(strokes) == 7 and len(builtin_data.GLYPH_DIGITS) == len(builtin_data.GLYPH_CLASSES) == 10
    ink, images = {}, {}
    for digit, lit in enumerate(builtin_data.GLYPH_DIGITS):
        assert set(lit) <= set(builtin_data.GLYPH_SEGMENTS) and lit not in builtin_data.GLYPH_DIGITS[:digit]
        # A class's ink is the union of its lit strokes, each exactly the shared primitive.
        np.testing.assert_array_equal(coverage(digit),
                                      np.max([strokes[name] for name in lit], axis=0))
        ink[digit] = coverage(digit)
        images[digit] = builtin_data.render_glyph_scene(dict(scene, label=digit), r)
        # Background and distractors are the same for every class: pixels no stroke touches
        # are equal.
        untouched = (ink[digit] == 0) & (ink[0] == 0)
        np.testing.assert_array_equal(images[digit][:, untouched], images[0][:, untouched])
    # 2 / 5 are mirror images and 6 / 9 half-turns of each other: the same number of strokes and
    # the same ink area (equal in the plane; measured within 0.03 % on the 96 px grid), but in
    # other places.
    for p, q in ((2, 5), (6, 9)):
        assert len(builtin_data.GLYPH_DIGITS[p]) == len(builtin_data.GLYPH_DIGITS[q])
        assert abs(ink[p].sum() - ink[q].sum()) < 0.005 * ink[p].sum(), (p, q)
        # Ink moved: at least a stroke's worth (6 and 9 differ in one stroke each: 24 %).
        assert np.abs(ink[p] - ink[q]).sum() > 0.15 * ink[p].sum(), (p, q)
        assert np.abs(images[p] - images[q]).max() > 0.3
