"""Crop geometry shared by every back-end: seeded random-resized-crop + flip, and the eval centre crop.

The sampler is torchvision's ``RandomResizedCrop.get_params`` (10 tries of
area ~ U(scale) x image area and log-aspect ~ U(log ratio), then a centre-crop
fallback clamped to the ratio range), the SimCLR/BYOL/DINO crop (cookbook
section 3.1). Randomness is counter-based: every draw is a hash of
``(seed, epoch, sample index, view, draw number)``, so a sample's crops do not
depend on which thread, worker, rank or batch decoded it, and the same seed
gives the same crops (ffcv's numba ops otherwise draw from an unseeded RNG).
Compiled with numba so the ffcv decoder and the torch workers share it.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# View parameters packed as float64 rows (one per view), for numba: size is in the loader's state.
P_SCALE_MIN, P_SCALE_MAX, P_LOGR_MIN, P_LOGR_MAX, P_FLIP = range(5)
EVAL_CROP_RATIO = 0.875  # resize short side to size / 0.875, centre crop ``size`` (the standard eval transform)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def _mix64(x):
    """splitmix64 finaliser: a bijective avalanche of a uint64."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def sample_key(seed, epoch, index, view):
    """The 64-bit stream key of one (seed, epoch, sample, view)."""
    k = _mix64(np.uint64(seed) + _GOLDEN)
    k = _mix64(k ^ (np.uint64(epoch) + _GOLDEN))
    k = _mix64(k ^ (np.uint64(index) * _GOLDEN + np.uint64(1)))
    return _mix64(k ^ (np.uint64(view) + np.uint64(0x632BE59BD9B4E019)))


@njit(cache=True, inline="always")
def _uniform(key, n):
    """The n-th U[0, 1) draw of stream ``key`` (53-bit mantissa)."""
    return float(_mix64(key + np.uint64(n) * _GOLDEN) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def random_resized_crop(height, width, params, key):
    """(top, left, crop_h, crop_w, flip) for one view of a (height, width) image; torchvision's algorithm.

    ``params``: float64 row (scale_min, scale_max, log_ratio_min, log_ratio_max, flip_p).
    """
    h = np.int64(height)
    w = np.int64(width)
    area = float(h * w)
    n = 0
    for _ in range(10):
        target = area * (params[P_SCALE_MIN] + (params[P_SCALE_MAX] - params[P_SCALE_MIN]) * _uniform(key, n))
        logr = params[P_LOGR_MIN] + (params[P_LOGR_MAX] - params[P_LOGR_MIN]) * _uniform(key, n + 1)
        n += 2
        aspect = math.exp(logr)
        cw = np.int64(round(math.sqrt(target * aspect)))
        ch = np.int64(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = np.int64(_uniform(key, 40) * (h - ch + 1))
            left = np.int64(_uniform(key, 41) * (w - cw + 1))
            return top, left, ch, cw, _uniform(key, 42) < params[P_FLIP]
    # Fallback: the whole image, clamped to the ratio range, centred.
    in_ratio = w / h
    rmin = math.exp(params[P_LOGR_MIN])
    rmax = math.exp(params[P_LOGR_MAX])
    if in_ratio < rmin:
        cw = w
        ch = min(h, np.int64(round(cw / rmin)))
    elif in_ratio > rmax:
        ch = h
        cw = min(w, np.int64(round(ch * rmax)))
    else:
        cw = w
        ch = h
    return (h - ch) // 2, (w - cw) // 2, ch, cw, _uniform(key, 42) < params[P_FLIP]


@njit(cache=True)
def center_crop(height, width):
    """(top, left, crop_h, crop_w): the centred square of side 0.875 x short side (then resized to the view size)."""
    h = np.int64(height)
    w = np.int64(width)
    c = max(1, np.int64(EVAL_CROP_RATIO * min(h, w)))
    return (h - c) // 2, (w - c) // 2, c, c


@njit(cache=True)
def crop_params(height, width, params, seed, epoch, index, view, train):
    """(top, left, crop_h, crop_w, flip) of one view of sample ``index``: random-resized crop (train) or centre crop."""
    if train:
        t, l, ch, cw, f = random_resized_crop(height, width, params, sample_key(seed, epoch, index, view))
        return t, l, ch, cw, f
    t, l, ch, cw = center_crop(height, width)
    return t, l, ch, cw, False


@njit(cache=True)
def sample_many(heights, widths, params, seed, epoch, view):
    """Crop params of samples ``0..n-1`` for one view: (n, 5) int64 (top, left, h, w, flip). For tests and torch workers."""
    n = heights.shape[0]
    out = np.empty((n, 5), np.int64)
    for i in range(n):
        t, l, ch, cw, f = random_resized_crop(heights[i], widths[i], params, sample_key(seed, epoch, i, view))
        out[i, 0] = t
        out[i, 1] = l
        out[i, 2] = ch
        out[i, 3] = cw
        out[i, 4] = 1 if f else 0
    return out


def view_params(views) -> np.ndarray:
    """(V, 5) float64 rows (scale_min, scale_max, log ratio_min, log ratio_max, flip_p) from ``ViewSpec``s."""
    rows = []
    for v in views:
        why = v.problem()  # the config checks this too, naming the key; here for views built in code
        if why:
            raise ValueError(f"view {why}")
        rows.append([v.scale_min, v.scale_max, math.log(v.ratio_min), math.log(v.ratio_max), v.flip_p])
    return np.ascontiguousarray(np.array(rows, dtype=np.float64).reshape(-1, 5))


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool, drop_last: bool) -> np.ndarray:
    """This rank's sample indices for ``epoch`` (uint64).

    Shuffled: one permutation of all ``n`` samples seeded by (seed, epoch), cut into
    ``world_size`` disjoint equal shards (the ``n % world_size`` left-over samples
    of the permutation are dropped when ``drop_last``, else shards differ by one).
    Not shuffled: contiguous shards in dataset order.
    """
    idx = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if drop_last:
        per = n // world_size
        mine = idx[rank * per:(rank + 1) * per]
    else:
        mine = np.array_split(idx, world_size)[rank]
    return mine.astype(np.uint64)


def shard_size(n: int, rank: int, world_size: int, drop_last: bool) -> int:
    """``len(epoch_order(...))`` without building the permutation."""
    if drop_last:
        return n // world_size
    return n // world_size + (1 if rank < n % world_size else 0)


class EpochContract:
    """The epoch half of the loader contract (a mixin, no state of its own); ``pipelines.loader.LoaderBase``,
    the base of every back-end, builds on it.

    Needs ``num_samples, seed, rank, world_size, train, drop_last, batch_size, epoch, views, sizes``.
    """

    stride = 1  # > 1: the loader reads samples 0, stride, 2 * stride, ... only (``LoaderBase.set_stride``)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch`` (see :func:`epoch_order`); with ``stride`` k, of every
        k-th sample (a subset spread over the whole dataset, so over every class of a sorted folder)."""
        k = self.stride
        order = epoch_order(-(-self.num_samples // k), self.seed, epoch, self.rank, self.world_size, self.train,
                            self.drop_last)
        return order * np.uint64(k) if k > 1 else order

    @property
    def rank_samples(self) -> int:
        """The samples this rank reads in one pass: its shard of every ``stride``-th sample."""
        return shard_size(-(-self.num_samples // self.stride), self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        n = self.rank_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, global_size: int | None = None) -> None:
        """Shuffle seed = f(seed, epoch); ``global_size`` resizes every global view from now on."""
        self.epoch = int(epoch)
        if global_size is not None:
            vs = self.views if self.train else self.views[:1]
            self.sizes = [s if v.local else int(global_size) for s, v in zip(self.sizes, vs)]
