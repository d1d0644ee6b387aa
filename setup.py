"""Packaging for grun_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed as
``grun_fast.kernels`` (a bare ``kernels`` import name belongs to another package on PyPI).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "grun_fast" / "version.py").read_text()).group(1)

packages = find_packages(include=["grun_fast", "grun_fast.*"]) + ["grun_fast.kernels"]

SERVE = ["transformers[serving]>=5.24,<5.25"]
TEST = ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout", "peft>=0.13", "gguf>=0.10"]

setup(
    name="grun_fast",
    version=VERSION,
    description="Fast GRUN (gated representation unlearning) for Hugging Face causal LMs",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"grun_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        # the lowest version tested (.ci/run runs the quick suite on it and, without the serving extra, on the
        # newest); only `grun-fast serve` needs < 5.25, whose rewrite of transformers.cli.serving removed the
        # classes grun_fast/serve_models.py builds on: the serve extra pins that
        "transformers>=5.24",
        "safetensors>=0.4",
        "datasets>=2.18",
        "accelerate>=0.34",
        "numpy",
        "scipy",
        "rouge-score>=0.1.2",
        "matplotlib",
        "tqdm",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        "serve": SERVE,  # grun-fast serve: fastapi, uvicorn, openai, pydantic
        "test": TEST,    # the test suite without serving (.ci/run uses it on the newest transformers)
        "dev": TEST + SERVE,
    },
    entry_points={"console_scripts": ["grun-fast=grun_fast.cli:main"]},
)
