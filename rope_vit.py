"""RoPE-ViT: Vision Transformer (DeiT-III "LS") with 2D rotary position embeddings.

Paper: "Rotary Position Embedding for Vision Transformer", Heo, Park, Han, Yun, ECCV 2024,
arXiv 2403.13298; equation and section numbers below refer to it. One self-contained file,
torch only. Position embeddings ``pe`` (PE_VARIANTS): ``ape`` (learned absolute, the DeiT-III
baseline, Eq. 1), ``rope_axial`` (Eq. 12-13), ``rope_mixed`` (Eq. 14-15, learned frequencies per
layer and head), ``rope_axial_ape`` and ``rope_mixed_ape`` (both), ``none``. The published models
of naver-ai/rope-vit keep their names and state-dict keys. Any input whose sides are multiples
of the patch size runs, square or not, without rebuilding the model.

Reading order: the paper's path first (section 3.2's equations, the APE, the ViT, the presets
and create_model), a working file on its own when cut at its closing banner; then what goes
beyond the paper (RoPE position policies for a change of resolution, coordinate augmentation,
average pooling, ViTDet window attention and feature maps) as subclasses that keep the paper's
names, checkpoints and the published weights, and last "Speed: the same math, fused". The fast
path is one switch, ``model.fused``: each Attention shows both calls (the readable apply_rope and
the fused rotation); ``model.fused = False`` runs the readable path.

Usage::

    import torch, rope_vit
    model = rope_vit.create_model('rope_mixed_deit_small_patch16_LS')
    rope_vit.load_checkpoint(model, 'rope_mixed_deit_small_patch16_LS.pth')
    model.eval()
    logits = model(torch.randn(1, 3, 384, 384))          # (1, 1000), any multiple of 16
    logits, attn = model.forward_with_attention(torch.randn(1, 3, 256, 384))
    # attn: list of L tensors (1, heads, 1 + 16 * 24, 1 + 16 * 24)
    vitdet = rope_vit.create_model('rope_mixed_deit_base_patch16_LS', pretrained=True,
                                   window_size=14, global_blocks=(2, 5, 8, 11))
    maps = vitdet.forward_intermediates(torch.randn(1, 3, 1024, 1024), indices=[-1], intermediates_only=True)
    # maps: [(1, 768, 64, 64)]

RoPE-Mixed in your own attention (the four functions of section 3.2 and the two lines of the
call site; q and k of any attention, (B, heads, N, D) over a 14 x 14 patch grid)::

    import torch, rope_vit
    q, k = torch.randn(2, 6, 196, 64), torch.randn(2, 6, 196, 64)
    freqs = torch.nn.Parameter(rope_vit.init_rope_freqs(6, 64, theta=10.0, mixed=True))  # (2, heads, D/2)
    t_x, t_y = rope_vit.patch_grid_positions(14, 14)                            # (N,) each
    cos, sin = rope_vit.rope_cos_sin(rope_vit.rope_angles(freqs, t_x, t_y))     # (heads, N, D/2) each
    q, k = rope_vit.apply_rope(q, cos, sin), rope_vit.apply_rope(k, cos, sin)   # then softmax(q k^T / sqrt(D)) v

Shape legend: B batch, T = 1 + N tokens (class token first, then N = Hp * Wp patch tokens
row-major over the (Hp, Wp) patch grid: token n has column x = n % Wp and row y = n // Wp;
T = N for ``global_pool='avg'``, which has no class token), C embed dim, heads attention heads,
D head dim, L depth.
"""
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

PE_VARIANTS = ('ape', 'rope_axial', 'rope_mixed', 'rope_axial_ape', 'rope_mixed_ape', 'none')
DEFAULT_ROPE_THETA = {'axial': 100.0, 'mixed': 10.0}  # Eq. 13 base (Axial) / released Mixed base


# =======================================================================================
# The paper's path: section 3.2's equations, the APE, the ViT, presets and create_model.
# A working file on its own: it uses nothing defined after its closing banner.
# =======================================================================================

# ---------------------------------------------------------------------------------------
# 2D RoPE (section 3.2): frequencies, the (x, y) grid, Eq. 12 / 14 angles, Eq. 11 rotation
# ---------------------------------------------------------------------------------------

def rope_magnitudes(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Eq. 13: frequency magnitudes ``theta^(-t / (D/4))`` for ``t = 0 .. D/4 - 1``.

    Returns float32 (D/4,). With ``theta = 100`` this is Eq. 9 with its base square-rooted.
    """
    t = torch.arange(head_dim // 4, device=device, dtype=torch.float32)
    return theta ** (-t / (head_dim // 4))


def init_rope_freqs(num_heads: int, head_dim: int, theta: float, mixed: bool, device=None) -> torch.Tensor:
    """Frequencies (theta^x, theta^y) of Eq. 14 for each head: float32 (2, heads, D/2).

    Index 0 holds theta^x, index 1 theta^y; pair j of head h is ``[:, h, j]``.
    Mixed, the released initialisation: one angle ``a ~ U(0, 2 pi)`` per head (one draw per
    head, in head order, as the official code); pair ``t < D/4`` gets ``m_t (cos a, sin a)``,
    pair ``D/4 + t`` gets ``m_t (cos(a + pi/2), sin(a + pi/2))``, ``m_t`` from Eq. 13.
    Axial (Eq. 12) as axis-aligned Eq. 14 frequencies: pairs ``0 .. D/4-1`` turn with p^x and
    pairs ``D/4 .. D/2-1`` with p^y, the other component exactly 0 (the official ViT computes
    the two axes apart; the paper interleaves x/y, the weights use halves).
    """
    mag = rope_magnitudes(head_dim, theta, device)  # (D/4,)
    if not mixed:
        zero = torch.zeros_like(mag)
        axial = torch.stack([torch.cat([mag, zero]), torch.cat([zero, mag])])  # (2, D/2)
        return axial[:, None].expand(-1, num_heads, -1)  # (2, heads, D/2)
    angles = (torch.rand(num_heads, 1) * 2 * math.pi).to(mag.device)  # (heads, 1)
    turned = angles + math.pi / 2
    fx = torch.cat([mag * torch.cos(angles), mag * torch.cos(turned)], dim=-1)  # (heads, D/2)
    fy = torch.cat([mag * torch.sin(angles), mag * torch.sin(turned)], dim=-1)  # (heads, D/2)
    return torch.stack([fx, fy])  # (2, heads, D/2)


def patch_grid_positions(grid_h: int, grid_w: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions ``p_n = (p_n^x, p_n^y)`` of the N = grid_h * grid_w patch tokens.

    Row-major order: token n is at column ``x = n % grid_w`` and row ``y = n // grid_w``.
    Integer patch indices from 0, no centring or scaling (a larger image uses larger
    indices: extrapolation, section 3.3). Returns float32 (N,), (N,).
    """
    y, x = torch.meshgrid(torch.arange(grid_h, device=device, dtype=torch.float32),
                          torch.arange(grid_w, device=device, dtype=torch.float32), indexing='ij')
    return x.flatten(), y.flatten()  # (N,), (N,)


def rope_angles(freqs: torch.Tensor, t_x: torch.Tensor, t_y: torch.Tensor) -> torch.Tensor:
    """Eq. 14 (Eq. 12 for axis-aligned frequencies): angles ``theta^x_t p^x_n + theta^y_t p^y_n``.

    freqs (2, ..., D/2): theta^x and theta^y (any leading dims: heads, or layers and heads);
    t_x, t_y (N,). Returns (..., N, D/2) in t_x's dtype (float32, or float64 for a float64
    model), with autocast off: broadcast products, not matmuls, and bf16 angles would lose
    whole radians at large positions.
    """
    with torch.autocast(device_type=freqs.device.type, enabled=False):
        fx, fy = freqs.to(t_x.dtype).unbind(0)  # (..., D/2) each
        return t_x[:, None] * fx[..., None, :] + t_y[:, None] * fy[..., None, :]  # (..., N, D/2)


def rope_cos_sin(angles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 in real form: ``R = e^{i phi}`` as the pair (cos phi, sin phi), same shape as angles (..., D/2)."""
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``x' = x o R``, reading channels (2j, 2j+1) as the complex number x_2j + i x_2j+1.

    The complex product written with real numbers, a 2x2 rotation of each channel pair:
    ``x'_2j = x_2j cos phi_j - x_2j+1 sin phi_j``, ``x'_2j+1 = x_2j sin phi_j + x_2j+1 cos phi_j``.
    x (..., T, D) of any float dtype; cos, sin (..., T, D/2), broadcast over x's leading dims.
    Runs in (at least) float32 and casts back to x's dtype. Real ops only, so torch.compile
    generates code for it and ONNX can express it (neither handles complex tensors).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    real, imag = xf.unflatten(-1, (-1, 2)).unbind(-1)  # (..., T, D/2) each: channels 2j, 2j+1
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)  # (..., T, D/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (..., T, D)


# ---------------------------------------------------------------------------------------
# APE (Eq. 1) on any grid (section 3.3)
# ---------------------------------------------------------------------------------------

def resize_pos_embed(pos_embed: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Section 3.3: resize a learned APE grid bicubically (align_corners=False, no antialias).

    pos_embed (1, old_h * old_w, C) row-major, no class-token slot. Returns (1, new_h * new_w, C)
    in pos_embed's dtype (the interpolation itself runs in float32).
    """
    if not torch.compiler.is_compiling() and tuple(old_grid) == tuple(new_grid):
        return pos_embed  # traced graphs always resize (exact at the same size), so that no grid is baked in
    channels = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)  # (1, C, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode='bicubic', align_corners=False, antialias=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], channels).to(pos_embed.dtype)  # (1, N, C)


# ---------------------------------------------------------------------------------------
# The ViT (DeiT-III "LS"): config, patch embedding, MLP, attention, block, model
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


def split_heads(qkv: torch.Tensor, num_heads: int, batch: int) -> torch.Tensor:
    """(B * T, 3 * heads * D) -> (3, B, heads, T, D) view: channels [q | k | v], each head-major."""
    return qkv.view(batch, -1, 3, num_heads, qkv.shape[-1] // (3 * num_heads)).permute(2, 0, 3, 1, 4)


class RopeTables(NamedTuple):
    """One block's Eq. 10 tables, from RopeViT.block_rotations: cos phi and sin phi, each
    (T, D/2) for Axial (shared by all heads) or (heads, T, D/2) for Mixed."""
    cos: torch.Tensor
    sin: torch.Tensor
    fused = False  # readable: Attention rotates with apply_rope


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE on q and k (Eq. 11, then Eq. 8 / 15)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def rotated_qkv(self, x: torch.Tensor, rope=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q, k, v (B, heads, T, D), q and k rotated by Eq. 11 where rope is given.

        rope: this block's rotation from RopeViT.block_ropes, RopeTables (readable) or, where the
        model's ``fused`` switch is on, FusedRope (the file's last section); None: no RoPE.
        """
        B, T, C = x.shape
        # (B * T, 3C): channels [q | k | v], each head-major (official layout); 2-D so that the
        # projection's output is not a view (the fused rotation writes q and k in place in it)
        qkv = self.qkv(x.reshape(B * T, C))
        if rope is not None and rope.fused:  # the same Eq. 11 in place, one complex product per pair
            return rotate_qkv_fused(qkv, rope, self.num_heads, B)
        q, k, v = split_heads(qkv, self.num_heads, B).unbind(0)  # (B, heads, T, D) each
        if rope is not None:  # Eq. 11 on q and k (the class token's angle is 0: not rotated)
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        return q, k, v

    def forward(self, x: torch.Tensor, rope=None, need_weights: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, T, C) -> (B, T, C) and, if need_weights, the probabilities (B, heads, T, T)."""
        B, T, C = x.shape
        q, k, v = self.rotated_qkv(x, rope)  # (B, heads, T, D) each
        attn = None
        if need_weights:  # explicit path for analysis: A' = softmax(q k^T / sqrt(D)) (Eq. 8 / 15)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T)
            out = attn.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # same math, one kernel
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

    num_prefix_tokens = 1  # the class token, token 0: RoPE gives it angle 0 (not rotated, as official)
    # The switch of the fast path: True makes eager forward() rotate with FusedRope (the file's
    # last section, which turns it on); False, the readable apply_rope of this section.
    fused = False

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
        if self.num_prefix_tokens:
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
        if self.num_prefix_tokens:
            nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)
        if self.rope_kind and self.num_prefix_tokens:
            nn.init.trunc_normal_(self.cls_token, std=.02)  # the RoPE models re-init it (same RNG order)
        if self.rope_kind == 'mixed':  # Eq. 14: learned (theta^x, theta^y) per layer and head
            self.freqs = nn.Parameter(torch.stack([
                init_rope_freqs(cfg.num_heads, head_dim, self.rope_theta, mixed=True)
                for _ in range(cfg.depth)], dim=1).flatten(2))  # (2, L, heads * D/2), the official layout

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
        return {name for name, _ in self.named_parameters() if name in ('cls_token', 'pos_embed', 'freqs')}

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the weights (float64 models build their RoPE tables in float64)."""
        return self.patch_embed.proj.weight.dtype

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

    # -- RoPE tables: positions and frequencies (overridable steps) --------------------------
    def patch_positions(self, grid_h: int, grid_w: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(p^x, p^y) of the patch tokens, float32 (N,) each: the integer grid (section 3.2)."""
        return patch_grid_positions(grid_h, grid_w, device)

    def rope_frequencies(self, grid_h: int, grid_w: int, device) -> torch.Tensor:
        """(theta^x, theta^y) that rotate a (grid_h, grid_w) grid: (2, D/2) for Axial (Eq. 12-13,
        fixed), (2, L, heads, D/2) for Mixed (Eq. 14, the learned ``freqs``, with autograd).
        The paper extrapolates (section 3.3): the same frequencies on every grid."""
        if self.rope_kind == 'axial':
            return init_rope_freqs(1, self.embed_dim // self.num_heads, self.rope_theta, mixed=False,
                                   device=device)[:, 0]  # (2, D/2)
        return self.freqs.unflatten(-1, (self.num_heads, -1))  # (2, L, heads, D/2)

    def block_rotations(self, grid_h: int, grid_w: int, device) -> Optional[List[RopeTables]]:
        """Eq. 10 tables (cos, sin) of every block for a (grid_h, grid_w) patch grid, built once per forward.

        The class token (if any) gets angle 0, i.e. the identity rotation: it is not rotated
        (official), and the blocks need no slicing or concatenation. Returns L RopeTables of
        float32 (float64 for a float64 model) tensors, (T, D/2) for Axial (shared by all
        blocks) or (heads, T, D/2) for Mixed; None without RoPE.
        """
        if self.rope_kind is None:
            return None
        # float32 with autocast off: bf16 keeps 8 mantissa bits, so an angle of 30 rad (position 30)
        # would be off by up to 0.06 rad, and more at larger positions.
        with torch.autocast(device_type=device.type, enabled=False):
            real = torch.float64 if self.param_dtype == torch.float64 else torch.float32
            t_x, t_y = self.patch_positions(grid_h, grid_w, device)  # (N,) each
            prefix = (self.num_prefix_tokens, 0)
            t_x, t_y = F.pad(t_x, prefix).to(real), F.pad(t_y, prefix).to(real)  # (T,): class token at 0
            cos, sin = rope_cos_sin(rope_angles(self.rope_frequencies(grid_h, grid_w, device), t_x, t_y))
            if self.rope_kind == 'axial':  # (T, D/2), the same in every block
                return [RopeTables(cos, sin)] * self.depth
            return [RopeTables(c, s) for c, s in zip(cos.unbind(0), sin.unbind(0))]  # L x (heads, T, D/2)

    def block_ropes(self, grid_h: int, grid_w: int, device, need_weights: bool) -> list:
        """What each block rotates q and k with, chosen here once per forward: None (no RoPE),
        FusedRope where the ``fused`` switch is on (eager forward() only: the explicit path of
        need_weights and whatever torch.compile / torch.export trace take the readable, real-valued
        tables, which they can express), else RopeTables."""
        if self.rope_kind is None:
            return [None] * self.depth
        if self.fused and not need_weights and not torch.compiler.is_compiling():
            return fused_block_ropes(self, grid_h, grid_w, device)  # the same rotation, fused (last section)
        return self.block_rotations(grid_h, grid_w, device)

    # -- forward -----------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, in_chans, H, W) -> tokens (B, T, C) with APE and the class token, and the grid (Hp, Wp)."""
        B, _, H, W = x.shape
        self.check_img_size(H, W)
        grid = (H // self.patch_size, W // self.patch_size)  # positions from the real grid
        x = self.patch_embed(x)  # (B, N, C)
        if self.use_ape:  # Eq. 1, before the class token is attached
            x = x + resize_pos_embed(self.pos_embed, self.grid_size, grid).to(x.dtype)
        if self.num_prefix_tokens:
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, T, C)
        return x, grid

    def run_blocks(self, x: torch.Tensor, grid: Tuple[int, int], ropes: list, need_weights: bool):
        """The L blocks on tokens (B, T, C): returns (B, T, C) and each block's probabilities (or None)."""
        attns = []
        for block, rope in zip(self.blocks, ropes):
            x, attn = block(x, rope, need_weights)
            attns.append(attn)
        return x, attns

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normed tokens (B, T, C) -> the image's feature (B, C): the class token (DeiT-III)."""
        return tokens[:, 0]

    def forward_tokens(self, x: torch.Tensor, need_weights: bool = False):
        """(B, in_chans, H, W) -> final normed tokens (B, T, C), list of L probabilities (or None)."""
        x, grid = self.embed(x)
        x, attns = self.run_blocks(x, grid, self.block_ropes(*grid, x.device, need_weights), need_weights)
        return self.norm(x), attns

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_chans, H, W), H and W multiples of the patch size -> features (B, C)."""
        return self.pool(self.forward_tokens(x)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Logits and the attention probabilities of every block, from the same modules.

        Returns (logits (B, num_classes), list of L tensors (B, heads, T, T)); index 0 of the
        token axes is the class token (where the model has one), then the N patch tokens
        row-major over the patch grid. Uses the explicit softmax and the readable rotation for
        this call only.
        """
        tokens, attns = self.forward_tokens(x, need_weights=True)
        return self.head(self.pool(tokens)), attns


# ---------------------------------------------------------------------------------------
# Presets and create_model
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
    num_heads, num_classes, drop_path_rate, rope_theta, init_scale, ...); an unknown one is a
    TypeError. ViTConfig and RopeViT are looked up when called: in the whole file, the classes
    of the section after the banner, which extend these.
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


# =======================================================================================
# End of the paper's path. Below: beyond the paper (subclasses that keep the paper's names),
# checkpoints and published weights, and last the fused speed path.
# =======================================================================================

# ---------------------------------------------------------------------------------------
# Beyond the paper: RoPE position policies for a change of resolution (section 3.3), and
# training-time coordinate augmentation
# ---------------------------------------------------------------------------------------
# The paper extrapolates: a larger image uses the integer positions of its larger grid. The
# other policies change every angle theta_j p (one axis, frequency j, position p) into
# (c_j theta_j) p, c_j depending on s = current grid / training grid along that axis. All are
# the identity at the training grid (s = 1), so they never change training.

ROPE_POSITIONS = ('extrapolate', 'interpolate', 'ntk', 'yarn')


def check_rope_positions(policy: str, yarn_alpha: float, yarn_beta: float) -> None:
    """Raise ValueError for an unknown policy or an empty YaRN ramp."""
    if policy not in ROPE_POSITIONS:
        raise ValueError(f"unknown rope_positions {policy!r}; valid values: {', '.join(ROPE_POSITIONS)}")
    if not 0 <= yarn_alpha < yarn_beta:
        raise ValueError(f'yarn needs 0 <= yarn_alpha < yarn_beta (turns), got {yarn_alpha} and {yarn_beta}')


def _resolve_train_grid(grid: Optional[Tuple[int, int]], built_grid: Tuple[int, int]) -> Tuple[int, int]:
    """ViTConfig.rope_train_grid as (Hp, Wp): the grid the policies count s from (None: the built grid)."""
    grid = tuple(int(g) for g in (built_grid if grid is None else grid))
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f'rope_train_grid must be (Hp, Wp) of positive sizes, got {grid}')
    return grid


def rope_position_scale(policy: str, freqs: torch.Tensor, train_len: int, grid_len: int, theta: float,
                        pairs: int, yarn_alpha: float, yarn_beta: float) -> Optional[torch.Tensor]:
    """Factor c per frequency (freqs' shape) for one axis, or None where c = 1 everywhere.

    freqs: the frequencies' components along the axis (any shape; Axial: Eq. 13's magnitudes,
    Mixed: theta^x or theta^y of Eq. 14); s = grid_len / train_len; pairs = D/4, the complex
    pairs of one axis in Eq. 13. The factors are constants (no gradient flows through them).

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

    growth s: how much larger the grid is (ViT: sqrt of the token-count ratio (s_x s_y)^(1/2);
    Swin: the window ratio). 1 for other policies and for s <= 1, as in YaRN.
    """
    return 1.0 + 0.1 * math.log(growth) if policy == 'yarn' and growth > 1 else 1.0


def rope_policy(model: 'RopeViT', freqs: torch.Tensor, grid_h: int, grid_w: int) -> Optional[torch.Tensor]:
    """The model's position policy on a (grid_h, grid_w) grid: the factors of the frequencies.

    freqs (2, ..., D/2): the paper's (theta^x, theta^y) (RopeViT.rope_frequencies of the paper's
    section). Factors (rope_position_scale) in freqs' shape and the model's real dtype, theta^x
    scaled from the grid's width and theta^y from its height; None when all are 1. Axial's zero
    components stay 0 whatever their factor. YaRN's temperature: RopeViT.attention_temperature.
    """
    cfg = model.cfg
    if cfg.rope_positions == 'extrapolate':  # before any arithmetic on the grid: export keeps it symbolic
        return None
    train_h, train_w = cfg.rope_train_grid
    head_dim = model.embed_dim // model.num_heads
    real = torch.float64 if model.param_dtype == torch.float64 else torch.float32
    scales = [rope_position_scale(cfg.rope_positions, f, train, now, model.rope_theta, head_dim // 4,
                                  cfg.yarn_alpha, cfg.yarn_beta)
              for f, train, now in zip(freqs.detach().to(real).unbind(0), (train_w, train_h), (grid_w, grid_h))]
    if all(c is None for c in scales):
        return None
    ones = torch.ones(freqs.shape[1:], dtype=real, device=freqs.device)
    return torch.stack([ones if c is None else c for c in scales])


# Coordinate augmentation (DINOv3): RoPE positions moved during training, so that the model
# sees other offsets and scales than the integer grid. Off (None) unless a training loop sets
# RopeViT.rope_coord_augment per batch.

def augment_positions(t: torch.Tensor, grid_len: int, shift: float, scale: float) -> torch.Tensor:
    """Training-time coordinate augmentation (DINOv3's RoPE "shift", "jitter" and "rescale") on one axis.

    DINOv3 normalises positions to u = (2p + 1 - G) / G in (-1, 1) and trains on (u + shift) * scale
    with shift ~ U(-a, a) and a log-uniform scale. Here the same map in patch units around the grid
    centre c = (G - 1) / 2: p' = c + (p - c + shift * G / 2) * scale. t: positions 0 .. G-1 (any shape).
    """
    centre = (grid_len - 1) / 2
    return centre + (t - centre + shift * grid_len / 2) * scale


def coord_augmented_positions(model: 'RopeViT', t_x: torch.Tensor, t_y: torch.Tensor, grid_h: int, grid_w: int):
    """Patch positions (p^x, p^y) after the model's training-time augmentation rope_coord_augment, if set."""
    if model.rope_coord_augment is None:
        return t_x, t_y
    shift_x, shift_y, scale_x, scale_y = model.rope_coord_augment
    return augment_positions(t_x, grid_w, shift_x, scale_x), augment_positions(t_y, grid_h, shift_y, scale_y)



# ---------------------------------------------------------------------------------------
# Beyond the paper: dense prediction. ViTDet window attention (the backbone of the paper's
# detection experiments, section 4.3); forward_intermediates' feature maps are in the model below
# ---------------------------------------------------------------------------------------

def block_window_sizes(cfg: ViTConfig) -> List[Optional[int]]:
    """Per block the window side in patches (window_size), or None for a global block."""
    if cfg.window_size is None:
        if cfg.global_blocks:
            raise ValueError('global_blocks needs window_size (the other blocks attend in windows)')
        return [None] * cfg.depth
    if isinstance(cfg.window_size, bool) or not isinstance(cfg.window_size, int) or cfg.window_size < 1:
        raise ValueError(f'window_size must be a positive number of patches or None, got {cfg.window_size!r}')
    global_blocks = set()
    for index in cfg.global_blocks:
        if isinstance(index, bool) or not isinstance(index, int) or not -cfg.depth <= index < cfg.depth:
            raise ValueError(f'global_blocks: {index!r} is not a block index of a depth-{cfg.depth} model '
                             f'(0 .. {cfg.depth - 1}, or negative from the end)')
        global_blocks.add(index % cfg.depth)
    return [None if i in global_blocks else cfg.window_size for i in range(cfg.depth)]


def windows_on_grid(block_windows: List[Optional[int]], grid: Tuple[int, int]) -> List[Optional[int]]:
    """block_windows on a (Hp, Wp) grid: a window that covers the grid is global attention
    (window_attention's contract), so that block skips the partition (None)."""
    return [None if w is None or (w >= grid[0] and w >= grid[1]) else w for w in block_windows]


def _window_layout(grid: Tuple[int, int], window: int) -> Tuple[int, int, int, int]:
    """(rows, cols, pad_h, pad_w): the windows' rows and columns and the padding that makes the grid tile."""
    pad_h, pad_w = (-grid[0]) % window, (-grid[1]) % window
    return (grid[0] + pad_h) // window, (grid[1] + pad_w) // window, pad_h, pad_w


def window_key_mask(grid: Tuple[int, int], window: int, device=None) -> torch.Tensor:
    """Keys each window may use in window_attention: bool (nW, 1 + w * w).

    Column 0 is the class token (always allowed); then the window's w * w cells row-major,
    False where a cell lies in the padding beyond the (grid_h, grid_w) patch grid.
    """
    rows, cols, _, _ = _window_layout(grid, window)
    valid = torch.zeros(rows * window, cols * window, dtype=torch.bool, device=device)
    valid[:grid[0], :grid[1]] = True
    valid = valid.reshape(rows, window, cols, window).permute(0, 2, 1, 3).reshape(rows * cols, -1)  # (nW, w * w)
    return torch.cat([valid.new_ones(rows * cols, 1), valid], dim=1)  # (nW, 1 + w * w)


def window_attention_mask(grid: Tuple[int, int], window: int, device=None) -> torch.Tensor:
    """window_attention as a mask on full attention: bool (T, T), True where query i sees key j.

    A patch sees the patches of its own window and the class token; the class token sees every
    token. The explicit path (forward_with_attention) uses it; the tests use it as the
    independent formulation of window_attention.
    """
    _, cols, _, _ = _window_layout(grid, window)
    y, x = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing='ij')
    window_id = ((y // window) * cols + x // window).flatten()  # (N,) row-major window index
    allowed = torch.ones(1 + window_id.numel(), 1 + window_id.numel(), dtype=torch.bool, device=device)  # (T, T)
    allowed[1:, 1:] = window_id[:, None] == window_id[None, :]
    return allowed


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Tuple[int, int],
                     window: int) -> torch.Tensor:
    """ViTDet-style local attention over window x window patches, with the class token kept.

    q, k, v (B, heads, T, D): token 0 the class token, then the grid_h * grid_w patches
    row-major. The grid is cut into windows from the top left; a grid that does not tile is
    padded at the bottom and right and the padding is masked out of every window's keys, so no
    result depends on it. Each patch attends to its window and to the class token; the class
    token attends to every token, as in a global block (one extra row), so a window that covers
    the grid is exactly global attention. q and k arrive rotated with their positions on the
    full grid: offsets inside a window are the true ones, and the global blocks of the backbone
    see the whole grid, which is where the paper's ViTDet gain from RoPE's extrapolation comes
    from. Returns (B, heads, T, D).
    """
    B, heads, _, D = q.shape
    rows, cols, pad_h, pad_w = _window_layout(grid, window)
    num_windows = rows * cols

    def partition(t):  # patch tokens (B, heads, N, D) -> (B * nW, heads, w * w, D)
        t = F.pad(t.unflatten(2, grid), (0, 0, 0, pad_w, 0, pad_h))  # (B, heads, rows * w, cols * w, D)
        t = t.reshape(B, heads, rows, window, cols, window, D).permute(0, 2, 4, 1, 3, 5, 6)  # (B, rows, cols, heads, w, w, D)
        return t.reshape(B * num_windows, heads, window * window, D)

    def in_every_window(t):  # class token (B, heads, 1, D) -> (B * nW, heads, 1, D)
        return t[:, None].expand(B, num_windows, heads, 1, D).reshape(B * num_windows, heads, 1, D)

    q_win = partition(q[:, :, 1:])
    k_win = torch.cat([in_every_window(k[:, :, :1]), partition(k[:, :, 1:])], dim=2)  # (B * nW, heads, 1 + w * w, D)
    v_win = torch.cat([in_every_window(v[:, :, :1]), partition(v[:, :, 1:])], dim=2)
    mask = None
    if pad_h or pad_w:
        valid = window_key_mask(grid, window, q.device)  # (nW, 1 + w * w)
        mask = valid[None, :, None, None].expand(B, -1, 1, 1, -1).reshape(B * num_windows, 1, 1, -1)
    out = F.scaled_dot_product_attention(q_win, k_win, v_win, attn_mask=mask)  # (B * nW, heads, w * w, D)
    out = out.reshape(B, rows, cols, heads, window, window, D).permute(0, 3, 1, 4, 2, 5, 6)  # (B, heads, rows, w, cols, w, D)
    out = out.reshape(B, heads, rows * window, cols * window, D)[:, :, :grid[0], :grid[1]]  # crop the padding
    cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, heads, 1, D): the class token sees all
    return torch.cat([cls, out.flatten(2, 3)], dim=2)  # (B, heads, T, D)


def _take_indices(count: int, indices) -> List[int]:
    """Absolute indices from None (all), an int n (the last n) or a list (negative from the end)."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= count:
            raise ValueError(f'indices={indices}: the last n blocks needs 1 <= n <= {count}')
        return list(range(count - indices, count))
    taken = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f'block index {i!r} is out of range for {count} blocks')
        taken.append(i % count)
    if not taken:
        raise ValueError('indices is empty')
    return taken


def windowed_block(block: Block, x: torch.Tensor, rope, need_weights: bool, grid: Tuple[int, int],
                   window: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block.forward with ViTDet window attention (windowed_attention) in place of global attention."""
    y, attn = windowed_attention(block.attn, block.norm1(x), rope, need_weights, grid, window)
    x = x + block.drop_path(block.gamma_1 * y)
    return x + block.drop_path(block.gamma_2 * block.mlp(block.norm2(x))), attn


def windowed_attention(attention: Attention, x: torch.Tensor, rope, need_weights: bool, grid: Tuple[int, int],
                       window: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention.forward of a ViTDet block: x (B, T, C) on the (Hp, Wp) patch grid ``grid`` -> (B, T, C)
    and, if need_weights, the probabilities (B, heads, T, T) of the explicit path, where keys outside
    the query's window are masked out (window_attention_mask)."""
    B, T, C = x.shape
    q, k, v = attention.rotated_qkv(x, rope)  # (B, heads, T, D) each, rotated on the full grid
    attn = None
    if need_weights:
        logits = (q * attention.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
        logits = logits.masked_fill(~window_attention_mask(grid, window, x.device), float('-inf'))
        attn = logits.softmax(dim=-1)
        out = attn.to(v.dtype) @ v
    else:
        out = window_attention(q, k, v, grid, window)  # (B, heads, T, D)
    return attention.proj(out.transpose(1, 2).reshape(B, T, C)), attn


# ---------------------------------------------------------------------------------------
# Beyond the paper: the model. ViTConfig and RopeViT extended, under the paper's names
# ---------------------------------------------------------------------------------------
# These classes subclass the paper's ViTConfig and RopeViT and take over their names, so
# create_model (which looks the names up when called) builds them when the whole file is
# imported; the file cut at the paper's banner builds the paper's classes. They override the
# paper model's steps (patch_positions, rope_frequencies, block_rotations, run_blocks, pool)
# and leave its modules, their construction order and so its random init as they are.

@dataclass
class ViTConfig(ViTConfig):
    """The paper's ViTConfig plus the fields of the sections above; their defaults give the paper's model."""
    # ViTDet-style backbone (dense prediction): window attention of window_size x window_size
    # patches in every block but global_blocks (indices, negative from the end). None: all global.
    window_size: Optional[int] = None
    global_blocks: Tuple[int, ...] = ()
    # How RoPE follows a change of resolution (rope_position_scale): one of ROPE_POSITIONS, from the
    # training grid rope_train_grid (Hp, Wp) (None: img_size / patch_size); yarn's ramp in turns.
    rope_positions: str = 'extrapolate'
    rope_train_grid: Optional[Tuple[int, int]] = None
    yarn_alpha: float = 0.25
    yarn_beta: float = 1.0
    # 'token': classify the class token's feature (DeiT-III, the published models); 'avg': no class
    # token, classify the mean of the final normed patch tokens. Without the class token, which
    # RoPE leaves unrotated at position (0, 0), a RoPE-only model sees nothing but relative offsets.
    global_pool: str = 'token'


class RopeViT(RopeViT):
    """The paper's RopeViT plus position policies, coordinate augmentation, average pooling,
    ViTDet windows and forward_intermediates."""

    def __init__(self, cfg: ViTConfig):
        if cfg.global_pool not in ('token', 'avg'):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {cfg.global_pool!r}")
        if cfg.global_pool == 'avg' and cfg.window_size is not None:
            raise ValueError("window_size needs the class token (global_pool='token'): window attention keeps it global")
        super().__init__(cfg)  # builds the class token where num_prefix_tokens (from cfg) says so
        cfg.rope_train_grid = _resolve_train_grid(cfg.rope_train_grid, self.grid_size)
        check_rope_positions(cfg.rope_positions, cfg.yarn_alpha, cfg.yarn_beta)
        self.block_windows = block_window_sizes(cfg)  # per block: window side in patches, or None (global)
        # (shift_x, shift_y, scale_x, scale_y) of augment_positions, set per batch by a training loop; None: off
        self.rope_coord_augment: Optional[Tuple[float, float, float, float]] = None

    @property
    def num_prefix_tokens(self) -> int:
        """1, the class token; 0 for global_pool='avg'."""
        return 1 if self.cfg.global_pool == 'token' else 0

    @property
    def rope_positions(self) -> str:
        """The position policy (ROPE_POSITIONS); assign to change it between forwards."""
        return self.cfg.rope_positions

    @rope_positions.setter
    def rope_positions(self, policy: str) -> None:
        check_rope_positions(policy, self.cfg.yarn_alpha, self.cfg.yarn_beta)
        self.cfg.rope_positions = policy

    def patch_positions(self, grid_h: int, grid_w: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The integer grid, moved by rope_coord_augment while a training loop sets it."""
        return coord_augmented_positions(self, *super().patch_positions(grid_h, grid_w, device), grid_h, grid_w)

    def rope_frequencies(self, grid_h: int, grid_w: int, device) -> torch.Tensor:
        """The paper's frequencies times the position policy's factors (rope_policy) on this grid."""
        freqs = super().rope_frequencies(grid_h, grid_w, device)
        scale = rope_policy(self, freqs, grid_h, grid_w)
        return freqs if scale is None else freqs * scale

    def attention_temperature(self, grid_h: int, grid_w: int) -> float:
        """YaRN's factor on q and k (cos and sin) on this grid; 1 for the other policies."""
        if self.cfg.rope_positions != 'yarn':
            return 1.0
        train_h, train_w = self.cfg.rope_train_grid
        return yarn_attention_scale('yarn', math.sqrt(grid_h * grid_w / (train_h * train_w)))

    def block_rotations(self, grid_h: int, grid_w: int, device) -> Optional[List[RopeTables]]:
        """The paper's tables (of the policy's frequencies), cos and sin times YaRN's temperature."""
        tables = super().block_rotations(grid_h, grid_w, device)
        temperature = self.attention_temperature(grid_h, grid_w)
        if tables is None or temperature == 1:
            return tables
        return [RopeTables(c * temperature, s * temperature) for c, s in tables]

    def run_block(self, index: int, x: torch.Tensor, rope, need_weights: bool, grid: Tuple[int, int],
                  window: Optional[int]):
        """Block ``index``: global attention, or window attention where it has a window on this grid."""
        if window is None:
            return self.blocks[index](x, rope, need_weights)
        return windowed_block(self.blocks[index], x, rope, need_weights, grid, window)

    def run_blocks(self, x: torch.Tensor, grid: Tuple[int, int], ropes: list, need_weights: bool):
        attns = []
        for index, window in enumerate(windows_on_grid(self.block_windows, grid)):
            x, attn = self.run_block(index, x, ropes[index], need_weights, grid, window)
            attns.append(attn)
        return x, attns

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The class token, or for global_pool='avg' the mean of the patch tokens (B, C)."""
        return super().pool(tokens) if self.num_prefix_tokens else tokens.mean(dim=1)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False, return_prefix_tokens: bool = False):
        """Feature maps of chosen blocks for dense prediction (timm's convention).

        indices: None (every block), an int n (the last n blocks) or a list of block indices
        (negative from the end). norm: pass each through the final LayerNorm. output_fmt:
        'NCHW' gives (B, C, Hp, Wp) maps of the patch tokens (class token dropped), 'NLC'
        (B, N, C). return_prefix_tokens: each entry becomes (map, class token (B, 1, C); (B, 0, C)
        for global_pool='avg').
        stop_early: skip the blocks after the last one asked for (then no final features).
        Returns the list, or (final features (B, T, C) after the final norm, list) unless
        intermediates_only. Any input size the model accepts works, square or not.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = _take_indices(self.depth, indices)
        last = max(take) if stop_early else self.depth - 1
        if last < self.depth - 1 and not intermediates_only:
            raise ValueError('stop_early leaves no final features: pass intermediates_only=True with it')
        B = x.shape[0]
        x, grid = self.embed(x)
        ropes = self.block_ropes(*grid, x.device, need_weights=False)
        windows = windows_on_grid(self.block_windows, grid)
        intermediates = []
        for i in range(last + 1):
            x, _ = self.run_block(i, x, ropes[i], False, grid, windows[i])
            if i in take:
                y = self.norm(x) if norm else x  # (B, T, C)
                patches = y[:, self.num_prefix_tokens:]  # (B, N, C)
                if output_fmt == 'NCHW':
                    patches = patches.transpose(1, 2).reshape(B, -1, *grid)  # (B, C, Hp, Wp)
                intermediates.append((patches, y[:, :self.num_prefix_tokens]) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


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
    """The tensors of a .safetensors file (timm's hub files), read with torch alone.

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
    except Exception as e:  # corrupt, truncated, or pickles arbitrary objects
        raise ValueError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}') from None


def load_checkpoint(model: RopeViT, path_or_state_dict, strict: bool = True) -> LoadResult:
    """Load published, timm or this project's checkpoints into ``model``.

    Accepts a path (a ``.safetensors`` file such as timm's hub copies, or anything else read with
    ``torch.load(weights_only=True)``) or a dict: ``{'model': sd}`` (published files, training
    checkpoints), ``{'state_dict': sd}`` or a bare state dict.
    Conversions: the official ``freqs_t_x``/``freqs_t_y`` buffers are dropped; timm's
    ``rope.freqs`` (2, L, heads, D/2) becomes ``freqs`` (2, L, heads * D/2) and its other
    ``rope.*`` buffers are dropped; a ``pos_embed`` stored for another grid is resized
    bicubically (no antialias) from its square grid (or the grid named by the checkpoint's
    ``args``) to the model's grid. Shape mismatches always raise ValueError; missing and
    unexpected keys raise it under ``strict`` and are returned otherwise.
    """
    args = {}
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        ckpt = read_checkpoint_file(path_or_state_dict)
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
# Published weights: the paper's released files, downloaded once
# ---------------------------------------------------------------------------------------
# Where the weights released with the paper live: one hub repository per published name, each
# holding the {'model': state_dict} file of the official code.
PRETRAINED_URLS = {name: f'https://huggingface.co/naver-ai/{name}/resolve/main/pytorch_model.bin'
                   for name in PUBLISHED}


def pretrained_cache_path(name: str) -> str:
    """Where ``pretrained=True`` keeps the file of ``name``: one file per model in torch.hub's
    cache (``$TORCH_HOME/hub/checkpoints``), since every hub file is called pytorch_model.bin."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', f'{name}.pth')


def load_pretrained(model: RopeViT, name: str, progress: bool = True) -> LoadResult:
    """Load the published weights of ``name`` into ``model``, downloading them once.

    torch.hub.load_state_dict_from_url fetches PRETRAINED_URLS[name] into
    pretrained_cache_path(name) unless the file is there already (offline use: put it there).
    The load is strict; only a classifier of another size (num_classes) is left at its init.
    Raises RuntimeError (download failed: names the URL and the cache path) or ValueError.
    """
    if name not in PRETRAINED_URLS:
        raise ValueError(f'no published weights for {name!r}; published: {", ".join(PRETRAINED_URLS)}')
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
    state_dict = _unwrap_state_dict(ckpt) if isinstance(ckpt, dict) else ckpt
    own = model.state_dict()
    if not any(k.startswith('head.') and (k not in own or own[k].shape != v.shape) for k, v in state_dict.items()):
        return load_checkpoint(model, state_dict, strict=True)
    # another classifier: load everything else strictly, keep the new head's init
    result = load_checkpoint(model, {k: v for k, v in state_dict.items() if not k.startswith('head.')}, strict=False)
    if [k for k in result.missing_keys if not k.startswith('head.')] or result.unexpected_keys:
        raise ValueError(f'the {name} weights do not fit the model: missing {_name_list(result.missing_keys)}; '
                         f'unexpected {_name_list(result.unexpected_keys)}')
    return result


_build_model = create_model  # the paper section's create_model, building the classes of this file


def create_model(name: str, pretrained: bool = False, **kwargs) -> RopeViT:
    """Build a model by size name (``vit_small``, with ``pe=``, default 'ape') or published name.

    Keyword arguments override any ViTConfig field (img_size, patch_size, embed_dim, depth,
    num_heads, num_classes, drop_path_rate, rope_theta, init_scale, window_size,
    global_blocks, rope_positions, global_pool, ...); an unknown one is a TypeError.
    ``pretrained=True`` (published names) loads the released weights with load_pretrained:
    downloaded once, then read from torch.hub's cache.
    """
    if pretrained and name not in PRETRAINED_URLS:
        raise ValueError(f'pretrained=True needs a published name; {name!r} is not one of: {", ".join(PRETRAINED_URLS)}')
    model = _build_model(name, **kwargs)
    if pretrained:
        load_pretrained(model, name)
    return model


# =======================================================================================
# Speed: the same math, fused
# =======================================================================================
# Where the model's ``fused`` switch is on (eager forward() of a RoPE model, outside
# torch.compile / export and forward_with_attention), RopeViT.block_ropes gives the blocks a
# FusedRope from fused_block_ropes instead of the readable RopeTables, and Attention.rotated_qkv
# calls rotate_qkv_fused instead of apply_rope. Each trick, why it is there, and the test that
# proves it equal:
# * Per-axis factors: e^{i (theta^x x + theta^y y)} = e^{i theta^x x} e^{i theta^y y} (Eq. 14),
#   so cos/sin are taken on Hp + Wp positions instead of Hp * Wp, and one complex product per
#   token builds the table (test_vit_fused_tables_equal_readable_tables).
# * Tables are kept per grid while no gradient must reach them (eval, no_grad, Axial), and
#   built once per forward for all blocks otherwise (test_vit_fused_rope_cache_follows_frequencies).
# * RotateQK rotates q and k in place in the qkv output by one complex multiply and keeps
#   nothing extra for backward; its backward forms the RoPE-Mixed frequency gradient in
#   closed form (test_vit_fused_rotation_gradcheck_matches_plain_formula,
#   test_vit_fused_path_equals_readable_path_and_saves_no_extra_activations). Under bf16 / fp16
#   autocast it rotates in place in that dtype by real arithmetic (there is no bf16 complex),
#   forward and backward, without an fp32 copy of q and k
#   (test_vit_fused_rotation_in_bf16_is_as_close_to_exact_as_a_rotation_in_fp32).
# * The class token (if any) gets the identity rotation (angle 0) instead of being sliced off
#   and re-attached around the rotation.

class FusedRope(NamedTuple):
    """One block's RoPE on the fused path.

    rot: complex e^{i phi} (heads, T, D/2) (Mixed) or (T, D/2) (Axial), class-token row (if any) 1 + 0i.
    freqs, positions: when training RoPE-Mixed, the block's (theta^x, theta^y) (2, heads * D/2)
    and the token positions (T, 2), through which RotateQK sends the frequencies' gradient
    (rot then carries no autograd graph); None otherwise.
    """
    rot: torch.Tensor
    freqs: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    fused = True  # Attention rotates with rotate_qkv_fused


def rotate_qkv_fused(qkv: torch.Tensor, rope: FusedRope, num_heads: int, batch: int):
    """Attention.rotated_qkv on the fused path: qkv (B * T, 3 * heads * D) -> q, k, v (B, heads, T, D),
    q and k rotated (Eq. 11) in place in qkv."""
    with torch.profiler.record_function('rope'):  # lets a profiler count the RoPE share
        _, q, k, v = RotateQK.apply(qkv, rope.rot, num_heads, batch, rope.freqs, rope.positions)
    return q, k, v


def fused_rotations(model: 'RopeViT', grid_h: int, grid_w: int, device) -> List[torch.Tensor]:
    """block_rotations() as complex tables built from per-axis factors, without autograd.

    Returns L complex64 (complex128 for a float64 model) tensors, (T, D/2) for Axial or
    (heads, T, D/2) for Mixed, equal to torch.complex(cos, sin) of block_rotations up to
    float round-off.
    """
    real = torch.float64 if model.param_dtype == torch.float64 else torch.float32
    head_dim, heads, prefix = model.embed_dim // model.num_heads, model.num_heads, model.num_prefix_tokens
    cols, rows = coord_augmented_positions(model, torch.arange(grid_w, device=device, dtype=real),
                                           torch.arange(grid_h, device=device, dtype=real), grid_h, grid_w)
    # cols (Wp,): p^x of the grid's columns, rows (Hp,): p^y of its rows
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        freqs = model.rope_frequencies(grid_h, grid_w, device).to(real)  # the position policy's factors in
        attention_scale = model.attention_temperature(grid_h, grid_w)
        if model.rope_kind == 'axial':  # Eq. 12: x on the first D/4 pairs, y on the rest
            mag_x, mag_y = freqs[0, :head_dim // 4], freqs[1, head_dim // 4:]  # (D/4,) each
            along_x = torch.complex(*rope_cos_sin(cols[:, None] * mag_x))  # (Wp, D/4)
            along_y = torch.complex(*rope_cos_sin(rows[:, None] * mag_y))  # (Hp, D/4)
            rot = torch.cat([along_x.expand(grid_h, -1, -1), along_y[:, None].expand(-1, grid_w, -1)],
                            dim=-1)  # (Hp, Wp, D/2)
            rot = torch.cat([torch.ones_like(rot[0, :prefix]), rot.flatten(0, 1)])  # (T, D/2): class token first
            if attention_scale != 1:
                rot = rot * attention_scale
            return [rot] * model.depth
        fx, fy = freqs.unbind(0)  # (L, heads, D/2) each
        along_x = torch.complex(*rope_cos_sin(fx[..., None, :] * cols[:, None]))  # (L, heads, Wp, D/2)
        along_y = torch.complex(*rope_cos_sin(fy[..., None, :] * rows[:, None]))  # (L, heads, Hp, D/2)
        rot = along_x.new_empty(model.depth, heads, prefix + grid_h * grid_w, head_dim // 2)  # (L, heads, T, D/2)
        rot[:, :, :prefix] = 1  # class token: identity
        torch.mul(along_y[:, :, :, None], along_x[:, :, None],
                  out=rot[:, :, prefix:].unflatten(2, (grid_h, grid_w)))  # (L, heads, Hp, Wp, D/2)
        if attention_scale != 1:
            rot *= attention_scale
        return list(rot.unbind(0))


def fused_block_ropes(model: 'RopeViT', grid_h: int, grid_w: int, device) -> List[FusedRope]:
    """What each block needs on the fused path for a (grid_h, grid_w) grid.

    Training RoPE-Mixed rebuilds the tables at every forward and routes the frequencies'
    gradient through RotateQK; otherwise (eval, no_grad, Axial) they are kept per grid. The
    cache key holds what can change the result: grid, device, dtype, inference mode (its
    tensors cannot enter autograd later) and the frequencies' storage and version counter,
    which every in-place write bumps (optimizer step, load_state_dict); the entry keeps that
    storage alive, so its address cannot be reused by another tensor while the entry exists.
    """
    freqs = getattr(model, 'freqs', None)  # Mixed only; Axial tables depend on the grid alone
    with torch.profiler.record_function('rope'):
        if freqs is not None and freqs.requires_grad and torch.is_grad_enabled():
            t_x, t_y = model.patch_positions(grid_h, grid_w, device)  # (N,) each
            positions = F.pad(torch.stack([t_x, t_y], dim=-1), (0, 0, model.num_prefix_tokens, 0))  # (T, 2): class token at 0
            tables = fused_rotations(model, grid_h, grid_w, device)
            rotated = model.rope_frequencies(grid_h, grid_w, device).flatten(2)  # (2, L, heads * D/2), autograd to freqs
            return [FusedRope(rot, rotated[:, layer], positions) for layer, rot in enumerate(tables)]
        cfg = model.cfg
        key = (grid_h, grid_w, torch.device(device), model.param_dtype, torch.is_inference_mode_enabled(),
               cfg.rope_positions, cfg.rope_train_grid, cfg.yarn_alpha, cfg.yarn_beta, model.rope_coord_augment)
        if freqs is not None:
            key += (freqs.data_ptr(), freqs._version, freqs.dtype)
        cache = model.__dict__.setdefault('_rope_cache', {})  # plain attribute: not in the state dict
        if key not in cache:
            if len(cache) >= 4:
                cache.clear()
            pinned = freqs.detach() if freqs is not None else None
            cache[key] = (pinned, [FusedRope(rot) for rot in fused_rotations(model, grid_h, grid_w, device)])
        return cache[key][1]


def complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., D) real -> (..., D/2) complex view of channel pairs (2j, 2j+1); copies only if strides forbid a view."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def _real_factors(rot: torch.Tensor, dtype: torch.dtype, conj: bool = False):
    """rot (complex, (..., D/2)) as two real (..., D) tables in `dtype`, channel-pair layout:
    c = (Re R, Re R), s = (-Im R, Im R) (signs swapped for conj(R)), so that on pairs
    x R = x * c + swap(x) * s with swap(a, b) = (b, a). In the activations' dtype because a CPU
    kernel with mixed input dtypes first copies every input to the wider one: fp32 tables
    would bring back the fp32 copy of q and k that this path avoids."""
    pairs = torch.view_as_real(rot)  # (..., D/2, 2): (Re, Im)
    c = pairs[..., :1].expand(pairs.shape).flatten(-2)
    im = pairs[..., 1:]
    s = torch.cat([im, -im] if conj else [-im, im], dim=-1).flatten(-2)
    return c.to(dtype), s.to(dtype)


def _rotate_low_precision(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, out: torch.Tensor):
    """out = x R on channel pairs, for bf16 / fp16 x without a wider copy: x * c + swap(x) * s
    with one temporary of x's size and dtype. Each kernel computes in fp32 internally and
    rounds its result once: swap(x) * s, then the sum (addcmul); out may be x itself."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) per pair: a new tensor
    swapped.mul_(s)
    torch.addcmul(swapped, x, c, out=out)


class RotateQK(torch.autograd.Function):
    """Eq. 11 on q and k, in place in the qkv projection's output, with a lean backward.

    Returns (qkv, q, k, v): q, k, v are (B, heads, T, D) views of qkv, q and k rotated; the
    same values as ``apply_rope`` on q and k. Why a Function:
    * memory: autograd of the plain formula writes the rotated q and k to a new tensor (2/3 of
      qkv per block, ~8 % of ViT-S's training memory) and also keeps the unrotated ones for the
      gradient of R. Here the projection's output, which nothing else saves, is rotated in
      place; the input is recoverable from the output (x = x' conj(R) / |R|^2, |R| = 1 but under
      YaRN's temperature), so only the rotated qkv, which attention saves anyway, and R are kept
      for backward.
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
        split = split_heads(qkv, num_heads, batch)  # (3, B, heads, T, D) view
        if qkv.dtype in (torch.float32, torch.float64) and qkv.is_contiguous():
            torch.view_as_complex(split[:2].unflatten(-1, (-1, 2))).mul_(rot)  # one in-place pass
        elif qkv.dtype in (torch.bfloat16, torch.float16) and qkv.is_contiguous():
            # bf16 autocast: rotate in place in bf16 (no fp32 copy of q and k; no complex bf16)
            _rotate_low_precision(split[:2], *_real_factors(rot, qkv.dtype), out=split[:2])
        else:  # odd strides: rotate in fp32, round once
            split[:2] = torch.view_as_real(complex_pairs(split[:2].float()) * rot).flatten(-2)
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
            extra = split_heads(grad_qkv_out, ctx.num_heads, ctx.batch)
            grads = [e if g is None else g + e for g, e in zip(grads, extra.unbind(0))]
        grads = [torch.zeros(()).to(rotated_qkv).expand(split_heads(rotated_qkv, ctx.num_heads, ctx.batch).shape[1:])
                 if g is None else g for g in grads]  # (B, heads, T, D) each
        real_dtype = torch.promote_types(grads[0].dtype, torch.float32)
        grad_qkv = torch.empty(rotated_qkv.shape, dtype=grads[0].dtype, device=rotated_qkv.device)  # (B, T, 3C)
        grad_split = split_heads(grad_qkv, ctx.num_heads, ctx.batch)  # (3, B, heads, T, D) view
        if grad_qkv.dtype in (torch.bfloat16, torch.float16) and not ctx.needs_input_grad[1]:
            return RotateQK._backward_low_precision(ctx, rotated_qkv, rot, positions, grads, grad_split,
                                                    grad_qkv)
        grad_pairs = [complex_pairs(g.to(real_dtype)) for g in grads[:2]]  # 2 x (B, heads, T, D/2)
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
            # d(x R)/dR = conj(x) = conj(x') R / |R|^2; S sums g conj(x') over batch, q|k
            rotated = split_heads(rotated_qkv, ctx.num_heads, ctx.batch)[:2]
            summed = sum((g * complex_pairs(y.to(real_dtype)).conj()).sum(0)
                         for g, y in zip(grad_pairs, rotated))  # S (heads, T, D/2)
            if needs_freqs:  # dL/dtheta = p^T Im(S): (2, T) @ (T, heads * D/2)
                grad_freqs = positions.t().to(real_dtype) @ summed.imag.transpose(0, 1).reshape(summed.shape[1], -1)
            if ctx.needs_input_grad[1]:
                if rot.dim() == 2:  # (T, D/2): shared by all heads
                    summed = summed.sum(0)
                elif rot.shape[0] == 1:
                    summed = summed.sum(0, keepdim=True)
                grad_rot = summed * rot / rot.abs().square()
        return (grad_qkv, grad_rot, None, None, grad_freqs, None)[:len(ctx.needs_input_grad)]

    @staticmethod
    def _backward_low_precision(ctx, rotated_qkv, rot, positions, grads, grad_split, grad_qkv):
        """backward under bf16 / fp16 when R itself needs no gradient (the training path): q's and
        k's gradients rotated back (times conj(R)) in their own dtype, written into grad_qkv; the
        frequency gradient Im(S) = sum of (g_b y_a - g_a y_b) over batch, q|k (g = g_a + i g_b,
        x' = y_a + i y_b) from bf16 products summed in fp32."""
        c, s = _real_factors(rot, grad_qkv.dtype, conj=True)
        needs_freqs = len(ctx.needs_input_grad) > 4 and ctx.needs_input_grad[4]
        rotated = split_heads(rotated_qkv, ctx.num_heads, ctx.batch)
        im_s = 0
        for i in range(2):
            if needs_freqs:  # (g_b y_a, g_a y_b) per pair, summed over the batch in fp32
                cross = (grads[i].unflatten(-1, (-1, 2)).flip(-1) * rotated[i].unflatten(-1, (-1, 2)))
                cross = cross.sum(0, dtype=torch.float32)  # (heads, T, D/2, 2)
                im_s = im_s + cross[..., 0] - cross[..., 1]
            _rotate_low_precision(grads[i], c, s, out=grad_split[i])
        grad_split[2] = grads[2]  # v passes through
        grad_freqs = None
        if needs_freqs:  # dL/dtheta = p^T Im(S): (2, T) @ (T, heads * D/2)
            grad_freqs = positions.t().float() @ im_s.transpose(0, 1).reshape(im_s.shape[1], -1)
        return (grad_qkv, None, None, None, grad_freqs, None)[:len(ctx.needs_input_grad)]


# The whole file's default: eager forward() takes the fused path, measured faster than the
# readable one (ViT-S, CPU: readable / fused 1.03-1.43 in inference, 1.09-1.16 per training step;
# docs/performance.md). model.fused = False on a built model runs the readable path.
RopeViT.fused = True
