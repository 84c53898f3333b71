"""Area-average resize of a uint8 crop, compiled with numba for the ffcv decoder.

The same maths as OpenCV's ``INTER_AREA`` when shrinking (each output pixel is the
mean of the source area it covers, partial pixels weighted by their overlap), which
is what ffcv's ``resize_crop`` calls. OpenCV's general (non-integer factor) area path
is scalar; this one is separable with the vertical pass first, so the inner loop runs
over whole contiguous rows (vectorised), and the horizontal pass then reads only
``out_h`` rows, each straight after it is made, with unsigned indices so numba drops its wrap-around branches. Equal
to OpenCV up to one grey level (``tests/test_resize.py``); the ffcv loader runs faster
with it than with OpenCV's resize, most for DINO's multi-crop
(``fastssl-bench loader --backend ffcv,ffcv-opencv``, BENCHMARKS.md).

Shrinking only: callers use OpenCV for a crop smaller than its output on either axis.
"""
from __future__ import annotations

import numpy as np
from numba import njit

@njit(cache=True, fastmath=True, inline="always")
def _axis_table(src, dst, start, cnt, w):
    """For each output index o: the source span [o*f, (o+1)*f) as (first index, count, overlap / f weights)."""
    f = src / dst
    inv = 1.0 / f
    for o in range(dst):
        a = o * f
        b = min((o + 1) * f, float(src))
        i0 = int(a)
        i1 = min(int(np.ceil(b - 1e-9)), src)
        start[o] = i0
        cnt[o] = i1 - i0
        for k in range(i1 - i0):
            lo = max(a, float(i0 + k))
            hi = min(b, float(i0 + k + 1))
            w[o, k] = np.float32((hi - lo) * inv)


@njit(cache=True, fastmath=True)
def area_resize(img, top, left, ch, cw, out, tmp, flip=False):
    """``out`` (S_h, S_w, 3) uint8 <- area average of ``img[top:top+ch, left:left+cw]`` (ch >= S_h, cw >= S_w).

    ``tmp``: float32 scratch of at least ``cw * 3`` elements (one vertically reduced row).
    ``flip``: mirror the output's columns (the random horizontal flip, free here: the
    horizontal pass writes one pixel at a time anyway).
    """
    sh, sw = out.shape[0], out.shape[1]
    ys = np.empty(sh, np.int64)
    yc = np.empty(sh, np.int64)
    # Taps per output pixel: a span of f = src/dst pixels touches at most floor(f) + 2 of them.
    # (A fixed table width once overflowed silently for a 400 -> 5 px shrink: numba does not
    # bounds-check, and the stray writes aborted the process later.)
    yw = np.empty((sh, ch // sh + 2), np.float32)
    xs = np.empty(sw, np.int64)
    xc = np.empty(sw, np.int64)
    xw = np.empty((sw, cw // sw + 2), np.float32)
    _axis_table(ch, sh, ys, yc, yw)
    _axis_table(cw, sw, xs, xc, xw)
    row = cw * 3
    acc = tmp[:row]
    u1, u2, u3 = np.uint64(1), np.uint64(2), np.uint64(3)
    for oy in range(sh):
        # Vertical: one (cw*3,) float row, a weighted sum of whole source rows (contiguous,
        # vectorised). One row at a time, so it stays in L1 for the horizontal pass (all
        # S_h rows first, through L2, was 15% slower).
        w0 = yw[oy, 0]
        src = img[top + ys[oy], left:left + cw].reshape(row)
        for j in range(row):
            acc[j] = w0 * np.float32(src[j])
        for k in range(1, yc[oy]):
            wk = yw[oy, k]
            src = img[top + ys[oy] + k, left:left + cw].reshape(row)
            for j in range(row):
                acc[j] += wk * np.float32(src[j])
        # Horizontal: each output pixel a weighted sum of a few reduced pixels, rounded.
        # Indices are unsigned: numba then drops its negative-index wrap-around branch on
        # every load, which made this pass 1.6x slower (it is most of the resize's time).
        o = out[oy]
        for ox in range(sw):
            d = sw - 1 - ox if flip else ox
            r = np.float32(0.5)
            g = np.float32(0.5)
            b = np.float32(0.5)
            p = np.uint64(xs[ox] * 3)
            wrow = xw[ox]
            for k in range(xc[ox]):
                wk = wrow[k]
                r += wk * acc[p]
                g += wk * acc[p + u1]
                b += wk * acc[p + u2]
                p += u3
            o[d, 0] = np.uint8(min(np.float32(255.0), r))
            o[d, 1] = np.uint8(min(np.float32(255.0), g))
            o[d, 2] = np.uint8(min(np.float32(255.0), b))
