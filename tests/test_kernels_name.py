"""The checkout's ``kernels/`` folder must not hide Hugging Face's ``kernels`` distribution (transformers >= 5.25
requires and imports it) from a process started in the checkout."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_is_the_installed_distribution_not_this_checkout():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed")
    out = subprocess.run([sys.executable, "-c", "import kernels, grun_fast.kernels as g; print(kernels.__file__); "
                          "print(g.__name__)"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    top, ours = out.stdout.split()
    assert not Path(top).resolve().is_relative_to(ROOT), top
    assert ours == "grun_fast.kernels"
