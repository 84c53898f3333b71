"""The trainer on webdataset tar shards (no .beton): ``auto`` picks the back-end, and a run stopped
mid-epoch resumes to the same weights as one uninterrupted run."""
import json
import tarfile

import torch

from conftest import tiny_overrides


def write_shards(folder, out, per_shard: int = 50) -> int:
    """The ImageFolder ``folder`` as webdataset shards: ``<key>.jpg`` + ``<key>.cls`` (the class index)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).glob("*.jpg"))]
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(items), per_shard):
        with tarfile.open(out / f"train-{s // per_shard:04d}.tar", "w") as tar:
            for k, (f, label) in enumerate(items[s:s + per_shard]):
                key = f"{s + k:06d}"
                tar.add(f, arcname=f"{key}.jpg")
                cls = out / ".cls"
                cls.write_text(str(label))
                tar.add(cls, arcname=f"{key}.cls")
    return len(items)


def test_train_from_shards_resumes_like_one_run(demo_data, tmp_path):
    from fastssl.train import main

    shards = tmp_path / "shards"
    assert write_shards(demo_data / "train", shards) == 200
    spec = str(shards / "train-{0000..0003}.tar")
    common = tiny_overrides(demo_data, tmp_path, **{"data.train": spec, "eval.online_probe": False,
                                                     "train.ckpt_every_steps": 2})
    assert main(["--config", "configs/demo/simclr.yaml", *common, "train.name=whole"]) == 0
    # Stopped after 4 of 12 steps (mid-epoch: 6 steps per epoch), then resumed.
    assert main(["--config", "configs/demo/simclr.yaml", *common, "train.name=split", "train.max_steps=4"]) == 0
    assert main(["--config", "configs/demo/simclr.yaml", *common, "train.name=split", "train.resume=auto"]) == 0
    env = json.loads((tmp_path / "whole" / "env.json").read_text())
    assert env["derived"]["steps_per_epoch"] == 6
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["method"]
    split = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert whole.keys() == split.keys()
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=0, atol=0, msg=k)
