"""The built-in labelled dataset: procedurally drawn shapes.

Classes are defined by *shape and structure* (disk, ring, star, ...), never by
colour or position: foreground and background colours, position, scale and
rotation are random per image. So colour jitter and random crops are exactly
the invariances a model must learn (cookbook section 3.1), and a randomly
initialised network, which leans on colour, scores poorly on kNN.

Deterministic: image ``i`` of a split depends only on (seed, split, i). Any
resolution, square or not (ImageNet-like 400x350 JPEGs for benchmarks).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Bump when the drawing changes: prepared datasets record it and are rewritten.
GENERATOR_VERSION = 4
CLASSES = ("disk", "square", "triangle", "star", "plus", "ring", "frame", "crescent", "tee", "bars")
_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 250, 250], [20, 20, 20]], np.float32)
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of class ``cls`` in the shape's own unit frame (u, v in about [-1, 1])."""
    r = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    m = np.maximum(au, av)
    if cls == 0:
        return r < 0.95
    if cls == 1:
        return m < 0.8
    if cls == 2:
        return (v > -0.55) & (v < 0.95 - 1.732 * au)
    if cls == 3:
        theta = np.arctan2(v, u)
        return r < 0.42 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 2.5
    if cls == 4:
        return ((au < 0.28) & (av < 0.95)) | ((av < 0.28) & (au < 0.95))
    if cls == 5:
        return (r < 0.95) & (r > 0.58)
    if cls == 6:
        return (m < 0.88) & (m > 0.56)
    if cls == 7:
        return (r < 0.95) & (np.hypot(u - 0.45, v) > 0.72)
    if cls == 8:
        return ((au < 0.9) & (v > 0.5) & (v < 0.9)) | ((au < 0.22) & (v > -0.9) & (v <= 0.5))
    if cls == 9:
        return (au < 0.9) & (av > 0.28) & (av < 0.72)
    raise ValueError(f"class index {cls} out of range 0..{len(CLASSES) - 1}")


def render(cls: int, rng: np.random.Generator, height: int, width: int | None = None) -> np.ndarray:
    """One image of class ``cls``: (H, W, 3) uint8, anti-aliased by 2x supersampling."""
    width = width or height
    H, W = 2 * height, 2 * width
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    side = min(H, W)
    # Colours come from a small palette shared by all classes: colour says nothing about
    # the class and little about the instance, so instance discrimination (SimCLR) has
    # to use structure. A flat background (a gradient's direction is an instance cue
    # that survives cropping and jitter), grain added below.
    bi, fi = rng.choice(len(_PALETTE), 2, replace=False)
    bg, fg = _PALETTE[bi], _PALETTE[fi]
    rng.uniform(0, 2 * np.pi)  # the old gradient angle: still drawn, so version-4 images stay as they are
    img = np.broadcast_to(bg, (H, W, 3))
    scale = rng.uniform(0.28, 0.42) * side
    cx = rng.uniform(scale, W - scale)
    cy = rng.uniform(scale, H - scale)
    rot = rng.uniform(-0.5, 0.5)  # radians: upright-ish, so structure (not pose) is what varies
    aspect = rng.uniform(0.85, 1.15)
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    u = (dx * np.cos(rot) + dy * np.sin(rot)) * aspect
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    inside = _mask(cls, u, v)
    img = np.where(inside[..., None], fg, img)
    img = img + rng.normal(0, 6, (H, W, 1)) + rng.normal(0, 3, (H, W, 3))
    img = img.reshape(height, 2, width, 2, 3).mean(axis=(1, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticImages:
    """Indexable labelled dataset: ``ds[i] -> (uint8 (H, W, 3), label)``.

    ``size`` is an int (square) or ``(height, width)``. Labels cycle through the
    classes so every class has ``per_class`` images.
    """

    def __init__(self, num_classes: int = 10, per_class: int = 100, size: int | tuple[int, int] = 64,
                 seed: int = 0, split: str = "train"):
        if not 2 <= num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
        self.num_classes, self.per_class, self.seed, self.split = num_classes, per_class, seed, split
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
        self.classes = list(CLASSES[:num_classes])

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        label = i % self.num_classes
        rng = np.random.default_rng([self.seed, _SPLIT_OFFSET[self.split] + i])
        return render(label, rng, self.height, self.width), label


def write_jpeg_folder(ds: SyntheticImages, out_dir: str | os.PathLike, quality: int = 90) -> Path:
    """Write ``ds`` as an ImageFolder (``out_dir/<class>/<index>.jpg``); returns ``out_dir``."""
    from PIL import Image

    out = Path(out_dir)
    for name in ds.classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(ds)):
        img, label = ds[i]
        Image.fromarray(img).save(out / ds.classes[label] / f"{i:07d}.jpg", quality=quality)
    return out
