"""The files in examples/ run for a few steps on the built-in data (the README quotes them)."""
import math
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The built-in shapes as a JPEG image folder: 10 classes x 8 images at 32 px (5 batches of 16)."""
    from fastssl.pipelines.synthetic import SyntheticImages, write_jpeg_folder

    return write_jpeg_folder(SyntheticImages(num_classes=10, per_class=8, size=32), tmp_path_factory.mktemp("shapes"))


def test_plain_loop_trains_a_few_steps(shapes, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "--data", str(shapes), "--steps", "6", "--batch-size", "16",
                                      "--workers", "0"])
    runpy.run_path(str(EXAMPLES / "plain_loop.py"), run_name="__main__")
    lines = re.findall(r"^step (\d+) loss (\S+)$", capsys.readouterr().out, flags=re.M)
    assert [int(s) for s, _ in lines] == list(range(1, 7))                # crosses an epoch (5 batches each)
    assert all(math.isfinite(float(v)) for _, v in lines)


def test_plain_loop_writes_the_built_in_data_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "--steps", "1", "--batch-size", "16", "--workers", "0"])
    runpy.run_path(str(EXAMPLES / "plain_loop.py"), run_name="__main__")
    assert len(list((tmp_path / "shapes").glob("*/*.jpg"))) == 500 and "step 1 loss" in capsys.readouterr().out


def _lightning_example():
    return runpy.run_path(str(EXAMPLES / "lightning_module.py"), run_name="lightning_example")


def test_lightning_module_core_runs_without_lightning(shapes, monkeypatch):
    """The module's hooks in Lightning's order (the example's own ``fit``), whether or not Lightning is installed."""
    ns = _lightning_example()
    monkeypatch.setitem(ns["main"].__globals__, "L", None)                 # force the plain path
    losses = ns["main"](["--method", "byol", "--data", str(shapes), "--steps", "3", "--batch-size", "16",
                         "--workers", "0"])
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_lightning_module_hooks_advance_the_teacher_once_per_step(shapes):
    import torch

    import fastssl

    ns = _lightning_example()
    if ns["L"] is not None:
        pytest.skip("Lightning is installed: SSLModule's global_step belongs to its Trainer")
    module = ns["SSLModule"]("byol", backbone="resnet_tiny", proj_hidden=32, proj_dim=16, pred_hidden=32,
                             total_steps=2)
    calls = []
    module.method.after_step = lambda step: calls.append(step)
    views = fastssl.AugConfig(recipe="byol", global_size=16).resolved_views()
    loader = fastssl.build_loader(None, views, str(shapes), 16, "cpu", workers=0)
    before = [p.detach().clone() for p in module.method.backbone.parameters()]
    ns["fit"](module, loader, 2)
    assert calls == [0, 1]                                                 # once per optimizer step, in order
    assert any(not torch.equal(a, p) for a, p in zip(before, module.method.backbone.parameters()))


def test_lightning_module_with_lightning(shapes):
    pytest.importorskip("lightning", reason="lightning is not installed here (an optional dependency of the example)")
    losses = _lightning_example()["main"](["--method", "byol", "--data", str(shapes), "--steps", "3",
                                           "--batch-size", "16", "--workers", "0"])
    assert all(math.isfinite(v) for v in losses)


def test_readme_python_blocks_are_the_code_the_tests_run():
    """README's "Using fastssl from Python": the loop is examples/plain_loop.py verbatim, and the one-call
    snippet uses fastssl.train's real keywords (tests/test_train_api.py runs that call)."""
    import inspect

    import fastssl.train as module

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using fastssl from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "the section lost its code"
    assert blocks[1].strip() == (EXAMPLES / "plain_loop.py").read_text().strip()
    call = re.search(r"fastssl\.train\((.*?)\)", blocks[0], flags=re.S).group(1)
    keywords = set(re.findall(r"(\w+)=", call))
    assert keywords and keywords <= set(inspect.signature(module.fit).parameters), keywords
