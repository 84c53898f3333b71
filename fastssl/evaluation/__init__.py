"""Evaluation of a representation (cookbook section 3.7): kNN, linear probes, spectra.

Functions take feature tensors and return tensors; the ``*_top1`` helpers and
``rankme`` return Python floats (one host sync, at evaluation time only). Features
stay on the device that computed them (the GPU when there is one) and the kNN runs
there in blocks of bounded memory, so an ImageNet-sized bank (1.28 M x 2048) never
goes through the host unless it does not fit the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Device memory left free beyond the feature bank when deciding where to keep it: the model, the
# kNN's blocks and the allocator's slack. A bank that does not fit beside it stays in host memory.
DEVICE_HEADROOM_BYTES = 2 << 30

# Default memory budget of one kNN block (similarities, the normalised chunks, the chunk's top-k), by the
# device the kNN runs on: large enough that a GPU matmul is efficient (1024 x ~20k at F=2048), small
# beside any GPU's and any host's memory.
KNN_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


@torch.no_grad()
def extract_features(embed_fn, loader, device=None, max_samples: int | None = None,
                     progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``embed_fn`` over a loader of Batch (view 0); returns (feats (N, F), labels (N,) int64), on ``device``.

    ``device``: where the features are kept (default: where ``embed_fn`` puts them, i.e. the GPU
    when there is one). No copy to the host per batch: the bank is allocated once on the device
    when the loader knows its size (no ``torch.cat`` doubling the peak) and filled in place. On
    CUDA a bf16/fp16 embedding is kept in that dtype (it holds no more precision than that; half
    the bytes of fp32); elsewhere features are fp32. A bank that does not fit the device's free
    memory (with ``DEVICE_HEADROOM_BYTES`` to spare) is kept in host memory, with one log line.

    ``progress``: a label to report progress under (images; ``fastssl.progress``), None for none.
    """
    from fastssl.progress import progress as reporter

    # The rows this process reads (its shard of every eval.knn_stride-th sample), else the dataset's size.
    total = getattr(loader, "rank_samples", None)
    if total is None:
        total = getattr(loader, "num_samples", None)
    if total is not None and max_samples:
        total = min(total, max_samples)
    with reporter(total, progress or "", "img", enabled=progress is not None, leave=False) as bar:
        return _extract(embed_fn, loader, max_samples, bar, device, total)


def _bank_home(device: torch.device, rows: int | None, dim: int, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Where a bank of ``rows`` x ``dim`` features is kept: ``device``, or the host (fp32) where it does not fit."""
    if device.type != "cuda" or rows is None:
        return device, dtype
    need = rows * (dim * torch.tensor([], dtype=dtype).element_size() + 8)  # features + int64 labels
    free, _ = torch.cuda.mem_get_info(device)
    # Blocks the caching allocator holds but no tensor uses are free to the bank as well.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if need + DEVICE_HEADROOM_BYTES <= free:
        return device, dtype
    log.info("feature bank of %d x %d (%.1f GiB) does not fit the %.1f GiB free on %s beside %.1f GiB of headroom; "
             "keeping it in host memory (the kNN streams it to the device in chunks)",
             rows, dim, need / 2**30, free / 2**30, device, DEVICE_HEADROOM_BYTES / 2**30)
    return torch.device("cpu"), torch.float32


def _extract(embed_fn, loader, max_samples, bar, device, total) -> tuple[torch.Tensor, torch.Tensor]:
    bank = labels = None            # preallocated (total, F) / (total,) when the loader knows its size
    parts: list = []                # otherwise (or past a loader's announced size): (feats, labels) per batch
    home = dtype = None
    n = 0
    for batch in loader:
        x = batch.views[0]
        # Loaders hand bf16 views on CUDA; the model's weights are fp32 outside the trainer's
        # autocast, so evaluate under the same autocast the views were made for.
        low = x.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(x.device.type, dtype=x.dtype if low else torch.bfloat16, enabled=low):
            f = embed_fn(x)                                                   # (B, F)
        y = batch.labels if batch.labels is not None else torch.full((len(f),), -1, device=f.device)
        take = len(f) if not max_samples else min(len(f), max_samples - n)
        f, y = f[:take], y[:take]
        if home is None:
            want = torch.device(device) if device is not None else f.device
            half = want.type == "cuda" and f.dtype in (torch.bfloat16, torch.float16)
            home, dtype = _bank_home(want, total, f.shape[1], f.dtype if half else torch.float32)
            if total is not None:
                bank = torch.empty(total, f.shape[1], dtype=dtype, device=home)
                labels = torch.full((total,), -1, dtype=torch.int64, device=home)
        if bank is not None and n + take > len(bank):  # the loader yields more than it announced
            parts, bank, labels = [(bank[:n], labels[:n])], None, None
        if bank is not None:
            bank[n:n + take].copy_(f, non_blocking=True)
            labels[n:n + take].copy_(y, non_blocking=True)
        else:
            parts.append((f.to(home, dtype), y.to(home, torch.int64)))
        n += take
        bar.update(take)  # images queued; the device may still be computing (no sync per batch)
        if max_samples and n >= max_samples:
            break
    if bank is not None:
        if n < len(bank):  # a shorter split than announced: a copy, not a view pinning the whole allocation
            bank, labels = bank[:n].clone(), labels[:n].clone()
        return bank, labels
    if not parts:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass(frozen=True)
class KnnPlan:
    """Chunking of a kNN: blocks of ``chunk_test`` x ``chunk_train`` similarities; ``block_bytes`` <= the budget.

    ``block_bytes`` counts what one block allocates at once: the fp32 similarities (m, n), the
    normalised fp32 chunks (m, F) and (n, F) (plus the chunk's device copy when the bank lives
    elsewhere, and its fp32 cast when the bank is bf16/fp16), and the chunk's top-k and its merge
    with the running top-k. The running top-k itself, ``state_bytes`` = M x k x (4 + 8)
    (values, indices), and the returned scores (M, C) fp32 are the result's size and are
    counted apart.
    """

    chunk_test: int
    chunk_train: int
    block_bytes: int
    state_bytes: int
    budget_bytes: int


def _block_bytes(m: int, n: int, dim: int, k: int, copy_bytes: int) -> int:
    """Bytes one (m, n) block allocates at once (an upper bound; see :class:`KnnPlan`)."""
    kk = min(k, n)
    # similarities; the test chunk's fp32 cast and normalised copy; the train chunk's normalised
    # copy and its copies before that (device copy, fp32 cast: copy_bytes per element); the
    # chunk's top-k, its merge candidates and the merged top-k (fp32 values + int64 indices).
    return 4 * m * n + 8 * m * dim + (4 + copy_bytes) * n * dim + 12 * m * (2 * kk + 2 * k)


def knn_plan(num_test: int, num_train: int, dim: int, k: int, budget_bytes: int, chunk_test: int | None = None,
             chunk_train: int | None = None, copy_bytes: int = 0) -> KnnPlan:
    """The largest blocks within ``budget_bytes`` (test chunk first up to 1024 rows, then as many train rows as fit).

    ``copy_bytes``: bytes per element of a train chunk's copies before it is normalised: its
    copy to the compute device (the bank's element size; 0 when the bank is there already)
    plus 4 for the fp32 cast of a bf16/fp16 bank. Explicit ``chunk_test`` / ``chunk_train`` are taken as given (a
    caller's choice, e.g. a test's), and ``block_bytes`` then says what they cost.
    """
    k = max(1, min(k, num_train))
    m = max(1, min(num_test, chunk_test or 1024))
    if chunk_train:
        n = max(1, min(num_train, chunk_train))
    else:
        # For n >= k a block costs fixed(m) + n * per_row(m) (_block_bytes with kk = k); fewer train
        # rows never cost more. Halve the test chunk until one train row fits beside it.
        def fixed(m):
            return 8 * m * dim + 48 * m * k

        def per_row(m):
            return 4 * m + (4 + copy_bytes) * dim

        while m > 1 and fixed(m) + per_row(m) > budget_bytes:
            m //= 2
        if fixed(m) + per_row(m) > budget_bytes:
            raise ValueError(f"kNN memory budget of {budget_bytes} bytes is below one block's minimum for "
                             f"F={dim}, k={k}: give budget_bytes of at least {fixed(1) + per_row(1)}")
        n = max(1, min(num_train, (budget_bytes - fixed(m)) // per_row(m)))
    return KnnPlan(m, n, _block_bytes(m, n, dim, k, copy_bytes), 12 * num_test * k, int(budget_bytes))


def labelled_rows(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feats, labels)`` without the rows whose label is below 0 (unlabelled: STL-10's unlabeled split, a flat folder).

    One host sync (whether any row is unlabelled), at evaluation time only; a fully labelled
    bank is returned as it is (no copy). Mirrors solo-learn's online kNN, which keeps only
    ``targets != -1`` (solo/methods/base.py, ``training_step``).
    """
    keep = labels >= 0
    if bool(keep.all()):
        return feats, labels
    keep = keep.to(feats.device)
    return feats[keep], labels.to(feats.device)[keep]


@torch.no_grad()
def knn_scores(train_feats, train_labels, test_feats, num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk: int | None = None, *, chunk_train: int | None = None, budget_bytes: int | None = None,
               device=None, stats: dict | None = None) -> torch.Tensor:
    """Weighted kNN class scores (DINO / InstDisc, section 3.7.1): cosine similarity, votes exp(sim / T).

    train_feats (N, F), train_labels (N,), test_feats (M, F) -> scores (M, C) float32, on the
    compute device: ``device``, else the test features' device when it is a GPU, else the train
    features'. The train bank is read once, in chunks of ``chunk_train`` rows (moved to the
    compute device chunk by chunk when it lives elsewhere); each chunk meets every test chunk
    of ``chunk`` rows in one (m, n) similarity block whose top-k is merged into a running top-k
    (M, k). Peak extra memory is one block, ``knn_plan(...).block_bytes`` <= ``budget_bytes``
    (default ``KNN_BUDGET_BYTES`` of the compute device's type), plus the running top-k.

    The scores equal the dense computation's (all M x N similarities, top-k per row) up to
    the order of tied similarities: the merged top-k is sorted like a dense one, and votes add
    in that order. ``stats``: a dict to receive the plan and what the blocks allocated
    (``max_block_elems``: largest similarity block; ``train_chunks``: chunks of the bank read).
    """
    dev = torch.device(device) if device is not None else (
        test_feats.device if test_feats.device.type == "cuda" else train_feats.device)
    train_feats, train_labels = labelled_rows(train_feats, train_labels)
    n_test, dim = test_feats.shape
    n_train = train_feats.shape[0]
    if n_train == 0:
        raise ValueError("kNN needs a non-empty train feature bank (0 labelled train features were given; "
                         "labels below 0 mark unlabelled images)")
    k = min(k, n_train)
    budget = int(budget_bytes if budget_bytes is not None else KNN_BUDGET_BYTES.get(dev.type, KNN_BUDGET_BYTES["cpu"]))
    copy = (train_feats.element_size() if train_feats.device != dev else 0) + (
        4 if train_feats.dtype != torch.float32 else 0)
    plan = knn_plan(n_test, n_train, dim, k, budget, chunk, chunk_train, copy)
    m_c, n_c = plan.chunk_test, plan.chunk_train
    best_w = torch.full((n_test, k), float("-inf"), device=dev)                # running top-k similarities (M, k)
    best_i = torch.zeros((n_test, k), dtype=torch.int64, device=dev)          # their train rows (M, k)
    max_elems = chunks = 0
    tr = te = None
    for s in range(0, n_train, n_c):
        del tr  # the previous chunk goes before the next is made: one (n, F) chunk alive at a time
        tr = F.normalize(train_feats[s:s + n_c].to(dev, non_blocking=True).float(), dim=1)   # (n, F)
        chunks += 1
        for q in range(0, n_test, m_c):
            del te
            te = F.normalize(test_feats[q:q + m_c].to(dev).float(), dim=1)     # (m, F)
            sim = te @ tr.T                                                    # (m, n)
            max_elems = max(max_elems, sim.numel())
            w, i = sim.topk(min(k, sim.shape[1]), dim=1)                       # (m, kk)
            del sim
            cand_w = torch.cat([best_w[q:q + m_c], w], 1)                      # (m, k + kk)
            cand_i = torch.cat([best_i[q:q + m_c], i + s], 1)
            top_w, pos = cand_w.topk(k, dim=1)                                 # (m, k), sorted descending
            best_w[q:q + m_c] = top_w
            best_i[q:q + m_c] = cand_i.gather(1, pos)
    del tr, te
    votes = torch.zeros(n_test, num_classes, device=dev)
    votes.scatter_add_(1, train_labels.to(dev)[best_i].long(), (best_w / temperature).exp())
    if stats is not None:
        stats.update(chunk_test=m_c, chunk_train=n_c, block_bytes=plan.block_bytes, state_bytes=plan.state_bytes,
                     budget_bytes=budget, max_block_elems=max_elems, max_block_bytes=4 * max_elems,
                     train_chunks=chunks, device=str(dev))
    return votes


def knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
             temperature: float = 0.07, **kw) -> float:
    """kNN top-1 accuracy in percent (``kw``: :func:`knn_scores`'s chunking, budget, device, stats).

    Rows labelled below 0 (unlabelled) are left out on both sides: the bank votes with its
    labelled rows only, and the accuracy is over the labelled test rows.
    """
    test_feats, test_labels = labelled_rows(test_feats, test_labels)
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature, **kw)
    return 100.0 * (scores.argmax(1) == test_labels.to(scores.device)).float().mean().item()


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023; section 3.7.2): exp of the entropy of the normalised singular values."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


class OnlineLinearProbe(nn.Module):
    """A linear head on *detached* features, trained by its own optimizer at every training step.

    ``step(feats, labels) -> (loss, correct, labelled)`` as device tensors (no host sync): the
    trainer sums ``correct`` and ``labelled`` and reads them when it logs. Its gradients never
    reach the backbone. Rows labelled below 0 (unlabelled images, e.g. STL-10's unlabeled split)
    are masked out of the loss and of both counts, so the accuracy is over labelled rows only; a
    batch without any labelled row gives a zero loss (no NaN). solo-learn's online classifier
    does the same with ``cross_entropy(..., ignore_index=-1)`` (solo/methods/base.py).
    """

    def __init__(self, feat_dim: int, num_classes: int, lr: float = 0.1):
        super().__init__()
        self.norm = nn.BatchNorm1d(feat_dim, affine=False)
        self.head = nn.Linear(feat_dim, num_classes)
        self.opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(feats))

    def step(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Masks, not boolean indexing: selecting the labelled rows would need their count on the host.
        valid = labels >= 0
        labelled = valid.sum()
        with torch.enable_grad(), torch.autocast(feats.device.type, enabled=False):
            logits = self(feats.detach().float())
            per_row = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            loss = (per_row * valid).sum() / labelled.clamp(min=1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return loss.detach(), ((logits.detach().argmax(1) == labels) & valid).sum(), labelled

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
