"""SimSiam (Chen & He 2021), cookbook section 2.3: self-distillation without a teacher.

Both views through the same network; the stop-gradient on the projection z is
what prevents collapse. Loss 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)), D = -cos.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastssl.config import TwoViewConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import embedding_std, neg_cosine, per_view
from fastssl.models import create_backbone, mlp


@dataclass
class SimSiamConfig(TwoViewConfig):
    name: str = "simsiam"
    proj_hidden: int = 2048         # 3-layer projector with BN on the output (SimSiam section 3)
    proj_dim: int = 2048
    pred_hidden: int = 512          # bottleneck predictor


@register_method("simsiam", config=SimSiamConfig, recipe="simclr")
class SimSiam(MethodHooks, nn.Module):
    def __init__(self, cfg, total_steps: int):
        super().__init__()
        m = cfg.method
        self.joint_bn = m.joint_bn
        self.backbone, self.feat_dim = create_backbone(cfg.model)
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim, layers=3, bn_last=True)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, layers=2)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn)             # (2B, d)
        p = per_view(self.predictor, z, self.joint_bn)
        loss = 0.5 * neg_cosine(p[:b], z[b:]) + 0.5 * neg_cosine(p[b:], z[:b])   # neg_cosine detaches z
        # SimSiam's collapse monitor: std of l2-normalised z, ~1/sqrt(d) healthy, 0 collapsed.
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z[:b])}
