"""SimCLR in a plain PyTorch loop: fastssl's loader, a backbone, a projection head and NT-Xent.

    python examples/plain_loop.py --steps 50        # writes the built-in shapes data to ./shapes first
"""
import argparse
import os

import torch

import fastssl
from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="shapes")
ap.add_argument("--steps", type=int, default=50)
ap.add_argument("--batch-size", type=int, default=64)
ap.add_argument("--size", type=int, default=32)
ap.add_argument("--workers", type=int, default=2)
args = ap.parse_args()
if not os.path.isdir(args.data):  # the built-in data as an image folder (or: fastssl-prepare synthetic DIR)
    write_jpeg_folder(SyntheticImages(num_classes=10, per_class=50, size=args.size), args.data)

device = "cuda" if torch.cuda.is_available() else "cpu"
views = fastssl.AugConfig(recipe="simclr", global_size=args.size).resolved_views()  # two SimCLR views
loader = fastssl.build_loader(None, views, args.data, args.batch_size, device, workers=args.workers)

backbone, feat_dim = fastssl.create_backbone("resnet_tiny")                   # or "resnet50", any timm name
model = torch.nn.Sequential(backbone, fastssl.ProjectionHead(feat_dim, 512, 128)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)

step, epoch = 0, 0
while step < args.steps:
    loader.set_epoch(epoch)
    for batch in loader:                                                       # batch.views: 2 x (B, 3, S, S)
        z1, z2 = (model(v.float()) for v in batch.views)
        loss = fastssl.nt_xent(z1, z2, temperature=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        print(f"step {step} loss {loss.item():.3f}")
        if step == args.steps:
            break
    epoch += 1
