"""The timed single-GPU ImageNet SimCLR script, dry-run on the CPU end to end."""
import json

import pytest

from fastssl.cli.timed import main


@pytest.mark.slow  # ~2-5 min on 2 cores: ImageNet-like JPEGs, prepare, train, eval, report
def test_timed_dry_run_end_to_end_writes_time_to_accuracy(tmp_path):
    rc = main(["--dry-run", "--epochs", "2", "--out", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")])
    assert rc == 0
    run = tmp_path / "runs" / "timed-dry-run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["knn_top1"] is not None
    assert (run / "eval.json").exists()
    report = (run / "report" / "report.md").read_text()
    assert "time to" in report.lower()
    # The estimate made before training projects the training it then measured to within 25%.
    timed = json.loads((run / "timed.json").read_text())
    print(f"estimate / measured training: {timed['estimate_over_actual_train']:.2f}")
    assert 0.75 <= timed["estimate_over_actual_train"] <= 1.25, timed


def test_estimate_projects_each_resolution_phase(demo_data):
    """The estimate times the recipe's phases through the real loader and says what limits each."""
    from fastssl.config import load_config
    from fastssl.estimate import estimate, phases_of

    cfg = load_config("configs/demo/simclr.yaml", [
        f"data.train={demo_data}/train.beton", f"data.val={demo_data}/val.beton", "data.workers=1",
        "aug.global_size=32", "train.res_start=16", "train.res_step=16", "train.epochs=4", "train.res_end_epoch=0.5",
        "model.backbone=resnet_tiny", "method.proj_hidden=64", "method.proj_dim=32", "optim.batch_size=32",
        "eval.every_epochs=2", "eval.final=true", "eval.knn_stride=4", "train.progress=false"])
    assert [(p.size, p.first_epoch, p.epochs) for p in phases_of(cfg)] == [(16, 0, 1), (32, 1, 3)]
    est = estimate(cfg, timed=2, eval_batches=1, n_train=1000, linear_epochs=2)
    steps_per_epoch = 1000 // 32
    assert [p.steps for p in est.phases] == [steps_per_epoch, 3 * steps_per_epoch]  # projected to n_train
    for p in est.phases:
        assert p.step_s > 0 and p.model_step_s > 0 and p.data_step_s > 0 and p.limit in ("data", "model")
        assert p.projected_s >= p.steps * p.step_s
    # epochs 1-3 with every 2: one periodic evaluation (1 in 4 train images); init and final read the whole split
    assert est.evals_in_training == 1 and est.eval_stride == 4 and est.eval_each_s > 0
    assert est.init_eval_s == est.final_eval_s > 0
    assert est.total_s == pytest.approx(est.train_s + est.eval_each_s + 2 * est.final_eval_s)
    assert est.to_dict()["eval_fraction"] == pytest.approx((est.eval_each_s + est.init_eval_s) / est.train_s)
    text = "\n".join(est.lines())
    assert "train   16 px" in text and "-bound" in text and "total" in text and "model alone" in text
    assert est.model_alone_s == pytest.approx(sum(p.steps * p.model_step_s for p in est.phases))
    assert est.to_dict()["model_alone_s"] == est.model_alone_s
    # Evaluations: each image at the slower of the forward and the loader; the linear protocol at its own
    # loader's (random resized crops over the train split), and the breakdown says which bounds each.
    assert est.eval_model_s > 0 and est.eval_data_s > 0 and est.linear_data_s > 0
    assert est.linear_eval_s == pytest.approx(max(est.eval_model_s, est.linear_data_s) * 1000 * 2)
    assert "(centre crops): " in text and "(random resized crops): " in text
    assert est.to_dict()["eval_limit"] == est.eval_limit and est.to_dict()["linear_limit"] == est.linear_limit


def test_estimate_projects_the_knn_from_full_blocks_of_the_runs_plan(monkeypatch):
    """The kNN projection is (blocks of the run's plan) x (one timed block): a fake clock that ticks once
    per block must read back exactly the run's block count, however small the timed bank is."""
    import types

    import torch

    import fastssl.evaluation as ev
    from fastssl import estimate as est

    ticks = {"blocks": 0}
    real = ev.knn_scores

    def counting(train, labels, test, classes, k, temperature, **kw):
        plan = ev.knn_plan(len(test), len(train), train.shape[1], k, kw["budget_bytes"])
        ticks["blocks"] += -(-len(test) // plan.chunk_test) * -(-len(train) // plan.chunk_train)
        return real(train[:4], labels[:4], test[:4], classes, min(k, 4), temperature)  # the work is not the point

    class Clock:
        def now(self):
            return float(ticks["blocks"])

    monkeypatch.setattr(ev, "knn_scores", counting)
    cfg = types.SimpleNamespace(eval=types.SimpleNamespace(knn_k=20, knn_temperature=0.07))
    bank, labels = torch.randn(96, 64), torch.arange(96) % 10
    n_train, n_val = 1_281_167, 50_000
    plan = ev.knn_plan(n_val, n_train, 64, 20, ev.KNN_BUDGET_BYTES["cpu"])
    want = -(-n_val // plan.chunk_test) * -(-n_train // plan.chunk_train)
    got = est._time_knn(bank, labels, n_train, n_val, cfg, Clock())
    assert want > 100 and got == pytest.approx(want)
    assert est._time_knn(bank, labels, 50, 20, cfg, Clock()) == pytest.approx(1.0)  # a bank of one block: that block


class _PrefetchingLoader:
    """A loader stand-in that decodes on its own thread into ``ahead + 2`` slots, as ffcv does: each batch of
    ``batch`` images takes ``decode_s``; batches decoded while the consumer is busy read back at no cost."""

    def __init__(self, batches: int, batch: int, decode_s: float, ahead: int = 2):
        import threading

        self.batches, self.batch, self.decode_s, self.ahead = batches, batch, decode_s, ahead
        self.num_samples, self._stop, self._lock = batches * batch, None, threading.Lock()

    def __len__(self):
        return self.batches

    def set_epoch(self, epoch, global_size=None):
        if self._stop is not None:
            self._stop.set()

    def __iter__(self):
        import queue
        import threading
        import time
        import types

        import torch

        q, stop = queue.Queue(self.ahead + 2), threading.Event()
        self._stop = stop

        def produce():
            for b in range(self.batches):
                time.sleep(self.decode_s)
                batch = types.SimpleNamespace(views=[torch.zeros(self.batch, 3, 8, 8)],
                                              labels=torch.arange(self.batch) % 4)
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while (b := q.get()) is not None:
            yield b


def _eval_stand_ins(cold_s: float, forward_s: float):
    """A core whose backbone's first (eager, cold) forward takes ``cold_s`` and every later one ``forward_s``."""
    import time
    import types

    import torch

    class Method(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.calls = torch.nn.Identity(), 0

        def embed(self, x):
            self.calls += 1
            time.sleep(cold_s if self.calls == 1 else forward_s)
            return x.flatten(1)[:, :16]

    method = Method()
    return types.SimpleNamespace(eval_method=lambda: method)


def test_eval_projection_reads_the_data_rate_when_the_loader_is_slower_than_the_model():
    """The extraction is bound by the loader here: decoded batches do not pile up ahead of a fast model.
    Timing forwards on the batches that follow a slow first (cold) forward would read back ones the loader
    decoded meanwhile, at the model's rate; the data alone, from an emptied queue, gives the loader's."""
    import torch

    from fastssl import estimate as est

    batch, decode_s = 16, 0.04
    core = _eval_stand_ins(cold_s=0.4, forward_s=0.0)
    loaders = {"train": _PrefetchingLoader(14, batch, decode_s), "val": _PrefetchingLoader(2, batch, decode_s)}
    linear = _PrefetchingLoader(3, batch, 2 * decode_s)  # the protocol's crops: slower, and a short epoch
    ev = est._time_eval(core, lambda split, *a: loaders[split], [None], est._Clock(torch.device("cpu")), 2,
                        linear_loader=linear)
    per_image = decode_s / batch
    assert ev.model_s < 0.2 * per_image
    assert ev.data_s == pytest.approx(per_image, rel=0.5)
    assert ev.per_image == ev.data_s  # the projection is the loader's rate, not the model's
    assert ev.linear_per_image == ev.linear_data_s >= 1.5 * ev.data_s  # the protocol's own loader bounds it
    assert (ev.n_train, ev.n_val) == (14 * batch, 2 * batch) and len(ev.bank) == len(ev.labels) == batch
    e = est.Estimate(device="cpu", final_eval_s=1.0, linear_eval_s=10.0, linear_epochs=90,
                     eval_model_s=ev.model_s, eval_data_s=ev.data_s, linear_data_s=ev.linear_data_s)
    assert e.eval_limit == e.linear_limit == "data"
    text = "\n".join(e.lines())
    assert "(centre crops): data-bound" in text and "(random resized crops): data-bound" in text
    assert e.to_dict()["eval_limit"] == e.to_dict()["linear_limit"] == "data"


def test_eval_projection_reads_the_model_rate_when_the_model_is_slower_than_the_loader():
    import torch

    from fastssl import estimate as est

    batch, forward_s = 16, 0.03
    core = _eval_stand_ins(cold_s=0.1, forward_s=forward_s)
    loaders = {"train": _PrefetchingLoader(14, batch, 0.0), "val": _PrefetchingLoader(2, batch, 0.0)}
    ev = est._time_eval(core, lambda split, *a: loaders[split], [None], est._Clock(torch.device("cpu")), 2,
                        linear_loader=_PrefetchingLoader(3, batch, 0.0))
    per_image = forward_s / batch
    assert ev.model_s == pytest.approx(per_image, rel=0.5)
    assert ev.data_s < 0.5 * ev.model_s and ev.linear_data_s < 0.5 * ev.model_s
    assert ev.per_image == ev.linear_per_image == ev.model_s
    e = est.Estimate(device="cpu", final_eval_s=1.0, linear_eval_s=10.0, linear_epochs=90,
                     eval_model_s=ev.model_s, eval_data_s=ev.data_s, linear_data_s=ev.linear_data_s)
    assert e.eval_limit == e.linear_limit == "model"
    assert "(random resized crops): model-bound" in "\n".join(e.lines())

