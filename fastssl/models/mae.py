"""MAE pieces (He et al. 2022; cookbook section 2.5): patchify, the light decoder, the loss.

The encoder is a :class:`fastssl.models.vit.VisionTransformer` run on the kept
tokens only (``random_masking``), which is where MAE's ~3x speed-up comes from;
the decoder sees all N positions: the encoded kept tokens plus a shared mask
token at each removed position, each with its position embedding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastssl.models.vit import Block, resample_pos_embed


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches in row-major grid order, pixels (p, p, C) within a patch."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def mae_loss(pred: torch.Tensor, imgs_or_target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
             patch: int | None = None) -> torch.Tensor:
    """Mean over removed patches of the per-patch MSE (MAE's ``forward_loss``).

    pred: (B, N, p*p*3); target: images (B, 3, H, W) (give ``patch``) or patches (B, N, p*p*3);
    mask: (B, N), 1 = removed (counted), 0 = visible (ignored). ``norm_pix``: each target
    patch normalised by its own mean and variance (eps 1e-6), MAE's better-representation default.
    """
    target = patchify(imgs_or_target, patch) if patch else imgs_or_target
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)                # (B, N)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """Encoded kept tokens (B, 1+K, E) + ids_restore (B, N) -> per-patch pixel predictions (B, N, p*p*3)."""

    def __init__(self, enc_dim: int, patch: int, grid: tuple[int, int], dim: int = 512, depth: int = 8,
                 heads: int = 16, attn: str = "sdpa"):
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, attn=attn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.embed(latent)                                              # (B, 1+K, d)
        b, k1, d = x.shape
        n = ids_restore.shape[1]
        masks = self.mask_token.expand(b, n + 1 - k1, -1)                   # (B, N-K, d)
        t = torch.cat([x[:, 1:], masks], dim=1)                             # kept first, then removed
        t = torch.gather(t, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # back to patch order (B, N, d)
        t = t + resample_pos_embed(self.pos_embed, self.grid, tuple(grid))
        x = torch.cat([x[:, :1] + self.cls_pos, t], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]                               # drop the class token: (B, N, p*p*3)
