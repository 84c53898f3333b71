"""VICReg (Bardes, Ponce & LeCun 2022), cookbook section 2.4: variance-invariance-covariance.

backbone -> 3-layer expander (8192-8192-8192 at ImageNet scale, BN) ->
25 * invariance + 25 * variance + 1 * covariance (``losses.vicreg_terms``).
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
class VICRegConfig(TwoViewConfig):
    name: str = "vicreg"
    proj_hidden: int = 8192
    proj_dim: int = 8192
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0


@register_method("vicreg", config=VICRegConfig, recipe="byol")
class VICReg(MethodHooks, nn.Module):
    def __init__(self, cfg, total_steps: int):
        super().__init__()
        m = cfg.method
        self.joint_bn = m.joint_bn
        self.coeffs = (m.sim_coeff, m.std_coeff, m.cov_coeff)
        self.backbone, self.feat_dim = create_backbone(cfg.model)
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim, layers=3)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn).float()
        terms = losses.vicreg_terms(z[:b], z[b:], *self.coeffs)
        out = {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}
        out.update(features=feats[:b].detach(), z_std=embedding_std(z[:b]))
        return out
