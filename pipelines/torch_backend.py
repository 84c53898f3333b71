"""torch back-end: an image folder through a torch ``DataLoader``, same contract as the ffcv one.

CPU path: each worker decodes an image ONCE (PIL) and cuts every view from it
(``pipelines.crops`` geometry, PIL box-resize, flip), returning uint8
``(S, S, 3)`` crops; the photometric stage runs batched on the device.
CUDA path: workers only read file bytes and the JPEG header (for the crop
geometry); the main process decodes the whole batch in one nvJPEG call
(:func:`decode_jpegs`: TorchCodec's ``decode_jpeg``, torchvision's where TorchCodec
is missing) and crops + resizes every view on the GPU with ``roi_align`` (adaptive
sampling = area-averaging, i.e. antialiased), all on the loader's side stream.
Non-JPEG files, and JPEGs that do not end with their end-of-image marker (truncated
ones among them), are decoded by the worker on the CPU.

Unreadable files: batches stay full (gathered losses need equal rows on every rank). A
sample whose file cannot be decoded is replaced by a deterministic pick from the same
rank's shard of the epoch (a hash of seed, epoch and slot), cropped with the slot's own
random stream; ``Batch.indices`` names the sample actually used. The loader records the
file in ``skipped``, remembers it (later epochs do not retry it) and logs one warning
line per epoch (``LoaderBase``).
"""
from __future__ import annotations

import logging
import sys

import numpy as np
import torch

from fastssl import fault_injection
from fastssl.pipelines import DataError
from fastssl.pipelines.crops import crop_params, sample_key, view_params
from fastssl.pipelines.loader import LoaderBase
from fastssl.pipelines.prefetch import to_device

log = logging.getLogger(__name__)

# Errors of the device, not of an image: a per-image retry would hide them (and run B host syncs).
DEVICE_FAULTS = (torch.OutOfMemoryError, *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()))
MAX_TRIES = 16          # replacement candidates per unreadable sample before the folder is declared unreadable
_REPLACE_STREAM = 1 << 20  # "view" numbers of the replacement hash, far from any real view


def _crop_geometry(h: int, w: int, params: np.ndarray, seed: int, epoch: int, index: int, train: bool) -> np.ndarray:
    """(V, 5) int64 rows (top, left, crop_h, crop_w, flip) for one image."""
    out = np.zeros((len(params), 5), np.int64)
    for v in range(len(params)):
        t, l, ch, cw, f = crop_params(h, w, params[v], seed, epoch, index, v, train)
        out[v] = (t, l, ch, cw, int(f))
    return out


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:120]}" if msg else type(e).__name__


class _PackedItems:
    """``(path, label)`` items as one NUL-separated string and an int64 array (see ``FolderViews.__getstate__``)."""

    def __init__(self, paths: str, labels: np.ndarray):
        self.paths, self.labels = paths, labels

    def unpack(self) -> list[tuple[str, int]]:
        if not len(self.labels):
            return []
        return list(zip(self.paths.split("\0"), self.labels.tolist()))


def worker_start_method(device, requested: str = "auto"):
    """How a DataLoader's workers start: a ``multiprocessing`` context (or None: torch's default).

    ``auto``: ``fork`` on Linux while CUDA is not initialised in this process (CPU runs: the
    workers inherit the dataset for free). Once CUDA is initialised, a forked worker holds a
    copy of every CUDA tensor of the parent, and any of them freed there (a garbage
    collection in the worker) calls into the caching allocator, which fails in a forked child
    ("CUDA error: initialization error") and kills the worker. So on a CUDA parent the workers
    start from a ``forkserver`` process that never touched CUDA, with this module imported
    there once; the dataset is pickled to each worker per epoch (``FolderViews.__getstate__``
    keeps that to a memory copy). ``fork`` / ``forkserver`` / ``spawn`` name a method outright.
    """
    import multiprocessing as mp

    if requested not in ("auto", "fork", "forkserver", "spawn"):
        raise ValueError(f"data.worker_start must be auto, fork, forkserver or spawn, not {requested!r}")
    if requested == "auto":
        if not sys.platform.startswith("linux"):
            return None
        cuda_parent = torch.device(device).type == "cuda" or torch.cuda.is_initialized()
        requested = "forkserver" if cuda_parent else "fork"
    ctx = mp.get_context(requested)
    if requested == "forkserver":
        ctx.set_forkserver_preload(["torch", "numpy", "fastssl.pipelines.torch_backend"])
    return ctx


class FolderViews(torch.utils.data.Dataset):
    """``ds[i] -> (payload, geo, label, index, slot, skipped)``: the views of slot ``i``.

    ``payload``: a tuple of uint8 (S, S, 3) crop arrays (CPU path, ``geo`` None), or for
    ``gpu_decode`` the JPEG bytes (1-D uint8) / a decoded (H, W, 3) uint8 image with its (V, 5)
    crop geometry; None when no readable replacement was found. ``index``: the sample used
    (``slot`` itself, or its replacement); ``skipped``: ``(index, path, reason)`` of the
    unreadable files met. ``shard`` (this rank's epoch order), ``bad`` (index -> reason, known
    unreadable) and ``cpu_decode`` (indices the GPU decoder refused and the CPU reads: sent as ``rgb``
    in ``bytes`` mode) are set by the loader before each epoch.
    """

    def __init__(self, items, sizes, params, seed: int, train: bool, gpu_decode: bool = False):
        self.items, self.sizes, self.params = items, list(sizes), params
        self.seed, self.epoch, self.train, self.gpu_decode = seed, 0, train, gpu_decode
        self.shard = np.arange(len(items), dtype=np.int64)
        self.bad: dict[int, str] = {}
        self.cpu_decode: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    # Pickled only where workers do not fork (``worker_start_method``: a CUDA parent). 1.28 M
    # (path, label) tuples take about a second to pickle, per worker per epoch; one string of paths
    # and one label array, packed once per loader, pickle as two memory copies.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        packed = state.pop("_packed", None)
        if packed is None or packed[0] is not self.items:
            packed = (self.items, "\0".join(p for p, _ in self.items),
                      np.fromiter((lab for _, lab in self.items), np.int64, len(self.items)))
            self.__dict__["_packed"] = packed
        state["items"] = _PackedItems(packed[1], packed[2])
        return state

    def __setstate__(self, state: dict) -> None:
        items = state["items"]
        if isinstance(items, _PackedItems):
            state["items"] = items.unpack()
        self.__dict__.update(state)

    def candidate(self, slot: int, k: int) -> int:
        """The ``k``-th replacement (k >= 1) of ``slot``: a hash of (seed, epoch, slot, k) into the shard."""
        key = int(sample_key(self.seed, self.epoch, slot, _REPLACE_STREAM + k))
        return int(self.shard[key % len(self.shard)])

    def __getitem__(self, i: int):
        if fault_injection.PLAN is not None:
            fault_injection.worker_fault(i)  # FASTSSL_FAULT=die@worker:I / hang@worker:I (tests)
        return self.fetch(i, "bytes" if self.gpu_decode else "crops")

    def fetch(self, slot: int, mode: str, first: int | None = None):
        """Slot ``slot``'s sample, or the first readable replacement; ``mode``: crops | bytes | rgb (see class)."""
        skipped = []
        j = slot if first is None else first
        for k in range(MAX_TRIES + 1):
            if k:
                j = self.candidate(slot, k)
            path, label = self.items[j]
            if j in self.bad:
                if j == slot:
                    skipped.append((j, path, self.bad[j]))
                continue
            try:
                payload, geo = self._load(path, slot, "rgb" if mode == "bytes" and j in self.cpu_decode else mode)
            except Exception as e:  # noqa: BLE001 - any undecodable file is replaced, never ends the epoch
                self.bad[j] = _reason(e)
                skipped.append((j, path, self.bad[j]))
                continue
            return payload, geo, label, j, slot, skipped
        return None, None, -1, slot, slot, skipped

    def _load(self, path: str, key: int, mode: str):
        """Decode (or read) ``path``; crops are keyed by the slot ``key``, not by the file's own index."""
        from PIL import Image

        from fastssl.pipelines.prepare import load_rgb, turn_of

        geometry = lambda h, w: _crop_geometry(h, w, self.params, self.seed, self.epoch, key, self.train)  # noqa: E731
        if mode == "bytes":
            with open(path, "rb") as f:
                data = f.read()
            # A JPEG that ends with its EOI marker goes to the GPU decoder; one that does not
            # (truncated, or trailing bytes) is decoded here, where a failure is caught.
            # An EXIF-rotated one is decoded here too: the GPU decoders do not apply the orientation.
            if data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9":
                with Image.open(path) as im:
                    w, h = im.size
                    turn = turn_of(im)
                if turn is None:
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), geometry(h, w)
            mode = "rgb"
        if mode == "rgb":  # decode here (CPU) and let the GPU crop it
            rgb = load_rgb(path)
            rgb = rgb if rgb.flags.writeable else rgb.copy()  # torch warns on read-only arrays
            return torch.from_numpy(rgb), geometry(rgb.shape[0], rgb.shape[1])
        with Image.open(path) as im:
            im = upright(im).convert("RGB")
            w, h = im.size
            crops = []
            for (t, l, ch, cw, f), s in zip(geometry(h, w), self.sizes):
                a = np.asarray(im.resize((s, s), Image.BILINEAR, box=(l, t, l + cw, t + ch)))
                crops.append(np.ascontiguousarray(a[:, ::-1]) if f else a)
        return tuple(crops), None


def upright(im):
    """``im`` turned by its EXIF orientation, as fastssl-prepare stores it (so the ffcv back-end reads it):
    every back-end crops the image as it is displayed. ``im`` itself when it needs no turn."""
    from PIL import Image

    from fastssl.pipelines.prepare import turn_of

    t = turn_of(im)
    return im if t is None else im.transpose(getattr(Image.Transpose, t))


def _collate(samples):
    """Stack crops per view (CPU path) or keep payload lists (GPU path); payload None if a slot found no replacement.

    Returns ``(payload, geo, labels, indices, slots, skipped)``.
    """
    skipped = [x for s in samples for x in s[5]]
    labels = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    idx = torch.tensor([s[3] for s in samples], dtype=torch.int64)
    slots = torch.tensor([s[4] for s in samples], dtype=torch.int64)
    if any(s[0] is None for s in samples):
        return None, None, labels, idx, slots, skipped
    if samples[0][1] is None:  # CPU path: V x (B, S, S, 3)
        crops = [torch.from_numpy(np.stack([s[0][v] for s in samples])) for v in range(len(samples[0][0]))]
        return crops, None, labels, idx, slots, skipped
    return [s[0] for s in samples], torch.from_numpy(np.stack([s[1] for s in samples])), labels, idx, slots, skipped


def _pad_chunks(hw: list[tuple[int, int]], budget_bytes: int) -> list[list[int]]:
    """Images grouped (smallest first) so each group's padded fp32 batch fits ``budget_bytes``."""
    order = sorted(range(len(hw)), key=lambda k: hw[k][0] * hw[k][1])
    chunks, cur, mh, mw = [], [], 0, 0
    for k in order:
        nh, nw = max(mh, hw[k][0] + 1), max(mw, hw[k][1] + 1)
        if cur and (len(cur) + 1) * 3 * nh * nw * 4 > budget_bytes:
            chunks.append(cur)
            cur, nh, nw = [], hw[k][0] + 1, hw[k][1] + 1
        cur.append(k)
        mh, mw = nh, nw
    return chunks + [cur] if cur else chunks


def crop_views(images: list[torch.Tensor], geo: torch.Tensor, sizes: list[int],
               budget_bytes: int = 1 << 30) -> list[torch.Tensor]:
    """Every view of a batch of decoded images: V x (B, S_v, S_v, 3) uint8, on the images' device.

    ``images``: B x (3, H_b, W_b) uint8 (sizes may differ); ``geo``: (B, V, 5) int64 (top, left,
    crop_h, crop_w, flip), a host tensor (pinned on CUDA hosts: the DataLoader pins it).
    ``roi_align`` with adaptive sampling (one sample per source pixel or
    more: area averaging, i.e. antialiased) does the crop and resize. The images are padded into
    one (b, 3, H_max + 1, W_max + 1) batch per chunk, so each view size is one ``roi_align`` call
    over all boxes of the chunk instead of one per image (a few launches per batch, not ~B x V:
    the per-image loop ran the H200 at ~500 img/s). The padding replicates the last row and
    column: roi_align clamps samples past an image's last pixel centre to that pixel, and a
    bilinear sample between pixel H-1 and a replicated copy of it gives the same value, so the
    result equals cropping each image alone (tested).

    The boxes, flips and row indices are built on the host from ``geo`` and copied without
    blocking (:func:`pipelines.prefetch.to_device`): a copy from pageable memory, or indexing a
    device tensor with a Python list, would make the host wait for the stream this runs on.
    """
    from torchvision.ops import roi_align

    B = len(images)
    device = images[0].device
    g = geo.cpu().to(torch.float32)                                       # (B, V, 5), host
    out = [torch.empty(B, s, s, 3, dtype=torch.uint8, device=device) for s in sizes]
    by_size: dict[int, list[int]] = {}
    for v, s in enumerate(sizes):
        by_size.setdefault(s, []).append(v)
    hw = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    for chunk in _pad_chunks(hw, budget_bytes):
        mh = max(hw[k][0] for k in chunk) + 1
        mw = max(hw[k][1] for k in chunk) + 1
        x = torch.empty(len(chunk), 3, mh, mw, dtype=torch.uint8, device=device)
        for j, k in enumerate(chunk):
            h, w = hw[k]
            x[j, :, :h, :w] = images[k]
            x[j, :, :h, w:] = images[k][:, :, w - 1:w]                    # replicate the last column
            x[j, :, h:, :] = x[j, :, h - 1:h, :]                          # ... and the last row (corner too)
        x = x.float()                                                     # (b, 3, mh, mw)
        rows = torch.tensor(chunk, dtype=torch.int64)                     # (b,) host
        idx = to_device(rows, device)
        gc = g[rows]                                                      # (b, V, 5) host
        for s, vs in by_size.items():
            r = gc[:, vs]                                                 # (b, k, 5) host
            bi = torch.arange(len(chunk), dtype=torch.float32)[:, None].expand(-1, len(vs))
            boxes = torch.stack([bi, r[..., 1], r[..., 0], r[..., 1] + r[..., 3], r[..., 0] + r[..., 2]], -1)
            boxes = to_device(boxes.reshape(-1, 5), device)               # (b*k, 5)
            flip = to_device(r[..., 4].reshape(-1).bool(), device).view(-1, 1, 1, 1)
            crops = roi_align(x, boxes, output_size=(s, s), spatial_scale=1.0,
                              sampling_ratio=-1, aligned=True)            # (b*k, 3, s, s)
            crops = torch.where(flip, crops.flip(-1), crops)
            crops = crops.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            crops = crops.reshape(len(chunk), len(vs), s, s, 3)
            for j, v in enumerate(vs):
                out[v][idx] = crops[:, j]
    return out


# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (>= 0.16), whose
# decode_jpeg takes a list and decodes it in one nvJPEG call on CUDA (the ground this back-end
# needs; libjpeg on the CPU, the same pixels as torchvision's). TorchCodec is used where it
# imports; torchvision stays the fallback (the GPU machine's torch 2.11 image has no TorchCodec),
# with its deprecation warning silenced around this one call until the fallback can go: when
# TorchCodec is a dependency and its CUDA batch decode has been timed against torchvision's.
JPEG_DECODER = "auto"  # auto (TorchCodec, else torchvision) | torchcodec | torchvision
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
_torchcodec_decode = None  # TorchCodec's decode_jpeg once imported; False: not importable here


def jpeg_decoder() -> str:
    """The decoder :func:`decode_jpegs` uses: ``torchcodec`` or ``torchvision`` (``JPEG_DECODER`` resolved)."""
    global _torchcodec_decode
    if JPEG_DECODER not in ("auto", "torchcodec", "torchvision"):
        raise ValueError(f"JPEG_DECODER must be auto, torchcodec or torchvision, not {JPEG_DECODER!r}")
    if JPEG_DECODER == "torchvision":
        return "torchvision"
    if _torchcodec_decode is None:
        try:
            from torchcodec.decoders import decode_jpeg as tc_decode
        except Exception as e:  # noqa: BLE001 - missing, or built for another torch (its libraries fail to load)
            if JPEG_DECODER == "torchcodec":
                raise ImportError(f"JPEG_DECODER='torchcodec' but torchcodec does not import: {e}") from e
            log.debug("torchcodec unavailable (%s): torchvision decodes JPEGs", e)
            tc_decode = False
        _torchcodec_decode = tc_decode
    return "torchcodec" if _torchcodec_decode else "torchvision"


_DECODE_STREAMS: dict = {}  # CUDA device index -> the stream its JPEG decodes run on (main process only)
# Decode stream -> the last decode's input bytes, kept until the next decode has drained the stream: a
# decoder that copies them to the device asynchronously (torchvision's does not; TorchCodec may) records
# no event in the pinned-memory allocator, which could otherwise hand the blocks to the next batch first.
_DECODE_INPUTS: dict = {}


def _decode_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DECODE_STREAMS:
        _DECODE_STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return _DECODE_STREAMS[index]


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if jpeg_decoder() == "torchcodec":
        return list(_torchcodec_decode(list(data), mode="RGB", device=device))
    import warnings

    import torchvision.io as tvio

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
        return list(tvio.decode_jpeg(list(data), mode=tvio.ImageReadMode.RGB, device=device))


def decode_jpegs(data: list[torch.Tensor], device) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 host tensors) -> B x (3, H, W) uint8 RGB on ``device``; one batched nvJPEG
    call on CUDA. A JPEG the decoder refuses raises RuntimeError or ValueError.

    On CUDA the decode runs on a stream of its own, drained on the host first, because nvJPEG's
    writes are not ordered after work already queued on the stream it is given:

    - nvJPEG's hardware engine (A100, H100, H200) writes when ``nvjpegDecodeBatched`` is called,
      whatever that stream holds; a device-side wait does not gate it, a host wait does
      (meta-pytorch/torchcodec#1634, measured on an H100 with nvJPEG 12.3 to 13.2);
    - torchvision's wrapper decodes on a private stream that does not wait for the caller's (seen
      in 0.28 on both nvJPEG paths, pytorch/vision#9606).

    The caching allocator hands a stream's new tensors blocks freed on that stream, possibly while
    kernels queued there have yet to read them. Decoding on the caller's stream (the loader's side
    stream) could therefore overwrite the previous batch's photometric temporaries, which are then
    read as fp32 or bf16, where JPEG bytes can spell NaN and inf. On its own stream the decoder only
    gets blocks freed there: earlier decoded images, whose reuse waits for the caller's stream
    (``record_stream``, checked on the host) to finish with them. The host drains only the decode
    stream, which holds nothing but earlier decodes, so the side stream's work stays off the host's
    path. The caller's stream waits for the decode on the device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _decode(data, device)
    caller = torch.cuda.current_stream(device)
    stream = _decode_stream(device)
    stream.synchronize()
    with torch.cuda.stream(stream):
        try:
            out = _decode(data, device)
        except BaseException:
            # A batch that fails part-way leaves the decoder's private stream writing into images that
            # die with this exception, unguarded by any event: wait for it before their blocks are reused.
            torch.cuda.synchronize(device)
            raise
    _DECODE_INPUTS[stream] = data
    caller.wait_stream(stream)
    for image in out:
        image.record_stream(caller)
    return out


def gpu_decode_and_crop(payloads: list[torch.Tensor], geo: torch.Tensor, sizes: list[int], device) -> list[torch.Tensor]:
    """Decode a batch on the GPU and cut its views: V x (B, S_v, S_v, 3) uint8 on ``device``.

    ``payloads``: per image either JPEG bytes (1-D uint8) or a decoded (H, W, 3) uint8 array;
    ``geo``: (B, V, 5) int64 (top, left, crop_h, crop_w, flip).
    """
    device = torch.device(device)
    jpeg_ix = [k for k, p in enumerate(payloads) if p.dim() == 1]
    images: list[torch.Tensor | None] = [None] * len(payloads)
    if jpeg_ix:  # one batched nvJPEG call; (3, H, W) uint8 each
        dec = decode_jpegs([payloads[k] for k in jpeg_ix], device)
        for k, im in zip(jpeg_ix, dec):
            images[k] = im
    for k, p in enumerate(payloads):
        if images[k] is None:
            images[k] = to_device(p, device).permute(2, 0, 1)
    return crop_views(images, geo, sizes)


class TorchLoader(LoaderBase):
    """Iterable of :class:`Batch` over an image folder; see :func:`pipelines.loader.build_loader`."""

    backend = "torch"
    worker_timeout: float = 0.0  # seconds a worker may take for a batch (the trainer sets data.worker_timeout); 0: forever

    def __init__(self, path: str, views, batch_size: int, device, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, workers: int = 2, train: bool = True,
                 finisher=None, gpu_decode: bool | None = None):
        from fastssl.pipelines.prepare import PrepareError, list_images

        self._setup(path, views, batch_size, device, seed=seed, rank=rank, world_size=world_size,
                    drop_last=drop_last, train=train, finisher=finisher)
        self.workers = int(workers)
        try:
            self.items, self.classes, _ = list_images(self.path)
        except PrepareError as e:
            raise DataError(str(e)) from e
        self.num_samples = len(self.items)
        self.num_classes = len(self.classes) if self.classes else None
        self.gpu_decode = (self.device.type == "cuda") if gpu_decode is None else bool(gpu_decode)
        self.dataset = FolderViews(self.items, self.sizes, view_params(self.specs), self.seed, self.train,
                                   self.gpu_decode)

    def _raw_batches(self, order, nb: int):
        order = order.astype(np.int64)
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size].tolist() for b in range(nb)]
        ds = self.dataset  # workers copy it per epoch (fork): epoch, sizes, shard, known-bad files
        ds.epoch, ds.sizes, ds.shard = self.epoch, list(self.sizes), order
        dl = torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            multiprocessing_context=worker_start_method(self.device, self.worker_start) if self.workers > 0 else None,
            prefetch_factor=4 if self.workers > 0 else None, timeout=self.worker_timeout if self.workers > 0 else 0)
        labelled = self.num_classes is not None
        from fastssl.faults import watched_batches

        # On CUDA this body runs on the loader's side stream (pipelines.prefetch); every copy is
        # non-blocking from pinned memory, so next() never waits for the GPU. A worker that dies or
        # exceeds worker_timeout ends the run with one line naming it and the samples it held.
        for payload, geo, labels, idx, slots, skipped in watched_batches(dl, batches, self.items, self.worker_timeout):
            self._note(skipped)
            if payload is None:
                self._unreadable()
            if geo is not None:
                try:
                    crops = gpu_decode_and_crop(payload, geo, self.sizes, self.device)
                except DEVICE_FAULTS:  # out of memory, a CUDA error: not a JPEG's fault; retrying image by image hides it
                    raise
                except (RuntimeError, ValueError):  # a JPEG the GPU decoder refuses: decode it (or its replacement) on the CPU
                    payload, geo, labels, idx = self._cpu_fallback(payload, geo, labels, idx, slots)
                    crops = gpu_decode_and_crop(payload, geo, self.sizes, self.device)
            else:
                crops = [to_device(c, self.device) for c in payload]
            yield (crops, to_device(labels, self.device) if labelled else None, to_device(idx, self.device))

    def _note(self, skipped) -> None:
        for j, path, reason in skipped:
            self.dataset.bad[j] = reason  # the next epoch's workers skip it without opening it
            self._skip(path, reason)

    def _unreadable(self):
        bad = self.skipped
        raise DataError(f"{self.path}: no readable replacement after {MAX_TRIES} tries ({len(bad)} unreadable files "
                        f"met, e.g. {bad[0][0]}: {bad[0][1]}): check the folder with `fastssl-prepare {self.path} "
                        f"OUT.beton`, which lists every unreadable file")

    def _cpu_fallback(self, payload, geo, labels, idx, slots):
        """Payloads the GPU decoder refuses, decoded on the CPU here (or replaced, if the CPU cannot either)."""
        payload, geo, labels, idx = list(payload), geo.clone(), labels.clone(), idx.clone()
        for k, p in enumerate(payload):
            if p.dim() != 1:
                continue
            try:
                decode_jpegs([p], self.device)
                continue
            except DEVICE_FAULTS:
                raise
            except (RuntimeError, ValueError):
                pass
            got = self.dataset.fetch(int(slots[k]), "rgb", first=int(idx[k]))
            self._note(got[5])
            if got[0] is None:
                self._unreadable()
            if got[3] == int(idx[k]):
                # The CPU reads what the GPU refused: from the next epoch its worker decodes it, so its
                # batch is not retried image by image every epoch (a CMYK JPEG, say).
                self.dataset.cpu_decode.add(got[3])
            payload[k], geo[k], labels[k], idx[k] = got[0], torch.from_numpy(got[1]), got[2], got[3]
        return payload, geo, labels, idx
