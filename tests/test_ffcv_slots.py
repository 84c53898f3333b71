"""ffcv's batch slots are written again only after fastssl's copy out of them has finished.

ffcv decodes batch b into slot ``b % (batches_ahead + 2)`` from its own thread. fastssl copies
every batch out of its slot (asynchronously on CUDA) and gives the slot back with a fence
(``pipelines.ffcv_compat.SlotFences``); the decoding thread waits for that fence before it
writes into the slot again. On the CPU the copy is synchronous (no fence); the bookkeeping is
checked with a fake event that records its waits, and against ffcv's real decoding thread.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import has_module
from fastssl.pipelines.ffcv_compat import SlotFences

needs_ffcv = pytest.mark.skipif(not has_module("ffcv"), reason="ffcv missing")
JOIN = 20.0  # seconds a thread may take to get where the test expects it (a hang guard, not a timing)


class FakeEvent:
    """A CUDA event stand-in: ``synchronize()`` blocks until :meth:`complete` (the copy finished) and counts its calls."""

    def __init__(self, name=None, done: bool = True):
        self.name, self._done = name, threading.Event()
        self.waited = 0
        if done:
            self._done.set()

    def complete(self):
        self._done.set()

    def synchronize(self):
        self.waited += 1
        assert self._done.wait(JOIN), f"fence {self.name} never completed"


def _in_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)), daemon=True)
    t.start()
    return t, out


# ----------------------------------------------------------------------------- the bookkeeping alone

def test_fresh_slots_need_no_wait():
    f = SlotFences(3)
    assert all(f.acquire(s) for s in range(3))


def test_producer_waits_for_the_release_then_for_its_fence():
    f = SlotFences(2)
    assert f.acquire(0)                          # batch 0 written into slot 0, handed to the consumer
    t, out = _in_thread(f.acquire, 0)            # batch 2 wants slot 0 again
    t.join(0.2)
    assert t.is_alive()                          # not released: the producer must not write
    fence = FakeEvent("copy0", done=False)       # the consumer queued an async copy out of slot 0
    f.release(0, fence)
    deadline = time.monotonic() + JOIN
    while fence.waited == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert fence.waited == 1
    t.join(0.2)
    assert t.is_alive()                          # released, but the copy is still in flight
    fence.complete()
    t.join(JOIN)
    assert not t.is_alive() and out["r"] is True


def test_release_without_fence_and_fences_are_waited_once():
    f = SlotFences(1)
    assert f.acquire(0)
    ev = FakeEvent("a")
    f.release(0, ev)
    assert f.acquire(0) and ev.waited == 1
    f.release(0, None)                           # CPU: the copy is done, nothing to wait for
    assert f.acquire(0) and ev.waited == 1


def test_close_and_stop_wake_a_waiting_producer():
    f = SlotFences(1)
    assert f.acquire(0)
    t, out = _in_thread(f.acquire, 0)
    t.join(0.2)
    assert t.is_alive()
    f.close()
    t.join(JOIN)
    assert out["r"] is False
    g, stop = SlotFences(1), threading.Event()
    assert g.acquire(0)
    t, out = _in_thread(lambda: g.acquire(0, stop, 0.01))
    stop.set()
    t.join(JOIN)
    assert out["r"] is False


# ----------------------------------------------------------------------------- against ffcv's decoding thread

def _views(size=32):
    from fastssl.pipelines.recipes import preset

    v = preset("simclr")
    for s in v:
        s.size = size
    return v


def _ffcv(demo_data, batches_ahead, seed=11):
    from fastssl.pipelines.ffcv_backend import FFCVLoader

    return FFCVLoader(str(demo_data / "train.beton"), _views(), 16, "cpu", seed=seed, workers=1, train=True,
                      finisher=None, batches_ahead=batches_ahead)


@needs_ffcv
def test_slow_consumer_keeping_every_batch_sees_what_a_prompt_one_copied(demo_data):
    """A consumer that keeps every batch and comes back late gets the same crops as one that copies each
    batch the moment it arrives: no slot of a kept batch is decoded into again."""
    prompt = [([v.clone() for v in b.views], b.labels.clone(), b.indices.clone())
              for b in _ffcv(demo_data, batches_ahead=8)]
    slow, kept = _ffcv(demo_data, batches_ahead=1), []
    for b in slow:                               # 12 batches through 3 slots
        kept.append(b)
        time.sleep(0.02)                         # the decoding thread runs ahead as far as it may
    assert len(kept) == len(prompt) == 12
    for (views, labels, indices), b in zip(prompt, kept):
        assert torch.equal(indices, b.indices) and torch.equal(labels, b.labels)
        assert all(torch.equal(u, v) for u, v in zip(views, b.views))
    assert len({v.data_ptr() for b in kept for v in b.views[:1]}) == 12  # each kept batch owns its memory


@needs_ffcv
@pytest.mark.parametrize("overlap", [False, True])
def test_slow_finisher_reads_its_raw_batch_from_the_slot_undisturbed(demo_data, overlap):
    """On the CPU a finisher reads the crops in ffcv's slot (no copy); the slot is given back only when the
    next raw batch is asked for. A slow finisher, finishing in next() or on LoaderBase's thread, sees what a
    prompt copy saw."""
    prompt = [[v.clone() for v in b.views] for b in _ffcv(demo_data, batches_ahead=8)]

    def slow(crops, step):
        time.sleep(0.01)                         # the decoding thread runs ahead as far as it may
        return [c.clone() for c in crops]

    L = _ffcv(demo_data, batches_ahead=1)
    L.finisher, L.overlap_finish, L.stream_prefetch = slow, overlap, False
    got = [b.views for b in L]
    assert len(got) == len(prompt) == 12
    assert all(torch.equal(u, v) for x, y in zip(prompt, got) for u, v in zip(x, y))


@needs_ffcv
def test_decoding_thread_waits_for_each_copy_fence(demo_data):
    """The copy fences are waited for by ffcv's thread before each slot is reused, and a fence that has not
    completed holds back exactly the batch that reuses its slot."""
    L = _ffcv(demo_data, batches_ahead=1)        # 3 slots
    fences = []

    def fence():
        ev = FakeEvent(len(fences), done=len(fences) != 0)   # the copy of batch 0 is "still in flight"
        fences.append(ev)
        return ev

    L._copy_fence = fence
    got, gate = [], threading.Event()

    def consume():
        for i, raw in enumerate(L._raw_batches(L.order(0), len(L))):
            got.append([c.clone() for c in raw[0]])
            if i == 2:
                gate.wait(JOIN)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    deadline = time.monotonic() + JOIN
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(got) == 3
    gate.set()                                   # the consumer asks for batch 3, which reuses slot 0
    t.join(0.3)
    assert len(got) == 3 and t.is_alive()        # held back: slot 0's copy has not finished
    assert fences[0].waited == 1
    fences[0].complete()
    t.join(JOIN)
    assert not t.is_alive() and len(got) == len(L) == 12
    n_slots = 3
    assert [f.waited for f in fences] == [1] * (len(L) - n_slots) + [0] * n_slots
    reference = [[c.clone() for c in raw[0]] for raw in _ffcv(demo_data, batches_ahead=8)._raw_batches(
        L.order(0), len(L))]
    assert all(torch.equal(a, b) for x, y in zip(got, reference) for a, b in zip(x, y))


@needs_ffcv
def test_abandoned_pass_then_next_epoch(demo_data):
    """A pass stopped after three batches (fences still pending) leaves the next epoch whole and unchanged."""
    L = _ffcv(demo_data, batches_ahead=1)
    fences = []
    L._copy_fence = lambda: fences.append(FakeEvent()) or fences[-1]
    it = iter(L)
    next(it), next(it), next(it)
    it.close()
    L.set_epoch(1)
    again = [[v.clone() for v in b.views] for b in L]
    fresh = _ffcv(demo_data, batches_ahead=4)
    fresh.set_epoch(1)
    assert len(again) == len(L) and all(torch.equal(u, v) for x, y in zip(again, fresh) for u, v in zip(x, y.views))
    # The stopped pass waited for the copies still pending on its slots before letting them go.
    assert all(f.waited >= 1 for f in fences[:3])


@needs_ffcv
def test_cuda_path_queues_the_copies_then_fences_then_yields(demo_data, monkeypatch):
    """The CUDA path without a GPU (copies recorded, not run): every batch's copies out of the slot are
    non-blocking and queued before the slot's fence is taken; indices go pinned and non-blocking."""
    log = []
    orig_to = torch.Tensor.to

    def to(self, *args, **kw):
        dev = kw.get("device", args[0] if args else None)
        if dev is not None and not isinstance(dev, torch.dtype) and torch.device(dev).type == "cuda":
            log.append(("copy", kw.get("non_blocking", False), getattr(self, "_fake_pinned", False)))
            return self.clone()                   # "on the GPU": no longer the slot's memory
        return orig_to(self, *args, **kw)

    def pin_memory(self, *a, **kw):
        t = self.clone()
        t._fake_pinned = True
        return t

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **kw: getattr(self, "_fake_pinned", False))
    L = _ffcv(demo_data, batches_ahead=1)
    L.device = torch.device("cuda", 0)

    def fence():
        log.append(("fence",))
        return FakeEvent()

    L._copy_fence = fence
    n = 0
    for _crops, labels, indices in L._raw_batches(L.order(0), 5):
        n += 1
        assert log[-1] == ("copy", True, True)      # the indices, from pinned memory
        assert log[-2] == ("fence",)
        assert log[-4:-2] == [("copy", True, False)] * 2   # crops and labels, straight from ffcv's slot
        assert labels.dtype == torch.int64
        log.clear()
    assert n == 5


@needs_ffcv
def test_stopping_an_epoch_whose_last_batch_waits_in_the_queue_ends_its_thread(demo_data):
    """ffcv's thread ends an epoch with a blocking put of None; with the last batch still queued (unread), a
    stop must still end it rather than leave it blocked (and the stop waiting out its whole timeout)."""
    from fastssl.pipelines.ffcv_compat import stop_epoch

    L = _ffcv(demo_data, batches_ahead=1)        # a queue of one batch
    gen = L._raw_batches(L.order(0), len(L))
    for _ in range(len(L) - 1):
        next(gen)
    it = L._it
    deadline = time.monotonic() + JOIN
    while not it.output_queue.full() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert it.output_queue.full()                # the last batch is queued; the thread is at its final put
    time.sleep(0.2)
    stop_epoch(it, timeout=JOIN)
    assert not it.is_alive()
    gen.close()
