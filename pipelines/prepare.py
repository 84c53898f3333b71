"""Image folder / built-in data -> FFCV ``.beton`` (fields ``image``: RGBImageField, ``label``: IntField).

Every source image is decoded once up front, in parallel, so the ffcv writer
never sees a bad one (a worker exception there hangs ffcv's writer): files that
cannot be decoded are skipped and listed with the reason. JPEGs are checked at
their smallest DCT scale (1/8): every coefficient is still entropy-decoded, so a
corrupt file fails there as at full size, for about a fifth of the cost.

Source folders are not trusted (SECURITY.md). Each of these is skipped and named,
with its reason, in the summary: decompression bombs (more pixels than PIL's
``Image.MAX_IMAGE_PIXELS``, judged from the header before any pixel is decoded),
images whose longest side exceeds ``max_aspect_ratio`` times the shortest, files
whose content is not the format their extension names (only that format's PIL
decoder is tried, so no other of PIL's ~40 decoders, EPS's Ghostscript among
them, ever sees a file), and symlinks that resolve outside the source folder.
Peak memory per worker is bounded by the pixel limit (about 7 bytes per pixel for
PNG-like formats), and for JPEGs by ``--max-resolution``: they are decoded at a
reduced DCT scale (PIL's ``draft``, as ``Image.thumbnail`` does) to no less than
twice the output size (:func:`load_rgb`). Grayscale, CMYK,
palette, 16-bit and alpha images are converted to 8-bit RGB. Outputs are
written to a temporary name and renamed (atomic); a JSON sidecar
``<out>.meta.json`` records the parameters, class names and counts, so a second
run with the same parameters reuses the file. Before writing, the output's size is
estimated from sampled images, and its disk must hold the estimate plus a margin
for the estimate's error (:func:`estimate_size`). Worker processes are forked
whatever multiprocessing's default start method, and run OpenCV on one thread.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

try:
    from multiprocessing.context import ForkProcess as _ForkProcess
except ImportError:  # no fork start method (Windows): _fork_context() refuses before any writer is made
    _ForkProcess = object

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# The PIL format each extension names (PIL's own Image.EXTENSION table); only that decoder opens the file.
EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".pgm": "PPM", ".bmp": "BMP",
               ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".gif": "GIF"}
# Longest side over shortest: panoramas reach about 10; beyond this a --max-resolution resize leaves a sliver.
MAX_ASPECT_RATIO = 20.0
# EXIF orientation -> the transpose that undoes it (PIL's ImageOps.exif_transpose table).
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}
FORMAT_VERSION = 1
FFCV_INSTALL = ("ffcv is not installed: apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
                "pip install 'fastssl[ffcv]'")


# Exit status of ``fastssl-prepare`` when the output's disk fills (2 is any other bad input).
DISK_FULL_EXIT = 4


class PrepareError(Exception):
    """Bad input for ``fastssl-prepare`` (empty or missing source, bad option): the message says what to do."""


class DiskFull(PrepareError):
    """The output's file system ran out of space; the partial output is removed."""


@dataclass(frozen=True)
class Encoded:
    """An encoded image held in memory (a parquet cell, a tar member).

    ``name`` carries the extension that picks the decoder (as a file's name does) and
    names the image in messages.
    """
    name: str
    data: bytes = field(repr=False)


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class UnsafeImage(ValueError):
    """An image refused before decoding (bomb, absurd aspect ratio, content not its extension's format)."""


def meta_path(out: str | os.PathLike) -> Path:
    """The JSON sidecar of a ``.beton``: parameters, class names, counts."""
    return Path(str(out) + ".meta.json")


def read_meta(out: str | os.PathLike) -> dict | None:
    """The sidecar of ``out`` if it exists and parses, else None."""
    p = meta_path(out)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise PrepareError(FFCV_INSTALL) from e
    _fork_context()


def _fork_context():
    """multiprocessing's ``fork`` context, whatever the default start method (Python 3.14's on Linux is
    ``forkserver``): the validation and writer processes inherit the image list, the source's reader and
    ffcv's writer state instead of receiving them pickled. A :class:`PrepareError` where there is no fork."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        raise PrepareError("fastssl-prepare needs multiprocessing's fork start method, which this platform "
                           "lacks: run it on Linux or macOS (on Windows: under WSL)")
    return mp.get_context("fork")


def _identity(item):
    """The default ``fetch``: the listed items are what is decoded."""
    return item


@contextlib.contextmanager
def _one_cv2_thread():
    """OpenCV on one thread in the validation and writer processes forked inside the block: its default
    pool has a thread per core, and there is a process per core already. Set in this process before they
    fork and restored after: set in a forked child instead, OpenCV (its pthreads pool) waits forever to
    join the parent's pool threads, which the child does not have."""
    try:
        import cv2
    except ImportError:
        yield
        return
    n = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(n)


# ----------------------------------------------------------------------------- listing and decoding


def list_images(src: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str] | None, list[tuple[str, str]]]:
    """Files of an ImageFolder (one sub-folder per class) or of a flat folder (label -1).

    Returns ``(items, classes, skipped)``: ``items`` are ``(path, label)`` in a fixed
    (sorted) order, ``classes`` the sorted class-folder names (None for a flat
    folder), ``skipped`` are ``(path, reason)`` for files that are not images and for
    symlinks (files or class folders) that resolve outside ``src``. Symlinked folders
    below a class folder are not descended into (``Path.rglob``'s default).
    """
    root = Path(src)
    if not root.exists():
        raise PrepareError(f"source {root} does not exist: give an image folder (one sub-folder per class, "
                           f"or a flat folder of images), or `synthetic` for the built-in data")
    if not root.is_dir():
        raise PrepareError(f"source {root} is not a folder: give an image folder (one sub-folder per class, "
                           f"or a flat folder of images)")
    real_root = root.resolve()
    skipped: list[tuple[str, str]] = []

    def escapes(p: Path) -> bool:
        """A symlink (the only way out: rglob does not follow linked folders) resolving outside ``src``."""
        if not p.is_symlink():
            return False
        try:
            return not p.resolve().is_relative_to(real_root)
        except (OSError, RuntimeError):  # a symlink loop
            return True

    def outside(p: Path) -> str:
        return f"symlink outside the source folder (to {os.path.realpath(p)})"

    subdirs = []
    for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if escapes(d):
            skipped.append((str(d), outside(d)))
        else:
            subdirs.append(d)
    top_files = sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith("."))
    classes: list[str] | None = None
    items: list[tuple[str, int]] = []

    def collect(folder: Path, label: int, recursive: bool) -> int:
        n = 0
        it = sorted(folder.rglob("*")) if recursive else sorted(folder.iterdir())
        for f in it:
            if not f.is_file() or f.name.startswith("."):
                continue
            if escapes(f):
                skipped.append((str(f), outside(f)))
            elif f.suffix.lower() in IMAGE_EXTS:
                items.append((str(f), label))
                n += 1
            else:
                skipped.append((str(f), f"not an image file extension ({f.suffix or 'none'})"))
        return n

    class_dirs = [d for d in subdirs if any(f.suffix.lower() in IMAGE_EXTS for f in d.rglob("*") if f.is_file())]
    if class_dirs:  # ImageFolder: labels are the sorted class-folder names (torchvision's convention)
        classes = [d.name for d in class_dirs]
        for label, d in enumerate(class_dirs):
            collect(d, label, recursive=True)
        for f in top_files:
            skipped.append((str(f), "file at the top level of an ImageFolder (not inside a class folder)"))
    else:
        collect(root, -1, recursive=False)
    if not items:
        raise PrepareError(f"source {root} holds no images ({', '.join(IMAGE_EXTS)}): give an ImageFolder "
                           f"(root/<class>/<image>) or a flat folder of images")
    return items, classes, skipped


def scale_ratio(w: int, h: int, max_resolution: int | None, short_side: int | None = None) -> float:
    """The factor (<= 1) that brings ``(w, h)`` within both caps: longest side <= ``max_resolution``, shortest
    side <= ``short_side``. Images already within them keep their size (never upscaled)."""
    ratio = 1.0
    if max_resolution:
        ratio = min(ratio, max_resolution / max(w, h))
    if short_side:
        ratio = min(ratio, short_side / min(w, h))
    return ratio


def output_size(w: int, h: int, max_resolution: int | None, short_side: int | None = None) -> tuple[int, int]:
    """``(w, h)`` after :func:`scale_ratio`: ffcv's ``resizer`` arithmetic (truncation) for the longest-side cap.

    Under the short-side cap the short side is exactly ``short_side`` (a truncated
    ``255.99`` would leave 255 px, below a 256 px center crop's source size).
    """
    ratio = scale_ratio(w, h, max_resolution, short_side)
    if ratio >= 1:
        return w, h
    if short_side and ratio == short_side / min(w, h):
        return (short_side, max(1, int(ratio * h))) if w <= h else (max(1, int(ratio * w)), short_side)
    return int(ratio * w), int(ratio * h)


def open_image(src: str | os.PathLike | Encoded, max_aspect_ratio: float = MAX_ASPECT_RATIO):
    """``PIL.Image.open`` with the checks that need only the header; raises :class:`UnsafeImage`.

    ``src`` is a file or an :class:`Encoded` image (its ``name`` plays the file name's part).
    Only the decoder of the format the extension names is tried (``formats=``); without a
    known extension, only the formats of ``EXT_FORMATS``. A file it does not recognise is
    named with the format it really holds, if PIL knows it.
    Refused too: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL itself only warns
    up to twice that), and a longest/shortest side ratio above ``max_aspect_ratio``.
    """
    from PIL import Image, UnidentifiedImageError

    encoded = isinstance(src, Encoded)
    name = src.name if encoded else str(src)

    def fp():
        return io.BytesIO(src.data) if encoded else src

    ext = Path(name).suffix.lower()
    fmt = EXT_FORMATS.get(ext)
    try:
        im = Image.open(fp(), formats=[fmt] if fmt else sorted(set(EXT_FORMATS.values())))
    except Image.DecompressionBombError as e:
        raise UnsafeImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        real = None
        if fmt:
            try:
                with Image.open(fp()) as other:  # header only: names what the file really is
                    real = other.format
            except Exception:
                pass
        if real:
            raise UnsafeImage(f"not a {fmt}: its content is {real}, not the {fmt} its name ({ext}) claims; "
                              f"{_format_fix(fmt, real)}") from None
        if encoded:
            head = src.data[:8]
        else:
            with open(src, "rb") as f:
                head = f.read(8)
        what = f"not a {fmt} file although named {ext}" if fmt else \
            f"not a {'/'.join(sorted(set(EXT_FORMATS.values())))} image"
        raise UnsafeImage(f"cannot decode: {what} (starts with {head!r})") from None
    try:
        w, h = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and w * h > limit:
            raise UnsafeImage(f"decompression bomb: {w}x{h} = {w * h} pixels, over PIL's MAX_IMAGE_PIXELS "
                              f"({limit}); not decoded")
        if min(w, h) < 1 or max(w, h) > max_aspect_ratio * min(w, h):
            raise UnsafeImage(f"aspect ratio {w}x{h} is beyond {max_aspect_ratio:g}:1")
    except BaseException:
        im.close()
        raise
    return im


def _format_fix(named: str, real: str) -> str:
    """How to keep a file whose content (``real``) is not the format its extension names."""
    exts = [e for e, f in EXT_FORMATS.items() if f == real]
    if exts:
        return f"to keep it, re-save it as {named} or rename it to {exts[0]}"
    return f"to keep it, convert it to {named} ({real} files are not read)"


def load_rgb(path: str | os.PathLike | Encoded, max_resolution: int | None = None,
             max_aspect_ratio: float = MAX_ASPECT_RATIO, short_side: int | None = None) -> np.ndarray:
    """Decode ``path`` (a file or an :class:`Encoded` image) to (H, W, 3) uint8 RGB, whatever its mode;
    longest side capped at ``max_resolution``, shortest at ``short_side`` (:func:`scale_ratio`).

    Alpha is composited on white (the transparent pixels' stored colours are
    arbitrary); 16-bit and 32-bit integer images are scaled to 8 bits (PIL's own
    ``convert("RGB")`` clips them); CMYK goes through PIL's conversion; EXIF
    orientation is applied. The file goes through :func:`open_image`'s checks first
    (raises :class:`UnsafeImage`).

    The resize is ffcv's ``resizer`` (cv2 ``INTER_AREA`` to its truncated size), done
    here so that memory follows ``max_resolution``: a JPEG is decoded at the smallest
    DCT scale that leaves at least twice the output size (``Image.draft`` with
    ``Image.thumbnail``'s ``reducing_gap=2``; within a grey level or so of a full decode),
    ``L`` and ``RGB`` images are resized before any colour conversion, and the
    orientation is applied to the small result (area resizing commutes with flips and
    quarter turns). Peak memory is then about 7 bytes per source pixel for PNG-like
    formats (PIL's 4-byte RGB buffer and one 3-byte copy), where a full conversion
    took about 14.
    """
    import warnings

    from PIL import Image

    with open_image(path, max_aspect_ratio) as im, warnings.catch_warnings():
        # open_image has applied the pixel limit; the warning PIL repeats at load adds nothing.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        w0, h0 = im.size  # as stored, or as displayed where PIL applies the orientation itself (TIFF)
        out_w, out_h = output_size(w0, h0, max_resolution, short_side)
        if min(out_w, out_h) < 1:
            raise UnsafeImage(f"aspect ratio {w0}x{h0} leaves a side of 0 px at --max-resolution {max_resolution}")
        if (out_w, out_h) != (w0, h0) and im.format in ("JPEG", "MPO"):
            r = 2 * scale_ratio(w0, h0, max_resolution, short_side)
            im.draft(None, (int(np.ceil(w0 * r)), int(np.ceil(h0 * r))))
        im.load()
        # The orientation left to apply, read after loading: PIL's TIFF loader applies it itself and
        # drops the tag (and reports the displayed size from open); JPEG, PNG and WebP leave it to us.
        transpose = turn_of(im)
        mode = im.mode
        if mode in ("L", "RGB"):
            rgb = _area_resize(np.asarray(im), out_w, out_h)
            if rgb.ndim == 2:
                rgb = np.repeat(rgb[..., None], 3, axis=2)  # what convert("RGB") does to L
        elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            a = np.asarray(im).astype(np.float64)
            hi = 65535.0 if (mode.startswith("I;16") or a.max() > 255) else 255.0
            a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
            rgb = _area_resize(np.repeat(a[..., None], 3, axis=2), out_w, out_h)
        else:
            if mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            elif mode == "P":
                im = im.convert("RGB")
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            rgb = _area_resize(np.asarray(im.convert("RGB")), out_w, out_h)
    if transpose is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(getattr(Image.Transpose, transpose)))
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _area_resize(a: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``a`` resized to ``(out_w, out_h)`` with cv2 ``INTER_AREA`` (ffcv's writer's filter); as is if the size matches."""
    if (a.shape[1], a.shape[0]) == (out_w, out_h):
        return a
    import cv2

    return cv2.resize(np.ascontiguousarray(a), (out_w, out_h), interpolation=cv2.INTER_AREA)


def _orientation(im) -> int:
    """EXIF (or XMP) orientation of ``im``, 1 (as stored) when absent or unreadable."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to drop the pixels
        return 1


def turn_of(im) -> str | None:
    """The PIL transpose that undoes ``im``'s EXIF orientation; None when it is stored upright. Every
    back-end turns with it, so all of them crop an image as it is displayed."""
    return _ORIENTATION.get(_orientation(im))


def decode(item, max_resolution: int | None = None, max_aspect_ratio: float = MAX_ASPECT_RATIO,
           short_side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a source item: a file or :class:`Encoded` image (:func:`load_rgb`), or pixels
    already decoded (CIFAR, STL-10), resized with the same caps and filter."""
    if isinstance(item, np.ndarray):
        h, w = item.shape[:2]
        if min(w, h) < 1 or max(w, h) > max_aspect_ratio * min(w, h):
            raise UnsafeImage(f"aspect ratio {w}x{h} is beyond {max_aspect_ratio:g}:1")
        return np.ascontiguousarray(_area_resize(item, *output_size(w, h, max_resolution, short_side)), np.uint8)
    return load_rgb(item, max_resolution, max_aspect_ratio, short_side)


def _validate_one(path, max_resolution: int | None = None, max_aspect_ratio: float = MAX_ASPECT_RATIO,
                  short_side: int | None = None) -> tuple[str, str | None, tuple[int, int]]:
    """(path, None, (h, w)) if the image decodes to RGB, else (path, reason, (0, 0)); (h, w) after the resize.

    Decoded at the output size as the writer will, so validation needs no more
    memory than writing. A JPEG is decoded at its smallest DCT scale (1/8) instead
    (:func:`_jpeg_decodes`): every coefficient is still entropy-decoded, so a truncated
    or corrupt file fails as it would at full size, for about a fifth of the cost.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hw = _jpeg_decodes(path, max_resolution, max_aspect_ratio, short_side)
            if hw is not None:
                if max(hw) > 65535:
                    return path, f"too large for ffcv ({hw[1]}x{hw[0]}): give --max-resolution", (0, 0)
                return path, None, hw
            a = decode(path, max_resolution, max_aspect_ratio, short_side)
        if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
            return path, f"decoded to an unusable shape {a.shape}", (0, 0)
        if a.shape[0] > 65535 or a.shape[1] > 65535:
            return path, f"too large for ffcv ({a.shape[1]}x{a.shape[0]}): give --max-resolution", (0, 0)
        return path, None, a.shape[:2]
    except UnsafeImage as e:
        return path, str(e)[:300], (0, 0)
    except Exception as e:  # any decoder failure: truncated, not an image, unsupported, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        return path, f"cannot decode: {type(e).__name__}: {msg}"[:300], (0, 0)


def _jpeg_decodes(src, max_resolution: int | None, max_aspect_ratio: float,
                  short_side: int | None) -> tuple[int, int] | None:
    """(h, w) that :func:`load_rgb` gives a JPEG, after decoding it at 1/8 scale (raises as a full decode
    would: the entropy-coded data is read whole); None for an item that is not a JPEG file."""
    if isinstance(src, np.ndarray):
        return None
    with open_image(src, max_aspect_ratio) as im:
        if im.format not in ("JPEG", "MPO"):
            return None
        w0, h0 = im.size
        out_w, out_h = output_size(w0, h0, max_resolution, short_side)
        if min(out_w, out_h) < 1:
            raise UnsafeImage(f"aspect ratio {w0}x{h0} leaves a side of 0 px at --max-resolution {max_resolution}")
        im.draft(None, (max(1, w0 // 8), max(1, h0 // 8)))
        im.load()
        turned = turn_of(im) in ("TRANSPOSE", "ROTATE_270", "TRANSVERSE", "ROTATE_90")
    return (out_w, out_h) if turned else (out_h, out_w)


# What a validation pool's workers need, set before the pool forks so that they inherit it: the
# tasks are then plain indices (a source's listing can hold a million items; no pickling per task).
_JOB: tuple | None = None


def _validate_index(i: int):
    fetch, refs, kw = _JOB
    ref = refs[i]
    try:
        item = fetch(ref)
    except Exception as e:  # the container's read failed (a truncated shard, a vanished file)
        return ref, f"cannot read: {type(e).__name__}: {e}"[:300], (0, 0)
    return (ref,) + _validate_one(item, **kw)[1:]


def validate(paths: list, workers: int, progress: bool = True, max_resolution: int | None = None,
             max_aspect_ratio: float = MAX_ASPECT_RATIO, short_side: int | None = None,
             fetch=None, chunk: int = 16) -> list[tuple[object, str | None, tuple[int, int]]]:
    """Decode every image once, in ``workers`` processes; one ``(path, reason or None, (h, w))`` per path, in order.

    ``fetch(ref)``: turns each element of ``paths`` into a file, an :class:`Encoded` image or
    pixels (a source's reader); by default the elements are file paths. ``chunk``: consecutive
    items a worker takes at once (a Parquet row group's rows, so that one worker reads each group).
    """
    global _JOB
    from fastssl.progress import progress as progress_bar

    kw = {"max_resolution": max_resolution, "max_aspect_ratio": max_aspect_ratio, "short_side": short_side}
    bar = progress_bar(len(paths), "validate", "img", enabled=progress)
    out = []
    saved, _JOB = _JOB, (fetch or _identity, paths, kw)
    try:
        import multiprocessing as mp

        if workers <= 1 or len(paths) < 64 or "fork" not in mp.get_all_start_methods():
            for i in range(len(paths)):
                out.append(_validate_index(i))
                bar.update(1)
        else:  # fork whatever the default start method: the workers inherit _JOB
            with _one_cv2_thread(), mp.get_context("fork").Pool(workers) as pool:
                for r in pool.imap(_validate_index, range(len(paths)), chunksize=max(1, chunk)):
                    out.append(r)
                    bar.update(1)
    finally:
        _JOB = saved
    bar.close()
    return out


# ----------------------------------------------------------------------------- writing


@dataclass
class WriteSettings:
    write_mode: str = "jpg"           # jpg | raw | smart (smart: JPEG only above smart_threshold bytes of raw pixels)
    max_resolution: int | None = None  # longest side cap (ffcv's convention), None = keep
    jpeg_quality: int = 90
    smart_threshold: int = 256 * 256 * 3
    workers: int = field(default_factory=default_workers)  # processes for validation and writing
    max_aspect_ratio: float = MAX_ASPECT_RATIO  # longest/shortest side above this: skipped
    short_side: int | None = None      # shortest side cap (torchvision's Resize(256) convention), None = keep

    def check(self) -> None:
        if self.write_mode not in ("jpg", "raw", "smart"):
            raise PrepareError(f"--write-mode must be jpg, raw or smart, got {self.write_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepareError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise PrepareError(f"--max-resolution must be >= 8 px (or omitted), got {self.max_resolution}")
        if self.short_side is not None and self.short_side < 8:
            raise PrepareError(f"--short-side must be >= 8 px (or omitted), got {self.short_side}")
        if self.workers < 1:
            raise PrepareError(f"--workers must be >= 1, got {self.workers}")
        if not self.max_aspect_ratio >= 1:
            raise PrepareError(f"--max-aspect-ratio must be >= 1, got {self.max_aspect_ratio}")

    def params(self) -> dict:
        p = {"write_mode": self.write_mode, "max_resolution": self.max_resolution,
             "jpeg_quality": self.jpeg_quality,
             "smart_threshold": self.smart_threshold if self.write_mode == "smart" else None}
        if self.short_side:  # only when set: outputs written before the option existed stay up to date
            p["short_side"] = self.short_side
        return p

    def field(self):
        from ffcv.fields import RGBImageField

        # ffcv's smart mode only compresses above smart_threshold; its default (None) would store all raw.
        return RGBImageField(write_mode=self.write_mode, max_resolution=self.max_resolution,
                             jpeg_quality=self.jpeg_quality,
                             smart_threshold=self.smart_threshold if self.write_mode == "smart" else None)


def encoded_bytes(img: np.ndarray, s: WriteSettings) -> int:
    """Bytes the ffcv field stores for ``img`` (already resized) at settings ``s``."""
    from ffcv.fields.rgb_image import encode_jpeg

    if s.write_mode == "raw" or (s.write_mode == "smart" and img.nbytes <= s.smart_threshold):
        return int(img.nbytes)
    return int(encode_jpeg(img, s.jpeg_quality).nbytes)


def page_size_for(max_pixels: int, s: WriteSettings) -> int:
    """ffcv page size: a power of two >= 2 MiB that fits the largest sample twice (a sample never spans pages)."""
    raw = 3 * max_pixels
    if s.max_resolution:
        raw = min(raw, 3 * s.max_resolution ** 2)
    return max(2 ** 21, 1 << int(np.ceil(np.log2(2 * raw + 1))))


# Bytes per image outside the data pages: its metadata row (mode, w, h, ptr; label) and allocation-table row.
_ROW_BYTES = 48
# The least margin the free space must leave over the estimate (it is asked for even when every image was sampled).
MIN_MARGIN = 0.05


class SizeEstimate(NamedTuple):
    """:func:`estimate_size`'s answer. ``required``: the free space asked for before writing, the estimate
    plus ``margin`` (a fraction: twice the sampled mean's relative standard error, at least ``MIN_MARGIN``)
    and two pages."""
    bytes: int
    sampled: int
    required: int
    margin: float


def estimate_size(load, n: int, s: WriteSettings, page_size: int = 2 ** 21, sample: int = 64,
                  seed: int = 0) -> SizeEstimate:
    """Estimated ``.beton`` bytes for ``n`` images from ``sample`` of them encoded at ``s``, and the free
    space to require for it (:class:`SizeEstimate`).

    ``load(i) -> (H, W, 3) uint8`` returns image ``i`` of the source, already resized. The sizes of
    JPEG-encoded photos vary (a coefficient of variation about 0.5): from 24 images the mean is known
    to about 10 %, from 64 to about 6 %; the margin is twice that error as measured on the sample.
    """
    rng = np.random.default_rng(seed)
    k = min(sample, n)
    idx = rng.choice(n, size=k, replace=False)
    sizes = np.asarray([encoded_bytes(load(int(i)), s) for i in idx], np.float64)
    mean = float(sizes.mean())
    if k == n:
        rel_err = 0.0
    elif k < 2:
        rel_err = 0.5
    else:  # standard error of the sampled mean, finite-population corrected (0 when all are sampled)
        rel_err = float(sizes.std(ddof=1)) / max(mean, 1.0) / np.sqrt(k) * np.sqrt((n - k) / (n - 1))
    margin = float(min(1.0, max(MIN_MARGIN, 2 * rel_err)))
    # A sample never spans two pages: each page loses about half a sample at its end.
    pages = n * mean / max(page_size - mean / 2, page_size / 2)
    # Pages are written whole: about one partly filled page per writer process, plus one.
    est = int(pages * page_size + n * _ROW_BYTES + (max(1, s.workers) + 1) * page_size)
    return SizeEstimate(est, k, int(est * (1 + margin)) + 2 * page_size, margin)


class _SourceDataset:
    """Indexable ``(rgb uint8, label)`` over validated items of a source, for ffcv's writer processes.

    A decode failure here (a file changed after validation) must not hang ffcv's
    writer: the index is recorded in ``fail_dir`` and a grey image is written;
    the caller then aborts the whole output.
    """

    def __init__(self, items: list[tuple[object, int]], fail_dir: str, settings: WriteSettings, fetch=None,
                 name=str):
        self.items, self.fail_dir, self.s = items, fail_dir, settings
        self.fetch, self.name = fetch or _identity, name

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        ref, label = self.items[i]
        try:
            # Resized here as in validation (the field's own resize is then a no-op): bounded memory.
            return decode(self.fetch(ref), self.s.max_resolution, self.s.max_aspect_ratio, self.s.short_side), label
        except Exception as e:
            Path(self.fail_dir, f"{i}").write_text(f"{self.name(ref)}: {type(e).__name__}: {e}")
            return np.full((8, 8, 3), 128, np.uint8), label


class _ArrayDataset:
    """Indexable ``(rgb uint8, label)`` view of a ``SyntheticImages``-like dataset.

    Resized here only under a short-side cap (ffcv's field applies the longest-side one itself)."""

    def __init__(self, ds, short_side: int | None = None, max_resolution: int | None = None):
        self.ds, self.short_side, self.max_resolution = ds, short_side, max_resolution

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, label = self.ds[i]
        img = np.ascontiguousarray(img, dtype=np.uint8)
        if self.short_side:
            img = decode(img, self.max_resolution, float("inf"), self.short_side)
        return img, int(label)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


_SPACE_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DISK_FULL_FIX = f"free space there or give an OUT on a disk with more room (exit status {DISK_FULL_EXIT})"


def _free_now(out: Path) -> str:
    try:
        return f"{_fmt_bytes(shutil.disk_usage(out.parent).free)} free"
    except OSError:
        return "free space unknown"


def _disk_full(out: Path, needed: int | None) -> DiskFull:
    """Nothing could be written to ``out``'s folder (its disk is full)."""
    need = f"about {_fmt_bytes(needed)} needed" if needed else "more space needed"
    return DiskFull(f"no space left on the disk of {out} ({need}, {_free_now(out)}): {_DISK_FULL_FIX}")


def _check_free_space(out: Path, size: SizeEstimate) -> None:
    """A :class:`DiskFull` unless ``out``'s disk has the estimate's ``required`` space free (the estimate
    plus its margin of error: a disk that only just holds the estimate fills late in a long write)."""
    free = shutil.disk_usage(out.parent).free
    if free < size.required:
        raise DiskFull(f"not enough space on the disk of {out}: about {_fmt_bytes(size.bytes)} needed, "
                       f"{_fmt_bytes(size.required)} required (a {size.margin:.0%} margin for the error of an "
                       f"estimate from {size.sampled} sampled images), {_fmt_bytes(free)} free; nothing was "
                       f"written: {_DISK_FULL_FIX}")


def _disk_full_while_writing(out: Path, written: int, done: int | None, total: int,
                             estimated: int | None) -> DiskFull:
    """The disk filled during the write: what was written, for what share of the images, so what the whole
    needs (the estimate made before proved short). The free space is measured with the partial file gone."""
    if done and total:
        frac = min(1.0, done / total)
        what = (f"after writing {_fmt_bytes(written)} for {100 * frac:.3g}% of the images ({done} of {total}): "
                f"about {_fmt_bytes(written / frac)} needed in all")
    elif written:
        what = f"after writing {_fmt_bytes(written)}, before the first images were done: more than that needed"
    else:
        what = "before anything was written: more space needed"
    before = f" (estimated {_fmt_bytes(estimated)} beforehand)" if estimated else ""
    return DiskFull(f"no space left on the disk of {out} {what}{before}; the partial file was removed, "
                    f"{_free_now(out)}: {_DISK_FULL_FIX}")


class _WriterDied(Exception):
    pass


class _NoSpace(Exception):
    """A writer process met a full disk (reported once the partial file is removed)."""


# The watch of the write in progress; ffcv's writer processes, forked, inherit it.
_WATCH: _WriterWatch | None = None


class _WriterProcess(_ForkProcess):
    """``ffcv.writer.Process`` during a write: forked whatever the default start method (ffcv's job,
    the dataset and its allocator are inherited, never pickled), and recorded in the watch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _WATCH is not None:
            _WATCH.procs.append(self)
            _WATCH.worker_args = tuple(kwargs.get("args", ()))


def _writer_job(*args):
    """``ffcv.writer.worker_job_indexed_dataset`` during a write, in a writer process: the job's exception
    is reported to the parent (errno and text, in shared memory)."""
    watch = _WATCH
    try:
        watch.saved["worker_job_indexed_dataset"](*args)
    except BaseException as e:
        watch.errno.value = int(getattr(e, "errno", 0) or 0)
        watch.error.value = f"{type(e).__name__}: {e}".encode(errors="replace")[:399]
        raise


@dataclass
class _WriterWatch:
    """Watches ffcv's writer processes: ffcv waits forever on one that died (its main loop counts finished
    samples, and the other writers wait for the dead one's page), e.g. on a full disk.

    Inside the block, ffcv's writer forks its processes (:class:`_WriterProcess`), which are recorded,
    and their worker job reports its exception (:func:`_writer_job`); when one exits with an
    error, a thread stops the others and raises :class:`_WriterDied` in the main thread (through a
    SIGINT to it, which also ends a blocking wait; a SIGINT of the user's stays a
    KeyboardInterrupt). Off the main thread nothing is watched (ffcv's own behaviour).
    """
    procs: list = field(default_factory=list)
    errno: object = None
    error: object = None
    worker_args: tuple = ()

    def __enter__(self):
        import signal
        import threading

        import ffcv.writer as fw

        global _WATCH
        ctx = _fork_context()
        # Unlocked: a process killed while holding a lock would leave the parent's read waiting forever.
        self.errno, self.error = ctx.Value("i", 0, lock=False), ctx.Array("c", 400, lock=False)
        self.saved = {k: getattr(fw, k) for k in ("Process", "worker_job_indexed_dataset")}
        self.previous, _WATCH = _WATCH, self
        fw.Process, fw.worker_job_indexed_dataset = _WriterProcess, _writer_job
        self.failed, self.stop = threading.Event(), threading.Event()
        self.handler = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame):
                if self.failed.is_set():
                    raise _WriterDied()
                if callable(previous):
                    return previous(signum, frame)
                raise KeyboardInterrupt

            self.handler = (signal.signal(signal.SIGINT, on_sigint), threading.main_thread().ident)
            self.thread = threading.Thread(target=self._watch, name="ffcv-writer-watch", daemon=True)
            self.thread.start()
        return self

    def _watch(self) -> None:
        import signal

        while not self.stop.wait(0.1):
            if any(p.exitcode not in (None, 0) for p in list(self.procs)):
                self.failed.set()
                self.kill()
                signal.pthread_kill(self.handler[1], signal.SIGINT)
                return

    def kill(self) -> None:
        for p in list(self.procs):
            if p.exitcode is None:
                p.terminate()
        for p in list(self.procs):
            p.join(5)

    def __exit__(self, *exc):
        import signal

        import ffcv.writer as fw

        global _WATCH
        self.stop.set()
        if self.handler:
            self.thread.join()
            signal.signal(signal.SIGINT, self.handler[0])
        for k, v in self.saved.items():
            setattr(fw, k, v)
        _WATCH = self.previous
        return False

    def reason(self) -> tuple[int, str]:
        return self.errno.value, self.error.value.decode(errors="replace") or "a writer process died"

    def done(self) -> int | None:
        """Images the writer processes finished (ffcv 1.0's shared counter, read without its lock), or None."""
        try:
            return int(self.worker_args[5].get_obj().value)  # (queue, metadata, type, fields, allocator, done, ..)
        except (AttributeError, IndexError, TypeError, ValueError):
            return None


def _write_beton(dataset, out: Path, s: WriteSettings, page_size: int, quiet: bool = False,
                 needed: int | None = None, chunk: int = 100) -> None:
    """ffcv ``DatasetWriter`` into ``out`` through a temporary file in the same folder, then rename.

    ffcv's writer draws its own tqdm bar (no label, on stderr, even when quiet, ``\\r``-joined in a
    log); it gets fastssl's reporter instead (``fastssl.progress``: a bar on a terminal, lines
    otherwise, nothing with ``quiet``). Its processes are forked (:class:`_WriterWatch`), with OpenCV on
    one thread in each (:func:`_one_cv2_thread`). A full disk
    (``ENOSPC``, ``EDQUOT``), in this process or in a writer process, raises :class:`DiskFull` naming
    the bytes written, the share of the images done and the space that implies (``needed``: the
    estimate made before); any other writer process failure a :class:`PrepareError`. The partial file
    is removed in every case."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    from fastssl.pipelines.ffcv_compat import writer_progress
    from fastssl.progress import progress

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".partial", dir=out.parent)
    os.close(fd)
    writer = None
    watch = _WriterWatch()
    try:
        writer = DatasetWriter(tmp, {"image": s.field(), "label": IntField()}, num_workers=max(1, s.workers),
                               page_size=page_size)
        with watch, _one_cv2_thread(), \
                writer_progress(lambda total: progress(total, f"write {out.name}", "img", enabled=not quiet)):
            try:
                writer.from_indexed_dataset(dataset,
                                            chunksize=max(1, min(chunk, len(dataset) // (4 * max(1, s.workers)) or 1)))
            except _WriterDied:
                sm = getattr(writer, "metadata_sm", None)
                if sm is not None and not isinstance(sm, int):  # ffcv's shared memory outlives its processes
                    sm.close()
                    sm.unlink()
                code, text = watch.reason()
                if code in _SPACE_ERRNOS:
                    raise _NoSpace() from None
                raise PrepareError(f"ffcv's writer failed writing {out} ({text}); the partial file was removed")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600
        os.replace(tmp, out)
    except BaseException as e:
        no_space = isinstance(e, _NoSpace) or (isinstance(e, OSError) and e.errno in _SPACE_ERRNOS)
        written = 0
        if no_space:
            try:
                written = os.path.getsize(tmp)
            except OSError:
                pass
        Path(tmp).unlink(missing_ok=True)
        if no_space:  # measured and reported with the partial file gone
            raise _disk_full_while_writing(out, written, watch.done(), len(dataset), needed) from None
        raise


def _up_to_date(out: Path, params: dict) -> dict | None:
    meta = read_meta(out)
    if meta and meta.get("complete") and meta.get("params") == params and out.is_file() \
            and out.stat().st_size == meta.get("bytes"):
        return meta
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _log(msg: str, quiet: bool, level: int = logging.INFO) -> None:
    if not quiet:
        log.log(level, msg)


def check_output(out: str | os.PathLike) -> Path:
    """``out`` as a Path once its folder exists and takes a new file; else a one-line :class:`PrepareError`."""
    out = Path(out)
    if out.is_dir():
        raise PrepareError(f"output {out} is a folder: give a file name, e.g. {out / 'train.beton'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=out.name + ".", suffix=".probe", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in _SPACE_ERRNOS:
            raise _disk_full(out, None) from None
        raise PrepareError(f"cannot write {out}: {e.strerror or e} in {out.parent}: give an OUT in a folder you "
                           f"can write, or fix that folder's permissions") from None
    return out


def prepare_folder(src: str | os.PathLike, out: str | os.PathLike, settings: WriteSettings | None = None,
                   force: bool = False, quiet: bool = False) -> dict:
    """Convert an ImageFolder or flat folder to ``out`` (.beton). Returns the summary (also in the sidecar).

    Summary keys: ``written``, ``skipped`` (list of ``{"path", "reason"}``), ``bytes``,
    ``classes`` (names or None), ``class_counts``, ``reused`` (True when an
    up-to-date output was kept), ``params``.
    """
    from fastssl.pipelines.sources import FolderSource

    s = settings or WriteSettings()
    s.check()
    _require_ffcv()
    out = check_output(out)
    return prepare_source(FolderSource(src), out, s, force=force, quiet=quiet)


def prepare_source(source, out: str | os.PathLike, settings: WriteSettings | None = None, force: bool = False,
                   quiet: bool = False) -> dict:
    """Write a listed source (``fastssl.pipelines.sources``: a folder, shards, a list file, CIFAR/STL-10
    binaries) to ``out``; every bad image is skipped and named. Returns the summary (also in the sidecar)."""
    s = settings or WriteSettings()
    s.check()
    _require_ffcv()
    out = check_output(out)
    items, classes, skipped = source.items, source.classes, list(source.skipped)
    from PIL import Image

    # The parameters that define the output: settings + the exact source listing (names, sizes, mtimes).
    params = {"version": FORMAT_VERSION, "source": source.identity, "listing_sha1": source.fingerprint(),
              **source.extra_params(), **s.params(), "max_aspect_ratio": s.max_aspect_ratio,
              "max_image_pixels": Image.MAX_IMAGE_PIXELS}
    if not force and (meta := _up_to_date(out, params)):
        _log(f"{out}: up to date ({meta['written']} images, {_fmt_bytes(meta['bytes'])}); reusing it "
             f"(--force rewrites)", quiet)
        return {**meta, "reused": True}

    t0 = time.perf_counter()
    _log(f"{source.describe()}; validating with {s.workers} workers", quiet)
    # Consecutive items per worker task: a source read in blocks (Parquet row groups) says how many.
    chunk = getattr(source, "read_chunk", None)
    checked = validate([ref for ref, _ in items], s.workers, progress=not quiet, max_resolution=s.max_resolution,
                       max_aspect_ratio=s.max_aspect_ratio, short_side=s.short_side, fetch=source.fetch,
                       chunk=chunk or 16)
    good = [(ref, label) for (ref, label), (_, why, _) in zip(items, checked) if why is None]
    skipped += [(source.name(ref), why) for ref, why, _ in checked if why is not None]
    if not good:
        raise PrepareError(f"no decodable image in {source.identity} ({len(skipped)} skipped): first reasons: "
                           + "; ".join(f"{p}: {r}" for p, r in skipped[:3]))
    for p, why in skipped:
        _log(f"skipped {p}: {why}", quiet, logging.WARNING)

    page = page_size_for(max(h * w for _, why, (h, w) in checked if why is None), s)
    # A source read in blocks (Parquet row groups) reads a block per sampled image: fewer samples there.
    size = estimate_size(lambda i: decode(source.fetch(good[i][0]), s.max_resolution, s.max_aspect_ratio,
                                          s.short_side), len(good), s, page, sample=24 if chunk else 64)
    est, k = size.bytes, size.sampled
    caps = ", ".join(f"{k_}={v}" for k_, v in (("max_resolution", s.max_resolution), ("short_side", s.short_side)))
    _log(f"estimated output size: {_fmt_bytes(est)} ({len(good)} images; from {k} sampled images encoded with "
         f"write_mode={s.write_mode}, quality={s.jpeg_quality}, {caps})", quiet)
    _check_free_space(out, size)  # found now, not hours into the writing

    with tempfile.TemporaryDirectory() as fail_dir:
        _write_beton(_SourceDataset(good, fail_dir, s, source.fetch, source.name), out, s, page, quiet, needed=est,
                     chunk=chunk or 100)
        failed = sorted(Path(fail_dir).iterdir())
        if failed:
            out.unlink(missing_ok=True)
            raise PrepareError(f"{len(failed)} images failed to decode while writing (changed after validation?): "
                               + "; ".join(f.read_text() for f in failed[:3]) + f"; {out} was not written")

    labels = np.asarray([label for _, label in good], np.int64)
    counts = np.bincount(labels[labels >= 0], minlength=len(classes)).tolist() if classes else None
    summary = {"complete": True, "params": params, "written": len(good),
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "bytes": out.stat().st_size,
               "estimated_bytes": est, "classes": classes, "class_counts": counts,
               "seconds": round(time.perf_counter() - t0, 2)}
    _atomic_json(meta_path(out), summary)
    _log(f"wrote {out}: {len(good)} images, {len(skipped)} skipped, {_fmt_bytes(summary['bytes'])}"
         f" (estimated {_fmt_bytes(est)})" + (f", {len(classes)} classes" if classes else ", unlabelled")
         + f", {summary['seconds']} s ({len(good) / max(summary['seconds'], 1e-9):.0f} img/s)", quiet)
    return {**summary, "reused": False}


def prepare_dataset(ds, out: str | os.PathLike, params: dict, classes: list[str] | None,
                    settings: WriteSettings | None = None, force: bool = False, quiet: bool = False) -> dict:
    """Write an indexable ``(uint8 HxWx3, label)`` dataset (e.g. ``SyntheticImages``) to ``out``; idempotent."""
    s = settings or WriteSettings()
    s.check()
    _require_ffcv()
    out = check_output(out)
    params = {"version": FORMAT_VERSION, **params, **s.params()}
    if not force and (meta := _up_to_date(out, params)):
        _log(f"{out}: up to date ({meta['written']} images); reusing it", quiet)
        return {**meta, "reused": True}
    t0 = time.perf_counter()
    data = _ArrayDataset(ds, s.short_side, s.max_resolution)
    h, w = data[0][0].shape[:2]
    page = page_size_for(h * w, s)
    size = estimate_size(lambda i: decode(data[i][0], s.max_resolution, float("inf"), s.short_side), len(data),
                         s, page)
    est = size.bytes
    _log(f"estimated output size: {_fmt_bytes(est)} ({len(data)} images, from {size.sampled} sampled)", quiet)
    _check_free_space(out, size)
    _write_beton(data, out, s, page, quiet, needed=est)
    counts = None
    if classes and getattr(ds, "num_classes", None) == len(classes):  # SyntheticImages: label = i % num_classes
        counts = np.bincount(np.arange(len(ds)) % len(classes), minlength=len(classes)).tolist()
    summary = {"complete": True, "params": params, "written": len(data), "skipped": [], "bytes": out.stat().st_size,
               "estimated_bytes": est, "classes": classes, "class_counts": counts,
               "seconds": round(time.perf_counter() - t0, 2)}
    _atomic_json(meta_path(out), summary)
    _log(f"wrote {out}: {len(data)} images, {_fmt_bytes(summary['bytes'])}"
         + (f", {len(classes)} classes" if classes else ""), quiet)
    return {**summary, "reused": False}


def prepare_synthetic(out_dir: str | os.PathLike, classes: int = 10, per_class: int = 200, val_per_class: int = 50,
                      size: int | tuple[int, int] = 64, seed: int = 0, jpeg_folders: bool = False,
                      settings: WriteSettings | None = None, force: bool = False, quiet: bool = False) -> dict:
    """The built-in shapes data (``pipelines.synthetic``) as ``out_dir/{train,val}.beton`` (+ JPEG ImageFolders)."""
    from fastssl.pipelines.synthetic import GENERATOR_VERSION, SyntheticImages, write_jpeg_folder

    s = settings or WriteSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    for split, n in (("train", per_class), ("val", val_per_class)):
        if n <= 0:
            continue
        ds = SyntheticImages(num_classes=classes, per_class=n, size=size, seed=seed, split=split)
        params = {"source": "synthetic", "split": split, "classes": classes, "per_class": n,
                  "size": list(size) if isinstance(size, tuple) else size, "seed": seed,
                  "generator_version": GENERATOR_VERSION}
        res[split] = prepare_dataset(ds, out / f"{split}.beton", params, list(ds.classes), s, force, quiet)
        if jpeg_folders:
            folder = out / split
            stamp = folder / ".fastssl-params.json"
            want = json.dumps({**params, "quality": s.jpeg_quality}, sort_keys=True)
            if force or not stamp.is_file() or stamp.read_text() != want:
                tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=out))
                write_jpeg_folder(ds, tmp, quality=s.jpeg_quality)
                (tmp / ".fastssl-params.json").write_text(want)
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
                _log(f"wrote {folder}/ ({len(ds)} JPEGs)", quiet)
    return res


def read_image(beton: str | os.PathLike, i: int) -> np.ndarray:
    """Image ``i`` of a ``.beton`` as stored (after ``--max-resolution``): (H, W, 3) uint8 RGB. For checks, not speed."""
    import cv2
    from ffcv.reader import Reader

    r = Reader(str(beton))
    m = r.metadata["f0"][i]
    row = r.alloc_table[r.alloc_table["ptr"] == m["data_ptr"]][0]
    data = np.fromfile(str(beton), dtype=np.uint8, count=int(row["size"]), offset=int(row["ptr"]))
    h, w = int(m["height"]), int(m["width"])
    if int(m["mode"]) == 1:  # raw
        return data[: h * w * 3].reshape(h, w, 3)
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_labels(beton: str | os.PathLike) -> np.ndarray:
    """All labels of a ``.beton`` (int64, -1 = unlabelled) without decoding any image."""
    from ffcv.reader import Reader

    return np.asarray(Reader(str(beton)).metadata["f1"], dtype=np.int64).copy()
