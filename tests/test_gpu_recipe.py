"""The GPU recipe, imitated on the CPU where it can be: bf16 views through training and evaluation,
torch.compile in place (clean checkpoints) with an eager fallback, one graph per input size.

The ``cuda``-marked tests run the same paths on a GPU (``scripts/gpu_check.sh``); they use JPEG
folders, since the GPU machine has no ffcv.
"""
import functools
import json

import pytest
import torch
import torch.nn as nn

from conftest import tiny_overrides
from fastssl import compile as fc
from fastssl.train import main


def _jpeg_overrides(data, out, **extra):
    kv = {"data.train": f"{data}/train", "data.val": f"{data}/val", "data.backend": "torch", "data.workers": 1}
    kv.update(extra)
    return tiny_overrides(data, out, **kv)


def _counting(monkeypatch, backend):
    """Make the trainer compile with ``backend`` (a fast one on the CPU: the trainer's own settings otherwise)."""
    monkeypatch.setattr(fc, "compile_module", functools.partial(fc.compile_module, backend=backend))


# ----------------------------------------------------------------------------- bf16 views


def test_bf16_views_train_evaluate_and_fastssl_eval(jpeg_data, tmp_path, monkeypatch):
    """train.precision=bf16 on the CPU: the loader hands bf16 views (as on CUDA); the random-init kNN, the
    final kNN and fastssl-eval (whose loaders default to bf16 on CUDA: forced here) all embed them."""
    from fastssl.cli.eval import main as eval_main
    from fastssl.pipelines import loader as L

    seen = []
    real = L.make_finisher

    def spy(*a, **k):
        f = real(*a, **k)
        seen.append(f.dtype if f is not None else None)
        return f

    monkeypatch.setattr(L, "make_finisher", spy)
    args = ["--config", "configs/demo/simclr.yaml"] + _jpeg_overrides(
        jpeg_data, tmp_path, **{"train.precision": "bf16", "train.max_steps": 2, "eval.final": True,
                                "eval.online_probe": False})
    assert main(args) == 0
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["precision"] == "bf16" and s["knn_top1"] is not None and s["knn_top1_init"] is not None

    # fastssl-eval builds its own loaders with the device default (bf16 on CUDA): force that default here.
    orig_init = L.Normalize.__init__
    monkeypatch.setattr(L.Normalize, "__init__", lambda self, device, dtype=None: orig_init(self, device, torch.bfloat16))
    assert eval_main([str(tmp_path / "t"), "--knn", "--device", "cpu"]) == 0
    assert "knn_top1" in json.loads((tmp_path / "t" / "eval.json").read_text())


def test_fp32_precision_gives_fp32_views(jpeg_data, tmp_path, monkeypatch):
    """train.precision=fp32 must not get the CUDA default (bf16) views: the trainer passes its dtype down."""
    from fastssl.pipelines import loader as L

    seen = []
    real = L.make_finisher
    monkeypatch.setattr(L, "make_finisher", lambda *a, **k: seen.append(k.get("dtype", a[5] if len(a) > 5 else None))
                        or real(*a, **k))
    args = ["--config", "configs/demo/simclr.yaml"] + _jpeg_overrides(
        jpeg_data, tmp_path, **{"train.precision": "fp32", "train.max_steps": 1})
    assert main(args) == 0
    assert seen and all(d == torch.float32 for d in seen), seen


# ----------------------------------------------------------------------------- compile


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def test_compile_in_place_keeps_state_dict_keys_and_output():
    net = _net()
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    out = fc.compile_module(net, backend="aot_eager")
    assert out is net and list(net.state_dict()) == keys
    assert not any("_orig_mod" in k for k in net.state_dict())
    torch.testing.assert_close(net(x), want)
    assert fc.is_compiled(net)


def test_compile_failure_at_first_call_falls_back_to_eager(capsys, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    net = _net()
    x = torch.randn(2, 3, 8, 8)
    want = net(x)
    fc.compile_module(net, backend=broken)
    torch.testing.assert_close(net(x), want)  # the first call already answers, eagerly
    torch.testing.assert_close(net(x), want)
    assert not fc.is_compiled(net)
    # A warning of the fastssl.compile logger: in pytest's capture, or on stderr once a CLI configured logging.
    err, logged = capsys.readouterr().err, caplog.text
    msg = "torch.compile of the backbone failed"
    assert max(err.count(msg), logged.count(msg)) == 1 and "running eager" in err + logged


def test_an_out_of_memory_first_step_is_raised_not_taken_for_a_compiler_failure(monkeypatch):
    """The first step's OOM goes to the trainer's handler (which names the fix); falling back to eager
    would run on uncompiled for good, or fail again beside the failed graph's buffers."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: oom)
    net = fc.compile_module(_net())
    with pytest.raises(torch.OutOfMemoryError):
        net(torch.randn(2, 3, 8, 8))
    assert not net.compile_state["failed"] and not hasattr(net, "compile_error")


def test_a_model_error_is_not_hidden_by_the_fallback():
    net = fc.compile_module(_net(), backend="aot_eager")
    net(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 5, 8, 8))  # wrong channel count: the model's error, raised as it is


def test_one_graph_per_input_size_no_dynamic_recompiles():
    """The trainer's setting (dynamic=False): each size of a run (DINO's 2 crops, progressive resolution)
    compiles once, and going back to a seen size reuses its graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cnt = CompileCounter()
    net = fc.compile_module(_net(), backend=cnt)
    for s in (16, 8, 16, 8, 24, 16):
        net(torch.randn(2, 3, s, s))
    assert cnt.frame_count == 3


def test_trainer_compiles_dino_once_per_crop_size_and_checkpoint_loads_uncompiled(demo_data, tmp_path, monkeypatch):
    """train.compile=on with DINO's multi-crop: 2 graphs (global, local size), no more over several steps;
    the checkpoint has no `_orig_mod.` keys and loads into an uncompiled method (fastssl-eval's path)."""
    from torch._dynamo.testing import CompileCounter

    from fastssl.checkpoint import load, load_for_eval

    torch._dynamo.reset()
    cnt = CompileCounter()
    _counting(monkeypatch, cnt)
    ov = tiny_overrides(demo_data, tmp_path, **{"train.compile": "on", "train.max_steps": 3, "aug.global_size": 16,
                                                "aug.local_size": 8, "aug.num_local": 2, "method.out_dim": 64,
                                                "method.hidden": 32, "method.bottleneck": 16,
                                                "model.backbone": "vit_micro_patch8"})
    args = ["--config", "configs/demo/dino.yaml"] + [o for o in ov if not o.startswith("method.proj_")]
    assert main(args) == 0
    assert cnt.frame_count == 2, cnt.frame_count
    sd = load(tmp_path / "t" / "checkpoints" / "last.pt")["method"]
    assert not any("_orig_mod" in k for k in sd)
    cfg, method, step = load_for_eval(tmp_path / "t")
    assert step == 3 and not fc.is_compiled(method.backbone)


def test_evaluation_runs_the_backbone_eager(jpeg_data, tmp_path, monkeypatch):
    """kNN evaluation (other batch sizes, no_grad) must not compile new graphs: with compile on, the graphs
    counted after a run with evaluations equal those of the training steps alone."""
    from torch._dynamo.testing import CompileCounter

    counts = []
    for final in (False, True):
        torch._dynamo.reset()
        cnt = CompileCounter()
        _counting(monkeypatch, cnt)
        args = ["--config", "configs/demo/simclr.yaml"] + _jpeg_overrides(
            jpeg_data, tmp_path / str(final), **{"train.compile": "on", "train.max_steps": 2, "eval.final": final})
        assert main(args) == 0
        counts.append(cnt.frame_count)
    assert counts[0] == counts[1] >= 1, counts


def test_old_checkpoints_with_wrapper_prefixes_still_load(demo_data, tmp_path):
    from fastssl.checkpoint import load, load_for_eval, save_atomic

    assert main(["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path,
                                                                         **{"train.max_steps": 1})) == 0
    p = tmp_path / "t" / "checkpoints" / "last.pt"
    state = load(p)
    state["method"] = {k.replace("backbone.", "backbone._orig_mod.", 1): v for k, v in state["method"].items()}
    save_atomic(state, p)
    _, method, _ = load_for_eval(p)
    assert fc.clean_state_dict({"module.backbone._orig_mod.w": 1}) == {"backbone.w": 1}
    assert method is not None


# ----------------------------------------------------------------------------- the same on a GPU


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.cuda
def test_cuda_bf16_compiled_run_evaluates_and_reloads(jpeg_data, tmp_path):
    """The GPU recipe end to end: bf16 views, compiled backbone (inductor), kNN before and after, fastssl-eval."""
    _cuda()
    from fastssl.cli.eval import main as eval_main
    from fastssl.checkpoint import load

    args = ["--config", "configs/demo/simclr.yaml"] + _jpeg_overrides(
        jpeg_data, tmp_path, **{"train.device": "cuda", "train.max_steps": 3, "eval.final": True})
    assert main(args) == 0
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    env = json.loads((tmp_path / "t" / "env.json").read_text())
    assert s["precision"] == "bf16" and s["knn_top1"] is not None and "gpu" in env
    assert not any("_orig_mod" in k for k in load(tmp_path / "t" / "checkpoints" / "last.pt")["method"])
    assert eval_main([str(tmp_path / "t"), "--knn", "--device", "cuda"]) == 0


@pytest.mark.cuda
def test_cuda_fp32_run(jpeg_data, tmp_path):
    _cuda()
    args = ["--config", "configs/demo/simclr.yaml"] + _jpeg_overrides(
        jpeg_data, tmp_path, **{"train.device": "cuda", "train.precision": "fp32", "train.compile": "off",
                                "train.max_steps": 2, "eval.final": True})
    assert main(args) == 0


@pytest.mark.slow
def test_gpu_recipe_on_the_cpu_through_resume_eval_and_export(demo_data, tmp_path, capsys):
    """configs/demo/simclr_gpu_recipe.yaml (bf16 autocast, inductor compile, channels_last) on the
    CPU: train, checkpoint, resume step for step, fastssl-eval and fastssl-export load what it wrote."""
    from fastssl.checkpoint import load
    from fastssl.cli.eval import main as eval_main
    from fastssl.cli.export import main as export_main

    torch._dynamo.reset()
    base = ["--config", "configs/demo/simclr_gpu_recipe.yaml"]
    ov = tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 2, "model.backbone": "resnet_nano"})
    assert main(base + ov) == 0
    run = tmp_path / "t"
    env = json.loads((run / "env.json").read_text())
    assert env["precision"] == "bf16" and env["compiled"] is True
    assert main(base + ov[:-1] + ["train.max_steps=3", "--resume"]) == 0
    assert "torch.compile of the backbone failed" not in capsys.readouterr().err  # inductor ran, no fallback
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3]
    sd = load(run / "checkpoints" / "last.pt")["method"]
    assert not any("_orig_mod" in k for k in sd)
    assert eval_main([str(run), "--knn", "--device", "cpu"]) == 0
    assert export_main([str(run), "--out", str(tmp_path / "bb.safetensors")]) == 0
    assert (tmp_path / "bb.safetensors").is_file() and (tmp_path / "bb.json").is_file()
