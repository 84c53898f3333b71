"""``fastssl-bench peer`` in its smoke mode: the JSON contract (no timings asserted).

Each arm runs in its own process; ratios are quotients of the reported images/s; losses are finite; both
sides train the same backbone (parameter count); the stage table has every stage.
"""
import json
import math
import os

import pytest


def _check(out: dict, method: str) -> None:
    from fastssl.cli.bench_peer import ARMS

    r = out["methods"][method]
    arms = r["arms"]
    assert set(arms) == set(ARMS)
    pids = [p for a in arms.values() for p in a["pids"]] + [s["pid"] for s in r["stages_fastssl_rounds"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids          # a fresh process per arm and round
    ips = {k: a["images_per_second"] for k, a in arms.items()}
    assert all(v > 0 for v in ips.values())
    rt = r["ratios"]
    assert rt["fastssl_over_lightly"] == pytest.approx(ips["fastssl"] / ips["lightly"], rel=2e-3)
    assert rt["bare"] == max(("bare-fastssl", "bare-lightly"), key=ips.get)
    for arm in ("fastssl", "lightly"):
        assert rt[f"{arm}_over_bare"] == pytest.approx(ips[arm] / ips[rt["bare"]], rel=2e-3)
        assert rt[f"{arm}_over_own_bare"] == pytest.approx(ips[arm] / ips[f"bare-{arm}"], rel=2e-3)
    settings = out["settings"]
    for arm, a in arms.items():
        assert math.isfinite(a["first_loss"]) and math.isfinite(a["last_loss"])
        for rd in r["rounds"]:
            losses = rd[arm]["losses"]
            assert all(math.isfinite(x) for x in losses)
            want = settings["warmup"] + settings["steps"] if arm in ("lightly", "fastssl") else \
                settings["bare_warmup"] + settings["bare_steps"]
            assert len(losses) == want
    # The same backbone on both sides: torchvision's resnet18 without fc and timm's without its classifier.
    assert arms["lightly"]["params"]["backbone"] == arms["fastssl"]["params"]["backbone"] == 11_176_512
    assert set(arms["lightly"]["cpu_ms_per_image"]) == {"decode", "crop", "photometric", "model"}
    assert set(arms["fastssl"]["cpu_ms_per_image"]) == {"decode+crop", "photometric", "model"}
    assert all(v > 0 for a in ("lightly", "fastssl") for v in arms[a]["cpu_ms_per_image"].values())
    assert arms["fastssl"]["command"].startswith("python -m fastssl.train ")
    assert f"| {method} | fastssl |" in out["table"]


def test_bench_peer_smoke_simclr(demo_data, capsys, tmp_path):
    pytest.importorskip("lightly")
    from fastssl.cli.bench import main

    rc = main(["peer", "--smoke", "--data", str(demo_data), "--methods", "simclr", "--threads", "1", "--json",
               "--out", str(tmp_path / "peer.json")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "peer.json").read_text())["methods"].keys() == {"simclr"}
    _check(out, "simclr")
    fl = out["methods"]["simclr"]["arms"]["fastssl"]["command"]
    for kv in ("optim.name=sgd", "optim.lr=0.06", "method.temperature=0.5", "aug.views.1.brightness=0.8",
               "model.backbone=resnet18", "train.log_every=1"):
        assert kv in fl


@pytest.mark.slow
def test_bench_peer_smoke_dino(demo_data, capsys):
    pytest.importorskip("lightly")
    from fastssl.cli.bench import main

    assert main(["peer", "--smoke", "--data", str(demo_data), "--methods", "dino", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    _check(out, "dino")
