"""The OpenCV uint8 photometric path (the CPU fallback) against torchvision's functional ops.

The reference is torchvision's float op on x / 255 (the exact maths, as the torch path is
tested), scaled back to grey levels. Tolerances are in grey levels (0-255): uint8 results
are rounded after every op, and OpenCV's full-range HSV quantises hue to 1/256 of a turn.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

cv2 = pytest.importorskip("cv2")

from fastssl.pipelines.augment import Augmenter, blur_kernel_size  # noqa: E402
from fastssl.pipelines.augment_cpu import CpuPhotometric, augment_image  # noqa: E402
from fastssl.pipelines.recipes import ViewSpec  # noqa: E402
from conftest import torchvision_view, every_op_params  # noqa: E402

OFF = {"jitter": False, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0,
       "gray": False, "blur": False, "sigma": 1.0, "solarize": False}


@pytest.fixture(scope="module")
def photos():
    """Three real photos, uint8 (3, 64, 64, 3) NHWC."""
    skimage_data = pytest.importorskip("skimage.data")
    imgs = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    return np.stack([cv2.resize(np.ascontiguousarray(i[:256, :256]), (64, 64), interpolation=cv2.INTER_AREA)
                     for i in imgs])


def tv(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 255  # float (3, H, W) in [0, 1]


def diff(ours: np.ndarray, ref: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference in grey levels between a uint8 HWC result and a float CHW reference."""
    d = (torch.from_numpy(ours).permute(2, 0, 1).float() - ref * 255).abs()
    return float(d.max()), float(d.mean())


@pytest.mark.parametrize("op,value,tv_fn,max_tol,mean_tol", [
    ("brightness", 0.6, TF.adjust_brightness, 1, 0.5),
    ("brightness", 1.5, TF.adjust_brightness, 1, 0.5),
    ("contrast", 0.5, TF.adjust_contrast, 2, 0.7),
    ("contrast", 1.6, TF.adjust_contrast, 2, 0.7),
    ("saturation", 0.3, TF.adjust_saturation, 2, 0.7),
    ("saturation", 1.8, TF.adjust_saturation, 2, 0.7),
    ("hue", 0.1, TF.adjust_hue, 8, 1.0),
    ("hue", -0.27, TF.adjust_hue, 8, 1.0),
])
def test_each_jitter_op_matches_torchvision_uint8(photos, op, value, tv_fn, max_tol, mean_tol):
    for img in photos:
        p = {**OFF, "jitter": True, op: value}
        ours = augment_image(img, p, 7)
        m, mean = diff(ours, tv_fn(tv(img), value))
        assert m <= max_tol and mean <= mean_tol, (op, value, m, mean)


def test_gray_blur_solarize_match_torchvision_uint8(photos):
    k = blur_kernel_size(64)
    for img in photos:
        m, _ = diff(augment_image(img, {**OFF, "gray": True}, k), TF.rgb_to_grayscale(tv(img), num_output_channels=3))
        assert m <= 1
        for sigma in (0.3, 1.0, 2.0):
            for ks in (k, 23):  # 23: SimCLR's kernel at 224 px, which the cv2 path cuts at 4 sigma
                m, mean = diff(augment_image(img, {**OFF, "blur": True, "sigma": sigma}, ks),
                               TF.gaussian_blur(tv(img), [ks, ks], [sigma, sigma]))
                assert m <= 2 and mean <= 0.6, (sigma, ks, m, mean)
        m, _ = diff(augment_image(img, {**OFF, "solarize": True}, k), TF.solarize(tv(img), 0.5))
        assert m < 1e-3


def test_full_sequence_matches_torchvision_in_one_batch(photos):
    params = every_op_params()
    k = blur_kernel_size(64)
    ours = CpuPhotometric(threads=2)(photos, params, k)
    assert ours.shape == photos.shape and ours.dtype == np.uint8
    for i in range(len(photos)):
        m, mean = diff(ours[i], torchvision_view(tv(photos[i]), params, i, k))
        assert m <= 8 and mean <= 1.5, (i, m, mean)


def test_augmenter_cv2_and_torch_paths_agree_with_the_same_seed(photos):
    views = [ViewSpec(jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.2, brightness=0.4, contrast=0.4,
                      saturation=0.2, hue=0.1)]
    crops = [torch.from_numpy(np.concatenate([photos] * 6))]  # (18, 64, 64, 3)
    a = Augmenter(views, "cpu", seed=3, impl="cv2")
    t = Augmenter(views, "cpu", seed=3, impl="torch")
    assert a.impl == "cv2" and t.impl == "torch"
    ya, yt = a(crops, step=5)[0], t(crops, step=5)[0]
    assert ya.shape == yt.shape == (18, 3, 64, 64) and ya.dtype == torch.float32
    assert ya.is_contiguous(memory_format=torch.channels_last)
    # Same parameters from the same seed: outputs agree up to uint8 rounding (normalised units: 1/255/0.225 ~ 0.017).
    d = (ya - yt).abs()
    assert float(d.mean()) < 0.02 and float(d.flatten(1).max(1).values.median()) < 0.2
    # Another step draws other parameters.
    assert not torch.equal(a(crops, step=6)[0], ya)


def test_auto_picks_cv2_on_cpu_and_cv2_refuses_cuda():
    views = [ViewSpec()]
    assert Augmenter(views, "cpu").impl == "cv2"
    with pytest.raises(ValueError, match="CPU only"):
        Augmenter(views, "cuda", impl="cv2")


def test_normalising_lut_equals_affine_and_folds_solarise(photos):
    """The float output (one LUT per image, solarise folded in) is ``(augment_image(x) / 255 - mean) / std``."""
    params = every_op_params()
    k = blur_kernel_size(64)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ph = CpuPhotometric(threads=2)
    got = ph(photos, params, k, mean, std)
    u8 = ph(photos, params, k)
    want = (u8.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-5
    assert bool(params["solarize"].any()) and not bool(params["solarize"].all())  # both tables are used


def test_blur_is_opencv_gaussian_blur_within_one_grey_level(photos):
    """The separable float filter (the fast path) against ``cv2.GaussianBlur`` (the bit-exact one), same taps."""
    import math

    for sigma in (0.1, 0.6, 1.3, 2.0):
        k = 2 * math.ceil(4.0 * sigma) + 1
        for img in photos:
            ours = augment_image(img, {**OFF, "blur": True, "sigma": sigma}, 99)
            ref = cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
            assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1, sigma


def test_output_buffers_are_reused_only_once_released(photos):
    """A batch the caller still holds is never overwritten; a dropped one is written again (no fresh pages)."""
    params = every_op_params()
    k = blur_kernel_size(64)
    ph = CpuPhotometric(threads=2)
    held = torch.from_numpy(ph(photos, params, k, (0.5,) * 3, (0.25,) * 3)).permute(0, 3, 1, 2)  # as Augmenter keeps it
    before = held.clone()
    second = ph(photos, params, k, (0.5,) * 3, (0.25,) * 3)
    assert second.ctypes.data != held.data_ptr() and torch.equal(held, before)
    ptr = second.ctypes.data
    del second
    third = ph(photos, params, k, (0.5,) * 3, (0.25,) * 3)
    assert third.ctypes.data == ptr and np.array_equal(third, before.permute(0, 2, 3, 1).numpy())
    u8 = ph(photos, params, k)  # another dtype: its own buffer
    assert u8.dtype == np.uint8 and u8.ctypes.data not in (ptr, held.data_ptr())
