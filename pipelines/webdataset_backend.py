"""webdataset back-end: train straight from tar shards (``train-{000000..000099}.tar``), no ``.beton``.

Shards follow the webdataset layout: consecutive tar members sharing a key (the member
name up to the first dot of its base name) form one sample; the image is the member
with extension ``jpg``/``jpeg``/``png``/``webp``, the label ``cls`` (an integer as text)
or ``json`` (``{"label": int}``). Paths: a ``.tar`` file, a folder of them, a glob, a
brace pattern, or ``pipe:CMD`` (CMD writes the shard to stdout: ``pipe:curl -s URL``,
``pipe:aws s3 cp s3://bucket/x.tar -``), so a set larger than the machine's disk
streams through (the command runs through the shell, as webdataset's ``pipe:`` does, so a
data path is then as trusted as a command line). Reading is Python's ``tarfile``
(seekable for a local file, stream mode for a pipe), which is what the ``webdataset``
package itself reads with; the package is not needed: its shuffle and split would have
to be replaced anyway to make the order a pure function of (seed, epoch), which exact
resume and cheap skipping need.

Sample count: a header-only scan of each shard (a full read for ``pipe:`` shards)
counts its samples and reads its labels once; the result is cached per shard in
``fastssl.cache.cache_dir()/webdataset/`` (keyed by path, size and mtime; by the
command for ``pipe:``), so ``len()`` is known before the first batch.

Order of an epoch (all index arithmetic, known before any byte is read):

1. the shards are permuted by (seed, epoch) (evaluation: listing order) and laid end to
   end as one stream of N samples;
2. rank r takes a contiguous range of that stream, ``N // world_size`` samples (the
   split of every back-end: equal batches on every rank, each sample on one rank);
3. the rank's ``len()`` batches are dealt round-robin to its K DataLoader workers
   (batch b to worker b % K, torch's order for iterable datasets), and each worker
   takes a contiguous range of the rank's range with exactly its batches' samples
   (evaluation: each batch's own range, so the epoch keeps the dataset's order);
4. each worker reads its range in stream order through a shuffle buffer of
   ``shuffle_buffer`` samples (raw bytes, not decoded) and emits them in an order
   drawn from (seed, epoch, rank, worker).

When shard boundaries do not fall on range boundaries (shards fewer than ranks x
workers, uneven shards, a shard size that is not a multiple of the range), a shard is
split by sample ranges: each reader takes its own part and reads past the other's
without decoding it. Samples stay disjoint; the cost is re-reading at most about one
shard per worker per epoch. Shuffle quality vs. locality: a batch comes from one
worker's buffer, which mixes the ~``shuffle_buffer / samples per shard`` shards that
worker is reading; more shards than ranks x workers, and a buffer of at least one
shard, mix better; fewer, larger shards per worker read more sequentially.

Each sample is decoded once and every view cropped from it: on the CPU in the worker
(``torch_backend``'s PIL crop), or on CUDA as the torch back-end does (workers pass
JPEG bytes and crop geometry, the main process decodes the batch with nvJPEG and cuts
the views with ``roi_align``). Crops are keyed by the sample's global index (its
shard's place in the sorted listing + its place in the shard), so they do not depend
on which rank or worker read it.

Bad samples (undecodable image, no image, a missing or malformed label in a labelled
set) are logged once, one line naming the shard and key, and replaced by another
sample of the same batch (a hash of seed, epoch and the bad sample's index) cropped
with the bad sample's own random stream: batches stay full, ``Batch.indices`` names the
sample used, nothing else moves. A shard that breaks off (truncated, a failing
``pipe:`` command) loses only its remaining samples, replaced the same way, with one
line per shard and epoch.

Resume: the same (seed, epoch) gives the same batches, so skipping k batches with
``next()`` gives the uninterrupted epoch's batches k... ``skip_batches(k)`` does the
same without decoding the skipped samples (and without opening shards they alone
held): call it after ``set_epoch`` and before ``iter``.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastssl.pipelines import DataError, MissingDataError
from fastssl.pipelines.crops import sample_key, view_params
from fastssl.pipelines.loader import LoaderBase
from fastssl.pipelines.sources import TAR_IMAGE_EXTS as IMAGE_EXTS
from fastssl.pipelines.sources import _as_label
from fastssl.pipelines.sources import _split_key as _split
from fastssl.pipelines.torch_backend import (DEVICE_FAULTS, FolderViews, _crop_geometry, _reason,
                                             gpu_decode_and_crop, upright, worker_start_method)

log = logging.getLogger(__name__)

LABEL_EXTS = ("cls", "json")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX_VERSION = 2
_LOST = "__lost__"         # the parts of a sample the shard could not deliver: {_LOST: reason}
_REPLACE_STREAM = 1 << 21  # the "view" number of the replacement hash, apart from real views and torch's


# ----------------------------------------------------------------------------- shard lists


def _braces(s: str) -> list[str]:
    """Expand ``{000..099}`` (zero padding kept) and ``{a,b}`` groups, left to right."""
    m = re.search(r"\{([^{}]*)\}", s)
    if not m:
        return [s]
    head, body, tail = s[:m.start()], m.group(1), s[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        parts = body.split(",")
    return [x for p in parts for x in _braces(head + p + tail)]


def is_shard_spec(path) -> bool:
    """True for what this back-end reads: a ``.tar``/``.tar.gz``/``.tgz`` file, a brace or glob pattern
    or ``pipe:`` command naming shards, or a folder whose files include tar shards (no other check)."""
    p = os.fspath(path)
    if p.startswith("pipe:"):
        return True
    if p.endswith(SHARD_SUFFIXES) and not os.path.isdir(p):
        return True
    if os.path.isdir(p):
        try:
            return any(n.endswith(SHARD_SUFFIXES) for n in os.listdir(p))
        except OSError:
            return False
    return bool(re.search(r"[{*?\[]", p)) and any(x.endswith(SHARD_SUFFIXES) for x in _braces(p))


def list_shards(spec) -> list[str]:
    """The shards ``spec`` names, in listing order (brace order; sorted within a glob or folder)."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        found = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(SHARD_SUFFIXES))
        if not found:
            raise DataError(f"{spec}: a folder with no .tar shards in it")
        return found
    out, missing = [], []
    for s in _braces(spec):
        if s.startswith("pipe:"):
            out.append(s)
        elif re.search(r"[*?\[]", s):
            hits = sorted(glob.glob(s))
            if not hits:
                raise MissingDataError(f"{s}: no shard matches this pattern")
            out.extend(hits)
        elif not os.path.isfile(s):
            missing.append(s)
        else:
            out.append(s)
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(missing) + len(out)} named)" if len(missing) > 1 else ""
        raise MissingDataError(f"shard {missing[0]} does not exist{more}: {spec}")
    if not out:
        raise DataError(f"{spec}: names no shard")
    return out


def _open(url: str):
    """A readable binary stream of one shard (a file, or the stdout of a ``pipe:`` command)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return io.BufferedReader(_PipeStream(proc, url), 1 << 20)
    return open(url, "rb")


class _PipeStream(io.RawIOBase):
    """A command's stdout; closing it at the end of the data reports a failing exit status, closing it
    earlier (the reader needs no more of the shard) ends the command."""

    def __init__(self, proc, url):
        self.proc, self.url, self.eof = proc, url, False

    def readable(self):
        return True

    def readinto(self, b):
        n = self.proc.stdout.readinto(b)
        self.eof = self.eof or not n
        return n

    def close(self):
        if self.closed:
            return
        if not self.eof:
            self.proc.kill()
        self.proc.stdout.close()
        rc = self.proc.wait()
        super().close()
        if self.eof and rc != 0:
            raise DataError(f"{self.url}: the command exited with status {rc}")


def _samples(url: str, want=None, exts=IMAGE_EXTS + LABEL_EXTS):
    """Yield ``(position, key, {ext: bytes})`` of the samples of one shard, in tar order.

    ``want(position)``: True reads the sample's members with an extension in ``exts``, False
    passes over it without reading its bytes (a seek in a local file, a read past them in a
    pipe; nothing is decoded), None stops reading the shard.
    """
    f = _open(url)
    # A local file is opened seekable: passing over a sample is a seek. A pipe is read as a stream.
    mode = "r|*" if url.startswith("pipe:") else "r:*"
    try:
        with tarfile.open(fileobj=f, mode=mode) as tf:
            pos, key, parts, keep = -1, None, {}, False
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split(m.name)
                if k != key:
                    if key is not None and keep:
                        yield pos, key, parts
                    pos, key, parts = pos + 1, k, {}
                    keep = want(pos) if want is not None else True
                    if keep is None:  # past the wanted range: stop reading this shard
                        key = None
                        break
                if keep and ext in exts:
                    parts[ext] = tf.extractfile(m).read()
            if key is not None and keep:
                yield pos, key, parts
    finally:
        f.close()


def _label(parts: dict) -> int | str | None:
    """The sample's raw label, as ``fastssl-prepare`` reads the same shards (``pipelines.sources.TarSource``):
    ``cls`` an integer or a class name as text, ``json`` an integer or an object with ``label``/``cls``/
    ``class``; None when it has none; ValueError when malformed (a negative integer too: not a class)."""
    lab = None
    if "cls" in parts:
        lab = _as_label(parts["cls"][:64].decode(errors="replace"))
    elif "json" in parts:
        doc = json.loads(parts["json"])
        if isinstance(doc, dict):
            doc = next((doc[k] for k in ("label", "cls", "class") if k in doc), None)
        lab = _as_label(doc)
    if isinstance(lab, int) and lab < 0:
        raise ValueError(f"negative label {lab}")
    return lab


# ----------------------------------------------------------------------------- the index


def _count(url: str) -> dict:
    """``{"n": samples, "labelled": samples with a readable label, "max_label": the largest integer label
    (-1: none), "names": the class names (text labels), sorted}`` of one shard."""
    n = labelled = 0
    top, names = -1, set()
    for _, _, parts in _samples(url, exts=LABEL_EXTS):  # the images are passed over, not read
        n += 1
        try:
            lab = _label(parts)
        except (ValueError, UnicodeDecodeError):
            lab = None
        if lab is not None:
            labelled += 1
            if isinstance(lab, str):
                names.add(lab)
            else:
                top = max(top, lab)
    return {"n": n, "labelled": labelled, "max_label": top, "names": sorted(names)}


def _index_file(url: str):
    from fastssl.cache import cache_dir

    if url.startswith("pipe:"):
        ident = url
    else:
        st = os.stat(url)
        ident = f"{os.path.abspath(url)}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache_dir() / "webdataset" / f"{hashlib.sha1(f'{INDEX_VERSION}:{ident}'.encode()).hexdigest()}.json"


def shard_index(urls: list[str], threads: int = 2) -> list[dict]:
    """Per shard ``{"n", "labelled", "max_label", "names"}`` (see :func:`_count`), from the cache or one scan."""
    out: list[dict | None] = [None] * len(urls)
    todo = []
    for i, u in enumerate(urls):
        try:
            got = json.loads(_index_file(u).read_text())
            out[i] = {**{k: int(got[k]) for k in ("n", "labelled", "max_label")},
                      "names": [str(x) for x in got["names"]]}
        except (OSError, ValueError, KeyError, TypeError):
            todo.append(i)
    if todo:
        log.info("webdataset: counting the samples of %d shard(s) once (cached in %s)", len(todo),
                 _index_file(urls[todo[0]]).parent)

        def one(i):
            try:
                return i, _count(urls[i])
            except (OSError, tarfile.TarError, EOFError) as e:
                raise DataError(f"{urls[i]}: not a readable tar shard ({_reason(e)})") from e

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for i, got in pool.map(one, todo):
                out[i] = got
                try:
                    f = _index_file(urls[i])
                    f.parent.mkdir(parents=True, exist_ok=True)
                    tmp = f.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(got))
                    os.replace(tmp, f)
                except OSError:
                    pass
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the epoch plan


def buffer_order(n: int, bufsize: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64: the order in which a shuffle buffer of ``bufsize`` emits a stream of ``n`` items.

    The buffer fills with the first ``bufsize`` items; each later item replaces a uniformly drawn
    resident, which is emitted; at the end the residents leave in a random order. Reading item p
    needs at most ``bufsize`` items held, whatever the emission point.
    """
    if bufsize <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    m = min(bufsize, n)
    buf = list(range(m))
    draws = (rng.random(max(0, n - m)) * m).astype(np.int64).tolist()
    out = []
    for p, k in zip(range(m, n), draws):
        out.append(buf[k])
        buf[k] = p
    out.extend(np.asarray(buf)[rng.permutation(m)].tolist())
    return np.asarray(out, dtype=np.int64)


class _Plan:
    """One rank's epoch: per logical worker, its shard pieces, its emission order and its batch sizes."""

    def __init__(self, counts: np.ndarray, shard_order: np.ndarray, lo: int, sizes: list[int], workers: int,
                 bufsize: int, seed: int, epoch: int, rank: int, shuffle: bool):
        offsets = np.concatenate([[0], np.cumsum(counts)])           # global index of each shard's first sample
        ends = np.cumsum(counts[shard_order])                         # stream end of each ordered shard
        self.K = max(1, int(workers))
        self.sizes = sizes                                            # batch b has sizes[b] samples
        self.batches = [list(range(w, len(sizes), self.K)) for w in range(self.K)]
        self.pieces, self.perm, self.glob = [], [], []
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # rank-stream offset of each batch
        c = lo
        for w in range(self.K):
            count = int(sum(sizes[b] for b in self.batches[w]))
            if shuffle:  # one contiguous range per worker: sequential reads, mixed by the buffer
                ranges = [(c, c + count)]
                c += count
            else:  # evaluation: each batch its own range, so the epoch yields the dataset's order
                ranges = [(lo + int(starts[b]), lo + int(starts[b + 1])) for b in self.batches[w]]
            pieces, idx, n = [], [], 0
            for r0, r1 in ranges:
                a = r0
                i = int(np.searchsorted(ends, a, side="right"))
                while a < r1:
                    s = int(shard_order[i])
                    start = a - int(ends[i] - counts[s])
                    stop = min(int(counts[s]), start + (r1 - a))
                    pieces.append((s, start, stop, n))                # shard, first and end sample, local position
                    idx.append(offsets[s] + np.arange(start, stop))
                    n += stop - start
                    a += stop - start
                    i += 1
            self.pieces.append(pieces)
            self.glob.append(np.concatenate(idx).astype(np.int64) if idx else np.zeros(0, np.int64))
            rng = np.random.default_rng([seed, epoch, rank, w, 7])
            self.perm.append(buffer_order(count, bufsize, rng) if shuffle else np.arange(count, dtype=np.int64))

    def skip_of(self, w: int, start: int) -> tuple[int, int]:
        """(local batches, local samples) worker ``w`` skips when the pass starts at global batch ``start``."""
        nb = sum(1 for b in self.batches[w] if b < start)
        return nb, int(sum(self.sizes[b] for b in self.batches[w][:nb]))

    def emitted(self) -> np.ndarray:
        """The global indices of the whole epoch in yield order (batch 0 first)."""
        out, at = [], [0] * self.K
        for b, s in enumerate(self.sizes):
            w = b % self.K
            out.append(self.glob[w][self.perm[w][at[w]:at[w] + s]])
            at[w] += s
        return np.concatenate(out) if out else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- worker side


class _BadSample(Exception):
    pass


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one rank's epoch; in a DataLoader worker, the batches of that worker (see :class:`_Plan`).

    Yields ``(payload, geo, labels, indices, bad, where)``: ``payload`` V x (b, S, S, 3) uint8 crops (``geo``
    None) or, for ``gpu_decode``, b JPEG byte tensors / (H, W, 3) uint8 images with ``geo`` (b, V, 5)
    int64; ``labels`` (b,) int64 or None; ``indices`` (b,) int64; ``bad`` ``[(index, shard, key,
    reason)]`` of the samples replaced in this batch; ``where`` ``[(shard, key)]`` of each sample used.
    """

    def __init__(self, loader: WebDatasetLoader, plan: _Plan, start: int):
        self.urls, self.plan, self.start = loader.urls, plan, start
        self.labelled, self.gpu_decode = loader.num_classes is not None, loader.gpu_decode
        self.class_index = {c: k for k, c in enumerate(loader.classes or [])} if loader.named_classes else None
        self.seed, self.epoch = loader.seed, loader.epoch
        self.known_bad = dict(loader._bad)
        # torch_backend's decode-once, crop-every-view code, keyed by a sample index
        self.cropper = FolderViews([], loader.sizes, view_params(loader.specs), loader.seed, loader.train)
        self.cropper.epoch = loader.epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # After a skip, the DataLoader still asks its worker 0 first: it plays the logical worker of batch `start`.
        wid = 0 if info is None else info.id
        nworkers = 1 if info is None else info.num_workers
        for w in range(wid, self.plan.K, nworkers):
            yield from self._worker((w + self.start) % self.plan.K)

    def _read(self, w: int, needed: np.ndarray):
        """``(local position, shard, key, parts)`` of the needed samples of worker ``w``, in stream order.

        Consecutive pieces of one shard (evaluation: a worker's batches, with the other workers'
        batches between them) are read in one pass over the shard.
        """
        pieces = self.plan.pieces[w]
        k = 0
        while k < len(pieces):
            group = [pieces[k]]
            while k + len(group) < len(pieces) and pieces[k + len(group)][0] == group[0][0]:
                group.append(pieces[k + len(group)])
            k += len(group)
            s, stop = group[0][0], group[-1][2]
            local = {p: base + p - a for _, a, b, base in group for p in range(a, b)}  # shard position -> local
            if not any(needed[q] for q in local.values()):
                continue  # every sample of these pieces was skipped: the shard is not opened
            seen = [-1]

            def want(p, local=local, stop=stop, seen=seen):
                seen[0] = p
                if p >= stop:
                    return None
                return p in local and bool(needed[local[p]])

            last, done = None, -1
            try:
                for p, key, parts in _samples(self.urls[s], want=want):
                    last, done = key, p
                    yield local[p], s, key, parts
                why = f"the shard ends at sample {seen[0] + 1} but was indexed with more" if seen[0] + 1 < stop \
                    else None
            except (OSError, tarfile.TarError, EOFError, DataError) as e:
                why = f"unreadable after key {last!r}: {_reason(e)}" if last else f"unreadable: {_reason(e)}"
            if why:  # the rest is lost: its samples become bad ones (refilled; one line per shard and epoch)
                for p in sorted(local):
                    if p > done and needed[local[p]]:
                        yield local[p], s, None, {_LOST: why}

    def _worker(self, w: int):
        plan = self.plan
        jskip, eskip = plan.skip_of(w, self.start)
        first = max(0, jskip - 1)  # a skip still reads (not decodes) its last batch: the refill pool of the next
        efirst = eskip - (plan.sizes[plan.batches[w][first]] if jskip else 0)
        perm = plan.perm[w]
        needed = np.ones(len(perm), bool)
        needed[perm[:efirst]] = False
        reader = self._read(w, needed)
        held: dict[int, tuple] = {}
        e, prev = efirst, None
        for j, b in enumerate(plan.batches[w][first:], first):
            recs = []
            for p in perm[e:e + plan.sizes[b]]:
                while p not in held:
                    q, s, key, parts = next(reader)
                    held[q] = (s, key, parts)
                recs.append((int(plan.glob[w][p]), *held.pop(p)))
            e += plan.sizes[b]
            if j >= jskip:
                yield self._batch(recs, prev)
            prev = recs

    def _prepare(self, parts: dict, key: int, index: int):
        """(payload, geo) of one sample's image, cropped with sample ``key``'s stream; raises _BadSample."""
        if index in self.known_bad:
            raise _BadSample(self.known_bad[index])
        if _LOST in parts:
            raise _BadSample(parts[_LOST])
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None:
            raise _BadSample(f"no image ({'/'.join(IMAGE_EXTS)}) in the sample")
        data = parts[ext]
        from PIL import Image

        from fastssl.pipelines.prepare import turn_of

        try:
            if self.gpu_decode:
                # A JPEG that ends with its EOI marker goes to the GPU decoder whole; anything else is decoded here.
                # (An EXIF-rotated one is turned here: the GPU decoders do not apply the orientation.)
                if ext in ("jpg", "jpeg") and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9":
                    with Image.open(io.BytesIO(data)) as im:
                        w, h = im.size
                        turn = turn_of(im)
                    if turn is None:
                        geo = _crop_geometry(h, w, self.cropper.params, self.seed, self.epoch, key,
                                             self.cropper.train)
                        return torch.frombuffer(bytearray(data), dtype=torch.uint8), geo
                with Image.open(io.BytesIO(data)) as im:
                    rgb = np.array(upright(im).convert("RGB"))       # (H, W, 3) uint8, as displayed
                geo = _crop_geometry(rgb.shape[0], rgb.shape[1], self.cropper.params, self.seed, self.epoch, key,
                                     self.cropper.train)
                return torch.from_numpy(rgb), geo
            return self.cropper._load(io.BytesIO(data), key, "crops")
        except Exception as e:  # noqa: BLE001 - any undecodable image is replaced, never ends the epoch
            raise _BadSample(_reason(e)) from None

    def _sample(self, rec, key: int):
        """(payload, geo), label of record ``rec`` cropped with sample ``key``'s stream; raises _BadSample."""
        i, _, _, parts = rec
        lab = 0
        if self.labelled and _LOST not in parts:
            try:
                lab = _label(parts)
            except (ValueError, UnicodeDecodeError) as e:
                raise _BadSample(f"malformed label: {_reason(e)}") from None
            if lab is None:
                raise _BadSample("no label (cls or json) in a labelled set")
            if self.class_index is not None:  # class names: their sorted order, as fastssl-prepare numbers them
                if lab not in self.class_index:
                    raise _BadSample(f"label {lab!r} is a number in a set labelled by class names")
                lab = self.class_index[lab]
            elif isinstance(lab, str):
                raise _BadSample(f"label {lab!r} is a class name in a set labelled by numbers")
        return self._prepare(parts, key, i), lab

    def _batch(self, recs, prev):
        """Decode (or read) every record, replace the bad ones, collate.

        ``recs``/``prev``: ``(index, shard, key, parts)`` of this batch / of this worker's previous
        batch. A bad sample is refilled from this batch's good ones (a hash of seed, epoch and its
        index picks which), or, when none is good, from the previous batch's.
        """
        n = len(recs)
        out: list = [None] * n
        labels = [0] * n
        index = [r[0] for r in recs]
        where = [(self.urls[r[1]], r[2]) for r in recs]
        bad = []
        for j, rec in enumerate(recs):
            try:
                out[j], labels[j] = self._sample(rec, rec[0])
            except _BadSample as e:
                bad.append((j, rec[0], self.urls[rec[1]], rec[2], str(e)))
        pool = [recs[j] for j in range(n) if out[j] is not None] or list(prev or [])
        for j, i, url, key, why in bad:
            h = int(sample_key(self.seed, self.epoch, i, _REPLACE_STREAM))
            for t in range(len(pool)):
                rec = pool[(h + t) % len(pool)]
                try:
                    out[j], labels[j] = self._sample(rec, i)  # the refill, cropped with the bad sample's stream
                except _BadSample:
                    continue
                index[j], where[j] = rec[0], (self.urls[rec[1]], rec[2])
                break
            else:
                raise DataError(f"{url}: no readable sample in a batch of {n} nor in the one before it (e.g. "
                                f"key {key!r}: {why})")
        lab_t = torch.tensor(labels, dtype=torch.int64) if self.labelled else None
        idx_t = torch.tensor(index, dtype=torch.int64)
        bad = [(i, url, key, why) for _, i, url, key, why in bad]
        if out[0][1] is None:  # CPU path: V x (b, S, S, 3)
            crops = [torch.from_numpy(np.stack([o[0][v] for o in out])) for v in range(len(out[0][0]))]
            return crops, None, lab_t, idx_t, bad, where
        return [o[0] for o in out], torch.from_numpy(np.stack([o[1] for o in out])), lab_t, idx_t, bad, where


# ----------------------------------------------------------------------------- the loader


class WebDatasetLoader(LoaderBase):
    """Iterable of :class:`Batch` over webdataset tar shards; see the module docstring.

    ``path``: a shard, folder, glob, brace pattern or ``pipe:`` command. ``shuffle_buffer``:
    samples held (raw bytes) per worker for the shuffle. ``workers``: DataLoader worker
    processes (0: in this process); the epoch's order depends on it, on ``world_size`` and
    on ``batch_size``, so resume with the same three.
    """

    backend = "webdataset"
    _skip_action = "replaced by another sample of the same batch (batches stay full)"

    def __init__(self, path, views, batch_size: int, device, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, workers: int = 2, train: bool = True,
                 finisher=None, gpu_decode: bool | None = None, shuffle_buffer: int = 1000):
        self._setup(os.fspath(path), views, batch_size, device, seed=seed, rank=rank, world_size=world_size,
                    drop_last=drop_last, train=train, finisher=finisher)
        self.workers, self.shuffle_buffer = int(workers), int(shuffle_buffer)
        if self.shuffle_buffer < 1 or self.workers < 0:
            raise ValueError(f"shuffle_buffer must be >= 1 (1: no shuffle within a worker's range) and workers >= 0, "
                             f"got {shuffle_buffer} and {workers}")
        self.urls = list_shards(self.path)
        index = shard_index(self.urls, threads=max(1, self.workers))
        self.counts = np.array([x["n"] for x in index], np.int64)
        self.num_samples = int(self.counts.sum())
        if self.num_samples == 0:
            raise DataError(f"{self.path}: {len(self.urls)} shard(s) but no sample in them")
        # Labels: integers (classes 0..max), or class names numbered in sorted order (ImageFolder's and
        # fastssl-prepare's rule); a set that mixes both keeps the integers and refuses the names.
        top = max(x["max_label"] for x in index)
        names = sorted(set().union(*(x["names"] for x in index)))
        self.named_classes = bool(names) and top < 0
        self.classes = names if self.named_classes else ([str(i) for i in range(top + 1)] if top >= 0 else None)
        self.num_classes = len(self.classes) if self.classes else None
        self.gpu_decode = (self.device.type == "cuda") if gpu_decode is None else bool(gpu_decode)
        self._bad: dict[int, str] = {}   # global index -> reason: known unreadable, replaced without decoding
        self._start = 0                  # batches the next pass skips (skip_batches)
        self._offset = 0                 # the current pass's first batch (photometric step numbers)
        self._lost_logged: set = set()   # (epoch, shard, reason) of broken shards already logged
        self._plan_cache = None          # ((epoch, workers, batch size, buffer), _Plan) of the last epoch planned
        self._describe()

    def _describe(self) -> None:
        """One log line: the set, the split of an epoch, and whether (and why) shards are split by sample ranges."""
        S, K, W = len(self.urls), max(1, self.workers), self.world_size
        lo, hi = int(self.counts.min()), int(self.counts.max())
        plan = self._plan(0)
        partial = sum(1 for ps in plan.pieces for s, a, b, _ in ps if b > a and (a > 0 or b < self.counts[s]))
        split = ""
        if partial:
            why = (f"fewer shards than ranks x workers ({S} < {W * K})" if S < W * K else
                   "shards of unequal size" if lo != hi else "shard sizes that do not divide the ranges")
            split = (f"; {why}: in epoch 0, {partial} of this rank's shard reads take part of a shard, split by "
                     f"sample ranges with another reader (which passes over the part it does not take)")
        log.info("webdataset: %d samples in %d shard(s) (%d..%d per shard), %d batches of %d per epoch on rank %d "
                 "of %d; each epoch permutes the shards, each rank takes a contiguous range of that order and "
                 "each of its %d worker(s) a contiguous part of it%s", self.num_samples, S, lo, hi, len(self),
                 self.batch_size, self.rank, W, K, split)

    def set_epoch(self, epoch: int, global_size: int | None = None) -> None:
        self._start = 0
        super().set_epoch(epoch, global_size)

    def skip_batches(self, k: int) -> None:
        """The next pass over this epoch starts at batch ``k`` (yields ``len() - k`` batches, the same as an
        uninterrupted pass's batches k..), without decoding the skipped samples. Reset by :meth:`set_epoch`."""
        if not 0 <= int(k) <= len(self):
            raise ValueError(f"skip_batches: k={k} is outside 0..{len(self)} (batches per epoch)")
        self._start = int(k)

    def _plan(self, epoch: int) -> _Plan:
        key = (epoch, self.workers, self.batch_size, self.shuffle_buffer)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, self._make_plan(epoch))
        return self._plan_cache[1]

    def _make_plan(self, epoch: int) -> _Plan:
        N, W, r = self.num_samples, self.world_size, self.rank
        if self.drop_last:
            lo = r * (N // W)
        else:
            lo = r * (N // W) + min(r, N % W)
        nb = len(self)
        per = N // W + (0 if self.drop_last else int(r < N % W))
        total = nb * self.batch_size if self.drop_last else per
        sizes = [min(self.batch_size, total - b * self.batch_size) for b in range(nb)]
        S = len(self.urls)
        shard_order = np.random.default_rng([self.seed, epoch]).permutation(S) if self.train else np.arange(S)
        return _Plan(self.counts, shard_order, lo, sizes, self.workers, self.shuffle_buffer if self.train else 1,
                     self.seed, epoch, r, self.train)

    can_stride = False

    def set_stride(self, stride: int) -> None:
        if int(stride) != 1:
            raise ValueError(f"{self.path}: the webdataset back-end streams whole shards and reads no strided "
                             f"subset; give eval.knn_stride=1")

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch`` in the order they are yielded (before bad-sample replacement)."""
        return self._plan(epoch).emitted().astype(np.uint64)

    def _finish(self, step: int, raw):
        return super()._finish(step + self._offset, raw)

    def _raw_batches(self, order, nb: int):
        start, self._start = self._start, 0
        self._offset = start
        if start >= nb:
            return
        ds = ShardStream(self, self._plan(self.epoch), start)
        if self.workers > 0:
            it = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.workers, pin_memory=self.device.type == "cuda",
                multiprocessing_context=worker_start_method(self.device, self.worker_start), prefetch_factor=4)
        else:
            it = ds
        labelled = self.num_classes is not None
        nbk = self.device.type == "cuda"
        for payload, geo, labels, idx, bad, where in it:
            self._note(bad)
            if geo is not None:
                try:
                    crops = gpu_decode_and_crop(payload, geo, self.sizes, self.device)
                except DEVICE_FAULTS:  # out of memory, a CUDA error: not a JPEG's fault
                    raise
                except (RuntimeError, ValueError):  # a JPEG the GPU decoder refuses: decode it on the CPU, or replace it
                    payload, geo, labels, idx = self._cpu_fallback(ds, payload, geo, labels, idx, where)
                    crops = gpu_decode_and_crop(payload, geo, self.sizes, self.device)
            else:
                crops = [c.to(self.device, non_blocking=nbk) for c in payload]
            yield (crops, labels.to(self.device, non_blocking=nbk) if labelled else None,
                   idx.to(self.device, non_blocking=nbk))

    def _note(self, bad) -> None:
        """One log line per bad sample, the first time it is met; later epochs replace it without decoding.
        Samples a broken shard did not deliver (key None): one line per shard and epoch, retried next epoch."""
        for i, url, key, why in bad:
            if key is None:
                if (self.epoch, url, why) not in self._lost_logged:
                    self._lost_logged.add((self.epoch, url, why))
                    log.warning("webdataset: %s: %s; the samples of this shard not read are %s", url, why,
                                self._skip_action)
                self._skip(f"{url}#{i}", why)
                continue
            if i not in self._bad:
                log.warning("webdataset: %s: sample %r skipped (%s); %s", url, key, why, self._skip_action)
            self._bad[i] = why
            self._skip(f"{url}#{key}", why)

    def _report_skipped(self, first: int = 3) -> None:
        """Each bad sample already had its log line (``_note``); ``skipped`` keeps the list."""

    def _cpu_fallback(self, ds: ShardStream, payload, geo, labels, idx, where):
        """Payloads the GPU decoder refuses, decoded on the CPU (same crop boxes); ones nothing decodes refilled.

        The worker only parsed such a JPEG's header, so it is refilled here, from the batch's other
        slots; in later epochs it is known and the worker refills it (its pick among the batch's
        readable samples may then differ from this one).
        """
        from PIL import Image

        from fastssl.pipelines.torch_backend import decode_jpegs

        payload, geo, idx = list(payload), geo.clone(), idx.clone()
        labels = labels.clone() if labels is not None else None
        bad = []
        for k, p in enumerate(payload):
            if p.dim() != 1:
                continue
            try:
                decode_jpegs([p], self.device)  # the torch back-end's decoder (TorchCodec or torchvision)
                continue
            except DEVICE_FAULTS:
                raise
            except (RuntimeError, ValueError):
                pass
            try:
                with Image.open(io.BytesIO(p.numpy().tobytes())) as im:
                    payload[k] = torch.from_numpy(np.array(im.convert("RGB")))   # (H, W, 3) uint8, same geometry
            except Exception as e:  # noqa: BLE001
                bad.append((k, _reason(e)))
        if bad:
            good = [k for k in range(len(payload)) if k not in {j for j, _ in bad}]
            if not good:
                raise DataError(f"{self.path}: no decodable sample in a batch of {len(payload)}")
            for k, why in bad:
                i = int(idx[k])
                self._note([(i, *where[k], why)])
                g = good[int(sample_key(self.seed, self.epoch, i, _REPLACE_STREAM)) % len(good)]
                im = payload[g]
                h, w = (im.shape[0], im.shape[1]) if im.dim() == 3 else _jpeg_size(im)
                geo[k] = torch.from_numpy(_crop_geometry(h, w, ds.cropper.params, self.seed, self.epoch, i,
                                                         self.train))
                payload[k], idx[k] = im, idx[g]
                if labels is not None:
                    labels[k] = labels[g]
        return payload, geo, labels, idx


def _jpeg_size(p: torch.Tensor) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(p.numpy().tobytes())) as im:
        w, h = im.size
    return h, w
