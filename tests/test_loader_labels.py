"""Batches stay valid after the next one is drawn (ffcv reuses its memory slots)."""
import pytest
import torch

from fastssl.pipelines.loader import build_loader
from fastssl.pipelines.recipes import preset


@pytest.mark.parametrize("train", [False, True])
def test_labels_kept_across_batches_match_the_indices(demo_data, train):
    views = preset("simclr")
    for v in views:
        v.size = 16
    ld = build_loader(None, views, str(demo_data / "train.beton"), 32, "cpu", train=train, drop_last=False,
                      backend="ffcv", workers=1)
    ld.set_epoch(0)
    kept = [(b.labels, b.indices) for b in ld]  # keep every batch, as feature extraction does
    labels = torch.cat([l for l, _ in kept])
    indices = torch.cat([i for _, i in kept])
    assert len(labels) == 200
    assert torch.equal(labels, indices % 10)  # the synthetic data's label of image i is i % classes
