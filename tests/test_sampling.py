"""Crop geometry: sampled areas, aspect ratios and flips follow the view spec (statistical tests that can fail)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fastssl.pipelines.crops import crop_params, epoch_order, sample_many, shard_size, view_params
from fastssl.pipelines.recipes import ViewSpec, preset

N = 4000


def _ks_uniform(x: np.ndarray, lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov distance of ``x`` to U(lo, hi)."""
    u = np.sort((x - lo) / (hi - lo))
    n = len(u)
    cdf = np.arange(1, n + 1) / n
    return float(max(np.abs(cdf - u).max(), np.abs(cdf - 1 / n - u).max()))


def _crops(spec: ViewSpec, h=2000, w=2000, seed=0, epoch=0, view=0):
    p = view_params([spec])[0]
    return sample_many(np.full(N, h), np.full(N, w), p, seed, epoch, view)


KS_CRIT = 1.95 / math.sqrt(N)  # alpha = 0.001


@pytest.mark.parametrize("spec", [ViewSpec(), ViewSpec(scale_min=0.05, scale_max=0.4), ViewSpec(scale_min=0.4),
                                  ViewSpec(scale_min=0.1, scale_max=0.45, ratio_min=0.5, ratio_max=2.0, flip_p=0.2),
                                  ViewSpec(scale_max=0.7, flip_p=0.0)])
def test_area_and_log_ratio_follow_the_spec(spec):
    c = _crops(spec)
    area = c[:, 2] * c[:, 3] / 2000 ** 2
    logr = np.log(c[:, 3] / c[:, 2])
    # Ranges, with the integer rounding of a >= 80 px side.
    assert area.min() >= spec.scale_min * 0.97 and area.max() <= spec.scale_max * 1.03
    assert logr.min() >= math.log(spec.ratio_min) - 0.03 and logr.max() <= math.log(spec.ratio_max) + 0.03
    # When every try fits a square image (area x ratio <= 1) the first try is taken: both are uniform.
    # (Near scale 1 tries are rejected and the accepted area is biased low, as in torchvision: see below.)
    if spec.scale_max * max(spec.ratio_max, 1 / spec.ratio_min) <= 1:
        assert _ks_uniform(area, spec.scale_min, spec.scale_max) < KS_CRIT + 0.01
        assert _ks_uniform(logr, math.log(spec.ratio_min), math.log(spec.ratio_max)) < KS_CRIT + 0.01
    # Crops lie inside the image.
    assert (c[:, 0] >= 0).all() and (c[:, 1] >= 0).all()
    assert (c[:, 0] + c[:, 2] <= 2000).all() and (c[:, 1] + c[:, 3] <= 2000).all()
    # Flip rate within a 4-sigma binomial bound.
    p = spec.flip_p
    assert abs(c[:, 4].mean() - p) <= 4 * math.sqrt(p * (1 - p) / N) + 1e-9


def test_the_checks_reject_a_wrong_range():
    """Crops drawn with DINO's local scale do not pass as the global (0.08, 1) spec: the KS check can fail."""
    c = _crops(ViewSpec(scale_min=0.05, scale_max=0.4))
    area = c[:, 2] * c[:, 3] / 2000 ** 2
    assert _ks_uniform(area, 0.08, 0.5) > 5 * KS_CRIT
    c = _crops(ViewSpec(scale_max=0.5, ratio_min=1.0, ratio_max=4 / 3))
    assert _ks_uniform(np.log(c[:, 3] / c[:, 2]), math.log(3 / 4), math.log(4 / 3)) > 5 * KS_CRIT
    c = _crops(ViewSpec(flip_p=0.2))
    assert abs(c[:, 4].mean() - 0.5) > 4 * math.sqrt(0.25 / N)


def test_matches_torchvision_sampler_distribution():
    """Same algorithm as torchvision's RandomResizedCrop.get_params on a non-square image (two-sample KS)."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    h, w = 350, 500
    c = _crops(ViewSpec(), h=h, w=w)
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    tv = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(N)])
    for ours, theirs in ((c[:, 2] * c[:, 3], tv[:, 2] * tv[:, 3]), (c[:, 3] / c[:, 2], tv[:, 3] / tv[:, 2])):
        grid = np.sort(np.concatenate([ours, theirs]))
        d = np.abs(np.searchsorted(np.sort(ours), grid, "right") / N
                   - np.searchsorted(np.sort(theirs), grid, "right") / N).max()
        assert d < 1.95 * math.sqrt(2 / N)


def test_fallback_is_centred_and_in_ratio():
    # A 1000 x 10 strip: no random try fits the ratio range, so the centre-crop fallback is taken.
    p = view_params([ViewSpec()])[0]
    t, l, ch, cw, _ = crop_params(10, 1000, p, 0, 0, 0, 0, True)
    assert ch == 10 and cw == round(10 * 4 / 3) and l == (1000 - cw) // 2 and t == 0


def test_seeded_and_keyed():
    a, b = _crops(ViewSpec(), seed=1), _crops(ViewSpec(), seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _crops(ViewSpec(), seed=2))
    assert not np.array_equal(a, _crops(ViewSpec(), seed=1, epoch=1))
    assert not np.array_equal(a, _crops(ViewSpec(), seed=1, view=1))


def test_eval_centre_crop():
    p = view_params(preset("simclr"))[0]
    t, l, ch, cw, f = crop_params(256, 320, p, 0, 0, 5, 0, False)
    assert (ch, cw) == (224, 224) and (t, l) == (16, 48) and not f


@pytest.mark.parametrize("world,drop_last", [(2, True), (3, True), (3, False)])
def test_epoch_order_shards(world, drop_last):
    n = 101
    shards = [epoch_order(n, 0, 3, r, world, True, drop_last) for r in range(world)]
    allidx = np.concatenate(shards)
    assert len(np.unique(allidx)) == len(allidx)                       # disjoint, no repeats
    assert len(allidx) == (n - n % world if drop_last else n)          # nothing else dropped
    assert not np.array_equal(epoch_order(n, 0, 4, 0, world, True, drop_last), shards[0])  # reshuffled per epoch
    # Loaders count batches from shard_size without building the permutation.
    assert [shard_size(n, r, world, drop_last) for r in range(world)] == [len(s) for s in shards]
