"""SSL losses, functional API: contrastive (NT-Xent, DCL, InfoNCE), covariance (VICReg, Barlow Twins)
and self-distillation / clustering (BYOL's and SimSiam's cosine losses, DINO, SwAV with Sinkhorn).

Every contrastive and covariance loss ``f(...)`` returns a scalar and has an ``f_terms(...)`` twin
returning a dict of the named terms plus their weighted sum under ``"loss"`` (the trainer logs each
term). The self-distillation losses have one term each and return a scalar. Shared keyword
arguments of the contrastive and covariance losses:

* ``impl``: ``None`` (the faster path measured on an H200, see ``_impl``), ``"triton"``
  or ``"torch"``. Triton paths are the fused kernels in ``fastssl.kernels``; the torch paths
  run in bounded memory too (chunked rows / Gram identity).
* ``gather``: gather the embeddings with gradients across processes (cookbook section 3.8.1,
  Algorithm 1) so the loss sees the global batch. Default: when torch.distributed is
  initialised with world size > 1. Contrastive losses compute this rank's rows (anchors)
  against all gathered columns and average over the local anchors (``info_nce`` with a queue,
  MoCo v2, has no in-batch columns to gather); covariance losses compute
  the global loss on every rank. Either way the mean over ranks is the single-process loss on
  the full batch and, after DDP divides the summed gradients by the world size, so are the
  gradients. All ranks must hold the same number of rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastssl.distributed import gather_with_grad, is_distributed, rank, world_size

__all__ = ["nt_xent", "nt_xent_terms", "info_nce", "info_nce_terms", "vicreg", "vicreg_terms", "barlow_twins",
           "barlow_twins_terms", "byol_loss", "negative_cosine", "dino_loss", "swav_loss", "sinkhorn"]


# ------------------------------------------------------------------------------------------------
# dispatch and checks
# ------------------------------------------------------------------------------------------------
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _impl(impl, x: torch.Tensor, family: str = "contrastive") -> str:
    """The implementation a loss runs: ``impl`` if given, else the one measured faster on the GPU.

    H200, 2026-11-26 (BENCHMARKS.md, "Losses"): the fused contrastive kernel is 4.2x eager
    NT-Xent in bf16 but 0.42x in fp32 (its fp32 ``tl.dot`` is IEEE, no tensor cores), where the
    chunked torch path is 1.2x faster than the kernel; for the covariance losses the torch Gram path
    beat the Triton kernel in bf16 (Barlow 8.2 vs 9.0 ms, VICReg 7.7 vs 9.2 ms at 2048 x 8192) and by
    16x in fp32. So ``None`` picks Triton only for low-precision contrastive losses on CUDA, at the
    widths measured (D <= 256): the kernel's backward recomputes each logit tile once per 128 output
    columns of the gradient, 16 times over at D = 2048.
    """
    if impl is None:
        fast = family == "contrastive" and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] <= 256
        return "triton" if x.is_cuda and fast and _has_triton() else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be None, 'triton' or 'torch', got {impl!r}")
    if impl == "triton" and not _has_triton():
        raise RuntimeError("impl='triton' needs triton: pip install triton (or pass impl='torch')")
    return impl


def _gather(gather) -> bool:
    return world_size() > 1 if gather is None else bool(gather)


def _pair(name: str, a: torch.Tensor, b: torch.Tensor, min_rows: int = 1) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (N, D) embeddings of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}; flatten the projector output to (batch, dim)")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows per batch, got {a.shape[0]}")
    if not a.is_floating_point() or not b.is_floating_point():
        raise TypeError(f"{name}: embeddings must be floating point, got {a.dtype} and {b.dtype}")


def _normalize(z: torch.Tensor, impl: str) -> torch.Tensor:
    """L2 normalisation in fp32; the Triton path takes it back to the input dtype (tensor-core dot)."""
    zn = F.normalize(z.float(), dim=1)
    return zn.to(z.dtype) if impl == "triton" else zn


def _contrastive(anchors, cols, pos, self_idx, scale, exclude_pos, impl):
    from fastssl.kernels import contrastive as K

    fn = K.contrastive_ce if impl == "triton" else K.contrastive_ce_chunked
    return fn(anchors, cols, pos, self_idx, scale, exclude_pos)


def _cross_frob(a, mu_a, s_a, b, mu_b, s_b, impl: str, path: str):
    """||A'^T B'||_F^2 (b None: B' = A') by the Gram identity where N < D, the D x D product otherwise."""
    from fastssl.kernels import covariance as C

    n, d = a.shape
    if path == "auto":
        path = "gram" if n < d else "dxd"
    if path == "dxd":
        return C.cross_frob_ref(a, mu_a, s_a, b, mu_b, s_b)
    if path != "gram":
        raise ValueError(f"path must be 'auto', 'gram' or 'dxd', got {path!r}")
    fn = C.cross_frob if impl == "triton" else C.cross_frob_gram
    return fn(a, mu_a, s_a, b, mu_b, s_b)


# ------------------------------------------------------------------------------------------------
# contrastive family (cookbook section 2.2)
# ------------------------------------------------------------------------------------------------
def nt_xent_terms(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, decoupled: bool = False, *,
                  impl: str | None = None, gather: bool | None = None) -> dict[str, torch.Tensor]:
    """SimCLR's NT-Xent (cookbook section 2.2.1) over the 2N embeddings, as named terms.

    z1, z2: (N, D) projections of the two views (row i of each is the positive pair). Rows are
    L2-normalised in fp32; similarities are divided by ``temperature``; each of the 2N anchors
    sees the other 2N - 1 embeddings (self excluded), its positive among them; the loss is the
    mean over all 2N anchors. ``decoupled=True`` is DCL (Yeh et al. 2022): the positive is also
    removed from the denominator.

    Returns ``{"loss", "alignment", "uniformity"}``: alignment = mean over anchors of
    -sim(pos)/t, uniformity = mean log-sum-exp over the kept columns; loss = alignment + uniformity.
    """
    _pair("nt_xent", z1, z2)
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    impl = _impl(impl, z1)
    z1n, z2n = _normalize(z1, impl), _normalize(z2, impl)
    n = z1.shape[0]
    anchors = torch.cat([z1n, z2n])                                            # (2n, D): this rank's rows
    if _gather(gather):
        cols = torch.cat([gather_with_grad(z1n), gather_with_grad(z2n)])       # (2N, D): all ranks
        off = rank() * n
    else:
        cols, off = anchors, 0
    big_n = cols.shape[0] // 2
    i = torch.arange(n, device=z1.device) + off                                # global index of our rows
    self_idx = torch.cat([i, i + big_n])
    pos = torch.cat([i + big_n, i])
    loss_rows, lse = _contrastive(anchors, cols, pos, self_idx, 1.0 / temperature, decoupled, impl)
    loss = loss_rows.mean()
    uniformity = lse.mean()
    return {"loss": loss, "alignment": loss - uniformity, "uniformity": uniformity}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, decoupled: bool = False, *,
            impl: str | None = None, gather: bool | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent (DCL with ``decoupled=True``); see ``nt_xent_terms``. Returns a scalar."""
    return nt_xent_terms(z1, z2, temperature, decoupled, impl=impl, gather=gather)["loss"]


def info_nce_terms(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, *, queue: torch.Tensor | None = None,
                   batch_negatives: bool | None = None, impl: str | None = None,
                   gather: bool | None = None) -> dict[str, torch.Tensor]:
    """InfoNCE between queries and keys (cookbook section 2.2, "the infoNCE offsprings"), as named terms.

    q, k: (N, D) queries and keys; both L2-normalised in fp32. Query i's positive is key i.
    Which columns are its negatives depends on ``queue`` and ``batch_negatives``:

    * no queue (``batch_negatives`` None or True): the other keys of the (gathered) batch,
      as in MoCo v3 and NNCLR. The columns are the keys; the loss is the cross-entropy of
      ``q k^T / t`` with the diagonal as labels.
    * ``queue`` (Q, D) given, ``batch_negatives`` None or False: **MoCo v2** (He et al. 2020,
      Chen et al. 2020; facebookresearch/moco ``builder.py``, and lightly's NTXentLoss with a
      memory bank): the positive plus the queue only, ``logits = cat([q_i . k_i, q_i Queue^T]) / t``
      with label 0. The other in-batch keys are *not* negatives, so row i depends on q_i, k_i
      and the queue alone, and no gather is needed (MoCo gathers keys only to enqueue them,
      which is the method's job).
    * ``queue`` given and ``batch_negatives=True``: a variant, not MoCo v2: the other in-batch
      keys and the queue are both negatives (the columns are ``cat([keys, queue])``).

    ``batch_negatives=False`` without a queue leaves no negatives and is refused. The queue is
    used as given (MoCo holds it without gradient; pass it detached). This is the plain
    cross-entropy: MoCo v3 multiplies it by ``2 * temperature``, which the method applies.

    Returns ``{"loss", "alignment", "uniformity"}`` as in ``nt_xent_terms``: alignment = mean of
    -q_i.k_i/t, uniformity = mean log-sum-exp over the row's columns (positive included).
    """
    _pair("info_nce", q, k)
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    if queue is not None and (queue.dim() != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"info_nce: queue must be (Q, D) with D = {q.shape[1]}, got {tuple(queue.shape)}")
    if batch_negatives is False and queue is None:
        raise ValueError("info_nce: batch_negatives=False needs a queue (without one the positive is the only "
                         "column and there are no negatives)")
    impl = _impl(impl, q)
    scale = 1.0 / temperature
    qn, kn = _normalize(q, impl), _normalize(k, impl)
    n = q.shape[0]
    if queue is not None and not batch_negatives:
        return _info_nce_queue_only(qn, kn, _normalize(queue, impl).to(qn.dtype), scale, impl)
    if _gather(gather):
        kn, off = gather_with_grad(kn), rank() * n
    else:
        off = 0
    cols = kn if queue is None else torch.cat([kn, _normalize(queue, impl).to(kn.dtype)])
    pos = torch.arange(n, device=q.device) + off
    self_idx = torch.full_like(pos, -1)                                        # queries are not among the keys
    loss_rows, lse = _contrastive(qn, cols, pos, self_idx, scale, False, impl)
    loss = loss_rows.mean()
    uniformity = lse.mean()
    return {"loss": loss, "alignment": loss - uniformity, "uniformity": uniformity}


def _info_nce_queue_only(qn, kn, queue_n, scale: float, impl: str) -> dict[str, torch.Tensor]:
    """MoCo v2's InfoNCE on normalised rows: the row's own key plus the queue (see ``info_nce_terms``).

    The fused kernel takes one shared column set per call, so it cannot give each row its own
    positive *and* hide the other keys. Split instead: the kernel (or the chunked torch path)
    computes lse_queue_i = log sum_j exp(s q_i . queue_j) over the queue, the (Q, D) part that
    costs, in bounded memory, differentiably (d lse / d logit = softmax); the positive logit
    l_i = s q_i . k_i is one O(N D) dot. Then lse_i = logaddexp(l_i, lse_queue_i) is the
    log-sum-exp over MoCo v2's columns [k_i, queue] and loss_i = lse_i - l_i, exactly
    cross_entropy(cat([l_pos, l_neg]), 0).
    """
    n = qn.shape[0]
    l_pos = (qn.float() * kn.float()).sum(dim=1) * scale                      # (N,) fp32
    if queue_n.shape[0] == 0:                                                  # empty queue: only the positive
        lse_q = torch.full_like(l_pos, float("-inf"))
    else:
        any_col = torch.zeros(n, dtype=torch.long, device=qn.device)           # the kernel's loss output is unused
        no_self = torch.full_like(any_col, -1)
        _, lse_q = _contrastive(qn, queue_n, any_col, no_self, scale, False, impl)
    lse = torch.logaddexp(l_pos, lse_q)
    loss = (lse - l_pos).mean()
    uniformity = lse.mean()
    return {"loss": loss, "alignment": loss - uniformity, "uniformity": uniformity}


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, *, queue: torch.Tensor | None = None,
             batch_negatives: bool | None = None, impl: str | None = None,
             gather: bool | None = None) -> torch.Tensor:
    """InfoNCE: in-batch keys (MoCo v3) or, with a queue, MoCo v2's positive + queue; see ``info_nce_terms``.

    Returns a scalar.
    """
    return info_nce_terms(q, k, temperature, queue=queue, batch_negatives=batch_negatives, impl=impl,
                          gather=gather)["loss"]


# ------------------------------------------------------------------------------------------------
# covariance family (cookbook section 2.4)
# ------------------------------------------------------------------------------------------------
def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                 cov_coeff: float = 1.0, *, impl: str | None = None, gather: bool | None = None,
                 path: str = "auto") -> dict[str, torch.Tensor]:
    """VICReg (Bardes et al. 2022; cookbook section 2.4), the official definition, as named terms.

    invariance: MSE(z1, z2); variance: mean_k relu(1 - sqrt(var_k + 1e-4)) averaged over the two
    branches (unbiased var over the global batch); covariance: sum of squared off-diagonal
    entries of each branch's covariance (divided by N - 1), divided by D, summed over branches.
    The off-diagonal sum is ||cov||_F^2 - sum_k var_k^2, with ||cov||_F^2 from the Gram identity
    (``path="gram"``, O(N^2 D)) or the D x D matrix (``"dxd"``); ``"auto"`` picks Gram when N < D.
    Computed in fp32. Returns ``{"loss", "invariance", "variance", "covariance"}`` with
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance.
    """
    _pair("vicreg", z1, z2, min_rows=2)
    impl = _impl(impl, z1, "covariance")
    if _gather(gather):
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n, d = z1.shape
    x, y = z1.float(), z2.float()
    invariance = F.mse_loss(x, y)
    ones = torch.ones(d, device=x.device)
    variance = x.new_zeros(())
    covariance = x.new_zeros(())
    for z, zf in ((z1, x), (z2, y)):
        mu, var = zf.mean(0), zf.var(0)                                        # (D,), unbiased like the paper
        variance = variance + F.relu(1.0 - torch.sqrt(var + 1e-4)).mean() / 2
        frob = _cross_frob(z, mu, ones, None, None, None, impl, path) / (n - 1) ** 2   # ||cov||_F^2
        covariance = covariance + (frob - var.pow(2).sum()) / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
           cov_coeff: float = 1.0, *, impl: str | None = None, gather: bool | None = None,
           path: str = "auto") -> torch.Tensor:
    """VICReg loss; see ``vicreg_terms``. Returns a scalar."""
    return vicreg_terms(z1, z2, sim_coeff, std_coeff, cov_coeff, impl=impl, gather=gather, path=path)["loss"]


def barlow_twins_terms(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, *, impl: str | None = None,
                       gather: bool | None = None, path: str = "auto") -> dict[str, torch.Tensor]:
    """Barlow Twins (Zbontar et al. 2021; cookbook section 2.4), the official definition, as named terms.

    Each branch is standardised over the (global) batch like BatchNorm1d(affine=False) in
    training mode (biased variance, eps 1e-5); c = z1_hat^T z2_hat / N (D x D, never built on
    the Gram path). on_diagonal = sum_k (1 - c_kk)^2, off_diagonal = sum_{k != l} c_kl^2 =
    ||c||_F^2 - sum_k c_kk^2. Computed in fp32. Returns ``{"loss", "on_diagonal",
    "off_diagonal"}`` with loss = on_diagonal + lambd * off_diagonal.
    """
    _pair("barlow_twins", z1, z2, min_rows=2)
    impl = _impl(impl, z1, "covariance")
    if _gather(gather):
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n = z1.shape[0]
    x, y = z1.float(), z2.float()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = torch.rsqrt(x.var(0, unbiased=False) + 1e-5)                        # (D,)
    s2 = torch.rsqrt(y.var(0, unbiased=False) + 1e-5)
    c_diag = (((x - mu1) * s1) * ((y - mu2) * s2)).sum(0) / n                 # (D,): diag of c, O(N D)
    on_diagonal = (1.0 - c_diag).pow(2).sum()
    frob = _cross_frob(z1, mu1, s1, z2, mu2, s2, impl, path) / n ** 2        # ||c||_F^2
    off_diagonal = frob - c_diag.pow(2).sum()
    return {"loss": on_diagonal + lambd * off_diagonal, "on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, *, impl: str | None = None,
                 gather: bool | None = None, path: str = "auto") -> torch.Tensor:
    """Barlow Twins loss; see ``barlow_twins_terms``. Returns a scalar."""
    return barlow_twins_terms(z1, z2, lambd, impl=impl, gather=gather, path=path)["loss"]


# ------------------------------------------------------------------------------------------------
# self-distillation family (cookbook section 2.3) and SwAV's clustering (section 2.4.2)
# ------------------------------------------------------------------------------------------------
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): mean over rows of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z).

    p: (N, D) online predictions; z: (N, D) targets (the EMA teacher's projections of the other
    view), detached here (stop-gradient). fp32. Symmetrise by calling it for both directions.
    """
    _pair("byol_loss", p, z)
    return (2 - 2 * (F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1)).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) (Chen & He 2021, eq. 1): mean over rows of -cos(p_i, z_i), z detached (stop-gradient).

    p, z: (N, D); fp32. SimSiam's loss is 0.5 D(p1, z2) + 0.5 D(p2, z1).
    """
    _pair("negative_cosine", p, z)
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1).mean()


def _cross_view_ce(targets, logp, name: str) -> torch.Tensor:
    """Mean over (target view t, predicting view v != t) of mean_i -sum_k targets_t[i, k] logp_v[i, k]."""
    targets, logp = list(targets), list(logp)
    if not targets or len(logp) < 2:
        raise ValueError(f"{name}: needs at least one target view and two predicting views, got "
                         f"{len(targets)} and {len(logp)}")
    total, n = 0.0, 0
    for ti, q in enumerate(targets):
        for vi, lp in enumerate(logp):
            if vi == ti:
                continue                                                    # a view never predicts itself
            total = total + (-(q * lp).sum(dim=-1)).mean()
            n += 1
    return total / n


def dino_loss(teacher_probs, student_logp) -> torch.Tensor:
    """DINO's cross-entropy (Caron et al. 2021, eq. 3; cookbook section 2.3) over view pairs.

    teacher_probs: G tensors (B, K), the teacher's centred and sharpened softmax of the G global
    views, ``softmax((g_t - c) / tau_t)``; student_logp: V >= G tensors (B, K), the student's
    ``log_softmax(g_s / tau_s)`` of every view, globals first in the same order. Returns the mean
    over pairs (t, s), s != t, of mean_i H(P_t, P_s) = -sum_k P_t log P_s.
    """
    return _cross_view_ce(teacher_probs, student_logp, "dino_loss")


def swav_loss(codes, logp) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, eq. 1; cookbook section 2.4.2) over view pairs.

    codes: A tensors (B, K), the Sinkhorn codes of the first A views (:func:`sinkhorn`, no grad);
    logp: V tensors (B, K), ``log_softmax(scores / temperature)`` of every view against the
    prototypes. Returns the mean over (code view a, view v != a) of mean_i -sum_k q_a log p_v.
    """
    return _cross_view_ce(codes, logp, "swav_loss")


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp (Caron et al. 2020, Algorithm 1; cookbook section 2.4.2).

    scores: (B, K) prototype scores of this rank's rows. Returns codes Q (B, K): rows sum
    to 1, columns to B/K over the global batch (equipartition), from exp(scores / eps)
    with ``iters`` alternating normalisations, in fp32, summed across processes.
    """
    top = scores.float().max()
    if is_distributed():                                                    # one shift for all ranks' columns,
        dist.all_reduce(top, op=dist.ReduceOp.MAX)                          # else the summed marginals mix scales
    q = torch.exp((scores.float() - top) / eps).t()                         # (K, B); the shift cancels out
    b = torch.tensor(float(q.shape[1]), device=q.device)
    _all_reduce_sum(b)
    k = q.shape[0]
    total = _all_reduce_sum(q.sum())
    q = q / total
    for _ in range(iters):
        rows = _all_reduce_sum(q.sum(dim=1, keepdim=True))                 # (K, 1) prototype marginals
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / b                             # (1, B) sample marginals
    return (q * b).t()                                                      # (B, K), rows sum to 1
