"""CPU convolutions whose weight gradient takes the fastest of oneDNN's and two rewrites (``train.cpu_conv_wgrad``).

On AVX2 CPUs oneDNN computes a convolution's weight gradient with its older direct kernel
(``jit:avx2 backward_weights``), at about half the speed of its forward (``brg_conv_fwd``): in a
ResNet-18 SimCLR step at 96 px on cpu2, 1.94 s of weight gradients against 1.36 s of forwards
(the same FLOPs). Two rewrites of the same sum run on faster kernels for some shapes:

- ``gemm``: one matrix product, ``dW = g^T @ cols`` with ``g`` (N*Ho*Wo, Cout) and ``cols``
  (N*Ho*Wo, kh*kw*Cin) the patches of the input (a view, copied once, in channels_last memory).
  MKL's GEMM runs near peak, but the patches are kh*kw times the input: it wins where pixels are
  few, e.g. the strided and 1 x 1 convolutions of ResNet's layers 3-4 (256 -> 512 at 6 x 6, stride
  2: 21.5 against 42.9 ms), and loses on the early layers (64 at 24 x 24: 80.8 against 60.8 ms).
- ``conv`` / ``conv_nchw``: one *forward* convolution with the batch as its channels
  (:func:`wgrad_conv`), on oneDNN's fast forward kernel: 512 channels at 3 x 3, 28.9 against 40.0 ms
  (GEMM) and 70.7 ms (oneDNN); 256 at 6 x 6, 43.2 against 47.3 (GEMM) and 59.1 ms (oneDNN).

(batch 128, 2 threads, cpu2; ``benchmarks/results/cpu_wgrad_step_ab_s11.json``, where the ResNet-18
step ran 1.045x faster with all four than with oneDNN's and the GEMM.) The choice is made per
shape by timing all of them the first time the shape is seen (as ``cudnn.benchmark`` does), so a
CPU whose oneDNN has a fast kernel (AVX-512, AMX) keeps it. A rewrite must be 15% faster than
oneDNN (:func:`choose`). The choices are kept on disk per machine (CPU model, torch version,
threads; :func:`cache_path`), so every later run of that machine takes the same ones without
timing: run-to-run choices made from noisy timings had moved whole steps by 5-13% (BENCHMARKS.md,
"Step on the CPU"). The input gradient, forward and bias stay oneDNN's. Only plain 2-D
convolutions (groups 1, dilation 1, fp32, channels_last input) take this path; anything else calls
``F.conv2d``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ALTERNATIVES = ("gemm", "conv", "conv_nchw")  # the weight gradients timed against oneDNN's
CPU_CONV_WGRADS = ("auto", "onednn") + ALTERNATIVES

# (x shape, w shape, stride, padding) -> "onednn" or one of ALTERNATIVES; read from / written to cache_path().
_choice: dict[tuple, str] = {}
_disk: dict | None = None  # cache_path()'s entries, read once per process


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


def wgrad_conv(g: torch.Tensor, x: torch.Tensor, k: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], nchw: bool = False) -> torch.Tensor:
    """Weight gradient (Cout, Cin, kh, kw) as ONE forward convolution, the batch as its channels.

    ``dW[o, i, a, b] = sum_{n,y,x} g[n, o, y, x] * xpad[n, i, s*y + a, s*x + b]``: a convolution of
    ``x^T`` (Cin images of N channels) with ``g^T`` (Cout filters of N channels, Ho x Wo, dilated
    by the stride), output (Cin, Cout, >= kh, >= kw). oneDNN runs it on its forward kernel
    (``brg_conv_fwd`` on AVX2), about twice as fast as its own weight-gradient kernel for the deep
    layers (few pixels, many channels). ``nchw``: the transposed operands in contiguous rather than
    channels_last memory (oneDNN then picks another kernel; faster for some shapes).
    """
    fmt = torch.contiguous_format if nchw else torch.channels_last
    xt = x.transpose(0, 1).contiguous(memory_format=fmt)  # (Cin, N, H, W): one transposing copy
    gt = g.transpose(0, 1).contiguous(memory_format=fmt)  # (Cout, N, Ho, Wo)
    out = F.conv2d(xt, gt, padding=padding, dilation=stride)  # (Cin, Cout, kh + r, kw + r), r < stride
    return out[:, :, :k[0], :k[1]].transpose(0, 1)


def _onednn_backward(g, x, w, stride, padding, need_x: bool, need_w: bool):
    """oneDNN's (input, weight) gradients of a plain convolution, each None where not asked for."""
    gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(padding), [1, 1], False,
                                                    [0, 0], 1, [need_x, need_w, False])
    return gx, gw


def cache_path() -> Path:
    """The on-disk choices, in :func:`fastssl.cache.cache_dir` (default ``~/.cache/fastssl``).

    Delete the file to time every shape again (after a change of machine load or of libraries
    that the key does not name).
    """
    from fastssl.cache import cache_dir

    return cache_dir() / "cpu_conv_wgrad.json"


def _machine() -> str:
    """What the timings depend on beyond the shape: the CPU model, torch (its oneDNN and MKL) and the threads."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    cpu = model or platform.processor() or platform.machine()
    return f"{cpu}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def _disk_key(key) -> str:
    return f"{_machine()}|{json.dumps(key)}"


def _read_disk() -> dict:
    global _disk
    if _disk is None:
        try:
            _disk = json.loads(cache_path().read_text())
            if not isinstance(_disk, dict):
                _disk = {}
        except (OSError, ValueError):  # none yet, unreadable or corrupt: time again
            _disk = {}
    return _disk


def _write_disk(key: str, entry: dict) -> None:
    """Add one entry (re-reading the file first: other processes may have added theirs); atomic replace."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            on_disk = json.loads(path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk = on_disk if isinstance(on_disk, dict) else {}
        on_disk[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice still holds for this process
        pass


def _pick(key, g, x, w, stride, padding, rounds: int = 5, margin: float = 0.15) -> str:
    """The weight gradient for this shape: from the disk cache, else timed (all candidates) and cached.

    After one warm call each (oneDNN's JIT, the first touch of the patch matrix), the candidates are
    timed in turn ``rounds`` times, so a burst of other work (the loader filling its queue during the
    first step) hits all of them; the best of each is compared (:func:`choose`). Without the margin,
    best-of-2 blocks picked differently run to run on cpu2 (ResNet-18, 96 px): 64 channels at
    24 x 24 once went to the GEMM, about twice as slow there, a 13% slower step for the whole run
    (BENCHMARKS.md, "Step on the CPU").
    """
    dkey = _disk_key(key)
    hit = _read_disk().get(dkey)
    if isinstance(hit, dict) and hit.get("choice") in ("onednn",) + ALTERNATIVES:
        _choice[key] = hit["choice"]
        return _choice[key]
    fns = {"onednn": lambda: _onednn_backward(g, x, w, stride, padding, False, True)}
    fns.update({how: (lambda how=how: _wgrad(how, g, x, w, stride, padding)) for how in ALTERNATIVES})
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    _choice[key] = choose(best, margin)
    entry = {"choice": _choice[key], "ms": {k: round(1000 * v, 2) for k, v in best.items()}}
    _read_disk()[dkey] = entry
    _write_disk(dkey, entry)
    return _choice[key]


def choose(seconds: dict, margin: float = 0.15) -> str:
    """The fastest alternative when its time is below ``(1 - margin)`` of oneDNN's, else ``onednn``.

    Ties keep oneDNN's, so noisy timings of near-equal kernels pick the same way.
    """
    best = min((how for how in seconds if how != "onednn"), key=seconds.__getitem__)
    return best if seconds[best] < (1.0 - margin) * seconds["onednn"] else "onednn"


def _wgrad(how: str, g, x, w, stride, padding) -> torch.Tensor:
    """The weight gradient by alternative ``how`` (one of :data:`ALTERNATIVES`)."""
    if how == "gemm":
        return wgrad_gemm(g, x, w.shape[2:], stride, padding)
    return wgrad_conv(g, x, w.shape[2:], stride, padding, nchw=how == "conv_nchw")


class _Conv2dFastWgrad(torch.autograd.Function):
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
        if how != "onednn":
            gx = _onednn_backward(g, x, w, stride, padding, True, False)[0] if need_x else None
            gw = _wgrad(how, g, x, w, stride, padding).contiguous(memory_format=torch.channels_last)
        else:
            gx, gw = _onednn_backward(g, x, w, stride, padding, need_x, True)
        gb = g.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


class FastWgradConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose CPU backward takes the fastest weight gradient per shape (same parameters and state dict)."""

    wgrad_mode = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
                 and isinstance(self.padding, tuple) and x.device.type == "cpu" and x.dtype == torch.float32
                 and self.weight.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
                 and torch.is_grad_enabled() and self.weight.requires_grad)
        if not plain:
            return super().forward(x)
        return _Conv2dFastWgrad.apply(x, self.weight, self.bias, self.stride, self.padding, self.wgrad_mode)


def use_fast_wgrad(model: nn.Module, mode: str = "auto") -> int:
    """Switch every plain ``nn.Conv2d`` of ``model`` to :class:`FastWgradConv2d` in place; returns how many.

    ``mode``: ``auto`` (the fastest per shape, timed once per machine), ``onednn`` (nothing changes), or
    one of :data:`ALTERNATIVES` for every convolution (``gemm``, ``conv``, ``conv_nchw``).
    """
    if mode not in CPU_CONV_WGRADS:
        from fastssl.registry import closest

        raise ValueError(f"unknown train.cpu_conv_wgrad {mode!r}: {closest(mode, list(CPU_CONV_WGRADS))}")
    if mode == "onednn":
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros":
            m.__class__ = FastWgradConv2d
            m.wgrad_mode = mode
            n += 1
    return n
