"""``fastssl-prepare``: image folder or built-in data -> FFCV ``.beton``.

    fastssl-prepare SRC_DIR OUT.beton [--write-mode jpg|raw|smart] [--max-resolution 256] [--jpeg-quality 90]
    fastssl-prepare synthetic OUT_DIR [--classes 10 --per-class 200 --val-per-class 50 --size 64 --seed 0 --jpeg-folders]

SRC_DIR is an ImageFolder (``SRC/<class>/<image>``) or a flat folder of images
(label -1). Undecodable images are skipped and listed; so are decompression bombs
(over PIL's MAX_IMAGE_PIXELS), images beyond --max-aspect-ratio, files whose content
is not the format their extension names, and symlinks leaving SRC_DIR (SECURITY.md).
The summary and class names go to ``OUT.beton.meta.json``. Re-running with the same
inputs reuses the output.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastssl-prepare``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="fastssl-prepare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="image folder (ImageFolder or flat), or the word `synthetic`")
    ap.add_argument("out", help="output .beton (folder: OUT_DIR for `synthetic`)")
    ap.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart"],
                    help="jpg: JPEG (decoded by libjpeg-turbo at load time); raw: pixels; smart: JPEG only for "
                         "images larger than --smart-threshold raw bytes")
    ap.add_argument("--max-resolution", type=int, default=None, help="cap the longest side (px), ffcv's convention")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--smart-threshold", type=int, default=256 * 256 * 3)
    ap.add_argument("--max-aspect-ratio", type=float, default=None,
                    help="skip images whose longest side is over this many times the shortest (default 20)")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes for validation and writing (peak memory grows with it)")
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

    from fastssl.pipelines.prepare import (MAX_ASPECT_RATIO, PrepareError, WriteSettings, prepare_folder,
                                           prepare_synthetic)

    s = WriteSettings(write_mode=args.write_mode, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                      smart_threshold=args.smart_threshold, workers=args.workers,
                      max_aspect_ratio=MAX_ASPECT_RATIO if args.max_aspect_ratio is None else args.max_aspect_ratio)
    try:
        if args.src == "synthetic":
            if len(args.size) not in (1, 2):
                raise PrepareError(f"--size takes a side or HEIGHT WIDTH, got {args.size}")
            size = args.size[0] if len(args.size) == 1 else (args.size[0], args.size[1])
            prepare_synthetic(args.out, classes=args.classes, per_class=args.per_class,
                              val_per_class=args.val_per_class, size=size, seed=args.seed,
                              jpeg_folders=args.jpeg_folders, settings=s, force=args.force, quiet=args.quiet)
        else:
            if not args.out.endswith(".beton"):
                print(f"fastssl-prepare: note: {args.out} does not end in .beton", file=sys.stderr)
            prepare_folder(args.src, args.out, s, force=args.force, quiet=args.quiet)
    except (PrepareError, ValueError) as e:
        print(f"fastssl-prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
