"""The DALI back-end's hand-over of GPU outputs to torch, checked on the CPU.

DALI 2.x's ``TensorGPU`` has no ``.device`` attribute (it has a ``device_id()`` method,
``__dlpack__``/``__dlpack_device__`` and ``__cuda_array_interface__``): the hand-over must
recognise it as a GPU tensor and take it zero-copy on torch's current stream. A stand-in
class with exactly those attributes, backed by CPU memory, plays the GPU tensor; where
DALI is installed, the stand-in is checked against DALI's own classes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import has_module
from fastssl.pipelines.dali_backend import _dlpack_device, _rows_to_device, _to_torch

KDL_CUDA = 2


class FakeTensorGPU:
    """DALI 2.x ``nvidia.dali.tensors.TensorGPU``'s interface over a CPU tensor: no ``.device``, no NumPy protocol."""

    def __init__(self, data: torch.Tensor, device_id: int = 0):
        self._data, self._dev = data.contiguous(), device_id
        self.dlpack_calls: list[dict] = []

    def device_id(self) -> int:
        return self._dev

    def shape(self) -> list:
        return list(self._data.shape)

    @property
    def dtype(self):
        return "DALIDataType.UINT8"

    @property
    def stream(self):
        return None

    def layout(self) -> str:
        return "HWC"

    def ndim(self) -> int:
        return self._data.dim()

    def data_ptr(self) -> int:
        return self._data.data_ptr()

    @property
    def __cuda_array_interface__(self):
        return {"shape": tuple(self._data.shape), "typestr": "|u1", "data": (self._data.data_ptr(), False),
                "version": 2}

    def __dlpack_device__(self):
        return (KDL_CUDA, self._dev)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        self.dlpack_calls.append({"stream": stream, "copy": copy})
        return torch.utils.dlpack.to_dlpack(self._data)  # DALI returns a legacy (unversioned) capsule too

    def as_cpu(self):
        raise AssertionError("a device-to-host copy: the GPU path must not go through the host")

    def copy_to_external(self, ptr, cuda_stream=None, non_blocking=False, use_copy_kernel=False):
        raise AssertionError("not expected: the hand-over is zero-copy")


class FakeTensorListGPU:
    """``nvidia.dali.tensors.TensorListGPU``: ``as_tensor()`` is a dense view of the batch."""

    def __init__(self, data: torch.Tensor, device_id: int = 0):
        self.tensor = FakeTensorGPU(data, device_id)

    def as_tensor(self) -> FakeTensorGPU:
        return self.tensor

    def device_id(self) -> int:
        return self.tensor.device_id()

    def shape(self) -> list:
        return [tuple(self.tensor.shape()[1:])] * self.tensor.shape()[0]

    def is_dense_tensor(self) -> bool:
        return True

    def as_cpu(self):
        raise AssertionError("a device-to-host copy: the GPU path must not go through the host")


class _Stream:
    def __init__(self, ptr: int):
        self.cuda_stream = ptr


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch's current CUDA stream (as torch.from_dlpack asks for it), ``Tensor.to`` towards CUDA (recorded) and
    pinning (a mark on the tensor), without a GPU."""
    seen = {"streams": [], "to": []}
    state = {"ptr": 0xBEEF}

    def current_stream(device=None):
        seen["streams"].append(str(device))
        return _Stream(state["ptr"])

    orig_to = torch.Tensor.to

    def to(self, *args, **kw):
        dev = kw.get("device", args[0] if args else None)
        if dev is not None and not isinstance(dev, torch.dtype) and torch.device(dev).type == "cuda":
            seen["to"].append({"device": str(dev), "non_blocking": kw.get("non_blocking", False),
                               "pinned": getattr(self, "_fake_pinned", False)})
            return self
        return orig_to(self, *args, **kw)

    def pin_memory(self, *a, **kw):
        t = self.clone()
        t._fake_pinned = True
        return t

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **kw: getattr(self, "_fake_pinned", False))
    seen["state"] = state
    return seen


def _crops(b=4, s=8, seed=0):
    return torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_gpu_output_is_taken_zero_copy_on_torch_current_stream(fake_cuda):
    data = _crops()
    tl = FakeTensorListGPU(data, device_id=0)
    out = _to_torch(tl, torch.device("cuda", 0))
    assert torch.equal(out, data)
    assert out.data_ptr() == data.data_ptr()                       # zero-copy: the same memory
    assert [c["stream"] for c in tl.tensor.dlpack_calls] == [0xBEEF]  # DALI's work ordered before torch's
    assert fake_cuda["streams"] == ["cuda:0"] and fake_cuda["to"] == []  # already on the loader's device


def test_default_stream_is_passed_as_one(fake_cuda):
    """DLPack forbids stream 0; torch's default stream reports 0 and is the legacy default stream, 1."""
    fake_cuda["state"]["ptr"] = 0
    tl = FakeTensorListGPU(_crops(), device_id=0)
    _to_torch(tl, torch.device("cuda", 0))
    assert [c["stream"] for c in tl.tensor.dlpack_calls] == [1]


def test_output_on_another_gpu_is_moved_without_blocking(fake_cuda):
    tl = FakeTensorListGPU(_crops(), device_id=1)
    _to_torch(tl, torch.device("cuda", 0))
    assert fake_cuda["streams"] == ["cuda:1"]                      # the stream of the device DALI wrote on
    assert fake_cuda["to"] == [{"device": "cuda:0", "non_blocking": True, "pinned": False}]


def test_dlpack_device_of_gpu_stand_in_and_of_a_cuda_array_interface_only_tensor():
    assert _dlpack_device(FakeTensorGPU(_crops(), device_id=3)) == (KDL_CUDA, 3)

    class CaiOnly:  # an older build's GPU tensor: no DLPack, CUDA array interface and device_id()
        @property
        def __cuda_array_interface__(self):
            return {}

        def device_id(self):
            return 2

    assert _dlpack_device(CaiOnly()) == (KDL_CUDA, 2)


def test_cpu_tensor_goes_through_dlpack_too():
    data = _crops(seed=1)
    out = _to_torch(data, torch.device("cpu"))  # torch tensors have __dlpack__ and __dlpack_device__ too
    assert torch.equal(out, data) and out.data_ptr() == data.data_ptr()


def test_rows_to_device_cpu():
    rows = np.array([[5, 7, 9], [1, 0, 1]], np.int64)
    out = _rows_to_device(rows, "cpu")
    assert out.dtype == torch.int64 and out.tolist() == rows.tolist()


def test_rows_to_device_cuda_is_pinned_and_non_blocking(fake_cuda):
    """Labels and indices reach the GPU from pinned memory with a non-blocking copy (no host wait)."""
    rows = np.array([[3, 1, 4, 1], [5, 9, 2, 6]], np.int64)
    out = _rows_to_device(rows, torch.device("cuda", 0))
    assert fake_cuda["to"] == [{"device": "cuda:0", "non_blocking": True, "pinned": True}]
    assert out.tolist() == rows.tolist()


needs_dali = pytest.mark.skipif(not has_module("nvidia.dali"), reason="DALI missing")


@needs_dali
def test_stand_in_has_dali_2x_tensor_gpu_interface():
    """The stand-in's public interface is DALI's own (so the tests above exercise what DALI really offers)."""
    from nvidia.dali.tensors import TensorGPU, TensorListGPU

    assert not hasattr(TensorGPU, "device") and not hasattr(TensorListGPU, "device")
    assert not hasattr(TensorGPU, "__array__") and not hasattr(TensorGPU, "__array_interface__")
    for fake, real in ((FakeTensorGPU, TensorGPU), (FakeTensorListGPU, TensorListGPU)):
        ours = {n for n in vars(fake) if not n.startswith("_") or n.startswith("__") and n.endswith("__")}
        ours -= {"__module__", "__doc__", "__init__", "__dict__", "__weakref__", "__qualname__",
                 "__firstlineno__", "__static_attributes__"}
        missing = sorted(n for n in ours if not hasattr(real, n))
        assert not missing, f"{real.__name__} has no {missing}"
    for name in ("device_id", "shape", "__dlpack__", "__dlpack_device__", "as_cpu"):
        assert callable(getattr(TensorGPU, name)), name
    assert callable(TensorListGPU.as_tensor)


@needs_dali
def test_dali_cpu_outputs_outlive_the_next_runs():
    """exec_dynamic=True: a zero-copy torch view of an output stays valid after later ``run()`` calls."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, exec_dynamic=True, seed=7, prefetch_queue_depth=2)
    def pipe():
        x = fn.random.uniform(range=(0, 255), shape=(6, 6, 3), dtype=types.FLOAT, device="cpu")
        return fn.cast(x, dtype=types.UINT8)

    p = pipe()
    p.build()
    held = [_to_torch(p.run()[0], torch.device("cpu")) for _ in range(4)]
    copies = [h.clone() for h in held]
    for _ in range(4):
        p.run()
    assert all(torch.equal(h, c) for h, c in zip(held, copies))
    assert not torch.equal(copies[0], copies[1])  # distinct batches, so a recycled buffer would show


@needs_dali
def test_loader_gpu_batches_with_stand_in_outputs(demo_data, fake_cuda, monkeypatch):
    """The loader's GPU path end to end: the pipeline runs on torch's current stream (no host sync), its GPU
    crops are taken zero-copy, ids come from the CPU reader output, labels and indices are pinned and
    non-blocking; the stand-in plays the mixed decoder's outputs."""
    from fastssl.pipelines.loader import build_loader
    from fastssl.pipelines.recipes import preset
    from nvidia.dali.tensors import TensorListCPU

    views = preset("simclr")
    for v in views:
        v.size = 8
    L = build_loader(None, views, str(demo_data / "train"), 4, "cpu", backend="dali", workers=1, photometric=False)
    L.device, L.gpu = torch.device("cuda", 0), True
    made, streams = [], []

    class FakePipe:
        def __init__(self, files, ids):
            self.ids, self.b = ids, 0

        def run(self, cuda_stream=None):
            streams.append(getattr(cuda_stream, "cuda_stream", cuda_stream))
            ids = np.array(self.ids[self.b * 4:(self.b + 1) * 4], np.int32).reshape(-1, 1)
            self.b += 1
            crops = [FakeTensorListGPU(_crops(4, 8, seed=10 * self.b + v)) for v in range(2)]
            made.append(crops)
            return (TensorListCPU(ids), *crops)

    monkeypatch.setattr(L, "_pipeline", FakePipe)
    order = L.order(0)
    got = list(L._raw_batches(order, 3))
    assert len(got) == 3
    assert streams == [0xBEEF] * 3   # run() returns outputs ordered on torch's stream: no host-synchronous run
    for b, (crops, labels, indices) in enumerate(got):
        for c, fake in zip(crops, made[b]):
            assert torch.equal(c, fake.tensor._data) and c.data_ptr() == fake.tensor._data.data_ptr()
        ids = order[b * 4:(b + 1) * 4]
        assert indices.tolist() == L.index[ids].tolist() and labels.tolist() == L.labels[ids].tolist()
    assert all(t["non_blocking"] and t["pinned"] for t in fake_cuda["to"]) and len(fake_cuda["to"]) == 3


@pytest.mark.parametrize("gpu", [False, True])
def test_raw_gpu_crops_are_copied_out_of_dalis_memory(gpu):
    """record_stream does nothing on memory torch did not allocate: raw crops handed to another stream are
    copies on the GPU; with a finisher (or on the CPU) the crops are used as they are."""
    from fastssl.pipelines.dali_backend import DALILoader

    crops = [torch.zeros(2, 4, 4, 3, dtype=torch.uint8)]
    for finisher in (None, lambda c, step: c):
        me = DALILoader.__new__(DALILoader)  # the hand-over alone: no pipeline, no DALI needed
        me.finisher, me.gpu = finisher, gpu
        out = me._finish(0, (crops, None, torch.arange(2)))
        copied = out.views[0].data_ptr() != crops[0].data_ptr()
        assert copied == (gpu and finisher is None) and torch.equal(out.views[0], crops[0])
