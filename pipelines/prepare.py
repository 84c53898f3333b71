"""Image folder / built-in data -> FFCV ``.beton`` (fields ``image``: RGBImageField, ``label``: IntField).

Every source image is decoded once up front, in parallel, so the ffcv writer
never sees a bad one (a worker exception there hangs ffcv's writer): files that
cannot be decoded are skipped and listed with the reason.

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
run with the same parameters reuses the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class PrepareError(Exception):
    """Bad input for ``fastssl-prepare`` (empty or missing source, bad option): the message says what to do."""


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


def output_size(w: int, h: int, max_resolution: int | None) -> tuple[int, int]:
    """``(w, h)`` after capping the longest side at ``max_resolution``: ffcv's ``resizer`` arithmetic (truncation)."""
    if not max_resolution:
        return w, h
    ratio = max_resolution / max(w, h)
    if ratio >= 1:
        return w, h
    return int(ratio * w), int(ratio * h)


def open_image(path: str, max_aspect_ratio: float = MAX_ASPECT_RATIO):
    """``PIL.Image.open`` with the checks that need only the header; raises :class:`UnsafeImage`.

    Only the decoder of the format the extension names is tried (``formats=``). A file
    it does not recognise is named with the format it really holds, if PIL knows it.
    Refused too: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL itself only warns
    up to twice that), and a longest/shortest side ratio above ``max_aspect_ratio``.
    """
    from PIL import Image, UnidentifiedImageError

    ext = Path(path).suffix.lower()
    fmt = EXT_FORMATS.get(ext)
    try:
        im = Image.open(path, formats=[fmt] if fmt else sorted(set(EXT_FORMATS.values())))
    except Image.DecompressionBombError as e:
        raise UnsafeImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        real = None
        try:
            with Image.open(path) as other:  # header only: names what the file really is
                real = other.format
        except Exception:
            pass
        if real:
            raise UnsafeImage(f"not a {fmt}: its content is {real}, not the {fmt} its name ({ext}) claims") from None
        with open(path, "rb") as f:
            head = f.read(8)
        raise UnsafeImage(f"cannot decode: not a {fmt} file although named {ext} (starts with {head!r})") from None
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


def load_rgb(path: str, max_resolution: int | None = None, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> np.ndarray:
    """Decode ``path`` to (H, W, 3) uint8 RGB, whatever its mode; longest side capped at ``max_resolution``.

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
        out_w, out_h = output_size(w0, h0, max_resolution)
        if min(out_w, out_h) < 1:
            raise UnsafeImage(f"aspect ratio {w0}x{h0} leaves a side of 0 px at --max-resolution {max_resolution}")
        if (out_w, out_h) != (w0, h0) and im.format in ("JPEG", "MPO"):
            r = 2 * max_resolution / max(w0, h0)
            im.draft(None, (int(np.ceil(w0 * r)), int(np.ceil(h0 * r))))
        im.load()
        # The orientation left to apply, read after loading: PIL's TIFF loader applies it itself and
        # drops the tag (and reports the displayed size from open); JPEG, PNG and WebP leave it to us.
        transpose = _ORIENTATION.get(_orientation(im))
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


def _validate_one(path: str, max_resolution: int | None = None,
                  max_aspect_ratio: float = MAX_ASPECT_RATIO) -> tuple[str, str | None, tuple[int, int]]:
    """(path, None, (h, w)) if the image decodes to RGB, else (path, reason, (0, 0)); (h, w) after the resize.

    Decoded at ``max_resolution`` as the writer will, so validation needs no more
    memory than writing.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = load_rgb(path, max_resolution, max_aspect_ratio)
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


def validate(paths: list[str], workers: int, progress: bool = True, max_resolution: int | None = None,
             max_aspect_ratio: float = MAX_ASPECT_RATIO) -> list[tuple[str, str | None, tuple[int, int]]]:
    """Decode every image once, in ``workers`` processes; one ``(path, reason or None, (h, w))`` per path, in order."""
    import functools

    from fastssl.progress import progress as progress_bar

    one = functools.partial(_validate_one, max_resolution=max_resolution, max_aspect_ratio=max_aspect_ratio)
    bar = progress_bar(len(paths), "validate", "img", enabled=progress)
    out = []
    if workers <= 1 or len(paths) < 64:
        for p in paths:
            out.append(one(p))
            bar.update(1)
    else:
        import multiprocessing as mp

        with mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(workers) as pool:
            for r in pool.imap(one, paths, chunksize=16):
                out.append(r)
                bar.update(1)
    bar.close()
    return out


# ----------------------------------------------------------------------------- writing


@dataclass
class WriteSettings:
    write_mode: str = "jpg"           # jpg | raw | smart (smart: JPEG only above smart_threshold bytes of raw pixels)
    max_resolution: int | None = None  # longest side cap (ffcv's convention), None = keep
    jpeg_quality: int = 90
    smart_threshold: int = 256 * 256 * 3
    workers: int = 2
    max_aspect_ratio: float = MAX_ASPECT_RATIO  # longest/shortest side above this: skipped

    def check(self) -> None:
        if self.write_mode not in ("jpg", "raw", "smart"):
            raise PrepareError(f"--write-mode must be jpg, raw or smart, got {self.write_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepareError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise PrepareError(f"--max-resolution must be >= 8 px (or omitted), got {self.max_resolution}")
        if not self.max_aspect_ratio >= 1:
            raise PrepareError(f"--max-aspect-ratio must be >= 1, got {self.max_aspect_ratio}")

    def params(self) -> dict:
        return {"write_mode": self.write_mode, "max_resolution": self.max_resolution,
                "jpeg_quality": self.jpeg_quality,
                "smart_threshold": self.smart_threshold if self.write_mode == "smart" else None}

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


def estimate_size(load, n: int, s: WriteSettings, page_size: int = 2 ** 21, sample: int = 24,
                  seed: int = 0) -> tuple[int, int]:
    """Estimated ``.beton`` bytes for ``n`` images from ``sample`` of them encoded at ``s``: ``(bytes, sampled)``.

    ``load(i) -> (H, W, 3) uint8`` returns image ``i`` of the source, already resized.
    """
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(sample, n), replace=False)
    sizes = [encoded_bytes(load(int(i)), s) for i in idx]
    per_image = float(np.mean(sizes)) + 32  # + metadata row (mode, w, h, ptr, label)
    # Pages are written whole: about one partly filled page per writer process, plus one.
    return int(per_image * n + (max(1, s.workers) + 1) * page_size), len(sizes)


class _FolderDataset:
    """Indexable ``(rgb uint8, label)`` over validated files, for ffcv's writer processes.

    A decode failure here (a file changed after validation) must not hang ffcv's
    writer: the index is recorded in ``fail_dir`` and a grey image is written;
    the caller then aborts the whole output.
    """

    def __init__(self, items: list[tuple[str, int]], fail_dir: str, settings: WriteSettings | None = None):
        self.items, self.fail_dir = items, fail_dir
        self.s = settings or WriteSettings()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            # Resized here as in validation (the field's own resize is then a no-op): bounded memory.
            return load_rgb(path, self.s.max_resolution, self.s.max_aspect_ratio), label
        except Exception as e:
            Path(self.fail_dir, f"{i}").write_text(f"{path}: {type(e).__name__}: {e}")
            return np.full((8, 8, 3), 128, np.uint8), label


class _ArrayDataset:
    """Indexable ``(rgb uint8, label)`` view of a ``SyntheticImages``-like dataset."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, label = self.ds[i]
        return np.ascontiguousarray(img, dtype=np.uint8), int(label)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _write_beton(dataset, out: Path, s: WriteSettings, page_size: int, quiet: bool = False) -> None:
    """ffcv ``DatasetWriter`` into ``out`` through a temporary file in the same folder, then rename.

    ffcv's writer draws its own tqdm bar (no label, on stderr, even when quiet, ``\r``-joined in a
    log); it gets fastssl's reporter instead (``fastssl.progress``: a bar on a terminal, lines
    otherwise, nothing with ``quiet``)."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    from fastssl.pipelines.ffcv_compat import writer_progress
    from fastssl.progress import progress

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        writer = DatasetWriter(tmp, {"image": s.field(), "label": IntField()}, num_workers=max(1, s.workers),
                               page_size=page_size)
        with writer_progress(lambda total: progress(total, f"write {out.name}", "img", enabled=not quiet)):
            writer.from_indexed_dataset(dataset,
                                        chunksize=max(1, min(100, len(dataset) // (4 * max(1, s.workers)) or 1)))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def prepare_folder(src: str | os.PathLike, out: str | os.PathLike, settings: WriteSettings | None = None,
                   force: bool = False, quiet: bool = False) -> dict:
    """Convert an ImageFolder or flat folder to ``out`` (.beton). Returns the summary (also in the sidecar).

    Summary keys: ``written``, ``skipped`` (list of ``{"path", "reason"}``), ``bytes``,
    ``classes`` (names or None), ``class_counts``, ``reused`` (True when an
    up-to-date output was kept), ``params``.
    """
    s = settings or WriteSettings()
    s.check()
    _require_ffcv()
    out = Path(out)
    items, classes, skipped = list_images(src)
    # The parameters that define the output: settings + the exact source listing (names, sizes, mtimes).
    h = hashlib.sha1()
    for p, label in items:
        st = os.stat(p)
        h.update(f"{p}\0{label}\0{st.st_size}\0{int(st.st_mtime_ns)}\n".encode())
    from PIL import Image

    params = {"version": FORMAT_VERSION, "source": str(Path(src).resolve()), "listing_sha1": h.hexdigest(),
              **s.params(), "max_aspect_ratio": s.max_aspect_ratio, "max_image_pixels": Image.MAX_IMAGE_PIXELS}
    if not force and (meta := _up_to_date(out, params)):
        _log(f"{out}: up to date ({meta['written']} images, {_fmt_bytes(meta['bytes'])}); reusing it "
             f"(--force rewrites)", quiet)
        return {**meta, "reused": True}

    t0 = time.perf_counter()
    _log(f"{src}: {len(items)} image files" + (f" in {len(classes)} classes" if classes else " (flat folder, label -1)")
         + f"; validating with {s.workers} workers", quiet)
    checked = validate([p for p, _ in items], s.workers, progress=not quiet, max_resolution=s.max_resolution,
                       max_aspect_ratio=s.max_aspect_ratio)
    good = [(p, label) for (p, label), (_, why, _) in zip(items, checked) if why is None]
    skipped += [(p, why) for p, why, _ in checked if why is not None]
    if not good:
        raise PrepareError(f"no decodable image in {src} ({len(skipped)} skipped): first reasons: "
                           + "; ".join(f"{Path(p).name}: {r}" for p, r in skipped[:3]))
    for p, why in skipped:
        _log(f"  skipped {p}: {why}", quiet)

    page = page_size_for(max(h * w for _, why, (h, w) in checked if why is None), s)
    est, k = estimate_size(lambda i: load_rgb(good[i][0], s.max_resolution, s.max_aspect_ratio), len(good), s, page)
    _log(f"estimated output size: {_fmt_bytes(est)} ({len(good)} images; from {k} sampled images encoded with "
         f"write_mode={s.write_mode}, quality={s.jpeg_quality}, max_resolution={s.max_resolution})", quiet)

    with tempfile.TemporaryDirectory() as fail_dir:
        _write_beton(_FolderDataset(good, fail_dir, s), out, s, page, quiet)
        failed = sorted(Path(fail_dir).iterdir())
        if failed:
            out.unlink(missing_ok=True)
            raise PrepareError(f"{len(failed)} images failed to decode while writing (changed after validation?): "
                               + "; ".join(f.read_text() for f in failed[:3]) + f"; {out} was not written")

    counts = np.bincount([label for _, label in good], minlength=len(classes)).tolist() if classes else None
    summary = {"complete": True, "params": params, "written": len(good),
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "bytes": out.stat().st_size,
               "estimated_bytes": est, "classes": classes, "class_counts": counts,
               "seconds": round(time.perf_counter() - t0, 2)}
    _atomic_json(meta_path(out), summary)
    _log(f"wrote {out}: {len(good)} images, {len(skipped)} skipped, {_fmt_bytes(summary['bytes'])}"
         f" (estimated {_fmt_bytes(est)})" + (f", {len(classes)} classes" if classes else ", unlabelled")
         + f", {summary['seconds']} s", quiet)
    return {**summary, "reused": False}


def prepare_dataset(ds, out: str | os.PathLike, params: dict, classes: list[str] | None,
                    settings: WriteSettings | None = None, force: bool = False, quiet: bool = False) -> dict:
    """Write an indexable ``(uint8 HxWx3, label)`` dataset (e.g. ``SyntheticImages``) to ``out``; idempotent."""
    s = settings or WriteSettings()
    s.check()
    _require_ffcv()
    out = Path(out)
    params = {"version": FORMAT_VERSION, **params, **s.params()}
    if not force and (meta := _up_to_date(out, params)):
        _log(f"{out}: up to date ({meta['written']} images); reusing it", quiet)
        return {**meta, "reused": True}
    t0 = time.perf_counter()
    data = _ArrayDataset(ds)
    h, w = data[0][0].shape[:2]
    page = page_size_for(h * w, s)
    est, k = estimate_size(lambda i: _resized(data[i][0], s.max_resolution), len(data), s, page)
    _log(f"estimated output size: {_fmt_bytes(est)} ({len(data)} images, from {k} sampled)", quiet)
    _write_beton(data, out, s, page, quiet)
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


def _resized(img: np.ndarray, max_resolution: int | None) -> np.ndarray:
    if not max_resolution:
        return img
    from ffcv.fields.rgb_image import resizer

    return resizer(img, max_resolution)


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
                    import shutil

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
