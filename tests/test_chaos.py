"""Chaos: each fault injected into a real training process (``FASTSSL_FAULT``), then the same command resumes it.

Every case asserts the one line on stderr (no traceback), the documented exit code, what is left on disk
(the newest readable checkpoint whole, no partial file) and that ``train.resume=auto`` (or ``true`` after
an out-of-memory step, whose fix changes the config) finishes the run. Fresh processes, so each takes
tens of seconds on 2 cores: all slow. tests/test_faults.py has a cheap in-process test of each fault.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fastssl.faults import (DISK_FULL_EXIT_CODE, LOADER_WORKER_EXIT_CODE, OUT_OF_MEMORY_EXIT_CODE,
                            RANK_HUNG_EXIT_CODE)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "FASTSSL_FAULT")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(extra)
    return env


def train(args, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = clean_env(**({"FASTSSL_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "fastssl.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def the_line(err: str, prefix: str = "fastssl-train:") -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def steps(run: Path) -> list[int]:
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in recs if r["kind"] == "train"]


def newest_checkpoint_step(run: Path) -> int:
    from fastssl.checkpoint import load

    folder = run / "checkpoints"
    assert not list(folder.glob("*.tmp")), list(folder.iterdir())
    return int(load(folder / "last.pt")["step"])


def test_disk_full_at_a_checkpoint(demo_data, tmp_path):
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 6, "train.ckpt_every_steps": 2, "train.resume": "auto"})
    r = train(args, "enospc@save:2")
    assert r.returncode == DISK_FULL_EXIT_CODE, r.stderr[-3000:]
    line = the_line(r.stderr)
    run = tmp_path / "t"
    assert "no space left on the disk of" in line and "ckpt-000000004.pt (checkpoint)" in line and "needed" in line
    assert "last good checkpoint:" in line and line.split("last good checkpoint: ")[1].startswith(
        str(run / "checkpoints" / "ckpt-000000002.pt"))
    assert newest_checkpoint_step(run) == 2
    r = train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert newest_checkpoint_step(run) == 6 and steps(run)[-1] == 6


def test_disk_full_writing_metrics(demo_data, tmp_path):
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 6, "train.ckpt_every_steps": 2, "train.resume": "auto"})
    r = train(args, "enospc@metrics:4")
    assert r.returncode == DISK_FULL_EXIT_CODE, r.stderr[-3000:]
    line = the_line(r.stderr)
    run = tmp_path / "t"
    assert f"{run / 'metrics.jsonl'} (metrics.jsonl)" in line and "ckpt-000000002.pt" in line
    assert all(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())  # whole lines only
    assert train(args).returncode == 0 and steps(run)[-1] == 6


def test_out_of_memory_mid_run(demo_data, tmp_path):
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 6, "train.ckpt_every_epochs": 1000, "train.resume": "auto"})
    r = train(args, "oom@step:4")
    assert r.returncode == OUT_OF_MEMORY_EXIT_CODE, r.stderr[-3000:]
    line = the_line(r.stderr)
    run = tmp_path / "t"
    assert "out of GPU memory at step 4" in line and "optim.accum_steps=2" in line
    assert f"wrote {run / 'checkpoints' / 'ckpt-000000003.pt'}" in line
    assert newest_checkpoint_step(run) == 3
    r = train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps(run)[-3:] == [4, 5, 6]


@pytest.mark.parametrize("kind", ["die", "hang"])
def test_loader_worker_killed_or_stuck(demo_data, tmp_path, kind):
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"data.train": demo_data / "train", "data.val": "", "data.backend": "torch",
                                "train.max_steps": 6, "train.ckpt_every_steps": 1, "train.resume": "auto",
                                "data.worker_timeout": 5})
    r = train(args, f"{kind}@worker:7")
    assert r.returncode == LOADER_WORKER_EXIT_CODE, r.stderr[-3000:]
    line = the_line(r.stderr)
    assert "data-loader worker" in line and "train.resume=auto" in line
    assert ("killed by" in line) if kind == "die" else ("sent nothing for 5 s" in line)
    run = tmp_path / "t"
    before = newest_checkpoint_step(run) if (run / "checkpoints" / "last.pt").exists() else 0
    r = train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert newest_checkpoint_step(run) == 6 and steps(run)[-1] == 6 and before < 6


def test_disk_full_writing_an_export(demo_data, tmp_path):
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 1})
    assert train(args).returncode == 0
    out = tmp_path / "export" / "b.safetensors"
    cmd = [sys.executable, "-m", "fastssl.cli.export", str(tmp_path / "t"), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env(FASTSSL_FAULT="enospc@export"), capture_output=True, text=True)
    assert r.returncode == DISK_FULL_EXIT_CODE, r.stderr[-3000:]
    line = the_line(r.stderr, "fastssl-export: error:")
    assert f"no space left on the disk of {out} (export)" in line and "export again" in line
    assert not list(out.parent.iterdir())                             # no partial weights, no JSON
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert r.returncode == 0 and out.is_file() and out.with_suffix(".json").is_file(), r.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(args, fault: str | None):
    """Rank 0 and rank 1 as srun starts them (RANK, WORLD_SIZE, MASTER_* set); each in its own session."""
    port = _free_port()
    procs = []
    for r in (0, 1):
        env = clean_env(RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        **({"FASTSSL_FAULT": fault} if fault else {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "fastssl.train", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def _end(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return [p.communicate() for p in procs]


def test_a_stopped_rank_ends_the_job_naming_it_then_resume_finishes(demo_data, tmp_path):
    """Rank 1 stops (SIGSTOP) before step 4 of a 2-process gloo run: rank 0, blocked in the step's all-reduce,
    exits within train.collective_timeout with one line naming rank 1 and its last step, exit code 6; the
    checkpoint of step 2 is whole and the same command with train.resume=auto finishes the run."""
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 6, "train.ckpt_every_steps": 2, "train.resume": "auto",
                                "train.collective_timeout": 10, "train.first_step_timeout": 600})
    procs = _two_ranks(args, "hang@rank1:step:4")
    rank0 = procs[0]
    try:
        rank0.wait(timeout=400)
    finally:
        outs = _end(procs)   # rank 1 is stopped: it stays until killed (a launcher would do this)
    err0 = outs[0][1]
    assert rank0.returncode == RANK_HUNG_EXIT_CODE, err0[-3000:]
    line = the_line(err0, "fastssl: error:")
    run = tmp_path / "t"
    # rank 1 stopped right after step 3; its heartbeat (written once per poll) may hold an earlier step, while
    # rank 0's own count is exact
    assert "rank 1 stopped responding" in line and "last recorded step" in line, line
    assert "rank 0 waited" in line and "after step 3 (train.collective_timeout=10)" in line and f"last good checkpoint: {run / 'checkpoints' / 'ckpt-000000002.pt'}" in line
    assert "Traceback" not in err0
    errors = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "error"]
    assert errors and "rank 1 stopped responding" in errors[-1]["message"]
    assert newest_checkpoint_step(run) == 2

    procs = _two_ranks(args, None)
    try:
        for p in procs:
            p.wait(timeout=500)
    finally:
        outs = _end(procs)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert newest_checkpoint_step(run) == 6 and steps(run)[-1] == 6


def test_a_full_disk_on_rank_0_stops_every_rank(demo_data, tmp_path):
    """Rank 0's checkpoint write fails in a 2-process run: both ranks stop with exit 4 (rank 1 learns it through the
    save's closing all-reduce, not by waiting for a timeout), and the earlier checkpoint is whole."""
    args = ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(
        demo_data, tmp_path, **{"train.max_steps": 6, "train.ckpt_every_steps": 2, "train.resume": "auto"})
    procs = _two_ranks(args, "enospc@rank0:save:2")
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        outs = _end(procs)
    assert [p.returncode for p in procs] == [DISK_FULL_EXIT_CODE] * 2, [o[1][-2000:] for o in outs]
    run = tmp_path / "t"
    assert "ckpt-000000004.pt (checkpoint)" in the_line(outs[0][1])
    assert "(rank 0's checkpoint)" in the_line(outs[1][1]) and "ckpt-000000002.pt" in the_line(outs[1][1])
    assert newest_checkpoint_step(run) == 2
