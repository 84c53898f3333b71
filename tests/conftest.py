"""Shared fixtures: a small built-in dataset written once per test session."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """``fastssl-prepare synthetic``: 10 classes x 20 train / 10 val images at 32 px, as .beton + JPEG folders."""
    from fastssl.cli.prepare import main as prepare

    out = tmp_path_factory.mktemp("demo_data")
    rc = prepare(["synthetic", str(out), "--classes", "10", "--per-class", "20", "--val-per-class", "10",
                  "--size", "32", "--seed", "0", "--jpeg-folders"])
    assert rc in (0, None)
    return out


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
