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
from fastssl.methods._common import embedding_std, per_view, resolve_backbone
from fastssl.models.heads import ProjectionHead


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
    step_free_forward = True  # forward reads no step: train.compile_scope=method compiles it whole

    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 proj_hidden: int = 8192, proj_dim: int = 8192, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                 cov_coeff: float = 1.0, joint_bn: bool = False):
        super().__init__()
        self.joint_bn = joint_bn
        self.coeffs = (sim_coeff, std_coeff, cov_coeff)
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim, layers=3)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn).float()
        terms = losses.vicreg_terms(z[:b], z[b:], *self.coeffs)
        out = {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}
        out.update(features=feats[:b].detach(), z_std=embedding_std(z[:b]))
        return out
