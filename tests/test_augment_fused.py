"""The fused photometric stage (``data.photometric=compiled``) against the eager one, chained to torchvision.

Chain: torchvision's functional ops == ``apply_view`` (tests/test_augment_torch.py) == the out-of-place
graph ``photometric_fused`` run eagerly (here, every recipe) == that graph compiled by inductor (slow).
"""
import numpy as np
import pytest
import torch

from conftest import every_op_params, small_views, torchvision_view
from fastssl.pipelines.augment import (IMAGENET_MEAN, IMAGENET_STD, Augmenter, blur_kernel_size, gaussian_blur,
                                       photometric_fused)
from fastssl.pipelines.recipes import PRESETS

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _smooth_crops(views, b=6, seed=0):
    """Photo-like uint8 crops (B, S, S, 3): colour fields upsampled (flat regions, edges, every hue sector)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in views:
        low = torch.rand(b, 3, 5, 5, generator=g) * 255
        up = torch.nn.functional.interpolate(low, size=(v.size, v.size), mode="bilinear", align_corners=False)
        out.append(up.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return out


def _params(aug, step, v, b):
    from fastssl.pipelines.augment import _seed, sample_params

    return sample_params(aug.views[v], b, torch.Generator().manual_seed(_seed(aug.seed, step, v)), "cpu")


@pytest.mark.parametrize("recipe", sorted(PRESETS))
def test_fused_graph_equals_the_eager_stage(recipe):
    views = small_views(recipe)
    crops = _smooth_crops(views)
    eager = Augmenter(views, "cpu", seed=2, impl="torch")
    ref = eager(crops, 11)
    for v, c in enumerate(crops):
        got = photometric_fused(c, _params(eager, 11, v, c.shape[0]), MEAN, STD, blur_kernel_size(c.shape[1]),
                                torch.float32)
        assert got.shape == ref[v].shape and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert (got - ref[v]).abs().max() < 1e-5, (recipe, v)


def test_fused_graph_equals_torchvision_with_every_op():
    p = every_op_params()
    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8))
    k = blur_kernel_size(20)
    got = photometric_fused(crops, p, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), k, torch.float32)
    x = crops.permute(0, 3, 1, 2).float() / 255
    for i in range(3):
        assert (got[i] - torchvision_view(x[i], p, i, k)).abs().max() < 2e-5, i


def test_fused_blur_clips_the_kernel_on_tiny_images_as_the_eager_blur():
    off = torch.zeros(2, dtype=torch.bool)
    p = {"jitter": off, "brightness": torch.ones(2), "contrast": torch.ones(2), "saturation": torch.ones(2),
         "hue": torch.zeros(2), "gray": off, "blur": torch.ones(2, dtype=torch.bool), "sigma": torch.tensor([0.8, 2.0]),
         "solarize": off}
    crops = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = photometric_fused(crops, p, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), 9, torch.float32)
    ref = gaussian_blur(crops.permute(0, 3, 1, 2).float() / 255, p["sigma"], 9)
    assert (got - ref).abs().max() < 1e-6


def test_low_precision_views_are_one_rounding_of_fp32():
    views = small_views("simclr")
    crops = _smooth_crops(views, seed=3)
    aug = Augmenter(views, "cpu", seed=0, impl="torch")
    p = _params(aug, 0, 0, crops[0].shape[0])
    k = blur_kernel_size(crops[0].shape[1])
    full = photometric_fused(crops[0], p, MEAN, STD, k, torch.float32)
    half = photometric_fused(crops[0], p, MEAN, STD, k, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, full.to(torch.bfloat16))


def test_unknown_impl_names_the_choices():
    with pytest.raises(ValueError, match="compiled"):
        Augmenter(small_views("simclr"), "cpu", impl="fused")


def test_data_photometric_reaches_the_loaders_stage(jpeg_data):
    from fastssl.config import ConfigError, load_config
    from fastssl.pipelines.loader import build_loader

    cfg = load_config(None, [f"data.train={jpeg_data}/train", "data.photometric=compiled", "data.workers=0"])
    loader = build_loader(cfg.data, small_views("simclr"), "train", 4, "cpu")
    assert loader.finisher.impl == "compiled"
    with pytest.raises(ConfigError, match="data.photometric"):
        load_config(None, ["data.photometric=fast"])


@pytest.mark.slow
def test_compiled_stage_equals_the_eager_stage():
    """Inductor's fused kernels (C++ on the CPU, Triton on a GPU) against the eager stage; ~1 min to compile here."""
    views = small_views("dino")
    crops = _smooth_crops(views, b=8, seed=5)
    eager = Augmenter(views, "cpu", seed=7, impl="torch")(crops, 3)
    fused = Augmenter(views, "cpu", seed=7, impl="compiled")
    got = fused(crops, 3)
    for a, b in zip(got, eager):
        assert a.is_contiguous(memory_format=torch.channels_last)
        d = (a - b).abs()
        # Contracted multiply-adds differ in the last bits; a hue-sector flip could move one pixel further.
        assert d.max() < 1e-3 and (d > 1e-5).float().mean() < 1e-3
    again = fused(crops, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_a_compiler_error_warns_once_and_runs_the_graph_eagerly(monkeypatch, caplog):
    import fastssl.pipelines.augment as augment

    class CompilerFailed(RuntimeError):
        pass

    CompilerFailed.__module__ = "torch._inductor.exc"  # what fastssl.compile counts as the compiler's fault

    def broken(*args, **kwargs):
        raise CompilerFailed("no C++ compiler")

    monkeypatch.setattr(augment, "_COMPILED_STAGE", None)
    monkeypatch.setattr(augment.torch, "compile", lambda fn, **kw: broken)
    views = small_views("simclr")
    crops = _smooth_crops(views)
    with caplog.at_level("WARNING", logger="fastssl.pipelines.augment"):
        got = Augmenter(views, "cpu", seed=1, impl="compiled")(crops, 2)
        again = Augmenter(views, "cpu", seed=1, impl="compiled")(crops, 2)
    ref = Augmenter(views, "cpu", seed=1, impl="torch")(crops, 2)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(got, ref))
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    warned = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warned) == 1 and "no C++ compiler" in warned[0].getMessage()


@pytest.mark.parametrize("recipe", sorted(PRESETS))
def test_ops_with_probability_zero_are_skipped_bit_for_bit(recipe):
    """Leaving out an op whose mask is all False (probability 0) changes nothing: eager and fused graph."""
    from fastssl.pipelines.augment import OPS, active_ops, apply_view

    views = small_views(recipe)
    crops = _smooth_crops(views, seed=9)
    aug = Augmenter(views, "cpu", seed=3, impl="torch")
    for v, (c, spec) in enumerate(zip(crops, views)):
        p = _params(aug, 5, v, c.shape[0])
        ops = active_ops(spec)
        x = c.permute(0, 3, 1, 2).float() / 255
        before = x.clone()
        assert torch.equal(apply_view(x, p, ops), apply_view(x, p, OPS))
        assert torch.equal(x, before)                                        # not in place unless asked
        k = blur_kernel_size(c.shape[1])
        assert torch.equal(photometric_fused(c, p, MEAN, STD, k, torch.float32, ops),
                           photometric_fused(c, p, MEAN, STD, k, torch.float32, OPS))
    if recipe == "mae":
        assert active_ops(views[0]) == ()
        got = aug(crops, 0)[0]
        assert torch.equal(got, aug.normalize_only(crops)[0])               # crop and flip only: normalisation


@pytest.mark.slow
def test_a_run_trains_through_the_compiled_stage(demo_data, tmp_path):
    """The trainer's loader with data.photometric=compiled (on the CPU: the finisher's thread compiles it)."""
    import json
    import math

    from conftest import tiny_overrides
    from fastssl.train import main

    rc = main(["--config", "configs/demo/simclr.yaml"]
              + tiny_overrides(demo_data, tmp_path, **{"data.photometric": "compiled", "train.max_steps": 3}))
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)


@pytest.mark.cuda
def test_compiled_stage_on_cuda_equals_the_eager_stage():
    """Inductor's Triton kernels against the eager stage on the GPU, at a recipe's size, in bf16 and fp32."""
    views = small_views("dino", global_size=224, local_size=96)
    crops = [c.cuda() for c in _smooth_crops(views, b=16, seed=6)]
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.05)):
        eager = Augmenter(views, "cuda", seed=7, impl="torch", dtype=dtype)(crops, 3)
        got = Augmenter(views, "cuda", seed=7, impl="compiled", dtype=dtype)(crops, 3)
        for a, b in zip(got, eager):
            assert a.dtype == dtype and a.is_contiguous(memory_format=torch.channels_last)
            d = (a.float() - b.float()).abs()
            assert d.max() < tol and (d > tol / 10).float().mean() < 1e-3, (dtype, float(d.max()))
