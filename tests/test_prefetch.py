"""The data path off the step's stream (pipelines.prefetch) and the data-wait meter.

On the CPU the stream path runs without streams; these tests check what it promises there: the
same batches as the synchronous loop on every back-end, the device part of a back-end produced
inside the side stream's context one batch ahead, every tensor handed over, errors where the
synchronous loop raises them, and a meter whose host figure is the loader's time only.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from conftest import has_module as _has, small_views
from fastssl.pipelines import Batch, DataError
from fastssl.pipelines.loader import LoaderBase, build_loader
from fastssl.pipelines.prefetch import DataWaitMeter, Feeder, SideStream, batch_tensors, prefetch, to_device

GLOBAL, LOCAL = 32, 16


def _views(recipe):
    return small_views(recipe, GLOBAL, LOCAL)


BACKENDS = [pytest.param("ffcv", marks=pytest.mark.skipif(not _has("ffcv"), reason="ffcv missing")),
            "torch",
            pytest.param("dali", marks=pytest.mark.skipif(not _has("nvidia.dali"), reason="DALI missing"))]


def _loader(demo_data, backend, recipe, mode, **kw):
    src = str(demo_data / ("train.beton" if backend == "ffcv" else "train"))
    L = build_loader(None, _views(recipe), src, 16, "cpu", backend=backend, workers=1, **kw)
    _set_mode(L, mode)
    return L


def _set_mode(L, mode):
    L.stream_prefetch = mode == "stream"
    L.overlap_finish = mode == "thread"
    assert L._iteration_mode() == mode


def _take(batches):
    """Copies at receipt: a raw crop may live in a back-end's reused slot (ffcv)."""
    return [(b.indices.clone(), [v.clone() for v in b.views], None if b.labels is None else b.labels.clone())
            for b in batches]


def _assert_same(a, b):
    assert len(a) == len(b) > 0
    for (ia, va, la), (ib, vb, lb) in zip(a, b):
        assert torch.equal(ia, ib) and (la is None) == (lb is None) and (la is None or torch.equal(la, lb))
        assert len(va) == len(vb) and all(torch.equal(x, y) for x, y in zip(va, vb))


# ----------------------------------------------------------------------------- same batches on every back-end

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe,photometric", [("dino", True), ("simclr", False)])
def test_stream_path_gives_the_synchronous_batches(demo_data, backend, recipe, photometric):
    """The stream path (here without streams), the thread overlap and the synchronous loop deliver
    bitwise equal views, labels and indices for the same seed and epoch; also in a second epoch
    and after a pass stopped early."""
    sync = _loader(demo_data, backend, recipe, "sync", seed=5, photometric=photometric)
    ref = _take(sync)
    for mode in ("stream", "thread"):
        L = _loader(demo_data, backend, recipe, mode, seed=5, photometric=photometric)
        _assert_same(ref, _take(L))
        for i, _ in enumerate(L):  # an abandoned pass, then the same epoch from its start
            if i == 2:
                break
        L.set_epoch(0)
        _assert_same(ref, _take(L))
    sync.set_epoch(1)
    L = _loader(demo_data, backend, recipe, "stream", seed=5, photometric=photometric)
    L.set_epoch(1)
    e1 = _take(L)
    _assert_same(_take(sync), e1)
    assert not torch.equal(e1[0][0], ref[0][0])                          # epoch 1 is another order


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_torch_cuda_code_path_streamed_equals_synchronous(demo_data, ahead):
    """The torch back-end's CUDA code path (batched JPEG decode, host-built boxes, roi_align), run on the
    CPU: prefetched at any depth it delivers the synchronous loop's crops."""
    from fastssl.pipelines.torch_backend import TorchLoader

    def make(mode):
        L = TorchLoader(str(demo_data / "train"), _views("dino"), 16, "cpu", workers=0, gpu_decode=True, seed=2)
        _set_mode(L, mode)
        L.prefetch_ahead = ahead
        return L

    _assert_same(_take(make("sync")), _take(make("stream")))


def test_default_modes():
    """CUDA: the stream path; CPU: the thread overlap when a finisher runs there, else synchronous."""
    L = _FakeLoader(n=4, finisher=lambda crops, step: crops)
    assert L._iteration_mode() == "thread"
    L.finisher = None
    assert L._iteration_mode() == "sync"
    L.device = torch.device("cuda")  # only the choice is read here, nothing runs on it
    assert L._iteration_mode() == "stream"
    L.stream_prefetch = False
    assert L._iteration_mode() == "sync"


# ----------------------------------------------------------------------------- the prefetch contract

class _RecordingSide(SideStream):
    """A SideStream for the CPU that records what a CUDA one would do."""

    def __init__(self, log):
        super().__init__("cpu")
        self.log, self.inside, self.n = log, False, 0

    def begin(self):
        self.log.append(("begin",))

    def producing(self):
        side = self

        class _Ctx:
            def __enter__(self):
                side.inside = True

            def __exit__(self, *exc):
                side.inside = False

        return _Ctx()

    def mark_ready(self):
        assert self.inside, "the ready event must be recorded on the side stream"
        self.n += 1
        return ("ready", self.n - 1)

    def hand_over(self, batch, ready):
        self.log.append(("hand", ready[1], tuple(id(t) for t in batch_tensors(batch))))
        return batch

    def end(self):
        self.log.append(("end",))


def _raws(log, side, n, fail_at=None, closed=None):
    try:
        for b in range(n):
            log.append(("raw", b, side.inside))  # the back-end's device part runs here
            if b == fail_at:
                raise DataError(f"batch {b} is unreadable")
            yield [torch.full((2, 3), float(b))], torch.tensor([b, b]), torch.tensor([10 * b, 10 * b + 1])
    finally:
        if closed is not None:
            closed.append(True)


def _finish(log, side):
    def finish(b, raw):
        log.append(("finish", b, side.inside))
        crops, labels, idx = raw
        return Batch(views=[c * 2 for c in crops], labels=labels, indices=idx)
    return finish


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_prefetch_produces_ahead_on_the_side_stream_and_hands_over_every_tensor(ahead):
    log: list = []
    side = _RecordingSide(log)
    got = []
    for batch in prefetch(_raws(log, side, 5), _finish(log, side), side, ahead=ahead):
        got.append(batch)
        log.append(("got", int(batch.indices[0]) // 10, batch_tensors(batch)))
    assert [int(b.indices[0]) // 10 for b in got] == list(range(5))
    assert all(torch.equal(b.views[0], torch.full((2, 3), 2.0 * k)) for k, b in enumerate(got))
    assert log[0] == ("begin",)
    # Every raw batch and its finish were produced inside the side stream's context.
    assert all(e[2] for e in log if e[0] in ("raw", "finish"))
    for k in range(5):
        pos_hand = next(i for i, e in enumerate(log) if e[0] == "hand" and e[1] == k)
        pos_got = next(i for i, e in enumerate(log) if e[0] == "got" and e[1] == k)
        assert pos_hand < pos_got                                        # ordered before the consumer sees it
        # Batch k+ahead (when it exists) was produced before batch k was handed over.
        last = min(k + ahead, 4)
        assert next(i for i, e in enumerate(log) if e[:2] == ("finish", last)) < pos_hand
        if k + ahead + 1 <= 4:                                             # ... and not further ahead
            assert next(i for i, e in enumerate(log) if e[:2] == ("raw", k + ahead + 1)) > pos_got
        # The hand-over covered every tensor the consumer received: views, labels, indices.
        handed = log[pos_hand][2]
        assert handed == tuple(id(t) for t in log[pos_got][2]) and len(handed) == 3


def test_prefetch_raises_a_producer_error_where_the_synchronous_loop_does():
    log: list = []
    side = _RecordingSide(log)
    got = []
    with pytest.raises(DataError, match="batch 3"):
        for batch in prefetch(_raws(log, side, 6, fail_at=3), _finish(log, side), side, ahead=2):
            got.append(int(batch.indices[0]) // 10)
    assert got == [0, 1, 2]


def test_prefetch_closes_the_back_end_generator_when_a_pass_stops_early():
    log, closed = [], []
    side = _RecordingSide(log)
    it = prefetch(_raws(log, side, 6, closed=closed), _finish(log, side), side, ahead=1)
    next(it)
    assert not closed
    it.close()
    assert closed == [True]
    # The consumer's stream waits for the side stream's leftover work (the finisher's constants, owned by
    # the consumer's stream, may be freed after the pass).
    assert log[-1] == ("end",) and log.count(("end",)) == 1


def test_side_stream_without_cuda_is_a_no_op():
    side = SideStream("cpu")
    assert side.stream is None and side.mark_ready() is None
    side.begin()
    side.end()
    b = Batch(views=[torch.ones(2)], labels=None, indices=torch.arange(2))
    with side.producing():
        pass
    assert side.hand_over(b, None) is b
    assert [t.shape for t in batch_tensors(b)] == [(2,), (2,)]          # labels None: not a tensor
    t = torch.arange(3)
    assert to_device(t, "cpu") is t


# ----------------------------------------------------------------------------- LoaderBase's contract

class _FakeLoader(LoaderBase):
    """A back-end of the smallest kind, as a new one (webdataset) subclasses LoaderBase."""

    backend = "fake"

    def __init__(self, n=40, finisher=None, bad_at=None):
        self._setup("/data/fake", _views("simclr"), 8, "cpu", seed=1, rank=0, world_size=1, drop_last=True,
                    train=True, finisher=finisher)
        self.num_samples, self.bad_at = n, bad_at

    def _raw_batches(self, order, nb):
        for b in range(nb):
            idx = torch.from_numpy(np.asarray(order[b * 8:(b + 1) * 8], np.int64))
            if self.bad_at is not None and b == self.bad_at:
                self._skip(f"/data/fake/{b}.jpg", "truncated")
            crops = [(idx.view(-1, 1, 1, 1) + s).expand(-1, s, s, 3).to(torch.uint8) for s in self.sizes]
            yield crops, idx % 3, idx


@pytest.mark.parametrize("mode", ["sync", "thread", "stream"])
def test_loader_base_modes_and_the_skipped_files_warning(mode):
    """A subclass that only yields raw batches gets every mode; each epoch that met an unreadable file
    logs one warning line (on the module's logger), whatever the mode."""
    finisher = lambda crops, step: [c.permute(0, 3, 1, 2).float() + step for c in crops]  # noqa: E731
    ref = _take(_FakeLoader(finisher=finisher))
    L = _FakeLoader(finisher=finisher, bad_at=2)
    L.stream_prefetch, L.overlap_finish = mode == "stream", mode == "thread"
    records: list = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("fastssl.pipelines.loader")
    h = _Keep(level=logging.WARNING)
    logger.addHandler(h)
    try:
        _assert_same(ref, _take(L))
        L.set_epoch(1)
        assert len(_take(L)) == len(L) == 5
    finally:
        logger.removeHandler(h)
    msgs = [r.getMessage() for r in records]
    assert len(msgs) == 2 and all(r.levelno == logging.WARNING for r in records), msgs
    assert "fake back-end, epoch 0, rank 0: 1 unreadable file(s)" in msgs[0] and "2.jpg (truncated)" in msgs[0]
    assert "\n" not in msgs[0] and "epoch 1" in msgs[1]
    assert L.skipped == [("/data/fake/2.jpg", "truncated")]


# ----------------------------------------------------------------------------- data wait

class _FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _sleepy(clock, n, cost):
    for k in range(n):
        clock.t += cost                 # the loader's time: inside next()
        yield k
    clock.t += cost / 2                 # the end of the epoch costs too


def test_meter_counts_the_loaders_time_not_the_consumers():
    clock = _FakeClock()
    meter = DataWaitMeter("cpu", clock=clock)
    it = _sleepy(clock, 5, cost=1.0)
    got = []
    for _ in range(3):
        got.append(meter.fetch(it))
        clock.t += 10.0                 # the step: not data wait
    w = meter.window()                  # a log point
    for b in Feeder(it, meter=meter):   # the rest of the epoch through the iterator form
        got.append(b)
        clock.t += 10.0
    assert got == [0, 1, 2, 3, 4]
    assert w.resolve() == {"data_wait_host": 3.0, "data_wait_device": 3.0, "data_fetches": 3}
    # Two fetches and the one that ended the epoch (host time, no batch); CPU: device = host.
    assert meter.read_and_reset() == {"data_wait_host": 2.5, "data_wait_device": 2.5, "data_fetches": 2}
    assert meter.read_and_reset() == {"data_wait_host": 0.0, "data_wait_device": 0.0, "data_fetches": 0}


def test_meter_hooks_for_a_loop_that_calls_next_itself():
    clock = _FakeClock()
    meter = DataWaitMeter(None, clock=clock)
    assert not meter.cuda
    meter.on_fetch_start()
    clock.t += 0.25
    meter.on_fetch_end()
    clock.t += 5.0
    meter.on_fetch_start()
    clock.t += 0.5
    meter.on_fetch_end(got_batch=False)
    assert meter.read_and_reset() == {"data_wait_host": 0.75, "data_wait_device": 0.75, "data_fetches": 1}


# ----------------------------------------------------------------------------- JPEG decoders

def _jpegs(n=3):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + 7 * k, 31 + 5 * k, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8))
    return out


def test_torchvision_fallback_decodes_without_its_deprecation_warning(monkeypatch):
    import torchvision.io

    from fastssl.pipelines import torch_backend

    monkeypatch.setattr(torch_backend, "JPEG_DECODER", "torchvision")
    data = _jpegs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch_backend.decode_jpegs(data, "cpu")
        direct = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)
    ours = [w for w in caught if "TorchVision are deprecated" in str(w.message)]
    assert len(ours) == (1 if "_warn_deprecated" in vars(torchvision.io.image) else 0)  # only the direct call warns
    assert [tuple(x.shape) for x in got] == [(3, 20, 31), (3, 27, 36), (3, 34, 41)]
    assert all(torch.equal(a, b) for a, b in zip(got, direct))


@pytest.mark.skipif(not _has("torchcodec"), reason="torchcodec missing")
def test_torchcodec_and_torchvision_decode_the_same_pixels(monkeypatch):
    from fastssl.pipelines import torch_backend

    data = _jpegs()
    out = {}
    for name in ("torchcodec", "torchvision"):
        monkeypatch.setattr(torch_backend, "JPEG_DECODER", name)
        assert torch_backend.jpeg_decoder() == name
        out[name] = torch_backend.decode_jpegs(data, "cpu")
    assert all(a.dtype == torch.uint8 and torch.equal(a, b) for a, b in zip(out["torchcodec"], out["torchvision"]))


def test_bad_decoder_name(monkeypatch):
    from fastssl.pipelines import torch_backend

    monkeypatch.setattr(torch_backend, "JPEG_DECODER", "pil")
    with pytest.raises(ValueError, match="torchcodec or torchvision"):
        torch_backend.jpeg_decoder()


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.cuda
def test_cuda_stream_path_equals_synchronous_and_waits_on_the_device(jpeg_data):
    """On CUDA: the side-stream path gives the synchronous path's batches (torch back-end, nvJPEG + roi_align +
    photometric stage), and the meter's device figure sees a side stream that is still busy."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src = str(jpeg_data / "train")
    got = {}
    for mode in ("sync", "stream"):
        for photometric in (False, True):
            L = build_loader(None, _views("dino"), src, 16, "cuda", backend="torch", workers=1, seed=4,
                             photometric=photometric)
            L.stream_prefetch = mode == "stream"
            meter = DataWaitMeter("cuda")
            got[mode, photometric] = [(b.indices.cpu(), [v.float().cpu() for v in b.views])
                                      for b in Feeder(L, meter=meter)]
            w = meter.read_and_reset()
            assert w["data_fetches"] == len(L) and 0 <= w["data_wait_device"] and 0 <= w["data_wait_host"]
    for photometric in (False, True):
        a, b = got["sync", photometric], got["stream", photometric]
        assert len(a) == len(b) and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
        assert all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x[1], y[1]))

    # A side stream busy for ~20 ms per batch and a step stream with nothing queued: the step
    # stream waits for it (device figure), the host does not (no sync in next()).
    side = SideStream("cuda")

    def raws():
        for k in range(4):
            torch.cuda._sleep(20_000_000)  # cycles, about 10-20 ms
            yield [torch.full((4,), float(k), device="cuda")], None, torch.arange(4, device="cuda")

    meter = DataWaitMeter("cuda")
    it = prefetch(raws(), lambda b, raw: Batch(views=raw[0], labels=None, indices=raw[2]), side, ahead=1)
    vals = []
    for _ in range(4):
        batch = meter.fetch(it)
        vals.append(batch.views[0].sum())    # enqueued on the step stream after the hand-over
    torch.cuda.synchronize()
    w = meter.read_and_reset()
    assert [float(v) for v in vals] == [0.0, 4.0, 8.0, 12.0]
    assert w["data_wait_device"] > 0.02 and w["data_wait_device"] > w["data_wait_host"], w


def test_cuda_decode_runs_on_its_own_stream_drained_first(monkeypatch):
    """On CUDA: the decode stream is drained on the host, the decode runs on it, the caller's stream waits
    for it on the device and the decoded images are kept from reuse until the caller's stream is done
    with them. The CUDA path is run on the CPU with stand-ins for the stream calls."""
    import contextlib

    import torchvision.io

    from fastssl.pipelines import torch_backend

    calls: list = []
    real_decode = torchvision.io.decode_jpeg

    class Stream:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            calls.append(f"{self.name}: host waits")

        def wait_stream(self, other):
            calls.append(f"{self.name}: waits for {other.name}")

    caller = Stream("caller")
    active = [caller]

    @contextlib.contextmanager
    def use(stream):
        active.append(stream)
        yield
        active.pop()

    def fake_decode(data, mode=None, device=None):
        calls.append(f"decode on {active[-1].name} ({torch.device(device).type})")
        return real_decode(data, mode=mode)  # the pixels, decoded on the CPU

    monkeypatch.setattr(torch_backend, "JPEG_DECODER", "torchvision")
    monkeypatch.setattr(torch_backend, "_DECODE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: active[-1])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream("decode"))
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: calls.append(f"image kept for {s.name}"),
                        raising=False)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode)
    monkeypatch.setattr(torch_backend, "_DECODE_INPUTS", {})
    held = _jpegs(2)
    got = torch_backend.decode_jpegs(held, "cuda")
    assert calls == ["decode: host waits", "decode on decode (cuda)", "caller: waits for decode",
                     "image kept for caller", "image kept for caller"]
    assert [tuple(x.shape) for x in got] == [(3, 20, 31), (3, 27, 36)]
    # The input bytes stay referenced until the next decode has drained the stream (an asynchronous copy
    # out of pinned memory records no event that would keep the allocator from reusing them).
    (kept,) = torch_backend._DECODE_INPUTS.values()
    assert len(kept) == 2 and all(a is b for a, b in zip(kept, held))
    calls.clear()
    torch_backend.decode_jpegs(_jpegs(1), "cuda")  # the same stream, made once per device
    assert calls[0] == "decode: host waits" and len(torch_backend._DECODE_STREAMS) == 1
    calls.clear()
    torch_backend.decode_jpegs(_jpegs(1), "cpu")  # no streams on the CPU
    assert calls == ["decode on caller (cpu)"]
    # A batch that fails part-way: the device is drained before the error leaves (images already queued
    # by the decoder die with it, unguarded), and the caller's stream is not told to wait.
    calls.clear()

    def failing(data, mode=None, device=None):
        calls.append("decode fails")
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("device drained"))
    with pytest.raises(RuntimeError, match="unsupported"):
        torch_backend.decode_jpegs(_jpegs(1), "cuda")
    assert calls == ["decode: host waits", "decode fails", "device drained"]


def _photo_jpegs(n, h, w):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8))
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("side_stream", [False, True])
@pytest.mark.parametrize("freed", ["caller_tensors", "decoded_images"])
def test_cuda_decode_leaves_memory_that_queued_kernels_read_alone(side_stream, freed):
    """A decode must not overwrite memory that kernels queued on the caller's stream have yet to read.

    Each round queues a long kernel, then one sum per tensor, on the caller's stream, frees the tensors
    while the sums are still queued (the caching allocator may hand their blocks to the next tensors
    made) and decodes a batch of the same size. The tensors are either the caller's own
    (``caller_tensors``) or the previous decode's images (``decoded_images``, what the crops read).
    Every sum must come out as computed beforehand.
    """
    from fastssl.pipelines import torch_backend

    n, h, w = 8, 384, 384
    jpegs = _photo_jpegs(n, h, w)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    wrong = 0
    with torch.cuda.stream(stream):
        for r in range(20):
            if freed == "caller_tensors":
                bufs = [torch.full((3, h, w), 1 + r % 250, dtype=torch.uint8, device="cuda") for _ in range(n)]
            else:
                bufs = torch_backend.decode_jpegs(jpegs, "cuda")
            torch.cuda.synchronize()
            expected = [int(b.sum(dtype=torch.int64)) for b in bufs]
            torch.cuda._sleep(50_000_000)  # ~25 ms of queued work ahead of the sums
            sums = [b.sum(dtype=torch.int64) for b in bufs]
            del bufs  # freed with the sums still queued
            out = torch_backend.decode_jpegs(jpegs, "cuda")
            torch.cuda.synchronize()
            wrong += sum(int(s) != e for s, e in zip(sums, expected))
            assert all(o.shape == (3, h, w) for o in out)
    assert wrong == 0, f"{wrong} sums read memory the decoder overwrote"
