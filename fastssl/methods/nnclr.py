"""NNCLR (Dwibedi et al. 2021), cookbook section 2.2.1: nearest neighbours as positives.

A support set (FIFO queue of past projections of view 1, in the state dict) gives
each embedding its nearest neighbour NN(z); the loss is InfoNCE between NN(z1_i) and
the prediction p2_i (other p2_k negatives), symmetrised. The queue advances once
per optimizer step with everything the step's micro-batches saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl import losses
from fastssl.config import TwoViewConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import FeatureQueue, embedding_std, per_view, resolve_backbone
from fastssl.models.heads import ProjectionHead


@dataclass
class NNCLRConfig(TwoViewConfig):
    name: str = "nnclr"
    proj_hidden: int = 2048
    proj_dim: int = 256
    pred_hidden: int = 4096
    queue_size: int = 98304         # support set size (NNCLR section 4)
    temperature: float = 0.1


@register_method("nnclr", config=NNCLRConfig, recipe="simclr")
class NNCLR(MethodHooks, nn.Module):
    def __init__(self, backbone: str | nn.Module = "resnet18", *, feat_dim: int | None = None,
                 proj_hidden: int = 2048, proj_dim: int = 256, pred_hidden: int = 4096, queue_size: int = 98304,
                 temperature: float = 0.1, joint_bn: bool = False):
        super().__init__()
        self.joint_bn = joint_bn
        self.temperature = temperature
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim, layers=3, bn_last=True)
        self.predictor = ProjectionHead(proj_dim, pred_hidden, proj_dim, layers=2)
        self.queue = FeatureQueue(queue_size, proj_dim)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) normalised -> (B, d) nearest support-set rows by cosine; z itself while the set is empty."""
        sims = z @ self.queue.rows.t()                                      # (B, Q)
        sims = sims.masked_fill(~self.queue.filled_mask(), float("-inf"))   # never pick an empty slot
        nn_rows = self.queue.rows[sims.argmax(dim=1)]
        return torch.where(self.queue.filled > 0, nn_rows, z)

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = views[0].shape[0]
        feats = per_view(self.backbone, views[:2], self.joint_bn)        # (2B, F)
        z = per_view(self.projector, feats, self.joint_bn).float()     # (2B, d)
        p = per_view(self.predictor, z, self.joint_bn)
        zn = F.normalize(z.detach(), dim=1)
        nn1, nn2 = self.nearest(zn[:b]), self.nearest(zn[b:])
        t = self.temperature
        loss = 0.5 * (losses.info_nce(nn1, p[b:], temperature=t) + losses.info_nce(nn2, p[:b], temperature=t))
        self.queue.stage(zn[:b])
        with torch.no_grad():
            nn_acc = (nn1 * zn[b:]).sum(1).mean()                           # cos(NN(z1), z2): support-set quality
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z[:b]), "nn_cos": nn_acc}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.queue.commit()
