"""The paper's training recipes: their hyper-parameters, and the model, optimizer (LAMB, AdamW)
and learning-rate schedule a run builds from them.

    RECIPES, RECIPE_KEYS                  deit3 (ViT), swin (Swin), demo (the built-in data)
    model_module, build_model             the model file that knows a name, and the model
    load_finetune                         --finetune's weights, the head dropped on a new class count
    param_groups, Lamb, build_optimizer   weight decay groups; LAMB (DeiT-III's) and AdamW
    build_scheduler                       warm-up, then cosine, per step

train.py fills a configuration from a recipe (resolve_config); eval_multires.py and the
benchmarks build models and optimizers here too.
"""
import math

import torch

import rope_vit
import swin_rope
from cli import UserError
from recovery import read_checkpoint, unwrap_state_dict

# ----------------------------------------------------------------------------------------------
# Recipes: the values the paper's runs used. None in train.py's parser means "take the recipe's".

VIT_SIZES = ('vit_tiny', 'vit_small', 'vit_base', 'vit_large')


SWIN_SIZES = ('swin_tiny', 'swin_small', 'swin_base')


# save_every_steps, recovery checkpoints inside an epoch: 500 steps are 5-10 minutes of an 8-GPU
# ImageNet run at 0.6-1.2 s per step (an epoch is 625 steps for deit3, 1251 for swin), for one
# checkpoint write of seconds (< 1 % of the time); the demo's 20-second epochs need none.
RECIPES = {
    # DeiT-III (official ViT-S command of the paper; Touvron et al. 2022 for the rest).
    'deit3': dict(
        opt='lamb', lr=4e-3, lr_ref_batch=2048, weight_decay=0.03, epochs=400, warmup_epochs=5,
        warmup_lr=1e-6, min_lr=1e-5, loss='bce', smoothing=0.0, aug='three', color_jitter=0.3,
        repeated_aug=3, reprob=0.0, mixup=0.8, cutmix=1.0,
        # DeiT-III ran timm's Lamb, which clips the global gradient norm at 1.0 inside the step.
        clip_grad=1.0, eval_crop_ratio=1.0, batch_size=256, img_size=224, num_workers=8,
        drop_path={'tiny': 0.0, 'small': 0.0, 'base': 0.1, 'large': 0.4},
        # B and L pretrain at 192, then fine-tune 20 epochs at 224 (--finetune ... --img-size 224).
        img_size_by_size={'base': 192, 'large': 192}, save_every_steps=500),
    # Swin Transformer (Liu et al. 2021), as the paper trained its Swin models.
    'swin': dict(
        opt='adamw', lr=1e-3, lr_ref_batch=1024, weight_decay=0.05, epochs=300, warmup_epochs=20,
        warmup_lr=1e-6, min_lr=1e-5, loss='ce', smoothing=0.1, aug='randaug', color_jitter=0.0,
        repeated_aug=1, reprob=0.25, mixup=0.8, cutmix=1.0, clip_grad=5.0,
        eval_crop_ratio=224 / 256, batch_size=128, img_size=224, num_workers=8,
        drop_path={'tiny': 0.2, 'small': 0.3, 'base': 0.5}, img_size_by_size={},
        save_every_steps=500),
    # Built-in data on a laptop: a small ViT (8 x 8 patches at 32 px, head dim 32), no image
    # augmentation (glyphs bring their own random windows; a flip would turn 2 into 5, or change
    # the shapes' directions). Length from APE's validation curve on glyphs (seed 0, total batch
    # 128): 20 epochs end at 68.7 % top-1; 32 epochs end at 86.9 %, flat over the last 6 epochs
    # (85.3-87.3), so 32, for the baseline's sake (seed 0's RoPE runs pass 88 % by epoch 16).
    'demo': dict(
        opt='adamw', lr=2e-3, lr_ref_batch=128, weight_decay=0.05, epochs=32, warmup_epochs=1,
        warmup_lr=1e-6, min_lr=1e-5, loss='ce', smoothing=0.0, aug='none', color_jitter=0.0,
        repeated_aug=1, reprob=0.0, mixup=0.0, cutmix=0.0, clip_grad=1.0,
        eval_crop_ratio=1.0, batch_size=64, img_size=32, num_workers=0,
        drop_path={}, img_size_by_size={}, save_every_steps=0,
        vit_overrides=dict(patch_size=4, embed_dim=64, depth=4, num_heads=2, init_scale=0.1),
        builtin_train=8000, builtin_val=1000),
}


RECIPE_KEYS = ('opt', 'weight_decay', 'epochs', 'warmup_epochs', 'warmup_lr', 'min_lr', 'loss',
                'smoothing', 'aug', 'color_jitter', 'repeated_aug', 'reprob', 'mixup', 'cutmix',
                'clip_grad', 'eval_crop_ratio', 'batch_size', 'num_workers', 'save_every_steps')


# ----------------------------------------------------------------------------------------------
# Model

def model_module(model_name):
    """rope_vit or swin_rope, whichever knows the name; UserError listing both otherwise."""
    if model_name in swin_rope.list_models():
        return swin_rope
    if model_name in rope_vit.list_models():
        return rope_vit
    raise UserError(f'unknown model {model_name!r}; valid: '
                    + ', '.join(rope_vit.list_models() + swin_rope.list_models()))


def build_model(cfg):
    """The model of a resolved configuration (a checkpoint's `args`): create_model(name, **kw)."""
    module = model_module(cfg['model'])
    try:
        return module.create_model(cfg['model'], **cfg['model_kwargs'])
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build {cfg['model']}: {e}") from None


def size_of(model_name):
    for size in ('tiny', 'small', 'base', 'large'):
        if size in model_name:
            return size
    return None


def first_names(keys, limit=10):
    if not keys:
        return 'none'
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def load_finetune(model, cfg):
    """Weights from --finetune: the head is dropped when its shape differs (new class count);
    the model file's load_checkpoint resizes APE / RPB; any other mismatch is an error."""
    state = unwrap_state_dict(read_checkpoint(cfg['finetune']))
    own = model.state_dict()
    dropped = [k for k in list(state) if k.startswith('head.') and k in own
               and state[k].shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in dropped}
    try:
        result = model_module(cfg['model']).load_checkpoint(model, state, strict=False)
    except ValueError as e:
        raise UserError(f"--finetune {cfg['finetune']}: {e}") from None
    missing = [k for k in result.missing_keys if not k.startswith('head.')]
    if missing or result.unexpected_keys:
        raise UserError(f"--finetune {cfg['finetune']} does not fit {cfg['model']}: "
                        f'missing {first_names(missing)}; '
                        f'unexpected {first_names(result.unexpected_keys)}')
    return dropped


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

def param_groups(model, weight_decay):
    """Two groups: decay, and no decay for model.no_weight_decay() and every ndim <= 1 param."""
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, arXiv 1904.00962) as DeiT-III trains with it (timm's variant).

    Adam moments with bias correction give the update u = m_hat / (sqrt(v_hat) + eps), plus the
    decoupled weight decay wd * p. For a group with weight decay the update is rescaled per
    tensor by the trust ratio ||p|| / ||u|| (1 when either norm is 0); groups without weight
    decay (norms, biases, embeddings) take the plain Adam step.  p <- p - lr * ratio * u.
    """

    # Tensors per multi-tensor call, in elements: the two temporaries of a call (the update and
    # its denominator) then span at most ~2 x 64 MB in fp32 and are reused call after call. All
    # of ViT-B at once would allocate 2 x 344 MB per step, which a CPU allocator hands back to
    # the system and page-faults in again (measured: slower than the loop); ViT-B takes ~7 calls.
    CHUNK_ELEMENTS = 1 << 24

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One multi-tensor step per group (torch._foreach_*): the same arithmetic as a loop over
        the tensors, in the same order per element, but a few dozen operator calls per group
        instead of about fifteen per tensor; on a GPU each call is one fused kernel launch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state['step'] = torch.tensor(0.0)
                    state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not params:
                continue
            steps = [self.state[p]['step'] for p in params]
            torch._foreach_add_(steps, 1)
            # The counts live on the CPU (no device sync). They differ only where a tensor had no
            # gradient at some step: one batch per distinct count keeps each bias correction exact.
            by_step = {}
            for p, n in zip(params, torch.stack(steps).tolist()):
                by_step.setdefault(n, []).append(p)
            for step, ps in by_step.items():
                chunk, size = [], 0
                for p in ps:
                    chunk.append(p)
                    size += p.numel()
                    if size >= self.CHUNK_ELEMENTS:
                        self._update(chunk, group, step)
                        chunk, size = [], 0
                if chunk:
                    self._update(chunk, group, step)
        return loss

    def _update(self, params, group, step):
        beta1, beta2 = group['betas']
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]['exp_avg'] for p in params]
        exp_avg_sqs = [self.state[p]['exp_avg_sq'] for p in params]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, 1 - beta2 ** step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group['eps'])
        update = torch._foreach_div(exp_avgs, 1 - beta1 ** step)
        torch._foreach_div_(update, denom)
        del denom
        if group['weight_decay'] != 0:
            torch._foreach_add_(update, params, alpha=group['weight_decay'])
            w_norm = torch.stack(torch._foreach_norm(params))
            u_norm = torch.stack(torch._foreach_norm(update))
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                torch.ones_like(w_norm))
            torch._foreach_mul_(update, list(ratio.unbind()))
        torch._foreach_add_(params, update, alpha=-group['lr'])


def build_optimizer(model, cfg):
    groups = param_groups(model, cfg['weight_decay'])
    if cfg['opt'] == 'lamb':
        return Lamb(groups, lr=cfg['lr'], eps=cfg['opt_eps'])
    return torch.optim.AdamW(groups, lr=cfg['lr'], eps=cfg['opt_eps'])


def build_scheduler(optimizer, cfg, steps_per_epoch, done_steps=0):
    """Per step: linear warm-up from warmup_lr to lr, then cosine down to min_lr.

    done_steps > 0 starts the schedule there, from cfg['lr'] (a resume on another total batch,
    where the checkpoint's step count and learning rate do not apply)."""
    total = cfg['epochs'] * steps_per_epoch
    warmup = min(cfg['warmup_epochs'] * steps_per_epoch, total)
    lr, warmup_lr, min_lr = cfg['lr'], cfg['warmup_lr'], cfg['min_lr']

    def factor(step):
        if step < warmup:
            return (warmup_lr + (lr - warmup_lr) * step / warmup) / lr
        progress = (step - warmup) / max(1, total - warmup)
        return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / lr
    if done_steps:
        for group in optimizer.param_groups:
            group['initial_lr'] = lr
    # LambdaLR counts its own construction as a step: last_epoch = done_steps - 1 lands on it.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done_steps - 1)
