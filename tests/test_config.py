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
    ("optim.clip_mode=per_parm", "did you mean 'per_param'"),
    ("optim.lr=abc", "optim.lr='abc': expected a number"),
    ("optim.lr=1e-3x", "optim.lr='1e-3x': expected a number"),
    ("optim.lr=1.2.3", "optim.lr='1.2.3': expected a number"),
    ("train.epochs=abc", "train.epochs='abc': expected an integer"),
    ("train.epochs=1e-3", "train.epochs='1e-3': expected an integer"),
    ("aug.views.1.blur_sigma_min=0", "aug.views.1.blur_sigma_min=0"),   # a sigma of 0: a view of NaN
    ("aug.views.0.jitter_p=1.5", "aug.views.0.jitter_p=1.5: a probability"),
    ("aug.views.0.hue=0.7", "aug.views.0.hue=0.7"),
    ("aug.views.0.saturation=-0.1", "a jitter strength"),
    ("aug.views.0.scale_min=0", "needs 0 < scale_min"),
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
    """An unknown backbone or a back-end that does not fit the data fails in load_config, with a
    did-you-mean, before any loader or model is built."""
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


# ----------------------------------------------------------------------------- numbers as people type them

# PyYAML follows YAML 1.1, where a float needs a dot: it reads 1e-3, 3E-4, -2e-5 and 1e3 as strings.
FLOATS = [("1e-3", 1e-3), ("3E-4", 3e-4), (".5", 0.5), ("5.", 5.0), ("1_000", 1000.0), ("-2e-5", -2e-5),
          ("+1.5", 1.5), ("1.0e-6", 1e-6), ("2", 2.0)]
INTS = [("1_000", 1000), ("1e3", 1000), ("+7", 7), ("2.0", 2), ("1.5e1", 15)]


@pytest.mark.parametrize("text, want", FLOATS)
def test_float_forms_on_the_command_line_and_in_yaml(text, want, tmp_path):
    # optim.weight_decay takes negatives (no range check); optim.lr must be >= 0
    key = ("optim", "weight_decay") if want < 0 else ("optim", "lr")
    cli = load_config(None, [f"{key[0]}.{key[1]}={text}"])
    (tmp_path / "r.yaml").write_text(f"{key[0]}:\n  {key[1]}: {text}\n")
    from_yaml = load_config(tmp_path / "r.yaml")
    for cfg in (cli, from_yaml):
        got = getattr(getattr(cfg, key[0]), key[1])
        assert isinstance(got, float) and got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("text, want", INTS)
def test_int_forms_on_the_command_line_and_in_yaml(text, want, tmp_path):
    (tmp_path / "r.yaml").write_text(f"train:\n  epochs: {text}\n")
    for cfg in (load_config(None, [f"train.epochs={text}"]), load_config(tmp_path / "r.yaml")):
        assert cfg.train.epochs == want and type(cfg.train.epochs) is int


@pytest.mark.parametrize("text, needle", [("abc", "expected a number"), ("1e", "expected a number"),
                                          ("nan", "expected a number"), ("1,5", "expected a number")])
def test_junk_in_a_yaml_file_fails_naming_the_key(text, needle, tmp_path):
    (tmp_path / "r.yaml").write_text(f"optim:\n  lr: {text}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "r.yaml")
    msg = str(e.value)
    assert f"optim.lr={text!r}: {needle}" in msg and "\n" not in msg


def test_non_integral_numbers_are_not_integers():
    for text in ("1.5", "1e-3", "2.5e0"):
        with pytest.raises(ConfigError, match=rf"train.epochs='?{text}'?: expected an integer"):
            load_config(None, [f"train.epochs={text}"])


# ----------------------------------------------------------------------------- recipes built on a base


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_merge_the_base_under_the_recipe(tmp_path, monkeypatch):
    _write(tmp_path / "r" / "_base.yaml", "optim:\n  lr: 0.5\n  weight_decay: 1e-4\ntrain:\n  epochs: 7\n"
                                         "aug:\n  recipe: byol\n  views:\n    - {blur_p: 0.0}\n    - {blur_p: 0.0}\n")
    child = _write(tmp_path / "r" / "child.yaml", "defaults: [_base]\noptim:\n  lr: 2e-3\n"
                                                  "aug:\n  views:\n    - {blur_p: 0.3}\n")
    monkeypatch.chdir(tmp_path)  # the base resolves relative to the recipe, not to the working directory
    cfg = load_config(child)
    assert cfg.optim.lr == 2e-3 and cfg.optim.weight_decay == 1e-4 and cfg.train.epochs == 7  # keys merge
    assert cfg.aug.recipe == "byol" and [v.blur_p for v in cfg.aug.resolved_views()] == [0.3]  # a list replaces
    assert load_config(child, ["train.epochs=3"]).train.epochs == 3  # the command line still wins


def test_defaults_chain_string_form_and_method_change(tmp_path):
    _write(tmp_path / "_a.yaml", "method:\n  name: simclr\n  temperature: 0.3\ntrain:\n  epochs: 5\n  seed: 1\n")
    _write(tmp_path / "_b.yaml", "defaults: _a.yaml\ntrain:\n  seed: 2\n")
    same = _write(tmp_path / "same.yaml", "defaults: [_b]\nmethod:\n  name: simclr\n  proj_dim: 64\n")
    other = _write(tmp_path / "other.yaml", "defaults: [_b]\nmethod:\n  name: byol\n  momentum: 0.99\n")
    cfg = load_config(same)
    assert (cfg.train.epochs, cfg.train.seed, cfg.method.temperature, cfg.method.proj_dim) == (5, 2, 0.3, 64)
    cfg = load_config(other)  # simclr's temperature does not leak into byol's section
    assert cfg.method.name == "byol" and cfg.method.momentum == 0.99 and cfg.train.seed == 2


def test_defaults_errors_name_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "defaults: [_bsae]\n")
    _write(tmp_path / "_base.yaml", "train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: defaults names '_bsae'.*did you mean '_base'"):
        load_config(bad)
    _write(tmp_path / "x.yaml", "defaults: [y]\n")
    _write(tmp_path / "y.yaml", "defaults: [x]\n")
    with pytest.raises(ConfigError, match=r"its defaults include itself \(x.yaml -> y.yaml -> x.yaml\)"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match=r"defaults=\{'a': 1\}: expected a recipe file name or a list"):
        load_config(_write(tmp_path / "z.yaml", "defaults: {a: 1}\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoks'"):  # a base's typo still names the key
        _write(tmp_path / "_typo.yaml", "train:\n  epoks: 2\n")
        load_config(_write(tmp_path / "t.yaml", "defaults: [_typo]\n"))


def test_packaged_recipes_resolve_their_base_and_bases_are_not_recipes(capsys):
    from fastssl.recipes import RecipeNotFound, list_recipes, resolve_recipe

    cfg = load_config("imagenet/simclr_rn50")  # by name, as from an installed wheel: the base comes along
    assert cfg.data.train == "data/imagenet/train.beton" and cfg.train.precision == "bf16"
    assert not [n for n in list_recipes() if n.split("/")[1].startswith("_")]
    with pytest.raises(RecipeNotFound):
        resolve_recipe("_base")
    assert main(["--config", "simclr_rn50", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "defaults" not in out  # resolved: the base's values, not the reference to it
    for line in ("train: data/imagenet/train.beton", "precision: bf16", "lr_scaling: sqrt", "temperature: 0.1"):
        assert line in out, line
    assert main(["--list-configs"]) == 0
    assert "_base" not in capsys.readouterr().out


def test_every_packaged_recipe_loads():
    """Each shipped recipe (demo and ImageNet) resolves and validates through the loader."""
    from fastssl.recipes import list_recipes

    for name in list_recipes():
        assert load_config(name).method.name, name
