"""fastssl as an installed package, away from the source tree.

The wheel is built from a copy of the sources (the checkout's own ``build/`` may hold stale
files), installed into a fresh virtual environment in a temporary folder, and its commands run
from another temporary folder. The fresh environment sees the project's ``.venv`` site-packages
for the dependencies only (a ``.pth`` path line: torch and friends are too big to install per
test; the editable install's finder there is not loaded, as ``.pth`` files on such a path are not
processed), and each test asserts that ``fastssl`` is imported from the fresh environment.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "fastssl", "pipelines", "kernels", "configs")


def _run(cmd, cwd, env, timeout=300):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(bin_dir, work_dir, env)`` of a fresh venv holding only the fastssl wheel."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    py = sys.executable
    res = _run([py, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src], tmp, None)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("fastssl-*.whl")
    venv = tmp / "venv"
    res = _run([py, "-m", "venv", "--without-pip", venv], tmp, None)
    assert res.returncode == 0, res.stderr[-3000:]
    vpy = venv / "bin" / "python"
    res = _run([py, "-m", "pip", "--python", vpy, "install", "-q", "--no-deps", "--no-index", wheel], tmp, None)
    assert res.returncode == 0, res.stderr[-3000:]
    site = Path(_run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, None).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_fastssl_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin", work, env


# ----------------------------------------------------------------------------- recipes by name (in the checkout)


def test_recipes_resolve_by_stem_group_and_checkout_path():
    from fastssl.recipes import list_recipes, resolve_recipe

    recipes = list_recipes()
    simclr_rn50 = ROOT / "configs" / "imagenet" / "simclr_rn50.yaml"
    assert recipes["imagenet/simclr_rn50"].resolve() == simclr_rn50
    for name in ("simclr_rn50", "imagenet/simclr_rn50", "imagenet/simclr_rn50.yaml", "configs/imagenet/simclr_rn50.yaml",
                 "./configs/imagenet/simclr_rn50.yaml"):
        assert resolve_recipe(name).resolve() == simclr_rn50, name
    assert resolve_recipe("simclr").resolve() == ROOT / "configs" / "demo" / "simclr.yaml"
    assert resolve_recipe("demo/simclr").resolve() == ROOT / "configs" / "demo" / "simclr.yaml"


def test_unknown_recipe_names_the_closest(monkeypatch, tmp_path, capsys):
    from fastssl.config import ConfigError, load_config
    from fastssl.recipes import RecipeNotFound, resolve_recipe
    from fastssl.train import main

    with pytest.raises(RecipeNotFound, match=r"did you mean 'simclr_rn50'"):
        resolve_recipe("simclr_rn5")
    with pytest.raises(RecipeNotFound, match=r"the recipes are .*demo/barlow_twins, .*imagenet/vicreg_rn50"):
        resolve_recipe("zzzz")
    monkeypatch.chdir(tmp_path)  # no configs/ here: names still resolve, a real file still wins
    assert load_config("imagenet/simclr_rn50").model.backbone == "resnet50"
    (tmp_path / "simclr_rn50").write_text("model:\n  backbone: resnet18\n")
    assert load_config("simclr_rn50").model.backbone == "resnet18"
    with pytest.raises(ConfigError, match=r"config 'demo/simclrr' is neither a file nor a packaged recipe: "
                                          r"did you mean 'demo/simclr'"):
        load_config("demo/simclrr")
    assert main(["--list-configs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("packaged recipes (") and any(
        line.split()[:1] == ["imagenet/simclr_rn50"] and "SimCLR ResNet-50" in line for line in out), out


# ----------------------------------------------------------------------------- the installed wheel

CHECKS = r"""
import contextlib, io, json, sys
import fastssl, fastssl.recipes
from fastssl.train import main as train
from fastssl.cli.timed import main as timed

def call(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = fn(argv)
        except SystemExit as e:
            rc, _ = e.code, err.write(str(e.code))
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}

print(json.dumps({
    "module": fastssl.__file__, "recipes": str(fastssl.recipes.recipes_dir()),
    "by_name": call(train, ["--config", "simclr_rn50", "--print-config"]),
    "typo": call(train, ["--config", "simclr_rn5", "--print-config"]),
    "timed": call(timed, ["no-imagenet-here"]),
}))
"""


def test_wheel_in_a_fresh_venv_lists_and_finds_recipes_by_name(installed):
    bin_dir, work, env = installed
    res = _run([bin_dir / "fastssl-train", "--list-configs"], work, env)  # the console script itself
    assert res.returncode == 0, res.stderr[-3000:]
    listed = {line.split()[0] for line in res.stdout.splitlines()[1:] if line.strip()}
    shipped = {f"{p.parent.name}/{p.stem}" for p in (ROOT / "configs").glob("*/*.yaml") if not p.stem.startswith("_")}
    assert shipped and shipped == listed, shipped ^ listed  # a recipe group missing from pyproject fails here

    res = _run([bin_dir / "python", "-c", CHECKS], work, env)  # the rest in one process (one torch import)
    assert res.returncode == 0, res.stderr[-3000:]
    got = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    venv = bin_dir.parent
    assert Path(got["module"]).is_relative_to(venv) and Path(got["recipes"]).is_relative_to(venv), got
    assert not Path(got["module"]).is_relative_to(ROOT), got  # not the checkout
    by_name, typo, timed = got["by_name"], got["typo"], got["timed"]
    assert by_name["rc"] == 0 and "backbone: resnet50" in by_name["out"] and "name: simclr" in by_name["out"], by_name
    assert typo["rc"] == 2 and "did you mean 'simclr_rn50'" in typo["err"], typo
    # fastssl-timed resolves its recipe before anything else: past that, it names the missing ImageNet folder
    assert timed["rc"] != 0 and "no-imagenet-here/train is not a folder" in timed["err"], timed
    assert not list(work.iterdir())  # nothing written in the working directory


@pytest.mark.slow  # 1-2 minutes on 2 cores: prepare the built-in data, a few training steps, in the fresh venv
def test_wheel_in_a_fresh_venv_runs_a_short_demo(installed):
    bin_dir, work, env = installed
    res = _run([bin_dir / "fastssl-prepare", "synthetic", "data", "--classes", "4", "--per-class", "16",
                "--val-per-class", "4", "--size", "32", "--seed", "0"], work, env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([bin_dir / "fastssl-train", "--config", "demo/simclr", "data.train=data/train.beton",
                "data.val=data/val.beton", "data.workers=1", "aug.global_size=16", "model.backbone=resnet_tiny",
                "method.proj_hidden=64", "method.proj_dim=32", "optim.batch_size=32", "train.max_steps=2",
                "train.log_every=1", "train.progress=false", "train.name=demo", "eval.final=true"], work, env)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    summary = json.loads((work / "runs" / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["knn_top1"] is not None
    env_json = json.loads((work / "runs" / "demo" / "env.json").read_text())
    assert env_json["fastssl"] == "0.1.0"
