"""``fastssl-prepare``: images as you have them, or built-in data -> FFCV ``.beton``.

    fastssl-prepare SRC OUT.beton [--short-side 256] [--max-resolution 512] [--jpeg-quality 90] [--workers N]
    fastssl-prepare synthetic OUT_DIR [--classes 10 --per-class 200 --val-per-class 50 --size 64 --seed 0 --jpeg-folders]

SRC is any of:
  an image folder       ImageFolder (SRC/<class>/<image>) or a flat folder of images (label -1)
  Parquet/Arrow shards  a .parquet/.arrow file, a folder of them or a quoted glob ('data/train-*.parquet');
                        --image-column (default: `image`, Hugging Face's Image struct, or the first bytes
                        column), --label-column (default: `label` and kin if present; '' for none)
  webdataset shards     a .tar, a folder of them, a glob or a brace pattern ('shards/train-{000..099}.tar');
                        samples grouped by key, image jpg/jpeg/png/webp, label cls or json
  a list file           .csv (path,label; header optional) or .jsonl ({"path": ..., "label": ...}),
                        paths relative to the list file
  CIFAR-10/100, STL-10  the folder of the binary version (cifar-10-batches-bin/, cifar-100-binary/,
                        stl10_binary/); --split train|test (STL-10: also unlabeled, train+unlabeled)

Undecodable images are skipped and named (shard and key); so are decompression bombs
(over PIL's MAX_IMAGE_PIXELS), images beyond --max-aspect-ratio, files whose content is
not the format their extension names (the reason says how to keep them: re-save, or
rename to the real format's extension), and symlinks or paths leaving SRC (SECURITY.md).
The summary and class names go to ``OUT.beton.meta.json``. Re-running with the same
inputs reuses the output.

Size caps (both may be given; the tighter one applies; images are never upscaled):
--short-side N stores the shortest side at N px (a 500x375 photo at 341x256 for N=256),
--max-resolution N caps the longest side at N (ffcv's own writer's convention).
For ImageNet at 224 px: --short-side 256 --max-resolution 512 --jpeg-quality 90. The short
side is what a 224 px crop is cut from: a longest-side cap of 256 stores a 500x375 photo at
256x192, where a crop of half its area (RandomResizedCrop's mean for scale 0.08-1) is 163 px
and is upsampled 1.4x to 224; at short side 256 (341x256) it is 217 px, about 1:1. FFCV's ResNet-50 setting (ffcv-imagenet:
longest side 500, half the images raw, JPEG 90) keeps most ImageNet photos whole at about
300 KB each; FFCV states only that a larger side helps accuracy and costs throughput. The
short side 256 (torchvision's Resize(256) before a 224 crop) stores about 23 KB a photo and
decodes 2.5x faster than at 500 px (JPEG 90, measured on 500x375 photos); the longest-side
cap of 512 bounds panoramas.

Exit status: 0 written (or up to date), 2 bad input or options (one line on stderr
says what and how to fix it), 4 the output's disk is too small: before writing, when its
free space is under the estimated size plus a margin for the estimate's error (the line
names both), or during it (the partial file is removed; the line names the bytes written,
the share of the images done and the space that implies).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastssl-prepare``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="fastssl-prepare", description=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="image folder, shards, list file, CIFAR/STL-10 binary folder, or `synthetic`")
    ap.add_argument("out", help="output .beton (folder: OUT_DIR for `synthetic`)")
    ap.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart"],
                    help="jpg: JPEG (decoded by libjpeg-turbo at load time); raw: pixels; smart: JPEG only for "
                         "images larger than --smart-threshold raw bytes")
    ap.add_argument("--short-side", type=int, default=None,
                    help="cap the shortest side (px); 256 keeps ImageNet's 224 px crops from upsampling")
    ap.add_argument("--max-resolution", type=int, default=None, help="cap the longest side (px), ffcv's convention")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--smart-threshold", type=int, default=256 * 256 * 3)
    ap.add_argument("--max-aspect-ratio", type=float, default=None,
                    help="skip images whose longest side is over this many times the shortest (default 20)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes for validation and writing (default: the cores this process may use; peak "
                         "memory grows with it)")
    ap.add_argument("--image-column", default=None, help="Parquet/Arrow: the column of image bytes")
    ap.add_argument("--label-column", default=None, help="Parquet/Arrow: the label column ('' for none)")
    ap.add_argument("--split", default="train", help="CIFAR/STL-10: train or test (STL-10: also unlabeled, "
                                                     "train+unlabeled)")
    ap.add_argument("--force", action="store_true", help="rewrite even if an up-to-date output exists")
    ap.add_argument("--quiet", action="store_true",
                    help="print nothing but errors: no messages, no progress (progress is a bar on a terminal, "
                         "one line per tenth of the work when stdout is not one)")
    g = ap.add_argument_group("synthetic")
    g.add_argument("--classes", type=int, default=10)
    g.add_argument("--per-class", type=int, default=200)
    g.add_argument("--val-per-class", type=int, default=50)
    g.add_argument("--size", type=int, nargs="+", default=[64], help="side, or HEIGHT WIDTH")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--jpeg-folders", action="store_true", help="also write OUT_DIR/train/ and OUT_DIR/val/ ImageFolders")
    args = ap.parse_args(argv)

    from fastssl.logs import configure
    from fastssl.pipelines.prepare import (DISK_FULL_EXIT, MAX_ASPECT_RATIO, DiskFull, PrepareError, WriteSettings,
                                           check_output, default_workers, prepare_source, prepare_synthetic)

    configure(quiet=args.quiet or None)
    s = WriteSettings(write_mode=args.write_mode, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                      smart_threshold=args.smart_threshold,
                      workers=default_workers() if args.workers is None else args.workers,
                      max_aspect_ratio=MAX_ASPECT_RATIO if args.max_aspect_ratio is None else args.max_aspect_ratio,
                      short_side=args.short_side)
    try:
        s.check()
        if args.src == "synthetic":
            if len(args.size) not in (1, 2):
                raise PrepareError(f"--size takes a side or HEIGHT WIDTH, got {args.size}")
            size = args.size[0] if len(args.size) == 1 else (args.size[0], args.size[1])
            prepare_synthetic(args.out, classes=args.classes, per_class=args.per_class,
                              val_per_class=args.val_per_class, size=size, seed=args.seed,
                              jpeg_folders=args.jpeg_folders, settings=s, force=args.force, quiet=args.quiet)
        else:
            from fastssl.pipelines.sources import open_source

            if not args.out.endswith(".beton"):
                print(f"fastssl-prepare: note: {args.out} does not end in .beton", file=sys.stderr)
            out = check_output(args.out)  # before a long listing: a read-only or full disk is found at once
            source = open_source(args.src, image_column=args.image_column, label_column=args.label_column,
                                 split=args.split)
            prepare_source(source, out, s, force=args.force, quiet=args.quiet)
    except DiskFull as e:
        print(f"fastssl-prepare: error: {e}", file=sys.stderr)
        return DISK_FULL_EXIT
    except (PrepareError, ValueError) as e:
        print(f"fastssl-prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
