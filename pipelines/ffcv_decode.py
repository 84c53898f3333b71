"""The ffcv decoder's per-batch work as one numba function compiled once per machine (``cache=True``).

ffcv compiles every operation of a loader's pipeline at the loader's first batch. Our
multi-view decoder (``pipelines/ffcv_backend.py``) had its whole loop inside that closure, so
each new loader spent about 7 s of CPU compiling it (the demo: 8 of its 214 s of training went
to the train loader's first batch, and 2 more loaders compile for its kNN evaluation;
BENCHMARKS.md has the measurement). numba cannot cache a closure that captures runtime
values, nor code that calls ctypes function pointers (their addresses change per process).

So the loop lives here, at module level, taking everything as arguments, and calls ffcv's C
functions ``imdecode`` and ``resize`` by symbol name (``types.ExternalFunction``), resolved when
the code is loaded: numba caches it on disk (``__pycache__``, or its user-wide cache when the
package directory is read-only), and the closure that ffcv compiles per loader is a thin call.
The per-loader closure reads each sample's bytes with ffcv's reader (either memory manager) and
hands their addresses in.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastssl.pipelines.crops import center_crop, random_resized_crop, sample_key
from fastssl.pipelines.resize import area_resize

# The loader's int64 state array: [seed, epoch, row bytes, V, S_0 .. S_{V-1}] (pipelines/ffcv_backend.py writes it).
ST_SEED, ST_EPOCH, ST_ROW, ST_NVIEWS, ST_SIZES = range(5)

# ffcv 1.0.2's C entry points (libffcv.cpp; their ctypes argtypes in ffcv/libffcv.py). Pointers
# are passed as 64-bit integers, C bools as bytes (always 0 here: no crop or flip at decode).
_imdecode = types.ExternalFunction("imdecode", types.int32(
    types.intp, types.uint64, types.uint32, types.uint32, types.intp, types.uint32, types.uint32,
    types.uint32, types.uint32, types.uint32, types.uint32, types.uint8, types.uint8))
_resize = types.ExternalFunction("resize", types.void(*([types.int64] * 11)))

_loaded = False


def load_symbols() -> None:
    """Make ffcv's C symbols visible to numba's linker (once per process; needs ffcv installed)."""
    global _loaded
    if not _loaded:
        import ffcv._libffcv
        import llvmlite.binding as llvm

        llvm.load_library_permanently(ffcv._libffcv.__file__)
        _loaded = True


@intrinsic
def voidptr_from_address(typingctx, addr):
    """An int64 address -> void* (numba has no public cast); a runtime value, so the caller stays cacheable."""
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@njit(inline="always")
def _resize_crop(src, t0, t1, l0, l1, dst):
    """``dst`` (h, w, 3) <- ``src[t0:t1, l0:l1]`` resized by OpenCV (INTER_AREA), as ffcv's ``resize_crop``."""
    _resize(0, src.ctypes.data, src.shape[0], src.shape[1], t0, t1, l0, l1, dst.ctypes.data, dst.shape[0],
            dst.shape[1])


_FLAGS = dict(nogil=True, cache=True, fastmath=True, error_model="numpy")  # as ffcv compiles its operations


@njit(**_FLAGS)
def decode_sample(dst_ix, batch_indices, destination, temp_storage, half_storage, flip_storage, metadata, addrs, nbytes,
                  st, cnt, scr, prm, opts):
    """Decode sample ``dst_ix`` of the batch once and write its V views into its ``destination`` row.

    ``addrs``/``nbytes``: int64 (n,) address and length of each sample's stored bytes (read by the
    caller with ffcv's reader for the loader's memory manager); ``st``: the loader's int64 state
    (``ST_*`` above); ``cnt``: per-sample decode counter; ``scr``: float32 area-resize scratch;
    ``prm``: (V, 5) view parameters; ``opts``: int64 [scratch elements per numba thread, train, area
    resize, ffcv's code of the JPEG mode]. Options travel in an array, not as scalars:
    numba would compile one kernel per value of a scalar that its caller holds as a constant.
    """
    per, is_train, with_area, jpg = opts[0], opts[1] != 0, opts[2] != 0, opts[3]
    seed, epoch, nviews = st[ST_SEED], st[ST_EPOCH], st[ST_NVIEWS]
    cnt_len = cnt.shape[0]
    scr_len = scr.shape[0]
    source_ix = batch_indices[dst_ix]
    field = metadata[source_ix]
    height = np.uint32(field["height"])
    width = np.uint32(field["width"])
    if field["mode"] == jpg:
        temp_buffer = temp_storage[dst_ix]
        _imdecode(addrs[dst_ix], nbytes[dst_ix], height, width, temp_buffer.ctypes.data, height, width,
                  0, 0, 1, 1, 0, 0)
        temp_buffer = temp_buffer.reshape(-1)[: 3 * np.int64(height) * np.int64(width)]
        img = temp_buffer.reshape(np.int64(height), np.int64(width), 3)
    else:
        img = numba.carray(voidptr_from_address(addrs[dst_ix]), (np.int64(height), np.int64(width), 3), np.uint8)
    cnt[np.int64(source_ix) % cnt_len] += 1
    row = destination[dst_ix]
    flip_buf = flip_storage[dst_ix]
    # The image at half resolution, made on first need (OpenCV's integer-factor area path,
    # about a tenth of a general INTER_AREA resize): a crop at least twice its output size is
    # resized from it, so its resize reads a quarter of the pixels. Typical for DINO's local
    # crops (BENCHMARKS.md, "multi-crop cost").
    hh, hw = np.int64(height) // 2, np.int64(width) // 2
    half = half_storage[dst_ix][: hh * hw * 3].reshape(hh, hw, 3)
    have_half = False
    off = 0
    for v in range(nviews):
        s = st[ST_SIZES + v]
        out = row[off: off + s * s * 3].reshape(s, s, 3)
        if is_train:
            top, left, ch, cw, flip = random_resized_crop(height, width, prm[v], sample_key(seed, epoch, source_ix, v))
        else:
            top, left, ch, cw = center_crop(height, width)
            flip = False
        if min(ch, cw) >= 2 * s and hh >= 1 and hw >= 1:
            if not have_half:
                _resize_crop(img, 0, 2 * hh, 0, 2 * hw, half)
                have_half = True
            src, t, l = half, top // 2, left // 2
            h, w = min(hh, (top + ch) // 2) - t, min(hw, (left + cw) // 2) - l
        else:
            src, t, l, h, w = img, top, left, ch, cw
        tid = numba.get_thread_id()
        if with_area and h >= s and w >= s and w * 3 <= per and (tid + 1) * per <= scr_len:
            # Shrinking: our area resize (INTER_AREA maths, faster), in this thread's scratch,
            # flipping as it writes. numba does not bounds-check, hence the explicit bounds above.
            area_resize(src, t, l, h, w, out, scr[tid * per:(tid + 1) * per], flip)
        elif not flip:         # enlarging on an axis: OpenCV (bilinear there)
            _resize_crop(src, t, t + h, l, l + w, out)
        else:  # resize aside, then mirror columns while copying into the row
            dst = flip_buf[: s * s * 3].reshape(s, s, 3)
            _resize_crop(src, t, t + h, l, l + w, dst)
            for y in range(s):
                for x in range(s):
                    xs = s - 1 - x
                    out[y, x, 0] = dst[y, xs, 0]
                    out[y, x, 1] = dst[y, xs, 1]
                    out[y, x, 2] = dst[y, xs, 2]
        off += s * s * 3


@njit(parallel=True, **_FLAGS)
def decode_batch(batch_indices, destination, temp_storage, half_storage, flip_storage, metadata, addrs, nbytes,
                 st, cnt, scr, prm, opts):
    """:func:`decode_sample` for every sample of the batch, on the calling thread's numba threads."""
    for i in prange(len(batch_indices)):
        decode_sample(i, batch_indices, destination, temp_storage, half_storage, flip_storage, metadata, addrs, nbytes,
                      st, cnt, scr, prm, opts)


@njit(**_FLAGS)
def decode_batch_serial(batch_indices, destination, temp_storage, half_storage, flip_storage, metadata, addrs, nbytes,
                        st, cnt, scr, prm, opts):
    """:func:`decode_batch` on the calling thread alone (one worker): no numba thread pool is started,
    as ffcv compiles a one-worker loader (a started pool makes a later ``fork`` warn)."""
    for i in range(len(batch_indices)):
        decode_sample(i, batch_indices, destination, temp_storage, half_storage, flip_storage, metadata, addrs, nbytes,
                      st, cnt, scr, prm, opts)
