"""Damage copies of one pristine store and run verify, inspect and a short train-student on each,
in-process through the real CLI; prints one JSON line per (damage, command). Run by
tests/test_damage.py in a subprocess, so that a crash inside a backend library fails the test
instead of killing the test runner.

    python -m tests.damage_driver PRISTINE DATASET STUDENT WORKDIR SEED RANDOM_CASES
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner


def flip(path: Path, offset: int) -> None:
    """XOR two bytes at ``offset`` of ``path`` with 0xFF."""
    data = bytearray(path.read_bytes())
    if not data:
        return
    offset = min(offset, len(data) - 2) if len(data) > 1 else 0
    for i in range(offset, min(offset + 2, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def targets(pristine: Path, rng: random.Random, random_cases: int) -> list[tuple[str, str, int]]:
    """(label, file relative to the store, offset): random offsets, every array's first and last chunk,
    and the metadata."""
    out: list[tuple[str, str, int]] = []
    if pristine.is_dir():  # zarr: a file per chunk and per metadata document
        files = sorted(str(p.relative_to(pristine)) for p in pristine.rglob("*") if p.is_file())
        sizes = {f: (pristine / f).stat().st_size for f in files}
        for k in range(random_cases):
            f = rng.choice(files)
            out.append((f"random {k}", f, rng.randrange(max(1, sizes[f]))))
        arrays = sorted({f.split("/")[0] for f in files if "/c/" in f})
        for a in arrays:
            chunks = sorted((f for f in files if f.startswith(a + "/c/")),
                            key=lambda f: [int(x) for x in f.split("/")[2:]])
            for which, f in (("first", chunks[0]), ("last", chunks[-1])):
                out.append((f"{a} {which} chunk", f, rng.randrange(max(1, sizes[f]))))
        out.append(("metadata: root zarr.json", "zarr.json", rng.randrange(sizes["zarr.json"])))
        meta = rng.choice([f for f in files if f.endswith("/zarr.json")])
        out.append((f"metadata: {meta}", meta, rng.randrange(sizes[meta])))
        return out
    import h5py  # HDF5: one file; chunks located through h5py
    size = pristine.stat().st_size
    for k in range(random_cases):
        out.append((f"random {k}", "", rng.randrange(size)))
    with h5py.File(pristine, "r") as f:
        for name in f:
            d = f[name]
            if d.chunks is None:  # a dimension scale: never written, no chunks
                continue
            n = d.id.get_num_chunks()
            for which, i in (("first", 0), ("last", n - 1)):
                info = d.id.get_chunk_info(i)
                out.append((f"{name} {which} chunk", "", info.byte_offset + rng.randrange(max(1, info.size))))
    raw = pristine.read_bytes()
    at = raw.find(b'"format_version"')
    out.append(("metadata: manifest attribute", "", at + rng.randrange(200)))
    out.append(("metadata: superblock and root", "", rng.randrange(2048)))
    return out


def same_data(a: str, b: str) -> bool:
    """True when store ``b`` reads exactly as ``a``: manifest, digests and every array."""
    from kdcache.store import LogitStore
    try:
        sa, sb = LogitStore(a, allow_partial=True), LogitStore(b, allow_partial=True)
        if sa.manifest.to_dict() != sb.manifest.to_dict() or not np.array_equal(sa.digests(), sb.digests()):
            return False
        ra, rb = sa.read(0, sa.num_samples, check=False), sb.read(0, sb.num_samples, check=False)
        return all(np.array_equal(ra.data[k], rb.data[k]) for k in ra.data) and np.array_equal(
            ra.sample_ids, rb.sample_ids) and np.array_equal(ra.labels, rb.labels)
    except Exception:
        return False


def main(pristine: str, dataset: str, student: str, work: str, seed: int, random_cases: int) -> None:
    from kdcache.cli import cli
    src = Path(pristine)
    rng = random.Random(seed)
    runner = CliRunner()
    for k, (label, rel, offset) in enumerate(targets(src, rng, random_cases)):
        damaged = Path(work) / f"case{k}{src.suffix}"
        if src.is_dir():
            shutil.copytree(src, damaged)
        else:
            shutil.copy(src, damaged)
        flip(damaged / rel if rel else damaged, offset)
        identical = same_data(str(src), str(damaged))
        commands = {
            "verify": ["verify", str(damaged)],
            "inspect": ["inspect", str(damaged)],
            "train-student": ["train-student", "--dataset", dataset, "--store", str(damaged), "--student", student,
                              "--epochs", "1", "--batch-size", "32", "--no-progress", "--out",
                              str(Path(work) / f"run{k}")],
        }
        for name, args in commands.items():
            print(json.dumps({"case": label, "file": rel, "offset": offset, "command": name, "start": True}),
                  flush=True)
            r = runner.invoke(cli, args, catch_exceptions=True)
            err = r.stderr if hasattr(r, "stderr") else r.output
            lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("note:")
                     and not line.startswith("warning:")]
            crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
            print(json.dumps({"case": label, "file": rel, "offset": offset, "command": name, "exit": r.exit_code,
                              "crashed": crashed, "exception": repr(r.exception) if crashed else None,
                              "error_lines": lines, "identical": identical}), flush=True)
        shutil.rmtree(damaged, ignore_errors=True) if damaged.is_dir() else damaged.unlink()
        shutil.rmtree(Path(work) / f"run{k}", ignore_errors=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    os.environ.setdefault("KDCACHE_QUIET", "1")
    main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]))
