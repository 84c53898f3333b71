"""Readers of the data formats ``fastssl-prepare`` takes, one listing API for all of them.

A source lists its samples once, up front: ``items`` are ``(ref, label)`` in a fixed
order, ``classes`` the label names (None: unlabelled, label -1), ``skipped`` the
``(name, reason)`` of samples refused while listing (a missing label, a member that is
not a regular file). ``fetch(ref)`` returns what :func:`fastssl.pipelines.prepare.decode`
takes: a file path, an :class:`~fastssl.pipelines.prepare.Encoded` image (bytes plus a
name whose extension picks the one PIL decoder tried) or decoded pixels; ``name(ref)``
names the sample in messages (shard and key). Every image then goes through the checks
of ``prepare`` (decompression bombs, aspect ratio, content against its extension), so a
shard's bytes are as untrusted as a folder's files.

Formats:

- a folder: an ImageFolder or a flat folder (:class:`FolderSource`);
- Parquet or Arrow shards (``.parquet``, ``.arrow``; one file, a glob or a folder), read
  through ``pyarrow`` from local files (:class:`ParquetSource`); the image column is a
  Hugging Face ``Image`` struct (``bytes``, ``path``) or plain binary;
- webdataset tar shards (``.tar``; one, a glob, a brace pattern or a folder), read with
  :mod:`tarfile` (:class:`TarSource`); samples are the members sharing a key (webdataset's
  rule: the name up to the first dot of its last component);
- a list file, ``.csv`` or ``.jsonl``, of image paths and labels relative to it
  (:class:`ListSource`);
- CIFAR-10/100 and STL-10 in their binary versions (:class:`CifarSource`, :class:`StlSource`).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from fastssl.pipelines.prepare import IMAGE_EXTS, Encoded, PrepareError, list_images

PYARROW_INSTALL = "reading Parquet/Arrow shards needs pyarrow: pip install 'fastssl[formats]' (or pip install pyarrow)"
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # webdataset's image keys, in the order one is picked
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target", "fine_label")


def _stat_sha1(paths) -> str:
    """What identifies a listing's content without reading it: names, sizes, modification times."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{int(st.st_mtime_ns)}\n".encode())
    return h.hexdigest()


def _classes_from(labels: list, names: list[str] | None = None) -> tuple[list[int], list[str] | None]:
    """Integer labels and class names from raw labels: strings get sorted names (ImageFolder's rule),
    integers keep their values (names: ``names`` when given, else the numbers); None -> -1."""
    present = [x for x in labels if x is not None]
    if not present:
        return [-1] * len(labels), None
    if all(isinstance(x, str) for x in present):
        names = sorted(set(present))
        index = {c: i for i, c in enumerate(names)}
        return [index[x] if x is not None else -1 for x in labels], names
    ints = [int(x) if x is not None else -1 for x in labels]
    top = max(ints)
    if names is None or len(names) <= top:
        names = [str(i) for i in range(top + 1)]
    return ints, list(names)


def _as_label(x):
    """A label cell as int or str (None when missing); a bool or float that is not integral is refused."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return None
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"label {x!r} is not a class")
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, str):
        x = x.strip()
        if not x:
            return None
        return int(x) if re.fullmatch(r"-?\d+", x) else x
    raise ValueError(f"label {x!r} is neither an integer nor a class name")


class Source:
    """The listing API (module doc); subclasses fill ``items``, ``classes``, ``skipped``, ``identity``."""

    kind = "source"
    items: list
    classes: list[str] | None
    skipped: list[tuple[str, str]]
    identity: str

    def fetch(self, ref):
        return ref

    def name(self, ref) -> str:
        return str(ref)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def extra_params(self) -> dict:
        return {"format": self.kind}

    def describe(self) -> str:
        lab = f"in {len(self.classes)} classes" if self.classes else "(unlabelled, label -1)"
        return f"{self.identity}: {len(self.items)} images {lab} ({self.kind})"

    def _finish(self, raw: list[tuple[object, object, str]], names: list[str] | None = None,
                labelled: bool | None = None) -> None:
        """``raw``: ``(ref, label or None, name)``; a missing label is skipped when others have one."""
        labelled = any(lab is not None for _, lab, _ in raw) if labelled is None else labelled
        if labelled:
            for ref, lab, nm in raw:
                if lab is None:
                    self.skipped.append((nm, "no label (the other samples have one): give it one or remove it"))
            raw = [r for r in raw if r[1] is not None]
        labels, self.classes = _classes_from([lab for _, lab, _ in raw], names) if labelled else ([-1] * len(raw), None)
        self.items = [(ref, lab) for (ref, _, _), lab in zip(raw, labels)]
        if not self.items:
            raise PrepareError(f"{self.identity} holds no usable sample ({len(self.skipped)} skipped"
                               + (f": {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else "") + ")")


class FolderSource(Source):
    """An ImageFolder or a flat folder (:func:`fastssl.pipelines.prepare.list_images`)."""

    kind = "folder"

    def __init__(self, src):
        self.root = Path(src)
        self.items, self.classes, self.skipped = list_images(src)
        self.identity = str(self.root.resolve())

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for p, label in self.items:
            st = os.stat(p)
            h.update(f"{p}\0{label}\0{st.st_size}\0{int(st.st_mtime_ns)}\n".encode())
        return h.hexdigest()

    def extra_params(self) -> dict:
        return {}  # as before sources existed: outputs written then stay up to date

    def describe(self) -> str:
        return (f"{self.root}: {len(self.items)} image files"
                + (f" in {len(self.classes)} classes" if self.classes else
                   " (flat folder: no class sub-folders, so label -1)"))


# ----------------------------------------------------------------------------- shards: where they are


def shard_paths(src: str, exts: tuple[str, ...], what: str) -> list[Path]:
    """A shard file, a folder of shards (sorted), a glob or a brace pattern (``shard-{000..009}.tar``)."""
    s = str(src)
    if "{" in s and ".." in s:
        try:
            from braceexpand import braceexpand
        except ImportError:
            raise PrepareError(f"{s}: a brace pattern needs braceexpand (pip install braceexpand), or give a glob "
                               f"or a folder") from None
        paths = [Path(p) for p in braceexpand(s)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise PrepareError(f"{missing[0]} (from {s}) does not exist: fix the pattern or give the folder")
    elif any(c in s for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(s) if p.lower().endswith(exts))
    elif Path(s).is_dir():
        paths = sorted(p for p in Path(s).iterdir() if p.is_file() and p.name.lower().endswith(exts))
    elif Path(s).is_file():
        paths = [Path(s)]
    else:
        raise PrepareError(f"source {s} does not exist: give a {what} file, a folder of them or a glob")
    if not paths:
        raise PrepareError(f"{s} holds no {what} ({', '.join(exts)}): give the shards' folder or a glob that "
                           f"matches them")
    return paths


# ----------------------------------------------------------------------------- Parquet / Arrow


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PrepareError(PYARROW_INSTALL) from None
    import pyarrow as pa

    return pa


class ParquetSource(Source):
    """Parquet or Arrow (IPC file or stream, as ``datasets.save_to_disk`` writes) shards, local files.

    The image column (``--image-column``; by default ``image`` or the first column of
    image bytes) holds either a struct with ``bytes`` (and ``path``, whose extension picks
    the decoder; Hugging Face's ``Image`` feature) or plain binary. A struct with no bytes
    but a ``path`` names a file relative to the shard's folder (never outside it). Labels
    (``--label-column``; by default ``label`` and kin when present) are integers or class
    names; Hugging Face's ``ClassLabel`` names, kept in the schema's metadata, name the
    classes. Rows are read one row group at a time, each group kept while its rows are
    written (the writer takes consecutive rows), so memory follows the row group size.
    """

    kind = "parquet"

    def __init__(self, src, image_column: str | None = None, label_column: str | None = None):
        pa = _pyarrow()
        self.shards = shard_paths(src, (".parquet", ".arrow"), "Parquet/Arrow shard")
        self.identity = str(Path(src).resolve()) if not any(c in str(src) for c in "*?[{") else str(src)
        self.skipped = []
        self._cache: tuple | None = None
        schema = self._schema(0)
        self.image_column = image_column or self._detect_image(schema, pa)
        if self.image_column not in schema.names:
            raise PrepareError(f"{self.shards[0]}: no column {self.image_column!r} (columns: "
                               f"{', '.join(schema.names)}): give --image-column")
        if label_column == "":
            self.label_column = None
        else:
            self.label_column = label_column or next((c for c in LABEL_COLUMNS if c in schema.names), None)
            if self.label_column is not None and self.label_column not in schema.names:
                raise PrepareError(f"{self.shards[0]}: no column {self.label_column!r} (columns: "
                                   f"{', '.join(schema.names)}): give --label-column, or --label-column '' for none")
        t = schema.field(self.image_column).type
        self.struct = pa.types.is_struct(t)
        if self.struct and t.get_field_index("bytes") < 0:
            raise PrepareError(f"{self.shards[0]}: column {self.image_column!r} is a struct without a 'bytes' field "
                               f"({t}): give --image-column naming the image bytes")
        names = self._class_names(schema)
        self.key_column = "__key__" if "__key__" in schema.names else \
            (f"{self.image_column}.path" if self.struct and t.get_field_index("path") >= 0 else None)
        raw, self.row_groups, self.keys = [], [], []
        for si, shard in enumerate(self.shards):
            labels, groups, keys = self._labels(si)
            self.row_groups.append(groups)
            self.keys.append(keys)
            for r, lab in enumerate(labels):
                try:
                    lab = _as_label(lab)
                except ValueError as e:
                    self.skipped.append((self.name((si, r)), str(e)))
                    continue
                raw.append(((si, r), lab, self.name((si, r))))
        self._finish(raw, names, labelled=self.label_column is not None and any(lab is not None for _, lab, _ in raw))
        # Workers take whole row groups (the median size, at most 1000 rows): each group is then read by one
        # worker, not by every worker that drew a few of its rows.
        sizes = [b - a for g in self.row_groups for a, b in zip(g, g[1:])] or [100]
        self.read_chunk = int(min(1000, max(16, np.median(sizes))))

    def _schema(self, si: int):
        import pyarrow.parquet as pq

        p = self.shards[si]
        try:
            if p.suffix.lower() == ".parquet":
                return pq.read_schema(p)
            return self._arrow_table(si).schema
        except Exception as e:
            raise PrepareError(f"{p}: not a readable {p.suffix[1:]} file ({type(e).__name__}: {e}): remove it or "
                               f"re-export it") from None

    def _arrow_table(self, si: int):
        import pyarrow as pa

        source = pa.memory_map(str(self.shards[si]))  # zero-copy: the table's pages stay in the file
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()

    @staticmethod
    def _detect_image(schema, pa) -> str:
        for c in IMAGE_COLUMNS:
            if c in schema.names:
                return c
        for f in schema:
            if (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0) or \
                    pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
                return f.name
        raise PrepareError(f"no image column among {', '.join(schema.names)}: give --image-column")

    def _class_names(self, schema) -> list[str] | None:
        meta = (schema.metadata or {}).get(b"huggingface")
        if not meta or not self.label_column:
            return None
        try:
            feature = json.loads(meta)["info"]["features"][self.label_column]
            return list(feature["names"]) if feature.get("_type") == "ClassLabel" else None
        except (ValueError, KeyError, TypeError):
            return None

    def _labels(self, si: int) -> tuple[list, list[int], list | None]:
        """The label column of shard ``si`` (Nones when unlabelled), its row-group start rows and the samples'
        keys for messages (``__key__``, or the image struct's ``path``; None when neither exists)."""
        import pyarrow.parquet as pq

        p = self.shards[si]
        keys = None
        try:
            if p.suffix.lower() == ".parquet":
                f = pq.ParquetFile(p)
                n = f.metadata.num_rows
                starts = list(np.cumsum([0] + [f.metadata.row_group(g).num_rows  # each group's first row, then
                                               for g in range(f.num_row_groups)]))  # the end
                col = f.read(columns=[self.label_column]).column(0).to_pylist() if self.label_column else [None] * n
                if self.key_column:  # a nested field alone ("image.path"): the bytes beside it stay unread
                    k = f.read(columns=[self.key_column]).column(0).combine_chunks()
                    keys = (k.field("path") if self.key_column != "__key__" else k).to_pylist()
            else:
                t = self._arrow_table(si)
                starts = [0, t.num_rows]
                col = t.column(self.label_column).to_pylist() if self.label_column else [None] * t.num_rows
                if self.key_column:
                    k = t.column(self.key_column.split(".")[0]).combine_chunks()
                    keys = (k.field("path") if self.key_column != "__key__" else k).to_pylist()
        except PrepareError:
            raise
        except Exception as e:
            raise PrepareError(f"{p}: cannot read it ({type(e).__name__}: {e}): remove the shard or re-export "
                               f"it") from None
        return col, [int(x) for x in starts], keys

    def _group(self, si: int, r: int):
        """The image column of the row group holding row ``r`` of shard ``si`` (cached) and its first row."""
        import bisect

        starts = self.row_groups[si]
        g = bisect.bisect_right(starts, r) - 1
        if self._cache is None or self._cache[:2] != (os.getpid(), (si, g)):
            p = self.shards[si]
            if p.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                col = pq.ParquetFile(p).read_row_group(g, columns=[self.image_column]).column(0)
            else:
                col = self._arrow_table(si).column(self.image_column)
            self._cache = (os.getpid(), (si, g), col, starts[g])
        return self._cache[2], self._cache[3]

    def fetch(self, ref):
        si, r = ref
        col, start = self._group(si, r)
        cell = col[r - start].as_py()
        if cell is None:
            raise ValueError("the image cell is empty")
        if not self.struct:
            return Encoded(self.name(ref), bytes(cell))
        data, path = cell.get("bytes"), cell.get("path")
        if data is not None:  # the path, when given, is the original file name: its extension names the format
            return Encoded(path or self.name(ref), bytes(data))
        if not path:
            raise ValueError("the image cell has neither bytes nor a path")
        folder = self.shards[si].parent.resolve()
        f = (folder / path).resolve()
        if not f.is_relative_to(folder):
            raise ValueError(f"image path {path!r} leads outside the shard's folder {folder}")
        return str(f)

    def name(self, ref) -> str:
        si, r = ref
        keys = self.keys[si] if si < len(self.keys) else None
        key = keys[r] if keys else None
        return f"{self.shards[si]} row {r}" + (f" (key {key})" if key else "")

    def fingerprint(self) -> str:
        return _stat_sha1(self.shards)

    def extra_params(self) -> dict:
        return {"format": self.kind, "image_column": self.image_column, "label_column": self.label_column}


# ----------------------------------------------------------------------------- webdataset tar shards


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's key/extension rule: the key is the path up to the first dot of the last component."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


class TarSource(Source):
    """webdataset tar shards, uncompressed (members are read in place by offset).

    A sample is the members sharing a key; its image is the first of ``jpg``, ``jpeg``,
    ``png``, ``webp`` present, its label ``cls`` (an integer or a class name as text) or
    ``json`` (an integer, or an object with ``label``/``cls``). Links and other non-files
    are skipped and named.
    """

    kind = "webdataset"

    def __init__(self, src):
        import tarfile

        self.shards = shard_paths(src, (".tar", ".tar.gz", ".tgz"), "tar shard")
        self.identity = str(Path(src).resolve()) if not any(c in str(src) for c in "*?[{") else str(src)
        self.skipped = []
        self._fd: tuple | None = None
        raw = []
        for si, shard in enumerate(self.shards):
            if shard.name.lower().endswith((".gz", ".tgz")):
                raise PrepareError(f"{shard}: a compressed tar cannot be read by offset: decompress it (gunzip) first")
            try:
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                with tarfile.open(shard, "r:") as tf:
                    order = []
                    for m in tf:
                        key, ext = _split_key(m.name)
                        if not m.isfile():
                            if not m.isdir():
                                self.skipped.append((f"{shard}: {m.name}", "not a regular file (a link or device)"))
                            continue
                        if key not in samples:
                            samples[key] = {}
                            order.append(key)
                        samples[key][ext] = m
                    for key in order:
                        members = samples[key]
                        nm = f"{shard}: key {key}"
                        ext = next((e for e in TAR_IMAGE_EXTS if e in members), None)
                        if ext is None:
                            self.skipped.append((nm, f"no image ({'/'.join(TAR_IMAGE_EXTS)}) among its members "
                                                     f"({', '.join(sorted(members)) or 'none'})"))
                            continue
                        try:
                            lab = self._label(tf, members)
                        except ValueError as e:
                            self.skipped.append((nm, str(e)))
                            continue
                        m = members[ext]
                        raw.append(((si, m.offset_data, m.size, f"{key}.{ext}"), lab, nm))
            except tarfile.TarError as e:
                raise PrepareError(f"{shard}: not a readable tar file ({e}): remove the shard or rewrite it") from None
        self._finish(raw)

    @staticmethod
    def _label(tf, members):
        if "cls" in members:
            return _as_label(tf.extractfile(members["cls"]).read(64).decode(errors="replace"))
        if "json" in members:
            m = members["json"]
            if m.size > 1 << 20:
                raise ValueError("json member over 1 MiB")
            try:
                doc = json.loads(tf.extractfile(m).read())
            except ValueError as e:
                raise ValueError(f"json member does not parse: {e}") from None
            if isinstance(doc, dict):
                doc = next((doc[k] for k in ("label", "cls", "class") if k in doc), None)
            return _as_label(doc)
        return None

    def fetch(self, ref):
        si, offset, size, name = ref
        if self._fd is None or self._fd[0] != os.getpid():  # one descriptor per process (forked writers)
            self._fd = (os.getpid(), {})
        fds = self._fd[1]
        if si not in fds:
            fds[si] = os.open(self.shards[si], os.O_RDONLY)
        data = os.pread(fds[si], size, offset)
        if len(data) != size:
            raise ValueError(f"shard ends inside the member ({len(data)} of {size} bytes)")
        return Encoded(name, data)

    def name(self, ref) -> str:
        si, _, _, member = ref
        return f"{self.shards[si]}: key {member.rpartition('.')[0]}"

    def fingerprint(self) -> str:
        return _stat_sha1(self.shards)


# ----------------------------------------------------------------------------- CSV / JSON-lines lists


class ListSource(Source):
    """A ``.csv`` (``path,label``; a header row naming ``path`` is optional) or ``.jsonl`` (``{"path": ...,
    "label": ...}`` per line) list. Paths are relative to the list's folder and must stay inside it (as
    symlinks must stay inside a source folder); labels are integers or class names, optional."""

    kind = "list"

    def __init__(self, src):
        self.list = Path(src)
        if not self.list.is_file():
            raise PrepareError(f"list file {src} does not exist")
        self.identity = str(self.list.resolve())
        self.folder = self.list.parent.resolve()
        self.skipped = []
        rows = self._rows()
        raw = []
        for line, path, lab in rows:
            nm = f"{self.list}:{line} ({path})"
            if not path:
                self.skipped.append((nm, "no path"))
                continue
            p = (self.folder / path).resolve()
            if not p.is_relative_to(self.folder):
                self.skipped.append((nm, f"leads outside the list's folder {self.folder}: give paths relative to "
                                         f"the list, below its folder"))
                continue
            if not p.is_file():
                self.skipped.append((nm, "file not found"))
                continue
            if p.suffix.lower() not in IMAGE_EXTS:
                self.skipped.append((nm, f"not an image file extension ({p.suffix or 'none'})"))
                continue
            try:
                lab = _as_label(lab)
            except ValueError as e:
                self.skipped.append((nm, str(e)))
                continue
            raw.append(((str(p), line), lab, nm))
        self._finish(raw)

    def _rows(self) -> list[tuple[int, str, object]]:
        out = []
        if self.list.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            with open(self.list) as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except ValueError as e:
                        self.skipped.append((f"{self.list}:{i}", f"not JSON: {e}"))
                        continue
                    if not isinstance(doc, dict):
                        self.skipped.append((f"{self.list}:{i}", "not a JSON object with a path"))
                        continue
                    path = next((doc[k] for k in ("path", "file", "image", "filename") if k in doc), None)
                    lab = next((doc[k] for k in ("label", "cls", "class", "target") if k in doc), None)
                    out.append((i, str(path) if path else "", lab))
            return out
        with open(self.list, newline="") as f:
            rows = list(csv.reader(f))
        header = [c.strip().lower() for c in rows[0]] if rows else []
        pcol, lcol, start = 0, 1, 1
        if any(c in ("path", "file", "filename", "image") for c in header):
            pcol = next(i for i, c in enumerate(header) if c in ("path", "file", "filename", "image"))
            lcol = next((i for i, c in enumerate(header) if c in ("label", "cls", "class", "target")), None)
            start = 2
            rows = rows[1:]
        for i, row in enumerate(rows, start):
            if not row or not any(c.strip() for c in row):
                continue
            path = row[pcol].strip() if len(row) > pcol else ""
            lab = row[lcol] if lcol is not None and len(row) > lcol else None
            out.append((i, path, lab))
        return out

    def fetch(self, ref):
        return ref[0]

    def name(self, ref) -> str:
        return f"{self.list}:{ref[1]} ({os.path.relpath(ref[0], self.folder)})"

    def fingerprint(self) -> str:
        return _stat_sha1([self.list] + [p for (p, _), _ in self.items])


# ----------------------------------------------------------------------------- CIFAR / STL-10 binaries


class _Records(Source):
    """Fixed-size records in binary files (memory-mapped): pixels need no decoder."""

    def __init__(self, folder, split: str):
        self.folder = Path(folder)
        self.identity = str(self.folder.resolve())
        self.split = split
        self.skipped = []
        self._maps: dict = {}

    def _map(self, path: Path, record: int) -> np.ndarray:
        key = (os.getpid(), path)
        if key not in self._maps:
            size = path.stat().st_size
            if size == 0 or size % record:
                raise PrepareError(f"{path}: {size} bytes is not a whole number of {record}-byte records (a truncated "
                                   f"download?): download it again")
            self._maps[key] = np.memmap(path, np.uint8, "r").reshape(-1, record)
        return self._maps[key]

    def extra_params(self) -> dict:
        return {"format": self.kind, "split": self.split}

    def _names(self, file: str) -> list[str] | None:
        p = self.folder / file
        return [x.strip() for x in p.read_text().splitlines() if x.strip()] if p.is_file() else None


class CifarSource(_Records):
    """CIFAR-10 (``data_batch_{1..5}.bin``, ``test_batch.bin``) or CIFAR-100 (``train.bin``, ``test.bin``; the
    fine labels) in the binary version: per image, label byte(s) then 1024 red, 1024 green, 1024 blue bytes."""

    def __init__(self, folder, split: str = "train"):
        super().__init__(folder, split)
        f = self.folder
        if (f / "data_batch_1.bin").is_file() or (f / "test_batch.bin").is_file():
            self.kind, self.label_bytes = "cifar10", 1
            files = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
            names, n_classes = self._names("batches.meta.txt"), 10
        else:
            self.kind, self.label_bytes = "cifar100", 2
            files = {"train": ["train.bin"], "test": ["test.bin"]}
            names, n_classes = self._names("fine_label_names.txt"), 100
        if split not in files:
            raise PrepareError(f"--split {split!r} is not a {self.kind} split: {' or '.join(files)}")
        self.files = [f / n for n in files[split]]
        missing = [p for p in self.files if not p.is_file()]
        if missing:
            raise PrepareError(f"{missing[0]} is missing: {self.kind}'s binary version has "
                               f"{', '.join(files[split])} for --split {split}")
        self.record = self.label_bytes + 3072
        raw = []
        for fi, p in enumerate(self.files):
            recs = self._map(p, self.record)
            labels = recs[:, self.label_bytes - 1]
            for r, lab in enumerate(labels.tolist()):
                if lab >= n_classes:
                    self.skipped.append((self.name((fi, r)), f"label {lab} is outside 0..{n_classes - 1}"))
                    continue
                raw.append(((fi, r), lab, ""))
        self._finish(raw, names or [str(i) for i in range(n_classes)])
        if len(self.classes) < n_classes:
            self.classes = (names or [str(i) for i in range(n_classes)])[:n_classes]

    def fetch(self, ref):
        fi, r = ref
        rec = self._map(self.files[fi], self.record)[r, self.label_bytes:]
        return np.ascontiguousarray(rec.reshape(3, 32, 32).transpose(1, 2, 0))

    def name(self, ref) -> str:
        fi, r = ref
        return f"{self.files[fi]} record {r}"

    def fingerprint(self) -> str:
        return _stat_sha1(self.files)


class StlSource(_Records):
    """STL-10's binary version: ``{train,test,unlabeled}_X.bin`` (96x96x3 per image, column-major: each
    channel stored column after column) and ``{train,test}_y.bin`` (labels 1..10). Splits: ``train``,
    ``test``, ``unlabeled``, ``train+unlabeled`` (the 105,000 images self-supervised methods pretrain on;
    the unlabeled ones get label -1)."""

    kind = "stl10"
    SPLITS = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"],
              "train+unlabeled": ["train", "unlabeled"]}

    def __init__(self, folder, split: str = "train"):
        super().__init__(folder, split)
        if split not in self.SPLITS:
            raise PrepareError(f"--split {split!r} is not an STL-10 split: {', '.join(self.SPLITS)}")
        self.record = 96 * 96 * 3
        self.files = []
        raw = []
        for part in self.SPLITS[split]:
            x = self.folder / f"{part}_X.bin"
            if not x.is_file():
                raise PrepareError(f"{x} is missing: STL-10's binary version (stl10_binary/) has {part}_X.bin")
            fi = len(self.files)
            self.files.append(x)
            n = len(self._map(x, self.record))
            if part == "unlabeled":
                labels = [None] * n
            else:
                y = self.folder / f"{part}_y.bin"
                if not y.is_file():
                    raise PrepareError(f"{y} is missing: the labels of {x.name}")
                labels = np.fromfile(y, np.uint8).tolist()
                if len(labels) != n:
                    raise PrepareError(f"{y} holds {len(labels)} labels for {n} images in {x.name}: download both "
                                       f"again")
            for r, lab in enumerate(labels):
                if lab is not None and not 1 <= lab <= 10:
                    self.skipped.append((self.name((fi, r)), f"label {lab} is outside 1..10"))
                    continue
                raw.append(((fi, r), (lab - 1) if lab is not None else -1, ""))
        names = self._names("class_names.txt") or [str(i) for i in range(10)]
        # Unlabelled images keep -1 beside the labelled ones (not a missing label to skip).
        self.items = [(ref, lab) for ref, lab, _ in raw]
        self.classes = names
        if not self.items:
            raise PrepareError(f"{self.folder} holds no usable STL-10 image for --split {split}")

    def fetch(self, ref):
        fi, r = ref
        rec = self._map(self.files[fi], self.record)[r]
        return np.ascontiguousarray(rec.reshape(3, 96, 96).transpose(2, 1, 0))

    def name(self, ref) -> str:
        fi, r = ref
        return f"{self.files[fi]} record {r}"

    def fingerprint(self) -> str:
        return _stat_sha1(self.files)


# ----------------------------------------------------------------------------- which reader


def open_source(src: str | os.PathLike, image_column: str | None = None, label_column: str | None = None,
                split: str = "train") -> Source:
    """The reader for ``src`` by what it is: list file, shard(s), CIFAR/STL-10 binary folder, image folder."""
    s = str(src)
    low = s.lower()
    p = Path(s)
    if low.endswith((".csv", ".jsonl", ".ndjson")):
        return ListSource(s)
    if low.endswith((".parquet", ".arrow")) or (p.is_dir() and any(
            f.suffix.lower() in (".parquet", ".arrow") for f in p.iterdir() if f.is_file())):
        return ParquetSource(s, image_column, label_column)
    if low.endswith((".tar", ".tar.gz", ".tgz")) or (p.is_dir() and any(
            f.name.lower().endswith(".tar") for f in p.iterdir() if f.is_file())):
        return TarSource(s)
    if p.is_dir():
        names = {f.name for f in p.iterdir()}
        if names & {"data_batch_1.bin", "test_batch.bin", "train.bin", "test.bin"}:
            return CifarSource(p, split)
        if names & {"train_X.bin", "unlabeled_X.bin", "test_X.bin"}:
            return StlSource(p, split)
    if any(c in s for c in "*?[{"):
        raise PrepareError(f"{s}: a pattern must end in .parquet, .arrow or .tar")
    return FolderSource(s)
