"""``fastssl-report RUN_DIR [RUN_DIR ...] [--out DIR]``: plots and a one-page Markdown report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastssl-report", description=__doc__)
    ap.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    ap.add_argument("--out", default=None, help="output folder (default: <first run>/report)")
    args = ap.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").exists()]
    if missing:
        print(f"fastssl-report: no metrics.jsonl in {', '.join(missing)}: not a run directory", file=sys.stderr)
        return 2
    from fastssl.report import write_report

    md = write_report(args.runs, args.out or Path(args.runs[0]) / "report")
    print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
