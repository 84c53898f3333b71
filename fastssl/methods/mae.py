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
from fastssl.models import create_backbone
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
    def __init__(self, cfg, total_steps: int):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.backbone, self.feat_dim = create_backbone(cfg.model)
        if not isinstance(self.backbone, VisionTransformer):
            raise ValueError(f"method.name=mae needs a ViT backbone (model.backbone=vit_base_patch16, "
                             f"vit_micro_patch8, ...), got {cfg.model.backbone!r}")
        self.patch = self.backbone.patch
        self.decoder = MAEDecoder(self.feat_dim, self.patch, self.backbone.grid, m.decoder_dim, m.decoder_depth,
                                  m.decoder_heads, attn=cfg.model.attn)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        x = views[0]
        latent, mask, ids_restore = self.backbone(x, mask_ratio=self.cfg.mask_ratio)   # (B, 1+K, E): visible only
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        pred = self.decoder(latent, ids_restore, grid)                      # (B, N, p*p*3)
        # mask_ratio 0 (a baseline): nothing is removed, so the loss covers every patch.
        weight = mask if self.cfg.mask_ratio > 0 else torch.ones_like(mask)
        loss = mae_loss(pred, x, weight, self.cfg.norm_pix_loss, patch=self.patch)
        feats = latent[:, 1:].mean(dim=1).detach()                          # visible-token mean (online probe)
        return {"loss": loss, "features": feats, "visible_tokens": torch.tensor(float(latent.shape[1] - 1))}
