"""SimSiam (Chen & He 2021), cookbook section 2.3: self-distillation without a teacher.

Both views through the same network; the stop-gradient on the projection z is
what prevents collapse. Loss 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)), D = -cos.
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
class SimSiamConfig(TwoViewConfig):
    name: str = "simsiam"
    proj_hidden: int = 2048         # 3-layer projector with BN on the output (SimSiam section 3)
    proj_dim: int = 2048
    pred_hidden: int = 512          # bottleneck predictor


@register_method("simsiam", config=SimSiamConfig, recipe="simclr")
class SimSiam(MethodHooks, nn.Module):
    step_free_forward = True  # forward reads no step: train.compile_scope=method compiles it whole

    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 proj_hidden: int = 2048, proj_dim: int = 2048, pred_hidden: int = 512, joint_bn: bool = False):
        super().__init__()
        self.joint_bn = joint_bn
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim, layers=3, bn_last=True)
        self.predictor = ProjectionHead(proj_dim, pred_hidden, proj_dim, layers=2)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn)             # (2B, d)
        p = per_view(self.predictor, z, self.joint_bn)
        loss = 0.5 * losses.negative_cosine(p[:b], z[b:]) + 0.5 * losses.negative_cosine(p[b:], z[:b])  # z detached
        # SimSiam's collapse monitor: std of l2-normalised z, ~1/sqrt(d) healthy, 0 collapsed.
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z[:b])}
