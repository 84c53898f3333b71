"""Several processes through accelerate + gloo on the CPU: the same trainer, data sharded by global rank.

The multi-node tests start two "nodes" on this machine (two ``torchrun --nnodes 2 --nproc_per_node 1``
agents meeting at a c10d rendezvous, and the README's SLURM ``srun`` recipe, which sets RANK /
LOCAL_RANK / WORLD_SIZE / MASTER_ADDR itself) and compare them with ONE process at the same global
batch. The comparison is exact by construction: 32 images and a global batch of 32, so every step
is one epoch whose global batch is the whole (reshuffled) set; rank 0 and rank 1 each hold a different
half of it. Crops and flips are keyed per sample, the photometric ops are off (their random draws
are per rank-batch, not per sample), and the model has no BatchNorm (a ViT with a linear projector:
BatchNorm normalises each rank's half on its own). A data shard keyed by the local rank (0 on both
nodes) or gradients not averaged across nodes would change the weights.
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

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(demo_data, tmp_path):
    train_py = ROOT / "fastssl" / "train.py"
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process unless mpirun is configured;
    # `--multi_gpu` goes through torchrun, and the trainer's Accelerator(cpu=True) then uses gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(train_py), "--config", "configs/demo/simclr.yaml",
           *tiny_overrides(demo_data, tmp_path, **{"train.max_steps": 4, "eval.final": True})]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # DDP keeps gradients in its buckets with the channels_last parameters' strides (engine.make_accelerator).
    assert "Grad strides do not match bucket view strides" not in res.stderr
    env = json.loads((tmp_path / "t" / "env.json").read_text())
    assert env["world_size"] == 2 and env["derived"]["micro_batch"] == 16
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["knn_top1"] is not None


# ----------------------------------------------------------------------------- two nodes vs one process

N_IMAGES, STEPS = 32, 3


@pytest.fixture(scope="module")
def exact_data(tmp_path_factory):
    """The built-in shapes, 4 classes x 8 train images (one global batch) at 32 px."""
    from fastssl.cli.prepare import main as prepare

    out = tmp_path_factory.mktemp("exact_data")
    assert prepare(["synthetic", str(out), "--classes", "4", "--per-class", str(N_IMAGES // 4), "--val-per-class", "2",
                    "--size", "32", "--seed", "0", "--quiet"]) in (0, None)
    return out


def exact_overrides(data, out_dir) -> list[str]:
    kv = {
        "data.train": f"{data}/train.beton", "data.val": f"{data}/val.beton", "data.workers": 1,
        "aug.global_size": 16, "model.backbone": "vit_micro_patch8", "method.proj_layers": 1, "method.proj_dim": 32,
        "optim.name": "sgd", "optim.lr": 0.5, "optim.batch_size": N_IMAGES, "optim.warmup_epochs": 0,
        "train.epochs": STEPS, "train.log_every": 1, "train.progress": False, "train.compile": "off",
        "train.ckpt_every_epochs": 0, "train.out_dir": str(out_dir), "train.name": "t",
        "eval.final": False, "eval.online_probe": False,
    }
    for v in (0, 1):  # photometric ops off; crops and flips stay (keyed per sample)
        for k in ("jitter_p", "gray_p", "blur_p", "solarize_p"):
            kv[f"aug.views.{v}.{k}"] = 0.0
    return ["--config", "configs/demo/simclr.yaml"] + [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture(scope="module")
def one_process(exact_data, tmp_path_factory):
    from fastssl.train import main

    out = tmp_path_factory.mktemp("one_process")
    assert main(exact_overrides(exact_data, out)) == 0
    return out / "t"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(cmds: list[tuple[list[str], dict]], cwd: Path, timeout: float = 540) -> None:
    """Start every command at once (each in its own session), wait for all; on a failure or timeout, stop them."""
    procs = [subprocess.Popen(c, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c, e in cmds]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        outs = [p.communicate()[0] for p in procs]
    bad = [(i, p.returncode, o[-3000:]) for i, (p, o) in enumerate(zip(procs, outs)) if p.returncode != 0]
    assert not bad, bad


@pytest.fixture(scope="module", params=["torchrun-2-nodes", "srun-env"])
def two_ranks(request, exact_data, tmp_path_factory):
    """The run directory of a 2-rank run, one process per "node", launched as the README says."""
    out = tmp_path_factory.mktemp(request.param)
    args = exact_overrides(exact_data, out)
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    if request.param == "torchrun-2-nodes":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1",
               "-m", "fastssl.train", *args]
        cmds = [(cmd, base), (cmd, base)]
    else:  # srun starts one task per GPU; each task's rank comes from SLURM_PROCID / SLURM_LOCALID
        cmds = [([sys.executable, "-m", "fastssl.train", *args],
                 {**base, "RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(port)}) for r in (0, 1)]
    _run_ranks(cmds, ROOT)
    return out / "t"


def _train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _weights(run: Path) -> dict:
    from fastssl.checkpoint import load

    return load(run / "checkpoints" / "last.pt")["method"]


@pytest.mark.slow  # about a minute per launcher on 2 cores (+ the one-process run)
def test_two_nodes_train_exactly_like_one_process(two_ranks, one_process):
    from fastssl.pipelines.crops import epoch_order

    env = json.loads((two_ranks / "env.json").read_text())
    assert env["world_size"] == 2 and env["derived"]["micro_batch"] == N_IMAGES // 2
    # each rank a different half of the global batch (sharded by global rank), every epoch
    for epoch in range(STEPS):
        a, b = (set(epoch_order(N_IMAGES, 0, epoch, r, 2, True, True).tolist()) for r in (0, 1))
        assert not a & b and len(a | b) == N_IMAGES

    one, two = _train_records(one_process), _train_records(two_ranks)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    assert one[0]["loss"] - one[-1]["loss"] > 0.05  # the weights moved: the comparison below has teeth

    w1, w2 = _weights(one_process), _weights(two_ranks)
    assert w1.keys() == w2.keys()
    for k in w1:
        scale = float(w1[k].float().abs().max()) + 1e-12
        err = float((w1[k].float() - w2[k].float()).abs().max()) / scale
        assert err < 2e-5, (k, err)  # measured: <= 1e-6 (all-reduce order)


@pytest.mark.slow
def test_two_nodes_log_the_one_process_losses(two_ranks, one_process):
    one, two = _train_records(one_process), _train_records(two_ranks)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
