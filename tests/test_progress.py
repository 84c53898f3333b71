"""Progress of long work (fastssl.progress): a tqdm bar on a terminal, plain lines elsewhere, nothing when quiet."""
import io
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from tqdm import tqdm

from fastssl.progress import first_step, progress, quiet


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _main_process_not_quiet(monkeypatch):
    monkeypatch.delenv("FASTSSL_QUIET", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_not_a_terminal_prints_lines_with_rate_and_eta():
    out = io.StringIO()
    with progress(100, "work", "img", file=out) as p:
        assert not isinstance(p, tqdm)
        for _ in range(100):
            p.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # one per tenth, the last one the closing line
    assert all(re.match(r"work: \d+/100 img \(\d+%\), [\d.e+]+ img/s, ETA \d\d:\d\d$", l) for l in lines[:-1]), lines
    assert re.match(r"work: 100/100 img in \d\d:\d\d \([\d.e+]+ img/s\)$", lines[-1]), lines[-1]


def test_lines_every_n_items_with_postfix_and_resumed_start():
    out = io.StringIO()
    p = progress(20, "train", "step", file=out, initial=10, every=4)
    p.set_postfix(loss="1.234")
    for _ in range(10):
        p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert [l.split(" ")[1] for l in lines] == ["12/20", "16/20", "20/20"]
    assert all(l.endswith(", loss=1.234") for l in lines)


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    p = progress(5, "work", "img")
    assert isinstance(p, tqdm)
    p.update(5)
    p.log("a message")
    p.close()
    assert "\r" in term.getvalue() and "work" in term.getvalue() and "a message" in term.getvalue()


def test_quiet_disabled_and_other_ranks_print_nothing(monkeypatch, capsys):
    def run(**kw):
        p = progress(3, "work", **kw)
        for _ in range(3):
            p.update()
        p.log("message")
        p.close()
        return p

    with quiet():
        assert run().n == 3  # still counts
    run(enabled=False)
    monkeypatch.setenv("FASTSSL_QUIET", "1")
    run()
    monkeypatch.delenv("FASTSSL_QUIET")
    monkeypatch.setenv("RANK", "1")
    run()
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    run()
    assert "work: 3/3" in capsys.readouterr().out


def test_first_step_says_compiling_and_the_time(capsys):
    out = io.StringIO()
    bar = progress(4, "train", "step", file=out)
    with first_step("resnet50", bar):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "[fastssl] compiling resnet50 (first step)..."
    assert re.match(r"\[fastssl\] first step \(compiling resnet50 included\) took \d+\.\d s$", lines[1])
    with quiet():
        with first_step("resnet50", bar):
            pass
    with first_step("resnet50", bar, enabled=False):
        pass
    assert len(out.getvalue().splitlines()) == 2


def test_feature_extraction_reports_images(capsys):
    from fastssl.evaluation import extract_features

    class Loader:
        num_samples = 40

        def __iter__(self):
            for i in range(0, 40, 8):
                yield SimpleNamespace(views=[torch.randn(8, 3)], labels=torch.arange(i, i + 8))

    x, y = extract_features(lambda v: v * 2, Loader(), "cpu", progress="features train")
    assert x.shape == (40, 3) and torch.equal(y, torch.arange(40))
    out = capsys.readouterr().out
    assert "features train: 8/40 img (20%)" in out and "ETA" in out and "features train: 40/40 img in" in out
    extract_features(lambda v: v, Loader(), "cpu")  # no label: no progress
    assert capsys.readouterr().out == ""


def test_prepare_quiet_prints_nothing_else_lines(tmp_path, capfd):
    from fastssl.cli.prepare import main as prepare_main

    pytest.importorskip("ffcv")
    args = ["synthetic", "--classes", "2", "--per-class", "4", "--val-per-class", "2", "--size", "32", "--workers", "1"]
    assert prepare_main([args[0], str(tmp_path / "q")] + args[1:] + ["--quiet"]) == 0
    assert capfd.readouterr() == ("", "")  # ffcv's own bar (stderr) included
    assert prepare_main([args[0], str(tmp_path / "v")] + args[1:]) == 0
    out, err = capfd.readouterr()
    # Progress lines on stdout; the library's log lines (fastssl.logs) on stderr, one plain line each.
    assert "\r" not in out + err and all(line.startswith("fastssl: ") for line in err.splitlines()), err
    assert re.search(r"write train\.beton: 8/8 img in \d\d:\d\d \([\d.e+]+ img/s\)", out), out


def test_eval_and_prepare_have_quiet():
    from fastssl.cli.eval import main as eval_main
    from fastssl.cli.prepare import main as prepare_main

    for main in (eval_main, prepare_main):
        buf = io.StringIO()
        with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdout", buf)
            main(["--help"])
        assert "--quiet" in buf.getvalue()


def test_training_prints_a_line_per_log_point_when_not_a_terminal(demo_data, tmp_path, capsys, one_torch_thread):
    from conftest import tiny_overrides
    from fastssl.train import main

    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.progress": True, "train.max_steps": 4, "train.log_every": 2, "optim.batch_size": 8,
                                "eval.final": True, "eval.every_epochs": 0,
                                # the JPEG folders through torch: no loader JIT (ffcv's costs seconds a loader)
                                "data.train": demo_data / "train", "data.val": demo_data / "val",
                                "data.backend": "torch"})
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\r" not in out
    assert re.search(r"^train: 2/4 step \(50%\), [\d.e+]+ (step/s|s/step), ETA \d\d:\d\d, loss=", out, re.M), out
    assert re.search(r"^train: 4/4 step in ", out, re.M), out
    assert re.search(r"^eval: val features: 100/100 img in ", out, re.M), out
