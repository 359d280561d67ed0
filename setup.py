"""Package discovery (the metadata is in pyproject.toml): every package under fullrange/ is found
automatically, and the top-level kernels/ folder installs as fullrange.kernels, so a generic
`import kernels` never collides with another package of that name."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["fullrange", "fullrange.*"]) + ["fullrange.kernels"],
      package_dir={"fullrange.kernels": "kernels"})
