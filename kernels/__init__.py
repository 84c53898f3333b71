"""Triton kernels with their plain PyTorch references (installs as ``fastssl.kernels``).

Nothing here launches or compiles at import; ``triton`` is optional (imported inside each module
in a try block) and only the ``impl="triton"`` paths need it.
"""

import contextlib

import torch


def autocast_off(t: torch.Tensor):
    """A context with autocast disabled on ``t``'s device type.

    The losses' arithmetic follows the dtype of their inputs (fp32 after ``.float()``, or bf16 on
    the fused kernels' path), not the caller's autocast. Under CUDA autocast a matmul of fp32
    inputs runs in bf16. A custom ``autograd.Function`` then saves bf16 products that its backward,
    which runs without autocast, meets with fp32 tensors: a dtype error in a matmul, or a softmax
    recomputed in fp32 against a log-sum-exp taken from bf16 logits, which biases the gradient.
    """
    kind = t.device.type
    if not torch.amp.is_autocast_available(kind):  # the meta device (FLOP counts) has no autocast to turn off
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)
