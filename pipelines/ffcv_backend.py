"""FFCV back-end: each JPEG is decoded once per epoch and every view is cropped from that decode.

Upstream ffcv (1.0.2) runs one pipeline per field, so a sample's V views are
packed into one uint8 output row of ``sum_v S_v * S_v * 3`` bytes by our
decoder :func:`multiview_decoder`; the loader splits the row into per-view
``(B, S_v, S_v, 3)`` tensors (zero-copy views). Crops follow
``pipelines.crops`` (counter-based RNG keyed by seed, epoch, sample, view).

Per-epoch values (seed, epoch, view sizes for progressive resolution) live in a
small int64 array owned by the loader; numba freezes captured arrays as
constants, so the compiled decoder reads it through its address (a 3-line
``inttoptr`` intrinsic), and the decoder is compiled once.
"""
from __future__ import annotations

import os

import numpy as np

from fastssl.pipelines import DataError
from fastssl.pipelines.crops import center_crop, random_resized_crop, sample_key, view_params
from fastssl.pipelines.ffcv_compat import decoder_base, import_ffcv, make_loader, next_batch, open_beton, start_epoch, \
    stop_epoch
from fastssl.pipelines.loader import LoaderBase
from fastssl.pipelines.resize import area_resize

# State array layout (int64): [seed, epoch, row_bytes, V, S_0 .. S_{V-1}]
ST_SEED, ST_EPOCH, ST_ROW, ST_NVIEWS, ST_SIZES = range(5)
MAX_VIEWS = 64


def _intrinsics():
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def voidptr_from_address(typingctx, addr):
        """An int64 address -> void* (numba has no public cast)."""
        sig = types.voidptr(addr)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return sig, codegen

    return voidptr_from_address


_VOIDPTR = None


def multiview_decoder(params: np.ndarray, state: np.ndarray, counts: np.ndarray, train: bool,
                      scratch: np.ndarray, per_thread: int, use_area: bool = True):
    """An ffcv decoder ``Operation`` for RGBImageField: decode once, V random-resized crops (+ flip) or one centre crop.

    ``params``: (V, 5) float64 from :func:`pipelines.crops.view_params`; ``state``: the loader's
    int64 state array (kept alive by the loader); ``counts``: int64 per-sample decode counter;
    ``scratch``: float32, ``per_thread`` elements for each numba thread (the area resize's row;
    a crop needing more falls back to OpenCV). ``use_area``: shrink crops with our area resize
    (``pipelines/resize.py``); False: OpenCV's INTER_AREA for every crop, as upstream ffcv.
    """
    global _VOIDPTR
    from dataclasses import replace

    import numba
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    if _VOIDPTR is None:
        _VOIDPTR = _intrinsics()
    voidptr = _VOIDPTR

    class MultiViewCropDecoder(decoder_base()):
        def declare_state_and_memory(self, previous_state):
            widths, heights = self.metadata["width"], self.metadata["height"]
            max_w, max_h = np.uint64(widths.max()), np.uint64(heights.max())
            row = (int(state[ST_ROW]),)
            u8 = np.dtype("<u1")
            half = (max_h // np.uint64(2) + np.uint64(1)) * (max_w // np.uint64(2) + np.uint64(1)) * np.uint64(3)
            # The flip buffer holds one view (an enlarged crop, resized aside then mirrored): the largest.
            largest = max(int(state[ST_SIZES + v]) for v in range(int(state[ST_NVIEWS])))
            return (replace(previous_state, jit_mode=True, shape=row, dtype=u8),
                    (AllocationQuery(row, u8), AllocationQuery((max_h * max_w * np.uint64(3),), u8),
                     AllocationQuery((half,), u8), AllocationQuery((3 * largest * largest,), u8)))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            rrc, cc, key_of = random_resized_crop, center_crop, sample_key
            area = area_resize
            with_area = bool(use_area)
            prm = params.copy()
            st_addr, st_len = int(state.ctypes.data), int(state.shape[0])
            cnt_addr, cnt_len = int(counts.ctypes.data), int(counts.shape[0])
            scr_addr, scr_len, per = int(scratch.ctypes.data), int(scratch.shape[0]), int(per_thread)
            is_train = bool(train)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, half_storage, flip_storage = my_storage
                st = numba.carray(voidptr(st_addr), (st_len,), np.int64)
                cnt = numba.carray(voidptr(cnt_addr), (cnt_len,), np.int64)
                scr = numba.carray(voidptr(scr_addr), (scr_len,), np.float32)
                n = len(batch_indices)
                if destination.shape[1] != st[ST_ROW]:  # a stale epoch's buffers (sizes changed): never overrun
                    return destination[:n]
                seed, epoch, nviews = st[ST_SEED], st[ST_EPOCH], st[ST_NVIEWS]
                for dst_ix in my_range(n):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * np.int64(height) * np.int64(width)]
                        img = temp_buffer.reshape(np.int64(height), np.int64(width), 3)
                    else:
                        img = image_data.reshape(np.int64(height), np.int64(width), 3)
                    cnt[np.int64(source_ix) % cnt_len] += 1
                    row = destination[dst_ix]
                    flip_buf = flip_storage[dst_ix]
                    # The image at half resolution, made on first need (OpenCV's integer-factor area
                    # path, about a tenth of a general INTER_AREA resize): a crop at least twice its
                    # output size is resized from it, so its resize reads a quarter of the pixels.
                    # Typical for DINO's local crops (BENCHMARKS.md, "multi-crop cost").
                    hh, hw = np.int64(height) // 2, np.int64(width) // 2
                    half = half_storage[dst_ix][: hh * hw * 3].reshape(hh, hw, 3)
                    have_half = False
                    off = 0
                    for v in range(nviews):
                        s = st[ST_SIZES + v]
                        out = row[off: off + s * s * 3].reshape(s, s, 3)
                        if is_train:
                            top, left, ch, cw, flip = rrc(height, width, prm[v], key_of(seed, epoch, source_ix, v))
                        else:
                            top, left, ch, cw = cc(height, width)
                            flip = False
                        if min(ch, cw) >= 2 * s and hh >= 1 and hw >= 1:
                            if not have_half:
                                resize_crop_c(img, 0, 2 * hh, 0, 2 * hw, half)
                                have_half = True
                            src, t, l = half, top // 2, left // 2
                            h, w = min(hh, (top + ch) // 2) - t, min(hw, (left + cw) // 2) - l
                        else:
                            src, t, l, h, w = img, top, left, ch, cw
                        tid = numba.get_thread_id()
                        if with_area and h >= s and w >= s and w * 3 <= per and (tid + 1) * per <= scr_len:
                            # Shrinking: our area resize (INTER_AREA maths, faster), in this thread's
                            # scratch, flipping as it writes. numba does not bounds-check, hence the
                            # explicit slice bounds above.
                            area(src, t, l, h, w, out, scr[tid * per:(tid + 1) * per], flip)
                        elif not flip:         # enlarging on an axis: OpenCV (bilinear there)
                            resize_crop_c(src, t, t + h, l, l + w, out)
                        else:  # resize aside, then mirror columns while copying into the row
                            dst = flip_buf[: s * s * 3].reshape(s, s, 3)
                            resize_crop_c(src, t, t + h, l, l + w, dst)
                            for y in range(s):
                                for x in range(s):
                                    xs = s - 1 - x
                                    out[y, x, 0] = dst[y, xs, 0]
                                    out[y, x, 1] = dst[y, xs, 1]
                                    out[y, x, 2] = dst[y, xs, 2]
                        off += s * s * 3
                return destination[:n]

            decode.is_parallel = True
            return decode

    return MultiViewCropDecoder()


class FFCVLoader(LoaderBase):
    """Iterable of :class:`Batch` over a ``.beton``; see :func:`pipelines.loader.build_loader`.

    The file is checked first (:func:`pipelines.ffcv_compat.open_beton`): a truncated or corrupt
    ``.beton``, or one of other fields, raises :class:`fastssl.pipelines.DataError`.
    ``area_resize``: shrink crops with our area resize (default); False resizes every crop with
    OpenCV's INTER_AREA, as upstream ffcv (``fastssl-bench loader --backend ffcv-opencv``).
    """

    backend = "ffcv"

    def __init__(self, path: str, views, batch_size: int, device, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, workers: int = 2, train: bool = True,
                 in_memory: bool = True, finisher=None, batches_ahead: int = 2, area_resize: bool = True):
        import_ffcv()  # first: keeps torch's thread count (ffcv's import sets it to 1) and patches ffcv's
        from ffcv.fields.basics import IntDecoder
        from ffcv.transforms import ToTensor

        if len(views) > MAX_VIEWS:
            raise ValueError(f"at most {MAX_VIEWS} views per sample, got {len(views)}")
        self._setup(path, views, batch_size, device, seed=seed, rank=rank, world_size=world_size,
                    drop_last=drop_last, train=train, finisher=finisher)
        self._it = None
        self.params = view_params(self.specs)
        self.state = np.zeros(ST_SIZES + MAX_VIEWS, np.int64)
        self._write_state()
        info = open_beton(self.path)
        self.num_samples = info.num_samples
        self.counts = np.zeros(self.num_samples, np.int64)  # decodes per sample (decode-once checks)
        labels = info.labels
        self.labelled = labels is not None and bool((labels >= 0).any())
        from fastssl.pipelines.prepare import read_meta

        meta = read_meta(self.path) or {}
        if meta.get("bytes") not in (None, os.path.getsize(self.path)):
            raise DataError(f"{self.path} is {os.path.getsize(self.path)} bytes, but fastssl-prepare wrote "
                            f"{meta['bytes']} (its {self.path}.meta.json says so): truncated or replaced; re-run "
                            f"`fastssl-prepare SRC {self.path}`, or delete the stale .meta.json if the file is right")
        self.classes = meta.get("classes")
        self.num_classes = (len(self.classes) if self.classes else int(labels.max()) + 1) if self.labelled else None
        if self.num_samples < world_size:
            raise ValueError(f"{self.path} has {self.num_samples} samples, fewer than world_size={world_size}")

        # Area-resize scratch, one slice per numba thread (a per-call allocation page-faults):
        # one float32 row of the widest image.
        import numba

        self.scratch_per_thread = int(info.widths.max()) * 3
        self.scratch = np.empty(numba.config.NUMBA_NUM_THREADS * self.scratch_per_thread, np.float32)
        self.area_resize = bool(area_resize)
        decoder = multiview_decoder(self.params, self.state, self.counts, self.train, self.scratch,
                                    self.scratch_per_thread, use_area=self.area_resize)
        pipelines = {"image": [decoder, ToTensor()],
                     "label": [IntDecoder(), ToTensor()] if labels is not None else None}
        self._loader, outputs = make_loader(info, pipelines, self.order, batch_size=self.batch_size, workers=workers,
                                            in_memory=in_memory, drop_last=self.drop_last, seed=self.seed,
                                            batches_ahead=batches_ahead)
        self._out_image, self._out_label = outputs["image"], outputs.get("label")

    # -- contract (order, __len__ from EpochContract; iteration from LoaderBase)
    def set_epoch(self, epoch: int, global_size: int | None = None) -> None:
        """Shuffle seed = f(seed, epoch); ``global_size`` resizes every global view from now on."""
        self._close()
        super().set_epoch(epoch, global_size)
        self._write_state()

    def _write_state(self) -> None:
        self.state[ST_SEED], self.state[ST_EPOCH] = self.seed, self.epoch
        self.state[ST_ROW] = sum(3 * s * s for s in self.sizes)
        self.state[ST_NVIEWS] = len(self.sizes)
        self.state[ST_SIZES:ST_SIZES + len(self.sizes)] = self.sizes

    def _close(self) -> None:
        it, self._it = self._it, None
        if it is not None:  # stop the previous epoch's decoding thread before the state changes
            stop_epoch(it)

    def _raw_batches(self, order, nb: int):
        import torch

        self._close()
        it = start_epoch(self._loader, self.epoch)
        self._it = it
        offs = np.cumsum([0] + [3 * s * s for s in self.sizes])
        non_blocking = self.device.type == "cuda"
        for b in range(nb):
            out = next_batch(it)
            if out is None:
                break
            rows = out[self._out_image]                     # (B, sum 3 S^2) uint8, CPU (pinned on CUDA hosts)
            B = rows.shape[0]
            idx = torch.from_numpy(order[b * self.batch_size: b * self.batch_size + B].astype(np.int64))
            rows = rows.to(self.device, non_blocking=non_blocking)
            crops = [rows[:, offs[v]:offs[v + 1]].unflatten(1, (s, s, 3)) for v, s in enumerate(self.sizes)]
            labels = None
            if self.labelled:
                # Copy: ffcv reuses its batch slots, and a caller that keeps labels across batches
                # (feature extraction for kNN) would otherwise see them overwritten.
                labels = out[self._out_label].to(self.device, dtype=torch.long, non_blocking=non_blocking,
                                                 copy=True).reshape(B)
            yield crops, labels, idx.to(self.device, non_blocking=non_blocking)
        self._it = None
