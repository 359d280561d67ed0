"""The wheel holds every module: built from the repository, unpacked outside it, imported with
the venv's dependencies (not the editable install), and its entry modules answer --help."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_holds_and_imports_every_module(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fullrange-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    in_wheel = sorted(str(p.relative_to(site).with_suffix("")).replace("/", ".")
                      for p in site.rglob("*.py"))
    in_tree = sorted(["fullrange." + str(p.relative_to(REPO / "fullrange").with_suffix("")).replace("/", ".")
                      for p in (REPO / "fullrange").rglob("*.py")]
                     + ["fullrange.kernels." + p.stem for p in (REPO / "kernels").glob("*.py")])
    assert in_wheel == in_tree  # every module, teacher_cache and kernels included
    modules = [m.removesuffix(".__init__") for m in in_wheel]
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    mod = importlib.import_module(m)\n"
            f"    assert mod.__file__.startswith({str(site)!r}), (m, mod.__file__)\n"
            "print('IMPORTED', len(sys.argv))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "IMPORTED" in done.stdout, done.stderr[-3000:]
    for entry in ("train", "cache_teacher", "sweep", "write_ffcv"):
        helped = subprocess.run([sys.executable, "-m", f"fullrange.{entry}", "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (entry, helped.stderr[-2000:])
