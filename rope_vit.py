"""RoPE-ViT: Vision Transformer (DeiT-III "LS") with 2D rotary position embeddings.

Paper: "Rotary Position Embedding for Vision Transformer", Heo, Park, Han, Yun,
ECCV 2024, arXiv 2403.13298. Equation numbers below refer to that paper.

One self-contained file (torch only) holding the paper's section 3.2 and the ViT it
was evaluated with:

* position embeddings ``pe``: ``ape`` (learned absolute, the DeiT-III baseline, Eq. 1),
  ``rope_axial`` (Eq. 12-13), ``rope_mixed`` (Eq. 14-15, learned frequencies per layer
  and head), ``rope_axial_ape`` and ``rope_mixed_ape`` (both), ``none``;
* the published models of naver-ai/rope-vit (``deit_small_patch16_LS``,
  ``rope_mixed_deit_base_patch16_LS``, ...) with the same state-dict keys, so the
  released ``{'model': state_dict}`` files load with ``load_checkpoint``; timm's
  ``vit_*_patch16_rope*_224`` state dicts load too;
* any input size whose sides are multiples of the patch size, square or not, without
  rebuilding: RoPE positions come from the actual patch grid at every forward, the APE
  grid is resized bicubically (no antialias, as the official evaluation code).

Checked against (tests in test_rope.py): timm 1.0.31's Eva "naver" RoPE-ViT models
(max |logit difference| about 5e-6 or less at 224, 160, 320 and 112x448, weights re-drawn
so that position mistakes show); the facts of the official code naver-ai/rope-vit ce85c2e
(key names, shapes, parameter counts, init); the paper's equations (Eq. 8, 11, 15).
Differences from the official code, all bug fixes: fp32 backward works (no in-place
writes into autograd tensors), grids are never inferred from a token count (112x448
gets its own positions), attention runs through F.scaled_dot_product_attention.

Cost (benchmark.py): the rotation tables of all blocks are built once per forward (and kept
per grid while no gradient must reach the frequencies), the class token gets the identity
rotation instead of being sliced off and re-attached, and q and k are rotated in place in the
qkv projection's output by one complex multiply (RotateQK), whose backward keeps no extra
activation and forms the RoPE-Mixed frequency gradient in closed form. ``apply_rope`` is the
readable formula; forward_with_attention and torch.compile use it.

Shape legend: B batch, T = 1 + N tokens (class token first, then N = Hp * Wp patch
tokens row-major over the (Hp, Wp) patch grid: token n has column x = n % Wp and row
y = n // Wp), C embed dim, heads attention heads, D head dim, L depth.

Usage::

    import torch, rope_vit
    model = rope_vit.create_model('rope_mixed_deit_small_patch16_LS')
    rope_vit.load_checkpoint(model, 'rope_mixed_deit_small_patch16_LS.pth')
    model.eval()
    logits = model(torch.randn(1, 3, 384, 384))          # (1, 1000), any multiple of 16
    logits, attn = model.forward_with_attention(torch.randn(1, 3, 256, 384))
    # attn: list of L tensors (1, heads, 1 + 16 * 24, 1 + 16 * 24)
"""
import math
import os
from dataclasses import dataclass, fields
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

PE_VARIANTS = ('ape', 'rope_axial', 'rope_mixed', 'rope_axial_ape', 'rope_mixed_ape', 'none')
DEFAULT_ROPE_THETA = {'axial': 100.0, 'mixed': 10.0}  # Eq. 13 base (Axial) / released Mixed base


# ---------------------------------------------------------------------------------------
# 2D RoPE math (section 3.2), pure functions
# ---------------------------------------------------------------------------------------

def rope_magnitudes(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Eq. 13: frequency magnitudes ``theta^(-t / (D/4))`` for ``t = 0 .. D/4 - 1``.

    Returns float32 (D/4,). With ``theta = 100`` this is Eq. 9 with its base square-rooted.
    """
    t = torch.arange(head_dim // 4, device=device, dtype=torch.float32)
    return theta ** (-t / (head_dim // 4))


def init_mixed_freqs(head_dim: int, depth: int, num_heads: int, theta: float) -> torch.Tensor:
    """Initial RoPE-Mixed frequencies (theta^x, theta^y) of Eq. 14, as released.

    Per layer and head one angle ``a ~ U(0, 2 pi)`` is drawn (loop over layers, then heads,
    one ``torch.rand(1)`` each, as the official code). Pair ``t < D/4`` gets
    ``m_t (cos a, sin a)``, pair ``D/4 + t`` gets ``m_t (cos(a + pi/2), sin(a + pi/2))``
    with ``m_t`` from Eq. 13. Returns float32 (2, L, heads * D/2): index 0 holds
    theta^x, index 1 theta^y; layer l, head h, pair j is ``[:, l, h * D/2 + j]``.
    """
    mag = rope_magnitudes(head_dim, theta)  # (D/4,)
    freqs = torch.empty(2, depth, num_heads, head_dim // 2)
    for layer in range(depth):
        for head in range(num_heads):
            a = torch.rand(1) * 2 * math.pi
            freqs[0, layer, head] = torch.cat([mag * torch.cos(a), mag * torch.cos(a + math.pi / 2)])
            freqs[1, layer, head] = torch.cat([mag * torch.sin(a), mag * torch.sin(a + math.pi / 2)])
    return freqs.flatten(2)  # (2, L, heads * D/2)


def patch_grid_positions(grid_h: int, grid_w: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions ``p_n = (p_n^x, p_n^y)`` of the N = grid_h * grid_w patch tokens.

    Row-major order: token n is at column ``x = n % grid_w`` and row ``y = n // grid_w``.
    Integer patch indices from 0, no centring or scaling (a larger image uses larger
    indices: extrapolation, section 3.3). Returns float32 (N,), (N,).
    """
    y, x = torch.meshgrid(torch.arange(grid_h, device=device, dtype=torch.float32),
                          torch.arange(grid_w, device=device, dtype=torch.float32), indexing='ij')
    return x.flatten(), y.flatten()  # (N,), (N,)


def axial_angles(t_x: torch.Tensor, t_y: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Eq. 12: RoPE-Axial angles, float32 (N, D/2).

    Released layout: complex pairs ``0 .. D/4-1`` rotate with ``p^x`` and pairs
    ``D/4 .. D/2-1`` with ``p^y`` (the paper interleaves x/y; the weights use halves).
    """
    mag = rope_magnitudes(head_dim, theta, device=t_x.device)  # (D/4,)
    return torch.cat([t_x[:, None] * mag, t_y[:, None] * mag], dim=-1)  # (N, D/2)


def mixed_angles(t_x: torch.Tensor, t_y: torch.Tensor, freqs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Eq. 14: RoPE-Mixed angles ``theta^x_t p^x_n + theta^y_t p^y_n`` for every layer and head.

    freqs (2, L, heads * D/2), t_x, t_y (N,). Returns float32 (L, heads, N, D/2). Uses
    broadcast products, not matmuls, so that autocast cannot lower their precision; computed
    in t_x's dtype (float32, or float64 for a float64 model). The memory is token-major
    (a permuted view): the backward's sum over tokens then runs over the outermost dim, which
    is many times faster on CPU than a sum over a middle dim.
    """
    fx, fy = freqs.to(t_x.dtype).unflatten(-1, (num_heads, -1)).unbind(0)  # (L, heads, D/2) each
    angles = t_x[:, None, None, None] * fx + t_y[:, None, None, None] * fy  # (N, L, heads, D/2)
    return angles.permute(1, 2, 0, 3)  # (L, heads, N, D/2)


def rope_tables(angles: torch.Tensor) -> torch.Tensor:
    """Eq. 10: the rotation ``R = e^{i phi} = cos phi + i sin phi`` for each complex pair.

    angles (..., D/2) float32 (or float64). Returns complex64 (complex128) (..., D/2).
    """
    return torch.complex(angles.cos(), angles.sin())


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``x' = x o R``, channels (2j, 2j+1) read as the complex number x_2j + i x_2j+1.

    x (..., T, D) of any float dtype; rot (..., T, D/2) complex, broadcast over x's leading
    dims. The product runs in (at least) float32 and is cast back to x's dtype; nothing is
    written in place. One complex multiply is the cheapest form on CPU (one kernel, no
    intermediate tensors), cheaper than real cos/sin tables with a pair swap.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    x_complex = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (..., T, D/2) complex
    return torch.view_as_real(x_complex * rot).flatten(-2).to(x.dtype)  # (..., T, D)


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., D) real -> (..., D/2) complex view of channel pairs (2j, 2j+1); copies only if strides forbid a view."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


class RotateQK(torch.autograd.Function):
    """Eq. 11 on q and k, in place in the qkv projection's output, with a lean backward.

    Returns (qkv, q, k, v): q, k, v are (B, heads, T, D) views of qkv, q and k rotated; the
    same values as ``apply_rope`` on q and k. Why a Function:
    * memory: autograd of the plain formula writes the rotated q and k to a new tensor (2/3 of
      qkv per block, ~8 % of ViT-S's training memory) and also keeps the unrotated ones for the
      gradient of R. Here the projection's output, which nothing else saves, is rotated in
      place; since |R| = 1 the input is recoverable from the output (x = x' conj(R)), so only
      the rotated qkv, which attention saves anyway, and R are kept for backward.
    * time: the backward writes the gradient of qkv straight from the gradients of q, k, v in
      one pass, rotating q's and k's back on the way; this replaces the stack and the layout
      copy that autograd runs for the head split of any ViT (the APE model's too).
    * RoPE-Mixed: given the block's frequencies and the token positions (R then built without
      autograd), the frequencies' gradient is formed here in closed form, sparing the backward
      of the cos/sin tables: with phi = p^x theta^x + p^y theta^y (Eq. 14) and
      S = sum over batch and q|k of g conj(x'), dL/dphi = Im(S) and dL/dtheta = p^T Im(S).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rot: torch.Tensor, num_heads: int, batch: int,
                freqs: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None):
        """qkv (B * T, 3 * heads * D), channels [q | k | v] head-major, not a view (autograd
        allows in-place writes plus several outputs only then); rot complex (heads or 1, T, D/2)
        or (T, D/2); optional freqs (2, heads * D/2) = (theta^x, theta^y) that rot was built from,
        with positions (T, 2) = (p^x, p^y)."""
        split = _split_heads(qkv, num_heads, batch)  # (3, B, heads, T, D) view
        if qkv.dtype in (torch.float32, torch.float64) and qkv.is_contiguous():
            torch.view_as_complex(split[:2].unflatten(-1, (-1, 2))).mul_(rot)  # one in-place pass
        else:  # bf16 / fp16 (or odd strides): rotate in fp32, round once
            split[:2] = torch.view_as_real(_complex_pairs(split[:2].float()) * rot).flatten(-2)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(qkv, rot, positions)
        ctx.num_heads, ctx.batch = num_heads, batch
        ctx.set_materialize_grads(False)  # the qkv output is not used by the model: no zero tensor
        q, k, v = split.unbind(0)  # (B, heads, T, D) each
        return qkv, q, k, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_qkv_out, grad_q, grad_k, grad_v):
        rotated_qkv, rot, positions = ctx.saved_tensors
        grads = [grad_q, grad_k, grad_v]
        if grad_qkv_out is not None:  # someone used the returned qkv as well
            extra = _split_heads(grad_qkv_out, ctx.num_heads, ctx.batch)
            grads = [e if g is None else g + e for g, e in zip(grads, extra.unbind(0))]
        grads = [torch.zeros(()).to(rotated_qkv).expand(_split_heads(rotated_qkv, ctx.num_heads, ctx.batch).shape[1:])
                 if g is None else g for g in grads]  # (B, heads, T, D) each
        real_dtype = torch.promote_types(grads[0].dtype, torch.float32)
        grad_qkv = torch.empty(rotated_qkv.shape, dtype=grads[0].dtype, device=rotated_qkv.device)  # (B, T, 3C)
        grad_split = _split_heads(grad_qkv, ctx.num_heads, ctx.batch)  # (3, B, heads, T, D) view
        grad_pairs = [_complex_pairs(g.to(real_dtype)) for g in grads[:2]]  # 2 x (B, heads, T, D/2)
        rot_back = rot.conj().resolve_conj()  # d(x R)/dx: multiply by conj(R), i.e. rotate back
        for i in range(2):
            if grad_qkv.dtype == real_dtype:
                torch.mul(grad_pairs[i], rot_back, out=torch.view_as_complex(grad_split[i].unflatten(-1, (-1, 2))))
            else:
                grad_split[i] = torch.view_as_real(grad_pairs[i] * rot_back).flatten(-2)
        grad_split[2] = grads[2]  # v passes through
        grad_rot = grad_freqs = None
        needs_freqs = len(ctx.needs_input_grad) > 4 and ctx.needs_input_grad[4]  # freqs given and trained
        if ctx.needs_input_grad[1] or needs_freqs:
            # d(x R)/dR = conj(x) = conj(x' conj(R)) = conj(x') R; S sums g conj(x') over batch, q|k
            rotated = _split_heads(rotated_qkv, ctx.num_heads, ctx.batch)[:2]
            summed = sum((g * _complex_pairs(y.to(real_dtype)).conj()).sum(0)
                         for g, y in zip(grad_pairs, rotated))  # S (heads, T, D/2)
            if needs_freqs:  # dL/dtheta = p^T Im(S): (2, T) @ (T, heads * D/2)
                grad_freqs = positions.t().to(real_dtype) @ summed.imag.transpose(0, 1).reshape(summed.shape[1], -1)
            if ctx.needs_input_grad[1]:
                if rot.dim() == 2:  # (T, D/2): shared by all heads
                    summed = summed.sum(0)
                elif rot.shape[0] == 1:
                    summed = summed.sum(0, keepdim=True)
                grad_rot = summed * rot
        return (grad_qkv, grad_rot, None, None, grad_freqs, None)[:len(ctx.needs_input_grad)]


def _split_heads(qkv: torch.Tensor, num_heads: int, batch: int) -> torch.Tensor:
    """(B * T, 3 * heads * D) -> (3, B, heads, T, D) view: channels [q | k | v], each head-major."""
    return qkv.view(batch, -1, 3, num_heads, qkv.shape[-1] // (3 * num_heads)).permute(2, 0, 3, 1, 4)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Section 3.3: resize a learned APE grid bicubically (align_corners=False, no antialias).

    pos_embed (1, old_h * old_w, C) row-major, no class-token slot. Returns (1, new_h * new_w, C)
    in pos_embed's dtype (the interpolation itself runs in float32).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    channels = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)  # (1, C, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode='bicubic', align_corners=False, antialias=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], channels).to(pos_embed.dtype)  # (1, N, C)


# ---------------------------------------------------------------------------------------
# Model: Attention, Block, ViT
# ---------------------------------------------------------------------------------------

@dataclass
class ViTConfig:
    """Hyper-parameters of one ViT. ``pe`` picks the position embedding (see PE_VARIANTS)."""
    pe: str = 'ape'
    img_size: Union[int, Tuple[int, int]] = 224  # resolution built for: sets the stored APE grid
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0  # the same rate in every block (DeiT-III)
    rope_theta: Optional[float] = None  # None: 100 for Axial, 10 for Mixed
    init_scale: float = 1e-4  # LayerScale init


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, in_chans, H, W) -> (B, N, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, Hp, Wp) -> (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form, as DeiT-III
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1.0 - self.p)  # (B, 1, 1)
        return x * keep / (1.0 - self.p)


class BlockRope(NamedTuple):
    """What one block's attention needs for RoPE (built once per forward by RopeViT).

    rot: complex rotations (heads, T, D/2) (Mixed) or (T, D/2) (Axial), class-token row 1 + 0i.
    freqs, positions: for training RoPE-Mixed, the block's (theta^x, theta^y) (2, heads * D/2)
    and the token positions (T, 2), through which RotateQK sends the frequencies' gradient
    (rot then carries no autograd graph); None otherwise.
    """
    rot: torch.Tensor
    freqs: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE on q and k (Eq. 11, then Eq. 8 / 15)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[BlockRope] = None,
                need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, T, C); rope: this block's BlockRope, or None (no RoPE).

        Returns (B, T, C) and, if need_weights, the probabilities (B, heads, T, T).
        """
        B, T, C = x.shape
        # (B * T, 3C): channels [q | k | v], each head-major (official layout); 2-D so that the
        # projection's output is not a view (RotateQK writes into it)
        qkv = self.qkv(x.reshape(B * T, C))
        # torch.compile cannot trace RotateQK's in-place views; it fuses the readable formula itself
        readable = need_weights or torch.compiler.is_compiling()
        if rope is not None and not readable:  # fast path: the same values, in place (see RotateQK)
            with torch.profiler.record_function('rope'):  # lets a profiler count the RoPE share
                _, q, k, v = RotateQK.apply(qkv, rope.rot, self.num_heads, B, rope.freqs, rope.positions)
        else:
            qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, T, D)
            q, k, v = qkv.unbind(0)  # (B, heads, T, D) each
        if rope is not None and readable:  # the readable formula, Eq. 11
            with torch.profiler.record_function('rope'):
                q, k = apply_rope(qkv[:2], rope.rot).unbind(0)  # q and k rotated in one pass, (B, heads, T, D) each
        attn = None
        if need_weights:  # explicit path for analysis: A' = softmax(q k^T / sqrt(D)) (Eq. 8 / 15)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T)
            out = attn.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # same math, fused
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, heads * D)
        return self.proj(out), attn


class Block(nn.Module):
    """DeiT-III "LS" block: x += g1 * attn(norm1(x)); x += g2 * mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, init_scale: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(init_scale * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor, rope=None, need_weights: bool = False):
        y, attn = self.attn(self.norm1(x), rope, need_weights)
        x = x + self.drop_path(self.gamma_1 * y)
        x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x, attn


class RopeViT(nn.Module):
    """ViT / DeiT-III with any position embedding of the paper. See the module docstring."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.pe not in PE_VARIANTS:
            raise ValueError(f"unknown pe {cfg.pe!r}; valid values: {', '.join(PE_VARIANTS)}")
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f'embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}')
        self.cfg = cfg
        self.pe = cfg.pe
        self.use_ape = cfg.pe in ('ape', 'rope_axial_ape', 'rope_mixed_ape')
        self.rope_kind = 'axial' if 'axial' in cfg.pe else 'mixed' if 'mixed' in cfg.pe else None
        self.num_classes = cfg.num_classes
        self.patch_size = cfg.patch_size
        self.img_size = cfg.img_size if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.depth = cfg.depth
        head_dim = cfg.embed_dim // cfg.num_heads
        if self.rope_kind and head_dim % 4:
            raise ValueError(f'RoPE needs a head dim divisible by 4 (x and y halves of complex pairs), got {head_dim}')
        self.rope_theta = cfg.rope_theta if cfg.rope_theta is not None else (
            DEFAULT_ROPE_THETA[self.rope_kind] if self.rope_kind else None)
        img_h, img_w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        self.check_img_size(img_h, img_w)
        self.grid_size = (img_h // cfg.patch_size, img_w // cfg.patch_size)  # the stored APE grid (Hp, Wp)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if self.use_ape:  # Eq. 1, patch tokens only (no class-token slot)
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], cfg.embed_dim))
        self.blocks = nn.ModuleList([
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path_rate, cfg.init_scale)
            for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

        # DeiT-III init: trunc_normal(.02) for APE, class token and Linear weights, zero biases,
        # the PyTorch default for the patch conv; then the RoPE models' own draws.
        if self.use_ape:
            nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)
        if self.rope_kind:
            nn.init.trunc_normal_(self.cls_token, std=.02)  # the RoPE models re-init it (same RNG order)
        if self.rope_kind == 'mixed':  # Eq. 14: learned (theta^x, theta^y) per layer and head
            self.freqs = nn.Parameter(init_mixed_freqs(head_dim, cfg.depth, cfg.num_heads, self.rope_theta))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        names = {'cls_token'}
        if self.use_ape:
            names.add('pos_embed')
        if self.rope_kind == 'mixed':
            names.add('freqs')
        return names

    def check_img_size(self, H: int, W: int) -> None:
        """Raise ValueError unless H and W are positive multiples of the patch size."""
        p = self.patch_size
        if H > 0 and W > 0 and H % p == 0 and W % p == 0:
            return

        def near(s):  # nearest multiples of p (at least p)
            lo = max(p, (s // p) * p)
            return sorted({lo, lo + p} if s % p else {lo})
        sizes = [f'{h}x{w}' for h in near(H) for w in near(W)]
        raise ValueError(f'input size {H}x{W} (HxW) is not allowed: height and width must be positive '
                         f'multiples of the patch size {p}; nearest valid sizes: {", ".join(sizes)}')

    def block_rotations(self, grid_h: int, grid_w: int, device) -> Optional[List[torch.Tensor]]:
        """Complex rotations (Eq. 10) of every block for a (grid_h, grid_w) patch grid, built once per forward.

        The class token gets angle 0, i.e. the identity rotation: it is not rotated (official),
        and the blocks need no slicing or concatenation. Returns a list of L complex64
        tensors, (T, D/2) for Axial (shared by all blocks) or (heads, T, D/2) for Mixed, or None.
        """
        if self.rope_kind is None:
            return None
        # float32 with autocast off: bf16 keeps 8 mantissa bits, so an angle of 30 rad (position 30)
        # would be off by up to 0.06 rad, and more at larger positions.
        with torch.autocast(device_type=device.type, enabled=False):
            t_x, t_y = patch_grid_positions(grid_h, grid_w, device)  # (N,), (N,)
            if self.cls_token.dtype == torch.float64:  # keep a float64 model (gradient checks) exact
                t_x, t_y = t_x.double(), t_y.double()
            zero = t_x.new_zeros(1)
            t_x, t_y = torch.cat([zero, t_x]), torch.cat([zero, t_y])  # (T,): class token at angle 0
            head_dim = self.embed_dim // self.num_heads
            if self.rope_kind == 'axial':
                rot = rope_tables(axial_angles(t_x, t_y, head_dim, self.rope_theta))  # (T, D/2), all layers and heads
                return [rot] * self.depth
            rot = rope_tables(mixed_angles(t_x, t_y, self.freqs, self.num_heads))  # (L, heads, T, D/2)
            return list(rot.unbind(0))

    def block_ropes(self, grid_h: int, grid_w: int, device) -> List[Optional[BlockRope]]:
        """What each block needs for RoPE on a (grid_h, grid_w) grid (forward's fast path).

        The tables come from block_rotations() without autograd. Training RoPE-Mixed rebuilds them at
        every forward and routes the frequencies' gradient through RotateQK (see there);
        otherwise (eval, no_grad, Axial) they are kept per grid. The cache key holds what can
        change the result: grid, device, dtype, inference mode (its tensors cannot enter
        autograd later) and the frequencies' storage and version counter, which every in-place
        write bumps (optimizer step, load_state_dict); the entry keeps that storage alive, so its
        address cannot be reused by another tensor while the entry exists.
        """
        if self.rope_kind is None:
            return [None] * self.depth
        freqs = getattr(self, 'freqs', None)  # Mixed only; Axial tables depend on the grid alone
        if freqs is not None and freqs.requires_grad and torch.is_grad_enabled():
            with torch.no_grad():
                tables = self.block_rotations(grid_h, grid_w, device)
            t_x, t_y = patch_grid_positions(grid_h, grid_w, device)  # (N,), (N,)
            positions = F.pad(torch.stack([t_x, t_y], dim=-1), (0, 0, 1, 0))  # (T, 2): class token at 0
            return [BlockRope(rot, freqs[:, layer], positions) for layer, rot in enumerate(tables)]
        key = (grid_h, grid_w, torch.device(device), self.cls_token.dtype, torch.is_inference_mode_enabled())
        if freqs is not None:
            key += (freqs.data_ptr(), freqs._version, freqs.dtype)
        cache = self.__dict__.setdefault('_rope_cache', {})  # plain attribute: not in the state dict
        if key not in cache:
            if len(cache) >= 4:
                cache.clear()
            with torch.no_grad():
                tables = self.block_rotations(grid_h, grid_w, device)
            pinned = freqs.detach() if freqs is not None else None
            cache[key] = (pinned, [BlockRope(rot) for rot in tables])
        return cache[key][1]

    def _tokens(self, x: torch.Tensor, need_weights: bool):
        B, _, H, W = x.shape
        self.check_img_size(H, W)
        grid_h, grid_w = H // self.patch_size, W // self.patch_size  # positions from the real grid
        x = self.patch_embed(x)  # (B, N, C)
        if self.use_ape:  # Eq. 1, before the class token is attached
            x = x + resize_pos_embed(self.pos_embed, self.grid_size, (grid_h, grid_w)).to(x.dtype)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, T, C)
        if self.rope_kind is None:
            rope = [None] * self.depth
        elif need_weights or torch.compiler.is_compiling():  # the readable path: tables with their autograd graph
            with torch.profiler.record_function('rope'):
                rope = [BlockRope(rot) for rot in self.block_rotations(grid_h, grid_w, x.device)]
        else:
            with torch.profiler.record_function('rope'):
                rope = self.block_ropes(grid_h, grid_w, x.device)
        attns = []
        for block, block_rope in zip(self.blocks, rope):
            x, attn = block(x, block_rope, need_weights)
            attns.append(attn)
        return self.norm(x)[:, 0], attns  # class token feature (B, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_chans, H, W), H and W multiples of the patch size -> features (B, C)."""
        return self._tokens(x, need_weights=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Logits and the attention probabilities of every block, from the same modules.

        Returns (logits (B, num_classes), list of L tensors (B, heads, T, T)); index 0 of the
        token axes is the class token, then the N patch tokens row-major over the patch grid.
        Uses an explicit softmax for this call only; forward() uses the fused kernel.
        """
        features, attns = self._tokens(x, need_weights=True)
        return self.head(features), attns


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]


def _name_list(names: List[str], limit: int = 10) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' ... and {len(names) - limit} more' if len(names) > limit else '')


def _unwrap_state_dict(ckpt: dict) -> dict:
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def load_checkpoint(model: RopeViT, path_or_state_dict, strict: bool = True) -> LoadResult:
    """Load published, timm or this project's checkpoints into ``model``.

    Accepts a path (read with ``torch.load(weights_only=True)``) or a dict: ``{'model': sd}``
    (published files, training checkpoints), ``{'state_dict': sd}`` or a bare state dict.
    Conversions: the official ``freqs_t_x``/``freqs_t_y`` buffers are dropped; timm's
    ``rope.freqs`` (2, L, heads, D/2) becomes ``freqs`` (2, L, heads * D/2) and its other
    ``rope.*`` buffers are dropped; a ``pos_embed`` stored for another grid is resized
    bicubically (no antialias) from its square grid (or the grid named by the checkpoint's
    ``args``) to the model's grid. Shape mismatches always raise ValueError; missing and
    unexpected keys raise it under ``strict`` and are returned otherwise.
    """
    args = {}
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'checkpoint not found: {path}')
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # corrupt, truncated, or pickles arbitrary objects
            raise ValueError(f'cannot read checkpoint {path}: {e}') from None
    else:
        ckpt = path_or_state_dict
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint is a {type(ckpt).__name__}, not a dict of tensors')
    if isinstance(ckpt.get('args'), dict):
        args = ckpt['args']
    sd = _unwrap_state_dict(ckpt)
    if sd and all(k.startswith('module.') for k in sd):  # saved from a DDP wrapper
        sd = {k[len('module.'):]: v for k, v in sd.items()}

    converted = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f'checkpoint entry {key!r} is a {type(value).__name__}, not a tensor')
        if key in ('freqs_t_x', 'freqs_t_y', 'freqs_cis'):
            continue  # official grid buffers: positions are rebuilt from the input grid
        if key == 'rope.freqs':  # timm: (2, L, heads, D/2) -> official (2, L, heads * D/2)
            converted['freqs'] = value.flatten(2) if value.dim() == 4 else value
            continue
        if key.startswith('rope.'):
            continue  # timm's non-persistent grid buffers
        converted[key] = value

    own = model.state_dict()
    pos = converted.get('pos_embed')
    if pos is not None and 'pos_embed' in own and pos.shape != own['pos_embed'].shape and pos.dim() == 3:
        old_grid = _stored_grid(pos.shape[1], args)
        if old_grid is not None and pos.shape[-1] == own['pos_embed'].shape[-1]:
            converted['pos_embed'] = resize_pos_embed(pos, old_grid, model.grid_size)

    missing = [k for k in own if k not in converted]
    unexpected = [k for k in converted if k not in own]
    mis_shaped = [f'{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})'
                  for k, v in converted.items() if k in own and v.shape != own[k].shape]
    if mis_shaped or (strict and (missing or unexpected)):
        lines = [f'checkpoint does not match the model ({model.pe}):']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {_name_list(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): {_name_list(unexpected)}')
        if mis_shaped:
            lines.append(f'  mis-shaped keys ({len(mis_shaped)}): {_name_list(mis_shaped)}')
        raise ValueError('\n'.join(lines))
    model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)
    return LoadResult(missing, unexpected)


def _stored_grid(num_tokens: int, args: dict) -> Optional[Tuple[int, int]]:
    """Grid of a stored APE: from a training checkpoint's args if given, else square."""
    kwargs = args.get('model_kwargs') if isinstance(args.get('model_kwargs'), dict) else {}
    img, patch = kwargs.get('img_size', args.get('img_size')), kwargs.get('patch_size', args.get('patch_size', 16))
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        if (h // patch) * (w // patch) == num_tokens:
            return h // patch, w // patch
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else None


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

SIZES = {
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(embed_dim=1024, depth=24, num_heads=16),
}
# published name prefix -> pe; theta is the variant's default (100 Axial, 10 Mixed)
PUBLISHED_PE = {'deit': 'ape', 'rope_axial_deit': 'rope_axial', 'rope_mixed_deit': 'rope_mixed',
                'rope_axial_ape_deit': 'rope_axial_ape', 'rope_mixed_ape_deit': 'rope_mixed_ape'}
PUBLISHED = {f'{prefix}_{size}_patch16_LS': (f'vit_{size}', pe)
             for prefix, pe in PUBLISHED_PE.items() for size in ('small', 'base', 'large')}


def list_models() -> List[str]:
    """Size names (take ``pe=``) and the 15 published names (fix pe and theta)."""
    return list(SIZES) + list(PUBLISHED)


def create_model(name: str, **kwargs) -> RopeViT:
    """Build a model by size name (``vit_small``, with ``pe=``, default 'ape') or published name.

    Keyword arguments override any ViTConfig field (img_size, patch_size, embed_dim, depth,
    num_heads, num_classes, drop_path_rate, rope_theta, init_scale, ...).
    """
    if name in PUBLISHED:
        size, pe = PUBLISHED[name]
        if kwargs.get('pe', pe) != pe:
            raise ValueError(f"{name} is a {pe} model; pe={kwargs['pe']!r} contradicts it")
        kwargs = {**kwargs, 'pe': pe}
    elif name in SIZES:
        size = name
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    valid = {f.name for f in fields(ViTConfig)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(unknown)} for {name}; valid: {', '.join(sorted(valid))}")
    return RopeViT(ViTConfig(**{**SIZES[size], **kwargs}))
