"""NVIDIA DALI back-end: an image folder, decoded once per sample, every view cropped from that decode.

Graph per epoch: ``fn.readers.file`` over this rank's file list in our epoch
order (``pipelines.crops.epoch_order``, the same shards as every back-end; the
reader's label carries the dataset index, mapped to the class on the host) ->
``fn.decoders.image`` (``device="mixed"``: nvJPEG on the GPU; ``"cpu"``:
libjpeg-turbo, the CPU-only mode with ``device_id=None``) -> per view
``fn.random_resized_crop`` (scale/ratio of the view spec) + ``fn.flip`` with a
``fn.random.coin_flip``; evaluation: resize the short side to size / 0.875 and
centre crop. All randomness is DALI's own, seeded with f(seed, epoch, rank).

Decoder fallback: the mixed decoder sends what the hardware JPEG decoder cannot
take (``hw_decoder_load`` share, odd subsamplings, CMYK, ...) to nvJPEG's CUDA
path, and formats nvJPEG cannot decode at all (PNG, ...) to DALI's CPU decoders,
all inside one op. What no decoder can read (a truncated file) would stop the
pipeline, so files are validated once (a full decode, cached under
``~/.cache/fastssl``) and unreadable ones are left out of the dataset: batches stay
full, the epoch never ends early, ``loader.skipped`` lists them with the reason and
each epoch prints one warning line (``LoaderBase``).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from fastssl.pipelines import DataError
from fastssl.pipelines.crops import EVAL_CROP_RATIO
from fastssl.pipelines.loader import LoaderBase

DALI_INSTALL = "the dali back-end needs NVIDIA DALI: pip install 'fastssl[dali]'"


def _valid_items(items, workers: int):
    """``(entries, bad)``: ``(listing index, path, label)`` of the files that decode, and ``{path: reason}`` of
    those that do not; the verdict per listing is cached in
    ``fastssl.cache.cache_dir()/dali-valid-<sha1>.json`` (default ``~/.cache/fastssl``)."""
    from fastssl.pipelines.prepare import validate

    h = hashlib.sha1()
    for p, label in items:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    from fastssl.cache import cache_dir

    cache = cache_dir() / f"dali-valid-{h.hexdigest()}.json"
    try:
        bad = json.loads(cache.read_text())
        if isinstance(bad, list):  # the earlier format: paths only
            bad = {p: "cannot be decoded" for p in bad}
        bad = {str(p): str(r) for p, r in dict(bad).items()}
    except (OSError, ValueError, TypeError):
        bad = {p: why for p, why, _ in validate([p for p, _ in items], workers, progress=False) if why}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(dict(sorted(bad.items()))))
        except OSError:
            pass
    return [(i, p, label) for i, (p, label) in enumerate(items) if p not in bad], bad


class DALILoader(LoaderBase):
    """Iterable of :class:`Batch` over an image folder through DALI; see :func:`pipelines.loader.build_loader`."""

    backend = "dali"
    _skip_action = "left out of the dataset (found when the loader was built; batches stay full)"

    def __init__(self, path: str, views, batch_size: int, device, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, workers: int = 2, train: bool = True,
                 finisher=None, validate: bool = True):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError(DALI_INSTALL) from e
        from fastssl.pipelines.prepare import PrepareError, list_images

        self._setup(path, views, batch_size, device, seed=seed, rank=rank, world_size=world_size,
                    drop_last=drop_last, train=train, finisher=finisher)
        self.workers = int(workers)
        try:
            items, self.classes, _ = list_images(self.path)
        except PrepareError as e:
            raise DataError(str(e)) from e
        self.num_classes = len(self.classes) if self.classes else None
        if validate:
            self.entries, bad = _valid_items(items, self.workers)
            for p, why in bad.items():
                self._skip(p, why)
        else:
            self.entries = [(i, p, l) for i, (p, l) in enumerate(items)]
        if not self.entries:
            raise DataError(f"{self.path}: no image decodes ({len(items)} files, e.g. {items[0][0]}: "
                            f"{self._skipped.get(items[0][0], '?')}): check it with "
                            f"`fastssl-prepare {self.path} OUT.beton`")
        self.num_samples = len(self.entries)
        self.labels = np.array([label for _, _, label in self.entries], np.int64)
        self.index = np.array([i for i, _, _ in self.entries], np.int64)  # listing index of each valid entry
        self.gpu = self.device.type == "cuda"
        if self.gpu and self.device.index is None:  # DALI needs the index; "cuda" means the current device
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _pipeline(self, files: list[str], ids: list[int]):
        from nvidia.dali import fn, pipeline_def, types

        dali_seed = int(np.random.default_rng([self.seed, self.epoch, self.rank]).integers(0, 2**31 - 1))
        dec_dev = "mixed" if self.gpu else "cpu"
        specs, sizes, train = self.specs, self.sizes, self.train

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.workers),
                      device_id=self.device.index if self.gpu else None, seed=dali_seed,
                      prefetch_queue_depth=2, exec_dynamic=True)
        def pipe():
            jpegs, ids_ = fn.readers.file(files=files, labels=ids, random_shuffle=False, name="reader",
                                          pad_last_batch=True)
            # hw_decoder_load: share of JPEGs for the A100/H100 hardware decoder; the rest go to nvJPEG CUDA,
            # anything nvJPEG cannot read to the CPU decoder (DALI's built-in fallback).
            kw = {"hw_decoder_load": 0.65} if self.gpu else {}
            images = fn.decoders.image(jpegs, device=dec_dev, output_type=types.RGB, **kw)  # decoded ONCE
            outs = []
            for v, s in zip(specs, sizes):
                if train:
                    crop = fn.random_resized_crop(images, size=(s, s), random_area=(v.scale_min, v.scale_max),
                                                  random_aspect_ratio=(v.ratio_min, v.ratio_max),
                                                  antialias=True)
                    crop = fn.flip(crop, horizontal=fn.random.coin_flip(probability=v.flip_p))
                else:
                    crop = fn.resize(images, resize_shorter=s / EVAL_CROP_RATIO, antialias=True)
                    crop = fn.crop(crop, crop=(s, s), out_of_bounds_policy="trim_to_shape")
                outs.append(crop)
            return (ids_, *outs)

        p = pipe()
        p.build()
        return p

    def _raw_batches(self, order, nb: int):
        self._epoch_skipped = dict(self._skipped)  # left out of every epoch
        order = order.astype(np.int64)
        if len(order) == 0:
            return
        p = self._pipeline([self.entries[i][1] for i in order], [int(i) for i in order])
        labelled = self.num_classes is not None
        seen = 0
        try:
            for b in range(nb):
                # On CUDA, outputs "on" torch's current stream (ordered before whatever torch queues next on
                # it, the loader's side stream when prefetching): without a stream DALI's run() is host-synchronous.
                outs = p.run(torch.cuda.current_stream(self.device)) if self.gpu else p.run()
                take = min(self.batch_size, len(order) - seen)
                # The reader's ids are a CPU output (the pipeline's samples carry their dataset index): no sync.
                ids = np.array(outs[0].as_cpu().as_tensor()).reshape(-1)[:take].astype(np.int64)
                seen += take
                crops = [_to_torch(o, self.device)[:take] for o in outs[1:]]           # V x (B, S, S, 3) uint8
                rows = np.stack([self.index[ids], self.labels[ids]] if labelled else [self.index[ids]])
                on_dev = _rows_to_device(rows, self.device)                            # (1 or 2, B) int64
                yield crops, (on_dev[1] if labelled else None), on_dev[0]
        finally:
            del p

    def _finish(self, step: int, raw):
        """Without a finisher on the GPU (raw uint8 crops, ``photometric=False``), the crops are copied out of
        DALI's memory on the side stream: the hand-over's ``record_stream`` cannot hold memory torch did not
        allocate, so DALI could reuse it while the consumer's stream still reads it. With a finisher only the
        side stream reads DALI's memory, in order."""
        if self.finisher is None and self.gpu:
            crops, labels, indices = raw
            raw = ([c.clone() for c in crops], labels, indices)
        return super()._finish(step, raw)


# DLPack device types (dlpack.h ``DLDeviceType``), as ``__dlpack_device__`` reports them.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST = 1, 2, 3


def _dlpack_device(t) -> tuple[int, int]:
    """``(DLPack device type, device index)`` of a DALI tensor.

    DALI 2.x's ``TensorGPU`` has no ``.device`` attribute: it has a ``device_id()`` method,
    ``__dlpack__``/``__dlpack_device__`` and ``__cuda_array_interface__``; ``TensorCPU`` has
    ``__dlpack_device__`` and ``__array_interface__``. Older builds without DLPack: the
    CUDA array interface marks a GPU tensor.
    """
    if hasattr(t, "__dlpack_device__"):
        kind, index = t.__dlpack_device__()
        return int(kind), int(index)
    if hasattr(t, "__cuda_array_interface__"):
        dev = getattr(t, "device_id", 0)
        return _DL_CUDA, int(dev() if callable(dev) else dev)
    return _DL_CPU, 0


def _to_torch(tl, device) -> torch.Tensor:
    """A DALI TensorList of equal-shape samples -> one torch tensor ``(B, ...)`` on ``device``.

    Zero-copy through DLPack, on both devices. The pipeline runs with ``exec_dynamic=True``, whose
    outputs own their memory (reference-counted, never recycled by the next ``run()``, DALI >= 1.44),
    so a torch tensor may outlive the iteration. For a GPU output ``torch.from_dlpack`` passes torch's
    current stream on that device to ``__dlpack__(stream=...)``, and DALI makes that stream wait for
    its own work (an event, no host sync): kernels queued after this call read finished crops, also
    when the caller iterates on a side stream. A tensor on another device than ``device`` is moved
    there without blocking (not the case in our pipeline: its ``device_id`` is ``device.index``).
    """
    t = tl.as_tensor() if hasattr(tl, "as_tensor") else tl
    kind, index = _dlpack_device(t)
    src = torch.device("cuda", index) if kind == _DL_CUDA else torch.device("cpu")
    out = torch.from_dlpack(t)
    device = torch.device(device)
    same = src.type == device.type and (src.type == "cpu" or device.index in (None, src.index))
    return out if same else out.to(device, non_blocking=True)


def _rows_to_device(rows: np.ndarray, device) -> torch.Tensor:
    """``(k, B)`` int64 host rows (indices, labels) -> ``device`` in one copy, pinned and non-blocking on CUDA
    (:func:`pipelines.prefetch.to_device`: a copy from pageable memory would make the host wait for the stream)."""
    from fastssl.pipelines.prefetch import to_device

    return to_device(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)), device)
