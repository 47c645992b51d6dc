"""Evaluation: top-1 / top-5 over a validation split, and across test resolutions (the
paper's central experiment), with the paper's resolutions and its table layout.

    evaluate                  top-1 / top-5, loss and count over a split, summed over ranks
    evaluate_resolutions      the same at each test resolution, the model not rebuilt
    default_resolutions       the paper's test resolutions, scaled to a training resolution
    config_label, format_table, markdown_table
                              a configuration's name, the paper-style table
    Progress                  images done and ETA on stderr
    amp_dtype, autocast       mixed precision by name

train.py runs evaluate after every epoch and evaluate_resolutions at the end of a run;
eval_multires.py runs them on any checkpoint.
"""
import sys
import time

import torch
import torch.nn.functional as F

from data import build_eval_dataset, build_eval_loader
from distributed import all_reduce_sum, is_main_process, rank_and_world


def amp_dtype_from_flag(name):
    return {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[name]


def amp_autocast(device, amp_dtype):
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


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
        with amp_autocast(device, amp_dtype):
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
# Across test resolutions (the paper's experiment)

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


def training_resolution(cfg):
    """Training resolution as one int (the height for a non-square (H, W))."""
    size = cfg['img_size']
    return int(size[0]) if isinstance(size, (list, tuple)) else int(size)


def size_step(cfg):
    """Granularity of allowed sizes: the patch size (ViT) or patch * 2^(stages-1) (Swin: 32)."""
    kwargs = cfg.get('model_kwargs') or {}
    if model_family(cfg['model']) == 'swin':
        patch = int(kwargs.get('patch_size', 4))
        stages = len(kwargs.get('depths', (2, 2, 6, 2)))
        return patch * 2 ** (stages - 1)
    patch = kwargs.get('patch_size', 16)
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def scaled_resolutions(cfg, paper_resolutions):
    """paper_resolutions x train_res / 224, each rounded to the nearest multiple of the size step
    (at least one step), duplicates dropped, in order."""
    train_res = training_resolution(cfg)
    step = size_step(cfg)
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
    out = scaled_resolutions(cfg, PAPER_RESOLUTIONS[model_family(cfg['model'])])
    return sorted(set(out) | {training_resolution(cfg)})


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


class Progress:
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
        loader = Progress(build_eval_loader(dataset, batch_size, num_workers,
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
    return markdown_table(lines, caption)


def markdown_table(lines, caption):
    """Rows of cells (the first row is the header) -> an aligned Markdown table and a caption."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ['| ' + ' | '.join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                              for i, cell in enumerate(line)) + ' |' for line in lines]
    text.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    text.append(caption)
    return '\n'.join(text)

