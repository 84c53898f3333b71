"""MoCo v3 (Chen, Xie & He 2021), cookbook sections 2.2-2.3: momentum encoder + InfoNCE.

query: backbone -> projector -> predictor; key: momentum (EMA) backbone -> projector
(momentum cosine from 0.99 to 1). Symmetric loss ctr(q1, k2) + ctr(q2, k1) with
ctr = 2 tau * CrossEntropy(q k^T / tau), keys gathered across processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastssl import losses
from fastssl.config import TwoViewConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import (at_step, ema_update_teachers, embedding_std, log_scalar, make_teachers, momentum_schedule,
                                     per_view, resolve_backbone)
from fastssl.models.heads import ProjectionHead


@dataclass
class MoCoV3Config(TwoViewConfig):
    name: str = "mocov3"
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    temperature: float = 0.2        # ViT setting (1.0 for ResNet-50 in the paper)
    momentum: float = 0.99          # cosine to momentum_end
    momentum_end: float = 1.0


@register_method("mocov3", config=MoCoV3Config, recipe="byol")
class MoCoV3(MethodHooks, nn.Module):
    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096, temperature: float = 0.2,
                 momentum: float = 0.99, momentum_end: float = 1.0, total_steps: int | None = None,
                 joint_bn: bool = False):
        super().__init__()
        self.joint_bn = joint_bn
        self.temperature = temperature
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        # MoCo v3: 3-layer projector, 2-layer predictor, BN after every layer (last ones without affine).
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim, layers=3, bn_last=True)
        self.predictor = ProjectionHead(proj_dim, pred_hidden, proj_dim, layers=2, bn_last=True)
        self.teacher = make_teachers(backbone=self.backbone, projector=self.projector)
        self.momentum = momentum_schedule(momentum, total_steps, momentum_end)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn)
        q = per_view(self.predictor, z, self.joint_bn).float()          # (2B, d)
        with torch.no_grad():
            teacher = lambda v: self.teacher["projector"](self.teacher["backbone"](v))  # noqa: E731
            k = per_view(teacher, views[:2], self.joint_bn).float()
        t = self.temperature
        loss = 2 * t * (losses.info_nce(q[:b], k[b:], temperature=t) + losses.info_nce(q[b:], k[:b], temperature=t))
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z[:b]),
                "ema_momentum": log_scalar(at_step(self.momentum, step), loss)}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update_teachers(self.teacher, self, at_step(self.momentum, step))
