"""``pipelines.resize.area_resize`` against its reference, OpenCV's INTER_AREA, on shrinking crops."""
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from fastssl.pipelines.resize import area_resize  # noqa: E402


@pytest.mark.parametrize("crop,out", [((60, 70), (24, 24)), ((96, 96), (96, 96)), ((97, 131), (32, 40)),
                                      ((250, 300), (224, 224)), ((300, 237), (96, 96)), ((350, 400), (7, 5)),
                                      ((64, 64), (32, 32))])
def test_area_resize_matches_opencv_inter_area(crop, out):
    rng = np.random.default_rng(sum(crop) + sum(out))
    img = rng.integers(0, 256, (360, 410, 3), dtype=np.uint8)
    img[100:200, 50:300] = (250, 10, 128)                                  # flat block: sharp edges
    top, left = 3, 7
    ch, cw = crop
    res = np.empty((*out, 3), np.uint8)
    area_resize(img, top, left, ch, cw, res, np.empty(out[0] * cw * 3, np.float32))
    ref = cv2.resize(img[top:top + ch, left:left + cw], (out[1], out[0]), interpolation=cv2.INTER_AREA)
    d = np.abs(res.astype(int) - ref)
    assert d.max() <= 1 and d.mean() < 0.1, (d.max(), d.mean())


def test_area_resize_of_a_constant_is_the_constant_and_identity_is_exact():
    img = np.full((50, 60, 3), 77, np.uint8)
    out = np.empty((13, 17, 3), np.uint8)
    area_resize(img, 0, 0, 50, 60, out, np.empty(13 * 60 * 3, np.float32))
    assert (out == 77).all()
    rnd = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    same = np.empty((20, 30, 3), np.uint8)
    area_resize(rnd, 0, 0, 20, 30, same, np.empty(20 * 30 * 3, np.float32))
    assert np.array_equal(same, rnd)


def test_area_resize_flip_mirrors_the_columns():
    img = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    plain, mirrored = np.empty((40, 50, 3), np.uint8), np.empty((40, 50, 3), np.uint8)
    tmp = np.empty(40 * 110 * 3, np.float32)
    area_resize(img, 5, 4, 80, 110, plain, tmp)
    area_resize(img, 5, 4, 80, 110, mirrored, tmp, True)
    assert np.array_equal(mirrored, plain[:, ::-1])
    assert not np.array_equal(mirrored, plain)
