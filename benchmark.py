"""Speed and memory of the position embeddings: ours (every --pe) and timm's peers, side by side.

CPU, as docs/performance.md's table (2 threads, ViT-S/16 and Swin-T, batch 4):
    python benchmark.py --threads 2 --batch-size 4 --resolutions 224 384 --reps 9 --peers --wait-quiet 120
Quick look at one variant pair:
    python benchmark.py --family vit --vit-pe ape rope_mixed --resolutions 224 --reps 3
ViT-B as a ViTDet-style detection backbone at 1024 x 1024 (14-patch windows, 4 global blocks) vs global:
    python benchmark.py --family vit --vit-model vit_base --vit-pe ape rope_mixed --vit-window 14 \\
        --resolutions 1024 --modes infer --batch-size 1 --reps 3 --warmup 1 --no-profile
One GPU (bf16 autocast; adds model FLOPs and MFU against the GPU's peak; not yet run on a GPU):
    python benchmark.py --device cuda --family vit --vit-model vit_base --batch-size 256 \\
        --resolutions 224 --modes train --peers

What is measured, per resolution and mode (`infer`: forward under inference_mode in eval mode;
`train`: forward, cross-entropy, backward and an AdamW step in train mode, drop-path off):
  * time: every model is built once, warmed up, then timed in interleaved repetitions (each
    repetition runs every model once, in a rotated order), all in this one process. Reported:
    median and minimum per step, the spread (interquartile range / median) and images/s from
    the minimum. Ratios (vs APE / RPB, vs timm) are ratios of minima: the minimum is the run
    least disturbed by other work on the machine.
  * RoPE share: one extra step under torch.profiler. Counted as RoPE: the time inside
    `record_function('rope')` ranges (our models label their table building and rotation so)
    plus the backward of every op recorded inside such a range (matched by autograd sequence
    number), over the whole step. timm's code is labelled here from outside (its rotation and
    table functions only, not the class-token slicing and concatenation around them), so its
    share is a lower bound. The profiler adds a few microseconds per op, which inflates the
    share of code made of many small ops. Our rotation's backward also writes the gradient of
    the head split (a layout copy every ViT runs, outside RoPE in the APE model), so our share
    is an upper bound of RoPE's extra cost; the time ratio to APE is the direct measure.
  * peak memory: on CPU, one extra step under torch.profiler(profile_memory=True): the bytes
    live at the step's start (weights, optimizer state, input) plus the highest running sum of
    the allocations and frees torch's CPU allocator reported during the step (activations,
    gradients, temporaries). This counts tensors, not RSS: allocator caching and fragmentation
    are excluded, which is what makes models comparable. On CUDA: the same start bytes plus
    torch.cuda.max_memory_allocated() over the step minus the bytes allocated before it.
  * machine load: the CPU time other processes used during the timed loop, from /proc/stat
    (all CPUs) minus this process's own time (/proc/self/stat), in cores. `--wait-quiet S`
    waits (at most S seconds over the whole run) before every timed loop until that load has
    stayed below --quiet-threshold for one sample window.
"""
import argparse
import math
import os
import platform
import re
import statistics
import sys
import time

# torch's profiler library (kineto) writes two lines to stderr per profiled step, and on a machine
# without a GPU an error line about the GPU count: they would bury the tables. Level 6 silences
# it (read when the profiler first starts; a value already in the environment wins).
os.environ.setdefault('KINETO_LOG_LEVEL', '6')
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from cli import HelpFormatter, UserError, cli
from recipes import build_model, param_groups

VIT_PE = ('ape', 'rope_axial', 'rope_mixed', 'rope_axial_ape', 'rope_mixed_ape')
SWIN_PE = ('rpb', 'rope_axial', 'rope_mixed', 'rope_mixed_rpb')
BASELINE = {'vit': 'ape', 'swin': 'rpb'}  # the variant every other one is divided by
WINDOW_TAG = '+window'  # label suffix of a ViTDet-style (windowed) ViT: 'rope_mixed+window14'
# timm models with the same architecture and PE; {size} is small / base / tiny ...
TIMM_PEERS = {
    'vit': {'ape': 'deit3_{size}_patch16_224', 'rope_axial': 'vit_{size}_patch16_rope_224',
            'rope_mixed': 'vit_{size}_patch16_rope_mixed_224', 'rope_axial_ape': 'vit_{size}_patch16_rope_ape_224',
            'rope_mixed_ape': 'vit_{size}_patch16_rope_mixed_ape_224'},
    'swin': {'rpb': 'swin_{size}_patch4_window7_224'},
}
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the
# device name; --peak-tflops overrides.
GPU_PEAK_TFLOPS = (('H200', 989.0), ('H100 PCIe', 756.0), ('H100', 989.0), ('A100', 312.0),
                   ('L40S', 362.0), ('A10G', 70.0), ('A10', 125.0), ('L4', 121.0), ('4090', 165.0))
MiB = 2 ** 20


# ----------------------------------------------------------------------------------------------
# Machine load

def _cpu_ticks():
    """(busy ticks of all CPUs from /proc/stat, this process's user+system ticks), or None."""
    try:
        with open('/proc/stat') as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open('/proc/self/stat') as f:
            own = f.read().rsplit(')', 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # utime, stime (fields 14, 15)


class LoadMeter:
    """Other processes' CPU use (in cores) between start() and stop()."""

    def start(self):
        self._t, self._ticks = time.perf_counter(), _cpu_ticks()
        return self

    def stop(self):
        ticks = _cpu_ticks()
        if ticks is None or self._ticks is None:
            return float('nan')
        seconds = max(time.perf_counter() - self._t, 1e-6)
        busy, own = ticks[0] - self._ticks[0], ticks[1] - self._ticks[1]
        return max(busy - own, 0) / os.sysconf('SC_CLK_TCK') / seconds


def wait_quiet(budget, threshold, window=3.0):
    """Wait until other processes use < threshold cores over `window` s; spends at most budget[0] s.

    budget is a one-element list (the time left for the whole run). Returns the last load seen.
    """
    load = LoadMeter().start()
    time.sleep(min(window, max(budget[0], 0.5)))
    seen = load.stop()
    budget[0] -= window
    while seen >= threshold and budget[0] > 0:
        print(f'  waiting for a quiet machine: other processes use {seen:.2f} cores '
              f'(want < {threshold}); {budget[0]:.0f} s of waiting left', file=sys.stderr, flush=True)
        load = LoadMeter().start()
        time.sleep(window)
        seen = load.stop()
        budget[0] -= window
    if seen >= threshold:
        print(f'  --wait-quiet: gave up waiting, measuring with {seen:.2f} busy cores beside us',
              file=sys.stderr, flush=True)
    return seen


# ----------------------------------------------------------------------------------------------
# Models and steps

def _label_timm_rope():
    """Wrap timm's RoPE functions in record_function('rope') so the profiler can count them.

    Only the functions are labelled: timm's slicing and re-concatenation of the class token
    around them stays outside, so timm's share is a lower bound.
    """
    import timm.layers.attention as attention
    import timm.layers.pos_embed_sincos as sincos
    import timm.models.eva as eva
    if getattr(eva, '_benchmark_labelled', False):
        return

    def labelled(fn):
        def wrapper(*args, **kwargs):
            with record_function('rope'):
                return fn(*args, **kwargs)
        return wrapper
    for module in (eva, attention):  # the attention classes look the functions up in their module
        for name in ('apply_rot_embed_cat', 'apply_rot_embed', 'apply_rot_embed_list'):
            if hasattr(module, name):
                setattr(module, name, labelled(getattr(module, name)))
    for cls_name in dir(sincos):
        cls = getattr(sincos, cls_name)
        if isinstance(cls, type) and hasattr(cls, 'get_embed'):
            cls.get_embed = labelled(cls.get_embed)
    eva._benchmark_labelled = True


def build_ours(family, model_name, pe, resolution, window=None, global_blocks=()):
    """Our model for a resolution: ViT built at it (the official recipe: no APE resize per
    forward); Swin built at 224 and run at r (window r / 32, its run-time rule). window: a
    ViTDet-style ViT (window attention but in global_blocks)."""
    kwargs = {'pe': pe, 'drop_path_rate': 0.0}
    if family == 'vit':
        kwargs['img_size'] = resolution
        if window is not None:
            kwargs.update(window_size=window, global_blocks=tuple(global_blocks))
    return build_model({'model': model_name, 'model_kwargs': kwargs})


def build_timm(family, model_name, pe, resolution):
    """timm's model of the same size and PE, or None when timm has none."""
    import timm
    pattern = TIMM_PEERS[family].get(pe)
    if pattern is None:
        return None
    name = pattern.format(size=model_name.split('_', 1)[1])
    if name not in timm.list_models():
        return None
    kwargs = {'img_size': resolution, 'drop_path_rate': 0.0}
    if family == 'swin':
        kwargs['window_size'] = resolution // 32  # our run-time rule
    _label_timm_rope()
    return timm.create_model(name, **kwargs)


class Runner:
    """One model with its input and optimizer; step(mode) runs one inference or training step."""

    def __init__(self, model, batch_size, resolution, device, amp_dtype):
        self.model = model.to(device)
        self.device, self.amp_dtype = device, amp_dtype
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch_size, 3, resolution, resolution, generator=gen).to(device)
        self.y = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-6)
        self.flops = {}

    def amp_autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step(self, mode):
        if mode == 'infer':
            self.model.eval()
            with torch.inference_mode(), self.amp_autocast():
                self.model(self.x)
        else:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            with self.amp_autocast():
                loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.optimizer.step()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def static_bytes(self):
        """Bytes live between steps: weights, optimizer state, input (grads are freed)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + [self.x, self.y]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def count_flops(runner, mode):
    """Model FLOPs of one step (torch.utils.flop_counter: matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        runner.step(mode)
    return counter.get_total_flops()


def _op_key(name):
    """'aten::native_layer_norm' -> 'nativelayernorm'; 'MulBackward0' -> 'mul' (backward node -> its op)."""
    name = name.rsplit(': ', 1)[-1].rsplit('::', 1)[-1]
    return re.sub(r'Backward\d*$', '', name).replace('_', '').lower()


def rope_share(runner, mode):
    """Share of one profiled step spent in RoPE (see the module docstring).

    A backward node counts when its autograd sequence number and its name match an op recorded
    inside a 'rope' range ('aten::mul' -> 'MulBackward0', 'RotateQK' -> 'RotateQKBackward');
    the name check keeps ops that only peeked at the next sequence number from matching.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        with record_function('benchmark_step'):
            runner.step(mode)
    events = prof.events()
    # CPU: time on the CPU; CUDA: time of the kernels each range launched (untested on a GPU)
    timed = 'device_time_total' if runner.device.type == 'cuda' else 'cpu_time_total'
    total = sum(getattr(e, timed) for e in events if e.name == 'benchmark_step')

    def has_ancestor(e, names):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name in names or id(parent) in names:
                return True
            parent = parent.cpu_parent
        return False
    rope_time, forward_ops = 0.0, set()
    for e in events:
        if e.name == 'rope' and not has_ancestor(e, {'rope'}):
            rope_time += getattr(e, timed)
            stack = list(e.cpu_children)
            while stack:  # every op recorded inside the range: its backward counts as RoPE too
                node = stack.pop()
                if node.sequence_nr >= 0:
                    forward_ops.add((node.sequence_nr, _op_key(node.name)))
                stack.extend(node.cpu_children)
    counted = set()
    for e in events:  # events come in start order: an outer backward event precedes its children
        if re.search(r'Backward\d*$', e.name) and (e.sequence_nr, _op_key(e.name)) in forward_ops \
                and not has_ancestor(e, counted | {'rope'}):
            counted.add(id(e))
            rope_time += getattr(e, timed)
    return rope_time / total if total > 0 else float('nan')


def peak_memory(runner, mode):
    """Peak bytes of one step: live at its start + the highest net allocation during it."""
    start = runner.static_bytes()
    if runner.device.type == 'cuda':
        torch.cuda.synchronize(runner.device)
        before = torch.cuda.memory_allocated(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        runner.step(mode)
        return start + torch.cuda.max_memory_allocated(runner.device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(mode)
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return start + peak


# ----------------------------------------------------------------------------------------------
# Measurement

def measure(runners, mode, args, budget):
    """Time every runner interleaved; then profile and measure memory. Returns (rows, load)."""
    labels = list(runners)
    for _ in range(args.warmup):
        for label in labels:
            runners[label].step(mode)
    if args.wait_quiet:
        wait_quiet(budget, args.quiet_threshold)
    times = {label: [] for label in labels}
    load = LoadMeter().start()
    for rep in range(args.reps):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:  # rotated: no model always runs first
            t0 = time.perf_counter()
            runners[label].step(mode)
            times[label].append(time.perf_counter() - t0)
    other_load = load.stop()
    rows = {}
    for label in labels:
        runner, ts = runners[label], sorted(times[label])
        q1, q3 = (statistics.quantiles(ts, n=4)[::2] if len(ts) >= 2 else (ts[0], ts[0]))
        row = dict(times=times[label], median=statistics.median(ts), min=ts[0],
                   spread=(q3 - q1) / statistics.median(ts), share=float('nan'), peak=float('nan'))
        if args.profile:
            row['share'] = rope_share(runner, mode)
        if args.memory:
            row['peak'] = peak_memory(runner, mode)
        if runner.device.type == 'cuda':
            row['flops'] = count_flops(runner, mode)
        rows[label] = row
    return rows, other_load


def gpu_peak_flops(device, override):
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def format_table(family, resolution, mode, rows, args, other_load, peak_flops):
    """Markdown table of one (family, resolution, mode) block."""
    base = rows.get(BASELINE[family])
    gpu = args.device == 'cuda'
    head = ['model', 'ms/step median', 'ms/step min', 'spread', 'img/s', 'peak MiB', 'RoPE share',
            f'time / {BASELINE[family]}', f'memory / {BASELINE[family]}', 'speed-up vs timm']
    windowed = any(WINDOW_TAG in label for label in rows)
    if windowed:
        head += ['time / global', 'memory / global']
    if gpu:
        head += ['TFLOP/step', 'MFU']
    lines = [f'**{family} {args.vit_model if family == "vit" else args.swin_model}, {resolution}x{resolution}, '
             f'{mode}, batch {args.batch_size}** (other processes used {other_load:.2f} cores during the timed loop)',
             '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for label, row in rows.items():
        peer = rows.get(f'timm:{label}')
        cells = [label, f'{row["median"] * 1e3:.1f}', f'{row["min"] * 1e3:.1f}', f'±{row["spread"] * 50:.1f} %',
                 f'{args.batch_size / row["min"]:.1f}',
                 '-' if math.isnan(row['peak']) else f'{row["peak"] / MiB:.0f}',
                 '-' if math.isnan(row['share']) else f'{row["share"] * 100:.2f} %',
                 f'{row["min"] / base["min"]:.3f}' if base and not label.startswith('timm:') else '-',
                 f'{row["peak"] / base["peak"]:.3f}' if base and not math.isnan(row['peak'])
                 and not label.startswith('timm:') else '-',
                 f'{peer["min"] / row["min"]:.2f}x' if peer else '-']
        if windowed:  # a windowed ViT against the same PE with global attention everywhere
            full = rows.get(label.split(WINDOW_TAG)[0]) if WINDOW_TAG in label else None
            cells += [f'{row["min"] / full["min"]:.3f}' if full else '-',
                      f'{row["peak"] / full["peak"]:.3f}' if full and not math.isnan(row['peak']) else '-']
        if gpu:
            flops = row.get('flops', 0)
            cells += [f'{flops / 1e12:.2f}',
                      f'{flops / row["min"] / peak_flops * 100:.1f} %' if peak_flops and flops else '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def target_summary(results):
    """The issue's targets (CPU, ViT / Swin, batch >= 4) checked on what was measured."""
    lines = []

    def check(text, value, limit, larger_is_better=False):
        met = value >= limit if larger_is_better else value <= limit
        lines.append(f'- {text}: {value:.3f} (target {">=" if larger_is_better else "<="} {limit}): '
                     f'{"met" if met else "NOT met"}')
    for (family, resolution, mode), rows in results.items():
        mixed, base = rows.get('rope_mixed'), rows.get(BASELINE[family])
        if mixed is None or base is None:
            continue
        where = f'{family} {resolution} {mode}'
        if family == 'vit':
            if not math.isnan(mixed['share']):
                check(f'{where}: RoPE share of the step, RoPE-Mixed (%)', mixed['share'] * 100, 1.0)
            check(f'{where}: time RoPE-Mixed / APE (minima)', mixed['min'] / base['min'], 1.03)
            if mode == 'train' and resolution == 384 and not math.isnan(mixed['peak']):
                check(f'{where}: peak memory RoPE-Mixed / APE', mixed['peak'] / base['peak'], 1.05)
            peer = rows.get('timm:rope_mixed')
            if peer is not None and resolution == 384:
                check(f'{where}: speed-up of RoPE-Mixed over timm\'s', peer['min'] / mixed['min'], 1.10, True)
        else:
            check(f'{where}: time RoPE-Mixed / RPB (minima)', mixed['min'] / base['min'], 1.05)
    return '\n'.join(lines)


def machine_description(args):
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    text = (f'{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, '
            f'{torch.get_num_threads()} threads')
    if args.device == 'cuda':
        text += f', GPU {torch.cuda.get_device_name(0)}, bf16 autocast'
    else:
        text += ', fp32'
    return text


# ----------------------------------------------------------------------------------------------
# The script

def get_args_parser():
    p = argparse.ArgumentParser('benchmark.py', description='Speed and memory of the position embeddings '
                                '(see the module docstring).', formatter_class=HelpFormatter)
    p.add_argument('--family', choices=('vit', 'swin', 'both'), default='both')
    p.add_argument('--vit-model', default='vit_small', help='ViT size name')
    p.add_argument('--swin-model', default='swin_tiny', help='Swin size name')
    p.add_argument('--vit-pe', nargs='+', default=list(VIT_PE), help='ViT variants (ape is the baseline)')
    p.add_argument('--swin-pe', nargs='+', default=list(SWIN_PE), help='Swin variants (rpb is the baseline)')
    p.add_argument('--vit-window', type=int, default=None, metavar='PATCHES',
                   help='also time each ViT variant as a ViTDet-style backbone: window attention of '
                        'this many patches a side in every block but --vit-global-blocks')
    p.add_argument('--vit-global-blocks', nargs='*', type=int, default=[2, 5, 8, 11],
                   help='with --vit-window: the blocks that keep global attention (ViTDet: 2 5 8 11)')
    p.add_argument('--resolutions', nargs='+', type=int, default=[224, 384])
    p.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--reps', type=int, default=7, help='timed repetitions per model (interleaved)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per model first')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                   help='cuda: bf16 autocast, model FLOPs and MFU')
    p.add_argument('--peak-tflops', type=float, default=None,
                   help='GPU peak bf16 TFLOP/s for MFU (default: from the device name)')
    p.add_argument('--peers', action='store_true', help="also time timm's models of the same PE")
    p.add_argument('--profile', action=argparse.BooleanOptionalAction, default=True,
                   help='measure the RoPE share with torch.profiler (one extra step per model)')
    p.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True,
                   help='measure peak memory (one extra step per model)')
    p.add_argument('--wait-quiet', type=float, default=0.0, metavar='SECONDS',
                   help='before each timed loop wait for a quiet machine, at most SECONDS in all')
    p.add_argument('--quiet-threshold', type=float, default=0.25,
                   help='cores other processes may use for the machine to count as quiet')
    return p


def _check_args(args):
    if args.reps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise UserError('--reps and --batch-size must be >= 1 and --warmup >= 0')
    if args.threads is not None and args.threads < 1:
        raise UserError('--threads must be >= 1')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device is available')
    families = ('vit', 'swin') if args.family == 'both' else (args.family,)
    for family in families:
        pes = args.vit_pe if family == 'vit' else args.swin_pe
        valid = VIT_PE + ('none',) if family == 'vit' else SWIN_PE + ('rope_axial_rpb', 'none')
        bad = [pe for pe in pes if pe not in valid]
        if bad:
            raise UserError(f"unknown {family} pe {', '.join(bad)}; valid: {', '.join(valid)}")
        name = args.vit_model if family == 'vit' else args.swin_model
        with torch.device('meta'):  # validates the name and every resolution without allocating
            try:
                model = build_ours(family, name, pes[0], 224, args.vit_window if family == 'vit' else None,
                                   args.vit_global_blocks)
            except ValueError as e:
                raise UserError(f'--vit-window / --vit-global-blocks: {e}') from None
        for r in args.resolutions:
            try:
                model.check_img_size(r, r)
            except ValueError as e:
                raise UserError(f'--resolutions {r} for {name}: {e}') from None
    return families


def main(args):
    families = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == 'cuda' else None
    peers = args.peers
    if peers:
        try:
            import timm  # noqa: F401  (peers only; the models never import it)
        except ImportError:
            print('note: timm is not installed: no peers', file=sys.stderr)
            peers = False
    peak_flops = gpu_peak_flops(device, args.peak_tflops) if device.type == 'cuda' else None
    print(f'# benchmark.py: {machine_description(args)}', flush=True)
    print(f'command: python {" ".join(sys.argv)}', flush=True)
    budget = [args.wait_quiet]
    tables, results = [], {}
    for family in families:
        name = args.vit_model if family == 'vit' else args.swin_model
        pes = args.vit_pe if family == 'vit' else args.swin_pe
        for resolution in args.resolutions:
            runners = {}
            for pe in pes:
                runners[pe] = Runner(build_ours(family, name, pe, resolution), args.batch_size, resolution,
                                     device, amp_dtype)
            if family == 'vit' and args.vit_window is not None:
                for pe in pes:
                    model = build_ours(family, name, pe, resolution, args.vit_window, args.vit_global_blocks)
                    runners[f'{pe}{WINDOW_TAG}{args.vit_window}'] = Runner(model, args.batch_size, resolution,
                                                                          device, amp_dtype)
            if peers:
                for pe in pes:
                    peer = build_timm(family, name, pe, resolution)
                    if peer is not None:
                        runners[f'timm:{pe}'] = Runner(peer, args.batch_size, resolution, device, amp_dtype)
            for mode in args.modes:
                print(f'timing {family} {resolution} {mode}: {", ".join(runners)} '
                      f'({args.warmup} warm-up + {args.reps} timed steps each)', file=sys.stderr, flush=True)
                rows, load = measure(runners, mode, args, budget)
                results[family, resolution, mode] = rows
                table = format_table(family, resolution, mode, rows, args, load, peak_flops)
                print('\n' + table + '\n', flush=True)
                tables.append(table)
            del runners
    print('spread: half the interquartile range of the per-step times, relative to the median. '
          'Ratios divide minima. img/s = batch / minimum.')
    summary = target_summary(results) if device.type == 'cpu' else ''
    if summary:
        print('\nTargets (issue 11; stated for CPU, 2 threads, vit_small / swin_tiny, batch >= 4):\n' + summary)
    return tables


if __name__ == '__main__':
    cli(main, get_args_parser())
