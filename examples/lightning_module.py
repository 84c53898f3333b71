"""A fastssl method inside a PyTorch Lightning module (``pip install lightning``).

The method does the SSL part (views -> loss, EMA teacher, centre); Lightning does the loop:

    python examples/lightning_module.py --method byol --steps 50

Without Lightning installed, ``SSLModule`` is a plain ``nn.Module`` and ``fit`` below runs the
same hooks in Lightning's order (training_step, backward, on_before_optimizer_step,
optimizer_step), so this file runs either way.
"""
import argparse
import inspect
import os

import torch

import fastssl
from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

try:
    import lightning as L
    Base = L.LightningModule
except ImportError:
    L, Base = None, torch.nn.Module


class SSLModule(Base):
    def __init__(self, method: str = "byol", lr: float = 1e-3, weight_decay: float = 0.05, **method_kwargs):
        super().__init__()
        self.method = fastssl.create_method(method, **method_kwargs)   # e.g. backbone="resnet18", proj_dim=256
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        out = self.method(batch.views, self.global_step)               # {"loss", "features", logged scalars}
        if L is not None:
            self.log_dict({k: v for k, v in out.items() if k not in ("loss", "features")})
            self.log("loss", out["loss"], prog_bar=True)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer):
        self.method.before_optimizer_step(self.global_step)            # DINO/SwAV: freeze a layer early on

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        step = self.global_step                                         # counts optimizer steps, as the method does
        optimizer.step(closure=optimizer_closure)
        self.method.after_step(step)                                   # EMA teacher, centre, queue: once per step

    def configure_optimizers(self):
        return torch.optim.AdamW(self.method.param_groups(self.weight_decay), lr=self.lr)


def fit(module: SSLModule, loader, max_steps: int) -> list[float]:
    """Lightning's automatic-optimisation loop, written out (for a machine without Lightning)."""
    module.global_step = 0
    opt = module.configure_optimizers()
    losses, epoch = [], 0
    while module.global_step < max_steps:
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            def closure(batch=batch, i=i):                               # called once, by opt.step below
                opt.zero_grad()
                loss = module.training_step(batch, i)
                loss.backward()
                module.on_before_optimizer_step(opt)
                losses.append(loss.item())
                return loss

            module.optimizer_step(epoch, i, opt, closure)
            module.global_step += 1
            if module.global_step == max_steps:
                break
        epoch += 1
    return losses


class EpochLoader:
    """fastssl's loader for Lightning: an iterable of Batch that reshuffles (``set_epoch``) each epoch."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="byol", help=f"one of {fastssl.list_methods()}")
    ap.add_argument("--backbone", default="resnet_tiny")
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):  # the built-in shapes as an image folder (or: fastssl-prepare synthetic DIR)
        write_jpeg_folder(SyntheticImages(num_classes=10, per_class=50, size=args.size), args.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from fastssl.methods import METHODS

    recipe = METHODS.meta(args.method)["recipe"]                        # the method's own views (BYOL's, DINO's, ...)
    aug = fastssl.AugConfig(recipe=recipe, global_size=args.size, local_size=args.size // 2,
                            num_local=2 if recipe == "dino" else -1)
    loader = fastssl.build_loader(None, aug.resolved_views(), args.data, args.batch_size, device,
                                  workers=args.workers)
    small = dict(proj_hidden=256, proj_dim=64, pred_hidden=256, hidden=256, bottleneck=64, out_dim=1024,
                 num_prototypes=100, total_steps=args.steps)                # CPU-sized heads
    accepted = inspect.signature(METHODS.get(args.method)).parameters
    module = SSLModule(args.method, backbone=args.backbone, **{k: v for k, v in small.items() if k in accepted})
    if L is None:
        module.to(device)
        losses = fit(module, loader, args.steps)
        print(f"lightning is not installed: ran {len(losses)} steps in fit(); loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        return losses
    trainer = L.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=EpochLoader(loader))
    return [float(trainer.callback_metrics["loss"])]


if __name__ == "__main__":
    main()
