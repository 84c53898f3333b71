"""Many-process helpers on plain ``torch.distributed`` (works under ``accelerate launch``).

``gather_with_grad`` is the cookbook's Algorithm 1 (section 3.8.1): an all_gather whose
backward all-reduces (sums) the incoming gradient and returns this rank's slice. With
it, every rank's loss is a function of the *global* batch, and the gradient each rank
gets on its own embeddings is ``world_size`` times the single-process gradient of the
global-mean loss; DDP's gradient averaging (divide by world size) then makes it exact.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gradients of all ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out, dim=0)                      # (world * n, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)       # every rank's loss depends on our rows
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) from every rank along dim 0 -> (world_size * n, ...), differentiably.

    Every rank must pass the same shape (all_gather's contract; use drop_last in the
    loader). The backward sums the gradient over ranks and returns this rank's rows
    (cookbook section 3.8.1, Algorithm 1). Identity when not distributed.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)

