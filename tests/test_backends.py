"""Every back-end under the same contract: views, labels, indices, seeds, decode-once, shards, resolution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import has_module as _has, small_views
from fastssl.pipelines.loader import build_loader

GLOBAL, LOCAL = 32, 16


def _views(recipe):
    return small_views(recipe, GLOBAL, LOCAL)


def _src(demo_data, backend, split="train"):
    return str(demo_data / (f"{split}.beton" if backend == "ffcv" else split))


BACKENDS = [pytest.param("ffcv", marks=pytest.mark.skipif(not _has("ffcv"), reason="ffcv missing")),
            "torch",
            pytest.param("dali", marks=pytest.mark.skipif(not _has("nvidia.dali"), reason="DALI missing"))]


def _loader(demo_data, backend, recipe="simclr", bs=16, **kw):
    kw.setdefault("workers", 1)
    return build_loader(None, _views(recipe), _src(demo_data, backend, kw.pop("split", "train")), bs, "cpu",
                        backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", ["simclr", pytest.param("byol", marks=pytest.mark.slow), "dino",
                                    pytest.param("mae", marks=pytest.mark.slow)])
def test_views_shapes_dtypes_devices(demo_data, backend, recipe):
    L = _loader(demo_data, backend, recipe)
    assert L.num_samples == 200 and L.num_classes == 10 and len(L) == 200 // 16
    batches = list(L)
    assert len(batches) == len(L)
    spec = _views(recipe)
    for b in batches[:2]:
        assert len(b.views) == len(spec)
        for v, s in zip(b.views, spec):
            assert v.shape == (16, 3, s.size, s.size) and v.dtype == torch.float32 and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(v).all() and v.std() > 0.1          # normalised pixels, not zeros
        assert b.labels.shape == (16,) and b.labels.dtype == torch.int64 and b.indices.shape == (16,)
        assert ((b.labels >= 0) & (b.labels < 10)).all()
    idx = torch.cat([b.indices for b in batches])
    assert len(idx.unique()) == len(idx)                                  # no repeats within an epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_crops_seeded_reproducible(demo_data, backend):
    a = [b.views for b in _loader(demo_data, backend, "dino", photometric=False, seed=3)]
    b = [b.views for b in _loader(demo_data, backend, "dino", photometric=False, seed=3)]
    c = [b.views for b in _loader(demo_data, backend, "dino", photometric=False, seed=4)]
    assert a[0][0].dtype == torch.uint8 and a[0][0].shape == (16, GLOBAL, GLOBAL, 3)
    assert a[0][2].shape == (16, LOCAL, LOCAL, 3)
    assert all(torch.equal(x, y) for va, vb in zip(a, b) for x, y in zip(va, vb))
    assert not all(torch.equal(x, y) for va, vc in zip(a, c) for x, y in zip(va, vc))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapped_finishing_gives_the_same_batches(demo_data, backend):
    """On the CPU the photometric stage of batch b+1 runs while batch b is used. The batches are the
    same as finishing in next(), over a whole epoch and when a pass stops early (ffcv reuses its raw
    slots: a raw batch must be finished before the next is taken)."""
    seq = _loader(demo_data, backend, "dino", seed=5)
    seq.overlap_finish = False
    ovl = _loader(demo_data, backend, "dino", seed=5)
    assert ovl.overlap_finish is None  # default: on, since the finisher runs on the CPU
    a, b = list(seq), list(ovl)
    assert len(a) == len(b) == len(seq)
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    for stop in (1, 3):  # an abandoned pass, then a full one from the start of the same epoch
        for i, _ in enumerate(ovl):
            if i == stop:
                break
        ovl.set_epoch(0)
        again = list(ovl)
        assert all(torch.equal(u, v) for x, y in zip(a, again) for u, v in zip(x.views, y.views))


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_shuffle_and_progressive_resolution(demo_data, backend):
    L = _loader(demo_data, backend, "dino", photometric=False)
    e0 = torch.cat([b.indices for b in L])
    L.set_epoch(1, global_size=24)
    bs = list(L)
    assert [tuple(v.shape[1:3]) for v in bs[0].views] == [(24, 24)] * 2 + [(LOCAL, LOCAL)] * 6
    e1 = torch.cat([b.indices for b in bs])
    assert len(e0) == len(e1) == 192 and not torch.equal(e0, e1)             # reshuffled, same count


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_sequential_centre_crop(demo_data, backend):
    E = _loader(demo_data, backend, "dino", bs=32, split="val", train=False)
    bs = list(E)
    assert len(bs) == len(E) == 4                                          # 100 images, no drop_last
    idx = torch.cat([b.indices for b in bs])
    assert idx.tolist() == list(range(100))
    assert all(len(b.views) == 1 and b.views[0].shape[1:] == (3, GLOBAL, GLOBAL) for b in bs)
    again = list(E)
    assert all(torch.equal(x.views[0], y.views[0]) for x, y in zip(bs, again))   # deterministic features


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_stride_reads_every_kth_sample(demo_data, backend):
    """A strided eval bank (eval.knn_stride): samples 0, k, 2k, ... with their own labels and crops; back to all."""
    E = _loader(demo_data, backend, "simclr", bs=8, split="val", train=False)
    full = list(E)
    E.set_stride(3)
    part = list(E)
    assert len(part) == len(E) == 5                                        # 34 of 100 images, batches of 8
    idx = torch.cat([b.indices for b in part])
    assert idx.tolist() == list(range(0, 100, 3))
    by_index = {int(i): (v, lab) for b in full for i, v, lab in zip(b.indices, b.views[0], b.labels)}
    for b in part:
        for i, v, lab in zip(b.indices, b.views[0], b.labels):
            assert torch.equal(v, by_index[int(i)][0]) and lab == by_index[int(i)][1]
    E.set_stride(1)
    assert torch.cat([b.indices for b in E]).tolist() == list(range(100))
    with pytest.raises(ValueError, match="stride"):
        E.set_stride(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_disjoint_shards(demo_data, backend):
    shards = [torch.cat([b.indices for b in _loader(demo_data, backend, "simclr", bs=8, photometric=False,
                                                  rank=r, world_size=2, seed=1)]) for r in range(2)]
    a, b = set(shards[0].tolist()), set(shards[1].tolist())
    assert not a & b and len(a) == len(b) == 96                            # 100 per rank, 12 full batches of 8


def test_ffcv_decodes_each_image_once_per_epoch(demo_data):
    L = _loader(demo_data, "ffcv", "dino", photometric=False)               # 8 views per image
    idx = torch.cat([b.indices for b in L]).numpy()
    assert (L.counts[idx] == 1).all() and L.counts.sum() == len(idx)
    list(L)
    assert (L.counts[idx] == 2).all()


def test_ffcv_labels_match_indices(demo_data):
    L = _loader(demo_data, "ffcv", "simclr", photometric=False)
    for b in L:
        assert torch.equal(b.labels, b.indices % 10)                       # SyntheticImages: label = i % classes


@pytest.mark.skipif(not _has("ffcv"), reason="ffcv missing")
def test_ffcv_memory_managers_give_the_same_views(demo_data):
    """The decode kernel takes each sample's bytes from ffcv's reader: process cache and OS cache alike."""
    got = []
    for in_memory in (True, False):
        L = _loader(demo_data, "ffcv", "dino", photometric=False, in_memory=in_memory, workers=2, seed=3)
        got.append([[v.clone() for v in b.views] for b in L])
    assert len(got[0]) == len(got[1]) > 1
    for a, b in zip(*got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif(not _has("ffcv"), reason="ffcv missing")
def test_ffcv_decode_kernel_is_cached_on_disk(demo_data):
    """numba must be able to cache the kernel (no ctypes pointers in it), or every loader compiles it again."""
    import os
    import warnings

    from numba.core.errors import NumbaWarning

    from fastssl.pipelines import ffcv_decode

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumbaWarning)
        next(iter(_loader(demo_data, "ffcv", "simclr", photometric=False)))             # one worker: serial kernel
        next(iter(_loader(demo_data, "ffcv", "simclr", photometric=False, train=False)))
    assert not [w for w in caught if "cache" in str(w.message).lower()], [str(w.message) for w in caught]
    # One compiled kernel for train and eval loaders alike: options that reached it as literals made one each.
    assert len(ffcv_decode.decode_batch_serial.signatures) == 1, ffcv_decode.decode_batch_serial.signatures
    cache_dir = ffcv_decode.decode_batch._cache._cache_path
    assert any(f.startswith("ffcv_decode.decode_batch_serial") and f.endswith(".nbi") for f in os.listdir(cache_dir))


@pytest.mark.skipif(not _has("ffcv"), reason="ffcv missing")
def test_ffcv_import_builds_no_numba_typed_dict():
    """ffcv's IMAGE_MODES is a plain dict (its typed dict cost 4-5 s of compilation per process); numba's
    own ``Dict`` is back in place afterwards. A fresh interpreter: other tests may have built typed dicts."""
    import subprocess
    import sys

    code = ("from fastssl.pipelines.ffcv_compat import import_ffcv; import_ffcv()\n"
            "from ffcv.fields.rgb_image import IMAGE_MODES\n"
            "import numba.typed, numba.typed.typeddict as td\n"
            "assert dict(IMAGE_MODES) == {'jpg': 0, 'raw': 1}, IMAGE_MODES\n"
            "assert numba.typed.Dict is td.Dict\n"
            "assert not td._make_dict.signatures, 'a typed dict was compiled'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_torch_decodes_each_image_once(demo_data, monkeypatch):
    from PIL import Image

    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: (opened.append(str(p)), real(p, *a, **k))[1])
    L = _loader(demo_data, "torch", "dino", photometric=False, workers=0)
    n = sum(len(b.indices) for b in L)
    assert len(opened) == n == len(set(opened))


def test_torch_gpu_path_matches_cpu_path(demo_data):
    """The CUDA code path (batched decode_jpeg + roi_align crops), run on the CPU, agrees with the PIL path."""
    from fastssl.pipelines.torch_backend import TorchLoader

    v = _views("dino")
    cpu = next(iter(TorchLoader(_src(demo_data, "torch"), v, 16, "cpu", workers=0, gpu_decode=False)))
    gpu = next(iter(TorchLoader(_src(demo_data, "torch"), v, 16, "cpu", workers=0, gpu_decode=True)))
    assert torch.equal(cpu.indices, gpu.indices)
    for a, b in zip(cpu.views, gpu.views):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
        assert (a.float() - b.float()).abs().mean() < 6.0                 # resampling filters differ slightly
    other = next(iter(TorchLoader(_src(demo_data, "torch"), v, 16, "cpu", workers=0, gpu_decode=True, seed=9)))
    assert (other.views[0].float() - cpu.views[0].float()).abs().mean() > 6.0   # the bound can fail


def _crop_one_by_one(images, geo, sizes):
    """The per-image reference: one roi_align per image and view size, no padding."""
    from torchvision.ops import roi_align

    out = [torch.empty(len(images), s, s, 3, dtype=torch.uint8) for s in sizes]
    for b, im in enumerate(images):
        for v, s in enumerate(sizes):
            t, l, ch, cw, f = geo[b, v].tolist()
            box = torch.tensor([[0.0, l, t, l + cw, t + ch]])
            c = roi_align(im[None].float(), box, (s, s), 1.0, -1, aligned=True)[0]
            c = c.flip(-1) if f else c
            out[v][b] = c.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return out


@pytest.mark.parametrize("budget", [1 << 30, 40_000])   # one padded chunk; several (small budget)
def test_batched_crop_views_equal_per_image_crops(budget):
    """``crop_views`` pads images of different sizes into one roi_align call per view size; every view
    equals cropping its image alone, also crops that touch the right/bottom edge and tiny crops that
    are upsampled (samples past the last pixel centre), where zero padding would darken the edge."""
    from fastssl.pipelines.torch_backend import crop_views

    g = torch.Generator().manual_seed(0)
    hw = [(37, 50), (64, 41), (20, 90), (81, 81), (33, 33)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in hw]
    sizes = [24, 24, 12]
    geo = torch.zeros(len(hw), len(sizes), 5, dtype=torch.int64)
    for b, (h, w) in enumerate(hw):
        geo[b, 0] = torch.tensor([h - 5, w - 4, 5, 4, 1])              # tiny, bottom-right corner, flipped
        geo[b, 1] = torch.tensor([0, 0, h, w, 0])                      # the whole image
        geo[b, 2] = torch.tensor([h // 3, w // 4, h - h // 3, w - w // 4, b % 2])  # to the edges
    got = crop_views(images, geo, sizes, budget_bytes=budget)
    ref = _crop_one_by_one(images, geo, sizes)
    for v, (a, r) in enumerate(zip(got, ref)):
        diff = (a.int() - r.int()).abs()
        assert diff.max() <= 1, (v, diff.max())          # fp32 rounding of the padded blend: at most 1 level
        assert (diff == 0).float().mean() > 0.99, v
    zero_pad = [torch.nn.functional.pad(im, (0, 1, 0, 1)) for im in images]   # the bound can fail:
    bad = _crop_one_by_one(zero_pad, geo, sizes)[0]                             # edge blended with 0
    assert (bad.int() - ref[0].int()).abs().max() > 20


@pytest.mark.cuda
def test_torch_gpu_decode_on_cuda(jpeg_data):
    """nvJPEG decode + roi_align crops: uint8 views on the GPU, close to the CPU path's crops of the same samples."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fastssl.pipelines.torch_backend import TorchLoader

    G = TorchLoader(_src(jpeg_data, "torch"), _views("dino"), 16, "cuda", workers=1)
    b = next(iter(G))
    assert G.gpu_decode and all(v.device.type == "cuda" and v.dtype == torch.uint8 for v in b.views)
    full = build_loader(None, _views("dino"), _src(jpeg_data, "torch"), 16, "cuda", backend="torch", workers=1)
    v = next(iter(full)).views
    assert all(x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all() for x in v)


def test_bad_backend_and_path_errors(demo_data):
    with pytest.raises(ValueError, match="unknown data back-end"):
        _loader(demo_data, "ffvc")
    with pytest.raises(ValueError, match="fastssl-prepare"):
        build_loader(None, _views("simclr"), str(demo_data / "train"), 8, "cpu", backend="ffcv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(None, _views("simclr"), str(demo_data / "nope.beton"), 8, "cpu")


@pytest.mark.skipif(not _has("ffcv"), reason="ffcv missing")
def test_ffcv_crops_equal_a_reference_crop_and_resize(tmp_path):
    """Raw-stored images: each view is OpenCV INTER_AREA of the sampled crop (+ flip), to a grey level; a crop at least
    2x its output is resized from the image at half resolution (exactly that two-stage reference, and close
    to the direct resize: the halved crop box moves by at most one pixel)."""
    import cv2

    from fastssl.pipelines.crops import random_resized_crop, sample_key, view_params
    from fastssl.pipelines.ffcv_backend import FFCVLoader
    from fastssl.pipelines.prepare import WriteSettings, prepare_dataset, read_image
    from fastssl.pipelines.recipes import ViewSpec
    from fastssl.pipelines.synthetic import SyntheticImages

    ds = SyntheticImages(num_classes=4, per_class=6, size=(60, 70), seed=0)
    beton = tmp_path / "raw.beton"
    prepare_dataset(ds, beton, {"t": 1}, list(ds.classes), WriteSettings(write_mode="raw", workers=1), quiet=True)
    views = [ViewSpec(size=24, scale_min=0.6, scale_max=1.0),      # crop side >= 46: mostly >= 2 x 24, half-res
             ViewSpec(size=40, scale_min=0.2, scale_max=1.0)]      # crop side < 80: full-res path
    L = FFCVLoader(str(beton), views, 8, "cpu", seed=5, workers=1, train=True)
    params = view_params(views)
    area = cv2.INTER_AREA
    seen = {"half": 0, "full": 0}
    for b in L:
        for j, i in enumerate(b.indices.tolist()):
            img = read_image(beton, i)
            h, w = img.shape[:2]
            hh, hw = h // 2, w // 2
            half = cv2.resize(img[:2 * hh, :2 * hw], (hw, hh), interpolation=area)
            for v, spec in enumerate(views):
                top, left, ch, cw, flip = random_resized_crop(h, w, params[v], np.uint64(sample_key(5, 0, i, v)))
                s = spec.size
                direct = cv2.resize(img[top:top + ch, left:left + cw], (s, s), interpolation=area)
                if min(ch, cw) >= 2 * s:
                    seen["half"] += 1
                    t2, l2 = top // 2, left // 2
                    ref = cv2.resize(half[t2:(top + ch) // 2, l2:(left + cw) // 2], (s, s), interpolation=area)
                    # The same picture: a box off by more than a pixel or a flip gives 30-60 on this data.
                    assert np.abs(ref.astype(int) - direct).mean() < 16.0
                else:
                    seen["full"] += 1
                    ref = direct
                ref = ref[:, ::-1] if flip else ref
                # Our area resize (pipelines/resize.py) is OpenCV's INTER_AREA maths in another
                # summation order (float32): equal up to one grey level, on a few per cent of the values.
                d = np.abs(b.views[v][j].numpy().astype(int) - ref)
                assert d.max() <= 1 and d.mean() < 0.1, (i, v, top, left, ch, cw, flip, d.max(), d.mean())
    assert seen["half"] > 5 and seen["full"] > 5, seen


def test_forkserver_workers_give_the_forked_workers_batches(demo_data):
    """A CUDA parent starts its workers from a forkserver (a forked child cannot free CUDA memory): the
    dataset travels pickled (packed items) and yields the batches fork's workers yield, epoch by epoch."""
    from fastssl.pipelines.torch_backend import TorchLoader

    def epochs(start):
        L = TorchLoader(_src(demo_data, "torch"), _views("simclr"), 16, "cpu", workers=2, gpu_decode=True)
        L.worker_start = start
        out = []
        for epoch in (0, 1):
            L.set_epoch(epoch)
            out.append(list(L))
        return out

    forked, served = epochs("fork"), epochs("forkserver")
    assert [len(e) for e in served] == [len(e) for e in forked] and len(forked[0]) > 1
    for ea, eb in zip(forked, served):
        for a, b in zip(ea, eb):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    assert not torch.equal(forked[0][0].indices, forked[1][0].indices)  # the epoch reached the workers


def test_worker_start_method_auto_and_packed_items():
    import multiprocessing as mp
    import pickle

    from fastssl.pipelines.torch_backend import FolderViews, worker_start_method

    assert worker_start_method("cpu").get_start_method() == "fork"       # no CUDA in this process
    assert worker_start_method("cuda").get_start_method() == "forkserver"  # a CUDA device: never fork
    assert worker_start_method("cpu", "spawn") is mp.get_context("spawn")
    with pytest.raises(ValueError, match="data.worker_start"):
        worker_start_method("cpu", "thread")
    items = [(f"/d/c{k % 3}/{k}.jpg", k % 3) for k in range(50)]
    ds = FolderViews(items, [16], np.zeros((1, 8)), 0, True)
    ds.epoch, ds.bad = 3, {4: "truncated"}
    back = pickle.loads(pickle.dumps(ds))
    assert back.items == items and back.epoch == 3 and back.bad == {4: "truncated"}
    assert not hasattr(back, "_packed")
    assert pickle.loads(pickle.dumps(FolderViews([], [16], np.zeros((1, 8)), 0, True))).items == []


def test_torch_backend_crops_exif_rotated_jpegs_as_displayed(tmp_path):
    """A JPEG stored sideways with an EXIF orientation is cropped as displayed (as fastssl-prepare, and so
    the ffcv back-end, store it) on the CPU path and on the GPU path (whose decoders ignore the tag)."""
    from PIL import Image

    from fastssl.pipelines.recipes import preset
    from fastssl.pipelines.torch_backend import TorchLoader

    shown = np.zeros((64, 32, 3), np.uint8)      # portrait as displayed: red on top, blue below
    shown[:32, :, 0], shown[32:, :, 2] = 255, 255
    for name, orientation in (("upright", 1), ("sideways", 6)):
        d = tmp_path / name / "cls"
        d.mkdir(parents=True)
        for i in range(4):
            im = Image.fromarray(shown)
            exif = Image.Exif()
            if orientation != 1:
                im = im.transpose(Image.Transpose.ROTATE_90)   # stored landscape; orientation 6 turns it back
                exif[0x0112] = orientation
            im.save(d / f"{i}.jpg", quality=95, exif=exif.tobytes())
    views = preset("simclr")[:1]
    views[0].size = 16
    got = {}
    for name in ("upright", "sideways"):
        for gpu in (False, True):
            L = TorchLoader(str(tmp_path / name), views, 4, "cpu", workers=0, train=False, gpu_decode=gpu)
            got[name, gpu] = next(iter(L)).views[0].float()       # (4, 16, 16, 3)
    for gpu in (False, True):
        v = got["sideways", gpu]
        assert (v - got["upright", gpu]).abs().mean() < 6.0
        assert v[:, :4, :, 0].mean() > 200 and v[:, -4:, :, 2].mean() > 200   # red on top, blue below
