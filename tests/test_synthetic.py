"""The built-in dataset: deterministic, every class present, classes not separable by colour."""
import numpy as np
import pytest

from fastssl.pipelines.synthetic import CLASSES, SyntheticImages
from fastssl.registry import Registry


def test_deterministic_and_split_dependent():
    a, b = SyntheticImages(10, 3, 32, seed=1), SyntheticImages(10, 3, 32, seed=1)
    assert all(np.array_equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert not np.array_equal(a[0][0], SyntheticImages(10, 3, 32, seed=2)[0][0])
    assert not np.array_equal(a[0][0], SyntheticImages(10, 3, 32, seed=1, split="val")[0][0])


def test_shapes_labels_and_any_resolution():
    ds = SyntheticImages(4, 5, (35, 40))
    img, label = ds[7]
    assert img.shape == (35, 40, 3) and img.dtype == np.uint8 and label == 7 % 4
    assert np.bincount([ds[i][1] for i in range(len(ds))]).tolist() == [5] * 4
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticImages(len(CLASSES) + 1)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_mean_colour_does_not_predict_the_class():
    # Classes are shapes: a nearest-centroid classifier on mean RGB stays near chance.
    ds = SyntheticImages(10, 40, 32)
    x = np.stack([ds[i][0].reshape(-1, 3).mean(0) for i in range(len(ds))])
    y = np.array([ds[i][1] for i in range(len(ds))])
    # Labels cycle (label = i % 10): split by the instance number within a class, so both halves hold every class.
    tr = (np.arange(len(ds)) // 10) % 2 == 0
    te = ~tr
    assert set(y[tr]) == set(y[te]) == set(range(10))
    cent = np.stack([x[tr & (y == c)].mean(0) for c in range(10)])
    pred = np.argmin(((x[te][:, None] - cent[None]) ** 2).sum(-1), 1)
    assert (pred == y[te]).mean() < 0.25


def test_registry_refuses_overwrite_and_names_closest():
    r = Registry("thing")
    r.register("alpha")(int)
    with pytest.raises(KeyError, match="already registered"):
        r.register("alpha")(float)
    with pytest.raises(KeyError, match="did you mean 'alpha'"):
        r.get("alpah")
