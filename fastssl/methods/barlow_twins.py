"""Barlow Twins (Zbontar et al. 2021), cookbook section 2.4: cross-correlation to the identity.

backbone -> 3-layer projector (8192-8192-8192, BN) -> sum_k (1 - c_kk)^2 +
lambda sum_{k != l} c_kl^2 over the batch-standardised cross-correlation
(``losses.barlow_twins_terms``; the standardisation is the paper's affine-free BN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastssl import losses
from fastssl.config import TwoViewConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import embedding_std, per_view
from fastssl.models import create_backbone, mlp


@dataclass
class BarlowTwinsConfig(TwoViewConfig):
    name: str = "barlow_twins"
    proj_hidden: int = 8192
    proj_dim: int = 8192
    lambd: float = 0.0051


@register_method("barlow_twins", config=BarlowTwinsConfig, recipe="byol")
class BarlowTwins(MethodHooks, nn.Module):
    def __init__(self, cfg, total_steps: int):
        super().__init__()
        m = cfg.method
        self.joint_bn = m.joint_bn
        self.lambd = m.lambd
        self.backbone, self.feat_dim = create_backbone(cfg.model)
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim, layers=3, bias_last=False)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn).float()
        terms = losses.barlow_twins_terms(z[:b], z[b:], self.lambd)
        out = {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}
        out.update(features=feats[:b].detach(), z_std=embedding_std(z[:b]))
        return out
