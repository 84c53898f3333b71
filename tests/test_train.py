"""The trainer end to end on the CPU: loss goes down, resume is exact, NaN stops cleanly."""
import json
import platform

import pytest

from fastssl.train import main
from conftest import tiny_overrides


def read_metrics(run_dir, kind="train"):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == kind]


def test_short_cpu_run_loss_decreases_and_run_dir_describes_itself(demo_data, tmp_path, monkeypatch):
    import fastssl.pipelines.loader as loader_mod

    built = []
    real_build = loader_mod.build_loader

    def counting_build(*a, **kw):
        built.append(kw.get("train"))
        return real_build(*a, **kw)

    monkeypatch.setattr(loader_mod, "build_loader", counting_build)
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.epochs": 4, "optim.lr": 0.002, "eval.final": True, "eval.every_epochs": 2,
                                 "eval.knn_stride": 4})
    assert main(args) == 0
    # Four evaluations (init, epoch 2, final; epoch 4 is the final one) share two evaluation loaders:
    # a new ffcv loader JIT-compiles its decoder, which had made every evaluation cost seconds.
    assert built.count(False) == 2, built
    run = tmp_path / "t"
    m = read_metrics(run)
    assert len(m) == 4 * (200 // 32)
    first, last = sum(r["loss"] for r in m[:3]) / 3, sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - 0.05, (first, last)
    for name in ("config.yaml", "env.json", "summary.json", "checkpoints/last.pt"):
        assert (run / name).exists(), name
    s = json.loads((run / "summary.json").read_text())
    for k in ("knn_top1", "knn_top1_init", "linear_top1_online", "rankme", "images_per_second", "wall_seconds",
              "data_wait_fraction"):
        assert s[k] is not None, k
    assert s["protocol"]["knn"]["k"] == 20 and s["protocol"]["knn"]["temperature"] == 0.07
    # The reused loaders still cover every image after earlier passes.
    assert "(200 images" in s["protocol"]["knn"]["train_split"], s["protocol"]["knn"]
    evals = read_metrics(run, "eval")
    assert len(evals) == 3
    # In training the bank is 1 in 4 train images (eval.knn_stride); the init and final ones read them all.
    assert [e["eval_train_images"] for e in evals] == [200, 50, 200], evals
    assert 0.0 <= s["data_wait_fraction"] <= 1.0
    # The trainer's final kNN equals an independent evaluation of the saved checkpoint on fresh loaders.
    from fastssl.checkpoint import load_for_eval
    from fastssl.pipelines.loader import build_loader
    from fastssl.evaluation.online import evaluate_knn

    cfg, method, _ = load_for_eval(run)
    fresh = [build_loader(cfg.data, cfg.aug.resolved_views()[:1], split, 64, "cpu", train=False, drop_last=False,
                          workers=1) for split in ("train", "val")]
    again = evaluate_knn(method, *fresh, cfg, "cpu", 10)
    assert again["knn_top1"] == pytest.approx(s["knn_top1"], abs=1e-6)


def test_resume_continues_step_count_and_schedule_exactly(demo_data, tmp_path):
    base = ["--config", "configs/demo/simclr.yaml"]
    # One uninterrupted run of 8 steps (2 epochs x 6 steps, capped at 8 -> stops mid-epoch 2).
    assert main(base + tiny_overrides(demo_data, tmp_path / "a", **{"train.max_steps": 8})) == 0
    # The same run stopped at step 3 (mid-epoch), then resumed to step 8.
    assert main(base + tiny_overrides(demo_data, tmp_path / "b", **{"train.max_steps": 3})) == 0
    assert main(base + tiny_overrides(demo_data, tmp_path / "b", **{"train.max_steps": 8}) + ["--resume"]) == 0
    a, b = read_metrics(tmp_path / "a" / "t"), read_metrics(tmp_path / "b" / "t")
    assert [r["step"] for r in b] == list(range(1, 9)) == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["lr"] == ra["lr"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), (ra["step"], ra["loss"], rb["loss"])


def test_non_finite_loss_stops_naming_the_step(demo_data, tmp_path, monkeypatch, capsys):
    import torch

    from fastssl import losses

    real = losses.nt_xent
    calls = {"n": 0}

    def flaky(z1, z2, **kw):
        calls["n"] += 1
        out = real(z1, z2, **kw)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(losses, "nt_xent", flaky)
    rc = main(["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path))
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "input views were finite, so the model diverged" in err
    assert torch is not None


def test_non_finite_views_are_named_as_the_data_paths_fault(demo_data, tmp_path, monkeypatch, capsys):
    """A batch with a NaN pixel (a data-path fault) is told apart from a diverged model."""
    from fastssl.pipelines.augment import Augmenter
    from fastssl.pipelines.loader import LoaderBase

    real = LoaderBase._finish
    calls = {"n": 0}

    def corrupt(self, step, raw):
        batch = real(self, step, raw)
        if isinstance(self.finisher, Augmenter):
            calls["n"] += 1
            if calls["n"] == 3:
                batch.views[1][0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(LoaderBase, "_finish", corrupt)
    rc = main(["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path))
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "views fed to step 2 were already not finite" in err
    assert "data.backend=auto" in err


def test_steps_run_with_the_threads_the_trainer_chose(demo_data, tmp_path):
    """Importing ffcv set torch's threads to 1, after the trainer had chosen its count, so every
    CPU run computed on one thread. In a fresh process (ffcv not yet imported), the count read inside
    each training step equals the trainer's choice (cores // processes), and env.json / metrics say so."""
    import os
    import subprocess
    import sys

    from fastssl.rundir import cpu_threads

    code = f"""
import json, sys, torch
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from conftest import tiny_overrides
from fastssl.methods import simclr
seen = []
fwd = simclr.SimCLR.forward
def spy(self, views, step):
    seen.append(torch.get_num_threads())
    return fwd(self, views, step)
simclr.SimCLR.forward = spy
from fastssl.train import main
rc = main(["--config", "configs/demo/simclr.yaml"] + tiny_overrides({str(demo_data)!r}, {str(tmp_path)!r},
          **{{"train.max_steps": 3}}))
print(json.dumps({{"rc": rc, "seen": seen}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    want = cpu_threads(1)
    assert res["rc"] == 0 and len(res["seen"]) == 3 and set(res["seen"]) == {want}, (res, want)
    env = json.loads((tmp_path / "t" / "env.json").read_text())
    assert env["torch_threads"] == want
    assert env["host_alloc"] == ("retain" if platform.libc_ver()[0] == "glibc" else "system")  # train.host_alloc=auto, CPU
    assert {r["torch_threads"] for r in read_metrics(tmp_path / "t")} == {want}
