"""Everything fastssl does to ffcv's internals, in one place (checked against ffcv's version).

The ffcv back-end (``pipelines/ffcv_backend.py``) goes through this module for: the import
(thread count, below), the ``.beton`` checks and its metadata columns found by position
(:func:`open_beton`), the decoder's base class (:func:`decoder_base`), our epoch order in
ffcv's ``Loader`` (:func:`make_loader`, :func:`start_epoch`), the epoch iterator's
private queue (:func:`next_batch`, :func:`stop_epoch`) and the reuse of its batch slots
(:class:`SlotFences`); ``fastssl-prepare`` goes through it for the writer's progress bar
(:func:`writer_progress`). The decoder itself uses ffcv's
public extension API (``Operation``, ``AllocationQuery``, ``Compiler``, ``libffcv``).

ffcv 1.0.x has two process-wide side effects on torch's intra-op thread count:

- ``ffcv/pipeline/compiler.py`` calls ``torch.set_num_threads(1)`` at import time, so a
  trainer that chose its threads before the first ``import ffcv`` computed on one thread
  (every CPU run computed on 1 of 2 cores);
- ``Compiler.set_num_threads`` sets torch's count again every epoch, from the loader thread.

:func:`import_ffcv` imports it with torch's count kept, and patches the second away (numba's
thread count, which ffcv's decoders use, is still set).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np
import torch

FFCV_INSTALL = ("ffcv is not installed: apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
                "pip install 'fastssl[ffcv]'")
TESTED_VERSIONS = ("1.0.",)  # the internals patched below are those of ffcv 1.0.x


def import_ffcv():
    """``import ffcv`` without changing torch's thread count; returns the module (ImportError names the install)."""
    n = torch.get_num_threads()
    try:
        with _plain_mode_table():
            import ffcv
        from ffcv.pipeline import compiler as ffcv_compiler
    except ImportError as e:
        raise ImportError(FFCV_INSTALL) from e
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    import importlib.metadata as md

    try:  # ffcv 1.0.2's own __version__ still says 0.0.3rc1: ask the installed distribution
        version = md.version("ffcv")
    except md.PackageNotFoundError:
        version = ""
    if version and not version.startswith(TESTED_VERSIONS):
        import warnings

        warnings.warn(f"ffcv {version} is untested with fastssl (tested: {TESTED_VERSIONS}); its loader internals "
                      f"may have moved", stacklevel=2)
    _keep_torch_threads(ffcv_compiler)
    return ffcv


@contextlib.contextmanager
def _plain_mode_table():
    """Import ffcv with ``numba.typed.Dict`` as a plain dict.

    ffcv 1.0.x builds one typed dict at import, ``ffcv.fields.rgb_image.IMAGE_MODES = {"jpg": 0,
    "raw": 1}``, and reads it only from Python (its decoders capture the two ints). Building it
    compiles numba's typed-dict code, which numba does not cache: 4.4-5.3 s in every process that
    imported ffcv (2-core CPU machine; measured in BENCHMARKS.md). A plain dict gives the same lookups.
    """
    import numba.typed as typed

    had = "Dict" in vars(typed)  # numba resolves Dict lazily (module __getattr__)
    saved = vars(typed).get("Dict")
    typed.Dict = dict
    try:
        yield
    finally:
        if had:
            typed.Dict = saved
        else:
            del typed.Dict


def writer_progress(factory):
    """``with writer_progress(factory):`` ffcv's ``DatasetWriter`` reports through ``factory(total=...)``.

    ffcv 1.0's writer calls the module-level name ``ffcv.writer.tqdm(total=N)`` for its bar (no label,
    on stderr, even when the caller is quiet); the name is swapped for the duration of the block.
    """
    import ffcv.writer

    @contextlib.contextmanager
    def swapped():
        saved = ffcv.writer.tqdm
        ffcv.writer.tqdm = lambda total=None, **kw: factory(total=total)
        try:
            yield
        finally:
            ffcv.writer.tqdm = saved

    return swapped()


def _keep_torch_threads(ffcv_compiler) -> None:
    """Make ffcv's ``Compiler.set_num_threads`` set numba's threads only.

    Upstream also calls ``torch.set_num_threads(workers)`` (process-wide) every epoch, from
    its loader thread; with the decoders busy on the same cores that oversubscribes the CPU
    and undoes the trainer's own choice of torch threads.
    """
    if getattr(ffcv_compiler.Compiler, "_fastssl_patched", False):
        return

    def set_num_threads(cls, n):
        n = n if n >= 1 else (os.cpu_count() or 1)
        cls.num_threads = n
        ffcv_compiler.set_num_threads(n)  # numba's

    ffcv_compiler.Compiler.set_num_threads = classmethod(set_num_threads)
    ffcv_compiler.Compiler._fastssl_patched = True


# ----------------------------------------------------------------------------- .beton files

# What fastssl-prepare writes; a .beton is read by field name (``image`` required, ``label`` optional).
FIELD_LAYOUT = {"image": "RGBImageField", "label": "IntField"}


def _prepare_fix(path: str) -> str:
    return f"re-create it with `fastssl-prepare SRC {path}` (SRC: the image folder, or `synthetic`)"


class BetonInfo:
    """What the ffcv back-end needs from a checked ``.beton`` header: sizes, labels, image sizes.

    ffcv stores per-sample metadata as one unnamed structured array (numpy calls its
    columns ``f0``, ``f1``, ... in field order); this finds the columns by field name.
    """

    def __init__(self, path: str, reader):
        self.path = path
        self.num_samples = int(reader.num_samples)
        self.field_names = list(reader.field_names)
        self._meta = reader.metadata

    def column(self, field: str) -> np.ndarray:
        """Metadata of ``field`` for every sample (ffcv's ``f<position>`` column)."""
        return self._meta[f"f{self.field_names.index(field)}"]

    @property
    def labels(self) -> np.ndarray | None:
        return np.asarray(self.column("label"), np.int64) if "label" in self.field_names else None

    @property
    def widths(self) -> np.ndarray:
        return np.asarray(self.column("image")["width"])

    @property
    def heights(self) -> np.ndarray:
        return np.asarray(self.column("image")["height"])


def open_beton(path: str) -> BetonInfo:
    """Check that ``path`` is a complete ``.beton`` of fastssl's layout, before ffcv maps it.

    ffcv's ``Reader`` trusts the file: a truncated one fails with ``negative dimensions
    are not allowed`` or, cut inside its allocation table, loads and then reads past the
    end. Raises :class:`fastssl.pipelines.DataError` (one line: the file, what is wrong,
    the fix) for a truncated or corrupt file, one of another ffcv format version or of
    other fields, and an empty one.
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType

    from fastssl.pipelines import DataError

    path = os.fspath(path)
    fix = _prepare_fix(path)
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        raise DataError(f"{path} is truncated ({size} bytes, shorter than a .beton header): {fix}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise DataError(f"{path} is not an ffcv .beton of format version {CURRENT_VERSION} (its header says "
                        f"{int(header['version'])}: another ffcv version's file, or not a .beton): {fix}")
    nf, n = int(header["num_fields"]), int(header["num_samples"])
    descs_end = HeaderType.itemsize + nf * FieldDescType.itemsize
    if not 1 <= nf <= 64 or size < descs_end:
        raise DataError(f"{path} is truncated or corrupt (header: {nf} fields, file {size} bytes): {fix}")
    table_ptr = int(header["alloc_table_ptr"])
    if table_ptr > size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize or table_ptr < descs_end:
        raise DataError(f"{path} is truncated ({size} bytes; its header places the sample table at byte "
                        f"{table_ptr}): {fix}")
    descs = np.fromfile(path, dtype=FieldDescType, count=nf, offset=HeaderType.itemsize)
    unknown = [int(t) for t in descs["type_id"] if int(t) not in TYPE_ID_HANDLER or TYPE_ID_HANDLER[int(t)] is None]
    if unknown:
        raise DataError(f"{path} has fields of unknown ffcv types {unknown} (corrupt, or written with custom "
                        f"fields): fastssl reads fields {_layout()}; {fix}")
    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise DataError(f"{path} is truncated or corrupt (ffcv cannot read it: {type(e).__name__}: {e}): {fix}") from e
    types = {name: type(h).__name__ for name, h in reader.handlers.items()}
    want = {"image": RGBImageField, "label": IntField}
    if "image" not in types or any(not isinstance(reader.handlers[k], t) for k, t in want.items() if k in types):
        have = ", ".join(f"{k}: {v}" for k, v in types.items())
        raise DataError(f"{path} has fields ({have}); fastssl reads {_layout()}: {fix}")
    if n == 0:
        raise DataError(f"{path} holds no samples: {fix}")
    table = reader.alloc_table
    if len(table) == 0:
        raise DataError(f"{path} is truncated (its sample table, the last part written, is missing): {fix}")
    if len(reader.metadata) != n or table_ptr < descs_end + reader.metadata.nbytes:
        raise DataError(f"{path} is truncated or corrupt (its header says {n} samples, the file holds "
                        f"{len(reader.metadata)}): {fix}")
    ends = table["ptr"].astype(np.uint64) + table["size"].astype(np.uint64)
    ptrs = np.asarray(BetonInfo(path, reader).column("image")["data_ptr"])
    if int(ends.max()) > table_ptr or not np.isin(ptrs, table["ptr"]).all():
        raise DataError(f"{path} is truncated or corrupt (sample data outside the file's sample table): {fix}")
    return BetonInfo(path, reader)


def _layout() -> str:
    return "image: RGBImageField, label: IntField (optional)"


# ----------------------------------------------------------------------------- ffcv's loader internals

def decoder_base():
    """The class a multi-view image decoder must subclass.

    ffcv takes a pipeline's first operation as the field's decoder only if it is an
    instance of the field's own decoder class (``SimpleRGBImageDecoder`` for RGBImageField).
    """
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder

    return SimpleRGBImageDecoder


def make_loader(info: BetonInfo, pipelines: dict, sample_order, *, batch_size: int, workers: int, in_memory: bool,
                drop_last: bool, seed: int, batches_ahead: int):
    """``(loader, outputs)``: an ffcv ``Loader`` whose epoch order is ``sample_order(epoch) -> uint64 indices``
    (ours, not ffcv's), and ``{field name: position}`` in the tuple each of its batches is.

    Fields of the file without a pipeline in ``pipelines`` are not decoded. ffcv's ``order=``
    takes a ``TraversalOrder`` class built from the loader; replacing the built instance (and
    the cached first epoch's order) keeps its distributed options out of it. A batch holds the
    fields in the file's order (ffcv's ``pipeline_specs``), not in the order of ``pipelines``.
    """
    from ffcv.loader import Loader, OrderOption

    pipelines = {**{name: None for name in info.field_names}, **pipelines}
    # in_memory: the OS page cache (mmap), as FFCV's ImageNet example's in_memory=1. ffcv's process cache instead
    # gives each page a slot from its first to its last use in the epoch: under a shuffled order nearly every page
    # is live at once, a copy of most of the file per loader (a 50-140 GB ImageNet .beton beside a 128 GB host).
    loader = Loader(info.path, batch_size=batch_size, num_workers=max(1, int(workers)), os_cache=in_memory,
                    order=OrderOption.SEQUENTIAL, seed=seed, pipelines=pipelines, drop_last=drop_last,
                    batches_ahead=batches_ahead)
    loader.traversal_order = _Order(sample_order)
    loader.first_traversal_order = sample_order(0)
    return loader, {name: i for i, name in enumerate(loader.pipeline_specs)}


def order_changed(loader, sample_order) -> None:
    """After the epoch order's length changes (a strided evaluation bank): ffcv's ``len()`` reads the first epoch's order."""
    loader.first_traversal_order = sample_order(0)


class _Order:
    """ffcv ``TraversalOrder`` stand-in."""

    def __init__(self, sample_order):
        self.sample_order = sample_order


class SlotFences:
    """When ffcv's decoding thread may write into a batch slot again: after fastssl's copy out of it.

    ffcv decodes batch ``b`` into slot ``b % (batches_ahead + 2)`` of its pinned buffers from its
    own thread. fastssl copies each batch out of its slot asynchronously (``non_blocking`` to the
    GPU), so the host moves on while the copy is still queued on the device. ffcv guards a slot's
    reuse only with an event its slot stream waits on, on the GPU: the CPU decoder writing into
    the slot never waits, and only the depth of the launch queue kept the copy ahead of it.

    Here every slot has a fence. The producer :meth:`acquire` s a slot before writing into it:
    it waits until the consumer has :meth:`release` d the slot's previous batch, then until that
    release's fence (a CUDA event recorded after the copy was queued) has completed
    (``event.synchronize()``, on the decoding thread: the training thread never waits). On the CPU
    the copy is synchronous and the fence is None. The alternative, a ring of fastssl's own pinned
    buffers, costs one more host copy of every batch (a 512 x 2 x 224 px batch is 154 MB) for the
    same wait; the fence costs nothing while the device keeps up.

    A consumer holding a slot past ``batches_ahead + 1`` later batches would stall the producer:
    fastssl's copies release each slot before the batch is yielded.
    """

    def __init__(self, slots: int):
        self._cond = threading.Condition()
        self._busy = [False] * slots  # written by the producer, not yet released by the consumer
        self._fence: list = [None] * slots
        self._closed = False

    def acquire(self, slot: int, stop=None, poll: float = 0.5) -> bool:
        """Producer, before writing into ``slot``; False if :meth:`close` was called or ``stop`` is set."""
        with self._cond:
            while self._busy[slot]:
                if self._closed or (stop is not None and stop.is_set()):
                    return False
                self._cond.wait(poll)
            if self._closed:
                return False
            fence, self._fence[slot] = self._fence[slot], None
            self._busy[slot] = True
        if fence is not None:
            fence.synchronize()  # the device has finished reading the slot
        return True

    def release(self, slot: int, fence=None) -> None:
        """Consumer: done with ``slot`` on the host; ``fence`` (``synchronize()``-able) completes when the
        device is done with it too (None: nothing in flight)."""
        with self._cond:
            self._busy[slot] = False
            self._fence[slot] = fence
            self._cond.notify_all()

    def close(self) -> None:
        """Wake a producer waiting for a slot, for good (the epoch is being stopped)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Stopped(Exception):
    """The epoch was stopped while the decoding thread waited for a slot."""


_ITER_LOCK = threading.Lock()
_ITER_CLASS = None


def _fenced_iterator_class():
    """ffcv's ``EpochIterator`` with a :class:`SlotFences` (``.slots``) acquired before each slot is written."""
    global _ITER_CLASS
    if _ITER_CLASS is not None:
        return _ITER_CLASS
    from ffcv.loader.epoch_iterator import EpochIterator

    class FencedEpochIterator(EpochIterator):
        def __init__(self, loader, order):
            self.slots = SlotFences(loader.batches_ahead + 2)  # before ffcv's __init__ starts the thread
            super().__init__(loader, order)

        def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
            if not self.slots.acquire(batch_slot, stop=self.terminate_event):
                raise _Stopped
            return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

        def run(self):
            try:
                super().run()
            except _Stopped:  # ffcv's run() only ends on StopIteration (which would queue a None)
                pass

    _ITER_CLASS = FencedEpochIterator
    return _ITER_CLASS


def start_epoch(loader, epoch: int):
    """The ffcv ``EpochIterator`` (a thread, started) of ``epoch``, with slot fences (``it.slots``).

    ffcv's ``Loader.__iter__`` builds the iterator through its module's ``EpochIterator`` name:
    swapped for the fenced subclass for that one call (under a lock: other loaders' epochs too).
    """
    import ffcv.loader.loader as ffcv_loader

    cls = _fenced_iterator_class()
    loader.next_epoch = int(epoch)
    with _ITER_LOCK:
        saved = ffcv_loader.EpochIterator
        ffcv_loader.EpochIterator = cls
        try:
            return iter(loader)
        finally:
            ffcv_loader.EpochIterator = saved


def next_batch(it):
    """``(slot, batch)``: ``next(it)`` of an ffcv EpochIterator and the slot its buffers are in, None at the end;
    raises if its thread died (ffcv would block forever). Give the slot back with ``it.slots.release``."""
    import queue

    while True:
        try:
            item = it.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not it.is_alive() and it.output_queue.empty():
                raise RuntimeError("the ffcv decoding thread stopped with an error (traceback above)") from None
    if item is None:
        it.close()
        return None
    slot, result = item
    if getattr(it, "cuda_streams", None) and it.cuda_streams[slot] is not None:
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return slot, result


def stop_epoch(it, timeout: float = 10.0) -> None:
    """Stop an epoch's decoding thread (before the decoder's shared state changes), then wait for the copies
    still reading its pinned slots: the slots go with the iterator, and the host allocator ties a pending
    copy only to the buffer it was copied from, not to every slot it covers."""
    import queue

    it.close()
    slots = getattr(it, "slots", None)
    if slots is not None:
        slots.close()
    # A thread that decoded the epoch's last batch ends on ffcv's blocking ``output_queue.put(None)``, which
    # no stop reaches while the queue is full of batches no one will read: drop them until the thread ends.
    deadline = time.monotonic() + timeout
    while it.is_alive() and time.monotonic() < deadline:
        try:
            while True:
                it.output_queue.get_nowait()
        except (queue.Empty, AttributeError):
            pass
        it.join(timeout=0.05)
    for fence in getattr(slots, "_fence", None) or ():
        if fence is not None:
            fence.synchronize()
