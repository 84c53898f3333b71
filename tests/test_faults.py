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


# ----------------------------------------------------------------------------- injected faults (FASTSSL_FAULT)
# Each fault once, in process, on the tiny run: the exit code, the one line, what is left on disk and that the
# run then finishes. tests/test_chaos.py does the same in fresh processes through the environment variable.

from fastssl import fault_injection  # noqa: E402
from fastssl.faults import (DISK_FULL_EXIT_CODE, LOADER_WORKER_EXIT_CODE, OUT_OF_MEMORY_EXIT_CODE,  # noqa: E402
                            RANK_HUNG_EXIT_CODE, Watchdog)


@pytest.fixture
def fault():
    """``fault("enospc@save:2")`` arms the switch for this test; it is off again afterwards."""
    yield fault_injection.configure
    fault_injection.configure(None)


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fastssl-train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_fault_switch_grammar():
    f = fault_injection.parse("enospc@save:3, hang@rank1:step:4,oom@step,die@worker:17")
    assert [(x.kind, x.site, x.n, x.rank) for x in f] == [("enospc", "save", 3, None), ("hang", "step", 4, 1),
                                                         ("oom", "step", 1, None), ("die", "worker", 17, None)]
    assert fault_injection.parse("") is None and fault_injection.parse(None) is None
    for bad in ("enospc@step:3", "oom", "oom@step:x", "boom@save:1", "hang@rank1:step:4:5"):
        with pytest.raises(ValueError, match="FASTSSL_FAULT"):
            fault_injection.parse(bad)
    try:
        fault_injection.configure("enospc@save:2,oom@rank3:step:1")
        assert [fault_injection.fire("enospc", "save") for _ in range(4)] == [False, True, False, False]
        assert not fault_injection.fire("oom", "step", at=1)          # another rank's fault (RANK unset: 0)
    finally:
        fault_injection.configure(None)
    assert fault_injection.PLAN is None and not fault_injection.fire("enospc", "save")


def test_checkpoint_disk_full_stops_keeps_the_previous_and_resume_finishes(demo_data, tmp_path, capsys, fault):
    """The second checkpoint write meets a full disk: exit 4, one line naming the file, the bytes needed and the
    last good checkpoint; no partial file; the first checkpoint loads; resume=auto then finishes the run."""
    from fastssl.checkpoint import load

    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 4, "train.ckpt_every_steps": 2, "train.resume": "auto"})
    fault("enospc@save:2")
    assert main(args) == DISK_FULL_EXIT_CODE
    line = one_line(capsys.readouterr().err)
    folder = tmp_path / "t" / "checkpoints"
    assert "no space left" in line and str(folder / "ckpt-000000004.pt") in line and "needed" in line
    assert f"last good checkpoint: {folder / 'ckpt-000000002.pt'}" in line and "train.resume=auto" in line
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000002.pt", "last.pt"]   # no .tmp left
    assert load(folder / "last.pt")["step"] == 2
    fault(None)
    assert main(args) == 0
    # steps 3 and 4 were logged before the failed save; resumed from step 2, they are logged once, again
    assert load(folder / "last.pt")["step"] == 4 and [r["step"] for r in metrics(tmp_path / "t")] == [1, 2, 3, 4]


def test_metrics_disk_full_stops_with_whole_lines(demo_data, tmp_path, capsys, fault):
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 5})
    fault("enospc@metrics:3")
    assert main(args) == DISK_FULL_EXIT_CODE
    line = one_line(capsys.readouterr().err)
    path = tmp_path / "t" / "metrics.jsonl"
    assert f"no space left on the disk of {path} (metrics.jsonl)" in line and "last good checkpoint: none" in line
    text = path.read_text()
    assert text.endswith("\n") and len([json.loads(x) for x in text.splitlines()]) == 2   # the half line is gone


def test_out_of_memory_mid_run_saves_the_last_step_and_names_the_fix(demo_data, tmp_path, capsys, fault):
    """An out-of-memory step 3 (before its optimizer step): the state after step 2 is written, the line names the
    step, the checkpoint and what to change; the run then resumes from that checkpoint."""
    from fastssl.checkpoint import load

    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 4, "train.ckpt_every_epochs": 1000})
    fault("oom@step:3")
    assert main(args) == OUT_OF_MEMORY_EXIT_CODE
    line = one_line(capsys.readouterr().err)
    folder = tmp_path / "t" / "checkpoints"
    assert "out of GPU memory at step 3" in line and "optim.accum_steps=2" in line and "optim.batch_size" in line
    assert f"wrote {folder / 'ckpt-000000002.pt'}" in line and "train.resume=true" in line
    assert load(folder / "last.pt")["step"] == 2
    fault(None)
    assert main(args + ["--resume"]) == 0
    assert [r["step"] for r in metrics(tmp_path / "t")][-2:] == [3, 4]


def test_out_of_memory_inside_the_update_saves_nothing_part_updated(demo_data, tmp_path, capsys, fault):
    """An out-of-memory error inside step 3's update (the optimizer's temporaries, a teacher's EMA) may leave
    weights and optimizer state part-updated: nothing is saved as step 2; the last good checkpoint is named."""
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 4, "train.ckpt_every_epochs": 1000})
    fault("oom@update:3")
    assert main(args) == OUT_OF_MEMORY_EXIT_CODE
    line = one_line(capsys.readouterr().err)
    assert "out of GPU memory at step 3" in line and "wrote" not in line and "last good checkpoint: none" in line
    assert not list((tmp_path / "t" / "checkpoints").glob("*.pt"))


def test_out_of_memory_at_the_first_step_writes_nothing(demo_data, tmp_path, capsys, fault):
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 2})
    fault("oom@step:1")
    assert main(args) == OUT_OF_MEMORY_EXIT_CODE
    line = one_line(capsys.readouterr().err)
    assert "out of GPU memory at the first step of this run (step 1)" in line and "peak not measured" in line
    assert "last good checkpoint: none (no checkpoint yet)" in line and "optim.accum_steps=2" in line
    assert not list((tmp_path / "t" / "checkpoints").glob("*.pt"))


def test_export_disk_full_leaves_nothing(demo_data, tmp_path, capsys, fault):
    from fastssl.cli.export import main as export_main

    assert main(["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path,
                                                                         **{"train.max_steps": 1})) == 0
    out = tmp_path / "x" / "b.safetensors"
    fault("enospc@export")
    assert export_main([str(tmp_path / "t"), "--out", str(out)]) == DISK_FULL_EXIT_CODE
    err = capsys.readouterr().err
    assert f"no space left on the disk of {out} (export)" in err and "export again" in err
    assert not list(out.parent.iterdir())


@pytest.mark.parametrize("kind", ["die", "hang"])
def test_loader_worker_death_or_hang_is_one_line(demo_data, tmp_path, capsys, fault, kind):
    """A torch-back-end worker killed (as by the OOM killer) or stuck: exit 7, one line naming the worker."""
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"data.train": demo_data / "train", "data.val": "", "data.backend": "torch",
                                "train.max_steps": 6, "data.worker_timeout": 5})   # one epoch: every sample
    fault(f"{kind}@worker:7")
    assert main(args) == LOADER_WORKER_EXIT_CODE
    line = one_line(capsys.readouterr().err)
    assert "data-loader worker" in line and "pid" in line and "train.resume=auto" in line
    if kind == "die":
        assert "died" in line and "SIGKILL" in line
    else:
        assert "sent nothing for 5 s (data.worker_timeout)" in line and "samples" in line


def _beat(folder, rank, step, phase="train", age=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"rank-{rank:05d}"
    p.write_text(json.dumps({"rank": rank, "step": step, "phase": phase, "pid": 100 + rank, "host": "h"}))
    t = time.time() - age
    os.utime(p, (t, t))


def test_watchdog_names_the_silent_rank_and_excuses_a_busy_one(tmp_path):
    dog = Watchdog(tmp_path, rank=0, world=3, timeout=10, first_timeout=60, last_good=lambda: "ckpt-7.pt")
    dog.step, dog.phase = 4, "train"
    _beat(tmp_path / "heartbeat", 1, 4)
    _beat(tmp_path / "heartbeat", 2, 3, age=100)          # stopped: its file is 100 s old
    line = dog.diagnose(12)
    assert line.startswith("rank 2 stopped responding (no heartbeat for 100 s; its last recorded step 3, pid 102 on h)")
    assert "rank 0 waited 12 s after step 4" in line and "last good checkpoint: ckpt-7.pt" in line
    assert f"exit {RANK_HUNG_EXIT_CODE}" in line
    _beat(tmp_path / "heartbeat", 2, 4, phase="eval")     # alive and evaluating: the wait is excused
    assert dog.diagnose(12) is None
    _beat(tmp_path / "heartbeat", 2, 3)                   # alive, one step behind, stuck
    assert dog.diagnose(12).startswith("rank(s) 2 made no progress past step 3")


def test_watchdog_thread_fires_when_steps_stop(tmp_path):
    """The thread notices that no step finished within the timeout and calls its exit with code 6."""
    import threading

    codes, done = [], threading.Event()

    def fake_exit(code):
        codes.append(code)
        done.set()

    lines = []
    dog = Watchdog(tmp_path, rank=0, world=2, timeout=0.5, first_timeout=0.5, exit=fake_exit,
                   on_fire=lines.append, last_good=lambda: "none")
    _beat(tmp_path / "heartbeat", 1, 0, age=1000)
    dog.start()
    dog.set_phase("train")
    assert done.wait(120), "the watchdog never fired"
    dog.stop()
    assert codes == [RANK_HUNG_EXIT_CODE] and lines[0].startswith("rank 1 stopped responding")
    # a rank that ends says so: a peer still waiting blames it without waiting for its file to age
    assert json.loads((tmp_path / "heartbeat" / "rank-00000").read_text())["phase"] == "exited"
    peer = Watchdog(tmp_path, rank=1, world=2, timeout=10, first_timeout=10, last_good=lambda: "none")
    peer.step, peer.phase = 3, "train"
    assert peer.diagnose(11).startswith("rank 0 exited (its own output says why; its last recorded step 0")


def test_faults_met_outside_fastssl_handlers_are_still_one_line(tmp_path):
    """What reaches fastssl-train's main() unhandled: a full disk anywhere, a library's out-of-memory text, torch's
    SIGCHLD message for a killed worker; anything else stays an error of its own (None)."""
    import errno

    import torch

    from fastssl.faults import environmental_fault, is_out_of_memory

    disk = environmental_fault(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "summary.json")),
                               tmp_path)
    assert disk.exit_code == DISK_FULL_EXIT_CODE and str(tmp_path / "summary.json") in str(disk)
    assert "last good checkpoint: none (no checkpoint yet)" in str(disk)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert environmental_fault(RuntimeError("cuDNN error: out of memory"), tmp_path).exit_code == OUT_OF_MEMORY_EXIT_CODE
    worker = environmental_fault(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "), tmp_path)
    assert worker.exit_code == LOADER_WORKER_EXIT_CODE and "pid 4242" in str(worker) and "Killed" in str(worker)
    assert environmental_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), tmp_path) is None
    assert environmental_fault(OSError(errno.EACCES, "Permission denied"), tmp_path) is None


def test_timeouts_may_change_on_resume():
    """Checkpoints written before these keys existed, or with other timeouts, resume under train.resume=auto."""
    saved = {"train": {"epochs": 2}, "data": {"workers": 2}}
    now = {"train": {"epochs": 2, "collective_timeout": 5, "first_step_timeout": 60}, "data": {"workers": 2,
                                                                                                "worker_timeout": 9}}
    assert config_differences(saved, now) == []


def test_resume_drops_the_records_it_will_log_again(tmp_path):
    """Records after the resumed checkpoint's step (and a line cut off by a kill) go; errors and pre-emptions stay."""
    from fastssl.metrics_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": s} for s in (1, 2, 3)] + [{"kind": "eval", "step": 3},
                                                                 {"kind": "error", "step": 3, "message": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')
    log = MetricsLog(path, True)
    assert log.drop_after(2) == 3
    log.write(kind="train", step=3)
    log.close()
    assert [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())] == [
        ("train", 1), ("train", 2), ("error", 3), ("train", 3)]


def test_summary_of_a_resumed_run_counts_the_whole_run(demo_data, tmp_path):
    """train_seconds, eval_seconds and the training windows' figures cover every segment: a run resumed after
    it finished (only its final evaluation runs again) does not report the last segment alone."""
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 4, "eval.final": True, "eval.every_epochs": 1,
                                "train.resume": "auto"})
    assert main(args) == 0
    first = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert first["eval_seconds"] > 0 and first["images_per_second"] is not None
    assert main(args) == 0
    again = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert again["steps"] == first["steps"] == 4
    assert again["wall_seconds"] > first["wall_seconds"]
    assert again["eval_seconds"] == pytest.approx(first["eval_seconds"], rel=1e-6)   # no evaluation in training ran
    assert again["train_seconds"] >= first["train_seconds"]
    for key in ("images_per_second", "data_wait_fraction", "final_loss"):
        assert again[key] == first[key], key
