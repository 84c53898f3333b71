"""Cross-covariance Frobenius norms for VICReg / Barlow Twins through the Gram identity.

The covariance family (cookbook section 2.4) needs ``||A'^T B'||_F^2`` where
``A' = (a - mu_a) * s_a`` and ``B' = (b - mu_b) * s_b`` are the centred (VICReg) or
standardised (Barlow Twins) embeddings, (N, D), and mu, s are per-dimension (D,) vectors.
The D x D matrix costs O(N D^2); the identity

    ||A'^T B'||_F^2 = trace(A'^T B' B'^T A') = sum_ij (A' A'^T)_ij (B' B'^T)_ij

costs O(N^2 D), which wins whenever N < D (e.g. N = 256, D = 8192: 32x fewer flops).
Off-diagonal sums are the full norm minus the diagonal, and the diagonal of A'^T B' is a
per-dimension O(N D) reduction, so nothing D x D is ever built on the Gram path.

Implementations, one signature ``(a, mu_a, s_a, b=None, mu_b=None, s_b=None) -> fp32 scalar``
(``b=None``: b is a, i.e. ``||A'^T A'||_F^2 = ||A' A'^T||_F^2``, one Gram instead of two):

* ``cross_frob_ref``   the D x D path, ``((A'^T B')**2).sum()`` (the official code's cost);
* ``cross_frob_gram``  torch Gram path;
* ``cross_frob``       Triton forward (custom op ``fastssl::cross_frob``): each program computes
                       one upper-triangular (i, j) tile pair of both Gram matrices with the
                       centring / scaling fused into the tile loads, multiplies them and reduces
                       to one partial sum; no N x N buffer. The backward is two cuBLAS matmuls,
                       ``dF/dA' = 2 (B' B'^T) A'`` (N x N, at most N x D memory on this path).
"""
from __future__ import annotations

import os

import torch

from fastssl.kernels import autocast_off

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _std(x, mu, s):
    """(x - mu) * s in fp32, (N, D)."""
    return (x.float() - mu) * s


def _check(a, mu_a, s_a, b, mu_b, s_b):
    if a.dim() != 2:
        raise ValueError(f"cross_frob: a must be (N, D), got {tuple(a.shape)}")
    n, d = a.shape
    for name, v in (("mu_a", mu_a), ("s_a", s_a), ("mu_b", mu_b), ("s_b", s_b)):
        if v is not None and v.shape != (d,):
            raise ValueError(f"cross_frob: {name} must be (D,) = ({d},), got {tuple(v.shape)}")
    if b is not None and (b.shape != a.shape or mu_b is None or s_b is None):
        raise ValueError(f"cross_frob: b must match a's shape {tuple(a.shape)} and come with mu_b, s_b")


def cross_frob_ref(a, mu_a, s_a, b=None, mu_b=None, s_b=None):
    """D x D reference: ``||A'^T B'||_F^2`` through the (D, D) matrix, O(N D^2), fp32."""
    _check(a, mu_a, s_a, b, mu_b, s_b)
    ap = _std(a, mu_a, s_a)
    bp = ap if b is None else _std(b, mu_b, s_b)
    with autocast_off(ap):
        return (ap.T @ bp).pow(2).sum()


class _GramFrob(torch.autograd.Function):
    """sum((A' A'^T) * (B' B'^T)) keeping the two (N, N) Grams: the backward is one matmul per branch,
    dF/dA' = 2 (B' B'^T) A' (autograd through the product would spend two)."""

    @staticmethod
    def forward(ctx, ap, bp):
        with autocast_off(ap):                                              # fp32 Grams, as the backward uses them
            ga = ap @ ap.T                                                  # (N, N)
            if bp is None:
                ctx.save_for_backward(ap, ga)
                return ga.pow(2).sum()
            gb = bp @ bp.T
            ctx.save_for_backward(ap, bp, ga, gb)
            return (ga * gb).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with autocast_off(grad):
            if len(ctx.saved_tensors) == 2:
                ap, ga = ctx.saved_tensors
                return (4.0 * grad) * (ga @ ap), None
            ap, bp, ga, gb = ctx.saved_tensors
            return (2.0 * grad) * (gb @ ap), (2.0 * grad) * (ga @ bp)


def cross_frob_gram(a, mu_a, s_a, b=None, mu_b=None, s_b=None):
    """Torch Gram path: ``sum((A' A'^T) * (B' B'^T))``, O(N^2 D), fp32."""
    _check(a, mu_a, s_a, b, mu_b, s_b)
    return _GramFrob.apply(_std(a, mu_a, s_a), None if b is None else _std(b, mu_b, s_b))


if triton is not None:

    @triton.jit
    def _load_std(X, MU, S, rows, rmask, d, N, D, stride):
        dmask = d < D
        x = tl.load(X + rows[:, None] * stride + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        mu = tl.load(MU + d, mask=dmask, other=0.0)
        s = tl.load(S + d, mask=dmask, other=0.0)
        # padded rows must stay 0 after centring
        return tl.where(rmask[:, None], (x.to(tl.float32) - mu[None, :]) * s[None, :], 0.0)

    @triton.jit
    def _gram_dot(x, y, FP32_DOT: tl.constexpr, LOW: tl.constexpr):
        if FP32_DOT:
            return tl.dot(x, tl.trans(y), input_precision="ieee")
        else:
            return tl.dot(x.to(LOW), tl.trans(y.to(LOW)))

    @triton.jit
    def _cross_frob_kernel(A, MUA, SA, B, MUB, SB, PAIRS, PART, N, D, n_pairs, stride_a, stride_b,
                           SAME: tl.constexpr, FP32_DOT: tl.constexpr, LOW: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per upper-triangular tile pair (ti <= tj) of the N x N Gram matrices
        pid = tl.program_id(0).to(tl.int64)
        ti = tl.load(PAIRS + pid).to(tl.int64)
        tj = tl.load(PAIRS + n_pairs + pid).to(tl.int64)
        ri = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        rj = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        mi, mj = ri < N, rj < N
        ga = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        gb = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            ai = _load_std(A, MUA, SA, ri, mi, d, N, D, stride_a)
            aj = _load_std(A, MUA, SA, rj, mj, d, N, D, stride_a)
            ga += _gram_dot(ai, aj, FP32_DOT, LOW)
            if not SAME:
                bi = _load_std(B, MUB, SB, ri, mi, d, N, D, stride_b)
                bj = _load_std(B, MUB, SB, rj, mj, d, N, D, stride_b)
                gb += _gram_dot(bi, bj, FP32_DOT, LOW)
        if SAME:
            val = tl.sum(tl.sum(ga * ga, axis=1), axis=0)
        else:
            val = tl.sum(tl.sum(ga * gb, axis=1), axis=0)
        w = tl.where(ti == tj, 1.0, 2.0)                                   # Gram matrices are symmetric
        tl.store(PART + pid, val * w)


_LOW = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def cross_frob_forward(a, mu_a, s_a, b=None, mu_b=None, s_b=None):
    """Host side of the Triton forward: checks, contiguity, tile-pair list, launch, sum of partials."""
    _check(a, mu_a, s_a, b, mu_b, s_b)
    if triton is None:
        raise RuntimeError("impl='triton' needs triton: pip install triton (or use impl='torch')")
    same = b is None
    a = a.contiguous()
    b = a if same else b.contiguous()
    mu_a, s_a = mu_a.float().contiguous(), s_a.float().contiguous()
    mu_b, s_b = (mu_a, s_a) if same else (mu_b.float().contiguous(), s_b.float().contiguous())
    n, d = a.shape
    block_m = 64
    block_d = max(16, min(64, triton.next_power_of_2(d)))
    t = triton.cdiv(n, block_m)
    pairs = torch.triu_indices(t, t, device=a.device).to(torch.int32).contiguous()   # (2, P), no host sync
    n_pairs = pairs.shape[1]
    part = torch.empty(n_pairs, device=a.device, dtype=torch.float32)
    fp32_dot = a.dtype == torch.float32 or _interpreting()
    low = getattr(tl, _LOW[a.dtype]) if a.dtype in _LOW else tl.float32
    _cross_frob_kernel[(n_pairs,)](a, mu_a, s_a, b, mu_b, s_b, pairs, part, n, d, n_pairs, a.stride(0),
                                   b.stride(0), SAME=same, FP32_DOT=fp32_dot, LOW=low,
                                   BLOCK_M=block_m, BLOCK_D=block_d)
    return part.sum()


@torch.library.custom_op("fastssl::cross_frob", mutates_args=())
def _cross_frob_op(a: torch.Tensor, mu_a: torch.Tensor, s_a: torch.Tensor, b: torch.Tensor | None,
                   mu_b: torch.Tensor | None, s_b: torch.Tensor | None) -> torch.Tensor:
    return cross_frob_forward(a, mu_a, s_a, b, mu_b, s_b)


@_cross_frob_op.register_fake
def _(a, mu_a, s_a, b, mu_b, s_b):
    return a.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _std_grads(g_std, x, mu, s):
    """Chain dF/dX' (N, D) through X' = (x - mu) * s to (dx, dmu, ds)."""
    gx = g_std * s
    return gx.to(x.dtype), -gx.sum(0), (g_std * (x.float() - mu)).sum(0)


def _backward(ctx, grad):
    a, mu_a, s_a, b, mu_b, s_b = ctx.saved_tensors
    with autocast_off(a):
        ap = _std(a, mu_a, s_a)
        if b is None:
            g_ap = (4.0 * grad) * ((ap @ ap.T) @ ap)                        # d sum(G^2) / dA' = 4 G A'
            return (*_std_grads(g_ap, a, mu_a, s_a), None, None, None)
        bp = _std(b, mu_b, s_b)
        g_ap = (2.0 * grad) * ((bp @ bp.T) @ ap)                            # (N, N) @ (N, D)
        g_bp = (2.0 * grad) * ((ap @ ap.T) @ bp)
        return (*_std_grads(g_ap, a, mu_a, s_a), *_std_grads(g_bp, b, mu_b, s_b))


_cross_frob_op.register_autograd(_backward, setup_context=_setup_context)


def cross_frob(a, mu_a, s_a, b=None, mu_b=None, s_b=None):
    """Triton Gram path (custom op ``fastssl::cross_frob``); same signature as ``cross_frob_ref``."""
    return _cross_frob_op(a, mu_a, s_a, b, mu_b, s_b)
