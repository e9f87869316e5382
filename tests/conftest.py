from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

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


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kdcache"]
# torchrun gives each process one thread (OMP_NUM_THREADS=1) unless the variable is set, and a CPU
# matmul's summation order can follow the thread count (torch 2.14 does for the tiny Llama), so a
# single-process reference for a torchrun store runs with the same threads per process.
TORCHRUN_THREADS = {"OMP_NUM_THREADS": "1"}


def counted_batches(counter: Path) -> int:
    """Teacher or student forwards so far, as tests.helpers' counting models record them."""
    return len(counter.read_text()) if counter.exists() else 0


def kill_when(cmd: list[str], env: dict, ready: Callable[[], bool], timeout: float = 120) -> int:
    """Start ``cmd``, SIGKILL it once ``ready()`` holds (or after ``timeout`` s), and return its exit status."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def invoke_kdcache(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in this process (click's runner): for the many short commands of refusal tests, where
    a subprocess would spend most of its time importing torch. Returns what run_kdcache returns."""
    from click.testing import CliRunner

    from kdcache.cli import cli
    r = CliRunner().invoke(cli, list(args), prog_name="kdcache")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


@pytest.fixture(params=["zarr", "hdf5", "zarr-memory"])
def store_path(request, tmp_path):
    if request.param == "zarr":
        return str(tmp_path / "s.zarr")
    if request.param == "hdf5":
        return str(tmp_path / "s.h5")
    return f"memory://{uuid.uuid4().hex}/s.zarr"
