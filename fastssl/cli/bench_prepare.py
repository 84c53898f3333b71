"""``fastssl-bench prepare``: ``fastssl-prepare``'s images/s, and per core, from each input format.

    fastssl-bench prepare --json                          # 512 photo-like 400x350 JPEGs of its own
    fastssl-bench prepare --data ~/imagenet/val --n 5000  # the first 5000 images of a folder
    fastssl-bench prepare --formats folder --workers 8

The same images go through ``fastssl-prepare`` from each format: the ImageFolder, Parquet
shards (Hugging Face's image struct, the files' bytes unchanged) and webdataset tar shards
(same bytes), written once before timing; one untimed conversion comes first (imports,
compiles). Each arm is the whole conversion (listing,
validation, the size estimate, ffcv's writer) into a fresh ``.beton`` with the same settings
(``--short-side 256``, JPEG quality 90: the timed ImageNet run's); the rounds alternate the
arms and the best round of each is reported, as images/s, images/s per worker process
(``--workers``, default the usable cores) and the ratio to the folder arm. The outputs are
checked to hold the same labels.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

FORMATS = ("folder", "parquet", "webdataset")


def _own_images(root: Path, n: int, size: tuple[int, int]) -> Path:
    from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

    classes = 10
    ds = SyntheticImages(num_classes=classes, per_class=max(1, -(-n // classes)), size=size, seed=0, split="train")
    return write_jpeg_folder(ds, root / "folder", quality=90)


def _folder_subset(src: Path, root: Path, n: int) -> Path:
    """The first ``n`` images of ``src`` (in prepare's order), as symlinks in a folder of the same classes."""
    from fastssl.pipelines.prepare import list_images

    items, classes, _ = list_images(src)
    out = root / "folder"
    for path, label in items[:n]:
        d = out / (classes[label] if classes else "")
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(path), d / Path(path).name)
    return out


def _shards(folder: Path, root: Path, per_shard: int) -> dict[str, str]:
    """The folder's files, bytes unchanged, as Parquet and webdataset shards of ``per_shard`` samples."""
    from fastssl.pipelines.prepare import list_images

    items, classes, _ = list_images(folder)
    out = {}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    if pa is not None:
        d = root / "parquet"
        d.mkdir()
        image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        for k in range(0, len(items), per_shard):
            part = items[k:k + per_shard]
            t = pa.table({"image": pa.array([{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p, _ in part],
                                            image_t),
                          "label": pa.array([lab for _, lab in part], pa.int64())})
            pq.write_table(t, d / f"train-{k // per_shard:05d}.parquet", row_group_size=100)
        out["parquet"] = str(d)
    d = root / "webdataset"
    d.mkdir()
    for k in range(0, len(items), per_shard):
        with tarfile.open(d / f"shard-{k // per_shard:05d}.tar", "w") as tf:
            for j, (p, lab) in enumerate(items[k:k + per_shard]):
                key = f"{k + j:08d}"
                for name, payload in ((f"{key}{Path(p).suffix.lower()}", Path(p).read_bytes()),
                                      (f"{key}.cls", str(lab).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    out["webdataset"] = str(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-bench prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="an ImageFolder to take images from (default: photo-like JPEGs "
                                                 "of the built-in shapes, written to a temporary folder)")
    ap.add_argument("--n", type=int, default=512, help="images (512)")
    ap.add_argument("--size", type=int, nargs=2, default=[350, 400], metavar=("H", "W"),
                    help="side of the built-in images (ImageNet's mean is about 400x350)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--workers", type=int, default=None, help="fastssl-prepare's --workers (default: usable cores)")
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the arms; the best of each is reported")
    ap.add_argument("--per-shard", type=int, default=256, help="samples per Parquet/webdataset shard")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from fastssl.pipelines.prepare import WriteSettings, default_workers, prepare_source, read_labels
    from fastssl.pipelines.sources import open_source
    from fastssl.progress import quiet

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        print(f"fastssl-bench prepare: unknown format {bad[0]!r}: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    workers = args.workers or default_workers()
    s = WriteSettings(workers=workers, short_side=args.short_side, jpeg_quality=args.jpeg_quality)
    with tempfile.TemporaryDirectory(prefix="fastssl-bench-prepare-") as tmp:
        root = Path(tmp)
        if args.data:
            folder = _folder_subset(Path(args.data), root, args.n)
        else:
            folder = _own_images(root, args.n, tuple(args.size))
        srcs = {"folder": str(folder), **_shards(folder, root, args.per_shard)}
        best: dict[str, dict] = {}
        labels = {}
        with quiet():  # untimed: the first conversion of a process also pays imports and numba's compiles
            prepare_source(open_source(srcs["folder"]), root / "warmup.beton", s, force=True, quiet=True)
        for r in range(args.rounds):
            for fmt in formats:
                if fmt not in srcs:
                    best[fmt] = {"skipped": "pyarrow is not installed (pip install pyarrow)"}
                    continue
                out = root / f"{fmt}.beton"
                t0 = time.perf_counter()
                with quiet():
                    source = open_source(srcs[fmt])
                    t_list = time.perf_counter() - t0
                    summary = prepare_source(source, out, s, force=True, quiet=True)
                secs = time.perf_counter() - t0
                ips = summary["written"] / secs
                if fmt not in best or ips > best[fmt]["images_per_s"]:
                    best[fmt] = {"images": summary["written"], "seconds": round(secs, 3),
                                 "listing_seconds": round(t_list, 3), "images_per_s": round(ips, 1),
                                 "images_per_s_per_core": round(ips / workers, 1), "bytes": summary["bytes"]}
                labels[fmt] = read_labels(out).tolist()
    if "folder" in best and "images_per_s" in best["folder"]:
        for fmt, b in best.items():
            if "images_per_s" in b:
                b["vs_folder"] = round(b["images_per_s"] / best["folder"]["images_per_s"], 3)
    same = len({json.dumps(v) for v in labels.values()}) <= 1
    n = next((b["images"] for b in best.values() if "images" in b), 0)
    res = {"benchmark": "prepare", "images": n, "source": args.data or f"built-in shapes {args.size[0]}x"
           f"{args.size[1]} JPEG q90", "workers": workers, "cpu_count": os.cpu_count(),
           "settings": {"short_side": s.short_side, "jpeg_quality": s.jpeg_quality, "write_mode": s.write_mode},
           "rounds": args.rounds, "formats": best, "same_labels": same}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"fastssl-prepare, {n} images, {workers} workers ({res['source']}), best of {args.rounds}:")
        for fmt, b in best.items():
            if "skipped" in b:
                print(f"  {fmt:<11} skipped: {b['skipped']}")
            else:
                print(f"  {fmt:<11} {b['images_per_s']:8.1f} img/s  {b['images_per_s_per_core']:7.1f} img/s/core  "
                      f"{b.get('vs_folder', 1):.2f}x folder  ({b['seconds']:.2f} s, listing {b['listing_seconds']:.2f} s)")
    if not same:
        print("fastssl-bench prepare: the formats' outputs hold different labels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
