from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _data_root() -> str:
    for p in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if (p / "mnist.npz").exists():
            return str(p)
    return str(ROOT / "data")


DATA_ROOT = _data_root()
os.environ.setdefault("KDCACHE_DATA", DATA_ROOT)


def run_kdcache(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600,
                cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, with the repo on PYTHONPATH so tests.helpers specs import."""
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "KDCACHE_DATA": DATA_ROOT, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True, env=e,
                       timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(params=["zarr", "hdf5", "zarr-memory"])
def store_path(request, tmp_path):
    if request.param == "zarr":
        return str(tmp_path / "s.zarr")
    if request.param == "hdf5":
        return str(tmp_path / "s.h5")
    return f"memory://{uuid.uuid4().hex}/s.zarr"
