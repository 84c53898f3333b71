"""``fastssl-eval RUN_DIR|CHECKPOINT [--knn] [--linear] [--rankme] [--alpha-req] [key=value ...]``.

No flag: all of them. Features are extracted once per checkpoint and cached in the run
directory (the trainer's final evaluation writes them too, so an evaluation after training
extracts nothing). ``--linear-protocol`` names the linear evaluation: ``cached`` (quick: a
grid of heads on the cached centre-crop features, 30 epochs) or ``simclr`` (the papers': a
head on the frozen backbone over randomly cropped and flipped images, 90 epochs); every
linear figure is written and printed with its protocol's name. The ``simclr`` protocol saves its
head after every epoch (``RUN_DIR/linear_simclr.pt``): the same command, run again after an
interruption, resumes after the last saved epoch. ``eval.json`` keeps every figure of the same
checkpoint across calls.
The checkpoint is read with weights_only=True (torch's restricted unpickler); ``--trust-checkpoint``
opens one that needs full pickle (SECURITY.md).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from fastssl.checkpoint import TRUST_HELP

    ap = argparse.ArgumentParser(prog="fastssl-eval", description=__doc__)
    ap.add_argument("path", help="run directory (uses checkpoints/last.pt) or a checkpoint file")
    ap.add_argument("--knn", action="store_true")
    ap.add_argument("--linear", action="store_true")
    ap.add_argument("--rankme", action="store_true")
    ap.add_argument("--alpha-req", action="store_true")
    ap.add_argument("--linear-protocol", choices=("cached", "simclr"), default=None,
                    help="cached: heads on cached centre-crop features (quick, the default); simclr: SimCLR's "
                         "linear evaluation (random resized crops + flips through the frozen backbone, 90 epochs, "
                         "SGD Nesterov, lr 0.1 x batch/256, cosine). Implies --linear")
    ap.add_argument("--linear-epochs", type=int, default=None, help="linear epochs (default: cached 30, simclr 90)")
    ap.add_argument("--linear-batch-size", type=int, default=None, help="linear batch size (default 256)")
    ap.add_argument("--k", type=int, default=None, help="kNN neighbours (default: the run's eval.knn_k, 20)")
    ap.add_argument("--temperature", type=float, default=None, help="kNN temperature (default 0.07)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ap.add_argument("--quiet", action="store_true",
                    help="no progress of feature extraction (off too when stdout is not a terminal: "
                         "one line per tenth of a split instead)")
    ap.add_argument("overrides", nargs="*", help="data.train=... data.val=... to evaluate on other data")
    args = ap.parse_args(argv)
    for name in ("linear_epochs", "linear_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"fastssl-eval: error: --{name.replace('_', '-')} must be at least 1, got {v}", file=sys.stderr)
            return 2

    from fastssl import checkpoint
    from fastssl.logs import configure

    configure(quiet=True if args.quiet else None)
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
    linear = args.linear or args.linear_protocol is not None
    any_flag = args.knn or linear or args.rankme or args.alpha_req
    from fastssl.progress import quiet

    with quiet(args.quiet):
        try:
            res = evaluate(cfg, method, step, run_dir, knn=args.knn or not any_flag, linear=linear or not any_flag,
                           rank=args.rankme or not any_flag, alpha=args.alpha_req or not any_flag,
                           k=args.k, temperature=args.temperature, device=args.device,
                           linear_protocol=args.linear_protocol or "cached", linear_epochs=args.linear_epochs,
                           linear_batch_size=args.linear_batch_size)
        except ValueError as e:
            print(f"fastssl-eval: error: {e}", file=sys.stderr)
            return 2
    print(f"\nevaluation of {ck} (step {step}); written to {run_dir / 'eval.json'}")
    for line in result_lines(res):
        print(line)
    return 0


def result_lines(res: dict) -> list[str]:
    """The printed figures; a linear figure carries its protocol's name, kNN its k and T."""
    lines = []
    if "knn_top1" in res:
        p = res["knn_protocol"]
        lines.append(f"  {'knn_top1':<12} {res['knn_top1']:.3f}   (k={p['k']}, T={p['temperature']})")
    if "linear_top1" in res:
        p = res["linear_protocol"]
        if p["name"] == "simclr":
            how = (f"linear protocol simclr: {p['epochs']} epochs, batch {p['batch_size']}, lr {p['lr']:g}, "
                   f"random resized crops + flips, frozen backbone")
        else:
            how = (f"linear protocol cached: {p['epochs']} epochs on cached centre-crop features, no augmentation, "
                   f"lr/wd chosen on a train hold-out; not comparable with papers' figures")
        for key in ("linear_top1", "linear_top5"):
            lines.append(f"  {key:<12} {res[key]:.3f}   ({how})")
    for key in ("rankme", "alpha_req"):
        if key in res:
            lines.append(f"  {key:<12} {res[key]:.3f}")
    secs = res.get("seconds", {})
    lines.append(f"  ({res['train_size']} train / {res['val_size']} val images at {res['image_size']} px; "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()) + ")")
    return lines


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
