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
from fastssl.methods._common import embedding_std, per_view, resolve_backbone
from fastssl.models.heads import ProjectionHead


@dataclass
class BarlowTwinsConfig(TwoViewConfig):
    name: str = "barlow_twins"
    proj_hidden: int = 8192
    proj_dim: int = 8192
    lambd: float = 0.0051


@register_method("barlow_twins", config=BarlowTwinsConfig, recipe="byol")
class BarlowTwins(MethodHooks, nn.Module):
    step_free_forward = True  # forward reads no step: train.compile_scope=method compiles it whole

    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 proj_hidden: int = 8192, proj_dim: int = 8192, lambd: float = 0.0051, joint_bn: bool = False):
        super().__init__()
        self.joint_bn = joint_bn
        self.lambd = lambd
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim, layers=3, bias_last=False)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn).float()
        terms = losses.barlow_twins_terms(z[:b], z[b:], self.lambd)
        out = {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}
        out.update(features=feats[:b].detach(), z_std=embedding_std(z[:b]))
        return out
