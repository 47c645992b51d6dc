"""Multi-resolution evaluation and attention analysis for RoPE-ViT.

"Rotary Position Embedding for Vision Transformer", Heo et al., ECCV 2024, arXiv 2403.13298.
Reproduces the paper's multi-resolution tables (Tables 0.A.1-0.A.8, Fig. 3) and its attention
analysis (Figs. 1-2, section 3.3.3) for this project's checkpoints, the published
checkpoints and timm's weights of the same models, in one command.

Our own checkpoints carry their configuration (model, PE, data, training resolution):
    python eval_multires.py --checkpoint output/checkpoint.pth
Several checkpoints in one table and one plot (the user's own Fig. 3):
    python eval_multires.py --checkpoint out_ape/checkpoint.pth out_mixed/checkpoint.pth
Published or timm weights carry no configuration: name the model and give ImageNet:
    python eval_multires.py --model rope_mixed_deit_small_patch16_LS \\
        --checkpoint rope_mixed_deit_small_patch16_LS.bin --data-path /imagenet
Attention distance and entropy per layer (paper Figs. 1-2) at chosen resolutions:
    python eval_multires.py --checkpoint output/checkpoint.pth --analyze-attention \\
        --attention-images 100 --attention-resolutions 224 320 512
RoPE position policies side by side on the same weights (one row per checkpoint and policy), and
the learned RoPE-Mixed frequencies per layer (magnitudes, x/y energy ratio, angle spread):
    python eval_multires.py --checkpoint output/checkpoint.pth \
        --rope-positions extrapolate interpolate ntk yarn --analyze-frequencies
Several seeds of each configuration (checkpoints that share a label): mean +- standard deviation
per resolution in the table, mean and min-max band in the plot, the summary in multires_mean.csv:
    python eval_multires.py --checkpoint out_s{0,1,2}/checkpoint.pth --mean-over-seeds
Distributed evaluation over several processes (exact: every image counted once):
    torchrun --nproc_per_node=8 eval_multires.py --model ... --checkpoint ... --data-path /imagenet

Evaluation protocol (as the official DeiT-III and Swin evaluation code): for a test resolution r,
resize the shorter side to r / crop_ratio (bicubic), centre-crop r x r, ImageNet mean/std;
crop_ratio 1.0 for ViT and 224/256 for Swin unless --crop-ratio says otherwise. The model is
built once at its training resolution and run at every r (APE resized bicubically, RoPE at the
new integer positions, Swin window r/32); --rope-positions swaps the RoPE policy per row.

Outputs in --output-dir: multires.csv, multires.json (top-1 and top-5 per checkpoint and
resolution), multires.png (top-1 vs resolution, training resolution marked); with
--analyze-attention also attention.csv, attention.json, attention_distance.png and
attention_entropy.png; with --analyze-frequencies frequencies.csv, frequencies.json and
frequencies.png. Every file is written to a temporary name and renamed.

Attention analysis (the paper's section 3.3.3), from model.forward_with_attention: per layer, the
mean over images, heads and patch-token queries of the attention distance (sum over keys of
probability x Euclidean distance in patches between query and key; the class-token key counts as 0)
and of the attention entropy in nats (over all keys, class token included). The class token's own
query row is left out: it has no position, and the paper averages over the spatial tokens. ViT:
every layer but the last (which only feeds the class token), as the paper; every layer for a model
without a class token (global_pool='avg'). Swin: every block, with window-local distances
(positions inside the w x w window, in patches of that stage).
"""
import argparse
import csv
import io
import json
import math
import os
import sys

import torch
import torch.distributed

import cli
import data
import distributed
import evaluation
import recipes
import recovery
import rope_vit
import swin_rope
from cli import UserError

# Attention analysis resolutions when --attention-resolutions is not given (scaled like the sweep).
DEFAULT_ATTENTION_RESOLUTIONS = (224, 320, 512)


# ----------------------------------------------------------------------------------------------
# Attention metrics (the paper's section 3.3.3, Figs. 1-2)
# ----------------------------------------------------------------------------------------------

def _patch_distances(grid_hw, device, dtype):
    """Euclidean distance in patches between every pair of grid tokens: (N, N), N = H*W.

    Tokens are row-major over the (H, W) grid: token n sits at column x = n % W, row y = n // W.
    """
    grid_h, grid_w = grid_hw
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=device, dtype=dtype),
                            torch.arange(grid_w, device=device, dtype=dtype), indexing='ij')
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (N, 2) as (x, y)
    return torch.cdist(positions, positions)  # (N, N)


def _layer_metrics(attn, grid_hw, has_cls_token):
    """Mean distance and entropy of one attention map (B, heads, T, T) -> two 0-dim tensors."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f'attention must be (B, heads, T, T), got {tuple(attn.shape)}')
    num_patches = grid_hw[0] * grid_hw[1]
    num_tokens = num_patches + (1 if has_cls_token else 0)
    if attn.shape[-1] != num_tokens:
        raise ValueError(f'attention has {attn.shape[-1]} tokens but a {grid_hw[0]}x{grid_hw[1]} '
                         f'grid{" plus the class token" if has_cls_token else ""} has {num_tokens}')
    dtype = torch.promote_types(attn.dtype, torch.float32)
    first = 1 if has_cls_token else 0
    # Queries: patch tokens only. The class token has no position, and the paper averages over
    # the spatial tokens' attention ("the distance from the spatial token to the class token").
    probs = attn[:, :, first:, :].to(dtype)  # (B, heads, N, T)
    distances = _patch_distances(grid_hw, attn.device, dtype)  # (N, N)
    # Distance to the class token counts as 0, so only the patch keys are weighted.
    distance = (probs[..., first:] * distances).sum(-1)  # (B, heads, N)
    # Entropy (nats) of each query's whole distribution, class-token key included; 0 log 0 = 0.
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (B, heads, N)
    return distance.mean(), entropy.mean()


def attention_metrics(attn, grid_hw, has_cls_token=True):
    """Mean attention distance (patches) and mean attention entropy (nats), the paper's 3.3.3.

    attn: attention probabilities of one layer, (B, heads, T, T) with rows = queries summing to 1,
        or a list of such tensors, one per layer. T = N (+1 with a class token at index 0); the N
        patch tokens are row-major over grid_hw = (H, W) (token n: x = n % W, y = n // W).
    Distance of a query = sum over keys of probability x Euclidean distance between the query's and
    the key's grid positions (in patches); the class-token key counts as distance 0.
    Entropy of a query = -sum over all keys (class token included) of p log p.
    Both are averaged over batch, heads and the patch-token queries; the class token's own query
    row is excluded (it has no position; the paper averages over spatial tokens).
    Returns (distance, entropy): 0-dim tensors for one tensor, (L,) tensors for a list of L.
    Float64 input stays float64; lower precisions are computed in float32.
    """
    if isinstance(attn, torch.Tensor):
        return _layer_metrics(attn, grid_hw, has_cls_token)
    per_layer = [_layer_metrics(a, grid_hw, has_cls_token) for a in attn]
    if not per_layer:
        raise ValueError('attention_metrics needs at least one layer')
    return torch.stack([d for d, _ in per_layer]), torch.stack([e for _, e in per_layer])


def attention_layers(model, images):
    """Per analysed layer: (name, distance, entropy) for one batch, via model.forward_with_attention.

    ViT: every block but the last (the last only feeds the class token, which the paper leaves
    out); every block without a class token. Swin: every block, window-local (distances inside a
    w x w window in patches of that stage); its head mean-pools all tokens, so the last block is
    not special.
    """
    _, attn = model.forward_with_attention(images)
    out = []
    if attn and isinstance(attn[0], dict):  # Swin: one dict per block
        for index, block in enumerate(attn):
            w = int(block['window'])
            d, e = attention_metrics(block['attn'], (w, w), has_cls_token=False)
            out.append((f'stage {block["stage"]} block {index}', d, e))
        return out
    height, width = images.shape[-2:]
    patch = model.patch_size if isinstance(model.patch_size, int) else model.patch_size[0]
    grid_hw = (height // patch, width // patch)
    num_patches = grid_hw[0] * grid_hw[1]
    has_cls = attn[0].shape[-1] == num_patches + 1
    for index, layer_attn in enumerate(attn[:-1] if has_cls else attn):
        d, e = attention_metrics(layer_attn, grid_hw, has_cls_token=has_cls)
        out.append((f'layer {index + 1}', d, e))
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def analyze_attention(model, cfg, resolutions, num_images, batch_size, device, amp_dtype=None,
                      data_path=None, crop_ratio=None, progress=True, label=None):
    """Mean attention distance and entropy per layer over the first `num_images` validation images.

    Returns {resolution: {'layers': [name], 'distance': [float], 'entropy': [float], 'n': int}}.
    Under torchrun the images are sharded over processes and the sums all-reduced.
    """
    _, world_size = distributed.rank_and_world()
    model.eval()
    desc_base = label or evaluation.config_label(cfg)
    out = {}
    for resolution in resolutions:
        model.check_img_size(resolution, resolution)
        dataset = data.build_eval_dataset(cfg, resolution, data_path=data_path,
                                           crop_ratio=crop_ratio)
        count = min(num_images, len(dataset))
        first = torch.utils.data.Subset(dataset, range(count))
        loader = evaluation.Progress(data.build_eval_loader(first, batch_size), count,
                                 f'{desc_base} attention @ {resolution}', world_size,
                                 enabled=progress and distributed.is_main_process())
        names, sums, seen = None, None, 0
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                             enabled=amp_dtype is not None):
            for images, targets in loader:
                images = images[targets >= 0]  # undecodable folder images come back as target -1
                if not len(images):
                    continue
                images = images.to(device, non_blocking=True)
                layers = attention_layers(model, images)
                batch_sums = torch.tensor([[float(d), float(e)] for _, d, e in layers],
                                          dtype=torch.float64, device=device) * len(images)
                names = names or [name for name, _, _ in layers]
                sums = batch_sums if sums is None else sums + batch_sums
                seen += len(images)
        if world_size > 1:
            # A rank with an empty shard still needs a tensor of the right shape for all_reduce.
            num_layers = int(distributed.max_over_ranks(
                [0 if sums is None else sums.shape[0]], device)[0])
            if sums is None:
                sums = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
            distributed.all_reduce_sum(sums)
            seen = int(distributed.all_reduce_sum(
                torch.tensor([seen], dtype=torch.float64, device=device)).item())
        if not seen:
            raise UserError(f'no validation images for the attention analysis at {resolution}')
        if names is None:  # this rank had no images; the layer names depend only on the model
            names = [f'layer {i + 1}' for i in range(sums.shape[0])]
        means = (sums / seen).cpu()
        out[int(resolution)] = {'layers': names, 'distance': means[:, 0].tolist(),
                                'entropy': means[:, 1].tolist(), 'n': seen}
    return out


# ----------------------------------------------------------------------------------------------
# Tables, files and plots
# ----------------------------------------------------------------------------------------------

def format_attention_table(analysis, metric):
    """Rows = (checkpoint, resolution), columns = layers; `metric` is 'distance' or 'entropy'."""
    lines = []
    for label, per_res in analysis.items():
        for resolution, stats in per_res.items():
            lines.append([f'{label} @ {resolution}'] + [f'{v:.3f}' for v in stats[metric]])
    num_layers = max(len(line) - 1 for line in lines)
    header = [f'{metric} \\ layer'] + [str(i + 1) for i in range(num_layers)]
    lines = [header] + [line + [''] * (num_layers + 1 - len(line)) for line in lines]
    unit = 'patches' if metric == 'distance' else 'nats'
    return evaluation.markdown_table(lines, f'mean attention {metric} ({unit}) per layer')


class _AtomicFiles:
    """Collects output files in temporary names; commit() renames them all, discard() removes them.

    Nothing half-written stays on disk: a file either has its full content under its final name
    or does not exist.
    """

    def __init__(self, directory):
        self.directory = directory
        self.pending = []  # (temporary path, final path)

    def path(self, name):
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f'.{name}.tmp{os.getpid()}')
        self.pending.append((tmp, final))
        return tmp

    def write_text(self, name, text):
        with open(self.path(name), 'w', newline='') as f:
            f.write(text)

    def commit(self):
        for tmp, final in self.pending:
            os.replace(tmp, final)
        self.pending = []

    def discard(self):
        for tmp, _ in self.pending:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.pending = []


def _accuracy_csv(entries, results):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['label', 'checkpoint', 'model', 'pe', 'rope_positions', 'train_resolution',
                     'crop_ratio', 'resolution', 'top1', 'top5', 'loss', 'n'])
    for entry in entries:
        for row in results[entry['label']]:
            writer.writerow([entry['label'], entry['checkpoint'], entry['model_name'],
                             entry['cfg'].get('pe'), entry['rope_positions'] or '',
                             entry['train_resolution'], entry['crop_ratio'], row['resolution'],
                             repr(row['top1']), repr(row['top5']), repr(row['loss']), row['n']])
    return buffer.getvalue()


def _accuracy_json(entries, results, summary=None):
    out = {'checkpoints': [
        {'label': entry['label'], 'checkpoint': entry['checkpoint'], 'model': entry['model_name'],
         'pe': entry['cfg'].get('pe'), 'rope_positions': entry['rope_positions'],
         'train_resolution': entry['train_resolution'], 'crop_ratio': entry['crop_ratio'],
         **({'group': entry['group']} if summary else {}), 'results': results[entry['label']]}
        for entry in entries]}
    if summary:
        out['means'] = [{'label': group, 'results': rows} for group, rows in summary.items()]
    return json.dumps(out, indent=2) + '\n'


def _attention_csv(analysis):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['label', 'resolution', 'layer', 'layer_name', 'distance', 'entropy', 'n'])
    for label, per_res in analysis.items():
        for resolution, stats in per_res.items():
            for i, name in enumerate(stats['layers']):
                writer.writerow([label, resolution, i + 1, name, repr(stats['distance'][i]),
                                 repr(stats['entropy'][i]), stats['n']])
    return buffer.getvalue()


def _new_figure(width, height):
    # A bare Figure (no pyplot) renders with the Agg canvas and leaves the global backend alone.
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=120, layout='constrained')


def seed_summary(entries, results):
    """{group: rows} for --mean-over-seeds: per group (runs that share a label, in the order the
    groups first appear) and per resolution that every run of it has, the mean, sample standard
    deviation (0 for one run), min and max of top-1 over the runs, and the mean top-5."""
    members = {}   # group -> one {resolution: row} per run
    for entry in entries:
        rows = {row['resolution']: row for row in results[entry['label']]}
        members.setdefault(entry['group'], []).append(rows)
    summary = {}
    for group, runs in members.items():
        summary[group] = []
        for r in sorted(set.intersection(*(set(rows) for rows in runs))):
            top1 = torch.tensor([rows[r]['top1'] for rows in runs], dtype=torch.float64)
            top5 = [rows[r]['top5'] for rows in runs]
            summary[group].append({
                'resolution': r, 'top1': top1.mean().item(),
                'top1_sd': top1.std().item() if len(runs) > 1 else 0.0,
                'top1_min': top1.min().item(), 'top1_max': top1.max().item(),
                'top5': sum(top5) / len(top5), 'runs': len(runs)})
    return summary


def _summary_csv(summary):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['label', 'runs', 'resolution', 'top1_mean', 'top1_sd', 'top1_min', 'top1_max',
                     'top5_mean'])
    for group, rows in summary.items():
        for row in rows:
            writer.writerow([group, row['runs'], row['resolution'], repr(row['top1']),
                             repr(row['top1_sd']), repr(row['top1_min']), repr(row['top1_max']),
                             repr(row['top5'])])
    return buffer.getvalue()


def _plot_accuracy(results, train_res, path):
    """Top-1 vs test resolution, one line per checkpoint (or per group of seeds: the mean, with
    the min-max band shaded), training resolution(s) dashed."""
    fig = _new_figure(7, 4.5)
    ax = fig.add_subplot()
    for label, rows in results.items():
        x = [r['resolution'] for r in rows]
        line, = ax.plot(x, [r['top1'] for r in rows], marker='o', label=label)
        if rows and 'top1_min' in rows[0]:
            ax.fill_between(x, [r['top1_min'] for r in rows], [r['top1_max'] for r in rows],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    resolutions = sorted({r['resolution'] for rows in results.values() for r in rows})
    for i, res in enumerate(sorted(set(train_res.values()))):
        ax.axvline(res, color='gray', linestyle='--', linewidth=1,
                   label='training resolution' if i == 0 else None)
    ax.set_xticks(resolutions)
    ax.set_xlabel('test resolution (px)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title('Multi-resolution accuracy')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format='png')


def _plot_attention(analysis, metric, path):
    """One panel per resolution, layer on x, one line per checkpoint (paper Figs. 1-2)."""
    resolutions = sorted({r for per_res in analysis.values() for r in per_res})
    fig = _new_figure(4.2 * len(resolutions), 3.6)
    axes = fig.subplots(1, len(resolutions), squeeze=False)[0]
    for ax, resolution in zip(axes, resolutions):
        for label, per_res in analysis.items():
            if resolution in per_res:
                values = per_res[resolution][metric]
                ax.plot(range(1, len(values) + 1), values, marker='o', label=label)
                ax.set_xticks(range(1, len(values) + 1))
        ax.set_title(f'{resolution} x {resolution}')
        ax.set_xlabel('layer')
        ax.set_ylabel(f'attention {metric} ({"patches" if metric == "distance" else "nats"})')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, format='png')


# ----------------------------------------------------------------------------------------------
# Learned RoPE-Mixed frequencies (--analyze-frequencies)
# ----------------------------------------------------------------------------------------------

def mixed_frequency_layers(model):
    """[(layer name, (2, n) tensor of (theta^x, theta^y))] of a RoPE-Mixed model, or [] without one.

    ViT: one row per block (heads x D/2 frequencies); Swin: one per block of every stage.
    """
    if getattr(model, 'rope_kind', None) != 'mixed':
        return []
    if isinstance(model, swin_rope.SwinTransformer):  # rope_freqs (2, nH, d/2) per block
        return [(f'stage {s + 1} block {b + 1}', blk.attn.rope_freqs.detach().float().cpu().flatten(1))
                for s, stage in enumerate(model.layers) for b, blk in enumerate(stage.blocks)]
    # rope_vit: freqs (2, L, heads * D/2)
    return [(f'block {i + 1}', f) for i, f in enumerate(model.freqs.detach().float().cpu().unbind(1))]


def frequency_statistics(freqs):
    """Magnitudes and directions of one layer's frequencies f = (theta^x, theta^y) (Eq. 14), freqs (2, n).

    * xy_energy_ratio = sum (theta^x)^2 / sum (theta^y)^2: exactly 1 at the paper's init (each
      head's pairs t and D/4 + t point at a and a + 90 degrees with equal magnitude), so its
      distance from 1 is anisotropy learned along the image axes.
    * angle_spread = 1 - |sum |f|^2 e^{2i alpha}| / sum |f|^2 with alpha the direction of f (mod
      180 degrees, hence the doubled angle): 1 when the energy is spread evenly over directions
      (again exactly 1 at init), 0 when every frequency lies on one line. It is rotation-invariant:
      2 lambda_min / (lambda_min + lambda_max) of the 2 x 2 matrix sum f f^T.
    * principal_direction: the direction (degrees, 0 = x axis) holding the most energy.
    """
    fx, fy = freqs.double()
    magnitude = torch.sqrt(fx ** 2 + fy ** 2)
    energy = (magnitude ** 2).sum()
    doubled = torch.complex(fx, fy) ** 2  # |f|^2 e^{2i alpha}
    resultant = doubled.sum()
    return {'count': int(fx.numel()),
            'magnitude_mean': magnitude.mean().item(), 'magnitude_min': magnitude.min().item(),
            'magnitude_max': magnitude.max().item(),
            'xy_energy_ratio': ((fx ** 2).sum() / (fy ** 2).sum()).item(),
            'angle_spread': (1 - resultant.abs() / energy).item(),
            'principal_direction': (math.degrees(torch.angle(resultant).item() / 2) % 180
                                    if resultant.abs() > 1e-6 * energy else None)}  # none when isotropic


def analyze_frequencies(model):
    """[dict(layer, name, **frequency_statistics)] per layer of a RoPE-Mixed model ([] otherwise)."""
    return [dict(layer=i + 1, name=name, **frequency_statistics(f))
            for i, (name, f) in enumerate(mixed_frequency_layers(model))]


def format_frequency_table(analysis):
    """analysis {label: {'checkpoint', 'layers': analyze_frequencies(model)}} -> one row per layer."""
    lines = [['model / layer', 'n', '|f| mean', '|f| min', '|f| max', 'x/y energy', 'angle spread',
              'main dir (deg)']]
    for label, found in analysis.items():
        for row in found['layers']:
            lines.append([f"{label} / {row['name']}", str(row['count']), f"{row['magnitude_mean']:.3f}",
                          f"{row['magnitude_min']:.3f}", f"{row['magnitude_max']:.3f}",
                          f"{row['xy_energy_ratio']:.3f}", f"{row['angle_spread']:.3f}",
                          '-' if row['principal_direction'] is None else f"{row['principal_direction']:.0f}"])
    return evaluation.markdown_table(lines, 'learned RoPE-Mixed frequencies per layer; at init x/y energy '
                                       '= 1 and angle spread = 1 exactly (isotropic)')


def _frequency_csv(analysis):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    keys = ['count', 'magnitude_mean', 'magnitude_min', 'magnitude_max', 'xy_energy_ratio',
            'angle_spread', 'principal_direction']
    writer.writerow(['label', 'checkpoint', 'layer', 'layer_name'] + keys)
    for label, found in analysis.items():
        for row in found['layers']:
            writer.writerow([label, found['checkpoint'], row['layer'], row['name']]
                            + [repr(row[k]) for k in keys])
    return buffer.getvalue()


def _plot_frequencies(analysis, path):
    """x/y energy ratio (log scale) and angle spread per layer, one line per checkpoint."""
    fig = _new_figure(9, 3.8)
    ratio_ax, spread_ax = fig.subplots(1, 2)
    for label, found in analysis.items():
        layers = found['layers']
        x = [row['layer'] for row in layers]
        ratio_ax.plot(x, [row['xy_energy_ratio'] for row in layers], marker='o', label=label)
        spread_ax.plot(x, [row['angle_spread'] for row in layers], marker='o', label=label)
    ratio_ax.set_yscale('log')
    ratio_ax.axhline(1, color='gray', linestyle='--', linewidth=1, label='init (isotropic)')
    spread_ax.axhline(1, color='gray', linestyle='--', linewidth=1, label='init (isotropic)')
    ratio_ax.set_ylabel('x / y frequency energy')
    spread_ax.set_ylabel('angle spread (1 = even, 0 = one line)')
    for ax in (ratio_ax, spread_ax):
        ax.set_xlabel('layer')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle('Learned RoPE-Mixed frequencies')
    fig.savefig(path, format='png')


# ----------------------------------------------------------------------------------------------
# Loading checkpoints
# ----------------------------------------------------------------------------------------------

def _one_line(message):
    return ' '.join(str(message).split())


def published_config(name, checkpoint, args):
    """A configuration for weights that carry none (published / timm): ImageNet-style folder data."""
    state_dict = recovery.unwrap_state_dict(checkpoint)
    head = state_dict.get('head.weight')
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else 1000
    family = evaluation.model_family(name)
    return {
        'model': name, 'pe': None, 'model_kwargs': {'num_classes': num_classes},
        'img_size': evaluation.PAPER_TRAIN_RESOLUTION, 'num_classes': num_classes,
        'dataset': 'folder', 'data_path': args.data_path,
        'eval_crop_ratio': 224 / 256 if family == 'swin' else 1.0,
        'recipe': 'swin' if family == 'swin' else 'deit3',
    }


def _load_entry(path, model_name, args):
    """Read one checkpoint and build its model: dict(label, cfg, model, ...). Raises UserError.

    model_name: None for this project's checkpoints (configuration stored inside), else the
    architecture of published / timm weights.
    """
    checkpoint = recovery.read_checkpoint(path)  # torch.load(weights_only=True) or safetensors
    if not isinstance(checkpoint, dict):
        raise UserError(f'checkpoint {path} does not hold a state dict')
    if model_name:
        cfg = published_config(model_name, checkpoint, args)
    elif isinstance(checkpoint.get('args'), dict):
        cfg = dict(checkpoint['args'])
        if args.data_path is not None:  # e.g. a model trained on ImageNet, now at another path
            cfg.update(dataset='folder', data_path=args.data_path)
    else:
        raise UserError(f'checkpoint {path} stores no configuration (args); for published or timm '
                        f'weights name the architecture with --model (one of: '
                        f'{", ".join(rope_vit.list_models() + swin_rope.list_models())})')
    if args.rpb_resize is not None:
        if evaluation.model_family(cfg['model']) != 'swin':
            raise UserError('--rpb-resize applies to Swin models only')
        cfg['model_kwargs'] = dict(cfg.get('model_kwargs') or {}, rpb_resize=args.rpb_resize)
    model = recipes.build_model(cfg)
    try:
        recipes.model_module(cfg['model']).load_checkpoint(model, checkpoint, strict=True)
    except ValueError as error:
        raise UserError(f'checkpoint {path} does not fit {cfg["model"]}: {_one_line(error)}')
    if cfg.get('pe') is None:
        cfg['pe'] = model.pe
    if cfg.get('data_path') is None and args.data_path is None and cfg.get('dataset') == 'folder':
        raise UserError(f'{path} was trained on folder data without a stored path: give '
                        '--data-path (the ImageNet-style folder with val/)')
    crop_ratio = args.crop_ratio if args.crop_ratio is not None else cfg.get('eval_crop_ratio')
    return {'checkpoint': path, 'cfg': cfg, 'model': model, 'model_name': cfg['model'],
            'label': evaluation.config_label(cfg), 'train_resolution': evaluation.training_resolution(cfg),
            'crop_ratio': crop_ratio}


def _allowed(entry, resolutions):
    """The default resolutions the model accepts (a Swin built at an unusual size or window may
    reject some scaled ones); the dropped ones are named on stderr."""
    kept, dropped = [], []
    for r in resolutions:
        try:
            entry['model'].check_img_size(r, r)
            kept.append(r)
        except ValueError:
            dropped.append(r)
    if dropped:
        print(f'note: {entry["label"]}: skipping default resolutions {dropped} '
              '(not allowed by the architecture)', file=sys.stderr)
    if not kept:
        raise UserError(f'no default resolution is allowed for {entry["label"]}; give --resolutions')
    return kept


def _check_resolutions(entry, resolutions, what):
    """Validate every resolution with the model's own rule before any work is done."""
    for r in resolutions:
        try:
            entry['model'].check_img_size(r, r)
        except ValueError as error:
            raise UserError(f'{what} {r} is not allowed for {entry["label"]} '
                            f'({entry["checkpoint"]}): {_one_line(error)}')


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def get_args_parser():
    parser = argparse.ArgumentParser(
        'eval_multires.py', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', nargs='+', required=True, metavar='F',
                        help="one or several checkpoints: this project's (configuration stored "
                             'inside), or published / timm weights together with --model')
    parser.add_argument('--model', nargs='+', default=None, metavar='NAME',
                        help='architecture for weights without a stored configuration (published '
                             'or timm), e.g. rope_mixed_deit_small_patch16_LS or '
                             'swin_rope_mixed_tiny_patch4_window7_224: one name for every '
                             '--checkpoint, or one name per checkpoint')
    parser.add_argument('--labels', nargs='+', default=None, metavar='L',
                        help='row labels, one per checkpoint (default: from the configuration, '
                             'e.g. "ViT-S RoPE-Mixed")')
    parser.add_argument('--data-path', default=None, metavar='DIR',
                        help='ImageNet-style folder with val/<class>/*; default: the data the '
                             'checkpoint was trained on (built-in shapes if none)')
    parser.add_argument('--resolutions', nargs='+', type=int, default=None, metavar='R',
                        help="test resolutions (default: the paper's list for the family, scaled "
                             'to the training resolution)')
    parser.add_argument('--crop-ratio', type=float, default=None,
                        help='resize the shorter side to r / crop_ratio, then centre-crop r '
                             '(default: the checkpoint\'s; ViT 1.0, Swin 224/256)')
    parser.add_argument('--rpb-resize', choices=('bicubic', 'zero_pad'), default=None,
                        help="Swin RPB tables at a larger window: bicubic (the official "
                             "evaluation code) or zero_pad (the paper's text); default: the "
                             "checkpoint's")
    parser.add_argument('--batch-size', type=int, default=None,
                        help="images per process and step (default: the checkpoint's evaluation "
                             'batch size, else 64)')
    parser.add_argument('--num-workers', type=int, default=None,
                        help="data loader workers per process (default: the checkpoint's, else 4)")
    parser.add_argument('--amp', choices=('auto', 'none', 'bf16', 'fp16'), default='auto',
                        help='autocast dtype; auto (default) = bf16 on CUDA, none on CPU')
    parser.add_argument('--output-dir', default='output/multires', metavar='DIR',
                        help='where the CSV, JSON and PNG files go (default: %(default)s)')
    parser.add_argument('--analyze-attention', action='store_true',
                        help='also measure mean attention distance and entropy per layer '
                             '(paper Figs. 1-2)')
    parser.add_argument('--attention-only', action='store_true',
                        help='skip the accuracy sweep (implies --analyze-attention)')
    parser.add_argument('--attention-images', type=int, default=100, metavar='N',
                        help='validation images for the attention analysis (default: %(default)s)')
    parser.add_argument('--attention-resolutions', nargs='+', type=int, default=None, metavar='R',
                        help='resolutions for the attention analysis (default: 224 320 512, '
                             'scaled to the training resolution)')
    parser.add_argument('--attention-batch-size', type=int, default=8,
                        help='images per step in the attention analysis (it keeps every '
                             "layer's full attention map; default: %(default)s)")
    parser.add_argument('--rope-positions', nargs='+', default=None, metavar='P',
                        choices=rope_vit.ROPE_POSITIONS,
                        help='evaluate every RoPE checkpoint under each of these position policies '
                             f'({", ".join(rope_vit.ROPE_POSITIONS)}; one row each, the same weights); '
                             'APE / RPB checkpoints appear once. Default: the checkpoint\'s own '
                             '(extrapolate, the paper\'s protocol)')
    parser.add_argument('--analyze-frequencies', action='store_true',
                        help='for RoPE-Mixed checkpoints: per layer, the learned frequencies\' '
                             'magnitudes, x/y energy ratio and angle spread (table, CSV, plot)')
    parser.add_argument('--mean-over-seeds', action='store_true',
                        help='checkpoints that share a label (their own, or one given with '
                             '--labels) are runs of one configuration with different seeds: the '
                             'table shows mean +- standard deviation over them, the plot the mean '
                             'with a min-max band; multires_mean.csv holds the summary')
    parser.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    return parser


def amp_dtype_from_flag(amp, device):
    if amp == 'auto':
        amp = 'bf16' if device.type == 'cuda' else 'none'
    return evaluation.amp_dtype_from_flag(amp)


# Every int / float flag (test_train.py checks that none is missing).
EVAL_LIMITS = {
    'resolutions': cli.POSITIVE, 'crop_ratio': cli.Limit(0, 1, low_open=True),
    'batch_size': cli.POSITIVE, 'num_workers': cli.NON_NEGATIVE,
    'attention_images': cli.POSITIVE, 'attention_resolutions': cli.POSITIVE,
    'attention_batch_size': cli.POSITIVE,
}


def _check_args(args):
    cli.check_limits(vars(args), EVAL_LIMITS)
    if args.model is not None and len(args.model) not in (1, len(args.checkpoint)):
        raise UserError(f'--model needs one name, or one per checkpoint ({len(args.checkpoint)}), '
                        f'got {len(args.model)}')
    if args.model is not None and args.data_path is None:
        raise UserError('--model (published or timm weights) needs --data-path: the ImageNet-style '
                        'folder with val/<class>/*')
    if args.labels is not None and len(args.labels) != len(args.checkpoint):
        raise UserError(f'--labels needs one label per checkpoint ({len(args.checkpoint)}), '
                        f'got {len(args.labels)}')
    if args.data_path is not None and not os.path.isdir(os.path.join(args.data_path, 'val')):
        raise UserError(f'--data-path {args.data_path} has no val/ folder')
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f'--output-dir {args.output_dir} exists and is not a folder')


def _unique_labels(entries):
    """Disambiguate equal labels with the checkpoint's folder (or file) name."""
    counts = {}
    for entry in entries:
        counts[entry['label']] = counts.get(entry['label'], 0) + 1
    seen = set()
    for entry in entries:
        if counts[entry['label']] > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(entry['checkpoint'])))
            entry['label'] = f'{entry["label"]} ({parent or entry["checkpoint"]})'
        label, n = entry['label'], 2
        while entry['label'] in seen:
            entry['label'], n = f'{label} #{n}', n + 1
        seen.add(entry['label'])


def main(args):
    """Evaluate every --checkpoint over its resolutions (and the attention analysis), print the
    tables and write the files. Returns (results {label: rows}, analysis {label: {res: stats}}).
    A torchrun worker whose torchrun is gone stops as on SIGTERM (recovery.guarded_run)."""
    with recovery.guarded_run():
        return run_evaluation(args)


def run_evaluation(args):
    _check_args(args)
    if args.attention_only:
        args.analyze_attention = True
    # Everything that can be wrong with the input is checked before any evaluation.
    names = (args.model * len(args.checkpoint) if args.model and len(args.model) == 1
             else args.model or [None] * len(args.checkpoint))
    entries = [_load_entry(path, name, args) for path, name in zip(args.checkpoint, names)]
    if args.labels:
        for entry, label in zip(entries, args.labels):
            entry['label'] = label
    for entry in entries:
        entry['group'] = entry['label'] if args.mean_over_seeds else None
    _unique_labels(entries)
    for entry in entries:
        if args.resolutions:
            entry['resolutions'] = sorted(set(args.resolutions))
            _check_resolutions(entry, entry['resolutions'], 'resolution')
        else:
            entry['resolutions'] = _allowed(entry, evaluation.default_resolutions(entry['cfg']))
        if args.analyze_attention:
            if args.attention_resolutions:
                entry['attention_resolutions'] = sorted(set(args.attention_resolutions))
                _check_resolutions(entry, entry['attention_resolutions'], 'attention resolution')
            else:
                entry['attention_resolutions'] = _allowed(
                    entry, evaluation.scaled_resolutions(entry['cfg'], DEFAULT_ATTENTION_RESOLUTIONS))
            if not hasattr(entry['model'], 'forward_with_attention'):
                raise UserError(f'{entry["model_name"]} has no forward_with_attention: '
                                'attention analysis is not available for it')
        # Building the validation set once checks that the data exists (an error otherwise).
        dataset = data.build_eval_dataset(entry['cfg'], entry['resolutions'][0],
                                           data_path=args.data_path, crop_ratio=entry['crop_ratio'])
        classes = getattr(dataset, 'classes', None)
        if classes is not None and len(classes) != entry['model'].num_classes:
            raise UserError(f'the validation data has {len(classes)} classes but {entry["label"]} '
                            f'({entry["checkpoint"]}) predicts {entry["model"].num_classes}')
        entry['batch_size'] = args.batch_size or entry['cfg'].get('eval_batch_size') or 64
        entry['num_workers'] = (args.num_workers if args.num_workers is not None
                                else entry['cfg'].get('num_workers', 4))
    runs = _policy_runs(entries, args.rope_positions)
    frequencies = {}
    if args.analyze_frequencies:
        for entry in entries:
            layers = analyze_frequencies(entry['model'])
            if layers:
                frequencies[entry['label']] = {'checkpoint': entry['checkpoint'], 'layers': layers}
            elif not args.quiet:
                print(f"note: {entry['label']} has no learned RoPE-Mixed frequencies; "
                      '--analyze-frequencies skips it', file=sys.stderr)

    dist_info = distributed.init_distributed()
    try:
        device = dist_info.device
        amp_dtype = amp_dtype_from_flag(args.amp, device)
        results, analysis = {}, {}
        for entry in runs:
            model = entry['model'].to(device)
            if entry['rope_positions'] is not None:
                model.rope_positions = entry['rope_positions']
            if not args.attention_only:
                results[entry['label']] = evaluation.evaluate_resolutions(
                    model, entry['cfg'], entry['resolutions'], entry['batch_size'], device,
                    amp_dtype=amp_dtype, data_path=args.data_path, crop_ratio=entry['crop_ratio'],
                    progress=not args.quiet, num_workers=entry['num_workers'], label=entry['label'])
            if args.analyze_attention:
                analysis[entry['label']] = analyze_attention(
                    model, entry['cfg'], entry['attention_resolutions'], args.attention_images,
                    args.attention_batch_size, device, amp_dtype=amp_dtype,
                    data_path=args.data_path, crop_ratio=entry['crop_ratio'],
                    progress=not args.quiet, label=entry['label'])
            entry['model'] = model.cpu()
        if distributed.is_main_process():
            _report(runs, results, analysis, args.output_dir, frequencies)
    finally:
        if dist_info.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return results, analysis


def _policy_runs(entries, policies):
    """One evaluation per (checkpoint, position policy): RoPE checkpoints once per policy (label
    "<label> <policy>"), the others once; each carries its rope_positions (None without RoPE)."""
    runs = []
    for entry in entries:
        own = getattr(entry['model'], 'rope_positions', None) if 'rope' in str(entry['cfg'].get('pe')) else None
        if own is None or not policies:
            runs.append(dict(entry, rope_positions=own))
        else:
            runs.extend(dict(entry, label=f"{entry['label']} {policy}", rope_positions=policy,
                             group=entry['group'] and f"{entry['group']} {policy}")
                        for policy in policies)
    return runs


def _report(entries, results, analysis, output_dir, frequencies=None):
    """Print the tables and write every output file (all or none)."""
    train_res = {entry['label']: entry['train_resolution'] for entry in entries}
    summary = None
    if results and entries[0].get('group') is not None:
        summary = seed_summary(entries, results)
        train_res = {entry['group']: entry['train_resolution'] for entry in entries}
    shared = set(train_res.values())
    if results:
        print(evaluation.format_table(summary or results,
                                 shared.pop() if len(shared) == 1 else train_res))
    for metric in ('distance', 'entropy'):
        if analysis:
            print()
            print(format_attention_table(analysis, metric))
    if frequencies:
        print()
        print(format_frequency_table(frequencies))
    os.makedirs(output_dir, exist_ok=True)
    files = _AtomicFiles(output_dir)
    try:
        if results:
            files.write_text('multires.csv', _accuracy_csv(entries, results))
            files.write_text('multires.json', _accuracy_json(entries, results, summary))
            if summary:
                files.write_text('multires_mean.csv', _summary_csv(summary))
            _plot_accuracy(summary or results, train_res, files.path('multires.png'))
        if analysis:
            files.write_text('attention.csv', _attention_csv(analysis))
            files.write_text('attention.json', json.dumps(
                {label: {str(r): stats for r, stats in per_res.items()}
                 for label, per_res in analysis.items()}, indent=2) + '\n')
            for metric in ('distance', 'entropy'):
                _plot_attention(analysis, metric, files.path(f'attention_{metric}.png'))
        if frequencies:
            files.write_text('frequencies.csv', _frequency_csv(frequencies))
            files.write_text('frequencies.json', json.dumps(frequencies, indent=2) + '\n')
            _plot_frequencies(frequencies, files.path('frequencies.png'))
        names = [os.path.basename(final) for _, final in files.pending]
        if not names:
            return
        files.commit()
    except BaseException:
        files.discard()
        raise
    print(f'wrote {", ".join(names)} to {output_dir}', file=sys.stderr)


if __name__ == '__main__':
    cli.cli(main, get_args_parser())
