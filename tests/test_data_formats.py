"""fastssl-prepare from the formats users have: each gives the .beton the folder path gives, image for image.

One set of photo-like images is written as an ImageFolder and as Parquet shards (Hugging
Face's image struct), Arrow, webdataset tars, a CSV and a JSON-lines list, each with the
same three bad samples (a truncated JPEG, a decompression bomb, a sample without a label);
CIFAR-10/100 and STL-10 binaries are written from pixels and compared with the same pixels
as a PNG folder.
"""
from __future__ import annotations

import io
import json
import logging
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ffcv")
import cv2  # noqa: E402
from PIL import Image  # noqa: E402

from fastssl.cli.prepare import main as prepare_main  # noqa: E402
from fastssl.pipelines.prepare import WriteSettings, meta_path, prepare_source, read_image, read_labels  # noqa: E402
from fastssl.pipelines.sources import open_source  # noqa: E402

N_GOOD, CLASSES = 24, ("c0", "c1", "c2")
S = dict(workers=1, jpeg_quality=90)


def _photo(rng, h, w) -> np.ndarray:
    """Smooth colour fields with some texture: JPEG treats them like photos."""
    small = rng.integers(0, 255, (4, 5, 3), np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(img + rng.integers(-12, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
                              **({"quality": 92} if ext == "jpg" else {"lossless": True} if ext == "webp" else {}))
    return buf.getvalue()


def _bomb() -> bytes:
    """A PNG header claiming 30000x30000 pixels (over twice PIL's limit): refused at open, nothing decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def samples():
    """``(key, ext, bytes, label or None, good)`` in the folder's order (class, then name), bad ones among them."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(N_GOOD):
        ext = ("jpg", "png", "jpg", "webp")[i % 4]
        img = _photo(rng, int(rng.integers(30, 60)), int(rng.integers(30, 60)))
        out.append((f"{i:03d}", ext, _encode(img, ext), i % 3, True))
    out.sort(key=lambda s: (s[3], s[0]))
    good_jpg = next(s[2] for s in out if s[1] == "jpg")
    out.insert(3, ("900", "jpg", good_jpg[: len(good_jpg) // 3], 0, False))    # truncated
    out.insert(10, ("901", "png", _bomb(), 1, False))                          # decompression bomb
    out.insert(15, ("902", "jpg", good_jpg, None, False))                      # no label
    return out


BAD_KEYS = {"900": "cannot decode", "901": "decompression bomb", "902": "no label"}


@pytest.fixture(scope="module")
def reference(samples, tmp_path_factory):
    """The folder path's .beton of the good samples: (beton, labels)."""
    root = tmp_path_factory.mktemp("folder")
    for key, ext, data, label, good in samples:
        if good:
            d = root / "src" / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{key}.{ext}").write_bytes(data)
    out = root / "ref.beton"
    s = prepare_source(open_source(root / "src"), out, WriteSettings(**S), quiet=True)
    assert s["written"] == N_GOOD and s["classes"] == list(CLASSES)
    return out


def _same_as_reference(out: Path, reference: Path, n: int = N_GOOD) -> None:
    labels = read_labels(out)
    assert len(labels) == n and labels.tolist() == read_labels(reference).tolist()
    for i in range(n):
        a, b = read_image(out, i), read_image(reference, i)
        assert a.shape == b.shape and np.array_equal(a, b), i


def _check_bad_lines(caplog, shard_word: str) -> None:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(lines) == len(BAD_KEYS), lines
    for key, why in BAD_KEYS.items():
        hit = [ln for ln in lines if re.search(rf"\b{key}\b", ln)]
        assert len(hit) == 1 and why in hit[0] and shard_word in hit[0], (key, lines)


def _prepare(src, out, caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastssl"):
        return prepare_source(open_source(src, **kw), out, WriteSettings(**S))


def test_parquet_shards_match_the_folder(samples, reference, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(CLASSES)}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    half = len(samples) // 2
    for k, part in enumerate((samples[:half], samples[half:])):
        t = pa.table({"image": pa.array([{"bytes": d, "path": f"{key}.{ext}"} for key, ext, d, _, _ in part], image_t),
                      "label": pa.array([lab for *_, lab, _ in part], pa.int64())}).replace_schema_metadata(meta)
        pq.write_table(t, tmp_path / f"train-{k:05d}-of-00002.parquet", row_group_size=5)
    out = tmp_path / "pq.beton"
    s = _prepare(tmp_path / "train-*.parquet", out, caplog)
    assert s["written"] == N_GOOD and s["classes"] == list(CLASSES)    # names from Hugging Face's ClassLabel
    _same_as_reference(out, reference)
    _check_bad_lines(caplog, ".parquet row ")
    # The same shard as an Arrow IPC stream (datasets' save_to_disk), binary column, named by the options.
    t = pq.read_table(tmp_path / "train-00000-of-00002.parquet")
    arrow = pa.table({"jpg": t.column("image").combine_chunks().field("bytes"), "y": t.column("label")})
    with pa.ipc.new_stream(str(tmp_path / "data.arrow"), arrow.schema) as w:
        w.write_table(arrow)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastssl"):
        src = open_source(tmp_path / "data.arrow", label_column="y")
        s2 = prepare_source(src, tmp_path / "arrow.beton", WriteSettings(**S))
    assert src.image_column == "jpg" and s2["written"] == sum(g for *_, g in samples[:half])
    top = max(lab for *_, lab, good in samples[:half] if good)
    assert s2["classes"] == [str(i) for i in range(top + 1)]  # no names stored: the numbers


def test_webdataset_shards_match_the_folder(samples, reference, tmp_path, caplog):
    half = len(samples) // 2
    for k, part in enumerate((samples[:half], samples[half:])):
        with tarfile.open(tmp_path / f"shard-{k:03d}.tar", "w") as tf:
            for key, ext, data, label, _ in part:
                members = [(f"{key}.{ext}", data)]
                if label is not None:  # half the labels as cls, half as json
                    members.append((f"{key}.cls", str(label).encode()) if int(key) % 2 else
                                   (f"{key}.json", json.dumps({"label": label}).encode()))
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "wds.beton"
    s = _prepare(str(tmp_path / "shard-{000..001}.tar"), out, caplog)
    assert s["written"] == N_GOOD
    _same_as_reference(out, reference)
    _check_bad_lines(caplog, ".tar: key ")


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_list_files_match_the_folder(samples, reference, tmp_path, caplog, kind):
    rows = []
    for key, ext, data, label, _ in samples:
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{key}.{ext}").write_bytes(data)
        rows.append((f"img/{key}.{ext}", CLASSES[label] if label is not None else ""))
    lst = tmp_path / f"train.{kind}"
    if kind == "csv":
        lst.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows) + "../outside.jpg,c0\n")
    else:
        lst.write_text("".join(json.dumps({"path": p, **({"label": lab} if lab else {})}) + "\n" for p, lab in rows))
    out = tmp_path / "list.beton"
    s = _prepare(lst, out, caplog)
    assert s["written"] == N_GOOD and s["classes"] == list(CLASSES)
    _same_as_reference(out, reference)
    if kind == "csv":  # a path leaving the list's folder: named, not read
        assert any("outside.jpg" in r["path"] and "outside the list's folder" in r["reason"] for r in s["skipped"])
        caplog.records[:] = [r for r in caplog.records if "outside.jpg" not in r.getMessage()]
    _check_bad_lines(caplog, f"train.{kind}:")


def _pixels(n: int, side: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([_photo(rng, side, side) for _ in range(n)])


def _png_folder_beton(root: Path, imgs: np.ndarray, labels, names) -> Path:
    for i, (img, lab) in enumerate(zip(imgs, labels)):
        d = root / "src" / names[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    out = root / "ref.beton"
    prepare_source(open_source(root / "src"), out, WriteSettings(write_mode="raw", workers=1), quiet=True)
    return out


def test_cifar10_and_cifar100_binaries(tmp_path, capsys):
    names10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    imgs = _pixels(20, 32, 1)
    labels = np.arange(20) % 10
    d10 = tmp_path / "cifar-10-batches-bin"
    d10.mkdir()
    for b in range(1, 6):  # 4 images a batch
        sl = slice(4 * (b - 1), 4 * b)
        recs = np.concatenate([labels[sl, None].astype(np.uint8), imgs[sl].transpose(0, 3, 1, 2).reshape(4, -1)], 1)
        (d10 / f"data_batch_{b}.bin").write_bytes(recs.tobytes())
    (d10 / "test_batch.bin").write_bytes(b"")
    (d10 / "batches.meta.txt").write_text("\n".join(names10) + "\n\n")
    out = tmp_path / "c10.beton"
    assert prepare_main([str(d10), str(out), "--write-mode", "raw", "--workers", "1", "--quiet"]) == 0
    ref_order = sorted(range(20), key=lambda i: (names10[labels[i]], f"{i:05d}"))   # the folder's order
    ref = _png_folder_beton(tmp_path / "ref10", imgs, labels, names10)
    assert json.loads(meta_path(out).read_text())["classes"] == names10
    got = read_labels(out)
    assert got.tolist() == labels.tolist()
    for k, i in enumerate(ref_order):  # same pixels as the PNG folder's .beton, and as the source
        assert np.array_equal(read_image(out, i), read_image(ref, k)) and np.array_equal(read_image(out, i), imgs[i])
    # A truncated download and the missing split: one line each.
    assert prepare_main([str(d10), str(tmp_path / "t.beton"), "--split", "test", "--quiet"]) == 2
    assert "test_batch.bin: 0 bytes is not a whole number of 3073-byte records" in capsys.readouterr().err

    d100 = tmp_path / "cifar-100-binary"
    d100.mkdir()
    fine = (np.arange(20) * 7) % 100
    fine[5] = 130                                                               # out of range: skipped, named
    recs = np.concatenate([(fine // 5)[:, None].astype(np.uint8), fine[:, None].astype(np.uint8),
                           imgs.transpose(0, 3, 1, 2).reshape(20, -1)], 1)
    (d100 / "train.bin").write_bytes(recs.tobytes())
    out = tmp_path / "c100.beton"
    assert prepare_main([str(d100), str(out), "--write-mode", "raw", "--workers", "1"]) == 0
    assert "train.bin record 5: label 130 is outside 0..99" in capsys.readouterr().err
    keep = [i for i in range(20) if i != 5]
    assert read_labels(out).tolist() == fine[keep].tolist()
    assert all(np.array_equal(read_image(out, k), imgs[i]) for k, i in enumerate(keep))


def test_stl10_binary(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    imgs = _pixels(6, 96, 2)
    labels = np.array([1, 2, 3, 10, 4, 5], np.uint8)
    # STL-10 stores each image column-major: channel, then column, then row.
    (d / "train_X.bin").write_bytes(imgs.transpose(0, 3, 2, 1).tobytes())
    (d / "train_y.bin").write_bytes(labels.tobytes())
    (d / "unlabeled_X.bin").write_bytes(imgs[:2, ::-1].transpose(0, 3, 2, 1).tobytes())
    (d / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)))
    out = tmp_path / "stl.beton"
    assert prepare_main([str(d), str(out), "--split", "train+unlabeled", "--write-mode", "raw", "--workers", "1",
                         "--quiet"]) == 0
    assert read_labels(out).tolist() == (labels - 1).tolist() + [-1, -1]
    want = list(imgs) + [imgs[0, ::-1], imgs[1, ::-1]]
    assert all(np.array_equal(read_image(out, i), w) for i, w in enumerate(want))
    ref = _png_folder_beton(tmp_path / "ref", imgs, labels - 1, [f"k{i}" for i in range(10)])
    order = sorted(range(6), key=lambda i: (f"k{labels[i] - 1}", f"{i:05d}"))
    assert all(np.array_equal(read_image(out, i), read_image(ref, k)) for k, i in enumerate(order))
    assert json.loads(meta_path(out).read_text())["class_counts"] == [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]


def test_parquet_paths_links_and_missing_pyarrow(samples, tmp_path, monkeypatch):
    """Listing and reading only (no .beton): a struct with a path and no bytes, a tar link, no pyarrow."""
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastssl.pipelines.prepare import PrepareError, validate

    good = [s for s in samples if s[4]][:3]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / f"a.{good[0][1]}").write_bytes(good[0][2])
    (tmp_path / "secret.jpg").write_bytes(good[1][2])
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": f"a.{good[0][1]}"}, {"bytes": None, "path": "../secret.jpg"},
             {"bytes": good[2][2], "path": f"c.{good[2][1]}"}]
    pq.write_table(pa.table({"image": pa.array(cells, image_t), "label": [0, 1, 2]}), tmp_path / "files" / "p.parquet")
    src = open_source(tmp_path / "files" / "p.parquet", label_column="")
    assert src.classes is None and [lab for _, lab in src.items] == [-1, -1, -1]       # --label-column ''
    checked = validate([r for r, _ in src.items], 1, progress=False, fetch=src.fetch)
    assert checked[0][1] is None and checked[2][1] is None
    assert "outside the shard's folder" in checked[1][1] and "key ../secret.jpg" in src.name(checked[1][0])

    with tarfile.open(tmp_path / "links.tar", "w") as tf:
        info = tarfile.TarInfo("000.jpg")
        info.size = len(good[0][2])
        tf.addfile(info, io.BytesIO(good[0][2]))
        link = tarfile.TarInfo("001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    src = open_source(tmp_path / "links.tar")
    assert len(src.items) == 1 and src.skipped == [(f"{tmp_path / 'links.tar'}: 001.jpg",
                                                    "not a regular file (a link or device)")]

    monkeypatch.setitem(sys.modules, "pyarrow", None)   # as if not installed
    with pytest.raises(PrepareError, match=r"pip install"):
        open_source(tmp_path / "files" / "p.parquet")
