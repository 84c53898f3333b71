"""The public Python API: ``fastssl.__all__``, a light ``import fastssl``, every method built from plain
arguments, and user methods named ``package.module:Class`` or by an entry point."""
import dataclasses
import inspect
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import fastssl
from fastssl.methods import METHODS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIT = {"mae", "dino"}
MULTICROP = {"dino", "swav"}
SMALL = {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32, "hidden": 32, "bottleneck": 16, "out_dim": 64,
         "num_prototypes": 20, "queue_size": 24, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
OPTIONAL = ("ffcv", "nvidia.dali", "xformers", "timm", "lightning", "pytorch_lightning", "accelerate", "numba",
            "cv2", "triton")


# ----------------------------------------------------------------------------- the surface


def test_every_public_name_resolves():
    for name in fastssl.__all__:
        assert getattr(fastssl, name) is not None, name
    assert set(fastssl.__all__) <= set(dir(fastssl))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastssl.nope


def test_public_losses_are_the_ones_in_fastssl_losses_and_methods_use_them():
    from fastssl import losses

    for name in ("nt_xent", "info_nce", "vicreg", "barlow_twins", "byol_loss", "negative_cosine", "dino_loss",
                 "swav_loss", "sinkhorn"):
        assert getattr(fastssl, name) is getattr(losses, name) and name in losses.__all__
    src = {n: inspect.getsource(METHODS.get(n)) for n in ("byol", "simsiam", "dino", "swav")}
    assert "losses.byol_loss" in src["byol"] and "losses.negative_cosine" in src["simsiam"]
    assert "losses.dino_loss" in src["dino"] and "losses.swav_loss" in src["swav"]


def _imported_after(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps({{m: m in sys.modules for m in {OPTIONAL + ("torch",)!r}}}))
        """)], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_fastssl_is_light_and_the_surface_needs_no_optional_package():
    assert not any(_imported_after("import fastssl").values())            # not even torch
    names = [n for n in fastssl.__all__ if n not in ("train", "build_loader")]
    loaded = _imported_after(f"import fastssl\nfor n in {names!r}: getattr(fastssl, n)")
    assert loaded["torch"] and not any(loaded[m] for m in OPTIONAL), loaded
    # the loader module itself: no back-end until one is built (numba: the CPU augmentations' kernels)
    loaded = _imported_after("import fastssl\nfastssl.build_loader")
    assert not any(loaded[m] for m in ("ffcv", "nvidia.dali", "xformers", "lightning")), loaded


def test_train_is_the_trainer_module_and_callable():
    train = fastssl.train
    import fastssl.train as mod

    assert train is mod and callable(train)


def test_create_backbone_and_heads():
    net, dim = fastssl.create_backbone("resnet_tiny")
    assert dim == 256 and net(torch.randn(2, 3, 16, 16)).shape == (2, 256)
    assert "resnet_tiny" in fastssl.list_backbones()
    head = fastssl.ProjectionHead(dim, 32, 8, layers=3, bn_last=True)
    assert head(torch.randn(4, dim)).shape == (4, 8)
    # the same modules as the mlp the trainer's checkpoints were written with
    from fastssl.models import mlp

    assert list(head.state_dict()) == list(mlp(dim, 32, 8, layers=3, bn_last=True).state_dict())
    assert fastssl.DINOHead(dim, 64, 32, 16)(torch.randn(4, dim)).shape == (4, 64)


# ----------------------------------------------------------------------------- methods from plain arguments


def plain_kwargs(name):
    cls = METHODS.get(name)
    params = inspect.signature(cls).parameters
    kw = {k: v for k, v in SMALL.items() if k in params}
    kw["backbone"] = "vit_micro_patch8" if name in VIT else "resnet_tiny"
    return cls, kw


def tiny_views(name, b=4):
    g, loc = (32, 16) if name in VIT else (16, 8)
    n_local = 2 if name in MULTICROP else 0
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, g, g, generator=gen) for _ in range(2)] + \
        [torch.randn(b, 3, loc, loc, generator=gen) for _ in range(n_local)]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_builds_from_plain_arguments_and_trains_a_step(name):
    cls, kw = plain_kwargs(name)
    torch.manual_seed(0)
    m = fastssl.create_method(name, **kw)
    assert type(m) is cls
    out = m(tiny_views(name), 0)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    grads = [p.grad for p in m.backbone.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    m.before_optimizer_step(0)
    m.after_step(0)
    assert m.embed(tiny_views(name)[0]).shape == (4, m.feat_dim)


@pytest.mark.parametrize("name", METHODS.names())
def test_constructor_arguments_are_the_config_keys_with_the_same_defaults(name):
    """``from_config`` passes ``cfg.method`` through, so each key must be an argument with the key's default."""
    cls, config = METHODS.get(name), METHODS.meta(name)["config"]
    params = inspect.signature(cls).parameters
    for f in dataclasses.fields(config):
        if f.name == "name":
            continue
        assert f.name in params, f"{name}: method.{f.name} is not an argument of {cls.__name__}"
        assert params[f.name].default == f.default, f"{name}: {f.name} default {params[f.name].default} != {f.default}"
    assert list(params)[0] == "backbone" and all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[1:])


@pytest.mark.parametrize("name", ["simclr", "byol", "dino"])
def test_plain_arguments_build_the_same_model_as_the_config(name):
    from fastssl.config import load_config

    cls, kw = plain_kwargs(name)
    ov = [f"method.name={name}", f"model.backbone={kw['backbone']}", "train.epochs=10"]
    ov += [f"method.{k}={v}" for k, v in kw.items() if k != "backbone"]
    cfg = load_config(None, ov)
    torch.manual_seed(0)
    a = fastssl.create_method(cfg, 100)
    torch.manual_seed(0)
    b = cls(**kw, **({"total_steps": 100} if "total_steps" in inspect.signature(cls).parameters else {}),
            **({"steps_per_epoch": 10} if "steps_per_epoch" in inspect.signature(cls).parameters else {}))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    for attr in ("momentum", "teacher_temp"):
        if hasattr(a, attr):
            assert list(getattr(a, attr)) == list(getattr(b, attr)), attr


def test_schedules_without_a_run_length():
    """No total_steps: the EMA momentum holds its base value (the teacher still moves); no steps_per_epoch:
    the epoch-counted warm-up and freeze are off."""
    m = fastssl.DINO("vit_micro_patch8", hidden=32, bottleneck=16, out_dim=64)
    assert m.momentum.tolist() == [0.996] and m.freeze_steps == 0
    assert m.teacher_temp.tolist() == [pytest.approx(0.07)]
    b = fastssl.BYOL("resnet_tiny", proj_hidden=32, proj_dim=16, pred_hidden=32)
    with torch.no_grad():
        for p in b.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in b.teacher["backbone"].parameters()]
    b.after_step(10**6)
    moved = [p for p, q in zip(b.teacher["backbone"].parameters(), before) if not torch.equal(p, q)]
    assert moved


def test_a_backbone_module_and_its_width():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="feat_dim="):
        fastssl.SimCLR(net)
    m = fastssl.SimCLR(net, feat_dim=8, proj_hidden=16, proj_dim=4)
    assert m.backbone is net and m.feat_dim == 8 and m(tiny_views("simclr"), 0)["loss"].isfinite()


def test_create_method_errors_name_the_fix():
    with pytest.raises(KeyError, match="did you mean 'simclr'"):
        fastssl.create_method("simclrr")
    with pytest.raises(KeyError, match="package.module:Class"):
        fastssl.create_method("nothing_like_it")
    with pytest.raises(TypeError, match="set them in cfg.method"):
        fastssl.create_method(object(), 10, temperature=0.2)


# ----------------------------------------------------------------------------- a user's own method


USER_METHOD = '''
import torch
import torch.nn as nn

from fastssl import losses
from fastssl.methods import MethodHooks, resolve_backbone
from fastssl.models.heads import ProjectionHead


class {cls}(MethodHooks, nn.Module):
    """SimCLR with a learnable temperature's start value, written outside fastssl."""

    def __init__(self, backbone="resnet18", *, feat_dim=None, proj_dim: int = 16, temperature: float = 0.5,
                 total_steps=None):
        super().__init__()
        self.temperature, self.total_steps = temperature, total_steps
        self.backbone, self.feat_dim = resolve_backbone(backbone, feat_dim)
        self.projector = ProjectionHead(self.feat_dim, 32, proj_dim)

    def forward(self, views, step):
        b = views[0].shape[0]
        f = self.backbone(torch.cat(views[:2]))
        z = self.projector(f).float()
        return {{"loss": losses.nt_xent(z[:b], z[b:], self.temperature), "features": f[:b].detach()}}
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A package ``user_ssl_<n>`` on sys.path holding ``methods.py``; the registry forgets what it added."""
    pkg = f"user_ssl_{tmp_path.name.replace('-', '_')}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "methods.py").write_text(USER_METHOD.format(cls="MySimCLR"))
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(METHODS.names())
    yield tmp_path, pkg
    for name in set(METHODS.names()) - before:
        METHODS.unregister(name)


def test_a_method_named_module_colon_class_is_configured_and_built(user_module):
    from fastssl.config import ConfigError, load_config

    _, pkg = user_module
    name = f"{pkg}.methods:MySimCLR"
    cfg = load_config(None, [f"method.name={name}", "method.temperature=0.3", "model.backbone=resnet_tiny"])
    assert cfg.method.temperature == 0.3 and cfg.method.proj_dim == 16 and cfg.aug.recipe == "simclr"
    m = fastssl.create_method(cfg, 7)
    assert type(m).__name__ == "MySimCLR" and m.temperature == 0.3 and m.total_steps == 7
    out = m(tiny_views("simclr"), 0)
    out["loss"].backward()
    assert name in fastssl.list_methods()
    with pytest.raises(ConfigError, match="did you mean 'method.temperature'"):
        load_config(None, [f"method.name={name}", "method.temprature=0.3"])
    with pytest.raises(ConfigError, match="no module 'no_such_pkg.methods' on sys.path"):
        load_config(None, ["method.name=no_such_pkg.methods:X"])
    with pytest.raises(ConfigError, match="has no 'Missing'"):
        load_config(None, [f"method.name={pkg}.methods:Missing"])


def test_fastssl_train_runs_a_users_method(user_module, jpeg_data):
    from fastssl.train import main

    tmp, pkg = user_module
    kv = {"method.name": f"{pkg}.methods:MySimCLR", "method.proj_dim": 8, "data.train": jpeg_data / "train",
          "data.val": jpeg_data / "val", "data.workers": 0, "aug.global_size": 16, "model.backbone": "resnet_tiny",
          "optim.batch_size": 32, "optim.warmup_epochs": 0, "train.epochs": 1, "train.max_steps": 2,
          "train.log_every": 1, "train.out_dir": tmp / "runs", "train.name": "t", "train.progress": False,
          "eval.final": False, "train.cpu_conv_wgrad": "onednn"}                  # no per-shape timing: seconds
    ov = [f"{k}={v}" for k, v in kv.items()]
    assert main(ov) == 0
    lines = [json.loads(line) for line in (tmp / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("kind") == "train"]
    assert train and train[-1]["step"] == 2 and all(math.isfinite(r["loss"]) for r in train)


def test_an_entry_point_in_the_fastssl_methods_group(user_module):
    tmp, pkg = user_module
    dist = tmp / "user_ssl_dist-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-ssl-dist\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fastssl.methods]\nmy_simclr = {pkg}.methods:MySimCLR\n")
    cls = METHODS.get("my_simclr")
    assert cls.__name__ == "MySimCLR" and METHODS.meta("my_simclr")["config"]().name == "my_simclr"
    m = fastssl.create_method("my_simclr", backbone="resnet_tiny", temperature=0.2)
    assert m.temperature == 0.2


def test_a_user_class_must_follow_the_protocol(user_module):
    tmp, pkg = user_module
    (tmp / pkg / "bad.py").write_text("import torch.nn as nn\nclass Bare(nn.Module):\n    pass\n")
    with pytest.raises(TypeError, match="subclass fastssl.methods.MethodHooks"):
        METHODS.get(f"{pkg}.bad:Bare")
    assert f"{pkg}.bad:Bare" not in METHODS
