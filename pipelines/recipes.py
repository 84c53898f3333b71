"""Augmentation recipes as data: a recipe is a list of per-view specs.

Cookbook section 3.1 (and the SimCLR, BYOL, DINO, MAE papers) give the
defaults. A config names a preset (``aug.recipe=byol``) and may change any
field of any view (``aug.views.1.solarize_p=0.0``); back-ends read only this
list, so every back-end produces the same views for the same recipe.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass
class ViewSpec:
    """One view: geometry (done at decode time) and photometry (batched on the device)."""

    size: int = 224                 # output side, px
    scale_min: float = 0.08         # RandomResizedCrop area range (section 3.1)
    scale_max: float = 1.0
    ratio_min: float = 3 / 4        # aspect ratio range
    ratio_max: float = 4 / 3
    flip_p: float = 0.5
    jitter_p: float = 0.8           # colour jitter applied with this probability
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma_min: float = 0.1     # sigma range, relative to a 224 px view's kernel (23 px)
    blur_sigma_max: float = 2.0
    solarize_p: float = 0.0
    local: bool = False             # a local (small) crop: grouped apart from the global ones

    def problem(self) -> str | None:
        """What makes this view impossible to produce, as ``field=value: why``; None when it is valid.

        Checked with the config, before any data is read: a blur sigma of 0 divides by zero in the
        Gaussian kernel (a view of NaN), a probability outside [0, 1] or a negative jitter strength
        silently means something else.
        """
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                return f"{name}={getattr(self, name)}: a probability, in [0, 1]"
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                return f"{name}={getattr(self, name)}: a jitter strength, at least 0"
        if not 0 <= self.hue <= 0.5:
            return f"hue={self.hue}: a hue shift, in [0, 0.5]"
        if not 0 < self.blur_sigma_min <= self.blur_sigma_max:
            return (f"blur_sigma_min={self.blur_sigma_min}, blur_sigma_max={self.blur_sigma_max}: "
                    f"needs 0 < blur_sigma_min <= blur_sigma_max (a sigma of 0 divides by zero)")
        if not 0 < self.scale_min <= self.scale_max <= 1:
            return f"scale=({self.scale_min}, {self.scale_max}): needs 0 < scale_min <= scale_max <= 1"
        if not 0 < self.ratio_min <= self.ratio_max:
            return f"ratio=({self.ratio_min}, {self.ratio_max}): needs 0 < ratio_min <= ratio_max"
        return None


def _simclr() -> list[ViewSpec]:
    # SimCLR (Chen et al. 2020) geometry and blur. The jitter (0.4, 0.4, 0.2, 0.1) is BYOL's strengths (and lightly's
    # DINOTransform's), half of SimCLR's own strength s=1, (0.8, 0.8, 0.8, 0.2), which the paper, lightly's
    # SimCLRTransform and solo-learn's SimCLR recipes use: set aug.views.N.brightness=0.8 ... for those
    # (fastssl-bench loader/peer give every arm the peer's strengths: --jitter lightly).
    v = ViewSpec()
    return [copy.deepcopy(v), copy.deepcopy(v)]


def _byol() -> list[ViewSpec]:
    # BYOL (Grill et al. 2020): asymmetric blur 1.0 / 0.1 and solarisation 0 / 0.2.
    a = ViewSpec(blur_p=1.0, solarize_p=0.0)
    b = ViewSpec(blur_p=0.1, solarize_p=0.2)
    return [a, b]


def _dino(num_local: int = 6) -> list[ViewSpec]:
    # DINO (Caron et al. 2021), multi-crop (section 3.1.1): 2 x 224 global with
    # scale (0.4, 1) (BYOL-style asymmetric blur/solarize) + N x 96 local with scale (0.05, 0.4).
    g1 = ViewSpec(scale_min=0.4, blur_p=1.0)
    g2 = ViewSpec(scale_min=0.4, blur_p=0.1, solarize_p=0.2)
    loc = ViewSpec(size=96, scale_min=0.05, scale_max=0.4, blur_p=0.5, local=True)
    return [g1, g2] + [copy.deepcopy(loc) for _ in range(num_local)]


def _mae() -> list[ViewSpec]:
    # MAE (He et al. 2022): crop (scale 0.2-1) and flip only, one view.
    return [ViewSpec(scale_min=0.2, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)]


PRESETS = {"simclr": _simclr, "byol": _byol, "dino": _dino, "mae": _mae}


def preset(name: str) -> list[ViewSpec]:
    """A fresh copy of a named recipe's view specs."""
    if name not in PRESETS:
        from fastssl.registry import closest

        raise KeyError(f"unknown augmentation recipe {name!r}: {closest(name, list(PRESETS))}")
    return PRESETS[name]()


@dataclass
class AugConfig:
    """``aug.*`` keys. ``views`` starts as the preset of ``recipe``; sizes rescale it."""

    recipe: str = ""                # empty: the method's own recipe (SimCLR's, BYOL's, DINO's, MAE's)
    global_size: int = 224          # overrides the size of every global view
    local_size: int = 96            # overrides the size of every local view
    num_local: int = -1             # -1: the preset's count (DINO: 6)
    views: list[ViewSpec] = field(default_factory=list)

    def resolved_views(self) -> list[ViewSpec]:
        """The views to produce, with sizes and local-crop count applied."""
        views = copy.deepcopy(self.views) if self.views else preset(self.recipe or "simclr")
        if self.num_local >= 0:
            glob = [v for v in views if not v.local]
            locs = [v for v in views if v.local]
            proto = locs[0] if locs else ViewSpec(size=self.local_size, scale_min=0.05, scale_max=0.4, local=True)
            views = glob + [copy.deepcopy(proto) for _ in range(self.num_local)]
        for v in views:
            v.size = self.local_size if v.local else self.global_size
        return views
