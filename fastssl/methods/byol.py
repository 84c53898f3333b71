"""BYOL (Grill et al. 2020), cookbook section 2.3: self-distillation with an EMA teacher.

online: backbone -> projector -> predictor; target: EMA copy of backbone -> projector
(momentum cosine 0.996 -> 1, advanced once per optimizer step). Loss per direction
||p/|p| - z'/|z'|||^2 = 2 - 2 cos(p, z'), symmetrised (summed over both directions).
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
class BYOLConfig(TwoViewConfig):
    name: str = "byol"
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    momentum: float = 0.996         # base EMA momentum; cosine to momentum_end (BYOL section 3.3)
    momentum_end: float = 1.0


@register_method("byol", config=BYOLConfig, recipe="byol")
class BYOL(MethodHooks, nn.Module):
    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096, momentum: float = 0.996,
                 momentum_end: float = 1.0, total_steps: int | None = None, joint_bn: bool = False):
        super().__init__()
        self.joint_bn = joint_bn
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim)
        self.predictor = ProjectionHead(proj_dim, pred_hidden, proj_dim)
        self.teacher = make_teachers(backbone=self.backbone, projector=self.projector)
        self.momentum = momentum_schedule(momentum, total_steps, momentum_end)   # (total_steps,) numpy

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn)
        p = per_view(self.predictor, z, self.joint_bn)                  # (2B, d)
        with torch.no_grad():
            teacher = lambda v: self.teacher["projector"](self.teacher["backbone"](v))  # noqa: E731
            zt = per_view(teacher, views[:2], self.joint_bn)               # (2B, d) targets
        loss = losses.byol_loss(p[:b], zt[b:]) + losses.byol_loss(p[b:], zt[:b])
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z[:b]),
                "target_std": embedding_std(zt[:b]), "ema_momentum": log_scalar(at_step(self.momentum, step), loss)}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update_teachers(self.teacher, self, at_step(self.momentum, step))
