"""``build_loader``: one entry point for the ffcv, torch and DALI back-ends, and their one base, ``LoaderBase``.

Every back-end crops all views of a sample from ONE decode (geometry:
``pipelines.crops``), hands uint8 ``(B, S, S, 3)`` crops to the device, and the
photometric stage (``pipelines.augment.Augmenter``) turns them into normalised
float ``(B, 3, S, S)`` channels_last views. Evaluation loaders (``train=False``)
yield one centre-cropped view per image in dataset order, normalised only.

On CUDA every back-end's device work for batch b+1 runs on a side stream while the
caller's step b runs (``pipelines.prefetch``); on the CPU the photometric stage of
batch b+1 runs on a thread beside it (``LoaderBase._overlapped``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fastssl.pipelines import Batch, DataError, MissingDataError
from fastssl.pipelines.crops import EpochContract

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("auto", "ffcv", "torch", "dali", "webdataset")


class Normalize:
    """uint8 NHWC crops -> normalised float NCHW (channels_last memory), ImageNet statistics; bf16 on CUDA."""

    def __init__(self, device, dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255)

    def __call__(self, crops: list[torch.Tensor], step: int = 0) -> list[torch.Tensor]:
        # (B, S, S, 3) uint8 -> permute is a view whose memory is already channels_last
        return [((c.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std).to(self.dtype)
                .contiguous(memory_format=torch.channels_last) for c in crops]


def make_finisher(views, device, seed: int, train: bool, photometric: bool = True, dtype: torch.dtype | None = None,
                  impl: str = "auto"):
    """The stage after cropping: the recipe's photometric ``Augmenter`` (train), ``Normalize`` (eval), or None (raw crops).

    ``dtype``: of the views (default bf16 on CUDA, fp32 on the CPU); the trainer passes its step's precision.
    ``impl``: the ``Augmenter``'s (``data.photometric``).
    """
    if not photometric:
        return None
    if not train:
        return Normalize(device, dtype)
    from fastssl.pipelines.augment import Augmenter

    return Augmenter(list(views), device, seed=seed, dtype=dtype, impl=impl)


class LoaderBase(EpochContract):
    """The loader contract in one place; a back-end only yields raw batches (:meth:`_raw_batches`).

    From :class:`pipelines.crops.EpochContract`: ``order``, ``len()``, ``set_epoch``. Here:
    the common state (:meth:`_setup`), iteration with the per-batch tail (the photometric
    stage or normalisation, keyed by the global step, then :class:`Batch`), and the record
    of unreadable files: ``skipped`` lists ``(path, reason)``; each epoch that met any
    logs one warning line naming how many and the first few. Batches stay full: a
    back-end replaces an unreadable sample (torch) or leaves the file out of the dataset
    (DALI), never shortens a batch (gathered losses need equal rows on every rank).
    """

    backend = "base"  # the name in messages
    worker_start = "auto"  # how DataLoader workers start, where a back-end has them (data.worker_start)
    can_stride = True  # reads every k-th sample on request (set_stride); a streaming back-end cannot
    _skip_action = "replaced by other samples of this rank (batches stay full)"

    def _setup(self, path, views, batch_size: int, device, *, seed: int, rank: int, world_size: int,
               drop_last: bool, train: bool, finisher) -> None:
        self.path, self.views, self.batch_size = str(path), list(views), int(batch_size)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.drop_last, self.train, self.finisher = bool(drop_last), bool(train), finisher
        self.specs = self.views if self.train else self.views[:1]  # the views this loader cuts
        self.sizes = [v.size for v in self.specs]
        self.epoch = 0
        self._skipped: dict[str, str] = {}        # path -> reason, in the order met
        self._epoch_skipped: dict[str, str] = {}  # the current epoch's

    def set_stride(self, stride: int) -> None:
        """Read every ``stride``-th sample only (1: all): a smaller evaluation bank spread over every class."""
        stride = int(stride)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = stride

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every unreadable file met so far (replaced in its batch, or left out)."""
        return list(self._skipped.items())

    def _skip(self, path: str, reason: str) -> None:
        self._skipped.setdefault(path, reason)
        self._epoch_skipped[path] = reason

    def _raw_batches(self, order, nb: int):
        """Yield ``nb`` batches ``(crops, labels, indices)`` of this epoch's ``order``: V x uint8 (B, S, S, 3)
        crops, ``labels`` (B,) int64 or None and ``indices`` (B,) int64, all on the device."""
        raise NotImplementedError

    overlap_finish: bool | None = None  # None: on when the finisher runs on the CPU (see __iter__)
    # The device work off the caller's stream (pipelines.prefetch). None: on when the device is CUDA;
    # True on the CPU runs the same code without streams (tests); False: all of it inside next(), on
    # the caller's stream (the synchronous arm of an A/B).
    stream_prefetch: bool | None = None
    # Batches whose device work is enqueued before the current one is handed over. None: 1 on CUDA,
    # 0 without streams (no device work to overlap: a batch held ahead would only cost memory).
    prefetch_ahead: int | None = None

    def _finish(self, step: int, raw) -> Batch:
        crops, labels, indices = raw
        views = self.finisher(crops, step) if self.finisher is not None else crops
        return Batch(views=views, labels=labels, indices=indices)

    def _iteration_mode(self) -> str:
        """``stream`` (prefetch on a side stream; no streams on the CPU), ``thread`` (the finisher of batch
        b+1 on a thread, CPU), or ``sync`` (everything inside ``next()``)."""
        stream = self.stream_prefetch
        if stream is None:
            stream = self.device.type == "cuda"
        if stream:
            return "stream"
        overlap = self.overlap_finish
        if overlap is None:
            overlap = self.finisher is not None and self.device.type == "cpu"
        return "thread" if overlap else "sync"

    def __iter__(self):
        order = self.order(self.epoch)
        nb = len(self)
        base = self.epoch * nb  # deterministic photometric stream: same (seed, epoch, batch) -> same views
        self._epoch_skipped = {}
        mode = self._iteration_mode()
        try:
            if mode == "stream":
                from fastssl.pipelines.prefetch import SideStream, prefetch

                side = getattr(self, "_side", None)
                if side is None or side.device != self.device:
                    side = self._side = SideStream(self.device)
                ahead = self.prefetch_ahead
                if ahead is None:
                    ahead = 1 if side.stream is not None else 0
                yield from prefetch(self._raw_batches(order, nb), lambda b, raw: self._finish(base + b, raw),
                                    side, ahead)
            elif mode == "thread":
                yield from self._overlapped(base, self._raw_batches(order, nb))
            else:
                for b, raw in enumerate(self._raw_batches(order, nb)):
                    yield self._finish(base + b, raw)
        finally:
            self._report_skipped()

    def _overlapped(self, base: int, raws):
        """Finish batch b+1 (photometric stage, on its own thread pool) while the caller trains on batch b.

        On the CPU the finisher ran inside ``next()``, on the step's critical path, while one core
        often idled in the step's single-threaded stretches. A raw batch is taken only after the
        previous one is finished, because ffcv reuses a raw batch's memory slot once its consumer
        moves on (its ``batches_ahead + 2`` slots): at most one raw batch is held here.
        """
        from concurrent.futures import ThreadPoolExecutor

        pool = getattr(self, "_finish_pool", None)
        if pool is None:
            pool = self._finish_pool = ThreadPoolExecutor(1, thread_name_prefix="fastssl-finish")
        ready, fut = None, None
        try:
            for b, raw in enumerate(raws):
                fut = pool.submit(self._finish, base + b, raw)
                if ready is not None:
                    yield ready
                ready, fut = fut.result(), None
            if ready is not None:
                yield ready
        finally:
            if fut is not None:  # the caller stopped early: never leave a thread reading a raw slot
                try:
                    fut.result()
                except Exception:
                    pass

    def _report_skipped(self, first: int = 3) -> None:
        """One warning line for the epoch's unreadable files (how many, the first few, where the rest are)."""
        bad = list(self._epoch_skipped.items())
        if not bad:
            return
        root = self.path.rstrip("/") + "/"
        names = ", ".join(f"{p[len(root):] if p.startswith(root) else p} ({r})" for p, r in bad[:first])
        more = f" and {len(bad) - first} more" if len(bad) > first else ""
        log.warning(f"{self.backend} back-end, epoch {self.epoch}, rank {self.rank}: "
                    f"{len(bad)} unreadable file(s) in {self.path} {self._skip_action}: {names}{more}; "
                    f"loader.skipped lists them, `fastssl-prepare {self.path} OUT.beton` checks the whole folder")


def _field(cfg, name, default=None):
    return getattr(cfg, name, default) if cfg is not None else default


def resolve_backend(path: str, backend: str) -> str:
    """``auto``: ffcv for a ``.beton``, webdataset for tar shards, torch for an image folder."""
    if backend not in BACKENDS:
        from fastssl.registry import closest

        raise ValueError(f"unknown data back-end {backend!r}: {closest(backend, list(BACKENDS))}")
    from fastssl.pipelines.webdataset_backend import is_shard_spec

    if is_shard_spec(path):  # tar shards: a .tar, a folder of them, a glob or brace pattern, pipe:CMD
        if backend in ("auto", "webdataset", "torch"):
            return "webdataset"
        raise DataError(f"{path} names webdataset tar shards: backend=webdataset (or auto) reads them, not "
                        f"{backend}; or convert them with `fastssl-prepare {path} OUT.beton`")
    if backend == "webdataset":
        raise DataError(f"backend=webdataset reads tar shards (a .tar, a folder of them, a glob or brace "
                        f"pattern, pipe:CMD), but {path} is none of these")
    is_beton = str(path).endswith(".beton") or (Path(path).is_file())
    if backend == "auto":
        return "ffcv" if is_beton else "torch"
    if is_beton and backend != "ffcv":
        raise DataError(f"{path} is an ffcv .beton: only backend=ffcv (or auto) reads it; for {backend}, "
                         f"give the image folder it was made from")
    if not is_beton and backend == "ffcv":
        raise DataError(f"backend=ffcv reads a .beton, but {path} is a folder: convert it with "
                         f"`fastssl-prepare {path} {str(path).rstrip('/')}.beton`")
    return backend


def build_loader(data_cfg, aug_views, split: str, batch_size: int, device, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, backend: str | None = None, workers: int | None = None,
                 train: bool = True, photometric: bool = True, in_memory: bool | None = None,
                 dtype: torch.dtype | None = None, area_resize: bool = True):
    """A loader of :class:`Batch` for ``split`` ("train"/"val": the path ``data_cfg.<split>``, or a path itself).

    ``aug_views``: the recipe's ``ViewSpec`` list (``train=False`` uses ``aug_views[0].size``, centre crop).
    ``data_cfg`` is duck-typed (``train``, ``val``, ``backend``, ``workers``, ``in_memory``); explicit
    keyword arguments win. ``photometric=False`` yields the uint8 ``(B, S, S, 3)`` crops on ``device``
    (the ``loader`` benchmark stage). ``dtype``: of the normalised views (default bf16 on CUDA, fp32
    on the CPU; the trainer passes fp32 for ``train.precision=fp32``). ``area_resize`` (ffcv back-end):
    shrink crops with our area resize; False resizes with OpenCV's INTER_AREA, as upstream ffcv (a
    benchmark arm, ``fastssl-bench loader --backend ffcv-opencv``). The loader has ``len()`` (batches per epoch),
    ``set_epoch(epoch, global_size=None)``, ``num_samples`` (this dataset's size, all ranks),
    ``num_classes`` (None when unlabelled).
    """
    named = split in ("train", "val", "test")
    path = _field(data_cfg, split, None) if named else split
    if not path:
        raise DataError(f"data.{split} is empty: give a .beton file or an image folder")
    path = os.fspath(path)
    from fastssl.pipelines.webdataset_backend import is_shard_spec

    if not is_shard_spec(path) and not os.path.exists(path):  # a shard pattern is no path: list_shards names a gap
        where = f"data.{split}={path}" if named else path
        raise MissingDataError(f"{where} does not exist: give a .beton file (`fastssl-prepare SRC OUT.beton`) or an "
                               f"image folder; `fastssl-prepare synthetic DIR` writes the built-in data")
    backend = backend or _field(data_cfg, "backend", "auto")
    workers = int(workers if workers is not None else _field(data_cfg, "workers", 2))
    in_memory = bool(in_memory if in_memory is not None else _field(data_cfg, "in_memory", True))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    views = list(aug_views)
    if not views:
        raise ValueError("aug_views is empty: give the recipe's views (AugConfig.resolved_views())")
    kind = resolve_backend(path, backend)
    if not area_resize and kind != "ffcv":
        raise ValueError(f"area_resize=False (OpenCV's resize) is an option of the ffcv back-end, not of {kind}")
    finisher = make_finisher(views if train else views[:1], device, seed, train, photometric, dtype,
                             str(_field(data_cfg, "photometric", "auto")))
    common = dict(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last if train else False,
                  workers=workers, train=train, finisher=finisher)
    if kind == "ffcv":
        from fastssl.pipelines.ffcv_compat import import_ffcv

        try:
            import_ffcv()  # torch's thread count survives ffcv's import; a missing ffcv names its install
        except ImportError as e:
            if backend != "auto":
                raise
            raise ImportError(f"{e}; or train from the image folder the .beton was made from (data.{split}=FOLDER: "
                              f"the torch back-end, decoding on the GPU)") from None
        from fastssl.pipelines.ffcv_backend import FFCVLoader

        return FFCVLoader(path, views, batch_size, device, in_memory=in_memory, area_resize=area_resize, **common)
    if kind == "webdataset":
        from fastssl.pipelines.webdataset_backend import WebDatasetLoader

        loader = WebDatasetLoader(path, views, batch_size, device,
                                  shuffle_buffer=int(_field(data_cfg, "shuffle_buffer", 1000)), **common)
        loader.worker_start = str(_field(data_cfg, "worker_start", "auto"))
        return loader
    if kind == "dali":
        from fastssl.pipelines.dali_backend import DALILoader

        return DALILoader(path, views, batch_size, device, **common)
    from fastssl.pipelines.torch_backend import TorchLoader

    loader = TorchLoader(path, views, batch_size, device, **common)
    loader.worker_start = str(_field(data_cfg, "worker_start", "auto"))
    return loader
