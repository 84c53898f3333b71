"""``fastssl-eval RUN_DIR|CHECKPOINT [--knn] [--linear] [--rankme] [--alpha-req] [key=value ...]``.

No flag: all of them. Features are extracted once and cached in the run directory.
The checkpoint is read with weights_only=True (torch's restricted unpickler); ``--trust-checkpoint``
opens one that needs full pickle (SECURITY.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from fastssl.checkpoint import TRUST_HELP

    ap = argparse.ArgumentParser(prog="fastssl-eval", description=__doc__)
    ap.add_argument("path", help="run directory (uses checkpoints/last.pt) or a checkpoint file")
    ap.add_argument("--knn", action="store_true")
    ap.add_argument("--linear", action="store_true")
    ap.add_argument("--rankme", action="store_true")
    ap.add_argument("--alpha-req", action="store_true")
    ap.add_argument("--k", type=int, default=None, help="kNN neighbours (default: the run's eval.knn_k, 20)")
    ap.add_argument("--temperature", type=float, default=None, help="kNN temperature (default 0.07)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ap.add_argument("--quiet", action="store_true",
                    help="no progress of feature extraction (off too when stdout is not a terminal: "
                         "one line per tenth of a split instead)")
    ap.add_argument("overrides", nargs="*", help="data.train=... data.val=... to evaluate on other data")
    args = ap.parse_args(argv)

    from fastssl import checkpoint
    from fastssl.config import ConfigError, parse_override
    from fastssl.evaluation.offline import evaluate

    ck = checkpoint.resolve(args.path)
    try:
        cfg, method, step = checkpoint.load_for_eval(ck, args.device, trust=args.trust_checkpoint)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"fastssl-eval: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"fastssl-eval: error: {ck}: the config it holds is invalid: {e}", file=sys.stderr)
        return 2
    for o in args.overrides:
        try:
            key, value = parse_override(o)
        except ConfigError as e:
            print(f"fastssl-eval: error: {e}", file=sys.stderr)
            return 2
        if key not in ("data.train", "data.val", "data.backend", "data.workers"):
            print(f"fastssl-eval: only data.train, data.val, data.backend, data.workers can be overridden, not {key!r}",
                  file=sys.stderr)
            return 2
        setattr(cfg.data, key.split(".")[1], value)
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
    any_flag = args.knn or args.linear or args.rankme or args.alpha_req
    from fastssl.progress import quiet

    with quiet(args.quiet):
        res = evaluate(cfg, method, step, run_dir, knn=args.knn or not any_flag, linear=args.linear or not any_flag,
                       rank=args.rankme or not any_flag, alpha=args.alpha_req or not any_flag,
                       k=args.k, temperature=args.temperature, device=args.device)
    print(f"\nevaluation of {ck} (step {step}); written to {run_dir / 'eval.json'}")
    for key in ("knn_top1", "linear_top1", "linear_top5", "rankme", "alpha_req"):
        if key in res:
            print(f"  {key:<12} {res[key]:.3f}")
    if "knn_protocol" in res:
        p = res["knn_protocol"]
        print(f"  (kNN k={p['k']} T={p['temperature']}; linear: lr/wd chosen on a train hold-out; "
              f"{res['train_size']} train / {res['val_size']} val images at {res['image_size']} px)")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
