"""Fused contrastive cross-entropy: Triton kernel (interpreter) and chunked torch path vs the naive reference.

Chain: naive full-matrix reference in fp64 (the truth) -> the same reference in the test dtype
(the low-precision baseline) -> chunked torch and Triton. flash-attention's rule:
err(impl) <= 2 * err(low-precision reference) + floor, for outputs and both gradients.

Each case runs on the CPU (Triton's interpreter) and, marked ``cuda``, on a GPU
(``scripts/gpu_check.sh`` runs ``pytest -m cuda`` with ``TRITON_INTERPRET=0``). Under the
interpreter the kernels take their fp32 ``tl.dot`` branch for bf16 inputs too (the interpreter's
bf16 arithmetic is wrong), so the bf16 ``tl.dot`` branches run only in the ``cuda`` cases.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton creates any jit function

import pytest
import torch

pytest.importorskip("triton")
from fastssl.kernels import contrastive as K  # noqa: E402


def _layout(kind, n, q, device="cpu"):
    """(M, K, pos, self_idx) for an NT-Xent batch of n pairs, or InfoNCE with n keys + q queue rows."""
    i = torch.arange(n, device=device)
    if kind == "ntxent":
        return 2 * n, 2 * n, torch.cat([i + n, i]), torch.cat([i, i + n])
    return n, n + q, i, torch.full_like(i, -1)


def _run(fn, a, c, pos, slf, scale, excl, w1, w2):
    a = a.clone().requires_grad_()
    c = c.clone().requires_grad_()
    loss, lse = fn(a, c, pos, slf, scale, excl)
    ((loss * w1).sum() + (lse * w2).sum()).backward()
    return [x.double().cpu() for x in (loss.detach(), lse.detach(), a.grad, c.grad)]


CASES = [  # kind, n, q, D, temperature, exclude_pos, dtype, floor
    ("ntxent", 2, 0, 8, 0.1, False, torch.float32, 1e-5),
    ("ntxent", 37, 0, 24, 0.07, False, torch.float32, 1e-5),
    ("ntxent", 37, 0, 24, 0.5, True, torch.float32, 1e-5),
    ("ntxent", 70, 0, 200, 0.2, False, torch.float32, 1e-5),     # D > BLOCK_D: the D loop, 3 row blocks
    ("ntxent", 45, 0, 128, 0.1, True, torch.bfloat16, 1e-3),
    ("ntxent", 3, 0, 17, 1.0, False, torch.bfloat16, 1e-3),
    ("infonce", 33, 50, 40, 0.2, False, torch.float32, 1e-5),    # keys + queue, no self column
    ("infonce", 20, 0, 64, 0.2, False, torch.bfloat16, 1e-3),
    ("ntxent", 10, 0, 2048, 0.1, False, torch.float32, 1e-5),    # wide D
]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,n,q,D,temp,excl,dtype,floor", CASES)
def test_kernel_and_chunked_match_reference(kind, n, q, D, temp, excl, dtype, floor, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(n * 1000 + D)
    M, Kc, pos, slf = _layout(kind, n, q, device)
    a64 = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    if kind == "ntxent":
        c64 = a64.clone()
    else:
        c64 = torch.nn.functional.normalize(torch.randn(Kc, D, generator=g, dtype=torch.float64), dim=1)
        c64[:n] = torch.nn.functional.normalize(a64 + 0.5 * c64[:n], dim=1)   # positives correlated
    a64, c64 = a64.to(device), c64.to(device)
    a, c = a64.to(dtype), c64.to(dtype)
    w1, w2 = torch.rand(M, generator=g).to(device), torch.rand(M, generator=g).to(device)  # upstream grads
    truth = _run(K.contrastive_ce_ref, a.double(), c.double(), pos, slf, 1 / temp, excl, w1.double(), w2.double())
    low = _run(K.contrastive_ce_ref, a, c, pos, slf, 1 / temp, excl, w1, w2)
    chunked = _run(lambda *x: K.contrastive_ce_chunked(*x, chunk=7), a, c, pos, slf, 1 / temp, excl, w1, w2)
    fused = _run(K.contrastive_ce, a, c, pos, slf, 1 / temp, excl, w1, w2)
    for name, t, lo, ch, fu in zip(["loss", "lse", "d_anchors", "d_cols"], truth, low, chunked, fused):
        bound = 2 * (lo - t).abs().max().item() + floor * max(1.0, t.abs().max().item())
        assert (ch - t).abs().max().item() <= bound, (name, "chunked", (ch - t).abs().max().item(), bound)
        assert (fu - t).abs().max().item() <= bound, (name, "triton", (fu - t).abs().max().item(), bound)


def test_reference_is_cross_entropy():
    """The reference is plain cross-entropy over the kept columns (checked against F.cross_entropy)."""
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    pos = torch.tensor([0, 3, 2, 8, 4, 1])
    loss, _ = K.contrastive_ce_ref(a, c, pos, torch.full_like(pos, -1), 5.0)
    ce = torch.nn.functional.cross_entropy(a @ c.T * 5.0, pos, reduction="none")
    torch.testing.assert_close(loss, ce.float() if loss.dtype == torch.float32 else ce)


def test_kernel_rejects_bad_shapes():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="share D"):
        K.contrastive_ce(a, torch.randn(4, 7), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="pos and self_idx"):
        K.contrastive_ce(a, a, torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 1.0)
