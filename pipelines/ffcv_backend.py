"""FFCV back-end: each JPEG is decoded once per epoch and every view is cropped from that decode.

Upstream ffcv (1.0.2) runs one pipeline per field, so a sample's V views are
packed into one uint8 output row of ``sum_v S_v * S_v * 3`` bytes by our
decoder :func:`multiview_decoder`; the loader splits the row into per-view
``(B, S_v, S_v, 3)`` tensors (zero-copy views). Crops follow
``pipelines.crops`` (counter-based RNG keyed by seed, epoch, sample, view).

Per-epoch values (seed, epoch, view sizes for progressive resolution) live in a
small int64 array owned by the loader; numba freezes captured arrays as
constants, so the compiled decoder reads it through its address (a 3-line
``inttoptr`` intrinsic), and the decoder is compiled once. Its per-batch loop is
``pipelines/ffcv_decode.py``, compiled once per machine (numba's disk cache).
"""
from __future__ import annotations

import os

import numpy as np

from fastssl.pipelines import DataError
from fastssl.pipelines.crops import view_params
# The state array's layout (int64: seed, epoch, row bytes, V, sizes), defined beside the kernel that reads it.
from fastssl.pipelines.ffcv_decode import ST_EPOCH, ST_NVIEWS, ST_ROW, ST_SEED, ST_SIZES
from fastssl.pipelines.ffcv_compat import decoder_base, import_ffcv, make_loader, next_batch, open_beton, start_epoch, \
    stop_epoch
from fastssl.pipelines.loader import LoaderBase
from fastssl.pipelines.prefetch import to_device

MAX_VIEWS = 64


def multiview_decoder(params: np.ndarray, state: np.ndarray, counts: np.ndarray, train: bool,
                      scratch: np.ndarray, per_thread: int, use_area: bool = True):
    """An ffcv decoder ``Operation`` for RGBImageField: decode once, V random-resized crops (+ flip) or one centre crop.

    ``params``: (V, 5) float64 from :func:`pipelines.crops.view_params`; ``state``: the loader's
    int64 state array (kept alive by the loader); ``counts``: int64 per-sample decode counter;
    ``scratch``: float32, ``per_thread`` elements for each numba thread (the area resize's row;
    a crop needing more falls back to OpenCV). ``use_area``: shrink crops with our area resize
    (``pipelines/resize.py``); False: OpenCV's INTER_AREA for every crop, as upstream ffcv.
    """
    from dataclasses import replace

    import numba
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.pipeline.allocation_query import AllocationQuery
    from fastssl.pipelines.ffcv_decode import voidptr_from_address as voidptr

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
            from ffcv.pipeline.compiler import Compiler

            from fastssl.pipelines import ffcv_decode

            ffcv_decode.load_symbols()
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            # Compiled once per machine (numba's disk cache). Several workers: the samples in parallel on
            # ffcv's numba threads; one: serially, as ffcv compiles its own operations then.
            kernel = ffcv_decode.decode_batch if Compiler.num_threads > 1 else ffcv_decode.decode_batch_serial
            prm = params.copy()
            st_addr, st_len = int(state.ctypes.data), int(state.shape[0])
            cnt_addr, cnt_len = int(counts.ctypes.data), int(counts.shape[0])
            scr_addr, scr_len = int(scratch.ctypes.data), int(scratch.shape[0])
            # ffcv_decode.decode_sample's options, an array (frozen in this closure): as scalars they would
            # reach the cached kernel as literals, one compilation per value (each image width, train or not).
            opts = np.array([int(per_thread), int(bool(train)), int(bool(use_area)), int(jpg)], np.int64)

            # What ffcv compiles for each loader: read the samples' bytes with its reader, then one call.
            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, half_storage, flip_storage = my_storage
                st = numba.carray(voidptr(st_addr), (st_len,), np.int64)
                cnt = numba.carray(voidptr(cnt_addr), (cnt_len,), np.int64)
                scr = numba.carray(voidptr(scr_addr), (scr_len,), np.float32)
                n = len(batch_indices)
                if destination.shape[1] != st[ST_ROW]:  # a stale epoch's buffers (sizes changed): never overrun
                    return destination[:n]
                addrs = np.empty(n, np.int64)
                nbytes = np.empty(n, np.int64)
                for i in range(n):
                    data = mem_read(metadata[batch_indices[i]]["data_ptr"], storage_state)
                    addrs[i] = data.ctypes.data
                    nbytes[i] = data.size
                kernel(batch_indices, destination, temp_storage, half_storage, flip_storage, metadata, addrs, nbytes,
                       st, cnt, scr, prm, opts)
                return destination[:n]

            decode.is_parallel = False  # the kernel has its own parallel loop
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

    def set_stride(self, stride: int) -> None:
        from fastssl.pipelines.ffcv_compat import order_changed

        super().set_stride(stride)
        order_changed(self._loader, self.order)

    def _write_state(self) -> None:
        self.state[ST_SEED], self.state[ST_EPOCH] = self.seed, self.epoch
        self.state[ST_ROW] = sum(3 * s * s for s in self.sizes)
        self.state[ST_NVIEWS] = len(self.sizes)
        self.state[ST_SIZES:ST_SIZES + len(self.sizes)] = self.sizes

    def _close(self) -> None:
        it, self._it = self._it, None
        if it is not None:  # stop the previous epoch's decoding thread before the state changes
            stop_epoch(it)

    def _copy_fence(self):
        """What the producer must wait for before it overwrites the slot just copied from: on CUDA an event
        recorded on the current stream after the copies were queued; on the CPU nothing (the copy is done)."""
        if self.device.type != "cuda":
            return None
        import torch

        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _raw_batches(self, order, nb: int):
        import torch

        self._close()
        it = start_epoch(self._loader, self.epoch)
        self._it = it
        offs = np.cumsum([0] + [3 * s * s for s in self.sizes])
        cuda = self.device.type == "cuda"
        # On the CPU with a finisher the crops stay in ffcv's slot (no copy): LoaderBase's finisher has read a raw
        # batch before it asks for the next one, so the slot is given back when this generator is resumed. Raw
        # crops handed to the caller (no finisher) may be kept for any time: copied out.
        hold = not cuda and self.finisher is not None
        held = None
        try:
            for b in range(nb):
                if held is not None:
                    it.slots.release(held)
                    held = None
                got = next_batch(it)
                if got is None:
                    break
                slot, out = got
                rows = out[self._out_image]                 # (B, sum 3 S^2) uint8 in ffcv's slot, pinned on CUDA hosts
                B = rows.shape[0]
                idx = torch.from_numpy(order[b * self.batch_size: b * self.batch_size + B].astype(np.int64))
                # The slot goes back with the copy's fence (pipelines.ffcv_compat.SlotFences): on CUDA an async
                # copy whose event ffcv's decoding thread waits on before writing into the slot again; on the
                # CPU a copy here (without one, kept crops would be views of the slot, overwritten
                # batches_ahead + 2 batches later) or, with a finisher, the slot held as above.
                if not hold:
                    rows = rows.to(self.device, non_blocking=True) if cuda else rows.clone()
                labels = None
                if self.labelled:
                    # Same dtype across the bus (a dtype change would convert on the host into pageable memory,
                    # and a copy from there waits for the stream); int64 on the device.
                    lab = out[self._out_label]
                    labels = (lab.to(self.device, non_blocking=True) if cuda else lab.clone()).reshape(B).long()
                if hold:
                    held = slot
                else:
                    it.slots.release(slot, self._copy_fence())
                crops = [rows[:, offs[v]:offs[v + 1]].unflatten(1, (s, s, 3)) for v, s in enumerate(self.sizes)]
                yield crops, labels, to_device(idx, self.device)  # pinned, non-blocking on CUDA
        finally:
            if held is not None:
                it.slots.release(held)
        self._it = None
