"""Vision Transformers for SSL: switchable attention, any input size, token dropping.

``VisionTransformer(x) -> (B, dim)`` pooled features (mean of patch tokens or the
class token). Built from timm's layers (Mlp, DropPath, LayerScale) around our
own attention so the kernel is a config choice (``model.attn``):

- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention / memory-efficient
  kernels on CUDA, fused math on CPU);
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (optional package);
- ``naive``: softmax(q k^T / sqrt(d)) v written out, the reference.

Any input size: the learned position embedding (defined on the grid of
``img_size``) is resampled bicubically to the input's grid, like timm's
``resample_abs_pos_embed`` (cookbook section 3.1.1: multi-crop local views at
96 px through the same ViT). ``patch_drop`` keeps a random subset of patch
tokens in training (the MAE-style speed-up for joint-embedding methods, section
3.8). ``frozen_patch_embed`` is MoCo v3's frozen random patch projection.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.models import register_backbone


# ----------------------------------------------------------------------------- attention


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v; q, k, v: (B, H, N, d) -> (B, H, N, d). The reference."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                 # (B, H, N, N)
    return attn.float().softmax(dim=-1).to(v.dtype) @ v


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError:
        raise ImportError("model.attn=xformers needs xformers: pip install 'fastssl[xformers]' "
                          "(or use model.attn=sdpa, which uses FlashAttention on CUDA)") from None
    return xops


class Attention(nn.Module):
    """Multi-head self-attention with a switchable kernel: sdpa | xformers | naive."""

    def __init__(self, dim: int, heads: int, impl: str = "sdpa", qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} must be divisible by the number of heads {heads}")
        if impl not in ("sdpa", "xformers", "naive"):
            raise ValueError(f"attention impl must be sdpa, xformers or naive, got {impl!r}")
        if impl == "xformers":
            _xformers_ops()  # fail at build time, not at the first step
        self.heads, self.impl = heads, impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)   # (B, N, 3, H, hd)
        if self.impl == "xformers":
            q, k, v = qkv.unbind(2)                                          # (B, N, H, hd): xformers' layout
            out = _xformers_ops().memory_efficient_attention(q, k, v).reshape(b, n, d)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # (B, H, N, hd)
            o = F.scaled_dot_product_attention(q, k, v) if self.impl == "sdpa" else naive_attention(q, k, v)
            out = o.transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN x))), x + DropPath(LS(MLP(LN x)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: float = 0.0, attn: str = "sdpa"):
        super().__init__()
        from timm.layers import DropPath, LayerScale, Mlp

        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


# ----------------------------------------------------------------------------- position embeddings and masking


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of patch position embeddings, (1, Ho*Wo, D) -> (1, Hn*Wn, D).

    Same arithmetic as timm's ``resample_abs_pos_embed`` (fp32, antialias, no prefix
    tokens here: the class token's embedding is kept apart); the same grid is the identity.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    p = pos.float().reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)        # (1, D, Ho, Wo)
    p = F.interpolate(p, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    return p.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """MAE's per-sample random token subset (He et al. 2022, ``random_masking``).

    x: (B, N, D) patch tokens. Keeps K = round((1 - mask_ratio) * N) tokens per image,
    chosen by sorting uniform noise (B, N) (pass ``noise`` to fix it).
    Returns x_kept (B, K, D), mask (B, N) with 0 = kept, 1 = removed (in the original
    patch order), and ids_restore (B, N): ``gather(cat(kept, removed), ids_restore)``
    puts tokens back in patch order.
    """
    b, n, d = x.shape
    keep = int(round((1.0 - mask_ratio) * n))
    if keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no token of {n}; use a ratio below {1 - 1 / n:.3f}")
    if noise is None:
        noise = torch.rand(b, n, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)                             # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]                                      # (B, K)
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


# ----------------------------------------------------------------------------- the model


class VisionTransformer(nn.Module):
    """ViT backbone: (B, 3, H, W) at any H, W divisible by the patch -> (B, dim).

    Shapes: patch_embed -> (B, N, D) with N = (H/p)(W/p); a class token is always
    present (the ``token`` pool reads it; ``avg`` means the patch tokens after the final norm).
    """

    def __init__(self, img_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, layer_scale: float = 0.0, attn: str = "sdpa",
                 global_pool: str = "avg", patch_drop: float = 0.0, frozen_patch_embed: bool = False):
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be avg or token, got {global_pool!r}")
        self.patch, self.dim, self.global_pool, self.patch_drop = patch, dim, global_pool, patch_drop
        self.num_features = dim
        self.grid = (img_size // patch, img_size // patch)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        dpr = torch.linspace(0, drop_path, depth).tolist()                 # stochastic depth rule (DeiT)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dpr[i], layer_scale, attn) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._pos_cache: dict = {}
        self._init_weights()
        if frozen_patch_embed:
            # MoCo v3 (Chen et al. 2021, section 5): a fixed random patch projection stabilises ViT training.
            for p in self.patch_embed.parameters():
                p.requires_grad_(False)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))                   # as MAE / MoCo v3: like a Linear
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings for ``grid`` (1, gh*gw, D); resampled ones are cached per size when no grad flows."""
        if grid == self.grid:
            return self.pos_embed
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = (grid, self.pos_embed._version, self.pos_embed.data_ptr(), self.pos_embed.dtype)
        if cacheable and self._pos_cache.get(grid, (None,))[0] == key:
            return self._pos_cache[grid][1]
        out = resample_pos_embed(self.pos_embed, self.grid, grid)
        if cacheable:
            self._pos_cache[grid] = (key, out)
        return out

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> patch tokens with position embeddings (B, N, D) and the grid (H/p, W/p)."""
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"ViT input {h}x{w} px is not divisible by the patch size {self.patch}; "
                             f"use crop sizes that are multiples of {self.patch}")
        t = self.patch_embed(x)                                             # (B, D, gh, gw)
        grid = (t.shape[-2], t.shape[-1])
        t = t.flatten(2).transpose(1, 2)                                    # (B, N, D)
        return t + self.pos_embed_for(grid), grid

    def masked_tokens(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """MAE's kept tokens, embedding only the kept patches: (B, 3, H, W) -> (B, K, D), mask, ids_restore.

        Equal to ``random_masking(self.tokens(x)[0], mask_ratio, noise)``, but the patch
        projection (a stride-p conv = a Linear on flattened (C, p, p) patches) runs on the
        K kept patches instead of all N.
        """
        b, c, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"ViT input {h}x{w} px is not divisible by the patch size {p}; "
                             f"use crop sizes that are multiples of {p}")
        grid = (h // p, w // p)
        n = grid[0] * grid[1]
        pix = x.reshape(b, c, grid[0], p, grid[1], p).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c * p * p)
        if noise is None:
            noise = torch.rand(b, n, device=x.device)
        pix, mask, ids_restore = random_masking(pix, mask_ratio, noise)     # (B, K, C*p*p)
        pos, _, _ = random_masking(self.pos_embed_for(grid).expand(b, -1, -1), mask_ratio, noise)
        w_ = self.patch_embed.weight.reshape(self.dim, -1)                  # (D, C*p*p), the conv's (C, p, p) order
        return F.linear(pix, w_.to(pix.dtype), self.patch_embed.bias) + pos, mask, ids_restore

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, K, D) (any subset) -> class token prepended, blocks, norm -> (B, 1+K, D)."""
        cls = (self.cls_token + self.cls_pos).expand(t.shape[0], -1, -1)
        x = torch.cat([cls, t], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1+K, D) -> (B, D): the class token or the mean of the patch tokens."""
        return x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)

    def forward(self, x: torch.Tensor, mask_ratio: float | None = None):
        """(B, 3, H, W) -> pooled (B, D); with ``mask_ratio`` (MAE) -> (latent (B, 1+K, D), mask, ids_restore).

        MAE's path runs the blocks on the K = round((1 - mask_ratio) N) kept tokens only
        (see :func:`random_masking` for mask / ids_restore). Both paths are one call, so
        a compiled backbone compiles either.
        """
        if mask_ratio is not None:
            t, mask, ids_restore = self.masked_tokens(x, mask_ratio)
            return self.encode(t), mask, ids_restore
        t, _ = self.tokens(x)
        if self.training and self.patch_drop > 0:
            t, _, _ = random_masking(t, self.patch_drop)                    # fewer tokens: faster (section 3.8)
        return self.pool(self.encode(t))


# ----------------------------------------------------------------------------- registered sizes

_SIZES = {  # name: (patch, dim, depth, heads, native img size)
    "vit_micro_patch8": (8, 192, 4, 3, 32),     # CPU demo size for 32-64 px images
    "vit_tiny_patch16": (16, 192, 12, 3, 224),
    "vit_small_patch16": (16, 384, 12, 6, 224),
    "vit_base_patch16": (16, 768, 12, 12, 224),
    "vit_large_patch16": (16, 1024, 24, 16, 224),
    "vit_small_patch8": (8, 384, 12, 6, 224),
    "vit_base_patch8": (8, 768, 12, 12, 224),
}


def build_vit(name: str, model_cfg) -> tuple[VisionTransformer, int]:
    patch, dim, depth, heads, img = _SIZES[name]
    net = VisionTransformer(img_size=img, patch=patch, dim=dim, depth=depth, heads=heads,
                            drop_path=model_cfg.drop_path, layer_scale=model_cfg.layer_scale, attn=model_cfg.attn,
                            global_pool=model_cfg.global_pool, patch_drop=model_cfg.patch_drop,
                            frozen_patch_embed=model_cfg.frozen_patch_embed)
    return net, dim


def _register(name: str) -> None:
    register_backbone(name)(lambda model_cfg: build_vit(name, model_cfg))


for _name in _SIZES:
    _register(_name)


def is_vit(m: nn.Module) -> bool:
    return isinstance(getattr(m, "_orig_mod", m), VisionTransformer)


__all__ = ["Attention", "Block", "VisionTransformer", "naive_attention", "random_masking", "resample_pos_embed",
           "build_vit", "is_vit"]
