"""The training step's own costs, measured as counts and ratios within one run (issue #30).

    python benchmark_step.py lamb [--model vit_base] [--reps 5]
        operators dispatched per optimizer step (torch.profiler) for recipes.Lamb (multi-tensor),
        the per-tensor loop it replaced (LoopLamb, below) and torch.optim.AdamW (foreach and
        loop); then the step times, interleaved, as ratios to AdamW(foreach=True).
    python benchmark_step.py rope-bf16 [--model vit_small] [--reps 5]
        one training step (forward + backward) under CPU bf16 autocast: APE, RoPE-Mixed on the
        fused path and on the readable one, interleaved, as ratios to APE; and each RoPE path's
        error against the fp32 readable path (logits and the frequency gradient).

Operator counts: "top-level" are the calls made from Python, what a GPU launches as kernels
for the fused multi-tensor ops; on a CPU torch runs a _foreach_ op as a loop of per-tensor ops,
which the profiler lists as its children ("all").
"""
import argparse
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import recipes


class LoopLamb(torch.optim.Optimizer):
    """recipes.Lamb as it was before it went multi-tensor (one tensor at a time): the baseline of
    the operator count, and the independent formulation test_train checks recipes.Lamb against."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state['step'] = torch.tensor(0.0)
                    state['exp_avg'] = torch.zeros_like(p)
                    state['exp_avg_sq'] = torch.zeros_like(p)
                state['step'] += 1
                step = state['step'].item()
                exp_avg, exp_avg_sq = state['exp_avg'], state['exp_avg_sq']
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group['eps'])
                update = (exp_avg / (1 - beta1 ** step)).div_(denom)
                if group['weight_decay'] != 0:
                    update.add_(p, alpha=group['weight_decay'])
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update.mul_(ratio)
                p.add_(update, alpha=-group['lr'])


def count_ops(fn):
    """(top-level, all) operator calls of fn() recorded by torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith('aten::')]

    def top_level(event):   # no aten:: operator above it (the optimizer's own label may be)
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith('aten::'):
                return False
            parent = parent.cpu_parent
        return True
    return sum(map(top_level, ops)), len(ops)


def interleaved(fns, reps):
    """Median seconds of each fn, run in rotated order rep after rep (load hits all alike)."""
    times = {k: [] for k in fns}
    labels = list(fns)
    for rep in range(reps):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            t0 = time.perf_counter()
            fns[label]()
            times[label].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def lamb(args):
    torch.manual_seed(0)
    model = recipes.build_model({'model': args.model, 'model_kwargs': dict(pe='rope_mixed')})
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {
        'Lamb (multi-tensor)': recipes.Lamb(recipes.param_groups(model, 0.05), lr=1e-3),
        'Lamb (loop, before)': LoopLamb(recipes.param_groups(model, 0.05), lr=1e-3),
        'AdamW(foreach=True)': torch.optim.AdamW(recipes.param_groups(model, 0.05), lr=1e-3,
                                                 foreach=True),
        'AdamW(foreach=False)': torch.optim.AdamW(recipes.param_groups(model, 0.05), lr=1e-3,
                                                  foreach=False),
    }
    n = sum(p.numel() for p in model.parameters())
    print(f'{args.model}: {len(list(model.parameters()))} tensors, {n / 1e6:.1f} M parameters, '
          f'{torch.get_num_threads()} threads')
    for opt in optimizers.values():
        opt.step()   # the moments exist: a steady-state step is counted and timed
    print(f"{'optimizer':24s} {'top-level ops':>14s} {'all ops':>8s}")
    for label, opt in optimizers.items():
        top, every = count_ops(opt.step)
        print(f'{label:24s} {top:14d} {every:8d}')
    times = interleaved({k: v.step for k, v in optimizers.items()}, args.reps)
    base = times['AdamW(foreach=True)']
    print(f"{'optimizer':24s} {'median s':>9s} {'/ AdamW(foreach)':>17s}   ({args.reps} reps)")
    for label, t in times.items():
        print(f'{label:24s} {t:9.4f} {t / base:17.2f}')


def rope_bf16(args):
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size,
                    generator=torch.Generator().manual_seed(0))

    def build(pe):
        torch.manual_seed(0)
        return recipes.build_model({'model': args.model, 'model_kwargs': dict(
            pe=pe, img_size=args.img_size, drop_path_rate=0.0)})
    ape, rope = build('ape'), build('rope_mixed')

    def step(model, fused, bf16=True):
        model.fused = fused
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            logits = model(x) if fused else model.forward_with_attention(x)[0]
        logits.float().square().mean().backward()
        return logits.detach().float(), getattr(model, 'freqs', None)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    ref_logits, f = step(rope, fused=False, bf16=False)
    ref_grad = f.grad.clone()
    print(f'{args.model} {args.img_size} px, batch {args.batch_size}, bf16 autocast, '
          f'{torch.get_num_threads()} threads; error relative to the fp32 readable path:')
    for fused in (False, True):
        logits, f = step(rope, fused)
        print(f"  {'fused   ' if fused else 'readable'} logits {rel(logits, ref_logits):.4f}  "
              f'frequency gradient {rel(f.grad, ref_grad):.4f}')
    runs = {'ape': lambda: step(ape, True), 'rope_mixed fused': lambda: step(rope, True),
            'rope_mixed readable': lambda: step(rope, False)}
    for fn in runs.values():
        fn()   # warm-up
    times = interleaved(runs, args.reps)
    print(f"{'training step':20s} {'median s':>9s} {'/ APE':>6s}   ({args.reps} reps)")
    for label, t in times.items():
        print(f"{label:20s} {t:9.4f} {t / times['ape']:6.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=('lamb', 'rope-bf16'))
    p.add_argument('--model', default=None, help='default: vit_base (lamb), vit_small (rope-bf16)')
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    args = p.parse_args()
    print(f'load: {os.getloadavg()}')
    if args.what == 'lamb':
        args.model = args.model or 'vit_base'
        lamb(args)
    else:
        args.model = args.model or 'vit_small'
        rope_bf16(args)
    print(f'load: {os.getloadavg()}')


if __name__ == '__main__':
    main()
