"""The self-contained ffcv wheels that ``scripts/build_ffcv_wheel.sh`` writes to ``dist/wheels``.

They exist for machines with no compiler, no apt and no network (the lent GPU machines), so
what matters is that every shared library ffcv's extension loads comes from the wheel's own
``ffcv.libs/``, never from the system's OpenCV or libjpeg-turbo that this machine has (ffcv was
compiled against them here), and that ffcv's two C entry points fastssl calls (``imdecode``,
``resize``) still compute the right pixels through the vendored copies.

The wheels take about 40 s each to build (2 shared cores), and ``import ffcv`` alone takes
about 7 s of CPU, so building and the full install-and-import are ``slow`` tests; the default
suite loads the native code of whatever wheels are already in ``dist/wheels`` (a few seconds
each) and skips, naming the script, if there are none. Where this process may make a mount
namespace (root, as on the build machines), the checks run with the system's copies of the
libraries the wheel vendors replaced by empty files: the closest this machine gets to not having
them installed.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "dist" / "wheels"
SCRIPT = ROOT / "scripts" / "build_ffcv_wheel.sh"
FFCV_VERSION = "1.0.2"
TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
# What the wheel may still take from the system: glibc's own libraries, libstdc++ and libgcc_s
# (any machine that runs torch has them) and the kernel's vDSO.
SYSTEM_OK = re.compile(r"^(linux-vdso|ld-linux-x86-64|libc|libm|libdl|librt|libpthread|libutil|libresolv|"
                       r"libstdc\+\+|libgcc_s)\.so")
PURE_REQS = ("terminaltables", "assertpy", "fastargs", "pytorch-pfn-extras")


def _wheels() -> list[Path]:
    return sorted(WHEELS.glob(f"ffcv-{FFCV_VERSION}+*-cp3*-manylinux_*_x86_64.whl"))


def _tag(wheel: Path) -> str:
    return wheel.name.split("-")[2]


def _python_for(tag: str) -> str | None:
    """An interpreter here for a wheel's tag: this one, else pythonX.Y on PATH or under pyenv."""
    if tag == TAG:
        return sys.executable
    ver = f"{tag[2]}.{tag[3:]}"
    cands = [shutil.which(f"python{ver}")]
    cands += sorted(Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")).glob(f"versions/{ver}*/bin/python{ver}"),
                    reverse=True)
    for c in filter(None, cands):
        r = subprocess.run([str(c), "-c", f"import sys; assert sys.version_info[:2] == ({tag[2]}, {tag[3:]})"],
                           capture_output=True, check=False)
        if r.returncode == 0:  # a pyenv shim exists even where the version is not selected
            return str(c)
    return None


def _no_wheels_reason() -> str:
    return f"no ffcv wheel in {WHEELS.relative_to(ROOT)}: run scripts/build_ffcv_wheel.sh (about 40 s per Python)"


def _can_hide() -> bool:
    """Whether a mount namespace can be made here (to bind /dev/null over system libraries)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode == 0


def _system_copies() -> list[str]:
    """This machine's own files of the libraries the wheel vendors (OpenCV and all it pulls in,
    libjpeg-turbo), by their real paths. Those that something else in the test's processes
    loads are left readable: libz (the zlib module), libGLX/libGLdispatch/X11 (opencv-python's
    cv2 links the system's libGL)."""
    out = set()
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/lib"):
        p = Path(d)
        if not p.is_dir():
            continue
        for pat in ("libopencv_*.so*", "libturbojpeg.so*", "liblapack.so*", "libblas.so*", "libgfortran.so*",
                    "libquadmath.so*", "libtbb.so*"):
            out |= {str(f.resolve()) for f in p.glob(pat) if f.resolve().is_file()}
    return sorted(out)


def _hidden(cmd: list[str]) -> list[str]:
    """``cmd`` run where each system copy reads as an empty file (only inside its own mount namespace)."""
    binds = "".join(f"mount --bind /dev/null {f} && " for f in _system_copies())
    return ["unshare", "-m", "sh", "-c", binds + 'exec "$@"', "sh", *cmd]


def _assert_hiding_works() -> None:
    """Inside the namespace the system's libjpeg-turbo reads as empty (so loading it would fail)."""
    turbo = [f for f in _system_copies() if "libturbojpeg" in f]
    if not turbo:
        return  # nothing to hide: this machine has no system libjpeg-turbo at all
    r = subprocess.run(_hidden(["wc", "-c", turbo[0]]), capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.split()[0] == "0", r.stdout + r.stderr


def _assert_decoded(got, ref) -> None:
    """ffcv decodes with libjpeg-turbo's fast IDCT, cv2 with the accurate one: close, not equal.

    On the test image the system-built ffcv differs from cv2 by 1.22 on average and 10 at most;
    the image shifted by one pixel differs by 2.47, swapped channels or zeros by far more.
    """
    import numpy as np

    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 16, (diff.mean(), diff.max())


def _extract(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    for f in dest.rglob("*.so*"):  # zipfile drops the mode bits; the loader maps these executable
        f.chmod(0o755)
    return dest


def _test_jpeg(tmp_path: Path):
    """A 48x64 JPEG of smooth ramps and a block (q 95): its RGB pixels as cv2 decodes them, and its path."""
    cv2 = pytest.importorskip("cv2")
    np = pytest.importorskip("numpy")
    h, w = 48, 64
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)
    rgb[10:30, 20:44] = (200, 40, 90)
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), 95])
    assert ok
    path = tmp_path / "test.jpg"
    path.write_bytes(enc.tobytes())
    ref = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return path, ref


# Run by the wheel's own Python with no site-packages (-I -S): only ctypes, so it works for a
# Python here that has no numpy. Loads the extension by path, reports which shared objects that
# mapped, decodes the JPEG with ffcv's imdecode and halves it with ffcv's resize (OpenCV INTER_AREA).
_NATIVE_CHILD = r"""
import ctypes, glob, json, sys
root, jpeg, h, w, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def mapped():
    with open("/proc/self/maps") as f:
        return {p[5].strip() for p in (l.split(None, 5) for l in f) if len(p) == 6 and ".so" in p[5]}

before = mapped()
lib = ctypes.CDLL(glob.glob(root + "/ffcv/_libffcv*.so")[0])
new = sorted(mapped() - before)
u32, u64, ptr = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p
lib.imdecode.argtypes = [ptr, u64, u32, u32, ptr, u32, u32, u32, u32, u32, u32, ctypes.c_bool, ctypes.c_bool]
lib.imdecode.restype = ctypes.c_int
lib.resize.argtypes = [ctypes.c_int64] * 11
data = open(jpeg, "rb").read()
src = ctypes.create_string_buffer(data, len(data))
img = ctypes.create_string_buffer(h * w * 3)
rc = lib.imdecode(src, len(data), h, w, img, h, w, 0, 0, 1, 1, False, False)
small = ctypes.create_string_buffer((h // 2) * (w // 2) * 3)
lib.resize(0, ctypes.addressof(img), h, w, 0, h, 0, w, ctypes.addressof(small), h // 2, w // 2)
open(out + ".full", "wb").write(img.raw)
open(out + ".half", "wb").write(small.raw)
print(json.dumps({"rc": rc, "new": new}))
"""


def _check_native(py: str, root: Path, jpeg: Path, ref, tmp_path: Path, hide: bool) -> None:
    """Run the child with ``py`` (system copies hidden if ``hide``) and check what it mapped and computed."""
    import cv2
    import numpy as np

    h, w = ref.shape[:2]
    out = tmp_path / ("hidden" if hide else "plain")
    cmd = [py, "-I", "-S", "-c", _NATIVE_CHILD, str(root), str(jpeg), str(h), str(w), str(out)]
    r = subprocess.run(_hidden(cmd) if hide else cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    libs = root / "ffcv.libs"
    outside = [p for p in rep["new"] if not (p.startswith((f"{libs}/", f"{root / 'ffcv'}/"))
                                             or SYSTEM_OK.search(Path(p).name))]
    assert not outside, f"loaded from outside the wheel: {outside}"
    names = " ".join(Path(p).name for p in rep["new"])
    for lib in ("libopencv_core-", "libopencv_imgproc-", "libturbojpeg-"):
        assert lib in names, f"{lib} not loaded from ffcv.libs: {rep['new']}"
    assert rep["rc"] == 0, "imdecode failed"
    full = np.frombuffer((out.with_suffix(".full")).read_bytes(), np.uint8).reshape(h, w, 3)
    _assert_decoded(full, ref)
    half = np.frombuffer((out.with_suffix(".half")).read_bytes(), np.uint8).reshape(h // 2, w // 2, 3)
    want = cv2.resize(full, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize("wheel", _wheels() or [pytest.param(None, marks=pytest.mark.skip(reason=_no_wheels_reason()))],
                         ids=lambda w: _tag(w) if w else "none")
def test_wheel_carries_its_libraries_and_decodes(wheel, tmp_path):
    """Each wheel in dist/wheels: layout, metadata, no distutils, and its native code run by its own Python."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    assert re.search(rf"^Version: {re.escape(FFCV_VERSION)}\+", meta, re.MULTILINE)
    assert any(re.fullmatch(rf"ffcv/_libffcv\.cpython-{_tag(wheel)[2:]}-x86_64-linux-gnu\.so", n) for n in names)
    vendored = [n for n in names if n.startswith("ffcv.libs/")]
    for lib in ("libopencv_core", "libopencv_imgproc", "libturbojpeg"):
        assert any(Path(n).name.startswith(lib + "-") for n in vendored), f"{lib} not in ffcv.libs: {vendored}"
    # Python 3.12 has no distutils: ffcv 1.0.2 imported it (unused) in pipeline/graph.py.
    for n, src in sources.items():
        for node in ast.walk(ast.parse(src, n)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] == "distutils" for m in mods), f"{n} imports distutils"

    py = _python_for(_tag(wheel))
    if py is None:
        pytest.skip(f"no Python {_tag(wheel)} here to load the {_tag(wheel)} wheel's extension")
    root = _extract(wheel, tmp_path / "unpacked")
    # ldd follows the same search (RPATH $ORIGIN/../ffcv.libs) without running anything.
    ext = next(root.glob("ffcv/_libffcv*.so"))
    ldd = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, check=False)
    assert ldd.returncode == 0 and "not found" not in ldd.stdout, ldd.stdout + ldd.stderr
    for line in ldd.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m and not SYSTEM_OK.search(m.group(1)):
            assert Path(m.group(2)).resolve().parent == (root / "ffcv.libs").resolve(), line

    jpeg, ref = _test_jpeg(tmp_path)
    hide = _can_hide()
    if hide:
        _assert_hiding_works()
    _check_native(py, root, jpeg, ref, tmp_path, hide=hide)


# Run in the fresh environment: the wheel's ffcv through its Python API, as fastssl uses it.
_IMPORT_CHILD = r"""
import json, sys
import numpy as np, cv2
import ffcv
from ffcv.fields import RGBImageField
from ffcv.libffcv import imdecode, resize_crop
jpeg, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
RGBImageField(write_mode="jpg")
data = np.frombuffer(open(jpeg, "rb").read(), np.uint8)
img = np.zeros((h, w, 3), np.uint8)
rc = imdecode(data, img, h, w, h, w, 0, 0, 1, 1, False, False)
half = np.zeros((h // 2, w // 2, 3), np.uint8)
resize_crop(img, 0, h, 0, w, half)
with open("/proc/self/maps") as f:
    maps = sorted({p[5].strip() for p in (l.split(None, 5) for l in f) if len(p) == 6 and ".so" in p[5]})
np.save(jpeg + ".npy", np.concatenate([img.ravel(), half.ravel()]))
print(json.dumps({"rc": rc, "ffcv": ffcv.__file__, "maps": maps}))
"""


@pytest.mark.slow  # `import ffcv` alone takes about 7 s of CPU (torch, numba); the default suite has the test above
def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    """This Python's wheel, installed offline as on a GPU machine, imports and decodes through ffcv's API.

    The venv has no packages of its own but ffcv and its small pure-Python requirements (from
    dist/wheels, with pip's --no-index --no-deps, the line the GPU machines run); torch, numpy,
    numba, cv2 and PIL come from this interpreter's environment through a .pth file appended
    after the venv's own site-packages (installing torch afresh would take minutes and
    gigabytes). That environment also has ffcv built against the system's libraries, so the
    test asserts which ffcv was imported and which libraries were mapped.
    """
    wheel = next((w for w in _wheels() if _tag(w) == TAG), None)
    if wheel is None:
        pytest.skip(f"no {TAG} ffcv wheel in dist/wheels: run scripts/build_ffcv_wheel.sh")
    pytest.importorskip("torch")
    import sysconfig

    import numpy as np

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip())
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-index", "--no-deps",
                        "--find-links", str(WHEELS), f"ffcv=={FFCV_VERSION}", *PURE_REQS],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    main_site = sysconfig.get_paths()["purelib"]
    (vsite / "zz_main_env.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")

    jpeg, ref = _test_jpeg(tmp_path)
    h, w = ref.shape[:2]
    cmd = [str(vpy), "-c", _IMPORT_CHILD, str(jpeg), str(h), str(w)]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH")}
    hide = _can_hide()
    if hide:
        _assert_hiding_works()
    r = subprocess.run(_hidden(cmd) if hide else cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(rep["ffcv"]).is_relative_to(vsite), rep["ffcv"]
    assert rep["rc"] == 0
    own = [p for p in rep["maps"] if re.search(r"libopencv_|libturbojpeg|_libffcv", Path(p).name)]
    stray = [p for p in own if not Path(p).is_relative_to(vsite)]
    assert not stray, f"ffcv's libraries mapped from outside the fresh venv: {stray}"
    assert any("/ffcv.libs/libturbojpeg-" in p for p in own) and any("/ffcv.libs/libopencv_imgproc-" in p
                                                                        for p in own), own
    got = np.load(str(jpeg) + ".npy")
    full, half = got[: h * w * 3].reshape(h, w, 3), got[h * w * 3:].reshape(h // 2, w // 2, 3)
    _assert_decoded(full, ref)
    import cv2
    want = cv2.resize(full, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.slow
def test_build_script_builds_once_and_reuses(tmp_path):
    """scripts/build_ffcv_wheel.sh for this Python: a wheel in dist/wheels, then a second call reuses it."""
    env = dict(os.environ, MAX_JOBS="1")
    t0 = time.monotonic()
    cmd = ["bash", str(SCRIPT), sys.executable]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
    first = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    wheel = next((w for w in _wheels() if _tag(w) == TAG), None)
    assert wheel is not None and str(wheel.relative_to(ROOT)) in r.stdout, r.stdout
    assert wheel.stat().st_size < 64 * 2**20  # what one device call may carry, the working tree included
    t0 = time.monotonic()
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r2.returncode == 0 and f"{TAG}: cached" in r2.stderr, r2.stderr
    assert time.monotonic() - t0 < max(15.0, first / 2)
    assert "pip install -q --no-index --no-deps --find-links" in r2.stdout
