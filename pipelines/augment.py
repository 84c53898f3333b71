"""The photometric stage, batched on the device (cookbook section 3.1).

The loader hands each view's crops as uint8 ``(B, S, S, 3)`` (NHWC, already
random-resized-cropped and flipped at decode time); :class:`Augmenter` turns
them into normalised float ``(B, 3, S, S)`` channels_last views. Per-image
parameters are sampled as tensors and applied with ``torch.where`` masks: no
per-image Python, no boolean indexing (no host sync), one seeded generator per
(seed, step, view) so a resumed run sees the same augmentations.

Order per view (SimCLR/BYOL): colour jitter with ``jitter_p`` (brightness,
contrast, saturation, hue in that fixed order; torchvision draws a random
order per call, a batched op cannot cheaply), grayscale with ``gray_p``,
Gaussian blur with ``blur_p`` (sigma ~ U(min, max), kernel ~ 10% of the side,
odd: 23 px at 224 as SimCLR), solarisation with ``solarize_p``, normalisation.

Memory budget (``impl="torch"``, the GPU path): one view's stage, uint8 crops in, normalised
view out, allocates at most 4x the view's fp32 size (B x 3 x S x S x 4 bytes) at its peak, its
fp32 crops and its output included, linear in B x S x S: at batch 512 x 224 px a view is 308 MB
and the stage peaks at about 1.2 GB (measured 3.9x; ``tests/test_augment_memory.py``). The hue
step is what used to dominate: a stacked (B, 3, 6, H, W) HSV table put the stage near 30x
(9.2 GB). The ops work in place on the stage's own buffers; views run one after another, so the
earlier views' outputs are all that adds up.

``impl`` (``data.photometric``): ``torch`` (the batched float ops above; the GPU path),
``compiled`` (the same operations written as one graph, :func:`photometric_fused`, fused
by ``torch.compile``: a view takes 12 kernels instead of more than 100 eager ones, each of
those a pass over the view or one of its planes, and on a GPU that memory traffic competes
with the step; one compilation per view shape), ``cv2`` (OpenCV on
uint8 with the same parameters, images in a thread pool: the CPU path, several times
faster there, ``pipelines/augment_cpu.py``), or ``auto`` (``cv2`` on the CPU when OpenCV
is installed, else ``torch``). ``fastssl-bench photometric`` times them side by side.
"""
from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn.functional as F

from fastssl.pipelines.recipes import ViewSpec

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _seed(*parts: int) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def sample_params(view: ViewSpec, b: int, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Per-image parameters of one view: each a (B,) tensor on ``device`` (masks are bool)."""
    u = torch.rand(10, b, generator=generator, device=device)

    def rng(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * x

    br, co, sa = view.brightness, view.contrast, view.saturation
    return {
        "jitter": u[0] < view.jitter_p,
        "brightness": rng(u[1], max(0.0, 1 - br), 1 + br),
        "contrast": rng(u[2], max(0.0, 1 - co), 1 + co),
        "saturation": rng(u[3], max(0.0, 1 - sa), 1 + sa),
        "hue": rng(u[4], -view.hue, view.hue),
        "gray": u[5] < view.gray_p,
        "blur": u[6] < view.blur_p,
        "sigma": rng(u[7], view.blur_sigma_min, view.blur_sigma_max),
        "solarize": u[8] < view.solarize_p,
    }


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Per-image hue shift (fraction of a turn) through HSV, as torchvision; x in [0, 1], (B, 3, H, W).

    torchvision's RGB -> HSV -> RGB, with each output channel picked per pixel from (v, p, q, t)
    by the hue sector i = floor(6 h) (``torch.where``), not from a stacked (B, 3, 6, H, W) table.
    Every value is computed with the same float operations in the same order as that table
    formulation (kept as ``_hue_ref`` in ``tests/test_augment_memory.py``), so in fp32 the two agree
    bit for bit. bf16/fp16 inputs are computed in fp32 and rounded once at the end (within one
    rounding of the fp32 result).

    Memory: temporaries are (B, H, W) planes, at most five fp32 ones (5/3 of ``x``'s fp32 size)
    alive at once, plus bool masks; the channels of the result (``x`` itself with ``inplace=True``,
    else one fp32 copy of it) hold intermediates as they free up.
    """
    dtype = x.dtype
    work = x.float() if dtype != torch.float32 else (x if inplace else x.clone())
    r, g, b = work.unbind(1)                                  # (B, H, W) views into the result's channels
    maxc = work.amax(1)                                       # v
    minc = work.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    del minc
    s = cr / torch.where(eqc, 1.0, maxc)                      # saturation
    cr.masked_fill_(eqc, 1.0)                                 # the divisor of rc, gc, bc
    del eqc
    on_r = maxc == r
    on_g = (maxc == g) & ~on_r
    rc = torch.sub(maxc, r, out=r).div_(cr)                   # (maxc - r) / cr, into the r channel
    gc = torch.sub(maxc, g, out=g).div_(cr)
    bc = torch.sub(maxc, b, out=b).div_(cr)
    del cr
    h = torch.sub(bc, gc)                                     # max on r: bc - gc
    gc.add_(4.0).sub_(rc)                                     # max on b: 4 + gc - rc (in the g channel)
    rc.add_(2.0).sub_(bc)                                     # max on g: 2 + rc - bc (in the r channel)
    torch.where(on_g, rc, gc, out=gc)
    torch.where(on_r, h, gc, out=h)                           # torchvision's hr + hg + hb (6 x hue, unwrapped)
    del on_r, on_g
    h.div_(6.0).add_(1.0).fmod_(1.0)
    h.add_(hue.to(torch.float32).view(-1, 1, 1)).remainder_(1.0)
    v = maxc
    h.mul_(6.0)
    i = torch.floor(h)
    f = h.sub_(i)                                             # 6 h - i
    i.remainder_(6.0)                                         # sector 0..5 (6 h == 6 wraps to 0, as int64 % 6)
    t = torch.rsub(f, 1.0).mul_(s).neg_().add_(1.0).mul_(v).clamp_(0.0, 1.0)   # v (1 - s (1 - f))
    q = f.mul_(s).neg_().add_(1.0).mul_(v).clamp_(0.0, 1.0)                    # v (1 - s f)
    p = s.neg_().add_(1.0).mul_(v).clamp_(0.0, 1.0)                            # v (1 - s)
    del f, s
    # sector:   0  1  2  3  4  5
    # r:        v  q  p  p  t  v
    # g:        t  v  v  q  p  p
    # b:        p  p  t  v  v  q
    # The result's channels are free again (they held rc, gc, bc); v, p, q, t, i are (B, H, W) temporaries.
    r.copy_(p)
    torch.where(i == 1, q, r, out=r)
    torch.where(i == 4, t, r, out=r)
    torch.where((i == 0) | (i == 5), v, r, out=r)
    b.copy_(p)
    torch.where(i == 2, t, b, out=b)
    torch.where((i == 3) | (i == 4), v, b, out=b)
    torch.where(i == 5, q, b, out=b)
    torch.where(i == 3, q, p, out=g)
    torch.where((i == 1) | (i == 2), v, g, out=g)
    torch.where(i == 0, t, g, out=g)
    if dtype == torch.float32:
        return work
    return x.copy_(work) if inplace else work.to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma: grouped convs, reflect padding. x (B, C, H, W)."""
    b, c, h, w = x.shape
    half = ksize // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)                                        # (B, k)
    k = k.repeat_interleave(c, 0)                                         # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    pad_h, pad_w = min(half, h - 1), min(half, w - 1)
    y = F.pad(y, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    if pad_w < half or pad_h < half:  # tiny images: clip the kernel to what reflect padding allows
        kw = k[:, half - pad_w: half + pad_w + 1]
        kh = k[:, half - pad_h: half + pad_h + 1]
        kw, kh = kw / kw.sum(1, keepdim=True), kh / kh.sum(1, keepdim=True)
    else:
        kw = kh = k
    y = F.conv2d(y, kw.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, kh.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def blur_kernel_size(size: int) -> int:
    """~10% of the side, odd (SimCLR: 23 px at 224)."""
    k = int(0.1 * size)
    return max(3, k + 1 if k % 2 == 0 else k)


OPS = ("jitter", "gray", "blur", "solarize")


def active_ops(view: ViewSpec) -> tuple[str, ...]:
    """The ops of ``OPS`` that ``view`` can apply: those with a probability above 0.

    An op with probability 0 leaves every image as it is (its sampled mask is all False), so
    skipping it gives the same views, bit for bit, without its passes over the batch: MAE's
    view (crop and flip only) is then normalisation alone, SimCLR's skips the solarisation.
    """
    probs = {"jitter": view.jitter_p, "gray": view.gray_p, "blur": view.blur_p, "solarize": view.solarize_p}
    return tuple(op for op in OPS if probs[op] > 0)


def apply_view(x: torch.Tensor, p: dict[str, torch.Tensor], ops: tuple[str, ...] = OPS,
               inplace: bool = False) -> torch.Tensor:
    """Photometric ops on float x in [0, 1], (B, 3, S, S), with per-image params ``p``; returns [0, 1].

    ``ops``: the ops to run (:func:`active_ops`; one left out must have an all-False mask). ``x``
    is left as it is unless ``inplace``; the work happens in place on two buffers of x's size (the
    jittered copy, then the result), so the peak stays a small multiple of the view (module docstring).
    """
    if "jitter" in ops:
        j = _col(p["jitter"])
        y = x * _col(p["brightness"])
        y.clamp_(0, 1)
        m = _gray(y).mean(dim=(2, 3), keepdim=True)
        y.sub_(m).mul_(_col(p["contrast"])).add_(m).clamp_(0, 1)
        g = _gray(y)
        y.sub_(g).mul_(_col(p["saturation"])).add_(g).clamp_(0, 1)
        del g
        adjust_hue(y, p["hue"], inplace=True)
        x = torch.where(j, y, x, out=y)                       # from here on x is this function's own buffer
    elif not inplace:
        x = x.clone()
    if "gray" in ops:
        torch.where(_col(p["gray"]), _gray(x).expand_as(x), x, out=x)
    if "blur" in ops:
        blurred = gaussian_blur(x, p["sigma"], blur_kernel_size(x.shape[-1]))
        torch.where(_col(p["blur"]), blurred, x, out=x)
        del blurred
    if "solarize" in ops:
        torch.where(_col(p["solarize"]) & (x >= 0.5), 1.0 - x, x, out=x)
    return x


def _hue_fused(y: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_hue` out of place, as one expression graph for ``torch.compile`` to fuse; y fp32 (B, 3, H, W).

    The same formulas in the same order (torchvision's RGB -> HSV -> RGB, each channel picked by
    the hue sector). Fused kernels may contract a multiply and an add, so results agree with
    :func:`adjust_hue` to float rounding, except where that rounding moves a pixel across a
    sector boundary (tested).
    """
    r, g, b = y.unbind(1)                                                   # (B, H, W) each
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eqc, 1.0, maxc)                                    # saturation
    crd = torch.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    on_r = maxc == r
    on_g = (maxc == g) & ~on_r
    h = torch.where(on_r, bc - gc, torch.where(on_g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + hue.view(-1, 1, 1), 1.0) * 6.0
    i = torch.floor(h)
    f = h - i
    i = torch.remainder(i, 6.0)                                             # sector 0..5
    v = maxc
    t = ((1.0 - f) * s).neg().add(1.0).mul(v).clamp(0.0, 1.0)              # v (1 - s (1 - f))
    q = (f * s).neg().add(1.0).mul(v).clamp(0.0, 1.0)                      # v (1 - s f)
    p = s.neg().add(1.0).mul(v).clamp(0.0, 1.0)                            # v (1 - s)
    r = torch.where((i == 0) | (i == 5), v, torch.where(i == 4, t, torch.where(i == 1, q, p)))
    g = torch.where(i == 0, t, torch.where((i == 1) | (i == 2), v, torch.where(i == 3, q, p)))
    b = torch.where(i == 5, q, torch.where((i == 3) | (i == 4), v, torch.where(i == 2, t, p)))
    return torch.stack([r, g, b], 1)


def _blur_pass(x: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass of a separable blur along ``dim`` (3: along rows, 2: along columns), ``k`` (B, taps) per image.

    A sum of shifted slices of the reflect-padded image: plain indexing that a compiler fuses into
    one kernel per pass, where the grouped convolution of :func:`gaussian_blur` (B x C groups) is a
    library call it cannot fuse.
    """
    half = k.shape[1] // 2
    n = x.shape[dim]
    xp = F.pad(x, (0, 0, half, half) if dim == 2 else (half, half, 0, 0), mode="reflect")
    out = None
    for j in range(k.shape[1]):
        term = xp.narrow(dim, j, n) * k[:, j].view(-1, 1, 1, 1)
        out = term if out is None else out + term
    return out


def photometric_fused(crops: torch.Tensor, p: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
                      ksize: int, dtype: torch.dtype, ops: tuple[str, ...] = OPS) -> torch.Tensor:
    """One view's whole stage, out of place, for ``torch.compile``: uint8 crops (B, S, S, 3) -> normalised
    ``dtype`` views (B, 3, S, S), channels_last.

    The operations of :func:`apply_view` then :meth:`Augmenter._finish`, in their order, written
    as one graph so that a compiler fuses them: inductor makes 12 kernels of it (counted on the
    CPU), where the eager stage launches more than 100, each a pass over the view or one of its
    planes that reads and writes memory the step's kernels need at the same time (the data path
    shares the GPU with the step). The blur is computed for every image and selected per image, as in
    the eager stage: choosing work per image would need the host to read the mask.
    """
    x = crops.permute(0, 3, 1, 2).float() / 255.0                          # (B, 3, S, S), channels_last memory
    if "jitter" in ops:
        y = (x * _col(p["brightness"])).clamp(0.0, 1.0)
        m = _gray(y).mean(dim=(2, 3), keepdim=True)
        y = ((y - m) * _col(p["contrast"]) + m).clamp(0.0, 1.0)
        g = _gray(y)
        y = ((y - g) * _col(p["saturation"]) + g).clamp(0.0, 1.0)
        y = _hue_fused(y, p["hue"].float())
        x = torch.where(_col(p["jitter"]), y, x)
    if "gray" in ops:
        x = torch.where(_col(p["gray"]), _gray(x).expand_as(x), x)
    if "blur" in ops:
        half = ksize // 2
        t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t.view(1, -1) / p["sigma"].view(-1, 1).to(x.dtype)) ** 2)
        k = k / k.sum(1, keepdim=True)                                      # (B, ksize)
        pad = min(half, x.shape[-1] - 1)
        if pad < half:  # tiny images: clip the kernel to what reflect padding allows, as gaussian_blur
            k = k[:, half - pad: half + pad + 1]
            k = k / k.sum(1, keepdim=True)
        blurred = _blur_pass(_blur_pass(x, k, 3), k, 2)                     # along rows, then columns (as gaussian_blur)
        x = torch.where(_col(p["blur"]), blurred, x)
    if "solarize" in ops:
        x = torch.where(_col(p["solarize"]) & (x >= 0.5), 1.0 - x, x)
    x = ((x - mean) / std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


_COMPILED_STAGE = None


def compiled_stage():
    """:func:`photometric_fused` compiled once per process (inductor; one graph per view shape).

    A compiler error (at the first call of a shape) warns once and runs the same graph eagerly from
    then on: compiling is a speed-up, never a requirement (as ``fastssl.compile.compile_module``).
    """
    global _COMPILED_STAGE
    if _COMPILED_STAGE is None:
        from fastssl.compile import _is_compiler_error, raise_recompile_limit

        raise_recompile_limit()  # a graph per (view shape, ops, dtype): progressive sizes x DINO's view kinds
        compiled = torch.compile(photometric_fused, dynamic=False, fullgraph=True)
        state = {"failed": False}

        def stage(*args):
            if not state["failed"]:
                try:
                    return compiled(*args)
                except Exception as e:  # noqa: BLE001
                    if not _is_compiler_error(e):
                        raise
                    state["failed"] = True
                    log.warning("data.photometric=compiled: torch.compile failed (%s: %s); the photometric stage "
                                "runs eagerly (data.photometric=torch is the in-place eager stage)",
                                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return photometric_fused(*args)

        stage.state = state
        _COMPILED_STAGE = stage
    return _COMPILED_STAGE


IMPLS = ("auto", "torch", "compiled", "cv2")


class Augmenter:
    """Per-view photometric augmentation + normalisation of uint8 crops, batched on ``device``."""

    def __init__(self, views: list[ViewSpec], device, seed: int = 0, impl: str = "auto",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype | None = None, channels_last: bool = True):
        if impl not in IMPLS:
            raise ValueError(f"Augmenter impl {impl!r} is not available: use one of {', '.join(IMPLS)}")
        self.views, self.seed = list(views), seed
        self.device = torch.device(device)
        if impl == "auto":
            # On the CPU, OpenCV on uint8 is several times faster than float torch ops (pipelines/augment_cpu.py).
            from fastssl.pipelines import augment_cpu

            impl = "cv2" if self.device.type == "cpu" and augment_cpu.available() else "torch"
        if impl == "cv2" and self.device.type != "cpu":
            raise ValueError(f"Augmenter impl 'cv2' runs on the CPU only, not on {self.device}: use 'torch' or 'auto'")
        self.impl = impl
        self._cpu = None
        if impl == "cv2":
            from fastssl.pipelines.augment_cpu import CpuPhotometric

            self._cpu = CpuPhotometric()  # without OpenCV: fails here, naming the install command
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.channels_last = channels_last
        self.mean_std = (tuple(mean), tuple(std))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def _to_float(self, c: torch.Tensor) -> torch.Tensor:
        """uint8 crops -> a new fp32 (B, 3, S, S) buffer in [0, 1] (never the caller's: later steps work in place)."""
        c = c.to(self.device, non_blocking=True)
        if c.shape[-1] == 3 and c.shape[1] != 3:
            c = c.permute(0, 3, 1, 2)  # NHWC memory == channels_last NCHW
        return c.to(torch.float32, copy=True).div_(255.0)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (this stage's own buffer: in place) and cast to the views' dtype."""
        x = x.sub_(self.mean).div_(self.std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def __call__(self, crops: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        out = []
        for v, (c, spec) in enumerate(zip(crops, self.views)):
            g = torch.Generator(device=self.device).manual_seed(_seed(self.seed, step, v))
            nhwc = c if c.shape[-1] == 3 else c.permute(0, 2, 3, 1)
            if self._cpu is not None:
                params = sample_params(spec, nhwc.shape[0], g, self.device)
                y = self._cpu(nhwc.contiguous().numpy(), params, blur_kernel_size(nhwc.shape[2]),
                              mean=self.mean_std[0], std=self.mean_std[1])
                x = torch.from_numpy(y).permute(0, 3, 1, 2)  # NHWC memory = channels_last (B, 3, S, S)
                out.append(x.to(self.dtype) if self.channels_last else x.contiguous().to(self.dtype))
                continue
            params = sample_params(spec, c.shape[0], g, self.device)
            ops = active_ops(spec)
            if self.impl == "compiled":
                nhwc = nhwc.to(self.device, non_blocking=True)
                x = compiled_stage()(nhwc, params, self.mean, self.std, blur_kernel_size(nhwc.shape[2]), self.dtype,
                                     ops)
                out.append(x if self.channels_last else x.contiguous())
                continue
            # No name holds the fp32 crops (the stage's own buffer, worked on in place): apply_view's last
            # reference to them goes once the jitter is merged.
            out.append(self._finish(apply_view(self._to_float(c), params, ops, inplace=True)))
        return out

    def normalize_only(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._finish(self._to_float(c)) for c in crops]
