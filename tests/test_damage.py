"""Fuzzing damaged stores: for each backend and layout, copies of a store damaged at random offsets
(seeded), in every array's first and last chunk, and in the metadata, each through verify, inspect
and a short train-student. Each command must succeed on data identical to the original or fail with
exit code 1 and one `Error:` line, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdcache.dump import DumpConfig, dump_logits
from tests.conftest import DATA_ROOT, ROOT
from tests.helpers import write_corpus

SEED = int(os.environ.get("KDCACHE_DAMAGE_SEED", "17"))
RANDOM_CASES = int(os.environ.get("KDCACHE_DAMAGE_CASES", "6"))
DATA = "synthetic:n=400,dim=16,classes=5"
LAYOUTS = {"dense": {}, "topk": {"layout": "topk", "k": 2}, "sampled": {"layout": "sampled", "samples": 4},
           "per-token": {}}


def run_driver(store: str, dataset: str, student: str, work, seed: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDCACHE_DATA": DATA_ROOT}
    p = subprocess.run([sys.executable, "-m", "tests.damage_driver", store, dataset, student, str(work), str(seed),
                        str(RANDOM_CASES)], capture_output=True, text=True, env=env, timeout=900)
    records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0:
        last = records[-1] if records else None
        raise AssertionError(f"the driver died ({p.returncode}) during {last}: {p.stderr[-2000:]}")
    return [r for r in records if not r.get("start")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_damaged_stores_fail_with_one_line_or_read_identically(tmp_path, backend, layout):
    suffix = ".zarr" if backend == "zarr" else ".h5"
    if layout == "per-token":
        dataset = write_corpus(tmp_path / "corpus.txt", paragraphs=60)
        teacher, student = "tests.helpers:token_teacher", "lstm:8,16"
    else:
        dataset, teacher, student = DATA, "tests.helpers:slow_teacher", "mlp:8"
    store = str(tmp_path / f"pristine{suffix}")
    dump_logits(DumpConfig(teachers=[teacher], dataset=dataset, out=store, chunk_rows=64, progress=False,
                           **LAYOUTS[layout]))
    work = tmp_path / "work"
    work.mkdir()
    records = run_driver(store, dataset, student, work, SEED + hash((backend, layout)) % 1000)
    bad = [r for r in records
           if r["crashed"] or not ((r["exit"] == 0 and r["identical"])
                                   or (r["exit"] == 1 and len(r["error_lines"]) == 1
                                       and r["error_lines"][0].startswith("Error: ")))]
    cases = {r["case"] for r in records}
    print(f"{backend} {layout}: {len(cases)} damaged stores, {len(records)} commands, "
          f"{sum(r['exit'] == 1 for r in records)} refused with one line, {len(bad)} failures")
    assert len(cases) >= RANDOM_CASES + 8 and not bad, json.dumps(bad[:5], indent=1)
