"""Swin Transformer with RoPE-Axial, RoPE-Mixed, RPB or RoPE + RPB: a minimal torch-only reference.

Paper: "Rotary Position Embedding for Vision Transformer", Heo, Park, Han, Yun, ECCV 2024,
arXiv 2403.13298. It puts 2-D RoPE (section 3.2: RoPE-Axial Eq. 12, RoPE-Mixed Eq. 14-15) into
the windows of the Swin Transformer (Liu et al., arXiv 2103.14030), instead of or next to Swin's
relative position bias (RPB, section 3.1, Eq. 3-6). State-dict keys, init and math are those of
the official naver-ai/rope-vit code (`models/swin_transformer_rope.py`,
`SwinTransformer/models/swin_transformer.py`), so its published {'model': state_dict} files load
strictly. Torch only and self-contained on purpose: copy this one file (rope_vit.py holds the
same RoPE helpers for the ViT).

Reading order: the paper's model first, from the RoPE equations through create_model, ending at
the banner "End of the paper's model"; that part is a working file on its own (copy it up to the
banner and it builds, loads and runs every paper variant). What follows extends it from below,
with subclasses that keep the paper's names: what goes beyond the paper (RoPE position policies
and coordinate augmentation, dense prediction at any image size, per-stage feature maps),
checkpoints and published weights, and last the fused speed path (the same math). The switch
between the readable formula and the fused path is one model attribute, `model.fused`: the full
file turns it on; `model.fused = False` runs the readable path.

Usage
    import torch, swin_rope
    model = swin_rope.create_model('swin_rope_mixed_tiny_patch4_window7_224')
    swin_rope.load_checkpoint(model, 'swin_rope_mixed_tiny.pth')   # published {'model': sd} file
    model.eval()                                                   # (or pretrained=True above)
    for r in (96, 224, 384):                                       # one instance, any valid size
        logits = model(torch.randn(1, 3, r, r))                    # (1, 1000)
    logits, attn = model.forward_with_attention(torch.randn(1, 3, 224, 224))
    maps = model.forward_intermediates(torch.randn(1, 3, 224, 224), intermediates_only=True)
    # maps: (1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)
    custom = swin_rope.create_model('swin_tiny', pe='rope_mixed_rpb', num_classes=10)

Shape legend
    B   batch                       C    channels of the current stage
    H, W  grid (tokens) of a stage  nH   heads;  d = C / nH head dim (32 in the published models)
    w   window side;  N = w * w tokens per window;  nW = (H / w) * (W / w) windows per image
    B_  = B * nW windows in the batch (batch outermost, windows row-major, tokens row-major)

Resolution rule: an H x W input, sides multiples of patch_size * 2**(stages-1) (32 for the
published models), runs with the window w = window_size * min(H, W) / img_size (224 -> 7,
384 -> 12), which must be an integer that tiles every stage grid (`model.check_img_size(H, W)`).
Beyond the paper, window_rule='dense' (SwinConfig, or `model.window_rule = 'dense'` between
forwards) takes any H x W with a fixed window, padding each grid and masking the padding, as
Swin's detection and segmentation backbones do:
    model.window_rule = 'dense'
    maps = model.forward_intermediates(torch.randn(1, 3, 800, 1333), intermediates_only=True)
    # maps: (1, 96, 200, 334), (1, 192, 100, 167), (1, 384, 50, 84), (1, 768, 25, 42)
"""
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

PE_VARIANTS = ('rpb', 'rope_axial', 'rope_mixed', 'rope_axial_rpb', 'rope_mixed_rpb', 'none')


# ==============================================================================================
# The paper's model
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# 2-D RoPE (section 3.2)
# ----------------------------------------------------------------------------------------------
# A head of d channels is d/2 complex pairs. Token n at window position p_n = (x_n, y_n) turns
# pair t of q and of k by the angle phi_t = theta^x_t x_n + theta^y_t y_n (Eq. 14), so that the
# product of q_n and k_m depends on p_n - p_m only (Eq. 15).
# RoPE-Axial (Eq. 12): the first d/4 pairs turn with x, the last d/4 with y (the official Swin
# layout), at the fixed magnitudes theta^(-4k/d) of Eq. 13. RoPE-Mixed (Eq. 14): every pair turns
# with both axes, (theta^x_t, theta^y_t) learned per head and initialised at those magnitudes in
# a random direction per head. Positions are local to each window; the rotation is written with
# real numbers (Eq. 11).

def rope_magnitudes(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Eq. 13 frequency magnitudes mag_k = theta^(-4k/d), k = 0 .. d/4-1.

    Returns (d/4,) float32. Computed as 1 / theta^(4k/d) like the official code.
    """
    exponent = torch.arange(0, head_dim, 4, dtype=torch.float32, device=device)[: head_dim // 4] / head_dim
    return 1.0 / (theta ** exponent)  # (d/4,)


def init_rope_freqs(num_heads: int, head_dim: int, theta: float, mixed: bool, device=None) -> torch.Tensor:
    """Initial 2-D frequencies (theta^x, theta^y) of Eq. 14, one set per head.

    Mixed: one angle a ~ U(0, 2 pi) per head; pairs j < d/4 get mag_j (cos a, sin a), pairs
    j >= d/4 get mag (cos(a + pi/2), sin(a + pi/2)). Axial (Eq. 12, the official Swin buffer):
    the same formula with a = 0, so x rotates the first d/4 pairs and y the rest. The angle is
    added to pi/2 in float32 exactly as the official code does, so the axial buffer holds
    cos(pi/2) = -4.37e-8 (not 0) and equals the published buffer bit for bit.
    Returns (2, nH, d/2) float32: [0] = theta^x, [1] = theta^y.
    """
    mag = rope_magnitudes(head_dim, theta, device)  # (d/4,)
    if mixed:
        angles = torch.rand(num_heads, 1, device=device) * 2 * math.pi  # (nH, 1)
    else:
        angles = torch.zeros(num_heads, 1, device=device)  # (nH, 1)
    turned = angles + math.pi / 2  # float32, as official
    fx = torch.cat([mag * torch.cos(angles), mag * torch.cos(turned)], dim=-1)  # (nH, d/2)
    fy = torch.cat([mag * torch.sin(angles), mag * torch.sin(turned)], dim=-1)  # (nH, d/2)
    return torch.stack([fx, fy], dim=0)  # (2, nH, d/2)


def window_positions(window: int, device=None) -> tuple:
    """Window-local patch positions (t_x, t_y), row-major: token n has t_x = n % w, t_y = n // w.

    The same for every window, shifted or not (section 3.2 applied per window).
    Returns two (w*w,) float32 tensors.
    """
    n = torch.arange(window * window, device=device, dtype=torch.float32)  # (N,)
    return n % window, torch.div(n, window, rounding_mode='floor')


def rope_angles(freqs: torch.Tensor, t_x: torch.Tensor, t_y: torch.Tensor) -> torch.Tensor:
    """Eq. 14: angles phi = theta^x_t p^x_n + theta^y_t p^y_n.

    freqs (2, ..., d/2) (here (2, nH, d/2)), t_x / t_y (N,). Returns (..., N, d/2) in t_x's dtype
    (float32 here), computed with autocast off: bf16 angles lose whole radians at large t.
    """
    with torch.autocast(device_type=freqs.device.type, enabled=False):
        fx, fy = freqs.to(t_x.dtype).unbind(0)  # (..., d/2) each
        return t_x[:, None] * fx[..., None, :] + t_y[:, None] * fy[..., None, :]  # (..., N, d/2)


def rope_cos_sin(angles: torch.Tensor) -> tuple:
    """Eq. 10 in real form: R = e^{i phi} as the pair (cos phi, sin phi), same shape as angles."""
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eq. 11: x' = x o R with interleaved pairs: channels (2j, 2j+1) = (real, imag) of pair j.

    The complex product written with real numbers, a 2x2 rotation of each pair:
    x'_2j = x_2j cos - x_2j+1 sin, x'_2j+1 = x_2j sin + x_2j+1 cos. x (..., N, d) any float
    dtype, cos / sin (..., N, d/2) broadcastable against x. Runs in float32 and casts back to
    x's dtype. Real ops only, so torch.compile generates code for it and ONNX can express it.
    Returns (..., N, d).
    """
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, d/2) each
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)  # (..., N, d/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (..., N, d)


# ----------------------------------------------------------------------------------------------
# Patch embedding
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Conv patchify (p x p, stride p) then LayerNorm: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


# ----------------------------------------------------------------------------------------------
# Windows: partition, cyclic shift, shifted-window mask
# ----------------------------------------------------------------------------------------------
# Attention runs inside w x w windows. Odd blocks first roll the grid by -shift (w // 2) on both
# axes, so that their windows straddle the previous block's borders; tokens the roll brings
# together from opposite edges of the image are kept apart by an additive mask. Every step that
# turns a grid into windows and back is here; which w and shift a stage uses is decided by
# SwinTransformer.stage_windows.

SHIFT_MASK_VALUE = -100.0  # official value between shifted regions (not -inf)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, w*w, C); windows row-major with batch outermost."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)  # (B, H/w, w, W/w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)  # (B*nW, N, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """(B*nW, w*w, C) -> (B, H, W, C); inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)  # (B, H/w, W/w, w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # (B, H, W, C)


def shift_and_partition(x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, w*w, C): roll by -shift on both axes (shift 0: none), then windows."""
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))  # (B, H, W, C)
    return window_partition(x, window)  # (B*nW, N, C)


def reverse_and_unshift(windows: torch.Tensor, window: int, shift: int, H: int, W: int) -> torch.Tensor:
    """(B*nW, w*w, C) -> (B, H, W, C); inverse of shift_and_partition."""
    x = window_reverse(windows, window, H, W)  # (B, H, W, C)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x


def shift_window_mask(H: int, W: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Additive mask of shifted-window attention: 0 within a region, -100 across regions.

    After roll(-shift), the grid holds 3 x 3 regions (slices [0:-w], [-w:-s], [-s:] per axis);
    tokens of different regions share a window but were not neighbours in the image.
    Returns (nW, N, N) float32.
    """
    labels = torch.zeros(1, H, W, 1, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for rows in bounds:
        for cols in bounds:
            labels[:, rows, cols, :] = region
            region += 1
    labels = window_partition(labels, window).squeeze(-1)  # (nW, N)
    different = labels[:, None, :] != labels[:, :, None]  # (nW, N, N)
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK_VALUE)


# ----------------------------------------------------------------------------------------------
# Window attention with RPB (section 3.1) and/or RoPE
# ----------------------------------------------------------------------------------------------
# RPB (Eq. 3-6): one learned bias per head for each of the (2w-1)^2 offsets p_n - p_m inside a
# window, added to the logits. At a window other than the stored one the table is resized.

RPB_RESIZE_MODES = ('bicubic', 'zero_pad')


def relative_position_index(window: int, device=None) -> torch.Tensor:
    """Eq. 5 index: B_nm = table[(dy + w-1) * (2w-1) + (dx + w-1)], d = p_n - p_m.

    Returns (N, N) int64, the layout of the official `relative_position_index` buffer.
    """
    t_x, t_y = window_positions(window, device)
    dx = (t_x[:, None] - t_x[None, :]).long() + window - 1  # (N, N)
    dy = (t_y[:, None] - t_y[None, :]).long() + window - 1  # (N, N)
    return dy * (2 * window - 1) + dx  # (N, N)


def resize_rpb_table(table: torch.Tensor, window: int, mode: str = 'bicubic') -> torch.Tensor:
    """RPB table (Eq. 3) for another window: ((2w0-1)^2, nH) -> ((2w-1)^2, nH), same dtype.

    'bicubic': the official evaluation (`SwinTransformer/utils.py:load_pretrained`): the table is
    viewed as an image (1, nH, dy, dx) and resized with F.interpolate(bicubic, align_corners=False,
    no antialias). 'zero_pad': the paper's text: offsets the table never saw get bias 0 (a smaller
    window crops the centre). At the table's own window both return its values exactly (bicubic
    weights 0, 1, 0, 0; no padding), so a traced graph, which always goes through here, has no
    window baked in.
    """
    length, num_heads = table.shape
    side = math.isqrt(length)
    new_side = 2 * window - 1
    grid = table.t().reshape(1, num_heads, side, side)  # (1, nH, 2w0-1, 2w0-1)
    if mode == 'bicubic':
        grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    elif mode == 'zero_pad':
        pad = (new_side - side) // 2  # negative pads crop
        grid = F.pad(grid, (pad, pad, pad, pad))
    else:
        raise ValueError(f"unknown rpb_resize {mode!r}; valid: {', '.join(RPB_RESIZE_MODES)}")
    return grid.reshape(num_heads, new_side * new_side).t()  # ((2w-1)^2, nH)


def relative_position_bias(table: torch.Tensor, window: int) -> torch.Tensor:
    """Eq. 5-6: the bias B_nm of every head from a table of the window: ((2w-1)^2, nH) -> (nH, N, N)."""
    index = relative_position_index(window, table.device)  # (N, N)
    return table[index.reshape(-1)].reshape(window * window, window * window, -1) \
        .permute(2, 0, 1).contiguous()  # (nH, N, N)


def additive_mask(bias: Optional[torch.Tensor], shift_mask: Optional[torch.Tensor],
                  batch_windows: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """B (nH, N, N) plus the shift mask (nW, N, N), either may be None, as one term added to
    the logits: (B_, nH|1, N, N) in the logits' dtype, or None."""
    mask = bias[None] if bias is not None else None  # (1, nH, N, N)
    if shift_mask is not None:
        nW, N = shift_mask.shape[0], shift_mask.shape[-1]
        mask = shift_mask[:, None] if mask is None else mask + shift_mask[:, None]  # (nW, nH|1, N, N)
        mask = mask.to(dtype).expand(batch_windows // nW, -1, -1, -1, -1)  # (B, nW, nH|1, N, N)
        return mask.reshape(batch_windows, -1, N, N)  # (B_, nH|1, N, N)
    return mask.to(dtype) if mask is not None else None


class WindowAttention(nn.Module):
    """Window multi-head self-attention with RPB (Eq. 6), RoPE (Eq. 14-15), both, or neither.

    Logits: RoPE(q * scale) . RoPE(k) + B + shift mask, softmax, times v; the RoPE rotation comes
    after the scale and the bias after the rotated product, as in the official code. The scale is
    folded into q's rotation factors (equal to rotating q * scale up to float rounding), and the
    bias and shift mask are added as one term.
    `window_size` is the window this block was built for: the size of the stored RPB table.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, use_rpb: bool,
                 rope_kind: Optional[str], rope_theta: float, rpb_resize: str, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.use_rpb = use_rpb
        self.rope_kind = rope_kind  # None, 'axial' or 'mixed'
        self.rope_theta = rope_theta
        self.rpb_resize = rpb_resize
        self._cache = {}  # the fused path's RoPE factors and bias per window (speed section)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if use_rpb:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window_size - 1) ** 2, num_heads))  # ((2w-1)^2, nH)
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        if rope_kind == 'mixed':
            self.rope_freqs = nn.Parameter(init_rope_freqs(num_heads, self.head_dim, rope_theta, True))
        elif rope_kind == 'axial':
            self.register_buffer('rope_freqs', init_rope_freqs(num_heads, self.head_dim, rope_theta, False))

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B_, N, C) windows -> (3, B_, nH, N, d): q, k, v split into heads."""
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim)  # (B_, N, 3, nH, d)
        return qkv.permute(2, 0, 3, 1, 4)  # (3, B_, nH, N, d)

    def rope_inputs(self, window: int, rope_setting=None) -> tuple:
        """Eq. 14's inputs at the run-time window: (frequencies (2, nH, d/2), t_x, t_y (N,),
        temperature). The paper: the window's integer positions 0 .. w-1, extrapolated past the
        training window (section 3.3), temperature 1. rope_setting is the model's rope_setting(),
        None in the paper; beyond the paper it carries the position policy and augmentation."""
        t_x, t_y = window_positions(window, self.rope_freqs.device)  # (N,) each
        return self.rope_freqs, t_x, t_y, 1.0

    def rope_tables(self, window: int, rope_setting=None) -> tuple:
        """Eq. 10 (cos, sin) for the run-time window, each (2, 1, nH, N, d/2): [0] rotates q
        (the scale folded in), [1] rotates k."""
        freqs, t_x, t_y, temperature = self.rope_inputs(window, rope_setting)
        cos, sin = rope_cos_sin(rope_angles(freqs, t_x, t_y))  # (nH, N, d/2) each
        scales = torch.tensor([self.scale * temperature, temperature],
                              device=cos.device)[:, None, None, None, None]  # (2, 1, 1, 1, 1): q, k
        return cos * scales, sin * scales  # (2, 1, nH, N, d/2) each

    def position_bias(self, window: int) -> torch.Tensor:
        """Eq. 5-6 bias for the run-time window: (nH, N, N), the table resized to it."""
        table = resize_rpb_table(self.relative_position_bias_table, window, self.rpb_resize)  # ((2w-1)^2, nH)
        return relative_position_bias(table, window)  # (nH, N, N)

    def forward(self, x: torch.Tensor, window: int, shift_mask: Optional[torch.Tensor] = None,
                rope_setting=None, fused: bool = False, need_weights: bool = False):
        """x (B_, N, C) windows, shift_mask (nW, N, N) or None.

        Returns (out (B_, N, C), attention probabilities (B_, nH, N, N) if need_weights else None).
        fused: the same math as one complex multiply with cached tables and
        F.scaled_dot_product_attention (speed section); else softmax(q k^T * scale + B + mask) v
        written out. The model decides (SwinTransformer.fused).
        """
        if fused:
            return fused_window_attention(self, x, window, shift_mask, rope_setting), None
        B_, N, C = x.shape
        qkv = self.qkv_heads(x)  # (3, B_, nH, N, d)
        v = qkv[2]
        if self.rope_kind is None:
            q, k, scale = qkv[0], qkv[1], self.scale
        else:  # Eq. 11
            q, k = apply_rope(qkv[:2], *self.rope_tables(window, rope_setting)).unbind(0)  # 2 x (B_, nH, N, d)
            scale = 1.0  # already in the q factors
        bias = self.position_bias(window) if self.use_rpb else None  # (nH, N, N)
        mask = additive_mask(bias, shift_mask, B_, q.dtype)  # (B_, nH|1, N, N) or None
        logits = (q * scale) @ k.transpose(-2, -1)  # (B_, nH, N, N)
        if mask is not None:
            logits = logits + mask
        attn = logits.softmax(dim=-1)
        out = attn @ v  # (B_, nH, N, d)
        return self.proj(out.transpose(1, 2).reshape(B_, N, C)), (attn if need_weights else None)


# ----------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth per sample (Swin recipe); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        return x * mask / keep

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm Swin block: x += attn(norm1(x)) in (shifted) windows, x += mlp(norm2(x))."""

    def __init__(self, dim, num_heads, window_size, shifted, mlp_ratio, drop_path, use_rpb,
                 rope_kind, rope_theta, rpb_resize, qkv_bias=True):
        super().__init__()
        self.shifted = shifted  # odd block: shift by window // 2 when the stage allows it
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, use_rpb, rope_kind, rope_theta,
                                    rpb_resize, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def window_attention(self, y, window: int, shift: int, mask, rope_setting, fused: bool, need_weights: bool):
        """Attention of a (B, H, W, C) grid in its windows, rolled by -shift first (0: none).
        Returns ((B, H, W, C), probabilities (B_, nH, N, N) or None)."""
        H, W = y.shape[1], y.shape[2]
        y = shift_and_partition(y, window, shift)  # (B_, N, C)
        y, attn = self.attn(y, window, mask, rope_setting, fused, need_weights)  # (B_, N, C)
        return reverse_and_unshift(y, window, shift, H, W), attn  # (B, H, W, C)

    def forward(self, x, window: int, shift: int, mask: Optional[torch.Tensor], rope_setting=None,
                fused: bool = False, need_weights: bool = False):
        """x (B, H, W, C); shift 0 means no cyclic shift; mask: the additive (nW, N, N) mask
        the model chose for this block, or None; the rest as WindowAttention.forward.
        Returns ((B, H, W, C), probabilities or None)."""
        y, attn = self.window_attention(self.norm1(x), window, shift, mask, rope_setting, fused, need_weights)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn


# ----------------------------------------------------------------------------------------------
# Patch merging, stage
# ----------------------------------------------------------------------------------------------

class PatchMerging(nn.Module):
    """2x2 neighbours -> channels in the order (even row, even col), (odd row, even col),
    (even row, odd col), (odd row, odd col); LayerNorm(4C); Linear(4C -> 2C, no bias)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        """(B, H, W, C) -> (B, H/2, W/2, 2C)."""
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, drop_paths, downsample,
                 use_rpb, rope_kind, rope_theta, rpb_resize, qkv_bias=True):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, drop_paths[i], use_rpb,
                      rope_kind, rope_theta, rpb_resize, qkv_bias) for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward_blocks(self, x, window, shift, masks, rope_setting=None, fused=False, need_weights=False):
        """(B, H, W, C) through the stage's blocks, before the downsampling: its feature map.

        masks: (mask of the unshifted blocks, mask of the shifted ones), each (nW, N, N) or None
        (SwinTransformer.stage_masks). Returns ((B, H, W, C), [probabilities or None per block])."""
        unshifted, shifted = masks
        attns = []
        for block in self.blocks:
            x, attn = block(x, window, shift if block.shifted else 0, shifted if block.shifted else unshifted,
                            rope_setting, fused, need_weights)
            attns.append(attn)
        return x, attns

    def forward(self, x, window, shift, masks, rope_setting=None, fused=False, need_weights=False):
        x, attns = self.forward_blocks(x, window, shift, masks, rope_setting, fused, need_weights)
        return (self.downsample(x) if self.downsample is not None else x), attns


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

@dataclass
class SwinConfig:
    """Hyper-parameters; the defaults are Swin-T with RPB (`swin_tiny_patch4_window7_224`)."""
    pe: str = 'rpb'
    num_classes: int = 1000
    img_size: Union[int, tuple] = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    rope_theta: Optional[float] = None  # None: 50 for axial, 10 for mixed (published configs)
    rpb_resize: str = 'bicubic'


class SwinTransformer(nn.Module):
    """Swin Transformer with the position encoding `cfg.pe`; see the module docstring."""

    # The readable path (explicit RoPE and softmax) unless set; the speed section turns the fused
    # path on for the full file. Per model: `model.fused = False`.
    fused = False

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        if cfg.pe not in PE_VARIANTS:
            raise ValueError(f"unknown pe {cfg.pe!r}; valid: {', '.join(PE_VARIANTS)}")
        if cfg.rpb_resize not in RPB_RESIZE_MODES:
            raise ValueError(f"unknown rpb_resize {cfg.rpb_resize!r}; "
                             f"valid: {', '.join(RPB_RESIZE_MODES)}")
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError(f'depths {tuple(cfg.depths)} and num_heads {tuple(cfg.num_heads)} '
                             'differ in length')
        self.cfg = cfg
        self.pe = cfg.pe
        self.num_classes = cfg.num_classes
        self.patch_size = cfg.patch_size
        self.img_size = cfg.img_size if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        # the side whose window is window_size: the only side for a square img_size
        self._base_side = self.img_size if isinstance(self.img_size, int) else min(self.img_size)
        self.window_size = cfg.window_size
        self.depths = tuple(cfg.depths)
        self.num_heads = tuple(cfg.num_heads)
        self.embed_dim = cfg.embed_dim
        self.num_stages = len(self.depths)
        self.num_features = cfg.embed_dim * 2 ** (self.num_stages - 1)
        self.use_rpb = cfg.pe in ('rpb', 'rope_axial_rpb', 'rope_mixed_rpb')
        self.rope_kind = 'mixed' if 'mixed' in cfg.pe else 'axial' if 'axial' in cfg.pe else None
        self.rope_theta = None
        if self.rope_kind is not None:
            default_theta = 10.0 if self.rope_kind == 'mixed' else 50.0  # published Swin configs
            self.rope_theta = cfg.rope_theta if cfg.rope_theta is not None else default_theta
        for s, heads in enumerate(self.num_heads):
            dim = cfg.embed_dim * 2 ** s
            if dim % heads or (self.rope_kind and (dim // heads) % 4):
                raise ValueError(f'stage {s}: dim {dim} must split into {heads} heads'
                                 + (' of a head dim divisible by 4 (RoPE)' if self.rope_kind else ''))
        built_h, built_w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        built = self.classification_windows(built_h, built_w)  # also validates the config
        self.built_windows = tuple(w for w, _ in built)  # per stage: the window of its RPB tables

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        drop_paths = torch.linspace(0, cfg.drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for s, depth in enumerate(self.depths):
            start = sum(self.depths[:s])
            self.layers.append(SwinStage(
                cfg.embed_dim * 2 ** s, depth, self.num_heads[s], built[s][0], cfg.mlp_ratio,
                drop_paths[start:start + depth], s < self.num_stages - 1, self.use_rpb,
                self.rope_kind, self.rope_theta, cfg.rpb_resize, cfg.qkv_bias))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._mask_cache = {}  # the fused path's shift masks per size (speed section)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _attentions(self) -> list:
        """Every block's WindowAttention, in stage order."""
        return [blk.attn for stage in self.layers for blk in stage.blocks]

    # -- resolution ------------------------------------------------------------------------------
    def _window_for(self, H: int, W: int):
        """Run-time (window, [(window, shift) per stage]) or an error string."""
        unit = self.patch_size * 2 ** (self.num_stages - 1)
        base = self._base_side
        if H <= 0 or W <= 0 or H % unit or W % unit:
            return (f'both sides must be positive multiples of {unit} '
                    f'(patch {self.patch_size} x 2^{self.num_stages - 1} merges)')
        if (self.window_size * min(H, W)) % base:
            return (f'the window window_size * min(H, W) / img_size = '
                    f'{self.window_size} * {min(H, W)} / {base} must be an integer')
        window = self.window_size * min(H, W) // base
        plan = []
        for s in range(self.num_stages):
            rh, rw = H // (self.patch_size * 2 ** s), W // (self.patch_size * 2 ** s)
            if min(rh, rw) <= window:  # official rule: the window covers the grid, no shift
                plan.append((min(rh, rw), 0))
            else:
                plan.append((window, window // 2))
            if rh % plan[-1][0] or rw % plan[-1][0]:
                return f'stage {s} grid {rh}x{rw} does not tile into {plan[-1][0]}x{plan[-1][0]} windows'
        return plan

    def classification_windows(self, H: int, W: int) -> list:
        """[(window, shift)] per stage for an H x W input under the paper's rule (shift applies
        to odd blocks).

        With img_size the resolution the model was built for (its smaller side if a tuple) and
        window_size the window there (7 at 224), an H x W input uses the window
            w = window_size * min(H, W) / img_size          (224 -> 7, 96 -> 3, 160 -> 5, 384 -> 12)
        which must be an integer, and H, W must be multiples of patch_size * 2**(stages-1) (32 for
        the published models). As in the official code, a stage whose smaller grid side is <= w
        uses a window of that side and no shift; every other stage uses w and, on odd blocks,
        shift w // 2. Every stage grid must tile into its windows: for the published models that
        means a square r x r with r a multiple of 32, or a non-square H x W whose longer side is a
        multiple of the shorter one (e.g. 160 x 320, 224 x 448), the window then following
        min(H, W). No rebuild: positions, relative indices, shift masks, resized RPB tables and
        RoPE factors are made for the actual grid.
        Raises ValueError for a size this rule does not allow.
        """
        plan = self._window_for(H, W)
        if isinstance(plan, str):
            unit = self.patch_size * 2 ** (self.num_stages - 1)
            side = max(min(H, W), 1)
            valid = [r for r in range(unit, 4 * max(H, W, unit) + 64 * unit, unit)
                     if not isinstance(self._window_for(r, r), str)]
            below = [r for r in valid if r <= side][-2:]
            above = [r for r in valid if r > side][:2]
            raise ValueError(
                f'input size {H}x{W} is not allowed: {plan}. Rule: sides multiples of {unit}, '
                f'window = {self.window_size} * min(H, W) / {self._base_side} an integer, every '
                'stage grid tiling into its windows (published models: r x r with r a multiple '
                'of 32, or H x W with the longer side a multiple of the shorter). '
                f'Nearest valid square sizes: {below + above}. Any size runs with '
                "window_rule='dense' (beyond the paper: padded, masked windows).")
        return plan

    def stage_windows(self, H: int, W: int) -> list:
        """[(window, shift)] per stage for an H x W input: the paper's classification_windows."""
        return self.classification_windows(H, W)

    def check_img_size(self, H: int, W: int) -> None:
        """Raise ValueError (rule and nearest valid sizes) if H x W is not an allowed input."""
        self.stage_windows(H, W)

    def stage_masks(self, H, W, window, shift, device, fused: bool = False) -> tuple:
        """Additive masks of an H x W stage grid for its (unshifted, shifted) blocks, each
        (nW, N, N) or None; the fused path keeps them per size."""
        if not shift:
            return None, None
        mask = (cached_mask(self._mask_cache, shift_window_mask, H, W, window, shift, device) if fused
                else shift_window_mask(H, W, window, shift, device))  # (nW, N, N)
        return None, mask

    def rope_setting(self):
        """How RoPE positions follow the window in this forward, handed to every attention
        (WindowAttention.rope_inputs): None, the paper's integer positions."""
        return None

    # -- forward ---------------------------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor, need_weights: bool = False) -> tuple:
        """(B, in_chans, H, W) -> (last stage's grid (B, h, w, C) before the final norm,
        [{'attn', 'window', 'shift', 'stage'} per block] if need_weights else [])."""
        # The fused path where it is on and nothing needs what only the readable one has: the
        # probabilities, or a real-valued graph without cache lookups for torch.compile / export.
        fused = self.fused and not need_weights and not torch.compiler.is_compiling()
        plan = self.stage_windows(x.shape[-2], x.shape[-1])
        rope_setting = self.rope_setting()
        x = self.patch_embed(x)  # (B, H/p, W/p, C)
        weights = []
        for s, stage in enumerate(self.layers):
            window, shift = plan[s]
            masks = self.stage_masks(x.shape[1], x.shape[2], window, shift, x.device, fused)  # 2 x (nW, N, N) or None
            x, attns = stage(x, window, shift, masks, rope_setting, fused, need_weights)
            if need_weights:
                weights += [{'attn': attn.detach(), 'window': window, 'shift': shift if blk.shifted else 0, 'stage': s}
                            for blk, attn in zip(stage.blocks, attns)]
        return x, weights

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features): final LayerNorm, mean over tokens."""
        return self.norm(self.forward_stages(x)[0]).mean(dim=(1, 2))  # (B, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor):
        """Logits and every block's attention probabilities, from the explicit softmax.

        Returns (logits (B, num_classes), list over blocks in stage order of dicts
        {'attn': (B*nW, nH, w*w, w*w), 'window': w, 'shift': s, 'stage': i}); tokens row-major
        inside a window, windows row-major with batch outermost, in the rolled frame when s > 0.
        """
        x, weights = self.forward_stages(x, need_weights=True)
        return self.head(self.norm(x).mean(dim=(1, 2))), weights

    def no_weight_decay(self) -> set:
        """RPB tables and RoPE-Mixed frequencies (names as in named_parameters())."""
        return {name for name, _ in self.named_parameters()
                if name.endswith('relative_position_bias_table') or name.endswith('rope_freqs')}

    def clear_caches(self) -> None:
        """Drop cached masks / tables / RoPE factors (they are also invalidated automatically)."""
        self._mask_cache.clear()
        for attn in self._attentions():
            attn._cache.clear()


# ----------------------------------------------------------------------------------------------
# Presets and create_model
# ----------------------------------------------------------------------------------------------

SIZES = {
    'swin_tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    'swin_small': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    'swin_base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}


def _published_names() -> dict:
    names = {}
    for size in ('tiny', 'small', 'base'):
        names[f'swin_{size}_patch4_window7_224'] = (f'swin_{size}', 'rpb')
        for rope in ('axial', 'mixed'):
            names[f'swin_rope_{rope}_{size}_patch4_window7_224'] = (f'swin_{size}', f'rope_{rope}')
            names[f'swin_rope_{rope}_rpb_{size}_patch4_window7_224'] = (f'swin_{size}', f'rope_{rope}_rpb')
    return names


PUBLISHED = _published_names()  # published name -> (size name, pe)


def list_models() -> list:
    """Size names (take pe=...) and published names (pe fixed)."""
    return list(SIZES) + list(PUBLISHED)


def create_model(name: str, **kwargs) -> SwinTransformer:
    """Build `name` (a size name with pe=..., default 'rpb'; or a published name) with
    SwinConfig fields as keyword overrides (num_classes, img_size, patch_size, in_chans,
    embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate, rope_theta, rpb_resize).
    Raises ValueError for an unknown name or pe, TypeError for an unknown keyword.
    """
    if name in PUBLISHED:
        size, pe = PUBLISHED[name]
        if kwargs.get('pe', pe) != pe:
            raise ValueError(f'{name} fixes pe={pe!r}; use the size name {size!r} for pe={kwargs["pe"]!r}')
        kwargs['pe'] = pe
    elif name in SIZES:
        size = name
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    valid_fields = [f.name for f in fields(SwinConfig)]  # SwinConfig as defined when called
    unknown = [k for k in kwargs if k not in valid_fields]
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(unknown)} for {name}; "
                        f"valid: {', '.join(valid_fields)}")
    pe = kwargs.get('pe', 'rpb')
    if pe not in PE_VARIANTS:
        raise ValueError(f"unknown pe {pe!r}; valid: {', '.join(PE_VARIANTS)}")
    return SwinTransformer(SwinConfig(**{**SIZES[size], **kwargs}))


# ==============================================================================================
# End of the paper's model. What follows extends it from below: beyond the paper, checkpoints,
# published weights, the fused speed path.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Beyond the paper: RoPE at another window (position policies, coordinate augmentation)
# ----------------------------------------------------------------------------------------------
# The paper extrapolates (section 3.3): a larger window uses the integer positions 0 .. w-1 of its
# larger window. The other policies change every angle theta_j p (one axis, frequency j, position p)
# into (c_j theta_j) p, c_j depending on s = current window / training window (the window the
# block was built for). All are the identity at the training window, so they never change
# training. (The same helpers as in rope_vit.py, where a grid plays the window's part.)
# Coordinate augmentation moves the positions during training only (a training loop sets it).

ROPE_POSITIONS = ('extrapolate', 'interpolate', 'ntk', 'yarn')


def rope_position_scale(policy: str, freqs: torch.Tensor, train_len: int, grid_len: int, theta: float,
                        pairs: int, yarn_alpha: float, yarn_beta: float) -> Optional[torch.Tensor]:
    """Factor c per frequency (freqs' shape) for one axis, or None where c = 1 everywhere.

    freqs: the frequencies' components along the axis (any shape: theta^x or theta^y of Eq. 14);
    s = grid_len / train_len (window sides); pairs = d/4, the complex pairs of one axis in Eq. 13. The factors are constants (no gradient flows through them).

    * ``extrapolate`` (the paper, section 3.3): c = 1, integer positions on the new grid.
    * ``interpolate`` (position interpolation; EVA-02's ``ref_feat_shape``): c = 1 / s, i.e.
      positions p / s that span the training grid's range.
    * ``ntk`` (NTK-aware base scaling per axis; FiT's "VisionNTK"): Axial uses the base
      ``theta' = theta * s^(d / (d - 2))``, d = 2 * pairs the rotary dims of the axis, which is
      c_j = s^(-j / (pairs - 1)) for the magnitude theta^(-j / pairs) of Eq. 13. Ours, for any
      (learned) frequency f: c = s^(-gamma), gamma = clamp(ln|f| / ln f_min, 0, 1) with
      f_min = theta^(-(pairs - 1) / pairs) the lowest magnitude of Eq. 13. On Eq. 13's spectrum
      gamma = j / (pairs - 1): NTK exactly. Highest frequencies extrapolate, the lowest interpolate.
    * ``yarn`` (YaRN's "NTK-by-parts", Peng et al. 2023; FiT): r = train_len |f| / (2 pi) turns
      over the training grid, ramp = clamp((r - alpha) / (beta - alpha), 0, 1),
      c = ramp + (1 - ramp) / s. Defaults alpha = 1/4, beta = 1 (turns): a frequency that turns
      at least once over the training grid was trained at every angle and extrapolates; one that
      turned less than a quarter turn saw only a short arc and interpolates. (YaRN's LLM values
      alpha = 1, beta = 32 would interpolate nearly every frequency of a 14-patch grid, whose
      fastest one turns 14 / (2 pi) = 2.2 times.) Plus the temperature of yarn_attention_scale.
    """
    if policy == 'extrapolate' or grid_len == train_len:
        return None
    s = grid_len / train_len
    if policy == 'interpolate':
        return torch.full_like(freqs, 1.0 / s)
    magnitude = freqs.detach().abs()
    if policy == 'ntk':
        if pairs < 2:
            return None  # one frequency per axis: theta^0 = 1 whatever the base
        lowest = math.log(theta) * (pairs - 1) / pairs  # -ln f_min
        gamma = (-torch.log(magnitude.clamp_min(1e-30)) / lowest).clamp(0, 1)
        return torch.exp(-gamma * math.log(s))  # s^(-gamma)
    if policy == 'yarn':
        turns = train_len * magnitude / (2 * math.pi)
        ramp = ((turns - yarn_alpha) / (yarn_beta - yarn_alpha)).clamp(0, 1)
        return ramp + (1 - ramp) / s
    raise ValueError(f"unknown rope_positions {policy!r}; valid values: {', '.join(ROPE_POSITIONS)}")


def yarn_attention_scale(policy: str, growth: float) -> float:
    """YaRN's attention temperature: q and k each times 1 + 0.1 ln s (logits times its square).

    growth s: how much larger the window is (its side ratio; rope_vit.py uses the grid's). 1 for other policies and for s <= 1, as in YaRN.
    """
    return 1.0 + 0.1 * math.log(growth) if policy == 'yarn' and growth > 1 else 1.0


def augment_positions(t: torch.Tensor, grid_len: int, shift: float, scale: float) -> torch.Tensor:
    """Training-time coordinate augmentation (DINOv3's RoPE "shift", "jitter" and "rescale") on one axis.

    DINOv3 normalises positions to u = (2p + 1 - G) / G in (-1, 1) and trains on (u + shift) * scale
    with shift ~ U(-a, a) and a log-uniform scale. Here the same map in patch units around the window
    centre c = (G - 1) / 2 (G: the window side): p' = c + (p - c + shift * G / 2) * scale.
    """
    centre = (grid_len - 1) / 2
    return centre + (t - centre + shift * grid_len / 2) * scale


def check_rope_positions(policy: str, yarn_alpha: float, yarn_beta: float) -> None:
    """Raise ValueError for an unknown policy or an empty YaRN ramp."""
    if policy not in ROPE_POSITIONS:
        raise ValueError(f"unknown rope_positions {policy!r}; valid values: {', '.join(ROPE_POSITIONS)}")
    if not 0 <= yarn_alpha < yarn_beta:
        raise ValueError(f'yarn needs 0 <= yarn_alpha < yarn_beta (turns), got {yarn_alpha} and {yarn_beta}')


def adapt_rope_to_window(attn: WindowAttention, window: int, t_x: torch.Tensor, t_y: torch.Tensor,
                         rope_setting: tuple) -> tuple:
    """(frequencies, t_x, t_y, temperature) for WindowAttention.rope_inputs at the run-time window.

    rope_setting (policy, yarn_alpha, yarn_beta, coordinate augmentation or None), from
    SwinTransformer.rope_setting: the augmentation moves the positions; the policy scales the
    frequencies per axis (rope_position_scale, from the block's built window) and gives YaRN's
    temperature. Off (the default: 'extrapolate', no augmentation) they come back unchanged,
    temperature 1.
    """
    policy, yarn_alpha, yarn_beta, coord_augment = rope_setting
    if coord_augment is not None:
        shift_x, shift_y, scale_x, scale_y = coord_augment
        t_x, t_y = augment_positions(t_x, window, shift_x, scale_x), augment_positions(t_y, window, shift_y, scale_y)
    scale = [rope_position_scale(policy, f, attn.window_size, window, attn.rope_theta,
                                 attn.head_dim // 4, yarn_alpha, yarn_beta)
             for f in attn.rope_freqs.detach().float().unbind(0)]  # theta^x, theta^y factors
    freqs = attn.rope_freqs
    if any(c is not None for c in scale):
        freqs = freqs * torch.stack([torch.ones_like(f) if c is None else c
                                     for f, c in zip(freqs.detach().float(), scale)])  # (2, nH, d/2)
    return freqs, t_x, t_y, yarn_attention_scale(policy, window / attn.window_size)


# ----------------------------------------------------------------------------------------------
# Beyond the paper: dense prediction at any image size (a fixed window, padding and masks)
# ----------------------------------------------------------------------------------------------
# The classification rule (stage_windows) scales the window with the image, so only sizes whose
# every stage grid tiles into that window run. Detection and segmentation inputs have any height
# and width (800 x 1333 resized COCO images, 512 x 1024 crops); Swin's own detection and
# segmentation backbones keep one window for every input and pad instead. window_rule='dense'
# does so too, set in SwinConfig or assigned on a built model between forwards:
# * the image is padded with zeros at the bottom and right to a multiple of the patch (pad_image);
# * every stage keeps a fixed window: dense_window, or None for the window its blocks were built
#   for (built_windows: 7 for the published models). At the built window the RPB table is used
#   as stored and RoPE has the positions it was trained with, window-local 0 .. w-1 as under the
#   classification rule; at another dense_window the table is resized (rpb_resize) and the
#   position policy (rope_positions) applies, as for any window change;
# * each block pads its normalised grid to whole windows (pad_to_windows), attends, and drops the
#   padding's outputs, so padded tokens exist inside attention only;
# * padded keys are masked out with -inf for every valid query, in unshifted and shifted windows
#   alike (padded_window_mask), so a valid output does not depend on what the padding holds (the
#   official detection code lets valid queries attend to its zero padding). Padded queries keep
#   their unmasked rows, so no softmax row is all -inf (a NaN, also in the backward);
# * shifted blocks shift by w // 2 unless the padded grid is a single window, where a roll would
#   only wrap the map onto itself (the classification rule does not shift a stage its window
#   covers either; the official detection code shifts there too);
# * an odd side gets one zero row or column before patch merging (pad_grid), as in the official
#   code, so stage s has ceil(H / (patch * 2^s)) x ceil(W / (patch * 2^s)) tokens.
# Where both rules give the same windows and nothing is padded (224 x 224 at window 7) the outputs
# are those of the classification rule exactly: no mask or padding is added there.

WINDOW_RULES = ('classification', 'dense')
PAD_MASK_VALUE = float('-inf')  # a padded key gets exactly no weight (exp(-inf) = 0)


def check_window_rule(rule: str, dense_window: Optional[int]) -> None:
    """Raise ValueError for an unknown window_rule or a dense_window that is not a positive int or None."""
    if rule not in WINDOW_RULES:
        raise ValueError(f"unknown window_rule {rule!r}; valid values: {', '.join(WINDOW_RULES)}")
    if dense_window is not None and (isinstance(dense_window, bool) or not isinstance(dense_window, int)
                                     or dense_window < 1):
        raise ValueError(f'dense_window must be a positive number of tokens or None, got {dense_window!r}')


def dense_grid(H: int, W: int, stride: int) -> tuple:
    """Tokens (rows, cols) of a stage of that stride (patch * 2^s) for an H x W image under the
    dense rule: ceil(H / stride), ceil(W / stride) (patch padding, then odd sides rounded up)."""
    return -(-H // stride), -(-W // stride)


def dense_stage_windows(model: SwinTransformer, H: int, W: int) -> list:
    """stage_windows under window_rule='dense': [(window, shift)] per stage, any H x W >= 1.

    window: model.dense_window, or the stage's built window; shift window // 2, or 0 where the
    stage grid padded to whole windows is a single window. Raises ValueError for a side < 1.
    """
    if H < 1 or W < 1:
        raise ValueError(f'input size {H}x{W} is not allowed: both sides must be at least 1 pixel')
    plan = []
    for s, built in enumerate(model.built_windows):
        window = model.dense_window or built
        rows, cols = dense_grid(H, W, model.patch_size * 2 ** s)
        plan.append((window, 0 if rows <= window and cols <= window else window // 2))
    return plan


def pad_image(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, Hp, Wp), sides rounded up to multiples of `multiple` with zeros at
    the bottom and right; x itself where they are multiples already."""
    pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def pad_grid(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, Hp, Wp, C), sides rounded up to multiples of `multiple` with zero
    tokens at the bottom and right; x itself where they are multiples already."""
    pad_h, pad_w = (-x.shape[1]) % multiple, (-x.shape[2]) % multiple
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def pad_to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """A block's normalised (B, H, W, C) grid padded to whole windows, (B, Hp, Wp, C).

    pad_grid under its own name: what the padding holds must not matter (padded_window_mask),
    and a test replaces this function to fill the padding with other values.
    """
    return pad_grid(x, window)


def padded_window_mask(H: int, W: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Additive mask of the windows of an H x W grid padded to Hp x Wp (multiples of the
    window) and rolled by -shift (0: no roll), in shift_and_partition's window order.

    The shift mask of the padded grid (shift_window_mask: -100 between regions; zeros for
    shift 0) plus PAD_MASK_VALUE wherever a valid query meets a padded key.
    Returns (nW, N, N) float32, nW = (Hp / w) * (Wp / w).
    """
    Hp, Wp = H + (-H) % window, W + (-W) % window
    valid = torch.zeros(1, Hp, Wp, 1, device=device)
    valid[:, :H, :W] = 1
    valid = shift_and_partition(valid, window, shift).squeeze(-1) > 0  # (nW, N): True on the grid's tokens
    if shift:
        mask = shift_window_mask(Hp, Wp, window, shift, device)  # (nW, N, N)
    else:
        mask = torch.zeros(valid.shape[0], window * window, window * window, device=device)  # (nW, N, N)
    return mask.masked_fill(valid[:, :, None] & ~valid[:, None, :], PAD_MASK_VALUE)  # query valid, key padded


def padded_window_masks(H: int, W: int, window: int, shift: int, device=None) -> tuple:
    """(unshifted, shifted) padded_window_mask of a padded stage grid: SwinTransformer.stage_masks."""
    unshifted = padded_window_mask(H, W, window, 0, device)  # (nW, N, N)
    return unshifted, (padded_window_mask(H, W, window, shift, device) if shift else unshifted)


# ----------------------------------------------------------------------------------------------
# Beyond the paper: feature maps per stage (dense prediction)
# ----------------------------------------------------------------------------------------------

def stage_feature_maps(model: SwinTransformer, x: torch.Tensor, indices=None, norm: bool = False,
                       stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False):
    """Feature maps of chosen stages for dense prediction (timm's convention).

    indices: None (every stage), an int n (the last n) or a list of stage indices (negative
    from the end). Stage s gives its blocks' output before the downsampling that ends it,
    (B, embed_dim * 2^s, H / (patch * 2^s), W / (patch * 2^s)) for 'NCHW' or channels last
    for 'NHWC': strides 4, 8, 16, 32 for the published models, as Swin's detection and
    segmentation backbones use. norm: the final LayerNorm on the last stage's map (the only
    one of its width). stop_early: skip the stages after the last one asked for (then no
    final features). Returns the list, or (final features (B, H/32, W/32, C) after the final
    norm, list) unless intermediates_only. Any input size the model accepts works; under
    window_rule='dense' that is any H x W, and map s is the valid region
    (B, embed_dim * 2^s, ceil(H / (patch * 2^s)), ceil(W / (patch * 2^s))) (the image is padded
    to a multiple of the patch, odd sides before each merge; the final features likewise).
    """
    if output_fmt not in ('NCHW', 'NHWC'):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    take = _take_indices(model.num_stages, indices)
    last = max(take) if stop_early else model.num_stages - 1
    if last < model.num_stages - 1 and not intermediates_only:
        raise ValueError('stop_early leaves no final features: pass intermediates_only=True with it')
    fused = model.fused and not torch.compiler.is_compiling()  # as SwinTransformer.forward_stages
    plan = model.stage_windows(x.shape[-2], x.shape[-1])
    rope_setting = model.rope_setting()
    x = model.patch_embed(x)  # (B, H/p, W/p, C)
    intermediates = []
    for s in range(last + 1):
        window, shift = plan[s]
        masks = model.stage_masks(x.shape[1], x.shape[2], window, shift, x.device, fused)  # 2 x (nW, N, N) or None
        x, _ = model.layers[s].forward_blocks(x, window, shift, masks, rope_setting, fused)  # (B, H, W, C)
        if s in take:
            y = model.norm(x) if norm and s == model.num_stages - 1 else x
            intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else y)
        if model.layers[s].downsample is not None:
            x = model.layers[s].downsample(x)
    if intermediates_only:
        return intermediates
    return model.norm(x), intermediates


def _take_indices(count: int, indices) -> List[int]:
    """Absolute indices from None (all), an int n (the last n) or a list (negative from the end)."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= count:
            raise ValueError(f'indices={indices}: the last n stages needs 1 <= n <= {count}')
        return list(range(count - indices, count))
    taken = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f'stage index {i!r} is out of range for {count} stages')
        taken.append(i % count)
    if not taken:
        raise ValueError('indices is empty')
    return taken


# ----------------------------------------------------------------------------------------------
# Beyond the paper: the model classes that carry it
# ----------------------------------------------------------------------------------------------
# Each class below subclasses the paper's class of the same name and replaces it in this module.
# The paper's code looks these names up when it runs (create_model builds SwinConfig and
# SwinTransformer, SwinStage builds SwinBlock and PatchMerging, SwinBlock builds WindowAttention),
# so importing the whole file builds these classes, while the paper's section copied on its own
# builds the paper's. They add no modules and draw no random numbers: the same seed gives the
# same weights either way, and under the paper's settings the same outputs.

@dataclass
class SwinConfig(SwinConfig):
    """The paper's hyper-parameters plus what goes beyond the paper."""
    # How RoPE follows a change of window (rope_position_scale): one of ROPE_POSITIONS, scaled
    # from each block's built window (window_size, or its stage grid where that is smaller);
    # yarn's ramp in turns.
    rope_positions: str = 'extrapolate'
    yarn_alpha: float = 0.25
    yarn_beta: float = 1.0
    # The window rule (WINDOW_RULES; section "dense prediction"). 'classification': the window
    # follows the image (classification_windows); 'dense': any H x W, a fixed window
    # (dense_window, or None for each stage's built window), the grids padded and masked.
    window_rule: str = 'classification'
    dense_window: Optional[int] = None


class PatchEmbed(PatchEmbed):
    def forward(self, x):
        # dense rule: pad the image to whole patches (a no-op for the sizes the paper's rule takes)
        return super().forward(pad_image(x, self.patch_size))


class PatchMerging(PatchMerging):
    def forward(self, x):
        """(B, H, W, C) -> (B, H/2, W/2, 2C); odd sides (dense rule only) round up."""
        return super().forward(pad_grid(x, 2))  # zero row / column on odd sides, as official


class SwinBlock(SwinBlock):
    def window_attention(self, y, window, shift, mask, rope_setting, fused, need_weights):
        """Dense rule: the grid padded to whole windows, attended, and the padding's own outputs
        dropped (a no-op where the grid tiles)."""
        H, W = y.shape[1], y.shape[2]
        y, attn = super().window_attention(pad_to_windows(y, window), window, shift, mask, rope_setting,
                                           fused, need_weights)  # (B, Hp, Wp, C)
        return (y[:, :H, :W] if y.shape[1:3] != (H, W) else y), attn  # (B, H, W, C)


class WindowAttention(WindowAttention):
    def rope_inputs(self, window: int, rope_setting=None) -> tuple:
        """The paper's inputs, moved by the coordinate augmentation and scaled by the position
        policy of rope_setting (SwinTransformer.rope_setting; None: the paper's)."""
        freqs, t_x, t_y, temperature = super().rope_inputs(window)
        if rope_setting is None:
            return freqs, t_x, t_y, temperature
        return adapt_rope_to_window(self, window, t_x, t_y, rope_setting)


class SwinTransformer(SwinTransformer):
    """Swin Transformer with the position encoding `cfg.pe`; see the module docstring.

    Beyond the paper: the RoPE position policy (rope_positions) and training-time coordinate
    augmentation (rope_coord_augment), the dense window rule (window_rule, dense_window) and
    per-stage feature maps (forward_intermediates). Each is read from the config or the model
    when a forward runs; assign them between forwards.
    """

    def __init__(self, cfg: SwinConfig):
        super().__init__(cfg)
        check_rope_positions(cfg.rope_positions, cfg.yarn_alpha, cfg.yarn_beta)
        check_window_rule(cfg.window_rule, cfg.dense_window)
        # (shift_x, shift_y, scale_x, scale_y) of augment_positions, set per batch by a training
        # loop; None: off.
        self.rope_coord_augment = None

    @property
    def rope_positions(self) -> str:
        """The position policy (ROPE_POSITIONS); assign to change it between forwards."""
        return self.cfg.rope_positions

    @rope_positions.setter
    def rope_positions(self, policy: str) -> None:
        check_rope_positions(policy, self.cfg.yarn_alpha, self.cfg.yarn_beta)
        self.cfg.rope_positions = policy

    @property
    def window_rule(self) -> str:
        """'classification' (the paper's rule, the default) or 'dense'; assign to change it between forwards."""
        return self.cfg.window_rule

    @window_rule.setter
    def window_rule(self, rule: str) -> None:
        check_window_rule(rule, self.cfg.dense_window)
        self.cfg.window_rule = rule

    @property
    def dense_window(self) -> Optional[int]:
        """The window of every stage under the dense rule; None: each stage's built window (built_windows)."""
        return self.cfg.dense_window

    @dense_window.setter
    def dense_window(self, window: Optional[int]) -> None:
        check_window_rule(self.cfg.window_rule, window)
        self.cfg.dense_window = window

    def rope_setting(self) -> tuple:
        """(policy, yarn_alpha, yarn_beta, coordinate augmentation or None) of this forward, for
        every WindowAttention.rope_inputs (adapt_rope_to_window)."""
        augment = self.rope_coord_augment
        augment = None if augment is None else tuple(float(v) for v in augment)
        return self.cfg.rope_positions, self.cfg.yarn_alpha, self.cfg.yarn_beta, augment

    def stage_windows(self, H: int, W: int, rule: Optional[str] = None) -> list:
        """[(window, shift)] per stage for an H x W input (shift applies to odd blocks).

        rule: the model's window_rule when None; 'classification' is the paper's rule
        (classification_windows), 'dense' takes any size (dense_stage_windows).
        Under the dense rule, forward_with_attention's windows tile the stage grid padded to
        multiples of w (padding at the bottom and right, before the roll).
        """
        if (rule or self.window_rule) == 'dense':
            return dense_stage_windows(self, H, W)
        return self.classification_windows(H, W)

    def stage_masks(self, H, W, window, shift, device, fused: bool = False) -> tuple:
        """The paper's masks, or under the dense rule where the grid does not tile, the masks of
        the padded grid (padded_window_masks)."""
        if not (H % window or W % window):
            return super().stage_masks(H, W, window, shift, device, fused)
        return (cached_mask(self._mask_cache, padded_window_masks, H, W, window, shift, device) if fused
                else padded_window_masks(H, W, window, shift, device))

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Feature maps of chosen stages for dense prediction (stage_feature_maps; with
        window_rule='dense' any input size, map s of shape (B, C_s, ceil(H / (patch 2^s)),
        ceil(W / (patch 2^s))))."""
        return stage_feature_maps(self, x, indices, norm, stop_early, output_fmt, intermediates_only)


# ----------------------------------------------------------------------------------------------
# Checkpoints and published weights
# ----------------------------------------------------------------------------------------------
# Keys and shapes are those of the official code's state dict, minus its derived tensors
# `attn_mask`, `attn.relative_position_index`, `attn.rope_t_x` and `attn.rope_t_y`: this file
# rebuilds them for the actual grid, the official loaders delete them anyway, and load_checkpoint
# drops them (and `relative_coords_table`) before a strict load. `attn.rope_freqs` (2, nH, d/2) is a
# Parameter for Mixed and a persistent buffer for Axial, as published, so parameter counts equal
# the official ones. An RPB table stored for another window is resized bicubically on load.

# Key fragments of derived tensors in published files; rebuilt here for the actual grid.
DERIVED_KEY_FRAGMENTS = ('rope_t_', 'relative_position_index', 'relative_coords_table', 'attn_mask')


class LoadResult(NamedTuple):
    missing_keys: list
    unexpected_keys: list


def _short_list(names, limit=10):
    names = list(names)
    text = ', '.join(names[:limit])
    return text + (f' ... (+{len(names) - limit} more)' if len(names) > limit else '')


def _unwrap_state_dict(ckpt: dict) -> dict:
    """The state dict inside {'model': sd} (published files, training checkpoints) or
    {'state_dict': sd}; a bare state dict as it is."""
    for wrapper in ('model', 'state_dict'):
        if isinstance(ckpt.get(wrapper), dict):
            return ckpt[wrapper]
    return ckpt


_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}


def is_safetensors(path: str) -> bool:
    """A .safetensors name, or content that starts like one (8-byte length, then the JSON '{')."""
    if path.endswith('.safetensors'):
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b'{'  # torch zip files have 0 there, pickles their opcodes


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, read with torch alone.

    The format: an unsigned little-endian 8-byte header length n; n bytes of JSON mapping each
    name to {dtype, shape, data_offsets: [begin, end]} (plus an optional __metadata__ entry);
    then the raw little-endian data, offsets counted from its start. Each tensor is read into
    its own buffer. Raises ValueError naming the file for a truncated or malformed one.
    """
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        header_len = int.from_bytes(f.read(8), 'little')
        if size < 8 or header_len > size - 8:
            raise ValueError(f'{path} is not a complete safetensors file (header length {header_len}, '
                             f'file size {size} bytes): truncated or another format')
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # bad UTF-8 or bad JSON
            raise ValueError(f'{path}: malformed safetensors header ({e})') from None
        if not isinstance(header, dict):
            raise ValueError(f'{path}: malformed safetensors header (not a JSON object)')
        data_start, data_size = 8 + header_len, size - 8 - header_len
        tensors = {}
        for name, entry in header.items():
            if name == '__metadata__':
                continue
            try:
                dtype = _SAFETENSORS_DTYPES[entry['dtype']]
                shape = [int(d) for d in entry['shape']]
                begin, end = (int(o) for o in entry['data_offsets'])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f'{path}: malformed safetensors entry {name!r}: {entry!r:.200} '
                                 f'(dtypes read: {", ".join(_SAFETENSORS_DTYPES)})') from None
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes:
                raise ValueError(f'{path}: safetensors entry {name!r} has offsets {begin}..{end} that do '
                                 f'not hold a {entry["dtype"]} tensor of shape {shape}')
            if end > data_size:
                raise ValueError(f'{path} is truncated: tensor {name!r} ends at data byte {end}, '
                                 f'the file holds {data_size}')
            buffer = bytearray(nbytes)
            f.seek(data_start + begin)
            f.readinto(buffer)
            tensors[name] = (torch.frombuffer(buffer, dtype=dtype).reshape(shape) if nbytes
                             else torch.empty(shape, dtype=dtype))
    return tensors


def read_checkpoint_file(path) -> dict:
    """A checkpoint file as a dict: safetensors, or torch.load(weights_only=True) (never unpickles code)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if is_safetensors(path):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # corrupt, truncated or not a weights-only file
        raise ValueError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}') from None


def load_checkpoint(model: SwinTransformer, path_or_state_dict, strict: bool = True) -> LoadResult:
    """Load a published `{'model': sd}` file, a `{'state_dict': sd}` / bare state dict, a
    .safetensors file, or this project's training checkpoint (its 'model' entry) into `model`.

    Derived tensors (keys containing rope_t_, relative_position_index, relative_coords_table,
    attn_mask) are dropped and rebuilt; RPB tables stored for another window are resized
    bicubically as the official `load_pretrained` does. Files are read with weights_only=True.
    strict=True: any missing, unexpected or mis-shaped key raises ValueError naming them.
    strict=False: the matching tensors are loaded; returns what was tolerated (mis-shaped keys
    count as missing).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        ckpt = read_checkpoint_file(path)
    else:
        path, ckpt = '<state dict>', path_or_state_dict
    if not isinstance(ckpt, dict):
        raise ValueError(f'cannot read checkpoint {path}: expected a dict, got {type(ckpt).__name__}')
    sd = {k: v for k, v in _unwrap_state_dict(ckpt).items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith('module.') for k in sd):  # saved from a DDP wrapper
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not any(f in k for f in DERIVED_KEY_FRAGMENTS)}

    own = model.state_dict()
    for k, v in list(sd.items()):
        if k.endswith('relative_position_bias_table') and k in own and v.ndim == 2 \
                and v.shape != own[k].shape and v.shape[1] == own[k].shape[1] \
                and math.isqrt(v.shape[0]) ** 2 == v.shape[0]:
            window = (math.isqrt(own[k].shape[0]) + 1) // 2
            sd[k] = resize_rpb_table(v.float(), window, 'bicubic').to(v.dtype)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected or misshaped):
        parts = []
        if missing:
            parts.append(f'missing keys ({len(missing)}): {_short_list(missing)}')
        if unexpected:
            parts.append(f'unexpected keys ({len(unexpected)}): {_short_list(unexpected)}')
        if misshaped:
            parts.append(f'mis-shaped keys ({len(misshaped)}): ' + _short_list(
                f'{k} checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}' for k in misshaped))
        raise ValueError(f'checkpoint {path} does not match the model: ' + '; '.join(parts))
    for k in misshaped:
        del sd[k]
    model.load_state_dict(sd, strict=False)
    model.clear_caches()
    return LoadResult(missing_keys=missing + misshaped, unexpected_keys=unexpected)


# Released weights: the paper's RoPE models, one hub repository per name holding the
# {'model': state_dict} file of the official code; the RPB baselines are the original Swin
# release (Liu et al.; the paper did not publish its own). The RoPE+RPB variants have none.
PRETRAINED_URLS = {
    **{f'swin_rope_{rope}_{size}_patch4_window7_224':
       f'https://huggingface.co/naver-ai/swin_rope_{rope}_{size}_patch4_window7_224/resolve/main/pytorch_model.bin'
       for rope in ('axial', 'mixed') for size in ('tiny', 'small', 'base')},
    **{f'swin_{size}_patch4_window7_224':
       f'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_{size}_patch4_window7_224.pth'
       for size in ('tiny', 'small', 'base')},
}


def pretrained_cache_path(name: str) -> str:
    """Where `pretrained=True` keeps the file of `name`: one file per model in torch.hub's cache
    (`$TORCH_HOME/hub/checkpoints`), since every hub file is called pytorch_model.bin."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', f'{name}.pth')


def load_pretrained(model: SwinTransformer, name: str, progress: bool = True) -> LoadResult:
    """Load the released weights of `name` into `model`, downloading them once.

    torch.hub.load_state_dict_from_url fetches PRETRAINED_URLS[name] into
    pretrained_cache_path(name) unless the file is there already (offline use: put it there).
    The load is strict; only a classifier of another size (num_classes) is left at its init.
    Raises RuntimeError (download failed: names the URL and the cache path) or ValueError.
    """
    if name not in PRETRAINED_URLS:
        raise ValueError(f'no released weights for {name!r}; released: {", ".join(PRETRAINED_URLS)}')
    url, cached = PRETRAINED_URLS[name], pretrained_cache_path(name)
    try:
        ckpt = torch.hub.load_state_dict_from_url(url, model_dir=os.path.dirname(cached), map_location='cpu',
                                                  progress=progress, file_name=os.path.basename(cached),
                                                  weights_only=True)
    except Exception as e:
        if not os.path.isfile(cached):  # the download failed
            raise RuntimeError(f'cannot download the {name} weights from {url} ({type(e).__name__}: {e}); '
                               f'without network, save that file as {cached}') from None
        raise ValueError(f'cannot read the cached {name} weights {cached} ({type(e).__name__}: {e}); '
                         'delete the file to download it again') from None
    state_dict = _unwrap_state_dict(ckpt)
    own = model.state_dict()
    if not any(k.startswith('head.') and (k not in own or own[k].shape != v.shape) for k, v in state_dict.items()):
        return load_checkpoint(model, state_dict, strict=True)
    # another classifier: load everything else strictly, keep the new head's init
    result = load_checkpoint(model, {k: v for k, v in state_dict.items() if not k.startswith('head.')}, strict=False)
    if [k for k in result.missing_keys if not k.startswith('head.')] or result.unexpected_keys:
        raise ValueError(f'the {name} weights do not fit the model: missing {_short_list(result.missing_keys)}; '
                         f'unexpected {_short_list(result.unexpected_keys)}')
    return result


_build_model = create_model  # the paper's create_model, which builds the classes above


def create_model(name: str, pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Build `name` (a size name with pe=..., default 'rpb'; or a published name) with
    SwinConfig fields as keyword overrides (num_classes, img_size, patch_size, in_chans,
    embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate, rope_theta, rpb_resize,
    rope_positions, yarn_alpha, yarn_beta, window_rule, dense_window).
    `pretrained=True` (names in PRETRAINED_URLS) loads the released weights with load_pretrained:
    downloaded once, then read from torch.hub's cache.
    Raises ValueError for an unknown name or pe, TypeError for an unknown keyword.
    """
    if pretrained and name not in PRETRAINED_URLS:
        raise ValueError(f'pretrained=True needs a name with released weights; {name!r} is not one of: '
                         f'{", ".join(PRETRAINED_URLS)}')
    model = _build_model(name, **kwargs)
    if pretrained:
        load_pretrained(model, name)
    return model


# ==============================================================================================
# Speed: the same math, fused
# ==============================================================================================
# Why each piece is there, and the test that proves it:
# * Derived tensors (RoPE factors, RPB bias, shift and padding masks) are cached per window while
#   no gradient must reach them (test_swin_eval_cache_follows_weights_and_autocast_runs); training
#   rebuilds the RoPE factors and the bias once per block and forward, through autograd. The bias
#   of the stored window is gathered from the table as it is, without the resize.
# * The rotation is one complex multiply (one kernel on CPU, no stacked intermediates) instead
#   of the four real products of apply_rope (test_swin_fused_rotation_equals_readable).
# * Attention is F.scaled_dot_product_attention with the bias and shift mask as one additive mask.
# SwinTransformer.forward_stages still takes the readable path where the probabilities are asked
# for (forward_with_attention) and under torch.compile / torch.export, which trace the readable,
# real-valued formula: no complex tensors in the graph (ONNX can express it), no cache lookups
# baked into it, and the explicit softmax (the export decomposition of SDPA with a mask
# mislabels strides).

# The default: measured faster than the readable path (Swin-T, CPU: training 1.06-1.09x; docs/performance.md).
SwinTransformer.fused = True


def _cache_key(*parts):
    # Tensors made under inference_mode cannot enter autograd later: keep them apart.
    return parts + (torch.is_inference_mode_enabled(),)


def _tensor_version(t: torch.Tensor):
    # Changes whenever the tensor is written in place (load_state_dict, optimizer step).
    return (t.data_ptr(), t._version, t.device, t.dtype)


def cached(cache: dict, key, source: torch.Tensor, build):
    """build() once per key while `source` is unchanged and no gradient is wanted (fused path only)."""
    if torch.is_grad_enabled() and source.requires_grad:
        return build()  # training: part of the graph, recomputed once per forward
    key = _cache_key(key, _tensor_version(source))
    entry = cache.get(key)
    if entry is None:
        if len(cache) > 16:
            cache.clear()
        # The entry holds `source` too, so its address (part of the key) cannot be reused by
        # another tensor while the entry exists.
        entry = cache[key] = (source.detach(), build())
    return entry[1]


def rotate_fused(qk: torch.Tensor, attn: WindowAttention, window: int, rope_setting=None) -> torch.Tensor:
    """apply_rope(qk, *attn.rope_tables(window, rope_setting)) as one complex multiply, in float32.

    qk (2, B_, nH, N, d): q and k. Returns (2, B_, nH, N, d) in qk's dtype.
    """
    with torch.profiler.record_function('rope'):  # lets a profiler count the RoPE share
        factors = cached(attn._cache, ('rope_complex', window, rope_setting), attn.rope_freqs,
                         lambda: torch.complex(*attn.rope_tables(window, rope_setting)))  # (2, 1, nH, N, d/2)
        pairs = qk.float().unflatten(-1, (-1, 2))  # (2, B_, nH, N, d/2, 2), a view for float32 input
        if pairs.stride(-1) != 1 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()  # view_as_complex needs (real, imag) adjacent
        return torch.view_as_real(torch.view_as_complex(pairs) * factors).flatten(-2).to(qk.dtype)


def cached_position_bias(attn: WindowAttention, window: int) -> torch.Tensor:
    """attn.position_bias(window), cached; the stored table is used as it is at its own window."""
    table = attn.relative_position_bias_table

    def build():
        stored = table.shape[0] == (2 * window - 1) ** 2
        resized = table if stored else resize_rpb_table(table, window, attn.rpb_resize)  # ((2w-1)^2, nH)
        return relative_position_bias(resized, window)  # (nH, N, N)
    return cached(attn._cache, ('rpb', window, attn.rpb_resize), table, build)


def cached_mask(cache: dict, build, H: int, W: int, window: int, shift: int, device):
    """build(H, W, window, shift, device) once per size: shift_window_mask or, under the dense
    rule, padded_window_masks (masks have no weights, so the size alone is the key); see
    SwinTransformer.stage_masks."""
    key = _cache_key(build.__name__, H, W, window, shift, device)
    mask = cache.get(key)
    if mask is None:
        if len(cache) > 32:
            cache.clear()
        mask = cache[key] = build(H, W, window, shift, device)
    return mask


def fused_window_attention(attn: WindowAttention, x: torch.Tensor, window: int,
                           shift_mask: Optional[torch.Tensor], rope_setting=None) -> torch.Tensor:
    """WindowAttention.forward on the fused path: cached factors and bias, the complex rotation, SDPA.

    x (B_, N, C) windows, shift_mask (nW, N, N) or None. Returns (B_, N, C).
    """
    B_, N, C = x.shape
    qkv = attn.qkv_heads(x)  # (3, B_, nH, N, d)
    v = qkv[2]
    if attn.rope_kind is None:
        q, k, scale = qkv[0], qkv[1], attn.scale
    else:
        q, k = rotate_fused(qkv[:2], attn, window, rope_setting).unbind(0)  # 2 x (B_, nH, N, d)
        scale = 1.0  # already in the q factors
    bias = cached_position_bias(attn, window) if attn.use_rpb else None  # (nH, N, N)
    mask = additive_mask(bias, shift_mask, B_, q.dtype)  # (B_, nH|1, N, N) or None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B_, nH, N, d)
    return attn.proj(out.transpose(1, 2).reshape(B_, N, C))  # (B_, N, C)
