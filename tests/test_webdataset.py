"""The webdataset back-end (``pipelines/webdataset_backend.py``) on small tar shards written here.

Three shards of 14, 13 and 13 samples (40 in all, JPEG and PNG of a few sizes, labels as ``cls``
text or ``json``); sample ``s00020`` holds a corrupt JPEG and ``s00033`` has no label.
"""
import io
import logging
import tarfile

import numpy as np
import pytest
import torch

from fastssl.pipelines import MissingDataError
from fastssl.pipelines.recipes import ViewSpec
from fastssl.pipelines.webdataset_backend import WebDatasetLoader, buffer_order, is_shard_spec, list_shards

SHARDS = (14, 13, 13)
N = sum(SHARDS)
CORRUPT, NOLABEL = 20, 33
LOGGER = "fastssl.pipelines.webdataset_backend"


def _label(i: int) -> int:
    return i % 5


def _image(i: int) -> bytes:
    from PIL import Image

    h, w = 24 + (i % 3) * 8, 28 + (i % 4) * 6
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 9 + i * 7) % 256, (y * 11 + i * 3) % 256, ((x + y) * 5 + i) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG" if i % 4 == 3 else "JPEG", quality=90)
    return buf.getvalue()


def _add(tf, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    i = 0
    for s, n in enumerate(SHARDS):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as tf:
            for _ in range(n):
                key = f"s{i:05d}"
                img = _image(i)
                if i == CORRUPT:
                    img = img[:2] + b"\x00" * 40 + img[-2:]  # starts and ends like a JPEG, decodes as nothing
                _add(tf, f"{key}.{'png' if i % 4 == 3 else 'jpg'}", img)
                if i != NOLABEL:
                    if i % 2:
                        _add(tf, f"{key}.json", f'{{"label": {_label(i)}, "source": "test"}}'.encode())
                    else:
                        _add(tf, f"{key}.cls", f"{_label(i)}\n".encode())
                i += 1
    return root


VIEWS = [ViewSpec(size=16, scale_min=0.3), ViewSpec(size=16, scale_min=0.3),
         ViewSpec(size=8, scale_min=0.1, scale_max=0.5, local=True)]


def _loader(shards, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("shuffle_buffer", 10)
    bs = kw.pop("batch_size", 8)
    path = kw.pop("path", str(shards / "train-{000000..000002}.tar"))
    return WebDatasetLoader(path, VIEWS, bs, "cpu", **kw)


def _epoch(loader, epoch=0, skip=0, via_next=False):
    loader.set_epoch(epoch)
    if skip and not via_next:
        loader.skip_batches(skip)
    it = iter(loader)
    if via_next:
        for _ in range(skip):
            next(it)
    return list(it)


def test_batches_have_the_contract_shapes(shards):
    L = _loader(shards)
    assert L.num_samples == N and L.num_classes == 5 and len(L) == N // 8
    batches = _epoch(L)
    assert len(batches) == len(L)
    for b in batches:
        assert [tuple(v.shape) for v in b.views] == [(8, 16, 16, 3), (8, 16, 16, 3), (8, 8, 8, 3)]
        assert all(v.dtype == torch.uint8 for v in b.views)
        assert b.labels.dtype == torch.int64 and b.labels.shape == (8,)
        assert b.indices.dtype == torch.int64 and b.indices.shape == (8,)
        assert b.labels.tolist() == [_label(i) for i in b.indices.tolist()]


def test_an_epoch_visits_every_sample_once_and_replaces_the_bad_ones(shards):
    L = _loader(shards)
    got = torch.cat([b.indices for b in _epoch(L, epoch=1)]).tolist()
    planned = L.order(1).astype(np.int64).tolist()
    assert sorted(planned) == list(range(N))
    good = set(range(N)) - {CORRUPT, NOLABEL}
    counts = {i: got.count(i) for i in set(got)}
    assert set(counts) == good                          # every readable sample, the bad ones never
    assert sum(counts.values()) == N and sum(c - 1 for c in counts.values()) == 2   # two slots refilled
    # only the two bad slots differ from the plan, and each is refilled from its own batch
    diff = [k for k in range(N) if got[k] != planned[k]]
    assert sorted(planned[k] for k in diff) == [CORRUPT, NOLABEL]
    for k in diff:
        assert got[k] in got[k // 8 * 8:(k // 8 + 1) * 8]


def test_the_order_is_shuffled_across_shards_and_epochs(shards):
    L = _loader(shards)
    o0, o1 = L.order(0), L.order(1)
    assert not np.array_equal(o0, o1) and not np.array_equal(o0, np.sort(o0))
    # the first batch mixes the buffer: not simply the first 8 samples of a shard
    assert len({int(i) // 10 for i in o0[:8]}) > 1
    for workers in (0, 2):  # evaluation: the dataset's order, whatever the workers
        ev = _loader(shards, train=False, drop_last=False, batch_size=6, workers=workers)
        assert ev.order(3).astype(np.int64).tolist() == list(range(N)) and len(ev) == 7
    got = torch.cat([b.indices for b in _epoch(ev)]).tolist()
    assert got[:CORRUPT] == list(range(CORRUPT)) and len(got) == N and CORRUPT not in got
    assert [tuple(v.shape) for v in _epoch(ev)[-1].views] == [(4, 16, 16, 3)]   # 40 = 6 x 6 + 4, one centre view


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_disjoint_samples_covering_the_set(shards, workers, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    seen = []
    for r in range(2):
        L = _loader(shards, rank=r, world_size=2, batch_size=4, workers=workers)
        assert len(L) == 5
        got = torch.cat([b.indices for b in _epoch(L, epoch=2)]).tolist()
        assert len(got) == 20
        seen.append(set(got) | ({CORRUPT, NOLABEL} & set(L.order(2).astype(np.int64).tolist())))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(N))
    if workers:  # 3 shards for 2 ranks x 2 workers: said in one line
        said = "fewer shards than ranks x workers (3 < 4)"
        lines = [r.getMessage() for r in caplog.records if said in r.getMessage()]
        assert len(lines) == 2  # one line per loader (rank)


@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_k_batches_continues_the_uninterrupted_epoch(shards, workers):
    L = _loader(shards, workers=workers, batch_size=4)
    full = _epoch(L, epoch=3)
    assert len(full) == 10
    for k in (1, 3, 6):
        for via_next in (True, False):
            rest = _epoch(L, epoch=3, skip=k, via_next=via_next)
            assert len(rest) == len(full) - k
            for a, b in zip(full[k:], rest):
                assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
                assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


@pytest.mark.parametrize("mode", ["sync", "thread", "stream"])
def test_skip_batches_keeps_the_photometric_stream(shards, mode):
    from fastssl.pipelines.loader import make_finisher

    fin = make_finisher(VIEWS, "cpu", seed=0, train=True)
    L = _loader(shards, finisher=fin, batch_size=8)
    # LoaderBase's ways of running the finisher: in next(), on a thread, through the prefetch path
    L.overlap_finish, L.stream_prefetch = mode == "thread", mode == "stream"
    full = _epoch(L, epoch=1)
    rest = _epoch(L, epoch=1, skip=2)
    assert len(rest) == 3
    for a, b in zip(full[2:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    with pytest.raises(ValueError, match="outside"):
        L.skip_batches(len(L) + 1)


def test_skip_batches_opens_no_shard_it_does_not_need(shards, monkeypatch):
    import fastssl.pipelines.webdataset_backend as wb

    L = _loader(shards, batch_size=4, shuffle_buffer=1)  # no buffer: the stream order itself
    opened = []
    real = wb._open
    monkeypatch.setattr(wb, "_open", lambda url: opened.append(url) or real(url))
    L.set_epoch(0)
    L.skip_batches(8)  # 32 of 40 samples skipped: only the last shard of the epoch's order is read
    assert len(list(L)) == 2
    assert len(opened) == 1


def test_a_bad_sample_gets_one_log_line_naming_shard_and_key(shards, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    L = _loader(shards)
    _epoch(L, epoch=0)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 2
    corrupt = next(m for m in lines if "'s00020'" in m)
    assert "train-000001.tar" in corrupt
    nolabel = next(m for m in lines if "'s00033'" in m)
    assert "train-000002.tar" in nolabel and "no label" in nolabel
    assert sorted(p.rsplit("#", 1)[1] for p, _ in L.skipped) == ["s00020", "s00033"]
    caplog.clear()
    _epoch(L, epoch=1)  # known now: replaced again, not logged again
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_the_same_seed_and_epoch_give_identical_crops(shards):
    a = _epoch(_loader(shards, seed=5), epoch=2)
    b = _epoch(_loader(shards, seed=5, workers=2), epoch=2)  # other workers: other order, same crop per sample
    c = _epoch(_loader(shards, seed=5), epoch=2)
    for x, y in zip(a, c):
        assert torch.equal(x.indices, y.indices) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))

    def by_sample(batches):  # index -> its views, for samples used once (a refill is cropped with another key)
        idx = torch.cat([x.indices for x in batches]).tolist()
        views = [torch.cat([x.views[v] for x in batches]) for v in range(len(VIEWS))]
        return {i: [v[k] for v in views] for k, i in enumerate(idx) if idx.count(i) == 1}

    sa, sb = by_sample(a), by_sample(b)
    common = set(sa) & set(sb)
    assert len(common) >= N - 6
    assert all(torch.equal(u, v) for i in common for u, v in zip(sa[i], sb[i]))
    d = _epoch(_loader(shards, seed=6), epoch=2)
    assert not all(torch.equal(x.views[0], y.views[0]) for x, y in zip(a, d))


def test_gpu_decode_path_gives_the_same_batches_on_the_cpu(shards):
    cpu = _epoch(_loader(shards), epoch=1)
    gpu = _epoch(_loader(shards, gpu_decode=True), epoch=1)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert [v.shape for v in a.views] == [v.shape for v in b.views]
        # PIL box resize vs roi_align: the same crop boxes, close pixels
        assert all((x.float() - y.float()).abs().mean() < 12 for x, y in zip(a.views, b.views))


def test_shard_specs_and_the_count_cache(shards, monkeypatch):
    import fastssl.pipelines.webdataset_backend as wb

    files = [str(shards / f"train-{s:06d}.tar") for s in range(3)]
    for spec in (str(shards), str(shards / "train-*.tar"), str(shards / "train-{000000..000002}.tar"),
                 str(shards / "train-{000000,000001,000002}.tar")):
        assert is_shard_spec(spec) and list_shards(spec) == files
    assert is_shard_spec(files[0]) and not is_shard_spec(str(shards / "x.beton"))
    with pytest.raises(MissingDataError, match=r"train-000008.tar does not exist \(and 1 more of the 2"):
        list_shards(str(shards / "train-{000008..000009}.tar"))
    _loader(shards)  # counted (and cached) by the earlier tests
    monkeypatch.setattr(wb, "_count", lambda url: pytest.fail(f"{url} counted again"))
    assert _loader(shards, path=str(shards)).num_samples == N
    monkeypatch.undo()
    pipe = "pipe:cat " + str(shards / "train-{000000..000002}.tar")
    P = _loader(shards, path=pipe)
    assert P.num_samples == N and len(P.urls) == 3
    a, b = _epoch(P, epoch=1), _epoch(_loader(shards), epoch=1)
    assert all(torch.equal(x.indices, y.indices) for x, y in zip(a, b))
    # rank 0 of 2 stops reading a piped shard half way (the command is ended, not reported as failing),
    # rank 1 starts half way through one (reads past the first part)
    for r in range(2):
        a = _epoch(_loader(shards, path=pipe, rank=r, world_size=2, batch_size=4), epoch=1)
        b = _epoch(_loader(shards, rank=r, world_size=2, batch_size=4), epoch=1)
        assert len(a) == 5 and all(torch.equal(x.indices, y.indices) for x, y in zip(a, b))


def test_buffer_order_is_a_permutation_within_the_buffer_bound():
    rng = np.random.default_rng(0)
    o = buffer_order(100, 10, rng)
    assert sorted(o.tolist()) == list(range(100))
    # item p is emitted at output j only once read, and at most `bufsize` items are ever held
    held, read = set(), 0
    for p in o:
        while p >= read:
            held.add(read)
            read += 1
        assert len(held) <= 11
        held.remove(p)
    assert buffer_order(5, 1, rng).tolist() == list(range(5))


def _dist_worker(rank, shards, out, init):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    L = WebDatasetLoader(str(shards / "train-{000000..000002}.tar"), VIEWS, 4, "cpu", rank=rank, world_size=2,
                         workers=0, shuffle_buffer=10)
    L.set_epoch(1)
    mine = torch.cat([b.indices for b in L]).tolist()
    planned = L.order(1).astype(np.int64).tolist()
    both = [None, None]
    dist.all_gather_object(both, (mine, planned))
    if rank == 0:
        import json

        with open(out, "w") as f:
            json.dump(both, f)
    dist.destroy_process_group()


def test_two_gloo_processes_read_disjoint_samples(shards, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "seen.json"
    mp.start_processes(_dist_worker, args=(shards, str(out), f"file://{tmp_path / 'rdv'}"), nprocs=2,
                       start_method="fork")
    import json

    (m0, p0), (m1, p1) = json.loads(out.read_text())
    assert set(p0).isdisjoint(p1) and sorted(p0 + p1) == list(range(N))
    assert set(m0) <= set(p0) and set(m1) <= set(p1)   # replacements come from the rank's own samples
    assert len(m0) == len(m1) == 20


def _write(path, samples) -> None:
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                _add(tf, f"{key}.{ext}", data)


def _good(i: int) -> dict:
    return {"jpg": _image(4 * i), "cls": f"{_label(i)}".encode()}


@pytest.mark.parametrize("gpu_decode", [False, True])
def test_a_jpeg_whose_header_parses_but_body_does_not_is_replaced(tmp_path, caplog, gpu_decode):
    # GPU path: the worker passes the bytes on (header and end marker fine); the batched decode fails,
    # the CPU cannot decode it either, and the main process replaces it within the batch.
    caplog.set_level(logging.WARNING, logger=LOGGER)
    body = _image(0)
    garbage = body[:400] + bytes(range(256)) * 2 + b"\xff\xd9"
    samples = [(f"k{i}", _good(i)) for i in range(8)]
    samples[5] = ("k5", {"jpg": garbage, "cls": b"1"})
    _write(tmp_path / "a.tar", samples)
    L = WebDatasetLoader(str(tmp_path / "a.tar"), VIEWS, 4, "cpu", workers=0, shuffle_buffer=4, gpu_decode=gpu_decode)
    got = _epoch(L)
    assert [b.views[0].shape[0] for b in got] == [4, 4]
    idx = torch.cat([b.indices for b in got]).tolist()
    assert 5 not in idx and set(idx) == set(range(8)) - {5}
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "a.tar" in lines[0] and "'k5'" in lines[0]


def test_a_shard_that_breaks_off_loses_only_its_remaining_samples(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _write(tmp_path / "a.tar", [(f"a{i}", _good(i)) for i in range(8)])
    _write(tmp_path / "b.tar", [(f"b{i}", _good(8 + i)) for i in range(8)])
    L = WebDatasetLoader("pipe:cat " + str(tmp_path / "{a,b}.tar"), VIEWS, 4, "cpu", workers=0, shuffle_buffer=1)
    assert L.num_samples == 16
    _write(tmp_path / "b.tar", [(f"b{i}", _good(8 + i)) for i in range(3)])  # the source now ends after 3
    got = _epoch(L, epoch=0)
    assert [b.views[0].shape[0] for b in got] == [4] * 4
    idx = torch.cat([b.indices for b in got]).tolist()
    assert set(idx) == set(range(11))  # b's first three are read; its last five slots were refilled
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "b.tar" in lines[0] and "ends at sample 3" in lines[0]
    # the last batch lost all its samples and was refilled from the batch before it, also after a skip
    for via_next in (True, False):
        rest = _epoch(L, epoch=0, skip=3, via_next=via_next)
        assert len(rest) == 1 and torch.equal(rest[0].indices, got[3].indices)
        assert all(torch.equal(x, y) for x, y in zip(rest[0].views, got[3].views))


def test_labels_are_those_fastssl_prepare_reads_from_the_same_shards(shards, tmp_path):
    from fastssl.pipelines.sources import TarSource

    src = TarSource(str(shards))
    theirs = {src.name(ref).rsplit(" ", 1)[1]: lab for ref, lab in src.items}
    L = _loader(shards)
    assert L.classes == src.classes
    for b in _epoch(L):
        for i, lab in zip(b.indices.tolist(), b.labels.tolist()):
            assert theirs[f"s{i:05d}"] == lab
    # class names as cls text: numbered in sorted order
    names = ["dog", "cat", "bird", "cat", "dog", "dog"]
    _write(tmp_path / "n.tar", [(f"k{i}", {"jpg": _image(4 * i), "cls": c.encode()}) for i, c in enumerate(names)])
    src = TarSource(str(tmp_path / "n.tar"))
    N2 = WebDatasetLoader(str(tmp_path / "n.tar"), VIEWS, 3, "cpu", workers=0, shuffle_buffer=4)
    assert N2.classes == src.classes == ["bird", "cat", "dog"] and N2.num_classes == 3
    got = {i: lab for b in _epoch(N2) for i, lab in zip(b.indices.tolist(), b.labels.tolist())}
    assert got == {i: ["bird", "cat", "dog"].index(c) for i, c in enumerate(names)}


def test_forkserver_workers_give_the_forked_workers_batches(shards):
    """Workers started from a forkserver (a CUDA parent's) yield the batches forked workers yield."""
    def run(start):
        L = _loader(shards, workers=2, gpu_decode=True)
        L.worker_start = start
        return _epoch(L, epoch=1)

    forked, served = run("fork"), run("forkserver")
    assert len(forked) == len(served) > 1
    for a, b in zip(forked, served):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


@pytest.mark.parametrize("gpu_decode", [False, True])
def test_exif_rotated_jpegs_are_cropped_as_displayed(tmp_path, gpu_decode):
    """As fastssl-prepare stores them (and so the ffcv back-end reads them); the GPU decoders ignore the tag."""
    import io

    import numpy as np
    from PIL import Image

    shown = np.zeros((64, 32, 3), np.uint8)      # portrait as displayed: red on top, blue below
    shown[:32, :, 0], shown[32:, :, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    b = io.BytesIO()
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(b, "JPEG", quality=95, exif=exif.tobytes())
    _write(tmp_path / "a.tar", [(f"k{i}", {"jpg": b.getvalue(), "cls": b"0"}) for i in range(4)])
    views = [ViewSpec(size=16)]
    L = WebDatasetLoader(str(tmp_path / "a.tar"), views, 4, "cpu", workers=0, train=False, gpu_decode=gpu_decode)
    v = _epoch(L)[0].views[0].float()            # (4, 16, 16, 3)
    assert v[:, :4, :, 0].mean() > 200 and v[:, -4:, :, 2].mean() > 200
