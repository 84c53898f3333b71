"""CPU convolutions whose weight gradient is one GEMM where that beats oneDNN's (``train.cpu_conv_wgrad``).

On AVX2 CPUs oneDNN computes a convolution's weight gradient with its older direct kernel
(``jit:avx2 backward_weights``), at about half the speed of its forward (``brg_conv_fwd``): in a
ResNet-18 SimCLR step at 96 px on cpu2, 1.94 s of weight gradients against 1.36 s of forwards
(the same FLOPs). The weight gradient is a matrix product, ``dW = g^T @ cols`` with
``g`` (N*Ho*Wo, Cout) and ``cols`` (N*Ho*Wo, kh*kw*Cin) the patches of the input. In channels_last
memory both are views or one cheap copy, and MKL's GEMM runs near peak, so for the deep layers
(few pixels, many channels: the patches are small) the GEMM is faster: 512 channels at 3 x 3,
batch 128, 52 against 93 ms; 256 at 6 x 6, 67 against 92 ms. For the early layers the patches
are large (9x the input) and oneDNN wins (64 at 24 x 24: 178 against 94 ms).

The choice is made per shape by timing both, the first time the shape is seen (as
``cudnn.benchmark`` does), so a CPU whose oneDNN has a fast kernel (AVX-512, AMX) keeps it. The
GEMM must be 15% faster (:func:`choose`), so that noisy timings make the same choice run to run.
The input gradient, forward and bias stay oneDNN's. Only plain 2-D convolutions (groups 1,
dilation 1, fp32, channels_last input) take this path; anything else calls ``F.conv2d``.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CPU_CONV_WGRADS = ("auto", "onednn", "gemm")

# (x shape, w shape, stride, padding) -> "gemm" | "onednn", decided once per process.
_choice: dict[tuple, str] = {}


def wgrad_gemm(g: torch.Tensor, x: torch.Tensor, k: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int]) -> torch.Tensor:
    """Weight gradient (Cout, Cin, kh, kw) of ``conv2d(x, w, stride, padding)`` given its output gradient ``g``.

    ``x`` (N, Cin, H, W) and ``g`` (N, Cout, Ho, Wo), both channels_last. One GEMM over the
    (N*Ho*Wo) output pixels: ``g`` as (N*Ho*Wo, Cout) is a view; the patches (N, Ho, Wo, kh, kw, Cin)
    are a strided view of the padded input, copied once into a (N*Ho*Wo, kh*kw*Cin) matrix.
    """
    n, cin = x.shape[:2]
    cout, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    (kh, kw), (sh, sw), (ph, pw) = k, stride, padding
    xs = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).permute(0, 2, 3, 1)  # (N, Hp, Wp, Cin) view
    xs = xs.contiguous()  # no copy for channels_last (F.pad keeps the memory format)
    s_n, s_h, s_w, s_c = xs.stride()
    cols = xs.as_strided((n, ho, wo, kh, kw, cin), (s_n, s_h * sh, s_w * sw, s_h, s_w, s_c)).reshape(-1, kh * kw * cin)
    gm = g.permute(0, 2, 3, 1).reshape(-1, cout)  # (N*Ho*Wo, Cout): a view when g is channels_last
    return (gm.t() @ cols).view(cout, kh, kw, cin).permute(0, 3, 1, 2)


def _onednn_backward(g, x, w, stride, padding, need_x: bool, need_w: bool):
    """oneDNN's (input, weight) gradients of a plain convolution, each None where not asked for."""
    gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(padding), [1, 1], False,
                                                    [0, 0], 1, [need_x, need_w, False])
    return gx, gw


def _pick(key, g, x, w, stride, padding, rounds: int = 3, margin: float = 0.15) -> str:
    """Time both weight gradients on this shape and keep the GEMM only where it is clearly faster.

    After one warm call each (oneDNN's JIT, the first touch of the GEMM's patch matrix), the two are
    timed in turn ``rounds`` times, so a burst of other work (the loader filling its queue during the
    first step) hits both; the best of each is compared. The GEMM must beat oneDNN by ``margin``:
    near-ties then go the same way in every run. Without it, best-of-2 blocks picked differently run to
    run on cpu2 (ResNet-18, 96 px): 64 channels at 24 x 24 once went to the GEMM, about twice as slow
    there, a 13% slower step for the whole run (BENCHMARKS.md, issue 12, session 9).
    """
    fns = {"onednn": lambda: _onednn_backward(g, x, w, stride, padding, False, True),
           "gemm": lambda: wgrad_gemm(g, x, w.shape[2:], stride, padding)}
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    _choice[key] = choose(best, margin)
    return _choice[key]


def choose(seconds: dict, margin: float = 0.15) -> str:
    """``gemm`` when its time is below ``(1 - margin)`` of oneDNN's, else ``onednn`` (ties keep oneDNN's)."""
    return "gemm" if seconds["gemm"] < (1.0 - margin) * seconds["onednn"] else "onednn"


class _Conv2dGemmWgrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, mode):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, mode, b is not None)
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, mode, has_bias = ctx.conf
        g = g.contiguous(memory_format=torch.channels_last)
        key = (tuple(x.shape), tuple(w.shape), stride, padding)
        how = mode if mode != "auto" else (_choice.get(key) or _pick(key, g, x, w, stride, padding))
        need_x = ctx.needs_input_grad[0]
        if how == "gemm":
            gx = _onednn_backward(g, x, w, stride, padding, True, False)[0] if need_x else None
            gw = wgrad_gemm(g, x, w.shape[2:], stride, padding).contiguous(memory_format=torch.channels_last)
        else:
            gx, gw = _onednn_backward(g, x, w, stride, padding, need_x, True)
        gb = g.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


class GemmWgradConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose CPU backward takes the faster weight gradient per shape (same parameters and state dict)."""

    wgrad_mode = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
                 and isinstance(self.padding, tuple) and x.device.type == "cpu" and x.dtype == torch.float32
                 and self.weight.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
                 and torch.is_grad_enabled() and self.weight.requires_grad)
        if not plain:
            return super().forward(x)
        return _Conv2dGemmWgrad.apply(x, self.weight, self.bias, self.stride, self.padding, self.wgrad_mode)


def use_gemm_wgrad(model: nn.Module, mode: str = "auto") -> int:
    """Switch every plain ``nn.Conv2d`` of ``model`` to :class:`GemmWgradConv2d` in place; returns how many.

    ``mode``: ``auto`` (time both per shape), ``gemm`` (always the GEMM) or ``onednn`` (nothing changes).
    """
    if mode not in CPU_CONV_WGRADS:
        from fastssl.registry import closest

        raise ValueError(f"unknown train.cpu_conv_wgrad {mode!r}: {closest(mode, list(CPU_CONV_WGRADS))}")
    if mode == "onednn":
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros":
            m.__class__ = GemmWgradConv2d
            m.wgrad_mode = mode
            n += 1
    return n
