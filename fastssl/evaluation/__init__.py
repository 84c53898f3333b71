"""Evaluation of a representation (cookbook section 3.7): kNN, linear probes, spectra.

Functions take feature tensors and return tensors; the ``*_top1`` helpers and
``rankme`` return Python floats (one host sync, at evaluation time only).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def extract_features(embed_fn, loader, device, max_samples: int | None = None,
                     progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``embed_fn`` over a loader of Batch (view 0); returns (feats (N, F) float32 CPU, labels (N,) int64).

    ``progress``: a label to report progress under (images; ``fastssl.progress``), None for none.
    """
    from fastssl.progress import progress as reporter

    total = getattr(loader, "num_samples", None)
    if total is not None and max_samples:
        total = min(total, max_samples)
    with reporter(total, progress or "", "img", enabled=progress is not None, leave=False) as bar:
        return _extract(embed_fn, loader, max_samples, bar)


def _extract(embed_fn, loader, max_samples, bar) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels, n = [], [], 0
    for batch in loader:
        x = batch.views[0]
        # Loaders hand bf16 views on CUDA; the model's weights are fp32 outside the trainer's
        # autocast, so evaluate under the same autocast the views were made for.
        low = x.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(x.device.type, dtype=x.dtype if low else torch.bfloat16, enabled=low):
            f = embed_fn(x)
        feats.append(f.float().cpu())
        labels.append(batch.labels.cpu() if batch.labels is not None else torch.full((len(feats[-1]),), -1))
        n += len(feats[-1])
        bar.update(len(feats[-1]))  # no extra sync: .cpu() above already waited for the batch
        if max_samples and n >= max_samples:
            break
    x, y = torch.cat(feats), torch.cat(labels)
    return (x[:max_samples], y[:max_samples]) if max_samples else (x, y)


@torch.no_grad()
def knn_scores(train_feats, train_labels, test_feats, num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (DINO / InstDisc, section 3.7.1): cosine similarity, votes exp(sim / T).

    train_feats (N, F), train_labels (N,), test_feats (M, F) -> scores (M, C). Chunked over the test set.
    """
    tr = F.normalize(train_feats.float(), dim=1)
    te = F.normalize(test_feats.float(), dim=1)
    k = min(k, tr.shape[0])
    out = []
    for s in range(0, te.shape[0], chunk):
        sim = te[s:s + chunk] @ tr.T                                  # (m, N)
        w, idx = sim.topk(k, dim=1)                                   # (m, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx].long(), (w / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
             temperature: float = 0.07) -> float:
    """kNN top-1 accuracy in percent."""
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return 100.0 * (scores.argmax(1) == test_labels.to(scores.device)).float().mean().item()


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023; section 3.7.2): exp of the entropy of the normalised singular values."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


class OnlineLinearProbe(nn.Module):
    """A linear head on *detached* features, trained by its own optimizer at every training step.

    ``step(feats, labels) -> (loss, correct)`` as device tensors (no host sync): the trainer
    sums ``correct`` and reads it when it logs. Its gradients never reach the backbone.
    """

    def __init__(self, feat_dim: int, num_classes: int, lr: float = 0.1):
        super().__init__()
        self.norm = nn.BatchNorm1d(feat_dim, affine=False)
        self.head = nn.Linear(feat_dim, num_classes)
        self.opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(feats))

    def step(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad(), torch.autocast(feats.device.type, enabled=False):
            logits = self(feats.detach().float())
            loss = F.cross_entropy(logits, labels)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return loss.detach(), (logits.detach().argmax(1) == labels).sum()

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        sd["_opt"] = self.opt.state_dict()
        return sd

    def load_state_dict(self, sd, strict: bool = True):
        sd = dict(sd)
        opt = sd.pop("_opt", None)
        res = super().load_state_dict(sd, strict)
        if opt is not None:
            self.opt.load_state_dict(opt)
        return res
