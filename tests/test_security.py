"""Loading a checkpoint, a feature cache or a config runs no code; hostile images cannot exhaust memory.

Every hostile file here carries a payload that, if ever unpickled or constructed,
creates a marker folder (``os.makedirs``): each test checks the marker is absent.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fastssl import checkpoint as ckpt_io
from fastssl.checkpoint import CorruptCheckpointError, UntrustedCheckpointError
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this calls ``os.makedirs(marker)``: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def one_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory):
    """A 2-step trainer run: its run directory (checkpoints/last.pt written by the trainer)."""
    from fastssl.train import main

    out = tmp_path_factory.mktemp("run")
    rc = main(["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, out, **{"train.max_steps": 2}))
    assert rc == 0
    return out / "t"


def hostile_copy(run: Path, dest: Path, marker: Path) -> Path:
    """The trainer's checkpoint plus a pickled callable, as ``dest/checkpoints/last.pt``."""
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    state["extra"] = Payload(marker)
    p = dest / "checkpoints" / "last.pt"
    p.parent.mkdir(parents=True)
    torch.save(state, p)
    return p


def test_trainer_checkpoint_is_tensors_and_plain_types(trained_run):
    """What the trainer saves (optimizer state, RNG states, config, probe) loads with weights_only=True."""
    p = trained_run / "checkpoints" / "last.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(p) == []
    state = torch.load(p, map_location="cpu", weights_only=True)
    assert state["optimizer"]["state"] and state["optimizer"]["param_groups"]
    assert isinstance(state["config"], dict) and state["config"]["train"]["name"] == "t"
    rng = state["rng"][0]
    assert torch.is_tensor(rng["torch"]) and torch.is_tensor(rng["numpy"]["key"])
    assert isinstance(rng["python"]["state"], list)
    cfg, method, step = ckpt_io.load_for_eval(trained_run)
    assert step == 2 and not method.training


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.gauss(0, 1), np.random.randn()  # a cached Gaussian in both generators
    ckpt_io.save_atomic({"rng": [ckpt_io.rng_state()]}, tmp_path / "r.pt")
    want = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    ckpt_io.set_rng_state(ckpt_io.load(tmp_path / "r.pt")["rng"][0])
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


def test_old_rng_form_still_restores():
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    want = (random.random(), np.random.rand(), torch.rand(1))
    ckpt_io.set_rng_state(old)
    assert (random.random(), np.random.rand(), torch.rand(1)) == want


def test_cuda_rng_states_restore_on_the_devices_visible_now(monkeypatch):
    """Saved with 8 GPUs visible, resumed with 1 (CUDA_VISIBLE_DEVICES narrowed): device 0 gets its state."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: restored.append((device, int(state[0]))))
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": [torch.full((8,), k, dtype=torch.uint8) for k in range(8)]}
    ckpt_io.set_rng_state(state)
    assert restored == [(0, 0)]


def test_save_refuses_a_state_that_needs_pickle(tmp_path):
    p = tmp_path / "c.pt"
    ckpt_io.save_atomic({"ok": torch.ones(2)}, p)
    with pytest.raises(TypeError, match="needs? pickle"):
        ckpt_io.save_atomic({"bad": np.zeros(3)}, p)
    assert torch.equal(ckpt_io.load(p)["ok"], torch.ones(2))  # the previous checkpoint is kept
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.pt"]


def test_load_refuses_pickled_callable_and_trust_is_the_opt_in(trained_run, tmp_path):
    marker = tmp_path / "ran"
    p = hostile_copy(trained_run, tmp_path / "h", marker)
    with pytest.raises(UntrustedCheckpointError) as e:
        ckpt_io.load(p)
    msg = str(e.value)
    assert str(p) in msg and "--trust-checkpoint" in msg and "makedirs" in msg and "\n" not in msg
    with pytest.raises(UntrustedCheckpointError):
        ckpt_io.load_for_eval(p.parent.parent)
    assert not marker.exists()
    # The documented opt-in: full pickle, which runs the file's code (that is what the flag allows).
    ckpt_io.load(p, trust=True)
    assert marker.is_dir()


def test_fastssl_eval_refuses_hostile_checkpoint(trained_run, tmp_path, capsys):
    from fastssl.cli.eval import main

    marker = tmp_path / "ran"
    p = hostile_copy(trained_run, tmp_path / "h", marker)
    assert main([str(tmp_path / "h"), "--device", "cpu"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(p) in line and "--trust-checkpoint" in line
    assert not marker.exists()


def test_fastssl_export_refuses_hostile_checkpoint(trained_run, tmp_path, capsys):
    import fastssl.cli.export as export

    marker = tmp_path / "ran"
    p = hostile_copy(trained_run, tmp_path / "h", marker)
    try:
        rc = export.main([str(p), "--out", str(tmp_path / "out.safetensors")])
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None)
    line = one_line(capsys.readouterr().err)
    assert str(p) in line
    assert not marker.exists()


def _resume_args(demo_data, out):
    return ["--config", "configs/demo/simclr.yaml"] + tiny_overrides(demo_data, out, **{"train.max_steps": 4}) \
        + ["--resume"]


def test_resume_runs_no_code_from_hostile_checkpoint(trained_run, demo_data, tmp_path, capsys):
    """--resume never unpickles the callable: refused by an exception or a non-zero exit, naming the file."""
    from fastssl.train import main

    marker = tmp_path / "ran"
    p = hostile_copy(trained_run, tmp_path / "t", marker)
    try:
        rc, text = main(_resume_args(demo_data, tmp_path)), capsys.readouterr().err
    except ckpt_io.CheckpointError as e:
        rc, text = 1, str(e)
    assert rc != 0 and str(p) in text
    assert not marker.exists()


def test_resume_refusal_is_one_line_and_a_nonzero_exit(trained_run, demo_data, tmp_path, capsys):
    from fastssl.train import main

    marker = tmp_path / "ran"
    p = hostile_copy(trained_run, tmp_path / "t", marker)
    assert main(_resume_args(demo_data, tmp_path)) != 0
    line = one_line(capsys.readouterr().err)
    assert str(p) in line and "--trust-checkpoint" in line
    assert not marker.exists()


def test_corrupt_checkpoints_name_the_file(trained_run, tmp_path, capsys):
    from fastssl.cli.eval import main

    good = (trained_run / "checkpoints" / "last.pt").read_bytes()
    cases = {"truncated.pt": good[: len(good) // 2], "empty.pt": b"", "text.pt": b"not a checkpoint\n" * 10}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=str(p)):
            ckpt_io.load(p)
        assert main([str(p), "--device", "cpu"]) == 2
        assert str(p) in one_line(capsys.readouterr().err)
    with pytest.raises(FileNotFoundError):
        ckpt_io.load(tmp_path / "missing.pt")


def test_compressed_record_is_not_inflated(trained_run, tmp_path):
    """A deflated zip record (never written by torch.save) could claim any size: refused before torch reads it."""
    src = trained_run / "checkpoints" / "last.pt"
    p = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))
    with pytest.raises(UntrustedCheckpointError, match="compressed"):
        ckpt_io.load(p)


# ----------------------------------------------------------------------------- feature caches


def test_feature_cache_is_safetensors_and_never_unpickled(tmp_path):
    from safetensors import safe_open

    from fastssl.evaluation.offline import cached_features

    marker = tmp_path / "ran"
    feats_dir = tmp_path / "features"
    feats_dir.mkdir()
    torch.save({"feats": Payload(marker)}, feats_dir / "train_step3.pt")  # a cache of the old (pickle) kind
    calls = {"n": 0}

    def extract():
        calls["n"] += 1
        return torch.randn(10, 4), torch.arange(10)

    meta = {"step": 3, "split": "train", "path": "x.beton", "image_size": 32}
    a = cached_features(tmp_path, "train", 3, meta, extract)
    assert calls["n"] == 1 and not marker.exists()
    path = feats_dir / "train_step3.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["fastssl"]) == meta
        assert set(f.keys()) == {"feats", "labels"}
    b = cached_features(tmp_path, "train", 3, meta, extract)
    assert calls["n"] == 1 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # A damaged cache is re-extracted, not trusted.
    path.write_bytes(path.read_bytes()[:40])
    cached_features(tmp_path, "train", 3, meta, extract)
    assert calls["n"] == 2
    # A header that claims a huge tensor is refused by safetensors (sizes are checked against the file).
    header = json.dumps({"feats": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]},
                         "labels": {"dtype": "I64", "shape": [1], "data_offsets": [1 << 42, (1 << 42) + 8]},
                         "__metadata__": {"fastssl": json.dumps(meta, sort_keys=True)}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    cached_features(tmp_path, "train", 3, meta, extract)
    assert calls["n"] == 3


def test_no_pickle_loading_outside_the_documented_opt_in():
    """`grep weights_only=False` finds only the opt-in path (checkpoint.py's trust=True and its docs).

    Nor does any module unpickle otherwise: every ``torch.load(`` call outside checkpoint.py
    says ``weights_only=True``; no ``pickle.load``, unsafe YAML loader or ``allow_pickle=True``.
    """
    import re

    allowed = {"fastssl/checkpoint.py", "SECURITY.md", "tests/test_security.py"}
    hits, loads = [], []
    for d in ("fastssl", "pipelines", "kernels", "scripts", "configs"):
        for f in (REPO / d).rglob("*"):
            if not f.is_file() or f.suffix not in (".py", ".sh", ".md", ".yaml"):
                continue
            rel = f.relative_to(REPO).as_posix()
            text = f.read_text(errors="replace")
            if "weights_only=False" in text and rel not in allowed:
                hits.append(rel)
            for bad in ("pickle.load", "yaml.load(", "yaml.unsafe_load", "allow_pickle=True", "yaml.Loader",
                        "yaml.FullLoader", "yaml.UnsafeLoader"):
                if bad in text:
                    loads.append(f"{rel}: {bad}")
            if rel != "fastssl/checkpoint.py":
                for call in re.findall(r"torch\.load\([^)]*\)?", text):
                    if "weights_only=True" not in call:
                        loads.append(f"{rel}: {call}")
    assert not hits, hits
    assert not loads, loads


# ----------------------------------------------------------------------------- configs


def test_yaml_is_safe_loaded(tmp_path):
    import yaml

    from fastssl.config import ConfigError, load_config, parse_override

    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"train:\n  name: !!python/object/apply:os.makedirs [{str(marker)!r}]\n")
    with pytest.raises((yaml.YAMLError, ConfigError)):
        load_config(cfg)
    key, value = parse_override(f"train.name=!!python/object/apply:os.makedirs [{str(marker)!r}]")
    assert isinstance(value, str)  # an override's tag is text, never constructed
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/fastssl", "..", ".", "C:\\runs\\x",
                                  "\\\\server\\share\\x", "~/runs"])
def test_run_name_cannot_leave_out_dir(name):
    from fastssl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.name"):
        load_config("configs/demo/simclr.yaml", [f"train.name={name}", "train.out_dir=runs"])


def test_run_name_may_nest_and_cli_reports_bad_names(capsys):
    from fastssl.config import load_config
    from fastssl.train import main

    assert load_config("configs/demo/simclr.yaml", ["train.name=ablations/lr0.1"]).train.name == "ablations/lr0.1"
    assert main(["--config", "configs/demo/simclr.yaml", "train.name=../../tmp/x", "--print-config"]) == 2
    assert "train.name" in one_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- hostile images at fastssl-prepare


def png_of_zeros(path: Path, width: int, height: int) -> Path:
    """A 1-bit grayscale PNG of zeros: ``width * height`` pixels in a file of a few hundred kilobytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _peak_rss_of(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; peak resident memory (KiB) before and after it, and its ``result``.

    The peak is ``VmHWM`` of /proc/self/status, which belongs to the process's address
    space and so starts afresh at exec (``ru_maxrss`` does not: a child reports at least
    the RSS its parent, this pytest process, had when it forked).
    """
    prog = ("import importlib.util, json, re, sys, numpy, PIL.Image, cv2\n"
            "def hwm():\n"
            "    return int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))\n"
            # prepare.py loaded as a file: the fastssl.pipelines package imports torch (6 s, and its memory is noise).
            f"spec = importlib.util.spec_from_file_location('prep', {str(REPO / 'pipelines' / 'prepare.py')!r})\n"
            "prep = sys.modules['prep'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(prep)\n"
            "load_rgb, _validate_one = prep.load_rgb, prep._validate_one\n"
            "before = hwm()\n"
            f"{code}\n"
            "print(json.dumps({'before': before, 'after': hwm(), 'result': result}))")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc")


@needs_proc
def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    side = int((1.2 * limit) ** 0.5)  # over the limit but under PIL's 2x error: PIL alone would only warn
    bomb = png_of_zeros(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 100_000  # 107 Mpx in about 13 KB
    r = _peak_rss_of(f"result = _validate_one({str(bomb)!r})[1]")
    assert "decompression bomb" in r["result"]
    # Decoding it would take side*side bytes (mode 1 is stored a byte per pixel) then 3x that as RGB.
    assert (r["after"] - r["before"]) * 1024 < 0.25 * side * side, r


@needs_proc
def test_large_jpeg_memory_is_bounded_by_max_resolution(tmp_path):
    from PIL import Image

    p = tmp_path / "large.jpg"
    Image.new("L", (8000, 6000), 128).save(p, quality=50)  # 48 Mpx, allowed (under the pixel limit)
    r = _peak_rss_of(f"result = list(load_rgb({str(p)!r}, 256).shape)")
    assert r["result"] == [192, 256, 3]
    # A full decode holds 48 MB (L) and 144 MB (RGB); at 1/8 DCT scale it is under 1 MB.
    assert (r["after"] - r["before"]) * 1024 < 40e6, r


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    """An ImageFolder with two good images and one of each hostile case; returns (root, {name: reason word})."""
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("hostile")
    root = tmp_path / "src"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "cls").mkdir(parents=True)
    img = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    img.save(root / "a" / "good.jpg", quality=90)
    img.save(root / "b" / "good.png")
    img.save(outside / "secret.jpg", quality=90)
    img.save(outside / "cls" / "x.jpg", quality=90)
    png_of_zeros(root / "a" / "bomb_big.png", 20000, 20000)               # over 2x the limit: PIL raises
    side = int((1.2 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    png_of_zeros(root / "a" / "bomb.png", side, side)                      # over 1x: PIL would only warn
    Image.new("RGB", (2100, 50), (9, 9, 9)).save(root / "b" / "sliver.png")  # 42:1
    img.save(root / "b" / "png_named.jpg", format="PNG")                   # content PNG, name JPEG
    (root / "b" / "script.jpg").write_text("#!/bin/sh\necho not an image\n")
    os.symlink(outside / "secret.jpg", root / "a" / "link.jpg")
    os.symlink(outside / "cls", root / "linked_class")
    os.symlink(root / "a" / "good.jpg", root / "b" / "inside_link.jpg")     # stays inside: kept
    expect = {"bomb_big.png": "decompression bomb", "bomb.png": "decompression bomb", "sliver.png": "aspect ratio",
              "png_named.jpg": "its content is PNG", "script.jpg": "not a JPEG",
              "link.jpg": "outside the source folder", "linked_class": "outside the source folder"}
    return root, expect


def test_prepare_skips_and_names_each_hostile_case(hostile_folder, tmp_path, capsys):
    pytest.importorskip("ffcv")
    from fastssl.cli.prepare import main
    from fastssl.pipelines.prepare import meta_path, read_labels

    root, expect = hostile_folder
    out = tmp_path / "out.beton"
    assert main([str(root), str(out), "--workers", "1", "--max-resolution", "32"]) == 0
    printed = capsys.readouterr().err  # fastssl-prepare's log lines (fastssl.logs: stderr)
    meta = json.loads(meta_path(out).read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == set(expect), reasons
    for name, word in expect.items():
        assert word in reasons[name], (name, reasons[name])
        assert f"skipped {root}" in printed and name in printed
    assert meta["written"] == 3 and meta["classes"] == ["a", "b"]  # good.jpg, good.png, inside_link.jpg
    assert sorted(read_labels(out).tolist()) == [0, 1, 1]


def test_listing_and_decoding_checks_without_ffcv(hostile_folder):
    """The same cases through list_images + validate (what the torch and DALI back-ends use)."""
    from fastssl.pipelines.prepare import list_images, validate

    root, expect = hostile_folder
    items, classes, skipped = list_images(root)
    reasons = {Path(p).name: r for p, r in skipped}
    reasons.update({Path(p).name: r for p, r, _ in validate([p for p, _ in items], 1, progress=False) if r})
    assert set(reasons) == set(expect) and classes == ["a", "b"]
    for name, word in expect.items():
        assert word in reasons[name], (name, reasons[name])


@pytest.mark.parametrize("ext", ["jpg", "png", "tif"])
def test_bounded_decode_matches_full_decode(tmp_path, ext):
    """Bounded decoding (JPEG draft, resize before conversion and transpose) matches a full decode + ffcv resize."""
    import cv2
    from PIL import Image, ImageOps

    from fastssl.pipelines.prepare import load_rgb, output_size

    rng = np.random.default_rng(0)
    base = cv2.resize((rng.random((12, 18, 3)) * 255).astype(np.uint8), (1800, 1200), interpolation=cv2.INTER_CUBIC)
    for orientation in (1, 2, 6, 8):
        img = Image.fromarray(base)
        exif = img.getexif()
        exif[0x0112] = orientation
        p = tmp_path / f"o{orientation}.{ext}"
        img.save(p, exif=exif, **({"quality": 95} if ext == "jpg" else {}))
        full = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
        want = cv2.resize(full, output_size(full.shape[1], full.shape[0], 128), interpolation=cv2.INTER_AREA)
        got = load_rgb(str(p), 128)
        assert got.shape == want.shape, (orientation, got.shape, want.shape)
        err = np.abs(got.astype(int) - want).mean()
        assert err < (1.0 if ext == "jpg" else 0.01), (orientation, err)  # JPEG: DCT-scaled decoding
