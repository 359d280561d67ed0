#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine: system packages, .venv, CPU torch, fullrange.
# Usage: scripts/setup.sh [extras]   (extras default "dev", e.g. "dev,bench")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
pip_install() {  # quiet pip; drops this machine's notes about missing local mirrors, and build warnings
    PYTHONWARNINGS=ignore "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location '" || true; }
    return "${PIPESTATUS[0]}"
}

# A stamp of everything that decides the install; skip pip when nothing changed.
stamp=".venv/.fullrange-setup-$(cat pyproject.toml setup.py scripts/setup.sh | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing into .venv (extras: $EXTRAS)"
    pip_install --upgrade pip setuptools wheel
    # CPU torch from the local wheel; cluster users install their CUDA build instead.
    pip_install torch==2.13.0 triton==3.7.1 numpy pillow
    # ffcv compiles against numpy, opencv and libturbojpeg; build it in this env.
    pip_install --no-build-isolation "ffcv==1.0.2"
    pip_install -e ".[$EXTRAS]"
    if [[ ",$EXTRAS," == *",bench,"* ]]; then
        pip_install --no-deps "spikingjelly==2.0.0"
    fi
    rm -f .venv/.fullrange-setup-*
    touch "$stamp"
fi
echo "[setup] ready: $($PY -c 'import torch, fullrange; print("torch", torch.__version__)')"
