"""Build and install octavo: Python packages from engine/, models/, bench/ (see DESIGN.md §1)."""
from setuptools import setup

setup(
    name="octavo",
    version="0.1.0",
    packages=["octavo", "octavo.models", "octavo.models.layers", "octavo.bench", "octavo.bench.kernels"],
    package_dir={
        "octavo": "engine",
        "octavo.models": "models",
        "octavo.models.layers": "models/layers",
        "octavo.bench": "bench",
        "octavo.bench.kernels": "bench/kernels",
    },
)
