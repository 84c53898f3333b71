"""SwAV (Caron et al. 2020), cookbook section 2.4.2: swapped prediction of online codes.

backbone -> projector -> l2-normalise -> scores against K normalised prototypes.
Codes Q of each global view come from Sinkhorn-Knopp (eps 0.05, 3 iterations;
optionally with a queue of past projections); each other view predicts them:
loss = mean over (code view i, view v != i) of -sum_k q_ik log softmax(s_v / T)_k.
Prototypes are re-normalised after every optimizer step and frozen (grads
dropped) during the first epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl import losses
from fastssl.config import MethodConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import (FeatureQueue, embedding_std, epochs_to_steps, forward_by_resolution,
                                     resolve_backbone)
from fastssl.models.heads import ProjectionHead


@dataclass
class SwAVConfig(MethodConfig):
    name: str = "swav"
    proj_hidden: int = 2048
    proj_dim: int = 128
    num_prototypes: int = 3000
    temperature: float = 0.1
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    num_assign: int = 2             # views whose codes are computed ("crops_for_assign")
    queue_size: int = 0             # 0: no queue; paper: 3840 at batch 256 (small batches)
    queue_start_epochs: float = 15.0
    freeze_prototypes_epochs: float = 1.0


@register_method("swav", config=SwAVConfig, recipe="dino")
class SwAV(MethodHooks, nn.Module):
    def __init__(self, backbone: str | nn.Module = "resnet50", *, feat_dim: int | None = None,
                 proj_hidden: int = 2048, proj_dim: int = 128, num_prototypes: int = 3000, temperature: float = 0.1,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3, num_assign: int = 2, queue_size: int = 0,
                 queue_start_epochs: float = 15.0, freeze_prototypes_epochs: float = 1.0,
                 steps_per_epoch: float | None = None):
        super().__init__()
        self.temperature, self.num_assign = temperature, num_assign
        self.sinkhorn_eps, self.sinkhorn_iters = sinkhorn_eps, sinkhorn_iters
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, proj_hidden, proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        self.freeze_steps = epochs_to_steps(freeze_prototypes_epochs, steps_per_epoch)
        self.queue_start = epochs_to_steps(queue_start_epochs, steps_per_epoch)
        self.queues = nn.ModuleList(FeatureQueue(queue_size, proj_dim) for _ in range(num_assign)) \
            if queue_size > 0 else None

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b, nv = views[0].shape[0], len(views)
        feats = forward_by_resolution(self.backbone, views)                 # (V*B, F)
        z = F.normalize(self.projector(feats).float(), dim=1)               # (V*B, d)
        scores = self.prototypes(z.to(self.prototypes.weight.dtype)).float()  # (V*B, K)
        logp = F.log_softmax(scores / self.temperature, dim=1).chunk(nv)
        codes, q_max = [], 0.0
        for i in range(min(self.num_assign, nv)):
            s_i = scores[i * b:(i + 1) * b].detach()
            if self.queues is not None:
                if step >= self.queue_start:                                # past projections join Sinkhorn
                    s_i = torch.cat([s_i, self.prototypes(self.queues[i].rows.to(z.dtype)).float().detach()])
                self.queues[i].stage(z[i * b:(i + 1) * b].detach())
            q = losses.sinkhorn(s_i, self.sinkhorn_eps, self.sinkhorn_iters)[:b]   # (B, K) codes
            q_max = q_max + q.max(dim=1).values.mean()
            codes.append(q)
        loss = losses.swav_loss(codes, logp)
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z[:b]),
                "code_max": (q_max / len(codes)).detach()}

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_steps:                                        # SwAV: prototypes fixed in epoch 1
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.normalize_prototypes()
        if self.queues is not None:
            for q in self.queues:
                q.commit()
