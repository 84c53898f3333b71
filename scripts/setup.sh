#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian machine (Python 3.11, root, no GPU):
# system headers that ffcv compiles against, then a virtual environment in
# .venv with fastssl and every extra the tests exercise. A second call reuses
# what is there (apt and pip skip what is installed; a stamp file skips pip).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTSSL_VENV:-.venv}
PY=${PYTHON:-python3}

# --- system packages for ffcv (libjpeg-turbo, OpenCV headers, pkg-config) ---
APT_PKGS="pkg-config libturbojpeg0-dev libopencv-dev"
need_apt=0
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || need_apt=1; done
if [ "$need_apt" = 1 ]; then
  if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "fastssl setup: ffcv needs system packages that are missing. Run, as root:" >&2
    echo "  apt-get update && apt-get install -y $APT_PKGS" >&2
    echo "then run this script again." >&2
    exit 1
  fi
  echo "[setup] apt-get install $APT_PKGS"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PKGS >/dev/null
fi

# --- virtual environment ---
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.fastssl-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing python packages into $VENV (first time: several minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
  # torch/torchvision first and pinned: a CUDA build that also runs on the CPU
  # (it brings triton, whose interpreter tests the kernels without a GPU).
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  # ffcv builds from source against the system headers above; numpy/numba
  # come in through the project's own pins.
  "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[ffcv,dali,formats,test]"
  rm -f "$VENV"/.fastssl-setup-*
  touch "$STAMP"
fi
echo "[setup] ok: $("$VENV/bin/python" -c 'import torch, fastssl; print("torch", torch.__version__, "fastssl", fastssl.__version__)')"
