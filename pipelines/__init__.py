"""Data back-ends (ffcv, dali, torch) behind one contract.

``build_loader(cfg, split, device, rank=0, world_size=1) -> Loader`` where a
Loader is iterable over :class:`Batch`, has ``len()`` (batches per epoch) and
``set_epoch(epoch)`` (shuffle seed and, for progressive resolution, the epoch's
global-view size). Views are normalised float tensors on ``device``
(channels_last, bf16 on CUDA), one tensor per view: global views first, then
local ones. Methods never know which back-end fed them.

Bad data (a missing, truncated or corrupt file, a ``.beton`` of another layout) raises
:class:`DataError`: one line naming the file and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A data file the loaders cannot use; the message is one line naming the file and the fix."""


class MissingDataError(DataError, FileNotFoundError):
    """A data path that does not exist (a :class:`DataError` and a ``FileNotFoundError``)."""


@dataclass
class Batch:
    views: list[torch.Tensor]          # V x (B, 3, S_v, S_v), normalised, on the device
    labels: torch.Tensor | None        # (B,) int64 or None for unlabelled data
    indices: torch.Tensor              # (B,) int64 dataset indices (for sharding checks, NNCLR, ...)


__all__ = ["Batch", "DataError", "MissingDataError"]
