"""Nothing lost: a real SIGTERM mid-run, resume=auto, checkpoint history and fallback, one writer."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fastssl.faults import PREEMPTED_EXIT_CODE, CheckpointHistory, config_differences
from fastssl.train import main

ROOT = Path(__file__).resolve().parents[1]


def metrics(run, kind="train"):
    p = run / "metrics.jsonl"
    if not p.exists():
        return []
    return [r for r in map(json.loads, p.read_text().splitlines()) if r["kind"] == kind]


def ckpts(run):
    return sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_signal_checkpoints_and_exits_then_auto_resume_continues(demo_data, tmp_path, sig):
    """A real signal to a training process: it finishes its step, writes a checkpoint (periodic ones are
    off), exits with 75; the same command with train.resume=auto then continues from that step."""
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.epochs": 40, "train.ckpt_every_epochs": 1000, "train.resume": "auto"})
    p = subprocess.Popen([sys.executable, "-m", "fastssl.train"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    run = tmp_path / "t"
    deadline = time.time() + 240
    while time.time() < deadline and not any(r["step"] >= 3 for r in metrics(run)):
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    stopped = metrics(run, "preempted")
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.Signals(sig).name
    at = stopped[0]["step"]
    assert at >= 3 and (run / "checkpoints" / "last.pt").is_file()
    assert f"stopped at step {at}" in err and "train.resume=auto" in err

    # The requeued job: the same command, cut short so that the test stays fast.
    assert main(args + [f"train.max_steps={at + 2}"]) == 0
    after = [r["step"] for r in metrics(run)]
    assert after[-2:] == [at + 1, at + 2], after[-6:]


def test_auto_resume_refuses_another_config_and_starts_when_nothing_to_resume(demo_data, tmp_path, capsys):
    base = ["--config", "configs/demo/simclr.yaml"]
    ov = tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 2, "train.resume": "auto"})
    assert main(base + ov) == 0                                     # nothing there yet: a new run
    assert main(base + ov + ["optim.lr=0.5"]) == 2                   # another config: refused, nothing written
    err = capsys.readouterr().err
    assert "train.resume=auto" in err and "optim.lr" in err and "another train.name" in err
    assert config_differences({"train": {"max_steps": 1}}, {"train": {"max_steps": 5}}) == []


def test_keeps_the_last_k_and_falls_back_from_a_truncated_last(demo_data, tmp_path, capsys):
    base = ["--config", "configs/demo/simclr.yaml"]
    ov = tiny_overrides(demo_data, tmp_path, **{"train.epochs": 4, "train.ckpt_every_epochs": 1,
                                                "train.keep_checkpoints": 2, "train.max_steps": 18})
    assert main(base + ov) == 0
    run = tmp_path / "t"
    assert ckpts(run) == ["ckpt-000000012.pt", "ckpt-000000018.pt"]        # 6 steps an epoch; the newest 2
    last = run / "checkpoints" / "last.pt"
    assert os.path.samefile(last, run / "checkpoints" / "ckpt-000000018.pt")  # a link, not a copy
    # Truncate the newest (last.pt is the same file): resume falls back to step 12 and says which file.
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert main(base + ov[:-1] + ["train.max_steps=14", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "last.pt" in err and "unreadable" in err and "ckpt-000000012.pt" in err
    assert [r["step"] for r in metrics(run)][-2:] == [13, 14]


def test_no_readable_checkpoint_is_one_line(demo_data, tmp_path, capsys):
    base = ["--config", "configs/demo/simclr.yaml"]
    ov = tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 1})
    assert main(base + ov) == 0
    for p in (tmp_path / "t" / "checkpoints").glob("*.pt"):
        p.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(base + ov + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastssl-train: no readable checkpoint in") and "Traceback" not in "\n".join(err)


def test_two_runs_with_one_name_cannot_both_write(demo_data, tmp_path, capsys):
    import socket

    run = tmp_path / "t"
    run.mkdir(parents=True)
    (run / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")   # a live owner: this test process
    ov = tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 1})
    assert main(["--config", "configs/demo/simclr.yaml"] + ov) == 2
    assert "another run" in capsys.readouterr().err and not (run / "metrics.jsonl").exists()
    # A stale lock (its process is gone) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(f"{socket.gethostname()} {dead.stdout.strip()}")
    assert main(["--config", "configs/demo/simclr.yaml"] + ov) == 0
    assert not (run / ".lock").exists()                                     # released at the end


def test_missing_data_is_one_line(tmp_path, capsys):
    ov = tiny_overrides(tmp_path / "nowhere", tmp_path)
    assert main(["--config", "configs/demo/simclr.yaml"] + ov) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "fastssl-prepare" in err[0]


def test_history_unit(tmp_path):
    h = CheckpointHistory(tmp_path, keep=3)
    for s in (1, 2, 3, 4, 5):
        h.save({"step": s}, s)
    assert [p.name for p in h.history()] == ["ckpt-000000005.pt", "ckpt-000000004.pt", "ckpt-000000003.pt"]
    state, path = h.load_latest()
    assert state["step"] == 5 and path.name == "last.pt"
    h.clear()
    assert not h.exists() and not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("method,extra", [
    ("nnclr", {"method.queue_size": 64}),
    pytest.param("swav", {"method.queue_size": 64, "method.queue_start_epochs": 0, "aug.num_local": 2,
                          "aug.local_size": 8}, marks=pytest.mark.slow),
])
def test_queues_resume_exactly(demo_data, tmp_path, method, extra):
    """Queues (NNCLR's support set, SwAV's feature queue) are in the checkpoint: stopped at step 3 and resumed,
    the losses of steps 4-8 equal those of an uninterrupted run."""
    base = ["--config", f"configs/demo/{method}.yaml"]
    kv = {"train.max_steps": 8, **extra}
    assert main(base + tiny_overrides(demo_data, tmp_path / "a", **kv)) == 0
    assert main(base + tiny_overrides(demo_data, tmp_path / "b", **{**kv, "train.max_steps": 3})) == 0
    assert main(base + tiny_overrides(demo_data, tmp_path / "b", **kv) + ["--resume"]) == 0
    a, b = metrics(tmp_path / "a" / "t"), metrics(tmp_path / "b" / "t")
    assert [r["step"] for r in b] == list(range(1, 9)) == [r["step"] for r in a]
    for ra, rb in zip(a[3:], b[3:]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), (method, ra["step"])
