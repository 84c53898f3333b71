"""Config: typed keys, YAML + overrides, errors that name the key and the closest valid one."""
import numpy as np
import pytest

from fastssl.config import ConfigError, derive, load_config
from fastssl.schedules import cosine, progressive_size
from fastssl.train import main


def test_yaml_and_overrides():
    cfg = load_config("configs/demo/simclr.yaml", ["optim.batch_size=128", "train.epochs=2", "method.temperature=0.5",
                                                    "data.train=x.beton", "train.resume=true"])
    assert cfg.optim.batch_size == 128 and cfg.train.epochs == 2 and cfg.method.temperature == 0.5
    assert cfg.data.train == "x.beton" and cfg.train.resume == "true"
    assert cfg.model.backbone == "resnet_nano_s2"  # from the YAML


@pytest.mark.parametrize("override, needle", [
    ("optim.bach_size=3", "did you mean 'optim.batch_size'"),
    ("trian.epochs=2", "'train.epochs'"),
    ("method.temprature=0.2", "'method.temperature'"),
    ("optim.lr=fast", "optim.lr='fast': expected a number"),
    ("train.epochs=2.5", "expected an integer"),
    ("data.backend=ffvc", "did you mean 'ffcv'"),
    ("method.name=simclrr", "did you mean 'simclr'"),
    ("aug.recipe=dinoo", "did you mean 'dino'"),
    ("optim.batch_size=1", "out of range"),
    ("train.resume=maybe", "expected true/false/auto"),
    ("optim.batch_size", "must look like key.sub=value"),
    ("train.compile_mode=max-autotun", "did you mean 'max-autotune'"),
])
def test_bad_keys_and_values_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo/simclr.yaml", [override])
    assert needle in str(e.value)


def test_cli_config_error_exits_before_work(capsys, tmp_path):
    rc = main(["--config", "configs/demo/simclr.yaml", "optim.bach_size=3", f"train.out_dir={tmp_path}"])
    assert rc == 2
    assert "optim.batch_size" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was created


def test_help_lists_every_key_with_type_and_default(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("data.train", "data.val", "optim.batch_size", "train.epochs", "train.max_steps", "train.resume",
                "method.temperature", "aug.views.N.blur_p"):
        assert key in out
    assert "int" in out and "256" in out


def test_view_override_edits_one_view_of_the_preset():
    cfg = load_config(None, ["aug.recipe=byol", "aug.views.1.solarize_p=0.0"])
    v = cfg.aug.resolved_views()
    assert v[0].blur_p == 1.0 and v[1].blur_p == 0.1 and v[1].solarize_p == 0.0
    with pytest.raises(ConfigError, match="index out of range"):
        load_config(None, ["aug.views.5.blur_p=0.0"])


def test_derived_values_scaled_lr_and_steps():
    cfg = load_config(None, ["optim.batch_size=512", "optim.lr=0.3", "optim.lr_scaling=linear", "train.epochs=3",
                             "optim.warmup_epochs=1"])
    d = derive(cfg, num_samples=5000, world_size=2)
    assert d.lr == pytest.approx(0.6) and d.micro_batch == 256
    assert d.steps_per_epoch == 9 and d.total_steps == 27 and d.warmup_steps == 9
    cfg.optim.lr_scaling = "sqrt"
    assert derive(cfg, 5000).lr == pytest.approx(0.3 * 2 ** 0.5)
    with pytest.raises(ConfigError, match="divisible"):
        derive(load_config(None, ["optim.batch_size=100", "optim.accum_steps=3"]), 5000)
    with pytest.raises(ConfigError, match="fewer than optim.batch_size"):
        derive(cfg, 100)


def test_cosine_schedule_shape_warmup_and_end():
    s = cosine(1.0, 0.1, 100, 10)
    assert len(s) == 100 and s[0] == 0.0 and s[10] == pytest.approx(1.0)
    assert np.all(np.diff(s[:11]) > 0) and np.all(np.diff(s[10:]) <= 1e-12)
    assert s[-1] == pytest.approx(0.1)


def test_progressive_resolution():
    sizes = [progressive_size(e, 10, 160, 224, 0.85, 32) for e in range(10)]
    assert sizes[0] == 160 and sizes[-1] == 224 and sorted(sizes) == sizes
    assert set(sizes) <= {160, 192, 224}
    assert progressive_size(3, 10, 0, 224, 0.85, 32) == 224  # off


def test_bench_dispatcher_lists_only_existing_benchmarks(capsys):
    import importlib

    from fastssl.cli.bench import SUBCOMMANDS, main as bench

    for sub in SUBCOMMANDS:
        assert callable(importlib.import_module(f"fastssl.cli.bench_{sub}").main)
    assert bench(["lodaer"]) == 2 and "did you mean 'loader'" in capsys.readouterr().err


def test_backbone_and_backend_errors_come_at_config_time(demo_data):
    """Issue 13.9: an unknown backbone or a back-end that does not fit the data fails in load_config,
    with a did-you-mean, before any loader or model is built."""
    with pytest.raises(ConfigError, match=r"model.backbone='resnet-18'.*did you mean 'resnet18'"):
        load_config("configs/demo/simclr.yaml", ["model.backbone=resnet-18"])
    with pytest.raises(ConfigError, match=r"data.backend='ffvc'.*did you mean 'ffcv'"):
        load_config("configs/demo/simclr.yaml", ["data.backend=ffvc"])
    with pytest.raises(ConfigError, match=r"data.train: backend=ffcv reads a .beton.*fastssl-prepare"):
        load_config("configs/demo/simclr.yaml", [f"data.train={demo_data}/train", "data.backend=ffcv"])
    with pytest.raises(ConfigError, match=r"data.val: .*only backend=ffcv"):
        load_config("configs/demo/simclr.yaml", [f"data.val={demo_data}/val.beton", "data.backend=torch",
                                                 f"data.train={demo_data}/train"])
    assert load_config("configs/demo/simclr.yaml", ["model.backbone=vit_tiny_patch16_224"]).model.backbone


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """train.compile_mode is the mode the backbone is compiled with."""
    import fastssl.compile as fc

    seen = []
    real = fc.torch.compile
    monkeypatch.setattr(fc.torch, "compile", lambda fn, **kw: seen.append(kw.get("mode")) or real(fn, backend="eager"))
    from fastssl.cli.bench_step import Variant
    import torch

    for mode, want in (("default", "default"), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")):
        ov = ["aug.global_size=16", "model.backbone=resnet_tiny", "train.compile=on", f"train.compile_mode={mode}"]
        Variant(mode, "configs/demo/simclr.yaml", ov, 4, torch.device("cpu"))
        assert seen[-1] == want
