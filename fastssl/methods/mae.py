"""MAE (He et al. 2022), cookbook section 2.5: masked image modelling.

The ViT encoder runs on the visible 25% of patches only (``random_masking``); a
light decoder sees encoded visible tokens plus mask tokens at every position and
predicts pixels; the loss is the MSE on per-patch normalised pixels, on the
removed patches only. ``embed`` runs the encoder on all patches, mean-pooled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastssl.config import MethodConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import log_scalar, resolve_backbone
from fastssl.models.mae import MAEDecoder, mae_loss
from fastssl.models.vit import VisionTransformer


@dataclass
class MAEConfig(MethodConfig):
    name: str = "mae"
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio={self.mask_ratio} must be in [0, 1)")


@register_method("mae", config=MAEConfig, recipe="mae")
class MAE(MethodHooks, nn.Module):
    def __init__(self, backbone: str | nn.Module = "vit_base_patch16", *, feat_dim: int | None = None,
                 mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 norm_pix_loss: bool = True, attn: str = "sdpa"):
        super().__init__()
        MAEConfig(mask_ratio=mask_ratio)                                    # the same range check as method.mask_ratio
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        if not isinstance(self.backbone, VisionTransformer):
            got = backbone if isinstance(backbone, str) else type(backbone).__name__
            raise ValueError(f"method.name=mae needs a ViT backbone (fastssl's: model.backbone=vit_base_patch16, "
                             f"vit_micro_patch8, ...), got {got!r}")
        self.patch = self.backbone.patch
        self.decoder = MAEDecoder(self.feat_dim, self.patch, self.backbone.grid, decoder_dim, decoder_depth,
                                  decoder_heads, attn=attn)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        x = views[0]
        latent, mask, ids_restore = self.backbone(x, mask_ratio=self.mask_ratio)   # (B, 1+K, E): visible only
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        pred = self.decoder(latent, ids_restore, grid)                      # (B, N, p*p*3)
        # mask_ratio 0 (a baseline): nothing is removed, so the loss covers every patch.
        weight = mask if self.mask_ratio > 0 else torch.ones_like(mask)
        loss = mae_loss(pred, x, weight, self.norm_pix_loss, patch=self.patch)
        feats = latent[:, 1:].mean(dim=1).detach()                          # visible-token mean (online probe)
        return {"loss": loss, "features": feats, "visible_tokens": log_scalar(latent.shape[1] - 1, loss)}
