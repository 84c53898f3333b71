"""Bad data files: one-line DataErrors naming the file and the fix; image folders with
unreadable files keep every batch full and name what they skipped."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import has_module as _has
from fastssl.pipelines import DataError
from fastssl.pipelines.loader import LoaderBase, build_loader
from fastssl.pipelines.recipes import preset


needs_ffcv = pytest.mark.skipif(not _has("ffcv"), reason="ffcv missing")


def _views(recipe="simclr", size=16):
    v = preset(recipe)
    for s in v:
        s.size = size
    return v


def _load(path, **kw):
    kw.setdefault("workers", 1)
    return build_loader(None, _views(), str(path), kw.pop("bs", 16), "cpu", **kw)


def _one_line_naming(e: BaseException, path) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    assert str(path) in msg and "fastssl-prepare" in msg, msg
    return msg


# ----------------------------------------------------------------------------- .beton files

@needs_ffcv
@pytest.mark.parametrize("keep", [0.0003, 0.02, 0.5, 0.99995, "table"])
def test_truncated_beton_is_a_one_line_error(demo_data, tmp_path, keep):
    """Cut in the header, in the metadata, in the data pages, in the sample table, and exactly before it."""
    from ffcv.types import HeaderType

    src = demo_data / "train.beton"
    data = src.read_bytes()
    if keep == "table":
        n = int(np.frombuffer(data[:HeaderType.itemsize], HeaderType)[0]["alloc_table_ptr"])
    else:
        n = max(1, int(len(data) * keep))
    bad = tmp_path / "cut.beton"
    bad.write_bytes(data[:n])
    with pytest.raises(DataError) as e:
        _load(bad)
    msg = _one_line_naming(e.value, bad)
    assert "truncated" in msg and "negative dimensions" not in msg


@needs_ffcv
def test_stale_sidecar_names_the_truncation(demo_data, tmp_path):
    """A file fastssl-prepare wrote, then changed: its sidecar's byte count no longer matches."""
    for name in ("train.beton", "train.beton.meta.json"):
        shutil.copy(demo_data / name, tmp_path / name)
    with open(tmp_path / "train.beton", "ab") as f:
        f.write(b"\0" * 24)  # one more (empty) sample-table row: structurally fine
    with pytest.raises(DataError) as e:
        _load(tmp_path / "train.beton")
    assert "meta.json" in _one_line_naming(e.value, tmp_path / "train.beton")


@needs_ffcv
def test_not_a_beton_and_other_format_version(demo_data, tmp_path):
    junk = tmp_path / "junk.beton"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as e:
        _load(junk)
    assert "format version" in _one_line_naming(e.value, junk)

    other = tmp_path / "v1.beton"
    data = bytearray((demo_data / "train.beton").read_bytes())
    data[0:2] = (1).to_bytes(2, "little")  # ffcv's header: version is the first uint16
    other.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        _load(other)
    assert "says 1" in _one_line_naming(e.value, other)


class _Rows:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@needs_ffcv
@pytest.mark.parametrize("layout", ["renamed", "ndarray", "float_label"])
def test_beton_with_another_field_layout(tmp_path, layout):
    """Written by ffcv's own DatasetWriter with fields fastssl does not read: named, with the fix."""
    from ffcv.fields import FloatField, IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (24, 20, 3), dtype=np.uint8) for _ in range(8)]
    if layout == "renamed":
        fields = {"picture": RGBImageField(write_mode="raw"), "label": IntField()}
        rows = [(im, i % 2) for i, im in enumerate(imgs)]
    elif layout == "ndarray":
        fields = {"image": NDArrayField(np.dtype("uint8"), (24, 20, 3)), "label": IntField()}
        rows = [(im, i % 2) for i, im in enumerate(imgs)]
    else:
        fields = {"image": RGBImageField(write_mode="raw"), "label": FloatField()}
        rows = [(im, float(i)) for i, im in enumerate(imgs)]
    out = tmp_path / f"{layout}.beton"
    DatasetWriter(str(out), fields, num_workers=1).from_indexed_dataset(_Rows(rows))
    with pytest.raises(DataError) as e:
        _load(out, bs=4)
    msg = _one_line_naming(e.value, out)
    assert "RGBImageField" in msg and "fields" in msg


@needs_ffcv
def test_beton_fields_found_by_name_not_position(tmp_path):
    """``label`` written before ``image``: read by name (ffcv's metadata columns are positional)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    rng = np.random.default_rng(0)
    rows = [(i % 3, rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for i in range(12)]
    out = tmp_path / "swapped.beton"
    DatasetWriter(str(out), {"label": IntField(), "image": RGBImageField(write_mode="raw")},
                  num_workers=1).from_indexed_dataset(_Rows(rows))
    L = _load(out, bs=4, train=False, drop_last=False)
    assert L.num_samples == 12 and L.num_classes == 3
    for b in L:
        assert torch.equal(b.labels, b.indices % 3)


def test_missing_file_is_a_data_error_and_file_not_found(tmp_path):
    gone = tmp_path / "gone.beton"
    for exc in (DataError, FileNotFoundError):
        with pytest.raises(exc) as e:
            _load(gone)
        msg = _one_line_naming(e.value, gone)
        assert "does not exist" in msg


def test_folder_without_images_is_a_data_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        _load(tmp_path, backend="torch")
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


@needs_ffcv
def test_trainer_prints_one_line_for_a_truncated_beton(demo_data, tmp_path, capsys):
    from conftest import tiny_overrides
    from fastssl.train import main

    bad = tmp_path / "cut.beton"
    bad.write_bytes((demo_data / "train.beton").read_bytes()[:50_000])
    argv = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path / "runs")
    argv = [a for a in argv if not a.startswith("data.train=")] + [f"data.train={bad}"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(bad) in err[0] and "fastssl-prepare" in err[0], err


# ----------------------------------------------------------------------------- image folders

CORRUPT = {"truncated": lambda d: d[: len(d) // 3], "garbage": lambda d: b"\xff\xd8" + bytes(range(256)) * 4,
           "empty": lambda d: b"", "not_jpeg": lambda d: b"GIF89a" + d[6:]}


@pytest.fixture
def bad_folder(jpeg_data, tmp_path):
    """The 200-image JPEG train folder with four unreadable files (one per kind in ``CORRUPT``)."""
    root = tmp_path / "train"
    shutil.copytree(jpeg_data / "train", root)
    files = sorted(root.rglob("*.jpg"))
    bad = {}
    for (kind, spoil), f in zip(CORRUPT.items(), files[3::47]):
        f.write_bytes(spoil(f.read_bytes()))
        bad[str(f)] = kind
    return root, bad


def _warned(capfd, caplog):
    """The loaders' unreadable-file warning lines since the last call: pytest's capture of the log records,
    or stderr when none reached it (``fastssl.logs.configure`` ran in this process and stopped propagation)."""
    err = [x for x in capfd.readouterr().err.splitlines() if "unreadable file" in x]
    logged = [r.getMessage() for r in caplog.records if "unreadable file" in r.getMessage()]
    caplog.clear()
    return logged or err


def _epoch(L):
    return [(b.indices.clone(), [v.clone() for v in b.views], b.labels.clone()) for b in L]


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_with_unreadable_files_keeps_batches_full(bad_folder, capfd, caplog, workers):
    root, bad = bad_folder
    L = _load(root, backend="torch", bs=20, workers=workers, photometric=False)   # 10 batches: every file is met
    paths = [p for p, _ in L.items]
    bad_ix = {paths.index(p) for p in bad}
    for epoch in range(2):
        L.set_epoch(epoch)
        batches = _epoch(L)
        assert len(batches) == len(L) == 10
        for idx, views, labels in batches:
            assert len(idx) == 20 and all(v.shape[0] == 20 for v in views) and len(labels) == 20
            assert not set(idx.tolist()) & bad_ix                       # replaced, not fed
            assert torch.equal(labels, torch.tensor([L.items[i][1] for i in idx.tolist()]))
        assert {p for p, _ in L.skipped} == set(bad) and all(r for _, r in L.skipped)
        lines = _warned(capfd, caplog)
        assert len(lines) == 1, lines                                     # one warning line per epoch
        assert f"epoch {epoch}" in lines[0] and f" {len(bad)} unreadable" in lines[0]
        assert sum(Path(p).name in lines[0] for p in bad) >= 3            # names the first few
    assert len(L.skipped) == len(bad)                                     # not listed twice


def test_replacements_are_deterministic_and_from_the_rank_shard(bad_folder):
    root, bad = bad_folder
    for rank in range(2):
        a = _epoch(_load(root, backend="torch", bs=8, photometric=False, rank=rank, world_size=2, seed=3))
        b = _epoch(_load(root, backend="torch", bs=8, photometric=False, rank=rank, world_size=2, seed=3, workers=0))
        ref = _load(root, backend="torch", bs=8, rank=rank, world_size=2, seed=3)
        shard = set(ref.order(0).tolist())
        assert len(a) == len(ref) == 12 and all(len(i) == 8 for i, _, _ in a)   # equal rows on both ranks
        for (ia, va, _), (ib, vb, _) in zip(a, b):
            assert torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(va, vb))
            assert set(ia.tolist()) <= shard


def test_folder_gpu_path_on_cpu_replaces_unreadable_files(bad_folder, monkeypatch):
    """The CUDA code path (bytes to the main process, batched decode_jpeg), run on the CPU: a JPEG the batched
    decoder refuses is decoded on the CPU instead, and one no decoder reads is replaced."""
    import torchvision.io

    from fastssl.pipelines import prepare, torch_backend
    from fastssl.pipelines.torch_backend import TorchLoader

    root, bad = bad_folder
    good = sorted(p for p in map(str, root.rglob("*.jpg")) if p not in bad)
    refused, unreadable = good[10], good[20]         # both end with EOI, so the worker hands them on as bytes
    refused_bytes = {Path(refused).read_bytes(), Path(unreadable).read_bytes()}
    real_decode, real_rgb = torchvision.io.decode_jpeg, prepare.load_rgb

    def decode_jpeg(data, *a, **k):
        batch = data if isinstance(data, list) else [data]
        if any(bytes(p.numpy().tobytes()) in refused_bytes for p in batch):
            raise RuntimeError("nvjpeg: unsupported")
        return real_decode(data, *a, **k)

    def load_rgb(path, *a, **k):
        if str(path) == unreadable:
            raise OSError("broken scan data")
        return real_rgb(path, *a, **k)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(torch_backend, "JPEG_DECODER", "torchvision")  # the decoder patched above, TorchCodec or not
    monkeypatch.setattr(prepare, "load_rgb", load_rgb)
    L = TorchLoader(str(root), _views("dino"), 20, "cpu", workers=0, gpu_decode=True)
    batches = list(L)
    assert len(batches) == 10 and all(v.shape[0] == 20 for b in batches for v in b.views)
    seen = set(torch.cat([b.indices for b in batches]).tolist())
    paths = [p for p, _ in L.items]
    assert paths.index(refused) in seen and paths.index(unreadable) not in seen
    assert {p for p, _ in L.skipped} == set(bad) | {unreadable}
    # Later epochs: the worker decodes the refused file itself, so the batched decoder never meets it.
    assert L.dataset.cpu_decode == {paths.index(refused)}
    refused_bytes.discard(Path(unreadable).read_bytes())
    met = []
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, *a, **k: met.append(
        any(bytes(p.numpy().tobytes()) in refused_bytes for p in data)) or decode_jpeg(data, *a, **k))
    L.set_epoch(1)
    again = list(L)
    assert len(again) == 10 and not any(met)
    assert paths.index(refused) in set(torch.cat([b.indices for b in again]).tolist())


def test_folder_of_only_unreadable_files_is_a_data_error(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(b"\xff\xd8broken")
    L = _load(tmp_path, backend="torch", bs=2, workers=0)
    with pytest.raises(DataError) as e:
        list(L)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value) and "fastssl-prepare" in str(e.value)


@pytest.mark.skipif(not _has("nvidia.dali"), reason="DALI missing")
def test_dali_leaves_unreadable_files_out_and_names_them(bad_folder, capfd, caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSSL_CACHE_DIR", str(tmp_path / "cache"))
    root, bad = bad_folder
    L = _load(root, backend="dali", bs=16, photometric=False)
    assert L.num_samples == 200 - len(bad) and {p for p, _ in L.skipped} == set(bad)
    batches = list(L)
    assert len(batches) == len(L) and all(b.views[0].shape[0] == 16 for b in batches)
    lines = _warned(capfd, caplog)
    assert len(lines) == 1 and "left out" in lines[0]
    again = _load(root, backend="dali", bs=16, photometric=False)      # the cached verdict keeps the reasons
    assert dict(again.skipped) == dict(L.skipped)


# ----------------------------------------------------------------------------- one loader base

def test_back_ends_share_one_base_and_ffcv_internals_stay_in_compat():
    import inspect

    from fastssl.pipelines import dali_backend, ffcv_backend, torch_backend

    for mod, cls in ((ffcv_backend, "FFCVLoader"), (torch_backend, "TorchLoader"), (dali_backend, "DALILoader")):
        C = getattr(mod, cls)
        assert issubclass(C, LoaderBase)
        assert "__iter__" not in C.__dict__ and "__len__" not in C.__dict__ and "_raw_batches" in C.__dict__
    src = inspect.getsource(ffcv_backend)
    for private in ("output_queue", "traversal_order", "next_epoch", '"f0"', '"f1"', "SimpleRGBImageDecoder",
                    "from ffcv.loader", "from ffcv.reader", "import ffcv\n"):
        assert private not in src, private


def test_out_of_memory_in_the_gpu_decode_is_not_taken_for_a_bad_jpeg(bad_folder, monkeypatch):
    """An out-of-memory error from the batched decode reaches the caller (the trainer's OOM handling) rather
    than a retry image by image, which would hide it behind B host syncs and a CPU decode."""
    import torchvision.io

    from fastssl.pipelines import torch_backend
    from fastssl.pipelines.torch_backend import TorchLoader

    root, _ = bad_folder
    fallbacks = []

    def decode_jpeg(data, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(torch_backend, "JPEG_DECODER", "torchvision")
    L = TorchLoader(str(root), _views("simclr"), 20, "cpu", workers=0, gpu_decode=True)
    monkeypatch.setattr(L, "_cpu_fallback", lambda *a: fallbacks.append(1))
    with pytest.raises(torch.OutOfMemoryError):
        next(iter(L))
    assert fallbacks == []
