"""FLOPs of a training step and the device's peak, for achieved TFLOP/s in ``fastssl-bench step``.

The count is ``torch.utils.flop_counter.FlopCounterMode`` over the method's forward and the
backward of its loss: matrix multiplies, convolutions and attention (the ops it has formulas for);
elementwise work, normalisation and the optimizer are not counted, so the fraction of peak is of
the tensor-core work, the convention of MFU figures. The count runs on the ``meta`` device first:
no memory and no compute, so the recipe's own batch is counted exactly (a contrastive loss's
``B x B`` similarity included). A method whose forward needs real values falls back to a few
images on the CPU, scaled linearly to the batch.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

FLOP_COUNT_SOURCE = "torch.utils.flop_counter, fwd+bwd, matmul/conv only"

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor's data sheets, matched as
# whole words of ``torch.cuda.get_device_name`` in this order (PCIe/NVL before the SXM part's name;
# "L4" does not match an L40, nor "A10" an A10G).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),   # SXM4 and PCIe alike
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The table's dense bf16 peak for a CUDA device name, or None (unknown device, or the CPU)."""
    if not device_name:
        return None
    import re

    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name, re.IGNORECASE):
            return tflops
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` dispatches (``FlopCounterMode``'s ops: matmul, conv, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _method_step_flops(cfg, total_steps: int, sizes: list[int], batch: int, device: torch.device) -> int:
    from fastssl.methods import create_method

    torch.manual_seed(cfg.train.seed)
    try:
        with torch.device(device):
            method = create_method(cfg, total_steps)
    except NotImplementedError:
        if device.type != "meta":
            raise
        # A constructor that reads values (e.g. a drop-path schedule's .tolist()): built on the CPU, then moved.
        method = create_method(cfg, total_steps).to(device)
    method.train()
    views = [torch.randn(batch, 3, s, s, device=device) for s in sizes]

    def fwd_bwd():
        out = method(views, 0)
        out["loss"].backward()

    return count_flops(fwd_bwd)


def step_flops(cfg, total_steps: int, batch: int, cpu_batch: int = 4) -> dict:
    """FLOPs of one optimizer step's forward + backward of ``cfg``'s method at ``batch`` images.

    A fresh, uncompiled copy of the method is built for the count (the benchmarked one keeps its
    state, its BatchNorm statistics and its compiled graphs). Returns ``flops_per_step``,
    ``flops_per_image``, ``flop_count_device`` (``meta`` or ``cpu``), ``flop_count_batch`` (the
    batch counted; on the CPU a few images, scaled to ``batch``) and ``flop_count`` (the source).
    """
    sizes = [v.size for v in cfg.aug.resolved_views()]
    try:
        total = _method_step_flops(cfg, total_steps, sizes, batch, torch.device("meta"))
        counted, where = batch, "meta"
    except Exception as e:  # noqa: BLE001 - any op without a meta kernel, or a read of values
        counted = max(2, min(batch, cpu_batch))
        logger.info("FLOP count on the meta device failed (%s: %s); counting %d images on the CPU",
                    type(e).__name__, e, counted)
        total = _method_step_flops(cfg, total_steps, sizes, counted, torch.device("cpu"))
        total = total * batch // counted
        where = "cpu"
    return {"flops_per_step": total, "flops_per_image": total / batch, "flop_count_device": where,
            "flop_count_batch": counted, "flop_count": FLOP_COUNT_SOURCE}
