"""torch back-end: an image folder through a torch ``DataLoader``, same contract as the ffcv one.

CPU path: each worker decodes an image ONCE (PIL) and cuts every view from it
(``pipelines.crops`` geometry, PIL box-resize, flip), returning uint8
``(S, S, 3)`` crops; the photometric stage runs batched on the device.
CUDA path: workers only read file bytes and the JPEG header (for the crop
geometry); the main process decodes the whole batch with
``torchvision.io.decode_jpeg(device="cuda")`` and crops + resizes every view on
the GPU with ``roi_align`` (adaptive sampling = area-averaging, i.e. antialiased).
Non-JPEG files are decoded by the worker on the CPU. A file that cannot be
decoded is dropped from its batch with a warning, never ending the epoch.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import torch

from fastssl.pipelines import Batch
from fastssl.pipelines.crops import EpochContract, crop_params, view_params


def _crop_geometry(h: int, w: int, params: np.ndarray, seed: int, epoch: int, index: int, train: bool) -> np.ndarray:
    """(V, 5) int64 rows (top, left, crop_h, crop_w, flip) for one image."""
    out = np.zeros((len(params), 5), np.int64)
    for v in range(len(params)):
        t, l, ch, cw, f = crop_params(h, w, params[v], seed, epoch, index, v, train)
        out[v] = (t, l, ch, cw, int(f))
    return out


class FolderViews(torch.utils.data.Dataset):
    """``ds[i] -> (ok, crops: tuple of uint8 (S, S, 3) arrays, label, index)``; ``gpu_decode``: bytes + geometry."""

    def __init__(self, items, sizes, params, seed: int, train: bool, gpu_decode: bool = False):
        self.items, self.sizes, self.params = items, list(sizes), params
        self.seed, self.epoch, self.train, self.gpu_decode = seed, 0, train, gpu_decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        try:
            if self.gpu_decode:
                data = open(path, "rb").read()
                if data[:2] == b"\xff\xd8":  # JPEG: decode on the GPU; the header gives the geometry
                    with Image.open(path) as im:
                        w, h = im.size
                    geo = _crop_geometry(h, w, self.params, self.seed, self.epoch, i, self.train)
                    return True, torch.frombuffer(bytearray(data), dtype=torch.uint8), geo, label, i
                # not a JPEG: decode here (CPU) and let the GPU crop it
                from fastssl.pipelines.prepare import load_rgb

                rgb = load_rgb(path)
                geo = _crop_geometry(rgb.shape[0], rgb.shape[1], self.params, self.seed, self.epoch, i, self.train)
                return True, torch.from_numpy(rgb), geo, label, i
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                geo = _crop_geometry(h, w, self.params, self.seed, self.epoch, i, self.train)
                crops = []
                for (t, l, ch, cw, f), s in zip(geo, self.sizes):
                    a = np.asarray(im.resize((s, s), Image.BILINEAR, box=(l, t, l + cw, t + ch)))
                    crops.append(np.ascontiguousarray(a[:, ::-1]) if f else a)
            return True, tuple(crops), None, label, i
        except Exception as e:  # one bad file must not end the epoch
            warnings.warn(f"torch back-end: skipping {path}: {type(e).__name__}: {e}")
            return False, None, None, label, i


def _collate(samples):
    """Drop undecodable samples; stack crops per view (CPU path) or keep lists (GPU path)."""
    good = [s for s in samples if s[0]]
    labels = torch.tensor([s[3] for s in good], dtype=torch.int64)
    idx = torch.tensor([s[4] for s in good], dtype=torch.int64)
    if not good:
        return None, None, labels, idx
    if good[0][2] is None:  # CPU path: V x (B, S, S, 3)
        crops = [torch.from_numpy(np.stack([s[1][v] for s in good])) for v in range(len(good[0][1]))]
        return crops, None, labels, idx
    return [s[1] for s in good], torch.from_numpy(np.stack([s[2] for s in good])), labels, idx


def gpu_decode_and_crop(payloads: list[torch.Tensor], geo: torch.Tensor, sizes: list[int], device) -> list[torch.Tensor]:
    """Decode a batch on the GPU and cut its views: V x (B, S_v, S_v, 3) uint8 on ``device``.

    ``payloads``: per image either JPEG bytes (1-D uint8) or a decoded (H, W, 3) uint8 array;
    ``geo``: (B, V, 5) int64 (top, left, crop_h, crop_w, flip).
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.ops import roi_align

    device = torch.device(device)
    jpeg_ix = [k for k, p in enumerate(payloads) if p.dim() == 1]
    images: list[torch.Tensor | None] = [None] * len(payloads)
    if jpeg_ix:  # one batched nvJPEG call; (3, H, W) uint8 each
        dec = decode_jpeg([payloads[k] for k in jpeg_ix], mode=ImageReadMode.RGB, device=device)
        for k, im in zip(jpeg_ix, dec):
            images[k] = im
    for k, p in enumerate(payloads):
        if images[k] is None:
            images[k] = p.to(device, non_blocking=True).permute(2, 0, 1)
    B = geo.shape[0]
    g = geo.to(device=device, dtype=torch.float32)
    out = [torch.empty(B, s, s, 3, dtype=torch.uint8, device=device) for s in sizes]
    by_size: dict[int, list[int]] = {}
    for v, s in enumerate(sizes):
        by_size.setdefault(s, []).append(v)
    for b, im in enumerate(images):
        x = im[None].float()                                             # (1, 3, H, W)
        for s, vs in by_size.items():
            r = g[b, vs]                                                  # (k, 5)
            boxes = torch.stack([torch.zeros_like(r[:, 0]), r[:, 1], r[:, 0], r[:, 1] + r[:, 3], r[:, 0] + r[:, 2]], 1)
            crops = roi_align(x, boxes, output_size=(s, s), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            flip = r[:, 4].bool().view(-1, 1, 1, 1)
            crops = torch.where(flip, crops.flip(-1), crops)              # (k, 3, s, s)
            crops = crops.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            for j, v in enumerate(vs):
                out[v][b] = crops[j]
    return out


class TorchLoader(EpochContract):
    """Iterable of :class:`Batch` over an image folder; see :func:`pipelines.loader.build_loader`."""

    def __init__(self, path: str, views, batch_size: int, device, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, workers: int = 2, train: bool = True,
                 finisher=None, gpu_decode: bool | None = None):
        from fastssl.pipelines.prepare import list_images

        self.path, self.views, self.batch_size = str(path), list(views), int(batch_size)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.drop_last, self.train, self.finisher, self.workers = bool(drop_last), bool(train), finisher, int(workers)
        self.items, self.classes, _ = list_images(self.path)
        self.num_samples = len(self.items)
        self.num_classes = len(self.classes) if self.classes else None
        self.epoch = 0
        vs = self.views if train else self.views[:1]
        self.sizes = [v.size for v in vs]
        self.gpu_decode = (self.device.type == "cuda") if gpu_decode is None else bool(gpu_decode)
        self.dataset = FolderViews(self.items, self.sizes, view_params(vs), self.seed, self.train, self.gpu_decode)
        self.decodes = 0  # images decoded by the last epoch (decode-once checks): one per yielded sample

    def __iter__(self):
        order = self.order(self.epoch).astype(np.int64)
        nb = len(self)
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size].tolist() for b in range(nb)]
        self.dataset.epoch, self.dataset.sizes = self.epoch, list(self.sizes)  # workers copy the dataset per epoch
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            multiprocessing_context="fork" if (self.workers > 0 and sys.platform.startswith("linux")) else None,
            prefetch_factor=4 if self.workers > 0 else None)
        labelled = self.num_classes is not None
        nbk = self.device.type == "cuda"
        for b, (crops, geo, labels, idx) in enumerate(dl):
            if crops is None:
                continue
            if geo is not None:
                crops = gpu_decode_and_crop(crops, geo, self.sizes, self.device)
            else:
                crops = [c.to(self.device, non_blocking=nbk) for c in crops]
            step = self.epoch * nb + b
            views = self.finisher(crops, step) if self.finisher is not None else crops
            yield Batch(views=views, labels=labels.to(self.device, non_blocking=nbk) if labelled else None,
                        indices=idx.to(self.device, non_blocking=nbk))
