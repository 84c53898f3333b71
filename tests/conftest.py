"""Shared fixtures: a small built-in dataset written once per test session."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter
if "FASTSSL_CACHE_DIR" not in os.environ:  # the CPU weight-gradient choices (fastssl/models/cpu_conv.py): not the user's
    import atexit
    import shutil
    import tempfile

    os.environ["FASTSSL_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastssl-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FASTSSL_CACHE_DIR"], True)

import pytest


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests skip, with the reason, where no CUDA device is visible (``-m cuda`` on a CPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """``fastssl-prepare synthetic``: 10 classes x 20 train / 10 val images at 32 px, as .beton + JPEG folders."""
    from fastssl.cli.prepare import main as prepare

    out = tmp_path_factory.mktemp("demo_data")
    rc = prepare(["synthetic", str(out), "--classes", "10", "--per-class", "20", "--val-per-class", "10",
                  "--size", "32", "--seed", "0", "--jpeg-folders"])
    assert rc in (0, None)
    return out


@pytest.fixture(scope="session")
def jpeg_data(tmp_path_factory):
    """The built-in shapes as JPEG ImageFolders (``train/``, ``val/``), written without ffcv (the GPU machine has none).

    10 classes x 20 train / 10 val images at 32 px, read by the torch back-end.
    """
    from PIL import Image

    from fastssl.pipelines.synthetic import SyntheticImages

    out = tmp_path_factory.mktemp("jpeg_data")
    for split, per in (("train", 20), ("val", 10)):
        ds = SyntheticImages(num_classes=10, per_class=per, size=32, seed=0, split=split)
        for i in range(len(ds)):
            img, label = ds[i]
            d = out / split / ds.classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=95)
    return out


def has_module(mod: str) -> bool:
    """Whether an optional package imports here (for skipif marks: ffcv, DALI)."""
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def tiny_overrides(data, out_dir, **extra):
    """A CPU-seconds-sized SimCLR run on ``demo_data``."""
    kv = {
        "data.train": f"{data}/train.beton", "data.val": f"{data}/val.beton", "data.workers": 1,
        "aug.global_size": 16, "model.backbone": "resnet_tiny", "method.proj_hidden": 64, "method.proj_dim": 32,
        "optim.batch_size": 32, "optim.warmup_epochs": 0, "train.epochs": 2, "train.log_every": 1,
        "train.out_dir": str(out_dir), "train.name": "t", "train.progress": False, "eval.final": False,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads contend and run ~50x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def every_op_params():
    """Per-image photometric parameters of 3 images that exercise every op (as ``sample_params`` returns)."""
    import torch

    return {"jitter": torch.tensor([True, True, False]), "brightness": torch.tensor([0.7, 1.3, 1.1]),
            "contrast": torch.tensor([1.2, 0.8, 1.0]), "saturation": torch.tensor([0.9, 1.2, 1.0]),
            "hue": torch.tensor([0.05, -0.08, 0.0]), "gray": torch.tensor([False, True, False]),
            "blur": torch.tensor([True, False, True]), "sigma": torch.tensor([1.0, 0.5, 1.5]),
            "solarize": torch.tensor([False, False, True])}


def torchvision_view(x, p: dict, i: int, ksize: int):
    """The photometric sequence of image ``i`` by torchvision's functional ops: the reference for both paths.

    ``x`` float (3, H, W) in [0, 1]; the order is the Augmenter's (jitter b/c/s/h, gray, blur, solarise).
    """
    import torchvision.transforms.v2.functional as TF

    if p["jitter"][i]:
        x = TF.adjust_brightness(x, float(p["brightness"][i]))
        x = TF.adjust_contrast(x, float(p["contrast"][i]))
        x = TF.adjust_saturation(x, float(p["saturation"][i]))
        x = TF.adjust_hue(x, float(p["hue"][i]))
    if p["gray"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur"][i]:
        x = TF.gaussian_blur(x, [ksize, ksize], [float(p["sigma"][i])] * 2)
    if p["solarize"][i]:
        x = TF.solarize(x, 0.5)
    return x


def small_views(recipe: str, global_size: int = 32, local_size: int = 16):
    """A recipe's views (``pipelines.recipes.preset``) at test sizes: global views at 32 px, local at 16."""
    from fastssl.pipelines.recipes import preset

    views = preset(recipe)
    for v in views:
        v.size = local_size if v.local else global_size
    return views


def noise_folder(root, n=8, side=64):
    """``n`` noise PNGs of ``side`` px in two classes (``root/c0``, ``root/c1``): incompressible, so their
    size is known (stored raw, 27 images of 160 px fill a 2 MiB ffcv page)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)).save(d / f"{i:03d}.png")
    return root
