"""The batched photometric stage against torchvision's functional ops, same parameters."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fastssl.pipelines.augment import Augmenter, adjust_hue, apply_view, blur_kernel_size, gaussian_blur, sample_params
from fastssl.pipelines.recipes import ViewSpec, preset
from conftest import torchvision_view, every_op_params


@pytest.fixture(scope="module")
def photos():
    skimage_data = pytest.importorskip("skimage.data")
    imgs = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(i[:256, :256])).permute(2, 0, 1) for i in imgs])
    return TF.resize(x, [64, 64], antialias=True).float() / 255  # (3, 3, 64, 64) in [0, 1]


def test_hue_matches_torchvision(photos):
    hue = torch.tensor([-0.1, 0.05, 0.3])
    ours = adjust_hue(photos, hue)
    ref = torch.stack([TF.adjust_hue(photos[i], float(hue[i])) for i in range(3)])
    assert (ours - ref).abs().max() < 1e-5


def test_blur_matches_torchvision(photos):
    sigma = torch.tensor([0.3, 1.0, 2.0])
    ours = gaussian_blur(photos, sigma, 7)
    ref = torch.stack([TF.gaussian_blur(photos[i], [7, 7], [float(sigma[i])] * 2) for i in range(3)])
    assert (ours - ref).abs().max() < 1e-5
    assert blur_kernel_size(224) == 23


def test_full_view_matches_torchvision_sequence(photos):
    p = every_op_params()
    ours = apply_view(photos, p)
    k = blur_kernel_size(64)
    for i in range(photos.shape[0]):
        assert (ours[i] - torchvision_view(photos[i], p, i, k)).abs().max() < 2e-5, i


def test_sampled_probabilities_and_ranges_follow_the_spec():
    spec = ViewSpec(jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.1, brightness=0.4, hue=0.1)
    n = 20000
    p = sample_params(spec, n, torch.Generator().manual_seed(0), "cpu")
    for key, prob in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.1)):
        sd = (prob * (1 - prob) / n) ** 0.5
        assert abs(p[key].float().mean().item() - prob) < 4 * sd, key
    assert p["brightness"].min() >= 0.6 and p["brightness"].max() <= 1.4
    assert p["hue"].abs().max() <= 0.1 and p["hue"].std() > 0.05
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0


def test_augmenter_shapes_seeding_and_normalisation():
    views = preset("dino")
    for v in views:
        v.size = 16 if v.local else 32
    crops = [torch.randint(0, 256, (4, v.size, v.size, 3), dtype=torch.uint8) for v in views]
    aug = Augmenter(views, "cpu", seed=3)
    a, b, c = aug(crops, step=5), aug(crops, step=5), aug(crops, step=6)
    assert len(a) == len(views)
    for x, v in zip(a, views):
        assert x.shape == (4, 3, v.size, v.size) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    plain = aug.normalize_only(crops[:1])[0]
    ref = (crops[0].permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert (plain - ref).abs().max() < 1e-5
