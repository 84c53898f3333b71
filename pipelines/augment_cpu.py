"""The photometric stage on the CPU: OpenCV on uint8, images in parallel threads.

Float torch ops are slow on a few CPU cores (measured: batched jitter +
blur at 224 px at ~140 views/s eager on 2 cores); OpenCV's SIMD uint8 kernels
do the same work several times faster and release the GIL, so a small thread
pool runs the images of a batch in parallel. This is the no-GPU fallback of
:class:`fastssl.pipelines.augment.Augmenter` (``impl="cv2"``, chosen by
``impl="auto"`` on the CPU when OpenCV is installed).

Same contract and same random parameters as the torch path (``sample_params``
with the same seeded generator), same op order (brightness, contrast,
saturation, hue under ``jitter_p``; grayscale; blur; solarise), so the two paths
differ only by uint8 rounding between ops: tests hold each op to torchvision's
functional op within a few grey levels.

Per op, on one uint8 (H, W, 3) RGB image:

* brightness b:  ``sat(b * x)``                                 (convertScaleAbs)
* contrast c:    ``sat(c * x + (1 - c) * mean(gray(x)))``       (addWeighted)
* saturation s:  ``sat(s * x + (1 - s) * gray(x))``             (transform: one 3x3 colour matrix)
* hue h:         HSV (full 0-255 hue range), hue channel + round(256 h) mod 256 (uint8 wrap-around)
* grayscale:     ``gray(x)`` in all channels (BT.601 weights, as torchvision)
* blur sigma:    separable Gaussian (``sepFilter2D`` with ``getGaussianKernel`` taps; kernel ~10% of the side,
                 cut at 4 sigma; reflect-101 borders as torch's reflect pad)
* solarise:      ``x >= 128 -> 255 - x`` via a LUT
"""
from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_GRAY_ROWS = np.tile(np.array([0.299, 0.587, 0.114]), (3, 1))  # gray(x) in every channel: OpenCV's RGB2GRAY weights
_SOLARIZE_LUT = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


def available() -> bool:
    """True when OpenCV (``opencv-python`` or ``-headless``) can be imported."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _cv2():
    try:
        import cv2
    except ImportError as e:  # only reached when the user asked for impl="cv2" by name
        raise ImportError("the OpenCV photometric path needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def augment_image(x: np.ndarray, p: dict, ksize: int, solarize: bool = True) -> np.ndarray:
    """Photometric ops on one uint8 (H, W, 3) RGB image with scalar params ``p``; returns a new uint8 image.

    ``p`` holds Python scalars with the keys of :func:`fastssl.pipelines.augment.sample_params`.
    ``solarize=False`` leaves the last op (a LUT) to the caller, which folds it into its own.
    """
    cv2 = _cv2()
    if p["jitter"]:
        # Each op one OpenCV call that saturates to uint8 (torchvision clamps after each op too);
        # the cheapest call per op at 224 px on one thread (cpu2): convertScaleAbs 0.040 ms against
        # addWeighted's 0.053, the gray mean by cv2.mean 0.032 against numpy's 0.072, saturation as
        # one 3x3 colour matrix 0.041 against gray + blend 0.089, the hue shift in place 0.049
        # against a LUT 0.085. Brightness is >= 0 before saturation, so its "Abs" does nothing.
        x = cv2.convertScaleAbs(x, alpha=p["brightness"])
        c = p["contrast"]
        m = cv2.mean(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY))[0]
        x = cv2.addWeighted(x, c, x, 0.0, (1.0 - c) * m)  # not convertScaleAbs: c > 1 goes below 0
        s = p["saturation"]
        x = cv2.transform(x, (s * np.eye(3) + (1.0 - s) * _GRAY_ROWS).astype(np.float32))  # s x + (1 - s) gray(x)
        shift = int(round(p["hue"] * 256.0)) % 256
        if shift:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
            h = hsv[..., 0]
            h += np.uint8(shift)  # uint8 wraps: the hue turn, mod 256
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    if p["gray"]:
        x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if p["blur"]:
        # Taps beyond 4 sigma carry < 1e-4 of the kernel's weight (under a grey level here), and
        # OpenCV's cost grows with the kernel: SimCLR's 23 px at sigma 0.5 is 5 taps, ~9x faster.
        sigma = p["sigma"]
        k = min(ksize, 2 * math.ceil(4.0 * sigma) + 1)
        # The same Gaussian taps as GaussianBlur, applied in float by sepFilter2D: GaussianBlur's
        # bit-exact fixed-point uint8 path is 2.2-2.6x slower for 9-17 taps (0.45 vs 0.21 ms,
        # 1.00 vs 0.38 ms per 224 px view on cpu2); the results differ by at most one grey level.
        g = cv2.getGaussianKernel(k, sigma, cv2.CV_32F)  # (k, 1), sums to 1
        x = cv2.sepFilter2D(x, -1, g, g, borderType=cv2.BORDER_REFLECT_101)
    if p["solarize"] and solarize:
        x = cv2.LUT(x, _SOLARIZE_LUT)
    return x


def normalize_lut(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """uint8 -> float32 ``(v / 255 - mean) / std`` per channel as two (1, 256, 3) float32 tables:
    plain, and composed with solarise (``v >= 128 -> 255 - v``) for the images that solarise."""
    v = np.arange(256, dtype=np.float64)
    lut = np.stack([(v / 255.0 - m) / s for m, s in zip(mean, std)], -1).astype(np.float32)[None]  # (1, 256, 3)
    return lut, np.ascontiguousarray(lut[:, _SOLARIZE_LUT])


class BufferPool:
    """Output batches reused once nothing outside the pool refers to them any more.

    A fresh float32 batch of 64 views at 224 px is 38 MB: above glibc's mmap threshold, so each was
    mapped, page-faulted in by the threads writing it (the kernel zeroing every page) and unmapped
    when the caller dropped it. That was 0.5 of the stage's 1.4 ms per view on one thread (cpu2,
    CHANGELOG.md, 2026-11-27). A buffer is handed out again only when the pool's own
    reference is the last one (``sys.getrefcount``): every tensor or array made from it holds one,
    so a caller that keeps a batch keeps it intact, and the pool allocates another instead.
    """

    def __init__(self, keep: int = 16):
        self.keep = keep                  # at most this many buffers held (all shapes together)
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
        """A writable array of ``shape``/``dtype`` that nothing else references (contents undefined)."""
        ndt = torch.empty(0, dtype=dtype).numpy().dtype
        with self._lock:
            for i in range(len(self._bufs)):
                b = self._bufs[i]
                # References: the list, ``b``, getrefcount's argument. Any view, tensor (torch.from_numpy)
                # or slice of it adds one.
                if b.shape == shape and b.dtype == ndt and sys.getrefcount(b) == 3:
                    return b
                del b
            # torch's allocator, not numpy's: a fresh 38 MB numpy buffer page-faults in both threads
            # (measured 69 ms vs 14 ms to normalise 64 views at 224 px).
            b = torch.empty(shape, dtype=dtype).numpy()
            self._bufs.append(b)
            if len(self._bufs) > self.keep:
                self._bufs.pop(0)  # the oldest: still valid for whoever holds it, only not reused
            return b


CHUNKS_PER_THREAD = 4  # load balance of the thread pool (see CpuPhotometric.__call__)


class CpuPhotometric:
    """Apply :func:`augment_image` to every image of a uint8 (B, H, W, 3) batch in a thread pool."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        # Parallel over images, so OpenCV's own per-call threads only contend with ours (measured:
        # normalising 64 views at 224 px took 88 ms more with them, 8 ms without). This is the
        # opencv-python module's setting; ffcv's libffcv links its own OpenCV and is unaffected.
        _cv2().setNumThreads(1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fastssl-cv2") if self.threads > 1 else None
        self.buffers = BufferPool()

    def __call__(self, crops: np.ndarray, params: dict[str, torch.Tensor], ksize: int,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None) -> np.ndarray:
        """``crops`` uint8 (B, H, W, 3) NHWC; ``params`` (B,) tensors from ``sample_params``.

        Returns uint8 (B, H, W, 3), or with ``mean``/``std`` (in [0, 1] units) float32
        ``(x / 255 - mean) / std`` (B, H, W, 3): normalising inside the threads, per image
        while it is in cache, costs a fraction of a batched torch pass after them.
        """
        b = crops.shape[0]
        cols = {k: v.tolist() for k, v in params.items()}  # CPU tensors: no device sync
        per = [{k: cols[k][i] for k in cols} for i in range(b)]
        norm = mean is not None
        out = self.buffers.get(crops.shape, torch.float32 if norm else torch.uint8)
        if norm:
            # One table lookup per pixel (uint8 -> float32, channel by channel), with solarise folded
            # in: 0.13 against 0.19 ms per 224 px view for multiply + subtract, the same values.
            cv2 = _cv2()
            lut, lut_sol = normalize_lut(mean, std)

        def run(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                y = augment_image(np.ascontiguousarray(crops[i]), per[i], ksize, solarize=not norm)
                if norm:
                    cv2.LUT(y, lut_sol if per[i]["solarize"] else lut, dst=out[i])
                else:
                    out[i] = y

        if self._pool is None or b < 2:
            run(0, b)
        else:
            # Small contiguous chunks, handed out as threads free up: images cost unequal
            # amounts (blur or not, its sigma), and one chunk per thread left one idle
            # (ffcv full stage, SimCLR: 570 against 446 images/s; BENCHMARKS.md).
            # OpenCV releases the GIL inside each call.
            n = min(b, self.threads * CHUNKS_PER_THREAD)
            edges = np.linspace(0, b, n + 1).astype(int)
            list(self._pool.map(lambda ab: run(*ab), zip(edges[:-1], edges[1:])))
        return out
