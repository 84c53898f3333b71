"""Fused contrastive cross-entropy (NT-Xent / DCL / InfoNCE), flash-attention style.

One primitive serves the whole contrastive family (cookbook section 2.2):

    contrastive_ce(anchors (M, D), cols (K, D), pos (M,), self_idx (M,), scale, exclude_pos)
        -> (loss (M,) fp32, lse (M,) fp32)

    l_ij    = scale * <anchors_i, cols_j>                        (scale = 1 / temperature)
    lse_i   = log sum_{j not dropped} exp(l_ij)                  dropped: j == self_idx_i,
                                                                  and j == pos_i if exclude_pos (DCL)
    loss_i  = lse_i - l_{i, pos_i}

Inputs are expected L2-normalised already (``fastssl.losses`` does it in fp32). Three
implementations with one signature:

* ``contrastive_ce_ref``     naive: the whole (M, K) logit matrix, autograd (the reference);
* ``contrastive_ce_chunked`` torch, rows in chunks, recomputed in the backward: memory
                             O(chunk * K + (M + K) * D), never an M x K buffer (CPU path);
* ``contrastive_ce``         Triton (a ``torch.library`` custom op, so torch.compile traces it):
                             tile by tile with an online log-sum-exp, backward recomputes the
                             logits tile by tile; memory O((M + K) * D). bf16 or fp32 inputs,
                             fp32 accumulation, logits and log-sum-exp in fp32.

Both outputs are differentiable: ``d lse_i / d l_ij = p_ij``, so the backward takes a per-row
weight on the softmax (``dloss + dlse``) and one on the positive (``dloss``).
"""
from __future__ import annotations

import os

import torch

from fastssl.kernels import autocast_off

try:  # triton is optional for users; only the "triton" implementation needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(anchors, cols, pos, self_idx):
    if anchors.dim() != 2 or cols.dim() != 2 or anchors.shape[1] != cols.shape[1]:
        raise ValueError(f"contrastive_ce: anchors (M, D) and cols (K, D) must share D, got "
                         f"{tuple(anchors.shape)} and {tuple(cols.shape)}")
    if pos.shape != (anchors.shape[0],) or self_idx.shape != (anchors.shape[0],):
        raise ValueError(f"contrastive_ce: pos and self_idx must be (M,) = ({anchors.shape[0]},), got "
                         f"{tuple(pos.shape)} and {tuple(self_idx.shape)}")


# ---------------------------------------------------------------------------------------------
# Reference: the whole logit matrix (what every textbook implementation does).
# ---------------------------------------------------------------------------------------------
def contrastive_ce_ref(anchors, cols, pos, self_idx, scale: float, exclude_pos: bool = False):
    """Naive reference: (M, K) logits in memory, autograd. Matmul in the input dtype, then fp32."""
    _check(anchors, cols, pos, self_idx)
    with autocast_off(anchors):
        logits = (anchors @ cols.T).float() * scale                           # (M, K)
    j = torch.arange(cols.shape[0], device=cols.device)
    drop = j[None, :] == self_idx[:, None]
    if exclude_pos:
        drop = drop | (j[None, :] == pos[:, None])
    pos_logit = logits.gather(1, pos[:, None].long()).squeeze(1)
    lse = torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1)
    return lse - pos_logit, lse


# ---------------------------------------------------------------------------------------------
# Torch, chunked rows with recomputation: bounded memory on any device.
# ---------------------------------------------------------------------------------------------
def _chunk_logits(a, cols, pos, self_idx, scale, exclude_pos):
    """Logits of a chunk of rows (c, K) in fp32 with the dropped columns at -inf, and the positive logits (c,)."""
    logits = (a @ cols.T) * scale                                             # (c, K) fp32
    pos_logit = logits.gather(1, pos[:, None]).squeeze(1)
    j = torch.arange(cols.shape[0], device=cols.device)
    logits.masked_fill_(j[None, :] == self_idx[:, None], float("-inf"))
    if exclude_pos:
        logits.scatter_(1, pos[:, None], float("-inf"))
    return logits, pos_logit


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, cols, pos, self_idx, scale, exclude_pos, chunk):
        a32, c32 = anchors.float(), cols.float()                              # (M, D), (K, D)
        pos, self_idx = pos.long(), self_idx.long()
        loss = torch.empty(anchors.shape[0], device=anchors.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        with autocast_off(anchors):  # fp32 logits, as the backward recomputes them
            for s in range(0, anchors.shape[0], chunk):
                e = s + chunk
                logits, p = _chunk_logits(a32[s:e], c32, pos[s:e], self_idx[s:e], scale, exclude_pos)
                lse[s:e] = torch.logsumexp(logits, dim=1)
                loss[s:e] = lse[s:e] - p
                del logits
        ctx.save_for_backward(anchors, cols, pos, self_idx, lse)
        ctx.scale, ctx.exclude_pos, ctx.chunk = scale, exclude_pos, chunk
        return loss, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss, dlse):
        anchors, cols, pos, self_idx, lse = ctx.saved_tensors
        a32, c32 = anchors.float(), cols.float()
        dloss = torch.zeros_like(lse) if dloss is None else dloss.float()
        w_soft = dloss if dlse is None else dloss + dlse.float()              # weight on p_ij
        da = torch.empty_like(a32)
        dc = torch.zeros_like(c32)
        with autocast_off(anchors):
            for s in range(0, anchors.shape[0], ctx.chunk):
                e = s + ctx.chunk
                logits, _ = _chunk_logits(a32[s:e], c32, pos[s:e], self_idx[s:e], ctx.scale, ctx.exclude_pos)
                g = torch.exp_(logits.sub_(lse[s:e, None])).mul_(w_soft[s:e, None])   # (c, K): w * p_ij
                g.scatter_add_(1, pos[s:e, None], -dloss[s:e, None])              # - dloss_i at the positive
                da[s:e] = (g @ c32) * ctx.scale
                dc.addmm_(g.T, a32[s:e], alpha=ctx.scale)
                del logits, g
        return da.to(anchors.dtype), dc.to(cols.dtype), None, None, None, None, None


def contrastive_ce_chunked(anchors, cols, pos, self_idx, scale: float, exclude_pos: bool = False,
                           chunk: int | None = None):
    """Torch implementation in row chunks of ``chunk`` (default: ~16M logits per chunk), fp32 inside.

    Peak extra memory is a few (chunk, K) fp32 buffers plus fp32 copies of the inputs;
    the backward recomputes each chunk's logits instead of keeping them.
    """
    _check(anchors, cols, pos, self_idx)
    if chunk is None:
        chunk = max(1, (1 << 24) // max(1, cols.shape[0]))
    return _ChunkedCE.apply(anchors, cols, pos, self_idx, float(scale), bool(exclude_pos), int(chunk))


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _logits_tile(A, C, rows, cols, rmask, cmask, a0, D, stride_a, stride_c, scale,
                     ONE_D: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """(BLOCK_M, BLOCK_N) fp32 tile of scale * A[rows] @ C[cols]^T, looping over D in BLOCK_D chunks."""
        offs_d = tl.arange(0, BLOCK_D)
        if ONE_D:  # the anchor tile (a0) was loaded once outside the column loop
            ct = tl.load(C + cols[None, :] * stride_c + offs_d[:, None],
                         mask=cmask[None, :] & (offs_d[:, None] < D), other=0.0)
            if FP32_DOT:
                acc = tl.dot(a0.to(tl.float32), ct.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a0, ct)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                a = tl.load(A + rows[:, None] * stride_a + d[None, :],
                            mask=rmask[:, None] & (d[None, :] < D), other=0.0)
                ct = tl.load(C + cols[None, :] * stride_c + d[:, None],
                             mask=cmask[None, :] & (d[:, None] < D), other=0.0)
                if FP32_DOT:
                    acc += tl.dot(a.to(tl.float32), ct.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(a, ct)
        return acc * scale

    @triton.jit
    def _ce_fwd_kernel(A, C, POS, SELF, LOSS, LSE, M, K, D, stride_a, stride_c, scale,
                       EXCLUDE_POS: tl.constexpr, ONE_D: tl.constexpr, FP32_DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        pos = tl.load(POS + rows, mask=rmask, other=-1)
        slf = tl.load(SELF + rows, mask=rmask, other=-1)
        offs_d = tl.arange(0, BLOCK_D)
        a0 = tl.load(A + rows[:, None] * stride_a + offs_d[None, :],
                     mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)           # running max
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                          # running sum of exp(l - m)
        p_i = tl.zeros([BLOCK_M], dtype=tl.float32)                          # positive logit
        for n0 in range(0, K, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < K
            logits = _logits_tile(A, C, rows, cols, rmask, cmask, a0, D, stride_a, stride_c, scale,
                                  ONE_D, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
            is_pos = cols[None, :] == pos[:, None]
            p_i += tl.sum(tl.where(is_pos, logits, 0.0), axis=1)
            drop = (cols[None, :] == slf[:, None]) | (cmask[None, :] == 0)
            if EXCLUDE_POS:
                drop = drop | is_pos
            logits = tl.where(drop, float("-inf"), logits)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)            # a block with nothing kept
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        tl.store(LSE + rows, lse, mask=rmask)
        tl.store(LOSS + rows, lse - p_i, mask=rmask)

    @triton.jit
    def _ce_grad_tile(A, C, rows, cols, rmask, cmask, a0, pos, slf, lse, w_soft, w_pos, D, stride_a, stride_c,
                      scale, EXCLUDE_POS: tl.constexpr, ONE_D: tl.constexpr, FP32_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dLoss/dlogits for one tile: w_soft_i * p_ij - w_pos_i * [j == pos_i], p recomputed from lse."""
        logits = _logits_tile(A, C, rows, cols, rmask, cmask, a0, D, stride_a, stride_c, scale,
                              ONE_D, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
        is_pos = cols[None, :] == pos[:, None]
        drop = (cols[None, :] == slf[:, None]) | (cmask[None, :] == 0) | (rmask[:, None] == 0)
        if EXCLUDE_POS:
            drop = drop | is_pos
        p = tl.where(drop, 0.0, tl.exp(logits - lse[:, None]))
        return w_soft[:, None] * p - tl.where(is_pos & rmask[:, None], w_pos[:, None], 0.0)

    @triton.jit
    def _ce_bwd_da_kernel(A, C, POS, SELF, LSE, WSOFT, WPOS, DA, M, K, D, stride_a, stride_c, stride_da, scale,
                          EXCLUDE_POS: tl.constexpr, ONE_D: tl.constexpr, FP32_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr):
        # grid: (row blocks, output-D blocks); dA[rows, dblk] = scale * sum_j G_ij C[j, dblk]
        pid = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        pos = tl.load(POS + rows, mask=rmask, other=-1)
        slf = tl.load(SELF + rows, mask=rmask, other=-1)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        w_soft = tl.load(WSOFT + rows, mask=rmask, other=0.0)
        w_pos = tl.load(WPOS + rows, mask=rmask, other=0.0)
        offs_d = tl.arange(0, BLOCK_D)
        a0 = tl.load(A + rows[:, None] * stride_a + offs_d[None, :],
                     mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
        dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for n0 in range(0, K, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < K
            g = _ce_grad_tile(A, C, rows, cols, rmask, cmask, a0, pos, slf, lse, w_soft, w_pos, D,
                              stride_a, stride_c, scale, EXCLUDE_POS, ONE_D, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
            c = tl.load(C + cols[:, None] * stride_c + dout[None, :],
                        mask=cmask[:, None] & (dout[None, :] < D), other=0.0)
            if FP32_DOT:
                acc += tl.dot(g, c.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(g.to(c.dtype), c)
        tl.store(DA + rows[:, None] * stride_da + dout[None, :], acc * scale,
                 mask=rmask[:, None] & (dout[None, :] < D))

    @triton.jit
    def _ce_bwd_dc_kernel(A, C, POS, SELF, LSE, WSOFT, WPOS, DC, M, K, D, stride_a, stride_c, stride_dc, scale,
                          EXCLUDE_POS: tl.constexpr, FP32_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr):
        # grid: (column blocks, output-D blocks); dC[cols, dblk] = scale * sum_i G_ij A[i, dblk]
        pid = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < K
        dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rmask = rows < M
            pos = tl.load(POS + rows, mask=rmask, other=-1)
            slf = tl.load(SELF + rows, mask=rmask, other=-1)
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            w_soft = tl.load(WSOFT + rows, mask=rmask, other=0.0)
            w_pos = tl.load(WPOS + rows, mask=rmask, other=0.0)
            # columns are the loop-invariant side here, so always loop over D (ONE_D=False)
            g = _ce_grad_tile(A, C, rows, cols, rmask, cmask, rows, pos, slf, lse, w_soft, w_pos, D,
                              stride_a, stride_c, scale, EXCLUDE_POS, False, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
            a = tl.load(A + rows[:, None] * stride_a + dout[None, :],
                        mask=rmask[:, None] & (dout[None, :] < D), other=0.0)
            if FP32_DOT:
                acc += tl.dot(tl.trans(g), a.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(g.to(a.dtype)), a)
        tl.store(DC + cols[:, None] * stride_dc + dout[None, :], acc * scale,
                 mask=cmask[:, None] & (dout[None, :] < D))


def _blocks(D: int, dtype: torch.dtype):
    bd = max(16, min(128 if dtype != torch.float32 else 64, triton.next_power_of_2(D)))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=bd), bd >= D


def _prep(anchors, cols, pos, self_idx):
    _check(anchors, cols, pos, self_idx)
    if triton is None:
        raise RuntimeError("impl='triton' needs triton: pip install triton (or use impl='torch')")
    if anchors.dtype not in (torch.float32, torch.bfloat16, torch.float16) or cols.dtype != anchors.dtype:
        raise TypeError(f"contrastive_ce: anchors and cols must share a float dtype (fp32/bf16/fp16), got "
                        f"{anchors.dtype} and {cols.dtype}")
    return anchors.contiguous(), cols.contiguous(), pos.contiguous().long(), self_idx.contiguous().long()


def contrastive_ce_forward(anchors, cols, pos, self_idx, scale: float, exclude_pos: bool):
    """Host side of the Triton forward: checks, contiguity, block sizes, launch. Returns (loss, lse) fp32 (M,)."""
    a, c, pos, slf = _prep(anchors, cols, pos, self_idx)
    (M, D), K = a.shape, c.shape[0]
    loss = torch.empty(M, device=a.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    blk, one_d = _blocks(D, a.dtype)
    fp32_dot = a.dtype == torch.float32 or _interpreting()
    _ce_fwd_kernel[(triton.cdiv(M, blk["BLOCK_M"]),)](
        a, c, pos, slf, loss, lse, M, K, D, a.stride(0), c.stride(0), scale,
        EXCLUDE_POS=exclude_pos, ONE_D=one_d, FP32_DOT=fp32_dot, **blk)
    return loss, lse


def contrastive_ce_backward(w_soft, w_pos, anchors, cols, pos, self_idx, lse, scale: float, exclude_pos: bool):
    """Host side of the Triton backward: (dA, dC) in the input dtypes, logits recomputed tile by tile."""
    a, c, pos, slf = _prep(anchors, cols, pos, self_idx)
    (M, D), K = a.shape, c.shape[0]
    blk, one_d = _blocks(D, a.dtype)
    bdo = blk["BLOCK_D"]
    fp32_dot = a.dtype == torch.float32 or _interpreting()
    w_soft, w_pos, lse = w_soft.float().contiguous(), w_pos.float().contiguous(), lse.contiguous()
    da = torch.empty(M, D, device=a.device, dtype=torch.float32)
    dc = torch.empty(K, D, device=a.device, dtype=torch.float32)
    nd = triton.cdiv(D, bdo)
    _ce_bwd_da_kernel[(triton.cdiv(M, blk["BLOCK_M"]), nd)](
        a, c, pos, slf, lse, w_soft, w_pos, da, M, K, D, a.stride(0), c.stride(0), da.stride(0), scale,
        EXCLUDE_POS=exclude_pos, ONE_D=one_d, FP32_DOT=fp32_dot, BLOCK_DO=bdo, **blk)
    _ce_bwd_dc_kernel[(triton.cdiv(K, blk["BLOCK_N"]), nd)](
        a, c, pos, slf, lse, w_soft, w_pos, dc, M, K, D, a.stride(0), c.stride(0), dc.stride(0), scale,
        EXCLUDE_POS=exclude_pos, FP32_DOT=fp32_dot, BLOCK_DO=bdo, **blk)
    return da.to(anchors.dtype), dc.to(cols.dtype)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (fullgraph traces through), with autograd.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastssl::contrastive_ce", mutates_args=())
def _contrastive_ce_op(anchors: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, self_idx: torch.Tensor,
                       scale: float, exclude_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return contrastive_ce_forward(anchors, cols, pos, self_idx, scale, exclude_pos)


@_contrastive_ce_op.register_fake
def _(anchors, cols, pos, self_idx, scale, exclude_pos):
    m = anchors.shape[0]
    return anchors.new_empty(m, dtype=torch.float32), anchors.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("fastssl::contrastive_ce_backward", mutates_args=())
def _contrastive_ce_bwd_op(w_soft: torch.Tensor, w_pos: torch.Tensor, anchors: torch.Tensor, cols: torch.Tensor,
                           pos: torch.Tensor, self_idx: torch.Tensor, lse: torch.Tensor, scale: float,
                           exclude_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return contrastive_ce_backward(w_soft, w_pos, anchors, cols, pos, self_idx, lse, scale, exclude_pos)


@_contrastive_ce_bwd_op.register_fake
def _(w_soft, w_pos, anchors, cols, pos, self_idx, lse, scale, exclude_pos):
    return torch.empty_like(anchors), torch.empty_like(cols)


def _setup_context(ctx, inputs, output):
    anchors, cols, pos, self_idx, scale, exclude_pos = inputs
    ctx.save_for_backward(anchors, cols, pos, self_idx, output[1])
    ctx.scale, ctx.exclude_pos = scale, exclude_pos


def _backward(ctx, dloss, dlse):
    anchors, cols, pos, self_idx, lse = ctx.saved_tensors
    dloss = torch.zeros_like(lse) if dloss is None else dloss
    w_soft = dloss if dlse is None else dloss + dlse
    da, dc = _contrastive_ce_bwd_op(w_soft, dloss, anchors, cols, pos, self_idx, lse, ctx.scale, ctx.exclude_pos)
    return da, dc, None, None, None, None


_contrastive_ce_op.register_autograd(_backward, setup_context=_setup_context)


def contrastive_ce(anchors, cols, pos, self_idx, scale: float, exclude_pos: bool = False):
    """Triton implementation (custom op ``fastssl::contrastive_ce``); same signature as ``contrastive_ce_ref``."""
    return _contrastive_ce_op(anchors, cols, pos, self_idx, float(scale), bool(exclude_pos))
