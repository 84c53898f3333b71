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

from fastssl.config import MethodConfig
from fastssl.methods import MethodHooks, register_method
from fastssl.methods._common import FeatureQueue, embedding_std, forward_by_resolution, sinkhorn, steps_per_epoch
from fastssl.models import create_backbone, mlp


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
    def __init__(self, cfg, total_steps: int):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.backbone, self.feat_dim = create_backbone(cfg.model)
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim)
        self.prototypes = nn.Linear(m.proj_dim, m.num_prototypes, bias=False)
        self.normalize_prototypes()
        spe = steps_per_epoch(cfg, total_steps)
        self.freeze_steps = int(round(m.freeze_prototypes_epochs * spe))
        self.queue_start = int(round(m.queue_start_epochs * spe))
        self.queues = nn.ModuleList(FeatureQueue(m.queue_size, m.proj_dim) for _ in range(m.num_assign)) \
            if m.queue_size > 0 else None

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def forward(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b, nv = views[0].shape[0], len(views)
        feats = forward_by_resolution(self.backbone, views)                 # (V*B, F)
        z = F.normalize(self.projector(feats).float(), dim=1)               # (V*B, d)
        scores = self.prototypes(z.to(self.prototypes.weight.dtype)).float()  # (V*B, K)
        logp = F.log_softmax(scores / self.cfg.temperature, dim=1).chunk(nv)
        loss, n, q_max = 0.0, 0, 0.0
        for i in range(min(self.cfg.num_assign, nv)):
            s_i = scores[i * b:(i + 1) * b].detach()
            if self.queues is not None:
                if step >= self.queue_start:                                # past projections join Sinkhorn
                    s_i = torch.cat([s_i, self.prototypes(self.queues[i].rows.to(z.dtype)).float().detach()])
                self.queues[i].stage(z[i * b:(i + 1) * b].detach())
            q = sinkhorn(s_i, self.cfg.sinkhorn_eps, self.cfg.sinkhorn_iters)[:b]   # (B, K) codes
            q_max = q_max + q.max(dim=1).values.mean()
            for v in range(nv):
                if v != i:
                    loss = loss + (-(q * logp[v]).sum(dim=1)).mean()
                    n += 1
        loss = loss / n
        return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z[:b]),
                "code_max": (q_max / min(self.cfg.num_assign, nv)).detach()}

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_steps:                                        # SwAV: prototypes fixed in epoch 1
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.normalize_prototypes()
        if self.queues is not None:
            for q in self.queues:
                q.commit()
