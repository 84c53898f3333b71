"""fastssl-prepare under adverse conditions: a disk that only just holds the estimate, a disk filling mid-write,
a default start method other than fork, OpenCV threads in the worker processes, a file misnamed by format."""
from __future__ import annotations

import json
import re
import shutil
from collections import namedtuple

import numpy as np
import pytest

pytest.importorskip("ffcv")
from PIL import Image  # noqa: E402

from conftest import noise_folder  # noqa: E402

from fastssl.cli.prepare import main as prepare_main  # noqa: E402
from fastssl.pipelines.prepare import (MIN_MARGIN, WriteSettings, estimate_size, meta_path,  # noqa: E402
                                       read_image, read_labels, validate)

_usage = namedtuple("usage", "total used free")


def test_the_margin_follows_the_sampled_sizes():
    """Twice the sampled mean's standard error (at least MIN_MARGIN); none beyond it when every image is sampled."""
    rng = np.random.default_rng(1)
    sides = rng.integers(8, 64, 1000)                              # raw: each image stores side*side*3 bytes
    load = lambda i: np.zeros((sides[i], sides[i], 3), np.uint8)  # noqa: E731
    s = WriteSettings(write_mode="raw", workers=1)
    page = 2 ** 21
    e = estimate_size(load, len(sides), s, page, sample=24)
    assert e.sampled == 24
    sizes = 3.0 * sides ** 2
    cv = sizes.std() / sizes.mean()
    assert 1.5 * cv / 24 ** 0.5 < e.margin < 2.5 * cv / 24 ** 0.5, e   # about 2 standard errors (~0.2 here)
    assert e.required == int(e.bytes * (1 + e.margin)) + 2 * page
    assert 0.8 < e.bytes / (sizes.sum() + (s.workers + 1) * page) < 1.25, e
    whole = estimate_size(load, 30, s, page, sample=64)          # all 30 sampled: the mean is exact
    assert whole.sampled == 30 and whole.margin == MIN_MARGIN


def test_free_space_between_the_estimate_and_its_margin_is_refused(tmp_path, capsys, monkeypatch):
    """Free space just above the estimate is not enough: one line naming what was required, exit 4, nothing written."""
    src = noise_folder(tmp_path / "src")
    out = tmp_path / "out" / "x.beton"
    assert prepare_main([str(src), str(out), "--workers", "1", "--quiet"]) == 0
    est = json.loads(meta_path(out).read_text())["estimated_bytes"]
    out.unlink()
    meta_path(out).unlink()
    free = int(est * 1.02)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(10 * free, 9 * free, free))
    assert prepare_main([str(src), str(out), "--workers", "1", "--quiet"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "required" in err[0] and "margin" in err[0], err
    assert "about" in err[0] and "needed" in err[0] and "free" in err[0], err
    required = float(re.search(r"([\d.]+) MiB required", err[0]).group(1)) * 2 ** 20
    assert required > free and not out.exists()
    roomy = int(required) + 2 ** 20                          # what the line asked for: the write goes ahead
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(10 * roomy, 9 * roomy, roomy))
    assert prepare_main([str(src), str(out), "--workers", "1", "--quiet"]) == 0 and out.exists()


def test_disk_full_mid_write_reports_what_was_written_and_the_free_space_after_removal(tmp_path, capsys,
                                                                                         monkeypatch):
    """ENOSPC in the writer process after its first page: the bytes written, the share of the images done and
    the space that implies; the free space is measured once the partial file is gone."""
    import errno

    from ffcv.memory_allocator import MemoryAllocator

    src = noise_folder(tmp_path / "src", n=60, side=160)    # raw, 27 images a 2 MiB page
    out = tmp_path / "out" / "full.beton"
    real_flush = MemoryAllocator.flush_page
    pages = []

    def flush(self):
        if self.my_page >= 0:
            pages.append(self.my_page)  # this process's own count (the writer forks)
            if len(pages) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_flush(self)

    def usage(path):  # a full disk while the partial file is there, 10 GiB free once it is removed
        free = 1000 if list(out.parent.glob("*.partial")) else 10 * 2 ** 30
        return _usage(20 * 2 ** 30, 20 * 2 ** 30 - free, free)

    monkeypatch.setattr(MemoryAllocator, "flush_page", flush)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    rc = prepare_main([str(src), str(out), "--write-mode", "raw", "--workers", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 4 and len(err) == 1, err
    line = err[0]
    assert "no space left" in line and str(out) in line and "partial file was removed" in line, line
    assert "10.0 GiB free" in line and "1000 B free" not in line, line
    m = re.search(r"after writing ([\d.]+) MiB for ([\d.]+)% of the images \((\d+) of 60\): "
                  r"about ([\d.]+) MiB needed in all", line)
    assert m, line
    written, pct, done, needed = float(m[1]), float(m[2]), int(m[3]), float(m[4])
    assert 0 < done < 60 and abs(pct - 100 * done / 60) < 0.5
    assert abs(needed - written * 60 / done) < 0.1 and "estimated" in line, line
    assert not out.exists() and not list(out.parent.iterdir())


@pytest.mark.timeout(120)
def test_prepare_under_a_forkserver_default_start_method(tmp_path, capsys):
    """Python 3.14's default on Linux: the writer and validation still fork (nothing local is pickled)."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        pytest.skip("no forkserver start method")
    src = noise_folder(tmp_path / "src", n=64, side=16)      # 64: validation runs in a pool of processes
    out = tmp_path / "fs.beton"
    saved = mp.get_start_method(allow_none=True)
    mp.set_start_method("forkserver", force=True)
    try:
        rc = prepare_main([str(src), str(out), "--workers", "2", "--write-mode", "raw", "--quiet"])
    finally:
        mp.set_start_method(saved, force=True)
    assert rc == 0, capsys.readouterr().err
    assert np.bincount(read_labels(out)).tolist() == [32, 32]
    first = sorted((src / "c0").iterdir())[0]
    assert np.array_equal(read_image(out, 0), np.asarray(Image.open(first)))


def test_no_fork_start_method_is_one_line(tmp_path, capsys, monkeypatch):
    import multiprocessing as mp

    src = noise_folder(tmp_path / "src", n=4, side=16)
    monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn"])   # Windows
    assert prepare_main([str(src), str(tmp_path / "x.beton"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fork start method" in err[0], err
    assert not (tmp_path / "x.beton").exists()


@pytest.mark.timeout(120)
def test_worker_processes_run_opencv_on_one_thread_and_the_parent_keeps_its_own(tmp_path):
    """Each validation and writer process resizes on one OpenCV thread (not one per core each); the parent's
    setting is restored. The parent's pool has run before the workers fork (a forked child must not touch it)."""
    cv2 = pytest.importorskip("cv2")
    from fastssl.pipelines.prepare import prepare_dataset

    saved = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        cv2.resize(np.zeros((600, 600, 3), np.uint8), (150, 150), interpolation=cv2.INTER_AREA)  # pool running

        def fetch(ref):  # in a validation process: an image whose side is that process's OpenCV thread count
            t = cv2.getNumThreads()
            return np.zeros((t, t, 3), np.uint8)

        checked = validate(list(range(64)), 2, progress=False, fetch=fetch)
        assert {hw for _, why, hw in checked if why is None} == {(1, 1)}, checked[:3]
        assert cv2.getNumThreads() == 3

        class Threads:  # in a writer process: pixels that hold its OpenCV thread count
            def __len__(self):
                return 16

            def __getitem__(self, i):
                return np.full((8, 8, 3), cv2.getNumThreads(), np.uint8), 0

        out = tmp_path / "threads.beton"
        prepare_dataset(Threads(), out, {"source": "threads"}, None, WriteSettings(write_mode="raw", workers=2),
                        quiet=True)
        assert {int(read_image(out, i).max()) for i in range(16)} == {1}
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(saved)


@pytest.mark.parametrize("real, hint", [("PNG", "re-save it as JPEG or rename it to .png"),
                                        ("ICO", "convert it to JPEG (ICO files are not read)")])
def test_a_file_of_another_format_is_skipped_with_the_fix(tmp_path, real, hint):
    """ImageNet's n02105855_2933.JPEG is a PNG: skipped by default, and the reason says how to keep it."""
    p = tmp_path / "n02105855_2933.JPEG"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(p, format=real)
    [(_, why, _)] = validate([str(p)], 1, progress=False)
    assert f"not a JPEG: its content is {real}" in why and hint in why, why


def test_validation_of_jpegs_at_one_eighth_scale_agrees_with_the_full_decode(tmp_path):
    """JPEGs are validated at their smallest DCT scale: the same output shape as the writer's decode (caps and
    EXIF turns applied), and a truncated or corrupt one still fails."""
    from fastssl.pipelines.prepare import _validate_one, load_rgb

    rng = np.random.default_rng(1)
    files = []
    for i, (w, h, orientation, mode) in enumerate([(500, 375, 1, "RGB"), (375, 500, 6, "RGB"), (333, 900, 8, "L"),
                                                   (640, 480, 1, "CMYK")]):
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).convert(mode)
        exif = Image.Exif()
        if orientation != 1:
            exif[0x0112] = orientation
        f = tmp_path / f"{i}.jpg"
        im.save(f, quality=90, exif=exif.tobytes())
        files.append(f)
    for caps in ((None, None), (512, 256), (300, None)):
        for f in files:
            path, why, hw = _validate_one(str(f), *caps[:1], short_side=caps[1])
            assert why is None and hw == load_rgb(f, caps[0], short_side=caps[1]).shape[:2], (f.name, caps)
    whole = files[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.jpg").write_bytes(whole[:600] + bytes(range(256)) * 8)
    for name in ("cut.jpg", "junk.jpg"):
        _, why, hw = _validate_one(str(tmp_path / name))
        assert why is not None and why.startswith("cannot decode") and hw == (0, 0), (name, why)
