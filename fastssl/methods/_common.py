"""Small helpers the method families share: EMA teachers, schedules, backbones, queues, multi-crop.

Everything that advances during training (EMA weights, centres, queues) is
updated once per optimizer step, from the method's ``after_step(step)``: a
forward only *records* what it saw (``pending`` tensors), so k micro-batches of
B images advance the state exactly as one step of k*B images would.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastssl.distributed import is_distributed
from fastssl.schedules import cosine


# ----------------------------------------------------------------------------- teachers and schedules


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy: requires_grad False, so it is in no optimizer group and DDP ignores it.

    It is a submodule, so it is checkpointed once under its own prefix (``teacher.*``).
    The teacher sees every token and no stochastic depth (DINO's teacher is built without
    drop-path); BatchNorm stays in training mode (BYOL's target uses batch statistics).
    """
    t = copy.deepcopy(_orig(student))
    for p in t.parameters():
        p.requires_grad_(False)
    for m in t.modules():
        if hasattr(m, "drop_prob"):          # timm DropPath
            m.drop_prob = 0.0
        if hasattr(m, "patch_drop"):         # our ViT's token dropping
            m.patch_drop = 0.0
    return t


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student (parameters); buffers (BN statistics) are copied.

    Under ``train.strategy=fsdp`` both are sharded alike (DTensors): the update runs on each
    process's local shards, with no communication.
    """
    tp = [_local(p) for p in teacher.parameters()]
    sp = [_local(p.detach()) for p in _orig(student).parameters()]
    if len(tp) != len(sp) or any(a.shape != b.shape for a, b in zip(tp, sp)):
        raise RuntimeError("EMA teacher and student have different parameter lists (or shards)")
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, sp, alpha=1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), _orig(student).buffers()):
        tb.copy_(sb)


def _local(p: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates reach the parameter); other tensors as they are."""
    return p.to_local() if hasattr(p, "to_local") else p


def make_teachers(**students: nn.Module) -> nn.ModuleDict:
    """``teacher[name]`` = a frozen copy of each named student module (``method.<name>``)."""
    return nn.ModuleDict({name: make_teacher(m) for name, m in students.items()})


@torch.no_grad()
def ema_update_teachers(teachers: nn.ModuleDict, owner: nn.Module, momentum: float) -> None:
    """:func:`ema_update` of every ``teachers[name]`` towards ``owner.<name>``."""
    for name, t in teachers.items():
        ema_update(t, getattr(owner, name), momentum)


def at_step(schedule: np.ndarray, step: int) -> float:
    """A precomputed per-step schedule's value at ``step`` (held at its last value after the end)."""
    return float(schedule[min(step, len(schedule) - 1)])


def _orig(m: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper (the trainer compiles ``method.backbone``)."""
    return getattr(m, "_orig_mod", m)


def momentum_schedule(base: float, total_steps: int | None, final: float = 1.0) -> np.ndarray:
    """BYOL's EMA momentum: 1 - (1 - base) (cos(pi k / K) + 1) / 2, i.e. a cosine from ``base`` to 1 (section 2.3).

    ``total_steps`` None (a method built without knowing the run's length): ``base`` at every step.
    """
    if total_steps is None:
        return np.array([base])
    return cosine(base, final, total_steps)


def steps_per_epoch(cfg, total_steps: int) -> float:
    """Optimizer steps per epoch (the trainer's schedules span ``train.epochs``)."""
    return max(total_steps / max(cfg.train.epochs, 1), 1.0)


def epochs_to_steps(epochs: float, steps_per_epoch: float | None) -> int:
    """A duration counted in epochs, in optimizer steps; 0 when ``steps_per_epoch`` is unknown (None)."""
    return 0 if steps_per_epoch is None else int(round(epochs * steps_per_epoch))


def resolve_backbone(backbone: str | nn.Module, feat_dim: int | None = None) -> tuple[nn.Module, int]:
    """(module, F) from a backbone name (fastssl's or timm's) or a module mapping (B, 3, H, W) -> (B, F).

    A module's F is ``feat_dim``, else its ``num_features`` (timm) or ``feat_dim`` attribute.
    """
    if isinstance(backbone, str):
        from fastssl import create_backbone

        return create_backbone(backbone)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
    dim = feat_dim if feat_dim is not None else getattr(backbone, "num_features", getattr(backbone, "feat_dim", None))
    if not isinstance(dim, int):
        raise ValueError(f"backbone {type(backbone).__name__} has no num_features attribute: pass feat_dim= "
                         f"(the width of its (B, F) output)")
    return backbone, dim


# ----------------------------------------------------------------------------- distributed (no grad)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world * n, ...) everywhere; identity in one process (queues)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


class FeatureQueue(nn.Module):
    """A FIFO of the last ``size`` rows (a support set / SwAV queue), in the state dict.

    ``stage(x)`` records rows during forward (no grad); ``commit()`` (from ``after_step``)
    gathers them over processes and enqueues them all at once, newest first.
    ``filled`` counts valid rows so lookups ignore the still-empty slots.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._pending: list[torch.Tensor] = []

    def stage(self, x: torch.Tensor) -> None:
        self._pending.append(x.detach().float())

    @torch.no_grad()
    def commit(self) -> None:
        if not self._pending:
            return
        x = all_gather_nograd(torch.cat(self._pending))                    # (n, D)
        self._pending.clear()
        size = self.rows.shape[0]
        x = x[-size:]                                                       # more rows than slots: keep the newest
        n = x.shape[0]
        idx = (self.ptr + torch.arange(n, device=x.device)) % size          # device-side pointer: no host sync
        self.rows.index_copy_(0, idx, x.to(self.rows.dtype))
        self.ptr.copy_((self.ptr + n) % size)
        self.filled.copy_(torch.clamp(self.filled + n, max=size))

    def filled_mask(self) -> torch.Tensor:
        """(size,) bool: slots holding a row (filled from slot 0 on, so the first ``filled``)."""
        return torch.arange(self.rows.shape[0], device=self.rows.device) < self.filled


# ----------------------------------------------------------------------------- multi-crop / multi-resolution


def resolution_groups(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive views with the same shape (DINO: globals, then locals)."""
    groups, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape != views[start].shape:
            groups.append((start, i))
            start = i
    return groups


def forward_by_resolution(fn, views: list[torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` once per resolution group on the concatenated views; returns (V*B, ...) in view order.

    One batch per resolution keeps the GPU busy and gives ``torch.compile`` one graph per
    distinct size (cookbook section 3.1.1 multi-crop).
    """
    return torch.cat([fn(torch.cat(views[a:b])) for a, b in resolution_groups(views)])


def per_view(fn, views, joint: bool = False) -> torch.Tensor:
    """``fn`` once per view, the outputs stacked: (2B, ...) for two views.

    ``views``: a list of (B, ...) tensors, or one (2B, ...) tensor holding two stacked views (a
    previous ``per_view``'s output). One call per view is what makes BatchNorm normalise each
    view's batch with its own statistics (the two-view methods' reference code calls the network
    once per view). ``joint`` (``method.joint_bn``): one call over all views: fewer, larger calls,
    but BN statistics shared by the two views of every image, a shortcut the loss can exploit
    (demo SimCLR: 39.2 joint -> 46.4 per view, kNN top-1).
    """
    if isinstance(views, torch.Tensor):
        if joint:
            return fn(views)
        views = views.chunk(2)
    elif joint:
        return fn(torch.cat(list(views)))
    return torch.cat([fn(v) for v in views])


def log_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A host number (a schedule's value) as a 0-dim fp32 log value on ``like``'s device: a fill there,
    no host-to-device copy. The trainer stacks every log value into one device vector at a log point."""
    return torch.full((), float(value), dtype=torch.float32, device=like.device)


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised rows: 0 when collapsed, about 1/sqrt(D) when spread."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
