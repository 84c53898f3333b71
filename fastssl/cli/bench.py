"""``fastssl-bench loader|loss|step|eval|peer|accuracy|photometric|prepare ...``: every speed claim is one of these.

Each sub-command lives in ``fastssl/cli/bench_<name>.py`` with ``main(argv)``,
measures side by side in one run after warm-up, and prints JSON with ``--json``.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "loader": "data loading: images/s of ready views per back-end",
    "loss": "loss kernels: forward+backward time and peak memory per implementation",
    "step": "training steps/s of a method on synthetic tensors (no data loading)",
    "eval": "evaluation cost: kNN and the cached probe on ImageNet-shaped synthetic features; on a run, cached probe against re-extraction",
    "peer": "end-to-end pretraining (SimCLR, DINO) against lightly's loop, and the bare model's limit",
    "accuracy": "kNN top-1 after the same steps as lightly's loop on the built-in data, one protocol",
    "photometric": "the photometric stage alone: eager torch ops, the compiled (fused) stage, OpenCV (CPU)",
    "prepare": "fastssl-prepare's images/s (and per core) from a folder, Parquet and webdataset shards of the same images",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastssl-bench {" + "|".join(SUBCOMMANDS) + "} [options] [--json]\n")
        for k, v in SUBCOMMANDS.items():
            print(f"  {k:<8} {v}")
        return 0 if argv else 2
    sub = argv[0]
    if sub not in SUBCOMMANDS:
        from fastssl.registry import closest

        print(f"fastssl-bench: unknown benchmark {sub!r}: {closest(sub, list(SUBCOMMANDS))}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"fastssl.cli.bench_{sub}")
    return mod.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
