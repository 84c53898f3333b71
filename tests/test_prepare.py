"""fastssl-prepare: real photos round-trip through a .beton; bad files are skipped and reported."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("ffcv")
data = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

from conftest import noise_folder  # noqa: E402

from fastssl.cli.prepare import main as prepare_main  # noqa: E402
from fastssl.pipelines.prepare import (PrepareError, WriteSettings, meta_path, prepare_folder,  # noqa: E402
                                       read_image, read_labels)


def _expected(img: Image.Image) -> np.ndarray:
    """What prepare must produce for a source image: 8-bit RGB, alpha on white."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    if img.mode == "I;16":
        return np.repeat((np.asarray(img).astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)[..., None], 3, 2)
    return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """ImageFolder of real photos, 3 classes, with odd modes and two broken files; returns (root, expected)."""
    root = tmp_path_factory.mktemp("photos")
    for c in ("animals", "people", "things"):
        (root / c).mkdir()
    chelsea, coffee, rocket = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()), Image.fromarray(data.rocket())
    astro = Image.fromarray(data.astronaut()).resize((256, 256))
    cam = Image.fromarray(data.camera()).resize((200, 200))
    files = {
        "animals/chelsea.jpg": chelsea,
        "animals/cat_palette_alpha.png": chelsea.quantize(64),              # palette + transparency (set below)
        "animals/cat_rgba.png": chelsea.convert("RGBA"),
        "people/astronaut.jpg": astro,
        "people/camera_gray.png": cam,                                      # L
        "people/camera_16bit.png": Image.fromarray(np.asarray(cam).astype(np.uint16) * 257),
        "things/coffee_cmyk.jpg": coffee.convert("CMYK"),
        "things/rocket.png": rocket,
    }
    rgba = np.asarray(files["animals/cat_rgba.png"]).copy()
    rgba[:100, :100, 3] = 0                                                 # transparent corner
    files["animals/cat_rgba.png"] = Image.fromarray(rgba, "RGBA")
    expected = {}
    for name, img in files.items():
        p = root / name
        if name.endswith("palette_alpha.png"):
            img.save(p, transparency=0)
        elif name.endswith(".jpg"):
            img.save(p, quality=95)
        else:
            img.save(p)
        expected[name] = _expected(Image.open(p))
    good = (root / "animals/chelsea.jpg").read_bytes()
    (root / "things/truncated.jpg").write_bytes(good[: len(good) // 3])   # corrupt JPEG
    (root / "things/not_an_image.png").write_bytes(b"hello, I am text")
    (root / "people/notes.txt").write_text("not an image")
    return root, expected


def test_round_trip_real_photos(photo_folder, tmp_path, caplog):
    root, expected = photo_folder
    out = tmp_path / "photos.beton"
    with caplog.at_level(logging.INFO, logger="fastssl"):
        summary = prepare_folder(root, out, WriteSettings(jpeg_quality=90, workers=1))
    printed = caplog.text
    assert summary["written"] == len(expected)
    reasons = {p.split("/")[-1]: r for p, r in ((s["path"], s["reason"]) for s in summary["skipped"])}
    assert set(reasons) == {"truncated.jpg", "not_an_image.png", "notes.txt"}
    assert "cannot decode" in reasons["truncated.jpg"] and "cannot decode" in reasons["not_an_image.png"]
    assert "truncated.jpg" in printed and "estimated output size" in printed   # reported, never silent
    assert summary["classes"] == ["animals", "people", "things"]
    assert summary["class_counts"] == [3, 3, 2]
    labels = read_labels(out)
    assert np.bincount(labels).tolist() == [3, 3, 2]
    # Samples are written in sorted listing order (class, then file name).
    names = sorted(expected)
    for i, name in enumerate(names):
        got = read_image(out, i)
        want = expected[name]
        assert got.shape == want.shape, name
        err = np.abs(got.astype(np.int16) - want.astype(np.int16)).mean()
        assert err < 6.0, f"{name}: mean abs error {err:.2f} after JPEG q90"
    # A wrong image (another photo) is far off: the bound can fail.
    assert np.abs(read_image(out, 0)[:200, :200].astype(np.int16) - expected[names[3]][:200, :200]).mean() > 20
    meta = json.loads(meta_path(out).read_text())
    assert meta["complete"] and meta["bytes"] == out.stat().st_size


def test_idempotent_and_params_change(photo_folder, tmp_path):
    root, _ = photo_folder
    out = tmp_path / "a.beton"
    s1 = prepare_folder(root, out, WriteSettings(workers=1, max_resolution=128), quiet=True)
    mtime = out.stat().st_mtime_ns
    s2 = prepare_folder(root, out, WriteSettings(workers=1, max_resolution=128), quiet=True)
    assert not s1["reused"] and s2["reused"] and out.stat().st_mtime_ns == mtime
    assert max(read_image(out, 0).shape[:2]) == 128          # longest side capped
    s3 = prepare_folder(root, out, WriteSettings(workers=1, max_resolution=96, write_mode="raw"), quiet=True)
    assert not s3["reused"] and max(read_image(out, 0).shape[:2]) == 96
    assert not list(tmp_path.glob("*.partial"))             # no temporary left behind


def test_flat_folder_unlabelled(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i, fn in enumerate((data.astronaut, data.coffee)):
        Image.fromarray(fn()).save(src / f"{i}.jpg", quality=90)
    out = tmp_path / "flat.beton"
    assert prepare_main([str(src), str(out), "--workers", "1", "--quiet"]) == 0
    assert read_labels(out).tolist() == [-1, -1]
    assert json.loads(meta_path(out).read_text())["classes"] is None


def test_empty_and_missing_sources(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no images"):
        prepare_folder(tmp_path / "empty", tmp_path / "x.beton")
    with pytest.raises(PrepareError, match="does not exist"):
        prepare_folder(tmp_path / "missing", tmp_path / "x.beton")
    assert prepare_main([str(tmp_path / "missing"), str(tmp_path / "x.beton")]) != 0
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "allbad" / "c"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"junk")
    assert prepare_main([str(tmp_path / "allbad"), str(tmp_path / "y.beton"), "--quiet"]) != 0
    assert not (tmp_path / "x.beton").exists() and not (tmp_path / "y.beton").exists()


def test_synthetic_cli(tmp_path):
    rc = prepare_main(["synthetic", str(tmp_path), "--classes", "3", "--per-class", "4", "--val-per-class", "2",
                       "--size", "24", "--jpeg-folders", "--quiet"])
    assert rc == 0
    assert np.bincount(read_labels(tmp_path / "train.beton")).tolist() == [4, 4, 4]
    assert len(read_labels(tmp_path / "val.beton")) == 6
    assert sorted(p.name for p in (tmp_path / "train").iterdir() if p.is_dir()) == ["disk", "square", "triangle"]
    assert json.loads(meta_path(tmp_path / "train.beton").read_text())["classes"] == ["disk", "square", "triangle"]
    from fastssl.pipelines.synthetic import SyntheticImages

    ds = SyntheticImages(3, 4, 24, seed=0, split="train")
    got = read_image(tmp_path / "train.beton", 0).astype(int)
    err = np.abs(got - ds[0][0]).mean()
    # Saturated palette edges at 24 px cost JPEG's 4:2:0 chroma a few levels; any other image is far off.
    assert err < 12 and all(err < np.abs(got - ds[i][0]).mean() / 2 for i in range(1, len(ds)))


def test_size_caps_short_and_long_side():
    from fastssl.pipelines.prepare import output_size

    assert output_size(500, 375, None, 256) == (341, 256)       # a typical ImageNet photo: short side 256
    assert output_size(375, 500, None, 256) == (256, 341)
    assert output_size(500, 375, 256) == (256, 192)             # longest-side cap: ffcv's convention
    assert output_size(2000, 300, 512, 256) == (512, 76)        # both: the tighter applies
    assert output_size(200, 150, 512, 256) == (200, 150)        # never upscaled
    for w, h in ((640, 427), (333, 500), (1023, 768), (257, 4000)):
        assert min(output_size(w, h, None, 224)) == 224         # exact, not a truncated 223


def test_short_side_round_trip(photo_folder, tmp_path):
    root, expected = photo_folder
    out = tmp_path / "short.beton"
    prepare_folder(root, out, WriteSettings(workers=1, short_side=64, write_mode="raw"), quiet=True)
    names = sorted(expected)
    for i, name in enumerate(names):
        h, w = expected[name].shape[:2]
        got = read_image(out, i)
        assert min(got.shape[:2]) == min(64, h, w), (name, got.shape)
        assert abs(got.shape[1] / got.shape[0] - w / h) < 0.05, name   # aspect ratio kept
    assert json.loads(meta_path(out).read_text())["params"]["short_side"] == 64


def test_workers_default_to_the_usable_cores(monkeypatch):
    import os

    from fastssl.pipelines import prepare

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert prepare.default_workers() == 3 and WriteSettings().workers == 3
    with pytest.raises(PrepareError, match="--workers"):
        WriteSettings(workers=0).check()


def test_disk_too_small_for_the_estimate_fails_before_writing(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    src = noise_folder(tmp_path / "src", n=8, side=64)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 1000, 1000))
    out = tmp_path / "x.beton"
    assert prepare_main([str(src), str(out), "--workers", "1", "--quiet"]) == 4
    err = capsys.readouterr().err
    assert "about" in err and "needed" in err and "1000 B free" in err and not out.exists()


def test_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    src = noise_folder(tmp_path / "src", n=4, side=32)
    (tmp_path / "afile").write_text("x")
    assert prepare_main([str(src), str(tmp_path / "afile" / "x.beton"), "--quiet"]) == 2   # a file as the folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "afile" in err[0], err

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)   # a read-only folder (root ignores chmod)
    assert prepare_main([str(src), str(tmp_path / "ro" / "x.beton"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0] and "folder you can write" in err[0], err
    assert prepare_main([str(src), str(tmp_path), "--quiet"]) == 2                          # a folder as OUT
    assert "is a folder" in capsys.readouterr().err
