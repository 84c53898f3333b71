"""The data path off the step's CUDA stream, and data-wait figures that mean the same on every back-end.

**Prefetch** (:func:`prefetch`, used by ``LoaderBase.__iter__``): on CUDA, the device work of a
batch, i.e. whatever a back-end's ``_raw_batches`` enqueues after its host part (H2D copies,
nvJPEG decode, crops and resizes) and whatever ``_finish`` enqueues (the photometric stage,
normalisation), is enqueued on a side stream, ``ahead`` batches (default 1) before the
consumer takes the batch. Step b then runs on the consumer's stream while the side stream
works on batch b+1. The hand-over, in the consumer's ``next()``:

- ``step_stream.wait_event(ready)``: the step's kernels start after the batch is complete,
  and nothing on the host waits for the GPU;
- ``tensor.record_stream(step_stream)`` on every tensor of the :class:`Batch`: the caching
  allocator hands their memory back to the side stream only after the step stream has
  passed the point where the consumer dropped them (their blocks belong to the side
  stream's pool, which would otherwise reuse them while step b still reads them).

Copies come from pinned host memory with ``non_blocking=True`` (:func:`to_device`): a
pageable copy makes the host wait for the stream it runs on. Without CUDA (``SideStream``
on the CPU) the same code runs with no streams: no context, no events, no hand-over.

**Data wait** (:class:`DataWaitMeter`): a loop's host wait (seconds inside ``next()``) and its
device wait (seconds the step's stream sat idle waiting for the batch), read at log points
without a per-step host sync. The device figure is the interval between two events recorded on
the step stream: one just before ``next()``, one just after it (``next()`` has then enqueued the
``wait_event(ready)``). The GPU reaches the first when step b-1 ends (or when the host records
it, if the host is later); it reaches the second when the batch is ready and the host has
returned from ``next()``. So it counts the step stream's idle time caused by the data path,
GPU-side work (a side stream that had not finished) and host-side latency (the host still in
the loader while the GPU had nothing queued) alike, and nothing else. A blocking copy inside
``next()`` made the host figure measure the previous step instead; with no sync in ``next()`` the
host figure says how long the loop's thread spent in the loader. On the CPU there is no
device: the device figure is the host figure.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

import torch

log = logging.getLogger(__name__)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``, never blocking the host on a CUDA target: a host tensor is pinned first
    (a no-op when the DataLoader's pin thread already did it), then copied with ``non_blocking=True``.

    The pinned block is not reused before the copy ran: the host allocator records an event on the
    copy's stream for it.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def batch_tensors(batch) -> list[torch.Tensor]:
    """The tensors a consumer receives in ``batch``: a :class:`Batch`'s views, labels and indices, or
    the tensors in a tuple/list/dict (raw batches)."""
    out: list[torch.Tensor] = []

    def walk(x) -> None:
        if torch.is_tensor(x):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
        elif hasattr(x, "views") and hasattr(x, "indices"):
            walk(x.views)
            walk(getattr(x, "labels", None))
            walk(x.indices)

    walk(batch)
    return out


class SideStream:
    """Where a loader enqueues a batch's device work: a side CUDA stream, or nothing on the CPU.

    One per loader, reused across epochs. The consumer's stream is whatever stream is current
    when it calls ``next()`` (the default stream in the trainer), read at every hand-over.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def begin(self) -> None:
        """At the start of a pass: order the side stream after what the consumer's stream holds so far
        (constants the finisher made there, a previous pass's buffers); once per pass, not per batch."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def end(self) -> None:
        """At the end of a pass (whole or stopped early): the consumer's stream waits, on the device, for
        what the side stream still holds. Memory the consumer's stream owns and the side stream reads
        (the finisher's mean and std, made before the pass) may be freed after the pass; without the
        wait the allocator could hand it to the consumer's next kernels under side work still queued."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def producing(self):
        """Context in which the producer enqueues a batch's device work."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def mark_ready(self):
        """An event after the batch's device work (None without streams)."""
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def hand_over(self, batch, ready):
        """In the consumer's ``next()``: its stream waits for ``ready`` (on the GPU, not the host), and
        every tensor of ``batch`` is kept from reuse until that stream is done with it."""
        if ready is None:
            return batch
        step = torch.cuda.current_stream(self.device)
        step.wait_event(ready)
        for t in batch_tensors(batch):
            if t.is_cuda:
                t.record_stream(step)
        return batch


def prefetch(raws: Iterator, finish: Callable, side: SideStream, ahead: int = 1) -> Iterator:
    """Yield ``finish(b, raw_b)`` for each raw batch of ``raws``, the device work of batches b+1 .. b+ahead
    already enqueued on ``side`` when batch b is handed over.

    ``next(raws)`` runs inside the side stream's context, so a back-end's device part of
    ``_raw_batches`` (its body between yields) lands there as well as ``finish``. An error while
    producing batch b+1 is raised after batch b has been handed over, where the synchronous
    loop would raise it. ``ahead=0``: each batch is produced when asked for (still on the side
    stream; it overlaps the previous step only when the host runs ahead of the GPU).
    """
    ahead = max(0, int(ahead))
    queue: deque = deque()
    b, exhausted, error = 0, False, None
    side.begin()
    try:
        while True:
            while not exhausted and error is None and len(queue) <= ahead:
                try:
                    with side.producing():
                        raw = next(raws)
                        batch = finish(b, raw)
                        ready = side.mark_ready()
                except StopIteration:
                    exhausted = True
                    break
                except Exception as e:  # noqa: BLE001 - raised after the batches already produced
                    error = e
                    break
                queue.append((batch, ready))
                b += 1
            if not queue:
                break
            batch, ready = queue.popleft()
            yield side.hand_over(batch, ready)
        if error is not None:
            raise error
    finally:
        queue.clear()
        side.end()
        close = getattr(raws, "close", None)
        if close is not None:  # a pass stopped early: the back-end's generator cleans up now, not at GC
            close()


# ----------------------------------------------------------------------------- data wait

class DataWaitWindow:
    """The data wait of the fetches between two log points; :meth:`resolve` reads it.

    Closing a window costs nothing; resolving it reads its CUDA events, which waits for the GPU
    only if it has not reached the window's last fetch yet (resolve at the next log point, or
    where the loop syncs anyway, and it never waits).
    """

    def __init__(self, host_s: float, device_s: float, pairs: list, fetches: int, cuda: bool):
        self.host_s, self._device_s, self._pairs, self.fetches, self.cuda = host_s, device_s, pairs, fetches, cuda

    def resolve(self) -> dict:
        """``{"data_wait_host": s, "data_wait_device": s, "data_fetches": n}`` (seconds; on the CPU the
        device figure is the host figure)."""
        if not self.cuda:
            return {"data_wait_host": self.host_s, "data_wait_device": self.host_s, "data_fetches": self.fetches}
        dev = self._device_s
        for e0, e1 in self._pairs:
            e1.synchronize()
            dev += e0.elapsed_time(e1) / 1000.0
        self._device_s, self._pairs = dev, []
        return {"data_wait_host": self.host_s, "data_wait_device": dev, "data_fetches": self.fetches}


class DataWaitMeter:
    """Host and device data wait of a training loop (see the module docstring for what each means).

    Use :meth:`fetch` in place of ``next(it)`` (or :meth:`on_fetch_start` / :meth:`on_fetch_end`
    around one's own ``next()``, or the :class:`Feeder` iterator); at a log point, :meth:`window`
    closes the current window (no sync) and its ``resolve()`` gives the figures; or
    :meth:`read_and_reset` does both at once where the loop syncs anyway. ``clock``: the host
    clock (tests pass a fake one).
    """

    MAX_PENDING = 1024  # event pairs kept before the completed ones are folded into a sum (no sync)

    def __init__(self, device=None, clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.clock = clock
        self._reset()
        self._t0: float | None = None
        self._e0 = None

    def _reset(self) -> None:
        self._host_s, self._device_s, self._pairs, self._fetches = 0.0, 0.0, [], 0

    def on_fetch_start(self) -> None:
        """Just before ``next()``: an event on the step stream (CUDA) and the host clock."""
        if self.cuda:
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e0.record(torch.cuda.current_stream(self.device))
        self._t0 = self.clock()

    def on_fetch_end(self, got_batch: bool = True) -> None:
        """Just after ``next()`` (``got_batch=False`` when it raised StopIteration: the host time counts,
        there is no batch to wait for on the device)."""
        if self._t0 is not None:
            self._host_s += self.clock() - self._t0
        self._t0 = None
        if self.cuda and got_batch and self._e0 is not None:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record(torch.cuda.current_stream(self.device))
            self._pairs.append((self._e0, e1))
            if len(self._pairs) > self.MAX_PENDING:
                self._fold()
        self._e0 = None
        self._fetches += int(got_batch)

    def fetch(self, it: Iterator):
        """``next(it)``, timed; StopIteration passes through."""
        self.on_fetch_start()
        try:
            b = next(it)
        except StopIteration:
            self.on_fetch_end(got_batch=False)
            raise
        self.on_fetch_end()
        return b

    def _fold(self) -> None:
        """Sum the pairs the GPU has already passed (``query()``: no wait), keep the rest."""
        while self._pairs and self._pairs[0][1].query():
            e0, e1 = self._pairs.pop(0)
            self._device_s += e0.elapsed_time(e1) / 1000.0

    def window(self) -> DataWaitWindow:
        """Close the current window and start a new one; no sync."""
        w = DataWaitWindow(self._host_s, self._device_s, self._pairs, self._fetches, self.cuda)
        self._reset()
        return w

    def read_and_reset(self) -> dict:
        """``window().resolve()``: for a log point where the loop has synced with the GPU already."""
        return self.window().resolve()


class Feeder:
    """An iterator over ``iterable`` whose every ``next()`` is timed by ``meter`` (a :class:`DataWaitMeter`,
    or one made for ``device``)."""

    def __init__(self, iterable: Iterable, device=None, meter: DataWaitMeter | None = None):
        self.meter = meter if meter is not None else DataWaitMeter(device)
        self._it = iter(iterable)

    def __iter__(self):
        return self

    def __next__(self):
        return self.meter.fetch(self._it)

    def read_and_reset(self) -> dict:
        return self.meter.read_and_reset()
